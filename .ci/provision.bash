# What the .ci steps provision, sourced by them (not a step itself: .ci/run runs only .ci/*.sh): cached venvs
# and Debian packages.
#
# Each optional stack (vLLM, lm-eval, Open WebUI, client libraries, the lowest versions) pins what would move
# the package's dependencies, so it gets a venv of its own under $CACHE, which survives between CI runs on the
# same machine.

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelscope_llama2-ci"

# cached_venv NAME BUILD INPUT...
#   Sets VENV to $CACHE/NAME. Builds it when missing, half-built (the stamp is written last), or when one of
#   the INPUT files (what it is built from: the step's script, setup.py, ...) changed: a fresh venv with a
#   current pip, then the function BUILD, called with the venv's python.
cached_venv() {
  local name=$1 build=$2
  shift 2
  VENV="$CACHE/$name"
  local stamp
  stamp="$VENV/.built-$(cat "$@" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
  if [[ -f "$stamp" ]]; then
    echo "reusing $VENV"
    return
  fi
  echo "building $VENV"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$build" "$VENV/bin/python"
  touch "$stamp"
}

# install_editable PYTHON
#   The package from this checkout into a cached venv that holds it: CI clones into a new folder each run, so
#   a reused venv's editable install would point at an old clone.
install_editable() {
  "$1" -m pip install -q --no-deps -e .
}

# apt_packages PACKAGE...
#   Installs those of the Debian packages that are missing (as root, or through sudo).
apt_packages() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  (( ${#missing[@]} )) || return 0
  local as_root=()
  (( EUID == 0 )) || as_root=(sudo)
  "${as_root[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}
