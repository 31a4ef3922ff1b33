//! Spillover across AOAI resources (`AOAI_BACKUPS`), black-box: the app in-process against one
//! fake AOAI per resource, each test asserting what the client got and what every fake saw.
//!
//! Waits are never timed: a cool-down's expiry is awaited with the bounded [`eventually`], and a
//! claim that depends on a cool-down still running is checked only on requests whose whole round
//! trip ended before the earliest instant the cool-down could end (measured at the client, so a
//! slow machine makes the check skip, never fail wrongly).

use crate::common;
use crate::support::mi_stub;

use std::time::{Duration, Instant};

use common::support::aoai::refusing_port;
use common::support::app::aoai_error;
use common::support::logs;
use common::support::wait::within;
use common::*;

const CHAT: &str = "/api/FwdProxy/openai/deployments/gpt-4o/chat/completions";
const BODY: &str = r#"{"messages":[{"role":"user","content":"Hello world"}]}"#;
const BACKUP_KEYS: [&str; 3] = [
    "backup-key-one-aaaaaaaaaaaa",
    "backup-key-two-bbbbbbbbbbbb",
    "backup-key-three-cccccccccc",
];

/// A primary and `n` backups, each a fake AOAI answering 200 until told otherwise.
struct Spill {
    primary: MockAoai,
    backups: Vec<MockAoai>,
    app: TestApp,
}

impl Spill {
    async fn start(n: usize, extra: &[(&str, &str)]) -> Self {
        let primary = MockAoai::start().await;
        let mut backups = Vec::new();
        for _ in 0..n {
            backups.push(MockAoai::start().await);
        }
        let list: Vec<String> = backups.iter().map(MockAoai::base).collect();
        let (list, keys) = (list.join(","), BACKUP_KEYS[..n].join(";"));
        let mut settings = vec![
            ("AOAI_BACKUPS", list.as_str()),
            ("AOAI_BACKUP_OUTAPIKEYS", keys.as_str()),
        ];
        settings.extend_from_slice(extra);
        let app = TestApp::start(&primary.base(), &settings).await;
        Spill {
            primary,
            backups,
            app,
        }
    }

    async fn chat(&self) -> reqwest::Response {
        self.app.post(&format!("{CHAT}?{API}"), BODY).await
    }

    /// Requests seen by the primary and each backup, in that order.
    fn counts(&self) -> Vec<usize> {
        std::iter::once(&self.primary)
            .chain(&self.backups)
            .map(|m| m.seen().len())
            .collect()
    }

    fn stats(&self) -> Vec<aoai_fwdproxy::pipeline::forward::pool::UpstreamStats> {
        self.app.state.upstream.stats()
    }
}

fn throttled(ms: &'static str) -> Reply {
    Reply::Fixed(
        429,
        vec![
            ("content-type", "application/json"),
            ("retry-after-ms", ms),
            ("x-ratelimit-remaining-tokens", "0"),
        ],
        r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded token rate limit."}}"#,
    )
}

fn ok_from(name: &'static str) -> Reply {
    Reply::Fixed(
        200,
        vec![("content-type", "application/json"), ("x-fake", name)],
        r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#,
    )
}

fn header_ms(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()[name].to_str().unwrap().parse().unwrap()
}

/// A 429 from the primary goes to the backup before the client sees anything; the backup gets
/// the same request with its own key; while the primary cools down requests go straight to the
/// backup; once its `retry-after-ms` passed, the primary takes requests again (primary first).
#[tokio::test]
async fn a_throttled_primary_spills_and_is_used_again_after_its_wait() {
    const WAIT_MS: u64 = 1500;
    let s = Spill::start(1, &[]).await;
    s.primary.reply(throttled("1500"));
    s.backups[0].reply(ok_from("backup"));

    let sent = Instant::now();
    let first = s.chat().await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-fake"], "backup");
    first.bytes().await.unwrap();
    assert_eq!(s.counts(), [1, 1]);
    let (p, b) = (s.primary.only(), s.backups[0].only());
    assert_eq!(p.path, b.path);
    assert_eq!(p.query, b.query);
    assert_eq!(p.body, b.body, "the same body to both");
    assert_eq!(p.body, BODY.as_bytes());
    assert_eq!(p.headers["api-key"], OUT_KEY);
    assert_eq!(b.headers["api-key"], BACKUP_KEYS[0], "the backup's own key");
    assert_eq!(p.headers["x-request-id"], b.headers["x-request-id"]);
    for seen in [&p, &b] {
        let all = format!("{:?}", seen.headers);
        assert!(
            !all.contains(IN_KEY),
            "the internal key never goes upstream"
        );
    }
    assert!(!format!("{:?}", p.headers).contains(BACKUP_KEYS[0]));
    assert!(!format!("{:?}", b.headers).contains(OUT_KEY));

    // the primary recovers at once, but it is cooling down: not asked before its wait
    s.primary.reply(ok_from("primary"));
    let cool_end = sent + Duration::from_millis(WAIT_MS);
    let second = s.chat().await;
    let answered = Instant::now();
    if answered < cool_end {
        assert_eq!(second.headers()["x-fake"], "backup");
        assert_eq!(s.counts(), [1, 2], "no attempt on a cooling primary");
    }
    let stats = s.stats();
    assert_eq!((stats[0].throttled, stats[0].cool_downs), (1, 1));

    // after the wait, the primary is first again
    let mut back_at = None;
    let back = eventually(PATIENCE, async || {
        let r = s.chat().await;
        let from = r.headers()["x-fake"].to_str().unwrap().to_string();
        back_at = Some(Instant::now());
        from == "primary"
    })
    .await;
    assert!(back, "the primary was never used again after its cool-down");
    assert!(
        back_at.unwrap() >= cool_end,
        "the primary was asked before its retry-after-ms could have passed"
    );
    let next = s.chat().await;
    assert_eq!(
        next.headers()["x-fake"],
        "primary",
        "primary first when healthy"
    );
    assert_eq!(s.stats()[0].state, "ready");
}

