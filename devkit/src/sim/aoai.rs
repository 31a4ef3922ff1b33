//! Azure OpenAI simulator: one simulated AOAI *resource* (one per backend in the local set).
//!
//! Speaks the data-plane shapes the handler forwards and the SDKs parse:
//! - classic `/openai/deployments/{d}/chat/completions`, `…/extensions/chat/completions`,
//!   `…/completions`, `…/embeddings` (`api-version` required), and the v1 surface
//!   `/openai/v1/chat/completions`, `…/completions`, `…/embeddings`, `…/responses`,
//!   `GET …/models` (deployment in the body's `model`);
//! - auth by `api-key` or `Authorization: Bearer <key>` → 401 in AOAI's words otherwise;
//! - chat and completions, non-streaming and SSE: the first event carries only
//!   `prompt_filter_results`, then a role chunk, one chunk per token, a finish chunk, the
//!   `stream_options.include_usage` usage chunk (`choices: []`), then `data: [DONE]`;
//! - embeddings: deterministic unit vectors (same input → same vector) of the model's dimension
//!   (1536 for ada-002 and 3-small, 3072 for 3-large), `dimensions` honoured the way OpenAI
//!   does it (the native vector cut and re-normalised), `encoding_format: base64` (the default of
//!   the OpenAI Python SDK) as little-endian f32;
//! - token counts from [`super::tokens`]: `usage.completion_tokens` equals the number of
//!   streamed content chunks and the token count of the text;
//! - per-deployment requests-per-minute and tokens-per-minute limits (token buckets holding one
//!   minute of quota, refilled continuously) → 429 with `retry-after` / `retry-after-ms`;
//!   every answer carries `x-ratelimit-remaining-requests` / `-tokens`;
//! - time per token and a first-token delay, so streaming looks like streaming;
//! - failures on demand, per request by header or at a configured rate:
//!   `x-sim-fail: 500|502|503|…` (that status, AOAI-shaped), `slow` (wait
//!   [`AoaiConfig::slow`] first, or `slow:<ms>`), `reset` (the connection is cut mid-body);
//!   `x-sim-ratelimit: <seconds>` answers 429 with that `retry-after` at once.
//!   The handler forwards unknown headers unchanged, so tests set these through the whole set.
//!
//! Answers are deterministic for a given prompt. A last user message starting `echo:` is
//! answered with exactly the rest of the message (handy for exact assertions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{json, Value};

use super::tokens;
use super::{base64_encode, run_seed, stable_hash, Recorder, Seen, SplitMix};
use crate::server::{self, json_response, RunningServer};

/// The largest request body the simulator reads (AOAI's own limit is far lower for JSON).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Upper bound on any sleep the simulator schedules for one request, whatever the knobs say.
const MAX_DELAY: Duration = Duration::from_secs(180);
/// Upper bound on tokens generated per choice, and on `n`.
const MAX_COMPLETION_TOKENS: usize = 4096;
const MAX_CHOICES: usize = 10;
/// AOAI accepts at most 2048 inputs per embeddings call.
const MAX_EMBEDDING_INPUTS: usize = 2048;

/// What a forced or random failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Answer with this 5xx status and an AOAI-shaped body.
    Status(u16),
    /// Wait first (the given milliseconds, or the configured `slow`), then answer normally.
    Slow(Option<u64>),
    /// Start the answer, then cut the connection mid-body.
    Reset,
}

impl std::str::FromStr for FailureKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "reset" {
            return Ok(FailureKind::Reset);
        }
        if s == "slow" {
            return Ok(FailureKind::Slow(None));
        }
        if let Some(ms) = s.strip_prefix("slow:") {
            return ms
                .parse()
                .map(|ms| FailureKind::Slow(Some(ms)))
                .map_err(|_| format!("slow:<ms> needs a number, got {s:?}"));
        }
        match s.parse::<u16>() {
            Ok(code) if (500..=599).contains(&code) => Ok(FailureKind::Status(code)),
            _ => Err(format!(
                "failure kind must be a 5xx status, slow, slow:<ms> or reset, got {s:?}"
            )),
        }
    }
}

/// Knobs of one simulated resource.
#[derive(Debug, Clone)]
pub struct AoaiConfig {
    /// Resource name, returned in `x-sim-resource` (and used in answers).
    pub name: String,
    /// Returned in `x-ms-region`, as AOAI does.
    pub region: String,
    /// The key callers (the handler) must present.
    pub key: String,
    /// Deployments that exist; `None` accepts any name.
    pub deployments: Option<Vec<String>>,
    /// Delay between generated tokens.
    pub time_per_token: Duration,
    /// Delay before the first token (time to first byte of content).
    pub first_token: Duration,
    /// Tokens per minute per deployment; 0 = unlimited.
    pub tpm: u64,
    /// Requests per minute per deployment; 0 = unlimited.
    pub rpm: u64,
    /// Fraction of requests (0..=1) that fail with [`AoaiConfig::failure_kind`].
    pub failure_rate: f64,
    pub failure_kind: FailureKind,
    /// How long `slow` waits.
    pub slow: Duration,
}

impl Default for AoaiConfig {
    fn default() -> Self {
        AoaiConfig {
            name: "aoai-sim".into(),
            region: "local".into(),
            key: "sim-aoai-key-0000000000".into(),
            deployments: None,
            time_per_token: Duration::from_millis(15),
            first_token: Duration::from_millis(150),
            tpm: 100_000,
            rpm: 600,
            failure_rate: 0.0,
            failure_kind: FailureKind::Status(500),
            slow: Duration::from_secs(10),
        }
    }
}

/// Deployments the v1 `models` route lists when any name is accepted.
pub const DEFAULT_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-35-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
];

