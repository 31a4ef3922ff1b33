//! Stage 7, **meter**: a tap on the answer body, after [`forward`](super::forward) answered.
//!
//! Reads `usage` from the bytes as they pass, never holding the answer back:
//! - JSON answers (chat, completions, embeddings, responses): the chunks are kept by reference
//!   (`Bytes` clones, no copy) up to [`JSON_KEEP_BYTES`] and read once when the body ends: one
//!   validating pass (`scan.rs`) finds the top-level `usage`, and serde_json reads only its value;
//! - SSE answers: each complete `data:` line is looked at only when it carries `"usage":{` (a
//!   byte search, no parse), so the one event that matters — the chat/completions usage chunk or
//!   the Responses `response.completed` event — is the only one parsed. Lines split across
//!   chunks are joined in one reused buffer.
//!
//! When the handler itself asked AOAI for usage (`stream_options.include_usage`, added or set
//! for a stream that did not ask or opted out, see [`inject_include_usage`]), the usage-only chunk (`"choices":[]` plus `usage`) is removed from
//! what the client receives, and so is the `"usage":null` AOAI adds to the other chunks: the
//! client gets exactly the events it would have got. Only then is any byte of the answer
//! touched; an event is held back only while it is incomplete (no SSE client can act on half an
//! event).
//!
//! Never fails the request. When the body ends or is dropped, what it measured goes to the
//! request's log line and usage summary (through [`UsageSlot`]: AOAI's usage, or for a
//! successful answer without one the reservation the budget kept, see [`Measured`]) and settles
//! the caller's token reservation, if any ([`super::budget`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use serde::Deserialize;

mod scan;
pub mod summary;
#[cfg(test)]
mod usage_proptests;

pub use summary::Measured;

use super::budget::Reservation;
use super::route::Operation;

/// A JSON answer larger than this is passed on without reading its usage (no AOAI answer with
/// usage comes near it but a huge embeddings batch; its usage is then missing from the log).
pub const JSON_KEEP_BYTES: usize = 16 * 1024 * 1024;

/// A complete `data:` line longer than this is not looked at (an SSE usage event is small).
const SSE_LINE_MAX: usize = 1024 * 1024;

/// Token usage of one answer, as AOAI reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

/// Operations whose answers carry `usage` (and so are metered and budgeted).
pub fn metered(op: Operation) -> bool {
    matches!(
        op,
        Operation::ChatCompletions
            | Operation::ExtensionsChatCompletions
            | Operation::Completions
            | Operation::Embeddings
            | Operation::V1ChatCompletions
            | Operation::V1Completions
            | Operation::V1Embeddings
            | Operation::V1Responses
    )
}

/// Chat and completions: the operations whose streams report usage only when asked.
pub fn asks_for_usage(op: Operation) -> bool {
    matches!(
        op,
        Operation::ChatCompletions
            | Operation::ExtensionsChatCompletions
            | Operation::Completions
            | Operation::V1ChatCompletions
            | Operation::V1Completions
    )
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<Details>,
    #[serde(default, alias = "output_tokens_details")]
    completion_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Inner {
    #[serde(default)]
    usage: Option<RawUsage>,
}

impl From<RawUsage> for Usage {
    fn from(r: RawUsage) -> Self {
        let prompt = r.prompt_tokens.unwrap_or(0);
        let completion = r.completion_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            // saturating: AOAI's counts are small, but an answer's numbers are not ours to trust
            total_tokens: r.total_tokens.unwrap_or(prompt.saturating_add(completion)),
            cached_tokens: r.prompt_tokens_details.and_then(|d| d.cached_tokens),
            reasoning_tokens: r.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        }
    }
}

/// Usage of a JSON answer or of one SSE event's data, if it reports any: its top-level `usage`,
/// else `response.usage`; none when `json` is not valid JSON or names either member twice at
/// top level. One validating pass (the `scan` module) finds the two members; serde_json reads
/// only their values, or the whole answer when the pass leaves it unsure (exactly what
/// `usage_of_serde`, serde_json alone, reads).
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    match scan::top_level(json) {
        scan::Scan::Members { usage, response } => {
            let usage = match usage {
                Some(v) => serde_json::from_slice::<Option<RawUsage>>(v).ok()?,
                None => None,
            };
            let response = match response {
                Some(v) => serde_json::from_slice::<Option<Inner>>(v).ok()?,
                None => None,
            };
            usage
                .or_else(|| response.and_then(|r| r.usage))
                .map(Usage::from)
        }
        scan::Scan::Invalid => None,
        scan::Scan::Unsure => usage_of_serde(json),
    }
}

