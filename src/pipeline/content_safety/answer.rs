//! Reading Content Safety's answers strictly: an answer the gate cannot fully read is a failure
//! of the screening call, never "nothing found".
//!
//! A field with a default would let a changed service, a proxy in between or a bug on either
//! side turn screening off silently (`{}` would mean "all clear"). So every field the verdict
//! depends on is required and checked against what was asked:
//!
//! - `text:analyze`: `categoriesAnalysis` holds each of `Hate`, `SelfHarm`, `Sexual`, `Violence`
//!   (exact spelling) exactly once, with an integer severity on the four-level scale we ask for
//!   (0, 2, 4, 6); `blocklistsMatch` is an array whenever blocklists were named.
//! - `text:shieldPrompt`: `userPromptAnalysis.attackDetected` is a boolean when a user prompt was
//!   sent; `documentsAnalysis` has exactly one entry with a boolean `attackDetected` per document
//!   sent.
//! - The answer is one JSON object (`application/json`), nothing after it, no field the verdict
//!   reads given twice.
//!
//! Validation happens while deserialising into small typed structs (no `Value` tree): the
//! happy path costs one pass over a few hundred bytes. Reasons name the check that failed and
//! never quote the answer, which could echo prompt text.

use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// Why an answer could not be read (for the log line; never contains answer text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub String);

impl Unreadable {
    fn new(why: impl Into<String>) -> Self {
        Unreadable(why.into())
    }
}

/// The four harm categories, in the order of [`super::CATEGORIES`]. Deserialising into this
/// enum refuses any other spelling (`violence`, `Self-Harm`) at no cost.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Hate,
    SelfHarm,
    Sexual,
    Violence,
}

