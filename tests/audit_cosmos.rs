//! The abuse log in Cosmos DB loses nothing and duplicates nothing: the SDK's in-memory
//! emulator behind the handler's writer, with the SDK's fault injection below its retries —
//! 429 storms, 503 outages, timeouts after commit, a full queue, a restart with a non-empty
//! spool — and at the end the records in Cosmos are exactly the records submitted.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aoai_fwdproxy::pipeline::audit::{AbuseRecord, Audit, AuditSettings, Reason};
use aoai_fwdproxy::settings::Source;
use azure_core::http::StatusCode;
use azure_data_cosmos::fault_injection::{
    CustomResponseBuilder, FaultInjectionConditionBuilder, FaultInjectionErrorType,
    FaultInjectionResultBuilder, FaultInjectionRule, FaultInjectionRuleBuilder, FaultOperationType,
};
use support::cosmos_emu::{Emu, KEY};

const PROMPT_MARKER: &str = "PROMPT-TEXT-THAT-MUST-NOT-BE-LOGGED";

fn record(n: usize, tag: &str) -> AbuseRecord {
    let request_id = format!("{tag}-req-{n:05}");
    AbuseRecord {
        id: format!("{request_id}:content_filtered"),
        timestamp: "2026-11-01T12:00:00Z".into(),
        request_id,
        caller: "default".into(),
        user: format!("user-{}", n % 7),
        deployment: Some("gpt-4o".into()),
        operation: "chat_completions".into(),
        reason: Reason::ContentFiltered,
        details: serde_json::json!({"categories": [{"category": "Hate", "severity": 4}]}),
        prompt: Some(format!("{PROMPT_MARKER} #{n}")),
        client_ip: Some("203.0.113.7".into()),
    }
}

fn settings(emu: &Emu, dir: &Path, extra: &[(&str, &str)]) -> AuditSettings {
    let mut pairs = emu.pairs();
    pairs.push((
        "AUDIT_SPOOL_PATH".into(),
        dir.join("spool.jsonl").display().to_string(),
    ));
    pairs.push((
        "AUDIT_LOG_PATH".into(),
        dir.join("log.jsonl").display().to_string(),
    ));
    pairs.push(("AUDIT_CAPTURE_PROMPT".into(), "true".into()));
    pairs.push(("AUDIT_RETRY_BASE_MS".into(), "20".into()));
    pairs.push(("AUDIT_REPLAY_INTERVAL_MS".into(), "200".into()));
    for (k, v) in extra {
        pairs.retain(|(n, _)| n != k);
        pairs.push((k.to_string(), v.to_string()));
    }
    AuditSettings::from_source(&Source::from_map(pairs)).unwrap()
}

fn rule(
    id: &str,
    error: FaultInjectionErrorType,
    op: Option<FaultOperationType>,
) -> Arc<FaultInjectionRule> {
    let result = FaultInjectionResultBuilder::new().with_error(error).build();
    let mut b = FaultInjectionRuleBuilder::new(id, result);
    if let Some(op) = op {
        b = b.with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(op)
                .build(),
        );
    }
    Arc::new(b.build())
}

