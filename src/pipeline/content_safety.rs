//! Stage 4, **content safety**: runs after policy, when `CONTENT_SAFETY_ENDPOINT` is set and the
//! operation carries a prompt.
//!
//! Screens the prompt text with Azure AI Content Safety: `text:analyze` for the harm categories
//! (Hate, SelfHarm, Sexual, Violence; a severity threshold each; optional blocklists) and
//! `text:shieldPrompt` for jailbreaks in what the user said and indirect attacks in documents and
//! tool output. The service takes at most 10,000 characters per text and a handful of documents
//! per call, so long prompts are split and the parts screened concurrently.
//!
//! Short-circuits with 400 shaped exactly like AOAI's own prompt filter (`content_filter`,
//! `innererror.code: ResponsibleAIPolicyViolation`, the categories and severities that tripped),
//! or 503 when the service cannot answer and screening fails closed (the default;
//! `CONTENT_SAFETY_FAIL_OPEN=true` lets the request through). Either way a log line and a
//! counter record the outage. Adds the verdict details to the request context for the audit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::audit::Reason;
use super::forward::{https_client, BoxError, HttpsClient};
use super::policy::{PromptText, Text};
use crate::clients::identity::{TokenSource, COGNITIVE_SERVICES_SCOPE};
use crate::clients::keyvault::VaultSecret;
use crate::error::AppError;
use crate::settings::{parse_base_url, Secret, SettingsError, Source};

/// The key header of the Cognitive Services resource.
const SUBSCRIPTION_KEY: http::HeaderName =
    http::HeaderName::from_static("ocp-apim-subscription-key");

/// The API version whose shapes we speak.
pub const API_VERSION: &str = "2024-09-01";
/// The service's limit per text (and per user prompt of Prompt Shields).
pub const MAX_CHARS: usize = 10_000;
/// Prompt Shields: at most this many documents per call, together within `MAX_CHARS`.
pub const MAX_DOCUMENTS: usize = 5;
/// Most pieces one request may be split into (1 M characters); more is refused, not screened
/// half-way.
pub const MAX_PIECES: usize = 100;
/// Calls in flight per request.
const CONCURRENCY: usize = 8;

/// The four harm categories: service name, AOAI annotation name.
const CATEGORIES: [(&str, &str); 4] = [
    ("Hate", "hate"),
    ("SelfHarm", "self_harm"),
    ("Sexual", "sexual"),
    ("Violence", "violence"),
];

/// Content Safety settings.
#[derive(Debug, Clone)]
pub struct ContentSafetySettings {
    /// `CONTENT_SAFETY_ENDPOINT`.
    pub endpoint: url::Url,
    /// `CONTENT_SAFETY_KEY`; without it, a managed-identity token.
    pub key: Option<Secret>,
    /// `CONTENT_SAFETY_THRESHOLD_{HATE,SELFHARM,SEXUAL,VIOLENCE}`: block at or above (0–7).
    pub thresholds: [u8; 4],
    /// `CONTENT_SAFETY_BLOCKLISTS`: blocklist names, comma-separated.
    pub blocklists: Vec<String>,
    /// `CONTENT_SAFETY_PROMPT_SHIELDS`: run `text:shieldPrompt` (default true).
    pub shields: bool,
    /// `CONTENT_SAFETY_FAIL_OPEN`: let requests through when screening is unavailable.
    pub fail_open: bool,
    /// `CONTENT_SAFETY_TIMEOUT_MS`: per call.
    pub timeout: Duration,
}

