//! The application: shared state, the request path in order, and the server loop.
//!
//! # Layer order
//! Every request, on any path, goes through [`handle`], which runs the stages of
//! [`crate::pipeline`] in this order and stops at the first that answers:
//!
//! 1. request id: taken from `x-request-id` when sane, otherwise created; returned on every answer;
//! 2. [`route`](crate::pipeline::route): health (answered here, no key), or the AOAI target;
//! 3. [`auth`](crate::pipeline::auth): the internal key → caller;
//! 4. [`policy`](crate::pipeline::policy): only for prompt-carrying operations when the user
//!    check or screening is on — buffers the body, checks `user`;
//! 5. [`content_safety`](crate::pipeline::content_safety): screens the prompt when configured;
//! 6. [`audit`](crate::pipeline::audit): every refusal of 4–5 becomes an abuse record, made
//!    durable (journal fsync'd, group commit) before the refusal is answered; 503 when it cannot be;
//! 7. [`forward`](crate::pipeline::forward): the AOAI call, streamed both ways.
//!
//! Whatever happens — success, a stage's error, a panic, a client that disconnects mid-stream —
//! exactly one log line is written per request, when its response body is finished or dropped
//! ([`RequestLog`]). Errors become AOAI-shaped JSON through [`AppError`]'s one mapping.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::net::TcpListener;

use crate::clients::cosmos::{spawn_user_refresh, BuilderFactory, CosmosAccount};
use crate::clients::identity::TokenSource;
use crate::clients::keyvault::{SecretUri, VaultSecret};
use crate::error::AppError;
use crate::pipeline::audit::{client_ip, AbuseRecord, Audit, Reason, NO_USER};
use crate::pipeline::auth::Authenticator;
use crate::pipeline::content_safety::{ContentSafety, Credential, Verdict};
use crate::pipeline::forward::{content_length, sensitive, UpBody, Upstream, UpstreamAuth};
use crate::pipeline::policy::{self, Inspected, UserCheck, UserRegistry};
use crate::pipeline::route::{self, Route, UpstreamTarget};
use crate::settings::{AoaiAuth, Settings, SettingsError};

/// What every request shares, built once at startup.
pub struct AppState {
    pub settings: Settings,
    pub auth: Authenticator,
    pub upstream: Upstream,
    pub registry: Arc<UserRegistry>,
    pub content_safety: Option<ContentSafety>,
    pub audit: Audit,
}

impl AppState {
    /// Build everything requests share: fetch Key Vault secrets, set up the managed identity,
    /// Cosmos DB, the abuse log (replaying a spool left by an earlier run) and the user-registry
    /// refresh. Must run inside the Tokio runtime. An error names the setting to fix.
    pub async fn new(settings: Settings) -> Result<Arc<Self>, SettingsError> {
        Self::build(settings, None).await
    }

    /// As [`AppState::new`], with the Cosmos DB clients made by `builder` (the tests use the SDK's
    /// in-memory emulator and fault injection through this).
    pub async fn with_cosmos_builder(
        settings: Settings,
        builder: BuilderFactory,
    ) -> Result<Arc<Self>, SettingsError> {
        Self::build(settings, Some(builder)).await
    }

