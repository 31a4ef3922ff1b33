//! Property tests of the extractor (bounded: a few thousand cases, seconds).
//!
//! - A marker planted in any text-bearing position of any operation's body, in any JSON
//!   encoding (`\u` escapes, surrogate pairs, short escapes), comes out in a screened bucket.
//! - Every string of an arbitrary JSON value placed where the model reads is accounted for.
//! - Arbitrary and mutated bytes: no panic; what is accepted is JSON serde_json accepts too.

use proptest::prelude::*;

use super::extract::{json_body, Extracted};
use super::map::{spec, NOT_TEXT, OPAQUE};
use super::multipart;
use crate::pipeline::route::Operation;

const MARKER: &str = "qzxmarkerqzx";

/// Bodies with `@@` where the text goes, by operation.
const POSITIONS: &[(Operation, &str)] = &[
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"user","content":"@@"}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"content":"@@","role":"system"}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"developer","content":[{"type":"text","text":"@@"}]}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"@@"}]}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"user","content":[{"type":"brand_new","brand_new":{"words":["@@"]}}]}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"assistant","content":"@@"}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"assistant","refusal":"@@"}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"@@"}}]}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"assistant","function_call":{"name":"f","arguments":"@@"}}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"tool","tool_call_id":"c","content":"@@"}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[{"role":"function","name":"f","content":[{"type":"text","text":"@@"}]}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[],"tools":[{"type":"function","function":{"name":"f","description":"@@"}}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"array","items":{"type":"object","properties":{"b":{"description":"@@"}}}}}}}}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[],"functions":[{"name":"f","parameters":{"properties":{"x":{"enum":["@@"]}}}}]}"#,
    ),
    (
        Operation::ChatCompletions,
        r#"{"messages":[],"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{"description":"@@"}}}}"#,
    ),
    (
        Operation::ExtensionsChatCompletions,
        r#"{"messages":[],"data_sources":[{"type":"azure_search","parameters":{"role_information":"@@"}}]}"#,
    ),
    (
        Operation::ExtensionsChatCompletions,
        r#"{"messages":[],"dataSources":[{"type":"AzureCognitiveSearch","parameters":{"roleInformation":"@@"}}]}"#,
    ),
    (
        Operation::V1ChatCompletions,
        r#"{"model":"m","messages":[{"role":"user","content":"ok"}],"a_field_from_the_future":{"deep":["@@"]}}"#,
    ),
    (Operation::Completions, r#"{"prompt":"@@"}"#),
    (Operation::V1Completions, r#"{"prompt":["a","@@"]}"#),
    (Operation::Completions, r#"{"prompt":"a","suffix":"@@"}"#),
    (Operation::Embeddings, r#"{"input":"@@"}"#),
    (Operation::V1Embeddings, r#"{"input":["x","@@"]}"#),
    (
        Operation::V1Responses,
        r#"{"instructions":"@@","input":"x"}"#,
    ),
    (Operation::V1Responses, r#"{"input":"@@"}"#),
    (
        Operation::V1Responses,
        r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"@@"}]}]}"#,
    ),
    (
        Operation::V1Responses,
        r#"{"input":[{"type":"function_call_output","call_id":"c","output":"@@"}]}"#,
    ),
    (
        Operation::V1Responses,
        r#"{"input":[{"type":"function_call","call_id":"c","name":"f","arguments":"@@"}]}"#,
    ),
    (
        Operation::V1Responses,
        r#"{"input":"x","tools":[{"type":"function","name":"f","description":"@@"}]}"#,
    ),
    (
        Operation::V1Responses,
        r#"{"input":"x","prompt":{"id":"p","variables":{"v":"@@"}}}"#,
    ),
    (Operation::ImageGenerations, r#"{"prompt":"@@","n":1}"#),
    (Operation::AudioSpeech, r#"{"input":"@@","voice":"alloy"}"#),
    (
        Operation::AudioSpeech,
        r#"{"input":"x","instructions":"@@"}"#,
    ),
];

/// How one character is written inside a JSON string.
fn encode_char(c: char, how: u8, out: &mut String) {
    match (c, how % 4) {
        ('"', _) => out.push_str("\\\""),
        ('\\', _) => out.push_str("\\\\"),
        ('\n', 0) => out.push_str("\\n"),
        (c, _) if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
        (c, 1) | (c, 2) => {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                if how % 4 == 1 {
                    out.push_str(&format!("\\u{u:04x}"));
                } else {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
        (c, _) => out.push(c),
    }
}

fn encode(text: &str, hows: &[u8]) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        encode_char(
            c,
            hows.get(i % hows.len().max(1)).copied().unwrap_or(0),
            &mut out,
        );
    }
    out
}

/// Text around the marker: letters, spaces, punctuation, accents, astral characters, newlines.
fn noise() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('a'),
            Just(' '),
            Just('\n'),
            Just('"'),
            Just('\\'),
            Just('é'),
            Just('😀'),
            Just('{'),
            Just('\u{1}'),
            any::<char>(),
        ],
        0..12,
    )
    .prop_map(|v| v.into_iter().collect())
}

