//! The one fake AOAI of the integration tests.
//!
//! [`MockAoai`] records every request it receives (method, path, query, headers, body, and
//! whether the body could be read to its end) and answers with the [`Reply`] the test scripted,
//! so a test asserts on both what the client got and what the upstream saw.
//!
//! A body the mock cannot read completely (the client, i.e. the handler, broke it off) is
//! recorded with [`Seen::body_error`] set, never as an empty body: [`MockAoai::only`] fails on
//! it, so a test cannot mistake a cut request for an empty one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Serve a router on a free loopback port (port 0, read back) for the rest of the test.
pub async fn serve_mock(router: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// What the mock saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The body as far as it could be read.
    pub body: Bytes,
    /// Why the body could not be read to its end (`None`: it was read completely).
    pub body_error: Option<String>,
}

/// How the mock answers.
#[derive(Clone)]
pub enum Reply {
    /// status, extra headers, body
    Fixed(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// status, extra headers, body (owned, for bodies built at run time)
    Owned(u16, Vec<(&'static str, &'static str)>, String),
    /// SSE: each chunk sent `gap` after the previous one (pacing only, never a synchronisation)
    Stream(Vec<String>, Duration),
    /// SSE: the first chunk at once, every further one only after the test called
    /// [`MockAoai::release`]; the stream never ends until every chunk was released. Lets a test
    /// assert the order of events (chunk *n* reached the client before the upstream sent *n+1*)
    /// instead of timing them, and makes a stream that never ends (release nothing).
    Gated(Vec<String>),
    /// wait, then 200 `{}`
    Slow(Duration),
    /// SSE: 200 and its headers, these chunks, then — once the test called
    /// [`MockAoai::release`] — the connection is cut mid-body (no end of the chunked body): an
    /// upstream that dies after its first bytes, cut only after the test saw them arrive.
    Broken(Vec<String>),
    /// A chat/completions SSE stream as AOAI sends it: each chunk (one JSON object) as a
    /// `data:` event, then — only when the request asked with
    /// `"stream_options":{"include_usage":true}` — `"usage":null` in every chunk and a last
    /// usage-only chunk (`"choices":[]` plus this `usage` object), then `data: [DONE]`.
    UsageStream(Vec<String>, String),
}

/// Whether a request body asked for the usage chunk of a stream.
pub fn asked_for_usage(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v["stream_options"]["include_usage"] == serde_json::Value::Bool(true))
}

/// The SSE text [`Reply::UsageStream`] sends for `chunks`, asked for usage or not.
pub fn usage_stream_text(chunks: &[String], usage: &str, asked: bool) -> String {
    let mut out = String::new();
    for c in chunks {
        out.push_str("data: ");
        if asked {
            let open = c.trim_end().strip_suffix('}').expect("a JSON object");
            out.push_str(open);
            out.push_str(",\"usage\":null}");
        } else {
            out.push_str(c);
        }
        out.push_str("\n\n");
    }
    if asked {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{usage}}}\n\n"
        ));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

#[derive(Clone)]
pub struct MockAoai {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    reply: Arc<Mutex<Reply>>,
    gate: Arc<Semaphore>,
}

/// The default answer: a chat completion without choices.
pub const DEFAULT_ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#;

