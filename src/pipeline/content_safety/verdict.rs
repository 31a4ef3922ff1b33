//! The verdict on one prompt, from the answers of all its calls: AOAI's own
//! `content_filter_result` shape for the client and the details for the abuse record.

use serde_json::{json, Map, Value};

use super::CATEGORIES;
use crate::error::AppError;
use crate::pipeline::audit::Reason;

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
    /// A limit refusal: screening the prompt would take more calls than
    /// `CONTENT_SAFETY_MAX_CALLS_PER_REQUEST`; refused unscreened (413).
    TooLong,
    /// A limit refusal: `CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS` requests are being screened in
    /// this process; refused at once, unscreened (429 with retry-after).
    Busy,
}

impl Verdict {
    /// The answer to a limit refusal ([`Verdict::TooLong`], [`Verdict::Busy`]); `None` for the
    /// others. The gate records the refusal, then answers with this.
    pub fn limit_error(&self) -> Option<AppError> {
        match self {
            Verdict::TooLong => Some(AppError::TooLongToScreen),
            Verdict::Busy => Some(AppError::ScreeningBusy {
                retry_after: super::BUSY_RETRY_AFTER_SECS,
            }),
            Verdict::Allowed | Verdict::Blocked { .. } => None,
        }
    }
}

/// The verdict from the highest severity per category (Hate, SelfHarm, Sexual, Violence), the
/// blocklist hits (name, item id) and the Prompt Shields results; `shielded` when Prompt
/// Shields ran, `had_documents` when it was given documents.
pub fn build(
    thresholds: &[u8; 4],
    severities: [u8; 4],
    blocklist_hits: Vec<(String, String)>,
    jailbreak: bool,
    indirect: bool,
    shielded: bool,
    had_documents: bool,
) -> Verdict {
    let filtered_category = (0..CATEGORIES.len()).any(|i| severities[i] >= thresholds[i]);
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
        let filtered = severities[i] >= thresholds[i];
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
            .map(|(name, _)| json!({"filtered": true, "id": name}))
            .collect();
        result.insert(
            "custom_blocklists".into(),
            json!({"filtered": true, "details": ids}),
        );
        let hits: Vec<Value> = blocklist_hits
            .into_iter()
            .map(|(name, item)| json!({"blocklistName": name, "blocklistItemId": item}))
            .collect();
        details.insert("blocklist_hits".into(), Value::Array(hits));
    }
    Verdict::Blocked {
        reason,
        result: Value::Object(result),
        details: Value::Object(details),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_words_match_aoai() {
        assert_eq!(
            [0, 2, 4, 6, 7].map(severity_word),
            ["safe", "low", "medium", "high", "high"]
        );
    }

    #[test]
    fn nothing_over_a_threshold_is_allowed_and_anything_blocks() {
        let t = [4, 4, 4, 4];
        assert_eq!(
            build(&t, [2, 0, 2, 2], vec![], false, false, true, true),
            Verdict::Allowed
        );
        let Verdict::Blocked {
            reason,
            result,
            details,
        } = build(&t, [0, 0, 0, 4], vec![], false, false, true, false)
        else {
            panic!("not blocked")
        };
        assert_eq!(reason, Reason::ContentFiltered);
        assert_eq!(
            result["violence"],
            json!({"filtered": true, "severity": "medium"})
        );
        assert_eq!(
            result["jailbreak"],
            json!({"filtered": false, "detected": false})
        );
        assert!(result.get("indirect_attack").is_none());
        assert_eq!(details["Violence"], 4);
        let hit = vec![("list".to_string(), "item".to_string())];
        assert!(matches!(
            build(&t, [0; 4], hit, false, false, false, false),
            Verdict::Blocked {
                reason: Reason::ContentFiltered,
                ..
            }
        ));
        assert!(matches!(
            build(&t, [0; 4], vec![], true, true, true, true),
            Verdict::Blocked {
                reason: Reason::JailbreakDetected,
                ..
            }
        ));
        assert!(matches!(
            build(&t, [0; 4], vec![], false, true, true, true),
            Verdict::Blocked {
                reason: Reason::IndirectAttackDetected,
                ..
            }
        ));
    }
}