/// One simulated resource: configuration, quota state and what it saw.
pub struct AoaiSim {
    pub config: AoaiConfig,
    pub recorder: Recorder,
    /// Files and batches (`sim::batch`).
    pub batches: super::batch::Store,
    limits: Mutex<HashMap<String, Quota>>,
    dice: Mutex<SplitMix>,
}

impl AoaiSim {
    pub fn new(config: AoaiConfig) -> Arc<Self> {
        Arc::new(AoaiSim {
            config,
            recorder: Recorder::default(),
            batches: super::batch::Store::default(),
            limits: Mutex::new(HashMap::new()),
            dice: Mutex::new(SplitMix(run_seed())),
        })
    }

    fn roll(&self) -> f64 {
        self.dice
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_f64()
    }

    fn new_id(&self) -> String {
        super::request_id(&mut self.dice.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The router of one simulated resource.
pub fn router(sim: Arc<AoaiSim>) -> Router {
    Router::new()
        .fallback(|State(sim): State<Arc<AoaiSim>>, req: Request| async move {
            server::no_panic(handle(sim, req)).await
        })
        .with_state(sim)
}

/// Start a simulated resource on `127.0.0.1:port` (0 = any free port).
pub async fn start(
    config: AoaiConfig,
    port: u16,
) -> std::io::Result<(RunningServer, Arc<AoaiSim>)> {
    let listener = server::bind_loopback(port).await?;
    let sim = AoaiSim::new(config);
    let running = RunningServer::start(listener, router(sim.clone()))?;
    Ok((running, sim))
}

// ---------------------------------------------------------------------------------------------
// Errors, in AOAI's shape.

fn aoai_error(status: u16, code: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message, "param": null, "type": null}}),
    )
}

fn invalid_request<R: From<Response>>(message: &str, param: &str) -> R {
    R::from(json_response(
        400,
        &json!({"error": {"code": "BadRequest", "message": message, "param": param,
            "type": "invalid_request_error"}}),
    ))
}

/// A request refused while planning the answer: the response to send, boxed because it is
/// large and the success path should not pay for it.
struct Reject(Box<Response>);

impl From<Response> for Reject {
    fn from(r: Response) -> Self {
        Reject(Box::new(r))
    }
}

fn unauthorized() -> Response {
    aoai_error(
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
         provide a valid key for an active subscription and use a correct regional API endpoint \
         for your resource.",
    )
}

fn not_found() -> Response {
    aoai_error(404, "404", "Resource not found")
}

fn server_error(status: u16) -> Response {
    let (code, message) = match status {
        500 => (
            "InternalServerError",
            "The server had an error while processing your request. Sorry about that!",
        ),
        502 => ("BadGateway", "Bad gateway."),
        503 => (
            "ServiceUnavailable",
            "The service is temporarily unable to process your request. Please try again later.",
        ),
        504 => ("GatewayTimeout", "The operation was timeout."),
        _ => (
            "ServerError",
            "The simulator was asked to fail this request.",
        ),
    };
    aoai_error(status, code, message)
}

// ---------------------------------------------------------------------------------------------
// Routing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Chat {
        extensions: bool,
    },
    Completions,
    Embeddings,
    Responses,
    ListModels,
    GetModel,
    /// A real AOAI operation the simulator does not implement (images, audio).
    Unsupported,
}

impl Op {
    fn operation_name(self) -> &'static str {
        match self {
            Op::Chat { extensions: false } => "ChatCompletions_Create",
            Op::Chat { extensions: true } => "ExtensionsChatCompletions_Create",
            Op::Completions => "Completions_Create",
            Op::Embeddings => "Embeddings_Create",
            Op::Responses => "Responses_Create",
            Op::ListModels | Op::GetModel => "Models_List",
            Op::Unsupported => "Unsupported",
        }
    }
}

struct Target {
    op: Op,
    /// From the path (classic) or `None` (v1: from the body).
    deployment: Option<String>,
    v1: bool,
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["openai", "deployments", d, rest @ ..] => {
            let op = match rest {
                ["chat", "completions"] => Op::Chat { extensions: false },
                ["extensions", "chat", "completions"] => Op::Chat { extensions: true },
                ["completions"] => Op::Completions,
                ["embeddings"] => Op::Embeddings,
                ["images", "generations"]
                | ["audio", "transcriptions"]
                | ["audio", "translations"]
                | ["audio", "speech"] => Op::Unsupported,
                _ => return None,
            };
            Some(Target {
                op,
                deployment: Some((*d).to_string()),
                v1: false,
            })
        }
        ["openai", "v1", rest @ ..] => {
            let op = match rest {
                ["chat", "completions"] => Op::Chat { extensions: false },
                ["completions"] => Op::Completions,
                ["embeddings"] => Op::Embeddings,
                ["responses"] => Op::Responses,
                ["models"] => Op::ListModels,
                ["models", _] => Op::GetModel,
                ["images", "generations"] | ["audio", _] => Op::Unsupported,
                _ => return None,
            };
            Some(Target {
                op,
                deployment: None,
                v1: true,
            })
        }
        // the AzureOpenAI client's Responses path (api-version required)
        ["openai", "responses"] => Some(Target {
            op: Op::Responses,
            deployment: None,
            v1: false,
        }),
        _ => None,
    }
}

fn key_ok(headers: &HeaderMap, key: &str) -> bool {
    let given = headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
        });
    // Constant-time is irrelevant for a loopback simulator with a demo key.
    given.as_deref() == Some(key)
}

