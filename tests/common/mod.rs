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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
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

/// The app, in-process, on a loopback port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestApp {
    /// Start against `upstream` with the default test settings plus `extra`.
    pub async fn start(upstream: &str, extra: &[(&str, &str)]) -> Self {
        let mut pairs: Vec<(String, String)> = vec![
            ("AOAI_HOSTNAME".into(), upstream.into()),
            ("AOAI_INAPIKEY".into(), IN_KEY.into()),
            ("AOAI_INAPIKEYS".into(), format!("other-app:{OTHER_KEY}")),
            ("AOAI_OUTAPIKEY".into(), OUT_KEY.into()),
        ];
        for (k, v) in extra {
            pairs.retain(|(n, _)| n != k);
            pairs.push((k.to_string(), v.to_string()));
        }
        let settings =
            Settings::from_source(&Source::from_map(pairs)).expect("valid test settings");
        let grace = settings.shutdown_grace;
        let state = app::AppState::new(settings).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app::serve(
            listener,
            app::router(state),
            async move {
                let _ = rx.await;
            },
            grace,
        ));
        TestApp {
            addr,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
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
