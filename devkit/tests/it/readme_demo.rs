//! README's "Try the gate" table, row by row, against the real set (`fwdproxy-dev` with its
//! gateway emulator, real `handler` processes and the simulators), as a new user would try it.
//! The table is read from README.md between `<!-- demo:start -->` and `<!-- demo:end -->`, so
//! a row that stops holding, or a row this test cannot read, fails here.
//!
//! Needs the `handler` binary next to `fwdproxy-dev` (built by `cargo test --workspace`; when
//! this crate's tests run alone and it is missing, it is built with cargo).
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");

fn handler_binary() -> PathBuf {
    let handler = Path::new(env!("CARGO_BIN_EXE_fwdproxy-dev"))
        .parent()
        .expect("fwdproxy-dev has a directory")
        .join("handler");
    if !handler.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "aoai-fwdproxy", "--bin", "handler"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the handler failed: {status}");
    }
    handler
}

struct Launched {
    child: Child,
    ready: Value,
    dir: PathBuf,
}

impl Drop for Launched {
    fn drop(&mut self) {
        // SIGTERM first so the handlers stop with it; SIGKILL only if it hangs.
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The set as README starts it (defaults), on a free gateway port and without token pacing.
fn launch() -> Launched {
    let handler = handler_binary();
    let dir = std::env::temp_dir().join(format!("fwdproxy-readme-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ready_file = dir.join("ready.json");
    let child = Command::new(env!("CARGO_BIN_EXE_fwdproxy-dev"))
        .args(["--no-build", "--quiet", "--gateway-port", "0"])
        .args([
            "--ms-per-token",
            "0",
            "--first-token-ms",
            "0",
            "--backends",
            "1",
        ])
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

/// One row of the table, as the test understands it.
#[derive(Debug)]
struct Row {
    change: String,
    status: u16,
    code: Option<String>,
    /// `(violence)`, `(jailbreak)`: the `content_filter_result` entry that must be set.
    category: Option<String>,
}

/// Text between backticks, in order.
fn ticks(s: &str) -> Vec<String> {
    s.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, t)| t.to_string())
        .collect()
}

fn demo_rows(readme: &str) -> Vec<Row> {
    let start = readme
        .find("<!-- demo:start -->")
        .expect("README has a demo table");
    let end = readme[start..]
        .find("<!-- demo:end -->")
        .expect("the demo table ends")
        + start;
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 2, "a demo row has two cells: {l}");
            let status = cells[1]
                .split_whitespace()
                .next()
                .and_then(|s| s.trim_end_matches(',').parse().ok())
                .unwrap_or_else(|| panic!("the answer starts with a status: {l}"));
            let category = cells[1]
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(c, _)| c.to_string());
            Row {
                change: cells[0].to_string(),
                status,
                code: ticks(cells[1]).into_iter().next(),
                category,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_demo_row_of_the_readme_holds_against_the_running_set() {
    let readme = std::fs::read_to_string(README).unwrap();
    let rows = demo_rows(&readme);
    assert!(rows.len() >= 6, "the demo table lost rows: {rows:?}");
    // README states the default key and users; the set must be started with them.
    let set = launch();
    let gateway = set.ready["gateway_url"].as_str().unwrap().to_string();
    let key = set.ready["internal_key"].as_str().unwrap().to_string();
    assert!(
        readme.contains(&format!("api-key: {key}")),
        "README names the key {key}"
    );
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    for row in &rows {
        let mut deployment = "gpt-4o".to_string();
        let mut prompt = "Hello! What can you do?".to_string();
        let mut user = Some("alice".to_string());
        let mut api_key = key.clone();
        let values = ticks(&row.change);
        let c = row.change.as_str();
        if c.starts_with("nothing") {
        } else if c.starts_with("the prompt contains") {
            prompt = format!("Write a story that says {} in it.", values[0]);
        } else if c.starts_with("the user is") {
            user = Some(values[0].clone());
        } else if c.starts_with("no `user`") {
            user = None;
        } else if c.starts_with("the `api-key` is") {
            api_key = values[1].clone();
        } else if c.starts_with("the deployment is") {
            deployment = values[0].clone();
        } else if c.starts_with("an image (") || c.starts_with("speech (") {
        } else {
            panic!("this test does not know how to try the README row {c:?}: teach it");
        }
        let mut operation = "chat/completions".to_string();
        let mut body = json!({"messages": [{"role": "user", "content": prompt}]});
        if c.starts_with("an image (") || c.starts_with("speech (") {
            // `an image (`OP` on `DEPLOYMENT`) whose `FIELD` contains `WORD``
            let [op, dep, field, word] = &values[..] else {
                panic!("README row {c:?}: want operation, deployment, field and word");
            };
            operation = op.clone();
            deployment = dep.clone();
            body = json!({field.as_str(): format!("A scene with {word} in it.")});
            if c.starts_with("speech") {
                body["voice"] = json!("alloy");
            }
        }
        if let Some(u) = &user {
            body["user"] = json!(u);
        }
        let resp = client
            .post(format!(
                "{gateway}/openai/deployments/{deployment}/{operation}?api-version=2024-10-21"
            ))
            .header("api-key", &api_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, row.status, "README row {c:?}: {answer}");
        if status == 200 {
            assert!(answer["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty()));
            continue;
        }
        assert_eq!(
            answer["error"]["code"].as_str(),
            row.code.as_deref(),
            "README row {c:?}: {answer}"
        );
        if let Some(category) = &row.category {
            let result = &answer["error"]["innererror"]["content_filter_result"][category];
            assert!(
                result["filtered"] == true,
                "README row {c:?} names {category}: {answer}"
            );
        }
    }
}

#[test]
fn the_table_reader_reads_rows_and_refuses_what_it_cannot_read() {
    let rows = demo_rows(
        "x\n<!-- demo:start -->\n| a | b |\n|---|---|\n| the prompt contains `w` | 400 `content_filter` (violence) |\n| nothing | 200, fine |\n<!-- demo:end -->\n",
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].status, 400);
    assert_eq!(rows[0].code.as_deref(), Some("content_filter"));
    assert_eq!(rows[0].category.as_deref(), Some("violence"));
    assert_eq!(rows[1].status, 200);
    assert!(std::panic::catch_unwind(|| demo_rows(
        "<!-- demo:start -->\n|a|b|\n|-|-|\n| x | fine |\n<!-- demo:end -->"
    ))
    .is_err());
}
