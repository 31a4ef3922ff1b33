//! The abuse log in Cosmos DB loses nothing and duplicates nothing: the SDK's in-memory
//! emulator behind the handler's journal and shipper, with the SDK's fault injection below its
//! retries — 429 storms, 503 outages, timeouts after commit, 401s after a key rotation, a
//! restart with a journal left behind (torn lines included) — and at the end the records in
//! Cosmos are exactly the records made durable. Every `record` call returns only once its
//! record is on disk (or acknowledged by Cosmos), which is what the client's answer waits for.

use crate::support;

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
        prompt: Some(format!("{PROMPT_MARKER} #{n} ünïcödé ✓")),
        client_ip: Some("203.0.113.7".into()),
    }
}

fn settings(emu: &Emu, dir: &Path, extra: &[(&str, &str)]) -> AuditSettings {
    let mut pairs = emu.pairs();
    pairs.push((
        "AUDIT_SPOOL_PATH".into(),
        dir.join("journal.jsonl").display().to_string(),
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

/// Record `range` with up to 256 callers at a time, as concurrent refusals would; every call
/// must succeed (the record is durable when it returns).
async fn record_all(audit: &Arc<Audit>, range: std::ops::Range<usize>, tag: &'static str) {
    let ids: Vec<usize> = range.collect();
    for group in ids.chunks(256) {
        let calls: Vec<_> = group
            .iter()
            .map(|&i| {
                let audit = audit.clone();
                tokio::spawn(async move { audit.record(record(i, tag)).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().expect("record made durable");
        }
    }
}

/// Request ids of the records in the journal files (active and shipping), each once.
fn on_disk(dir: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for name in ["journal.jsonl", "journal.jsonl.shipping"] {
        let bytes = std::fs::read(dir.join(name)).unwrap_or_default();
        for line in bytes.split(|b| *b == b'\n') {
            if let Ok(r) = serde_json::from_slice::<AbuseRecord>(line) {
                ids.push(r.request_id);
            }
        }
    }
    ids
}

fn lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|t| t.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count())
        .unwrap_or(0)
}

fn journal_empty(dir: &Path) -> bool {
    lines(&dir.join("journal.jsonl")) == 0 && !dir.join("journal.jsonl.shipping").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_cosmos_gets_every_record_once_and_the_journal_empties() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit =
        Arc::new(Audit::start(settings(&emu, dir.path(), &[]), Some(emu.account(vec![]))).unwrap());
    let n = 2000;
    let started = Instant::now();
    record_all(&audit, 0..n, "healthy").await;
    let durable = started.elapsed();
    let report = audit.shutdown(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert!(report.completed, "{report:?}");
    let stats = audit.stats();
    assert_eq!(stats.submitted, n as u64);
    assert_eq!(stats.journaled, n as u64, "{stats:?}");
    assert_eq!(stats.shipped, n as u64, "{stats:?}");
    assert_eq!(stats.failed, 0);
    assert_eq!(emu.abuse_count().await, n);
    assert!(journal_empty(dir.path()), "shipped records are trimmed");
    assert!(
        audit.commits() < n as u64,
        "group commit: {} fsyncs for {n} records",
        audit.commits()
    );
    eprintln!(
        "{n} records durable in {:.0} ms ({} fsyncs), all in Cosmos after {:.0} ms",
        durable.as_secs_f64() * 1000.0,
        audit.commits(),
        elapsed.as_secs_f64() * 1000.0,
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
    // After shutdown a late record is still made durable: it waits in the journal.
    audit.record(record(n, "healthy")).await.unwrap();
    assert_eq!(on_disk(dir.path()), ["healthy-req-02000"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    let audit = Arc::new(
        Audit::start(
            settings(&emu, dir.path(), &[("AUDIT_MAX_ATTEMPTS", "8")]),
            Some(emu.account(vec![throttle.clone(), unavailable.clone()])),
        )
        .unwrap(),
    );
    let n = 1200;
    record_all(&audit, 0..n, "storm").await;
    let report = audit.flush(Duration::from_secs(120)).await;
    assert!(report.completed, "{report:?} {:?}", audit.stats());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    let audit = Arc::new(
        Audit::start(
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
        .unwrap(),
    );
    let n = 500;
    record_all(&audit, 0..n, "timeout").await;
    let report = audit.flush(Duration::from_secs(120)).await;
    assert!(report.completed, "{:?}", audit.stats());
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
async fn an_outage_keeps_records_in_the_journal_and_ships_them_when_cosmos_is_back() {
    let (logs, _guard) = support::logs::capture();
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let outage = rule("outage", FaultInjectionErrorType::ServiceUnavailable, None);
    let audit = Arc::new(
        Audit::start(
            settings(&emu, dir.path(), &[("AUDIT_MAX_ATTEMPTS", "2")]),
            Some(emu.account(vec![outage.clone()])),
        )
        .unwrap(),
    );
    let n = 300;
    record_all(&audit, 0..n, "outage").await;
    // Durable the moment `record` returned: on disk, one line per record, none in Cosmos.
    let mut ids = on_disk(dir.path());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    assert!(
        eventually(Duration::from_secs(30), async || logs
            .text()
            .contains("Cosmos DB unavailable"))
        .await,
        "the shipper tried, gave up for now, and a log line says so"
    );
    assert_eq!(emu.abuse_count().await, 0);

    // Cosmos comes back: the journal is shipped, then trimmed.
    outage.disable();
    let started = Instant::now();
    let report = audit.flush(Duration::from_secs(60)).await;
    assert!(report.completed, "{report:?} {:?}", audit.stats());
    let ship_ms = started.elapsed().as_millis();
    assert_eq!(emu.abuse_count().await, n);
    assert!(journal_empty(dir.path()));
    // New records flow to Cosmos again.
    audit.record(record(n, "outage")).await.unwrap();
    assert!(audit.shutdown(Duration::from_secs(10)).await.completed);
    assert_eq!(emu.abuse_count().await, n + 1);
    eprintln!(
        "outage: {n} journaled records shipped in ~{ship_ms} ms (includes the pause); {:?}",
        audit.stats()
    );

    let text = logs.text();
    assert!(text.contains("shipping resumed"));
    assert!(!text.contains(PROMPT_MARKER), "no prompt text in logs");
    assert!(!text.contains(KEY), "no key in logs");
}

#[tokio::test]
async fn a_restart_ships_what_the_last_process_left_exactly_once_past_torn_lines() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();

    // First life: 50 records reach Cosmos, then Cosmos goes down and 150 wait in the journal.
    let outage = rule(
        "outage-first-life",
        FaultInjectionErrorType::ServiceUnavailable,
        None,
    );
    outage.disable();
    let first = Arc::new(
        Audit::start(
            settings(&emu, dir.path(), &[("AUDIT_MAX_ATTEMPTS", "2")]),
            Some(emu.account(vec![outage.clone()])),
        )
        .unwrap(),
    );
    record_all(&first, 0..50, "restart").await;
    assert!(first.flush(Duration::from_secs(30)).await.completed);
    assert_eq!(emu.abuse_count().await, 50);
    outage.enable();
    record_all(&first, 50..200, "restart").await;
    let report = first.shutdown(Duration::from_millis(300)).await;
    assert!(!report.completed && report.pending_bytes > 0, "{report:?}");
    drop(first);

    // What a crash leaves: a half-shipped file holding records already in Cosmos (upserted
    // again under the same ids), a torn line in its middle with a record glued onto it, and a
    // last line of the journal cut inside a multi-byte character.
    let shipping = dir.path().join("journal.jsonl.shipping");
    let mut half = Vec::new();
    if let Ok(b) = std::fs::read(&shipping) {
        half = b;
    }
    for i in 40..60 {
        let mut l = serde_json::to_vec(&record(i, "restart")).unwrap();
        if i == 45 {
            l.truncate(l.len() / 2); // torn: record 46 is glued onto it
        } else {
            l.push(b'\n');
        }
        half.extend_from_slice(&l);
    }
    std::fs::write(&shipping, half).unwrap();
    let torn = serde_json::to_vec(&record(999, "torn")).unwrap();
    let cut = torn.windows(2).position(|w| w == "ü".as_bytes()).unwrap() + 1;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.path().join("journal.jsonl"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, &torn[..cut]))
        .unwrap();
    assert_eq!(emu.abuse_count().await, 50);

    // Second life, Cosmos healthy: the journal is shipped at start.
    let started = Instant::now();
    let second =
        Arc::new(Audit::start(settings(&emu, dir.path(), &[]), Some(emu.account(vec![]))).unwrap());
    let report = second.flush(Duration::from_secs(60)).await;
    assert!(report.completed, "{report:?} {:?}", second.stats());
    let replay_ms = started.elapsed().as_millis();
    // and new records keep going after the torn tail
    second.record(record(200, "restart")).await.unwrap();
    assert!(second.shutdown(Duration::from_secs(10)).await.completed);
    let (ids, dup) = emu.abuse_ids().await;
    assert!(!dup);
    assert_eq!(ids.len(), 201, "exactly the durable records");
    assert!(!ids.iter().any(|i| i.starts_with("torn")));
    // The torn pieces are kept for a person, not dropped silently.
    let rejected = std::fs::read(dir.path().join("journal.jsonl.rejected")).unwrap();
    assert!(rejected.windows(5).any(|w| w == b"torn-"));
    assert!(rejected.windows(17).any(|w| w == b"restart-req-00045"));
    assert_eq!(second.stats().rejected, 1, "the torn middle line");
    eprintln!("restart: journal of 150 + 20 shipped at start in {replay_ms} ms");
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
    let audit = Arc::new(
        Audit::start(
            settings(&emu, dir.path(), &[]),
            Some(emu.account(vec![bad_request])),
        )
        .unwrap(),
    );
    record_all(&audit, 0..10, "reject").await;
    assert!(audit.shutdown(Duration::from_secs(30)).await.completed);
    let stats = audit.stats();
    assert_eq!(stats.rejected, 1, "{stats:?}");
    assert_eq!(stats.shipped, 9);
    assert_eq!(emu.abuse_count().await, 9);
    assert_eq!(lines(&dir.path().join("journal.jsonl.rejected")), 1);
}

#[tokio::test]
async fn without_cosmos_the_journal_is_the_json_lines_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("abuse.jsonl");
    let settings = AuditSettings::from_source(&Source::from_map([(
        "AUDIT_LOG_PATH",
        log.display().to_string(),
    )]))
    .unwrap();
    assert!(settings.cosmos.is_none());
    let audit = Arc::new(Audit::start(settings, None).unwrap());
    record_all(&audit, 0..5, "file").await;
    let report = audit.shutdown(Duration::from_secs(1)).await;
    assert!(report.completed);
    let text = std::fs::read_to_string(&log).unwrap();
    let back: Vec<AbuseRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back.len(), 5);
    assert!(back.contains(&record(2, "file")));
    assert_eq!(audit.stats().journaled, 5);
}

#[tokio::test]
async fn a_401_from_cosmos_re_reads_the_key_from_key_vault() {
    use aoai_fwdproxy::clients::cosmos::CosmosAccount;
    use aoai_fwdproxy::clients::identity::{IdentitySettings, TokenSource};
    use aoai_fwdproxy::clients::keyvault::{SecretUri, VaultSecret};
    use azure_core::http::{ClientOptions, Transport};
    use azure_security_keyvault_secrets::SecretClientOptions;
    use support::keyvault_stub::KeyVaultStub;

    let vault = KeyVaultStub::start().await;
    vault.put("cosmos-key", KEY);
    support::mi_stub::stub();
    let mi = TokenSource::managed_identity(&IdentitySettings {
        client_id: Some("c05d0000-0000-0000-0000-00000000c05d".into()),
    })
    .unwrap();
    let uri = SecretUri::parse(
        "COSMOS_KEY_SECRET_URI",
        &format!("{}/secrets/cosmos-key", vault.url),
    )
    .unwrap();
    let options = SecretClientOptions {
        client_options: ClientOptions {
            transport: Some(Transport::new(Arc::new(vault.client()))),
            ..Default::default()
        },
        verify_challenge_resource: Some(false),
        ..Default::default()
    };
    let secret = VaultSecret::fetch_with(&uri, mi.credential(), options)
        .await
        .unwrap();
    secret.set_min_refresh_gap(Duration::ZERO);
    let emu = Emu::start().await;
    // The key was rotated in Key Vault; Cosmos answers the old one with 401 (twice).
    vault.put("cosmos-key", "cm90YXRlZC1rZXk=");
    let unauthorized = Arc::new(
        FaultInjectionRuleBuilder::new(
            "old-key",
            FaultInjectionResultBuilder::new()
                .with_custom_response(CustomResponseBuilder::new(StatusCode::Unauthorized).build())
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::UpsertItem)
                .build(),
        )
        .with_hit_limit(2)
        .build(),
    );
    let factory = emu.account(vec![unauthorized.clone()]).builder_factory();
    let account = Arc::new(
        CosmosAccount::new(emu.settings(), None)
            .unwrap()
            .with_builder(factory)
            .with_vault_key(secret.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    let served = vault.served();
    let audit = Arc::new(Audit::start(settings(&emu, dir.path(), &[]), Some(account)).unwrap());
    record_all(&audit, 0..3, "rotated").await;
    assert!(audit.shutdown(Duration::from_secs(30)).await.completed);
    assert_eq!(unauthorized.hit_count(), 2);
    assert!(vault.served() > served, "the 401 made the key be re-read");
    assert_eq!(secret.current().expose(), "cm90YXRlZC1rZXk=");
    assert_eq!(emu.abuse_count().await, 3);
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
async fn sigterm_during_an_outage_returns_in_time_and_the_next_start_ships_everything() {
    let emu = Emu::start().await;
    let dir = tempfile::tempdir().unwrap();
    let outage = rule(
        "outage-at-sigterm",
        FaultInjectionErrorType::ServiceUnavailable,
        None,
    );
    // Many tries with long waits: the shipper is deep in retries when SIGTERM comes.
    let audit = Arc::new(
        Audit::start(
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
        .unwrap(),
    );
    record_all(&audit, 0..100, "sigterm").await;
    assert!(eventually(Duration::from_secs(10), async || outage.hit_count() > 0).await);
    let started = Instant::now();
    let report = audit.shutdown(Duration::from_secs(2)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!report.completed, "{report:?}");
    let stats = audit.stats();
    assert_eq!(stats.failed, 0);
    assert_eq!(stats.journaled, 100, "{stats:?}");
    let mut ids = on_disk(dir.path());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100);
    drop(audit);

    outage.disable();
    let next =
        Arc::new(Audit::start(settings(&emu, dir.path(), &[]), Some(emu.account(vec![]))).unwrap());
    assert!(next.flush(Duration::from_secs(30)).await.completed);
    next.shutdown(Duration::from_secs(5)).await;
    assert_eq!(emu.abuse_count().await, 100);
}
