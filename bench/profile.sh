#!/usr/bin/env bash
# Profile the handler under the bench load: `bash bench/profile.sh [HANDLER_BIN]`.
#
# Same layout as run.sh (handler on core 0; wrk -c32 and the zero-latency upstream on core 1),
# handler with auth + user check (PROFILE_SCREENING=1 adds Content Safety screening against the
# stub). Samples with `perf record -e cpu-clock` (software clock: this VM exposes no hardware
# counters) for PROFILE_SECS (10) and prints the top symbols by self time, then by shared object.
# Build the handler with symbols for readable output, e.g. in a private worktree:
#   CARGO_PROFILE_RELEASE_STRIP=none CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#     cargo build --release --bin handler
# With PROFILE_CALLGRIND=1 it runs the handler (PROFILE_NGINX=1: nginx) under valgrind --tool=callgrind instead for a
# bounded number of requests (PROFILE_REQUESTS, 2000) and prints instruction counts per request
# (exact and immune to a noisy machine, unlike time) over PROFILE_CG_SECS (120) of requests on one
# connection.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
handler="${1:-${HANDLER_BIN:-$here/../target/release/handler}}"
secs="${PROFILE_SECS:-10}"
out="$here/results/profile"
mkdir -p "$out"
command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
(cd "$here" && CARGO_TARGET_DIR="$here/target" cargo build --release -q)
fwdbench="$here/target/release/fwdbench"
echo -15 > /proc/self/autogroup 2>/dev/null || true

in_key=bench-internal-key-0123456789abcdef
out_key=bench-real-aoai-key-fedcba9876543210
cs_key=bench-content-safety-key-0123456789
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

coproc UP { exec taskset -c 1 "$fwdbench" upstream --out-key "$out_key" --cs-key "$cs_key"; }
pids+=("$UP_PID")
read -r _ aoai_port cs_port <&"${UP[0]}"
port=$(( 20000 + RANDOM % 20000 ))
env_extra=()
[ "${PROFILE_SCREENING:-0}" = 1 ] && env_extra=(CONTENT_SAFETY_ENDPOINT="http://127.0.0.1:$cs_port" CONTENT_SAFETY_KEY="$cs_key")
run_env=(env -i PATH="$PATH" AOAI_HOSTNAME="http://127.0.0.1:$aoai_port" AOAI_INAPIKEY="$in_key"
    AOAI_OUTAPIKEY="$out_key" FUNCTIONS_CUSTOMHANDLER_PORT="$port" USER_CHECK=registered
    REGISTERED_USERS=alice,bob AUDIT_LOG_PATH="$out/abuse.jsonl" "${env_extra[@]}")
body='{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Tell me a joke about reverse proxies."}],"max_tokens":100,"temperature":0.7,"user":"alice"}'
cat > "$out/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = "$in_key"
EOF
url="http://127.0.0.1:$port/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=2024-10-21"
wait_ready() {
    for _ in $(seq 1 600); do
        curl -fs "http://127.0.0.1:$port/api/FwdProxy/openai/deployments/health/check" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "handler did not start" >&2; return 1
}

if [ "${PROFILE_CALLGRIND:-0}" = 1 ]; then
    command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
    n="${PROFILE_REQUESTS:-3000}"
    if [ "${PROFILE_NGINX:-0}" = 1 ]; then
        # The same measurement of nginx (one process: no master, so valgrind sees the worker).
        nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
        mkdir -p "$out/nginx/logs" "$out/nginx/client_body" "$out/nginx/proxy"
        cat > "$out/nginx/nginx.conf" <<NGINX