impl ContentSafetySettings {
    /// `None` when `CONTENT_SAFETY_ENDPOINT` is unset (screening off).
    pub fn from_source(src: &Source) -> Result<Option<Self>, SettingsError> {
        let Some(endpoint) = src.get("CONTENT_SAFETY_ENDPOINT")? else {
            return Ok(None);
        };
        let endpoint = parse_base_url("CONTENT_SAFETY_ENDPOINT", endpoint)?;
        let names = [
            "CONTENT_SAFETY_THRESHOLD_HATE",
            "CONTENT_SAFETY_THRESHOLD_SELFHARM",
            "CONTENT_SAFETY_THRESHOLD_SEXUAL",
            "CONTENT_SAFETY_THRESHOLD_VIOLENCE",
        ];
        let mut thresholds = [4u8; 4];
        for (t, name) in thresholds.iter_mut().zip(names) {
            *t = src.number(name, 4u8)?;
            if !(1..=7).contains(t) {
                return Err(SettingsError::new(
                    name,
                    "must be 1-7 (2 low, 4 medium, 6 high)",
                ));
            }
        }
        let blocklists = src
            .get("CONTENT_SAFETY_BLOCKLISTS")?
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let timeout = Duration::from_millis(src.number("CONTENT_SAFETY_TIMEOUT_MS", 10_000u64)?);
        if timeout.is_zero() {
            return Err(SettingsError::new(
                "CONTENT_SAFETY_TIMEOUT_MS",
                "must be above 0",
            ));
        }
        Ok(Some(ContentSafetySettings {
            endpoint,
            key: src.get("CONTENT_SAFETY_KEY")?.map(Secret::new),
            thresholds,
            blocklists,
            shields: src.flag("CONTENT_SAFETY_PROMPT_SHIELDS", true)?,
            fail_open: src.flag("CONTENT_SAFETY_FAIL_OPEN", false)?,
            timeout,
        }))
    }
}

/// How calls to Content Safety authenticate.
pub enum Credential {
    /// `CONTENT_SAFETY_KEY`.
    Key(HeaderValue),
    /// `CONTENT_SAFETY_KEY_SECRET_URI`: the key from Key Vault, re-read on each call so a
    /// rotation applies at once.
    Vault(VaultSecret),
    /// No key: a managed-identity token for the Cognitive Services scope.
    Token(TokenSource),
    Missing,
}

/// Outage counters (read by logs and tests).
#[derive(Default, Debug)]
pub struct Counters {
    pub unavailable: AtomicU64,
    pub failed_open: AtomicU64,
    pub blocked: AtomicU64,
}

/// The verdict on one prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allowed,
    Blocked {
        reason: Reason,
        /// AOAI's `content_filter_result` object.
        result: Value,
        /// For the abuse record: severities, shield results, blocklist hits.
        details: Value,
    },
    /// More text than [`MAX_PIECES`] calls can screen: refused unscreened.
    TooLong,
}

/// Screening could not be done.
#[derive(Debug, Clone, PartialEq)]
pub struct Unavailable {
    pub retry_after: Option<u64>,
    pub why: String,
}

/// The Content Safety client, built once.
pub struct ContentSafety {
    client: HttpsClient,
    analyze_url: http::Uri,
    shield_url: http::Uri,
    credential: Credential,
    settings: ContentSafetySettings,
    pub counters: Counters,
}

impl ContentSafety {
    pub fn new(settings: ContentSafetySettings) -> Result<Self, BoxError> {
        // The forward stage's bare hyper client (see there); `settings.timeout` bounds each
        // whole call in `call`.
        let client = https_client(settings.timeout.min(Duration::from_secs(5)), 64)?;
        let base = settings.endpoint.as_str().trim_end_matches('/').to_string();
        let credential = match &settings.key {
            Some(k) => {
                let mut v = HeaderValue::from_str(k.expose())
                    .unwrap_or_else(|_| HeaderValue::from_static(""));
                v.set_sensitive(true);
                Credential::Key(v)
            }
            None => Credential::Missing,
        };
        Ok(ContentSafety {
            client,
            analyze_url: format!("{base}/contentsafety/text:analyze?api-version={API_VERSION}")
                .parse()?,
            shield_url: format!("{base}/contentsafety/text:shieldPrompt?api-version={API_VERSION}")
                .parse()?,
            credential,
            settings,
            counters: Counters::default(),
        })
    }

    /// Use this credential when no key is configured (Key Vault secret or managed identity).
    pub fn with_credential(mut self, credential: Credential) -> Self {
        if matches!(self.credential, Credential::Missing) {
            self.credential = credential;
        }
        self
    }

    pub fn needs_token_source(&self) -> bool {
        matches!(self.credential, Credential::Missing)
    }

    pub fn fail_open(&self) -> bool {
        self.settings.fail_open
    }

