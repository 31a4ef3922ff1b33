//! Stage 8, **forward**: runs last, for requests every earlier stage let through.
//!
//! Calls AOAI with the real key (or the managed identity's token), streaming the request body up
//! and the response body down as they flow (no buffering: each SSE event reaches the client when
//! AOAI sends it). AOAI's status and headers pass back unchanged but for hop-by-hop headers
//! ([`upstream`] holds one exchange and the header hygiene).
//!
//! # Spillover
//! With `AOAI_BACKUPS` the handler has an ordered list of AOAI resources: the primary
//! (`AOAI_HOSTNAME`) first, then the backups. Each has a state in the [`pool`] fed by what it
//! answers: a 429 cools the deployment down for its `retry-after-ms`, a 5xx fences the deployment
//! and a failed connection opens the resource's circuit, low `x-ratelimit-remaining-*` steer requests for the
//! deployment to the next resource early. A request goes to the first usable resource in order
//! and, when that answers 429 or 5xx or cannot be reached, to the next one — before anything of
//! the answer went to the client, and at most once per resource. The request body is sent again
//! for that, so only a replayable body is retried: one an earlier stage buffered, one with no
//! body, or one declared at most `SPILLOVER_REPLAY_MAX_BYTES` (read before the first attempt
//! when backups exist); a chunked or larger body streams to the first usable resource once. An
//! answer that started (a 200 whose stream then breaks) is never retried: the client sees the
//! cut.
//!
//! When no resource is left to try: if every resource is cooling down for this deployment, the
//! client gets our own 429 (AOAI-shaped, `retry-after` / `retry-after-ms` the shortest wait
//! among them, at least a second); otherwise the last answer passes through unchanged (502 when
//! it was no answer). When none was usable to begin with and not all are cooling down (some
//! circuit open), the one whose circuit opened earliest is tried rather than answering 503. Without backups none of this applies: every
//! request goes to the primary, whatever its state, and its answer passes through.
//!
//! Short-circuits with 400 (the client's body broke while streaming up), 413 (body over the
//! limit), 429 (every resource cooling down), 502 (AOAI unreachable or broke the exchange before
//! answering), 503 (no resource usable) and 504 (no answer within `AOAI_TIMEOUT_MS` of the
//! request's arrival, enforced by the caller's deadline). Adds to the request context the
//! resource that answered, the attempts made, and the upstream latency (from the first attempt to
//! the answer's headers).

pub mod pool;
pub mod settings;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;

use crate::clients::http::{https_client, BoxError, HttpsClient};
use crate::error::AppError;
use crate::pipeline::route::{Operation, UpstreamTarget};
use crate::settings::{AoaiAuth, Settings};
use pool::{Health, Outcome, Pick, Tuning, UpstreamStats};
use upstream::{Endpoint, Failure};

pub use settings::SpilloverSettings;
pub use upstream::{content_length, is_hop_by_hop, sensitive, UpstreamAuth};

/// The body to send upstream: the client's stream as it flows, or bytes an earlier stage
/// buffered to inspect (sent as they are, with their exact length).
pub enum UpBody {
    Stream(Body),
    Full(Bytes),
}

/// What the forward stage adds to the request's log line.
#[derive(Debug, Default)]
pub struct Forwarded {
    /// From the first attempt to the headers of the answer the client got.
    pub latency: Option<Duration>,
    /// The resource whose answer the client got (host and port), or the last one tried.
    pub upstream: Option<Arc<str>>,
    /// Exchanges started (1 without a retry; 0 when no resource was usable).
    pub attempts: u32,
}

/// The upstream side: the pooled client, the primary AOAI resource and its backups, built once
/// at startup.
pub struct Upstream {
    client: HttpsClient,
    /// The primary first, then the backups in order.
    endpoints: Vec<Endpoint>,
    tuning: Tuning,
    max_body_bytes: u64,
    replay_max_bytes: u64,
}

