//! Usage summaries in Cosmos DB, black-box: the app in-process against the fake AOAI and the
//! Cosmos DB SDK's in-memory emulator. What lands in the `usage` container (partition key
//! `/caller`) sums exactly to the usage of the answers the clients got, JSON and streams; a
//! `usage` outage keeps the summaries in their journal (and never holds an abuse record back),
//! and the next start ships them without overwriting what the earlier process wrote.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aoai_fwdproxy::app::AppState;
use aoai_fwdproxy::pipeline::meter::summary::UsageSummary;
use azure_data_cosmos::fault_injection::{
    FaultInjectionConditionBuilder, FaultInjectionErrorType, FaultInjectionResultBuilder,
    FaultInjectionRule, FaultInjectionRuleBuilder, FaultOperationType,
};
use azure_data_cosmos::{FeedScope, Query};
use futures_util::TryStreamExt;
use support::aoai::{MockAoai, Reply};
use support::app::{test_settings, TestApp, API, IN_KEY, OTHER_KEY};
use support::cosmos_emu::{Emu, USAGE};
use support::wait::{eventually, PATIENCE};

const CHAT: &str = "/api/FwdProxy/openai/deployments/gpt-4o/chat/completions";
const RESPONSES: &str = "/api/FwdProxy/openai/v1/responses";
const USAGE_A: &str = r#"{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":2}}"#;
const USAGE_B: &str = r#"{"prompt_tokens":20,"completion_tokens":5,"total_tokens":25}"#;

/// The sums of one caller × user × deployment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sums {
    requests: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
    reasoning: u64,
    total: u64,
    without_usage: u64,
}

