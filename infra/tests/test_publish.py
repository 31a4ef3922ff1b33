#!/usr/bin/env python3
"""infra/publish.sh --dry-run against deployment outputs of both hosting plans (no Azure needed).

Flex Consumption: every app is published through its deployment endpoint (func, or az config-zip
without Core Tools) and nothing is uploaded to the Premium package blob or restarted. Elastic
Premium (and outputs without hostingPlan, from deployments made before the parameter existed):
the package blob is uploaded and every app restarted, nothing goes to a deployment endpoint.
Runs in a temporary copy of the repository layout publish.sh needs, with a fake package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

INFRA = Path(__file__).resolve().parent.parent
APPS = ["fnaaaa-gw-one", "fnbbbb-gw-two"]


def outputs(plan: str | None) -> dict:
    o = {
        "functionAppNames": {"type": "Array", "value": APPS},
        "storageAccountName": {"type": "String", "value": "stgw"},
        "packageContainerName": {"type": "String", "value": "function-packages"},
        "packageBlobName": {"type": "String", "value": "fwdproxy.zip"},
        "appGatewayFqdn": {"type": "String", "value": "gw.example"},
    }
    if plan:
        o["hostingPlan"] = {"type": "String", "value": plan}
    return o


def run(root: Path, plan: str | None, with_func: bool) -> str:
    out_file = root / "outputs.json"
    out_file.write_text(json.dumps(outputs(plan)))
    env = dict(os.environ)
    bindir = root / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "func"
    if with_func:
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    # Only the fake bin, coreutils and python on PATH: a real func/az must not be found.
    env["PATH"] = f"{bindir}:/usr/bin:/bin"
    r = subprocess.run([str(root / "infra" / "publish.sh"), "-g", "rg", "--skip-build", "--dry-run",
                        "--outputs-file", str(out_file)], capture_output=True, text=True, env=env, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"publish.sh exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "infra").mkdir()
        shutil.copy(INFRA / "publish.sh", root / "infra" / "publish.sh")
        pkg = root / "dist" / "package"
        (pkg / "FwdProxy").mkdir(parents=True)
        (pkg / "host.json").write_text("{}")
        (pkg / "FwdProxy" / "function.json").write_text("{}")
        shutil.copy("/bin/true", pkg / "handler")
        (root / "dist" / "fwdproxy.zip").write_text("zip")

        cases = [
            ("Flex with func", "FlexConsumption", True,
             [f"func azure functionapp publish {a} --no-build --custom" for a in APPS],
             ["az storage blob upload", "az functionapp restart", "config-zip"]),
            ("Flex without func", "FlexConsumption", False,
             [f"az functionapp deployment source config-zip -g rg -n {a}" for a in APPS],
             ["az storage blob upload", "az functionapp restart", "func azure"]),
            ("Elastic Premium", "ElasticPremium", True,
             ["az storage blob upload", *[f"az functionapp restart -g rg -n {a}" for a in APPS]],
             ["func azure", "config-zip"]),
            ("outputs without hostingPlan (Premium)", None, True,
             ["az storage blob upload", *[f"az functionapp restart -g rg -n {a}" for a in APPS]],
             ["func azure", "config-zip"]),
        ]
        for name, plan, with_func, want, never in cases:
            try:
                out = run(root, plan, with_func)
            except AssertionError as e:
                print(f"FAIL {name}: {e}")
                failures += 1
                continue
            problems = [f"missing {w!r}" for w in want if w not in out]
            problems += [f"unexpected {n!r}" for n in never if n in out]
            print(f"{'FAIL' if problems else 'PASS'} {name}" + (f": {'; '.join(problems)}" if problems else ""))
            failures += bool(problems)
    print(f"publish self-test: {4 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
