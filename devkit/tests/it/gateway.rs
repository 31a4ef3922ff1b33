//! The gateway emulator against scripted backends on port 0: what the client got and what each
//! backend saw (rewritten path, forwarded headers, round-robin share), health probing, 502 and
//! 404, and streaming without buffering.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use fwdproxy_devkit::gateway::{self, GatewayConfig, ProbeSettings, RunningGateway};
use fwdproxy_devkit::server::{self, RunningServer};
use http::HeaderMap;
use tokio::sync::Semaphore;

const HEALTH: &str = "/api/FwdProxy/openai/deployments/health/check";

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
    /// Why the body could not be read (`None`: read completely).
    body_error: Option<String>,
}

/// A backend that records requests (not probes) and can be told to fail its probe.
struct Backend {
    server: RunningServer,
    seen: Arc<Mutex<Vec<Seen>>>,
    healthy: Arc<AtomicBool>,
    /// `…/slowstream` sends its next chunk only per permit the test adds.
    gate: Arc<Semaphore>,
}

impl Backend {
    async fn start(name: &'static str) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let gate = Arc::new(Semaphore::new(0));
        let (s, h, g) = (seen.clone(), healthy.clone(), gate.clone());
        let router = Router::new().fallback(move |req: Request| {
            let (s, h, g) = (s.clone(), h.clone(), g.clone());
            async move { answer(name, req, s, h, g).await }
        });
        let server = RunningServer::start(server::bind_loopback(0).await.unwrap(), router).unwrap();
        Backend {
            server,
            seen,
            healthy,
            gate,
        }
    }

    /// Every request so far; fails if the backend could not read one's body.
    fn seen(&self) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap().clone();
        for s in &seen {
            assert!(
                s.body_error.is_none(),
                "{}: body unreadable: {:?}",
                s.path,
                s.body_error
            );
        }
        seen
    }
}

