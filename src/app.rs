//! The application: shared state, the request path in order, and the server loop.
//!
//! # Layer order
//! Every request, on any path, goes through [`handle`], which runs the stages of
//! [`crate::pipeline`] in this order and stops at the first that answers:
//!
//! 0. the edge (in [`serve_with`] and [`handle`]): hyper closes connections whose headers do not
//!    arrive within `HEADER_READ_TIMEOUT_MS`; headers over [`MAX_HEADER_BYTES`] are answered 431;
//!    a body declared over `MAX_BODY_BYTES` is kept from the stages (each answers 413 from the
//!    declared length) and drained before the answer goes out, and the unread rest of a chunked
//!    body a stage gave up on is drained in the background; everything below runs within
//!    `AOAI_TIMEOUT_MS` of the request's arrival (504 after that);
//! 1. request id: taken from `x-request-id` when sane, otherwise created; returned on every answer;
//! 2. [`route`](crate::pipeline::route): health (answered here, no key), or the AOAI target;
//! 3. [`auth`](crate::pipeline::auth): the internal key → caller;
//! 4. [`policy`](crate::pipeline::policy): only for operations whose body the model reads, when
//!    the user check or screening is on — buffers the body, reads it strictly, extracts what the
//!    model reads, checks `user`; a file upload is read instead by
//!    [`batch`](crate::pipeline::batch): every line of a batch input file through the same map and
//!    user check, then each line screened in step 5 (any refused line refuses the upload);
//! 5. [`content_safety`](crate::pipeline::content_safety): screens the prompt when configured;
//! 6. [`audit`](crate::pipeline::audit): every refusal of 4–5 becomes an abuse record, made
//!    durable (journal fsync'd, group commit) before the refusal is answered; 503 when it cannot be;
//! 7. [`budget`](crate::pipeline::budget): for a caller with a token limit, reserves the
//!    request's tokens (429 when the budget cannot cover them);
//! 8. [`forward`](crate::pipeline::forward): the AOAI call, streamed both ways; with
//!    `AOAI_BACKUPS`, a 429, 5xx or failed resource hands the request to the next one before any
//!    byte of the answer went out (a body up to `SPILLOVER_REPLAY_MAX_BYTES` is read first so it
//!    can be sent again);
//! 9. [`meter`](crate::pipeline::meter): a tap on the answer of token-metered operations reads
//!    `usage` into the log line and settles the reservation when the body ends.
//!
//! Between 6 and 7, the body of a token-metered operation is buffered when a stage already
//! did, when the caller is limited (its prompt is counted), or when it is declared and at most
//! [`METER_BUFFER_BYTES`]: then the `user` goes to the log line and a chat/completions stream
//! that did not ask for usage is made to, also one that opted out ([`meter::inject_include_usage`]
//! has the table of spellings). A chunked or larger body of an unlimited caller with the gate off
//! streams up untouched, and its stream is metered only if the client asked for usage itself.
//! When the request ends its answer's usage is added to the usage summaries (Cosmos DB only,
//! [`meter::summary`]). `Accept-Encoding` of metered operations
//! is not forwarded, so the tap reads uncompressed answers.
//!
//! Whatever happens — success, a stage's error, a panic, a client that disconnects mid-stream —
//! exactly one log line is written per request, when its response body is finished or dropped
//! ([`RequestLog`]). Errors become AOAI-shaped JSON through [`AppError`]'s one mapping.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::clients::cosmos::{spawn_user_refresh, BuilderFactory, CosmosAccount};
use crate::clients::identity::TokenSource;
use crate::clients::keyvault::{SecretUri, VaultSecret};
use crate::error::AppError;
use crate::pipeline::audit::{client_ip, AbuseRecord, Audit, Reason, NO_USER};
use crate::pipeline::auth::Authenticator;
use crate::pipeline::batch::{self, Refused, Upload};
use crate::pipeline::budget::{self, Budgets, Reservation};
use crate::pipeline::content_safety::{ContentSafety, Credential, Verdict};
use crate::pipeline::forward::{
    content_length, sensitive, Forwarded, UpBody, Upstream, UpstreamAuth,
};
use crate::pipeline::meter::summary::{unix_now, Summaries, UsageLog, UsageSummary};
use crate::pipeline::meter::{self, Meter, UsageSlot};
use crate::pipeline::policy::{self, Inspected, UserCheck, UserRegistry};
use crate::pipeline::route::{self, Operation, Route, UpstreamTarget};
use crate::settings::{AoaiAuth, Settings, SettingsError};

