#!/usr/bin/env bash
# CI step for the OpenAI-compatible server. Its tests (tests/test_serve.py, tests/test_continuous_batching.py:
# the official openai SDK against a real uvicorn on 127.0.0.1) run in the main pass, since the test extra
# brings the server's dependencies; this step adds the [serve] extra as declared, the modules' doctests,
# and the command line.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pip install -q -e ".[serve]"
python -m pytest -q --doctest-modules modelscope_llama2/serving modelscope_llama2/engines/continuous_batching.py
python -m modelscope_llama2 serve --help > /dev/null
