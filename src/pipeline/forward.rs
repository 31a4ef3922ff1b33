//! Stage 6, **forward**: runs last, for requests every earlier stage let through.
//!
//! Calls the real AOAI host with the real key, streaming the request body up and the response
//! body down as they flow (no buffering: each SSE event reaches the client when AOAI sends it).
//! AOAI's status and headers pass back unchanged but for hop-by-hop headers.
//!
//! Header hygiene: the inbound internal key (`api-key`, `Authorization`), Functions keys
//! (`x-functions-key`; the `code` query parameter is dropped by the route stage), the Functions
//! host's own `x-azure-functions-*` headers, hop-by-hop headers and `Host` never reach AOAI.
//!
//! Short-circuits with 400 (the client's body broke while streaming up), 413 (body over the
//! limit), 502 (AOAI unreachable or broke the exchange before answering) and 504 (no answer
//! within `AOAI_TIMEOUT_MS` of the request's arrival, enforced by the caller's deadline). Adds
//! the upstream latency (time to AOAI's response headers) to the request context.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Sleep;

use super::route::UpstreamTarget;
use crate::clients::identity::{TokenSource, COGNITIVE_SERVICES_SCOPE};
use crate::clients::keyvault::VaultSecret;
use crate::error::AppError;
use crate::settings::Settings;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;
pub(crate) type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>;

/// A pooled HTTP/1.1 + HTTP/2 client over rustls with the platform's trust store (what reqwest's
/// `rustls` feature used), TCP_NODELAY, no proxy from the environment (the key never travels
/// through a host we don't know) and no redirects (a 3xx goes back to the client as it is).
///
/// A bare hyper client rather than reqwest: callers hand it a URI built from parts parsed once
/// at startup, where reqwest parses the whole URL string (host and IDNA included) on every
/// request and runs its retry and redirect layers even with redirects off — about a third of
/// the handler's instructions per request (see docs/benchmarks.md).
pub(crate) fn https_client(
    connect_timeout: Duration,
    max_idle_per_host: usize,
) -> Result<HttpsClient, BoxError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls_platform_verifier::BuilderVerifierExt::with_platform_verifier(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?,
    )?
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Request headers that must never reach AOAI, beyond the hop-by-hop set.
const STRIP_UP: &[&str] = &[
    "host",
    "api-key",
    "authorization",
    "x-functions-key",
    "content-length",
];

/// The body to send upstream: the client's stream as it flows, or bytes an earlier stage
/// buffered to inspect (sent as they are, with their exact length).
pub enum UpBody {
    Stream(Body),
    Full(Bytes),
}

/// The pooled upstream client and what every call needs, built once at startup.
pub struct Upstream {
    client: HttpsClient,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The base URL's path, no trailing slash (usually empty).
    prefix: String,
    auth: UpstreamAuth,
    max_body_bytes: u64,
}

/// How the handler authenticates to AOAI.
pub enum UpstreamAuth {
    /// `api-key` from `AOAI_OUTAPIKEY`, marked sensitive so `Debug` never shows it.
    Key(HeaderValue),
    /// `api-key` from Key Vault (`AOAI_OUTAPIKEY_SECRET_URI`): read on every call so a rotation
    /// applies at once, and re-fetched when AOAI answers 401.
    Vault(VaultSecret),
    /// `Authorization: Bearer` from the managed identity (`AOAI_AUTH=managed_identity`), cached
    /// and renewed before expiry by [`TokenSource`].
    ManagedIdentity(TokenSource),
}

impl Upstream {
    pub fn new(settings: &Settings, auth: UpstreamAuth) -> Result<Self, BoxError> {
        let client = https_client(settings.connect_timeout, 256)?;
        let base = &settings.aoai_base;
        let scheme: http::uri::Scheme = base.scheme().parse()?;
        let host = base.host_str().ok_or("AOAI_HOSTNAME has no host")?;
        let authority: http::uri::Authority = match base.port() {
            Some(p) => format!("{host}:{p}").parse()?,
            None => host.parse()?,
        };
        Ok(Upstream {
            client,
            scheme,
            authority,
            prefix: base.path().trim_end_matches('/').to_string(),
            auth,
            max_body_bytes: settings.max_body_bytes,
        })
    }

    /// Forward one request. `deadline` is `AOAI_TIMEOUT_MS` after the request arrived: the
    /// caller bounds this call by it (answering 504), and the streamed answer is cut there.
    /// `latency` receives the time to AOAI's response headers.
    pub async fn forward(
        &self,
        target: &UpstreamTarget,
        parts: &http::request::Parts,
        body: UpBody,
        request_id: &HeaderValue,
        deadline: tokio::time::Instant,
        latency: &mut Option<Duration>,
    ) -> Result<Response, AppError> {
        let limit = self.max_body_bytes;
        let declared = content_length(&parts.headers);
        if declared.is_some_and(|n| n > limit) {
            return Err(AppError::PayloadTooLarge { limit });
        }

        let mut pq =
            String::with_capacity(self.prefix.len() + target.path.len() + target.query.len() + 1);
        pq.push_str(&self.prefix);
        pq.push_str(&target.path);
        if !target.query.is_empty() {
            pq.push('?');
            pq.push_str(&target.query);
        }
        let uri = http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| AppError::Internal)?;

