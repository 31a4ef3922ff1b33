#!/usr/bin/env python3
"""Tests of infra/smoke.py against a fake gateway it cannot tell from a real set (standard
library only): a healthy fake must pass every item, and each way a set can be broken must fail
the item that names it (a buffered stream, a missing record, a filter that lets prompts through,
a registry that admits strangers). Prints "smoke self-test: N passed, M failed"; exits 1 on any
failure. The fake listens on loopback only.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMOKE = HERE.parent / "smoke.py"
KEY = "smoke-self-test-key-0123456789"


def make_handler(mode: set[str], audit: Path):
    class Fake(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def send_json(self, status: int, doc: dict, extra: dict | None = None):
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/openai/deployments/health/check":
                self.send_json(200, {"status": "ok", "service": "fake", "version": "0"})
            else:
                self.send_json(404, {"error": {"code": "404", "message": "nope"}})

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            req = json.loads(self.rfile.read(length) or b"{}")
            if self.headers.get("api-key") != KEY:
                return self.send_json(401, {"error": {"code": "401", "message": "key"}})
            text = json.dumps(req.get("messages"))
            user = req.get("user", "")
            if "kill them all" in text and "filter_off" not in mode:
                return self.send_json(400, {"error": {"code": "content_filter", "message": "filtered"}})
            if user.startswith("smoke-unregistered") and "registry_open" not in mode:
                if "no_record" not in mode:
                    with audit.open("a") as f:
                        f.write(json.dumps({"request_id": self.headers.get("x-request-id"),
                                            "user": user, "reason": "unregistered_user"}) + "\n")
                return self.send_json(403, {"error": {"code": "unregistered_user", "message": "who"}})
            if req.get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                events = [f'data: {{"choices":[{{"delta":{{"content":"w{i} "}}}}]}}\n\n' for i in range(5)]
                events.append("data: [DONE]\n\n")
                if "buffered" in mode:
                    events = ["".join(events)]
                for e in events:
                    data = e.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.03)  # the fake's pacing between tokens, as a model's
                self.wfile.write(b"0\r\n\r\n")
                return None
            return self.send_json(200, {"choices": [{"message": {"role": "assistant", "content": "hello there"}}]})

    return Fake


def run_smoke(mode: set[str]) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        audit = Path(tmp) / "audit.jsonl"
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(mode, audit))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            out = subprocess.run(
                [sys.executable, str(SMOKE), "--gateway", f"http://127.0.0.1:{server.server_port}",
                 "--records", "file", "--audit-file", str(Path(tmp) / "*.jsonl"),
                 "--record-timeout", "1", "--timeout", "10"],
                env=dict(os.environ, SMOKE_API_KEY=KEY), capture_output=True, text=True, timeout=60,
            )
        finally:
            server.shutdown()
            server.server_close()
    return out.returncode, out.stdout + out.stderr


def status_of(output: str, item: str) -> str | None:
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == item and parts[0] in ("PASS", "FAIL", "SKIP"):
            return parts[0]
    return None


CASES = [
    # mode, expected exit code, item that must FAIL (None: every item passes)
    (set(), 0, None),
    ({"buffered"}, 1, "stream"),
    ({"no_record"}, 1, "record"),
    ({"filter_off"}, 1, "filtered"),
    ({"registry_open"}, 1, "unregistered"),
]


def main() -> int:
    passed = failed = 0
    for mode, want_rc, failing in CASES:
        rc, out = run_smoke(mode)
        name = ",".join(sorted(mode)) or "healthy"
        items = ["health", "chat", "stream", "filtered", "unregistered", "record"]
        ok = rc == want_rc
        for item in items:
            want = "FAIL" if item == failing else None
            got = status_of(out, item)
            if want == "FAIL" and got != "FAIL":
                ok = False
            if failing is None and got != "PASS":
                ok = False
        if ok:
            passed += 1
            print(f"PASS {name}")
        else:
            failed += 1
            print(f"FAIL {name}: rc={rc} (want {want_rc})\n{out}")
    print(f"smoke self-test: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