/// What every request shares, built once at startup.
pub struct AppState {
    pub settings: Settings,
    pub auth: Authenticator,
    pub upstream: Upstream,
    pub registry: Arc<UserRegistry>,
    pub content_safety: Option<ContentSafety>,
    pub audit: Audit,
    pub budgets: Budgets,
    /// Usage summaries to the Cosmos DB `usage` container (only with Cosmos DB).
    pub usage: Option<UsageLog>,
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
        let backup_uris = settings.spillover.backup_key_uris.clone();
        let identity = if settings.aoai_auth == AoaiAuth::ManagedIdentity
            || kv.any()
            || !backup_uris.is_empty()
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
        let upstream = if backup_uris.is_empty() {
            Upstream::new(&settings, upstream_auth)
        } else {
            // AOAI_BACKUP_OUTAPIKEY_SECRET_URIS: one Key Vault secret per backup, each fetched
            // now (no start without it), refreshed and re-read on a 401 like the primary's.
            let mut backups = Vec::with_capacity(backup_uris.len());
            for uri in &backup_uris {
                let secret = fetch_secret(Some(uri), identity.as_ref(), kv.refresh).await?;
                backups.extend(secret.map(UpstreamAuth::Vault));
            }
            Upstream::with_backups(&settings, upstream_auth, backups)
        }
        .map_err(|e| {
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
        let usage = match &settings.audit.cosmos {
            Some(c) => audit
                .companion::<UsageSummary>(&c.usage_container)?
                .map(|log| {
                    let instance = crate::pipeline::audit::paths::instance_name(&settings.audit);
                    UsageLog::start(Summaries::new(&instance), log)
                }),
            None => None,
        };

        let registry = Arc::new(UserRegistry::new(settings.policy.registered_users.clone()));
        if let (Some(account), UserCheck::Registered) = (&cosmos, settings.policy.user_check) {
            let registry = registry.clone();
            spawn_user_refresh(account.clone(), move |users| registry.replace_remote(users));
        }

        let budgets = Budgets::new(
            &settings.budget,
            settings.callers.iter().map(|c| c.name.as_str()),
        );
        if budgets.any() {
            // the tokenizer tables load in the background, off the first limited request
            tokio::task::spawn_blocking(budget::warm_up);
        }
        Ok(Arc::new(AppState {
            auth: Authenticator::new(&settings.callers),
            budgets,
            upstream,
            registry,
            content_safety,
            audit,
            usage,
            settings,
        }))
    }

    /// On SIGTERM, after the server stopped: journal the usage summaries still in memory (the
    /// open minute's too), then give both shippers up to `AUDIT_FLUSH_TIMEOUT_MS` together to
    /// empty their journals into Cosmos DB (what is left is shipped by the next start). Returns
    /// the abuse log's report.
    pub async fn shutdown(&self) -> crate::pipeline::audit::FlushReport {
        let deadline = self.settings.audit.flush_timeout;
        let usage = async {
            if let Some(u) = &self.usage {
                let r = u.shutdown(deadline).await;
                tracing::info!(
                    completed = r.completed,
                    pending_bytes = r.pending_bytes,
                    "usage summaries flushed"
                );
            }
        };
        let (report, ()) = tokio::join!(self.audit.shutdown(deadline), usage);
        report
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

/// What every connection serves: [`handle`] for every path, so our own parser sees the raw
/// path (a router's path extraction would decode `%2F` before we could refuse it).
///
/// No axum `Router` in between: with one handler for everything it only added a boxed future, a
/// routing lookup and response post-processing that hyper already does (`Content-Length` from
/// an exact body size, no body for `HEAD`) on every request.
#[derive(Clone)]
pub struct App(Arc<AppState>);

/// The app to [`serve`] over `state`.
pub fn router(state: Arc<AppState>) -> App {
    App(state)
}

/// What the server loop enforces on every connection, before a request reaches [`handle`].
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// How long a connection may take to deliver a request's headers, counted from when the
    /// server starts waiting for them: a half-open or silent connection is closed after it, and
    /// so is a keep-alive connection that stays idle that long (`HEADER_READ_TIMEOUT_MS`).
    pub header_read_timeout: Duration,
}

impl ServerLimits {
    pub fn from_settings(settings: &Settings) -> Self {
        ServerLimits {
            header_read_timeout: settings.header_read_timeout,
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(120),
        }
    }
}

/// Serve `app` on `listener` with the default [`ServerLimits`]; see [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    serve_with(listener, app, shutdown, grace, ServerLimits::default()).await
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting, let in-flight
/// requests and streams finish for at most `grace`, and return.
///
/// Our own accept loop rather than `axum::serve`: hyper's HTTP/1 header read timeout only runs
/// with a timer, which `axum::serve` does not give it, so a client that opens a connection and
/// never finishes its headers would hold it (and its buffer) forever. HTTP/1.1 only (no h2c).
pub async fn serve_with(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    limits: ServerLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};

    // HTTP/1.1 only: the Functions host proxies to the handler over HTTP/1.1, and protocol
    // detection (h1 or h2 prior knowledge) would wait for a silent connection's first bytes
    // with no timeout at all.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Per-connection failures (the peer reset before accept) and resource
                    // exhaustion (EMFILE): log, back off briefly so a full fd table does not
                    // spin the loop, and keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // TCP_NODELAY on every accepted connection: without it Nagle holds each small SSE event
        // until the client ACKs the previous one (up to the 40 ms delayed-ACK timer), so streamed
        // tokens arrive in bursts.
        let _ = tcp.set_nodelay(true);
        let state = app.0.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(state, request.map(Body::new)).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            // Errors here are the connection's (client went away, header timeout, malformed
            // request line): hyper already answered what it could; nothing to add.
            let _ = conn.await;
        });
    }
    drop(listener);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        connections = graceful.count(),
        "shutting down: draining in-flight requests"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over: dropping the remaining requests");
    }
    Ok(())
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
    /// The resource that answered, the attempts, the upstream latency.
    pub forwarded: Forwarded,
    /// The body's `user`, when the body was read.
    pub user: Option<String>,
    /// The body's `model` on a route without a deployment in its path, when the body was read.
    pub model: Option<String>,
    /// Where the meter leaves the answer's usage.
    pub usage: Option<Arc<UsageSlot>>,
    /// Where the answer's usage is summed for the `usage` container.
    pub summaries: Option<Arc<Summaries>>,
    /// A limited caller's remaining tokens, sent in `x-fwdproxy-remaining-tokens`.
    pub budget_remaining: Option<u64>,
    /// Set while a stage waits for the client's body: a timeout then is the client's (408),
    /// not AOAI's (504).
    reading_body: std::sync::atomic::AtomicBool,
    started: Instant,
    completed: bool,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let total_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let upstream_ms = self.forwarded.latency.map(|d| d.as_secs_f64() * 1000.0);
        let measured = self.usage.as_ref().and_then(|slot| slot.measured());
        let usage = match measured {
            Some(meter::Measured::Usage(u)) => Some(u),
            _ => None,
        };
        if let (Some(m), Some(summaries), Some(caller)) = (measured, &self.summaries, &self.caller)
        {
            summaries.add(
                caller,
                self.user.as_deref(),
                self.deployment.as_deref().or(self.model.as_deref()),
                m,
                unix_now(),
            );
        }
        tracing::info!(
            target: "request",
            request_id = self.request_id.to_str().unwrap_or(""),
            method = self.method.as_str(),
            caller = self.caller.as_deref(),
            deployment = self.deployment.as_deref(),
            operation = self.operation,
            status = self.status,
            error = self.error,
            user = self.user.as_deref(),
            model = self.model.as_deref(),
            usage_source = measured.map(|m| m.source()),
            estimated_tokens = match measured {
                Some(meter::Measured::Estimate(t)) => Some(t),
                _ => None,
            },
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            total_tokens = usage.map(|u| u.total_tokens),
            cached_tokens = usage.and_then(|u| u.cached_tokens),
            reasoning_tokens = usage.and_then(|u| u.reasoning_tokens),
            upstream = self.forwarded.upstream.as_deref(),
            attempts = self.forwarded.attempts,
            upstream_ms,
            total_ms,
            completed = self.completed,
        );
    }
}

