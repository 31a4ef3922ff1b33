//! The real `handler` binary, started as the Functions host starts it: settings from the
//! environment, port from `FUNCTIONS_CUSTOMHANDLER_PORT`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

const HANDLER: &str = env!("CARGO_BIN_EXE_handler");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unique_audit_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("fwdproxy-process-{}-{n}", std::process::id()))
}

fn handler(envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(HANDLER);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // a directory without local.settings.json, so only these variables count
        .current_dir(std::env::temp_dir())
        // each handler its own abuse journal: a journal is locked by the process using it
        .env("AUDIT_DIR", unique_audit_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

fn base_env(upstream: &str, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AOAI_HOSTNAME", upstream.to_string()),
        ("AOAI_INAPIKEY", IN_KEY.to_string()),
        ("AOAI_OUTAPIKEY", OUT_KEY.to_string()),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string()),
    ]
}

fn spawn(env: &[(&'static str, String)]) -> Child {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    handler(&pairs).spawn().unwrap()
}

async fn wait_healthy(port: u16) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}/api/FwdProxy/openai/deployments/health/check");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = client.get(&url).send().await {
            assert_eq!(r.status(), 200);
            return;
        }
        assert!(Instant::now() < deadline, "handler never became healthy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
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

#[test]
fn invalid_settings_stop_the_start_naming_the_setting() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("AOAI_HOSTNAME", "x.openai.azure.com"),
                ("AOAI_OUTAPIKEY", "k"),
            ],
            "AOAI_INAPIKEY",
        ),
        (
            &[("AOAI_INAPIKEY", IN_KEY), ("AOAI_OUTAPIKEY", "k")],
            "AOAI_HOSTNAME",
        ),
        (
            &[
                ("AOAI_HOSTNAME", "x.openai.azure.com"),
                ("AOAI_INAPIKEY", IN_KEY),
            ],
            "AOAI_OUTAPIKEY",
        ),
        (
            &[
                ("AOAI_HOSTNAME", "http://x.openai.azure.com"),
                ("AOAI_INAPIKEY", IN_KEY),
                ("AOAI_OUTAPIKEY", "k"),
            ],
            "AOAI_HOSTNAME",
        ),
        (
            &[
                ("AOAI_HOSTNAME", "x.openai.azure.com"),
                ("AOAI_INAPIKEY", IN_KEY),
                ("AOAI_OUTAPIKEY", "k"),
                ("FUNCTIONS_CUSTOMHANDLER_PORT", "http"),
            ],
            "FUNCTIONS_CUSTOMHANDLER_PORT",
        ),
        (
            &[
                ("AOAI_HOSTNAME", "x.openai.azure.com"),
                ("AOAI_INAPIKEY", "short"),
                ("AOAI_OUTAPIKEY", "k"),
            ],
            "AOAI_INAPIKEY",
        ),
    ];
    for (env, setting) in cases {
        let out = handler(env).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{setting}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("refuses to start") && stderr.contains(setting),
            "{stderr}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(setting),
            "the log line names the setting too: {stdout}"
        );
        assert!(!stderr.contains(IN_KEY) && !stdout.contains(IN_KEY));
    }
}

#[test]
fn reads_local_settings_json_and_environment_wins() {
    let dir = std::env::temp_dir().join(format!("fwdproxy-ls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("local.settings.json"),
        serde_json::json!({
            "IsEncrypted": false,
            "Values": {
                "FUNCTIONS_WORKER_RUNTIME": "custom",
                "AOAI_HOSTNAME": "http://127.0.0.1:9",
                "AOAI_INAPIKEY": IN_KEY,
                "AOAI_OUTAPIKEY": OUT_KEY,
                "FUNCTIONS_CUSTOMHANDLER_PORT": "1"
            }
        })
        .to_string(),
    )
    .unwrap();
    let mut child = handler(&[("FUNCTIONS_CUSTOMHANDLER_PORT", &port.to_string())])
        .current_dir(&dir)
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_healthy(port));
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sigterm_lets_in_flight_streams_finish() {
    let aoai = MockAoai::start().await;
    let chunks: Vec<String> = (0..6).map(|i| format!("data: {{\"n\":{i}}}\n\n")).collect();
    aoai.reply(Reply::Stream(chunks.clone(), Duration::from_millis(100)));
    let port = free_port();
    let mut child = spawn(&base_env(&aoai.base(), port));
    wait_healthy(port).await;

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client
        .post(format!(
            "http://127.0.0.1:{port}/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"
        ))
        .header("api-key", IN_KEY)
        .body(r#"{"stream":true,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut got = stream.next().await.unwrap().unwrap().to_vec();
    sigterm(&child); // mid-stream
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.expect("stream cut by shutdown"));
    }
    assert_eq!(String::from_utf8(got).unwrap(), chunks.concat());
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn one_json_log_line_per_request_and_no_secrets() {
    let aoai = MockAoai::start().await;
    let port = free_port();
    let mut child = spawn(&base_env(&aoai.base(), port));
    wait_healthy(port).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let prompt = "my-secret-prompt-text";
    let url = format!(
        "http://127.0.0.1:{port}/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"
    );
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let ok = client
        .post(&url)
        .header("api-key", IN_KEY)
        .header("x-request-id", "log-ok-1")
        .body(body.clone());
    assert_eq!(ok.send().await.unwrap().status(), 200);
    let bad = client
        .post(&url)
        .header("api-key", "wrong-key-with-enough-length")
        .header("x-request-id", "log-401-1")
        .body(body);
    assert_eq!(bad.send().await.unwrap().status(), 401);

    sigterm(&child);
    let mut stdout = child.stdout.take().unwrap();
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(status.success());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();

    let mut requests = Vec::new();
    for line in BufReader::new(text.as_bytes()).lines() {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "request" {
            requests.push(v);
        }
        for secret in [IN_KEY, OUT_KEY, prompt, "wrong-key-with-enough-length"] {
            assert!(!line.contains(secret), "log line leaks {secret}: {line}");
        }
    }
    let find = |id: &str| {
        requests
            .iter()
            .filter(|r| r["request_id"] == id)
            .cloned()
            .collect::<Vec<_>>()
    };
    let ok = find("log-ok-1");
    assert_eq!(ok.len(), 1, "{requests:?}");
    assert_eq!(ok[0]["status"], 200);
    assert_eq!(ok[0]["completed"], true);
    assert_eq!(ok[0]["caller"], "default");
    assert_eq!(ok[0]["deployment"], "gpt-4o");
    assert_eq!(ok[0]["operation"], "chat/completions");
    assert!(ok[0]["upstream_ms"].as_f64().is_some() && ok[0]["total_ms"].as_f64().is_some());
    let denied = find("log-401-1");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["status"], 401);
    assert_eq!(denied[0]["completed"], true);
    assert!(denied[0]["caller"].is_null());
}
