#!/usr/bin/env bash
# CI step: structured outputs and tool calls with the real clients (tests/structured_clients): pydantic-ai
# (structured output agent, tool agent), instructor (TOOLS, JSON_SCHEMA), LangChain (with_structured_output
# both methods, bind_tools). The SDK's chat.completions.parse and the grammar properties run in the core step.
#
# The clients' pins clash with the package's, so they live in a cached venv of their own (.ci/provision.bash;
# no torch, no package: the server runs in the CI venv, each client is a subprocess), rebuilt when this script
# (the pins below) changes. About 40 s on 2 cores with the venv cached, plus about 1 min to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash
. .venv/bin/activate

build() { "$1" -m pip install -q "pydantic-ai-slim[openai]==2.38.0" instructor==1.17.0 langchain-openai==1.8.1; }
cached_venv venv-structured-clients build .ci/structured.sh
MODELSCOPE_LLAMA2_STRUCTURED_VENV="$VENV" python -m pytest -q tests/structured_clients