/// Request headers over this many bytes in total (names, values, and 4 bytes of `: ` and CRLF
/// per line) are answered 431 and never forwarded. Application Gateway and the Functions host
/// refuse about as much; nothing legitimate sends more. (Beyond hyper's read buffer, ~400 KB,
/// or beyond 100 header lines, hyper itself answers a bare 431 before we see the request.)
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// A body declared over `MAX_BODY_BYTES` is read and thrown away, up to this many bytes and for
/// at most [`DRAIN_MAX_TIME`], before the 413 goes out. Clients that send their whole body before
/// reading (Python `http.client`, the OpenAI SDK's transport) then read the 413; closing on an
/// unread body would make the kernel reset the connection and the 413 would be lost (the SDK
/// retries a reset three times).
const DRAIN_MAX_BYTES: u64 = 16 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);

/// Run the request path for one request.
async fn handle(state: Arc<AppState>, mut request: Request) -> Response {
    let started = Instant::now();
    let request_id = request_id(request.headers());
    let mut log = RequestLog {
        request_id: request_id.clone(),
        method: request.method().clone(),
        caller: None,
        deployment: None,
        operation: None,
        status: 0,
        error: None,
        forwarded: Forwarded::default(),
        user: None,
        model: None,
        usage: None,
        summaries: None,
        budget_remaining: None,
        reading_body: std::sync::atomic::AtomicBool::new(false),
        started,
        completed: false,
    };

    // The edge, before any stage reads the request: oversized headers are refused outright; an
    // oversized declared body is held back here (every stage answers 413 from the declared
    // length without reading it) and drained after the answer is known.
    let mut oversized_body = None;
    let mut close = false;
    let outcome = if header_bytes(request.headers()) > MAX_HEADER_BYTES {
        // Its body (if any) is never read: the connection is not reused.
        close = true;
        Ok(Err(AppError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
        }))
    } else {
        match content_length(request.headers()) {
            Some(n)
                if n > state.settings.max_body_bytes && !expects_continue(request.headers()) =>
            {
                oversized_body = Some(std::mem::take(request.body_mut()));
            }
            // A chunked body's size shows only while it is read: whichever stage gives up on it
            // (over the limit, or an early answer), the rest is drained rather than reset.
            None if request.headers().contains_key(header::TRANSFER_ENCODING) => {
                let inner = std::mem::take(request.body_mut());
                *request.body_mut() = Body::new(DrainOnDrop {
                    inner,
                    ended: false,
                });
            }
            _ => {}
        }
        // AOAI_TIMEOUT_MS counts from the request's arrival, screening included, so nothing the
        // gate does can push an exchange past the platform's 230 s cut.
        let deadline = tokio::time::Instant::from_std(started + state.settings.upstream_timeout);
        let run = AssertUnwindSafe(pipeline(&state, request, &mut log, deadline)).catch_unwind();
        match tokio::time::timeout_at(deadline, run).await {
            Ok(outcome) => outcome,
            Err(_) if log.reading_body.load(std::sync::atomic::Ordering::Relaxed) => {
                tracing::warn!(
                    request_id = log.request_id.to_str().unwrap_or(""),
                    "timed out waiting for the client's body (AOAI_TIMEOUT_MS since the request arrived)"
                );
                Ok(Err(AppError::RequestTimeout))
            }
            Err(_) => {
                tracing::warn!(
                    request_id = log.request_id.to_str().unwrap_or(""),
                    "timed out (AOAI_TIMEOUT_MS since the request arrived)"
                );
                Ok(Err(AppError::GatewayTimeout))
            }
        }
    };
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
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    if let Some(left) = log.budget_remaining {
        response
            .headers_mut()
            .insert(budget::REMAINING_HEADER, HeaderValue::from(left));
    }
    if let Some(body) = oversized_body {
        discard(body, DRAIN_MAX_BYTES, DRAIN_MAX_TIME).await;
        close = true;
    }
    if close {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
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

/// Total size of the request headers as they came on the wire (near enough: `name: value\r\n`).
fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// `Expect: 100-continue`: the client waits for our word before sending its body, so a refusal
/// needs no drain (hyper sends `100 Continue` only once the body is read, which it never is).
fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A request body that, dropped before its end, has its rest read and thrown away in the
/// background (bounded as the declared-oversize drain), so the answer the stage gave is read by
/// a client still sending instead of being lost to a reset. Used for chunked bodies only: they
/// are rare, and this costs an allocation.
struct DrainOnDrop {
    inner: Body,
    ended: bool,
}

impl http_body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // An error ends it too: nothing more can be read from a broken body.
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.ended = true;
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

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        if self.ended || http_body::Body::is_end_stream(&self.inner) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let rest = std::mem::take(&mut self.inner);
            runtime.spawn(discard(rest, DRAIN_MAX_BYTES, DRAIN_MAX_TIME));
        }
    }
}

