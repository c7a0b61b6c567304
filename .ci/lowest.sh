#!/usr/bin/env bash
# CI step: the test suite on the OLDEST versions setup.py allows (the core pass runs the newest, what a new
# user gets). Its own venv, built from a constraints file of setup.py's lower bounds (install_requires and
# the test extra; .ci/lower_bounds.py), cached (.ci/provision.bash) and rebuilt when the bounds or this
# script change. When a dependency's oldest allowed version fails here, raise its bound in setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/provision.bash

CONSTRAINTS=$(python3 .ci/lower_bounds.py)
echo "lower bounds:" $CONSTRAINTS
build() {
  local python=$1
  echo "$CONSTRAINTS" > "$VENV/constraints.txt"
  "$python" -m pip install -q -c "$VENV/constraints.txt" -e ".[test]"
}
cached_venv venv-lowest build .ci/lowest.sh <(echo "$CONSTRAINTS")
install_editable "$VENV/bin/python"
"$VENV/bin/python" -m pip freeze | grep -iE "^($(echo "$CONSTRAINTS" | cut -d= -f1 | paste -sd'|'))==" | paste -sd' '
. "$VENV/bin/activate"  # README blocks run `python`: this venv's
python -m pytest -q
