//! The handler's HTTP edge, from outside: what a client that misbehaves (or is merely impatient
//! or eager) gets back, and what the upstream sees. Raw TCP clients where a well-behaved HTTP
//! client library would not send what we need: a whole over-limit body before reading, broken
//! chunk framing, oversized headers, silence.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aoai_fwdproxy::app::{self, ServerLimits};
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHAT_PATH: &str =
    "/api/FwdProxy/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const CHAT: &str = r#"{"messages":[{"role":"user","content":"hello"}],"user":"alice"}"#;
/// Every raw exchange must be over within this (a bound, not a latency expectation).
const BOUND: Duration = Duration::from_secs(20);

/// The app on a loopback port, served with the limits its settings give (the header read
/// timeout included, which the shared `TestApp` leaves at its default).
struct EdgeApp {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(upstream: &str, extra: &[(&str, &str)]) -> EdgeApp {
    let state = app::AppState::new(test_settings(upstream, extra))
        .await
        .unwrap();
    let limits = ServerLimits::from_settings(&state.settings);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app::serve_with(
        listener,
        app::router(state),
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(1),
        limits,
    ));
    EdgeApp { addr, _stop: tx }
}

/// A response read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Assert an AOAI-shaped error document and return its code.
    fn aoai_code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let doc: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body))
        });
        assert!(
            !doc["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{doc}"
        );
        doc["error"]["code"]
            .as_str()
            .expect("error.code")
            .to_string()
    }
}

/// Read one response (head, then a Content-Length body, or up to EOF) within [`BOUND`].
async fn read_response(stream: &mut TcpStream) -> Raw {
    tokio::time::timeout(BOUND, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream
                .read(&mut chunk)
                .await
                .expect("read the response head");
            assert!(
                n > 0,
                "connection closed before a response head; got {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse::<usize>().unwrap());
        let mut body = buf[head_end..].to_vec();
        loop {
            if length.is_some_and(|l| body.len() >= l) {
                break;
            }
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        if let Some(l) = length {
            assert_eq!(body.len(), l, "body cut short");
        }
        Raw {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("a response within the bound")
}

/// Send `head` and then all of `body` before reading anything, as Python's `http.client` and
/// the OpenAI SDK's transport do; then read the response.
async fn send_whole_then_read(addr: SocketAddr, head: &str, body: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(BOUND, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await
    })
    .await
    .expect("the whole body went out within the bound")
    .expect("the server read the whole body instead of resetting the connection");
    read_response(&mut stream).await
}

fn post_head(path: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\napi-key: {IN_KEY}\r\n\
         content-type: application/json\r\n{extra}\r\n"
    )
}

/// Whether the server closes the connection within `within` (EOF or reset), reading and
/// ignoring anything it sends first.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

// ------------------------------------------------------------------------------------------
// 413: a client that sends its whole over-limit body before reading still reads the 413
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn declared_oversized_body_sent_whole_is_answered_413_not_reset() {
    let aoai = MockAoai::start().await;
    let gated = [("MAX_BODY_BYTES", "1024"), ("USER_CHECK", "present")];
    let streamed = [("MAX_BODY_BYTES", "1024")];
    // 8 MiB is far more than loopback socket buffers hold: without the drain the client's
    // write blocks, the server closes on unread data and the kernel resets the connection.
    for (name, settings, path, size) in [
        ("gated chat, 8 MiB", &gated[..], CHAT_PATH, 8 << 20),
        ("gated chat, one byte over", &gated[..], CHAT_PATH, 1025),
        ("streamed chat, 8 MiB", &streamed[..], CHAT_PATH, 8 << 20),
        (
            "streamed embeddings, 8 MiB",
            &streamed[..],
            "/api/FwdProxy/openai/deployments/emb/embeddings?api-version=2024-10-21",
            8 << 20,
        ),
    ] {
        let app = start(&aoai.base(), settings).await;
        let body = vec![b'x'; size];
        let head = post_head(path, &format!("content-length: {size}\r\n"));
        let raw = send_whole_then_read(app.addr, &head, &body).await;
        assert_eq!(raw.status, 413, "{name}: {raw:?}");
        assert_eq!(raw.aoai_code(), "request_too_large", "{name}");
        assert_eq!(raw.header("connection"), Some("close"), "{name}");
    }
    assert!(
        aoai.seen().is_empty(),
        "nothing over the limit is forwarded"
    );
}

#[tokio::test]
async fn chunked_body_over_the_limit_sent_whole_is_answered_413_not_reset() {
    // No Content-Length: the size shows only while reading, on either path.
    let aoai = MockAoai::start().await;
    let gated = [("MAX_BODY_BYTES", "1024"), ("USER_CHECK", "present")];
    let streamed = [("MAX_BODY_BYTES", "1024")];
    for (name, settings) in [("gated", &gated[..]), ("streamed", &streamed[..])] {
        let app = start(&aoai.base(), settings).await;
        let piece = vec![b'x'; 64 * 1024];
        let mut body = Vec::new();
        for _ in 0..128 {
            body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            body.extend_from_slice(&piece);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let head = post_head(CHAT_PATH, "transfer-encoding: chunked\r\n");
        let raw = send_whole_then_read(app.addr, &head, &body).await;
        assert_eq!(raw.status, 413, "{name}: {raw:?}");
        assert_eq!(raw.aoai_code(), "request_too_large", "{name}");
    }
    // The streamed path may have sent AOAI the start of the body before the limit was reached;
    // whatever AOAI saw, it was never more than the limit.
    for seen in aoai.seen() {
        assert!(
            seen.body.len() <= 1024,
            "{} bytes reached AOAI",
            seen.body.len()
        );
    }
}

#[tokio::test]
async fn oversized_body_of_an_unauthenticated_client_is_refused_without_a_reset_too() {
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), &[("MAX_BODY_BYTES", "1024")]).await;
    let size = 4 << 20;
    let head = format!(
        "POST {CHAT_PATH} HTTP/1.1\r\nhost: localhost\r\napi-key: wrong-key-0000000000000\r\n\
         content-length: {size}\r\n\r\n"
    );
    let raw = send_whole_then_read(app.addr, &head, &vec![b'x'; size]).await;
    // The stages keep their order: the key is checked before the body's size.
    assert_eq!(raw.status, 401, "{raw:?}");
    assert_eq!(raw.aoai_code(), "401");
    assert!(aoai.seen().is_empty());
}

#[tokio::test]
async fn oversized_body_with_expect_continue_is_refused_before_it_is_sent() {
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), &[("MAX_BODY_BYTES", "1024")]).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = post_head(
        CHAT_PATH,
        "content-length: 100000000\r\nexpect: 100-continue\r\n",
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // No body is sent: the client waits for 100 Continue, which must not come.
    let raw = read_response(&mut stream).await;
    assert_eq!(raw.status, 413, "{raw:?}");
    assert_eq!(raw.aoai_code(), "request_too_large");
    assert!(aoai.seen().is_empty());
}

