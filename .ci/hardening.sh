#!/usr/bin/env bash
# CI step for the protocol property test (tests/schemathesis): Schemathesis in a venv of its own, cached under
# ${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci and stamped by the version it installs (its pins would
# move this package's dependencies), then the test from the CI venv against a real server. About 3 minutes on
# 2 cores (a 150 s Schemathesis budget).
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEMATHESIS_VERSION=4.32.5
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci"
VENV="$CACHE/venv-schemathesis-$SCHEMATHESIS_VERSION"
if [ ! -f "$VENV/.complete" ]; then  # built whole or not at all
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
    touch "$VENV/.complete"
fi
. .venv/bin/activate
MODELSCOPE_LLAMA2_SCHEMATHESIS="$VENV/bin/st" python -m pytest -q tests/schemathesis
