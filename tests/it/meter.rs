//! Usage metering, black-box: the app in-process against the fake AOAI, asserting on what the
//! client got, what the upstream saw, and the request's log line.

use crate::common;

use std::time::Duration;

use common::support::aoai::{asked_for_usage, usage_stream_text};
use common::support::logs::{capture, Captured};
use common::*;
use serde_json::Value;

const CHAT: &str = "/api/FwdProxy/openai/deployments/gpt-4o/chat/completions";
const EMB: &str = "/api/FwdProxy/openai/deployments/emb/embeddings";
const RESPONSES: &str = "/api/FwdProxy/openai/v1/responses";
const USAGE: &str = r#"{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":2}}"#;

/// The request log line of `id`, once written.
async fn line(logs: &Captured, id: &str) -> Value {
    let mut found = None;
    let ok = eventually(PATIENCE, async || {
        found = logs
            .text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "request")
            // the capture's formatter nests the event's fields under `fields`
            .map(|v| v["fields"].clone())
            .find(|f| f["request_id"] == id);
        found.is_some()
    })
    .await;
    assert!(ok, "no log line for {id}: {}", logs.text());
    found.unwrap()
}

fn assert_usage(line: &Value, prompt: u64, completion: u64, total: u64) {
    assert_eq!(line["prompt_tokens"], prompt, "{line}");
    assert_eq!(line["completion_tokens"], completion, "{line}");
    assert_eq!(line["total_tokens"], total, "{line}");
}

async fn send(app: &TestApp, path: &str, id: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("{path}?{API}")))
        .header("api-key", IN_KEY)
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn chunks() -> Vec<String> {
    ["Hel", "lo \\\"usage\\\":{} ", "world"]
        .iter()
        .map(|t| {
            format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{t}"}}}}]}}"#
            )
        })
        .collect()
}

