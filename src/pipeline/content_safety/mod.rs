//! Stage 4, **content safety**: runs after policy, when `CONTENT_SAFETY_ENDPOINT` is set and the
//! operation carries a prompt.
//!
//! Screens the prompt text with Azure AI Content Safety: `text:analyze` for the harm categories
//! (Hate, SelfHarm, Sexual, Violence; a severity threshold each; optional blocklists) and
//! `text:shieldPrompt` for jailbreaks in what the user said and indirect attacks in documents and
//! tool output. The service takes at most 10,000 characters per text and five documents of
//! 10,000 characters together per call, so long prompts are split with an overlap
//! ([`split`]) and the parts screened concurrently.
//!
//! Short-circuits with 400 shaped exactly like AOAI's own prompt filter (`content_filter`,
//! `innererror.code: ResponsibleAIPolicyViolation`, the categories and severities that tripped),
//! or 503 when screening fails and fails closed (the default; `CONTENT_SAFETY_FAIL_OPEN=true`
//! lets the request through). A failure is any call that does not end in an answer the gate can
//! fully read ([`answer`]): no connection, a timeout, a non-2xx status, or a 200 whose body misses
//! or garbles anything the verdict depends on. Either way a log line and a counter record it.
//!
//! Limits, so one caller cannot use up the resource's quota for everyone: a request needing more
//! than `CONTENT_SAFETY_MAX_CALLS_PER_REQUEST` calls is refused unscreened ([`Verdict::TooLong`],
//! 413), and past `CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS` requests being screened at once in
//! this process a new one is refused at once ([`Verdict::Busy`], 429 with retry-after) instead
//! of queueing. Adds the verdict details to the request context for the audit.
//!
//! Layout: this file holds the client, planning the calls and making them; [`settings`] the
//! `CONTENT_SAFETY_*` settings; [`split`] splitting and batching; [`answer`] the strict reading
//! of answers; [`verdict`] the verdict and its AOAI-shaped result.

pub mod answer;
pub mod settings;
pub mod split;
pub mod verdict;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::HeaderValue;
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use tokio::sync::Semaphore;

use super::policy::{PromptText, Text};
use crate::clients::http::{https_client, BoxError, HttpsClient};
use crate::clients::identity::{TokenSource, COGNITIVE_SERVICES_SCOPE};
use crate::clients::keyvault::VaultSecret;
use crate::error::AppError;
pub use settings::ContentSafetySettings;
use split::{batch, OVERLAP};
pub use verdict::Verdict;

/// The key header of the Cognitive Services resource.
const SUBSCRIPTION_KEY: http::HeaderName =
    http::HeaderName::from_static("ocp-apim-subscription-key");

/// The API version whose shapes we speak.
pub const API_VERSION: &str = "2024-09-01";
/// The service's limit per `text:analyze` text and per Prompt Shields `userPrompt`; also the
/// limit on all documents of one Prompt Shields call together (UTF-16 units, see [`split`]).
pub const MAX_CHARS: usize = 10_000;
/// Prompt Shields: at most this many documents per call.
pub const MAX_DOCUMENTS: usize = 5;
/// Calls in flight per request.
const CONCURRENCY: usize = 8;
/// Largest answer read: real answers are a few hundred bytes (more with many blocklist hits).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// `retry-after` of the 429 past `CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS`: screening calls
/// take well under a second, so a slot is usually free by then.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The four harm categories: service name, AOAI annotation name.
const CATEGORIES: [(&str, &str); 4] = [
    ("Hate", "hate"),
    ("SelfHarm", "self_harm"),
    ("Sexual", "sexual"),
    ("Violence", "violence"),
];

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

/// What screening did, for logs and tests.
#[derive(Default, Debug)]
pub struct Counters {
    /// Screening failed (no answer, an error status, or an answer that could not be read).
    pub unavailable: AtomicU64,
    /// Of those, answers that arrived but could not be fully read.
    pub unreadable: AtomicU64,
    /// Requests let through unscreened by `CONTENT_SAFETY_FAIL_OPEN=true`.
    pub failed_open: AtomicU64,
    pub blocked: AtomicU64,
    /// Refused: more calls needed than `CONTENT_SAFETY_MAX_CALLS_PER_REQUEST`.
    pub too_long: AtomicU64,
    /// Refused: `CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS` already being screened.
    pub busy: AtomicU64,
    /// Content Safety calls made (answered or not).
    pub calls: AtomicU64,
}