/// [`usage_of`] by serde_json alone: the definition the scanner is held to.
fn usage_of_serde(json: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct C {
        #[serde(default)]
        usage: Option<RawUsage>,
        #[serde(default)]
        response: Option<Inner>,
    }
    let c: C = serde_json::from_slice(json).ok()?;
    c.usage
        .or_else(|| c.response.and_then(|r| r.usage))
        .map(Usage::from)
}

/// Whether `json` (one SSE event's data) is a usage-only chat chunk: `"choices": []` and usage.
fn usage_only_chunk(json: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct C {
        #[serde(default)]
        usage: Option<RawUsage>,
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    let c: C = serde_json::from_slice(json).ok()?;
    match (c.choices, c.usage) {
        (Some(choices), Some(u)) if choices.is_empty() => Some(u.into()),
        _ => None,
    }
}

/// Where the tap leaves what it measured for the request's log line and usage summary
/// (written when the log drops, which is after the tap: the logged body drops its inner body
/// first). Empty for an error answer (nothing is billed).
#[derive(Debug, Default)]
pub struct UsageSlot(Mutex<Option<Measured>>);

impl UsageSlot {
    /// AOAI's usage, when the answer reported it.
    pub fn get(&self) -> Option<Usage> {
        match self.measured() {
            Some(Measured::Usage(u)) => Some(u),
            _ => None,
        }
    }
    /// What a successful answer is counted as.
    pub fn measured(&self) -> Option<Measured> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set(&self, m: Measured) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
    }
}

impl Measured {
    /// The log line's `usage_source`: `answer` (AOAI's usage, exact), `reservation` (none
    /// reported; the budget kept the reservation, an estimate), `none` (none reported, no
    /// estimate: an unlimited caller).
    pub fn source(&self) -> &'static str {
        match self {
            Measured::Usage(_) => "answer",
            Measured::Estimate(_) => "reservation",
            Measured::Unknown => "none",
        }
    }
}

/// Byte position of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()]
            .iter()
            .position(|&b| b == first)
        {
            None => return None,
            Some(p) => {
                let at = i + p;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

/// Whether `line` has a `"usage"` key followed by an object (not `null`).
fn has_usage_object(line: &[u8]) -> bool {
    let mut rest = line;
    while let Some(at) = find(rest, b"\"usage\"") {
        rest = &rest[at + 7..];
        let mut i = 0;
        while i < rest.len() && matches!(rest[i], b' ' | b'\t' | b':') {
            i += 1;
        }
        if rest.get(i) == Some(&b'{') {
            return true;
        }
    }
    false
}

/// Make a chat/completions stream ask AOAI for its usage, when the client did not: the only
/// edit the handler ever makes to a request body, to one member the model does not read; every
/// other byte stays as the client sent it (and as the gate screened it). Then the meter removes
/// the usage chunk again ([`Meter`]'s `strip`), so the client gets exactly the events it would
/// have got. Per spelling of `stream_options` (member names matched regardless of ASCII case and
/// after unescaping, as AOAI's front end binds them):
///
/// | the client sent | the handler sends | stream metered |
/// |---|---|---|
/// | no `stream_options` | `"stream_options":{"include_usage":true},` added first | yes |
/// | `null` (the documented default, the same as absent) | `{"include_usage":true}` in its place | yes |
/// | an object without `include_usage` (`{}`, other members) | `"include_usage":true` added first inside | yes |
/// | `include_usage` `false` or `null` | that value replaced by `true` | yes |
/// | `include_usage: true` | nothing (the client asked: its usage chunk passes) | yes |
/// | anything else: `stream_options` or `include_usage` of another type (AOAI refuses it), either member twice in any spelling, `stream` twice with different values | nothing | only if AOAI reports usage anyway; else `usage_source` `reservation` or `none` |
///
/// Returns `None` when nothing is to change.
pub fn inject_include_usage(body: &[u8]) -> Option<Bytes> {
    add_include_usage(body, &body_facts(body)?)
}

/// How a stream gets its usage reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum StreamUsage {
    /// Not a stream (`stream` absent, not `true`).
    #[default]
    NotAStream,
    /// The client asked for usage itself.
    Asked,
    /// The handler asks: replace `remove` bytes at `at` with `insert`.
    Edit {
        at: usize,
        remove: usize,
        insert: &'static [u8],
    },
    /// Usage cannot be asked for without changing what the client asked (see
    /// [`inject_include_usage`]): the stream goes up as sent and is metered only if AOAI reports
    /// usage anyway.
    Cannot,
}

/// What the meter needs from a request body, read in one pass.
#[derive(Debug, Default)]
pub struct BodyFacts {
    /// `user`, when a non-empty string (at most 256 characters kept, for the log line).
    pub user: Option<String>,
    /// `model`, when a non-empty string (at most 64 characters kept): the deployment of the
    /// `v1` routes.
    pub model: Option<String>,
    /// `"stream": true`.
    pub stream: bool,
    /// Whether and how the handler asks for the stream's usage.
    pub usage: StreamUsage,
}

/// A member name once unescaped: borrowed from the body unless it had an escape.
struct Name<'a>(std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Which members a [`Members`] keeps.
trait Wanted {
    /// Names kept, matched regardless of ASCII case (lowercase here).
    const NAMES: &'static [&'static str];
}