/// JSON answers of every metered kind: the log line carries the usage, cached and reasoning
/// tokens included, and the `user` of the body; the client gets AOAI's bytes unchanged.
#[tokio::test]
async fn json_usage_on_the_log_line() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;

    let chat = format!(r#"{{"id":"c","object":"chat.completion","choices":[],"usage":{USAGE}}}"#);
    aoai.reply(Reply::Owned(
        200,
        vec![("content-type", "application/json")],
        chat.clone(),
    ));
    let resp = send(
        &app,
        CHAT,
        "m-chat",
        r#"{"messages":[{"role":"user","content":"hi"}],"user":"alice@contoso"}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), chat);
    let l = line(&logs, "m-chat").await;
    assert_usage(&l, 11, 7, 18);
    assert_eq!(l["cached_tokens"], 3);
    assert_eq!(l["reasoning_tokens"], 2);
    assert_eq!(l["user"], "alice@contoso");
    assert!(
        !logs.text().contains("\"hi\""),
        "no prompt text in a log line"
    );

    let emb = r#"{"object":"list","data":[{"embedding":[0.5]}],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
    aoai.reply(Reply::Fixed(
        200,
        vec![("content-type", "application/json")],
        emb,
    ));
    let resp = send(&app, EMB, "m-emb", r#"{"input":"x"}"#).await;
    assert_eq!(resp.text().await.unwrap(), emb);
    let l = line(&logs, "m-emb").await;
    assert_usage(&l, 5, 0, 5);
    assert!(l["user"].is_null() && l["cached_tokens"].is_null());

    let responses = r#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":13}}"#;
    aoai.reply(Reply::Fixed(
        200,
        vec![("content-type", "application/json")],
        responses,
    ));
    let resp = send(
        &app,
        RESPONSES,
        "m-resp",
        r#"{"model":"gpt-4o","input":"x"}"#,
    )
    .await;
    assert_eq!(resp.text().await.unwrap(), responses);
    let l = line(&logs, "m-resp").await;
    assert_usage(&l, 9, 4, 13);
    assert_eq!(l["reasoning_tokens"], 1);

    // an error answer has no usage and is logged without
    aoai.reply(Reply::Fixed(
        400,
        vec![("content-type", "application/json")],
        r#"{"error":{"code":"x","message":"y"},"usage":{"prompt_tokens":1}}"#,
    ));
    let resp = send(&app, CHAT, "m-err", r#"{"messages":[]}"#).await;
    assert_eq!(resp.status(), 400);
    resp.bytes().await.unwrap();
    let l = line(&logs, "m-err").await;
    assert!(l["prompt_tokens"].is_null(), "{l}");
}

/// A stream that did not ask for usage: the handler asks AOAI (one member added to the body,
/// every other byte as the client sent it), reads the usage chunk, and the client receives
/// exactly the stream it would have got — with the gate off and with it on.
#[tokio::test]
async fn stream_without_include_usage_is_metered_and_unchanged() {
    for extra in [&[][..], &[("USER_CHECK", "present")][..]] {
        let (logs, _guard) = capture();
        let aoai = MockAoai::start().await;
        let app = TestApp::start(&aoai.base(), extra).await;
        aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
        let body = r#" {"stream":true,"user":"bob","messages":[{"role":"user","content":"hi"}]}"#;
        let resp = send(&app, CHAT, "s-1", body).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("content-length").is_none());
        let got = resp.text().await.unwrap();
        assert_eq!(got, usage_stream_text(&chunks(), USAGE, false), "{extra:?}");

        let seen = aoai.only();
        assert!(asked_for_usage(&seen.body), "usage asked upstream");
        let expected_up = body.replacen('{', r#"{"stream_options":{"include_usage":true},"#, 1);
        assert_eq!(std::str::from_utf8(&seen.body).unwrap(), expected_up);
        assert_eq!(
            seen.headers
                .get("content-length")
                .unwrap()
                .to_str()
                .unwrap(),
            expected_up.len().to_string()
        );

        let l = line(&logs, "s-1").await;
        assert_usage(&l, 11, 7, 18);
        assert_eq!(l["user"], "bob");
        assert_eq!(l["completed"], true);
    }
}

/// A stream that asked for usage itself gets the usage chunk (and AOAI's `"usage":null`
/// members) as AOAI sent them; its body goes up byte for byte.
#[tokio::test]
async fn stream_that_asked_passes_through() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
    let body = r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let resp = send(&app, CHAT, "s-2", body).await;
    let got = resp.text().await.unwrap();
    assert_eq!(got, usage_stream_text(&chunks(), USAGE, true));
    assert_eq!(aoai.only().body, body.as_bytes());
    assert_usage(&line(&logs, "s-2").await, 11, 7, 18);
}

/// Every spelling of `stream_options`, with the gate off and on: what AOAI saw, what the client
/// got (exactly the stream it would have got from AOAI directly), and how the log line says
/// the usage was known.
#[tokio::test]
async fn every_spelling_of_stream_options_end_to_end() {
    // (client body, body AOAI sees, the client asked for the usage chunk itself)
    let edited: &[(&str, &str, bool)] = &[
        (
            r#"{"stream":true,"messages":[]}"#,
            r#"{"stream_options":{"include_usage":true},"stream":true,"messages":[]}"#,
            false,
        ),
        (
            r#"{"stream":true,"stream_options":null,"messages":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            false,
        ),
        (
            r#"{"stream":true,"stream_options":{},"messages":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            false,
        ),
        (
            r#"{"stream":true,"stream_options":{"include_usage":false},"messages":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            false,
        ),
        (
            r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            true,
        ),
    ];
    for gate in [&[][..], &[("USER_CHECK", "present")][..]] {
        let (logs, _guard) = capture();
        let aoai = MockAoai::start().await;
        let app = TestApp::start(&aoai.base(), gate).await;
        aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
        for (n, (sent, up, asked)) in edited.iter().enumerate() {
            let sent = sent.replace("\"messages\"", "\"user\":\"u\",\"messages\"");
            let up = up.replace("\"messages\"", "\"user\":\"u\",\"messages\"");
            let id = format!("sp-{}-{n}", gate.len());
            let resp = send(&app, CHAT, &id, &sent).await;
            assert_eq!(resp.status(), 200, "{sent}");
            let got = resp.text().await.unwrap();
            assert_eq!(got, usage_stream_text(&chunks(), USAGE, *asked), "{sent}");
            let seen = aoai.seen().pop().unwrap();
            assert_eq!(std::str::from_utf8(&seen.body).unwrap(), up, "{sent}");
            let l = line(&logs, &id).await;
            assert_usage(&l, 11, 7, 18);
            assert_eq!(l["usage_source"], "answer", "{sent}");
        }
    }
}

/// `stream_options` the handler cannot edit without changing what the client asked: up
/// untouched, the client gets what AOAI sent, and the log line says the usage is unknown
/// (`none`) or estimated (`reservation`, with the tokens the budget kept) — never exact.
#[tokio::test]
async fn stream_options_not_ours_to_edit() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "other-app:100000")]).await;
    aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
    let cannot = [
        r#"{"stream":true,"stream_options":true,"messages":[]}"#,
        r#"{"stream":true,"stream_options":{"include_usage":"yes"},"messages":[]}"#,
        r#"{"stream":true,"stream_options":{"include_usage":false},"Stream_Options":null,"messages":[]}"#,
        r#"{"stream":true,"STREAM":false,"messages":[]}"#,
    ];
    for (n, sent) in cannot.iter().enumerate() {
        for (key, source) in [(IN_KEY, "none"), (OTHER_KEY, "reservation")] {
            let id = format!("no-{n}-{source}");
            let before = aoai.seen().len();
            let resp = app
                .client
                .post(app.url(&format!("{CHAT}?{API}")))
                .header("api-key", key)
                .header("x-request-id", &id)
                .body(sent.to_string())
                .send()
                .await
                .unwrap();
            // a limited caller's body with a member twice (names compared ignoring case) is
            // refused before anything is reserved: the reservation would read one of the two
            if source == "reservation"
                && (sent.contains("Stream_Options") || sent.contains("STREAM"))
            {
                assert_eq!(assert_aoai_error(resp, 400).await, "invalid_body", "{sent}");
                assert_eq!(aoai.seen().len(), before, "never forwarded: {sent}");
                continue;
            }
            assert_eq!(resp.status(), 200);
            assert_eq!(
                resp.text().await.unwrap(),
                usage_stream_text(&chunks(), USAGE, false)
            );
            assert_eq!(aoai.seen().pop().unwrap().body, sent.as_bytes());
            let l = line(&logs, &id).await;
            assert!(l["total_tokens"].is_null(), "{l}");
            assert_eq!(l["usage_source"], source, "{sent}");
            if source == "reservation" {
                assert!(l["estimated_tokens"].as_u64().unwrap() > 0, "{l}");
            } else {
                assert!(l["estimated_tokens"].is_null(), "{l}");
            }
        }
    }
    // a JSON answer is exact
    aoai.reply(Reply::Owned(
        200,
        vec![("content-type", "application/json")],
        format!(r#"{{"id":"c","choices":[],"usage":{USAGE}}}"#),
    ));
    send(&app, CHAT, "no-json", r#"{"messages":[]}"#)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(line(&logs, "no-json").await["usage_source"], "answer");
}

/// Duplicate members, exact or escaped, never get that far with the gate on: the strict reader
/// refuses the body (400, not forwarded). With the gate off the body goes up as sent, unedited.
#[tokio::test]
async fn duplicate_stream_options_are_refused_by_the_gate() {
    let dups = [
        r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":true},"user":"u","messages":[]}"#,
        r#"{"stream":true,"stream_options":{},"stream\u005foptions":null,"user":"u","messages":[]}"#,
        r#"{"stream":true,"stream_options":{"include_usage":true,"include\u005fusage":false},"user":"u","messages":[]}"#,
    ];
    let aoai = MockAoai::start().await;
    let gated = TestApp::start(&aoai.base(), &[("USER_CHECK", "present")]).await;
    let open = TestApp::start(&aoai.base(), &[]).await;
    aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
    for (n, sent) in dups.iter().enumerate() {
        assert_aoai_error(gated.post(&format!("{CHAT}?{API}"), sent).await, 400).await;
        assert_eq!(aoai.seen().len(), n, "refused, not forwarded: {sent}");
        let resp = open.post(&format!("{CHAT}?{API}"), sent).await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        let seen = aoai.seen();
        assert_eq!(seen.len(), n + 1);
        assert_eq!(seen[n].body, sent.as_bytes());
    }
}

/// A chunked body with the gate off streams up untouched (the handler cannot edit what it
/// does not hold): logged without usage.
#[tokio::test]
async fn a_chunked_stream_body_is_untouched() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
    let chunked =
        reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
            r#"{"stream":true,"messages":[]}"#.to_string(),
        )]));
    let resp = app
        .client
        .post(app.url(&format!("{CHAT}?{API}")))
        .header("api-key", IN_KEY)
        .header("x-request-id", "s-4")
        .body(chunked)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.text().await.unwrap(),
        usage_stream_text(&chunks(), USAGE, false)
    );
    assert_eq!(aoai.only().body, &br#"{"stream":true,"messages":[]}"#[..]);
    let l = line(&logs, "s-4").await;
    assert!(l["total_tokens"].is_null());
    assert_eq!(l["usage_source"], "none");
}