/// Read and throw away up to `max_bytes` of `body` for at most `within`.
async fn discard(body: Body, max_bytes: u64, within: Duration) {
    let drain = async move {
        let mut body = body;
        let mut seen = 0u64;
        while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > max_bytes {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, drain).await;
}

async fn pipeline(
    state: &AppState,
    request: Request,
    log: &mut RequestLog,
    deadline: tokio::time::Instant,
) -> Result<Response, AppError> {
    let (mut parts, body) = request.into_parts();
    let target = match route::resolve(&parts.method, parts.uri.path(), parts.uri.query())? {
        Route::Health => return Ok(health(state)),
        Route::Upstream(target) => target,
    };
    log.deployment = target.deployment.clone();
    log.operation = Some(target.operation.name());

    let caller = state.auth.authenticate(&parts.headers)?;
    log.caller = Some(caller.to_string());
    // every answer to a limited caller says what it has left (a reservation below updates it)
    log.budget_remaining = state.budgets.remaining(caller);

    let metered = meter::metered(target.operation);
    if metered {
        // the tap reads usage from the bytes AOAI sends: ask for them uncompressed
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    let limited = metered && state.budgets.limits(caller);
    let declared = content_length(&parts.headers);
    let gated = target.operation.carries_prompt() && state.inspects();
    let mut body = if gated {
        UpBody::Full(gate(state, &target, &parts, body, log).await?)
    } else if limited
        || (metered && declared.is_some_and(|n| n <= METER_BUFFER_BYTES))
        // with backups, a body small enough is read first so a 429 or 5xx can be retried
        || declared.is_some_and(|n| n > 0 && n <= state.upstream.replay_max_bytes())
    {
        UpBody::Full(read_body(state, &parts, body, log).await?)
    } else {
        UpBody::Stream(body)
    };

    let mut reservation: Option<Reservation> = None;
    let mut injected = false;
    if let (true, UpBody::Full(bytes)) = (metered, &body) {
        let mut facts = meter::body_facts(bytes);
        // moved, not cloned: below only the stream facts are read
        log.user = facts.as_mut().and_then(|f| f.user.take());
        if target.deployment.is_none() {
            log.model = facts.as_mut().and_then(|f| f.model.take());
        }
        if limited {
            // the gate, when it read the body, already held it to the same reading
            if !gated {
                budget::check_body(bytes)?;
            }
            let embeddings = matches!(
                target.operation,
                route::Operation::Embeddings | route::Operation::V1Embeddings
            );
            let default = state.budgets.default_completion();
            let tokens = if bytes.len() > budget::INLINE_COUNT_BYTES {
                let (bytes, deployment) = (bytes.clone(), target.deployment.clone());
                tokio::task::spawn_blocking(move || {
                    budget::estimate_bytes(&bytes, deployment.as_deref(), embeddings, default)
                })
                .await
                .map_err(|_| AppError::Internal)?
            } else {
                budget::estimate_bytes(bytes, target.deployment.as_deref(), embeddings, default)
            };
            match state.budgets.reserve(caller, tokens) {
                Ok(admitted) => {
                    log.budget_remaining = Some(admitted.remaining);
                    reservation = Some(admitted.reservation);
                }
                Err(refused) => {
                    log.budget_remaining = Some(refused.remaining);
                    return Err(refused.error);
                }
            }
        }
        if let (true, Some(facts)) = (meter::asks_for_usage(target.operation), &facts) {
            if let Some(with_usage) = meter::add_include_usage(bytes, facts) {
                body = UpBody::Full(with_usage);
                injected = true;
            }
        }
    }

    // What the request may use, against each resource's x-ratelimit-remaining-tokens: the
    // reservation when there is one, else about a token per 4 bytes of body (AOAI counts the
    // prompt and max_tokens; the body is a fair floor for the prompt).
    // Operations AOAI does not count in tokens (audio, images, files) need none.
    let need = match (&reservation, &body) {
        _ if !metered => 0,
        (Some(r), _) => r.reserved(),
        (None, UpBody::Full(bytes)) => bytes.len() as u64 / 4,
        (None, UpBody::Stream(_)) => declared.unwrap_or(0) / 4,
    };
    // the deployment of a v1 route is the body's `model`: spillover keeps its rate-limit state
    // per deployment, so one tenant's throttled model does not send another's elsewhere
    let model = match (&target.deployment, &log.model, &body) {
        (Some(_), _, _) => None,
        (None, Some(m), _) => Some(m.clone()),
        (None, None, UpBody::Full(bytes)) if state.upstream.spills() => {
            meter::body_facts(bytes).and_then(|f| f.model)
        }
        _ => None,
    };
    // A client that goes away while the request is with AOAI (this future dropped before the
    // answer's headers) does not stop AOAI generating and billing it: the reservation stays
    // charged. An answer or an error returned here settles or refunds it as usual (red team: a
    // disconnect before the headers gave the whole reservation back).
    let mut in_flight = KeptIfCancelled(reservation);
    let response = state
        .upstream
        .forward(
            &target,
            model.as_deref(),
            &parts,
            body,
            &log.request_id,
            deadline,
            need,
            &mut log.forwarded,
        )
        .await;
    let reservation = in_flight.0.take();
    let response = response?;
    if !metered {
        return Ok(response);
    }
    let slot = Arc::new(UsageSlot::default());
    log.usage = Some(slot.clone());
    log.summaries = state.usage.as_ref().map(|u| u.shared());
    let (mut head, inner) = response.into_parts();
    let content_type = head.headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes());
    let tap = Meter::new(
        inner,
        head.status,
        content_type,
        injected,
        slot,
        reservation,
    );
    if injected {
        // events are removed: the length AOAI declared (never for SSE in practice) no longer holds
        head.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(head, Body::new(tap)))
}

/// A reservation held while the request is with AOAI: dropped with it (the request future was
/// cancelled: the client went away), it stays charged instead of being refunded.
struct KeptIfCancelled(Option<Reservation>);

impl Drop for KeptIfCancelled {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.settle(None);
        }
    }
}

