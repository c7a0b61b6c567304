#!/usr/bin/env bash
# CI step for the scale-out on Ray Serve (serve --replicas N): installs the [ray] extra into the CI venv, then
# runs the tests marked `ray` (a simulated two-node Ray cluster on this machine, the official openai SDK over
# HTTP; about 4 minutes on 2 cores) and the Ray module's doctests. The core pass does not collect tests/ray
# while Ray is missing (tests/ray/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pip install -q -e ".[ray]"
python -m pytest -q -m ray tests/ray
python -m pytest -q --doctest-modules modelscope_llama2/serving/ray.py modelscope_llama2/serving/affinity.py
