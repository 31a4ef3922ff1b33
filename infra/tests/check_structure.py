#!/usr/bin/env python3
"""Structural checks of infra/ that checkov does not make (standard library only).

- rewrite-rules.json is AppGW's rewriteRules schema, anchored, non-overlapping by construction
  (unique names/sequences), keeps the whole query (modifiedQueryString null), no reroute;
- every module referenced by a Bicep file exists, and every loadJsonContent file exists;
- the example parameters file names every parameter main.bicep declares without a default, and
  no parameter main.bicep does not declare;
- the probe path is the handler's health path (src/pipeline/route.rs HEALTH_PATH) and the probe
  numbers are within Application Gateway's limits;
- the backend request timeout is capped at 230 s and AOAI_TIMEOUT_MS stays below 230000 ms;
- response buffering is off on the gateway;
- the first-deployment traps stay closed: Cosmos DB data-plane role assignments are deployed from
  one place, one at a time (@batchSize(1)); the gateway's certificate is read only after its
  identity holds the vault role; the Microsoft.Web service endpoint lists its locations; storage
  ipRules strip /32 and the example lists no /31; route-all apps get an egress (NAT gateway on by
  default); main.bicep's usage comment and the README call publish.sh with flags it knows;
- both hosting plans: hostingPlan selects the Premium or the Flex modules (never both), the Flex
  variant carries none of the app settings or site properties Flex refuses
  (flex-refused-settings.json), has the custom runtime, FC1, identity-based blob deployment,
  always-ready HTTP instances, no storage key and no Azure Files; both variants grant the same
  roles and carry the same module-added settings; the docs show func and VS Code deploying;
- spillover (issue 14) is off by default and, when on, wired the same on both plans: AOAI_BACKUPS
  from the other AOAI resources (next one first, wrapping, never the app's own), their keys in key
  mode only from the existing per-account Key Vault secrets, and in keyless mode the app's
  identity granted Cognitive Services OpenAI User on each sibling, at the sibling's scope;
  HEALTH_REFLECTS_CAPACITY opt-in; infra/README.md documents it (and the gateway's own 502).

Prints one PASS/FAIL line per check and a closing "N passed, M failed" line; exits 1 on failure.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent.parent
REPO = INFRA.parent

results: list[tuple[str, bool, str]] = []


def check(name: str):
    def wrap(fn):
        try:
            problems = fn() or []
        except Exception as e:  # a crash in a check is a failure of that check
            problems = [f"{type(e).__name__}: {e}"]
        results.append((name, not problems, "; ".join(problems)))
        return fn

    return wrap


def bicep_files() -> list[Path]:
    return [INFRA / "main.bicep", *sorted((INFRA / "modules").glob("*.bicep"))]


def declared_params(text: str) -> dict[str, bool]:
    """param name -> has a default value."""
    out = {}
    for m in re.finditer(r"^param\s+(\w+)\s+[\w.]+(\s*=)?", text, re.M):
        out[m.group(1)] = bool(m.group(2))
    return out


@check("rewrite-rules.json has AppGW's rewriteRules schema")
def rewrite_rules_schema():
    problems = []
    doc = json.loads((INFRA / "rewrite-rules.json").read_text())
    rules = doc.get("rewriteRules") if isinstance(doc, dict) else None
    if not isinstance(rules, list) or not rules:
        return ["no non-empty rewriteRules array"]
    names, seqs = set(), set()
    for r in rules:
        name = r.get("name")
        where = f"rule {name!r}"
        if not isinstance(name, str) or not name:
            problems.append("a rule has no name")
        if name in names:
            problems.append(f"{where}: duplicate name")
        names.add(name)
        seq = r.get("ruleSequence")
        if not isinstance(seq, int) or isinstance(seq, bool):
            problems.append(f"{where}: ruleSequence is not an integer")
        elif seq in seqs:
            problems.append(f"{where}: duplicate ruleSequence {seq}")
        seqs.add(seq)
        extra = set(r) - {"name", "ruleSequence", "conditions", "actionSet"}
        if extra:
            problems.append(f"{where}: unknown keys {sorted(extra)}")
        conds = r.get("conditions")
        if not isinstance(conds, list) or not conds:
            problems.append(f"{where}: needs at least one condition")
            conds = []
        for c in conds:
            if set(c) != {"variable", "pattern", "ignoreCase", "negate"}:
                problems.append(f"{where}: condition keys {sorted(c)}")
                continue
            if not isinstance(c["ignoreCase"], bool) or not isinstance(c["negate"], bool):
                problems.append(f"{where}: ignoreCase/negate must be booleans")
            if not c["variable"].startswith("var_"):
                problems.append(f"{where}: variable {c['variable']!r} is not a server variable")
            p = c["pattern"]
            if not (p.startswith("^") and p.endswith("$")):
                problems.append(f"{where}: pattern {p!r} is not anchored with ^...$")
            if re.search(r"\(\?[=!<]|\\[1-9]", p):
                problems.append(f"{where}: pattern {p!r} uses look-around or back-references (not RE2)")
            re.compile(p)
        a = r.get("actionSet")
        if not isinstance(a, dict):
            problems.append(f"{where}: no actionSet")
            continue
        for k in ("requestHeaderConfigurations", "responseHeaderConfigurations"):
            if not isinstance(a.get(k), list):
                problems.append(f"{where}: actionSet.{k} must be a list")
        u = a.get("urlConfiguration")
        if not isinstance(u, dict) or set(u) != {"modifiedPath", "modifiedQueryString", "reroute"}:
            problems.append(f"{where}: urlConfiguration must have modifiedPath, modifiedQueryString, reroute")
            continue
        if not (isinstance(u["modifiedPath"], str) and u["modifiedPath"].startswith("/api/FwdProxy")):
            problems.append(f"{where}: modifiedPath must target /api/FwdProxy")
        # null = leave the query alone; "" would DROP it (observed AppGW behaviour).
        if u["modifiedQueryString"] is not None:
            problems.append(f"{where}: modifiedQueryString must be null to keep the whole query")
        if u["reroute"] is not False:
            problems.append(f"{where}: reroute is not allowed on the Basic routing rule")
    return problems


@check("every referenced module and JSON file exists")
def references_exist():
    problems = []
    for f in bicep_files():
        text = f.read_text()
        for m in re.finditer(r"^\s*module\s+\w+\s+'([^']+)'", text, re.M):
            if not (f.parent / m.group(1)).is_file():
                problems.append(f"{f.relative_to(INFRA)}: module {m.group(1)} missing")
        for m in re.finditer(r"load(?:Json|Text)Content\('([^']+)'", text):
            if not (f.parent / m.group(1)).is_file():
                problems.append(f"{f.relative_to(INFRA)}: {m.group(1)} missing")
    if not re.search(r"^\s*module\s", (INFRA / "main.bicep").read_text(), re.M):
        problems.append("main.bicep references no module")
    return problems


@check("module params passed by main.bicep exist and required ones are passed")
def module_params_match():
    problems = []
    text = (INFRA / "main.bicep").read_text()
    # module <sym> '<path>' = ... { ... params: { a: ..., b: ... } ... }
    for m in re.finditer(r"^module\s+(\w+)\s+'([^']+)'[^\n]*\n(.*?)^(?:\}|\}\])\s*$", text, re.M | re.S):
        sym, path, body = m.groups()
        pm = re.search(r"^  params: \{\n(.*?)^  \}", body, re.M | re.S)
        passed = set(re.findall(r"^    (\w+):", pm.group(1), re.M)) if pm else set()
        declared = declared_params((INFRA / path).read_text())
        for p in passed - set(declared):
            problems.append(f"{sym}: passes unknown param {p}")
        for p, has_default in declared.items():
            if not has_default and p not in passed:
                problems.append(f"{sym}: required param {p} not passed")
    return problems


@check("parameters example names every required main.bicep param")
def params_example():
    problems = []
    declared = declared_params((INFRA / "main.bicep").read_text())
    example = json.loads((INFRA / "main.parameters.example.json").read_text())["parameters"]
    for p, has_default in declared.items():
        if not has_default and p not in example:
            problems.append(f"required param {p} missing from the example")
    for p in example:
        if p not in declared:
            problems.append(f"example names unknown param {p}")
    return problems


@check("probe targets the handler health path within AppGW limits")
def probe():
    problems = []
    probe = json.loads((INFRA / "appgw-probe.json").read_text())
    route = (REPO / "src" / "pipeline" / "route.rs").read_text()
    m = re.search(r'pub const HEALTH_PATH: &str = "([^"]+)"', route)
    if not m:
        return ["HEALTH_PATH not found in src/pipeline/route.rs"]
    if probe["path"] != m.group(1):
        problems.append(f"probe path {probe['path']} != handler HEALTH_PATH {m.group(1)}")
    if probe["path"] != "/api/FwdProxy/openai/deployments/health/check":
        problems.append("probe path is not /api/FwdProxy/openai/deployments/health/check")
    for k, lo, hi in (("intervalSeconds", 1, 86400), ("timeoutSeconds", 1, 86400), ("unhealthyThreshold", 1, 20)):
        v = probe.get(k)
        if not isinstance(v, int) or not lo <= v <= hi:
            problems.append(f"{k}={v!r} outside {lo}..{hi}")
    if probe.get("timeoutSeconds", 0) > probe.get("intervalSeconds", 0):
        problems.append("probe timeout longer than its interval")
    if probe.get("pickHostNameFromBackendHttpSettings") is not True:
        problems.append("probe must pick the host name from the backend settings")
    appgw = (INFRA / "modules" / "appgw.bicep").read_text()
    for key in ("path: probe.path", "interval: probe.intervalSeconds", "unhealthyThreshold: probe.unhealthyThreshold"):
        if key not in appgw:
            problems.append(f"appgw.bicep does not use {key}")
    return problems


@check("backend timeout <= 230 s, AOAI_TIMEOUT_MS < 230000, response buffering off")
def timeouts():
    problems = []
    main = (INFRA / "main.bicep").read_text()
    appgw = (INFRA / "modules" / "appgw.bicep").read_text()
    m = re.search(r"@maxValue\((\d+)\)\s*\nparam backendRequestTimeoutSeconds int = (\d+)", main)
    if not m or int(m.group(1)) > 230 or int(m.group(2)) > 230:
        problems.append("main.bicep backendRequestTimeoutSeconds must default to and be capped at <= 230")
    m = re.search(r"@maxValue\((\d+)\)\s*\n(?:@\w+\([^)]*\)\s*\n)*param requestTimeoutSeconds int", appgw)
    if not m or int(m.group(1)) > 230:
        problems.append("appgw.bicep requestTimeoutSeconds must be capped at <= 230")
    if "requestTimeout: requestTimeoutSeconds" not in appgw:
        problems.append("backend settings do not use requestTimeoutSeconds")
    m = re.search(r"@maxValue\((\d+)\)\s*\nparam aoaiTimeoutMs int = (\d+)", main)
    if not m or int(m.group(1)) >= 230000 or int(m.group(2)) >= 230000:
        problems.append("AOAI_TIMEOUT_MS (aoaiTimeoutMs) must stay below 230000")
    if not re.search(r"enableResponseBuffering:\s*false", appgw):
        problems.append("appgw.bicep must set enableResponseBuffering: false")
    if "loadJsonContent('rewrite-rules.json').rewriteRules" not in main:
        problems.append("main.bicep does not load rewrite-rules.json")
    return problems


def statements(text: str, kind: str):
    """(symbol, type-or-path, is_loop, decorators) for each top-level `resource`/`module`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"^{kind}\s+(\w+)\s+'([^']+)'[^=]*=\s*(\[\s*for\b)?", line)
        if not m:
            continue
        decorators = []
        j = i - 1
        while j >= 0 and (lines[j].startswith("@") or lines[j].startswith("//")):
            if lines[j].startswith("@"):
                decorators.append(lines[j].strip())
            j -= 1
        yield m.group(1), m.group(2), bool(m.group(3)), decorators


