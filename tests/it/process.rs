//! The real `handler` binary, started as the Functions host starts it: settings from the
//! environment, port from `FUNCTIONS_CUSTOMHANDLER_PORT` (0 here: the port is read back from the
//! ready log line), SIGTERM to stop.

use crate::common;

use common::support::app::base_pairs;
use common::support::handler::{run_to_exit, Handler};
use common::support::scratch::Scratch;
use common::support::wait::within;
use common::*;
use futures_util::StreamExt;

const CHAT_PATH: &str = "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
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
    for (pairs, setting) in cases {
        let (status, stdout, stderr) = run_to_exit(&env(pairs));
        assert_eq!(status.code(), Some(2), "{setting}");
        assert!(
            stderr.contains("refuses to start") && stderr.contains(setting),
            "{stderr}"
        );
        assert!(
            stdout.contains(setting),
            "the log line names the setting too: {stdout}"
        );
        assert!(!stderr.contains(IN_KEY) && !stdout.contains(IN_KEY));
    }
}

#[test]
fn reads_local_settings_json_and_environment_wins() {
    let dir = Scratch::new("local-settings");
    std::fs::write(
        dir.file("local.settings.json"),
        serde_json::json!({
            "IsEncrypted": false,
            "Values": {
                "FUNCTIONS_WORKER_RUNTIME": "custom",
                "AOAI_HOSTNAME": "http://127.0.0.1:9",
                "AOAI_INAPIKEY": IN_KEY,
                "AOAI_OUTAPIKEY": OUT_KEY,
                // a port the handler cannot bind as a normal user: the environment's 0 must win
                "FUNCTIONS_CUSTOMHANDLER_PORT": "1"
            }
        })
        .to_string(),
    )
    .unwrap();
    let mut handler = Handler::spawn_in(dir.path(), &env(&[("FUNCTIONS_CUSTOMHANDLER_PORT", "0")]));
    let url = handler.url("/api/FwdProxy/openai/deployments/health/check");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async { client().get(&url).send().await.unwrap().status() });
    assert_eq!(status, 200);
    // The settings came from the file: the key it names is the one the handler accepts.
    let denied = rt.block_on(async {
        client()
            .post(handler.url(&format!("{CHAT_PATH}?{API}")))
            .header("api-key", "not-the-key-in-the-file-000")
            .body("{}")
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(denied, 401);
    handler.sigterm();
    assert!(handler.wait_exit(PATIENCE).success());
}

fn sse_chunks(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("data: {{\"n\":{i}}}\n\n")).collect()
}

