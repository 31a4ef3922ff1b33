#!/usr/bin/env python3
"""Validate the files the Azure Functions host and its tools read, before anything is deployed.

Checks, against what the Functions host (v4) and Core Tools actually read:

* ``host.json``: ``version`` "2.0"; ``customHandler.description.defaultExecutablePath`` "handler";
  ``customHandler.enableProxyingHttpRequest`` true and no legacy ``enableForwardingHttpRequest``
  true (that mode rebuilds requests and buffers whole responses, so SSE would arrive at once);
  ``extensions.http.routePrefix`` "api" (the default when absent); ``functionTimeout`` a TimeSpan
  of at least 230 s (the Azure front end cuts HTTP calls there, so anything shorter cuts streams
  early) and at most 1 h (Premium guarantees 60 min on scale-in; Consumption caps at 10 min).
* ``FwdProxy/function.json``: exactly one ``httpTrigger`` (direction in, a name, authLevel
  anonymous, methods a subset of get/post/delete/options/head including get and post, route
  ``FwdProxy/{*path}``) and one ``http`` out binding; no other function folder at the top level.
* ``.vscode/*.json``: parse as VS Code's JSONC (``//`` and ``/* */`` comments, trailing commas),
  the Azure Functions settings point at the package, and the tasks they name exist.
* ``local.settings.json.example``: ``IsEncrypted`` false and ``Values.FUNCTIONS_WORKER_RUNTIME``
  "custom" (a ``local.settings.json`` next to it is held to the same shape).
* ``.funcignore``: simulated with Core Tools' own matcher (a port of its GitIgnoreParser) and with
  git's semantics (``git check-ignore``), publishing from the repository root would upload only
  ``host.json``, ``FwdProxy/function.json`` and ``handler``.

With ``--package DIR`` the same host.json/function.json checks run on an assembled package.
Standard library only (Python 3.11). Exits 1 with a list of problems, 0 when all is well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FRONT_END_LIMIT_S = 230  # Azure front end (load balancer idle timeout) for HTTP-triggered calls
PREMIUM_GUARANTEED_S = 60 * 60  # execution guaranteed on Premium scale-in
CONSUMPTION_MAX_S = 10 * 60
ALLOWED_METHODS = {"get", "post", "delete", "options", "head"}
FUNCTION_NAME = "FwdProxy"
ROUTE = "FwdProxy/{*path}"
PACKAGE_FILES = ["host.json", "FwdProxy/function.json", "handler"]


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.notes: list[str] = []

    def problem(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}")

    def note(self, where: str, msg: str) -> None:
        self.notes.append(f"{where}: {msg}")


# --------------------------------------------------------------------------------------------
# JSON / JSONC loading


def strip_jsonc(text: str) -> str:
    """Remove // and /* */ comments and trailing commas, leaving strings untouched."""
    out: list[str] = []
    i, n = 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    no_comments = "".join(out)
    # Trailing commas before } or ] (outside strings: re-scan with a tiny state machine).
    result: list[str] = []
    in_str = False
    i, n = 0, len(no_comments)
    while i < n:
        c = no_comments[i]
        if in_str:
            result.append(c)
            if c == "\\" and i + 1 < n:
                result.append(no_comments[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
        elif c == ",":
            j = i + 1
            while j < n and no_comments[j] in " \t\r\n":
                j += 1
            if j < n and no_comments[j] in "}]":
                i += 1
                continue
        result.append(c)
        i += 1
    return "".join(result)


def load_json(path: Path, rep: Report, jsonc: bool = False):
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        rep.problem(where, "missing")
        return None
    try:
        return json.loads(strip_jsonc(text) if jsonc else text)
    except json.JSONDecodeError as e:
        kind = "JSONC" if jsonc else "JSON (the host does not accept comments here)"
        rep.problem(where, f"is not valid {kind}: {e}")
        return None


# --------------------------------------------------------------------------------------------
# host.json

_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,7}))?$")


def timespan_seconds(value: str) -> float | None:
    """Seconds in a .NET TimeSpan string ([d.]hh:mm:ss[.fffffff]); None when not one."""
    m = _TIMESPAN.match(value.strip())
    if not m:
        return None
    days, hh, mm, ss, frac = m.groups()
    h, mi, s = int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or s > 59:
        return None
    return int(days or 0) * 86400 + h * 3600 + mi * 60 + s + (float("0." + frac) if frac else 0.0)