fn all_text(e: &Extracted) -> String {
    e.prompt
        .all()
        .map(|t| t.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_planted_marker_is_always_extracted(
        pos in 0..POSITIONS.len(),
        before in noise(),
        after in noise(),
        hows in proptest::collection::vec(any::<u8>(), 1..8),
        outer_hows in proptest::collection::vec(any::<u8>(), 1..8),
        extra_turn in any::<bool>(),
    ) {
        let (op, tpl) = POSITIONS[pos];
        let text = format!("{before}{MARKER}{after}");
        // inside `arguments`: JSON written in a string, escapes on both levels
        let value = if tpl.contains("\"arguments\":\"@@\"") {
            let inner = format!("{{\"q\":\"{}\"}}", encode(&text, &hows));
            encode(&inner, &outer_hows)
        } else {
            encode(&text, &hows)
        };
        let mut body = tpl.replace("@@", &value);
        if extra_turn {
            body = body.replacen("\"messages\":[", "\"messages\":[{\"role\":\"user\",\"content\":\"hello\"},", 1);
            body = body.replace("},]", "}]");
        }
        prop_assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok(), "{}", body);
        let e = json_body(body.as_bytes(), spec(op), true)
            .map_err(|f| TestCaseError::fail(format!("{:?} for {body}", f.problem)))?;
        prop_assert!(all_text(&e).contains(MARKER), "{} lost the marker: {:?}", body, e.prompt);
        prop_assert!(e.tokens.is_none());
    }

    #[test]
    fn every_string_of_any_value_where_the_model_reads_is_accounted_for(
        value in arb_json(),
        at in 0..4usize,
    ) {
        let (op, tpl) = [
            (Operation::ChatCompletions, r#"{"messages":[{"role":"user","content":@@}]}"#),
            (Operation::ChatCompletions, r#"{"messages":@@}"#),
            (Operation::ChatCompletions, r#"{"unknown_field":@@}"#),
            (Operation::V1Responses, r#"{"input":@@}"#),
        ][at];
        let body = tpl.replace("@@", &value.to_string());
        let e = json_body(body.as_bytes(), spec(op), true)
            .map_err(|f| TestCaseError::fail(format!("{:?} for {body}", f.problem)))?;
        let got = all_text(&e);
        let mut want = Vec::new();
        strings(&value, "", &mut want);
        for s in want {
            prop_assert!(got.contains(s.as_str()), "{:?} missing from {:?} for {}", s, got, body);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_only_json_is_accepted(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        op in 0..Operation::ALL.len(),
    ) {
        let op = Operation::ALL[op];
        if let Ok(_e) = json_body(&bytes, spec(op), true) {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok());
        }
        let _ = multipart::parse(&bytes, "XyZ");
    }

    #[test]
    fn mutated_bodies_never_panic_and_only_json_is_accepted(
        pos in 0..POSITIONS.len(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
    ) {
        let (op, tpl) = POSITIONS[pos];
        let mut bytes = tpl.replace("@@", "x\\u00e9\\ud83d\\ude00").into_bytes();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 => bytes.insert(i, byte),
                1 if i < bytes.len() => { bytes.remove(i); }
                _ if i < bytes.len() => bytes[i] = byte,
                _ => {}
            }
        }
        if json_body(&bytes, spec(op), true).is_ok() {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(), "{:?}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn strings_read_back_exactly_as_serde_json_wrote_them(s in any::<String>(), pad in 0..9usize) {
        // `pad` shifts the string against the eight-byte scan
        let doc = format!("{}{}", " ".repeat(pad), serde_json::to_string(&s).unwrap());
        let mut p = super::json::Parser::new(doc.as_bytes()).unwrap();
        prop_assert_eq!(p.next().unwrap(), super::json::Token::Str(s.as_str().into()));
        prop_assert!(p.finish().is_ok());
        // and any raw control byte inside is refused
        if !s.is_empty() {
            let raw = format!("\"{}\u{1}{}\"", &s[..0], s.replace(['"', '\\'], ""));
            prop_assert!(super::json::validate(raw.as_bytes()).is_err());
        }
    }

    #[test]
    fn multipart_bytes_never_panic(
        parts in proptest::collection::vec((any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..6),
    ) {
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhello\r\n--XyZ--\r\n".to_vec();
        for (at, junk) in parts {
            let i = at.index(body.len() + 1);
            body.splice(i..i, junk);
        }
        if let Ok(parts) = multipart::parse(&body, "XyZ") {
            for p in parts {
                prop_assert!(!p.name.is_empty());
            }
        }
    }
}

/// Arbitrary JSON whose keys are never ones the map treats as non-text.
fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i32>().prop_map(serde_json::Value::from),
        "[a-z😀é ]{1,8}".prop_map(|s| serde_json::Value::String(format!("s{s}"))),
    ];
    leaf.prop_recursive(5, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..5).prop_map(|m| {
                serde_json::Value::Object(
                    m.into_iter()
                        .filter(|(k, _)| {
                            !NOT_TEXT.contains(&k.as_str()) && !OPAQUE.contains(&k.as_str())
                        })
                        .collect(),
                )
            }),
        ]
    })
}

fn strings(v: &serde_json::Value, _key: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if !s.trim().is_empty() => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, _key, out)),
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| strings(x, k, out)),
        _ => {}
    }
}
