#!/usr/bin/env bash
# CI step: the test suite on the OLDEST versions setup.py allows (the core pass runs the newest, what a new
# user gets). Its own venv, built from a constraints file of setup.py's lower bounds (install_requires and
# the test extra; .ci/lower_bounds.py), cached between runs and rebuilt when the bounds or this script change.
# When a dependency's oldest allowed version fails here, raise its bound in setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci"
VENV="$CACHE/venv-lowest"
CONSTRAINTS=$(python3 .ci/lower_bounds.py)
STAMP="$VENV/.built-$( (echo "$CONSTRAINTS"; cat .ci/lowest.sh) | sha256sum | cut -c1-16)"

if [[ ! -f "$STAMP" ]]; then
  echo "building $VENV from these lower bounds:" $CONSTRAINTS
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  echo "$CONSTRAINTS" > "$VENV/constraints.txt"
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -e ".[test]"
  touch "$STAMP"
else
  echo "reusing $VENV"
  # Point the editable install at this checkout (CI clones into a new folder each run).
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
"$VENV/bin/python" -m pip freeze | grep -iE "^($(echo "$CONSTRAINTS" | cut -d= -f1 | paste -sd'|'))==" | paste -sd' '
. "$VENV/bin/activate"  # README blocks run `python`: this venv's
python -m pytest -q
