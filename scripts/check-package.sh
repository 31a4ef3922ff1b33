#!/usr/bin/env bash
# Build the Functions package and prove the host would accept it.
#
#   scripts/check-package.sh              run scripts/package.sh, then inspect and start it
#   scripts/check-package.sh --no-build   inspect the dist/package and dist/fwdproxy.zip already there
#   scripts/check-package.sh --musl       any other option goes to package.sh
#   GLIBC_FLOOR=2.36 scripts/check-package.sh   accept a newer glibc (default 2.31, see docs/deploy.md)
#
# Checks: host.json/function.json/.vscode/.funcignore validate; dist/package and the zip hold
# exactly host.json, FwdProxy/function.json, handler; the run bit is set in both; handler is an
# x86-64 ELF whose glibc needs stay within the floor and whose shared libraries are all part of
# glibc; no local.settings.json and no secret-looking value is in the package; the packaged handler,
# started from inside dist/package as the host starts it, answers the health route within 5 s,
# refuses a keyless call, and exits 0 within 5 s of SIGTERM. Prints PASS/FAIL per check and exits
# non-zero when any check failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG="$ROOT/dist/package"
ZIP="$ROOT/dist/fwdproxy.zip"
GLIBC_FLOOR="${GLIBC_FLOOR:-2.31}"
START_TIMEOUT_S=5
STOP_TIMEOUT_S=5
BUILD=1
PKG_ARGS=()
for a in "$@"; do
  case "$a" in
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) PKG_ARGS+=("$a") ;;
  esac
done

