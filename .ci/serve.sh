#!/usr/bin/env bash
# CI step for the OpenAI-compatible server: install the [serve] extra, then run its tests
# (the official openai SDK against a real uvicorn on 127.0.0.1). About 20-40 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pip install -q -e ".[serve]"
python -m pytest -q tests/test_serve.py tests/test_continuous_batching.py
python -m pytest -q --doctest-modules modelscope_llama2/serving modelscope_llama2/engines/continuous_batching.py
