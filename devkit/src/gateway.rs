//! Application Gateway v2 emulator: the front door of the local set.
//!
//! What it does, and how that maps to the real gateway:
//! - **Rewrite** every request with the rule set AppGW is deployed with
//!   (`infra/rewrite-rules.json`, through [`crate::appgw::RewriteRules`]): the same JSON, the
//!   same evaluator, so a rule change shows up here before it reaches Azure.
//! - **Unmatched paths → 404.** Real AppGW does not refuse a request that no rewrite rule
//!   matches: it forwards the path unchanged to the backend pool, where the Functions host
//!   answers 404 because no function route matches (only a client that already sends
//!   `/api/FwdProxy/…` reaches the handler that way). The emulator answers that 404 itself (a
//!   short text body, `x-appgw-emulator: no-rewrite-rule`) so the local set never depends on the
//!   bypass; [`GatewayConfig::pass_unmatched`] forwards unchanged instead, as AppGW does.
//! - **Round-robin** over the backends the health probe marks healthy; none healthy → **502**
//!   with a small HTML page in the style of AppGW's own (`502 Bad Gateway` /
//!   `Microsoft-Azure-Application-Gateway/v2`, `Server: Microsoft-Azure-Application-Gateway/v2`;
//!   the real page is the same short nginx-style HTML). A backend that fails the exchange
//!   before answering (refused, reset, over the request timeout) also gives 502, as AppGW does.
//! - **Health probe** on the path, interval, timeout, unhealthy threshold and status codes of
//!   `infra/appgw-probe.json` ([`ProbeSettings`]): a backend leaves the rotation after
//!   `unhealthyThreshold` consecutive failed probes and returns after one good probe. Backends
//!   start out of rotation and are probed once before the gateway serves.
//! - **Headers**: adds `X-Forwarded-For` (`ip:port` of the client, appended to any list the
//!   client sent, as AppGW formats it), `X-Forwarded-Proto`, `X-Forwarded-Port`,
//!   `X-Original-Host`, `X-Original-URL` and `X-AppGW-Trace-Id`; `Host` becomes the backend's
//!   (`pickHostNameFromBackendHttpSettings`); hop-by-hop headers are dropped.
//! - **Streaming**: request and response bodies are copied as they flow; AppGW's
//!   `enableResponseBuffering: false` (set in infra) gives the same behaviour for SSE.
//!   Unlike the WAF SKU, which always buffers requests, the emulator streams them too.
//! - Plain HTTP on loopback (the real listener is HTTPS on 443).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aoai_fwdproxy::pipeline::forward::is_hop_by_hop;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use axum::Router;
use futures_util::future::join_all;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::appgw::RewriteRules;
use crate::server::{self, RunningServer};

/// The probe settings infra deploys, compiled in like the rewrite rules.
pub const DEFAULT_PROBE_JSON: &str = include_str!("../../infra/appgw-probe.json");
/// The Azure front end ends HTTP-triggered calls at 230 s; infra sets the backend timeout there.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(230);

/// AppGW's own 502 page, in short.
pub const BAD_GATEWAY_HTML: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>Microsoft-Azure-Application-Gateway/v2</center>\r\n</body>\r\n</html>\r\n";
const SERVER_NAME: &str = "Microsoft-Azure-Application-Gateway/v2";

/// The health probe: `infra/appgw-probe.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    /// Inclusive status ranges that count as healthy (`"200-399"`).
    pub status_codes: Vec<(u16, u16)>,
}