#[tokio::test]
async fn a_body_within_the_limit_still_flows_and_the_connection_is_reused() {
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), &[("MAX_BODY_BYTES", "1024")]).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    for _ in 0..2 {
        let head = post_head(CHAT_PATH, &format!("content-length: {}\r\n", CHAT.len()));
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(CHAT.as_bytes()).await.unwrap();
        let raw = read_response(&mut stream).await;
        assert_eq!(raw.status, 200, "{raw:?}");
        assert_ne!(raw.header("connection"), Some("close"));
    }
    assert_eq!(aoai.seen().len(), 2);
    assert_eq!(aoai.seen()[1].body, CHAT.as_bytes());
}

// ------------------------------------------------------------------------------------------
// 400: a malformed chunked body is the client's fault, on both paths
// ------------------------------------------------------------------------------------------

/// Chunked bodies hyper refuses, each cut off at a different framing rule.
const BAD_CHUNKS: &[(&str, &str)] = &[
    ("size is not hex", "5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"),
    ("no CRLF after the data", "5\r\nhelloXX\r\n0\r\n\r\n"),
    (
        "size overflows",
        "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "size line never ends",
        "5\r\nhello\r\n5 garbage\u{1}\r\nworld\r\n0\r\n\r\n",
    ),
];

async fn malformed_chunked_is_400(settings: &[(&str, &str)], upstream_may_see_it: bool) {
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), settings).await;
    for (name, chunks) in BAD_CHUNKS {
        let head = post_head(CHAT_PATH, "transfer-encoding: chunked\r\n");
        let raw = send_whole_then_read(app.addr, &head, chunks.as_bytes()).await;
        assert_eq!(raw.status, 400, "{name}: {raw:?}");
        assert_eq!(raw.aoai_code(), "invalid_body", "{name}");
    }
    if !upstream_may_see_it {
        assert!(
            aoai.seen().is_empty(),
            "a body the gate cannot read is never forwarded"
        );
    }
}

