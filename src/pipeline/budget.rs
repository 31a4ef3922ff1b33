//! Stage 6, **budget**: per-caller token budgets (`CALLER_TOKEN_LIMITS`), after the gate and
//! before [`forward`](super::forward), for callers with a limit and operations whose answers
//! carry `usage` ([`super::meter::metered`]).
//!
//! Each limited caller has a bucket holding at most its tokens-per-minute limit, refilled
//! continuously at limit/60 tokens a second. Admission **reserves** the request's worst case:
//! the prompt counted with the model family's real tokenizer (`o200k_base`, or `cl100k_base`
//! for GPT-3.5/GPT-4/`text-embedding-*`; the tables ship inside `tiktoken-rs`, nothing is
//! downloaded) plus the largest of `max_tokens` / `max_completion_tokens` / `max_output_tokens`
//! (times `n`), or `BUDGET_DEFAULT_COMPLETION_TOKENS` when the request sets none. The prompt is
//! every top-level member but settings ([`count_prompt`]); images and audio count at a fixed
//! worst case ([`ImageCost`]). The bound on overshoot is per request in flight: each can exceed
//! its reservation by what the body does not show (`previous_response_id`), charged as debt. When the answer ends the
//! reservation is **settled** with AOAI's `usage.total_tokens` (the difference is refunded or
//! charged): by the meter's tap, also when the client disconnects (no usage seen on a successful
//! answer: the reservation stays charged) or the upstream fails (an error answer or no answer:
//! refunded whole).
//!
//! Short-circuits with 429 (`token_budget_exceeded`, AOAI-shaped, never forwarded) with
//! `retry-after` / `retry-after-ms` saying when enough budget will be back (absent when the one
//! request is larger than the whole per-minute limit: it never fits). Adds the caller's
//! remaining budget to the request context; every answer to a limited caller carries it in
//! [`REMAINING_HEADER`].
//!
//! The budget is per handler instance: behind the gateway's round-robin over N instances a
//! caller can use up to N × its limit per minute. Set the limit to the share of one instance
//! (caller's total ÷ number of instances); see README "Token budgets".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

use crate::error::AppError;
use crate::settings::BudgetSettings;

/// The header with the caller's remaining tokens (after this request's reservation).
pub const REMAINING_HEADER: &str = "x-fwdproxy-remaining-tokens";

/// Tokens added per message by the chat format (role and separators), as OpenAI counts them.
const PER_MESSAGE: u64 = 4;
/// Tokens that prime every chat answer.
const PER_ANSWER: u64 = 3;

/// The buckets of every limited caller, built once at startup.
pub struct Budgets {
    buckets: HashMap<String, Arc<Bucket>>,
    default_completion: u64,
}

struct Bucket {
    limit: u64,
    state: Mutex<Level>,
}

struct Level {
    available: f64,
    at: Instant,
}

impl Bucket {
    fn per_sec(&self) -> f64 {
        self.limit as f64 / 60.0
    }

    /// Refill for the time passed, then run `f` on the level.
    fn with<T>(&self, f: impl FnOnce(&mut Level, f64) -> T) -> T {
        let mut level = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(level.at).as_secs_f64() * self.per_sec();
        level.available = (level.available + refill).min(self.limit as f64);
        level.at = now;
        f(&mut level, self.limit as f64)
    }
}

/// Tokens held for one request until its answer ends. Dropped without [`Reservation::settle`]
/// (no answer: the upstream failed, timed out, or a panic) it is refunded whole.
pub struct Reservation {
    bucket: Arc<Bucket>,
    reserved: u64,
    settled: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl Reservation {
    /// Settle with what the request really cost: `Some(tokens)` from AOAI's usage (0 for an
    /// error answer), `None` when unknown (a successful answer cut before its usage arrived: the
    /// reservation stays charged).
    pub fn settle(mut self, used: Option<u64>) {
        self.settled = true;
        let used = used.unwrap_or(self.reserved);
        let back = self.reserved as f64 - used as f64;
        self.bucket.with(|level, limit| {
            level.available = (level.available + back).min(limit);
        });
    }

    pub fn reserved(&self) -> u64 {
        self.reserved
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            let back = self.reserved as f64;
            self.bucket.with(|level, limit| {
                level.available = (level.available + back).min(limit);
            });
        }
    }
}