impl ProbeSettings {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("probe settings: {e}"))?;
        let num = |k: &str| -> Result<u64, String> {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("probe settings: {k} must be a whole number"))
        };
        let path = v
            .get("path")
            .and_then(serde_json::Value::as_str)
            .filter(|p| p.starts_with('/'))
            .ok_or("probe settings: path must start with /")?
            .to_string();
        let mut status_codes = Vec::new();
        for item in v
            .get("statusCodes")
            .and_then(serde_json::Value::as_array)
            .cloned()
            .unwrap_or_else(|| vec!["200-399".into()])
        {
            let s = item
                .as_str()
                .ok_or("probe settings: statusCodes are strings")?;
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let (a, b) = (
                a.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("bad status range {s:?}"))?,
                b.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("bad status range {s:?}"))?,
            );
            status_codes.push((a, b));
        }
        let settings = ProbeSettings {
            path,
            interval: Duration::from_secs(num("intervalSeconds")?),
            timeout: Duration::from_secs(num("timeoutSeconds")?),
            unhealthy_threshold: num("unhealthyThreshold")? as u32,
            status_codes,
        };
        if settings.interval.is_zero()
            || settings.timeout.is_zero()
            || settings.unhealthy_threshold == 0
        {
            return Err("probe settings: interval, timeout and threshold must be above 0".into());
        }
        Ok(settings)
    }

    /// The settings infra deploys.
    pub fn load_default() -> Result<Self, String> {
        Self::from_json(DEFAULT_PROBE_JSON)
    }

    fn healthy(&self, status: u16) -> bool {
        self.status_codes
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&status))
    }
}

/// What the gateway needs.
pub struct GatewayConfig {
    /// Backend base URLs (`http://127.0.0.1:port`), one per Function App.
    pub backends: Vec<String>,
    pub rules: Arc<RewriteRules>,
    pub probe: ProbeSettings,
    /// Time for a backend to send its response headers (AppGW `requestTimeout`).
    pub request_timeout: Duration,
    /// Forward requests no rewrite rule matches unchanged (AppGW's real behaviour) instead of
    /// answering 404.
    pub pass_unmatched: bool,
    /// Print one line per request and each health change.
    pub access_log: bool,
}

impl GatewayConfig {
    /// The deployed rules and probe for `backends`.
    pub fn with_defaults(backends: Vec<String>) -> Result<Self, String> {
        Ok(GatewayConfig {
            backends,
            rules: Arc::new(RewriteRules::load_default().map_err(|e| e.to_string())?),
            probe: ProbeSettings::load_default()?,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            pass_unmatched: false,
            access_log: false,
        })
    }
}

/// One backend and its probe state.
struct Backend {
    base: String,
    healthy: AtomicBool,
    failures: AtomicU32,
    served: AtomicUsize,
}

struct Shared {
    backends: Vec<Backend>,
    next: AtomicUsize,
    client: reqwest::Client,
    rules: Arc<RewriteRules>,
    probe: ProbeSettings,
    pass_unmatched: bool,
    access_log: bool,
    listen_port: u16,
}

/// Health of one backend as the probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    pub base: String,
    pub healthy: bool,
    pub consecutive_failures: u32,
    /// Requests the gateway sent to it.
    pub served: usize,
}

/// A running gateway; dropping it stops the server and the probes.
pub struct RunningGateway {
    pub addr: SocketAddr,
    server: Option<RunningServer>,
    shared: Arc<Shared>,
    stop_probes: watch::Sender<bool>,
    probes: Option<JoinHandle<()>>,
}