/// Poll `check` every 50 ms for at most `limit`.
async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_healthy_cosmos_gets_every_record_once_and_sigterm_drains_the_queue() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::start(settings(&emu, dir.path(), &[]), Some(emu.account(vec![]))).unwrap();
    let n = 2000;
    let started = Instant::now();
    for i in 0..n {
        audit.submit(record(i, "healthy"));
    }
    let submit_us = started.elapsed().as_micros() as f64 / n as f64;
    let report = audit.shutdown(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert!(report.completed);
    let stats = audit.stats();
    assert_eq!(stats.submitted, n as u64);
    assert_eq!(stats.written, n as u64, "{stats:?}");
    assert_eq!(stats.spooled, 0);
    assert_eq!(emu.abuse_count().await, n);
    eprintln!(
        "writer throughput: {n} records in {:.0} ms = {:.0} records/s (submit {submit_us:.1} µs each)",
        elapsed.as_secs_f64() * 1000.0,
        n as f64 / elapsed.as_secs_f64()
    );
    // The stored item is the record, partition key /user.
    let stored: AbuseRecord = emu
        .container("abuse-log")
        .await
        .read_item("user-3", "healthy-req-00010:content_filtered", None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(stored, record(10, "healthy"));
    // After shutdown, a late record is not lost: it goes to the spool.
    audit.submit(record(n, "healthy"));
    assert_eq!(lines(&dir.path().join("spool.jsonl")), 1);
}

#[tokio::test]
async fn a_429_storm_and_503s_are_retried_without_loss_or_duplicates() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    // First match wins among rules: a storm where every other upsert is throttled (with a
    // retry-after), then, once its 400 hits are spent, 503s on one upsert in five.
    let throttle = Arc::new(
        FaultInjectionRuleBuilder::new(
            "storm-429",
            FaultInjectionResultBuilder::new()
                .with_custom_response(
                    CustomResponseBuilder::new(StatusCode::TooManyRequests)
                        .with_header("x-ms-retry-after-ms", "5")
                        .with_sub_status(3200)
                        .build(),
                )
                .with_probability(0.5)
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .build(),
        )
        .with_hit_limit(400)
        .build(),
    );
    let unavailable = Arc::new(
        FaultInjectionRuleBuilder::new(
            "some-503",
            FaultInjectionResultBuilder::new()
                .with_error(FaultInjectionErrorType::ServiceUnavailable)
                .with_probability(0.2)
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .build(),
        )
        .with_hit_limit(300)
        .build(),
    );
    let audit = Audit::start(
        settings(&emu, dir.path(), &[("AUDIT_MAX_ATTEMPTS", "8")]),
        Some(emu.account(vec![throttle.clone(), unavailable.clone()])),
    )
    .unwrap();
    let n = 1200;
    for i in 0..n {
        audit.submit(record(i, "storm"));
    }
    audit.flush(Duration::from_secs(120)).await;
    // Whatever had to be spooled is replayed: wait for the spool to empty.
    assert!(
        eventually(Duration::from_secs(60), async || emu.abuse_count().await
            == n)
        .await,
        "stored {} of {n}; {:?}",
        emu.abuse_count().await,
        audit.stats()
    );
    audit.shutdown(Duration::from_secs(10)).await;
    assert!(
        throttle.hit_count() > 50,
        "the storm happened: {}",
        throttle.hit_count()
    );
    assert!(
        unavailable.hit_count() > 10,
        "503s happened: {}",
        unavailable.hit_count()
    );
    let (ids, dup) = emu.abuse_ids().await;
    assert!(!dup);
    assert_eq!(ids.len(), n);
    eprintln!(
        "429 storm: {} throttled, {} 503s, {:?}",
        throttle.hit_count(),
        unavailable.hit_count(),
        audit.stats()
    );
}

#[tokio::test]
async fn timeouts_after_the_service_committed_never_duplicate() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The service commits, then the answer is lost: the writer tries again with the same id.
    let lost_answers = Arc::new(
        FaultInjectionRuleBuilder::new(
            "timeout-after-commit",
            FaultInjectionResultBuilder::new()
                .with_error(FaultInjectionErrorType::ResponseTimeoutAfterService)
                .with_probability(0.3)
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .build(),
        )
        .with_hit_limit(200)
        .build(),
    );
    // Some answers are slower than AUDIT_WRITE_TIMEOUT_MS: the writer gives up on them and
    // tries again.
    let slow = Arc::new(
        FaultInjectionRuleBuilder::new(
            "slow",
            FaultInjectionResultBuilder::new()
                .with_delay(Duration::from_millis(1500))
                .with_probability(0.1)
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .build(),
        )
        .with_hit_limit(20)
        .build(),
    );
    let audit = Audit::start(
        settings(
            &emu,
            dir.path(),
            &[
                ("AUDIT_WRITE_TIMEOUT_MS", "400"),
                ("AUDIT_MAX_ATTEMPTS", "10"),
            ],
        ),
        // First match wins: the slow answers first (20 of them), then the lost answers.
        Some(emu.account(vec![slow.clone(), lost_answers.clone()])),
    )
    .unwrap();
    let n = 500;
    for i in 0..n {
        audit.submit(record(i, "timeout"));
    }
    audit.flush(Duration::from_secs(120)).await;
    assert!(
        eventually(Duration::from_secs(60), async || emu.abuse_count().await
            == n)
        .await,
        "{:?}",
        audit.stats()
    );
    audit.shutdown(Duration::from_secs(10)).await;
    assert!(
        lost_answers.hit_count() > 10,
        "{}",
        lost_answers.hit_count()
    );
    assert!(slow.hit_count() > 0);
    assert!(audit.stats().retries > 0, "{:?}", audit.stats());
    assert_eq!(emu.abuse_count().await, n);
}