async fn handle(sim: Arc<AoaiSim>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return aoai_error(413, "RequestTooLarge", "The request body is too large."),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    sim.recorder.push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body: body.clone(),
    });

    if !key_ok(&parts.headers, &sim.config.key) {
        return unauthorized();
    }
    let (m, p, q) = (&parts.method, parts.uri.path(), parts.uri.query());
    if let Some(r) = super::batch::handle(&sim.batches, m, p, q, &parts.headers, &bytes) {
        return r;
    }
    let Some(target) = route(parts.uri.path()) else {
        return not_found();
    };
    let query = server::query_pairs(parts.uri.query());
    let api_version = query
        .iter()
        .find(|(k, _)| k == "api-version")
        .map(|(_, v)| v.clone());
    if !target.v1 && api_version.as_deref().is_none_or(str::is_empty) {
        return aoai_error(
            400,
            "BadRequest",
            "Missing required query parameter: api-version",
        );
    }
    let api_version = api_version.unwrap_or_else(|| "v1".into());
    let wanted = match target.op {
        Op::ListModels | Op::GetModel => Method::GET,
        _ => Method::POST,
    };
    if parts.method != wanted {
        return aoai_error(405, "MethodNotAllowed", "The HTTP method is not allowed.");
    }
    if matches!(target.op, Op::ListModels | Op::GetModel) {
        return list_models(&sim, parts.uri.path(), target.op);
    }
    if target.op == Op::Unsupported {
        return aoai_error(
            400,
            "OperationNotSupported",
            "The local AOAI simulator does not implement this operation.",
        );
    }
    if body.is_null() || !body.is_object() {
        return invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            "body",
        );
    }
    let deployment = match target.deployment {
        Some(d) => d,
        None => match body.get("model").and_then(Value::as_str) {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => return invalid_request("you must provide a model parameter", "model"),
        },
    };
    if let Some(list) = &sim.config.deployments {
        if !list.iter().any(|d| d == &deployment) {
            return aoai_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the \
                 deployment within the last 5 minutes, please wait a moment and try again.",
            );
        }
    }

    // Failure injection: the header wins over the configured rate.
    let forced = match parts
        .headers
        .get("x-sim-fail")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => match v.parse::<FailureKind>() {
            Ok(kind) => Some(kind),
            Err(e) => return invalid_request(&e, "x-sim-fail"),
        },
        None if sim.config.failure_rate > 0.0 && sim.roll() < sim.config.failure_rate => {
            Some(sim.config.failure_kind)
        }
        None => None,
    };
    let mut reset = false;
    match forced {
        Some(FailureKind::Status(code)) => return server_error(code),
        Some(FailureKind::Slow(ms)) => {
            let wait = ms.map(Duration::from_millis).unwrap_or(sim.config.slow);
            tokio::time::sleep(wait.min(MAX_DELAY)).await;
        }
        Some(FailureKind::Reset) => reset = true,
        None => {}
    }

    let plan = match target.op {
        Op::Chat { extensions } => plan_chat(&sim, &deployment, &body, extensions),
        Op::Completions => plan_completions(&sim, &deployment, &body),
        Op::Embeddings => plan_embeddings(&deployment, &body),
        Op::Responses => plan_responses(&sim, &deployment, &body),
        _ => Err(not_found().into()),
    };
    let plan = match plan {
        Ok(p) => p,
        Err(Reject(response)) => return *response,
    };

    // Quota: charged with what the request really costs (prompt and completion).
    let forced_429 = parts
        .headers
        .get("x-sim-ratelimit")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0);
    let quota = match forced_429 {
        Some(secs) => Err(Duration::from_secs_f64(secs.min(3600.0))),
        None => charge(&sim, &deployment, plan.total_tokens()),
    };
    let remaining = match quota {
        Ok(r) => r,
        Err(wait) => return too_many_requests(&sim, target.op, &api_version, wait),
    };

    let mut response = plan.into_response(&sim, reset);
    let headers = response.headers_mut();
    let id = sim.new_id();
    let request_id = parts
        .headers
        .get("x-request-id")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("-")));
    for (name, value) in [
        ("apim-request-id", HeaderValue::from_str(&id).ok()),
        ("x-request-id", Some(request_id)),
        (
            "x-ms-region",
            HeaderValue::from_str(&sim.config.region).ok(),
        ),
        (
            "x-sim-resource",
            HeaderValue::from_str(&sim.config.name).ok(),
        ),
        (
            "x-ms-deployment-name",
            HeaderValue::from_str(&deployment).ok(),
        ),
        (
            "x-ratelimit-remaining-requests",
            HeaderValue::from_str(&remaining.requests.to_string()).ok(),
        ),
        (
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_str(&remaining.tokens.to_string()).ok(),
        ),
    ] {
        if let Some(v) = value {
            headers.insert(name, v);
        }
    }
    response
}

fn list_models(sim: &AoaiSim, path: &str, op: Op) -> Response {
    let names: Vec<String> = match &sim.config.deployments {
        Some(list) => list.clone(),
        None => DEFAULT_MODELS.iter().map(|s| s.to_string()).collect(),
    };
    let model = |id: &str| json!({"id": id, "object": "model", "created": 1_715_000_000, "owned_by": "system"});
    if op == Op::GetModel {
        let id = path.rsplit('/').next().unwrap_or("");
        if sim.config.deployments.is_some() && !names.iter().any(|n| n == id) {
            return not_found();
        }
        return json_response(200, &model(id));
    }
    json_response(
        200,
        &json!({"object": "list", "data": names.iter().map(|n| model(n)).collect::<Vec<_>>()}),
    )
}

// ---------------------------------------------------------------------------------------------
// Quota.

/// A token bucket holding at most one minute of quota, refilled continuously.
#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    level: f64,
}