/// A body of a token-metered operation of at most this many declared bytes is buffered even
/// with the gate off (to read `user` and ask a stream for its usage). Chat bodies are small;
/// the cost is one copy of a few kilobytes.
pub const METER_BUFFER_BYTES: u64 = 256 * 1024;

/// Read a whole body for the meter and the budget (the gate is off): over `MAX_BODY_BYTES` is
/// 413, a broken body 400, as in the gate.
/// The whole body, at most `limit` bytes, marking the wait as the client's (see
/// [`RequestLog::reading_body`]).
async fn collect_body(
    log: &RequestLog,
    body: Body,
    limit: u64,
) -> Result<http_body_util::Collected<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
    use std::sync::atomic::Ordering;
    log.reading_body.store(true, Ordering::Relaxed);
    let collected =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit as usize)).await;
    log.reading_body.store(false, Ordering::Relaxed);
    collected
}

async fn read_body(
    state: &AppState,
    parts: &http::request::Parts,
    body: Body,
    log: &RequestLog,
) -> Result<Bytes, AppError> {
    let limit = state.settings.max_body_bytes;
    if content_length(&parts.headers).is_some_and(|n| n > limit) {
        return Err(AppError::PayloadTooLarge { limit });
    }
    match collect_body(log, body, limit).await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(AppError::PayloadTooLarge { limit })
        }
        Err(_) => Err(AppError::InvalidBody(
            "The request body could not be read".into(),
        )),
    }
}