/// A Responses stream reports its usage in `response.completed`; the stream passes unchanged.
#[tokio::test]
async fn responses_stream_usage() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let events = vec![
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n".to_string(),
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n".to_string(),
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"output_tokens_details\":{\"reasoning_tokens\":1},\"total_tokens\":13}}}\n\n".to_string(),
    ];
    aoai.reply(Reply::Stream(events.clone(), Duration::ZERO));
    let body = r#"{"model":"gpt-4o","input":"x","stream":true}"#;
    let got = send(&app, RESPONSES, "r-1", body)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(got, events.concat());
    assert_eq!(
        aoai.only().body,
        body.as_bytes(),
        "a Responses body is never edited"
    );
    let l = line(&logs, "r-1").await;
    assert_usage(&l, 9, 4, 13);
    assert_eq!(l["reasoning_tokens"], 1);
}

/// Budget: a client that goes away mid-stream, before any usage arrived, keeps its reservation
/// charged (AOAI may still bill the tokens it generated), so once its request is over (its log
/// line is written) the next one does not fit; refunding it would let it through. Here and not
/// in tests/it/budget.rs because it waits for a log line: every test of this module captures logs.
#[tokio::test]
async fn client_gone_mid_stream_keeps_the_charge() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "default:600")]).await;
    aoai.reply(Reply::Gated(vec![
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ]));
    let body =
        r#"{"stream":true,"messages":[{"role":"user","content":"Hello world"}],"max_tokens":500}"#;
    let mut first = app
        .client
        .post(app.url(&format!("{CHAT}?{API}")))
        .header("api-key", IN_KEY)
        .header("x-request-id", "gone-1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.chunk().await.unwrap().is_some());
    drop(first);
    // the server learns that the client left when it next writes
    aoai.release(1);

    // its line is written when its answer body is dropped, which settles its reservation
    line(&logs, "gone-1").await;
    let second = send(&app, CHAT, "gone-2", body).await;
    let left: u64 = second.headers()["x-fwdproxy-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left < 510, "{left}");
    assert_aoai_error(second, 429).await;
    assert_eq!(aoai.seen().len(), 1);
}

/// The names a query block of docs/chargeback.md reads as `<prefix><name>`.
pub fn doc_fields(lang: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/chargeback.md"),
    )
    .unwrap();
    let block = doc
        .split(&format!("```{lang}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/chargeback.md has a {lang} block"))
        .split("```")
        .next()
        .unwrap();
    let mut names = std::collections::BTreeSet::new();
    for (i, _) in block.match_indices(prefix) {
        if i > 0 && block.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = block[i + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            names.insert(name);
        }
    }
    names
}

