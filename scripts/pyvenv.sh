#!/usr/bin/env bash
# Make DIR a Python virtual environment with pinned packages installed:
#
#   scripts/pyvenv.sh DIR -r requirements.txt
#   scripts/pyvenv.sh DIR 'name==1.2.3' ...
#
# With uv when it can be had: uv is fetched once from PyPI (pinned, into target/uv, under a lock
# so the test script's parallel installs share one copy) and installs checkov's hundred pinned
# packages in about 2 s of CPU where pip takes about 45 s (measured: docs/benchmarks.md, "CI
# time"). The venv uses this machine's python3 (uv never downloads an interpreter here). When uv
# cannot be installed (no PyPI, no pip) or cannot install the packages, it falls back to
# `python3 -m venv` and pip. Either way
# the packages are the same pins; DIR may already exist (packages are added or changed in place).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: scripts/pyvenv.sh DIR (-r requirements.txt | name==version)..." >&2
  exit 2
fi
dir="$1"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION="0.13.9"
uv_home="$root/target/uv"
python="$(command -v python3)"

# uv: installed once into its own venv, behind a lock (flock, when the machine has it).
get_uv() {
  if [ -f "$uv_home/ok" ]; then
    echo "$uv_home/bin/uv"
    return 0
  fi
  mkdir -p "$root/target"
  (
    if command -v flock >/dev/null 2>&1; then flock 9; fi
    if [ ! -f "$uv_home/ok" ]; then
      rm -rf "$uv_home"
      "$python" -m venv "$uv_home" &&
        "$uv_home/bin/python" -m pip install --quiet --disable-pip-version-check \
          "uv==$UV_VERSION" &&
        [ -x "$uv_home/bin/uv" ] && touch "$uv_home/ok"
    fi
  ) 9>"$root/target/uv.lock" >&2 || true
  [ -f "$uv_home/ok" ] && echo "$uv_home/bin/uv"
}

with_uv() {
  export UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
  if [ ! -x "$dir/bin/python" ]; then
    "$uv" venv --quiet --clear --python "$python" "$dir" || return 1
  fi
  "$uv" pip install --quiet --python "$dir/bin/python" "$@"
}
with_pip() {
  # also over a venv uv made (it has no pip): `venv` on an existing one adds pip
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}
# uv where it works; pip when uv cannot be had or cannot install (pip's own configuration,
# e.g. a wheel mirror, is not uv's)
if uv="$(get_uv)" && [ -n "$uv" ] && with_uv "$@"; then
  :
else
  echo "pyvenv.sh: uv unavailable or failed, installing with pip" >&2
  with_pip "$@"
fi
