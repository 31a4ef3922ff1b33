//! Per-caller token budgets, black-box: the app in-process against the fake AOAI.
//!
//! Numbers: `default` has 600 tokens a minute (10 a second of refill). A request of
//! [`SMALL`] reserves its prompt counted with `o200k_base` (`"user"` 1 + `"Hello world"` 2 + 4
//! per message + 3 per answer = 10) plus `max_tokens` 500 = 510, leaving 90. A second such
//! request fits only if the first gave budget back (refill alone needs 42 s), so no assertion
//! here depends on how fast the machine is.

use crate::common;

use common::support::app::aoai_error;
use common::*;
use serde_json::json;

const CHAT: &str = "/api/FwdProxy/openai/deployments/gpt-4o/chat/completions";
const SMALL: &str = r#"{"messages":[{"role":"user","content":"Hello world"}],"max_tokens":500}"#;
const REMAINING: &str = "x-fwdproxy-remaining-tokens";
const LIMITS: (&str, &str) = ("CALLER_TOKEN_LIMITS", "default:600");

fn answer(total: u64) -> Reply {
    Reply::Owned(
        200,
        vec![("content-type", "application/json")],
        format!(
            r#"{{"id":"c","choices":[],"usage":{{"prompt_tokens":10,"completion_tokens":{},"total_tokens":{total}}}}}"#,
            total - 10
        ),
    )
}

async fn send(app: &TestApp, key: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("{CHAT}?{API}")))
        .header("api-key", key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn remaining(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(REMAINING)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

/// Budget used up → 429 AOAI-shaped with retry-after and retry-after-ms, the request never
/// forwarded; another caller is unaffected and gets no budget header.
#[tokio::test]
async fn exhausted_budget_is_refused_and_not_forwarded() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
    aoai.reply(answer(510));

    let first = send(&app, IN_KEY, SMALL).await;
    assert_eq!(first.status(), 200);
    assert_eq!(remaining(&first), Some(90));
    first.bytes().await.unwrap();

    // the body ended, the reservation is settled (510 used): the next one does not fit
    let mut refused = None;
    let settled = eventually(PATIENCE, async || {
        let r = send(&app, IN_KEY, SMALL).await;
        if r.status() == 429 {
            refused = Some(r);
            true
        } else {
            false
        }
    })
    .await;
    assert!(settled, "the second request should be refused");
    let refused = refused.unwrap();
    assert_eq!(aoai.seen().len(), 1, "a refused request is never forwarded");
    let ms: u64 = refused.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let secs: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 420 tokens missing at 10 a second, less the refill since
    assert!((1..=42_000).contains(&ms), "{ms}");
    assert_eq!(secs, ms.div_ceil(1000));
    let left = remaining(&refused).expect("a 429 to a limited caller says what is left");
    assert!(left < 510, "{left}");
    let code = assert_aoai_error(refused, 429).await;
    assert_eq!(code, "token_budget_exceeded");

    // an answer to a limited caller the budget did not decide (an operation without token usage)
    // says what is left too, and costs nothing
    let models = app
        .client
        .get(app.url(&format!("/api/FwdProxy/openai/v1/models?{API}")))
        .header("api-key", IN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert!(
        remaining(&models).is_some_and(|l| l < 510),
        "{:?}",
        remaining(&models)
    );
    assert_eq!(aoai.seen().len(), 2);

    // another caller (no limit) goes through and gets no budget header
    let other = send(&app, OTHER_KEY, SMALL).await;
    assert_eq!(other.status(), 200);
    assert_eq!(remaining(&other), None);
    assert_eq!(aoai.seen().len(), 3);
}

/// Settlement gives back what a short answer did not use: after an answer of 12 tokens, a
/// second reservation of 510 fits (without the refund only 90 would be left).
#[tokio::test]
async fn short_answer_gives_budget_back() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
    aoai.reply(answer(12));
    let first = send(&app, IN_KEY, SMALL).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let mut second_left = None;
    let ok = eventually(PATIENCE, async || {
        let r = send(&app, IN_KEY, SMALL).await;
        let ok = r.status() == 200;
        second_left = remaining(&r);
        r.bytes().await.unwrap();
        ok
    })
    .await;
    assert!(ok, "the refund should make room for a second request");
    // 600 - 12 - 510 = 78, plus what refilled meanwhile
    assert!(second_left.unwrap() >= 78, "{second_left:?}");
    assert_eq!(aoai.seen().len(), 2);
}

/// A stream that did not ask for usage settles with the usage the handler asked for.
#[tokio::test]
async fn stream_settles_with_its_usage() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
    let chunk = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}"#.to_string();
    aoai.reply(Reply::UsageStream(
        vec![chunk],
        r#"{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}"#.into(),
    ));
    let body = SMALL.replacen('{', r#"{"stream":true,"#, 1);
    let first = send(&app, IN_KEY, &body).await;
    assert_eq!(first.status(), 200);
    assert!(!first.text().await.unwrap().contains("usage"));
    let ok = eventually(PATIENCE, async || {
        let r = send(&app, IN_KEY, &body).await;
        let ok = r.status() == 200;
        r.bytes().await.unwrap();
        ok
    })
    .await;
    assert!(ok, "the stream's usage should have settled the reservation");
}

