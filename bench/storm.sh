#!/usr/bin/env bash
# The refusal-storm benchmark: how many refusals per second the handler answers with durability
# on (each answered only once its abuse record is fsync'd in the journal, group commit), and
# what durability adds to a refusal's latency. One command: `bash bench/storm.sh`.
#
# Layout as bench/run.sh: the handler pinned to core 0, wrk (one thread) on core 1, 127.0.0.1
# only. The request: POST chat/completions without `user` under USER_CHECK=present → 400
# missing_user and one abuse record (body read, JSON inspected, record journaled). Measured with
# the journal (AUDIT_DIR) on the real disk, and on tmpfs (/dev/shm), where fsync costs nothing:
# the same refusal path without the price of durability, so "added p50" = disk p50 − tmpfs p50.
# Each round: 32 connections for throughput and p50 under load, then 1 connection for the
# latency of a lone refusal. Medians of the rounds. The raw fdatasync latency of the disk
# (dd oflag=dsync, 512-byte writes) is printed too: a durable refusal cannot beat it. After the
# run the records on disk are counted against the refusals wrk saw answered.
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
run_wrk() { # $1 = connections
    taskset -c 1 wrk -t1 -c"$1" -d"${secs}s" --latency -H "api-key: $key" \
        -H "content-type: application/json" -s "$work/post.lua" "$url" > "$work/wrk.txt"
    awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /Requests\/sec/ { rps = $2 }
        /^ +50%/ { p50 = ms($2) }
        /Non-2xx/ { bad = $5 }
        END { printf "%.0f %.3f %d\n", rps, p50, bad }' "$work/wrk.txt"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# The disk's own fdatasync latency: 200 synced 512-byte writes.
dd_ms=$( { dd if=/dev/zero of="$work/dsync.probe" bs=512 count=200 oflag=dsync 2>&1 >/dev/null || true; } \
    | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s," || $i == "s") t = $(i - 1); print t * 1000 / 200 }')
rm -f "$work/dsync.probe"

results="$work/results.txt"
: > "$results"
: > "$results.count"
for place in disk tmpfs; do
    if [ "$place" = disk ]; then dir="$work/audit"; else dir="/dev/shm/fwdproxy-storm-$$"; fi
    rm -rf "$dir"
    start_handler "$dir"
    answered=0
    for r in $(seq 1 "$rounds"); do
        read -r rps p50 bad < <(run_wrk "$conns")
        answered=$((answered + bad))
        read -r rps1 p501 bad1 < <(run_wrk 1)
        answered=$((answered + bad1))
        echo "$place $r $rps $p50 $rps1 $p501" >> "$results"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    records=$(wc -l < "$dir/storm/abuse-log.jsonl")
    echo "$place $answered $records" >> "$results.count"
    [ "$place" = tmpfs ] && rm -rf "$dir"
done

col() { awk -v p="$1" -v c="$2" '$1 == p { print $c }' "$results" | median; }
commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
{
    echo "Refusal storm, commit $commit, $(date -u +%Y-%m-%dT%H:%MZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk -t1, $rounds rounds × ${secs} s at $conns connections and at 1, handler on core 0, wrk on core 1; medians of the rounds; disk fdatasync (dd oflag=dsync) ${dd_ms} ms"
    echo
    echo "| journal on | refusals/s ($conns conn) | p50 ($conns conn) | refusals/s (1 conn) | p50 (1 conn) | records on disk / refusals answered |"
    echo "|---|---|---|---|---|---|"
    for place in disk tmpfs; do
        read -r _ ans rec < <(awk -v p=$place '$1 == p' "$results.count")
        echo "| $place | $(col $place 3) | $(col $place 4) ms | $(col $place 5) | $(col $place 6) ms | $rec / $ans |"
    done
    echo
    echo "Added p50 of durability (disk − tmpfs): $(awk -v a="$(col disk 4)" -v b="$(col tmpfs 4)" 'BEGIN { printf "%.3f", a - b }') ms at $conns connections, $(awk -v a="$(col disk 6)" -v b="$(col tmpfs 6)" 'BEGIN { printf "%.3f", a - b }') ms at 1 connection"
} | tee "$here/results/storm.md"
