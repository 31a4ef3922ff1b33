"""The official OpenAI Python SDK (AzureOpenAI client) works unchanged against the handler.

Starts a mock AOAI (standard library HTTP server on loopback) and the real `handler` binary,
then points `AzureOpenAI(azure_endpoint=.../api/FwdProxy)` at the handler with the internal key.
Asserts what the SDK got and what the mock AOAI saw (the real key, never the internal one).
"""

import json
import os
import queue
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from openai import AzureOpenAI

ROOT = Path(__file__).resolve().parents[2]
HANDLER = Path(os.environ.get("FWDPROXY_HANDLER", ROOT / "target" / "debug" / "handler"))
IN_KEY = "sdk-internal-key-0123456789"
OUT_KEY = "sdk-real-aoai-key-9876543210"
API_VERSION = "2024-10-21"


class MockAoai(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        req = json.loads(body)
        MockAoai.seen.append({"path": self.path, "headers": dict(self.headers), "body": req})
        if req.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            events = [
                {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                 "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]},
            ]
            for i, word in enumerate(["Hello", " from", " the", " mock"]):
                events.append({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
                               "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": None,
                               "delta": {"role": "assistant", "content": word} if i == 0 else {"content": word}}]})
            events.append({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                           "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]})
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        answer = json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello from the mock"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.send_header("apim-request-id", "apim-sdk-1")
        self.end_headers()
        self.wfile.write(answer)


def ready_port(proc, deadline):
    """The port the handler (started on port 0) names in its `ready` log line on stdout."""
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    while time.time() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("message") == "ready":
            return int(event["addr"].rsplit(":", 1)[1])
    proc.kill()
    pytest.fail("handler did not log its ready line")


@pytest.fixture(scope="module")
def endpoint():
    if not HANDLER.exists():
        pytest.fail(f"{HANDLER} is missing: scripts/test.sh builds it (cargo test, then the package)")
    mock = ThreadingHTTPServer(("127.0.0.1", 0), MockAoai)
    threading.Thread(target=mock.serve_forever, daemon=True).start()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AOAI_HOSTNAME": f"http://127.0.0.1:{mock.server_address[1]}",
        "AOAI_INAPIKEY": IN_KEY,
        "AOAI_OUTAPIKEY": OUT_KEY,
        # any free port, read back from the ready line (no probe socket to race for it)
        "FUNCTIONS_CUSTOMHANDLER_PORT": "0",
    }
    proc = subprocess.Popen([str(HANDLER)], env=env, cwd="/", stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    port = ready_port(proc, deadline)
    health = f"http://127.0.0.1:{port}/api/FwdProxy/openai/deployments/health/check"
    with urllib.request.urlopen(health, timeout=5) as r:
        assert r.status == 200
    yield f"http://127.0.0.1:{port}/api/FwdProxy"
    proc.terminate()
    proc.wait(timeout=10)
    mock.shutdown()


def client(endpoint):
    return AzureOpenAI(azure_endpoint=endpoint, api_key=IN_KEY, api_version=API_VERSION, max_retries=0)


def test_chat_completion(endpoint):
    MockAoai.seen.clear()
    result = client(endpoint).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], user="alice")
    assert result.choices[0].message.content == "Hello from the mock"
    assert result.usage.total_tokens == 9
    (seen,) = MockAoai.seen
    assert seen["path"] == f"/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}"
    assert seen["headers"]["api-key"] == OUT_KEY
    assert "authorization" not in {k.lower() for k in seen["headers"]}
    assert seen["body"]["messages"][0]["content"] == "Say hello"


def test_streaming_chat_completion(endpoint):
    MockAoai.seen.clear()
    stream = client(endpoint).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from the mock"
    assert MockAoai.seen[0]["body"]["stream"] is True


def test_wrong_key_is_an_sdk_authentication_error(endpoint):
    import openai

    bad = AzureOpenAI(azure_endpoint=endpoint, api_key="not-the-internal-key-123", api_version=API_VERSION,
                      max_retries=0)
    MockAoai.seen.clear()
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401
    assert MockAoai.seen == []