/// Releases a half-open probe whose request ended without an outcome (dropped at the deadline or
/// when the client went away), so the next request probes.
struct ProbeGuard<'a> {
    health: Option<&'a Health>,
}

impl ProbeGuard<'_> {
    fn done(&mut self) {
        self.health = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.health {
            h.release_probe(Instant::now());
        }
    }
}

impl Upstream {
    /// The primary with `auth`, and the backups of `AOAI_BACKUPS` with credentials that follow
    /// from the settings alone: the managed identity's token, or `AOAI_BACKUP_OUTAPIKEYS`. Keys
    /// from Key Vault (`AOAI_BACKUP_OUTAPIKEY_SECRET_URIS`) are fetched by the caller and given to
    /// [`Upstream::with_backups`].
    pub fn new(settings: &Settings, auth: UpstreamAuth) -> Result<Self, BoxError> {
        let spill = &settings.spillover;
        let backups: Vec<UpstreamAuth> = match (&auth, settings.aoai_auth) {
            _ if spill.backups.is_empty() => Vec::new(),
            (UpstreamAuth::ManagedIdentity(tokens), _) => {
                vec![UpstreamAuth::ManagedIdentity(tokens.clone()); spill.backups.len()]
            }
            (_, AoaiAuth::Key) if !spill.backup_keys.is_empty() => spill
                .backup_keys
                .iter()
                .map(|k| sensitive(k.expose()).map(UpstreamAuth::Key))
                .collect::<Result<_, _>>()
                .map_err(|_| "AOAI_BACKUP_OUTAPIKEYS holds a key that is not a header value")?,
            _ => {
                return Err(
                    "the backups' keys come from Key Vault: build with Upstream::with_backups"
                        .into(),
                )
            }
        };
        Self::with_backups(settings, auth, backups)
    }

    /// The primary with `auth` and one backup of `AOAI_BACKUPS` per entry of `backups`, in order.
    pub fn with_backups(
        settings: &Settings,
        auth: UpstreamAuth,
        backups: Vec<UpstreamAuth>,
    ) -> Result<Self, BoxError> {
        let spill = &settings.spillover;
        if backups.len() != spill.backups.len() {
            return Err(format!(
                "{} backup credentials for {} backups",
                backups.len(),
                spill.backups.len()
            )
            .into());
        }
        let mut endpoints = vec![Endpoint::new(&settings.aoai_base, auth)?];
        for (base, auth) in spill.backups.iter().zip(backups) {
            endpoints.push(Endpoint::new(base, auth)?);
        }
        Ok(Upstream {
            client: https_client(settings.connect_timeout, 256)?,
            endpoints,
            tuning: spill.tuning,
            max_body_bytes: settings.max_body_bytes,
            replay_max_bytes: spill.replay_max_bytes,
        })
    }

    /// Whether there are backups to spill over to.
    pub fn spills(&self) -> bool {
        self.endpoints.len() > 1
    }

    /// The largest declared body read before the first attempt so it can be retried
    /// (`SPILLOVER_REPLAY_MAX_BYTES`); 0 without backups.
    pub fn replay_max_bytes(&self) -> u64 {
        if self.spills() {
            self.replay_max_bytes
        } else {
            0
        }
    }