async fn start(
    emu: &Emu,
    aoai: &MockAoai,
    dir: &std::path::Path,
    rules: Vec<Arc<FaultInjectionRule>>,
    extra: &[(&str, &str)],
) -> TestApp {
    let spool = dir.join("abuse-journal.jsonl").display().to_string();
    let mut pairs: Vec<(String, String)> = emu.pairs();
    for (k, v) in [
        ("AUDIT_SPOOL_PATH", spool.as_str()),
        ("AUDIT_RETRY_BASE_MS", "20"),
        ("AUDIT_REPLAY_INTERVAL_MS", "200"),
        ("AUDIT_MAX_ATTEMPTS", "2"),
        ("WEBSITE_INSTANCE_ID", "inst-1"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        pairs.retain(|(n, _)| n != k);
        pairs.push((k.into(), v.into()));
    }
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let settings = test_settings(&aoai.base(), &refs);
    let state = AppState::with_cosmos_builder(settings, emu.account(rules).builder_factory())
        .await
        .unwrap();
    assert!(state.usage.is_some(), "usage summaries on with Cosmos DB");
    TestApp::with_state(state).await
}

async fn post(app: &TestApp, key: &str, path: &str, body: &str) -> (u16, String) {
    let resp = app
        .client
        .post(app.url(&format!("{path}?{API}")))
        .header("api-key", key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn chat_json(usage: &str) -> Reply {
    Reply::Owned(
        200,
        vec![("content-type", "application/json")],
        format!(r#"{{"id":"c","object":"chat.completion","choices":[],"usage":{usage}}}"#),
    )
}

fn chunks() -> Vec<String> {
    ["Hel", "lo"]
        .iter()
        .map(|t| {
            format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{t}"}}}}]}}"#
            )
        })
        .collect()
}

/// Wait until `n` answers were added to the open summaries (a request's end runs just after
/// its client read the last byte).
async fn counted(app: &TestApp, n: u64) {
    let usage = app.state.usage.as_ref().unwrap();
    assert!(
        eventually(PATIENCE, async || usage.summaries().open_requests() == n).await,
        "{} answers counted, not {n}",
        usage.summaries().open_requests()
    );
}

/// Every item of the `usage` container.
async fn stored(emu: &Emu) -> Vec<UsageSummary> {
    let c = emu.container(USAGE).await;
    let mut it = c
        .query_items::<UsageSummary>(
            Query::from("SELECT * FROM c"),
            FeedScope::full_container(),
            None,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(i) = it.try_next().await.unwrap() {
        out.push(i);
    }
    out
}

/// The items summed per caller × user × deployment (a key may have several records: minutes,
/// processes); fails on a repeated id.
fn sums(items: &[UsageSummary]) -> BTreeMap<(String, String, String), Sums> {
    let ids: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids.len(), items.len(), "ids are unique");
    let mut out: BTreeMap<_, Sums> = BTreeMap::new();
    for i in items {
        let s = out
            .entry((i.caller.clone(), i.user.clone(), i.deployment.clone()))
            .or_default();
        s.requests += i.requests;
        s.prompt += i.prompt_tokens;
        s.cached += i.cached_tokens;
        s.completion += i.completion_tokens;
        s.reasoning += i.reasoning_tokens;
        s.total += i.total_tokens;
        s.without_usage += i.requests_without_usage;
    }
    out
}

/// Every `c.<field>` the `sql` block of docs/chargeback.md reads.
fn sql_fields() -> HashSet<String> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/chargeback.md"),
    )
    .unwrap();
    let block = doc
        .split("```sql\n")
        .nth(1)
        .expect("docs/chargeback.md has a sql block")
        .split("```")
        .next()
        .unwrap();
    block
        .match_indices("c.")
        .filter(|(i, _)| *i == 0 || !block.as_bytes()[i - 1].is_ascii_alphanumeric())
        .map(|(i, _)| {
            block[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

fn key(caller: &str, user: &str, deployment: &str) -> (String, String, String) {
    (caller.into(), user.into(), deployment.into())
}

#[tokio::test]
async fn usage_summaries_land_with_the_exact_sums_of_the_answers() {
    let emu = Emu::start().await;
    let aoai = MockAoai::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = start(&emu, &aoai, dir.path(), vec![], &[]).await;

    // alice: two JSON answers and a stream that did not ask for usage (the handler asks)
    aoai.reply(chat_json(USAGE_A));
    for _ in 0..2 {
        let (status, _) = post(
            &app,
            IN_KEY,
            CHAT,
            r#"{"messages":[{"role":"user","content":"hi"}],"user":"alice"}"#,
        )
        .await;
        assert_eq!(status, 200);
    }
    aoai.reply(Reply::UsageStream(chunks(), USAGE_B.into()));
    let (status, text) = post(
        &app,
        IN_KEY,
        CHAT,
        r#"{"stream":true,"messages":[],"user":"alice"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(!text.contains("usage"), "the client's stream is unchanged");
    // one that opted out: asked all the same, and its stream unchanged too
    let (status, text) = post(
        &app,
        IN_KEY,
        CHAT,
        r#"{"stream":true,"stream_options":{"include_usage":false},"messages":[],"user":"alice"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(!text.contains("usage"), "the client's stream is unchanged");
    // one the handler cannot ask (AOAI would refuse or ignore the value): counted, usage unknown
    let (status, _) = post(
        &app,
        IN_KEY,
        CHAT,
        r#"{"stream":true,"stream_options":{"include_usage":"no"},"messages":[],"user":"alice"}"#,
    )
    .await;
    assert_eq!(status, 200);
    // bob, another caller: a stream that asked for usage itself
    let (status, text) = post(
        &app,
        OTHER_KEY,
        CHAT,
        r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[],"user":"bob"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(text.contains(r#""total_tokens":25"#));
    // v1 (no deployment in the path): the body's model names it
    aoai.reply(Reply::Fixed(
        200,
        vec![("content-type", "application/json")],
        r#"{"id":"r","object":"response","output":[],"usage":{"input_tokens":9,"output_tokens":4,"total_tokens":13}}"#,
    ));
    let (status, _) = post(
        &app,
        IN_KEY,
        RESPONSES,
        r#"{"model":"gpt-4o-mini","input":"x","user":"alice"}"#,
    )
    .await;
    assert_eq!(status, 200);
    // an error answer is not billed and adds nothing
    aoai.reply(Reply::Fixed(
        400,
        vec![("content-type", "application/json")],
        r#"{"error":{"code":"x","message":"y"}}"#,
    ));
    let (status, _) = post(&app, IN_KEY, CHAT, r#"{"messages":[],"user":"alice"}"#).await;
    assert_eq!(status, 400);

    counted(&app, 7).await;
    let usage = app.state.usage.as_ref().unwrap();
    let report = usage.flush(Duration::from_secs(30)).await;
    assert!(report.completed, "{report:?} {:?}", usage.log().stats());
    assert_eq!(usage.summaries().open_records(), 0);

    let items = stored(&emu).await;
    let got = sums(&items);
    let want: BTreeMap<_, _> = [
        (
            key("default", "alice", "gpt-4o"),
            Sums {
                requests: 5,
                prompt: 62,
                cached: 6,
                completion: 24,
                reasoning: 4,
                total: 86,
                without_usage: 1,
            },
        ),
        (
            key("default", "alice", "gpt-4o-mini"),
            Sums {
                requests: 1,
                prompt: 9,
                completion: 4,
                total: 13,
                ..Sums::default()
            },
        ),
        (
            key("other-app", "bob", "gpt-4o"),
            Sums {
                requests: 1,
                prompt: 20,
                completion: 5,
                total: 25,
                ..Sums::default()
            },
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want);
    // stored under its caller (partition key /caller), named by instance and run
    let one = &items[0];
    let c = emu.container(USAGE).await;
    let back: UsageSummary = c
        .read_item(one.caller.clone(), &one.id, None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(&back, one);
    assert!(
        one.id.starts_with(&format!("inst-1.{}.", one.run)),
        "{}",
        one.id
    );
    assert!(items
        .iter()
        .all(|i| i.instance == "inst-1" && i.minute.ends_with(":00Z")));
    // the Cosmos SQL query of docs/chargeback.md reads fields the records have
    let stored_fields: HashSet<String> = serde_json::to_value(one)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let read = sql_fields();
    assert!(read.len() >= 10, "{read:?}");
    let missing: Vec<_> = read.difference(&stored_fields).collect();
    assert!(missing.is_empty(), "the query reads {missing:?}");
    // shipped, then the journal is emptied
    assert!(!dir.path().join("usage-journal.jsonl.shipping").exists());
    assert_eq!(
        std::fs::metadata(dir.path().join("usage-journal.jsonl"))
            .map(|m| m.len())
            .unwrap_or(0),
        0
    );
}

#[tokio::test]
async fn a_usage_outage_journals_and_the_next_start_ships_without_overwriting() {
    let emu = Emu::start().await;
    let aoai = MockAoai::start().await;
    let dir = tempfile::tempdir().unwrap();
    // the usage container is down; the abuse log's is not
    let outage = Arc::new(
        FaultInjectionRuleBuilder::new(
            "usage-down",
            FaultInjectionResultBuilder::new()
                .with_error(FaultInjectionErrorType::ServiceUnavailable)
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .with_container_id("/colls/usage")
                .build(),
        )
        .build(),
    );
    let gate = [("USER_CHECK", "present")];
    let app = start(&emu, &aoai, dir.path(), vec![outage.clone()], &gate).await;
    aoai.reply(chat_json(USAGE_A));
    for _ in 0..2 {
        let (status, _) = post(&app, IN_KEY, CHAT, r#"{"messages":[],"user":"alice"}"#).await;
        assert_eq!(status, 200);
    }
    // a refusal meanwhile: its abuse record reaches Cosmos DB despite the usage outage
    let (status, _) = post(&app, IN_KEY, CHAT, r#"{"messages":[]}"#).await;
    assert_eq!(status, 400);
    counted(&app, 2).await;
    let usage = app.state.usage.as_ref().unwrap();
    let report = usage.flush(Duration::from_millis(1500)).await;
    assert!(!report.completed && report.pending_bytes > 0, "{report:?}");
    assert!(outage.hit_count() > 0, "the shipper tried");
    assert!(app.state.audit.flush(PATIENCE).await.completed);
    assert_eq!(emu.abuse_count().await, 1);
    assert!(stored(&emu).await.is_empty());
    // SIGTERM: what is left stays in the journal
    let report = app.state.shutdown().await;
    assert!(report.completed, "the abuse log is empty");
    let first_run = usage.summaries().run().to_string();
    let journaled = std::fs::read_to_string(dir.path().join("usage-journal.jsonl"))
        .unwrap_or_default()
        + &std::fs::read_to_string(dir.path().join("usage-journal.jsonl.shipping"))
            .unwrap_or_default();
    assert!(journaled.contains(&first_run), "{journaled}");
    drop(app);

    // the next start (Cosmos back) ships what the first left, and adds its own records: same
    // instance, likely the same minute, never the same id
    outage.disable();
    let app = start(&emu, &aoai, dir.path(), vec![], &gate).await;
    let (status, _) = post(&app, IN_KEY, CHAT, r#"{"messages":[],"user":"alice"}"#).await;
    assert_eq!(status, 200);
    counted(&app, 1).await;
    let usage = app.state.usage.as_ref().unwrap();
    assert_ne!(usage.summaries().run(), first_run);
    assert!(usage.flush(PATIENCE).await.completed);
    let items = stored(&emu).await;
    let runs: HashSet<&str> = items.iter().map(|i| i.run.as_str()).collect();
    assert_eq!(runs.len(), 2, "{items:?}");
    assert_eq!(
        sums(&items)[&key("default", "alice", "gpt-4o")],
        Sums {
            requests: 3,
            prompt: 33,
            cached: 9,
            completion: 21,
            reasoning: 6,
            total: 54,
            without_usage: 0,
        }
    );
    app.state.shutdown().await;
}

/// Measurement (run with `--ignored --nocapture`): abuse records' durability latency with the
/// usage log idle and with it journaling and shipping summaries in bulk at the same time. The
/// two logs have separate journals, threads and shippers; the numbers show it. Asserts only that
/// every record is durable and shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn abuse_latency_with_and_without_usage_traffic() {
    use aoai_fwdproxy::pipeline::audit::{AbuseRecord, Audit, AuditSettings, Reason};
    use aoai_fwdproxy::settings::Source;
    use std::time::Instant;

    // 0: usage idle; 1: usage journaled only; 2: usage journaled and shipped (the in-process
    // emulator then serves its upserts on the test's own two runtime threads)
    for busy in [0u8, 1, 2] {
        let emu = Emu::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut pairs = emu.pairs();
        pairs.push((
            "AUDIT_SPOOL_PATH".into(),
            dir.path().join("abuse-journal.jsonl").display().to_string(),
        ));
        let settings = AuditSettings::from_source(&Source::from_map(pairs)).unwrap();
        let audit = Arc::new(Audit::start(settings, Some(emu.account(vec![]))).unwrap());
        let usage = Arc::new(if busy == 1 {
            aoai_fwdproxy::pipeline::audit::Durable::<UsageSummary>::start(
                &dir.path().join("usage-journal.jsonl"),
                "AUDIT_SPOOL_PATH",
                audit.settings(),
                None,
            )
            .unwrap()
        } else {
            audit.companion::<UsageSummary>(USAGE).unwrap().unwrap()
        });
        let traffic = (busy > 0).then(|| {
            let usage = usage.clone();
            tokio::spawn(async move {
                for batch in 0..20u64 {
                    let records: Vec<UsageSummary> = (0..1000u64)
                        .map(|i| UsageSummary {
                            id: format!("bench.{batch}.{i}"),
                            minute: "2026-11-29T00:00:00Z".into(),
                            day: "2026-11-29".into(),
                            caller: format!("c{}", i % 10),
                            user: format!("user-{i}"),
                            deployment: "gpt-4o".into(),
                            instance: "bench".into(),
                            run: "r".into(),
                            requests: 1,
                            prompt_tokens: i,
                            cached_tokens: 0,
                            completion_tokens: 1,
                            reasoning_tokens: 0,
                            total_tokens: i + 1,
                            requests_without_usage: 0,
                            estimated_tokens: 0,
                        })
                        .collect();
                    assert_eq!(usage.append_all(records).await, 0);
                }
            })
        });
        let n = 2000;
        let mut latencies = Vec::with_capacity(n);
        let started = Instant::now();
        for group in (0..n).collect::<Vec<_>>().chunks(200) {
            let calls: Vec<_> = group
                .iter()
                .map(|&i| {
                    let audit = audit.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        audit
                            .record(AbuseRecord {
                                id: format!("bench-{i}"),
                                timestamp: "2026-11-29T00:00:00Z".into(),
                                request_id: format!("bench-{i}"),
                                caller: "default".into(),
                                user: format!("u{}", i % 7),
                                deployment: Some("gpt-4o".into()),
                                operation: "chat_completions".into(),
                                reason: Reason::ContentFiltered,
                                details: serde_json::json!({}),
                                prompt: Some("x".repeat(200)),
                                client_ip: None,
                            })
                            .await
                            .unwrap();
                        t.elapsed()
                    })
                })
                .collect();
            for c in calls {
                latencies.push(c.await.unwrap());
            }
        }
        let all = started.elapsed();
        if let Some(t) = traffic {
            t.await.unwrap();
        }
        assert!(audit.flush(Duration::from_secs(300)).await.completed);
        assert_eq!(emu.abuse_count().await, n);
        latencies.sort();
        let pct = |p: f64| latencies[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1000.0;
        eprintln!(
            "usage traffic {busy}: {n} abuse records durable in {:.0} ms ({} fsyncs), record() p50 {:.2} ms p99 {:.2} ms max {:.2} ms; usage {:?}",
            all.as_secs_f64() * 1000.0,
            audit.commits(),
            pct(0.5),
            pct(0.99),
            pct(1.0),
            usage.stats()
        );
        if busy > 0 {
            assert_eq!(usage.stats().journaled, 20_000);
        }
        usage.shutdown(Duration::from_secs(5)).await;
        audit.shutdown(Duration::from_secs(5)).await;
    }
}