/// Every resource answers 429: the client gets one 429, AOAI-shaped, whose `retry-after-ms` is
/// the shortest of the waits (and `retry-after` its seconds, rounded up). While all cool down,
/// no resource is called at all.
#[tokio::test]
async fn all_throttled_answers_429_with_the_shortest_wait() {
    let s = Spill::start(2, &[]).await;
    s.primary.reply(throttled("9000"));
    s.backups[0].reply(throttled("4000"));
    s.backups[1].reply(throttled("30000"));

    let sent = Instant::now();
    let resp = s.chat().await;
    let elapsed = sent.elapsed().as_millis() as u64;
    assert_eq!(s.counts(), [1, 1, 1], "each resource tried once");
    let ms = header_ms(&resp, "retry-after-ms");
    let secs = header_ms(&resp, "retry-after");
    assert!(
        ms <= 4000 && ms + elapsed >= 4000,
        "retry-after-ms {ms} is not the shortest wait (4000) less the {elapsed} ms it took"
    );
    assert_eq!(secs, ms.div_ceil(1000));
    let (code, message) = aoai_error(resp, 429).await;
    assert_eq!(code, "429");
    assert!(message.contains("retry-after"), "{message}");

    // all cooling: answered without a call
    let again = s.chat().await;
    assert!(header_ms(&again, "retry-after-ms") <= ms);
    assert_eq!(aoai_error(again, 429).await.0, "429");
    assert_eq!(
        s.counts(),
        [1, 1, 1],
        "no resource called while all cool down"
    );
    let stats = s.stats();
    assert!(stats
        .iter()
        .all(|u| u.state == "cooling" && u.throttled == 1));
}

/// `retry-after` in seconds when AOAI sends no `retry-after-ms`, and the default cool-down
/// (`SPILLOVER_DEFAULT_COOLDOWN_MS`) when it sends neither: each shows as the shortest wait.
#[tokio::test]
async fn retry_after_seconds_and_the_default_wait_are_honoured() {
    let refused = r#"{"error":{"code":"429","message":"slow down"}}"#;
    for (primary, backup, want) in [
        (
            Reply::Fixed(429, vec![("retry-after", "3")], refused),
            Reply::Fixed(429, vec![], refused),
            3000,
        ),
        (
            Reply::Fixed(429, vec![], refused),
            Reply::Fixed(
                429,
                vec![("retry-after-ms", "9000"), ("retry-after", "1")],
                refused,
            ),
            5000,
        ),
    ] {
        let s = Spill::start(1, &[("SPILLOVER_DEFAULT_COOLDOWN_MS", "5000")]).await;
        s.primary.reply(primary);
        s.backups[0].reply(backup);
        let sent = Instant::now();
        let resp = s.chat().await;
        let elapsed = sent.elapsed().as_millis() as u64;
        let ms = header_ms(&resp, "retry-after-ms");
        assert!(
            ms <= want && ms + elapsed >= want,
            "the shortest wait is {want} ms, got {ms} after {elapsed} ms"
        );
        assert_eq!(aoai_error(resp, 429).await.0, "429");
        assert_eq!(s.counts(), [1, 1]);
    }
}

/// Without backups nothing changes: AOAI's 429 passes through unchanged, and the next request
/// still goes to AOAI (no answer of our own while it cools down).
#[tokio::test]
async fn without_backups_aoai_429_passes_through_unchanged() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let body = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded token rate limit."}}"#;
    aoai.reply(Reply::Fixed(
        429,
        vec![
            ("content-type", "application/json"),
            ("retry-after", "20"),
            ("retry-after-ms", "20000"),
            ("x-ms-region", "Sweden Central"),
        ],
        body,
    ));
    for n in 1..=2 {
        let resp = app.post(&format!("{CHAT}?{API}"), BODY).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after-ms"], "20000");
        assert_eq!(resp.headers()["x-ms-region"], "Sweden Central");
        assert_eq!(resp.text().await.unwrap(), body);
        assert_eq!(
            aoai.seen().len(),
            n,
            "every request reaches the one resource"
        );
    }
}