#[tokio::test]
async fn an_outage_spools_durably_and_the_spool_is_replayed_when_cosmos_is_back() {
    let (logs, _guard) = support::logs::capture();
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let outage = rule("outage", FaultInjectionErrorType::ServiceUnavailable, None);
    let audit = Audit::start(
        settings(&emu, dir.path(), &[("AUDIT_MAX_ATTEMPTS", "2")]),
        Some(emu.account(vec![outage.clone()])),
    )
    .unwrap();
    let n = 300;
    for i in 0..n {
        audit.submit(record(i, "outage"));
    }
    let spool = dir.path().join("spool.jsonl");
    assert!(
        eventually(Duration::from_secs(60), async || audit.stats().spooled
            == n as u64)
        .await,
        "{:?}",
        audit.stats()
    );
    // Durable: on disk, one JSON line per record, none in Cosmos.
    assert_eq!(
        lines(&spool) + lines(&dir.path().join("spool.jsonl.replaying")),
        n
    );
    assert_eq!(emu.abuse_count().await, 0);

    // Cosmos comes back: the spool is replayed, then removed.
    outage.disable();
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(60), async || audit.stats().replayed
            == n as u64)
        .await,
        "{:?}",
        audit.stats()
    );
    let replay_ms = started.elapsed().as_millis();
    assert_eq!(emu.abuse_count().await, n);
    assert!(
        eventually(Duration::from_secs(5), async || lines(&spool) == 0
            && !dir.path().join("spool.jsonl.replaying").exists())
        .await
    );
    // New records flow straight to Cosmos again.
    audit.submit(record(n, "outage"));
    audit.shutdown(Duration::from_secs(10)).await;
    assert_eq!(emu.abuse_count().await, n + 1);
    eprintln!(
        "outage: {n} spooled records replayed in ~{replay_ms} ms (includes the probe wait); {:?}",
        audit.stats()
    );

    let text = logs.text();
    assert!(text.contains("abuse records spooled"), "a log line says so");
    assert!(text.contains("spool replayed into Cosmos DB"));
    assert!(!text.contains(PROMPT_MARKER), "no prompt text in logs");
    assert!(!text.contains(KEY), "no key in logs");
}

#[tokio::test]
async fn a_restart_with_a_non_empty_spool_replays_it_at_start_exactly_once() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();

    // First life: 50 records reach Cosmos, then Cosmos goes down and 150 are spooled; SIGTERM.
    let outage = rule(
        "outage-first-life",
        FaultInjectionErrorType::ServiceUnavailable,
        None,
    );
    outage.disable();
    let first = Audit::start(
        settings(&emu, dir.path(), &[("AUDIT_MAX_ATTEMPTS", "2")]),
        Some(emu.account(vec![outage.clone()])),
    )
    .unwrap();
    for i in 0..50 {
        first.submit(record(i, "restart"));
    }
    first.flush(Duration::from_secs(30)).await;
    assert_eq!(emu.abuse_count().await, 50);
    outage.enable();
    for i in 50..200 {
        first.submit(record(i, "restart"));
    }
    let report = first.shutdown(Duration::from_secs(30)).await;
    assert!(report.completed);
    let stats = first.stats();
    assert_eq!(stats.written, 50);
    assert_eq!(stats.spooled, 150, "{stats:?}");
    drop(first);
    // A crash in the middle of an earlier replay: some of the written records are also in a
    // half-replayed file (they will be upserted again, under the same ids).
    let replaying = dir.path().join("spool.jsonl.replaying");
    let half: String = (40..60)
        .map(|i| serde_json::to_string(&record(i, "restart")).unwrap() + "\n")
        .collect();
    std::fs::write(&replaying, half).unwrap();
    // And a torn last line from a crash mid-append.
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("spool.jsonl"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"id\":\"torn"))
        .unwrap();
    assert_eq!(emu.abuse_count().await, 50);

    // Second life, Cosmos healthy: the spool is replayed at start.
    let started = Instant::now();
    let second = Audit::start(settings(&emu, dir.path(), &[]), Some(emu.account(vec![]))).unwrap();
    assert!(
        eventually(Duration::from_secs(60), async || emu.abuse_count().await
            == 200)
        .await,
        "{:?}",
        second.stats()
    );
    let replay_ms = started.elapsed().as_millis();
    assert!(
        eventually(Duration::from_secs(5), async || !replaying.exists()
            && lines(&dir.path().join("spool.jsonl")) == 0)
        .await
    );
    second.shutdown(Duration::from_secs(10)).await;
    let (ids, dup) = emu.abuse_ids().await;
    assert!(!dup);
    assert_eq!(ids.len(), 200, "exactly the submitted records");
    // The torn line is kept for a person, not dropped silently.
    let rejected = std::fs::read_to_string(dir.path().join("spool.jsonl.rejected")).unwrap();
    assert!(rejected.contains("torn"));
    eprintln!("restart: spool of 150 + 20 replayed at start in {replay_ms} ms");
}

