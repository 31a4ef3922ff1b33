//! Differential tests of [`usage_of`] (the scanner plus serde_json on two members) against
//! [`usage_of_serde`] (serde_json on the whole answer, the reading it replaced): equal on
//! generated answers, on the same answers mutated byte by byte, and on the spellings that
//! matter (duplicates at top level and below, escaped names, unpaired surrogates, odd numbers,
//! deep nesting). Bounded: a few thousand cases, well under a second each.

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::scan::{top_level, Scan};
use super::{body_facts, usage_of, usage_of_serde, BodyFacts, StreamUsage};

/// Whitespace serde_json accepts, plus nothing.
fn ws() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => Just(""), 1 => Just(" "), 1 => Just("\n"), 1 => Just("\t"), 1 => Just(" \r\n ")]
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => (0u64..100_000).prop_map(|n| n.to_string()),
        1 => Just(u64::MAX.to_string()),
        1 => Just("18446744073709551616".to_string()),
        10 => prop::sample::select(vec!["0", "-0", "-1", "0.5", "1e5", "1E+2", "-1.25e-3", "3.0", "2e-0"])
            .prop_map(String::from),
        // not JSON numbers
        1 => prop::sample::select(vec!["01", "1.", "-", ".5", "1e", "+1", "1.5e+", "-01", "0x1"])
            .prop_map(String::from),
    ]
}

/// String bodies (without quotes): plain text, every escape, surrogates, raw non-ASCII and
/// control bytes, text that looks like members.
fn text() -> impl Strategy<Value = String> {
    let valid = prop::sample::select(vec![
        "hello",
        "usage",
        "\\\"usage\\\":{",
        "\\\\",
        "\\/",
        "\\b\\f\\n\\r\\t",
        "\\u0061",
        "\\u00e9",
        "\\ud83d\\ude00",
        "\\ud800",
        "\\udc00x",
        "é",
        "\u{7f}",
        " ",
        "}",
    ]);
    // not valid inside a JSON string
    let invalid = prop::sample::select(vec!["\\u12", "\\x", "\u{1}", "\t", "\n", "\\"]);
    let piece = prop_oneof![40 => valid, 1 => invalid];
    prop::collection::vec(piece, 0..5).prop_map(|v| v.concat())
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "usage", "response", "id", "choices", "object", "USAGE", "Usage", "us\\u0061ge",
            "respons\\u0065", "usage ", "input_tokens", "prompt_tokens", "completion_tokens",
            "total_tokens", "output_tokens", "prompt_tokens_details", "input_tokens_details",
            "completion_tokens_details", "output_tokens_details", "cached_tokens",
            "reasoning_tokens",
        ])
        .prop_map(String::from),
        1 => text(),
    ]
}