    /// Every resource's counters and state, the primary first.
    pub fn stats(&self) -> Vec<UpstreamStats> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|e| e.health.stats(&e.name, now))
            .collect()
    }

    /// `Some(wait)` while every resource is circuit-open or has every deployment it tracks
    /// cooling down: the shortest time until one may take requests again (what the health route
    /// reports with `HEALTH_REFLECTS_CAPACITY`).
    pub fn no_capacity(&self) -> Option<Duration> {
        let now = Instant::now();
        soonest(
            self.endpoints
                .iter()
                .map(|e| e.health.resource_blocked_until(now)),
            now,
        )
    }

    /// `Some(shortest wait)` when no resource may take a request for deployment `key` now.
    fn blocked(&self, key: &str, now: Instant) -> Option<Duration> {
        let each = self.endpoints.iter();
        soonest(
            each.map(|e| e.health.blocked_until(key, now, &self.tuning)),
            now,
        )
    }

    /// `Some(shortest wait)` when every resource is cooling down for deployment `key`.
    fn all_cooling(&self, key: &str, now: Instant) -> Option<Duration> {
        soonest(
            self.endpoints
                .iter()
                .map(|e| e.health.cooling_until(key, now)),
            now,
        )
    }

    /// Forward one request (see the module doc for the order, the retries and the answers).
    /// `deadline` is `AOAI_TIMEOUT_MS` after the request arrived: the caller bounds this call by
    /// it (answering 504), and the streamed answer is cut there. `need` is the tokens the request
    /// may use (its budget reservation or a rough estimate; 0 unknown), compared with what each
    /// resource said it has left. `model` is the body's `model` when an earlier stage read it:
    /// on routes without a deployment in the path (v1) it names the deployment whose rate
    /// limits apply.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        target: &UpstreamTarget,
        model: Option<&str>,
        parts: &http::request::Parts,
        body: UpBody,
        request_id: &HeaderValue,
        deadline: tokio::time::Instant,
        need: u64,
        trace: &mut Forwarded,
    ) -> Result<Response, AppError> {
        let limit = self.max_body_bytes;
        let declared = content_length(&parts.headers);
        if declared.is_some_and(|n| n > limit) {
            return Err(AppError::PayloadTooLarge { limit });
        }
        let mut headers = upstream::upstream_headers(&parts.headers);
        headers.insert(upstream::X_REQUEST_ID, request_id.clone());

        // What can be sent more than once: buffered bytes, or no body at all.
        let bodiless_get = parts.method == http::Method::GET && declared.is_none();
        let (full, mut stream) = match body {
            UpBody::Full(bytes) => (Some(bytes), None),
            UpBody::Stream(_) if declared == Some(0) || bodiless_get => (None, None),
            UpBody::Stream(body) => (None, Some(body)),
        };
        let replayable = stream.is_none();

        // rate limits are per deployment; v1 routes carry it in the body's `model` (`""` when
        // the body was not read: one key for those)
        let key = deployment_key(target.deployment.as_deref().or(model));
        // objects stored on one resource (files, batches, stored responses) stay with it
        let n = if pinned(target.operation) {
            1
        } else {
            self.endpoints.len()
        };
        let healths: Vec<&Health> = match n {
            1 => Vec::new(),
            _ => self.endpoints[..n].iter().map(|e| &e.health).collect(),
        };
        let mut tried = vec![false; n];
        let mut last: Option<Result<http::Response<hyper::body::Incoming>, AppError>> = None;
        let mut first_started: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let pick = if n == 1 {
                // no spillover: the primary takes every request, whatever its state
                (!tried[0]).then_some(Pick {
                    index: 0,
                    probe: false,
                })
            } else if !replayable && trace.attempts > 0 {
                None
            } else {
                pool::pick(&healths, &tried, now, key, need, &self.tuning).or_else(|| {
                    // nothing usable before the first attempt, and not every resource cooling
                    // down: open circuits alone never refuse a client, the one that opened
                    // earliest is tried
                    (trace.attempts == 0)
                        .then(|| pool::fallback(&healths, &tried, now, key, &self.tuning))
                        .flatten()
                })
            };
            let Some(pick) = pick else { break };
            tried[pick.index] = true;
            let endpoint = &self.endpoints[pick.index];
            let mut probe = ProbeGuard {
                health: pick.probe.then_some(&endpoint.health),
            };
            trace.attempts += 1;
            trace.upstream = Some(endpoint.name.clone());
            let started = *first_started.get_or_insert(now);
            endpoint
                .health
                .counters
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);

            // the last attempt this request can make takes the headers; others copy them
            let mut attempt_headers = if n == 1 || !replayable {
                std::mem::take(&mut headers)
            } else {
                headers.clone()
            };
            let body = upstream::request_body(
                full.as_ref(),
                stream.take(),
                declared,
                &mut attempt_headers,
                limit,
            );
            let result = endpoint
                .call(
                    &self.client,
                    target,
                    &parts.method,
                    attempt_headers,
                    body,
                    limit,
                )
                .await;
            let ended = Instant::now();
            match result {
                Ok(answer) => {
                    let outcome = Outcome::of(answer.status(), answer.headers());
                    endpoint.health.record(
                        outcome,
                        key,
                        pool::remaining(answer.headers()),
                        ended,
                        &self.tuning,
                    );
                    probe.done();
                    trace.latency = Some(ended.duration_since(started));
                    if !outcome.retryable() || n == 1 || !replayable {
                        return upstream::pass_through(answer, deadline);
                    }
                    tracing::info!(
                        request_id = request_id.to_str().unwrap_or(""),
                        upstream = &*endpoint.name,
                        status = answer.status().as_u16(),
                        "upstream refused or failed: trying the next one"
                    );
                    last = Some(Ok(answer));
                }
                Err(Failure::Client(e)) => return Err(e),
                Err(Failure::Upstream) => {
                    endpoint.health.record(
                        Outcome::Failed,
                        key,
                        pool::Remaining::default(),
                        ended,
                        &self.tuning,
                    );
                    probe.done();
                    if n == 1 || !replayable {
                        return Err(AppError::BadGateway);
                    }
                    last = Some(Err(AppError::BadGateway));
                }
            }
        }

        let now = Instant::now();
        if let Some(wait) = self.all_cooling(key, now).filter(|_| n > 1) {
            // every resource asked for time: say the soonest (only reached with backups)
            return Err(AppError::AllThrottled {
                retry_after_ms: millis(wait).max(MIN_CLIENT_WAIT_MS),
            });
        }
        match last {
            Some(Ok(answer)) => upstream::pass_through(answer, deadline),
            Some(Err(e)) => Err(e),
            None => Err(AppError::UpstreamUnavailable {
                retry_after_ms: millis(self.blocked(key, now).unwrap_or(Duration::from_secs(1))),
            }),
        }
    }
}

