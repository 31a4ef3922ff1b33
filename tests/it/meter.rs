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

/// A stream the handler cannot ask for usage (a chunked body with the gate off, or the client
/// set `stream_options` without usage) streams up untouched and is logged without usage.
#[tokio::test]
async fn streams_not_asked_are_untouched() {
    let (logs, _guard) = capture();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    aoai.reply(Reply::UsageStream(chunks(), USAGE.into()));
    let body = r#"{"stream":true,"stream_options":{"include_usage":false},"messages":[]}"#;
    let got = send(&app, CHAT, "s-3", body).await.text().await.unwrap();
    assert_eq!(got, usage_stream_text(&chunks(), USAGE, false));
    assert_eq!(aoai.only().body, body.as_bytes());
    assert!(line(&logs, "s-3").await["total_tokens"].is_null());

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
    assert!(line(&logs, "s-4").await["total_tokens"].is_null());
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