/// Policy and content safety on a buffered body; every refusal is audited, and so is a request
/// let through unscreened by `CONTENT_SAFETY_FAIL_OPEN`. Returns the client's bytes, exactly
/// those that were read and screened, for forwarding.
async fn gate(
    state: &AppState,
    target: &UpstreamTarget,
    parts: &http::request::Parts,
    body: Body,
    log: &RequestLog,
) -> Result<Bytes, AppError> {
    let limit = state.settings.max_body_bytes;
    let too_large = || async {
        let error = AppError::PayloadTooLarge { limit };
        let details = refusal_details(&error);
        record_with_fields(
            state,
            target,
            parts,
            log,
            Reason::RequestTooLarge,
            &Inspected::default(),
            details,
        )
        .await
        .err()
        .unwrap_or(error)
    };
    if content_length(&parts.headers).is_some_and(|n| n > limit) {
        return Err(too_large().await);
    }
    let bytes = match collect_body(log, body, limit).await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large().await),
        // the client went away or broke the framing: refused, and recorded like the rest
        Err(_) => {
            let error = AppError::InvalidBody("The request body could not be read".into());
            let details = refusal_details(&error);
            record_with_fields(
                state,
                target,
                parts,
                log,
                Reason::InvalidBody,
                &Inspected::default(),
                details,
            )
            .await?;
            return Err(error);
        }
    };

    if target.operation == Operation::FileUpload {
        // boxed for the same reason as the record: uploads are rare, their future is large
        return Box::pin(gate_upload(state, target, parts, bytes, log)).await;
    }

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
        Err(refusal) => return Err(refuse(state, target, parts, log, *refusal).await),
    };

    let Some(cs) = screening else {
        return Ok(bytes);
    };
    if inspected.prompt.is_empty() {
        return Ok(bytes);
    }
    match cs
        .screen(&inspected.prompt, target.operation.shieldable())
        .await
    {
        Ok(Verdict::Allowed) => Ok(bytes),
        Ok(Verdict::Blocked {
            reason,
            result,
            details,
        }) => {
            record_with_fields(state, target, parts, log, reason, &inspected, details).await?;
            Err(AppError::ContentFiltered(result))
        }
        Ok(limit @ (Verdict::TooLong | Verdict::Busy)) => {
            let rid = log.request_id.to_str().unwrap_or("");
            // a limit refusal is never forwarded, and is recorded like every refusal
            let error = cs.on_limit(&limit, rid).unwrap_or(AppError::Internal);
            let reason = limit_reason(&limit);
            let details = refusal_details(&error);
            record_with_fields(state, target, parts, log, reason, &inspected, details).await?;
            Err(error)
        }
        Err(unavailable) => {
            let rid = log.request_id.to_str().unwrap_or("");
            if let Some(e) = cs.on_unavailable(&unavailable, rid) {
                return Err(e);
            }
            // failing open: the request goes on, and the record says nobody screened it
            let details = serde_json::json!({
                "unscreened": true,
                "why": unavailable.why,
            });
            record_with_fields(
                state,
                target,
                parts,
                log,
                Reason::PassedUnscreened,
                &inspected,
                details,
            )
            .await?;
            Ok(bytes)
        }
    }
}