impl Bucket {
    fn new(per_minute: u64) -> Self {
        Bucket {
            capacity: per_minute as f64,
            level: per_minute as f64,
        }
    }
    fn refill(&mut self, elapsed: Duration) {
        self.level = (self.level + elapsed.as_secs_f64() * self.capacity / 60.0).min(self.capacity);
    }
    /// Time until `amount` is available (zero when it is).
    fn wait_for(&self, amount: f64) -> Duration {
        if self.level >= amount {
            return Duration::ZERO;
        }
        let amount = amount.min(self.capacity);
        Duration::from_secs_f64((amount - self.level) * 60.0 / self.capacity.max(1.0))
    }
}

#[derive(Debug)]
struct Quota {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    last: Instant,
}

/// What remains after a request was charged.
#[derive(Debug, Clone, Copy)]
struct Remaining {
    requests: u64,
    tokens: u64,
}

/// Charge one request and `tokens`; `Err(wait)` when the deployment is over a limit.
fn charge(sim: &AoaiSim, deployment: &str, tokens: usize) -> Result<Remaining, Duration> {
    let mut limits = sim.limits.lock().unwrap_or_else(|e| e.into_inner());
    let quota = limits
        .entry(deployment.to_string())
        .or_insert_with(|| Quota {
            requests: (sim.config.rpm > 0).then(|| Bucket::new(sim.config.rpm)),
            tokens: (sim.config.tpm > 0).then(|| Bucket::new(sim.config.tpm)),
            last: Instant::now(),
        });
    let now = Instant::now();
    let elapsed = now.duration_since(quota.last);
    quota.last = now;
    for b in [&mut quota.requests, &mut quota.tokens]
        .into_iter()
        .flatten()
    {
        b.refill(elapsed);
    }
    let tokens = tokens as f64;
    let wait = [
        quota.requests.as_ref().map(|b| b.wait_for(1.0)),
        quota
            .tokens
            .as_ref()
            .map(|b| b.wait_for(tokens.min(b.capacity))),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(Duration::ZERO);
    if !wait.is_zero() {
        return Err(wait);
    }
    if let Some(b) = quota.requests.as_mut() {
        b.level -= 1.0;
    }
    if let Some(b) = quota.tokens.as_mut() {
        b.level = (b.level - tokens).max(0.0);
    }
    Ok(Remaining {
        requests: quota
            .requests
            .as_ref()
            .map_or(u64::MAX >> 12, |b| b.level as u64),
        tokens: quota
            .tokens
            .as_ref()
            .map_or(u64::MAX >> 12, |b| b.level as u64),
    })
}

fn too_many_requests(sim: &AoaiSim, op: Op, api_version: &str, wait: Duration) -> Response {
    let ms = wait.as_millis().max(1) as u64;
    let secs = ms.div_ceil(1000).max(1);
    let mut response = aoai_error(
        429,
        "429",
        &format!(
            "Requests to the {} Operation under Azure OpenAI API version {api_version} have \
             exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry \
             after {secs} second{}. Please go here: https://aka.ms/oai/quotaincrease if you \
             would like to further increase the default rate limit.",
            op.operation_name(),
            if secs == 1 { "" } else { "s" }
        ),
    );
    let h = response.headers_mut();
    h.insert("retry-after", HeaderValue::from(secs));
    h.insert("retry-after-ms", HeaderValue::from(ms));
    h.insert("x-ratelimit-remaining-requests", HeaderValue::from(0u64));
    h.insert("x-ratelimit-remaining-tokens", HeaderValue::from(0u64));
    if let Ok(v) = HeaderValue::from_str(&sim.config.name) {
        h.insert("x-sim-resource", v);
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Plans: what to answer, computed before the quota is charged.

/// Kind of model behind a deployment, guessed from its name as operators usually name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelKind {
    Chat,
    Embedding {
        native_dims: usize,
        shortenable: bool,
    },
}

fn model_kind(deployment: &str) -> ModelKind {
    let d = deployment.to_ascii_lowercase();
    if d.contains("embedding") || d.contains("ada") {
        if d.contains("3-large") {
            ModelKind::Embedding {
                native_dims: 3072,
                shortenable: true,
            }
        } else {
            ModelKind::Embedding {
                native_dims: 1536,
                shortenable: d.contains("3-small") || d.contains("-3"),
            }
        }
    } else {
        ModelKind::Chat
    }
}

fn operation_not_supported<R: From<Response>>(op: &str, deployment: &str) -> R {
    R::from(aoai_error(
        400,
        "OperationNotSupported",
        &format!("The {op} operation does not work with the specified model, {deployment}. Please choose different model and try again. You can learn more about which models can be used with each operation here: https://go.microsoft.com/fwlink/?linkid=2197993."),
    ))
}

struct Choice {
    tokens: Vec<String>,
    finish_reason: &'static str,
}

enum Plan {
    Chat {
        deployment: String,
        prompt_tokens: usize,
        choices: Vec<Choice>,
        stream: bool,
        include_usage: bool,
        extensions: bool,
    },
    Completions {
        deployment: String,
        prompt_tokens: usize,
        choices: Vec<Choice>,
        stream: bool,
        include_usage: bool,
    },
    Embeddings {
        body: Value,
        prompt_tokens: usize,
    },
    Responses {
        deployment: String,
        prompt_tokens: usize,
        choice: Choice,
    },
}

impl Plan {
    fn total_tokens(&self) -> usize {
        match self {
            Plan::Chat {
                prompt_tokens,
                choices,
                ..
            }
            | Plan::Completions {
                prompt_tokens,
                choices,
                ..
            } => prompt_tokens + choices.iter().map(|c| c.tokens.len()).sum::<usize>(),
            Plan::Embeddings { prompt_tokens, .. } => *prompt_tokens,
            Plan::Responses {
                prompt_tokens,
                choice,
                ..
            } => prompt_tokens + choice.tokens.len(),
        }
    }

    fn into_response(self, sim: &AoaiSim, reset: bool) -> Response {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cfg = &sim.config;
        match self {
            Plan::Chat {
                deployment,
                prompt_tokens,
                choices,
                stream,
                include_usage,
                extensions,
            } => {
                let id = format!("chatcmpl-{}", &sim.new_id().replace('-', "")[..24]);
                let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
                let usage = usage(prompt_tokens, completion);
                if stream {
                    return chat_stream(
                        cfg,
                        ChatStream {
                            id,
                            created,
                            model: deployment,
                            choices,
                            usage: include_usage.then_some(usage),
                            extensions,
                        },
                        reset,
                    );
                }
                let body = json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": deployment,
                    "system_fingerprint": "fp_sim",
                    "prompt_filter_results": [prompt_filter_results()],
                    "choices": choices.iter().enumerate().map(|(i, c)| {
                        let mut message = json!({"role": "assistant", "content": c.tokens.concat(), "refusal": null});
                        if extensions {
                            message["context"] = extension_context();
                        }
                        json!({"index": i, "finish_reason": c.finish_reason, "logprobs": null,
                               "message": message, "content_filter_results": content_filter_results()})
                    }).collect::<Vec<_>>(),
                    "usage": usage,
                });
                delayed_json(cfg, completion, body, reset)
            }
            Plan::Completions {
                deployment,
                prompt_tokens,
                choices,
                stream,
                include_usage,
            } => {
                let id = format!("cmpl-{}", &sim.new_id().replace('-', "")[..24]);
                let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
                let usage = usage(prompt_tokens, completion);
                if stream {
                    return completions_stream(
                        cfg,
                        id,
                        created,
                        deployment,
                        choices,
                        include_usage.then_some(usage),
                        reset,
                    );
                }
                let body = json!({
                    "id": id,
                    "object": "text_completion",
                    "created": created,
                    "model": deployment,
                    "prompt_filter_results": [prompt_filter_results()],
                    "choices": choices.iter().enumerate().map(|(i, c)| json!({
                        "text": c.tokens.concat(), "index": i, "finish_reason": c.finish_reason,
                        "logprobs": null, "content_filter_results": content_filter_results()
                    })).collect::<Vec<_>>(),
                    "usage": usage,
                });
                delayed_json(cfg, completion, body, reset)
            }
            Plan::Embeddings { body, .. } => delayed_json(cfg, 0, body, reset),
            Plan::Responses {
                deployment,
                prompt_tokens,
                choice,
            } => {
                let n = choice.tokens.len();
                let id = sim.new_id().replace('-', "");
                let body = json!({
                    "id": format!("resp_{id}"),
                    "object": "response",
                    "created_at": created,
                    "status": if choice.finish_reason == "length" { "incomplete" } else { "completed" },
                    "model": deployment,
                    "output": [{
                        "type": "message", "id": format!("msg_{id}"), "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": choice.tokens.concat(), "annotations": []}]
                    }],
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": n,
                              "total_tokens": prompt_tokens + n},
                });
                delayed_json(cfg, n, body, reset)
            }
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