#[tokio::test]
async fn a_full_queue_spools_at_once_and_nothing_is_lost() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let slow = Arc::new(
        FaultInjectionRuleBuilder::new(
            "slow-writes",
            FaultInjectionResultBuilder::new()
                .with_delay(Duration::from_millis(100))
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .build(),
        )
        .with_hit_limit(40)
        .build(),
    );
    let audit = Audit::start(
        settings(
            &emu,
            dir.path(),
            &[
                ("AUDIT_QUEUE_CAPACITY", "4"),
                ("AUDIT_WRITE_CONCURRENCY", "2"),
            ],
        ),
        Some(emu.account(vec![slow])),
    )
    .unwrap();
    let n = 200;
    let started = Instant::now();
    for i in 0..n {
        audit.submit(record(i, "full"));
    }
    // submit never waited for Cosmos, even with a queue of 4 and slow writes.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(audit.stats().spooled > 0, "{:?}", audit.stats());
    assert!(
        eventually(Duration::from_secs(60), async || emu.abuse_count().await
            == n)
        .await,
        "{:?}",
        audit.stats()
    );
    audit.shutdown(Duration::from_secs(10)).await;
    assert_eq!(emu.abuse_count().await, n);
}

#[tokio::test]
async fn a_record_cosmos_refuses_for_good_is_kept_in_the_rejected_file() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bad_request = Arc::new(
        FaultInjectionRuleBuilder::new(
            "one-400",
            FaultInjectionResultBuilder::new()
                .with_custom_response(CustomResponseBuilder::new(StatusCode::BadRequest).build())
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .build(),
        )
        .with_hit_limit(1)
        .build(),
    );
    let audit = Audit::start(
        settings(&emu, dir.path(), &[]),
        Some(emu.account(vec![bad_request])),
    )
    .unwrap();
    for i in 0..10 {
        audit.submit(record(i, "reject"));
    }
    audit.shutdown(Duration::from_secs(30)).await;
    let stats = audit.stats();
    assert_eq!(stats.rejected, 1, "{stats:?}");
    assert_eq!(stats.written, 9);
    assert_eq!(emu.abuse_count().await, 9);
    assert_eq!(lines(&dir.path().join("spool.jsonl.rejected")), 1);
}

#[tokio::test]
async fn without_cosmos_records_go_to_the_json_lines_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("abuse.jsonl");
    let settings = AuditSettings::from_source(&Source::from_map([(
        "AUDIT_LOG_PATH",
        log.display().to_string(),
    )]))
    .unwrap();
    assert!(settings.cosmos.is_none());
    let audit = Audit::start(settings, None).unwrap();
    for i in 0..5 {
        audit.submit(record(i, "file"));
    }
    let report = audit.shutdown(Duration::from_secs(1)).await;
    assert!(report.completed);
    let text = std::fs::read_to_string(&log).unwrap();
    let back: Vec<AbuseRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back.len(), 5);
    assert_eq!(back[2], record(2, "file"));
    assert_eq!(audit.stats().written, 5);
}