/// Screening could not be done.
#[derive(Debug, Clone, PartialEq)]
pub struct Unavailable {
    pub retry_after: Option<u64>,
    /// For the log line: never prompt or answer text.
    pub why: String,
}

/// The Content Safety client, built once.
pub struct ContentSafety {
    client: HttpsClient,
    analyze_url: http::Uri,
    shield_url: http::Uri,
    credential: Credential,
    settings: ContentSafetySettings,
    /// One permit per request being screened (`CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS`).
    in_flight: Semaphore,
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
            in_flight: Semaphore::new(settings.max_concurrent as usize),
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

    /// Screen one prompt; `shield` when the operation gets Prompt Shields. `Err` when a call
    /// failed (see [`ContentSafety::on_unavailable`]); the limits give [`Verdict::TooLong`] and
    /// [`Verdict::Busy`] without calling the service.
    pub async fn screen(&self, prompt: &PromptText, shield: bool) -> Result<Verdict, Unavailable> {
        // Everything gets harm screening, joined so a phrase across two fields is seen whole.
        let all = join(prompt.all());
        let analyze: Vec<&str> = pieces(&all);
        let shielding = shield && self.settings.shields;
        let user = if shielding {
            join(prompt.user.iter())
        } else {
            Cow::Borrowed("")
        };
        let user_pieces: Vec<&str> = pieces(&user);
        let doc_batches: Vec<Vec<&str>> = if shielding {
            batch(
                prompt.documents.iter().flat_map(|d| pieces(&d.text)),
                MAX_DOCUMENTS,
                MAX_CHARS,
            )
        } else {
            Vec::new()
        };
        // Piece i of the user prompt and batch i of the documents share a call.
        let shield_calls = user_pieces.len().max(doc_batches.len());
        let needed = analyze.len() + shield_calls;
        if needed > self.settings.max_calls as usize {
            self.counters.too_long.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "content_safety",
                calls_needed = needed,
                max_calls = self.settings.max_calls,
                "prompt refused unscreened: more calls than CONTENT_SAFETY_MAX_CALLS_PER_REQUEST"
            );
            return Ok(Verdict::TooLong);
        }
        if needed == 0 {
            return Ok(Verdict::Allowed);
        }
        // Held until the verdict: the calls of this request count against the process limit.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "content_safety",
                max_concurrent = self.settings.max_concurrent,
                "prompt refused unscreened: CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS reached"
            );
            return Ok(Verdict::Busy);
        };

        // Request bodies serialised straight from borrowed text (no `Value` tree per call).
        let mut calls = Vec::with_capacity(needed);
        for text in analyze {
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
            let user_prompt = user_pieces.get(i).copied();
            let documents = doc_batches.get(i).map(Vec::as_slice);
            let body = serde_json::to_vec(&ShieldBody {
                user_prompt,
                documents,
            });
            calls.push(Call::Shield {
                body: body.map_err(|e| unavailable(None, e.to_string()))?,
                prompt: user_prompt.is_some(),
                documents: documents.map_or(0, <[&str]>::len),
            });
        }

        // A block found by any call wins over a failure of another: with
        // CONTENT_SAFETY_FAIL_OPEN=true a failed Prompt Shields call must not let through a
        // prompt `text:analyze` flagged. Failing closed, the first failure ends the calls (the
        // request is refused either way; those in flight are dropped, saving quota); failing
        // open, every call runs so that every block is seen.
        let mut answers = stream::iter(calls)
            .map(|call| self.call(call))
            .buffer_unordered(CONCURRENCY);
        let mut severities = [0u8; 4];
        let mut blocklist_hits: Vec<(String, String)> = Vec::new();
        let (mut jailbreak, mut indirect) = (false, false);
        let mut failure = None;
        while let Some(answer) = answers.next().await {
            match answer {
                Ok(Answer::Analyze(a)) => {
                    for (s, new) in severities.iter_mut().zip(a.severities) {
                        *s = (*s).max(new);
                    }
                    blocklist_hits.extend(a.blocklist_hits);
                }
                Ok(Answer::Shield(s)) => {
                    jailbreak |= s.jailbreak;
                    indirect |= s.indirect;
                }
                Err(u) => {
                    failure.get_or_insert(u);
                    if !self.settings.fail_open {
                        break;
                    }
                }
            }
        }
        drop(answers);
        let verdict = verdict::build(
            &self.settings.thresholds,
            severities,
            blocklist_hits,
            jailbreak,
            indirect,
            shield_calls > 0,
            !doc_batches.is_empty(),
        );
        if matches!(verdict, Verdict::Blocked { .. }) {
            self.counters.blocked.fetch_add(1, Ordering::Relaxed);
        }
        match (verdict, failure) {
            (blocked @ Verdict::Blocked { .. }, _) => Ok(blocked),
            (_, Some(failure)) => Err(failure),
            (verdict, None) => Ok(verdict),
        }
    }

    async fn call(&self, call: Call) -> Result<Answer, Unavailable> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        // `shield`: (user prompt sent, documents sent), what a Prompt Shields answer must cover.
        let (url, body, shield) = match call {
            Call::Analyze(b) => (&self.analyze_url, b, None),
            Call::Shield {
                body,
                prompt,
                documents,
            } => (&self.shield_url, body, Some((prompt, documents))),
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
            let bytes = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| unavailable(None, "answer body unreadable or too large".into()))?
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
            return Err(unavailable(
                retry_after,
                format!("status {} {}", status.as_u16(), error_code(&bytes)),
            ));
        }
        let read = answer::check_content_type(&parts.headers).and_then(|()| match shield {
            None => {
                answer::analyze(&bytes, !self.settings.blocklists.is_empty()).map(Answer::Analyze)
            }
            Some((prompt, documents)) => {
                answer::shield(&bytes, prompt, documents).map(Answer::Shield)
            }
        });
        read.map_err(|e| {
            self.counters.unreadable.fetch_add(1, Ordering::Relaxed);
            unavailable(None, format!("unreadable answer: {}", e.0))
        })
    }

    /// Record a limit refusal ([`Verdict::TooLong`], [`Verdict::Busy`]) in a log line and
    /// return its answer; `None` for other verdicts.
    pub fn on_limit(&self, verdict: &Verdict, request_id: &str) -> Option<AppError> {
        let error = verdict.limit_error()?;
        tracing::warn!(
            target: "content_safety",
            request_id,
            refusal = error.code(),
            "screening limit reached: refused unscreened"
        );
        Some(error)
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

/// The service's `error.code`, kept only when it looks like one (it goes to a log line).
fn error_code(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Error,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        code: String,
    }
    serde_json::from_slice::<Body>(bytes)
        .ok()
        .map(|b| b.error.code)
        .filter(|c| c.len() <= 64 && c.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or_default()
}

/// One Content Safety call, its JSON body already serialised, with what the answer must cover.
enum Call {
    Analyze(Vec<u8>),
    Shield {
        body: Vec<u8>,
        prompt: bool,
        documents: usize,
    },
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
    documents: Option<&'a [&'a str]>,
}