/// An error answer (no usage: AOAI charges nothing) refunds the whole reservation, and so does
/// an upstream that cannot be reached.
#[tokio::test]
async fn failed_upstream_refunds() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
    aoai.reply(Reply::Fixed(
        500,
        vec![("content-type", "application/json")],
        r#"{"error":{"code":"InternalServerError","message":"x"}}"#,
    ));
    for _ in 0..3 {
        let mut last = 0;
        let ok = eventually(PATIENCE, async || {
            let r = send(&app, IN_KEY, SMALL).await;
            last = r.status().as_u16();
            r.bytes().await.unwrap();
            last == 500
        })
        .await;
        assert!(ok, "each error answer should refund (last status {last})");
    }

    let closed = closed_port().await;
    let app = TestApp::start(&closed, &[LIMITS]).await;
    for _ in 0..3 {
        let r = send(&app, IN_KEY, SMALL).await;
        assert_eq!(remaining(&r), Some(90), "refunded before the next one");
        assert_aoai_error(r, 502).await;
    }
}

/// One request larger than the whole per-minute limit never fits: 429 without retry-after.
#[tokio::test]
async fn request_over_the_whole_limit() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "*:100")]).await;
    let r = send(&app, OTHER_KEY, SMALL).await;
    assert!(r.headers().get("retry-after").is_none());
    assert!(r.headers().get("retry-after-ms").is_none());
    assert_eq!(remaining(&r), Some(100));
    let (code, message) = aoai_error(r, 429).await;
    assert_eq!(code, "token_budget_exceeded");
    assert!(message.contains("max_tokens"), "{message}");
    aoai.assert_untouched("a request over the limit");
}

/// Bad `CALLER_TOKEN_LIMITS` stops the start with a message naming it.
#[test]
fn bad_limits_are_refused() {
    for bad in [
        "default",
        "default:0",
        "default:-5",
        "default:ten",
        "nobody:100",
        "default:1,default:2",
        "*:1;*:2",
    ] {
        let e = common::support::app::try_settings(
            "http://127.0.0.1:1",
            &[("CALLER_TOKEN_LIMITS", bad)],
        )
        .expect_err(bad);
        assert_eq!(e.name, "CALLER_TOKEN_LIMITS", "{bad}");
    }
    let ok = common::support::app::try_settings(
        "http://127.0.0.1:1",
        &[("CALLER_TOKEN_LIMITS", "default:100;\nother-app:5, *:7")],
    )
    .unwrap();
    assert_eq!(
        ok.budget.limits,
        vec![("default".to_string(), 100), ("other-app".to_string(), 5)]
    );
    assert_eq!(ok.budget.every_other, Some(7));
}

/// A large prompt (counted off the async threads) reserves exactly what the tokenizer counts.
#[tokio::test]
async fn large_prompt_is_counted_whole() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "default:1000000")]).await;
    aoai.reply(answer(20));
    let text = "the quick brown fox jumps over the lazy dog ".repeat(3000);
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 10
    });
    let raw = body.to_string();
    assert!(raw.len() > aoai_fwdproxy::pipeline::budget::INLINE_COUNT_BYTES);
    let expected = aoai_fwdproxy::pipeline::budget::estimate(&body, Some("gpt-4o"), false, 1024);
    // 9 words a sentence, 3000 sentences: about 27,000 tokens, nowhere near bytes / 4 (33,000)
    assert!((27_000..=27_100).contains(&expected), "{expected}");
    let r = send(&app, IN_KEY, &raw).await;
    assert_eq!(r.status(), 200);
    assert_eq!(remaining(&r), Some(1_000_000 - expected));
}