#[tokio::test]
async fn malformed_chunked_body_is_400_on_the_gated_path() {
    malformed_chunked_is_400(&[("USER_CHECK", "present")], false).await;
}

#[tokio::test]
async fn malformed_chunked_body_is_400_not_502_on_the_streamed_path() {
    // Not gated: the body streams up as it comes, so AOAI may see its start; the client must
    // still get 400 invalid_body, never 502 upstream_unreachable.
    malformed_chunked_is_400(&[], true).await;
}

// ------------------------------------------------------------------------------------------
// 431: headers over 32 KB in total are refused, AOAI-shaped, and never forwarded
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn headers_over_32_kb_in_total_are_431_and_never_forwarded() {
    let aoai = MockAoai::start().await;
    for (name, settings) in [
        ("gated", &[("USER_CHECK", "present")][..]),
        ("streamed", &[][..]),
    ] {
        let app = start(&aoai.base(), settings).await;
        let one_big = format!("x-big: {}\r\n", "a".repeat(33 * 1024));
        let many: String = (0..80)
            .map(|i| format!("x-h{i}: {}\r\n", "b".repeat(420)))
            .collect();
        // A big cookie-like header just under the limit with the usual ones around it: over
        // the limit only in total.
        let total = format!("cookie: {}\r\n", "c".repeat(32 * 1024 - 100));
        for (shape, extra) in [
            ("one header", &one_big),
            ("80 headers", &many),
            ("in total", &total),
        ] {
            let head = post_head(
                CHAT_PATH,
                &format!("{extra}content-length: {}\r\n", CHAT.len()),
            );
            let raw = send_whole_then_read(app.addr, &head, CHAT.as_bytes()).await;
            assert_eq!(raw.status, 431, "{name}, {shape}: {raw:?}");
            assert_eq!(
                raw.aoai_code(),
                "request_headers_too_large",
                "{name}, {shape}"
            );
            assert!(raw.header("x-request-id").is_some());
        }
        // Just under: served.
        let under = format!("x-big: {}\r\n", "a".repeat(30 * 1024));
        let head = post_head(
            CHAT_PATH,
            &format!("{under}content-length: {}\r\n", CHAT.len()),
        );
        let raw = send_whole_then_read(app.addr, &head, CHAT.as_bytes()).await;
        assert_eq!(raw.status, 200, "{name}, under the limit: {raw:?}");
    }
    // Only the two "under the limit" requests reached AOAI.
    assert_eq!(aoai.seen().len(), 2);
}

#[tokio::test]
async fn headers_beyond_the_read_buffer_are_refused_by_the_server_and_never_forwarded() {
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), &[]).await;
    // Far beyond hyper's ~400 KB read buffer: hyper answers 431 itself (no AOAI body there).
    let huge = format!("x-huge: {}\r\n", "a".repeat(600 * 1024));
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = post_head(CHAT_PATH, &format!("{huge}content-length: 0\r\n"));
    // The server may stop reading (and answer) before all of it is written; it then closes on
    // unread bytes, so the kernel may reset the connection before the 431 is read. Either way:
    // refused, and nothing else (no 2xx, no 5xx) comes back.
    let _ = tokio::time::timeout(BOUND, stream.write_all(head.as_bytes())).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(BOUND, async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the connection stayed open past the bound");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431 "),
        "expected 431 or a closed connection, got {text:?}"
    );
    assert!(aoai.seen().is_empty());
}

// ------------------------------------------------------------------------------------------
// AOAI_TIMEOUT_MS counts from the request's arrival, screening included
// ------------------------------------------------------------------------------------------

/// A Content Safety stand-in that answers "nothing found" after `delay`, counting its calls.
async fn slow_content_safety(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let router = axum::Router::new().fallback(move |req: Request| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            let body = if req.uri().path().ends_with("text:shieldPrompt") {
                r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":[]}"#
            } else {
                r#"{"blocklistsMatch":[],"categoriesAnalysis":[{"category":"Hate","severity":0},{"category":"SelfHarm","severity":0},{"category":"Sexual","severity":0},{"category":"Violence","severity":0}]}"#
            };
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap()
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), calls)
}

fn screened(cs: &str) -> Vec<(&str, &str)> {
    vec![
        ("AOAI_TIMEOUT_MS", "1000"),
        ("AOAI_CONNECT_TIMEOUT_MS", "500"),
        ("CONTENT_SAFETY_ENDPOINT", cs),
        ("CONTENT_SAFETY_KEY", CS_KEY),
        ("CONTENT_SAFETY_TIMEOUT_MS", "10000"),
    ]
}