PASSED=0
FAILED=0
pass() { printf 'PASS  %s\n' "$*"; PASSED=$((PASSED + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; FAILED=$((FAILED + 1)); }
info() { printf '      %s\n' "$*"; }
finish() {
  echo "check-package: $PASSED passed, $FAILED failed"
  [[ "$FAILED" -eq 0 ]]
}

WORK="$(mktemp -d)"
HANDLER_PID=""
TLS_PID=""
cleanup() {
  # Only the processes this script started, by their ids.
  [[ -n "$HANDLER_PID" ]] && kill -KILL "$HANDLER_PID" 2>/dev/null || true
  [[ -n "$TLS_PID" ]] && kill -TERM "$TLS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
if [[ "$BUILD" == 1 ]]; then
  echo "==> scripts/package.sh ${PKG_ARGS[*]:-}"
  if "$ROOT/scripts/package.sh" "${PKG_ARGS[@]}"; then
    pass "package.sh built dist/package and dist/fwdproxy.zip"
  else
    fail "package.sh failed"
    finish
    exit 1
  fi
fi
if [[ ! -d "$PKG" || ! -f "$ZIP" ]]; then
  fail "no package to inspect: dist/package or dist/fwdproxy.zip missing (run without --no-build)"
  finish
  exit 1
fi

# ---------------------------------------------------------------------------------------------
echo "==> Functions files"
if out="$(python3 "$ROOT/scripts/validate_function_files.py" --root "$ROOT" --package "$PKG" 2>&1)"; then
  pass "validate_function_files.py: host.json, function.json, local.settings.json.example, .vscode, .funcignore"
  [[ "$out" == *note:* ]] && grep '^note:' <<<"$out" | sed 's/^/      /'
else
  fail "validate_function_files.py found problems:"
  sed 's/^/      /' <<<"$out"
fi

# ---------------------------------------------------------------------------------------------
echo "==> contents"
EXPECTED=$'FwdProxy/function.json\nhandler\nhost.json'
list_package() { (cd "$PKG" && find . -mindepth 1 ! -type d -printf '%P\n' | LC_ALL=C sort); }
PKG_LIST="$(list_package)"
if [[ "$PKG_LIST" == "$EXPECTED" ]]; then
  pass "dist/package holds exactly: $(tr '\n' ' ' <<<"$PKG_LIST")"
else
  fail "dist/package must hold exactly host.json, FwdProxy/function.json, handler; it holds:"
  sed 's/^/      /' <<<"$PKG_LIST"
fi
SYMLINKS="$(cd "$PKG" && find . -type l -printf '%P\n')"
[[ -z "$SYMLINKS" ]] && pass "no symlinks in dist/package" || fail "symlinks in dist/package (zip deploy would break them): $SYMLINKS"
EXTRA_DIRS="$(cd "$PKG" && find . -mindepth 1 -type d -printf '%P\n' | grep -vx 'FwdProxy' || true)"
[[ -z "$EXTRA_DIRS" ]] || fail "unexpected folders in dist/package: $EXTRA_DIRS"

if zip_report="$(python3 - "$ZIP" "$PKG" <<'PY'
import hashlib, os, stat, sys, zipfile
zpath, pkg = sys.argv[1], sys.argv[2]
expected = {"host.json": 0o644, "FwdProxy/function.json": 0o644, "handler": 0o755}
problems = []
with zipfile.ZipFile(zpath) as z:
    names = z.namelist()
    if sorted(names) != sorted(expected):
        problems.append(f"entries {sorted(names)} != {sorted(expected)}")
    bad = z.testzip()
    if bad:
        problems.append(f"CRC error in {bad}")
    for info in z.infolist():
        mode = (info.external_attr >> 16) & 0o7777
        kind = stat.S_IFMT(info.external_attr >> 16)
        print(f"{oct(mode)[2:]:>4}  {info.file_size:>10}  {info.filename}  (made by {'unix' if info.create_system == 3 else info.create_system})")
        want = expected.get(info.filename)
        if want is None:
            continue
        if info.create_system != 3 or kind != stat.S_IFREG or mode != want:
            problems.append(f"{info.filename}: mode {oct(mode)} made-by {info.create_system}, want regular file {oct(want)} made by Unix")
        disk = os.path.join(pkg, info.filename)
        if os.path.exists(disk) and hashlib.sha256(z.read(info)).digest() != hashlib.sha256(open(disk, "rb").read()).digest():
            problems.append(f"{info.filename}: differs from dist/package/{info.filename}")
for p in problems:
    print("PROBLEM " + p)
sys.exit(1 if problems else 0)
PY
)"; then
  pass "dist/fwdproxy.zip holds exactly the three files, byte-identical to dist/package, modes kept:"
  sed 's/^/      /' <<<"$zip_report"
else
  fail "dist/fwdproxy.zip:"
  sed 's/^/      /' <<<"$zip_report"
fi

# ---------------------------------------------------------------------------------------------
echo "==> binary"
H="$PKG/handler"
if [[ -f "$H" && -x "$H" && "$(stat -c %a "$H")" == "755" ]]; then
  pass "dist/package/handler has the run bit (mode 755)"
else
  fail "dist/package/handler must be mode 755, is $(stat -c %a "$H" 2>/dev/null || echo missing)"
fi

if elf="$(python3 - "$H" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    head = f.read(20)
if len(head) < 20 or head[:4] != b"\x7fELF":
    print("not an ELF file"); sys.exit(1)
cls, data = head[4], head[5]
etype, machine = struct.unpack("<HH", head[16:20])
ok = cls == 2 and data == 1 and machine == 62 and etype in (2, 3)
print(f"ELF{64 if cls == 2 else 32} {'LE' if data == 1 else 'BE'} machine={machine} type={etype}")
sys.exit(0 if ok else 1)
PY
)"; then
  pass "handler is an x86-64 ELF executable ($elf)$(command -v file >/dev/null && printf '; file: %s' "$(file -b "$H" | cut -d, -f1-2)")"
else
  fail "handler is not a 64-bit little-endian x86-64 ELF executable: $elf"
fi

if ! command -v objdump >/dev/null || ! command -v readelf >/dev/null; then
  fail "objdump and readelf (binutils) are needed to read the handler's glibc needs: apt-get install binutils"
fi
GLIBC_NEED="$( (objdump -T "$H" 2>/dev/null || true) | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -uV | tail -n1 || true)"
INTERP="$( (readelf -l "$H" 2>/dev/null || true) | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')"
if [[ -z "$GLIBC_NEED" ]]; then
  if [[ -z "$INTERP" ]]; then
    pass "handler is statically linked: no glibc requirement (floor $GLIBC_FLOOR irrelevant)"
  else
    fail "handler is dynamically linked ($INTERP) but objdump found no GLIBC symbol versions"
  fi
elif [[ "$(printf '%s\n%s\n' "$GLIBC_NEED" "$GLIBC_FLOOR" | sort -V | tail -n1)" == "$GLIBC_FLOOR" ]]; then
  pass "handler needs glibc >= $GLIBC_NEED, within the floor $GLIBC_FLOOR (Debian 11 images have 2.31, Debian 12 2.36)"
else
  fail "handler needs glibc >= $GLIBC_NEED, newer than the floor $GLIBC_FLOOR: it would not start on a Debian 11 Functions image (build with scripts/package.sh, not --host-glibc, or --musl)"
  (objdump -T "$H" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -V | uniq -c | tail -n3 | sed 's/^/      /') || true
fi
if [[ -n "$INTERP" ]]; then
  NEEDED="$(readelf -d "$H" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  NOT_GLIBC=""
  for lib in $NEEDED; do
    case "$lib" in
      libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|libgcc_s.so.1|ld-linux-x86-64.so.2) ;;
      *) NOT_GLIBC+="$lib " ;;
    esac
  done
  if [[ -z "$NOT_GLIBC" && "$INTERP" == "/lib64/ld-linux-x86-64.so.2" ]]; then
    pass "shared libraries are all part of glibc: $NEEDED(interpreter $INTERP)"
  else
    fail "handler needs libraries a Functions image may not have: ${NOT_GLIBC:-none} (interpreter $INTERP)"
  fi
