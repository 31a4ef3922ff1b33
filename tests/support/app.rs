//! The app in-process on port 0 ([`TestApp`]), the one settings merge every test uses
//! ([`merge`], [`test_settings`]) and the one check of an AOAI-shaped error
//! ([`assert_aoai_error`]).

use std::net::SocketAddr;
use std::sync::Arc;

use aoai_fwdproxy::app;
use aoai_fwdproxy::settings::{Settings, SettingsError, Source};
use tokio::net::TcpListener;

pub const IN_KEY: &str = "test-internal-key-0123456789";
pub const OTHER_KEY: &str = "test-other-caller-key-abcdef";
pub const OUT_KEY: &str = "real-aoai-key-zyxwvutsrqponm";
pub const API: &str = "api-version=2024-10-21";

/// `base` with `extra` laid over it: a name in `extra` replaces the same name in `base`, and an
/// empty value removes the setting (as App Service treats an empty setting as unset).
pub fn merge<K, V, L, W>(
    base: impl IntoIterator<Item = (K, V)>,
    extra: impl IntoIterator<Item = (L, W)>,
) -> Vec<(String, String)>
where
    K: Into<String>,
    V: Into<String>,
    L: Into<String>,
    W: Into<String>,
{
    let mut pairs: Vec<(String, String)> = base
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    for (k, v) in extra {
        let (k, v) = (k.into(), v.into());
        pairs.retain(|(n, _)| *n != k);
        if !v.is_empty() {
            pairs.push((k, v));
        }
    }
    pairs
}

/// The settings every test starts from, against `upstream`.
pub fn base_pairs(upstream: &str) -> Vec<(String, String)> {
    vec![
        ("AOAI_HOSTNAME".into(), upstream.into()),
        ("AOAI_INAPIKEY".into(), IN_KEY.into()),
        ("AOAI_INAPIKEYS".into(), format!("other-app:{OTHER_KEY}")),
        ("AOAI_OUTAPIKEY".into(), OUT_KEY.into()),
    ]
}

/// Parse the default test settings against `upstream` plus `extra`.
pub fn try_settings(upstream: &str, extra: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::from_source(&Source::from_map(merge(
        base_pairs(upstream),
        extra.iter().copied(),
    )))
}

/// The default test settings against `upstream`, plus `extra` (which replace defaults).
pub fn test_settings(upstream: &str, extra: &[(&str, &str)]) -> Settings {
    try_settings(upstream, extra).expect("valid test settings")
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
    let (code, _) = aoai_error(resp, status).await;
    code
}

/// Assert an AOAI-shaped error with `status` and return its `error.code` and `error.message`.
pub async fn aoai_error(resp: reqwest::Response, status: u16) -> (String, String) {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "an AOAI-shaped error is JSON"
    );
    assert!(resp.headers().get("x-request-id").is_some());
    let body: serde_json::Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().expect("error.message");
    assert!(!message.is_empty());
    let code = body["error"]["code"].as_str().expect("error.code");
    assert!(!code.is_empty());
    (code.to_string(), message.to_string())
}

/// What [`raw_request`] got back.
pub struct RawResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

/// Send one HTTP/1.1 request with exactly this method and request target — no client-side
/// normalisation (reqwest's URL parser would resolve `%2e%2e` and `..` before sending).
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> RawResponse {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    RawResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

impl RawResponse {
    /// Assert an AOAI-shaped error with `status` and return its `error.code`.
    pub fn aoai_error(&self, status: u16, what: &str) -> String {
        assert_eq!(self.status, status, "{what}");
        assert_eq!(
            self.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..]),
            "{what}: an AOAI-shaped error is JSON"
        );
        assert!(self.headers.get("x-request-id").is_some(), "{what}");
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        v["error"]["code"].as_str().expect("error.code").to_string()
    }
}