def check_host_json(path: Path, rep: Report) -> None:
    where = str(path)
    doc = load_json(path, rep)
    if doc is None:
        return
    if not isinstance(doc, dict):
        rep.problem(where, "must be a JSON object")
        return
    if doc.get("version") != "2.0":
        rep.problem(where, f'"version" must be "2.0" (Functions 2.x and later), got {doc.get("version")!r}')

    ch = doc.get("customHandler")
    if not isinstance(ch, dict):
        rep.problem(where, '"customHandler" section missing: the host would not start the handler')
    else:
        desc = ch.get("description")
        if not isinstance(desc, dict):
            rep.problem(where, '"customHandler.description" missing')
        else:
            exe = desc.get("defaultExecutablePath")
            if exe != "handler":
                rep.problem(
                    where,
                    f'"customHandler.description.defaultExecutablePath" must be "handler" (the file the '
                    f"package ships at its root), got {exe!r}",
                )
            wd = desc.get("workingDirectory", "")
            if wd not in ("", ".", None):
                rep.problem(
                    where,
                    f'"customHandler.description.workingDirectory" should be empty (the app root, where '
                    f"local.settings.json is read in local runs), got {wd!r}",
                )
            args = desc.get("arguments", [])
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                rep.problem(where, '"customHandler.description.arguments" must be a list of strings')
        if ch.get("enableProxyingHttpRequest") is not True:
            rep.problem(
                where,
                '"customHandler.enableProxyingHttpRequest" must be true: it proxies raw HTTP and streams '
                "responses (SSE events reach the client as AOAI sends them)",
            )
        if ch.get("enableForwardingHttpRequest") is True:
            rep.problem(
                where,
                '"customHandler.enableForwardingHttpRequest" must not be true: the legacy mode rebuilds '
                "requests, drops bodies without Content-Length and buffers whole responses",
            )
        port = ch.get("port")
        if port is not None:
            rep.problem(where, '"customHandler.port" pins the port; let the host choose (FUNCTIONS_CUSTOMHANDLER_PORT)')

    http = (doc.get("extensions") or {}).get("http") if isinstance(doc.get("extensions"), dict) else None
    prefix = (http or {}).get("routePrefix", "api") if isinstance(http, dict) or http is None else None
    if prefix != "api":
        rep.problem(
            where,
            f'"extensions.http.routePrefix" must be "api" (routes are /api/FwdProxy/...; AppGW rewrites '
            f"onto that), got {prefix!r}",
        )

    ft = doc.get("functionTimeout")
    if ft is None:
        rep.problem(
            where,
            f'"functionTimeout" missing: set it explicitly (>= {FRONT_END_LIMIT_S} s, the front-end limit '
            "for HTTP calls, so a stream is never cut earlier by the host)",
        )
    elif not isinstance(ft, str) or timespan_seconds(ft) is None:
        rep.problem(
            where,
            f'"functionTimeout" must be a finite TimeSpan string like "00:05:00", got {ft!r} '
            "(unbounded values serve no purpose behind the 230 s front-end limit)",
        )
    else:
        secs = timespan_seconds(ft)
        assert secs is not None
        if secs < FRONT_END_LIMIT_S:
            rep.problem(
                where,
                f'"functionTimeout" {ft} is shorter than the {FRONT_END_LIMIT_S} s front-end limit: the '
                "host would cut long streams before Azure does",
            )
        elif secs > PREMIUM_GUARANTEED_S:
            rep.problem(
                where,
                f'"functionTimeout" {ft} exceeds 01:00:00, the execution Premium guarantees; HTTP calls '
                f"end at {FRONT_END_LIMIT_S} s anyway",
            )
        elif secs > CONSUMPTION_MAX_S:
            rep.note(where, f'functionTimeout {ft} is over 10 min: fine on Premium/Dedicated/Flex, refused on Consumption')


# --------------------------------------------------------------------------------------------
# function.json