/// A backup that refuses connections: the request goes on to the next one, the refusing one's
/// circuit opens and the following requests skip it without trying.
#[tokio::test]
async fn a_backup_that_is_down_is_skipped_and_its_circuit_opens() {
    let primary = MockAoai::start().await;
    let good = MockAoai::start().await;
    let down = refusing_port();
    let list = format!("{},{}", down.url, good.base());
    let keys = format!("{},{}", BACKUP_KEYS[0], BACKUP_KEYS[1]);
    let app = TestApp::start(
        &primary.base(),
        &[
            ("AOAI_BACKUPS", &list),
            ("AOAI_BACKUP_OUTAPIKEYS", &keys),
            ("SPILLOVER_CIRCUIT_OPEN_MS", "600000"),
        ],
    )
    .await;
    primary.reply(throttled("600000"));
    good.reply(ok_from("good"));

    let resp = app.post(&format!("{CHAT}?{API}"), BODY).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-fake"], "good");
    assert_eq!(good.only().headers["api-key"], BACKUP_KEYS[1]);
    let stats = app.state.upstream.stats();
    assert_eq!(stats[1].connect_failures, 1);
    assert_eq!(stats[1].circuit_opens, 1);
    assert_eq!(stats[1].state, "open");

    for n in 2..=4 {
        let resp = app.post(&format!("{CHAT}?{API}"), BODY).await;
        assert_eq!(resp.headers()["x-fake"], "good");
        assert_eq!(good.seen().len(), n);
    }
    let stats = app.state.upstream.stats();
    assert_eq!(
        (stats[0].requests, stats[1].requests, stats[2].requests),
        (1, 1, 4),
        "neither the cooling primary nor the open backup was tried again"
    );
}

/// Every resource fails with a 5xx: the last answer passes through unchanged (not all are
/// cooling down); then, with every circuit open, the handler answers 503 itself without a call.
#[tokio::test]
async fn server_errors_pass_the_last_answer_then_the_earliest_is_tried_not_refused() {
    let s = Spill::start(1, &[("SPILLOVER_CIRCUIT_OPEN_MS", "600000")]).await;
    s.primary.reply(Reply::Fixed(
        500,
        vec![],
        r#"{"error":{"code":"InternalServerError","message":"primary broke"}}"#,
    ));
    let last = r#"{"error":{"code":"ServiceUnavailable","message":"backup busy"}}"#;
    s.backups[0].reply(Reply::Fixed(
        503,
        vec![("content-type", "application/json"), ("x-fake", "backup")],
        last,
    ));
    let resp = s.chat().await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-fake"],
        "backup",
        "the last answer, unchanged"
    );
    assert_eq!(resp.text().await.unwrap(), last);
    assert_eq!(s.counts(), [1, 1]);

    // every circuit open for gpt-4o: not refused, the one that opened first (the primary) is
    // tried, and its answer passes
    let resp = s.chat().await;
    assert_eq!(resp.status(), 500, "the primary's own answer, not our 503");
    assert!(resp.headers().get("x-fake").is_none());
    assert_eq!(s.counts(), [2, 1], "one attempt, on the earliest-opened");
    let stats = s.stats();
    assert_eq!(
        stats.iter().map(|u| u.server_errors).collect::<Vec<_>>(),
        [2, 1]
    );
    // a 5xx fences the deployment: the resources themselves stay ready
    assert!(stats
        .iter()
        .all(|u| u.circuit_opens == 1 && u.state == "ready"));
}

/// A 5xx opens the primary's circuit for `SPILLOVER_CIRCUIT_OPEN_MS`; after it one request
/// probes the primary, and once that succeeded the primary is first again.
#[tokio::test]
async fn the_primary_circuit_opens_on_a_5xx_and_a_probe_closes_it() {
    const OPEN_MS: u64 = 1500;
    let s = Spill::start(1, &[("SPILLOVER_CIRCUIT_OPEN_MS", "1500")]).await;
    s.primary.reply(Reply::Fixed(502, vec![], "bad gateway"));
    s.backups[0].reply(ok_from("backup"));
    let sent = Instant::now();
    let resp = s.chat().await;
    assert_eq!(resp.headers()["x-fake"], "backup");
    assert_eq!(s.counts(), [1, 1]);

    s.primary.reply(ok_from("primary"));
    let open_end = sent + Duration::from_millis(OPEN_MS);
    let resp = s.chat().await;
    if Instant::now() < open_end {
        assert_eq!(resp.headers()["x-fake"], "backup");
        assert_eq!(s.counts(), [1, 2], "no attempt on an open circuit");
    }
    let mut back_at = None;
    let probed = eventually(PATIENCE, async || {
        let r = s.chat().await;
        back_at = Some(Instant::now());
        r.headers()["x-fake"] == "primary"
    })
    .await;
    assert!(probed, "the primary was never probed");
    assert!(
        back_at.unwrap() >= open_end,
        "probed before the circuit could close"
    );
    for _ in 0..3 {
        assert_eq!(s.chat().await.headers()["x-fake"], "primary");
    }
    let stats = s.stats();
    assert_eq!((stats[0].server_errors, stats[0].circuit_opens), (1, 1));
    assert_eq!(stats[0].state, "ready");
}