/// How many batch lines are screened at once (each is one or two Content Safety calls).
const BATCH_SCREENING_CONCURRENCY: usize = 4;

/// The gate for a file upload ([`batch`]): every line of a batch input file read by its
/// operation's entry, user-checked and screened as the online call would be. Any line refused
/// refuses the whole upload (each such line recorded); a screening limit or outage is answered
/// as for one online request.
async fn gate_upload(
    state: &AppState,
    target: &UpstreamTarget,
    parts: &http::request::Parts,
    bytes: Bytes,
    log: &RequestLog,
) -> Result<Bytes, AppError> {
    let screening = state.content_safety.as_ref();
    let lines = match batch::read_upload(
        &parts.headers,
        &bytes,
        &state.settings.policy,
        &state.registry,
        screening.is_some(),
    ) {
        Ok(Upload::Unscreened { purpose }) => {
            tracing::info!(
                purpose,
                "file upload passed unread (UPLOAD_UNSCREENED_PURPOSES)"
            );
            return Ok(bytes);
        }
        Ok(Upload::Batch { lines, refused }) => (lines, refused),
        Err(Refused::Whole(refusal)) => {
            return Err(refuse(state, target, parts, log, *refusal).await)
        }
    };
    let (lines, refused) = lines;
    let mut offenders = Vec::with_capacity(refused.len());
    for line in &refused {
        let mut details = refusal_details(&line.refusal.error);
        details["custom_id"] = line.custom_id.clone().into();
        details["line"] = line.number.into();
        record_with_fields(
            state,
            target,
            parts,
            log,
            line.refusal.reason,
            &line.refusal.inspected,
            details,
        )
        .await?;
        offenders.push((
            line.number,
            batch::line_name(line.number, line.custom_id.as_deref()),
            line.refusal.error.code(),
        ));
    }
    let Some(cs) = screening else {
        return match offenders.is_empty() {
            true => Ok(bytes),
            false => Err(batch::refusal(&offenders)),
        };
    };
    // chunks joined in turn rather than a buffered stream: the stream's closures make the
    // handler's future fail axum's `Send` bound (a higher-ranked lifetime rustc cannot prove)
    let todo: Vec<&batch::Line> = lines
        .iter()
        .filter(|l| !l.inspected.prompt.is_empty())
        .collect();
    let mut verdicts = Vec::with_capacity(todo.len());
    for chunk in todo.chunks(BATCH_SCREENING_CONCURRENCY) {
        let screens: Vec<_> = chunk
            .iter()
            .map(|l| cs.screen(&l.inspected.prompt, l.operation.shieldable()))
            .collect();
        let out = futures_util::future::join_all(screens).await;
        verdicts.extend(chunk.iter().copied().zip(out));
    }
    let rid = log.request_id.to_str().unwrap_or("");
    let mut limit_error = None;
    for (line, verdict) in verdicts {
        let tag = |mut details: serde_json::Value| {
            if !details.is_object() {
                details = serde_json::json!({ "verdict": details });
            }
            details["custom_id"] = line.custom_id.clone().into();
            details["line"] = line.number.into();
            details
        };
        match verdict {
            Ok(Verdict::Allowed) => {}
            Ok(Verdict::Blocked {
                reason, details, ..
            }) => {
                record_with_fields(
                    state,
                    target,
                    parts,
                    log,
                    reason,
                    &line.inspected,
                    tag(details),
                )
                .await?;
                offenders.push((
                    line.number,
                    batch::line_name(line.number, Some(&line.custom_id)),
                    "content_filter",
                ));
            }
            Ok(limit @ (Verdict::TooLong | Verdict::Busy)) => {
                let error = cs.on_limit(&limit, rid).unwrap_or(AppError::Internal);
                let reason = limit_reason(&limit);
                let details = tag(refusal_details(&error));
                record_with_fields(state, target, parts, log, reason, &line.inspected, details)
                    .await?;
                limit_error.get_or_insert(error);
            }
            Err(unavailable) => {
                if let Some(e) = cs.on_unavailable(&unavailable, rid) {
                    limit_error.get_or_insert(e);
                    continue;
                }
                let details = tag(serde_json::json!({
                    "unscreened": true,
                    "why": unavailable.why,
                }));
                record_with_fields(
                    state,
                    target,
                    parts,
                    log,
                    Reason::PassedUnscreened,
                    &line.inspected,
                    details,
                )
                .await?;
            }
        }
    }
    if !offenders.is_empty() {
        offenders.sort_by_key(|o| o.0);
        return Err(batch::refusal(&offenders));
    }
    match limit_error {
        Some(e) => Err(e),
        None => Ok(bytes),
    }
}