fi

# ---------------------------------------------------------------------------------------------
echo "==> secrets"
# Keys for this run: random, so finding one in the package later means the handler wrote it there.
rand() { python3 -c 'import secrets,string; print("".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32)))'; }
TEST_INKEY="ckpkg$(rand)"
TEST_OUTKEY="ckpkgout$(rand)"

SECRET_VALUES_FILE="$WORK/secret-values"
: >"$SECRET_VALUES_FILE"
if [[ -f "$ROOT/local.settings.json" ]]; then
  python3 - "$ROOT/local.settings.json" >"$SECRET_VALUES_FILE" <<'PY' || true
import json, re, sys
try:
    values = json.load(open(sys.argv[1], encoding="utf-8-sig")).get("Values", {})
except Exception:
    sys.exit(0)
secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PWD|CONNECTION|CONNSTR|SAS|STORAGE|CREDENTIAL", re.I)
for k, v in values.items():
    if isinstance(v, str) and len(v.strip()) >= 8 and secretish.search(k):
        print(v.strip())
PY
  info "local.settings.json present: its $(wc -l <"$SECRET_VALUES_FILE") secret-looking value(s) will be searched for"
fi
scan_for_secrets() { # $1: label; greps every file in dist/package for known values and key-shaped text
  local hits=""
  if [[ -s "$SECRET_VALUES_FILE" ]]; then
    while IFS= read -r v; do
      [[ -z "$v" ]] && continue
      if grep -rqaF -- "$v" "$PKG"; then hits+="a value of local.settings.json; "; fi
    done <"$SECRET_VALUES_FILE"
  fi
  for v in "$TEST_INKEY" "$TEST_OUTKEY"; do
    if grep -rqaF -- "$v" "$PKG"; then hits+="this run's test key; "; fi
  done
  if grep -rqaE -- 'AccountKey=[A-Za-z0-9+/]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY-----|SharedAccessSignature=|[?&]sig=[A-Za-z0-9%]{30,}' "$PKG"; then
    hits+="a connection string, SAS or private key; "
  fi
  if [[ -n "$(cd "$PKG" && find . -name 'local.settings.json*' -o -name '*.jsonl' -o -name '.env' | head -n1)" ]]; then
    hits+="a local.settings.json, .env or .jsonl file; "
  fi
  if [[ -z "$hits" ]]; then
    pass "no secret in the package ($1)"
  else
    fail "secret material in the package ($1): $hits"
  fi
}
scan_for_secrets "before the start"

# ---------------------------------------------------------------------------------------------
echo "==> start the packaged handler as the Functions host does"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
PORT="$(free_port)"
UPSTREAM="http://127.0.0.1:9"
TLS_NOTE=""
if command -v openssl >/dev/null; then
  # A loopback TLS upstream with a self-signed certificate: the forward path must run a real
  # handshake with the packaged (zig-linked) crypto and then refuse the untrusted certificate.
  TLS_PORT="$(free_port)"
  if openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
      -keyout "$WORK/tls.key" -out "$WORK/tls.crt" >/dev/null 2>&1; then
    openssl s_server -accept "127.0.0.1:$TLS_PORT" -cert "$WORK/tls.crt" -key "$WORK/tls.key" \
      -www -naccept 5 >"$WORK/tls.log" 2>&1 </dev/null &
    TLS_PID=$!
    UPSTREAM="https://127.0.0.1:$TLS_PORT"
  fi
fi

T0="$(date +%s%N)"
(cd "$PKG" && exec env -i PATH=/usr/bin:/bin HOME="$WORK" \
  FUNCTIONS_CUSTOMHANDLER_PORT="$PORT" \
  AOAI_HOSTNAME="$UPSTREAM" AOAI_INAPIKEY="$TEST_INKEY" AOAI_OUTAPIKEY="$TEST_OUTKEY" \
  ./handler) >"$WORK/handler.log" 2>&1 &
HANDLER_PID=$!

