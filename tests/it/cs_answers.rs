//! Content Safety answers the gate cannot fully read fail closed; overlap splitting and the
//! per-request screening limits, black-box through the app with the one Content Safety fake.
//!
//! Every case asserts what the client got, what Content Safety saw (how many calls per
//! endpoint) and that the upstream AOAI mock saw nothing when the request was refused.

use crate::common;
use crate::support;

use std::sync::atomic::Ordering;

use common::*;
use support::logs;

const CHAT_URL: &str =
    "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=2024-10-21";
const EMBEDDINGS_URL: &str =
    "/api/FwdProxy/openai/deployments/ada/embeddings?api-version=2024-10-21";

fn chat(text: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": text}]}).to_string()
}

/// A user turn and one tool result per document.
fn chat_with_documents(text: &str, docs: &[String]) -> String {
    let mut messages = vec![serde_json::json!({"role": "user", "content": text})];
    for (i, d) in docs.iter().enumerate() {
        messages.push(
            serde_json::json!({"role": "tool", "tool_call_id": format!("t{i}"), "content": d}),
        );
    }
    serde_json::json!({ "messages": messages }).to_string()
}

struct Set {
    aoai: MockAoai,
    cs: ContentSafetyFake,
    app: TestApp,
}

async fn set(extra: &[(&str, &str)]) -> Set {
    let aoai = MockAoai::start().await;
    let cs = ContentSafetyFake::start().await;
    let base = cs.base();
    let mut settings: Vec<(&str, &str)> = vec![
        ("CONTENT_SAFETY_ENDPOINT", &base),
        ("CONTENT_SAFETY_KEY", CS_KEY),
    ];
    for (k, v) in extra {
        settings.retain(|(n, _)| n != k);
        settings.push((k, v));
    }
    let app = TestApp::start(&aoai.base(), &settings).await;
    Set { aoai, cs, app }
}

impl Set {
    fn counter(&self, pick: fn(&aoai_fwdproxy::pipeline::content_safety::Counters) -> u64) -> u64 {
        pick(&self.app.state.content_safety.as_ref().unwrap().counters)
    }
}

fn unavailable(c: &aoai_fwdproxy::pipeline::content_safety::Counters) -> u64 {
    c.unavailable.load(Ordering::Relaxed)
}
fn unreadable(c: &aoai_fwdproxy::pipeline::content_safety::Counters) -> u64 {
    c.unreadable.load(Ordering::Relaxed)
}
fn failed_open(c: &aoai_fwdproxy::pipeline::content_safety::Counters) -> u64 {
    c.failed_open.load(Ordering::Relaxed)
}

/// Every log line of the test process (one process-wide subscriber, shared with the other test
/// modules). Tests pick their lines by request id.
fn logs() -> &'static logs::Captured {
    logs::global()
}

/// The log lines naming `request_id`.
fn lines_of(request_id: &str) -> Vec<String> {
    logs()
        .text()
        .lines()
        .filter(|l| l.contains(request_id))
        .map(str::to_string)
        .collect()
}

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_string()
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

