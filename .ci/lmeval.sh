#!/usr/bin/env bash
# CI step: lm-evaluation-harness against the server (tests/lmeval), in a venv of its own.
#
# lm-eval brings its own stack (datasets, evaluate, sacrebleu, ...); it gets its own venv so those never
# reach the core one. torch is pinned to the CPU wheel the core step uses (an unpinned one would pull a
# CUDA build). The venv is cached (.ci/provision.bash) and rebuilt when this script or setup.py change.
# ~1 min when cached.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash

LM_EVAL_VERSION=0.4.13
build() { "$1" -m pip install -q torch==2.13.0 "lm_eval[api]==$LM_EVAL_VERSION" -e ".[test]"; }
cached_venv "venv-lmeval-$LM_EVAL_VERSION" build .ci/lmeval.sh setup.py
install_editable "$VENV/bin/python"
"$VENV/bin/python" -c "import lm_eval, torch, transformers; from importlib.metadata import version; print('lm_eval', version('lm_eval'), '| transformers', transformers.__version__, '| torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q tests/lmeval
