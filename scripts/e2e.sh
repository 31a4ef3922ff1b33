#!/usr/bin/env bash
# End-to-end test of the whole set on this machine, as CI runs it:
#   1. builds the release `handler` and `fwdproxy-dev`,
#   2. starts the set (gateway emulator, real handler processes, AOAI and Content Safety
#      simulators) in the background on a free gateway port and waits for the gateway's health
#      through the rewrite path,
#   3. runs the Postman collection with newman (pinned in package.json) against it,
#   4. runs the OpenAI Python SDK tests (tests/python/test_gateway_sdk.py) against the gateway,
#   5. runs the post-deployment smoke check (infra/smoke.sh) against it, reading the abuse
#      record from the handlers' audit files,
#   6. stops the set (also on failure or Ctrl-C) and checks that no handler outlived it.
# Exits non-zero when any step fails; newman's summary names each failed request.
#
# Needs: Rust toolchain, Node/npm (installs newman from package-lock.json when missing),
# Python 3 with .venv from tests/python/requirements.txt (created here when missing), curl.
# Knobs: E2E_GATEWAY_PORT (default 0 = any free port), E2E_BACKENDS (default 2),
#        E2E_PROFILE=debug reuses the debug build (e.g. right after scripts/test.sh built it;
#        default release), E2E_NO_BUILD=1 builds nothing (the binaries must exist: scripts/test.sh
#        has `cargo test` build them, as a plain `cargo build` would compile the dependency tree
#        again with other features), E2E_HANDLER=PATH runs that handler binary (e.g. the packaged
#        dist/package/handler) instead of target/<profile>/handler,
#        E2E_KEEP=1 keeps the run directory (logs, audit records).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { echo "e2e: $*" >&2; exit 1; }

command -v curl >/dev/null || die "curl is required"
command -v npm >/dev/null || die "Node.js/npm is required (newman runs the Postman collection)"

profile="${E2E_PROFILE:-release}"
case "$profile" in
  release) build_flags=(--release) ;;
  debug) build_flags=() ;;
  *) die "E2E_PROFILE must be release or debug" ;;
esac
if [ "${E2E_NO_BUILD:-0}" = "1" ]; then
  [ -x "target/$profile/fwdproxy-dev" ] || die "E2E_NO_BUILD=1 but target/$profile/fwdproxy-dev is missing"
else
  step "build $profile binaries (handler, fwdproxy-dev)"
  cargo build "${build_flags[@]}" --locked --bin handler --bin fwdproxy-dev
fi
handler_args=()
if [ -n "${E2E_HANDLER:-}" ]; then
  [ -x "$E2E_HANDLER" ] || die "E2E_HANDLER=$E2E_HANDLER is not an executable"
  handler_args=(--handler "$E2E_HANDLER")
fi

step "test tools (newman from package-lock.json, .venv from tests/python/requirements.txt)"
if [ ! -x node_modules/.bin/newman ]; then
  npm ci --no-audit --no-fund