/// A streamed answer is never retried once its first byte left: the primary sends its headers
/// and one event, then dies; the client sees the event and then the cut, the backup sees
/// nothing.
#[tokio::test]
async fn a_stream_is_never_retried_after_its_first_byte() {
    let s = Spill::start(1, &[]).await;
    let event = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    s.primary.reply(Reply::Broken(vec![event.to_string()]));
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let mut resp = s.app.post(&format!("{CHAT}?{API}"), body).await;
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("Hel") {
        let chunk = within(PATIENCE, "the first event", resp.chunk())
            .await
            .expect("the first event arrives whole")
            .expect("the stream has not ended yet");
        got.extend_from_slice(&chunk);
    }
    s.primary.release(1);
    let mut cut = false;
    loop {
        match within(PATIENCE, "the cut", resp.chunk()).await {
            Ok(Some(more)) => got.extend_from_slice(&more),
            Ok(None) => break,
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(cut, "the client must see the stream break, not a clean end");
    assert!(!String::from_utf8_lossy(&got).contains("[DONE]"));
    s.backups[0].assert_untouched("a started answer is never retried");
    assert_eq!(s.stats()[0].requests, 1);
}

/// Low `x-ratelimit-remaining-*` on the primary's last answer steers the next requests to the
/// backup before the primary refuses them; requests the reading still covers stay on the primary;
/// and a low primary is still used when nothing else is.
#[tokio::test]
async fn remaining_headers_steer_the_next_requests_early() {
    let s = Spill::start(1, &[("SPILLOVER_STEER_MS", "600000")]).await;
    s.primary.reply(Reply::Fixed(
        200,
        vec![
            ("x-fake", "primary"),
            ("x-ratelimit-remaining-requests", "50"),
            ("x-ratelimit-remaining-tokens", "10"),
        ],
        "{}",
    ));
    s.backups[0].reply(ok_from("backup"));
    // BODY needs ~13 tokens (a token per 4 bytes), more than the 10 left
    assert_eq!(s.chat().await.headers()["x-fake"], "primary");
    assert_eq!(s.chat().await.headers()["x-fake"], "backup");
    assert_eq!(s.counts(), [1, 1], "steered without asking the primary");
    assert_eq!(s.stats()[0].steered_away, 1);
    // a small request still fits what the primary has left
    let small = s.app.post(&format!("{CHAT}?{API}"), "{}").await;
    assert_eq!(small.headers()["x-fake"], "primary");

    // no requests left at all: even the small one goes elsewhere
    s.primary.reply(Reply::Fixed(
        200,
        vec![
            ("x-fake", "primary"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "-1"),
        ],
        "{}",
    ));
    assert_eq!(
        s.app.post(&format!("{CHAT}?{API}"), "{}").await.headers()["x-fake"],
        "primary"
    );
    assert_eq!(
        s.app.post(&format!("{CHAT}?{API}"), "{}").await.headers()["x-fake"],
        "backup"
    );

    // the backup throttles: the request goes back to the low primary rather than fail, and
    // while the backup cools down the low primary takes requests directly
    s.backups[0].reply(throttled("600000"));
    let before = s.counts();
    let r = s.chat().await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-fake"],
        "primary",
        "a low resource beats none"
    );
    assert_eq!(s.counts(), [before[0] + 1, before[1] + 1]);
    let r = s.chat().await;
    assert_eq!(r.headers()["x-fake"], "primary");
    assert_eq!(s.counts(), [before[0] + 2, before[1] + 1]);
}

/// One reservation whatever the attempts: the primary's 429 charges nothing, the backup's usage
/// is charged once, and a request every resource refused is refunded whole.
#[tokio::test]
async fn the_budget_settles_once_across_attempts() {
    let s = Spill::start(1, &[("CALLER_TOKEN_LIMITS", "default:600")]).await;
    s.primary.reply(throttled("600000"));
    s.backups[0].reply(Reply::Fixed(
        200,
        vec![("content-type", "application/json")],
        r#"{"id":"c","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":290,"total_tokens":300}}"#,
    ));
    let budgets = &s.app.state.budgets;
    let body = r#"{"messages":[{"role":"user","content":"Hello world"}],"max_tokens":500}"#;
    let sent = Instant::now();
    let resp = s.app.post(&format!("{CHAT}?{API}"), body).await;
    assert_eq!(resp.status(), 200);
    // 10 prompt + 500 max_tokens reserved once, not once per attempt
    assert_eq!(resp.headers()["x-fwdproxy-remaining-tokens"], "90");
    resp.bytes().await.unwrap();
    assert_eq!(s.counts(), [1, 1]);
    // settled with the backup's 300: 300 left plus what refilled since (10 a second)
    assert!(
        eventually(PATIENCE, async || {
            let left = budgets.remaining("default").unwrap();
            let refill = sent.elapsed().as_secs_f64() * 10.0;
            left >= 300 && (left as f64) <= 300.0 + refill + 1.0
        })
        .await,
        "remaining {:?} after one charge of 300",
        budgets.remaining("default")
    );

    // every resource refuses: nothing is charged (the refund happens before the answer goes
    // out, so no wait; refill only adds)
    s.backups[0].reply(throttled("600000"));
    let small = r#"{"messages":[{"role":"user","content":"Hello world"}],"max_tokens":100}"#;
    let (asked, before) = (Instant::now(), budgets.remaining("default").unwrap());
    let resp = s.app.post(&format!("{CHAT}?{API}"), small).await;
    // one reservation of 110 (10 prompt + 100), plus what refilled meanwhile (10 a second)
    let held = header_ms(&resp, "x-fwdproxy-remaining-tokens");
    let refill = asked.elapsed().as_secs_f64() * 10.0;
    assert!(
        held >= before - 110 && held as f64 <= (before - 110) as f64 + refill + 1.0,
        "{before} before, {held} while held"
    );
    assert_eq!(aoai_error(resp, 429).await.0, "429");
    assert_eq!(s.counts(), [1, 2]);
    let after = budgets.remaining("default").unwrap();
    assert!(
        after >= before,
        "refused everywhere, yet charged: {before} → {after}"
    );
}

/// `HEALTH_REFLECTS_CAPACITY`: the health route answers 503 (AOAI-shaped, with retry-after)
/// only while every resource is cooling down or open, and only when asked to.
#[tokio::test]
async fn health_reflects_capacity_only_when_opted_in() {
    for opted in [true, false] {
        let flag = if opted { "true" } else { "false" };
        let s = Spill::start(
            1,
            &[
                ("HEALTH_REFLECTS_CAPACITY", flag),
                ("SPILLOVER_CIRCUIT_OPEN_MS", "600000"),
            ],
        )
        .await;
        let health = async || {
            s.app
                .client
                .get(s.app.url("/api/FwdProxy/openai/deployments/health/check"))
                .send()
                .await
                .unwrap()
        };
        assert_eq!(health().await.status(), 200);
        s.primary.reply(throttled("600000"));
        s.backups[0].reply(ok_from("backup"));
        assert_eq!(s.chat().await.status(), 200);
        assert_eq!(
            health().await.status(),
            200,
            "the backup still has capacity"
        );
        s.backups[0].reply(throttled("600000"));
        assert_eq!(s.chat().await.status(), 429);
        assert_eq!(
            s.counts(),
            [1, 2],
            "the primary still cools down: not asked"
        );
        let resp = health().await;
        if opted {
            assert!(header_ms(&resp, "retry-after-ms") > 0);
            assert!(resp.headers().contains_key("retry-after"));
            assert_eq!(aoai_error(resp, 503).await.0, "upstream_unavailable");
        } else {
            assert_eq!(resp.status(), 200, "not opted in: health stays 200");
        }
    }
}

/// The request log line names the resource that answered and the attempts made, never a key.
#[tokio::test]
async fn the_log_line_names_the_upstream_and_the_attempts() {
    let (captured, _guard) = logs::capture();
    let s = Spill::start(1, &[]).await;
    s.primary.reply(throttled("600000"));
    s.backups[0].reply(ok_from("backup"));
    s.chat().await.bytes().await.unwrap();
    let line = || {
        captured
            .text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "request")
    };
    assert!(
        eventually(PATIENCE, async || line().is_some()).await,
        "no request line"
    );
    let fields = line().unwrap()["fields"].clone();
    assert_eq!(fields["upstream"], s.backups[0].addr.to_string());
    assert_eq!(fields["attempts"], 2);
    assert_eq!(fields["status"], 200);
    let text = captured.text();
    for secret in [OUT_KEY, IN_KEY, BACKUP_KEYS[0]] {
        assert!(!text.contains(secret), "a key in the logs");
    }
}

