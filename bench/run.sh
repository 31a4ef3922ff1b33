#!/usr/bin/env bash
# The handler vs nginx benchmark, in one command: `bash bench/run.sh`.
#
# Builds the release `handler` and the bench tool (bench/ is its own cargo package, outside the
# main workspace), installs Debian's nginx and wrk when missing, then runs `fwdbench run`: a
# zero-latency AOAI + Content Safety upstream, nginx as the plain reverse proxy, and the handler
# (auth; + user check; + screening), all on 127.0.0.1, measured side by side in one bounded run.
# Prints one markdown table and writes it to bench/results/latest.md.
#
# Knobs (environment): BENCH_SECS (5, seconds of each 32-connection load), BENCH_ROUNDS (3),
# BENCH_LAT_SECS (2), BENCH_STREAMS (20), BENCH_STARTS (7), HANDLER_BIN (skip building the
# handler and measure this binary instead), BENCH_OUT (results file).
# Not a test: nothing in scripts/test.sh or .ci/run calls it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
results="$here/results"
work="$results/tmp"

if [ "$(nproc)" -lt 2 ]; then
    echo "bench: needs 2 cores (proxy on core 0, load and upstream on core 1); this machine has $(nproc)" >&2
    exit 1
fi

# --- tools: nginx and wrk from Debian when missing -------------------------------------------
nginx_bin="$(command -v nginx || true)"
[ -z "$nginx_bin" ] && [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx
wrk_bin="$(command -v wrk || true)"
if [ -z "$nginx_bin" ] || [ -z "$wrk_bin" ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "bench: installing nginx and wrk (Debian packages)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light wrk >/dev/null \
        || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx wrk >/dev/null
    nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
    wrk_bin="$(command -v wrk)"
fi
# The packaged service is not what we measure; keep it from holding port 80 or a core.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
fi

# --- builds ------------------------------------------------------------------------------------
if [ -n "${HANDLER_BIN:-}" ]; then
    handler="$HANDLER_BIN"
else
    (cd "$root" && cargo build --release --bin handler)
    target_dir="${CARGO_TARGET_DIR:-$root/target}"
    handler="$target_dir/release/handler"
fi
(cd "$here" && CARGO_TARGET_DIR="$here/target" cargo build --release)
fwdbench="$here/target/release/fwdbench"

commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! git -C "$root" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
    commit="$commit (with uncommitted changes in src/ or Cargo.*)"
fi
[ -n "${HANDLER_BIN:-}" ] && commit="HANDLER_BIN=$HANDLER_BIN"

rm -rf "$work"
mkdir -p "$work"
echo "bench: nginx $("$nginx_bin" -v 2>&1 | sed 's/.*: //'), $("$wrk_bin" -v 2>&1 | head -1 | cut -d' ' -f1-2); load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2

exec "$fwdbench" run \
    --handler "$handler" \
    --nginx "$nginx_bin" \
    --wrk "$wrk_bin" \
    --work "$work" \
    --out "${BENCH_OUT:-$results/latest.md}" \
    --commit "$commit"
