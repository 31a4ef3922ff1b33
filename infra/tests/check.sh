#!/usr/bin/env bash
# Offline validation of infra/ (no Azure, no Bicep CLI needed):
#   1. check_structure.py: rewrite rules schema, module/file references, parameters example,
#      probe path and timeouts, both hosting plans (standard-library Python), and its self-test
#      (test_check_structure.py: each hosting-plan rule broken in a copy must fail);
#   2. check_bicep.py: every .bicep parses with the tree-sitter Bicep grammar (no ERROR or MISSING
#      node) and has no `#` the Bicep lexer refuses (BCP001: only #disable-next-line,
#      #disable-diagnostics, #restore-diagnostics at a line start), plus its own self-test
#      (bad fixtures must fail it), so `az bicep build` would accept what we ship;
#      test_publish.py: publish.sh --dry-run for outputs of both hosting plans;
#   3. test_smoke.py: infra/smoke.py against a fake gateway, healthy (all PASS) and broken in
#      each way it checks (the matching item FAILs), so the post-deployment check cannot rot;
#   4. checkov over the Bicep with zero failed checks and zero parsing errors (a file checkov
#      cannot parse would otherwise be skipped silently). Deliberate skips live inline in the
#      Bicep as `//checkov:skip=CKV_...:reason` (a comment: `#checkov` does not compile).
# checkov and the grammar are installed once into the repo's .venv-infra at the versions pinned
# in requirements.txt; later runs skip pip entirely. `check.sh --install-only` does just that
# install and exits (scripts/test.sh runs it in the background while cargo compiles).
set -euo pipefail

install_only=0
case "${1:-}" in
  --install-only) install_only=1 ;;
  "") ;;
  *) echo "check.sh: unknown option $1 (--install-only, or nothing)" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
infra="$(cd "$here/.." && pwd)"
repo="$(cd "$infra/.." && pwd)"
venv="$repo/.venv-infra"  # its own: checkov pins packaging<24, the test tools want newer
requirements="$here/requirements.txt"

# Every `name==version` pin of requirements.txt installed at that version, or the install (scripts/pyvenv.sh) runs.
install_tools() {
  local started=$SECONDS
  if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" - "$requirements" <<'PY'
import importlib.metadata as m, re, sys
for line in open(sys.argv[1]):
    pin = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
    if pin:
        try:
            if m.version(pin.group(1)) != pin.group(2):
                sys.exit(1)
        except m.PackageNotFoundError:
            sys.exit(1)
PY
  then
    echo "installing $(grep -cE '^[A-Za-z].*==' "$requirements") pinned tools into $venv"
    bash "$repo/scripts/pyvenv.sh" "$venv" -r "$requirements"
    echo "installed in $((SECONDS - started)) s"
  fi
}
if [ "$install_only" = 1 ]; then
  install_tools
  exit 0
fi

failed=0
passed=0

echo "== infra structure"
if python3 "$here/check_structure.py"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi

echo "== structure check self-test (each hosting-plan rule broken in a copy must fail)"
if python3 "$here/test_check_structure.py"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi

echo "== publish.sh dry runs (Flex: deployment endpoint; Premium: package blob + restart)"
if python3 "$here/test_publish.py"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi

echo "== smoke check self-test (infra/smoke.py against a fake gateway, healthy and broken)"
if python3 "$here/test_smoke.py"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi

install_tools

echo "== bicep syntax (tree-sitter grammar + the lexer's '#' rule)"
if "$venv/bin/python" "$here/test_check_bicep.py" && "$venv/bin/python" "$here/check_bicep.py"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi

echo "== checkov (bicep)"
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
# checkov exits non-zero on failed checks; parsing errors need the summary line.
set +e
"$venv/bin/checkov" -d "$infra" --framework bicep --skip-download --quiet --compact >"$report" 2>&1
checkov_rc=$?
set -e
cat "$report"
summary="$(grep -E '^Passed checks: [0-9]+, Failed checks: [0-9]+' "$report" || true)"
if [ "$checkov_rc" -ne 0 ]; then
  echo "FAIL checkov exited with $checkov_rc"
  failed=$((failed + 1))
elif [ -z "$summary" ]; then
  echo "FAIL checkov printed no summary (did it scan anything?)"
  failed=$((failed + 1))
elif ! grep -qE 'Failed checks: 0, ' <<<"$summary"; then
  echo "FAIL checkov reported failed checks"
  failed=$((failed + 1))
elif grep -qE 'Parsing errors: [1-9]' <<<"$summary"; then
  echo "FAIL checkov could not parse some Bicep files"
  failed=$((failed + 1))
elif grep -qE 'Failed to run check' "$report"; then
  echo "FAIL a checkov check crashed on our Bicep"
  failed=$((failed + 1))
else
  echo "PASS checkov: $summary"
  passed=$((passed + 1))
fi

if [ "$failed" -eq 0 ]; then
  echo "infra checks PASSED"
else
  echo "infra checks FAILED"
fi
echo "infra: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