/// Start a handler against a gated stream and read its first chunk: the stream is in flight.
async fn in_flight_stream(
    aoai: &MockAoai,
    extra: &[(&str, &str)],
) -> (
    Handler,
    impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>,
    Vec<u8>,
) {
    let pairs = common::support::app::merge(base_pairs(&aoai.base()), extra.iter().copied());
    let mut handler = Handler::spawn(&pairs);
    let url = handler.url(&format!("{CHAT_PATH}?{API}"));
    let resp = client()
        .post(url)
        .header("api-key", IN_KEY)
        .body(r#"{"stream":true,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = within(PATIENCE, "first chunk", stream.next())
        .await
        .expect("a first chunk")
        .unwrap()
        .to_vec();
    (handler, stream, first)
}

fn message_index(handler: &Handler, message: &str) -> Option<usize> {
    handler.log().iter().position(|v| v["message"] == message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_streams_finish() {
    let aoai = MockAoai::start().await;
    let chunks = sse_chunks(6);
    aoai.reply(Reply::Gated(chunks.clone()));
    let (mut handler, mut stream, mut got) = in_flight_stream(&aoai, &[]).await;

    handler.sigterm(); // mid-stream
                       // Only once the handler is draining does the upstream send the rest.
    tokio::task::block_in_place(|| {
        handler.wait_log("shutting down", |v| {
            v["message"] == "shutting down: draining in-flight requests"
        })
    });
    aoai.release(chunks.len());
    while let Some(chunk) = within(PATIENCE, "the rest of the stream", stream.next()).await {
        got.extend_from_slice(&chunk.expect("stream cut by shutdown"));
    }
    assert_eq!(String::from_utf8(got).unwrap(), chunks.concat());
    let status = tokio::task::block_in_place(|| handler.wait_exit(PATIENCE));
    assert!(status.success(), "{status:?}");
    assert!(message_index(
        &handler,
        "shutdown grace period over: dropping the remaining requests"
    )
    .is_none());
    assert_eq!(aoai.seen().len(), 1);
}

/// A stream that never ends does not hold the instance past `SHUTDOWN_GRACE_MS`: the process
/// drops it when the grace is over and exits with the code `main` promises for a clean stop (0),
/// after logging why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stream_that_never_ends_exits_after_the_grace() {
    let aoai = MockAoai::start().await;
    let chunks = sse_chunks(3);
    aoai.reply(Reply::Gated(chunks.clone())); // nothing is ever released
    let (mut handler, mut stream, got) =
        in_flight_stream(&aoai, &[("SHUTDOWN_GRACE_MS", "300")]).await;
    assert_eq!(got, chunks[0].as_bytes());

    handler.sigterm();
    let status = tokio::task::block_in_place(|| handler.wait_exit(PATIENCE));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let draining = message_index(&handler, "shutting down: draining in-flight requests")
        .expect("draining logged");
    let over = message_index(
        &handler,
        "shutdown grace period over: dropping the remaining requests",
    )
    .expect("grace expiry logged");
    let stopped = message_index(&handler, "stopped").expect("stop logged");
    assert!(
        draining < over && over < stopped,
        "{:?}",
        handler.stdout_lines()
    );
    let over_line = &handler.log()[over];
    assert_eq!(over_line["level"], "WARN");

    // The client's stream ends (cut), without any chunk the upstream never sent.
    let mut rest = Vec::new();
    while let Some(chunk) = within(PATIENCE, "the cut stream to end", stream.next()).await {
        match chunk {
            Ok(c) => rest.extend_from_slice(&c),
            Err(_) => break,
        }
    }
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(aoai.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_log_line_per_request_and_no_secrets() {
    let aoai = MockAoai::start().await;
    let mut handler = Handler::spawn(&base_pairs(&aoai.base()));
    let prompt = "my-secret-prompt-text";
    let url = handler.url(&format!("{CHAT_PATH}?{API}"));
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let ok = client()
        .post(&url)
        .header("api-key", IN_KEY)
        .header("x-request-id", "log-ok-1")
        .body(body.clone());
    assert_eq!(ok.send().await.unwrap().status(), 200);
    let bad = client()
        .post(&url)
        .header("api-key", "wrong-key-with-enough-length")
        .header("x-request-id", "log-401-1")
        .body(body);
    assert_eq!(bad.send().await.unwrap().status(), 401);

    handler.sigterm();
    let status = tokio::task::block_in_place(|| handler.wait_exit(PATIENCE));
    assert!(status.success());

    let mut requests = Vec::new();
    for line in handler
        .stdout_lines()
        .iter()
        .chain(handler.stderr_lines().iter())
    {
        for secret in [IN_KEY, OUT_KEY, prompt, "wrong-key-with-enough-length"] {
            assert!(!line.contains(secret), "log line leaks {secret}: {line}");
        }
    }
    for v in handler.log() {
        if v["target"] == "request" {
            requests.push(v);
        }
    }
    assert_eq!(requests.len(), 2, "one line per request: {requests:?}");
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
    assert_eq!(
        aoai.seen().len(),
        1,
        "only the authenticated request went upstream"
    );
}

/// Log lines are batched (telemetry): a burst of concurrent requests still gets exactly one
/// line each, the lines are out while the handler sits idle (no stop needed: a SIGKILL then
/// loses none of them), and the lines of a burst answered just before SIGTERM are all out by
/// the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_log_lines_are_out_when_idle_and_all_out_by_sigterm() {
    let aoai = MockAoai::start().await;
    let mut handler = Handler::spawn(&base_pairs(&aoai.base()));
    let url = handler.url(&format!("{CHAT_PATH}?{API}"));
    let client = client();
    let burst = |tag: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        futures_util::stream::iter(0..200).for_each_concurrent(16, move |i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let status = client
                    .post(&url)
                    .header("api-key", IN_KEY)
                    .header("x-request-id", format!("{tag}-{i:03}"))
                    .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, 200);
            }
        })
    };
    let lines_of = |handler: &Handler, tag: &str| {
        let mut ids: Vec<String> = handler
            .log()
            .iter()
            .filter(|v| v["target"] == "request")
            .filter_map(|v| v["request_id"].as_str().map(str::to_string))
            .filter(|id| id.starts_with(tag))
            .collect();
        ids.sort();
        ids
    };
    let want = |tag: &str| -> Vec<String> { (0..200).map(|i| format!("{tag}-{i:03}")).collect() };

    // First one request alone, on a fresh handler: no later line can push its line out (the
    // age rule), only the worker going idle can.
    let lone = client
        .post(&url)
        .header("api-key", IN_KEY)
        .header("x-request-id", "lone-000")
        .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(lone.send().await.unwrap().status(), 200);
    let out = tokio::task::block_in_place(|| {
        common::support::wait::eventually_blocking(PATIENCE, || {
            lines_of(&handler, "lone").len() == 1
        })
    });
    assert!(
        out,
        "the lone request's line is not out while the handler idles"
    );
    within(PATIENCE, "a burst of 200 requests", burst("idle")).await;
    // nothing stops the handler here: the lines must come out on their own
    let out = tokio::task::block_in_place(|| {
        common::support::wait::eventually_blocking(PATIENCE, || {
            lines_of(&handler, "idle").len() >= 200 && lines_of(&handler, "lone").len() == 1
        })
    });
    assert!(
        out,
        "{} of 200 burst lines and {} lone line out while idle",
        lines_of(&handler, "idle").len(),
        lines_of(&handler, "lone").len()
    );
    assert_eq!(
        lines_of(&handler, "idle"),
        want("idle"),
        "exactly one line each"
    );

    within(PATIENCE, "a burst of 200 requests", burst("term")).await;
    handler.sigterm();
    let status = tokio::task::block_in_place(|| handler.wait_exit(PATIENCE));
    assert!(status.success());
    assert_eq!(lines_of(&handler, "term"), want("term"));
    assert_eq!(lines_of(&handler, "idle"), want("idle"));
    assert_eq!(aoai.seen().len(), 401);
}