/// Admission granted: the reservation and the tokens left after it.
#[derive(Debug)]
pub struct Admitted {
    pub reservation: Reservation,
    pub remaining: u64,
}

/// Admission refused: the 429 and the tokens left.
#[derive(Debug)]
pub struct Refused {
    pub error: AppError,
    pub remaining: u64,
}

impl Budgets {
    /// One bucket per caller that has a limit (named, or `*` for every other caller), full.
    pub fn new<'a>(settings: &BudgetSettings, callers: impl IntoIterator<Item = &'a str>) -> Self {
        let now = Instant::now();
        let mut buckets = HashMap::new();
        for caller in callers {
            let limit = settings
                .limits
                .iter()
                .find(|(n, _)| n == caller)
                .map(|(_, l)| *l)
                .or(settings.every_other);
            if let Some(limit) = limit {
                buckets.insert(
                    caller.to_string(),
                    Arc::new(Bucket {
                        limit,
                        state: Mutex::new(Level {
                            available: limit as f64,
                            at: now,
                        }),
                    }),
                );
            }
        }
        Budgets {
            buckets,
            default_completion: settings.default_completion_tokens,
        }
    }

    /// Whether any caller is limited (the tokenizer tables are then loaded at start).
    pub fn any(&self) -> bool {
        !self.buckets.is_empty()
    }

    /// Whether `caller` has a limit.
    pub fn limits(&self, caller: &str) -> bool {
        self.buckets.contains_key(caller)
    }

    /// The tokens `caller` has left now (`None`: no limit).
    pub fn remaining(&self, caller: &str) -> Option<u64> {
        let bucket = self.buckets.get(caller)?;
        Some(bucket.with(|level, _| level.available.max(0.0).floor() as u64))
    }

    /// Reserve `tokens` for `caller` (who must have a limit).
    pub fn reserve(&self, caller: &str, tokens: u64) -> Result<Admitted, Refused> {
        let Some(bucket) = self.buckets.get(caller) else {
            return Err(Refused {
                error: AppError::Internal,
                remaining: 0,
            });
        };
        bucket.with(|level, limit| {
            let remaining = |l: &Level| l.available.max(0.0).floor() as u64;
            if tokens as f64 > limit {
                return Err(Refused {
                    error: AppError::TokenBudgetExceeded {
                        retry_after_ms: None,
                    },
                    remaining: remaining(level),
                });
            }
            if level.available >= tokens as f64 {
                level.available -= tokens as f64;
                return Ok(Admitted {
                    reservation: Reservation {
                        bucket: bucket.clone(),
                        reserved: tokens,
                        settled: false,
                    },
                    remaining: remaining(level),
                });
            }
            let missing = tokens as f64 - level.available;
            let ms = (missing / bucket.per_sec() * 1000.0).ceil().max(1.0) as u64;
            Err(Refused {
                error: AppError::TokenBudgetExceeded {
                    retry_after_ms: Some(ms),
                },
                remaining: remaining(level),
            })
        })
    }

    /// `BUDGET_DEFAULT_COMPLETION_TOKENS`.
    pub fn default_completion(&self) -> u64 {
        self.default_completion
    }

    /// The tokens to reserve for a request body: its prompt counted with the real tokenizer,
    /// plus the most it may generate.
    pub fn estimate(&self, body: &Value, deployment: Option<&str>, embeddings: bool) -> u64 {
        estimate(body, deployment, embeddings, self.default_completion)
    }
}

/// Bodies over this many bytes are counted on a blocking thread: tokenizing runs at roughly
/// 10–50 MB/s, and a large prompt must not stall the other requests of the async thread.
pub const INLINE_COUNT_BYTES: usize = 64 * 1024;

