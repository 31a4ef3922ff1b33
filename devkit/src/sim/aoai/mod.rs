//! Azure OpenAI simulator: one simulated AOAI *resource* (one per backend in the local set).
//!
//! Speaks the data-plane shapes the handler forwards and the SDKs parse:
//! - classic `/openai/deployments/{d}/…` (`api-version` required): `chat/completions`,
//!   `extensions/chat/completions`, `completions`, `embeddings`, `images/generations`,
//!   `audio/speech`, `audio/transcriptions`, `audio/translations`; and the v1 surface
//!   `/openai/v1/…` (deployment in the body's `model`): the same operations, `responses` with
//!   `responses/{id}` (`GET`, `DELETE`), `…/input_items`, `…/cancel`, and `GET models`;
//! - deployments declared `name=model` ([`models`]): the model decides which operations a
//!   deployment serves, AOAI's `OperationNotSupported` otherwise; undeclared names (when no list
//!   is given) are taken as model names;
//! - auth by `api-key` or `Authorization: Bearer <key>` → 401 in AOAI's words otherwise;
//! - chat and completions, JSON and SSE ([`chat`]); Responses, JSON and SSE, stored, background
//!   ([`responses`]); embeddings ([`embeddings`]); images, speech, transcriptions ([`media`]);
//! - token counts from [`super::tokens`]: usage equals the number of streamed content events
//!   and the token count of the text;
//! - per-deployment requests-per-minute and tokens-per-minute limits ([`quota`]) → 429 with
//!   `retry-after` / `retry-after-ms`; every answer, 429 included, carries
//!   `x-ratelimit-remaining-requests` / `-tokens`;
//! - time per token and a first-token delay, so streaming looks like streaming ([`body`]);
//! - failures on demand, per request by header or at a configured rate:
//!   `x-sim-fail: 500|502|503|…` (that status, AOAI-shaped), `slow` (wait
//!   [`AoaiConfig::slow`] first, or `slow:<ms>`), `reset` (the connection is cut mid-body);
//!   `x-sim-ratelimit: <seconds>` answers 429 with that `retry-after` at once.
//!   The handler forwards unknown headers unchanged, so tests set these through the whole set.
//!
//! Answers are deterministic for a given prompt. A last user message starting `echo:` is
//! answered with exactly the rest of the message (handy for exact assertions).
//!
//! This file holds the configuration, the routing and the request flow (auth → route →
//! deployment → failure injection → plan → quota → answer with AOAI's headers); each
//! operation's shapes live in its own file.

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

mod body;
mod chat;
mod embeddings;
mod media;
pub mod models;
mod quota;
mod responses;

use body::*;
use chat::*;
use embeddings::*;
use quota::*;

pub use embeddings::embedding;
pub use models::{parse_list as parse_deployments, Deployment, ModelKind};

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
    /// Deployments that exist, each with its model; `None` accepts any name and takes it as
    /// the model's name.
    pub deployments: Option<Vec<Deployment>>,
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
    limits: Mutex<HashMap<String, Quota>>,
    dice: Mutex<SplitMix>,
    /// Stored responses (`store`, the default), for `GET`/`DELETE /responses/{id}`.
    responses: responses::Store,
    /// Files and batches (`sim::batch`).
    pub batches: super::batch::Store,
}