COSMOS_ROLE = "Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@"


@check("Cosmos DB role assignments: one deploy site, one at a time (@batchSize(1))")
def cosmos_role_assignments_serialised():
    # Each sqlRoleAssignments PUT locks the account; parallel ones fail with 412 (not retried).
    problems = []
    files = bicep_files()
    texts = {f: f.read_text() for f in files}
    sites = []
    tainted = set()
    for f, text in texts.items():
        for sym, typ, loop, decorators in statements(text, "resource"):
            if typ.startswith(COSMOS_ROLE):
                sites.append(f"{f.relative_to(INFRA)}:{sym}")
                tainted.add(f.resolve())
                if loop and "@batchSize(1)" not in decorators:
                    problems.append(f"{f.relative_to(INFRA)}: {sym} loops without @batchSize(1)")
    if not sites:
        problems.append("no sqlRoleAssignments resource found (the apps need Cosmos DB data access)")
    if len(sites) > 1:
        problems.append(f"sqlRoleAssignments declared in {len(sites)} places (they would run in parallel): {sites}")
    # Modules that (transitively) deploy one: each reference must be a serial loop or single.
    changed = True
    while changed:
        changed = False
        for f, text in texts.items():
            for sym, path, loop, decorators in statements(text, "module"):
                if (f.parent / path).resolve() in tainted and f.resolve() not in tainted:
                    tainted.add(f.resolve())
                    changed = True
    for f, text in texts.items():
        refs = [(s, p, l, d) for s, p, l, d in statements(text, "module") if (f.parent / p).resolve() in tainted]
        if len(refs) > 1:
            problems.append(f"{f.relative_to(INFRA)}: {len(refs)} modules grant Cosmos DB roles (parallel): {[r[0] for r in refs]}")
        for sym, path, loop, decorators in refs:
            if loop and "@batchSize(1)" not in decorators:
                problems.append(f"{f.relative_to(INFRA)}: module {sym} ({path}) loops without @batchSize(1)")
    return problems


