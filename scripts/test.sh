#!/usr/bin/env bash
# Runs every test of aoai-fwdproxy on a fresh machine (Rust toolchain, Python 3, Node/npm):
# installs what the tests need, then runs the Rust tests, the package checks, the OpenAI-SDK
# tests and the end-to-end set against the packaged handler, and the infra checks. Exits non-zero
# on the first failure, saying which step failed.
#
# Each build happens once: `cargo test --workspace` compiles the dependency tree once, with the
# test feature set, and builds the debug `handler` and `fwdproxy-dev` binaries the Rust tests
# and the launcher use (a separate `cargo build --bins` would compile tokio, hyper, reqwest, the
# Azure SDK ... a second time: dev-dependencies enable more features of the same crates, so the
# plain binaries resolve a different feature set). The package step builds the release handler
# that ships, and the SDK and end-to-end tests run exactly that binary.
set -euo pipefail
cd "$(dirname "$0")/.."

# Per-step timing: each step ends with a line `time: <seconds> s wall  <step>` (wall clock, from
# bash's SECONDS); the last line sums them up. Kept permanently: the suite has a time budget
# (docs/benchmarks.md, "CI time"), and these lines are how a slow step is found.
suite_started=$SECONDS
step_started=$SECONDS
step_name=""
step_done() {
  if [ -n "$step_name" ]; then
    printf 'time: %4d s wall  %s\n' "$((SECONDS - step_started))" "$step_name"
  fi
  step_name=""
}
step() {
  step_done
  printf '\n==> %s\n' "$*"
  step_name="$*"
  step_started=$SECONDS
}
trap 'echo "FAILED at: ${current:-setup}" >&2' ERR

# Faster links (scripts/linker.sh uses mold when present, cc otherwise): best effort only.
if ! command -v mold >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  step "mold linker (optional; linking falls back to cc without it)"
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
  if ! { $sudo apt-get install -y -qq mold >/dev/null 2>&1 ||
         { $sudo apt-get update -qq >/dev/null 2>&1 &&
           $sudo apt-get install -y -qq mold >/dev/null 2>&1; }; }; then
    echo "mold could not be installed; linking with cc"
  fi
fi

current="python test environment (.venv)"
step "$current"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
req_stamp=".venv/.requirements-$(sha256sum tests/python/requirements.txt | cut -c1-16)"
if [ ! -f "$req_stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  touch "$req_stamp"
fi

current="cargo test --no-run (builds the tests and the debug binaries)"
step "$current"
cargo test --workspace --locked --no-run

current="cargo test (runs them)"
step "$current"
cargo test --workspace --locked

current="Function App package checks (builds the release handler that ships)"
step "$current"
bash scripts/check-package.sh
shipped="$PWD/dist/package/handler"
[ -x "$shipped" ] || { echo "no packaged handler at $shipped" >&2; false; }

current="OpenAI Python SDK against the packaged handler"
step "$current"
FWDPROXY_HANDLER="$shipped" .venv/bin/python -m pytest -q tests/python

current="end-to-end: the local set with the packaged handler, newman and the OpenAI SDK"
step "$current"
E2E_PROFILE=debug E2E_NO_BUILD=1 E2E_HANDLER="$shipped" bash scripts/e2e.sh

if [ -x infra/tests/check.sh ] || [ -f infra/tests/check.sh ]; then
  current="infra checks (structure, Bicep syntax, checkov)"
  step "$current"
  bash infra/tests/check.sh
fi

step_done
printf 'time: %4d s wall  scripts/test.sh in all\n' "$((SECONDS - suite_started))"
step "all tests passed"
step_name=""