impl AoaiSim {
    pub fn new(config: AoaiConfig) -> Arc<Self> {
        Arc::new(AoaiSim {
            config,
            recorder: Recorder::default(),
            limits: Mutex::new(HashMap::new()),
            dice: Mutex::new(SplitMix(run_seed())),
            responses: responses::Store::default(),
            batches: super::batch::Store::default(),
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
    /// `GET`/`DELETE /responses/{id}`, `GET …/input_items`, `POST …/cancel`.
    ResponseItem,
    Images,
    Speech,
    Transcriptions {
        translate: bool,
    },
    ListModels,
    GetModel,
}

impl Op {
    fn operation_name(self) -> &'static str {
        match self {
            Op::Chat { extensions: false } => "ChatCompletions_Create",
            Op::Chat { extensions: true } => "ExtensionsChatCompletions_Create",
            Op::Completions => "Completions_Create",
            Op::Embeddings => "Embeddings_Create",
            Op::Responses => "Responses_Create",
            Op::ResponseItem => "Responses_Get",
            Op::Images => "ImageGenerations_Create",
            Op::Speech => "AudioSpeech_Create",
            Op::Transcriptions { translate: false } => "AudioTranscriptions_Create",
            Op::Transcriptions { translate: true } => "AudioTranslations_Create",
            Op::ListModels | Op::GetModel => "Models_List",
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
                ["images", "generations"] => Op::Images,
                ["audio", "transcriptions"] => Op::Transcriptions { translate: false },
                ["audio", "translations"] => Op::Transcriptions { translate: true },
                ["audio", "speech"] => Op::Speech,
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
                ["responses", _] | ["responses", _, "input_items" | "cancel"] => Op::ResponseItem,
                ["images", "generations"] => Op::Images,
                ["audio", "transcriptions"] => Op::Transcriptions { translate: false },
                ["audio", "translations"] => Op::Transcriptions { translate: true },
                ["audio", "speech"] => Op::Speech,
                ["models"] => Op::ListModels,
                ["models", _] => Op::GetModel,
                _ => return None,
            };
            Some(Target {
                op,
                deployment: None,
                v1: true,
            })
        }
        // the AzureOpenAI client's Responses path (api-version required)
        ["openai", "responses", rest @ ..] => {
            let op = match rest {
                [] => Op::Responses,
                [_] | [_, "input_items" | "cancel"] => Op::ResponseItem,
                _ => return None,
            };
            Some(Target {
                op,
                deployment: None,
                v1: false,
            })
        }
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
    let is_form = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let body: Value = if is_form {
        media::Form::parse(&parts.headers, &bytes)
            .map(|f| f.as_json())
            .unwrap_or(Value::Null)
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    if parts.method == Method::GET {
        if let Some(image) = media::serve_image(parts.uri.path()) {
            return image;
        }
    }
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
    if target.op == Op::ResponseItem {
        return responses::item(&sim, &parts.method, parts.uri.path(), &query);
    }
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
    // The audio forms are multipart: read as fields, with the deployment from the path (or
    // the `model` field on v1).
    let form = match target.op {
        Op::Transcriptions { .. } => match media::Form::parse(&parts.headers, &bytes) {
            Ok(f) => Some(f),
            Err(message) => return invalid_request(&message, "file"),
        },
        _ => None,
    };
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
    let model = match &sim.config.deployments {
        Some(list) => match list.iter().find(|d| d.name == deployment) {
            Some(d) => d.model.clone(),
            None => {
                return aoai_error(
                    404,
                    "DeploymentNotFound",
                    "The API deployment for this resource does not exist. If you created the \
                     deployment within the last 5 minutes, please wait a moment and try again.",
                )
            }
        },
        None => deployment.clone(),
    };
    let kind = models::kind(&model);
    let at = Deployed {
        deployment: &deployment,
        model: &model,
        kind,
    };

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
        Op::Chat { extensions } => plan_chat(&sim, &at, &body, extensions),
        Op::Completions => plan_completions(&sim, &at, &body),
        Op::Embeddings => plan_embeddings(&at, &body),
        Op::Responses => responses::plan(&sim, &at, &body),
        Op::Images => {
            // Image URLs point back at this simulator, under the name the caller used for it.
            let host = parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("127.0.0.1");
            media::plan_images(&at, &body, format!("http://{host}"))
        }
        Op::Speech => media::plan_speech(&at, &body),
        Op::Transcriptions { translate } => match &form {
            Some(f) => media::plan_transcription(&sim, &at, f, translate),
            None => Err(not_found().into()),
        },
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
    let remaining = match forced_429 {
        Some(secs) => {
            let wait = Duration::from_secs_f64(secs.min(3600.0));
            return too_many_requests(&sim, target.op, &api_version, wait, None);
        }
        None => match charge(&sim, &deployment, plan.total_tokens()) {
            Ok(r) => r,
            Err(t) => {
                return too_many_requests(&sim, target.op, &api_version, t.wait, Some(t.remaining))
            }
        },
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
        Some(list) => list.iter().map(|d| d.name.clone()).collect(),
        None => DEFAULT_MODELS.iter().map(|s| s.to_string()).collect(),
    };
    let model = models::model_entry;
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

/// The deployment a request names, the model behind it and what that model can do.
struct Deployed<'a> {
    deployment: &'a str,
    model: &'a str,
    kind: ModelKind,
}

fn operation_not_supported<R: From<Response>>(op: &str, model: &str) -> R {
    R::from(aoai_error(
        400,
        "OperationNotSupported",
        &format!("The {op} operation does not work with the specified model, {model}. Please choose different model and try again. You can learn more about which models can be used with each operation here: https://go.microsoft.com/fwlink/?linkid=2197993."),
    ))
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
}
