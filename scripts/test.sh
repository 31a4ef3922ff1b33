#!/usr/bin/env bash
# Runs every test of aoai-fwdproxy on a fresh machine (Rust toolchain, Python 3, Node/npm):
# installs what the tests need, then runs the Rust tests, the package checks, the OpenAI-SDK
# tests and the end-to-end set against the packaged handler, and the infra checks. Exits non-zero
# on the first failure, saying which step failed.
#
#   scripts/test.sh          the tests
#   scripts/test.sh --lint   also `cargo fmt --check`, and clippy -D warnings on the workspace's
#                            crates while the tests build (.ci/run)
#
# Each build happens once: `cargo test --workspace` compiles the dependency tree once, with the
# test feature set, and builds the debug `handler` and `fwdproxy-dev` binaries the Rust tests
# and the launcher use (a separate `cargo build --bins` would compile tokio, hyper, reqwest, the
# Azure SDK ... a second time: dev-dependencies enable more features of the same crates, so the
# plain binaries resolve a different feature set). The integration tests are one binary per
# package (tests/it, devkit/tests/it: one link each, not one per file). The package step builds
# the release handler that ships, and the SDK and end-to-end tests run exactly that binary.
#
# What only waits on the network (pip, npm, apt) runs in the background from the start, while
# cargo keeps both cores busy: the test tools' venv, newman, the packaging tools; and the infra
# checks, which need no build (checkov's install, then the checks). A step that needs one waits
# for it, and a failed one fails the run with its log.
#
# Timing: each step ends with `time: <s> s wall, <s> s cpu  <step>` (cpu = user+sys of the
# processes the step waited for, a background install counted where it is waited for); the
# last lines sum up. Kept permanently: the suite has a time budget (docs/benchmarks.md,
# "CI time"), and these lines are how a slow step is found.
set -euo pipefail
cd "$(dirname "$0")/.."

lint=0
case "${1:-}" in
  --lint) lint=1 ;;
  "") ;;
  *) echo "test.sh: unknown option $1 (--lint, or nothing)" >&2; exit 2 ;;
esac

# Scratch for this run: the background installs' logs, the CPU time readings.
bg_dir="$(mktemp -d "${TMPDIR:-/tmp}/fwdproxy-test.XXXXXX")"