enum Answer {
    Analyze(answer::Analysis),
    Shield(answer::Shield),
}

/// The texts joined by newlines (one text is borrowed, not copied).
fn join<'a>(mut texts: impl Iterator<Item = &'a Text>) -> Cow<'a, str> {
    let Some(first) = texts.next() else {
        return Cow::Borrowed("");
    };
    let Some(second) = texts.next() else {
        return Cow::Borrowed(&first.text);
    };
    let mut all = String::with_capacity(first.text.len() + second.text.len() + 1);
    all.push_str(&first.text);
    let mut previous = first;
    for t in std::iter::once(second).chain(texts) {
        all.push('\n');
        if siblings(&previous.field, &t.field) {
            // Parts of one content array reach the model back to back: a word cut across two
            // parts ("blood" + "bath") is screened whole in a seam line (a red-team finding).
            all.push_str(tail(&previous.text, SEAM));
            all.push_str(head(&t.text, SEAM));
            all.push('\n');
        }
        all.push_str(&t.text);
        previous = t;
    }
    Cow::Owned(all)
}

/// Characters of each side kept in a seam: a phrase up to twice this long, cut anywhere between
/// two parts, lies whole in the seam (and the seam within one split piece: 2 × 250 ≤ OVERLAP).
const SEAM: usize = 250;

