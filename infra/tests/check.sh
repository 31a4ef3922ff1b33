#!/usr/bin/env bash
# Offline validation of infra/ (no Azure, no Bicep CLI needed):
#   1. check_structure.py: rewrite rules schema, module/file references, parameters example,
#      probe path and timeouts (standard-library Python);
#   2. checkov over the Bicep with zero failed checks and zero parsing errors (a file checkov
#      cannot parse would otherwise be skipped silently). Deliberate skips live inline in the
#      Bicep as `#checkov:skip=CKV_...:reason`.
# checkov is installed once into the repo's .venv at the version pinned in requirements.txt;
# later runs skip pip entirely.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
infra="$(cd "$here/.." && pwd)"
repo="$(cd "$infra/.." && pwd)"
venv="$repo/.venv-infra"  # its own: checkov pins packaging<24, the test tools want newer
requirements="$here/requirements.txt"

failed=0
passed=0

echo "== infra structure"
if python3 "$here/check_structure.py"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
fi

echo "== checkov (bicep)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
want="$(sed -n 's/^checkov==\([^[:space:]]*\).*/\1/p' "$requirements")"
have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
  echo "installing checkov $want into $venv (first run takes a few minutes)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
fi

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
