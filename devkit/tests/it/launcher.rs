//! The real `fwdproxy-dev` binary with real `handler` processes: it comes up, a chat completion
//! goes through gateway → handler → simulator, and no handler outlives the launcher, whether it
//! is stopped with SIGTERM or killed with SIGKILL.
//!
//! Needs the `handler` binary next to `fwdproxy-dev`. `cargo test --workspace` builds it (the
//! handler's own integration tests need it); when this crate's tests run alone and it is
//! missing, the test builds it with cargo, and fails if that fails — never a silent skip.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn handler_binary() -> PathBuf {
    let launcher = Path::new(env!("CARGO_BIN_EXE_fwdproxy-dev"));
    let handler = launcher
        .parent()
        .expect("fwdproxy-dev has a directory")
        .join("handler");
    if !handler.is_file() {
        // Only when the devkit's tests run on their own (`cargo test -p fwdproxy-devkit`).
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "aoai-fwdproxy", "--bin", "handler"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the handler failed: {status}");
    }
    assert!(
        handler.is_file(),
        "no handler binary at {} after building it",
        handler.display()
    );
    handler
}

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); read its state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

struct Launched {
    child: Child,
    ready: Value,
    dir: PathBuf,
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn launch(tag: &str) -> Launched {
    let handler = handler_binary();
    let dir = std::env::temp_dir().join(format!("fwdproxy-dev-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ready_file = dir.join("ready.json");
    let child = Command::new(env!("CARGO_BIN_EXE_fwdproxy-dev"))
        .args([
            "--no-build",
            "--quiet",
            "--gateway-port",
            "0",
            "--ms-per-token",
            "0",
        ])
        .args(["--first-token-ms", "0", "--backends", "2"])
        .arg("--handler")
        .arg(&handler)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--ready-file")
        .arg(&ready_file)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut launched = Launched {
        child,
        ready: Value::Null,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&ready_file) {
            launched.ready = serde_json::from_str(&text).unwrap();
            return launched;
        }
        if let Ok(Some(status)) = launched.child.try_wait() {
            panic!("fwdproxy-dev exited before it was ready: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("fwdproxy-dev was not ready within 60 s");
}

fn handler_pids(ready: &Value) -> Vec<u32> {
    ready["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["handler_pid"].as_u64().unwrap() as u32)
        .collect()
}

fn wait_gone(pids: &[u32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pids.iter().all(|p| !alive(*p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn the_set_serves_and_sigterm_stops_every_process() {
    let mut set = launch("term");
    let gateway = set.ready["gateway_url"].as_str().unwrap().to_string();
    let key = set.ready["internal_key"].as_str().unwrap().to_string();
    let pids = handler_pids(&set.ready);
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)));

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut resources = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!(
                "{gateway}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
            ))
            .header("api-key", &key)
            .json(&json!({"messages": [{"role": "user", "content": "echo: hi"}], "user": "alice"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        resources.push(r.headers()["x-sim-resource"].to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "hi");
    }
    // Round-robin: each backend (and so each simulated resource) answered once.
    resources.sort();
    assert_eq!(resources, ["aoai-sim-1", "aoai-sim-2"]);

    let launcher = set.child.id() as i32;
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(launcher, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = set.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "launcher did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        wait_gone(&pids, Duration::from_secs(2)),
        "handlers outlived the launcher"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_launcher_leaves_no_orphans() {
    let mut set = launch("kill");
    let pids = handler_pids(&set.ready);
    assert!(pids.iter().all(|p| alive(*p)));
    set.child.kill().unwrap(); // SIGKILL: no handler code of the launcher runs
    set.child.wait().unwrap();
    // PR_SET_PDEATHSIG sends each handler SIGTERM; they stop within their grace.
    assert!(
        wait_gone(&pids, Duration::from_secs(10)),
        "handlers outlived a SIGKILLed launcher"
    );
}
