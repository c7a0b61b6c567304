#!/usr/bin/env bash
# CI step: structured outputs and tool calls with the real clients (tests/structured_clients): pydantic-ai
# (structured output agent, tool agent), instructor (TOOLS, JSON_SCHEMA), LangChain (with_structured_output
# both methods, bind_tools). The SDK's chat.completions.parse and the grammar properties run in the core step.
#
# The clients' pins clash with the package's, so they live in a venv of their own (no torch, no package: the
# server runs in the CI venv, each client is a subprocess). Cached between CI runs on the same machine and
# rebuilt only when missing, half-built, or when this script (the pins below) changes.
# About 40 s on 2 cores with the venv cached, plus about 1 min to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

CLIENTS=("pydantic-ai-slim[openai]==2.38.0" instructor==1.17.0 langchain-openai==1.8.1)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci"
VENV="$CACHE/venv-structured-clients"
STAMP="$VENV/.built-$(sha256sum .ci/structured.sh | cut -c1-16)"

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
MODELSCOPE_LLAMA2_STRUCTURED_VENV="$VENV" python -m pytest -q tests/structured_clients