#[tokio::test]
async fn screening_time_counts_against_aoai_timeout() {
    // Screening takes 500 ms, AOAI 900 ms: each alone is within the 1000 ms budget, together
    // they are not. Counted from arrival, the answer is 504 whatever the machine's speed (and
    // AOAI, reached at ~500 ms, has half the budget left to record the call).
    let aoai = MockAoai::start().await;
    aoai.reply(Reply::Slow(Duration::from_millis(900)));
    let (cs, calls) = slow_content_safety(Duration::from_millis(500)).await;
    let app = start(&aoai.base(), &screened(&cs)).await;
    let raw = send_whole_then_read(
        app.addr,
        &post_head(CHAT_PATH, &format!("content-length: {}\r\n", CHAT.len())),
        CHAT.as_bytes(),
    )
    .await;
    assert_eq!(raw.status, 504, "{raw:?}");
    assert_eq!(raw.aoai_code(), "upstream_timeout");
    assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(aoai.seen().len(), 1, "screening passed, so AOAI was called");
}

#[tokio::test]
async fn screening_slower_than_aoai_timeout_is_504_and_nothing_is_forwarded() {
    let aoai = MockAoai::start().await;
    let (cs, _calls) = slow_content_safety(Duration::from_millis(3000)).await;
    let app = start(&aoai.base(), &screened(&cs)).await;
    let raw = send_whole_then_read(
        app.addr,
        &post_head(CHAT_PATH, &format!("content-length: {}\r\n", CHAT.len())),
        CHAT.as_bytes(),
    )
    .await;
    assert_eq!(raw.status, 504, "{raw:?}");
    assert_eq!(raw.aoai_code(), "upstream_timeout");
    assert!(aoai.seen().is_empty());
}

/// A client that stalls the body the gate must read is at fault: 408 `request_timeout`, never
/// 504 `upstream_timeout` (which would blame AOAI, never called), and nothing is forwarded.
#[tokio::test]
async fn a_stalled_gated_body_is_408_not_an_upstream_timeout() {
    let aoai = MockAoai::start().await;
    let settings = [
        ("AOAI_TIMEOUT_MS", "1000"),
        ("AOAI_CONNECT_TIMEOUT_MS", "500"),
        ("USER_CHECK", "present"),
    ];
    let app = start(&aoai.base(), &settings).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = post_head(
        CHAT_PATH,
        &format!("content-length: {}\r\n", CHAT.len() + 10),
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // all but the last ten bytes the length promises, then nothing
    stream.write_all(CHAT.as_bytes()).await.unwrap();
    let raw = tokio::time::timeout(BOUND, read_response(&mut stream))
        .await
        .expect("answered within the bound");
    assert_eq!(raw.status, 408, "{raw:?}");
    assert_eq!(raw.aoai_code(), "request_timeout");
    assert!(aoai.seen().is_empty(), "AOAI must not be called");
}

// ------------------------------------------------------------------------------------------
// Header read timeout: silent, half-open and idle connections are closed
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn connections_that_never_finish_their_headers_are_closed() {
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), &[("HEADER_READ_TIMEOUT_MS", "300")]).await;
    for (name, sent) in [
        ("silent", ""),
        ("half a request line", "POST /openai/depl"),
        (
            "headers never ended",
            "GET /api/FwdProxy/openai/deployments/health/check HTTP/1.1\r\nhost: x\r\n",
        ),
    ] {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(sent.as_bytes()).await.unwrap();
        assert!(
            closed_within(&mut stream, BOUND).await,
            "{name}: the connection is still open after {BOUND:?}"
        );
    }
    assert!(aoai.seen().is_empty());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), &[("HEADER_READ_TIMEOUT_MS", "300")]).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /api/FwdProxy/openai/deployments/health/check HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let raw = read_response(&mut stream).await;
    assert_eq!(raw.status, 200);
    assert!(closed_within(&mut stream, BOUND).await);
}

#[tokio::test]
async fn a_long_header_timeout_keeps_a_silent_connection_open() {
    // The other side of the same rule, so the tests above cannot pass by accident (a server
    // that closes every connection at once): with the timeout far away the connection stays.
    let aoai = MockAoai::start().await;
    let app = start(&aoai.base(), &[("HEADER_READ_TIMEOUT_MS", "600000")]).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /api/FwdProxy/openai/deployments/health/ch")
        .await
        .unwrap();
    assert!(!closed_within(&mut stream, Duration::from_millis(500)).await);
    stream
        .write_all(b"eck HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.status, 200);
}
