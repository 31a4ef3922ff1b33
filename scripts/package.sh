#!/usr/bin/env bash
# Build the Linux x86-64 `handler` and assemble the package the Azure Functions host accepts.
#
#   scripts/package.sh                 release build for glibc >= 2.31 (cargo-zigbuild), then
#                                      dist/package/{host.json,FwdProxy/function.json,handler}
#                                      and dist/fwdproxy.zip (zip deploy, run bit kept)
#   scripts/package.sh --musl          static release build (x86_64-unknown-linux-musl), same outputs
#   scripts/package.sh --host-glibc    plain `cargo build --release` against this machine's glibc
#   scripts/package.sh --glibc 2.36    pick another glibc floor for the zig build
#   scripts/package.sh --tools-only    only install cargo-zigbuild and ziglang when missing
#                                      (scripts/test.sh runs this in the background early)
#   scripts/package.sh --local [--release]
#                                      debug (or release) build for this machine, and dist/local
#                                      linked up for `func start` (host.json, FwdProxy/, handler,
#                                      local.settings.json) -- never deploy dist/local
#
# Why glibc 2.31 by default: the Functions v4 Linux images are Debian 11 "bullseye" (glibc 2.31)
# or Debian 12 "bookworm" (glibc 2.36), and an app with FUNCTIONS_WORKER_RUNTIME=custom does not
# choose which. A plain build on Debian 12 needs GLIBC_2.34 and would not start on bullseye. The
# zig linker links against glibc 2.31 symbol versions instead. cargo-zigbuild and ziglang come
# from PyPI into a private venv under target/ the first time (--no-install to forbid that).
# See docs/deploy.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="$ROOT/dist"
PKG="$DIST/package"
ZIP="$DIST/fwdproxy.zip"
LOCAL="$DIST/local"

GLIBC_FLOOR="${FWDPROXY_GLIBC:-2.31}"
ZIGBUILD_VERSION="0.24.0"
ZIGLANG_VERSION="0.17.0"
MODE="zig"           # zig | host | musl | local | tools
LOCAL_PROFILE="debug"
INSTALL_TOOLS=1

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --musl) MODE="musl" ;;
    --host-glibc) MODE="host" ;;
    --glibc) GLIBC_FLOOR="${2:?--glibc needs a version like 2.31}"; MODE="zig"; shift ;;
    --glibc=*) GLIBC_FLOOR="${1#--glibc=}"; MODE="zig" ;;
    --local) MODE="local" ;;
    --release) LOCAL_PROFILE="release" ;;
    --no-install) INSTALL_TOOLS=0 ;;
    --tools-only) MODE="tools" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "package.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$ROOT"
say() { printf '==> %s\n' "$*"; }
die() { printf 'package.sh: %s\n' "$*" >&2; exit 1; }

for f in host.json FwdProxy/function.json; do
  [[ -f "$f" ]] || die "$f is missing: nothing to package"
done
# Never package function files the host would reject or run the wrong way.
python3 "$ROOT/scripts/validate_function_files.py" --root "$ROOT" --function-files-only

TARGET_DIR="$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')" ||
  die "cargo metadata failed: is this the workspace root?"

# ---------------------------------------------------------------------------------------------
# --local: a directory `func start` can run in, pointing at this checkout (nothing is copied).
if [[ "$MODE" == "local" ]]; then
  if [[ "$LOCAL_PROFILE" == "release" ]]; then
    say "cargo build --release --bin handler (this machine's target)"
    cargo build --release --bin handler
  else
    say "cargo build --bin handler (debug, this machine's target)"
    cargo build --bin handler
  fi
  BIN="$TARGET_DIR/$LOCAL_PROFILE/handler"
  [[ -x "$BIN" ]] || die "expected $BIN after the build"
  mkdir -p "$LOCAL"
  ln -sfn "$ROOT/host.json" "$LOCAL/host.json"
  ln -sfn "$ROOT/FwdProxy" "$LOCAL/FwdProxy"
  ln -sfn "$BIN" "$LOCAL/handler"
  ln -sfn "$ROOT/local.settings.json" "$LOCAL/local.settings.json"
  say "dist/local ready: cd dist/local && func start   (host on http://localhost:7071)"
  if [[ ! -f "$ROOT/local.settings.json" ]]; then
    echo "    note: local.settings.json does not exist yet:"
    echo "          cp local.settings.json.example local.settings.json   # then fill in the AOAI_* values"
  fi
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# cargo-zigbuild: on PATH, or in our venv under target/, or installed there now.
find_zigbuild() {
  ZIGBUILD="$(command -v cargo-zigbuild || true)"
  TOOLS="$TARGET_DIR/package-tools/venv"
  if [[ -z "$ZIGBUILD" && -x "$TOOLS/bin/cargo-zigbuild" ]]; then
    ZIGBUILD="$TOOLS/bin/cargo-zigbuild"
  fi
  if [[ -z "$ZIGBUILD" ]]; then
    if [[ "$INSTALL_TOOLS" != 1 ]]; then
      die "cargo-zigbuild not found. Install it (pip install cargo-zigbuild==$ZIGBUILD_VERSION ziglang==$ZIGLANG_VERSION), drop --no-install, or use --musl / --host-glibc"
    fi
    say "installing cargo-zigbuild $ZIGBUILD_VERSION and ziglang $ZIGLANG_VERSION (PyPI) into ${TOOLS#"$ROOT"/}"
    # Into a fresh directory, moved into place once complete: an interrupted install never
    # leaves a venv that looks ready.
    rm -rf "$TOOLS.partial"
    bash "$ROOT/scripts/pyvenv.sh" "$TOOLS.partial" \
      "cargo-zigbuild==$ZIGBUILD_VERSION" "ziglang==$ZIGLANG_VERSION"
    rm -rf "$TOOLS"
    mv "$TOOLS.partial" "$TOOLS"
    ZIGBUILD="$TOOLS/bin/cargo-zigbuild"
  fi
}
if [[ "$MODE" == "tools" ]]; then
  find_zigbuild
  say "cargo-zigbuild: $ZIGBUILD"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Release build of the deployable binary.