# cpu_now: sets `cpu` to the CPU time (user+sys, ms) of every child process this shell has
# waited for so far. `times` reads this shell's counters, so it must not run in a subshell
# (no $(...)): it writes to a file read back here.
cpu=0
cpu_now() {
  local t re='([0-9]+)m([0-9]+)\.([0-9]+)s ([0-9]+)m([0-9]+)\.([0-9]+)s'
  times >"$bg_dir/times"
  t="$(tail -n1 "$bg_dir/times")"
  if [[ "$t" =~ $re ]]; then
    local r=("${BASH_REMATCH[@]}")
    cpu=$(( (r[1] * 60 + 10#${r[2]}) * 1000 + 10#${r[3]:0:3} + (r[4] * 60 + 10#${r[5]}) * 1000 + 10#${r[6]:0:3} ))
  fi
}
cpu_now
suite_started=$SECONDS
suite_cpu=$cpu
step_started=$SECONDS
step_cpu=$cpu
step_name=""
step_done() {
  if [ -n "$step_name" ]; then
    cpu_now
    printf 'time: %4d s wall, %4d s cpu  %s\n' "$((SECONDS - step_started))" \
      "$(((cpu - step_cpu) / 1000))" "$step_name"
  fi
  step_name=""
}
step() {
  step_done
  printf '\n==> %s\n' "$*"
  step_name="$*"
  step_started=$SECONDS
  cpu_now
  step_cpu=$cpu
}

# Background installs: `bg NAME command...` starts one (output to a log), `bg_wait NAME` waits
# for it and fails the run, showing the log, when it failed.
declare -A bg_pids=()
bg() {
  local name="$1"
  shift
  # Job control on while starting it: the job gets its own process group, so stopping it early
  # stops pip/npm/apt under it too.
  set -m
  ( t0=$SECONDS; "$@"; echo "time: $((SECONDS - t0)) s wall (background)" ) \
    </dev/null >"$bg_dir/$name.log" 2>&1 &
  bg_pids[$name]=$!
  set +m
}
bg_wait() {
  local name="$1" pid="${bg_pids[$1]:-}"
  [ -n "$pid" ] || return 0
  unset "bg_pids[$name]"
  if wait "$pid"; then
    printf '%s: %s\n' "$name" "$(tail -n1 "$bg_dir/$name.log")"
  else
    echo "$name failed:" >&2
    sed 's/^/    /' "$bg_dir/$name.log" >&2
    return 1
  fi
}
on_exit() {
  local pid
  # Only the installs this script started, by their ids, when it stops early.
  for pid in "${bg_pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$bg_dir"
}
trap on_exit EXIT
trap 'echo "FAILED at: ${current:-setup}" >&2' ERR

# The release build's own target dir (see the package step).
ship_target="$PWD/target/ship"

current="start the tool installs in the background"
step "$current"
# Faster links (scripts/linker.sh uses mold when present, cc otherwise, deciding per link):
# best effort only.
install_mold() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
  if ! { $sudo apt-get install -y -qq mold >/dev/null 2>&1 ||
         { $sudo apt-get update -qq >/dev/null 2>&1 &&
           $sudo apt-get install -y -qq mold >/dev/null 2>&1; }; }; then
    echo "mold could not be installed; linking with cc"
  fi
}
if ! command -v mold >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  bg mold install_mold
fi
# The OpenAI SDK and pytest (.venv), for the SDK tests and e2e.sh.
install_venv() {
  local stamp
  stamp=".venv/.requirements-$(sha256sum tests/python/requirements.txt | cut -c1-16)"
  if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ]; then
    bash scripts/pyvenv.sh .venv -r tests/python/requirements.txt
    touch "$stamp"
  fi
}
bg venv install_venv
# newman, pinned in package-lock.json, for e2e.sh.
if [ ! -x node_modules/.bin/newman ]; then
  bg newman npm ci --no-audit --no-fund
fi
# The release build of the handler that ships (scripts/package.sh: cargo-zigbuild and ziglang
# when missing, then the zig build), from the start, at the lowest CPU priority: the debug build
# the tests need keeps both cores, and the release build takes what it leaves (the serial end of
# the debug build, the test run, which mostly waits on sockets and child processes: ~40 s of
# CPU in ~90 s). Started after the debug build instead, the whole run waited on its last ~350 s
# (its thin-LTO end is mostly one core). Its own target dir: nothing is shared with the debug
# build anyway (other profile, other target triple), and a second cargo never waits for the
# first one's lock. Without the clippy wrapper (below): the release build is not linted.
bg package nice -n 19 env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS \
  CARGO_TARGET_DIR="$ship_target" bash scripts/package.sh
# The infra checks need neither build: they run whole in the background (install, then the
# checks), and the last step shows their output. Off the critical path: they used to take the
# last ~30 s of the run on one core.
bg infra nice -n 10 bash infra/tests/check.sh

if [ "$lint" = 1 ]; then
  current="cargo fmt --check"
  step "$current"
  cargo fmt --all -- --check

  # clippy rides on the test build instead of a `cargo clippy` pass of its own: `cargo clippy`
  # is `cargo check` with clippy-driver as RUSTC_WORKSPACE_WRAPPER, which compiles the whole
  # dependency tree a third way (check metadata, shared with neither the debug nor the release
  # build). clippy-driver run as the wrapper of a normal build lints the workspace's crates as
  # it compiles them, with the lints `cargo clippy --all-targets -- -D warnings` applies:
  # `cargo test --no-run` builds the same targets (libs, bins, unit and integration tests; the
  # workspace has no benches or examples). Exported, so the test run below sees the same
  # wrapper and reuses what was built; the release build, started before, never sees it.
  clippy_driver="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver || true)"
  [ -x "$clippy_driver" ] || { echo "clippy-driver not found: rustup component add clippy" >&2; false; }
  export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
  export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
  # A lint gate that silently stopped linting would pass everything: a one-line crate with a
  # clippy finding must fail to build the same way (about a second).
  current="clippy-driver as the workspace wrapper refuses a clippy finding"
  probe="$bg_dir/clippy-probe"
  mkdir -p "$probe/src"
  printf '[package]\nname = "clippy-probe"\nversion = "0.0.0"\nedition = "2021"\n[workspace]\n' \
    >"$probe/Cargo.toml"
  printf 'pub fn f() -> usize {\n    let v = vec![1, 2];\n    v.len()\n}\n' >"$probe/src/lib.rs"
  if cargo build -q --offline --manifest-path "$probe/Cargo.toml" --target-dir "$probe/target" \
      >"$probe/out" 2>&1 || ! grep -q 'clippy::useless.vec' "$probe/out"; then
    echo "clippy-driver as the workspace wrapper did not refuse a clippy finding:" >&2
    sed 's/^/    /' "$probe/out" >&2
    false
  fi
fi

current="cargo test --no-run (builds the tests and the debug binaries)"
if [ "$lint" = 1 ]; then
  current="cargo test --no-run (builds the tests and the debug binaries; clippy -D warnings)"
fi
step "$current"
bg_wait mold
cargo test --workspace --locked --no-run

current="cargo test (runs them)"
step "$current"
cargo test --workspace --locked

current="Function App package checks (the release handler that ships)"
step "$current"
bg_wait package
sed 's/^/    /' "$bg_dir/package.log"
bash scripts/check-package.sh --no-build
shipped="$PWD/dist/package/handler"
[ -x "$shipped" ] || { echo "no packaged handler at $shipped" >&2; false; }

current="OpenAI Python SDK against the packaged handler"
step "$current"
bg_wait venv
FWDPROXY_HANDLER="$shipped" .venv/bin/python -m pytest -q tests/python

current="end-to-end: the local set with the packaged handler, newman and the OpenAI SDK"
step "$current"
bg_wait newman
E2E_PROFILE=debug E2E_NO_BUILD=1 E2E_HANDLER="$shipped" bash scripts/e2e.sh

current="infra checks (structure, Bicep syntax, checkov), run in the background"
step "$current"
bg_wait infra
sed 's/^/    /' "$bg_dir/infra.log"

step_done
cpu_now
printf 'time: %4d s wall, %4d s cpu  scripts/test.sh in all\n' "$((SECONDS - suite_started))" \
  "$(((cpu - suite_cpu) / 1000))"
step "all tests passed"
step_name=""