def check_function_json(path: Path, rep: Report) -> None:
    where = str(path)
    doc = load_json(path, rep)
    if doc is None:
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("bindings"), list):
        rep.problem(where, 'must be an object with a "bindings" list')
        return
    if doc.get("disabled") is True:
        rep.problem(where, '"disabled": true turns the FwdProxy function off')
    bindings = doc["bindings"]
    triggers = [b for b in bindings if isinstance(b, dict) and str(b.get("type", "")).lower() == "httptrigger"]
    outs = [b for b in bindings if isinstance(b, dict) and str(b.get("type", "")).lower() == "http"]
    others = [b for b in bindings if b not in triggers and b not in outs]
    if len(triggers) != 1:
        rep.problem(where, f"needs exactly one httpTrigger binding, found {len(triggers)}")
    if len(outs) != 1:
        rep.problem(where, f"needs exactly one http out binding, found {len(outs)}")
    if others:
        rep.problem(
            where,
            f"has other bindings {[b.get('type') if isinstance(b, dict) else b for b in others]}: a proxying "
            "custom handler serves HTTP only",
        )
    if triggers:
        t = triggers[0]
        if str(t.get("direction", "")).lower() != "in":
            rep.problem(where, f'httpTrigger "direction" must be "in", got {t.get("direction")!r}')
        if not isinstance(t.get("name"), str) or not t.get("name"):
            rep.problem(where, 'httpTrigger needs a "name"')
        auth = t.get("authLevel")
        if not isinstance(auth, str) or auth.lower() != "anonymous":
            rep.problem(
                where,
                f'httpTrigger "authLevel" must be "anonymous" (the handler checks the internal key; the '
                f"AppGW health probe must stay keyless), got {auth!r}",
            )
        methods = t.get("methods")
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            rep.problem(where, 'httpTrigger "methods" must be a non-empty list (absent means every method)')
        else:
            lower = {m.lower() for m in methods}
            extra = sorted(lower - ALLOWED_METHODS)
            if extra:
                rep.problem(where, f"httpTrigger methods {extra} are not used by AOAI (allowed: {sorted(ALLOWED_METHODS)})")
            missing = sorted({"get", "post"} - lower)
            if missing:
                rep.problem(where, f"httpTrigger methods must include {missing} (health is GET, inference is POST)")
        if t.get("route") != ROUTE:
            rep.problem(where, f'httpTrigger "route" must be "{ROUTE}", got {t.get("route")!r}')
    if outs:
        o = outs[0]
        if str(o.get("direction", "")).lower() != "out":
            rep.problem(where, f'http binding "direction" must be "out", got {o.get("direction")!r}')
        if not isinstance(o.get("name"), str) or not o.get("name"):
            rep.problem(where, 'http out binding needs a "name"')


def check_function_folders(root: Path, rep: Report) -> None:
    """The host turns every top-level folder holding a function.json into a function."""
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.name != FUNCTION_NAME and (d / "function.json").exists():
            rep.problem(str(d / "function.json"), "an extra function folder: the host would load it as a function")


# --------------------------------------------------------------------------------------------
# local.settings.json(.example)


def check_local_settings(path: Path, rep: Report) -> None:
    where = str(path)
    doc = load_json(path, rep)
    if doc is None:
        return
    if not isinstance(doc, dict):
        rep.problem(where, "must be a JSON object")
        return
    if doc.get("IsEncrypted") is not False:
        rep.problem(where, f'"IsEncrypted" must be false, got {doc.get("IsEncrypted")!r}')
    values = doc.get("Values")
    if not isinstance(values, dict):
        rep.problem(where, '"Values" must be an object')
        return
    if values.get("FUNCTIONS_WORKER_RUNTIME") != "custom":
        rep.problem(
            where,
            f'"Values.FUNCTIONS_WORKER_RUNTIME" must be "custom", got {values.get("FUNCTIONS_WORKER_RUNTIME")!r}',
        )
    bad = [k for k, v in values.items() if not isinstance(v, str)]
    if bad:
        rep.problem(where, f"Values must be strings (app settings are strings): {bad}")


# --------------------------------------------------------------------------------------------
# .vscode


