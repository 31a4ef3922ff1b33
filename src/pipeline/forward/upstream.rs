//! One AOAI resource and one exchange with it: the URI, the credential, header hygiene, the
//! request body as it goes up and the answer's body as it comes down.
//!
//! Header hygiene: the inbound internal key (`api-key`, `Authorization`), Functions keys
//! (`x-functions-key`; the `code` query parameter is dropped by the route stage), the Functions
//! host's own `x-azure-functions-*` headers, hop-by-hop headers and `Host` never reach AOAI.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::Sleep;
use url::Url;

use super::pool::Health;
use crate::clients::http::{BoxError, HttpsClient, UpstreamBody};
use crate::clients::identity::{TokenSource, COGNITIVE_SERVICES_SCOPE};
use crate::clients::keyvault::VaultSecret;
use crate::error::AppError;
use crate::pipeline::route::UpstreamTarget;

/// Request headers that must never reach AOAI, beyond the hop-by-hop set.
const STRIP_UP: &[&str] = &[
    "host",
    "api-key",
    "authorization",
    "x-functions-key",
    "ocp-apim-subscription-key",
    "content-length",
];

/// How the handler authenticates to one AOAI resource.
#[derive(Clone)]
pub enum UpstreamAuth {
    /// `api-key` from `AOAI_OUTAPIKEY` (or one entry of `AOAI_BACKUP_OUTAPIKEYS`), marked
    /// sensitive so `Debug` never shows it.
    Key(HeaderValue),
    /// `api-key` from Key Vault (`AOAI_OUTAPIKEY_SECRET_URI`, or one entry of
    /// `AOAI_BACKUP_OUTAPIKEY_SECRET_URIS`): read on every call so a rotation applies at once,
    /// and re-fetched when that resource answers 401.
    Vault(VaultSecret),
    /// `Authorization: Bearer` from the managed identity (`AOAI_AUTH=managed_identity`), cached
    /// and renewed before expiry by [`TokenSource`]; one token serves every resource (its
    /// audience is Cognitive Services, not one resource).
    ManagedIdentity(TokenSource),
}

/// One AOAI resource: where it is, how to authenticate, and its state in the pool.
pub struct Endpoint {
    /// Host and port, for log lines and counters (never a key).
    pub name: Arc<str>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The `Host` header the client would add to every request (`host`, plus `:port` when not
    /// the scheme's default), built once instead of formatted per request.
    host: HeaderValue,
    /// The base URL's path, no trailing slash (usually empty).
    prefix: String,
    auth: UpstreamAuth,
    pub health: Health,
}

/// Why an exchange got no answer.
pub enum Failure {
    /// The client's side: its body went over the limit or broke while streaming up. Never the
    /// upstream's fault, never retried.
    Client(AppError),
    /// The upstream's side (connection refused or reset, TLS, closed before answering).
    Upstream,
}

impl Endpoint {
    pub fn new(base: &Url, auth: UpstreamAuth) -> Result<Self, BoxError> {
        let scheme: http::uri::Scheme = base.scheme().parse()?;
        let host = base.host_str().ok_or("the AOAI base URL has no host")?;
        let authority: http::uri::Authority = match base.port() {
            Some(p) => format!("{host}:{p}").parse()?,
            None => host.parse()?,
        };
        // hyper-util's rule for the `Host` it adds when a request has none
        let host = authority.host();
        let secure = matches!(scheme.as_str(), "https" | "wss");
        let host = match authority.port() {
            Some(p) if (p.as_u16() == 443 && secure) || (p.as_u16() == 80 && !secure) => {
                HeaderValue::from_str(host)?
            }
            Some(p) => HeaderValue::from_str(&format!("{host}:{p}"))?,
            None => HeaderValue::from_str(host)?,
        };
        Ok(Endpoint {
            name: Arc::from(authority.as_str()),
            host,
            scheme,
            authority,
            prefix: base.path().trim_end_matches('/').to_string(),
            auth,
            health: Health::default(),
        })
    }

