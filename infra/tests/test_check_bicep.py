#!/usr/bin/env python3
"""Negative and positive tests of check_bicep.py: each bad fixture must fail it, on the right line,
and the good ones must pass. The fixtures are written to a temporary directory (not under infra/,
where checkov would scan them). Prints "N passed, M failed"; exits 1 on any failure.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

GOOD_RESOURCE = """\
param location string = resourceGroup().location

resource st 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_43:a reason
  name: 'st${uniqueString(resourceGroup().id)}'
  location: location
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
}
"""

# name -> (text, line a problem must be reported on, or None when the file must pass)
FIXTURES: dict[str, tuple[str, int | None]] = {
    "good.bicep": (GOOD_RESOURCE, None),
    "good_pragmas.bicep": (
        "#disable-diagnostics BCP081\n"
        "param a string = '# not a comment ${\'#\'} and \\' still a string #'\n"
        "/* # in a block comment\n   # on its second line */\n"
        "var b = '''\n# in a multi-line string\n'''\n"
        "var c = { x: '${a}#${b}' }\n"
        "  #disable-next-line no-unused-vars\n"
        "var d = 1 // # in a line comment\n"
        "#restore-diagnostics\n",
        None,
    ),
    "checkov_hash.bicep": (GOOD_RESOURCE.replace("//checkov", "#checkov"), 4),
    "hash_comment.bicep": ("param a string\n# a shell-style comment\n", 2),
    "pragma_not_at_line_start.bicep": ("var a = 1 #disable-next-line x\n", 1),
    "hash_in_expression.bicep": ("param a int\nvar b = a # 2\n", 2),
    "hash_in_interpolation.bicep": ("param a string\nvar b = '${a #x}'\n", 2),
    "unknown_pragma.bicep": ("#disable-next-lines BCP081\nvar a = 1\n", 1),
    "missing_brace.bicep": (GOOD_RESOURCE.replace("sku: { name: 'Standard_LRS' }\n}", "sku: { name: 'Standard_LRS' }\n"), None),
    "bad_expression.bicep": ("param a int\nvar b = a + * 2\n", 2),
    "unterminated_string.bicep": ("param a string = 'abc\nvar b = 1\n", None),
}
# These must fail too, but where tree-sitter reports them (end of file, next line) is its choice.
MUST_FAIL_ANYWHERE = {"missing_brace.bicep", "unterminated_string.bicep"}


def run(path: Path) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, str(HERE / "check_bicep.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return p.returncode, p.stdout + p.stderr


def main() -> int:
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (text, line) in FIXTURES.items():
            path = Path(tmp) / name
            path.write_text(text)
            rc, out = run(path)
            must_fail = line is not None or name in MUST_FAIL_ANYWHERE
            if rc == 2:
                ok, why = False, out.strip()
            elif must_fail:
                ok = rc == 1 and (line is None or f"{name}:{line}:" in out)
                why = f"expected a problem on line {line}, got rc={rc}: {out.strip()}"
            else:
                ok, why = rc == 0, f"expected a pass, got rc={rc}: {out.strip()}"
            if ok:
                passed += 1
                print(f"PASS {name}")
            else:
                failed += 1
                print(f"FAIL {name}: {why}")
        # A directory argument scans every file below it: the bad ones make it fail.
        rc, out = run(Path(tmp))
        if rc == 1 and "good.bicep" not in out and "checkov_hash.bicep:4:" in out:
            passed += 1
            print("PASS directory scan")
        else:
            failed += 1
            print(f"FAIL directory scan: rc={rc}: {out.strip()}")
    print(f"check_bicep self-test: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