def check_vscode(root: Path, rep: Report) -> None:
    vs = root / ".vscode"
    if not vs.is_dir():
        rep.problem(str(vs), "missing")
        return
    docs = {}
    for name in ("extensions.json", "settings.json", "tasks.json", "launch.json"):
        docs[name] = load_json(vs / name, rep, jsonc=True)
    for extra in sorted(vs.glob("*.json")):
        if extra.name not in docs:
            load_json(extra, rep, jsonc=True)

    ext = docs["extensions.json"]
    if isinstance(ext, dict):
        recs = ext.get("recommendations", [])
        for want in ("ms-azuretools.vscode-azurefunctions", "rust-lang.rust-analyzer", "vadimcn.vscode-lldb"):
            if want not in recs:
                rep.problem(str(vs / "extensions.json"), f"recommendations should include {want}")

    labels: set[str] = set()
    tasks = docs["tasks.json"]
    if isinstance(tasks, dict):
        for t in tasks.get("tasks", []):
            if isinstance(t, dict):
                label = t.get("label") or (f"{t.get('type')}: {t.get('command')}" if t.get("type") == "func" else None)
                if label:
                    labels.add(label)
        func_tasks = [t for t in tasks.get("tasks", []) if isinstance(t, dict) and t.get("type") == "func"]
        if not any(t.get("command") == "host start" for t in func_tasks):
            rep.problem(str(vs / "tasks.json"), 'needs a task of type "func" with command "host start"')
        for t in func_tasks:
            if t.get("command") == "host start":
                if t.get("isBackground") is not True:
                    rep.problem(str(vs / "tasks.json"), '"func: host start" must be isBackground')
                if t.get("problemMatcher") != "$func-watch":
                    rep.problem(str(vs / "tasks.json"), '"func: host start" should use the "$func-watch" problem matcher')
        for t in tasks.get("tasks", []):
            if not isinstance(t, dict):
                continue
            deps = t.get("dependsOn", [])
            for d in [deps] if isinstance(deps, str) else deps:
                if d not in labels:
                    rep.problem(str(vs / "tasks.json"), f"task {t.get('label')!r} depends on unknown task {d!r}")

    settings = docs["settings.json"]
    if isinstance(settings, dict):
        sp = str(vs / "settings.json")
        want = {
            "azureFunctions.projectLanguage": "Custom",
            "azureFunctions.projectRuntime": "~4",
            "azureFunctions.deploySubpath": "dist/package",
            "azureFunctions.scmDoBuildDuringDeployment": False,
        }
        for k, v in want.items():
            if settings.get(k) != v:
                rep.problem(sp, f"{k} should be {v!r}, got {settings.get(k)!r}")
        pre = settings.get("azureFunctions.preDeployTask")
        if not pre:
            rep.problem(sp, "azureFunctions.preDeployTask missing: deploy would ship a stale package")
        elif labels and pre not in labels:
            rep.problem(sp, f"azureFunctions.preDeployTask {pre!r} names no task in tasks.json")

    launch = docs["launch.json"]
    if isinstance(launch, dict):
        for c in launch.get("configurations", []):
            if isinstance(c, dict) and c.get("preLaunchTask") and labels and c["preLaunchTask"] not in labels:
                rep.problem(str(vs / "launch.json"), f"{c.get('name')!r}: preLaunchTask {c['preLaunchTask']!r} names no task")


# --------------------------------------------------------------------------------------------
# .funcignore


class CoreToolsIgnore:
    """Python port of Core Tools' GitIgnoreParser (src/Azure.Functions.Cli/Common/GitIgnoreParser.cs).

    Core Tools matches each file's path relative to the app root, with forward slashes, against
    the patterns as prefixes anchored at the start (not git's any-depth matching): ``*`` is one
    path segment, ``**`` any run of characters, a leading ``/`` is dropped, ``!`` re-includes.
    """

    def __init__(self, content: str) -> None:
        pos: list[str] = []
        neg: list[str] = []
        for raw in content.split("\n"):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negative = line.startswith("!")
            if negative:
                line = line[1:]
            if line.startswith("/"):
                line = line[1:]
            (neg if negative else pos).append(line)
        self._pos = self._compile(pos)
        self._neg = self._compile(neg)

    @staticmethod
    def _prepare(pattern: str) -> str:
        escaped = re.sub(r"[\-\[\]/{}()+?.\\^$|]", lambda m: "\\" + m.group(0), pattern)
        return escaped.replace("**", "(.+)").replace("*", "([^\\/]+)")

    def _compile(self, patterns: list[str]) -> re.Pattern[str]:
        if not patterns:
            return re.compile(r"$^")
        return re.compile("^((" + ")|(".join(self._prepare(p) for p in sorted(patterns)) + "))")

    def accepts(self, path: str) -> bool:
        return bool(self._neg.match(path)) or not self._pos.match(path)


# Files Core Tools never uploads whatever .funcignore says (PublishFunctionAppAction.GetFiles).
CORE_TOOLS_ALWAYS_SKIPPED_DIRS = {".git", ".vscode"}
CORE_TOOLS_ALWAYS_SKIPPED_FILES = {".funcignore", ".gitignore", "appsettings.json", "local.settings.json", "project.lock.json"}

PRUNED_TOP_DIRS = {"target", "node_modules", ".venv", "venv", "dist"}

