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
//! Short-circuits with 413 (body over the limit), 502 (AOAI unreachable or broke the exchange
//! before answering) and 504 (AOAI did not answer within `AOAI_TIMEOUT_MS`). Adds the upstream
//! latency (time to AOAI's response headers) to the request context.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{header, HeaderMap, HeaderName, HeaderValue};

use super::route::UpstreamTarget;
use crate::clients::identity::{TokenSource, COGNITIVE_SERVICES_SCOPE};
use crate::clients::keyvault::VaultSecret;
use crate::error::AppError;
use crate::settings::Settings;

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
    client: reqwest::Client,
    /// `scheme://host[:port]`, no trailing slash.
    base: String,
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
    pub fn new(settings: &Settings, auth: UpstreamAuth) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.upstream_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            // Never follow redirects: a 3xx from AOAI goes back to the client as it is, and our
            // key never travels to another host.
            .redirect(reqwest::redirect::Policy::none())
            // Proxies from the environment would route the key through a host we don't know.
            .no_proxy()
            .build()?;
        let mut base = settings.aoai_base.as_str().to_string();
        while base.ends_with('/') {
            base.pop();
        }
        Ok(Upstream {
            client,
            base,
            auth,
            max_body_bytes: settings.max_body_bytes,
        })
    }

    /// Forward one request. `latency` receives the time to AOAI's response headers.
    pub async fn forward(
        &self,
        target: &UpstreamTarget,
        parts: &http::request::Parts,
        body: UpBody,
        request_id: &HeaderValue,
        latency: &mut Option<Duration>,
    ) -> Result<Response, AppError> {
        let limit = self.max_body_bytes;
        let declared = content_length(&parts.headers);
        if declared.is_some_and(|n| n > limit) {
            return Err(AppError::PayloadTooLarge { limit });
        }

        let mut url =
            String::with_capacity(self.base.len() + target.path.len() + target.query.len() + 1);
        url.push_str(&self.base);
        url.push_str(&target.path);
        if !target.query.is_empty() {
            url.push('?');
            url.push_str(&target.query);
        }

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

        let mut request = self
            .client
            .request(parts.method.clone(), url)
            .headers(headers);
        match body {
            // reqwest sets Content-Length from the bytes.
            UpBody::Full(bytes) => request = request.body(bytes),
            UpBody::Stream(body) => {
                if let Some(len) = declared {
                    // Known length: say it, so AOAI sees the same framing the client used (no
                    // chunking of multipart uploads); hyper enforces that the body matches it.
                    request = request.header(header::CONTENT_LENGTH, len);
                }
                let bodiless_get = parts.method == http::Method::GET && declared.is_none();
                if declared != Some(0) && !bodiless_get {
                    request = request.body(reqwest::Body::wrap_stream(Limited {
                        inner: body.into_data_stream(),
                        seen: 0,
                        limit,
                    }));
                }
            }
        }

        let started = Instant::now();
        let upstream = request.send().await.map_err(|e| classify(&e, limit))?;
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

        let mut response = Response::builder().status(upstream.status());
        if let Some(h) = response.headers_mut() {
            copy_response_headers(upstream.headers(), h);
        }
        let body = Body::from_stream(upstream.bytes_stream());
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

/// Map a client error to our status: timeouts 504, an over-limit body 413, the rest 502.
fn classify(e: &reqwest::Error, limit: u64) -> AppError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<BodyTooLarge>() {
            return AppError::PayloadTooLarge { limit };
        }
        source = s.source();
    }
    if e.is_timeout() {
        tracing::warn!(error = %e.without_url_ref(), "upstream timed out");
        AppError::GatewayTimeout
    } else {
        tracing::warn!(error = %e.without_url_ref(), connect = e.is_connect(), "upstream failed");
        AppError::BadGateway
    }
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    /// The error text without the URL (which carries no secret, but needs no logging either).
    fn without_url_ref(&self) -> String {
        let mut parts = Vec::new();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            parts.push(s.to_string());
            source = s.source();
        }
        if parts.is_empty() {
            "request failed".to_string()
        } else {
            parts.join(": ")
        }
    }
}

/// The client's body went over `MAX_BODY_BYTES` while streaming (no `Content-Length` given).
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct BodyTooLarge;

/// Streams the client's body upstream, failing once it passes the limit.
struct Limited<S> {
    inner: S,
    seen: u64,
    limit: u64,
}

impl<S> Stream for Limited<S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    type Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen += chunk.len() as u64;
                if self.seen > self.limit {
                    Poll::Ready(Some(Err(Box::new(BodyTooLarge))))
                } else {
                    Poll::Ready(Some(Ok(chunk)))
                }
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
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