/// Red-team round 3, F1: 30 concurrent requests, each with an image part (`detail: high`) and
/// `max_tokens: 1`, from a caller with 2000 tokens a minute. AOAI bills such a request about
/// 1491 tokens; each used to reserve about 45, so all 30 were admitted (22× the limit). Now each
/// reserves the image's worst case (1445) and only one fits: the other 29 are refused and never
/// forwarded. (Refill is 33 tokens a second and the admitted one settles at 1491, so a second
/// would need about 28 s: the count does not depend on the machine's speed.)
#[tokio::test]
async fn concurrent_image_requests_are_held_to_the_limit() {
    let aoai = MockAoai::start().await;
    aoai.reply(answer(1491));
    for detail in ["high", "auto", ""] {
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(r#","detail":"{detail}""#)
        };
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"describe"}},{{"type":"image_url","image_url":{{"url":"https://example.com/a.png"{detail}}}}}]}}],"max_tokens":1}}"#
        );
        let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "default:2000")]).await;
        let before = aoai.seen().len();
        let sends = (0..30).map(|_| send(&app, IN_KEY, &body));
        let answers = futures_util::future::join_all(sends).await;
        let mut ok = 0;
        for r in answers {
            match r.status().as_u16() {
                200 => {
                    ok += 1;
                    let left = remaining(&r).unwrap();
                    assert!(left <= 2000 - 1445, "{detail}: {left}");
                    r.bytes().await.unwrap();
                }
                429 => {
                    let code = assert_aoai_error(r, 429).await;
                    assert_eq!(code, "token_budget_exceeded");
                }
                s => panic!("{detail}: status {s}"),
            }
        }
        assert_eq!(ok, 1, "{detail}: one image request fits in 2000 tokens");
        assert_eq!(
            aoai.seen().len() - before,
            1,
            "{detail}: refused ones not forwarded"
        );
    }

    // `detail: low` costs 85: many fit (2000 / (85 + 13) ≈ 20 with their overhead)
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "default:2000")]).await;
    aoai.reply(answer(20));
    let low = r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://e/a.png","detail":"low"}}]}],"max_tokens":1}"#;
    let r = send(&app, IN_KEY, low).await;
    assert_eq!(r.status(), 200);
    // 85 + "user" 1 + 4 + 3 + 1
    assert_eq!(remaining(&r), Some(2000 - 94));
}

/// The prompt parts the red team found unreserved (F1): a `response_format` JSON schema, a
/// `prediction`, a Responses `text.format` schema and Responses `tools`. A part of ~3000 tokens
/// from a caller with 2000 a minute is over the whole limit: refused, never forwarded; the same
/// request without it goes through.
#[tokio::test]
async fn schema_heavy_requests_reserve_their_schema() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "*:2000")]).await;
    aoai.reply(answer(20));
    let words = "alpha ".repeat(3000);
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let responses = json!({"input": "hi", "max_output_tokens": 16});
    let cases = [
        (
            CHAT.to_string(),
            chat.clone(),
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "description": words}}}),
        ),
        (
            CHAT.to_string(),
            chat.clone(),
            "prediction",
            json!({"type": "content", "content": words}),
        ),
        (
            "/api/FwdProxy/openai/v1/responses".to_string(),
            responses.clone(),
            "text",
            json!({"format": {"type": "json_schema", "name": "s", "schema": {"description": words}}}),
        ),
        (
            "/api/FwdProxy/openai/v1/responses".to_string(),
            responses.clone(),
            "tools",
            json!([{"type": "function", "name": "f", "parameters": {"description": words}}]),
        ),
    ];
    for (path, base, key, part) in cases {
        let post = |body: String| {
            app.client
                .post(app.url(&format!("{path}?{API}")))
                .header("api-key", OTHER_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let mut heavy = base.clone();
        heavy[key] = part;
        let before = aoai.seen().len();
        let r = post(heavy.to_string()).await.unwrap();
        let (code, _) = aoai_error(r, 429).await;
        assert_eq!(code, "token_budget_exceeded", "{key}");
        assert_eq!(aoai.seen().len(), before, "{key}: refused, not forwarded");
        let r = post(base.to_string()).await.unwrap();
        assert_eq!(r.status(), 200, "{key}: the light request fits");
        r.bytes().await.unwrap();
        assert_eq!(aoai.seen().len(), before + 1);
    }
}

/// Red-team F6: with both `max_completion_tokens` and `max_tokens` the larger is reserved.
#[tokio::test]
async fn the_larger_of_mixed_limits_is_reserved() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("CALLER_TOKEN_LIMITS", "*:5000")]).await;
    aoai.reply(answer(20));
    let msg = r#""messages":[{"role":"user","content":"hi"}]"#;
    for mix in [
        r#""max_completion_tokens":1,"max_tokens":6000"#,
        r#""max_tokens":6000,"max_completion_tokens":1"#,
        r#""max_completion_tokens":6000,"max_tokens":1"#,
        r#""max_completion_tokens":1,"max_tokens":2000,"n":3"#,
    ] {
        let r = send(&app, OTHER_KEY, &format!("{{{msg},{mix}}}")).await;
        let (code, _) = aoai_error(r, 429).await;
        assert_eq!(code, "token_budget_exceeded", "{mix}");
    }
    aoai.assert_untouched("requests over the limit");
    let r = send(
        &app,
        OTHER_KEY,
        &format!(r#"{{{msg},"max_completion_tokens":1,"max_tokens":100}}"#),
    )
    .await;
    assert_eq!(r.status(), 200);
    // "user" 1 + "hi" 1 + 4 + 3 + the larger limit 100
    assert_eq!(remaining(&r), Some(5000 - 109));
}