impl MockAoai {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reply = Arc::new(Mutex::new(Reply::Fixed(
            200,
            vec![("content-type", "application/json")],
            DEFAULT_ANSWER,
        )));
        let gate = Arc::new(Semaphore::new(0));
        let (s, r, g) = (seen.clone(), reply.clone(), gate.clone());
        let router = axum::Router::new().fallback(move |req: Request| {
            let (s, r, g) = (s.clone(), r.clone(), g.clone());
            async move { answer(req, s, r, g).await }
        });
        let addr = serve_mock(router).await;
        MockAoai {
            addr,
            seen,
            reply,
            gate,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn reply(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    /// Let a [`Reply::Gated`] stream send `n` more chunks.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The one request the upstream saw, read to its end.
    pub fn only(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(
            seen.len(),
            1,
            "upstream should have seen exactly one request, saw {:?}",
            seen.iter()
                .map(|s| format!("{} {}", s.method, s.path))
                .collect::<Vec<_>>()
        );
        let one = seen.into_iter().next().unwrap();
        assert!(
            one.body_error.is_none(),
            "the upstream could not read the request body: {:?}",
            one.body_error
        );
        one
    }

    /// Fail unless the upstream saw no request at all (fail-closed and refusal tests).
    pub fn assert_untouched(&self, why: &str) {
        let seen = self.seen();
        assert!(
            seen.is_empty(),
            "{why}: the upstream saw {:?}",
            seen.iter()
                .map(|s| format!("{} {}", s.method, s.path))
                .collect::<Vec<_>>()
        );
    }
}

async fn answer(
    req: Request,
    seen: Arc<Mutex<Vec<Seen>>>,
    reply: Arc<Mutex<Reply>>,
    gate: Arc<Semaphore>,
) -> Response {
    let (parts, mut body) = req.into_parts();
    // Read frame by frame, so a body broken off half-way keeps what arrived and says so.
    let mut received = Vec::new();
    let mut body_error = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    received.extend_from_slice(data);
                }
            }
            Some(Err(e)) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    let received_copy = received.clone();
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body: Bytes::from(received),
        body_error,
    });
    let reply = reply.lock().unwrap().clone();
    match reply {
        Reply::Fixed(status, headers, body) => fixed(status, headers, body.to_string()),
        Reply::Owned(status, headers, body) => fixed(status, headers, body),
        Reply::Stream(chunks, gap) => sse(paced(chunks, gap)),
        Reply::Gated(chunks) => sse(gated(chunks, gate)),
        Reply::UsageStream(chunks, usage) => {
            let text = usage_stream_text(&chunks, &usage, asked_for_usage(&received_copy));
            // one write per event, as AOAI flushes them
            let events: Vec<String> = text.split_inclusive("\n\n").map(str::to_string).collect();
            sse(paced(events, Duration::ZERO))
        }
        Reply::Broken(chunks) => {
            let sent = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
            let cut = futures_util::stream::once(async move {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                Err(std::io::Error::other("upstream died mid-answer"))
            });
            sse(futures_util::StreamExt::chain(sent, cut))
        }
        Reply::Slow(wait) => {
            tokio::time::sleep(wait).await;
            Response::new(Body::from("{}"))
        }
    }
}

fn fixed(status: u16, headers: Vec<(&'static str, &'static str)>, body: String) -> Response {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(Body::from(body)).unwrap()
}

fn sse<S>(stream: S) -> Response
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn paced(
    chunks: Vec<String>,
    gap: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(
        (chunks.into_iter(), true),
        move |(mut it, first)| async move {
            let next = it.next()?;
            if !first {
                tokio::time::sleep(gap).await;
            }
            Some((Ok(Bytes::from(next)), (it, false)))
        },
    )
}

fn gated(
    chunks: Vec<String>,
    gate: Arc<Semaphore>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(
        (chunks.into_iter(), true, gate),
        |(mut it, first, gate)| async move {
            let next = it.next()?;
            if !first {
                gate.acquire().await.ok()?.forget();
            }
            Some((Ok(Bytes::from(next)), (it, false, gate)))
        },
    )
}

/// A loopback address that refuses connections for as long as the returned guard lives: a
/// socket bound to a free port but never listening, so no other test can take the port in
/// between (as it could after binding a listener and dropping it).
pub struct RefusingPort {
    pub url: String,
    _socket: tokio::net::TcpSocket,
}

pub fn refusing_port() -> RefusingPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    RefusingPort {
        url: format!("http://{addr}"),
        _socket: socket,
    }
}
