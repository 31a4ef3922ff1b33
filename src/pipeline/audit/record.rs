//! What one refusal becomes: an [`AbuseRecord`], and the address it came from.
//!
//! `client_ip` is the **last** `X-Forwarded-For` entry, port stripped: Application Gateway v2
//! appends the address it saw (`203.0.113.7:52345`, `[2001:db8::7]:52345`) at the end; every
//! entry before it was written by the client and proves nothing.

use serde::{Deserialize, Serialize};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The body carried no `user` although the user check requires one.
    MissingUser,
    /// The `user` is not in the registry.
    UnregisteredUser,
    /// The body could not be inspected (not JSON, wrong content type, `user` not a string).
    InvalidBody,
    /// Content Safety found a harm category at or above its threshold, or a blocklist hit.
    ContentFiltered,
    /// Prompt Shields detected a jailbreak in the user prompt.
    JailbreakDetected,
    /// Prompt Shields detected an indirect attack in documents or tool content.
    IndirectAttackDetected,
    /// The body was over `MAX_BODY_BYTES` (refused 413 before it was read).
    RequestTooLarge,
    /// More text than one request may have screened: refused unscreened.
    TooLongToScreen,
    /// Too many screened requests at once in this process: refused unscreened (429).
    ScreeningBusy,
    /// Screening was unavailable and `CONTENT_SAFETY_FAIL_OPEN=true` let the request through
    /// unscreened: not a refusal, but the record of a prompt nobody screened.
    PassedUnscreened,
}

/// One non-compliant request. Partition key: `user` (`"(none)"` when the request named none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbuseRecord {
    /// Idempotent id, made once when the record is built: every copy (journal, replay, retry)
    /// carries it, so Cosmos upserts never duplicate. Serialised first: the journal reader
    /// finds record starts by it.
    pub id: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub request_id: String,
    pub caller: String,
    pub user: String,
    pub deployment: Option<String>,
    pub operation: String,
    pub reason: Reason,
    /// Verdict details: categories and severities, shield results, blocklist hits.
    pub details: serde_json::Value,
    /// The prompt text (unless `AUDIT_CAPTURE_PROMPT=false`); `details.prompt_fields` says
    /// which field and role each piece came from.
    pub prompt: Option<String>,
    /// The last `X-Forwarded-For` entry (the one the gateway added), port stripped.
    pub client_ip: Option<String>,
}

impl super::durable::Item for AbuseRecord {
    const KIND: &'static str = "abuse";
    fn id(&self) -> &str {
        &self.id
    }
    fn partition_key(&self) -> String {
        self.user.clone()
    }
}

/// Partition key value for requests that named no user.
pub const NO_USER: &str = "(none)";

/// Cosmos DB refuses items over 2 MB; records are kept under this size by cutting the prompt
/// (the cut is noted in `details.prompt_truncated_bytes`).
pub const MAX_RECORD_BYTES: usize = 1_900_000;

/// Longest `client_ip` kept (an unparseable entry is stored cut to this, for a person to read).
const MAX_CLIENT_IP: usize = 64;

/// The client address from the `X-Forwarded-For` values (all of them, in order): the last entry,
/// trimmed, with its port and IPv6 brackets removed. `None` when there is no entry.
pub fn client_ip<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let last = values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .last()?;
    Some(strip_port(last))
}

fn strip_port(entry: &str) -> String {
    use std::net::{IpAddr, SocketAddr};
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return ip.to_string();
    }
    if let Ok(sock) = entry.parse::<SocketAddr>() {
        return sock.ip().to_string();
    }
    // `[2001:db8::1]` without a port
    if let Some(inner) = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')) {
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return ip.to_string();
        }
    }
    // Not an address (a name, garbage): keep it, bounded, for a person to read.
    let mut end = entry.len().min(MAX_CLIENT_IP);
    while !entry.is_char_boundary(end) {
        end -= 1;
    }
    entry[..end].to_string()
}