    /// Screen one prompt. `Err` only when the service could not answer.
    pub async fn screen(&self, prompt: &PromptText, shield: bool) -> Result<Verdict, Unavailable> {
        let all: Vec<&str> = prompt.all().map(|t| t.text.as_str()).collect();
        let analyze_pieces = split(&all.join("\n"), MAX_CHARS);
        let (prompt_pieces, doc_batches) = if shield && self.settings.shields {
            (
                split(&join(&prompt.user), MAX_CHARS),
                batch_documents(&prompt.documents),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let shield_calls = prompt_pieces.len().max(doc_batches.len());
        if analyze_pieces.len() + shield_calls > MAX_PIECES {
            return Ok(Verdict::TooLong);
        }

        // Request bodies serialised straight from borrowed text (no `Value` tree per call).
        let mut calls = Vec::with_capacity(analyze_pieces.len() + shield_calls);
        for text in &analyze_pieces {
            let body = serde_json::to_vec(&AnalyzeBody {
                text,
                categories: CATEGORIES.map(|(c, _)| c),
                blocklist_names: &self.settings.blocklists,
                halt_on_blocklist_hit: false,
                output_type: "FourSeverityLevels",
            });
            calls.push(Call::Analyze(
                body.map_err(|e| unavailable(None, e.to_string()))?,
            ));
        }
        for i in 0..shield_calls {
            let body = serde_json::to_vec(&ShieldBody {
                user_prompt: prompt_pieces.get(i).map(String::as_str),
                documents: doc_batches.get(i).map(Vec::as_slice),
            });
            calls.push(Call::Shield(
                body.map_err(|e| unavailable(None, e.to_string()))?,
            ));
        }

        let answers: Vec<Result<Answer, Unavailable>> = stream::iter(calls)
            .map(|call| self.call(call))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;

        let mut severities = [0u8; 4];
        let mut blocklist_hits: Vec<Value> = Vec::new();
        let (mut jailbreak, mut indirect) = (false, false);
        for answer in answers {
            match answer? {
                Answer::Analyze(a) => {
                    for c in a.categories_analysis {
                        if let Some(i) = CATEGORIES.iter().position(|(n, _)| *n == c.category) {
                            severities[i] = severities[i].max(c.severity.unwrap_or(0));
                        }
                    }
                    for m in a.blocklists_match {
                        blocklist_hits.push(json!({
                            "blocklistName": m.blocklist_name,
                            "blocklistItemId": m.blocklist_item_id,
                        }));
                    }
                }
                Answer::Shield(s) => {
                    jailbreak |= s.user_prompt_analysis.is_some_and(|u| u.attack_detected);
                    indirect |= s.documents_analysis.iter().any(|d| d.attack_detected);
                }
            }
        }
        Ok(self.verdict(
            severities,
            blocklist_hits,
            jailbreak,
            indirect,
            shield_calls > 0,
            !prompt.documents.is_empty(),
        ))
    }

    fn verdict(
        &self,
        severities: [u8; 4],
        blocklist_hits: Vec<Value>,
        jailbreak: bool,
        indirect: bool,
        shielded: bool,
        had_documents: bool,
    ) -> Verdict {
        let filtered_category =
            (0..CATEGORIES.len()).any(|i| severities[i] >= self.settings.thresholds[i]);
        let reason = if jailbreak {
            Reason::JailbreakDetected
        } else if indirect {
            Reason::IndirectAttackDetected
        } else if filtered_category || !blocklist_hits.is_empty() {
            Reason::ContentFiltered
        } else {
            // The common case: nothing to report, so no JSON to build.
            return Verdict::Allowed;
        };
        let mut result = Map::new();
        let mut details = Map::new();
        for (i, (service, aoai)) in CATEGORIES.iter().enumerate() {
            let filtered = severities[i] >= self.settings.thresholds[i];
            result.insert(
                (*aoai).into(),
                json!({"filtered": filtered, "severity": severity_word(severities[i])}),
            );
            details.insert((*service).into(), json!(severities[i]));
        }
        if shielded {
            result.insert(
                "jailbreak".into(),
                json!({"filtered": jailbreak, "detected": jailbreak}),
            );
            details.insert("jailbreak".into(), json!(jailbreak));
            if had_documents {
                result.insert(
                    "indirect_attack".into(),
                    json!({"filtered": indirect, "detected": indirect}),
                );
                details.insert("indirect_attack".into(), json!(indirect));
            }
        }
        if !blocklist_hits.is_empty() {
            let ids: Vec<Value> = blocklist_hits
                .iter()
                .map(|h| json!({"filtered": true, "id": h["blocklistName"]}))
                .collect();
            result.insert(
                "custom_blocklists".into(),
                json!({"filtered": true, "details": ids}),
            );
            details.insert(
                "blocklist_hits".into(),
                Value::Array(blocklist_hits.clone()),
            );
        }
        self.counters.blocked.fetch_add(1, Ordering::Relaxed);
        Verdict::Blocked {
            reason,
            result: Value::Object(result),
            details: Value::Object(details),
        }
    }

    async fn call(&self, call: Call) -> Result<Answer, Unavailable> {
        let (url, body, is_analyze) = match call {
            Call::Analyze(b) => (&self.analyze_url, b, true),
            Call::Shield(b) => (&self.shield_url, b, false),
        };
        let mut req = http::Request::new(
            Full::new(Bytes::from(body))
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = url.clone();
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let (name, value) = match &self.credential {
            Credential::Key(k) => (SUBSCRIPTION_KEY, k.clone()),
            Credential::Vault(secret) => {
                let mut key = HeaderValue::from_str(secret.current().expose()).map_err(|_| {
                    unavailable(None, "the Key Vault secret is not a header value".into())
                })?;
                key.set_sensitive(true);
                (SUBSCRIPTION_KEY, key)
            }
            Credential::Token(source) => {
                let header = source
                    .authorization(COGNITIVE_SERVICES_SCOPE)
                    .await
                    .map_err(|e| unavailable(None, format!("token: {e}")))?;
                (http::header::AUTHORIZATION, header)
            }
            Credential::Missing => {
                return Err(unavailable(
                    None,
                    "no CONTENT_SAFETY_KEY and no managed identity".into(),
                ))
            }
        };
        req.headers_mut().insert(name, value);
        // CONTENT_SAFETY_TIMEOUT_MS bounds the whole call, answer body included.
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let kind = if e.is_connect() {
                    "connect"
                } else {
                    "transport"
                };
                unavailable(None, kind.to_string())
            })?;
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|_| unavailable(None, "body".into()))?
                .to_bytes();
            Ok::<_, Unavailable>((parts, bytes))
        };
        let (parts, bytes) = tokio::time::timeout(self.settings.timeout, exchange)
            .await
            .map_err(|_| unavailable(None, "timeout".into()))??;
        let status = parts.status;
        if !status.is_success() {
            let retry_after = parts
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let code = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                .unwrap_or_default();
            return Err(unavailable(
                retry_after,
                format!("status {} {code}", status.as_u16()),
            ));
        }
        let parsed = if is_analyze {
            serde_json::from_slice(&bytes).map(Answer::Analyze)
        } else {
            serde_json::from_slice(&bytes).map(Answer::Shield)
        };
        parsed.map_err(|e| unavailable(None, format!("unexpected answer shape: {e}")))
    }

    /// Record an outage: log line and counter. Returns the error to answer with, or `None` when
    /// failing open.
    pub fn on_unavailable(&self, u: &Unavailable, request_id: &str) -> Option<AppError> {
        let n = self.counters.unavailable.fetch_add(1, Ordering::Relaxed) + 1;
        if self.settings.fail_open {
            let open = self.counters.failed_open.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                target: "content_safety",
                request_id,
                why = %u.why,
                unavailable_total = n,
                failed_open_total = open,
                "screening unavailable: failing open (CONTENT_SAFETY_FAIL_OPEN=true)"
            );
            None
        } else {
            tracing::warn!(
                target: "content_safety",
                request_id,
                why = %u.why,
                unavailable_total = n,
                "screening unavailable: failing closed"
            );
            Some(AppError::ScreeningUnavailable {
                retry_after: u.retry_after,
            })
        }
    }
}

