#!/usr/bin/env bash
# CI step for the protocol property test (tests/schemathesis): Schemathesis in a cached venv of its own
# (.ci/provision.bash; its pins would move this package's dependencies), then the test from the CI venv
# against a real server. About 3 minutes on 2 cores (a 150 s Schemathesis budget).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash
. .venv/bin/activate

SCHEMATHESIS_VERSION=4.32.5
build() { "$1" -m pip install -q "schemathesis==$SCHEMATHESIS_VERSION"; }
cached_venv "venv-schemathesis-$SCHEMATHESIS_VERSION" build .ci/hardening.sh
MODELSCOPE_LLAMA2_SCHEMATHESIS="$VENV/bin/st" python -m pytest -q tests/schemathesis