fn safe() -> Value {
    json!({"filtered": false, "severity": "safe"})
}

fn prompt_filter_results() -> Value {
    json!({"prompt_index": 0, "content_filter_results": {
        "hate": safe(), "self_harm": safe(), "sexual": safe(), "violence": safe(),
        "jailbreak": {"filtered": false, "detected": false}
    }})
}

fn content_filter_results() -> Value {
    json!({"hate": safe(), "self_harm": safe(), "sexual": safe(), "violence": safe(),
           "protected_material_code": {"filtered": false, "detected": false},
           "protected_material_text": {"filtered": false, "detected": false}})
}

fn extension_context() -> Value {
    json!({"citations": [{"content": "Simulated retrieved document.", "title": "sim-doc-1",
                          "url": null, "filepath": "sim-doc-1.md", "chunk_id": "0"}],
           "intent": "[\"simulated search intent\"]"})
}

/// Text of a chat message's `content`: a string, or the `text` of its text parts.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// `max_tokens`, or the newer `max_completion_tokens` / `max_output_tokens`.
fn max_tokens(body: &Value) -> Result<Option<usize>, Reject> {
    for name in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        match body.get(name) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n >= 1 => Ok(Some((n as usize).min(MAX_COMPLETION_TOKENS))),
                    _ => Err(invalid_request(
                        &format!(
                            "Invalid '{name}': integer below minimum value. Expected a value >= 1."
                        ),
                        name,
                    )),
                };
            }
        }
    }
    Ok(None)
}

fn choices_n(body: &Value) -> Result<usize, Reject> {
    match body.get("n") {
        None | Some(Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_CHOICES as u64).contains(&n) => Ok(n as usize),
            _ => Err(invalid_request(
                &format!("Invalid 'n': must be between 1 and {MAX_CHOICES}."),
                "n",
            )),
        },
    }
}

fn stream_flags(body: &Value) -> (bool, bool) {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    (stream, include_usage)
}

/// Filler sentences for answers; chosen by the prompt's hash so answers are stable.
const FILLER: &[&str] = &[
    "The request went through the gateway, the handler and the simulated resource.",
    "Nothing here came from a real model; the words are chosen to look like an answer.",
    "Token counts in the usage block match the number of tokens in this text.",
    "Streaming sends one token per event, with a configurable delay between tokens.",
    "Rate limits, failures and slow answers can be injected with flags or headers.",
    "Each backend talks to its own simulated resource, as one Function App per resource.",
];