/// Operations on objects stored in one AOAI resource: a file uploaded there, a batch running
/// there, a response stored there. They always go to the primary and are never retried
/// elsewhere, where the object does not exist (a 404 instead of the primary's own answer), and an
/// upload or a batch never lands on a resource the follow-up calls do not reach.
fn pinned(op: Operation) -> bool {
    matches!(
        op,
        Operation::FileUpload
            | Operation::Files
            | Operation::BatchCreate
            | Operation::Batches
            | Operation::ResponseItem
            | Operation::V1ResponseItem
    )
}

/// The soonest of `instants` as a wait from `now`, when every one is `Some`.
fn soonest(instants: impl Iterator<Item = Option<Instant>>, now: Instant) -> Option<Duration> {
    let mut first: Option<Instant> = None;
    for until in instants {
        let until = until?;
        first = Some(first.map_or(until, |f| f.min(until)));
    }
    first.map(|f| f.saturating_duration_since(now))
}

/// The shortest wait the handler's own 429 names: a client told to retry at once would hit
/// the same cooling resources in a tight loop.
const MIN_CLIENT_WAIT_MS: u64 = 1000;

/// The longest deployment name kept as a key (names come from clients; AOAI's are far shorter).
const MAX_KEY_BYTES: usize = 128;

/// The pool's key for a deployment name: cut to [`MAX_KEY_BYTES`] at a character boundary.
fn deployment_key(name: Option<&str>) -> &str {
    let name = name.unwrap_or("");
    if name.len() <= MAX_KEY_BYTES {
        return name;
    }
    let mut end = MAX_KEY_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A wait in whole milliseconds, at least 1 (a `retry-after-ms: 0` would invite a busy loop).
fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}