probe() { # python does the HTTP, so timings and the JSON checks need nothing else installed
  python3 - "$@" <<'PY'
import json, sys, time, urllib.request, urllib.error
mode, port = sys.argv[1], int(sys.argv[2])
base = f"http://127.0.0.1:{port}/api/FwdProxy/openai/deployments"
def call(method, path, body=None, headers=None, timeout=2.0):
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()
if mode == "health":
    deadline = time.monotonic() + float(sys.argv[3])
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, ctype, body = call("GET", "/health/check", timeout=0.5)
            if status == 200:
                doc = json.loads(body)
                ok = isinstance(doc, dict) and doc.get("status") == "ok" and "application/json" in ctype
                print(f"{'OK' if ok else 'BADBODY'} {ctype} {body.decode(errors='replace')}")
                sys.exit(0 if ok else 1)
            last = f"HTTP {status}"
        except (OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.02)
    print(f"TIMEOUT last={last}")
    sys.exit(1)
body = json.dumps({"messages": [{"role": "user", "content": "ping"}]}).encode()
headers = {"content-type": "application/json"}
if mode == "keyed":
    headers["api-key"] = sys.argv[3]
status, ctype, raw = call("POST", "/ckpkg/chatcompletions?api-version=2024-10-21", body, headers, timeout=10)
try:
    err = json.loads(raw).get("error", {})
    shaped = isinstance(err, dict) and "code" in err and "message" in err
except ValueError:
    shaped = False
print(f"{status} {'aoai-shaped' if shaped else 'not-aoai-shaped'} {raw[:200].decode(errors='replace')}")
PY
}

if health="$(probe health "$PORT" "$START_TIMEOUT_S")"; then
  T1="$(date +%s%N)"
  READY_MS="$(grep -o '"ready_ms":[0-9.]*' "$WORK/handler.log" | head -n1 | cut -d: -f2 | cut -d. -f1 || true)"
  pass "health route answered 200 JSON $(( (T1 - T0) / 1000000 )) ms after the spawn, probe start-up included (limit ${START_TIMEOUT_S} s; handler logged ready after ${READY_MS:-?} ms): ${health#OK }"
else
  fail "health route: $health"
  info "handler output:"; sed 's/^/      | /' "$WORK/handler.log" | tail -n 20
fi

if kill -0 "$HANDLER_PID" 2>/dev/null; then
  nokey="$(probe nokey "$PORT")" || true
  if [[ "$nokey" == "401 aoai-shaped"* ]]; then
    pass "a keyless chat completion is refused: 401 with an AOAI-shaped error"
  else
    fail "a keyless chat completion should get 401 with an AOAI-shaped error, got: $nokey"
  fi
  if [[ -n "$TLS_PID" ]]; then
    keyed="$(probe keyed "$PORT" "$TEST_INKEY")" || true
    if [[ "$keyed" == "502 aoai-shaped"* ]] && grep -qiE 'alert|certificate|unknown ca|bad certificate' "$WORK/tls.log"; then
      pass "TLS upstream: handshake ran with the packaged crypto and the self-signed certificate was refused (502)"
    elif [[ "$keyed" == "502 aoai-shaped"* ]]; then
      pass "TLS upstream with an untrusted certificate: 502 with an AOAI-shaped error"
      info "openssl s_server saw: $(tr '\n' ' ' <"$WORK/tls.log" | cut -c1-200)"
    else
      fail "a keyed call to an untrusted TLS upstream should get 502, got: $keyed"
      sed 's/^/      | /' "$WORK/tls.log" | tail -n 5
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------
echo "==> stop"
if kill -0 "$HANDLER_PID" 2>/dev/null; then
  T2="$(date +%s%N)"
  kill -TERM "$HANDLER_PID"
  rc=""
  for _ in $(seq 1 $((STOP_TIMEOUT_S * 50))); do
    if ! kill -0 "$HANDLER_PID" 2>/dev/null; then
      set +e; wait "$HANDLER_PID"; rc=$?; set -e
      break
    fi
    sleep 0.02
  done
  if [[ -z "$rc" ]]; then
    fail "handler still running ${STOP_TIMEOUT_S} s after SIGTERM"
  elif [[ "$rc" == 0 ]]; then
    pass "SIGTERM: handler exited 0 after $(( ($(date +%s%N) - T2) / 1000000 )) ms"
  else
    fail "SIGTERM: handler exited $rc (want 0)"
    sed 's/^/      | /' "$WORK/handler.log" | tail -n 10
  fi
  HANDLER_PID=""
else
  set +e; wait "$HANDLER_PID"; rc=$?; set -e
  HANDLER_PID=""
  fail "handler exited on its own with status $rc before SIGTERM"
  sed 's/^/      | /' "$WORK/handler.log" | tail -n 10
fi
if grep -qaF -e "$TEST_INKEY" -e "$TEST_OUTKEY" "$WORK/handler.log"; then
  fail "the handler's log contains a key"
else
  pass "the handler's log ($(wc -l <"$WORK/handler.log") lines) contains neither key"
fi

# The handler ran inside dist/package: it must not have left anything there.
AFTER="$(list_package)"
if [[ "$AFTER" == "$PKG_LIST" ]]; then
  pass "dist/package unchanged by the run"
else
  fail "the run changed dist/package: new $(comm -13 <(echo "$PKG_LIST") <(echo "$AFTER") | tr '\n' ' ')gone $(comm -23 <(echo "$PKG_LIST") <(echo "$AFTER") | tr '\n' ' ')"
fi
scan_for_secrets "after the run"

finish
