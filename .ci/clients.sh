#!/usr/bin/env bash
# CI step: everyday OpenAI clients against the real server (tests/clients): litellm (openai/ and hosted_vllm/
# prefixes, streamed and not) and the llm CLI (an extra-openai-models.yaml entry, two turns).
#
# The clients' pins clash with the package's, so they live in a venv of their own (no torch, no package: the
# server runs in the CI venv, the clients are its subprocesses). The venv is cached between CI runs on the
# same machine and rebuilt only when missing, half-built, or when this script (the pins below) changes.
# About 1.5 min on 2 cores with the venv cached, plus about 1 min to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

CLIENTS=(litellm==1.110.2 llm==0.36)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci"
VENV="$CACHE/venv-clients"
STAMP="$VENV/.built-$(sha256sum .ci/clients.sh | cut -c1-16)"

if [[ ! -f "$STAMP" ]]; then
  echo "building $VENV"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${CLIENTS[@]}"
  touch "$STAMP"
else
  echo "reusing $VENV"
fi
MODELSCOPE_LLAMA2_CLIENTS_VENV="$VENV" python -m pytest -q tests/clients
