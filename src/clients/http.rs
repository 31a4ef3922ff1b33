//! The one shared HTTPS client of the handler: AOAI (the forward stage) and Content Safety both
//! call through a client built here, so every outbound call has the same TLS, pooling and proxy
//! rules.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body as the client sends it: buffered bytes or a stream, boxed.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>;

/// A pooled HTTP/1.1 + HTTP/2 client over rustls with the platform's trust store (what reqwest's
/// `rustls` feature used), TCP_NODELAY, no proxy from the environment (the key never travels
/// through a host we don't know) and no redirects (a 3xx goes back to the client as it is).
///
/// A bare hyper client rather than reqwest: callers hand it a URI built from parts parsed once
/// at startup, where reqwest parses the whole URL string (host and IDNA included) on every
/// request and runs its retry and redirect layers even with redirects off — about a third of
/// the handler's instructions per request (see docs/benchmarks.md).
pub fn https_client(
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