    /// One exchange: `headers` are the client's, already cleaned ([`upstream_headers`]); this
    /// adds the credential and sends. Returns AOAI's answer head and body as they arrive.
    pub async fn call(
        &self,
        client: &HttpsClient,
        target: &UpstreamTarget,
        method: &http::Method,
        mut headers: HeaderMap,
        body: UpstreamBody,
        limit: u64,
    ) -> Result<http::Response<hyper::body::Incoming>, Failure> {
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
            .map_err(|_| Failure::Client(AppError::Internal))?;
        match &self.auth {
            UpstreamAuth::Key(key) => {
                headers.insert(API_KEY, key.clone());
            }
            UpstreamAuth::Vault(secret) => {
                let key = sensitive(secret.current().expose()).map_err(Failure::Client)?;
                headers.insert(API_KEY, key);
            }
            UpstreamAuth::ManagedIdentity(tokens) => {
                let bearer = tokens
                    .authorization(COGNITIVE_SERVICES_SCOPE)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "no managed-identity token for AOAI");
                        Failure::Client(AppError::BadGateway)
                    })?;
                headers.insert(header::AUTHORIZATION, bearer);
            }
        }
        // last, where the client would have appended it: the header order on the wire stays
        headers.insert(header::HOST, self.host.clone());
        let mut request = http::Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        let answer = match client.request(request).await {
            Ok(r) => r,
            Err(e) => return Err(classify(&e, limit, &self.name)),
        };
        if answer.status() == http::StatusCode::UNAUTHORIZED {
            if let UpstreamAuth::Vault(secret) = &self.auth {
                // The key may have been rotated: fetch it again in the background for the next
                // calls. This answer's 401 passes through (no replay of a refused key).
                let secret = secret.clone();
                tokio::spawn(async move {
                    if let Err(e) = secret.refresh().await {
                        tracing::warn!(error = %e, "re-reading an AOAI key from Key Vault failed");
                    }
                });
            }
        }
        Ok(answer)
    }
}

/// The request body for one exchange. `body` is the client's stream (sent once) or `None` when
/// the bytes are replayable (`full`); `declared` is the client's `Content-Length`.
pub fn request_body(
    full: Option<&Bytes>,
    stream: Option<Body>,
    declared: Option<u64>,
    headers: &mut HeaderMap,
    limit: u64,
) -> UpstreamBody {
    if let Some(bytes) = full {
        // hyper sets Content-Length from the exact size of the bytes.
        return Full::new(bytes.clone())
            .map_err(|e| match e {})
            .boxed_unsync();
    }
    let Some(body) = stream else {
        return Empty::new().map_err(|e| match e {}).boxed_unsync();
    };
    if let Some(len) = declared {
        // Known length: say it, so AOAI sees the same framing the client used (no chunking of
        // multipart uploads); hyper enforces that the body matches it.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Limited {
        inner: body,
        seen: 0,
        limit,
    }
    .boxed_unsync()
}

/// AOAI's answer as the client gets it: hop-by-hop headers dropped, the body cut with an error
/// when `deadline` passes.
pub fn pass_through(
    answer: http::Response<hyper::body::Incoming>,
    deadline: tokio::time::Instant,
) -> Result<Response, AppError> {
    let (mut up, incoming) = answer.into_parts();
    // AOAI's header map becomes the client's: hop-by-hop headers removed in place, nothing copied.
    strip_hop_by_hop(&mut up.headers);
    let mut response = Response::new(Body::new(Deadline {
        inner: incoming,
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
    }));
    *response.status_mut() = up.status;
    *response.headers_mut() = up.headers;
    Ok(response)
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
    HOP_BY_HOP.contains(&name.as_str())
        || connection_tokens(headers).any(|token| token.eq_ignore_ascii_case(name.as_str()))
}