/// The chargeback KQL reads only fields the request log line really has: every `r.<field>` of
/// the query is on the lines of a JSON answer, a `v1` answer and a stream without usage.
#[tokio::test]
async fn the_chargeback_query_reads_the_log_lines_fields() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "default:100000")]).await;
    aoai.reply(Reply::Owned(
        200,
        vec![("content-type", "application/json")],
        format!(r#"{{"id":"c","choices":[],"usage":{USAGE}}}"#),
    ));
    send(&app, CHAT, "kql-1", r#"{"messages":[],"user":"alice"}"#)
        .await
        .bytes()
        .await
        .unwrap();
    send(
        &app,
        RESPONSES,
        "kql-2",
        r#"{"model":"gpt-4o","input":"x"}"#,
    )
    .await
    .bytes()
    .await
    .unwrap();
    aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
    send(
        &app,
        CHAT,
        "kql-3",
        r#"{"stream":true,"stream_options":1,"messages":[]}"#,
    )
    .await
    .bytes()
    .await
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for id in ["kql-1", "kql-2", "kql-3"] {
        let l = line(&logs, id).await;
        seen.extend(l.as_object().unwrap().keys().cloned());
    }
    // the production lines are flat; the capture nests the fields and keeps these outside
    seen.extend(["target".to_string(), "timestamp".to_string()]);
    let read = doc_fields("kusto", "r.");
    assert!(read.len() >= 10, "{read:?}");
    let missing: Vec<_> = read.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "the KQL reads {missing:?}, not on any line: {seen:?}"
    );
}