/// The answer to `prompt`, as tokens, cut at `max` tokens.
fn answer(
    sim: &AoaiSim,
    deployment: &str,
    prompt: &str,
    index: usize,
    max: Option<usize>,
) -> Choice {
    let text = match prompt.trim_start().strip_prefix("echo:") {
        Some(rest) => rest.trim_start().to_string(),
        None => {
            let h = stable_hash(&[
                prompt.as_bytes(),
                deployment.as_bytes(),
                &index.to_le_bytes(),
            ]);
            let words: Vec<&str> = prompt.split_whitespace().take(6).collect();
            let mut text = format!(
                "Simulated answer from {} ({deployment}) to \"{}{}\".",
                sim.config.name,
                words.join(" "),
                if prompt.split_whitespace().count() > 6 {
                    " …"
                } else {
                    ""
                }
            );
            let sentences = 1 + (h % 3) as usize;
            for i in 0..sentences {
                text.push(' ');
                text.push_str(FILLER[(h as usize / 3 + i) % FILLER.len()]);
            }
            text
        }
    };
    let all: Vec<String> = tokens::tokenize(&text)
        .into_iter()
        .map(str::to_string)
        .collect();
    let limit = max
        .unwrap_or(MAX_COMPLETION_TOKENS)
        .min(MAX_COMPLETION_TOKENS);
    if all.len() > limit {
        Choice {
            tokens: all.into_iter().take(limit).collect(),
            finish_reason: "length",
        }
    } else {
        Choice {
            tokens: all,
            finish_reason: "stop",
        }
    }
}

fn plan_chat(
    sim: &AoaiSim,
    deployment: &str,
    body: &Value,
    extensions: bool,
) -> Result<Plan, Reject> {
    if model_kind(deployment) != ModelKind::Chat {
        return Err(operation_not_supported("chatCompletion", deployment));
    }
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(invalid_request("[] is too short - 'messages'", "messages"))
        }
        _ => {
            return Err(invalid_request(
                "'messages' is a required property",
                "messages",
            ))
        }
    };
    // OpenAI's accounting: 3 tokens per message, the role and content, 1 per name, 3 to prime.
    let mut prompt_tokens = 3;
    let mut last_user = String::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role.is_empty() {
            return Err(invalid_request(
                "'role' is a required property - 'messages.0'",
                "messages",
            ));
        }
        let text = content_text(m.get("content").unwrap_or(&Value::Null));
        prompt_tokens += 3 + tokens::count(role) + tokens::count(&text);
        if let Some(name) = m.get("name").and_then(Value::as_str) {
            prompt_tokens += 1 + tokens::count(name);
        }
        if role == "user" {
            last_user = text;
        }
    }
    let max = max_tokens(body)?;
    let n = choices_n(body)?;
    let (stream, include_usage) = stream_flags(body);
    Ok(Plan::Chat {
        deployment: deployment.to_string(),
        prompt_tokens,
        choices: (0..n)
            .map(|i| answer(sim, deployment, &last_user, i, max))
            .collect(),
        stream,
        include_usage,
        extensions,
    })
}

fn plan_completions(sim: &AoaiSim, deployment: &str, body: &Value) -> Result<Plan, Reject> {
    if model_kind(deployment) != ModelKind::Chat {
        return Err(operation_not_supported("completion", deployment));
    }
    let prompts: Vec<String> = match body.get("prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && !items.is_empty() => {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        }
        None | Some(Value::Null) => vec!["<|endoftext|>".to_string()],
        _ => {
            return Err(invalid_request(
                "Invalid 'prompt': expected a string or an array of strings.",
                "prompt",
            ))
        }
    };
    if prompts.len() > MAX_CHOICES {
        return Err(invalid_request(
            "Too many prompts for the simulator (at most 10).",
            "prompt",
        ));
    }
    let max = max_tokens(body)?.or(Some(16)); // the completions API defaults to 16 tokens
    let n = choices_n(body)?;
    let (stream, include_usage) = stream_flags(body);
    let prompt_tokens = prompts.iter().map(|p| tokens::count(p)).sum();
    let mut choices = Vec::new();
    for p in &prompts {
        for i in 0..n {
            choices.push(answer(sim, deployment, p, i, max));
        }
    }
    Ok(Plan::Completions {
        deployment: deployment.to_string(),
        prompt_tokens,
        choices,
        stream,
        include_usage,
    })
}

fn plan_responses(sim: &AoaiSim, deployment: &str, body: &Value) -> Result<Plan, Reject> {
    if model_kind(deployment) != ModelKind::Chat {
        return Err(operation_not_supported("responses", deployment));
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(invalid_request(
            "The local AOAI simulator does not stream the responses API.",
            "stream",
        ));
    }
    let text = match body.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|m| content_text(m.get("content").unwrap_or(m)))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => {
            return Err(invalid_request(
                "Missing required parameter: 'input'.",
                "input",
            ))
        }
    };
    let prompt_tokens = tokens::count(&text)
        + body
            .get("instructions")
            .and_then(Value::as_str)
            .map_or(0, tokens::count);
    Ok(Plan::Responses {
        deployment: deployment.to_string(),
        prompt_tokens,
        choice: answer(sim, deployment, &text, 0, max_tokens(body)?),
    })
}