/// Hand a record to [`record_abuse`], with `details.prompt_fields` (where each piece of the
/// captured prompt came from: field, role, length) when prompt capture is on. Async so the gate
/// already awaits it where `record_abuse` is to await durability.
async fn record_with_fields(
    state: &AppState,
    target: &UpstreamTarget,
    parts: &http::request::Parts,
    log: &RequestLog,
    reason: Reason,
    inspected: &Inspected,
    mut details: serde_json::Value,
) -> Result<(), AppError> {
    if state.audit.capture_prompt() && !inspected.prompt.is_empty() {
        if !details.is_object() {
            details = serde_json::json!({ "verdict": details });
        }
        details["prompt_fields"] = inspected.prompt.fields();
    }
    // Boxed: the durable write's future is most of a request future's size (the journal and
    // Cosmos paths), and every request future is moved whole, refusal or not. Only a refusal
    // pays for the box.
    Box::pin(record_abuse(
        state, target, parts, log, reason, inspected, details,
    ))
    .await
}

/// Record a policy refusal and return the error to answer with (the audit's own error when the
/// record could not be made durable).
async fn refuse(
    state: &AppState,
    target: &UpstreamTarget,
    parts: &http::request::Parts,
    log: &RequestLog,
    refusal: policy::Refusal,
) -> AppError {
    let details = refusal_details(&refusal.error);
    match record_with_fields(
        state,
        target,
        parts,
        log,
        refusal.reason,
        &refusal.inspected,
        details,
    )
    .await
    {
        Ok(()) => refusal.error,
        Err(audit) => audit,
    }
}

/// The record reason of a screening-limit verdict.
fn limit_reason(limit: &Verdict) -> Reason {
    match limit {
        Verdict::Busy => Reason::ScreeningBusy,
        _ => Reason::TooLongToScreen,
    }
}

/// The record's `details` for a refusal the handler itself decided.
fn refusal_details(error: &AppError) -> serde_json::Value {
    serde_json::json!({
        "error": error.code(),
        "message": error.to_string(),
    })
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

/// The health route: 200 JSON; with `HEALTH_REFLECTS_CAPACITY`, 503 (AOAI-shaped, with
/// `retry-after`) while every AOAI resource of this handler is cooling down or circuit-open, so
/// the gateway's probe takes this instance out of rotation until one recovers.
fn health(state: &AppState) -> Response {
    if state.settings.spillover.health_reflects_capacity {
        if let Some(wait) = state.upstream.no_capacity() {
            return AppError::UpstreamUnavailable {
                retry_after_ms: (wait.as_millis() as u64).max(1),
            }
            .into_response();
        }
    }
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

/// `x-request-id` as a ready name: a `&str` name is parsed and checked on every lookup.
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The client's `x-request-id` when it is a sane token, a fresh UUID otherwise.
pub fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Source;

    /// Every request's future is created and moved whole (hyper keeps it in the connection's
    /// task), so its size is paid on every request: 11.7 KB (debug build) while the abuse
    /// record's durable write was inline in it, 2.7 KB with that write boxed. A refusal path
    /// that grows it back fails here.
    #[tokio::test]
    async fn request_futures_stay_small() {
        let dir = tempfile::tempdir().unwrap();
        let src = Source::from_map([
            ("AOAI_HOSTNAME", "http://127.0.0.1:9"),
            ("AOAI_INAPIKEY", "test-internal-key-0123456789"),
            ("AOAI_OUTAPIKEY", "real-aoai-key-zyxwvutsrqponm"),
            ("AUDIT_DIR", dir.path().to_str().unwrap()),
            ("CONTENT_SAFETY_ENDPOINT", "http://127.0.0.1:9"),
            ("CONTENT_SAFETY_KEY", "content-safety-key"),
            ("USER_CHECK", "present"),
        ]);
        let state = AppState::new(Settings::from_source(&src).unwrap())
            .await
            .unwrap();
        let handle = handle(state, Request::new(Body::empty()));
        let size = std::mem::size_of_val(&handle);
        assert!(size <= 6 * 1024, "the request future is {size} bytes");
    }
}
