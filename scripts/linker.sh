#!/bin/sh
# Link with mold when the machine has it (scripts/test.sh installs it where apt is available):
# the test suite links a dozen binaries against the Azure SDK, and mold cuts that time several
# fold on 2 cores. Falls back to the system linker, so a plain `cargo build` works anywhere.
if command -v mold >/dev/null 2>&1; then
  exec cc -fuse-ld=mold "$@"
fi
exec cc "$@"