#[tokio::test]
async fn the_user_registry_lists_users_from_the_users_container() {
    let emu = Emu::start().await;
    let users = emu.container("users").await;
    for item in [
        serde_json::json!({"id": "alice"}),
        serde_json::json!({"id": "b-0001", "user": "bob@contoso.com"}),
        serde_json::json!({"id": "carol", "enabled": false}),
        serde_json::json!({"id": "dave", "enabled": true}),
    ] {
        let id = item["id"].as_str().unwrap().to_string();
        users
            .upsert_item(id.clone(), &id, &item, None)
            .await
            .unwrap();
    }
    let account = emu.account(vec![]);
    let listed = account.list_users().await.unwrap();
    let mut names: Vec<_> = listed.into_iter().collect();
    names.sort();
    assert_eq!(names, ["alice", "bob@contoso.com", "dave"]);

    // Cosmos down: an error (the registry keeps its last good copy), not an empty list.
    let down = emu.account(vec![rule(
        "users-down",
        FaultInjectionErrorType::ServiceUnavailable,
        None,
    )]);
    assert!(down.list_users().await.is_err());
}

#[tokio::test]
async fn the_registry_refresh_keeps_the_last_good_copy_while_cosmos_is_down() {
    use aoai_fwdproxy::clients::cosmos::{spawn_user_refresh, CosmosAccount};
    use std::collections::HashSet;
    use std::sync::Mutex;

    let emu = Emu::start().await;
    let users = emu.container("users").await;
    users
        .upsert_item("alice", "alice", &serde_json::json!({"id": "alice"}), None)
        .await
        .unwrap();
    let outage = rule(
        "registry-outage",
        FaultInjectionErrorType::ServiceUnavailable,
        None,
    );
    outage.disable();
    let mut pairs = emu.pairs();
    pairs.push(("COSMOS_USERS_REFRESH_SECS".into(), "1".into()));
    let cosmos =
        aoai_fwdproxy::clients::cosmos::CosmosSettings::from_source(&Source::from_map(pairs))
            .unwrap()
            .unwrap();
    let rules = vec![outage.clone()];
    let emu_account = emu.account(rules);
    // Same account wiring as Emu::account, with a 1 s refresh.
    let account = Arc::new(
        CosmosAccount::new(cosmos, None)
            .unwrap()
            .with_builder(emu_account.builder_factory()),
    );
    let seen: Arc<Mutex<Vec<HashSet<String>>>> = Arc::default();
    let sink = seen.clone();
    let task = spawn_user_refresh(account, move |u| sink.lock().unwrap().push(u));
    assert!(
        eventually(Duration::from_secs(10), async || seen.lock().unwrap().len()
            == 1)
        .await
    );
    assert!(seen.lock().unwrap()[0].contains("alice"));
    // Cosmos down: no empty copy is handed out.
    outage.enable();
    users
        .upsert_item("bob", "bob", &serde_json::json!({"id": "bob"}), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(seen.lock().unwrap().len(), 1, "failed reads apply nothing");
    // Back: bob appears.
    outage.disable();
    assert!(
        eventually(Duration::from_secs(10), async || seen
            .lock()
            .unwrap()
            .last()
            .is_some_and(|u| u.contains("bob")))
        .await
    );
    task.abort();
}

#[tokio::test]
async fn sigterm_during_an_outage_spools_what_is_being_retried_and_loses_nothing() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let outage = rule(
        "outage-at-sigterm",
        FaultInjectionErrorType::ServiceUnavailable,
        None,
    );
    // Many tries with long waits: the writer is deep in retries when SIGTERM comes.
    let audit = Audit::start(
        settings(
            &emu,
            dir.path(),
            &[
                ("AUDIT_MAX_ATTEMPTS", "50"),
                ("AUDIT_RETRY_BASE_MS", "1000"),
            ],
        ),
        Some(emu.account(vec![outage.clone()])),
    )
    .unwrap();
    for i in 0..100 {
        audit.submit(record(i, "sigterm"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let report = audit.shutdown(Duration::from_secs(2)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(report.completed, "{report:?}");
    let stats = audit.stats();
    assert_eq!(stats.lost, 0);
    assert_eq!(stats.spooled, 100, "{stats:?}");
    // On disk: in the spool, or in the file a replay had started on.
    let on_disk =
        lines(&dir.path().join("spool.jsonl")) + lines(&dir.path().join("spool.jsonl.replaying"));
    assert_eq!(on_disk, 100);
    drop(audit);

    outage.disable();
    let next = Audit::start(settings(&emu, dir.path(), &[]), Some(emu.account(vec![]))).unwrap();
    assert!(
        eventually(Duration::from_secs(30), async || emu.abuse_count().await
            == 100)
        .await
    );
    next.shutdown(Duration::from_secs(5)).await;
    assert_eq!(emu.abuse_count().await, 100);
}
