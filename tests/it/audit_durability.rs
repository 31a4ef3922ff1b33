//! The real `handler` binary, attacked the way the platform treats it: SIGKILL in the middle
//! of a refusal storm (file sink, and Cosmos DB unreachable), a journal another process holds,
//! the app root on a read-only mount, a disk that is full. The promise under test: **every
//! refusal a client got an answer for is on disk exactly once**, and, with Cosmos DB back, in
//! Cosmos exactly once.
//!
//! The Cosmos DB half of the restart runs in-process: the SDK's in-memory emulator lives in the
//! test process, where the real binary cannot reach it; the in-process `Audit` opens the very
//! journal the killed binary left, as the next start of the binary would.
//!
//! Mounts (read-only app root, a full disk) need root; without the permission those tests say
//! so loudly and stop.

use crate::common;
use crate::support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aoai_fwdproxy::pipeline::audit::{AbuseRecord, Audit, AuditSettings};
use aoai_fwdproxy::settings::Source;
use common::*;
use support::cosmos_emu::Emu;

const HANDLER: &str = env!("CARGO_BIN_EXE_handler");
const CHAT: &str = "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=2024-10-21";
/// A refusal: the user check is on and the body names no user.
const NO_USER_BODY: &str = r#"{"messages":[{"role":"user","content":"hi ✓"}]}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The handler with exactly `env` (plus PATH), its output in files under `logs`.
fn spawn(env: &[(&str, String)], cwd: &Path, logs: &Path, name: &str) -> Child {
    std::fs::create_dir_all(logs).unwrap();
    let mut cmd = Command::new(HANDLER);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(logs.join(format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(logs.join(format!("{name}.err"))).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn base_env(port: u16, upstream: &str, home: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("AOAI_HOSTNAME", upstream.to_string()),
        ("AOAI_INAPIKEY", IN_KEY.to_string()),
        ("AOAI_OUTAPIKEY", OUT_KEY.to_string()),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string()),
        ("USER_CHECK", "present".to_string()),
        ("HOME", home.display().to_string()),
        ("WEBSITE_INSTANCE_ID", "instance-a".to_string()),
    ]
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// Wait for health, or fail early when the process exited.
async fn wait_healthy(port: u16, child: &mut Child) {
    let c = client();
    let url = format!("http://127.0.0.1:{port}/api/FwdProxy/openai/deployments/health/check");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = c.get(&url).send().await {
            assert_eq!(r.status(), 200);
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("handler exited before it was healthy: {status:?}");
        }
        assert!(Instant::now() < deadline, "handler never became healthy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("handler did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// Refusals from `clients` concurrent clients until `kill_after` were answered, then SIGKILL.
/// Returns the request ids whose refusal the clients received. Bounded: at most 20,000
/// requests per client and 60 s.
async fn storm_then_kill(
    port: u16,
    child: &mut Child,
    clients: usize,
    kill_after: usize,
) -> Vec<String> {
    let answered = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let url = format!("http://127.0.0.1:{port}{CHAT}");
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (answered, count, url) = (answered.clone(), count.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let http = client();
            for i in 0..20_000 {
                let id = format!("storm-{c}-{i}");
                let sent = http
                    .post(&url)
                    .header("api-key", IN_KEY)
                    .header("content-type", "application/json")
                    .header("x-request-id", &id)
                    .header("x-forwarded-for", "198.51.100.1, 203.0.113.7:52345")
                    .body(NO_USER_BODY)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let Ok(resp) = sent else { break };
                let status = resp.status().as_u16();
                let Ok(body) = resp.bytes().await else { break };
                assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"]["code"], "missing_user");
                answered.lock().unwrap().push(id);
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < kill_after {
        assert!(
            Instant::now() < deadline,
            "storm too slow: {}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("clients end once the handler is gone")
            .unwrap();
    }
    let ids = answered.lock().unwrap().clone();
    ids
}

/// Request id → how many records carry it, over these files (missing files count as empty).
fn ids_on_disk(files: &[PathBuf]) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for f in files {
        let bytes = std::fs::read(f).unwrap_or_default();
        for line in bytes.split(|b| *b == b'\n') {
            if let Ok(r) = serde_json::from_slice::<AbuseRecord>(line) {
                *ids.entry(r.request_id).or_default() += 1;
            }
        }
    }
    ids
}

fn assert_each_once(answered: &[String], on_disk: &HashMap<String, usize>) {
    let missing: Vec<_> = answered
        .iter()
        .filter(|id| !on_disk.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} answered refusals have no record, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let twice: Vec<_> = on_disk.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "records on disk more than once: {twice:?}"
    );
}

fn with_suffix(p: &Path, s: &str) -> PathBuf {
    PathBuf::from(format!("{}{s}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_storm_loses_no_answered_refusal_file_sink() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let port = free_port();
    let mut env = base_env(port, "http://127.0.0.1:9", &home);
    let log = dir.path().join("abuse.jsonl");
    env.push(("AUDIT_LOG_PATH", log.display().to_string()));
    let mut child = spawn(&env, dir.path(), &dir.path().join("logs"), "a");
    wait_healthy(port, &mut child).await;
    let started = Instant::now();
    let answered = storm_then_kill(port, &mut child, 32, 1500).await;
    let secs = started.elapsed().as_secs_f64();
    let on_disk = ids_on_disk(std::slice::from_ref(&log));
    assert_each_once(&answered, &on_disk);
    assert!(answered.len() >= 1500);
    // the record carries the gateway's address, not the client's claim
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["client_ip"], "203.0.113.7");
    eprintln!(
        "file sink: {} refusals answered in {secs:.2} s before SIGKILL, {} records on disk, none lost",
        answered.len(),
        on_disk.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_storm_with_cosmos_unreachable_then_every_record_lands_in_cosmos_once() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let port = free_port();
    let mut env = base_env(port, "http://127.0.0.1:9", &home);
    let cosmos_down = closed_port().await; // http://127.0.0.1:<nothing listens>
    env.push(("COSMOS_ENDPOINT", format!("{cosmos_down}/")));
    env.push(("COSMOS_KEY", support::cosmos_emu::KEY.to_string()));
    env.push(("AUDIT_REPLAY_INTERVAL_MS", "100".to_string()));
    let mut child = spawn(&env, dir.path(), &dir.path().join("logs"), "a");
    wait_healthy(port, &mut child).await;
    let answered = storm_then_kill(port, &mut child, 32, 1500).await;
    // the default place: $HOME/data/aoai-fwdproxy/<WEBSITE_INSTANCE_ID>/
    let journal = home.join("data/aoai-fwdproxy/instance-a/abuse-journal.jsonl");
    let files = [journal.clone(), with_suffix(&journal, ".shipping")];
    let on_disk = ids_on_disk(&files);
    assert_each_once(&answered, &on_disk);
    eprintln!(
        "Cosmos unreachable: {} refusals answered before SIGKILL, {} records in the journal",
        answered.len(),
        on_disk.len()
    );

    // The next start, with Cosmos back: the journal the killed process left is shipped.
    let emu = Emu::start().await;
    let mut pairs = emu.pairs();
    pairs.push(("AUDIT_SPOOL_PATH".into(), journal.display().to_string()));
    let settings = AuditSettings::from_source(&Source::from_map(pairs)).unwrap();
    let audit = Audit::start(settings, Some(emu.account(vec![]))).unwrap();
    let report = audit.flush(Duration::from_secs(120)).await;
    assert!(report.completed, "{report:?} {:?}", audit.stats());
    audit.shutdown(Duration::from_secs(5)).await;
    #[derive(serde::Deserialize)]
    struct Rid {
        request_id: String,
    }
    let container = emu.container("abuse-log").await;
    let mut items = container
        .query_items::<Rid>(
            azure_data_cosmos::Query::from("SELECT c.request_id FROM c"),
            azure_data_cosmos::FeedScope::full_container(),
            None,
        )
        .await
        .unwrap();
    let mut in_cosmos: HashMap<String, usize> = HashMap::new();
    while let Some(i) = futures_util::TryStreamExt::try_next(&mut items)
        .await
        .unwrap()
    {
        *in_cosmos.entry(i.request_id).or_default() += 1;
    }
    assert_each_once(&answered, &in_cosmos);
    assert_eq!(
        in_cosmos.len(),
        on_disk.len(),
        "every durable record, nothing else"
    );
    assert!(!journal.exists() || std::fs::metadata(&journal).unwrap().len() == 0);
    assert!(
        !with_suffix(&journal, ".shipping").exists(),
        "trimmed once shipped"
    );
}

#[tokio::test]
async fn a_second_process_on_the_same_journal_refuses_to_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (p1, p2) = (free_port(), free_port());
    let mut first = spawn(
        &base_env(p1, "http://127.0.0.1:9", &home),
        dir.path(),
        &dir.path().join("logs"),
        "first",
    );
    wait_healthy(p1, &mut first).await;
    // same HOME, same instance id: the same journal
    let mut second = spawn(
        &base_env(p2, "http://127.0.0.1:9", &home),
        dir.path(),
        &dir.path().join("logs"),
        "second",
    );
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut second, Duration::from_secs(10)))
            .await
            .unwrap();
    assert_eq!(status.code(), Some(2));
    let err = std::fs::read_to_string(dir.path().join("logs/second.err")).unwrap();
    assert!(
        err.contains("AUDIT_LOG_PATH")
            && err.contains("in use by another process")
            && err.contains(&format!("pid {}", first.id()))
            && err.contains("instance-a/abuse-log.jsonl"),
        "{err}"
    );
    // the first keeps working
    let r = client()
        .post(format!("http://127.0.0.1:{p1}{CHAT}"))
        .header("api-key", IN_KEY)
        .body(NO_USER_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    sigterm(&first);
    assert!(
        tokio::task::spawn_blocking(move || wait_exit(&mut first, Duration::from_secs(10)))
            .await
            .unwrap()
            .success()
    );
}

/// A tmpfs mounted at `at` (root only); unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, options: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // A journal thread may still be closing its file: retry, then detach lazily.
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.0)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn skip_loudly(what: &str) {
    eprintln!(
        "\n!!! SKIPPED {what}: mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN) !!!\n"
    );
}

/// Send one refusal; its status and error code.
async fn refuse(port: u16, id: &str) -> (u16, String) {
    let r = client()
        .post(format!("http://127.0.0.1:{port}{CHAT}"))
        .header("api-key", IN_KEY)
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(NO_USER_BODY)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

async fn stop(mut child: Child) {
    sigterm(&child);
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_read_only_app_root_starts_with_and_without_cosmos_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("wwwroot");
    let Some(_ro) = Mount::tmpfs(&root, "ro,size=1m") else {
        return skip_loudly("the read-only app root test");
    };
    assert!(
        std::fs::write(root.join("x"), b"x").is_err(),
        "the app root is read-only"
    );
    let logs = dir.path().join("logs");
    let home = dir.path().join("home");

    // Without Cosmos: the records go to $HOME/data/aoai-fwdproxy/<instance>/abuse-log.jsonl.
    let port = free_port();
    let mut child = spawn(
        &base_env(port, "http://127.0.0.1:9", &home),
        &root,
        &logs,
        "file",
    );
    wait_healthy(port, &mut child).await;
    assert_eq!(
        refuse(port, "ro-file-1").await,
        (400, "missing_user".into())
    );
    stop(child).await;
    let log = home.join("data/aoai-fwdproxy/instance-a/abuse-log.jsonl");
    assert!(ids_on_disk(std::slice::from_ref(&log)).contains_key("ro-file-1"));

    // With Cosmos (unreachable): it starts, and the record waits in the journal.
    let port = free_port();
    let mut env = base_env(port, "http://127.0.0.1:9", &home);
    env.push(("COSMOS_ENDPOINT", format!("{}/", closed_port().await)));
    env.push(("COSMOS_KEY", support::cosmos_emu::KEY.to_string()));
    let mut child = spawn(&env, &root, &logs, "cosmos");
    wait_healthy(port, &mut child).await;
    assert_eq!(
        refuse(port, "ro-cosmos-1").await,
        (400, "missing_user".into())
    );
    stop(child).await;
    let journal = home.join("data/aoai-fwdproxy/instance-a/abuse-journal.jsonl");
    assert!(
        ids_on_disk(&[journal.clone(), with_suffix(&journal, ".shipping")])
            .contains_key("ro-cosmos-1")
    );

    // HOME read-only too: the temp directory, with a warning that says so.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let port = free_port();
    let mut env = base_env(port, "http://127.0.0.1:9", &root);
    env.push(("TMPDIR", tmp.display().to_string()));
    let mut child = spawn(&env, &root, &logs, "tmp");
    wait_healthy(port, &mut child).await;
    assert_eq!(refuse(port, "ro-tmp-1").await, (400, "missing_user".into()));
    stop(child).await;
    let log = tmp.join("aoai-fwdproxy/instance-a/abuse-log.jsonl");
    assert!(ids_on_disk(std::slice::from_ref(&log)).contains_key("ro-tmp-1"));
    let out = std::fs::read_to_string(logs.join("tmp.out")).unwrap();
    assert!(
        out.contains("set AUDIT_DIR to a persistent directory"),
        "{out}"
    );

    // Nowhere writable: the start is refused, naming every place tried.
    let port = free_port();
    let mut env = base_env(port, "http://127.0.0.1:9", &root);
    env.push(("TMPDIR", root.display().to_string()));
    let mut child = spawn(&env, &root, &logs, "nowhere");
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    assert_eq!(status.code(), Some(2));
    let err = std::fs::read_to_string(logs.join("nowhere.err")).unwrap();
    assert!(
        err.contains("AUDIT_DIR")
            && err.contains("no writable place")
            && err.contains(&root.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_full_disk_answers_503_and_never_forwards_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_small) = Mount::tmpfs(&data, "size=256k") else {
        return skip_loudly("the full-disk test");
    };
    let aoai = MockAoai::start().await;
    let port = free_port();
    let mut env = base_env(port, &aoai.base(), &dir.path().join("home"));
    env.push(("AUDIT_DIR", data.display().to_string()));
    let mut child = spawn(&env, dir.path(), &dir.path().join("logs"), "full");
    wait_healthy(port, &mut child).await;
    // Fill the disk (the journal is still empty: its first append needs a new page).
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        for _ in 0..1024 {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }
    let (status, code) = refuse(port, "while-full").await;
    assert_eq!((status, code.as_str()), (503, "audit_unavailable"));
    assert!(aoai.seen().is_empty(), "a refusal is never forwarded");
    // Space again: refusals are recorded again, and the failed attempt left no torn line.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        refuse(port, "after-full").await,
        (400, "missing_user".into())
    );
    stop(child).await;
    let log = data.join("instance-a/abuse-log.jsonl");
    let ids = ids_on_disk(std::slice::from_ref(&log));
    assert!(
        ids.contains_key("after-full") && !ids.contains_key("while-full"),
        "{ids:?}"
    );
    let bytes = std::fs::read(&log).unwrap();
    assert_eq!(
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        ids.len(),
        "every line is a whole record"
    );
    let out = std::fs::read_to_string(dir.path().join("logs/full.out")).unwrap();
    assert!(
        out.contains("the request is answered 503"),
        "the failure is logged"
    );
}

#[tokio::test]
async fn with_cosmos_a_full_disk_falls_back_to_a_cosmos_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_small) = Mount::tmpfs(&data, "size=256k") else {
        return skip_loudly("the full-disk-with-Cosmos test");
    };
    let emu = Emu::start().await;
    let mut pairs = emu.pairs();
    pairs.push(("AUDIT_DIR".into(), data.display().to_string()));
    pairs.push(("WEBSITE_INSTANCE_ID".into(), "full-cosmos".into()));
    let settings = AuditSettings::from_source(&Source::from_map(pairs)).unwrap();
    let audit = Audit::start(settings, Some(emu.account(vec![]))).unwrap();
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        for _ in 0..1024 {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }
    let record = |id: &str| AbuseRecord {
        id: format!("{id}:missing_user"),
        timestamp: "2026-11-28T00:00:00Z".into(),
        request_id: id.into(),
        caller: "default".into(),
        user: "(none)".into(),
        deployment: None,
        operation: "chat/completions".into(),
        reason: aoai_fwdproxy::pipeline::audit::Reason::MissingUser,
        details: serde_json::json!({}),
        prompt: None,
        client_ip: None,
    };
    // The journal cannot take it, Cosmos DB acknowledges it: durable, the refusal may be answered.
    audit.record(record("full-but-acked")).await.unwrap();
    let stats = audit.stats();
    assert_eq!(
        (stats.acknowledged, stats.failed, stats.journaled),
        (1, 0, 0)
    );
    assert_eq!(emu.abuse_ids().await.0, ["full-but-acked:missing_user"]);
    audit.shutdown(Duration::from_secs(1)).await;
}
