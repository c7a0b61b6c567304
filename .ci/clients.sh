#!/usr/bin/env bash
# CI step: everyday OpenAI clients against the real server (tests/clients): litellm (openai/ and hosted_vllm/
# prefixes, streamed and not) and the llm CLI (an extra-openai-models.yaml entry, two turns).
#
# The clients' pins clash with the package's, so they live in a cached venv of their own (.ci/provision.bash;
# no torch, no package: the server runs in the CI venv, the clients are its subprocesses), rebuilt when this
# script (the pins below) changes. About 1.5 min on 2 cores with the venv cached, plus about 1 min to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash
. .venv/bin/activate

build() { "$1" -m pip install -q litellm==1.110.2 llm==0.36; }
cached_venv venv-clients build .ci/clients.sh
MODELSCOPE_LLAMA2_CLIENTS_VENV="$VENV" python -m pytest -q tests/clients