/// `T` from a JSON object only: a derived struct also accepts an array (fields by position),
/// a shape the service never sends.
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(PhantomData)).map(Obj)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnalyzeAnswer {
    blocklists_match: Option<Vec<Obj<BlocklistMatch>>>,
    categories_analysis: Option<Vec<Obj<CategoryAnalysis>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlocklistMatch {
    blocklist_name: String,
    blocklist_item_id: String,
}

#[derive(Deserialize)]
struct CategoryAnalysis {
    category: Category,
    severity: u8,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShieldAnswer {
    user_prompt_analysis: Option<Obj<AttackAnalysis>>,
    documents_analysis: Option<Vec<Obj<AttackAnalysis>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttackAnalysis {
    attack_detected: bool,
}

/// A `text:analyze` answer, checked.
#[derive(Debug, Default, PartialEq)]
pub struct Analysis {
    /// Hate, SelfHarm, Sexual, Violence.
    pub severities: [u8; 4],
    /// (blocklist name, item id) of every hit.
    pub blocklist_hits: Vec<(String, String)>,
}

/// A `text:shieldPrompt` answer, checked.
#[derive(Debug, Default, PartialEq)]
pub struct Shield {
    pub jailbreak: bool,
    pub indirect: bool,
}

/// The answer's content type must be JSON (`application/json`, parameters allowed).
pub fn check_content_type(headers: &http::HeaderMap) -> Result<(), Unreadable> {
    let ok = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(Unreadable::new("answer is not application/json"))
    }
}

/// A `text:analyze` answer to a call that named `blocklists_asked` blocklists.
pub fn analyze(bytes: &[u8], blocklists_asked: bool) -> Result<Analysis, Unreadable> {
    let answer: AnalyzeAnswer = parse(bytes)?;
    let categories = answer
        .categories_analysis
        .ok_or_else(|| Unreadable::new("categoriesAnalysis missing"))?;
    let mut severities: [Option<u8>; 4] = [None; 4];
    for Obj(c) in categories {
        let slot = &mut severities[c.category as usize];
        if slot.is_some() {
            return Err(Unreadable::new("a category is listed twice"));
        }
        if !matches!(c.severity, 0 | 2 | 4 | 6) {
            return Err(Unreadable::new(format!(
                "severity {} is not on the four-level scale",
                c.severity
            )));
        }
        *slot = Some(c.severity);
    }
    let mut out = Analysis::default();
    for (i, s) in severities.into_iter().enumerate() {
        out.severities[i] = s.ok_or_else(|| {
            Unreadable::new(format!("category {} missing", super::CATEGORIES[i].0))
        })?;
    }
    match answer.blocklists_match {
        Some(hits) => {
            out.blocklist_hits = hits
                .into_iter()
                .map(|Obj(m)| (m.blocklist_name, m.blocklist_item_id))
                .collect();
        }
        None if blocklists_asked => {
            return Err(Unreadable::new(
                "blocklistsMatch missing although blocklists were named",
            ))
        }
        None => {}
    }
    Ok(out)
}

/// A `text:shieldPrompt` answer to a call that sent a user prompt (or not) and `documents`
/// documents.
pub fn shield(bytes: &[u8], prompt_sent: bool, documents: usize) -> Result<Shield, Unreadable> {
    let answer: ShieldAnswer = parse(bytes)?;
    let jailbreak = match (prompt_sent, answer.user_prompt_analysis) {
        (true, Some(Obj(a))) => a.attack_detected,
        (true, None) => return Err(Unreadable::new("userPromptAnalysis missing")),
        (false, _) => false,
    };
    let docs = answer.documents_analysis.unwrap_or_default();
    if docs.len() != documents {
        // absent counts as none: the service sends `[]` when no document was sent
        return Err(Unreadable::new(format!(
            "documentsAnalysis has {} entries for {documents} documents",
            docs.len()
        )));
    }
    Ok(Shield {
        jailbreak,
        indirect: docs.iter().any(|Obj(d)| d.attack_detected),
    })
}

/// One JSON object and nothing else, into `T`; serde's derive refuses duplicate fields.
fn parse<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, Unreadable> {
    serde_json::from_slice::<Obj<T>>(bytes)
        .map(|Obj(t)| t)
        .map_err(|e| {
            // serde's message can quote the answer; keep only its class and position
            let class = match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Data => {
                    "a field is missing, repeated or of the wrong type"
                }
                serde_json::error::Category::Eof => "truncated",
            };
            Unreadable::new(format!(
                "answer {class} (line {}, column {})",
                e.line(),
                e.column()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = r#"{"blocklistsMatch":[],"categoriesAnalysis":[{"category":"Hate","severity":0},{"category":"SelfHarm","severity":0},{"category":"Sexual","severity":2},{"category":"Violence","severity":6}]}"#;

    #[test]
    fn a_full_analyze_answer_reads() {
        let a = analyze(CLEAN.as_bytes(), true).unwrap();
        assert_eq!(a.severities, [0, 0, 2, 6]);
        assert!(a.blocklist_hits.is_empty());
        let hit = r#"{"blocklistsMatch":[{"blocklistName":"b","blocklistItemId":"i","blocklistItemText":"t"}],
            "categoriesAnalysis":[{"category":"Violence","severity":0},{"category":"Sexual","severity":0},
            {"category":"SelfHarm","severity":0},{"category":"Hate","severity":4}]}"#;
        let a = analyze(hit.as_bytes(), true).unwrap();
        assert_eq!(a.severities, [4, 0, 0, 0]);
        assert_eq!(a.blocklist_hits, [("b".to_string(), "i".to_string())]);
        // no blocklists asked: the field may be absent
        let bare = CLEAN.replace(r#""blocklistsMatch":[],"#, "");
        assert!(analyze(bare.as_bytes(), false).is_ok());
        assert!(analyze(bare.as_bytes(), true).is_err());
    }

    #[test]
    fn every_unreadable_analyze_answer_is_refused() {
        let cat = |c: &str, s: &str| format!(r#"{{"category":{c},"severity":{s}}}"#);
        let three = [
            cat(r#""Hate""#, "0"),
            cat(r#""SelfHarm""#, "0"),
            cat(r#""Sexual""#, "0"),
        ];
        let with = |last: String| {
            format!(
                r#"{{"blocklistsMatch":[],"categoriesAnalysis":[{},{last}]}}"#,
                three.join(",")
            )
        };
        let cases = vec![
            "{}".to_string(),
            r#"{"blocklistsMatch":[]}"#.to_string(),
            r#"{"blocklistsMatch":[],"categoriesAnalysis":null}"#.to_string(),
            format!(
                r#"{{"blocklistsMatch":[],"categoriesAnalysis":[{}]}}"#,
                three.join(",")
            ),
            with(cat(r#""violence""#, "6")),
            with(cat(r#""VIOLENCE""#, "6")),
            with(cat(r#""Other""#, "0")),
            with(cat(r#""Violence""#, "null")),
            with(cat(r#""Violence""#, r#""6""#)),
            with(cat(r#""Violence""#, "6.0")),
            with(cat(r#""Violence""#, "-2")),
            with(cat(r#""Violence""#, "3")),
            with(cat(r#""Violence""#, "8")),
            with(cat(r#""Violence""#, "256")),
            with(r#"{"category":"Violence"}"#.to_string()),
            with(r#"{"category":"Violence","severity":0,"severity":6}"#.to_string()),
            with(format!(
                "{},{}",
                cat(r#""Violence""#, "0"),
                cat(r#""Hate""#, "6")
            )),
            with(cat(r#""Violence""#, "0"))
                .replace(r#""blocklistsMatch":[]"#, r#""blocklistsMatch":null"#),
            with(cat(r#""Violence""#, "0"))
                .replace(r#""blocklistsMatch":[]"#, r#""blocklistsMatch":{}"#),
            with(cat(r#""Violence""#, "0"))
                .replace(r#""blocklistsMatch":[]"#, r#""blocklistsMatch":[{}]"#),
            format!("{} x", with(cat(r#""Violence""#, "0"))),
            with(cat(r#""Violence""#, "0"))[..60].to_string(),
            "".to_string(),
            "not json".to_string(),
            "[]".to_string(),
            "null".to_string(),
            // fields by position instead of by name
            r#"[[],[["Hate",0],["SelfHarm",0],["Sexual",0],["Violence",0]]]"#.to_string(),
            r#"{"blocklistsMatch":[],"categoriesAnalysis":[["Hate",0],["SelfHarm",0],["Sexual",0],["Violence",0]]}"#.to_string(),
        ];
        for case in &cases {
            assert!(analyze(case.as_bytes(), true).is_err(), "accepted: {case}");
        }
        // the complete control case is accepted, so the failures above are about the defect
        assert!(analyze(with(cat(r#""Violence""#, "0")).as_bytes(), true).is_ok());
        // a duplicated top-level field
        let dup = CLEAN.replace(
            r#""blocklistsMatch":[],"#,
            r#""categoriesAnalysis":[],"blocklistsMatch":[],"#,
        );
        assert!(analyze(dup.as_bytes(), true).is_err());
    }

    #[test]
    fn shield_answers_must_cover_what_was_sent() {
        let ok = r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":[{"attackDetected":true},{"attackDetected":false}]}"#;
        assert_eq!(
            shield(ok.as_bytes(), true, 2).unwrap(),
            Shield {
                jailbreak: false,
                indirect: true
            }
        );
        assert!(shield(ok.as_bytes(), true, 3).is_err());
        assert!(shield(ok.as_bytes(), true, 1).is_err());
        let prompt_only =
            r#"{"userPromptAnalysis":{"attackDetected":true},"documentsAnalysis":[]}"#;
        assert!(shield(prompt_only.as_bytes(), true, 0).unwrap().jailbreak);
        let no_docs_field = r#"{"userPromptAnalysis":{"attackDetected":false}}"#;
        assert!(shield(no_docs_field.as_bytes(), true, 0).is_ok());
        assert!(shield(no_docs_field.as_bytes(), true, 1).is_err());
        for bad in [
            "{}",
            r#"{"userPromptAnalysis":null,"documentsAnalysis":[]}"#,
            r#"{"userPromptAnalysis":{},"documentsAnalysis":[]}"#,
            r#"{"userPromptAnalysis":{"attackDetected":null},"documentsAnalysis":[]}"#,
            r#"{"userPromptAnalysis":{"attackDetected":"false"},"documentsAnalysis":[]}"#,
            r#"{"userPromptAnalysis":{"attackDetected":0},"documentsAnalysis":[]}"#,
            r#"{"userPromptAnalysis":{"attackDetected":false,"attackDetected":true},"documentsAnalysis":[]}"#,
            r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":null,"documentsAnalysis":[]}"#,
            r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":[{}]}"#,
            r#"{"userPromptAnalysis":[false],"documentsAnalysis":[]}"#,
            r#"[[false],[]]"#,
        ] {
            assert!(shield(bad.as_bytes(), true, 0).is_err(), "accepted: {bad}");
        }
        // documents only: no user prompt analysis needed, each document needs a boolean
        let docs_only = r#"{"documentsAnalysis":[{"attackDetected":false}]}"#;
        assert!(shield(docs_only.as_bytes(), false, 1).is_ok());
        assert!(shield(
            r#"{"documentsAnalysis":[{"attackDetected":null}]}"#.as_bytes(),
            false,
            1
        )
        .is_err());
    }

    #[test]
    fn reasons_never_quote_the_answer() {
        let secret = r#"{"categoriesAnalysis":[{"category":"prompt-secret-text","severity":0}]}"#;
        let why = analyze(secret.as_bytes(), false).unwrap_err().0;
        assert!(!why.contains("prompt-secret-text"), "{why}");
        let why = analyze(br#"{"categoriesAnalysis":"prompt-secret-text"}"#, false)
            .unwrap_err()
            .0;
        assert!(!why.contains("prompt-secret-text"), "{why}");
    }

    #[test]
    fn content_type_must_be_json() {
        let mut h = http::HeaderMap::new();
        assert!(check_content_type(&h).is_err());
        for (v, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("text/plain", false),
            ("text/html; charset=utf-8", false),
            ("application/jsonx", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, v.parse().unwrap());
            assert_eq!(check_content_type(&h).is_ok(), ok, "{v}");
        }
    }
}