    async fn build(
        mut settings: Settings,
        cosmos_builder: Option<BuilderFactory>,
    ) -> Result<Arc<Self>, SettingsError> {
        let kv = settings.keyvault.clone();
        let cs_needs_identity = settings
            .content_safety
            .as_ref()
            .is_some_and(|c| c.key.is_none() && kv.content_safety_key.is_none());
        let cosmos_needs_identity = settings
            .audit
            .cosmos
            .as_ref()
            .is_some_and(|c| c.key.is_none() && kv.cosmos_key.is_none());
        let identity = if settings.aoai_auth == AoaiAuth::ManagedIdentity
            || kv.any()
            || cs_needs_identity
            || cosmos_needs_identity
        {
            Some(
                TokenSource::managed_identity(&settings.identity).map_err(|e| {
                    SettingsError::new("AZURE_CLIENT_ID", format!("managed identity: {e}"))
                })?,
            )
        } else {
            None
        };

        let aoai_vault = fetch_secret(kv.aoai_key.as_ref(), identity.as_ref(), kv.refresh).await?;
        let cs_vault = fetch_secret(
            kv.content_safety_key.as_ref(),
            identity.as_ref(),
            kv.refresh,
        )
        .await?;
        let cosmos_vault =
            fetch_secret(kv.cosmos_key.as_ref(), identity.as_ref(), kv.refresh).await?;

        let upstream_auth = match (settings.aoai_auth, aoai_vault, &settings.aoai_key) {
            (AoaiAuth::ManagedIdentity, _, _) => {
                UpstreamAuth::ManagedIdentity(identity.clone().expect("identity built above"))
            }
            (AoaiAuth::Key, Some(vault), _) => UpstreamAuth::Vault(vault),
            (AoaiAuth::Key, None, Some(key)) => {
                UpstreamAuth::Key(sensitive(key.expose()).map_err(|_| {
                    SettingsError::new("AOAI_OUTAPIKEY", "is not a valid header value")
                })?)
            }
            (AoaiAuth::Key, None, None) => {
                return Err(SettingsError::new(
                    "AOAI_OUTAPIKEY",
                    "is required with AOAI_AUTH=key",
                ))
            }
        };
        let upstream = Upstream::new(&settings, upstream_auth).map_err(|e| {
            SettingsError::new(
                "AOAI_HOSTNAME",
                format!("cannot build the HTTP client: {e}"),
            )
        })?;

        let content_safety = match settings.content_safety.clone() {
            None => None,
            Some(cs) => {
                let credential = match (cs_vault, &identity) {
                    (Some(v), _) => Credential::Vault(v),
                    (None, Some(mi)) => Credential::Token(mi.clone()),
                    (None, None) => Credential::Missing,
                };
                Some(
                    ContentSafety::new(cs)
                        .map_err(|e| {
                            SettingsError::new(
                                "CONTENT_SAFETY_ENDPOINT",
                                format!("cannot build the HTTP client: {e}"),
                            )
                        })?
                        .with_credential(credential),
                )
            }
        };

        // Cosmos DB: a Key Vault key is refreshed like the others (every KEYVAULT_REFRESH_SECS)
        // and re-read when Cosmos answers 401; each connection uses its current value.
        if let (Some(cosmos), Some(vault)) = (settings.audit.cosmos.as_mut(), &cosmos_vault) {
            cosmos.key = Some(vault.current());
        }
        let cosmos = settings
            .audit
            .cosmos
            .clone()
            .map(|c| CosmosAccount::new(c, identity.as_ref().map(TokenSource::credential)))
            .transpose()?
            .map(|account| match &cosmos_vault {
                Some(vault) => account.with_vault_key(vault.clone()),
                None => account,
            })
            .map(|account| match cosmos_builder {
                Some(builder) => account.with_builder(builder),
                None => account,
            })
            .map(Arc::new);
        let audit = Audit::start(settings.audit.clone(), cosmos.clone())?;

        let registry = Arc::new(UserRegistry::new(settings.policy.registered_users.clone()));
        if let (Some(account), UserCheck::Registered) = (&cosmos, settings.policy.user_check) {
            let registry = registry.clone();
            spawn_user_refresh(account.clone(), move |users| registry.replace_remote(users));
        }

        Ok(Arc::new(AppState {
            auth: Authenticator::new(&settings.callers),
            upstream,
            registry,
            content_safety,
            audit,
            settings,
        }))
    }

    /// Whether prompt-carrying bodies must be buffered and inspected at all.
    fn inspects(&self) -> bool {
        self.settings.policy.user_check != UserCheck::Off || self.content_safety.is_some()
    }
}

/// Fetch one Key Vault secret at start (refusing to start without it) and keep it fresh.
async fn fetch_secret(
    uri: Option<&SecretUri>,
    identity: Option<&TokenSource>,
    refresh: Option<Duration>,
) -> Result<Option<VaultSecret>, SettingsError> {
    let (Some(uri), Some(identity)) = (uri, identity) else {
        return Ok(None);
    };
    let secret = VaultSecret::fetch(uri, identity.credential())
        .await
        .map_err(|e| SettingsError::new(e.setting, e.message))?;
    if let Some(every) = refresh {
        secret.spawn_periodic(every);
    }
    Ok(Some(secret))
}