@check("gateway reads its Key Vault certificate only after its identity got the role")
def gateway_certificate_order():
    problems = []
    main = (INFRA / "main.bicep").read_text()
    m = re.search(r"^module gateway 'modules/appgw.bicep'.*?^\}", main, re.M | re.S)
    if not m:
        return ["main.bicep has no gateway module"]
    gw = m.group(0)
    if not re.search(r"dependsOn:\s*\[[^\]]*\bgatewayCertificateAccess\b", gw):
        problems.append("gateway module does not dependsOn gatewayCertificateAccess")
    if "identityId: gatewayIdentity.id" not in gw:
        problems.append("gateway does not use the user-assigned identity that gets the vault role")
    a = re.search(r"^module gatewayCertificateAccess .*?^\}", main, re.M | re.S)
    if not a or "principalId: gatewayIdentity.properties.principalId" not in a.group(0):
        problems.append("gatewayCertificateAccess does not grant the gateway's identity")
    readme = (INFRA / "README.md").read_text()
    if "propagat" not in readme.lower() or "re-run" not in readme.lower():
        problems.append("infra/README.md does not document RBAC propagation and the re-run")
    return problems


@check("Microsoft.Web service endpoints list their locations")
def service_endpoint_locations():
    problems = []
    for f in bicep_files():
        text = f.read_text()
        for m in re.finditer(r"service:\s*'Microsoft\.Web'(.*?)\}", text, re.S):
            if "locations:" not in m.group(1):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{f.relative_to(INFRA)}:{line}: Microsoft.Web endpoint without locations (cross-region apps answer 403)")
    return problems


