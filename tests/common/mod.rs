//! Test harness: the app on port 0 against a mock AOAI the test controls.
//!
//! [`MockAoai`] records every request it receives (method, path, query, headers, body) and
//! answers with the [`Reply`] the test scripted, so a test asserts on both what the client got
//! and what the upstream saw. [`TestApp`] runs the real router and server loop in-process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aoai_fwdproxy::app;
use aoai_fwdproxy::settings::{Settings, Source};
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use tokio::net::TcpListener;

pub const IN_KEY: &str = "test-internal-key-0123456789";
pub const OTHER_KEY: &str = "test-other-caller-key-abcdef";
pub const OUT_KEY: &str = "real-aoai-key-zyxwvutsrqponm";
pub const API: &str = "api-version=2024-10-21";

/// Serve a mock's router on a free loopback port for the rest of the test.
async fn serve_mock(router: axum::Router) -> SocketAddr {
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
    pub body: Bytes,
}

/// How the mock answers.
#[derive(Clone)]
pub enum Reply {
    /// status, extra headers, body
    Fixed(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// SSE: each chunk sent `gap` after the previous one
    Stream(Vec<String>, Duration),
    /// wait, then 200 `{}`
    Slow(Duration),
}

#[derive(Clone)]
pub struct MockAoai {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    reply: Arc<Mutex<Reply>>,
}

impl MockAoai {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reply = Arc::new(Mutex::new(Reply::Fixed(
            200,
            vec![("content-type", "application/json")],
            r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#,
        )));
        let (s, r) = (seen.clone(), reply.clone());
        let router = axum::Router::new().fallback(move |req: Request| {
            let (s, r) = (s.clone(), r.clone());
            async move { answer(req, s, r).await }
        });
        let addr = serve_mock(router).await;
        MockAoai { addr, seen, reply }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn reply(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn only(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(
            seen.len(),
            1,
            "upstream should have seen exactly one request"
        );
        seen.into_iter().next().unwrap()
    }
}

async fn answer(req: Request, seen: Arc<Mutex<Vec<Seen>>>, reply: Arc<Mutex<Reply>>) -> Response {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
    });
    let reply = reply.lock().unwrap().clone();
    match reply {
        Reply::Fixed(status, headers, body) => {
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            b.body(Body::from(body)).unwrap()
        }
        Reply::Stream(chunks, gap) => {
            let stream = async_stream(chunks, gap);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Reply::Slow(wait) => {
            tokio::time::sleep(wait).await;
            Response::new(Body::from("{}"))
        }
    }
}

fn async_stream(
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

/// The default test settings against `upstream`, plus `extra` (which replace defaults).
pub fn test_settings(upstream: &str, extra: &[(&str, &str)]) -> Settings {
    let mut pairs: Vec<(String, String)> = vec![
        ("AOAI_HOSTNAME".into(), upstream.into()),
        ("AOAI_INAPIKEY".into(), IN_KEY.into()),
        ("AOAI_INAPIKEYS".into(), format!("other-app:{OTHER_KEY}")),
        ("AOAI_OUTAPIKEY".into(), OUT_KEY.into()),
    ];
    for (k, v) in extra {
        pairs.retain(|(n, _)| n != k);
        if !v.is_empty() {
            pairs.push((k.to_string(), v.to_string()));
        }
    }
    Settings::from_source(&Source::from_map(pairs)).expect("valid test settings")
}

/// The app, in-process, on a loopback port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub state: Arc<app::AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestApp {
    /// Start against `upstream` with the default test settings plus `extra`.
    pub async fn start(upstream: &str, extra: &[(&str, &str)]) -> Self {
        let state = app::AppState::new(test_settings(upstream, extra))
            .await
            .unwrap();
        Self::with_state(state).await
    }

    /// Serve an already built state.
    pub async fn with_state(state: Arc<app::AppState>) -> Self {
        let grace = state.settings.shutdown_grace;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app::serve(
            listener,
            app::router(state.clone()),
            async move {
                let _ = rx.await;
            },
            grace,
        ));
        TestApp {
            addr,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            state,
            stop: Some(tx),
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// POST a JSON body with the internal key.
    pub async fn post(&self, path_and_query: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(path_and_query))
            .header("api-key", IN_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Assert an AOAI-shaped error with `status` and return its `error.code`.
pub async fn assert_aoai_error(resp: reqwest::Response, status: u16) -> String {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    assert!(resp.headers().get("x-request-id").is_some());
    let body: serde_json::Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().expect("error.message");
    assert!(!message.is_empty());
    body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string()
}

/// A loopback address nothing listens on.
pub async fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// The Content Safety fake lives in `tests/support/content_safety.rs` (one fake for every
/// test); `MockContentSafety` is its old name here.
/// (Tests that also declare `mod support` compile the file twice; either path works.)
#[allow(clippy::duplicate_mod)]
#[path = "../support/content_safety.rs"]
mod content_safety_fake;
#[allow(unused_imports)]
pub use content_safety_fake::{
    Canned, ContentSafetyFake, CsCall, Endpoint, ATTACK, BLOCKLISTED, CS_KEY, FLAGS,
};
pub type MockContentSafety = ContentSafetyFake;

/// Read the JSON Lines abuse log.
pub fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A fresh temp file path for this test.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fwdproxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}-{}.jsonl", uuid_like()));
    let _ = std::fs::remove_file(&p);
    p
}

fn uuid_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
