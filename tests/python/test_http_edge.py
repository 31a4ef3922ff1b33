"""The clients the 413 drain is for: Python's http.client and the OpenAI SDK send a whole
over-limit body before they read anything. They must read the handler's 413 (and the SDK must not
retry it), not a connection reset that the SDK would retry.

Starts the real `handler` with MAX_BODY_BYTES=4096 against a mock AOAI that counts what reaches it.
Without the drain, http.client fails with BrokenPipeError (checked by disabling it). The SDK's
transport (httpx2 under openai 3.52) also recovers an early answer after a failed write, so its
test guards against a regression to a reset without a response rather than telling the two apart.
"""

import http.client
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from openai import AzureOpenAI

ROOT = Path(__file__).resolve().parents[2]
HANDLER = Path(os.environ.get("FWDPROXY_HANDLER", ROOT / "target" / "debug" / "handler"))
IN_KEY = "edge-internal-key-0123456789"
LIMIT = 4096
BIG = 8 * 1024 * 1024  # far beyond loopback socket buffers: a reset would surface


class CountingAoai(BaseHTTPRequestHandler):
    calls = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        CountingAoai.calls += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[]}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def handler_port():
    if not HANDLER.exists():
        pytest.fail(f"{HANDLER} is missing: run `cargo build --bin handler` first (scripts/test.sh does)")
    mock = ThreadingHTTPServer(("127.0.0.1", 0), CountingAoai)
    threading.Thread(target=mock.serve_forever, daemon=True).start()
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AOAI_HOSTNAME": f"http://127.0.0.1:{mock.server_address[1]}",
        "AOAI_INAPIKEY": IN_KEY,
        "AOAI_OUTAPIKEY": "edge-real-key-0123456789",
        "FUNCTIONS_CUSTOMHANDLER_PORT": str(port),
        "MAX_BODY_BYTES": str(LIMIT),
    }
    proc = subprocess.Popen([str(HANDLER)], env=env, cwd="/", stdout=subprocess.DEVNULL)
    health = f"http://127.0.0.1:{port}/api/FwdProxy/openai/deployments/health/check"
    deadline = time.time() + 10
    while True:
        try:
            with urllib.request.urlopen(health, timeout=1) as r:
                assert r.status == 200
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("handler did not become healthy")
            time.sleep(0.02)
    yield port
    proc.terminate()
    proc.wait(timeout=10)
    mock.shutdown()


def test_http_client_reads_the_413_after_sending_the_whole_body(handler_port):
    CountingAoai.calls = 0
    conn = http.client.HTTPConnection("127.0.0.1", handler_port, timeout=30)
    body = json.dumps({"messages": [{"role": "user", "content": "x" * BIG}]}).encode()
    # request() writes the headers and the whole body before getresponse() reads anything.
    conn.request(
        "POST",
        "/api/FwdProxy/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        body=body,
        headers={"api-key": IN_KEY, "content-type": "application/json"},
    )
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    assert resp.status == 413
    assert doc["error"]["code"] == "request_too_large"
    assert CountingAoai.calls == 0


def test_openai_sdk_gets_413_once_and_does_not_retry(handler_port):
    CountingAoai.calls = 0
    sent = []
    # The SDK's own HTTP client class, with a hook that counts every attempt it sends.
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: sent.append(request.url)]})
    client = AzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{handler_port}/api/FwdProxy",
        api_key=IN_KEY,
        api_version="2024-10-21",
        max_retries=2,  # the SDK default: a reset would be retried, a 413 is not
        http_client=http_client,
    )
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x" * BIG}], user="alice"
        )
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"
    assert len(sent) == 1, f"the SDK sent {len(sent)} times: {sent}"
    assert CountingAoai.calls == 0