@check("storage ipRules: /32 stripped, no /31 in the example")
def storage_ip_rules():
    problems = []
    storage = (INFRA / "modules" / "storage.bicep").read_text()
    m = re.search(r"ipRules:\s*\[for\s+(\w+)\s+in\s+\w+:\s*\{(.*?)\}\]", storage, re.S)
    if not m:
        return ["storage.bicep: ipRules loop not found"]
    var, body = m.groups()
    value = re.search(r"value:\s*(.+)", body)
    if not value or "'/32'" not in value.group(1) or value.group(1).strip() == var:
        problems.append("storage.bicep: ipRules value does not strip a /32 prefix")
    example = json.loads((INFRA / "main.parameters.example.json").read_text())["parameters"]
    for ip in (example.get("deployerIpRanges") or {}).get("value", []):
        if ip.endswith("/31"):
            problems.append(f"example deployerIpRanges has {ip}: storage rejects /31")
    return problems


@check("route-all Function Apps have an egress (NAT gateway by default)")
def route_all_egress():
    problems = []
    app = (INFRA / "modules" / "function-app.bicep").read_text()
    if "vnetRouteAllEnabled: true" not in app:
        return problems
    spoke = (INFRA / "modules" / "spoke.bicep").read_text()
    main = (INFRA / "main.bicep").read_text()
    if "Microsoft.Network/natGateways@" not in spoke or not re.search(r"natGateway:\s*deployNatGateway", spoke):
        problems.append("spoke.bicep: the integration subnet has no NAT gateway option")
    if not re.search(r"^param deployNatGateway bool = true", main, re.M):
        problems.append("main.bicep: deployNatGateway must default to true")
    if "deployNatGateway: deployNatGateway" not in main:
        problems.append("main.bicep does not pass deployNatGateway to the spokes")
    if "deployNatGateway" not in (INFRA / "README.md").read_text():
        problems.append("infra/README.md does not say what deployNatGateway=false requires")
    return problems


@check("main.bicep usage comment and README call publish.sh with flags it knows")
def publish_usage():
    problems = []
    publish = (INFRA / "publish.sh").read_text()
    known = set()
    for arm in re.findall(r"^\s*([-\w|]+)\)", publish, re.M):
        known.update(a for a in arm.split("|") if a.startswith("-"))
    if not {"-g", "-n"} <= known:
        return [f"publish.sh does not parse -g/-n (knows {sorted(known)})"]
    sources = {
        "main.bicep": (INFRA / "main.bicep").read_text(),
        "infra/README.md": (INFRA / "README.md").read_text(),
    }
    for name, text in sources.items():
        uses = re.findall(r"publish\.sh([^\n`|]*)", text)
        calls = [u for u in uses if u.strip() and not u.strip().startswith(("(", ":", ",", "."))]
        if name == "main.bicep" and not calls:
            problems.append("main.bicep has no publish.sh usage line")
        for call in calls:
            tokens = re.sub(r"\[|\]", " ", call.split("#")[0]).split()
            expect_value = False
            for tok in tokens:
                if tok.startswith("-"):
                    flag = tok.split("=")[0]
                    if flag not in known:
                        problems.append(f"{name}: publish.sh{call}: unknown flag {flag}")
                    expect_value = flag in {"-g", "--resource-group", "-n", "--deployment", "--package-args", "--outputs-file"}
                elif expect_value:
                    expect_value = False
                elif tok.startswith("<") or tok.startswith("$"):
                    problems.append(f"{name}: publish.sh{call}: positional {tok} (publish.sh takes flags)")
                    break
                else:
                    break  # prose after the command
    return problems