$( [ "$(id -u)" = 0 ] && echo "user root;" )
master_process off;
daemon off;
pid $out/nginx/nginx.pid;
error_log $out/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log $out/nginx/logs/access.log;
    client_body_temp_path $out/nginx/client_body;
    proxy_temp_path $out/nginx/proxy;
    upstream aoai { server 127.0.0.1:$aoai_port; keepalive 64; }
    server {
        listen 127.0.0.1:$port;
        location = /api/FwdProxy/openai/deployments/health/check { return 200 'ok'; }
        location ~ ^/api/FwdProxy/openai/deployments/([A-Za-z0-9._-]+)/chatcompletions\$ {
            proxy_pass http://aoai/openai/deployments/\$1/chat/completions\$is_args\$args;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header api-key "$out_key";
            proxy_buffering off;
        }
    }
}
NGINX
        (exec taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
            "$nginx_bin" -p "$out/nginx" -e "$out/nginx/logs/error.log" -c "$out/nginx/nginx.conf" 2>"$out/valgrind.log") &
    else
        (cd "$out" && exec taskset -c 0 "${run_env[@]}" valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
            "$handler" >"$out/handler.log" 2>"$out/valgrind.log") &
    fi
    pids+=("$!")
    wait_ready
    vg=$(pgrep -f -n "callgrind-out-file=$out/callgrind.out" || true)
    # Warm the pools, zero the counters, then exactly $n requests on 1 connection.
    taskset -c 1 wrk -t1 -c4 -d2s -s "$out/post.lua" "$url" >/dev/null
    callgrind_control -z "$vg" >/dev/null
    { cat "$out/post.lua"; printf 'local n = 0\nrequest = function() n = n + 1; return wrk.format() end\nresponse = function() if n >= %s then wrk.thread:stop() end end\n' "$n"; } > "$out/count.lua"
    taskset -c 1 wrk -t1 -c1 -d"${PROFILE_CG_SECS:-120}s" -s "$out/count.lua" "$url" > "$out/wrk.txt"
    grep -E "requests in" "$out/wrk.txt"
    n=$(awk '/requests in/ {print $1}' "$out/wrk.txt")
    rm -f "$out"/callgrind.out.*
    callgrind_control -d "$vg" >/dev/null
    sleep 1
    dump=$(ls -t "$out"/callgrind.out.* 2>/dev/null | head -1)
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1; exit}')
    echo "instructions per request: $(( total / n )) (total $total over $n requests)"
    echo "--- inclusive, per request ---"
    strip='s#/root/.cargo/registry/src/index.crates.io-[0-9a-f]+/##; s#/rustc/[0-9a-f]+/library/##'
    callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | awk -v n="$n" '/^ *[0-9,]+ \(/ {c=$1; gsub(",","",c); $1=""; $2=""; printf "%9d %s\n", c/n, $0}' | sed -E "$strip" | cut -c1-180 | head -"${PROFILE_TOP:-70}"
    echo "--- self, per request ---"
    callgrind_annotate --inclusive=no "$dump" 2>/dev/null | awk -v n="$n" '/^ *[0-9,]+ \(/ {c=$1; gsub(",","",c); $1=""; $2=""; printf "%9d %s\n", c/n, $0}' | sed -E "$strip" | cut -c1-180 | head -"${PROFILE_TOP:-70}"
    exit 0
fi

(cd "$out" && exec taskset -c 0 "${run_env[@]}" "$handler" >"$out/handler.log" 2>&1) &
pids+=("$!")
wait_ready
hpid="${pids[-1]}"

if [ "${PROFILE_STRACE:-0}" = 1 ]; then
    # Syscalls per request: strace slows the handler, but the count per request stays.
    command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
    taskset -c 1 wrk -t1 -c32 -d1s -s "$out/post.lua" "$url" >/dev/null
    strace -c -f -p "$hpid" -o "$out/strace.txt" &
    spid=$!
    sleep 1
    taskset -c 1 wrk -t1 -c32 -d"${secs}s" -s "$out/post.lua" "$url" > "$out/wrk.txt"
    sleep 0.5
    kill -INT "$spid"; wait "$spid" 2>/dev/null || true
    reqs=$(awk '/requests in/ {print $1}' "$out/wrk.txt")
    echo "requests: $reqs"
    awk -v n="$reqs" 'NR>2 && $4 ~ /^[0-9]+$/ {printf "%-16s %6.2f per request\n", $NF, $4/n} NR>2 && $3 ~ /^[0-9]+$/ && $4 !~ /^[0-9]+$/ {}' "$out/strace.txt" | sort -k2 -rn | head -15
    awk -v n="$reqs" '/^[- ]+$/ {next} $NF=="total" {printf "total            %6.2f per request\n", $3/n}' "$out/strace.txt"
    exit 0
fi
taskset -c 1 wrk -t1 -c32 -d2s -s "$out/post.lua" "$url" >/dev/null
taskset -c 1 wrk -t1 -c32 -d"$((secs + 2))s" -s "$out/post.lua" "$url" > "$out/wrk.txt" &
wrk_pid=$!
sleep 1
perf record -q -e cpu-clock -F 4999 -g -p "$hpid" -o "$out/perf.data" -- sleep "$secs" 2>/dev/null
wait "$wrk_pid"
grep -E "requests in|Requests/sec" "$out/wrk.txt"
echo "--- top symbols (self) ---"
perf report -i "$out/perf.data" --no-children --sort sym --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -45
echo "--- by shared object ---"
perf report -i "$out/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -8