/// The header names the `Connection` headers of `headers` list (trimmed; maybe not valid names).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// `api-key` and `x-request-id` as ready names: a `&str` name is parsed and checked on every use.
const API_KEY: HeaderName = HeaderName::from_static("api-key");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// [`HOP_BY_HOP`] as ready names, for removal from a map.
const HOP_BY_HOP_NAMES: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn upstream_headers(inbound: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(inbound.len());
    // what the client's `Connection` names, read once (is_hop_by_hop reads it per header)
    let named: Vec<&str> = connection_tokens(inbound).collect();
    for (name, value) in inbound {
        let n = name.as_str();
        if STRIP_UP.contains(&n)
            || n.starts_with("x-azure-functions-")
            || n == "x-request-id"
            || HOP_BY_HOP.contains(&n)
            || named.iter().any(|t| t.eq_ignore_ascii_case(n))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The hop-by-hop headers of [`is_hop_by_hop`], as a fixed list.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Remove from `headers` what [`is_hop_by_hop`] names, reading `Connection` once.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP_NAMES {
        headers.remove(name);
    }
}

/// Whose fault a failed exchange was: an over-limit body (413) or a client body that could not
/// be read (400) is the client's; the rest is the upstream's (timeouts are decided by our own
/// deadline).
fn classify(e: &hyper_util::client::legacy::Error, limit: u64, upstream: &str) -> Failure {
    let mut chain = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<BodyTooLarge>() {
            return Failure::Client(AppError::PayloadTooLarge { limit });
        }
        if s.is::<ClientBodyError>() {
            return Failure::Client(AppError::InvalidBody(
                "The request body could not be read (malformed chunked encoding or cut short)"
                    .into(),
            ));
        }
        chain.push(s.to_string());
        source = s.source();
    }
    // hyper's error messages never carry the URI.
    tracing::warn!(
        upstream,
        error = %chain.join(": "),
        connect = e.is_connect(),
        "upstream failed"
    );
    Failure::Upstream
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

    /// The `Host` built once is what hyper-util would have added: the port only when it is not
    /// the scheme's default.
    #[test]
    fn host_is_what_the_client_would_add() {
        for (base, host) in [
            ("https://res.openai.azure.com", "res.openai.azure.com"),
            ("https://res.openai.azure.com:443/", "res.openai.azure.com"),
            (
                "https://res.openai.azure.com:8443",
                "res.openai.azure.com:8443",
            ),
            ("http://127.0.0.1:80", "127.0.0.1"),
            ("http://127.0.0.1:443", "127.0.0.1:443"),
            ("http://127.0.0.1:41234/prefix/", "127.0.0.1:41234"),
            ("http://[::1]:8080", "[::1]:8080"),
        ] {
            let key = HeaderValue::from_static("k");
            let e = Endpoint::new(&Url::parse(base).unwrap(), UpstreamAuth::Key(key)).unwrap();
            assert_eq!(e.host, host, "{base}");
        }
    }

    #[test]
    fn the_answer_keeps_exactly_what_is_not_hop_by_hop() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "text/event-stream"),
            ("connection", "keep-alive, X-Custom-Hop"),
            ("connection", "upgrade"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("upgrade", "h2c"),
            ("proxy-authenticate", "Basic"),
            ("proxy-connection", "close"),
            ("x-ratelimit-remaining-tokens", "99"),
            ("apim-request-id", "a"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let want: Vec<(HeaderName, HeaderValue)> = h
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n, &h))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut got = h.clone();
        strip_hop_by_hop(&mut got);
        let got: Vec<(HeaderName, HeaderValue)> =
            got.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), 5, "{got:?}");
    }

    #[test]
    fn strips_secrets_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("api-key", "in"),
            ("authorization", "Bearer in"),
            ("x-functions-key", "fk"),
            ("Ocp-Apim-Subscription-Key", "sk"),
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