async fn send_bytes(app: &TestApp, path: &str, key: &str, body: Vec<u8>) -> reqwest::Response {
    app.client
        .post(app.url(&format!("{path}?{API}")))
        .header("api-key", key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// With the gate off nothing else reads a body strictly, so a limited caller's body is held to
/// the way AOAI reads it before anything is reserved. A body the reservation would read
/// differently from AOAI (red team: a byte-order mark, a trailing comma, `NaN`, a comment, a
/// gzip body, a second `max_tokens`, bytes after the document) is a 400 that never reaches
/// AOAI and costs nothing; an unlimited caller's body goes up as sent (nothing reserves it).
#[tokio::test]
async fn a_limited_body_aoai_could_read_otherwise_is_refused_unsent() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
    aoai.reply(answer(510));
    let big = r#"{"messages":[{"role":"user","content":"Hello world"}],"max_tokens":50000}"#;
    let mut gzip = vec![0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
    gzip.extend_from_slice(big.as_bytes());
    let bodies: Vec<Vec<u8>> = vec![
        [&b"\xef\xbb\xbf"[..], big.as_bytes()].concat(),
        big.replace("50000}", "50000,}").into_bytes(),
        big.replace("50000", "NaN").into_bytes(),
        big.replace("{\"messages\"", "{/*c*/\"messages\"")
            .into_bytes(),
        big.replace("}", ",\"max_tokens\":1}").into_bytes(),
        big.replace("}", ",\"MAX_TOKENS\":1}").into_bytes(),
        format!("{big} {{}}").into_bytes(),
        [big.as_bytes(), b"\0"].concat(),
        gzip,
        b"[1]".to_vec(),
    ];
    let sent = bodies.len();
    for body in bodies {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let resp = send_bytes(&app, CHAT, IN_KEY, body).await;
        assert_eq!(remaining(&resp), Some(600), "{shown}");
        let code = assert_aoai_error(resp, 400).await;
        assert_eq!(code, "invalid_body", "{shown}");
    }
    assert!(aoai.seen().is_empty(), "none of the {sent} reached AOAI");

    // nothing was reserved: a request of 510 still fits, leaving 90
    let ok = send(&app, IN_KEY, SMALL).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(remaining(&ok), Some(90));
    ok.bytes().await.unwrap();

    // an unlimited caller's odd body is not ours to refuse: it reaches AOAI byte for byte
    let bom = [&b"\xef\xbb\xbf"[..], SMALL.as_bytes()].concat();
    let other = send_bytes(&app, CHAT, OTHER_KEY, bom.clone()).await;
    assert_eq!(other.status(), 200);
    other.bytes().await.unwrap();
    let seen = aoai.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, bom);
}

/// Completions with a `prompt` array: every prompt is answered `n` times, so each reserves its
/// completion (red team: four prompts reserved one). 4 × 150 = 600 plus the prompts is over the
/// 600 limit, so the request is refused unsent; one prompt of 150 fits.
#[tokio::test]
async fn a_prompt_array_reserves_a_completion_per_prompt() {
    const COMPLETIONS: &str = "/api/FwdProxy/openai/deployments/gpt-4o/completions";
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
    aoai.reply(answer(20));
    let four = br#"{"prompt":["hi","there","x","y"],"max_tokens":150}"#.to_vec();
    let refused = send_bytes(&app, COMPLETIONS, IN_KEY, four).await;
    assert_eq!(
        assert_aoai_error(refused, 429).await,
        "token_budget_exceeded"
    );
    assert!(aoai.seen().is_empty());

    let one = br#"{"prompt":["hi"],"max_tokens":150}"#.to_vec();
    let ok = send_bytes(&app, COMPLETIONS, IN_KEY, one).await;
    assert_eq!(ok.status(), 200);
    let left = remaining(&ok).unwrap();
    assert!(
        (440..450).contains(&left),
        "one prompt of 150 reserved: {left} left"
    );
    ok.bytes().await.unwrap();
    assert_eq!(aoai.seen().len(), 1);
}

/// A stream that ends without usage (edited or not) is charged its reservation, or a token per
/// event it carried when that is more: AOAI sends at least one token per event (red team: a
/// stream cut just before its usage chunk carried 3000 tokens against a reservation of 1033).
/// 700 events against a reservation of 15 leave the caller 100 in debt, so the next request
/// is refused; charged only the reservation, it would fit.
#[tokio::test]
async fn a_stream_without_usage_is_charged_at_least_its_events() {
    let chunk = r#"data: {"choices":[{"index":0,"delta":{"content":"x"}}]}"#.to_string() + "\n\n";
    let mut events: Vec<String> = vec![chunk; 700];
    events.push("data: [DONE]\n\n".into());
    let small = r#"{"messages":[{"role":"user","content":"Hello world"}],"max_tokens":5}"#;
    for options in ["", r#","stream_options":{"include_usage":true}"#] {
        let aoai = MockAoai::start().await;
        let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
        aoai.reply(Reply::Stream(events.clone(), std::time::Duration::ZERO));
        let body = small.replace("}", &format!(",\"stream\":true{options}}}"));
        let resp = send(&app, IN_KEY, &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(remaining(&resp), Some(585), "{body}");
        let text = resp.text().await.unwrap();
        assert_eq!(text.matches("data: {").count(), 700);

        // settled when the tap drops: an operation the budget does not meter costs nothing and
        // says what is left (nothing: the caller is in debt)
        aoai.reply(Reply::Fixed(200, vec![], "{}"));
        let charged = eventually(PATIENCE, async || {
            let r = app
                .client
                .get(app.url(&format!("/api/FwdProxy/openai/v1/models?{API}")))
                .header("api-key", IN_KEY)
                .send()
                .await
                .unwrap();
            remaining(&r) == Some(0)
        })
        .await;
        assert!(charged, "700 events were charged as 15 ({body})");
        let code = assert_aoai_error(send(&app, IN_KEY, small).await, 429).await;
        assert_eq!(code, "token_budget_exceeded");
    }
}

/// A client that goes away while its request is with AOAI (before the answer's headers) keeps
/// its reservation charged: AOAI goes on generating and bills it (red team: the whole
/// reservation came back at once). The request's log line (status 0, abandoned) says the
/// handler let go; the caller's tokens left are then still short of the reservation.
#[tokio::test]
async fn a_client_gone_before_the_answer_keeps_its_reservation_charged() {
    // every log line of the process: the abandoned request's line is written where the
    // connection's future is dropped
    let logs = common::support::logs::global().clone();
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[LIMITS]).await;
    aoai.reply(Reply::Slow(std::time::Duration::from_secs(60)));
    let id = "gone-before-headers";
    let request = app
        .client
        .post(app.url(&format!("{CHAT}?{API}")))
        .header("api-key", IN_KEY)
        .header("x-request-id", id)
        .body(SMALL);
    let client = tokio::spawn(request.send());
    // the client goes away only once the request is with AOAI (no timing involved)
    let with_aoai = eventually(PATIENCE, async || aoai.seen().len() == 1).await;
    assert!(with_aoai, "the request reached AOAI");
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    let logged = eventually(PATIENCE, async || {
        logs.text()
            .lines()
            .any(|l| l.contains(id) && l.contains("\"request\""))
    })
    .await;
    assert!(logged, "the abandoned request's log line");

    aoai.reply(Reply::Fixed(200, vec![], "{}"));
    let models = app
        .client
        .get(app.url(&format!("/api/FwdProxy/openai/v1/models?{API}")))
        .header("api-key", IN_KEY)
        .send()
        .await
        .unwrap();
    let left = remaining(&models).unwrap();
    // 90 left after the reservation of 510, plus the refill since (10 a second)
    assert!(left < 510, "the reservation came back: {left} left");
}