/// The top level of a request body: what [`body_facts`] reads.
struct TopLevel;
impl Wanted for TopLevel {
    const NAMES: &'static [&'static str] = &["stream", "stream_options", "user", "model"];
}

/// Inside `stream_options`.
struct OptionsLevel;
impl Wanted for OptionsLevel {
    const NAMES: &'static [&'static str] = &["include_usage"];
}

/// The members of one JSON object named in `W` (any ASCII case, after unescaping), in order with
/// duplicates kept, values borrowed from the body (so their byte offsets are known); every other
/// member is skipped unread, only counted. Read from a `&str`: the body is checked as UTF-8 once,
/// as a whole (the skipped members are then never checked again).
struct Members<'a, W> {
    kept: Vec<(Name<'a>, &'a serde_json::value::RawValue)>,
    count: usize,
    wanted: std::marker::PhantomData<W>,
}

impl<'de, W: Wanted> serde::Deserialize<'de> for Members<'de, W> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<W>(std::marker::PhantomData<W>);
        impl<'de, W: Wanted> serde::de::Visitor<'de> for V<W> {
            type Value = Members<'de, W>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut kept = Vec::new();
                let mut count = 0;
                while let Some(key) = map.next_key::<Name<'de>>()? {
                    count += 1;
                    if W::NAMES.iter().any(|n| key.0.eq_ignore_ascii_case(n)) {
                        kept.push((key, map.next_value::<&'de serde_json::value::RawValue>()?));
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(Members {
                    kept,
                    count,
                    wanted: std::marker::PhantomData,
                })
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'a, W> Members<'a, W> {
    /// The values of the members named `name` regardless of ASCII case.
    fn named(&self, name: &str) -> Vec<&'a serde_json::value::RawValue> {
        self.kept
            .iter()
            .filter(|(k, _)| k.0.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
            .collect()
    }
}

/// Byte offset of `part` (a slice of `whole`) in `whole`.
fn offset_in(whole: &[u8], part: &str) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

/// A JSON string value, at most `max` characters of it (borrowed when it has no escape).
fn short_string(raw: &serde_json::value::RawValue, max: usize) -> Option<String> {
    let s: std::borrow::Cow<'_, str> = match serde_json::from_str::<&str>(raw.get()) {
        Ok(s) => s.into(),
        Err(_) => serde_json::from_str::<String>(raw.get()).ok()?.into(),
    };
    if s.is_empty() {
        None
    } else if s.len() <= max {
        Some(s.into_owned())
    } else {
        Some(s.chars().take(max).collect())
    }
}

/// Read [`BodyFacts`] from a JSON object body (`None` when it is not one).
pub fn body_facts(body: &[u8]) -> Option<BodyFacts> {
    // Top-level members only, borrowed (no tree), matched regardless of ASCII case as AOAI's
    // front end binds them: `STREAM` is `stream`.
    let text = std::str::from_utf8(body).ok()?;
    let members: Members<'_, TopLevel> = serde_json::from_str(text).ok()?;
    let mut facts = BodyFacts::default();
    for (key, raw) in &members.kept {
        if key.0.eq_ignore_ascii_case("user") {
            if let Some(u) = short_string(raw, 256) {
                facts.user = Some(u);
            }
        } else if key.0.eq_ignore_ascii_case("model") {
            if let Some(m) = short_string(raw, 64) {
                facts.model = Some(m);
            }
        }
    }
    let streams = members.named("stream");
    facts.stream = streams.iter().any(|v| v.get() == "true");
    facts.usage = if !facts.stream {
        StreamUsage::NotAStream
    } else if streams.iter().all(|v| v.get() == "true") {
        stream_usage(body, &members)
    } else {
        // `"stream":true,"STREAM":false`: which one AOAI binds is not ours to guess
        StreamUsage::Cannot
    };
    Some(facts)
}

/// [`StreamUsage`] of a body that asks for a stream (see [`inject_include_usage`]).
fn stream_usage(body: &[u8], top: &Members<'_, TopLevel>) -> StreamUsage {
    let options = top.named("stream_options");
    let Some(raw) = options.first() else {
        // no `stream_options`: added as the first member of the body
        let open = body.iter().position(|b| !b.is_ascii_whitespace());
        return match open {
            Some(at) if body[at] == b'{' => StreamUsage::Edit {
                at: at + 1,
                remove: 0,
                insert: br#""stream_options":{"include_usage":true},"#,
            },
            _ => StreamUsage::Cannot,
        };
    };
    if options.len() > 1 {
        return StreamUsage::Cannot;
    }
    let value = raw.get();
    let at = offset_in(body, value);
    if value == "null" {
        return StreamUsage::Edit {
            at,
            remove: value.len(),
            insert: br#"{"include_usage":true}"#,
        };
    }
    if !value.starts_with('{') {
        return StreamUsage::Cannot;
    }
    let Ok(inner) = serde_json::from_str::<Members<'_, OptionsLevel>>(value) else {
        return StreamUsage::Cannot;
    };
    let asked = inner.named("include_usage");
    match asked.as_slice() {
        [] => StreamUsage::Edit {
            at: at + 1,
            remove: 0,
            insert: if inner.count == 0 {
                br#""include_usage":true"#
            } else {
                br#""include_usage":true,"#
            },
        },
        [v] if v.get() == "true" => StreamUsage::Asked,
        [v] if v.get() == "false" || v.get() == "null" => StreamUsage::Edit {
            at: offset_in(body, v.get()),
            remove: v.get().len(),
            insert: b"true",
        },
        _ => StreamUsage::Cannot,
    }
}

/// [`inject_include_usage`] with the body's facts already read.
pub fn add_include_usage(body: &[u8], facts: &BodyFacts) -> Option<Bytes> {
    let StreamUsage::Edit { at, remove, insert } = facts.usage else {
        return None;
    };
    let mut out = BytesMut::with_capacity(body.len() + insert.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(insert);
    out.extend_from_slice(&body[at + remove..]);
    Some(out.freeze())
}

enum Mode {
    /// Keep the chunks (by reference) to parse once at the end.
    Json { kept: Vec<Bytes>, size: usize },
    /// Look at complete `data:` lines as they pass.
    Sse,
    /// Not an answer with usage (an error status, or over the JSON limit).
    Off,
}

/// The tap: wraps the answer body on its way to the client.
pub struct Meter {
    inner: Body,
    mode: Mode,
    /// The handler asked for usage: drop the usage-only chunk and `"usage":null` members.
    strip: bool,
    /// SSE: the start of a line (or, stripping, of an event) not yet complete.
    partial: Vec<u8>,
    usage: Option<Usage>,
    slot: Arc<UsageSlot>,
    reservation: Option<Reservation>,
    /// A 2xx answer: AOAI charges it (an error answer is refunded whole).
    success: bool,
    ended: bool,
    /// The inner body returned its end (it is not polled again).
    inner_done: bool,
    /// SSE `data:` events passed to the client (not `[DONE]`). AOAI sends at least one token
    /// per event, so a stream cut before its usage is charged at least this many tokens.
    events: u64,
}

/// Whether an SSE line is a `data:` event that carries a token (`[DONE]` does not).
fn is_data_event(line: &[u8]) -> bool {
    line.starts_with(b"data:") && trim_data(line) != b"[DONE]"
}

/// The `data:` events of whole events in `buf` ([`is_data_event`] lines).
fn data_events(buf: &[u8]) -> u64 {
    buf.split(|&b| b == b'\n')
        .filter(|l| is_data_event(strip_cr(l)))
        .count() as u64
}

impl Meter {
    /// Tap `inner`, an answer with `status` and `content_type`. `strip` when the handler added
    /// `include_usage` to the request.
    pub fn new(
        inner: Body,
        status: http::StatusCode,
        content_type: Option<&[u8]>,
        strip: bool,
        slot: Arc<UsageSlot>,
        reservation: Option<Reservation>,
    ) -> Self {
        let sse = content_type
            .is_some_and(|c| c.len() >= 17 && c[..17].eq_ignore_ascii_case(b"text/event-stream"));
        let mode = if !status.is_success() {
            Mode::Off
        } else if sse {
            Mode::Sse
        } else {
            Mode::Json {
                kept: Vec::new(),
                size: 0,
            }
        };
        Meter {
            inner,
            strip: strip && sse && status.is_success(),
            mode,
            partial: Vec::new(),
            usage: None,
            slot,
            reservation,
            success: status.is_success(),
            ended: false,
            inner_done: false,
            events: 0,
        }
    }

    /// Look at one complete SSE line (without its line end).
    fn sse_line(&mut self, line: &[u8]) {
        if is_data_event(line) {
            self.events += 1;
        }
        if line.len() > SSE_LINE_MAX || !line.starts_with(b"data:") {
            return;
        }
        if has_usage_object(line) {
            if let Some(u) = usage_of(trim_data(line)) {
                self.usage = Some(u);
            }
        }
    }

    /// SSE, not stripping: scan `data` for complete lines, joining one split across chunks.
    fn observe_sse(&mut self, data: &[u8]) {
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = (&rest[..nl], &rest[nl + 1..]);
            if self.partial.is_empty() {
                self.sse_line(strip_cr(head));
            } else if self.partial.len() + head.len() <= SSE_LINE_MAX {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.sse_line(strip_cr(&line));
                line.clear();
                self.partial = line; // keep the capacity
            } else {
                self.partial.clear();
            }
            rest = tail;
        }
        if self.partial.len() + rest.len() <= SSE_LINE_MAX {
            self.partial.extend_from_slice(rest);
        } else {
            self.partial.clear();
        }
    }

    /// SSE, stripping: pass on complete events only, without the usage-only one and without
    /// `"usage":null` members. A chunk of complete events with nothing to remove passes as it
    /// is (no copy).
    fn strip_sse(&mut self, data: Bytes) -> Option<Bytes> {
        if self.partial.is_empty() && ends_event(&data) && find(&data, b"\"usage\"").is_none() {
            self.events += data_events(&data);
            return Some(data);
        }
        self.partial.extend_from_slice(&data);
        let mut out = BytesMut::new();
        let mut start = 0;
        let buf = std::mem::take(&mut self.partial);
        while let Some((end, next)) = event_end(&buf[start..]) {
            let event = &buf[start..start + end];
            let whole = &buf[start..start + next];
            start += next;
            if let Some(data_line) = event
                .split(|&b| b == b'\n')
                .map(strip_cr)
                .find(|l| l.starts_with(b"data:"))
            {
                let json = trim_data(data_line);
                if is_data_event(data_line) {
                    self.events += 1;
                }
                if has_usage_object(data_line) {
                    if let Some(u) = usage_only_chunk(json) {
                        self.usage = Some(u);
                        continue;
                    }
                    if let Some(u) = usage_of(json) {
                        self.usage = Some(u);
                    }
                }
                if find(whole, b"\"usage\":null").is_some() {
                    out.extend_from_slice(&remove_usage_null(whole));
                    continue;
                }
            }
            out.extend_from_slice(whole);
        }
        let mut rest = buf;
        rest.drain(..start);
        self.partial = rest;
        (!out.is_empty()).then(|| out.freeze())
    }

    fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        match std::mem::replace(&mut self.mode, Mode::Off) {
            Mode::Json { kept, .. } => {
                let usage = if kept.len() == 1 {
                    usage_of(&kept[0])
                } else {
                    usage_of(&kept.concat())
                };
                if usage.is_some() {
                    self.usage = usage;
                }
            }
            Mode::Sse => {
                if !self.partial.is_empty() && !self.strip {
                    let line = std::mem::take(&mut self.partial);
                    self.sse_line(strip_cr(&line));
                }
            }
            Mode::Off => {}
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_data(line: &[u8]) -> &[u8] {
    let d = &line[5..];
    d.strip_prefix(b" ").unwrap_or(d)
}

/// Whether `data` ends at an event boundary (a blank line).
fn ends_event(data: &[u8]) -> bool {
    data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n")
}

/// The first event in `buf`: (end of its text, start of what follows its blank line).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + p;
        let rest = &buf[at + 1..];
        if rest.first() == Some(&b'\n') {
            return Some((at, at + 2));
        }
        if rest.starts_with(b"\r\n") {
            return Some((at, at + 3));
        }
        i = at + 1;
    }
    None
}

/// `event` without its `"usage":null` member (and the comma that joined it).
fn remove_usage_null(event: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"\"usage\":null";
    let mut out = Vec::with_capacity(event.len());
    let mut rest = event;
    while let Some(at) = find(rest, KEY) {
        let before = &rest[..at];
        let after = &rest[at + KEY.len()..];
        if let Some(stripped) = before.strip_suffix(b",") {
            out.extend_from_slice(stripped);
            rest = after;
        } else if let Some(stripped) = after.strip_prefix(b",") {
            out.extend_from_slice(before);
            rest = stripped;
        } else {
            out.extend_from_slice(before);
            rest = after;
        }
    }
    out.extend_from_slice(rest);
    out
}

impl http_body::Body for Meter {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        loop {
            if self.inner_done {
                return Poll::Ready(None);
            }
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            let frame = match polled {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    self.inner_done = true;
                    self.finish();
                    if self.strip && !self.partial.is_empty() {
                        // an unterminated last event: pass it on as it came
                        let rest = Bytes::from(std::mem::take(&mut self.partial));
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    return Poll::Ready(None);
                }
                other => return other,
            };
            let data = match frame.into_data() {
                Ok(d) => d,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            let this = &mut *self;
            match &mut this.mode {
                Mode::Json { kept, size } => {
                    *size += data.len();
                    if *size > JSON_KEEP_BYTES {
                        this.mode = Mode::Off;
                    } else {
                        kept.push(data.clone());
                    }
                }
                Mode::Sse if this.strip => match this.strip_sse(data) {
                    Some(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                    None => continue,
                },
                Mode::Sse => this.observe_sse(&data),
                Mode::Off => {}
            }
            if this.inner.is_end_stream() {
                this.finish();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && (!self.strip || self.partial.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        if self.strip {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // A body dropped before its end (the client went away) still reports what it saw.
        if !self.ended && http_body::Body::is_end_stream(&self.inner) {
            self.finish();
        }
        // A stream cut before its usage (the client went away, or a stream not ours to edit) is
        // charged its reservation, or the events it passed when there were more: AOAI bills
        // what it generated, at least a token an event (red team: a stream dropped just before
        // its usage chunk had carried 3000 tokens against a reservation of 1033).
        let estimate = |r: &Reservation| r.reserved().max(self.events);
        if self.success {
            self.slot.set(match (self.usage, &self.reservation) {
                (Some(u), _) => Measured::Usage(u),
                (None, Some(r)) => Measured::Estimate(estimate(r)),
                (None, None) => Measured::Unknown,
            });
        }
        if let Some(r) = self.reservation.take() {
            let used = match (self.success, self.usage) {
                (false, _) => Some(0),
                (true, Some(u)) => Some(u.total_tokens),
                (true, None) if self.events > r.reserved() => Some(self.events),
                (true, None) => None,
            };
            r.settle(used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const USAGE: &str = r#"{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":2}}"#;

    fn want() -> Usage {
        Usage {
            prompt_tokens: 11,
            completion_tokens: 7,
            total_tokens: 18,
            cached_tokens: Some(3),
            reasoning_tokens: Some(2),
        }
    }

    async fn run(chunks: Vec<String>, ct: &str, strip: bool) -> (String, Option<Usage>) {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        );
        let slot = Arc::new(UsageSlot::default());
        let meter = Meter::new(
            Body::from_stream(stream),
            http::StatusCode::OK,
            Some(ct.as_bytes()),
            strip,
            slot.clone(),
            None,
        );
        let bytes = Body::new(meter).collect().await.unwrap().to_bytes();
        (String::from_utf8(bytes.to_vec()).unwrap(), slot.get())
    }

    /// Every way of cutting `text` into two or three chunks.
    fn splits(text: &str) -> Vec<Vec<String>> {
        let b = text.as_bytes();
        let mut out = vec![vec![text.to_string()]];
        for i in 1..b.len() {
            out.push(vec![
                String::from_utf8(b[..i].to_vec()).unwrap(),
                String::from_utf8(b[i..].to_vec()).unwrap(),
            ]);
        }
        for i in (1..b.len()).step_by(7) {
            for j in (i + 1..b.len()).step_by(11) {
                out.push(vec![
                    String::from_utf8(b[..i].to_vec()).unwrap(),
                    String::from_utf8(b[i..j].to_vec()).unwrap(),
                    String::from_utf8(b[j..].to_vec()).unwrap(),
                ]);
            }
        }
        out
    }

    #[tokio::test]
    async fn json_answers_of_every_operation() {
        let responses = r#"{"id":"r","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"usage"}]}],"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":3},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":2},"total_tokens":18},"user":null}"#;
        let chat = format!(
            r#"{{"id":"c","choices":[{{"message":{{"content":"\"usage\":{{}}"}}}}],"usage":{USAGE}}}"#
        );
        for body in [chat.as_str(), responses] {
            for chunks in splits(body) {
                let (out, usage) = run(chunks, "application/json", false).await;
                assert_eq!(out, body);
                assert_eq!(usage, Some(want()), "{body}");
            }
        }
        let emb = r#"{"object":"list","data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        let (_, usage) = run(vec![emb.into()], "application/json", false).await;
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 0,
                total_tokens: 5,
                cached_tokens: None,
                reasoning_tokens: None
            })
        );
    }

    fn chat_stream(with_usage: bool, usage_null: bool) -> String {
        let null = if usage_null { r#","usage":null"# } else { "" };
        let mut s = format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"delta\":{{\"content\":\"hi \\\"usage\\\":{{\"}}}}]{null}}}\n\n\
             data: {{\"id\":\"c\",\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"stop\"}}]{null}}}\n\n"
        );
        if with_usage {
            s.push_str(&format!(
                "data: {{\"id\":\"c\",\"choices\":[],\"usage\":{USAGE}}}\n\n"
            ));
        }
        s.push_str("data: [DONE]\n\n");
        s
    }

    #[tokio::test]
    async fn streams_passed_through_report_usage() {
        let text = chat_stream(true, true);
        for chunks in splits(&text) {
            let (out, usage) = run(chunks, "text/event-stream", false).await;
            assert_eq!(out, text);
            assert_eq!(usage, Some(want()));
        }
        let responses = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"usage\":null}}}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"usage\":{}}}}}\n\n",
            r#"{"input_tokens":11,"input_tokens_details":{"cached_tokens":3},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":2},"total_tokens":18}"#
        );
        for chunks in splits(&responses) {
            let (out, usage) = run(chunks, "text/event-stream; charset=utf-8", false).await;
            assert_eq!(out, responses);
            assert_eq!(usage, Some(want()));
        }
    }

    #[tokio::test]
    async fn stripping_gives_the_client_the_stream_it_asked_for() {
        let asked = chat_stream(true, true);
        let expected = chat_stream(false, false);
        for chunks in splits(&asked) {
            let (out, usage) = run(chunks.clone(), "text/event-stream", true).await;
            assert_eq!(out, expected, "{chunks:?}");
            assert_eq!(usage, Some(want()));
        }
        // CRLF framing too
        let crlf = asked.replace('\n', "\r\n");
        let (out, usage) = run(vec![crlf], "text/event-stream", true).await;
        assert_eq!(out, expected.replace('\n', "\r\n"));
        assert_eq!(usage, Some(want()));
    }

    #[tokio::test]
    async fn error_answers_are_not_metered() {
        let slot = Arc::new(UsageSlot::default());
        let body = format!(r#"{{"usage":{USAGE}}}"#);
        let meter = Meter::new(
            Body::from(body.clone()),
            http::StatusCode::BAD_REQUEST,
            Some(b"application/json"),
            false,
            slot.clone(),
            None,
        );
        let out = Body::new(meter).collect().await.unwrap().to_bytes();
        assert_eq!(out, body.as_bytes());
        assert_eq!(slot.get(), None);
    }

    #[test]
    fn include_usage_is_added_once_and_only_to_streams() {
        let body = br#"  {"stream":true,"messages":[{"role":"user","content":"x"}]}"#;
        let out = inject_include_usage(body).unwrap();
        assert_eq!(
            &out[..],
            br#"  {"stream_options":{"include_usage":true},"stream":true,"messages":[{"role":"user","content":"x"}]}"#
        );
        // AOAI binds top-level names regardless of case: `STREAM` asks for a stream too
        assert!(inject_include_usage(br#"{"STREAM":true}"#).is_some());
        for unchanged in [
            &br#"{"stream":false}"#[..],
            br#"{"stream":false,"stream_options":null}"#,
            br#"{"messages":[]}"#,
            br#"{"stream":"true"}"#,
            br#"[{"stream":true}]"#,
            br#"{"stream":true"#,
        ] {
            let facts = body_facts(unchanged);
            assert!(
                facts.is_none_or(|f| f.usage == StreamUsage::NotAStream),
                "{}",
                String::from_utf8_lossy(unchanged)
            );
            assert!(inject_include_usage(unchanged).is_none());
        }
    }

    /// Every spelling of `stream_options`: the exact bytes sent up, and when edited, the body
    /// differs from the client's in `include_usage` alone.
    #[test]
    fn every_spelling_of_stream_options() {
        let edited: &[(&str, &str)] = &[
            (
                r#"{"stream":true,"stream_options":null,"n":1}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true},"n":1}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options": { } }"#,
                r#"{"stream":true,"stream_options": {"include_usage":true } }"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options": { "include_usage" : false } }"#,
                r#"{"stream":true,"stream_options": { "include_usage" : true } }"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":null,"x":"include_usage:false"}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true,"x":"include_usage:false"}}"#,
            ),
            // names as AOAI binds them: any ASCII case, escapes decoded
            (
                r#"{"Stream":true,"Stream_Options":{"INCLUDE_USAGE":false}}"#,
                r#"{"Stream":true,"Stream_Options":{"INCLUDE_USAGE":true}}"#,
            ),
            (
                r#"{"stream":true,"stream\u005foptions":{"include\u005Fusage":false}}"#,
                r#"{"stream":true,"stream\u005foptions":{"include\u005Fusage":true}}"#,
            ),
        ];
        for (sent, up) in edited {
            let facts = body_facts(sent.as_bytes()).unwrap();
            assert!(matches!(facts.usage, StreamUsage::Edit { .. }), "{sent}");
            let out = inject_include_usage(sent.as_bytes()).unwrap();
            assert_eq!(std::str::from_utf8(&out).unwrap(), *up, "{sent}");
            // the same document but for include_usage
            let mut a: serde_json::Value = serde_json::from_slice(sent.as_bytes()).unwrap();
            let b: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let key = a
                .as_object()
                .unwrap()
                .keys()
                .find(|k| k.eq_ignore_ascii_case("stream_options"))
                .unwrap()
                .clone();
            let opts = &mut a[&key];
            if opts.is_null() {
                *opts = serde_json::json!({});
            }
            let inner = opts
                .as_object()
                .unwrap()
                .keys()
                .find(|k| k.eq_ignore_ascii_case("include_usage"))
                .cloned()
                .unwrap_or_else(|| "include_usage".into());
            opts[&inner] = serde_json::Value::Bool(true);
            assert_eq!(a, b, "{sent}");
        }
        let asked = [
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":{"Include_Usage":true,"x":1}}"#,
        ];
        for sent in asked {
            assert_eq!(
                body_facts(sent.as_bytes()).unwrap().usage,
                StreamUsage::Asked,
                "{sent}"
            );
            assert!(inject_include_usage(sent.as_bytes()).is_none());
        }
        // not ours to decide: AOAI refuses the type, or which duplicate it binds is unknown
        let cannot = [
            r#"{"stream":true,"stream_options":true}"#,
            r#"{"stream":true,"stream_options":"include_usage"}"#,
            r#"{"stream":true,"stream_options":[]}"#,
            r#"{"stream":true,"stream_options":1}"#,
            r#"{"stream":true,"stream_options":{"include_usage":"true"}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":0}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":{}}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true,"INCLUDE_USAGE":false}}"#,
            r#"{"stream":true,"stream_options":null,"Stream_Options":{}}"#,
            r#"{"stream":true,"stream_options":{},"stream_options":null}"#,
            r#"{"stream":true,"STREAM":false}"#,
            r#"{"stream":false,"Stream":true}"#,
        ];
        for sent in cannot {
            assert_eq!(
                body_facts(sent.as_bytes()).unwrap().usage,
                StreamUsage::Cannot,
                "{sent}"
            );
            assert!(inject_include_usage(sent.as_bytes()).is_none(), "{sent}");
        }
    }

    #[test]
    fn usage_null_is_removed_wherever_it_sits() {
        assert_eq!(
            remove_usage_null(br#"{"a":1,"usage":null}"#),
            br#"{"a":1}"#.to_vec()
        );
        assert_eq!(
            remove_usage_null(br#"{"usage":null,"a":1}"#),
            br#"{"a":1}"#.to_vec()
        );
        assert!(!has_usage_object(br#"data: {"usage":null}"#));
        assert!(has_usage_object(br#"data: {"usage": {"a":1}}"#));
    }
}