/// The router: one handler for every path, so our own parser sees the raw path (axum's path
/// extraction would decode `%2F` before we could refuse it).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting, let in-flight
/// requests and streams finish for at most `grace`, and return.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let signalled = Arc::new(tokio::sync::Notify::new());
    let notify = signalled.clone();
    // TCP_NODELAY on every accepted connection: without it Nagle holds each small SSE event
    // until the client ACKs the previous one (up to the 40 ms delayed-ACK timer), so streamed
    // tokens arrive in bursts.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            notify.notify_one();
        })
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        _ = signalled.notified() => {
            tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: draining in-flight requests");
            match tokio::time::timeout(grace, server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("shutdown grace period over: dropping the remaining requests");
                    Ok(())
                }
            }
        }
    }
}

/// The per-request context and its one log line, written when the response body ends.
#[derive(Debug)]
pub struct RequestLog {
    pub request_id: HeaderValue,
    pub method: http::Method,
    pub caller: Option<String>,
    pub deployment: Option<String>,
    pub operation: Option<&'static str>,
    pub status: u16,
    pub error: Option<&'static str>,
    pub upstream_latency: Option<Duration>,
    started: Instant,
    completed: bool,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let total_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let upstream_ms = self.upstream_latency.map(|d| d.as_secs_f64() * 1000.0);
        tracing::info!(
            target: "request",
            request_id = self.request_id.to_str().unwrap_or(""),
            method = self.method.as_str(),
            caller = self.caller.as_deref(),
            deployment = self.deployment.as_deref(),
            operation = self.operation,
            status = self.status,
            error = self.error,
            upstream_ms,
            total_ms,
            completed = self.completed,
        );
    }
}

/// Run the request path for one request.
async fn handle(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let request_id = request_id(request.headers());
    let mut log = RequestLog {
        request_id: request_id.clone(),
        method: request.method().clone(),
        caller: None,
        deployment: None,
        operation: None,
        status: 0,
        error: None,
        upstream_latency: None,
        started: Instant::now(),
        completed: false,
    };

    let outcome = AssertUnwindSafe(pipeline(&state, request, &mut log))
        .catch_unwind()
        .await;
    let mut response = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            log.error = Some(e.code());
            e.into_response()
        }
        Err(_) => {
            tracing::error!(
                request_id = log.request_id.to_str().unwrap_or(""),
                "panic in the request path"
            );
            log.error = Some(AppError::Internal.code());
            AppError::Internal.into_response()
        }
    };
    response.headers_mut().insert("x-request-id", request_id);
    log.status = response.status().as_u16();
    log.completed = http_body::Body::is_end_stream(response.body());
    // With a Content-Length, hyper stops polling once that many bytes went out, so completion
    // is judged by counting them.
    let remaining = content_length(response.headers());
    response.map(|inner| {
        Body::new(LoggedBody {
            inner,
            log,
            remaining,
        })
    })
}

async fn pipeline(
    state: &AppState,
    request: Request,
    log: &mut RequestLog,
) -> Result<Response, AppError> {
    let (parts, body) = request.into_parts();
    let target = match route::resolve(&parts.method, parts.uri.path(), parts.uri.query())? {
        Route::Health => return Ok(health()),
        Route::Upstream(target) => target,
    };
    log.deployment = target.deployment.clone();
    log.operation = Some(target.operation.name());

    let caller = state.auth.authenticate(&parts.headers)?;
    log.caller = Some(caller.to_string());

    let body = if target.operation.carries_prompt() && state.inspects() {
        UpBody::Full(gate(state, &target, &parts, body, log).await?)
    } else {
        UpBody::Stream(body)
    };

    state
        .upstream
        .forward(
            &target,
            &parts,
            body,
            &log.request_id,
            &mut log.upstream_latency,
        )
        .await
}