case "$MODE" in
  zig)
    find_zigbuild
    # cargo-zigbuild finds zig as `python3 -m ziglang` when zig is not on PATH: put the venv's
    # python first so it is the one with ziglang installed.
    ZIG_PATH="$(dirname "$ZIGBUILD")"
    rustc --print target-libdir --target x86_64-unknown-linux-gnu >/dev/null 2>&1 &&
      [[ -d "$(rustc --print target-libdir --target x86_64-unknown-linux-gnu)" ]] ||
      die "the Rust target x86_64-unknown-linux-gnu is not installed (rustup target add x86_64-unknown-linux-gnu)"
    say "cargo zigbuild --release --bin handler --target x86_64-unknown-linux-gnu.$GLIBC_FLOOR"
    PATH="$ZIG_PATH:$PATH" "$ZIGBUILD" zigbuild --release --locked --bin handler \
      --target "x86_64-unknown-linux-gnu.$GLIBC_FLOOR"
    BIN="$TARGET_DIR/x86_64-unknown-linux-gnu/release/handler"
    ;;
  host)
    [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] ||
      die "--host-glibc builds for this machine, which is not Linux x86-64: use the default (zig) or --musl"
    say "cargo build --release --bin handler (glibc of this machine: $(ldd --version 2>/dev/null | head -n1 | awk '{print $NF}'))"
    cargo build --release --locked --bin handler
    BIN="$TARGET_DIR/release/handler"
    ;;
  musl)
    MUSL_LIB="$(rustc --print target-libdir --target x86_64-unknown-linux-musl 2>/dev/null || true)"
    [[ -n "$MUSL_LIB" && -d "$MUSL_LIB" ]] ||
      die "the Rust target x86_64-unknown-linux-musl is not installed: rustup target add x86_64-unknown-linux-musl"
    command -v musl-gcc >/dev/null ||
      die "musl-gcc not found (aws-lc-sys compiles C for the target): apt-get install musl-tools"
    say "cargo build --release --bin handler --target x86_64-unknown-linux-musl (static)"
    CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --bin handler --target x86_64-unknown-linux-musl
    BIN="$TARGET_DIR/x86_64-unknown-linux-musl/release/handler"
    ;;
esac
[[ -f "$BIN" ]] || die "expected $BIN after the build"

# ---------------------------------------------------------------------------------------------
# dist/package: exactly the three files, nothing else (no local.settings.json, no .funcignore).
say "assembling ${PKG#"$ROOT"/}"
rm -rf "$PKG" "$ZIP"
mkdir -p "$PKG/FwdProxy"
install -m 0644 host.json "$PKG/host.json"
install -m 0644 FwdProxy/function.json "$PKG/FwdProxy/function.json"
install -m 0755 "$BIN" "$PKG/handler"

# dist/fwdproxy.zip: built with Python's zipfile so the run bit goes into each entry's external
# attributes (unix mode << 16, made-by = Unix). Fixed timestamps keep the zip reproducible.
say "writing ${ZIP#"$ROOT"/}"
python3 - "$PKG" "$ZIP" <<'PY'
import os, stat, sys, zipfile
pkg, out = sys.argv[1], sys.argv[2]
entries = ["host.json", "FwdProxy/function.json", "handler"]
with zipfile.ZipFile(out + ".tmp", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
    for name in entries:
        path = os.path.join(pkg, name)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.create_system = 3  # Unix: unzip and Kudu read the mode from external_attr
        info.external_attr = (stat.S_IFREG | mode) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(path, "rb") as f:
            z.writestr(info, f.read())
os.replace(out + ".tmp", out)
PY

# ---------------------------------------------------------------------------------------------
# What was built, and what it needs from the machine that runs it.
GLIBC_NEEDS="none (static)"
if command -v objdump >/dev/null; then
  V="$(objdump -T "$PKG/handler" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1 || true)"
  [[ -n "$V" ]] && GLIBC_NEEDS="glibc >= $V"
fi
say "package ready"
python3 - "$PKG" "$ZIP" "$GLIBC_NEEDS" <<'PY'
import hashlib, os, stat, sys
pkg, zpath, needs = sys.argv[1:4]
for name in ["FwdProxy/function.json", "handler", "host.json"]:
    st = os.stat(os.path.join(pkg, name))
    print(f"    {oct(stat.S_IMODE(st.st_mode))[2:]}  {st.st_size:>10}  {name}")
with open(os.path.join(pkg, "handler"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(f"    handler: Linux x86-64 ELF, needs {needs}")
print(f"    sha256:  {digest}")
print(f"    zip:     dist/{os.path.basename(zpath)} ({os.path.getsize(zpath)} bytes)")
PY
echo "    deploy:  cd dist/package && func azure functionapp publish <app> --no-build --custom"
echo "             az functionapp deployment source config-zip -g <rg> -n <app> --src dist/fwdproxy.zip"
