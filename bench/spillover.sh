#!/usr/bin/env bash
# The spillover benchmark (issue 14): does a throttled AOAI resource's share of the clients get
# 429s, or do the handlers spill it onto their sibling resources? One command:
#
#   bash bench/spillover.sh            # both halves, one after the other, same load
#   bash bench/spillover.sh rr         # only plain round robin
#   bash bench/spillover.sh spillover  # only --spillover (needs the handler side of issue 14)
#
# The set: `fwdproxy-dev` with three simulated AOAI resources at 1000 / 40000 / 40000 TPM
# (RPM 600 each), one real handler per resource, behind the gateway emulator (round robin over
# healthy backends), all on 127.0.0.1. The load: `fwdproxy-load`, open loop, ~9 chat requests
# per second (each ~50 tokens: ~27k TPM offered, a third of the summed 81k) for SPILL_SECS.
# Half 1 runs the set as is; half 2 with `--spillover`, where each handler's AOAI_BACKUPS are
# the two other resources. A fresh set for each half, so both start with full quotas.
#
# Per half: requests, % 200 / 429 / other, p50/p95/p99 of all requests, of the 200s, and of the
# 200s answered on the first attempt (from the `attempts` field of the handlers' request log
# lines, when they log it), who answered. Each half's figures go to
# bench/results/spillover/<half>.json; the table of every half recorded so far to
# bench/results/spillover.md.
#
# Fails loudly (exit 1, "NOT AS EXPECTED") when a half did not measure what it should: requests
# missing or unanswered, round robin with < 5 % 429 (the set-up does not show the problem),
# spillover with > 1 % 429 or < 99 % 200, or a handler that logs no `attempts` (it does not do
# spillover yet).
#
# Knobs: SPILL_SECS (60), SPILL_RATE (9), SPILL_TPM (1000,40000,40000), SPILL_RPM (600),
# SPILL_PROFILE (release; `debug` for a quick look: the 429 shares hold, latencies do not).
# Bounded: two halves of SPILL_SECS of load, each set up within 60 s and stopped within 15 s.
# Not a test.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
mode="${1:-both}"
secs="${SPILL_SECS:-60}"
rate="${SPILL_RATE:-9}"
tpm="${SPILL_TPM:-1000,40000,40000}"
rpm="${SPILL_RPM:-600}"
results="$here/results/spillover"
work="$here/results/tmp/spillover"

case "$mode" in
    both) halves=(rr spillover) ;;
    rr | spillover) halves=("$mode") ;;
    *) echo "usage: bash bench/spillover.sh [both|rr|spillover]" >&2; exit 2 ;;
esac

echo "== spillover benchmark: running half(s): ${halves[*]} (${secs} s at ${rate} req/s, TPM $tpm) =="
profile="${SPILL_PROFILE:-release}"
case "$profile" in
    release) (cd "$root" && cargo build --release --bin handler --bin fwdproxy-dev --bin fwdproxy-load) ;;
    debug) (cd "$root" && cargo build --bin handler --bin fwdproxy-dev --bin fwdproxy-load) ;;
    *) echo "SPILL_PROFILE must be release or debug" >&2; exit 2 ;;
esac
bin="${CARGO_TARGET_DIR:-$root/target}/$profile"
commit="$(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty="$(cd "$root" && git status --porcelain 2>/dev/null | grep -qv '^??' && echo "+changes" || true)"

rm -rf "$work"
mkdir -p "$work" "$results"
launcher=""
stop_set() {
    if [ -n "$launcher" ] && kill -0 "$launcher" 2>/dev/null; then
        kill -TERM "$launcher" 2>/dev/null || true
        for _ in $(seq 1 150); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$launcher" 2>/dev/null || true
        wait "$launcher" 2>/dev/null || true
    fi
    launcher=""
}
trap stop_set EXIT

failed=()
for half in "${halves[@]}"; do
    extra=()
    [ "$half" = spillover ] && extra=(--spillover)
    ready="$work/$half.ready.json"
    echo
    echo "== half: $half (fwdproxy-dev --backends 3 --tpm $tpm --rpm $rpm ${extra[*]:-}) =="
    "$bin/fwdproxy-dev" --no-build --quiet --gateway-port 0 --backends 3 \
        --tpm "$tpm" --rpm "$rpm" "${extra[@]}" \
        --run-dir "$work/$half" --ready-file "$ready" > "$work/$half.launcher.log" 2>&1 &
    launcher=$!
    for _ in $(seq 1 600); do
        [ -s "$ready" ] && break
        kill -0 "$launcher" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -s "$ready" ]; then
        echo "spillover: the local set did not come up for half $half:" >&2
        tail -30 "$work/$half.launcher.log" >&2
        exit 1
    fi
    note="$(date -u +%Y-%m-%dT%H:%MZ), commit $commit$dirty, $profile build"
    if "$bin/fwdproxy-load" run --ready "$ready" --label "$half" --rate "$rate" --secs "$secs" \
        --note "$note" --out "$results/$half.json" --requests-out "$work/$half.requests.jsonl"; then
        :
    else
        failed+=("$half")
    fi
    stop_set
done

summaries=()
for half in rr spillover; do
    [ -f "$results/$half.json" ] && summaries+=("$results/$half.json")
done
"$bin/fwdproxy-load" report --out "$work/table.md" "${summaries[@]}" > /dev/null
{
    echo "# Spillover benchmark (issue 14)"
    echo
    echo "\`bash bench/spillover.sh\`: three simulated AOAI resources at $tpm TPM (RPM $rpm) behind"
    echo "the gateway emulator, one handler each, open-loop load of $rate chat requests/s"
    echo "(~50 tokens each) for $secs s per half. Latencies in ms, measured by the client through"
    echo "the gateway. Halves in this file: $(for s in "${summaries[@]}"; do basename "$s" .json; done | paste -sd, -)."
    [ -f "$results/spillover.json" ] || echo "The spillover half has not been run yet (it needs the handler side of issue 14)."
    echo
    cat "$work/table.md"
} > "$here/results/spillover.md"
echo
cat "$here/results/spillover.md"
echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== spillover benchmark: NOT AS EXPECTED in half(s): ${failed[*]} (see the lines above) ==" >&2
    exit 1
fi
echo "== spillover benchmark: half(s) ${halves[*]} as expected; table in bench/results/spillover.md =="