        let mut headers = upstream_headers(&parts.headers);
        match &self.auth {
            UpstreamAuth::Key(key) => {
                headers.insert("api-key", key.clone());
            }
            UpstreamAuth::Vault(secret) => {
                headers.insert("api-key", sensitive(secret.current().expose())?);
            }
            UpstreamAuth::ManagedIdentity(tokens) => {
                let bearer = tokens
                    .authorization(COGNITIVE_SERVICES_SCOPE)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "no managed-identity token for AOAI");
                        AppError::BadGateway
                    })?;
                headers.insert(header::AUTHORIZATION, bearer);
            }
        }
        headers.insert("x-request-id", request_id.clone());

        let body: UpstreamBody = match body {
            // hyper sets Content-Length from the exact size of the bytes.
            UpBody::Full(bytes) => Full::new(bytes).map_err(|e| match e {}).boxed_unsync(),
            UpBody::Stream(body) => {
                if let Some(len) = declared {
                    // Known length: say it, so AOAI sees the same framing the client used (no
                    // chunking of multipart uploads); hyper enforces that the body matches it.
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                }
                let bodiless_get = parts.method == http::Method::GET && declared.is_none();
                if declared == Some(0) || bodiless_get {
                    Empty::new().map_err(|e| match e {}).boxed_unsync()
                } else {
                    Limited {
                        inner: body,
                        seen: 0,
                        limit,
                    }
                    .boxed_unsync()
                }
            }
        };
        let mut request = http::Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        // AOAI_TIMEOUT_MS bounds the whole exchange, streamed answer included; the wait for
        // the answer's head is bounded by the caller (app::handle), with the same deadline.
        let started = Instant::now();
        let upstream = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => return Err(classify(&e, limit)),
        };
        *latency = Some(started.elapsed());
        if upstream.status() == http::StatusCode::UNAUTHORIZED {
            if let UpstreamAuth::Vault(secret) = &self.auth {
                // The key may have been rotated: fetch it again in the background for the next
                // calls. This answer's 401 passes through (its body was streamed, no replay).
                let secret = secret.clone();
                tokio::spawn(async move {
                    if let Err(e) = secret.refresh().await {
                        tracing::warn!(error = %e, "re-reading the AOAI key from Key Vault failed");
                    }
                });
            }
        }

        let (up, incoming) = upstream.into_parts();
        let mut response = Response::builder().status(up.status);
        if let Some(h) = response.headers_mut() {
            copy_response_headers(&up.headers, h);
        }
        let body = Body::new(Deadline {
            inner: incoming,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
        });
        response.body(body).map_err(|_| AppError::Internal)
    }
}

/// A header value from a secret, marked sensitive.
pub fn sensitive(value: &str) -> Result<HeaderValue, AppError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        tracing::error!("a configured key is not a valid header value");
        AppError::Internal
    })?;
    v.set_sensitive(true);
    Ok(v)
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus any that a `Connection` header of `headers` names.
/// Shared with the devkit's gateway emulator, which must drop the same set.
pub fn is_hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    ) || headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
}

fn upstream_headers(inbound: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(inbound.len());
    for (name, value) in inbound {
        let n = name.as_str();
        if STRIP_UP.contains(&n)
            || n.starts_with("x-azure-functions-")
            || n == "x-request-id"
            || is_hop_by_hop(name, inbound)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

fn copy_response_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !is_hop_by_hop(name, from) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Map a client error to our status: an over-limit body 413, a client body that could not be
/// read 400, the rest 502 (timeouts are decided by our own deadline).
fn classify(e: &hyper_util::client::legacy::Error, limit: u64) -> AppError {
    let mut chain = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<BodyTooLarge>() {
            return AppError::PayloadTooLarge { limit };
        }
        if s.is::<ClientBodyError>() {
            return AppError::InvalidBody(
                "The request body could not be read (malformed chunked encoding or cut short)"
                    .into(),
            );
        }
        chain.push(s.to_string());
        source = s.source();
    }
    // hyper's error messages never carry the URI.
    tracing::warn!(error = %chain.join(": "), connect = e.is_connect(), "upstream failed");
    AppError::BadGateway
}

/// The client's body went over `MAX_BODY_BYTES` while streaming (no `Content-Length` given).
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct BodyTooLarge;

/// Reading the client's body failed (hyper's error: bad chunk framing, connection closed early).
#[derive(Debug, thiserror::Error)]
#[error("the client's request body could not be read: {0}")]
pub struct ClientBodyError(axum::Error);

/// Streams the client's body upstream, failing once it passes the limit.
struct Limited {
    inner: Body,
    seen: u64,
    limit: u64,
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.seen += data.len() as u64;
                    if self.seen > self.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // The client's own body broke (malformed chunking, cut short): its fault, not
            // AOAI's, so it must come back as 400, never as 502.
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The whole exchange took longer than `AOAI_TIMEOUT_MS` while the answer was streaming.
#[derive(Debug, thiserror::Error)]
#[error("upstream timed out while streaming the response")]
pub struct StreamTimeout;

/// AOAI's response body, cut with an error when the exchange's deadline passes.
struct Deadline {
    inner: hyper::body::Incoming,
    sleep: Pin<Box<Sleep>>,
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::warn!("upstream timed out while streaming");
                Poll::Ready(Some(Err(Box::new(StreamTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_secrets_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("api-key", "in"),
            ("authorization", "Bearer in"),
            ("x-functions-key", "fk"),
            ("host", "proxy"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-azure-functions-invocationid", "abc"),
            ("content-type", "application/json"),
            ("x-ms-useragent", "sdk"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        let out = upstream_headers(&h);
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-ms-useragent"]);
    }
}