/// A JSON-ish value: mostly valid, sometimes not; objects may repeat names.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        number(),
        text().prop_map(|t| format!("\"{t}\"")),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                let items: Vec<String> = items
                    .into_iter()
                    .map(|(a, v, b)| format!("{a}{v}{b}"))
                    .collect();
                format!("[{}]", items.join(","))
            }),
            prop::collection::vec((ws(), key(), ws(), inner), 0..6).prop_map(|members| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(a, k, b, v)| format!("{a}\"{k}\"{b}:{v}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// A usage object as AOAI sends it (chat or Responses names), or a wrong one.
fn usage_value() -> impl Strategy<Value = String> {
    let field = (
        prop::sample::select(vec![
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "input_tokens",
            "output_tokens",
        ]),
        prop_oneof![16 => (0u64..5000).prop_map(|n| n.to_string()), 1 => number(), 1 => value()],
    );
    let details = (
        prop::sample::select(vec![
            "prompt_tokens_details",
            "completion_tokens_details",
            "input_tokens_details",
            "output_tokens_details",
        ]),
        prop::sample::select(vec!["cached_tokens", "reasoning_tokens", "audio_tokens"]),
        prop_oneof![4 => (0u64..100).prop_map(|n| n.to_string()), 1 => value()],
    )
        .prop_map(|(d, k, v)| (d, format!("{{\"{k}\":{v}}}")));
    prop_oneof![
        6 => (
            prop::collection::vec(field.prop_map(|(k, v)| (k, v)), 0..4),
            prop::collection::vec(details, 0..2),
            ws(),
        )
            .prop_map(|(fields, details, w)| {
                let all: Vec<String> = fields
                    .into_iter()
                    .chain(details)
                    .map(|(k, v)| format!("{w}\"{k}\"{w}:{w}{v}"))
                    .collect();
                format!("{{{}}}", all.join(","))
            }),
        1 => Just("null".to_string()),
        1 => value(),
    ]
}

/// A whole answer: top-level members (usage, response, filler, in any order, any repeated),
/// sometimes not an object at all.
fn answer() -> impl Strategy<Value = String> {
    let member = prop_oneof![
        3 => usage_value().prop_map(|v| ("usage".to_string(), v)),
        1 => usage_value().prop_map(|v| ("us\\u0061ge".to_string(), v)),
        2 => prop_oneof![
            usage_value().prop_map(|u| format!("{{\"id\":\"r\",\"usage\":{u}}}")),
            Just("null".to_string()),
            value(),
        ]
        .prop_map(|v| ("response".to_string(), v)),
        6 => (
            prop_oneof![
                8 => prop::sample::select(vec![
                    "id", "choices", "object", "model", "created", "USAGE", "Usage", "usage ",
                    "responses", "system_fingerprint",
                ])
                .prop_map(String::from),
                1 => key(),
            ],
            value()
        ),
    ];
    let object = (prop::collection::vec((ws(), member, ws()), 0..5), ws()).prop_map(|(ms, w)| {
        let ms: Vec<String> = ms
            .into_iter()
            .map(|(a, (k, v), b)| format!("{a}\"{k}\"{b}:{b}{v}{a}"))
            .collect();
        format!("{w}{{{}}}{w}", ms.join(","))
    });
    prop_oneof![
        12 => object,
        1 => prop::collection::vec(usage_value(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
        1 => value(),
    ]
}

/// One byte mutation: insert, delete or replace, with bytes that matter to the grammar.
fn mutate(doc: &str, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    const ALPHABET: &[u8] = b"{}[]\":,\\ \n0123456789.eE+-ntrufalsu\x01\x80\xc3\xa9";
    let mut out = doc.as_bytes().to_vec();
    for &(at, op, b) in edits {
        let byte = ALPHABET[b as usize % ALPHABET.len()];
        if out.is_empty() {
            out.push(byte);
            continue;
        }
        let at = at % (out.len() + 1);
        match op % 4 {
            0 => out.insert(at, byte),
            1 if at < out.len() => {
                out.remove(at);
            }
            2 if at < out.len() => out[at] = byte,
            _ => out.truncate(at),
        }
    }
    out
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn equal_to_serde_on_generated_answers() {
    let (some, none, unsure) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    runner(3000)
        .run(&answer(), |doc| {
            let want = usage_of_serde(doc.as_bytes());
            prop_assert_eq!(usage_of(doc.as_bytes()), want, "{}", doc);
            match (want, top_level(doc.as_bytes())) {
                (_, Scan::Unsure) => unsure.fetch_add(1, Ordering::Relaxed),
                (Some(_), _) => some.fetch_add(1, Ordering::Relaxed),
                (None, _) => none.fetch_add(1, Ordering::Relaxed),
            };
            Ok(())
        })
        .unwrap();
    // The generator reaches all three outcomes, and the scanner decides most answers itself.
    let (some, none, unsure) = (some.into_inner(), none.into_inner(), unsure.into_inner());
    eprintln!("usage found {some}, none {none}, unsure {unsure}");
    assert!(some >= 150, "usage found in only {some} answers");
    assert!(none >= 300, "no usage in only {none} answers");
    assert!(unsure >= 30 && unsure < some + none, "unsure {unsure}");
}

#[test]
fn equal_to_serde_on_mutated_answers() {
    let strategy = (
        answer(),
        prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    );
    let changed = AtomicUsize::new(0);
    runner(3000)
        .run(&strategy, |(doc, edits)| {
            let bytes = mutate(&doc, &edits);
            let want = usage_of_serde(&bytes);
            if want != usage_of_serde(doc.as_bytes()) {
                changed.fetch_add(1, Ordering::Relaxed);
            }
            prop_assert_eq!(
                usage_of(&bytes),
                want,
                "{}",
                String::from_utf8_lossy(&bytes)
            );
            Ok(())
        })
        .unwrap();
    let changed = changed.into_inner();
    eprintln!("mutations that changed the outcome: {changed}");
    assert!(changed >= 200, "mutations rarely changed the outcome");
}

#[test]
#[allow(clippy::useless_format)] // one spelling for every case of the list
fn equal_to_serde_on_the_spellings_that_matter() {
    const U: &str = r#"{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}"#;
    let cases = [
        format!(r#"{{"usage":{U}}}"#),
        format!(r#"{{"usage":{U},"usage":{U}}}"#),
        format!(r#"{{"usage":{U},"usage":null}}"#),
        format!(r#"{{"usage":null,"usage":{U}}}"#),
        format!(r#"{{"us\u0061ge":{U}}}"#),
        format!(r#"{{"usage":{U},"us\u0061ge":{U}}}"#),
        format!(r#"{{"\u0075sage":{U}}}"#),
        format!(r#"{{"USAGE":{U}}}"#),
        format!(r#"{{"response":{{"usage":{U}}}}}"#),
        format!(r#"{{"response":{{"usage":{U},"usage":{U}}}}}"#),
        format!(r#"{{"response":{{"usage":{U}}},"response":null}}"#),
        format!(r#"{{"usage":null,"response":{{"usage":{U}}}}}"#),
        format!(r#"{{"usage":{U},"response":7}}"#),
        format!(r#"{{"usage":{U},"x":"\ud800"}}"#),
        format!(r#"{{"usage":{U},"\ud800":1}}"#),
        format!(r#"{{"usage":{U},"x":"\udc00\u12"}}"#),
        format!("{{\"usage\":{U},\"x\":\"\u{e9}\"}}"),
        format!("{{\"usage\":{U},\"x\":\"\x7f\"}}"),
        format!(r#"{{"usage":{{"prompt_tokens":1,"prompt_tokens":2}}}}"#),
        format!(r#"{{"usage":{{"input_tokens":1,"prompt_tokens":2}}}}"#),
        format!(r#"{{"usage":{{"prompt_tokens":-1}}}}"#),
        format!(r#"{{"usage":{{"prompt_tokens":1.0}}}}"#),
        format!(r#"{{"usage":[1,2,3]}}"#),
        format!(r#"{{"usage":[1,2,3,null,null,null]}}"#),
        format!(r#"{{"usage":"{U}"}}"#),
        format!(r#"[{U}]"#),
        format!(r#"[{U},null]"#),
        format!(r#"[null,{{"usage":{U}}}]"#),
        format!(
            r#"{{"a":{}{}, "usage":{U}}}"#,
            "[".repeat(300),
            "]".repeat(300)
        ),
        format!(
            r#"{{"a":{}{}, "usage":{U}}}"#,
            "{\"b\":".repeat(200),
            "}".repeat(200)
        ),
        format!("\u{feff}{{\"usage\":{U}}}"),
        format!("{{\"usage\":{U}}}\u{0}"),
        format!("{{\"usage\":{U}}}\x0c"),
    ];
    let mut found = 0;
    for doc in &cases {
        let want = usage_of_serde(doc.as_bytes());
        found += usize::from(want.is_some());
        assert_eq!(usage_of(doc.as_bytes()), want, "{doc}");
    }
    assert!(found >= 8, "only {found} of the spellings had usage");
}

/// The answers AOAI sends are decided by the scanner itself (the serde fallback is for oddities).
#[test]
fn real_answers_never_fall_back() {
    let chat = r#"{"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"Why did the reverse proxy break up with the server? \"It needed space.\" \u2728","refusal":null,"role":"assistant"}}],"created":1732000000,"id":"chatcmpl-AbC","model":"gpt-4o-2024-11-20","object":"chat.completion","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}],"system_fingerprint":"fp_b705f0c291","usage":{"completion_tokens":21,"completion_tokens_details":{"accepted_prediction_tokens":0,"reasoning_tokens":0},"prompt_tokens":29,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":50}}"#;
    let responses = r#"{"type":"response.completed","response":{"id":"r","status":"completed","usage":{"input_tokens":11,"output_tokens":7,"total_tokens":18}}}"#;
    let embeddings = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023,-0.0093,1.5e-3]}],"model":"ada","usage":{"prompt_tokens":5,"total_tokens":5}}"#;
    for doc in [chat, responses, embeddings] {
        assert!(
            matches!(top_level(doc.as_bytes()), Scan::Members { .. }),
            "{doc}"
        );
        assert!(usage_of(doc.as_bytes()).is_some(), "{doc}");
        assert_eq!(usage_of(doc.as_bytes()), usage_of_serde(doc.as_bytes()));
    }
}

/// The request body reading before borrowed names (as of f5cea0d), kept verbatim as the
/// definition [`super::body_facts`] is held to.
mod before {
    use super::super::{BodyFacts, StreamUsage};

    /// The members of one JSON object in order (duplicates kept), names unescaped, values borrowed
    /// from the body (so their byte offsets are known).
    struct Members<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

    impl<'de> serde::Deserialize<'de> for Members<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        out.push((key, map.next_value::<&'de serde_json::value::RawValue>()?));
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'a> Members<'a> {
        /// The values of the members named `name` regardless of ASCII case.
        fn named(&self, name: &str) -> Vec<&'a serde_json::value::RawValue> {
            self.0
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
                .collect()
        }
    }

    /// Byte offset of `part` (a slice of `whole`) in `whole`.
    fn offset_in(whole: &[u8], part: &str) -> usize {
        part.as_ptr() as usize - whole.as_ptr() as usize
    }

    /// Read [`BodyFacts`] from a JSON object body (`None` when it is not one).
    pub(super) fn body_facts(body: &[u8]) -> Option<BodyFacts> {
        // Top-level members only, borrowed (no tree), matched regardless of ASCII case as AOAI's
        // front end binds them: `STREAM` is `stream`.
        let members: Members<'_> = serde_json::from_slice(body).ok()?;
        let mut facts = BodyFacts::default();
        for (key, raw) in &members.0 {
            if key.eq_ignore_ascii_case("user") {
                if let Ok(u) = serde_json::from_str::<String>(raw.get()) {
                    if !u.is_empty() {
                        facts.user = Some(u.chars().take(256).collect());
                    }
                }
            } else if key.eq_ignore_ascii_case("model") {
                if let Ok(m) = serde_json::from_str::<String>(raw.get()) {
                    if !m.is_empty() {
                        facts.model = Some(m.chars().take(64).collect());
                    }
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
    fn stream_usage(body: &[u8], top: &Members<'_>) -> StreamUsage {
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
        let Ok(inner) = serde_json::from_str::<Members<'_>>(value) else {
            return StreamUsage::Cannot;
        };
        let asked = inner.named("include_usage");
        match asked.as_slice() {
            [] => StreamUsage::Edit {
                at: at + 1,
                remove: 0,
                insert: if inner.0.is_empty() {
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
}

/// Request bodies: the stream and user members in every spelling, among generated members.
fn request_body() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "stream",
        "STREAM",
        "Stream",
        "str\\u0065am",
        "stream_options",
        "Stream_Options",
        "stream\\u005foptions",
        "user",
        "USER",
        "us\\u0065r",
        "model",
        "Model",
        "messages",
        "n",
        "include_usage",
    ]);
    let options = prop_oneof![
        Just("null".to_string()),
        Just("{}".to_string()),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "include_usage",
                    "INCLUDE_USAGE",
                    "x",
                    "include\\u005fusage"
                ]),
                prop_oneof![
                    Just("true".to_string()),
                    Just("false".to_string()),
                    Just("null".to_string()),
                    value()
                ],
            ),
            0..3,
        )
        .prop_map(|m| {
            let m: Vec<String> = m.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", m.join(","))
        }),
        value(),
    ];
    let member_value = prop_oneof![
        3 => Just("true".to_string()),
        1 => Just("false".to_string()),
        3 => text().prop_map(|t| format!("\"{t}\"")),
        3 => options,
        2 => value(),
    ];
    (
        prop::collection::vec((ws(), name, ws(), member_value), 0..6),
        ws(),
    )
        .prop_map(|(ms, w)| {
            let ms: Vec<String> = ms
                .into_iter()
                .map(|(a, k, b, v)| format!("{a}\"{k}\"{b}:{v}"))
                .collect();
            format!("{w}{{{}}}{w}", ms.join(","))
        })
}

fn same(a: &Option<BodyFacts>, b: &Option<BodyFacts>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.user == b.user && a.model == b.model && a.stream == b.stream && a.usage == b.usage
        }
        _ => false,
    }
}

#[test]
fn body_facts_equal_to_the_reading_before() {
    let strategy = (
        request_body(),
        prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
    );
    let (edits_seen, streams) = (AtomicUsize::new(0), AtomicUsize::new(0));
    runner(3000)
        .run(&strategy, |(doc, edits)| {
            let bytes = if edits.is_empty() {
                doc.into_bytes()
            } else {
                mutate(&doc, &edits)
            };
            let want = before::body_facts(&bytes);
            if want
                .as_ref()
                .is_some_and(|f| matches!(f.usage, StreamUsage::Edit { .. }))
            {
                streams.fetch_add(1, Ordering::Relaxed);
            }
            if want.is_some() && !edits.is_empty() {
                edits_seen.fetch_add(1, Ordering::Relaxed);
            }
            let got = body_facts(&bytes);
            prop_assert!(
                same(&got, &want),
                "{:?} != {:?} for {}",
                got,
                want,
                String::from_utf8_lossy(&bytes)
            );
            Ok(())
        })
        .unwrap();
    let (edits_seen, streams) = (edits_seen.into_inner(), streams.into_inner());
    eprintln!("body facts: {streams} edits to make, {edits_seen} mutated bodies read");
    assert!(streams >= 40 && edits_seen >= 100, "{streams} {edits_seen}");
}