fi
if ! [ -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai, pytest' 2>/dev/null; then
  bash scripts/pyvenv.sh .venv -r tests/python/requirements.txt
fi

run_dir="$(mktemp -d "${TMPDIR:-/tmp}/fwdproxy-e2e.XXXXXX")"
ready="$run_dir/ready.json"
launcher_log="$run_dir/fwdproxy-dev.log"
launcher_pid=""

stop_set() {
  [ -n "$launcher_pid" ] || return 0
  if kill -0 "$launcher_pid" 2>/dev/null; then
    kill -TERM "$launcher_pid" 2>/dev/null || true
    # fwdproxy-dev gives handlers 5 s to finish streams; allow 15 s in all, then SIGKILL
    # (its children then get SIGTERM from the kernel via PR_SET_PDEATHSIG).
    for _ in $(seq 1 150); do
      kill -0 "$launcher_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$launcher_pid" 2>/dev/null || true
  fi
  wait "$launcher_pid" 2>/dev/null || true
  launcher_pid=""
}

show_logs() {
  echo "--- fwdproxy-dev log ($launcher_log)" >&2
  tail -n 40 "$launcher_log" >&2 2>/dev/null || true
  for log in "$run_dir"/set/backend-*/handler.log; do
    [ -f "$log" ] || continue
    echo "--- $log (last 20 lines)" >&2
    tail -n 20 "$log" >&2
  done
}

on_exit() {
  local rc=$?
  stop_set
  if [ "$rc" -ne 0 ]; then
    show_logs
    echo "e2e: FAILED (logs and audit records kept in $run_dir)" >&2
  elif [ "${E2E_KEEP:-0}" = "1" ]; then
    echo "run directory kept: $run_dir"
  else
    rm -rf "$run_dir"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "start the set (fwdproxy-dev)"
started=$(date +%s%N)
"target/$profile/fwdproxy-dev" --no-build --quiet ${handler_args[@]+"${handler_args[@]}"} \
  --gateway-port "${E2E_GATEWAY_PORT:-0}" --backends "${E2E_BACKENDS:-2}" \
  --ms-per-token 2 --first-token-ms 20 \
  --deployments gpt-4o,gpt-4o-mini,gpt-35-turbo-instruct,text-embedding-3-small,emb=text-embedding-3-small,dall-e-3,tts-1,whisper \
  --run-dir "$run_dir/set" --ready-file "$ready" >"$launcher_log" 2>&1 &
launcher_pid=$!

for _ in $(seq 1 600); do
  [ -f "$ready" ] && break
  kill -0 "$launcher_pid" 2>/dev/null || die "fwdproxy-dev exited before the set was ready"
  sleep 0.1
done
[ -f "$ready" ] || die "the set was not ready within 60 s"

# gateway URL, key, then the handler pids
read -r gateway key handler_pids < <(.venv/bin/python - "$ready" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["gateway_url"], d["internal_key"], " ".join(str(b["handler_pid"]) for b in d["backends"]))
PY
)

# The launcher waited for this already; check it from here too, through the rewrite path.
health_ok=""
for _ in $(seq 1 100); do
  if curl -fsS -o /dev/null "$gateway/openai/deployments/health/check"; then
    health_ok=1
    break
  fi
  sleep 0.1
done
[ -n "$health_ok" ] || die "gateway health through the rewrite path did not answer 200"
ready_ms=$(( ($(date +%s%N) - started) / 1000000 ))
echo "gateway $gateway ready ${ready_ms} ms after start (handlers: $handler_pids)"

status=0

step "Postman collection in newman (local environment)"
if ! npx --no-install newman run tests/postman/aoai-fwdproxy.postman_collection.json \
  -e tests/postman/local.postman_environment.json \
  --env-var "base_url=$gateway" --env-var "api_key=$key" \
  --reporters cli --color off; then
  echo "e2e: newman reported failures (see the failure table above for the request names)" >&2
  status=1
fi

step "OpenAI Python SDK against the gateway"
if ! FWDPROXY_GATEWAY_URL="$gateway" FWDPROXY_GATEWAY_KEY="$key" FWDPROXY_SIMULATOR=1 \
  .venv/bin/python -m pytest -q -rs tests/python/test_gateway_sdk.py; then
  status=1
fi

step "post-deployment smoke check (infra/smoke.sh) against the local set"
# The same script operators run against Azure; here the abuse record is read from the handlers'
# AUDIT_LOG_PATH files instead of Cosmos DB, so the check cannot rot.
smoke_user="$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["registered_users"][0])' "$ready")"
if ! PYTHON=.venv/bin/python infra/smoke.sh --gateway "$gateway" --key "$key" \
  --user "$smoke_user" --records file --audit-file "$run_dir/set/backend-*/*.jsonl" \
  --record-timeout 15; then
  echo "e2e: the smoke check failed (see the FAIL lines above)" >&2
  status=1
fi

step "stop the set"
stop_set
for pid in $handler_pids; do
  # A zombie is not an orphan; only a running handler is.
  if [ -r "/proc/$pid/stat" ] && ! awk '{exit ($3=="Z")?0:1}' "/proc/$pid/stat" 2>/dev/null; then
    echo "e2e: handler pid $pid outlived fwdproxy-dev" >&2
    status=1
  fi
done

if [ "$status" -ne 0 ]; then
  exit 1
fi
step "end-to-end: all passed"
