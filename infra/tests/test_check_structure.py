#!/usr/bin/env python3
"""Self-test of check_structure.py's hosting-plan checks: each mutation of a copy of infra/ that
breaks one rule must make the matching check FAIL, and the unmodified copy must pass them all.

A check that cannot fail is a defect; this keeps the Flex/Premium checks honest. Standard library
only; works on a temporary copy (infra/, docs/deploy.md, src/pipeline/route.rs).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
INFRA = HERE.parent
REPO = INFRA.parent

PLAN = "hostingPlan: FlexConsumption (default) or ElasticPremium"
REFUSED = "Flex variant: none of the app settings or site properties Flex refuses"
SHAPE = "Flex variant: custom runtime, FC1"
STEP = "both plan variants grant the same roles"
DOCS = "docs: func and VS Code deploy to infra-created apps"
SPILL = "spillover: off by default; backups = the siblings in order"

FLEX = "infra/modules/function-app-flex.bicep"
MAIN = "infra/main.bicep"
EP = "infra/modules/function-app.bicep"

FLEX_HEAD = """    appSettings: concat([
      {
        // Identity-based host storage: no connection string anywhere.
        name: 'AzureWebJobsStorage__accountName'
        value: storage.outputs.name
      }
"""
FLEX_FIRST_HANDLER = """      {
        name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
        value: monitoring.outputs.appInsightsConnectionString
      }
"""

# (what, file, old, new, check that must fail[, "all": replace every occurrence, "last": the
# last one, i.e. the Flex block of main.bicep])
MUTATIONS = [
    ("Premium default", MAIN, "param hostingPlan string = 'FlexConsumption'", "param hostingPlan string = 'ElasticPremium'", PLAN),
    ("Premium apps also on Flex", MAIN, "module apps 'modules/function-app.bicep' = [for (a, i) in aoaiResources: if (!isFlex) {",
     "module apps 'modules/function-app.bicep' = [for (a, i) in aoaiResources: {", PLAN),
    ("gateway bound to the Premium apps", MAIN, "backendHostNames: [for (a, i) in aoaiResources: isFlex ? flexApps[i].outputs.defaultHostName : apps[i].outputs.defaultHostName]",
     "backendHostNames: [for (a, i) in aoaiResources: apps[i].outputs.defaultHostName]", PLAN),
    ("FUNCTIONS_WORKER_RUNTIME on Flex", MAIN, FLEX_HEAD, FLEX_HEAD.replace(
        "    appSettings: concat([\n", "    appSettings: concat([\n      {\n        name: 'FUNCTIONS_WORKER_RUNTIME'\n        value: 'custom'\n      }\n"), REFUSED),
    ("website_contentshare (any case) on Flex", MAIN, FLEX_HEAD, FLEX_HEAD.replace(
        "    appSettings: concat([\n", "    appSettings: concat([\n      {\n        name: 'website_contentshare'\n        value: 'x'\n      }\n"), REFUSED),
    ("additionalAppSettings unfiltered on Flex", MAIN, "], flexAdditionalAppSettings)", "], additionalAppSettings)", REFUSED),
    ("a Premium handler setting missing on Flex", MAIN, FLEX_HEAD + FLEX_FIRST_HANDLER, FLEX_HEAD, STEP),
    ("a handler setting with another value on Flex", MAIN, "        name: 'USER_CHECK'\n        value: userCheck\n",
     "        name: 'USER_CHECK'\n        value: 'off'\n", STEP, "last"),
    ("linuxFxVersion on the Flex site", FLEX, "      ftpsState: 'Disabled'", "      linuxFxVersion: ''\n      ftpsState: 'Disabled'", REFUSED),
    ("preWarmedInstanceCount on the Flex site", FLEX, "      ftpsState: 'Disabled'", "      preWarmedInstanceCount: 1\n      ftpsState: 'Disabled'", REFUSED),
    ("deployment storage with a connection string", FLEX,
     "            type: 'UserAssignedIdentity'\n            userAssignedIdentityResourceId: deployIdentity.id",
     "            type: 'StorageAccountConnectionString'\n            storageAccountConnectionStringName: 'DEPLOYMENT_STORAGE'", SHAPE),
    ("runtime not custom", FLEX, "name: 'custom'", "name: 'node'", SHAPE),
    ("no always-ready http", FLEX, "name: 'http'\n            instanceCount", "name: 'function:FwdProxy'\n            instanceCount", SHAPE),
    ("app created before its deployment identity holds the role", FLEX, "  dependsOn: [\n    deployStorageAccess\n  ]\n", "", SHAPE),
    ("Azure Files mount", FLEX, "      ftpsState: 'Disabled'", "      azureStorageAccounts: {}\n      ftpsState: 'Disabled'", SHAPE),
    ("Premium delegation on Flex", MAIN, "delegation: isFlex ? 'Microsoft.App/environments' : 'Microsoft.Web/serverFarms'",
     "delegation: 'Microsoft.Web/serverFarms'", SHAPE),
    ("a setting only the Premium module adds", EP, "    value: '/home/data/aoai-fwdproxy'\n",
     "    value: '/home/data/aoai-fwdproxy'\n  }\n  {\n    name: 'PREMIUM_ONLY'\n    value: 'x'\n", STEP),
    ("a role only the Premium module grants", EP, "  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'\n",
     "  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'\n  websiteContributor: 'de139f84-1756-47ae-9be6-808fbbe84772'\n", STEP),
    ("spillover on by default", MAIN, "param aoaiSpillover bool = false", "param aoaiSpillover bool = true", SPILL),
    ("an app is its own backup", MAIN, "concat(skip(appIndexes, i + 1), take(appIndexes, i))", "concat(skip(appIndexes, i), take(appIndexes, i))", SPILL),
    ("backups in another order than their keys", MAIN, "concat(skip(aoaiResources, i + 1), take(aoaiResources, i))", "concat(take(aoaiResources, i), skip(aoaiResources, i + 1))", SPILL),
    ("map() back in main.bicep", MAIN, "var backupAccessTargets = flatten(backupIndexes)", "var backupAccessTargets = flatten(map(backupIndexes, b => b))", SPILL),
    ("backup role for the wrong app", MAIN, "appId: appNames[x / (appCount - 1)]", "appId: appNames[x % (appCount - 1)]", SPILL),
    ("backup key URIs also in keyless mode (Flex)", MAIN, "    ] : [], spillover && aoaiAuth == 'key' ? [\n", "    ] : [], spillover ? [\n", SPILL, "last"),
    ("backup keys as a plain setting", MAIN, "name: 'AOAI_BACKUP_OUTAPIKEY_SECRET_URIS'", "name: 'AOAI_BACKUP_OUTAPIKEYS'", SPILL, "all"),
    ("backup role granted on the app's own resource group", MAIN, "scope: resourceGroup(aoaiResources[j]", "scope: resourceGroup(aoaiResources[x / (appCount - 1)]", SPILL),
    ("backup role only for Premium apps", MAIN, "principalId: isFlex ? flexApps[x / (appCount - 1)].outputs.principalId : apps[x / (appCount - 1)].outputs.principalId",
     "principalId: apps[x / (appCount - 1)].outputs.principalId", SPILL),
    ("backup roles also in key mode", MAIN, "if (spillover && aoaiAuth == 'managed_identity')", "if (spillover)", SPILL),
    ("README drops the deployment-name rule", "infra/README.md", "same deployment names", "same names", SPILL, "all"),
    ("docs drop the VS Code deploy", "docs/deploy.md", "Deploy to Function App", "Deploy", DOCS, "all"),
    ("the 409 caveat back in the Flex section", "docs/deploy.md", "**With VS Code:**",
     "Publishing answers 409 here.\n\n**With VS Code:**", DOCS),
]


def copy_tree(dst: Path) -> None:
    shutil.copytree(INFRA, dst / "infra", ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "docs").mkdir()
    shutil.copy(REPO / "docs" / "deploy.md", dst / "docs" / "deploy.md")
    (dst / "src" / "pipeline").mkdir(parents=True)
    shutil.copy(REPO / "src" / "pipeline" / "route.rs", dst / "src" / "pipeline" / "route.rs")


def run(root: Path) -> dict[str, bool]:
    out = subprocess.run([sys.executable, str(root / "infra" / "tests" / "check_structure.py")],
                         capture_output=True, text=True, timeout=60).stdout
    result = {}
    for line in out.splitlines():
        if line.startswith(("PASS  ", "FAIL  ")):
            result[line[6:].strip()] = line.startswith("PASS")
    return result


def status(result: dict[str, bool], prefix: str) -> bool | None:
    hits = [ok for name, ok in result.items() if name.startswith(prefix)]
    return hits[0] if len(hits) == 1 else None


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        copy_tree(base)
        clean = run(base)
        for check in (PLAN, REFUSED, SHAPE, STEP, DOCS, SPILL):
            if status(clean, check) is not True:
                print(f"FAIL  unmodified tree: {check!r} is {status(clean, check)}")
                failures += 1
        for what, rel, old, new, check, *mode in MUTATIONS:
            root = Path(tmp) / "m"
            if root.exists():
                shutil.rmtree(root)
            copy_tree(root)
            f = root / rel
            text = f.read_text()
            if text.count(old) < 1 or (text.count(old) > 1 and not mode):
                print(f"FAIL  {what}: the text to mutate is in {rel} {text.count(old)} times")
                failures += 1
                continue
            if mode == ["last"]:
                k = text.rindex(old)
                text = text[:k] + new + text[k + len(old):]
            else:
                text = text.replace(old, new)
            f.write_text(text)
            got = status(run(root), check)
            if got is False:
                print(f"PASS  {what}: {check!r} fails")
            else:
                print(f"FAIL  {what}: {check!r} is {got}, expected a failure")
                failures += 1
    print(f"structure self-test: {len(MUTATIONS) + 6 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
