#!/usr/bin/env python3
"""Post-deployment smoke check of a deployed aoai-fwdproxy set (standard library only).

Run it through infra/smoke.sh. It proves the set end to end through the gateway and prints one
PASS/FAIL/SKIP line per item and a closing "smoke: N passed, M failed" line:

  1. health      GET /openai/deployments/health/check answers 200 without a key
  2. chat        a chat completion answers 200 with a non-empty message
  3. stream      a streamed chat answer arrives in pieces: its first event is read before its
                 last event has arrived (a buffering gateway delivers them together), ending in
                 `data: [DONE]`
  4. filtered    a prompt Content Safety flags is refused 400 `content_filter`
  5. unregistered a user the registry does not know is refused 403 `unregistered_user`
  6. record      the abuse record of that refusal is durable where the set keeps it, found by
                 the request id this script sent:
                   --records cosmos   Cosmos DB query over REST with the operator's Entra token
                                      (`az account get-access-token`, or $COSMOS_TOKEN)
                   --records file     JSON Lines files (glob), e.g. the local set's AUDIT_LOG_PATH
                   --records command  any command: it gets SMOKE_REQUEST_ID and SMOKE_USER in its
                                      environment and exits 0 once it found the record
                   --records none     skipped (say why in your runbook)

Exit status 0 only when nothing failed. Nothing here prints the key or a token.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import glob
import json
import os
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import http.client

RESULTS: list[tuple[str, str, str]] = []


def report(item: str, status: str, detail: str) -> None:
    RESULTS.append((item, status, detail))
    print(f"{status:<4}  {item:<13} {detail}", flush=True)


class Gateway:
    def __init__(self, base: str, key: str, api_version: str, timeout: float, insecure: bool):
        self.url = urllib.parse.urlsplit(base.rstrip("/"))
        if self.url.scheme not in ("http", "https"):
            raise SystemExit("--gateway must be an http(s) URL")
        self.key = key
        self.api_version = api_version
        self.timeout = timeout
        self.ssl = ssl.create_default_context()
        if insecure:
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE

    def connect(self) -> http.client.HTTPConnection:
        host = self.url.hostname or ""
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(host, self.url.port, timeout=self.timeout, context=self.ssl)
        return http.client.HTTPConnection(host, self.url.port, timeout=self.timeout)

    def path(self, p: str) -> str:
        return (self.url.path or "") + p

    def request(self, method: str, path: str, body: dict | None = None, key: bool = True,
                headers: dict | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self.connect()
        h = {"accept": "application/json"}
        if key:
            h["api-key"] = self.key
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["content-type"] = "application/json"
        h.update(headers or {})
        conn.request(method, self.path(path), body=data, headers=h)
        return conn, conn.getresponse()

    def json_call(self, method: str, path: str, body: dict | None = None, key: bool = True,
                  headers: dict | None = None) -> tuple[int, dict | None, str]:
        conn, resp = self.request(method, path, body, key, headers)
        try:
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        return resp.status, doc, raw[:300].decode("utf-8", "replace")


def chat_path(deployment: str, api_version: str) -> str:
    return f"/openai/deployments/{deployment}/chat/completions?api-version={api_version}"


def error_code(doc: dict | None) -> str | None:
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return doc["error"].get("code")
    return None


def check_health(gw: Gateway) -> None:
    status, doc, raw = gw.json_call("GET", "/openai/deployments/health/check", key=False)
    if status == 200 and isinstance(doc, dict) and doc.get("status") == "ok":
        report("health", "PASS", f"200 {doc.get('service', '')} {doc.get('version', '')}".strip())
    else:
        report("health", "FAIL", f"expected 200 {{\"status\":\"ok\"}}, got {status} {raw!r}")


def check_chat(gw: Gateway, args) -> None:
    body = {"messages": [{"role": "user", "content": "Say hello in five words."}],
            "max_tokens": 32, "user": args.user}
    status, doc, raw = gw.json_call("POST", chat_path(args.deployment, gw.api_version), body)
    try:
        content = doc["choices"][0]["message"]["content"]
    except (TypeError, KeyError, IndexError):
        content = None
    if status == 200 and content:
        report("chat", "PASS", f"200, {len(content)} characters")
    else:
        report("chat", "FAIL", f"expected 200 with a message, got {status} {raw!r}")


def check_stream(gw: Gateway, args) -> None:
    body = {"messages": [{"role": "user", "content": "Count from one to twenty in words."}],
            "max_tokens": 64, "stream": True, "user": args.user}
    conn, resp = gw.request("POST", chat_path(args.deployment, gw.api_version), body,
                            headers={"accept": "text/event-stream"})
    try:
        if resp.status != 200:
            report("stream", "FAIL", f"expected 200, got {resp.status} {resp.read()[:300]!r}")
            return
        ctype = resp.getheader("content-type", "")
        # Read as the bytes come: which read delivered the first and the last event.
        buf = b""
        reads = 0
        events = 0
        first_read = last_read = None
        done = False
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            chunk = resp.read1(65536)
            if not chunk:
                break
            reads += 1
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
                if not data:
                    continue
                if data[0] == b"[DONE]":
                    done = True
                    last_read = last_read if last_read is not None else reads
                    continue
                events += 1
                if first_read is None:
                    first_read = reads
                last_read = reads
        if "text/event-stream" not in ctype:
            report("stream", "FAIL", f"content-type {ctype!r}, not text/event-stream")
        elif not done or events < 2:
            report("stream", "FAIL", f"{events} events, [DONE] {'seen' if done else 'missing'}")
        elif first_read == last_read:
            report("stream", "FAIL", f"all {events} events arrived in one read: something buffers the stream")
        else:
            report("stream", "PASS", f"{events} events over {reads} reads, first in read {first_read}, last in read {last_read}")
    finally:
        conn.close()


def check_filtered(gw: Gateway, args) -> None:
    body = {"messages": [{"role": "user", "content": args.flagged_prompt}], "user": args.user}
    status, doc, raw = gw.json_call("POST", chat_path(args.deployment, gw.api_version), body)
    code = error_code(doc)
    if status == 400 and code == "content_filter":
        report("filtered", "PASS", "400 content_filter")
    else:
        report("filtered", "FAIL", f"expected 400 content_filter, got {status} {code or raw!r}")


def check_unregistered(gw: Gateway, args, request_id: str, user: str) -> bool:
    body = {"messages": [{"role": "user", "content": "hello"}], "user": user}
    status, doc, raw = gw.json_call("POST", chat_path(args.deployment, gw.api_version), body,
                                    headers={"x-request-id": request_id})
    code = error_code(doc)
    if status == 403 and code == "unregistered_user":
        report("unregistered", "PASS", f"403 unregistered_user (request {request_id})")
        return True
    report("unregistered", "FAIL", f"expected 403 unregistered_user, got {status} {code or raw!r}")
    return False


# --- where the abuse record lives -------------------------------------------------------------

def record_matches(doc: dict, request_id: str, user: str) -> bool:
    return doc.get("request_id") == request_id or (doc.get("user") == user and bool(user))


def find_in_files(pattern: str, request_id: str, user: str) -> str | None:
    for path in sorted(glob.glob(pattern, recursive=True)):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and record_matches(doc, request_id, user):
                        return f"{path}: reason {doc.get('reason')!r}"
        except OSError:
            continue
    return None


def cosmos_token(args) -> str:
    if os.environ.get("COSMOS_TOKEN"):
        return os.environ["COSMOS_TOKEN"]
    resource = args.cosmos_endpoint.split(":443")[0].rstrip("/")
    cmd = ["az", "account", "get-access-token", "--resource", resource, "--query", "accessToken", "-o", "tsv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"no Entra token for {resource} (az: {out.stderr.strip()[:200]})")
    return out.stdout.strip()


def find_in_cosmos(args, request_id: str, user: str, token: str) -> str | None:
    endpoint = args.cosmos_endpoint.rstrip("/")
    url = f"{endpoint}/dbs/{args.cosmos_database}/colls/{args.cosmos_container}/docs"
    query = {"query": "SELECT * FROM c WHERE c.request_id = @rid",
             "parameters": [{"name": "@rid", "value": request_id}]}
    headers = {
        # Entra (AAD) token auth for the Cosmos DB data plane.
        "authorization": urllib.parse.quote(f"type=aad&ver=1.0&sig={token}", safe=""),
        "x-ms-date": email.utils.format_datetime(dt.datetime.now(dt.timezone.utc), usegmt=True),
        "x-ms-version": "2018-12-31",
        "content-type": "application/query+json",
        "x-ms-documentdb-isquery": "True",
        # The container is partitioned by /user: name it, the record's own partition.
        "x-ms-documentdb-partitionkey": json.dumps([user]),
    }
    req = urllib.request.Request(url, data=json.dumps(query).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            docs = json.loads(resp.read()).get("Documents", [])
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"Cosmos DB answered {e.code}: {e.read()[:200]!r}") from None
    for doc in docs:
        if record_matches(doc, request_id, user):
            return f"{args.cosmos_container}/{doc.get('id')}: reason {doc.get('reason')!r}"
    return None


def find_by_command(cmd: str, request_id: str, user: str) -> str | None:
    env = dict(os.environ, SMOKE_REQUEST_ID=request_id, SMOKE_USER=user)
    out = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=120)
    return (out.stdout.strip().splitlines() or ["found"])[-1][:200] if out.returncode == 0 else None


def check_record(args, request_id: str, user: str) -> None:
    if args.records == "none":
        report("record", "SKIP", "--records none")
        return
    token = None
    deadline = time.monotonic() + args.record_timeout
    attempts = 0
    last_error = ""
    # The handler answers a refusal once its record is durable, so a first look usually finds
    # it; Cosmos DB queries and file systems may lag a little: look again, bounded in time.
    while True:
        attempts += 1
        try:
            if args.records == "file":
                found = find_in_files(args.audit_file, request_id, user)
            elif args.records == "cosmos":
                token = token or cosmos_token(args)
                found = find_in_cosmos(args, request_id, user, token)
            else:
                found = find_by_command(args.records_cmd, request_id, user)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            found, last_error = None, str(e)
        if found:
            report("record", "PASS", f"{args.records}: {found}")
            return
        if time.monotonic() >= deadline or attempts >= 1000:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    why = f"; last error: {last_error}" if last_error else ""
    report("record", "FAIL", f"no abuse record for request {request_id} in {args.records} after {attempts} looks{why}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="infra/smoke.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", required=True, help="https://<appGatewayFqdn or your host name>")
    p.add_argument("--key", default=os.environ.get("SMOKE_API_KEY"), help="internal key (or $SMOKE_API_KEY)")
    p.add_argument("--deployment", default="gpt-4o", help="a chat deployment behind the gateway")
    p.add_argument("--api-version", default="2024-10-21")
    p.add_argument("--user", default="smoke-test", help="a registered user (or any, with USER_CHECK=present)")
    p.add_argument("--unregistered-user", default="", help="a user the registry does not know (default: a fresh random name)")
    p.add_argument("--flagged-prompt", default="I will kill them all, every one of them.",
                   help="a prompt Content Safety blocks at the configured thresholds")
    p.add_argument("--skip", default="", help="comma-separated items not to run (e.g. unregistered,record with USER_CHECK=present)")
    p.add_argument("--records", choices=["cosmos", "file", "command", "none"], default="cosmos")
    p.add_argument("--cosmos-endpoint", default="", help="https://<account>.documents.azure.com:443/")
    p.add_argument("--cosmos-database", default="fwdproxy")
    p.add_argument("--cosmos-container", default="abuse")
    p.add_argument("--audit-file", default="", help="glob of JSON Lines files (--records file)")
    p.add_argument("--records-cmd", default="", help="command for --records command")
    p.add_argument("--record-timeout", type=float, default=30.0, help="seconds to keep looking for the record")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--insecure", action="store_true", help="do not verify TLS (a test certificate)")
    args = p.parse_args(argv)
    if not args.key:
        p.error("--key (or SMOKE_API_KEY) is required")
    if args.records == "cosmos" and not args.cosmos_endpoint:
        p.error("--records cosmos needs --cosmos-endpoint")
    if args.records == "file" and not args.audit_file:
        p.error("--records file needs --audit-file")
    if args.records == "command" and not args.records_cmd:
        p.error("--records command needs --records-cmd")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    gw = Gateway(args.gateway, args.key, args.api_version, args.timeout, args.insecure)
    request_id = f"smoke-{uuid.uuid4()}"
    stranger = args.unregistered_user or f"smoke-unregistered-{uuid.uuid4().hex[:12]}"
    print(f"smoke check of {args.gateway} (deployment {args.deployment}, records: {args.records})")
    checks = [
        ("health", lambda: check_health(gw)),
        ("chat", lambda: check_chat(gw, args)),
        ("stream", lambda: check_stream(gw, args)),
        ("filtered", lambda: check_filtered(gw, args)),
    ]
    for name, run in checks:
        if name in skip:
            report(name, "SKIP", "--skip")
            continue
        try:
            run()
        except (OSError, http.client.HTTPException) as e:
            report(name, "FAIL", f"{type(e).__name__}: {e}")
    refused = False
    if "unregistered" in skip:
        report("unregistered", "SKIP", "--skip")
    else:
        try:
            refused = check_unregistered(gw, args, request_id, stranger)
        except (OSError, http.client.HTTPException) as e:
            report("unregistered", "FAIL", f"{type(e).__name__}: {e}")
    if "record" in skip or "unregistered" in skip:
        report("record", "SKIP", "--skip" if "record" in skip else "no refusal to look up (unregistered skipped)")
    elif not refused:
        report("record", "FAIL", "no refusal to look up (the unregistered check failed)")
    else:
        check_record(args, request_id, stranger)

    passed = sum(1 for _, s, _ in RESULTS if s == "PASS")
    failed = sum(1 for _, s, _ in RESULTS if s == "FAIL")
    skipped = sum(1 for _, s, _ in RESULTS if s == "SKIP")
    print(f"smoke: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