/// A limited caller's body, read the way AOAI reads it before anything is reserved: strict JSON
/// (`policy::json`: no duplicate key at any depth, nothing but whitespace after the value, no
/// byte-order mark, UTF-8), a top-level object, and no two top-level names that differ only in
/// case (AOAI's binder takes them as one field). With the gate off nothing else reads the body
/// strictly, and a body the reservation reads differently from AOAI is a budget bypass (red-team
/// findings: a BOM, a trailing comma, `NaN`, a gzip body or a second `max_tokens` reserved the
/// default completion while AOAI generated what the body asked for).
pub fn check_body(bytes: &[u8]) -> Result<(), AppError> {
    crate::pipeline::policy::extract::strict_object(bytes)
        .map_err(|problem| AppError::InvalidBody(problem.to_string()))
}

/// [`estimate`] from the body's bytes (not a JSON object: only the default completion).
pub fn estimate_bytes(
    body: &[u8],
    deployment: Option<&str>,
    embeddings: bool,
    default_completion: u64,
) -> u64 {
    let json: Value = serde_json::from_slice(body).unwrap_or_default();
    estimate(&json, deployment, embeddings, default_completion)
}

/// The tokens to reserve: the prompt counted with the model family's tokenizer, plus
/// `max_*tokens` (or `default_completion`) times `n`; embeddings the prompt only.
pub fn estimate(
    body: &Value,
    deployment: Option<&str>,
    embeddings: bool,
    default_completion: u64,
) -> u64 {
    // The tokenizer and image costs follow the model. On a deployment route AOAI ignores the
    // body's `model`, but the deployment name need not name the model either: when both are
    // there and differ, the larger count is reserved, so a `model` naming a cheaper family
    // lowers nothing (red team: `"model":"gpt-4o"` on a gpt-4o-mini deployment cut an image
    // from 48,169 to 1454 tokens).
    let named = field(body, "model").and_then(Value::as_str);
    let prompt = match (named, deployment) {
        (Some(m), Some(d)) if !m.eq_ignore_ascii_case(d) => {
            count_prompt(body, m).max(count_prompt(body, d))
        }
        (m, d) => count_prompt(body, m.or(d).unwrap_or("")),
    };
    if embeddings {
        return prompt;
    }
    // Several limits set: reserve the largest. Which one AOAI honours depends on the model and
    // API version; the largest is the one that cannot be exceeded (red-team finding: the
    // smallest was reserved).
    let max = ["max_completion_tokens", "max_output_tokens", "max_tokens"]
        .iter()
        .filter_map(|k| field(body, k).and_then(whole_number))
        .max()
        .unwrap_or(default_completion);
    let n = ["n", "best_of"]
        .iter()
        .filter_map(|k| field(body, k).and_then(whole_number))
        .max()
        .unwrap_or(1)
        .clamp(1, 128);
    // completions: a `prompt` array of strings or of token arrays is that many prompts, each
    // answered `n` times (an array of numbers is one tokenized prompt). A red-team finding: four
    // prompts reserved one completion.
    let prompts = match field(body, "prompt").and_then(Value::as_array) {
        Some(items) if items.iter().any(|i| i.is_string() || i.is_array()) => items.len() as u64,
        _ => 1,
    }
    .max(1);
    prompt.saturating_add(max.saturating_mul(n).saturating_mul(prompts))
}

/// A top-level member regardless of ASCII case: AOAI's front end binds `MAX_TOKENS` as
/// `max_tokens` (a red-team finding: case variants were reserved as absent).
fn field<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// A count as a client may write it: an integer, a float (`1e30`, saturated) or a numeric string.
fn whole_number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| *f >= 0.0)
                .map(|f| f.min(u64::MAX as f64) as u64)
        }),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| *f >= 0.0)
            .map(|f| f.min(u64::MAX as f64) as u64),
        _ => None,
    }
}

/// The tokenizer of a model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5, o-series, and anything not known to be older.
    O200k,
    /// `cl100k_base`: GPT-3.5, GPT-4 (not 4o/4.1/4.5), `text-embedding-*`.
    Cl100k,
}