/// Policy and content safety on a buffered body; every refusal is audited. Returns the
/// client's bytes, unchanged, for forwarding.
async fn gate(
    state: &AppState,
    target: &UpstreamTarget,
    parts: &http::request::Parts,
    body: Body,
    log: &RequestLog,
) -> Result<Bytes, AppError> {
    let limit = state.settings.max_body_bytes;
    if content_length(&parts.headers).is_some_and(|n| n > limit) {
        return Err(AppError::PayloadTooLarge { limit });
    }
    let bytes =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit as usize))
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    AppError::PayloadTooLarge { limit }
                } else {
                    AppError::InvalidBody("The request body could not be read".into())
                }
            })?
            .to_bytes();

    let screening = state.content_safety.as_ref();
    let inspected = match policy::inspect(
        &parts.headers,
        &bytes,
        target.operation,
        state.settings.policy.user_check,
        &state.registry,
        screening.is_some(),
    ) {
        Ok(i) => i,
        Err(refusal) => {
            let details = serde_json::json!({
                "error": refusal.error.code(),
                "message": refusal.error.to_string(),
            });
            record_abuse(
                state,
                target,
                parts,
                log,
                refusal.reason,
                &refusal.inspected,
                details,
            )
            .await?;
            return Err(refusal.error);
        }
    };

    if let Some(cs) = screening {
        if !inspected.prompt.is_empty() {
            match cs
                .screen(&inspected.prompt, target.operation.shieldable())
                .await
            {
                Ok(Verdict::Allowed) => {}
                Ok(Verdict::Blocked {
                    reason,
                    result,
                    details,
                }) => {
                    record_abuse(state, target, parts, log, reason, &inspected, details).await?;
                    return Err(AppError::ContentFiltered(result));
                }
                Ok(Verdict::TooLong) => {
                    return Err(AppError::InvalidBody(
                        "The prompt is too long to be screened for content safety".into(),
                    ))
                }
                Err(unavailable) => {
                    let rid = log.request_id.to_str().unwrap_or("");
                    if let Some(e) = cs.on_unavailable(&unavailable, rid) {
                        return Err(e);
                    }
                }
            }
        }
    }
    Ok(bytes)
}

/// Build the abuse record for a refusal and make it durable; the refusal is answered only
/// after this returns `Ok`. When the record cannot be made durable anywhere, the client gets
/// 503 `audit_unavailable` instead (the request is still not forwarded).
async fn record_abuse(
    state: &AppState,
    target: &UpstreamTarget,
    parts: &http::request::Parts,
    log: &RequestLog,
    reason: Reason,
    inspected: &Inspected,
    details: serde_json::Value,
) -> Result<(), AppError> {
    // The last X-Forwarded-For entry: the one the gateway appended (see audit::record).
    let client_ip = client_ip(
        parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let prompt = state
        .audit
        .capture_prompt()
        .then(|| inspected.prompt.joined())
        .filter(|p| !p.is_empty());
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    state
        .audit
        .record(AbuseRecord {
            id: uuid::Uuid::new_v4().to_string(),
            timestamp,
            request_id: log.request_id.to_str().unwrap_or("").to_string(),
            caller: log.caller.clone().unwrap_or_default(),
            user: inspected
                .user
                .clone()
                .unwrap_or_else(|| NO_USER.to_string()),
            deployment: target
                .deployment
                .clone()
                .or_else(|| inspected.model.clone()),
            operation: target.operation.name().to_string(),
            reason,
            details,
            prompt,
            client_ip,
        })
        .await
        .map_err(|_| AppError::AuditUnavailable)
}

fn health() -> Response {
    let body = concat!(
        r#"{"status":"ok","service":"aoai-fwdproxy","version":""#,
        env!("CARGO_PKG_VERSION"),
        r#""}"#
    );
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The client's `x-request-id` when it is a sane token, a fresh UUID otherwise.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get("x-request-id") {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        {
            return v.clone();
        }
    }
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a UUID is a valid header value")
}

/// A response body that writes the request's log line when it ends or is dropped.
struct LoggedBody {
    inner: Body,
    log: RequestLog,
    /// Bytes still due when the response declared its length.
    remaining: Option<u64>,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.log.completed = true,
            Poll::Ready(Some(Ok(frame))) => {
                let sent = frame.data_ref().map_or(0, |d| d.len() as u64);
                let this = &mut *self;
                if let Some(r) = this.remaining.as_mut() {
                    *r = r.saturating_sub(sent);
                }
                // hyper stops polling once a body has ended or its declared length went out
                if this.remaining == Some(0) || this.inner.is_end_stream() {
                    this.log.completed = true;
                }
            }
            Poll::Ready(Some(Err(_))) => self.log.error = Some("stream_aborted"),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Address the handler listens on: loopback only, as the Functions host expects.
pub fn listen_addr(settings: &Settings) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], settings.port))
}
