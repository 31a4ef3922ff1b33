#!/usr/bin/env bash
# Runs every test of aoai-fwdproxy on a fresh machine (Rust toolchain, Python 3, Node/npm):
# installs what the tests need, then runs the Rust tests, the OpenAI-SDK tests, the infra checks
# and the package checks. Exits non-zero on the first failure, saying which step failed.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
trap 'echo "FAILED at: ${current:-setup}" >&2' ERR

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

current="cargo build (all binaries)"
step "$current"
cargo build --workspace --bins --locked

current="cargo test"
step "$current"
cargo test --workspace --locked

current="OpenAI Python SDK against the handler"
step "$current"
FWDPROXY_HANDLER="$PWD/target/debug/handler" .venv/bin/python -m pytest -q tests/python

current="end-to-end: the local set, newman and the OpenAI SDK through the gateway"
step "$current"
E2E_PROFILE=debug bash scripts/e2e.sh

if [ -x infra/tests/check.sh ] || [ -f infra/tests/check.sh ]; then
  current="infra checks (structure, Bicep syntax, checkov)"
  step "$current"
  bash infra/tests/check.sh
fi

if [ -f scripts/check-package.sh ]; then
  current="Function App package checks"
  step "$current"
  bash scripts/check-package.sh
fi

step "all tests passed"