fn category(name: &str, severity: &str) -> String {
    format!(r#"{{"category":{name},"severity":{severity}}}"#)
}

/// An analyze answer with the first three categories clean and `last` as the fourth entry.
fn analyze_with(last: &str) -> String {
    let three = [
        category(r#""Hate""#, "0"),
        category(r#""SelfHarm""#, "0"),
        category(r#""Sexual""#, "0"),
    ]
    .join(",");
    format!(r#"{{"blocklistsMatch":[],"categoriesAnalysis":[{three},{last}]}}"#)
}

/// Every class of `text:analyze` answer that must fail closed.
fn broken_analyze_answers() -> Vec<(&'static str, String)> {
    let full = analyze_with(&category(r#""Violence""#, "0"));
    vec![
        ("empty object", "{}".into()),
        ("no categoriesAnalysis", r#"{"blocklistsMatch":[]}"#.into()),
        (
            "categoriesAnalysis null",
            r#"{"blocklistsMatch":[],"categoriesAnalysis":null}"#.into(),
        ),
        (
            "categoriesAnalysis empty",
            r#"{"blocklistsMatch":[],"categoriesAnalysis":[]}"#.into(),
        ),
        (
            "a category missing",
            full.replace(&format!(",{}", category(r#""Violence""#, "0")), ""),
        ),
        ("wrong case", analyze_with(&category(r#""violence""#, "6"))),
        (
            "unknown category",
            analyze_with(&category(r#""Violent""#, "0")),
        ),
        (
            "severity null",
            analyze_with(&category(r#""Violence""#, "null")),
        ),
        (
            "severity string",
            analyze_with(&category(r#""Violence""#, r#""6""#)),
        ),
        (
            "severity float",
            analyze_with(&category(r#""Violence""#, "6.0")),
        ),
        (
            "severity negative",
            analyze_with(&category(r#""Violence""#, "-2")),
        ),
        (
            "severity off the four-level scale",
            analyze_with(&category(r#""Violence""#, "5")),
        ),
        (
            "severity out of range",
            analyze_with(&category(r#""Violence""#, "8")),
        ),
        (
            "severity missing",
            analyze_with(r#"{"category":"Violence"}"#),
        ),
        (
            "duplicate category",
            analyze_with(&format!(
                "{},{}",
                category(r#""Violence""#, "0"),
                category(r#""Hate""#, "6")
            )),
        ),
        (
            "duplicate severity key",
            analyze_with(r#"{"category":"Violence","severity":6,"severity":0}"#),
        ),
        (
            "duplicate top-level key",
            full.replacen(
                r#""blocklistsMatch":[]"#,
                r#""categoriesAnalysis":[],"blocklistsMatch":[]"#,
                1,
            ),
        ),
        ("truncated", full[..full.len() - 10].to_string()),
        ("trailing data", format!("{full} {{}}")),
        ("not JSON", "<html>proxy error</html>".into()),
        ("empty body", String::new()),
        ("JSON array", "[]".into()),
        ("JSON null", "null".into()),
    ]
}

#[tokio::test]
async fn every_unreadable_analyze_answer_fails_closed_and_nothing_is_forwarded() {
    let s = set(&[]).await;
    let cases = broken_analyze_answers();
    assert_eq!(cases.len(), 23);
    for (n, (what, body)) in cases.iter().enumerate() {
        s.cs.answer_endpoint_with(Endpoint::Analyze, 200, JSON, body.clone());
        let resp = s.app.post(CHAT_URL, &chat("a calm question")).await;
        assert!(resp.headers().get("retry-after").is_none(), "{what}");
        assert_eq!(
            assert_aoai_error(resp, 503).await,
            "content_safety_unavailable",
            "{what}"
        );
        let n = n as u64 + 1;
        assert_eq!(s.counter(unreadable), n, "{what}: counted as unreadable");
        assert_eq!(s.counter(unavailable), n, "{what}: counted as unavailable");
        assert_eq!(s.cs.count(Endpoint::Analyze), n as usize, "{what}");
    }
    assert!(s.aoai.seen().is_empty(), "a refused prompt reached AOAI");

    // The control: the same set forwards once the answer is complete, so the refusals above
    // came from the broken answers.
    s.cs.answer_endpoint_with(
        Endpoint::Analyze,
        200,
        JSON,
        analyze_with(&category(r#""Violence""#, "0")),
    );
    assert_eq!(
        s.app
            .post(CHAT_URL, &chat("a calm question"))
            .await
            .status(),
        200
    );
    assert_eq!(s.aoai.seen().len(), 1);
}

#[tokio::test]
async fn unreadable_prompt_shields_answers_fail_closed() {
    let s = set(&[]).await;
    let docs = vec!["first document".to_string(), "second document".to_string()];
    let body = chat_with_documents("a calm question", &docs);
    let cases: &[(&str, &str)] = &[
        ("empty object", "{}"),
        (
            "user prompt analysis null",
            r#"{"userPromptAnalysis":null,"documentsAnalysis":[{"attackDetected":false},{"attackDetected":false}]}"#,
        ),
        (
            "attackDetected missing",
            r#"{"userPromptAnalysis":{},"documentsAnalysis":[{"attackDetected":false},{"attackDetected":false}]}"#,
        ),
        (
            "attackDetected null",
            r#"{"userPromptAnalysis":{"attackDetected":null},"documentsAnalysis":[{"attackDetected":false},{"attackDetected":false}]}"#,
        ),
        (
            "attackDetected string",
            r#"{"userPromptAnalysis":{"attackDetected":"false"},"documentsAnalysis":[{"attackDetected":false},{"attackDetected":false}]}"#,
        ),
        (
            "attackDetected number",
            r#"{"userPromptAnalysis":{"attackDetected":0},"documentsAnalysis":[{"attackDetected":false},{"attackDetected":false}]}"#,
        ),
        (
            "no documentsAnalysis",
            r#"{"userPromptAnalysis":{"attackDetected":false}}"#,
        ),
        (
            "too few documents",
            r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":[{"attackDetected":false}]}"#,
        ),
        (
            "too many documents",
            r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":[{"attackDetected":false},{"attackDetected":false},{"attackDetected":false}]}"#,
        ),
        (
            "document without a boolean",
            r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":[{"attackDetected":false},{}]}"#,
        ),
        (
            "duplicate key",
            r#"{"userPromptAnalysis":{"attackDetected":true,"attackDetected":false},"documentsAnalysis":[{"attackDetected":false},{"attackDetected":false}]}"#,
        ),
        (
            "truncated",
            r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnaly"#,
        ),
    ];
    for (n, (what, answer)) in cases.iter().enumerate() {
        s.cs.answer_endpoint_with(Endpoint::Shield, 200, JSON, answer.to_string());
        let resp = s.app.post(CHAT_URL, &body).await;
        assert_eq!(
            assert_aoai_error(resp, 503).await,
            "content_safety_unavailable",
            "{what}"
        );
        assert_eq!(s.counter(unreadable), n as u64 + 1, "{what}");
        assert_eq!(s.cs.count(Endpoint::Shield), n + 1, "{what}");
    }
    assert!(s.aoai.seen().is_empty());
    // what the gate sent: the user prompt and both documents in one call
    let (_, _, sent) = s.cs.calls_to(Endpoint::Shield).pop().unwrap();
    assert_eq!(sent["userPrompt"], "a calm question");
    assert_eq!(sent["documents"], serde_json::json!(docs));

    s.cs.answer_verdicts();
    assert_eq!(s.app.post(CHAT_URL, &body).await.status(), 200);
    assert_eq!(s.aoai.seen().len(), 1);
}

#[tokio::test]
async fn blocklist_results_must_be_there_when_blocklists_were_named() {
    let without_list =
        analyze_with(&category(r#""Violence""#, "0")).replace(r#""blocklistsMatch":[],"#, "");
    let cases: Vec<(&str, String)> = vec![
        ("absent", without_list.clone()),
        (
            "null",
            analyze_with(&category(r#""Violence""#, "0"))
                .replace(r#""blocklistsMatch":[]"#, r#""blocklistsMatch":null"#),
        ),
        (
            "an object",
            analyze_with(&category(r#""Violence""#, "0"))
                .replace(r#""blocklistsMatch":[]"#, r#""blocklistsMatch":{}"#),
        ),
        (
            "a hit without a name",
            analyze_with(&category(r#""Violence""#, "0")).replace(
                r#""blocklistsMatch":[]"#,
                r#""blocklistsMatch":[{"blocklistItemId":"i"}]"#,
            ),
        ),
    ];
    let s = set(&[("CONTENT_SAFETY_BLOCKLISTS", "competitors")]).await;
    for (n, (what, answer)) in cases.iter().enumerate() {
        s.cs.answer_endpoint_with(Endpoint::Analyze, 200, JSON, answer.clone());
        let resp = s.app.post(CHAT_URL, &chat("a calm question")).await;
        assert_eq!(
            assert_aoai_error(resp, 503).await,
            "content_safety_unavailable",
            "{what}"
        );
        assert_eq!(s.cs.count(Endpoint::Analyze), n + 1);
    }
    assert!(s.aoai.seen().is_empty());

    // without blocklists, an answer without the field is complete
    let s = set(&[]).await;
    s.cs.answer_endpoint_with(Endpoint::Analyze, 200, JSON, without_list);
    assert_eq!(
        s.app
            .post(CHAT_URL, &chat("a calm question"))
            .await
            .status(),
        200
    );
    assert_eq!(s.aoai.seen().len(), 1);
}

#[tokio::test]
async fn answers_that_are_not_json_by_content_type_fail_closed() {
    let s = set(&[]).await;
    let good = analyze_with(&category(r#""Violence""#, "0"));
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("text/plain", &[("content-type", "text/plain")]),
        ("text/html", &[("content-type", "text/html; charset=utf-8")]),
        ("none", &[]),
    ];
    for (n, (what, headers)) in cases.iter().enumerate() {
        s.cs.answer_endpoint_with(Endpoint::Analyze, 200, headers, good.clone());
        let resp = s.app.post(CHAT_URL, &chat("a calm question")).await;
        assert_eq!(
            assert_aoai_error(resp, 503).await,
            "content_safety_unavailable",
            "{what}"
        );
        assert_eq!(s.counter(unreadable), n as u64 + 1);
    }
    assert!(s.aoai.seen().is_empty());
    s.cs.answer_endpoint_with(
        Endpoint::Analyze,
        200,
        &[("content-type", "application/json; charset=utf-8")],
        good,
    );
    assert_eq!(
        s.app
            .post(CHAT_URL, &chat("a calm question"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_block_wins_over_a_failed_call_even_when_failing_open() {
    // `text:analyze` flags the prompt, Prompt Shields answers garbage: failing open must not
    // let a flagged prompt through. (Failing closed, the first failure ends screening, so the
    // answer is 400 or 503 by arrival order: refused either way, checked below too.)
    for fail_open in ["true", "false"] {
        let s = set(&[("CONTENT_SAFETY_FAIL_OPEN", fail_open)]).await;
        s.cs.answer_endpoint_with(Endpoint::Shield, 200, JSON, "{}");
        s.cs.hold(); // both calls arrive before either answers: the order cannot matter
        let (client, url) = (s.app.client.clone(), s.app.url(CHAT_URL));
        let request = tokio::spawn(async move {
            client
                .post(url)
                .header("api-key", IN_KEY)
                .header("content-type", "application/json")
                .body(chat("a bloodbath"))
                .send()
                .await
                .unwrap()
        });
        s.cs.wait_for_calls(2).await;
        s.cs.release();
        let resp = request.await.unwrap();
        if fail_open == "true" {
            assert_eq!(assert_aoai_error(resp, 400).await, "content_filter");
        } else {
            let code = match resp.status().as_u16() {
                400 => assert_aoai_error(resp, 400).await,
                _ => assert_aoai_error(resp, 503).await,
            };
            assert!(
                ["content_filter", "content_safety_unavailable"].contains(&code.as_str()),
                "{code}"
            );
        }
        assert_eq!(s.cs.count(Endpoint::Analyze), 1);
        assert_eq!(s.cs.count(Endpoint::Shield), 1);
        assert!(s.aoai.seen().is_empty());
        assert_eq!(s.counter(failed_open), 0);
    }
}

#[tokio::test]
async fn fail_open_lets_unreadable_answers_through_counts_and_logs_without_prompt_text() {
    logs();
    let s = set(&[("CONTENT_SAFETY_FAIL_OPEN", "true")]).await;
    s.cs.answer_with(200, JSON, "{}");
    let secret = "my-private-prompt-words";
    for i in 1..=3u64 {
        let resp = s.app.post(CHAT_URL, &chat(secret)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(s.counter(failed_open), i);
        assert_eq!(s.counter(unavailable), i);
        assert_eq!(s.aoai.seen().len(), i as usize);
        let lines = lines_of(&request_id(&resp));
        assert!(
            lines
                .iter()
                .any(|l| l.contains("failing open") && l.contains("unreadable answer")),
            "{lines:?}"
        );
    }
    assert!(!logs().text().contains(secret), "prompt text in a log line");
}

#[tokio::test]
async fn fail_closed_logs_the_reason_without_prompt_or_answer_text() {
    logs();
    let s = set(&[]).await;
    // an answer that echoes the prompt where a severity belongs
    s.cs.answer_endpoint_with(
        Endpoint::Analyze,
        200,
        JSON,
        analyze_with(&category(r#""Violence""#, r#""my-private-prompt-words""#)),
    );
    let resp = s.app.post(CHAT_URL, &chat("my-private-prompt-words")).await;
    let rid = request_id(&resp);
    assert_eq!(
        assert_aoai_error(resp, 503).await,
        "content_safety_unavailable"
    );
    let lines = lines_of(&rid);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("failing closed") && l.contains("unreadable answer")),
        "{lines:?}"
    );
    assert!(!logs().text().contains("my-private-prompt-words"));
    assert!(s.aoai.seen().is_empty());
}

#[tokio::test]
async fn a_phrase_across_a_cut_is_screened_whole() {
    let s = set(&[]).await;
    // no whitespace: "bloodbath" straddles the 10,000-unit cut
    let solid = format!("{}bloodbath{}", "x".repeat(9_995), "y".repeat(9_000));
    // astral characters count twice: the cut falls at 5,000 emoji
    let astral = format!("{}bloodbath{}", "😀".repeat(4_998), "😀".repeat(3_000));
    for (n, text) in [solid, astral].iter().enumerate() {
        let resp = s
            .app
            .post(
                EMBEDDINGS_URL,
                &serde_json::json!({"input": text}).to_string(),
            )
            .await;
        assert_eq!(assert_aoai_error(resp, 400).await, "content_filter");
        let calls = s.cs.calls_to(Endpoint::Analyze);
        assert_eq!(calls.len(), 2 * (n + 1), "two pieces per text");
        let texts: Vec<&str> = calls[2 * n..]
            .iter()
            .map(|(_, _, b)| b["text"].as_str().unwrap())
            .collect();
        for t in &texts {
            assert!(t.chars().map(char::len_utf16).sum::<usize>() <= 10_000);
        }
        assert!(
            texts.iter().any(|t| t.contains("bloodbath")),
            "no piece holds the word whole"
        );
    }
    assert_eq!(
        s.cs.count(Endpoint::Shield),
        0,
        "embeddings get no Prompt Shields"
    );
    assert!(s.aoai.seen().is_empty());
}

#[tokio::test]
async fn documents_are_batched_within_prompt_shields_limits() {
    let s = set(&[]).await;
    // 7 documents, two long ones: at most 5 a call and 10,000 units together
    let mut docs: Vec<String> = (0..5).map(|i| format!("short document {i}")).collect();
    docs.push("long ".repeat(1_400)); // 7,000
    docs.push(format!("{} {ATTACK}", "tail ".repeat(1_400)));
    let resp = s
        .app
        .post(CHAT_URL, &chat_with_documents("hello", &docs))
        .await;
    assert_eq!(assert_aoai_error(resp, 400).await, "content_filter");
    let shield = s.cs.calls_to(Endpoint::Shield);
    assert_eq!(shield.len(), 3);
    let mut sent = Vec::new();
    for (_, _, b) in &shield {
        let d: Vec<String> = serde_json::from_value(b["documents"].clone()).unwrap();
        assert!(!d.is_empty() && d.len() <= 5);
        assert!(
            d.iter()
                .map(|x| x.chars().map(char::len_utf16).sum::<usize>())
                .sum::<usize>()
                <= 10_000
        );
        sent.extend(d);
    }
    sent.sort();
    let mut want = docs.clone();
    want.sort();
    assert_eq!(sent, want, "every document sent once, whole");
    assert_eq!(
        shield
            .iter()
            .filter(|(_, _, b)| b["userPrompt"].is_string())
            .count(),
        1,
        "the user prompt goes in one call"
    );
    assert!(s.aoai.seen().is_empty());
}

#[tokio::test]
async fn more_calls_than_the_limit_are_refused_unscreened_with_413() {
    // 25,000 characters: 3 analyze pieces and 3 Prompt Shields pieces
    let text = "lorem ipsum ".repeat(2_084);
    let s = set(&[("CONTENT_SAFETY_MAX_CALLS_PER_REQUEST", "6")]).await;
    assert_eq!(s.app.post(CHAT_URL, &chat(&text)).await.status(), 200);
    assert_eq!(s.cs.count(Endpoint::Analyze), 3);
    assert_eq!(s.cs.count(Endpoint::Shield), 3);
    assert_eq!(s.aoai.seen().len(), 1);

    let s = set(&[("CONTENT_SAFETY_MAX_CALLS_PER_REQUEST", "5")]).await;
    let resp = s.app.post(CHAT_URL, &chat(&text)).await;
    assert_eq!(assert_aoai_error(resp, 413).await, "prompt_too_long");
    assert!(s.cs.calls().is_empty(), "nothing screened half-way");
    assert!(s.aoai.seen().is_empty());
    let counters = &s.app.state.content_safety.as_ref().unwrap().counters;
    assert_eq!(counters.too_long.load(Ordering::Relaxed), 1);
    // a short prompt still passes under the same limit
    assert_eq!(s.app.post(CHAT_URL, &chat("hello")).await.status(), 200);
    assert_eq!(s.cs.calls().len(), 2);
}

#[tokio::test]
async fn past_the_concurrent_limit_a_request_gets_429_at_once_not_a_hang() {
    let s = set(&[("CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS", "1")]).await;
    s.cs.hold();
    let first = {
        let (client, url) = (s.app.client.clone(), s.app.url(CHAT_URL));
        tokio::spawn(async move {
            client
                .post(url)
                .header("api-key", IN_KEY)
                .header("content-type", "application/json")
                .body(chat("first"))
                .send()
                .await
                .unwrap()
        })
    };
    // the first request's two calls are held at the fake: it holds the only slot
    s.cs.wait_for_calls(2).await;
    let resp = s.app.post(CHAT_URL, &chat("second")).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(assert_aoai_error(resp, 429).await, "screening_busy");
    assert_eq!(s.cs.calls().len(), 2, "the refused request made no call");
    s.cs.release();
    assert_eq!(first.await.unwrap().status(), 200);
    // the slot is free again
    assert_eq!(s.app.post(CHAT_URL, &chat("third")).await.status(), 200);
    assert_eq!(s.cs.calls().len(), 4);
    let seen = s.aoai.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body.as_ref(), chat("first").as_bytes());
    assert_eq!(seen[1].body.as_ref(), chat("third").as_bytes());
    let counters = &s.app.state.content_safety.as_ref().unwrap().counters;
    assert_eq!(counters.busy.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn mistyped_content_safety_settings_stop_the_start() {
    use aoai_fwdproxy::settings::{Settings, Source};
    let cases = [
        ("CONTENT_SAFETY_FAIL_OPEN", "ture"),
        ("CONTENT_SAFETY_PROMPT_SHIELDS", "yes please"),
        ("CONTENT_SAFETY_THRESHOLD_HATE", "9"),
        ("CONTENT_SAFETY_THRESHOLD_VIOLENCE", "0"),
        ("CONTENT_SAFETY_MAX_CALLS_PER_REQUEST", "0"),
        ("CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS", "lots"),
        ("CONTENT_SAFETY_TIMEOUT_MS", "0"),
    ];
    for (name, value) in cases {
        // with screening on and off: a typo must not wait for the day screening is turned on
        for endpoint in ["http://127.0.0.1:9", ""] {
            let src = Source::from_map([
                ("AOAI_HOSTNAME", "http://127.0.0.1:9"),
                ("AOAI_INAPIKEY", IN_KEY),
                ("AOAI_OUTAPIKEY", OUT_KEY),
                ("CONTENT_SAFETY_ENDPOINT", endpoint),
                (name, value),
            ]);
            let e = Settings::from_source(&src).expect_err(name);
            assert_eq!(e.name, name);
            assert!(e.to_string().contains(name));
        }
    }
}