impl RunningGateway {
    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn health(&self) -> Vec<BackendHealth> {
        self.shared
            .backends
            .iter()
            .map(|b| BackendHealth {
                base: b.base.clone(),
                healthy: b.healthy.load(Ordering::SeqCst),
                consecutive_failures: b.failures.load(Ordering::SeqCst),
                served: b.served.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// Run one probe round now (tests; the loop keeps its own schedule).
    pub async fn probe_now(&self) {
        probe_round(&self.shared).await;
    }

    /// Stop probing, stop accepting, let open streams finish for a short grace.
    pub async fn stop(mut self) {
        let _ = self.stop_probes.send(true);
        if let Some(p) = self.probes.take() {
            p.abort();
        }
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        let _ = self.stop_probes.send(true);
        if let Some(p) = self.probes.take() {
            p.abort();
        }
    }
}

/// Probe every backend once, then serve on `listener` and keep probing on the interval.
pub async fn start(
    config: GatewayConfig,
    listener: tokio::net::TcpListener,
) -> std::io::Result<RunningGateway> {
    let listen_port = listener.local_addr()?.port();
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(std::io::Error::other)?;
    let shared = Arc::new(Shared {
        backends: config
            .backends
            .iter()
            .map(|b| Backend {
                base: b.trim_end_matches('/').to_string(),
                healthy: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                served: AtomicUsize::new(0),
            })
            .collect(),
        next: AtomicUsize::new(0),
        client,
        rules: config.rules,
        probe: config.probe,
        pass_unmatched: config.pass_unmatched,
        access_log: config.access_log,
        listen_port,
    });
    let timeout = config.request_timeout;
    probe_round(&shared).await;

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let probe_shared = shared.clone();
    let probes = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(probe_shared.probe.interval) => {}
                _ = stop_rx.changed() => return,
            }
            probe_round(&probe_shared).await;
        }
    });

    let router = Router::new()
        .fallback(
            move |State(shared): State<Arc<Shared>>,
                  ConnectInfo(peer): ConnectInfo<SocketAddr>,
                  req: Request| async move {
                server::no_panic(proxy(shared, peer, req, timeout)).await
            },
        )
        .with_state(shared.clone());
    let server = RunningServer::start(listener, router)?;
    Ok(RunningGateway {
        addr: server.addr,
        server: Some(server),
        shared,
        stop_probes: stop_tx,
        probes: Some(probes),
    })
}

async fn probe_round(shared: &Shared) {
    let probes = shared.backends.iter().map(|b| async move {
        let url = format!("{}{}", b.base, shared.probe.path);
        let ok = match shared
            .client
            .get(&url)
            .timeout(shared.probe.timeout)
            .send()
            .await
        {
            Ok(r) => shared.probe.healthy(r.status().as_u16()),
            Err(_) => false,
        };
        if ok {
            b.failures.store(0, Ordering::SeqCst);
            if !b.healthy.swap(true, Ordering::SeqCst) && shared.access_log {
                println!("[gateway] backend {} is healthy", b.base);
            }
        } else {
            let failures = b.failures.fetch_add(1, Ordering::SeqCst).saturating_add(1);
            if failures >= shared.probe.unhealthy_threshold
                && b.healthy.swap(false, Ordering::SeqCst)
                && shared.access_log
            {
                println!(
                    "[gateway] backend {} is unhealthy after {failures} failed probes",
                    b.base
                );
            }
        }
    });
    join_all(probes).await;
}

/// Next healthy backend after the last one used.
fn pick(shared: &Shared) -> Option<&Backend> {
    let n = shared.backends.len();
    if n == 0 {
        return None;
    }
    let start = shared.next.fetch_add(1, Ordering::Relaxed);
    (0..n)
        .map(|i| &shared.backends[(start + i) % n])
        .find(|b| b.healthy.load(Ordering::SeqCst))
}

fn bad_gateway() -> Response {
    let mut r = Response::new(Body::from(BAD_GATEWAY_HTML));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    h.insert(header::SERVER, HeaderValue::from_static(SERVER_NAME));
    r
}

fn no_rule(path: &str) -> Response {
    let mut r = Response::new(Body::from(format!(
        "404 Not Found: no rewrite rule matches {path}. Application Gateway would forward it \
         unchanged and the Function App would answer 404.\n"
    )));
    *r.status_mut() = StatusCode::NOT_FOUND;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-appgw-emulator",
        HeaderValue::from_static("no-rewrite-rule"),
    );
    r
}

