#!/usr/bin/env bash
# The refusal-storm benchmark: how many refusals per second the handler answers with durability
# on (each answered only once its abuse record is fsync'd in the journal, group commit), and
# what that adds to a refusal's latency. One command: `bash bench/storm.sh`.
#
# Layout as bench/run.sh: the handler pinned to core 0, wrk (one thread, 32 connections) on
# core 1, 127.0.0.1 only. Each round runs, back to back against the same handler process:
#   - "refused": POST chat/completions without `user` under USER_CHECK=present → 400
#     missing_user, one abuse record each (body read, JSON inspected, record journaled + fsync'd);
#   - "baseline": the same request with a wrong api-key → 401, answered before the body is read
#     and without a record. Added p50 = refused p50 − baseline p50 (an upper bound on what the
#     record costs: it also holds reading and inspecting the body).
# The journal directory is on the real disk (AUDIT_DIR under bench/results/tmp), and, for
# contrast, on tmpfs (/dev/shm: fsync is free there). After the run the records on disk are
# counted against wrk's non-2xx count.
#
# Knobs: STORM_SECS (5), STORM_ROUNDS (3), STORM_CONNS (32), HANDLER_BIN (measure this binary).
# Bounded: rounds × 4 × STORM_SECS seconds of load plus starts. Not a test.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
work="$here/results/tmp/storm"
secs="${STORM_SECS:-5}"
rounds="${STORM_ROUNDS:-3}"
conns="${STORM_CONNS:-32}"
key="bench-internal-key-0123456789"

[ "$(nproc)" -ge 2 ] || { echo "storm: needs 2 cores" >&2; exit 1; }
command -v wrk >/dev/null || { echo "storm: needs wrk (apt-get install wrk)" >&2; exit 1; }
if [ -n "${HANDLER_BIN:-}" ]; then
    handler="$HANDLER_BIN"
else
    (cd "$root" && cargo build --release --bin handler)
    handler="${CARGO_TARGET_DIR:-$root/target}/release/handler"
fi

rm -rf "$work"
mkdir -p "$work"
cat > "$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"messages":[{"role":"user","content":"a prompt of ordinary length for a refusal storm"}]}'
EOF

port=$((20000 + RANDOM % 20000))
url="http://127.0.0.1:$port/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=2024-10-21"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

start_handler() { # $1 = AUDIT_DIR
    env -i PATH="$PATH" HOME="$work/home" WEBSITE_INSTANCE_ID=storm \
        AOAI_HOSTNAME=http://127.0.0.1:9 AOAI_INAPIKEY="$key" AOAI_OUTAPIKEY=unused-out-key \
        FUNCTIONS_CUSTOMHANDLER_PORT="$port" USER_CHECK=present AUDIT_DIR="$1" \
        taskset -c 0 "$handler" > "$work/handler.out" 2>&1 &
    pid=$!
    for _ in $(seq 1 500); do
        curl -fs "http://127.0.0.1:$port/api/FwdProxy/openai/deployments/health/check" >/dev/null && return 0
        sleep 0.01
    done
    echo "storm: handler did not start" >&2; cat "$work/handler.out" >&2; exit 1
}

# wrk → "rps p50_ms non2xx"
run_wrk() { # $1 = api key
    taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency -H "api-key: $1" \
        -H "content-type: application/json" -s "$work/post.lua" "$url" > "$work/wrk.txt"
    awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /Requests\/sec/ { rps = $2 }
        /^ +50%/ { p50 = ms($2) }
        /Non-2xx/ { bad = $5 }
        END { printf "%.0f %.3f %d\n", rps, p50, bad }' "$work/wrk.txt"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

results="$work/results.txt"
: > "$results"
for place in disk tmpfs; do
    if [ "$place" = disk ]; then dir="$work/audit"; else dir="/dev/shm/fwdproxy-storm-$$"; fi
    rm -rf "$dir"
    start_handler "$dir"
    answered=0
    for r in $(seq 1 "$rounds"); do
        read -r rps p50 bad < <(run_wrk "$key")
        answered=$((answered + bad))
        read -r brps bp50 _ < <(run_wrk "wrong-key-of-enough-length-000")
        echo "$place $r $rps $p50 $brps $bp50" >> "$results"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    records=$(cat "$dir"/storm/abuse-log.jsonl | wc -l)
    echo "$place answered=$answered records=$records" >> "$results.count"
    [ "$place" = tmpfs ] && rm -rf "$dir"
done

commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
{
    echo "Refusal storm, commit $commit, $(date -u +%Y-%m-%dT%H:%MZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk -t1 -c$conns, $rounds rounds × ${secs} s, handler on core 0, wrk on core 1; medians of the rounds"
    echo
    echo "| journal on | refusals/s | refusal p50 | baseline (401) req/s | baseline p50 | added p50 | records on disk / refusals answered |"
    echo "|---|---|---|---|---|---|---|"
    for place in disk tmpfs; do
        rps=$(awk -v p=$place '$1 == p { print $3 }' "$results" | median)
        p50=$(awk -v p=$place '$1 == p { print $4 }' "$results" | median)
        brps=$(awk -v p=$place '$1 == p { print $5 }' "$results" | median)
        bp50=$(awk -v p=$place '$1 == p { print $6 }' "$results" | median)
        count=$(awk -v p=$place '$1 == p { print $2 " " $3 }' "$results.count" | sed 's/answered=//; s/records=//')
        read -r ans rec <<< "$count"
        added=$(awk -v a="$p50" -v b="$bp50" 'BEGIN { printf "%.3f", a - b }')
        echo "| $place | $rps | ${p50} ms | $brps | ${bp50} ms | ${added} ms | $rec / $ans |"
    done
} | tee "$here/results/storm.md"