impl Family {
    /// The family of a model or deployment name (deployments are often named after the model).
    pub fn of(model: &str) -> Family {
        let m = model.to_ascii_lowercase();
        let newer_gpt4 = ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt4o"]
            .iter()
            .any(|p| m.contains(p));
        let older = m.contains("gpt-35")
            || m.contains("gpt-3.5")
            || m.contains("text-embedding")
            || m.contains("davinci")
            || m.contains("babbage")
            || ((m.contains("gpt-4") || m.contains("gpt4")) && !newer_gpt4);
        if older {
            Family::Cl100k
        } else {
            Family::O200k
        }
    }

    fn count(self, text: &str) -> u64 {
        let bpe = match self {
            Family::O200k => tiktoken_rs::o200k_base_singleton(),
            Family::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        };
        bpe.encode_ordinary(text).len() as u64
    }
}

/// Load both tokenizer tables (a few hundred milliseconds) so the first limited request does
/// not pay for it. Blocking: run it off the async threads.
pub fn warm_up() {
    let _ = Family::O200k.count("warm up");
    let _ = Family::Cl100k.count("warm up");
}

/// Top-level members the model does not read (settings, routing, identity, counts). Every
/// other member is counted as prompt: a new prompt-bearing field AOAI adds (as `prediction`,
/// `response_format` and Responses `text.format` were) is then counted without a change here,
/// and an unknown setting costs only its few tokens of over-reservation.
const NOT_READ: &[&str] = &[
    "model",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "metadata",
    "store",
    "stream",
    "stream_options",
    "n",
    "best_of",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "seed",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "parallel_tool_calls",
    "service_tier",
    "background",
    "include",
    "truncation",
    "previous_response_id",
    "encoding_format",
    "dimensions",
];

/// Prompt tokens of a request body: every string the model reads, i.e. every top-level member
/// but the settings in [`NOT_READ`] (`messages`, `prompt`, `input`, `instructions`, `tools`,
/// `functions`, `response_format` schemas, `prediction`, Responses `text.format`, …; token-id
/// arrays count one per id), media parts at their worst-case fixed cost ([`media_cost`]), plus
/// the chat format's per-message overhead.
pub fn count_prompt(body: &Value, model: &str) -> u64 {
    let family = Family::of(model);
    let images = ImageCost::of(model);
    let mut tokens = 0u64;
    if let Some(map) = body.as_object() {
        for (key, v) in map {
            if NOT_READ.iter().any(|n| key.eq_ignore_ascii_case(n)) {
                continue;
            }
            tokens = tokens.saturating_add(count_value(v, family, images));
        }
    }
    if let Some(messages) = field(body, "messages").and_then(Value::as_array) {
        tokens = tokens
            .saturating_add(PER_MESSAGE.saturating_mul(messages.len() as u64))
            .saturating_add(PER_ANSWER);
    }
    tokens
}

fn count_value(v: &Value, family: Family, images: ImageCost) -> u64 {
    match v {
        Value::String(s) => family.count(s),
        Value::Number(_) => 1,
        Value::Array(items) => items.iter().fold(0u64, |t, i| {
            t.saturating_add(count_value(i, family, images))
        }),
        Value::Object(map) => {
            if let Some(cost) = media_cost(map, images) {
                return cost;
            }
            map.values().fold(0u64, |t, i| {
                t.saturating_add(count_value(i, family, images))
            })
        }
        Value::Bool(_) | Value::Null => 0,
    }
}

