//! Serving a router on a loopback listener, with a handle that stops it.
//!
//! Every server of the local set (AOAI simulators, Content Safety simulator, gateway emulator)
//! runs through [`RunningServer`], so they share one rule: bind 127.0.0.1 only, answer a panic
//! with a 500 instead of a dropped connection, and stop within a bounded time even when a
//! client holds a stream open.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::Router;
use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long [`RunningServer::stop`] lets open connections finish before it drops them.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Bind `127.0.0.1:port` (`0` = any free port). Nothing in the devkit listens beyond loopback:
/// the simulators accept fixed demo keys and must never be reachable from the network.
pub async fn bind_loopback(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)).await
}

/// A server started by [`RunningServer::start`]; dropping it stops the server.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Serve `router` on `listener` (handlers may extract `ConnectInfo<SocketAddr>`).
    pub fn start(listener: TcpListener, router: Router) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            let server = axum::serve(listener, service).with_graceful_shutdown(async move {
                let _ = rx.await;
            });
            if let Err(e) = server.await {
                eprintln!("server on {addr} stopped: {e}");
            }
        });
        Ok(RunningServer {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, give open connections [`STOP_GRACE`], then drop them.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            // Dropped without `stop().await`: no time to wait, so end it now.
            task.abort();
        }
    }
}

/// Run a request handler so that a panic becomes a 500 answer, never a dropped connection.
pub async fn no_panic<F>(fut: F) -> Response
where
    F: Future<Output = Response>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(response) => response,
        Err(_) => json_response(
            500,
            &serde_json::json!({"error": {"code": "InternalServerError",
                "message": "The local simulator failed while processing the request (a bug in the devkit)."}}),
        ),
    }
}

/// A JSON response with `status`.
pub fn json_response(status: u16, body: &serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Raw query pairs, decoded.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((percent_decode(k), percent_decode(v)));
    }
    out
}

/// `%XX` and `+` decoding for query components; invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