fn plan_embeddings(deployment: &str, body: &Value) -> Result<Plan, Reject> {
    let ModelKind::Embedding {
        native_dims,
        shortenable,
    } = model_kind(deployment)
    else {
        return Err(operation_not_supported("embeddings", deployment));
    };
    // Inputs as (text used for the vector, token count).
    let one = |v: &Value| -> Option<(String, usize)> {
        match v {
            Value::String(s) if !s.is_empty() => Some((s.clone(), tokens::count(s))),
            Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => {
                Some((v.to_string(), ids.len()))
            }
            _ => None,
        }
    };
    let input = body.get("input").unwrap_or(&Value::Null);
    let inputs: Vec<(String, usize)> = match input {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            vec![(input.to_string(), items.len())]
        }
        Value::Array(items) if !items.is_empty() => {
            let parsed: Option<Vec<_>> = items.iter().map(one).collect();
            parsed.ok_or_else(|| {
                invalid_request::<Reject>("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", "input")
            })?
        }
        v => vec![one(v).ok_or_else(|| {
            invalid_request::<Reject>("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", "input")
        })?],
    };
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(invalid_request(
            &format!("Too many inputs. The max number of inputs is {MAX_EMBEDDING_INPUTS}."),
            "input",
        ));
    }
    let dims = match body.get("dimensions") {
        None | Some(Value::Null) => native_dims,
        Some(_) if !shortenable => {
            return Err(invalid_request(
                "This model does not support specifying dimensions.",
                "dimensions",
            ))
        }
        Some(v) => match v.as_u64() {
            Some(d) if d >= 1 && d as usize <= native_dims => d as usize,
            _ => {
                return Err(invalid_request(
                    &format!("Invalid 'dimensions': must be between 1 and {native_dims}."),
                    "dimensions",
                ))
            }
        },
    };
    let base64 = match body.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(invalid_request(
                "Invalid 'encoding_format': expected 'float' or 'base64'.",
                "encoding_format",
            ))
        }
    };
    let family = embedding_model_name(deployment);
    let prompt_tokens: usize = inputs.iter().map(|(_, n)| n).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, (text, _))| {
            let v = embedding(family, text, native_dims, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                Value::Array(v.iter().map(|x| json!(x)).collect())
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Plan::Embeddings {
        body: json!({"object": "list", "data": data, "model": family,
                     "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
        prompt_tokens,
    })
}

fn embedding_model_name(deployment: &str) -> &'static str {
    let d = deployment.to_ascii_lowercase();
    if d.contains("3-large") {
        "text-embedding-3-large"
    } else if d.contains("3-small") || d.contains("-3") {
        "text-embedding-3-small"
    } else {
        "text-embedding-ada-002"
    }
}

/// The deterministic unit vector of `text`: `native` dimensions from a seeded generator, cut to
/// `dims` and re-normalised (how OpenAI shortens text-embedding-3 vectors).
pub fn embedding(model: &str, text: &str, native: usize, dims: usize) -> Vec<f32> {
    let mut rng = SplitMix(stable_hash(&[model.as_bytes(), text.as_bytes()]));
    let full: Vec<f64> = (0..native).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
    let cut = &full[..dims.min(native)];
    let norm = cut
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    cut.iter().map(|x| (x / norm) as f32).collect()
}

// ---------------------------------------------------------------------------------------------
// Bodies: timed, optionally cut.

/// One piece of a scripted body: wait, then send.
struct Piece {
    wait: Duration,
    bytes: Bytes,
}

/// A body that sends its pieces on schedule; with `reset`, it fails after about half of them,
/// which makes hyper drop the connection mid-body (the client sees an incomplete message).
fn scripted_body(pieces: Vec<Piece>, reset: bool) -> Body {
    let cut = if reset {
        Some((pieces.len() / 2).max(1))
    } else {
        None
    };
    // Total delay is bounded: each wait is capped and the sum is capped too.
    let mut budget = MAX_DELAY;
    let stream = futures_util::stream::unfold(
        (pieces.into_iter().enumerate(), cut, false),
        move |(mut it, cut, done)| {
            let next = if done { None } else { it.next() };
            let wait = next
                .as_ref()
                .map_or(Duration::ZERO, |(_, p)| p.wait.min(budget));
            budget = budget.saturating_sub(wait);
            async move {
                let (i, piece) = next?;
                if cut == Some(i) {
                    // Let hyper flush what was sent (it writes when the body is pending), so the
                    // client sees headers and part of the body before the cut.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    return Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "x-sim-fail: reset",
                        )),
                        (it, cut, true),
                    ));
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Some((Ok(piece.bytes), (it, cut, false)))
            }
        },
    );
    Body::from_stream(stream)
}