/// What one image costs as input, by detail. AOAI bills an image by its size after scaling,
/// which only decoding it would tell (and a URL is fetched by AOAI, not by us), so anything but
/// `detail: low` reserves the most one image can cost.
///
/// Sources (checked with the search tool): the OpenAI vision pricing rule as quoted in "Azure
/// OpenAI Essentials" (chapter "Image token cost"), and measured billing per model in
/// community.openai.com threads 1262691 ("more than one way to send a request", a table of
/// low/high input tokens per model) and 1281361 (gpt-4.1-mini billed 1536 × 1.62 = 2488):
/// GPT-4o/GPT-4.1/GPT-4 Turbo: 85 base + 170 per 512-px tile; the image is scaled to fit
/// 2048 × 2048, then its short side to 768, so at most 2048 × 768 = 4 × 2 tiles: 85 + 8 × 170
/// = 1445; `low` is the base alone. GPT-4o mini bills 2833 base + 5667 per tile (same dollar price
/// as GPT-4o), so up to 48,169. The patch-billed models (GPT-4.1 mini/nano, o4-mini) bill at
/// most 1536 patches times a multiplier (1.62, 2.46, 1.72). o1/o3: 75 + 150 per tile; GPT-5:
/// 70 + 140 per tile, both below the GPT-4o numbers, which they use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageCost {
    /// `detail: low`.
    pub low: u64,
    /// `high`, `auto` or absent: the most one image can cost.
    pub most: u64,
}

impl ImageCost {
    /// The image cost of a model or deployment name (unknown names: the GPT-4o numbers).
    pub fn of(model: &str) -> ImageCost {
        let m = model.to_ascii_lowercase();
        let patches = |mult: f64| {
            let most = (1536.0 * mult).ceil() as u64;
            ImageCost { low: most, most }
        };
        if m.contains("4o-mini") || m.contains("4o mini") {
            ImageCost {
                low: 2833,
                most: 2833 + 8 * 5667,
            }
        } else if m.contains("4.1-nano") {
            patches(2.46)
        } else if m.contains("o4-mini") {
            patches(1.72)
        } else if m.contains("4.1-mini") {
            patches(1.62)
        } else {
            ImageCost {
                low: 85,
                most: 85 + 8 * 170,
            }
        }
    }
}

/// Audio input tokens per byte of (decoded) audio: AOAI bills audio input at about 10 tokens a
/// second (one per 100 ms, OpenAI's realtime/audio pricing notes); the byte rate of the clip is
/// unknown without decoding, so assume the lowest common one, 8 kbit/s (1000 bytes a second):
/// one token per 100 bytes. Uncompressed WAV is over-reserved (about 30×) and refunded at
/// settlement.
const AUDIO_BYTES_PER_TOKEN: u64 = 100;