# ---------------------------------------------------------------------------------------------
# Hosting plan variants (hostingPlan: FlexConsumption | ElasticPremium)
# ---------------------------------------------------------------------------------------------

FLEX_MODULE = INFRA / "modules" / "function-app-flex.bicep"
EP_MODULE = INFRA / "modules" / "function-app.bicep"


def flex_refused() -> dict:
    return json.loads((INFRA / "flex-refused-settings.json").read_text())


def block(text: str, header_regex: str) -> str:
    """A top-level `module`/`resource`/`var` statement from its header to its closing line."""
    m = re.search(header_regex + r".*?^(?:\}|\}\]|\]\)\]|\])\s*$", text, re.M | re.S)
    return m.group(0) if m else ""


def setting_pairs(text: str) -> dict[str, str]:
    """Literal app-setting names and their value expressions (`name: 'X'` then `value: …`)."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*name:\s*'([^'$]+)'\s*\n\s*value:(.*)$", text, re.M)}


def setting_names(text: str) -> set[str]:
    return set(setting_pairs(text))


def flex_variant_settings() -> tuple[set[str], list[str]]:
    """Every app-setting name the Flex variant can carry, and the places it was read from."""
    main = (INFRA / "main.bicep").read_text()
    parts = {
        "main.bicep module flexApps": block(main, r"^module flexApps "),
        "function-app-flex.bicep": FLEX_MODULE.read_text(),
    }
    missing = [k for k, v in parts.items() if not v]
    names = set()
    for v in parts.values():
        names |= setting_names(v)
    return names, missing


@check("hostingPlan: FlexConsumption (default) or ElasticPremium, each module deployed for its plan only")
def hosting_plan_switch():
    problems = []
    main = (INFRA / "main.bicep").read_text()
    m = re.search(r"@allowed\(\[\s*'FlexConsumption'\s*'ElasticPremium'\s*\]\)\s*\nparam hostingPlan string = '(\w+)'", main)
    if not m:
        return ["main.bicep: param hostingPlan with @allowed(['FlexConsumption', 'ElasticPremium']) not found"]
    if m.group(1) != "FlexConsumption":
        problems.append(f"hostingPlan defaults to {m.group(1)}, not FlexConsumption")
    if "var isFlex = hostingPlan == 'FlexConsumption'" not in main:
        problems.append("main.bicep: isFlex is not derived from hostingPlan")
    expect = {
        r"^module plans 'modules/function-plan.bicep' = \[for r in regions: if \(!isFlex\)": "Premium plans only when not Flex",
        r"^module apps 'modules/function-app.bicep' = \[for \(a, i\) in aoaiResources: if \(!isFlex\)": "Premium apps only when not Flex",
        r"^module flexApps 'modules/function-app-flex.bicep' = \[for \(a, i\) in aoaiResources: if \(isFlex\)": "Flex apps only when Flex",
    }
    for rx, what in expect.items():
        if not re.search(rx, main, re.M):
            problems.append(f"main.bicep: {what} ({rx})")
    # Everything downstream of the apps must use the per-plan selection, never one variant.
    for sym in ("apps", "flexApps"):
        for use in re.finditer(rf"\b{sym}\[i\]\.outputs\.(\w+)", main):
            line = main[main.rfind("\n", 0, use.start()) + 1 : main.find("\n", use.start())]
            if "isFlex ?" not in line:
                problems.append(f"main.bicep uses {sym}[i].outputs.{use.group(1)} outside an isFlex selection: {line.strip()}")
    for out in ("functionAppNames", "functionAppHostNames", "hostingPlan"):
        if not re.search(rf"^output {out} ", main, re.M):
            problems.append(f"main.bicep: output {out} missing (publish.sh and smoke read it)")
    return problems


@check("Flex variant: none of the app settings or site properties Flex refuses")
def flex_refused_settings():
    problems = []
    refused = flex_refused()
    names, missing = flex_variant_settings()
    problems += [f"{k}: not found" for k in missing]
    if not names:
        problems.append("no app setting names found for the Flex variant (the parser is broken)")
    for n in sorted(names):
        if n.upper() in refused["appSettings"]:
            problems.append(f"Flex variant sets {n}, which Flex refuses")
    flex = FLEX_MODULE.read_text()
    for prop in refused["siteProperties"]:
        if re.search(rf"^\s*{prop}\s*:", flex, re.M):
            problems.append(f"function-app-flex.bicep sets {prop}, which Flex refuses")
    main = (INFRA / "main.bicep").read_text()
    fb = block(main, r"^module flexApps ")
    if re.search(r"(?<![A-Za-z])additionalAppSettings", fb):
        problems.append("flexApps passes additionalAppSettings unfiltered (use flexAdditionalAppSettings)")
    if not re.search(r"var flexAdditionalAppSettings = filter\(additionalAppSettings, (\w+) => !contains\(flexRefusedAppSettings, toUpper\(\1\.name\)\)\)", main):
        problems.append("main.bicep: flexAdditionalAppSettings does not filter the refused names out")
    if "loadJsonContent('flex-refused-settings.json').appSettings" not in main:
        problems.append("main.bicep does not load flex-refused-settings.json")
    # The list itself must keep the settings this repo's Premium variant relies on.
    for must in ("FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE",
                 "WEBSITE_CONTENTSHARE", "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING"):
        if must not in refused["appSettings"]:
            problems.append(f"flex-refused-settings.json lost {must}")
    if any(n != n.upper() for n in refused["appSettings"]):
        problems.append("flex-refused-settings.json: appSettings must be upper case (main.bicep compares toUpper)")
    return problems


@check("Flex variant: custom runtime, FC1, identity-based blob deployment, always-ready http, no key, no Azure Files")
def flex_shape():
    problems = []
    flex = FLEX_MODULE.read_text()
    need = {
        "FC1 / FlexConsumption SKU": r"sku:\s*\{\s*name:\s*'FC1'\s*tier:\s*'FlexConsumption'\s*\}",
        "runtime custom": r"runtime:\s*\{\s*(?://[^\n]*\s*)*name:\s*'custom'\s*version:\s*'1\.0'\s*\}",
        "blobContainer deployment storage": r"storage:\s*\{\s*type:\s*'blobContainer'",
        "identity authentication": r"authentication:\s*\{\s*type:\s*'(?:SystemAssignedIdentity|UserAssignedIdentity)'",
        "always-ready http group": r"alwaysReady:\s*\[\s*\{\s*name:\s*'http'\s*instanceCount:\s*alwaysReadyInstances",
        "http per-instance concurrency": r"http:\s*\{\s*perInstanceConcurrency:\s*httpPerInstanceConcurrency",
        "instance memory": r"instanceMemoryMB:\s*instanceMemoryMB",
        "maximum instances": r"maximumInstanceCount:\s*maximumInstanceCount",
        "VNet integration": r"virtualNetworkSubnetId:\s*integrationSubnetId",
        "gateway-only inbound": r"ipSecurityRestrictionsDefaultAction:\s*'Deny'",
        "SCM default deny": r"scmIpSecurityRestrictionsDefaultAction:\s*'Deny'",
        "basic publishing (scm) off": r"name:\s*'scm'\s*properties:\s*\{\s*allow:\s*false",
        "basic publishing (ftp) off": r"name:\s*'ftp'\s*properties:\s*\{\s*allow:\s*false",
        "deployment identity granted before the app": r"dependsOn:\s*\[\s*deployStorageAccess\s*\]",
    }
    for what, rx in need.items():
        if not re.search(rx, flex, re.S):
            problems.append(f"function-app-flex.bicep: {what} missing")
    if re.search(r"StorageAccountConnectionString|storageAccountConnectionStringName", flex):
        problems.append("function-app-flex.bicep: deployment storage authenticates with a connection string (a key)")
    texts = {"main.bicep": (INFRA / "main.bicep").read_text(), "function-app-flex.bicep": flex,
             "storage.bicep": (INFRA / "modules" / "storage.bicep").read_text()}
    for name, text in texts.items():
        code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
        for bad, why in ((r"AccountKey=", "a storage key in a connection string"),
                         (r"\bstorage\w*\.listKeys\(", "storage account keys"),
                         (r"azureStorageAccounts", "an Azure Files / blob mount"),
                         (r"WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", "an Azure Files content share")):
            if re.search(bad, code):
                problems.append(f"{name}: {why}")
    if "allowSharedKeyAccess: false" not in texts["storage.bicep"]:
        problems.append("storage.bicep: shared keys must stay off")
    main = texts["main.bicep"]
    if "delegation: isFlex ? 'Microsoft.App/environments' : 'Microsoft.Web/serverFarms'" not in main:
        problems.append("main.bicep: the Flex integration subnet must be delegated to Microsoft.App/environments")
    if "prefixIndexes: isFlex ? filter(appIndexes, j => appLocations[j] == r)" not in main:
        problems.append("main.bicep: each Flex app needs its own integration subnet")
    if "deploymentContainerNames: isFlex ? deploymentContainerNames : []" not in main:
        problems.append("main.bicep: the Flex deployment containers are not created")
    m = re.search(r"^param flexMaximumInstanceCount int = (\d+)", main, re.M)
    if not m or not 40 <= int(m.group(1)) <= 1000:
        problems.append("flexMaximumInstanceCount must default within Flex's 40..1000")
    return problems


@check("both plan variants grant the same roles and carry the same module-added app settings")
def variants_in_step():
    problems = []
    ep, flex = EP_MODULE.read_text(), FLEX_MODULE.read_text()

    def roles(text):
        m = re.search(r"^var roles = \{(.*?)^\}", text, re.M | re.S)
        return dict(re.findall(r"^\s*(\w+):\s*'([0-9a-f-]{36})'", m.group(1), re.M)) if m else {}

    def granted(text):
        return set(re.findall(r"roleDefinitions', (?:role|roles\.(\w+))\)", text)) - {""}

    if not roles(ep) or roles(ep) != roles(flex):
        problems.append(f"role tables differ: premium {roles(ep)} vs flex {roles(flex)}")
    if granted(ep) - granted(flex):
        problems.append(f"Flex module does not grant {sorted(granted(ep) - granted(flex))}")
    # A setting function-app.bicep adds on its own (beyond the appSettings param) must reach the
    # Flex apps too, unless Flex refuses it.
    refused = set(flex_refused()["appSettings"])
    flex_names, _ = flex_variant_settings()
    for n in setting_names(ep):
        if n.upper() not in refused and n not in flex_names:
            problems.append(f"function-app.bicep adds app setting {n}; the Flex variant does not")
    # The Flex apps get the Premium apps' settings from main.bicep, minus the refused ones, with
    # the same values.
    main = (INFRA / "main.bicep").read_text()
    ep_main = setting_pairs(block(main, r"^module apps "))
    flex_main = setting_pairs(block(main, r"^module flexApps "))
    if not ep_main:
        problems.append("main.bicep: no app settings found in module apps (the parser is broken)")
    for n, v in ep_main.items():
        if n.upper() in refused:
            continue
        if n not in flex_main:
            problems.append(f"main.bicep: the Premium apps get {n}, the Flex apps do not")
        elif flex_main[n] != v:
            problems.append(f"main.bicep: {n} is {v} on Premium but {flex_main[n]} on Flex")
    for n in flex_main.keys() - ep_main.keys():
        problems.append(f"main.bicep: the Flex apps get {n}, the Premium apps do not")
    if "appSettings: appSettings" not in flex and not re.search(r"appSettings:\s*concat\(appSettings", flex):
        problems.append("function-app-flex.bicep does not apply the appSettings it is given")
    return problems


@check("docs: func and VS Code deploy to infra-created apps; the 409 caveat only for Premium")
def deploy_docs():
    problems = []
    deploy = (REPO / "docs" / "deploy.md").read_text()
    readme = (INFRA / "README.md").read_text()
    for text, name in ((deploy, "docs/deploy.md"), (readme, "infra/README.md")):
        for must in ("hostingPlan", "func azure functionapp publish", "Deploy to Function App",
                     "Website Contributor", "deployerIpRanges", "Microsoft.App"):
            if must not in text:
                problems.append(f"{name} does not mention {must}")
    for m in re.finditer(r"\b409\b", deploy):
        line = deploy[deploy.rfind("\n", 0, m.start()) + 1 : deploy.find("\n", m.start())]
        section = deploy[deploy.rfind("\n#", 0, m.start()) : m.start()]
        if "Premium" not in line and "Premium" not in section.split("\n", 2)[1]:
            problems.append(f"docs/deploy.md: the 409 caveat outside an Elastic Premium line or section: {line.strip()[:80]}")
    if "AUDIT_DIR" not in deploy:
        problems.append("docs/deploy.md does not say where the abuse-log journal goes on Flex (AUDIT_DIR)")
    return problems

@check("spillover: off by default; backups = the siblings in order; their keys or roles wired")
def spillover_wiring():
    problems = []
    main = (INFRA / "main.bicep").read_text()
    for param, default in (("aoaiSpillover", "false"), ("healthReflectsCapacity", "false")):
        m = re.search(rf"^param {param} bool = (\w+)", main, re.M)
        if not m or m.group(1) != default:
            problems.append(f"main.bicep: param {param} bool must default to {default}")
    if not re.search(r"^var spillover = aoaiSpillover && appCount > 1$", main, re.M):
        problems.append("main.bicep: spillover must need aoaiSpillover and two or more resources")
    # The order: the resources after the app's own, then those before it (never its own), the
    # indexes and the accounts alike.
    for var, over in (("backupIndexes", "appIndexes"), ("backupAccounts", "aoaiResources")):
        want = f"var {var} = [for (a, i) in aoaiResources: concat(skip({over}, i + 1), take({over}, i))]"
        if not re.search(rf"^{re.escape(want)}$", main, re.M):
            problems.append(f"main.bicep: expected `{want}`")
    if not re.search(r"^var appIndexes = \[for \(a, j\) in aoaiResources: j\]$", main, re.M):
        problems.append("main.bicep: appIndexes is not the index of each aoaiResources entry")
    # checkov's Bicep parser knows neither map nor range: a template using them is not scanned.
    for fn in ("map", "range"):
        if re.search(rf"\b{fn}\(", main):
            problems.append(f"main.bicep uses {fn}(), which checkov cannot parse")
    # The secrets the URIs name must be the ones this deployment writes.
    if "name: 'aoai-outapikey-${i}'" not in block(main, r"^resource outApiKeySecrets "):
        problems.append("main.bicep: the aoai-outapikey-<i> secrets the backup URIs name are not written")
    mod = block(main, r"^module aoaiBackups ")
    if not re.search(r"^module aoaiBackups 'modules/aoai-backups.bicep' = \[for \(a, i\) in aoaiResources: if \(spillover\)", mod, re.M):
        problems.append("main.bicep: module aoaiBackups (one per app, only with spillover) not found")
    else:
        for must in ("backups: backupAccounts[i]", "backupIndexes: backupIndexes[i]",
                     "keySecretUriPrefix: '${keyVaultSecretsBase}aoai-outapikey-'"):
            if must not in mod:
                problems.append(f"main.bicep: aoaiBackups does not pass `{must}`")
    backups_module = (INFRA / "modules" / "aoai-backups.bicep").read_text()
    if not re.search(r"^output hostNames array = \[for \(b, k\) in backups: .*accounts\[k\]\.properties\.endpoint", backups_module, re.M):
        problems.append("aoai-backups.bicep: output hostNames is not the accounts' endpoints in order")
    if not re.search(r"^output keySecretUris array = \[for j in backupIndexes: '\$\{keySecretUriPrefix\}\$\{j\}'\]$", backups_module, re.M):
        problems.append("aoai-backups.bicep: output keySecretUris is not the prefix + each backup's index")
    # Both plans: the same settings, each under its condition.
    for sym in ("apps", "flexApps"):
        b = block(main, rf"^module {sym} ")
        pairs = setting_pairs(b)
        want = {
            "AOAI_BACKUPS": ("join(aoaiBackups[i].outputs.hostNames, ',')", "spillover ? ["),
            "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS": ("join(aoaiBackups[i].outputs.keySecretUris, ',')", "spillover && aoaiAuth == 'key' ? ["),
            "HEALTH_REFLECTS_CAPACITY": ("'true'", "healthReflectsCapacity ? ["),
        }
        for name, (value, condition) in want.items():
            if pairs.get(name) != value:
                problems.append(f"main.bicep module {sym}: {name} is {pairs.get(name)!r}, expected {value}")
                continue
            at = b.find(f"name: '{name}'")
            opened = b.rfind("[", 0, at)
            if not b[: opened + 1].rstrip().endswith(condition):
                problems.append(f"main.bicep module {sym}: {name} is not under `{condition}`")
        if "AOAI_BACKUP_OUTAPIKEYS" in pairs:
            problems.append(f"main.bicep module {sym}: keys as a plain setting (use the Key Vault secret URIs)")
    # Keyless: the app's identity on each sibling, at the sibling's scope.
    acc = block(main, r"^module aoaiBackupAccess ")
    # Entry x of flatten(backupIndexes) is a backup of app x / (n - 1): every app has n - 1.
    if not re.search(r"^var backupAccessTargets = flatten\(backupIndexes\)$", main, re.M):
        problems.append("main.bicep: backupAccessTargets is not flatten(backupIndexes)")
    if not re.search(r"^module aoaiBackupAccess 'modules/aoai-access.bicep' = \[for \(j, x\) in backupAccessTargets: if \(spillover && aoaiAuth == 'managed_identity'\)", acc, re.M):
        problems.append("main.bicep: module aoaiBackupAccess (aoai-access.bicep per backup of each app, keyless spillover only) not found")
    else:
        for must in ("scope: resourceGroup(aoaiResources[j].?subscriptionId ?? subscription().subscriptionId, aoaiResources[j].resourceGroup)",
                     "aoaiName: aoaiResources[j].name",
                     "principalId: isFlex ? flexApps[x / (appCount - 1)].outputs.principalId : apps[x / (appCount - 1)].outputs.principalId",
                     "appId: appNames[x / (appCount - 1)]",
                     "name: 'aoai-backup-access-${x / (appCount - 1)}-${j}'"):
            if must not in acc:
                problems.append(f"main.bicep: aoaiBackupAccess lacks `{must}`")
    if "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd" not in (INFRA / "modules" / "aoai-access.bicep").read_text():
        problems.append("aoai-access.bicep does not grant Cognitive Services OpenAI User")
    readme = (INFRA / "README.md").read_text()
    for must in ("aoaiSpillover", "AOAI_BACKUPS", "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS", "healthReflectsCapacity", "502",
                 "same deployment names"):
        if must not in readme:
            problems.append(f"infra/README.md does not mention {must}")
    return problems


def main() -> int:
    width = max(len(n) for n, _, _ in results)
    for name, ok, why in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name.ljust(width)}" + ("" if ok else f"\n      {why}"))
    failed = sum(not ok for _, ok, _ in results)
    print(f"structure: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