async fn answer(
    name: &'static str,
    req: Request,
    seen: Arc<Mutex<Vec<Seen>>>,
    healthy: Arc<AtomicBool>,
    gate: Arc<Semaphore>,
) -> Response {
    let (parts, body) = req.into_parts();
    if parts.uri.path() == HEALTH {
        let status = if healthy.load(Ordering::SeqCst) {
            200
        } else {
            500
        };
        return Response::builder()
            .status(status)
            .body(Body::from("{\"status\":\"ok\"}"))
            .unwrap();
    }
    // An unreadable body is recorded as such, never as an empty one.
    let (body, body_error) = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => (b, None),
        Err(e) => (Bytes::new(), Some(e.to_string())),
    };
    seen.lock().unwrap().push(Seen {
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body,
        body_error,
    });
    if parts.uri.path().ends_with("/slowstream") {
        // Five chunks; each after the first waits for a permit from the test.
        let stream = futures_util::stream::unfold((0u32, gate), |(i, gate)| async move {
            if i == 5 {
                return None;
            }
            if i > 0 {
                gate.acquire().await.ok()?.forget();
            }
            Some((
                Ok::<_, std::io::Error>(Bytes::from(format!("data: {i}\n\n"))),
                (i + 1, gate),
            ))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .header("x-backend", name)
        .header("retry-after", "7")
        .body(Body::from(format!("{{\"backend\":\"{name}\"}}")))
        .unwrap()
}

fn probe(threshold: u32) -> ProbeSettings {
    ProbeSettings {
        interval: Duration::from_secs(3600), // tests drive probes with probe_now()
        unhealthy_threshold: threshold,
        ..ProbeSettings::load_default().unwrap()
    }
}

async fn gateway_for(
    backends: Vec<String>,
    threshold: u32,
    pass_unmatched: bool,
) -> RunningGateway {
    let mut config = GatewayConfig::with_defaults(backends).unwrap();
    config.probe = probe(threshold);
    config.pass_unmatched = pass_unmatched;
    gateway::start(config, server::bind_loopback(0).await.unwrap())
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn rewrites_and_forwards_with_appgw_headers() {
    let b = Backend::start("one").await;
    let gw = gateway_for(vec![b.server.url()], 3, false).await;
    let resp = client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=a%26b",
            gw.url()
        ))
        .header("api-key", "secret-in")
        .header("x-forwarded-for", "203.0.113.9:5555")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("x-sim-fail", "slow")
        .body("{\"messages\":[]}")
        .send()
        .await
        .unwrap();
    // The client gets the backend's status, headers and body.
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-backend"], "one");
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(resp.text().await.unwrap(), "{\"backend\":\"one\"}");

    let seen = b.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(
        s.path,
        "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions"
    );
    assert_eq!(s.query.as_deref(), Some("api-version=2024-10-21&x=a%26b"));
    assert_eq!(s.body, Bytes::from_static(b"{\"messages\":[]}"));
    assert_eq!(s.headers["api-key"], "secret-in");
    assert_eq!(s.headers["x-sim-fail"], "slow");
    let xff = s.headers["x-forwarded-for"].to_str().unwrap();
    assert!(xff.starts_with("203.0.113.9:5555, 127.0.0.1:"), "{xff}");
    assert_eq!(s.headers["x-forwarded-proto"], "http");
    assert_eq!(s.headers["x-forwarded-port"], gw.addr.port().to_string());
    assert_eq!(s.headers["x-original-host"], gw.addr.to_string());
    assert_eq!(
        s.headers["x-original-url"],
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=a%26b"
    );
    assert_eq!(s.headers["x-appgw-trace-id"].len(), 32);
    assert_eq!(s.headers["host"], b.server.addr.to_string());
    assert!(!s.headers.contains_key("x-drop-me"));

    // Other rules: extensions, native operations, v1, health.
    for (path, expected) in [
        (
            "/openai/deployments/d1/extensions/chat/completions?api-version=1",
            "/api/FwdProxy/openai/deployments/d1/extensionschatcompletions",
        ),
        (
            "/openai/deployments/d1/embeddings?api-version=1",
            "/api/FwdProxy/openai/deployments/d1/embeddings",
        ),
        (
            "/openai/v1/chat/completions",
            "/api/FwdProxy/openai/v1/chat/completions",
        ),
    ] {
        let before = b.seen().len();
        let r = client()
            .post(format!("{}{path}", gw.url()))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{path}");
        let seen = b.seen();
        assert_eq!(
            seen.len(),
            before + 1,
            "{path}: exactly one backend request"
        );
        assert_eq!(seen.last().unwrap().path, expected);
    }
    let health = client()
        .get(format!("{}/openai/deployments/health/check", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn round_robin_over_healthy_backends_and_probe_threshold() {
    let one = Backend::start("one").await;
    let two = Backend::start("two").await;
    let gw = gateway_for(vec![one.server.url(), two.server.url()], 2, false).await;
    assert!(gw.health().iter().all(|h| h.healthy));
    let send = || async {
        client()
            .post(format!(
                "{}/openai/deployments/gpt-4o/embeddings?api-version=1",
                gw.url()
            ))
            .body("{}")
            .send()
            .await
            .unwrap()
            .headers()["x-backend"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let mut order = Vec::new();
    for _ in 0..10 {
        order.push(send().await);
    }
    assert_eq!(one.seen().len(), 5);
    assert_eq!(two.seen().len(), 5);
    assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");

    // One failed probe is below the threshold of 2: still in rotation.
    two.healthy.store(false, Ordering::SeqCst);
    gw.probe_now().await;
    assert!(gw.health()[1].healthy);
    assert_eq!(gw.health()[1].consecutive_failures, 1);
    gw.probe_now().await;
    assert!(!gw.health()[1].healthy);
    for _ in 0..4 {
        assert_eq!(send().await, "one");
    }
    assert_eq!(two.seen().len(), 5);
    // One good probe brings it back.
    two.healthy.store(true, Ordering::SeqCst);
    gw.probe_now().await;
    assert!(gw.health()[1].healthy);
    let mut back = Vec::new();
    for _ in 0..2 {
        back.push(send().await);
    }
    back.sort();
    assert_eq!(back, ["one", "two"]);
}

#[tokio::test]
async fn no_healthy_backend_is_502_like_appgw() {
    let b = Backend::start("one").await;
    b.healthy.store(false, Ordering::SeqCst);
    let gw = gateway_for(vec![b.server.url()], 1, false).await;
    assert!(!gw.health()[0].healthy);
    let r = client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=1",
            gw.url()
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        r.headers()["server"],
        "Microsoft-Azure-Application-Gateway/v2"
    );
    assert_eq!(r.headers()["content-type"], "text/html");
    assert!(r.text().await.unwrap().contains("502 Bad Gateway"));
    assert!(b.seen().is_empty());
}

#[tokio::test]
async fn a_backend_that_dies_after_its_probe_gives_502() {
    let b = Backend::start("one").await;
    let url = b.server.url();
    let gw = gateway_for(vec![url], 3, false).await;
    assert!(gw.health()[0].healthy);
    b.server.stop().await;
    let r = client()
        .post(format!("{}/openai/v1/embeddings", gw.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Microsoft-Azure-Application-Gateway/v2"));
}

#[tokio::test]
async fn paths_no_rule_rewrites_are_404_or_passed_through() {
    let b = Backend::start("one").await;
    let gw = gateway_for(vec![b.server.url()], 3, false).await;
    for path in [
        "/",
        "/openai/deployments/a%2Fb/chat/completions?api-version=1",
        "/openai/deployments/x",
        "/something/else",
    ] {
        let r = client()
            .get(format!("{}{path}", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["x-appgw-emulator"], "no-rewrite-rule");
    }
    assert!(b.seen().is_empty());

    let pass = gateway_for(vec![b.server.url()], 3, true).await;
    let r = client()
        .get(format!("{}/something/else?q=1", pass.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let seen = b.seen();
    assert_eq!(seen[0].path, "/something/else");
    assert_eq!(seen[0].query.as_deref(), Some("q=1"));
}

#[tokio::test]
async fn streams_are_not_buffered() {
    let b = Backend::start("one").await;
    let gw = gateway_for(vec![b.server.url()], 3, false).await;
    let mut r = client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/slowstream?api-version=1",
            gw.url()
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The backend sends chunk n+1 only after the client received chunk n: a gateway that
    // buffered would deliver nothing, and the bounded wait fails. Order, not timing.
    let mut all = Vec::new();
    for i in 0..5 {
        let want = format!("data: {i}\n\n");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let chunk = tokio::time::timeout(Duration::from_secs(20), r.chunk())
                .await
                .unwrap_or_else(|_| panic!("chunk {i} never arrived: buffered?"))
                .unwrap()
                .expect("stream ended early");
            got.extend_from_slice(&chunk);
        }
        assert_eq!(String::from_utf8_lossy(&got), want);
        all.extend_from_slice(&got);
        b.gate.add_permits(1);
    }
    let end = tokio::time::timeout(Duration::from_secs(20), r.chunk())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_none());
    assert_eq!(
        String::from_utf8(all).unwrap(),
        "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
    );
    assert_eq!(b.seen().len(), 1);
}