/// The fixed cost of a media part (chat `image_url` / `input_audio`, Responses `input_image`),
/// or `None` when the object is not one. Its URL or base64 data is not text the model reads, so
/// it is not tokenized.
fn media_cost(map: &serde_json::Map<String, Value>, images: ImageCost) -> Option<u64> {
    let kind = map.get("type").and_then(Value::as_str).unwrap_or("");
    let detail_of = |o: &serde_json::Map<String, Value>| {
        o.get("detail")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
    };
    let image = |detail: Option<String>| {
        if detail.as_deref() == Some("low") {
            images.low
        } else {
            images.most
        }
    };
    match kind {
        "image_url" | "input_image" | "image" => {
            // chat: {"type":"image_url","image_url":{"url","detail"}};
            // Responses: {"type":"input_image","image_url":"…","detail"}
            let detail = match map.get("image_url") {
                Some(Value::Object(inner)) => detail_of(inner).or_else(|| detail_of(map)),
                _ => detail_of(map),
            };
            Some(image(detail))
        }
        "input_audio" => {
            let data_len = map
                .get("input_audio")
                .and_then(|a| a.get("data"))
                .and_then(Value::as_str)
                .map_or(0, str::len) as u64;
            // base64: 4 characters carry 3 bytes
            let bytes = data_len / 4 * 3;
            Some(bytes.div_ceil(AUDIO_BYTES_PER_TOKEN).max(1))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn budgets(limits: &[(&str, u64)], every_other: Option<u64>) -> Budgets {
        let s = BudgetSettings {
            limits: limits.iter().map(|(n, l)| (n.to_string(), *l)).collect(),
            every_other,
            default_completion_tokens: 100,
        };
        Budgets::new(&s, ["a", "b", "c"])
    }

    #[test]
    fn reserve_refuse_settle() {
        let b = budgets(&[("a", 600)], None);
        assert!(b.limits("a") && !b.limits("b"));
        let first = b.reserve("a", 500).unwrap();
        assert_eq!(first.remaining, 100);
        let refused = b.reserve("a", 200).unwrap_err();
        match refused.error {
            AppError::TokenBudgetExceeded {
                retry_after_ms: Some(ms),
            } => {
                // 100 missing at 10 tokens/s: about 10 s (less the time since the reservation)
                assert!((9_000..=10_000).contains(&ms), "{ms}");
            }
            other => panic!("{other:?}"),
        }
        // the answer used 50 of the 500: 450 come back
        first.reservation.settle(Some(50));
        let second = b.reserve("a", 540).unwrap();
        assert!(second.remaining <= 10);
        // dropped without settling (no answer): refunded whole
        drop(second);
        assert!(b.reserve("a", 540).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_limit_never_fits() {
        let b = budgets(&[], Some(1000));
        assert!(b.limits("c"));
        let refused = b.reserve("c", 1001).unwrap_err();
        assert!(matches!(
            refused.error,
            AppError::TokenBudgetExceeded {
                retry_after_ms: None
            }
        ));
        assert_eq!(refused.remaining, 1000);
    }

    #[test]
    fn unknown_usage_keeps_the_charge_and_overuse_is_charged() {
        let b = budgets(&[("a", 600)], None);
        b.reserve("a", 100).unwrap().reservation.settle(None);
        b.reserve("a", 100).unwrap().reservation.settle(Some(300));
        // 600 - 100 - 300 = 200 left (plus a trickle of refill)
        let r = b.reserve("a", 0).unwrap();
        assert!((200..=201).contains(&r.remaining), "{}", r.remaining);
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let b = Arc::new(budgets(&[("a", 6000)], None));
        let granted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(a) = b.reserve("a", 70) {
                            granted.fetch_add(70, std::sync::atomic::Ordering::Relaxed);
                            std::mem::forget(a.reservation);
                        }
                    }
                });
            }
        });
        let g = granted.load(std::sync::atomic::Ordering::Relaxed);
        // the refill during the test is a few tokens at most (100 tokens/s)
        assert!(g <= 6000 + 70, "{g}");
        assert!(g >= 5900, "{g}");
    }

    #[test]
    fn estimate_counts_with_the_real_tokenizer() {
        let b = budgets(&[("a", 1)], None);
        let chat = json!({
            "messages": [{"role": "user", "content": "Hello world"}],
            "max_tokens": 10
        });
        // "user" 1 + "Hello world" 2 + 4 per message + 3 per answer, + 10
        assert_eq!(b.estimate(&chat, Some("gpt-4o"), false), 1 + 2 + 4 + 3 + 10);
        assert_eq!(b.estimate(&chat, Some("gpt-35-turbo"), false), 20);
        let no_max = json!({"prompt": "Hello world", "n": 2});
        assert_eq!(b.estimate(&no_max, None, false), 2 + 200);
        // case variants and other spellings of a count are read as AOAI reads them
        let lower = estimate(
            &json!({"max_tokens": 5000, "n": 3}),
            Some("gpt-4o"),
            false,
            7,
        );
        for upper in [
            json!({"Max_TOKENS": 5000, "N": 3}),
            json!({"Max_Tokens": "5000", "n": 3.0}),
        ] {
            assert_eq!(estimate(&upper, Some("gpt-4o"), false, 7), lower, "{upper}");
        }
        assert!(estimate(&json!({"max_tokens": 1e30}), Some("gpt-4o"), false, 7) > 1_000_000);
        let emb = json!({"input": ["Hello world", [1, 2, 3]], "max_tokens": 9});
        assert_eq!(b.estimate(&emb, Some("text-embedding-3-small"), true), 5);
        // a long text counts many tokens, not a byte or word guess
        let long = "tokenizer ".repeat(1000);
        let n = count_prompt(&json!({ "input": long }), "gpt-4o");
        assert!((1000..=2100).contains(&n), "{n}");
    }

    /// Every part AOAI bills as input is reserved (red-team round 3, F1): schemas, prediction,
    /// Responses `text.format` and tools, images at their worst case, audio by size.
    #[test]
    fn every_billed_prompt_part_is_reserved() {
        let big = "schema words ".repeat(2000);
        let tokens = count_prompt(&json!({ "input": big.clone() }), "gpt-4o");
        assert!(tokens > 3000, "{tokens}");
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        let bare = count_prompt(&base, "gpt-4o");
        for (key, part) in [
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": big}}}),
            ),
            ("prediction", json!({"type": "content", "content": big})),
            (
                "text",
                json!({"format": {"type": "json_schema", "schema": {"description": big}}}),
            ),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f", "description": big}}]),
            ),
            ("functions", json!([{"name": "f", "description": big}])),
            (
                "tool_choice",
                json!({"type": "function", "function": {"name": big}}),
            ),
            ("Response_Format", json!({"schema": big})),
        ] {
            let mut body = base.clone();
            body[key] = part;
            let n = count_prompt(&body, "gpt-4o");
            assert!(n >= bare + tokens, "{key}: {n} < {bare} + {tokens}");
        }
        // settings are not prompt
        let mut body = base.clone();
        body["user"] = json!(big);
        body["metadata"] = json!({ "k": big });
        assert_eq!(count_prompt(&body, "gpt-4o"), bare);
    }

    #[test]
    fn images_reserve_their_worst_case_and_audio_its_size() {
        let chat = |detail: Option<&str>, url: &str| {
            let mut img = json!({"url": url});
            if let Some(d) = detail {
                img["detail"] = json!(d);
            }
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": img}
            ]}]})
        };
        let overhead = PER_MESSAGE + PER_ANSWER + 1; // "user"
        let data = format!("data:image/png;base64,{}", "A".repeat(100_000));
        for url in ["https://example.com/a.png", data.as_str()] {
            for (detail, cost) in [
                (Some("low"), 85),
                (Some("LOW"), 85),
                (Some("high"), 1445),
                (Some("auto"), 1445),
                (None, 1445),
            ] {
                let n = count_prompt(&chat(detail, url), "gpt-4o");
                assert_eq!(n, cost + overhead, "{detail:?}");
            }
        }
        assert_eq!(
            count_prompt(&chat(Some("high"), "x"), "gpt-4o-mini"),
            2833 + 8 * 5667 + overhead
        );
        assert!(count_prompt(&chat(None, "x"), "gpt-4.1-nano") > 3700);
        // Responses: detail beside the URL; several images add up
        let responses = json!({"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://e/a.png", "detail": "low"},
            {"type": "input_image", "image_url": "https://e/b.png"},
            {"type": "input_image", "file_id": "file-1", "detail": "high"}
        ]}]});
        assert_eq!(count_prompt(&responses, "gpt-4o"), 1 + 85 + 1445 + 1445);
        // audio: by the clip's size, one token per 100 bytes
        let audio = json!({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "A".repeat(400_000), "format": "wav"}}
        ]}]});
        assert_eq!(
            count_prompt(&audio, "gpt-4o-audio-preview"),
            3000 + overhead
        );
    }

    #[test]
    fn the_largest_limit_is_reserved_times_n() {
        for body in [
            json!({"max_completion_tokens": 1, "max_tokens": 6000}),
            json!({"max_tokens": 6000, "max_completion_tokens": 1}),
            json!({"max_output_tokens": 6000, "max_tokens": 3}),
            json!({"Max_Completion_TOKENS": "6000", "max_tokens": 2}),
        ] {
            assert_eq!(estimate(&body, Some("gpt-4o"), false, 7), 6000, "{body}");
        }
        let mut body = json!({"max_completion_tokens": 1, "max_tokens": 6000, "n": 3});
        assert_eq!(estimate(&body, Some("gpt-4o"), false, 7), 18_000);
        body["n"] = json!(0);
        assert_eq!(estimate(&body, Some("gpt-4o"), false, 7), 6000);
    }

    #[test]
    fn every_prompt_of_a_completions_array_is_reserved_its_completion() {
        let prompt_of = |b: &Value| count_prompt(b, "gpt-35-turbo-instruct");
        for (body, prompts) in [
            (
                json!({"prompt": ["hi", "there", "x", "y"], "max_tokens": 100}),
                4,
            ),
            (
                json!({"prompt": [[1, 2], [3]], "max_tokens": 100, "n": 2}),
                2 * 2,
            ),
            (json!({"prompt": ["a", 1], "max_tokens": 100}), 2),
            (json!({"prompt": [1, 2, 3], "max_tokens": 100}), 1),
            (json!({"prompt": "one", "max_tokens": 100}), 1),
            (json!({"prompt": [], "max_tokens": 100}), 1),
        ] {
            let want = prompt_of(&body) + 100 * prompts;
            assert_eq!(
                estimate(&body, Some("gpt-35-turbo-instruct"), false, 7),
                want,
                "{body}"
            );
        }
    }

    #[test]
    fn a_limited_body_is_read_as_aoai_reads_it_or_refused() {
        for ok in [
            &b"{}"[..],
            b" {\"max_tokens\": 5, \"messages\": [{\"role\":\"user\",\"content\":\"hi\"}]} \n",
            b"{\"a\":{\"b\":1},\"A_\":2}",
        ] {
            assert!(check_body(ok).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"\xef\xbb\xbf{\"max_tokens\":5}"[..],
            b"{\"max_tokens\":5,}",
            b"{\"max_tokens\":5} x",
            b"{\"max_tokens\":5}\x00",
            b"{/*c*/\"max_tokens\":5}",
            b"{\"max_tokens\":NaN}",
            b"{\"max_tokens\":5000,\"max_tokens\":1}",
            b"{\"max_tokens\":5000,\"MAX_TOKENS\":1}",
            b"{\"max_tokens\":5000,\"max_\\u0074okens\":1}",
            b"{\"a\":{\"b\":1,\"b\":2}}",
            b"{\"a\":\"\xff\"}",
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
            b"[{\"max_tokens\":5}]",
            b"\"text\"",
            b"",
        ] {
            let e = check_body(bad).expect_err(&String::from_utf8_lossy(bad));
            assert!(matches!(e, AppError::InvalidBody(_)), "{e:?}");
        }
    }

    #[test]
    fn a_model_in_the_body_never_lowers_what_the_deployment_costs() {
        let image = json!({"type": "image_url", "image_url": {"url": "https://x/i.png"}});
        let body = |model: Option<&str>| {
            let mut b = json!({"messages": [{"role": "user", "content": [image.clone()]}], "max_tokens": 1});
            if let Some(m) = model {
                b["model"] = json!(m);
            }
            b
        };
        let mini = estimate(&body(None), Some("gpt-4o-mini"), false, 7);
        for m in ["gpt-4o", "GPT-4o", "", "gpt-35-turbo"] {
            assert_eq!(
                estimate(&body(Some(m)), Some("gpt-4o-mini"), false, 7),
                mini,
                "{m}"
            );
        }
        // a body model that costs more than the deployment's name counts
        let named = estimate(&body(Some("gpt-4o-mini")), Some("my-deployment"), false, 7);
        assert_eq!(named, mini);
    }

    #[test]
    fn families() {
        for (m, f) in [
            ("gpt-4o-mini", Family::O200k),
            ("gpt-4.1", Family::O200k),
            ("o3-mini", Family::O200k),
            ("gpt-5", Family::O200k),
            ("my-deployment", Family::O200k),
            ("gpt-4", Family::Cl100k),
            ("gpt-4-32k", Family::Cl100k),
            ("gpt-35-turbo", Family::Cl100k),
            ("text-embedding-ada-002", Family::Cl100k),
        ] {
            assert_eq!(Family::of(m), f, "{m}");
        }
    }
}
