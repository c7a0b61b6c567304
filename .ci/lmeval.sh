#!/usr/bin/env bash
# CI step: lm-evaluation-harness against the server (tests/lmeval), in a venv of its own.
#
# lm-eval brings its own stack (datasets, evaluate, sacrebleu, ...); it gets its own venv so those never
# reach the core one. torch is pinned to the CPU wheel the core step uses (an unpinned one would pull a
# CUDA build). The venv lives in a cache folder that survives between CI runs on the same machine and is
# rebuilt only when missing, half-built, or when this script or setup.py change. ~1 min when cached.
set -euo pipefail
cd "$(dirname "$0")/.."

LM_EVAL_VERSION=0.4.13
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci"
VENV="$CACHE/venv-lmeval-$LM_EVAL_VERSION"
STAMP="$VENV/.built-$(cat .ci/lmeval.sh setup.py | sha256sum | cut -c1-16)"

build_venv() {
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0 "lm_eval[api]==$LM_EVAL_VERSION" -e ".[test]"
  touch "$STAMP"
}

if [[ ! -f "$STAMP" ]]; then
  echo "building $VENV"
  build_venv
else
  echo "reusing $VENV"
  # Point the editable install at this checkout (CI clones into a new folder each run).
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
"$VENV/bin/python" -c "import lm_eval, torch, transformers; from importlib.metadata import version; print('lm_eval', version('lm_eval'), '| transformers', transformers.__version__, '| torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q tests/lmeval