/// Keep a record under Cosmos DB's item size limit by cutting the prompt.
pub(crate) fn fit_for_cosmos(mut record: AbuseRecord) -> AbuseRecord {
    // Most records are small: skip the measuring serialisation unless the prompt is large.
    if record.prompt.as_ref().map_or(0, String::len) < MAX_RECORD_BYTES / 8 {
        return record;
    }
    let size = serde_json::to_vec(&record).map(|v| v.len()).unwrap_or(0);
    if size <= MAX_RECORD_BYTES {
        return record;
    }
    if let Some(prompt) = record.prompt.take() {
        let over = size - MAX_RECORD_BYTES;
        // JSON escaping can make the prompt longer on the wire than in memory; cut with margin.
        let mut keep = prompt.len().saturating_sub(over.saturating_mul(2) + 1024);
        while keep > 0 && !prompt.is_char_boundary(keep) {
            keep -= 1;
        }
        if let serde_json::Value::Object(map) = &mut record.details {
            map.insert("prompt_truncated_bytes".into(), prompt.len().into());
        } else {
            record.details = serde_json::json!({
                "verdict": record.details,
                "prompt_truncated_bytes": prompt.len(),
            });
        }
        record.prompt = Some(prompt[..keep].to_string());
    }
    record
}

#[cfg(test)]
pub(crate) fn sample(id: &str, prompt: Option<String>) -> AbuseRecord {
    AbuseRecord {
        id: id.into(),
        timestamp: "2026-01-01T00:00:00Z".into(),
        request_id: id.into(),
        caller: "default".into(),
        user: "u".into(),
        deployment: Some("gpt-4o".into()),
        operation: "chat_completions".into(),
        reason: Reason::ContentFiltered,
        details: serde_json::json!({"hate": 4}),
        prompt,
        client_ip: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_prompts_are_cut_under_the_item_limit() {
        let big = "é\"".repeat(1_500_000);
        let r = fit_for_cosmos(sample("a", Some(big.clone())));
        let size = serde_json::to_vec(&r).unwrap().len();
        assert!(size <= MAX_RECORD_BYTES, "{size}");
        assert_eq!(r.details["prompt_truncated_bytes"], big.len());
        assert_eq!(r.details["hate"], 4);
        let small = fit_for_cosmos(sample("b", Some("hi".into())));
        assert_eq!(small.prompt.as_deref(), Some("hi"));
    }

    #[test]
    fn the_id_is_serialised_first() {
        let text = serde_json::to_string(&sample("x", None)).unwrap();
        assert!(text.starts_with(r#"{"id":"#), "{text}");
    }

    #[test]
    fn client_ip_is_the_last_forwarded_entry_without_its_port() {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["203.0.113.7"], Some("203.0.113.7")),
            (&["203.0.113.7:52345"], Some("203.0.113.7")),
            // the client wrote the first entries; the gateway appended the last
            (
                &["10.0.0.1, 198.51.100.2:443, 203.0.113.7:52345"],
                Some("203.0.113.7"),
            ),
            (&["1.1.1.1", "203.0.113.9:1"], Some("203.0.113.9")),
            (&["spoofed", "  203.0.113.9 , "], Some("203.0.113.9")),
            (&["[2001:db8::7]:52345"], Some("2001:db8::7")),
            (&["1.2.3.4,[2001:db8::7]"], Some("2001:db8::7")),
            (&["2001:db8::7"], Some("2001:db8::7")),
            (&["::ffff:203.0.113.7"], Some("::ffff:203.0.113.7")),
            (&["", " , "], None),
            (&[], None),
        ];
        for (values, want) in cases {
            assert_eq!(
                client_ip(values.iter().copied()).as_deref(),
                *want,
                "{values:?}"
            );
        }
        // garbage is kept for a person, bounded, cut on a character boundary
        let junk = "é".repeat(100);
        let got = client_ip([junk.as_str()]).unwrap();
        assert!(got.len() <= MAX_CLIENT_IP && junk.starts_with(&got));
    }
}