/// A JSON answer sent after the time the model would take to generate `completion` tokens.
fn delayed_json(cfg: &AoaiConfig, completion: usize, body: Value, reset: bool) -> Response {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let wait = (cfg.first_token + cfg.time_per_token * completion as u32).min(MAX_DELAY);
    let len = bytes.len();
    let pieces = if reset {
        let half = len / 2;
        vec![
            Piece {
                wait,
                bytes: Bytes::copy_from_slice(&bytes[..half]),
            },
            Piece {
                wait: Duration::ZERO,
                bytes: Bytes::copy_from_slice(&bytes[half..]),
            },
            Piece {
                wait: Duration::ZERO,
                bytes: Bytes::new(),
            },
        ]
    } else {
        vec![Piece {
            wait,
            bytes: Bytes::from(bytes),
        }]
    };
    let mut response = Response::new(scripted_body(pieces, reset));
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn sse_response(pieces: Vec<Piece>, reset: bool) -> Response {
    let mut response = Response::new(scripted_body(pieces, reset));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

struct ChatStream {
    id: String,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    usage: Option<Value>,
    extensions: bool,
}

fn chat_stream(cfg: &AoaiConfig, s: ChatStream, reset: bool) -> Response {
    let with_usage = s.usage.is_some();
    let chunk = |choices: Value| {
        let mut v = json!({"id": s.id, "object": "chat.completion.chunk", "created": s.created,
                           "model": s.model, "system_fingerprint": "fp_sim", "choices": choices});
        if with_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut pieces = vec![Piece {
        wait: Duration::ZERO,
        bytes: sse(
            &json!({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                           "prompt_filter_results": [prompt_filter_results()]}),
        ),
    }];
    for (i, c) in s.choices.iter().enumerate() {
        let mut delta = json!({"role": "assistant", "content": "", "refusal": null});
        if s.extensions {
            delta["context"] = extension_context();
        }
        pieces.push(Piece {
            wait: if i == 0 {
                cfg.first_token
            } else {
                Duration::ZERO
            },
            bytes: sse(&chunk(
                json!([{"index": i, "delta": delta, "finish_reason": null,
                                       "logprobs": null, "content_filter_results": {}}]),
            )),
        });
        for t in &c.tokens {
            pieces.push(Piece {
                wait: cfg.time_per_token,
                bytes: sse(&chunk(json!([{"index": i, "delta": {"content": t},
                    "finish_reason": null, "logprobs": null,
                    "content_filter_results": content_filter_results()}]))),
            });
        }
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&chunk(
                json!([{"index": i, "delta": {}, "finish_reason": c.finish_reason,
                                       "logprobs": null, "content_filter_results": {}}]),
            )),
        });
    }
    if let Some(usage) = s.usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&last),
        });
    }
    pieces.push(Piece {
        wait: Duration::ZERO,
        bytes: Bytes::from_static(b"data: [DONE]\n\n"),
    });
    sse_response(pieces, reset)
}

fn completions_stream(
    cfg: &AoaiConfig,
    id: String,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    usage: Option<Value>,
    reset: bool,
) -> Response {
    let with_usage = usage.is_some();
    let chunk = |choices: Value| {
        let mut v = json!({"id": id, "object": "text_completion", "created": created,
                           "model": model, "choices": choices});
        if with_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut pieces = vec![Piece {
        wait: Duration::ZERO,
        bytes: sse(
            &json!({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                           "prompt_filter_results": [prompt_filter_results()]}),
        ),
    }];
    for (i, c) in choices.iter().enumerate() {
        for (k, t) in c.tokens.iter().enumerate() {
            pieces.push(Piece {
                wait: if i == 0 && k == 0 {
                    cfg.first_token
                } else {
                    cfg.time_per_token
                },
                bytes: sse(&chunk(
                    json!([{"text": t, "index": i, "finish_reason": null,
                    "logprobs": null, "content_filter_results": content_filter_results()}]),
                )),
            });
        }
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&chunk(
                json!([{"text": "", "index": i, "finish_reason": c.finish_reason,
                                       "logprobs": null}]),
            )),
        });
    }
    if let Some(usage) = usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&last),
        });
    }
    pieces.push(Piece {
        wait: Duration::ZERO,
        bytes: Bytes::from_static(b"data: [DONE]\n\n"),
    });
    sse_response(pieces, reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_parse() {
        assert_eq!("500".parse::<FailureKind>(), Ok(FailureKind::Status(500)));
        assert_eq!("503".parse::<FailureKind>(), Ok(FailureKind::Status(503)));
        assert_eq!("slow".parse::<FailureKind>(), Ok(FailureKind::Slow(None)));
        assert_eq!(
            "slow:250".parse::<FailureKind>(),
            Ok(FailureKind::Slow(Some(250)))
        );
        assert_eq!("RESET".parse::<FailureKind>(), Ok(FailureKind::Reset));
        assert!("404".parse::<FailureKind>().is_err());
        assert!("boom".parse::<FailureKind>().is_err());
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors_and_shorten_like_openai() {
        let a = embedding("m", "hello", 1536, 1536);
        assert_eq!(a, embedding("m", "hello", 1536, 1536));
        assert_ne!(a, embedding("m", "hello!", 1536, 1536));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        // Shortened = the first d native components, re-normalised: same direction.
        let short = embedding("m", "hello", 1536, 256);
        assert_eq!(short.len(), 256);
        let scale = short[0] / a[0];
        assert!(short
            .iter()
            .zip(&a)
            .all(|(s, f)| (s - f * scale).abs() < 1e-4));
    }

    #[test]
    fn model_kinds_follow_deployment_names() {
        assert_eq!(model_kind("gpt-4o"), ModelKind::Chat);
        assert_eq!(
            model_kind("text-embedding-3-large"),
            ModelKind::Embedding {
                native_dims: 3072,
                shortenable: true
            }
        );
        assert_eq!(
            model_kind("text-embedding-ada-002"),
            ModelKind::Embedding {
                native_dims: 1536,
                shortenable: false
            }
        );
        assert_eq!(
            model_kind("emb-text-embedding-3-small"),
            ModelKind::Embedding {
                native_dims: 1536,
                shortenable: true
            }
        );
    }

    #[test]
    fn buckets_refill_and_say_how_long_to_wait() {
        let mut b = Bucket::new(60); // one per second
        b.level = 0.0;
        assert_eq!(b.wait_for(1.0), Duration::from_secs(1));
        b.refill(Duration::from_millis(500));
        assert!((b.level - 0.5).abs() < 1e-9);
        b.refill(Duration::from_secs(3600));
        assert_eq!(b.level, 60.0);
        // A request bigger than the whole bucket waits for a full bucket, not forever.
        b.level = 0.0;
        assert_eq!(b.wait_for(1e9), Duration::from_secs(60));
    }
}