/// Headers to copy, without hop-by-hop ones and those the `Connection` header names.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, skip: &[&str]) {
    for (name, value) in from {
        if is_hop_by_hop(name, from) || skip.contains(&name.as_str()) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

fn trace_id() -> String {
    let mut rng = crate::sim::SplitMix(crate::sim::run_seed());
    format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

async fn proxy(shared: Arc<Shared>, peer: SocketAddr, req: Request, timeout: Duration) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("127.0.0.1:{}", shared.listen_port));

    let rewritten = shared.rules.rewrite(&path, query.as_deref(), &host);
    if rewritten.rule.is_none() && !shared.pass_unmatched {
        if shared.access_log {
            println!("[gateway] {} {path} → 404 (no rewrite rule)", parts.method);
        }
        return no_rule(&path);
    }
    let Some(backend) = pick(&shared) else {
        if shared.access_log {
            println!(
                "[gateway] {} {path} → 502 (no healthy backend)",
                parts.method
            );
        }
        return bad_gateway();
    };
    backend.served.fetch_add(1, Ordering::Relaxed);
    let url = format!("{}{}", backend.base, rewritten.uri());

    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 6);
    copy_headers(&parts.headers, &mut headers, &["host", "x-forwarded-for"]);
    let client = format!("{}:{}", peer.ip(), peer.port());
    let xff = match parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        prior if prior.is_empty() => client,
        prior => format!("{}, {client}", prior.join(", ")),
    };
    let original_url = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    for (name, value) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", "http".to_string()),
        ("x-forwarded-port", shared.listen_port.to_string()),
        ("x-original-host", host.clone()),
        ("x-original-url", original_url),
        ("x-appgw-trace-id", trace_id()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }

    let declared_empty = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0");
    let has_body = !declared_empty
        && (parts.headers.contains_key(header::CONTENT_LENGTH)
            || parts.headers.contains_key(header::TRANSFER_ENCODING));
    let mut request = shared
        .client
        .request(parts.method.clone(), &url)
        .headers(headers);
    if has_body {
        request = request.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    // The timeout covers the time to response headers; a stream may then run as long as the
    // backend keeps it going (the handler bounds it below 230 s).
    let upstream = match tokio::time::timeout(timeout, request.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => {
            if shared.access_log {
                println!(
                    "[gateway] {} {path} → {} → 502 (backend failed)",
                    parts.method, backend.base
                );
            }
            return bad_gateway();
        }
    };
    if shared.access_log {
        println!(
            "[gateway] {} {path} → {}{} → {} ({} ms to headers)",
            parts.method,
            backend.base,
            rewritten.path,
            upstream.status().as_u16(),
            started.elapsed().as_millis()
        );
    }
    let status = upstream.status();
    let mut headers = HeaderMap::with_capacity(upstream.headers().len());
    copy_headers(upstream.headers(), &mut headers, &[]);
    let mut response = Response::new(Body::from_stream(upstream.bytes_stream()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infra_probe_settings_load() {
        let p = ProbeSettings::load_default().unwrap();
        assert_eq!(p.path, "/api/FwdProxy/openai/deployments/health/check");
        assert!(p.unhealthy_threshold >= 1);
        assert!(p.healthy(200) && p.healthy(399) && !p.healthy(401) && !p.healthy(500));
    }

    #[test]
    fn bad_probe_settings_are_refused() {
        assert!(ProbeSettings::from_json(
            r#"{"path":"x","intervalSeconds":1,"timeoutSeconds":1,"unhealthyThreshold":1}"#
        )
        .is_err());
        assert!(ProbeSettings::from_json(
            r#"{"path":"/x","intervalSeconds":0,"timeoutSeconds":1,"unhealthyThreshold":1}"#
        )
        .is_err());
        let p = ProbeSettings::from_json(
            r#"{"path":"/x","intervalSeconds":2,"timeoutSeconds":1,"unhealthyThreshold":2,"statusCodes":["200","204-205"]}"#,
        )
        .unwrap();
        assert!(p.healthy(204) && !p.healthy(201));
    }
}