/// `a` and `b` are neighbouring elements of one array (`messages[0].content[1].text` and
/// `messages[0].content[2].text`): the model reads them as one text.
fn siblings(a: &str, b: &str) -> bool {
    fn parent(field: &str) -> Option<(&str, usize)> {
        let f = field.strip_suffix(".text").unwrap_or(field);
        let f = f.strip_suffix(']')?;
        let open = f.rfind('[')?;
        Some((&f[..open], f[open + 1..].parse().ok()?))
    }
    // Only content parts: separate prompts or embeddings inputs (`input[0]`, `input[1]`) are
    // read apart.
    match (parent(a), parent(b)) {
        (Some((pa, ia)), Some((pb, ib))) => {
            pa == pb && ib == ia + 1 && (pa.ends_with(".content") || pa.ends_with(".output"))
        }
        _ => false,
    }
}

fn tail(text: &str, chars: usize) -> &str {
    let start = text
        .char_indices()
        .rev()
        .nth(chars.saturating_sub(1))
        .map_or(0, |(i, _)| i);
    &text[start..]
}

fn head(text: &str, chars: usize) -> &str {
    let end = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i);
    &text[..end]
}

/// `text` split for the service, without pieces that are only whitespace.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = split::split(text, MAX_CHARS, OVERLAP);
    out.retain(|p| !p.trim().is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(field: &str, text: &str) -> Text {
        Text {
            text: text.into(),
            field: field.into(),
            role: None,
        }
    }

    #[test]
    fn parts_of_one_array_are_also_screened_joined_at_their_seam() {
        let texts = [
            part("messages[0].content[0].text", "please blood"),
            part("messages[0].content[1].text", "bath now"),
            part("messages[1].content", "other"),
            part("messages[2].content[0].text", "é".repeat(300).as_str()),
            part("messages[2].content[1].text", "x"),
        ];
        let all = join(texts.iter());
        assert!(all.contains("please bloodbath now"), "{all}");
        // not across messages
        assert!(!all.contains("nowother") && !all.contains("now\nother\nother"));
        // seams keep at most SEAM characters a side, cut on character boundaries
        assert!(all.contains(&format!("{}x\n", "é".repeat(SEAM))));
        assert!(siblings(
            "input[0].content[3].text",
            "input[0].content[4].text"
        ));
        assert!(!siblings(
            "messages[0].content[1].text",
            "messages[0].content[3].text"
        ));
        assert!(!siblings("messages[0].content", "messages[1].content"));
        assert!(!siblings("input[0]", "input[1]"));
        assert!(!siblings("prompt[0]", "prompt[1]"));
        assert_eq!(tail("abc", 5), "abc");
        assert_eq!(head("abc", 2), "ab");
    }

    fn text(t: &str) -> Text {
        Text {
            text: t.into(),
            ..Text::default()
        }
    }

    #[test]
    fn join_borrows_one_text_and_joins_several() {
        assert!(matches!(join([text("a")].iter()), Cow::Borrowed("a")));
        assert_eq!(join([text("a"), text("b"), text("c")].iter()), "a\nb\nc");
        assert_eq!(join(std::iter::empty()), "");
    }

    #[test]
    fn blank_pieces_are_not_sent() {
        assert!(pieces("  \n\t ").is_empty());
        let text = format!("{}{}", "a".repeat(MAX_CHARS), " ".repeat(MAX_CHARS));
        assert!(pieces(&text).iter().all(|p| !p.trim().is_empty()));
    }

    #[test]
    fn service_error_codes_are_kept_only_when_they_look_like_codes() {
        assert_eq!(
            error_code(br#"{"error":{"code":"ServerBusy"}}"#),
            "ServerBusy"
        );
        assert_eq!(error_code(br#"{"error":{"code":"some prompt text"}}"#), "");
        assert_eq!(error_code(b"not json"), "");
    }
}