/// A body that cannot be sent again is sent once: a chunked body (no length), or one declared
/// over `SPILLOVER_REPLAY_MAX_BYTES`; a body under it is read first and retried.
#[tokio::test]
async fn only_replayable_bodies_are_retried() {
    let s = Spill::start(1, &[("SPILLOVER_REPLAY_MAX_BYTES", "64")]).await;
    // no x-ratelimit-remaining-*: nothing steers the next requests away from the primary
    s.primary
        .reply(Reply::Fixed(429, vec![("retry-after-ms", "1")], "{}"));
    s.backups[0].reply(ok_from("backup"));
    // images/generations is neither gated here (the gate is off) nor metered: its body streams
    let url = format!("/api/FwdProxy/openai/deployments/dalle/images/generations?{API}");
    let short = r#"{"prompt":"a cat"}"#;
    let long = format!(r#"{{"prompt":"{}"}}"#, "a cat ".repeat(20));

    let resp = s.app.post(&url, short).await;
    assert_eq!(
        resp.headers()["x-fake"],
        "backup",
        "a short body is retried"
    );
    assert_eq!(s.backups[0].only().body, short.as_bytes());

    let cooled = eventually(PATIENCE, async || s.stats()[0].state == "ready").await;
    assert!(cooled);
    let resp = s.app.post(&url, &long).await;
    assert_eq!(
        resp.status(),
        429,
        "over the replay limit: sent once, AOAI's answer passes"
    );
    assert_eq!(s.backups[0].seen().len(), 1);
    assert_eq!(s.primary.seen().last().unwrap().body, long.as_bytes());

    assert!(eventually(PATIENCE, async || s.stats()[0].state == "ready").await);
    let chunks = futures_util::stream::iter(
        [
            short.as_bytes()[..5].to_vec(),
            short.as_bytes()[5..].to_vec(),
        ]
        .into_iter()
        .map(Ok::<_, std::io::Error>),
    );
    let resp = s
        .app
        .client
        .post(s.app.url(&url))
        .header("api-key", IN_KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429, "a chunked body is sent once");
    assert_eq!(s.backups[0].seen().len(), 1);
    let last = s.primary.seen().last().unwrap().clone();
    assert_eq!(last.body, short.as_bytes());
    assert!(last.body_error.is_none());
}

/// With `AOAI_AUTH=managed_identity` the one token serves every resource (fetched once).
#[tokio::test]
async fn the_managed_identity_token_serves_every_resource() {
    let id = "5b5b5b5b-5b5b-5b5b-5b5b-5b5b5b5b5b5b";
    mi_stub::stub();
    let primary = MockAoai::start().await;
    let backup = MockAoai::start().await;
    let backups = backup.base();
    let app = TestApp::start(
        &primary.base(),
        &[
            ("AOAI_OUTAPIKEY", ""),
            ("AOAI_AUTH", "managed_identity"),
            ("AZURE_CLIENT_ID", id),
            ("AOAI_BACKUPS", &backups),
        ],
    )
    .await;
    primary.reply(throttled("600000"));
    backup.reply(ok_from("backup"));
    let resp = app.post(&format!("{CHAT}?{API}"), BODY).await;
    assert_eq!(resp.status(), 200);
    let want = format!("Bearer tok-{id}-1");
    assert_eq!(primary.only().headers["authorization"], want.as_str());
    assert_eq!(backup.only().headers["authorization"], want.as_str());
    assert!(!backup.only().headers.contains_key("api-key"));
    assert_eq!(mi_stub::stub().calls(id), 1);
}

/// A count of backup keys that does not match the backups stops the start, naming the setting.
#[test]
fn mismatched_backup_keys_stop_the_start() {
    let e = common::support::app::try_settings(
        "http://127.0.0.1:9",
        &[
            ("AOAI_BACKUPS", "http://127.0.0.1:10,http://127.0.0.1:11"),
            ("AOAI_BACKUP_OUTAPIKEYS", BACKUP_KEYS[0]),
        ],
    )
    .unwrap_err();
    assert_eq!(e.name, "AOAI_BACKUP_OUTAPIKEYS");
    assert!(!e.to_string().contains(BACKUP_KEYS[0]));
}

/// Rate limits are per deployment: a throttled `gpt-4o` on the primary spills, while another
/// deployment of the same primary keeps going to it.
#[tokio::test]
async fn a_throttled_deployment_does_not_move_the_others() {
    let s = Spill::start(1, &[]).await;
    s.primary.reply(throttled("600000"));
    s.backups[0].reply(ok_from("backup"));
    assert_eq!(s.chat().await.headers()["x-fake"], "backup");
    s.primary.reply(ok_from("primary"));
    let embeddings = format!("/api/FwdProxy/openai/deployments/embed/embeddings?{API}");
    let resp = s.app.post(&embeddings, r#"{"input":"hello"}"#).await;
    assert_eq!(resp.headers()["x-fake"], "primary");
    assert_eq!(
        s.chat().await.headers()["x-fake"],
        "backup",
        "gpt-4o still cools down"
    );
    assert_eq!(s.counts(), [2, 2]);
}

/// Objects stored in one resource (files, batches, stored responses) stay with the primary: its
/// 429 passes through and no backup is asked for an object it does not have.
#[tokio::test]
async fn stored_objects_stay_with_the_primary() {
    let s = Spill::start(1, &[]).await;
    s.primary.reply(throttled("600000"));
    s.backups[0].reply(ok_from("backup"));
    for path in [
        "/api/FwdProxy/openai/files/file-abc?api-version=2024-10-21",
        "/api/FwdProxy/openai/batches/batch_abc?api-version=2024-10-21",
        "/api/FwdProxy/openai/v1/responses/resp_abc",
    ] {
        let resp = s
            .app
            .client
            .get(s.app.url(path))
            .header("api-key", IN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429, "{path}: the primary's own answer");
        assert!(resp.headers().get("x-fake").is_none());
    }
    s.backups[0].assert_untouched("stored objects are never looked for elsewhere");
    assert_eq!(s.counts()[0], 3);
}

/// Fetches the health route.
async fn health(app: &TestApp) -> reqwest::Response {
    app.client
        .get(app.url("/api/FwdProxy/openai/deployments/health/check"))
        .send()
        .await
        .unwrap()
}

/// Red team F2c: with `HEALTH_REFLECTS_CAPACITY`, a deployment that answered without any
/// `x-ratelimit-remaining-*` (provisioned deployments send none) counts as seen: a 429 on
/// another deployment of every resource does not make health 503 while the primary serves.
/// A fresh handler (nothing known) is healthy too.
#[tokio::test]
async fn health_stays_up_while_a_deployment_without_readings_serves() {
    let s = Spill::start(
        2,
        &[
            ("HEALTH_REFLECTS_CAPACITY", "true"),
            ("SPILLOVER_MAX_COOLDOWN_MS", "600000"),
        ],
    )
    .await;
    assert_eq!(
        health(&s.app).await.status(),
        200,
        "fresh: unknown is not down"
    );
    s.primary.reply(ok_from("primary"));
    for _ in 0..3 {
        assert_eq!(s.chat().await.headers()["x-fake"], "primary");
    }
    assert_eq!(health(&s.app).await.status(), 200);
    for m in std::iter::once(&s.primary).chain(&s.backups) {
        m.reply(throttled("600000"));
    }
    let tiny = format!("/api/FwdProxy/openai/deployments/tiny2/chat/completions?{API}");
    assert_eq!(s.app.post(&tiny, BODY).await.status(), 429);
    assert_eq!(s.counts(), [4, 1, 1]);
    let resp = health(&s.app).await;
    assert_eq!(resp.status(), 200, "the primary serves gpt-4o");
    s.primary.reply(ok_from("primary"));
    assert_eq!(s.chat().await.headers()["x-fake"], "primary");
    assert_eq!(health(&s.app).await.status(), 200);
    assert_eq!(s.counts(), [5, 1, 1]);
    assert_eq!(s.stats()[0].state, "ready");
}

const V1_CHAT: &str = "/api/FwdProxy/openai/v1/chat/completions";

fn v1_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":5}}"#)
}

/// Red team F2a: on v1 routes the deployment is the body's `model`; a 429 for one model on
/// every resource makes the handler answer 429 for that model only, and another model still
/// goes to the primary (AOAI called, not refused), for every spelling of the model's position.
#[tokio::test]
async fn v1_models_cool_down_apart() {
    let s = Spill::start(1, &[("SPILLOVER_MAX_COOLDOWN_MS", "600000")]).await;
    s.primary.reply(throttled("600000"));
    s.backups[0].reply(throttled("600000"));
    let resp = s.app.post(V1_CHAT, &v1_body("tiny-dep")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(s.counts(), [1, 1]);

    s.primary.reply(ok_from("primary"));
    s.backups[0].reply(ok_from("backup"));
    // the model anywhere among the members, or the only member after others
    for body in [
        v1_body("gpt-4o"),
        r#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}"#.to_string(),
        v1_body("other-model"),
    ] {
        let resp = s.app.post(V1_CHAT, &body).await;
        assert_eq!(resp.status(), 200, "{body}");
        assert_eq!(resp.headers()["x-fake"], "primary", "{body}");
    }
    assert_eq!(s.counts(), [4, 1]);
    assert_eq!(s.primary.seen()[1].path, "/openai/v1/chat/completions");
    // the throttled model is still cooling everywhere: our 429, no AOAI call
    let resp = s.app.post(V1_CHAT, &v1_body("tiny-dep")).await;
    assert!(header_ms(&resp, "retry-after") >= 1);
    assert_eq!(aoai_error(resp, 429).await.0, "429");
    assert_eq!(s.counts(), [4, 1]);
}

/// Red team F2b: a 5xx for one deployment fences that deployment, not the resource: another
/// deployment is served by the primary at once, and the failing deployment, open everywhere,
/// is tried on the resource whose circuit opened first instead of answering 503.
#[tokio::test]
async fn one_5xx_fences_a_deployment_not_the_resource() {
    let s = Spill::start(2, &[("SPILLOVER_CIRCUIT_OPEN_MS", "600000")]).await;
    for status in [500u16, 502, 503, 504] {
        let s = Spill::start(2, &[("SPILLOVER_CIRCUIT_OPEN_MS", "600000")]).await;
        for m in std::iter::once(&s.primary).chain(&s.backups) {
            m.reply(Reply::Fixed(status, vec![], "broken"));
        }
        let attacker = format!("/api/FwdProxy/openai/deployments/attacker/chat/completions?{API}");
        assert_eq!(s.app.post(&attacker, BODY).await.status(), status);
        assert_eq!(s.counts(), [1, 1, 1], "{status}");
        s.primary.reply(ok_from("primary"));
        let resp = s.chat().await;
        assert_eq!(resp.status(), 200, "{status}: the victim is served");
        assert_eq!(resp.headers()["x-fake"], "primary");
        assert_eq!(s.counts(), [2, 1, 1], "{status}");
        // the attacker's deployment, open on all three: the primary (opened first) is tried
        let resp = s.app.post(&attacker, BODY).await;
        assert_eq!(resp.status(), 200, "{status}: tried, not refused");
        assert_eq!(s.counts(), [3, 1, 1], "{status}");
    }
    // every resource still failing the deployment: its own answer, never our 503
    for m in std::iter::once(&s.primary).chain(&s.backups) {
        m.reply(Reply::Fixed(500, vec![], "broken"));
    }
    for round in 1..=3 {
        let resp = s.chat().await;
        assert_eq!(resp.status(), 500, "round {round}");
    }
    // all three once, then each time the one whose circuit opened earliest
    assert_eq!(s.counts(), [2, 2, 1]);
}

/// A connection failure still opens the resource's circuit: every deployment of a resource
/// that cannot be reached goes to the next one at once.
#[tokio::test]
async fn a_failed_connection_fences_the_whole_resource() {
    let backup = MockAoai::start().await;
    backup.reply(ok_from("backup"));
    let down = refusing_port();
    let (list, keys) = (backup.base(), BACKUP_KEYS[0]);
    let app = TestApp::start(
        &down.url,
        &[
            ("AOAI_BACKUPS", list.as_str()),
            ("AOAI_BACKUP_OUTAPIKEYS", keys),
            ("SPILLOVER_CIRCUIT_OPEN_MS", "600000"),
        ],
    )
    .await;
    assert_eq!(app.post(&format!("{CHAT}?{API}"), BODY).await.status(), 200);
    let embed = format!("/api/FwdProxy/openai/deployments/embed/embeddings?{API}");
    assert_eq!(app.post(&embed, r#"{"input":"x"}"#).await.status(), 200);
    let stats = app.state.upstream.stats();
    assert_eq!(
        stats[0].connect_failures, 1,
        "the second skipped the primary"
    );
    assert_eq!(stats[0].state, "open");
    assert_eq!(backup.seen().len(), 2);
}

/// Red team F7: a `retry-after: 0` / `retry-after-ms: 0` 429 cools the deployment for the
/// default wait instead of ending it at once, so the handler answers its own 429 with at least
/// one second rather than passing AOAI's zero on.
#[tokio::test]
async fn a_zero_retry_after_is_not_a_hot_loop() {
    for headers in [
        vec![("retry-after", "0")],
        vec![("retry-after-ms", "0")],
        vec![("retry-after", "0"), ("retry-after-ms", "0")],
        vec![("retry-after-ms", "0.4")],
    ] {
        let s = Spill::start(
            1,
            &[
                ("SPILLOVER_DEFAULT_COOLDOWN_MS", "600000"),
                ("SPILLOVER_MAX_COOLDOWN_MS", "600000"),
            ],
        )
        .await;
        let mut h = vec![("content-type", "application/json")];
        h.extend(headers.iter().copied());
        for m in [&s.primary, &s.backups[0]] {
            m.reply(Reply::Fixed(
                429,
                h.clone(),
                r#"{"error":{"code":"429","message":"x"}}"#,
            ));
        }
        let resp = s.chat().await;
        assert_eq!(s.counts(), [1, 1], "{headers:?}");
        assert!(header_ms(&resp, "retry-after") >= 1, "{headers:?}");
        assert!(header_ms(&resp, "retry-after-ms") >= 1000, "{headers:?}");
        let (code, message) = aoai_error(resp, 429).await;
        assert_eq!(code, "429");
        assert!(message.contains("Every"), "{headers:?}: ours, not AOAI's");
        // still cooling: no AOAI call
        assert_eq!(s.chat().await.status(), 429);
        assert_eq!(s.counts(), [1, 1], "{headers:?}");
    }
}

/// Red team F4: a backup that names the primary (or another backup) in another spelling stops
/// the start, naming the setting.
#[test]
fn backups_naming_the_primary_in_another_spelling_stop_the_start() {
    for (primary, backups) in [
        ("http://127.0.0.1:19501", "http://localhost:19501"),
        ("http://127.0.0.1:19501", "http://LOCALHOST.:19501/"),
        ("http://localhost:19501", "http://127.0.0.1:19501"),
        ("http://127.0.0.1:19501", "http://[::1]:19501"),
        ("foo.openai.azure.com", "foo.openai.azure.com."),
        ("foo.openai.azure.com", "https://FOO.openai.azure.com.:443"),
        (
            "foo.openai.azure.com",
            "bar.openai.azure.com,BAR.openai.azure.com.",
        ),
        (
            "http://127.0.0.1:9",
            "http://localhost:10,http://127.0.0.1:10",
        ),
    ] {
        let e =
            common::support::app::try_settings(primary, &[("AOAI_BACKUPS", backups)]).unwrap_err();
        assert_eq!(e.name, "AOAI_BACKUPS", "{primary} / {backups}");
    }
}
