#!/usr/bin/env bash
# CI step for the web chat: Debian's Chromium and CJK/emoji fonts, the [web] extra and Playwright, then
# the web tests (its logic, the page driven in real headless Chromium, and gr.load_chat on the server). About
# 1.5 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash  # apt_packages
. .venv/bin/activate

apt_packages chromium fonts-noto-cjk fonts-noto-color-emoji

# Playwright drives Debian's /usr/bin/chromium (executable_path); `playwright install` is never run,
# its browser download is not reachable from CI.
python -m pip install -q -e ".[web]" playwright
MODELSCOPE_LLAMA2_BROWSER_TESTS=required python -m pytest -q tests/test_web.py tests/test_web_browser.py tests/test_gradio_load_chat.py
