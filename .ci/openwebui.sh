#!/usr/bin/env bash
# CI step: the real Open WebUI's chat page on the server, with its default settings (its built-in tools sent
# with every message), two turns typed in headless Chromium and answered exactly, and a turn that failed
# (tests/openwebui).
#
# Open WebUI pins its own stack (transformers, accelerate, ... older than the package needs), so it lives in
# a venv of its own, without the package: the server and the tests run in the CI venv (Playwright is
# installed there, as .ci/web.sh does; it drives Debian's Chromium) and Open WebUI is a subprocess. torch is
# pinned to the CPU wheel the core step uses (Open WebUI does not pin it, and an unpinned one pulls a CUDA
# build: 4 GB more). Cached (.ci/provision.bash) and rebuilt when this script (the pins below) changes.
# About 1.5 min with the venv cached, plus about 3 min to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash
. .venv/bin/activate

apt_packages chromium
OPENWEBUI_VERSION=0.12.4
build() { "$1" -m pip install -q torch==2.13.0 "open-webui==$OPENWEBUI_VERSION"; }
cached_venv "venv-openwebui-$OPENWEBUI_VERSION" build .ci/openwebui.sh
"$VENV/bin/python" -c "from importlib.metadata import version as v; print('open-webui', v('open-webui'), '| torch', v('torch'))"
# Playwright drives /usr/bin/chromium (executable_path); `playwright install` is never run.
python -m pip install -q playwright
MODELSCOPE_LLAMA2_OPENWEBUI_VENV="$VENV" python -m pytest -q tests/openwebui