fn unavailable(retry_after: Option<u64>, why: String) -> Unavailable {
    Unavailable { retry_after, why }
}

/// One Content Safety call, its JSON body already serialised.
enum Call {
    Analyze(Vec<u8>),
    Shield(Vec<u8>),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AnalyzeBody<'a> {
    text: &'a str,
    categories: [&'static str; 4],
    blocklist_names: &'a [String],
    halt_on_blocklist_hit: bool,
    output_type: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShieldBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user_prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    documents: Option<&'a [String]>,
}

enum Answer {
    Analyze(AnalyzeResponse),
    Shield(ShieldResponse),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnalyzeResponse {
    #[serde(default)]
    blocklists_match: Vec<BlocklistMatch>,
    #[serde(default)]
    categories_analysis: Vec<CategoryAnalysis>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlocklistMatch {
    #[serde(default)]
    blocklist_name: String,
    #[serde(default)]
    blocklist_item_id: String,
}

#[derive(Deserialize)]
struct CategoryAnalysis {
    category: String,
    severity: Option<u8>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShieldResponse {
    user_prompt_analysis: Option<AttackAnalysis>,
    #[serde(default)]
    documents_analysis: Vec<AttackAnalysis>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttackAnalysis {
    #[serde(default)]
    attack_detected: bool,
}

fn join(texts: &[Text]) -> String {
    let all: Vec<&str> = texts.iter().map(|t| t.text.as_str()).collect();
    all.join("\n")
}

/// AOAI's severity words for the four-level scale (and the eight-level one).
fn severity_word(severity: u8) -> &'static str {
    match severity {
        0..=1 => "safe",
        2..=3 => "low",
        4..=5 => "medium",
        _ => "high",
    }
}

/// Split `text` into pieces of at most `max` UTF-16 code units (the unit the service counts
/// is not documented; UTF-16 is never shorter than characters, so this is safe either way),
/// preferring to cut at whitespace in the last tenth of a piece.
pub fn split(text: &str, max: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut units = 0;
        let mut cut = rest.len();
        let mut last_space = None;
        for (i, c) in rest.char_indices() {
            if units + c.len_utf16() > max {
                cut = i;
                break;
            }
            units += c.len_utf16();
            if c.is_whitespace() && units > max - max / 10 {
                last_space = Some(i);
            }
        }
        if cut < rest.len() {
            if let Some(s) = last_space {
                cut = s;
            }
        }
        let (piece, tail) = rest.split_at(cut);
        if !piece.trim().is_empty() {
            pieces.push(piece.to_string());
        }
        rest = tail.trim_start();
    }
    pieces
}

/// Documents for Prompt Shields: long ones split, then packed at most `MAX_DOCUMENTS` a call
/// and `MAX_CHARS` in total a call.
fn batch_documents(docs: &[Text]) -> Vec<Vec<String>> {
    let mut batches: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut size = 0;
    for piece in docs.iter().flat_map(|d| split(&d.text, MAX_CHARS)) {
        let len: usize = piece.chars().map(char::len_utf16).sum();
        if !current.is_empty() && (current.len() == MAX_DOCUMENTS || size + len > MAX_CHARS) {
            batches.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(piece);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_respects_the_limit_and_keeps_every_character() {
        let text = "word ".repeat(5000); // 25,000 chars
        let pieces = split(&text, MAX_CHARS);
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| p.chars().count() <= MAX_CHARS));
        let rejoined: String = pieces.join(" ");
        assert_eq!(rejoined.split_whitespace().count(), 5000);
        // no whitespace at all: hard cuts
        let solid = "x".repeat(20_001);
        let pieces = split(&solid, MAX_CHARS);
        assert_eq!(
            pieces.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [10_000, 10_000, 1]
        );
        // astral characters count twice in UTF-16
        let emoji = "😀".repeat(6000);
        assert!(split(&emoji, MAX_CHARS)
            .iter()
            .all(|p| p.chars().count() <= 5000));
        assert!(split("   ", MAX_CHARS).is_empty());
    }

    #[test]
    fn documents_are_batched_within_limits() {
        let doc = |t: String| Text {
            text: t,
            ..Text::default()
        };
        let docs: Vec<Text> = (0..12).map(|i| doc(format!("doc {i}"))).collect();
        let b = batch_documents(&docs);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [5, 5, 2]);
        let big = vec![doc("y".repeat(6000)), doc("z".repeat(6000))];
        let b = batch_documents(&big);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn severity_words_match_aoai() {
        assert_eq!(
            [0, 2, 4, 6, 7].map(severity_word),
            ["safe", "low", "medium", "high", "high"]
        );
    }
}
