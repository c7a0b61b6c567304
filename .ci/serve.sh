#!/usr/bin/env bash
# CI step for the OpenAI-compatible server. Its tests (tests/test_serve.py, tests/test_batching.py:
# the official openai SDK against a real uvicorn on 127.0.0.1) and its doctests run in the main pass, since the
# test extra brings the server's dependencies; this step checks that the [serve] extra as declared installs
# and that the command line starts.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pip install -q -e ".[serve]"
python -m modelscope_llama2 serve --help > /dev/null