# Paths that must never be uploaded, whatever exists in a given checkout.
MUST_DENY = [
    "target/release/handler",
    "target/x86_64-unknown-linux-gnu/release/handler",
    "src/main.rs",
    "tests/it/api.rs",
    "devkit/Cargo.toml",
    "devkit/src/lib.rs",
    "infra/main.bicep",
    "docs/deploy.md",
    "scripts/package.sh",
    ".venv/bin/python",
    "node_modules/x/index.js",
    "local.settings.json",
    "local.settings.json.example",
    "audit.jsonl",
    "spool/abuse-0001.jsonl",
    "data/audit/abuse.jsonl",
    "dist/fwdproxy.zip",
    "dist/package/handler",
    "Cargo.toml",
    "Cargo.lock",
    "README.md",
    ".env",
    ".ci/run",
]


def check_funcignore(root: Path, rep: Report) -> None:
    path = root / ".funcignore"
    where = str(path)
    if not path.exists():
        rep.problem(where, "missing")
        return
    content = path.read_text(encoding="utf-8")
    core = CoreToolsIgnore(content)

    # Every file in this checkout (big generated trees are pruned: MUST_DENY samples them).
    present = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in PRUNED_TOP_DIRS]
        dirnames[:] = [d for d in dirnames if d not in CORE_TOOLS_ALWAYS_SKIPPED_DIRS]
        for name in filenames:
            if name not in CORE_TOOLS_ALWAYS_SKIPPED_FILES:
                present.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    candidates = sorted(set(present) | set(MUST_DENY) | set(PACKAGE_FILES))

    for rel in candidates:
        want = rel in PACKAGE_FILES
        if core.accepts(rel) != want:
            verb = "excludes" if want else "would upload"
            rep.problem(where, f"Core Tools' matcher {verb} {rel!r} when publishing from the repository root")

    git = shutil.which("git")
    if git is None:
        rep.note(where, "git not found: git-semantics check skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([git, "init", "-q", tmp], check=True)
        Path(tmp, ".gitignore").write_text(content, encoding="utf-8")
        for rel in candidates:  # real files, so directory-only patterns see real directories
            f = Path(tmp, rel)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
        proc = subprocess.run(
            [git, "-C", tmp, "check-ignore", "--no-index", "--stdin", "-z", "--non-matching", "-v"],
            input="\0".join(candidates) + "\0",
            capture_output=True,
            text=True,
        )
        if proc.returncode not in (0, 1):
            rep.note(where, f"git check-ignore failed ({proc.stderr.strip()}): git-semantics check skipped")
            return
        fields = proc.stdout.split("\0")
        # -v -z --non-matching: source, linenum, pattern, path per record; empty pattern = not ignored
        for i in range(0, len(fields) - 3, 4):
            _src, _line, pattern, rel = fields[i : i + 4]
            ignored = bool(pattern) and not pattern.startswith("!")
            want = rel in PACKAGE_FILES
            if ignored == want:
                verb = "excludes" if want else "would upload"
                rep.problem(where, f"with git's ignore semantics (used by other deploy tools) it {verb} {rel!r}")


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    ap.add_argument("--package", help="also validate host.json and FwdProxy/function.json in this package dir")
    ap.add_argument(
        "--function-files-only",
        action="store_true",
        help="only host.json and FwdProxy/function.json (what the package step copies)",
    )
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    rep = Report()

    check_host_json(root / "host.json", rep)
    check_function_json(root / FUNCTION_NAME / "function.json", rep)
    if not args.function_files_only:
        check_function_folders(root, rep)
        check_local_settings(root / "local.settings.json.example", rep)
        if (root / "local.settings.json").exists():
            check_local_settings(root / "local.settings.json", rep)
        check_vscode(root, rep)
        check_funcignore(root, rep)
    if args.package:
        pkg = Path(args.package).resolve()
        check_host_json(pkg / "host.json", rep)
        check_function_json(pkg / FUNCTION_NAME / "function.json", rep)

    for n in rep.notes:
        print(f"note: {n}")
    if rep.problems:
        print(f"FAIL: {len(rep.problems)} problem(s) in the Functions files:")
        for p in rep.problems:
            print(f"  - {p}")
        return 1
    scope = "host.json, function.json" if args.function_files_only else (
        "host.json, function.json, local.settings.json.example, .vscode/*.json, .funcignore"
    )
    print(f"PASS: {scope} match what the Functions host and its tools read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
