//! The AOAI surface users call today, black-box through the app: Responses on the `AzureOpenAI`
//! client's path, v1 images and audio, files and batches — for each route what the client got
//! and what the upstream saw, and batch input files screened at upload.

use crate::common;

use common::*;
use serde_json::json;

const P: &str = "/api/FwdProxy/openai";
const V: &str = "api-version=2025-04-01-preview";

/// This module's calls on the shared [`Gate`] (a trait: other test modules add their own).
trait Calls {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Response;
    async fn json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response;
}

impl Calls for Gate {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut req = self
            .app
            .client
            .request(method, self.app.url(path))
            .header("api-key", IN_KEY);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.body(body).send().await.unwrap()
    }

    async fn json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.send(
            reqwest::Method::POST,
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
    }
}

const BOUNDARY: &str = "surface-test-boundary";

fn form(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, filename, value) in fields {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

fn upload(purpose: &str, file: &str) -> (String, Vec<u8>) {
    form(&[
        ("purpose", None, purpose.as_bytes()),
        ("file", Some("input.jsonl"), file.as_bytes()),
    ])
}

fn line(id: &str, body: serde_json::Value) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/chat/completions", "body": body}).to_string()
}

fn chat(user: Option<&str>, text: &str) -> serde_json::Value {
    let mut b = json!({"model": "gpt-4o-batch", "messages": [{"role": "user", "content": text}]});
    if let Some(u) = user {
        b["user"] = u.into();
    }
    b
}

#[tokio::test]
async fn responses_on_the_api_version_path_are_gated_like_v1() {
    let g = gate(&[]).await;
    let body =
        json!({"model": "gpt-4o", "user": "alice", "input": "What is the capital of France?"});
    let resp = g.json(&format!("{P}/responses?{V}"), &body).await;
    assert_eq!(resp.status(), 200);
    let seen = g.aoai.only();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/openai/responses")
    );
    assert_eq!(seen.query.as_deref(), Some(V));
    assert_eq!(seen.body.as_ref(), body.to_string().as_bytes());
    assert_eq!(seen.headers["api-key"], OUT_KEY);
    assert_eq!(g.cs.calls().len(), 2, "analyze and shield");

    // refused exactly as v1/responses would be, and never forwarded
    for (path, status, code) in [
        (format!("{P}/responses?{V}"), 400, "content_filter"),
        (format!("{P}/v1/responses"), 400, "content_filter"),
    ] {
        let bad = json!({"user": "alice", "input": "a bloodbath", "model": "gpt-4o"});
        assert_eq!(
            assert_aoai_error(g.json(&path, &bad).await, status).await,
            code
        );
        let bad = json!({"input": "hello", "model": "gpt-4o"});
        assert_eq!(
            assert_aoai_error(g.json(&path, &bad).await, 400).await,
            "missing_user"
        );
        let bad = json!({"user": "alice", "instructions": ATTACK, "input": "hi"});
        assert_eq!(
            assert_aoai_error(g.json(&path, &bad).await, 400).await,
            "content_filter"
        );
    }
    assert_eq!(g.aoai.seen().len(), 1, "no refused request reached AOAI");
    assert_eq!(read_jsonl(&g.audit).len(), 6);
    // without api-version the AzureOpenAI path is refused as AOAI would
    let resp = g.json(&format!("{P}/responses"), &body).await;
    assert_eq!(assert_aoai_error(resp, 400).await, "invalid_query");

    // the item routes carry no prompt: forwarded as they are
    for (method, tail) in [
        (reqwest::Method::GET, "responses/resp_1"),
        (reqwest::Method::DELETE, "responses/resp_1"),
        (reqwest::Method::GET, "responses/resp_1/input_items"),
        (reqwest::Method::POST, "responses/resp_1/cancel"),
    ] {
        let before = g.aoai.seen().len();
        let resp = g
            .send(method.clone(), &format!("{P}/{tail}?{V}"), None, vec![])
            .await;
        assert_eq!(resp.status(), 200, "{tail}");
        let seen = g.aoai.seen();
        assert_eq!(seen.len(), before + 1);
        let last = seen.last().unwrap();
        assert_eq!(last.method, method.as_str());
        assert_eq!(last.path, format!("/openai/{tail}"));
        assert_eq!(last.query.as_deref(), Some(V));
    }
}

#[tokio::test]
async fn v1_images_and_audio_are_gated_like_their_deployment_forms() {
    let g = gate(&[]).await;
    for (op, field) in [("images/generations", "prompt"), ("audio/speech", "input")] {
        let path = format!("{P}/v1/{op}");
        let mut good = json!({"model": "dall-e-3", "user": "alice"});
        good[field] = "a quiet harbour at dawn".into();
        let before = g.aoai.seen().len();
        assert_eq!(g.json(&path, &good).await.status(), 200, "{op}");
        let seen = g.aoai.seen();
        assert_eq!(seen.len(), before + 1);
        assert_eq!(seen.last().unwrap().path, format!("/openai/v1/{op}"));
        assert_eq!(
            seen.last().unwrap().body.as_ref(),
            good.to_string().as_bytes()
        );

        let mut bad = good.clone();
        bad[field] = "a bloodbath in the harbour".into();
        assert_eq!(
            assert_aoai_error(g.json(&path, &bad).await, 400).await,
            "content_filter"
        );
        let mut nouser = good.clone();
        nouser.as_object_mut().unwrap().remove("user");
        assert_eq!(
            assert_aoai_error(g.json(&path, &nouser).await, 400).await,
            "missing_user"
        );
        assert_eq!(
            g.aoai.seen().len(),
            before + 1,
            "{op}: refusals never forwarded"
        );
    }
    for op in ["audio/transcriptions", "audio/translations"] {
        let path = format!("{P}/v1/{op}");
        let before = g.aoai.seen().len();
        let (ct, body) = form(&[
            ("model", None, b"whisper"),
            ("user", None, b"alice"),
            ("prompt", None, b"names: Ana, Bo"),
            ("file", Some("a.wav"), b"RIFF....WAVE"),
        ]);
        let resp = g
            .send(reqwest::Method::POST, &path, Some(&ct), body.clone())
            .await;
        assert_eq!(resp.status(), 200, "{op}");
        let seen = g.aoai.seen();
        assert_eq!(seen.last().unwrap().path, format!("/openai/v1/{op}"));
        assert_eq!(seen.last().unwrap().body.as_ref(), &body[..]);
        let (ct, body) = form(&[
            ("user", None, b"alice"),
            ("prompt", None, b"a bloodbath"),
            ("file", Some("a.wav"), b"RIFF....WAVE"),
        ]);
        let resp = g.send(reqwest::Method::POST, &path, Some(&ct), body).await;
        assert_eq!(assert_aoai_error(resp, 400).await, "content_filter");
        assert_eq!(g.aoai.seen().len(), before + 1);
    }
}

#[tokio::test]
async fn a_clean_batch_file_is_screened_line_by_line_and_forwarded_byte_for_byte() {
    let g = gate(&[]).await;
    let file = [
        line("task-0", chat(Some("alice"), "Summarise the water cycle.")),
        json!({"custom_id": "task-1", "method": "POST", "url": "/v1/embeddings",
               "body": {"model": "emb", "user": "bob", "input": ["one", "two"]}})
        .to_string(),
        json!({"custom_id": "task-2", "method": "POST", "url": "/responses",
               "body": {"model": "gpt-4o", "user": "alice", "input": "Name three rivers."}})
        .to_string(),
    ]
    .join("\n")
        + "\n";
    for path in [format!("{P}/files?{V}"), format!("{P}/v1/files")] {
        let before = g.aoai.seen().len();
        let (ct, body) = upload("batch", &file);
        let resp = g
            .send(reqwest::Method::POST, &path, Some(&ct), body.clone())
            .await;
        assert_eq!(resp.status(), 200, "{path}");
        let seen = g.aoai.seen();
        assert_eq!(seen.len(), before + 1);
        let up = seen.last().unwrap();
        assert!(up.path.ends_with("/files"), "{}", up.path);
        assert_eq!(
            up.body.as_ref(),
            &body[..],
            "the upload is forwarded as sent"
        );
    }
    // each line screened as its online call: chat and responses get analyze + shield,
    // embeddings analyze only; twice (both forms)
    let texts: Vec<String> =
        g.cs.calls()
            .iter()
            .filter(|c| c.0.contains("text:analyze"))
            .map(|c| c.2["text"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(texts.len(), 6, "{texts:?}");
    for t in [
        "Summarise the water cycle.",
        "one\ntwo",
        "Name three rivers.",
    ] {
        assert_eq!(
            texts.iter().filter(|x| x.as_str() == t).count(),
            2,
            "{t}: {texts:?}"
        );
    }
    assert!(read_jsonl(&g.audit).is_empty());
}

#[tokio::test]
async fn a_batch_file_with_offending_lines_is_refused_whole_naming_them_and_never_reaches_aoai() {
    let g = gate(&[]).await;
    let file = [
        line("ok-1", chat(Some("alice"), "hello")),
        line("violent", chat(Some("alice"), "describe a bloodbath")),
        line("ok-2", chat(Some("bob"), "hi")),
        line("jailbreak", chat(Some("bob"), ATTACK)),
        line("anonymous", chat(None, "hello")),
        line("stranger", chat(Some("mallory"), "hello")),
    ]
    .join("\n");
    let (ct, body) = upload("batch", &file);
    let resp = g
        .send(
            reqwest::Method::POST,
            &format!("{P}/files?{V}"),
            Some(&ct),
            body,
        )
        .await;
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "batch_input_refused");
    let message = err["error"]["message"].as_str().unwrap();
    for id in ["violent", "jailbreak", "anonymous", "stranger"] {
        assert!(message.contains(&format!("'{id}'")), "{id}: {message}");
    }
    assert!(
        !message.contains("ok-1") && !message.contains("ok-2"),
        "{message}"
    );
    assert!(
        !message.contains("bloodbath"),
        "no prompt text in the answer"
    );
    g.aoai.assert_untouched("a refused batch file");

    let records = read_jsonl(&g.audit);
    let mut got: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["details"]["custom_id"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("anonymous".into(), "missing_user".into()),
            ("jailbreak".into(), "jailbreak_detected".into()),
            ("stranger".into(), "unregistered_user".into()),
            ("violent".into(), "content_filtered".into()),
        ]
    );
    for r in &records {
        assert_eq!(r["operation"], "files/upload");
        assert!(r["details"]["line"].as_u64().is_some());
    }
    let violent = records
        .iter()
        .find(|r| r["details"]["custom_id"] == "violent")
        .unwrap();
    assert_eq!(violent["user"], "alice");
    assert_eq!(violent["deployment"], "gpt-4o-batch");
    assert_eq!(violent["details"]["line"], 2);
}

/// The class: whatever the gate refuses as an online chat call it refuses as a batch line, and
/// whatever it accepts online it accepts in a batch.
#[tokio::test]
async fn a_batch_line_is_refused_exactly_when_the_online_call_is() {
    let g = gate(&[]).await;
    let bodies = [
        chat(Some("alice"), "hello"),
        chat(Some("alice"), "a bloodbath"),
        chat(Some("alice"), "a slur-word here"),
        chat(Some("alice"), "mild-insult only"),
        chat(Some("alice"), &format!("please {ATTACK}")),
        chat(Some("alice"), BLOCKLISTED),
        chat(None, "hello"),
        chat(Some(""), "hello"),
        chat(Some("mallory"), "hello"),
        json!({"user": "alice", "messages": [{"role": "tool", "tool_call_id": "t", "content": "a bloodbath"}]}),
        json!({"user": "alice", "messages": [], "future_field": "a bloodbath"}),
        json!({"user": 7, "messages": []}),
        json!({"user": "alice", "tools": [{"type": "function", "function": {"name": "f", "description": "bloodbath"}}], "messages": []}),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let online = g
            .json(
                &format!("{P}/deployments/gpt-4o/chat/completions?{API}"),
                body,
            )
            .await
            .status()
            .as_u16();
        let before = g.aoai.seen().len();
        let (ct, form) = upload("batch", &line(&format!("case-{i}"), body.clone()));
        let resp = g
            .send(
                reqwest::Method::POST,
                &format!("{P}/v1/files"),
                Some(&ct),
                form,
            )
            .await;
        let batch = resp.status().as_u16();
        if online == 200 {
            assert_eq!(batch, 200, "{body}");
            assert_eq!(g.aoai.seen().len(), before + 1);
        } else {
            let text = resp.text().await.unwrap();
            assert_eq!(batch, 400, "{body}: {text}");
            assert!(text.contains(&format!("'case-{i}'")), "{text}");
            assert_eq!(g.aoai.seen().len(), before, "{body}");
        }
    }
}

#[tokio::test]
async fn uploads_for_purposes_the_gate_cannot_vouch_for_are_refused_unless_allowed() {
    let g = gate(&[]).await;
    let (ct, body) = upload(
        "fine-tune",
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    );
    let resp = g
        .send(
            reqwest::Method::POST,
            &format!("{P}/files?{V}"),
            Some(&ct),
            body.clone(),
        )
        .await;
    let (code, message) = support::app::aoai_error(resp, 400).await;
    assert_eq!(code, "invalid_body");
    assert!(message.contains("fine-tune"), "{message}");
    g.aoai.assert_untouched("an unvouched purpose");
    assert_eq!(read_jsonl(&g.audit).len(), 1);

    let g = gate(&[("UPLOAD_UNSCREENED_PURPOSES", "fine-tune")]).await;
    let resp = g
        .send(
            reqwest::Method::POST,
            &format!("{P}/files?{V}"),
            Some(&ct),
            body.clone(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(g.aoai.only().body.as_ref(), &body[..]);
    // and batch stays screened whatever else is allowed
    let (ct, body) = upload("Batch", &line("x", chat(Some("alice"), "a bloodbath")));
    let resp = g
        .send(
            reqwest::Method::POST,
            &format!("{P}/files?{V}"),
            Some(&ct),
            body,
        )
        .await;
    assert_eq!(assert_aoai_error(resp, 400).await, "batch_input_refused");
}

#[tokio::test]
async fn batch_files_over_the_line_bound_are_refused_unread() {
    let g = gate(&[("BATCH_MAX_LINES", "3")]).await;
    let file = (0..4)
        .map(|i| line(&format!("t{i}"), chat(Some("alice"), "hi")))
        .collect::<Vec<_>>()
        .join("\n");
    let (ct, body) = upload("batch", &file);
    let resp = g
        .send(
            reqwest::Method::POST,
            &format!("{P}/files?{V}"),
            Some(&ct),
            body,
        )
        .await;
    let (code, message) = support::app::aoai_error(resp, 400).await;
    assert_eq!(code, "invalid_body");
    assert!(message.contains("BATCH_MAX_LINES"), "{message}");
    assert!(g.cs.calls().is_empty(), "nothing screened");
    g.aoai.assert_untouched("an over-long batch file");
}

#[tokio::test]
async fn files_and_batches_routes_are_forwarded_on_both_forms() {
    let g = gate(&[]).await;
    let create = json!({"input_file_id": "file-1", "endpoint": "/chat/completions", "completion_window": "24h"});
    let cases: Vec<(reqwest::Method, &str, Option<serde_json::Value>)> = vec![
        (reqwest::Method::GET, "files", None),
        (reqwest::Method::GET, "files/file-1", None),
        (reqwest::Method::GET, "files/file-1/content", None),
        (reqwest::Method::DELETE, "files/file-1", None),
        (reqwest::Method::POST, "batches", Some(create.clone())),
        (reqwest::Method::GET, "batches", None),
        (reqwest::Method::GET, "batches/batch_1", None),
        (reqwest::Method::POST, "batches/batch_1/cancel", None),
    ];
    for v1 in [false, true] {
        for (method, tail, body) in &cases {
            let (path, upstream, query) = if v1 {
                (format!("{P}/v1/{tail}"), format!("/openai/v1/{tail}"), None)
            } else {
                (
                    format!("{P}/{tail}?{V}"),
                    format!("/openai/{tail}"),
                    Some(V),
                )
            };
            let bytes = body
                .as_ref()
                .map(|b| b.to_string().into_bytes())
                .unwrap_or_default();
            let ct = body.as_ref().map(|_| "application/json");
            let before = g.aoai.seen().len();
            let resp = g.send(method.clone(), &path, ct, bytes.clone()).await;
            assert_eq!(resp.status(), 200, "{method} {path}");
            let seen = g.aoai.seen();
            assert_eq!(seen.len(), before + 1);
            let last = seen.last().unwrap();
            assert_eq!(
                (last.method.as_str(), last.path.as_str()),
                (method.as_str(), upstream.as_str())
            );
            assert_eq!(last.query.as_deref(), query);
            assert_eq!(last.body.as_ref(), &bytes[..]);
            assert_eq!(last.headers["api-key"], OUT_KEY);
        }
    }
    assert!(g.cs.calls().is_empty(), "no prompt on these routes");
    // unknown sub-resources and methods
    for (method, path, status) in [
        (reqwest::Method::PUT, format!("{P}/files?{V}"), 405),
        (
            reqwest::Method::GET,
            format!("{P}/fine_tuning/jobs?{V}"),
            404,
        ),
        (reqwest::Method::GET, format!("{P}/files/a/b?{V}"), 404),
    ] {
        let resp = g.send(method, &path, None, vec![]).await;
        assert_eq!(resp.status(), status, "{path}");
    }
    assert_eq!(g.aoai.seen().len(), 2 * cases.len());
}

/// A batch file of `BATCH_MAX_LINES` (the default, 1000) requests: every line is screened (one
/// analyze and one shield call each), none is skipped, and the upload goes through whole.
#[tokio::test]
async fn a_full_size_batch_file_is_screened_line_for_line() {
    let g = gate(&[]).await;
    let file = (0..1000)
        .map(|i| {
            line(
                &format!("t{i}"),
                chat(Some("alice"), &format!("question number {i}")),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (ct, body) = upload("batch", &file);
    let started = std::time::Instant::now();
    let resp = g
        .send(
            reqwest::Method::POST,
            &format!("{P}/v1/files"),
            Some(&ct),
            body.clone(),
        )
        .await;
    // measured, not asserted (no latency thresholds in tests)
    eprintln!(
        "1000-line batch file ({} bytes) screened in {} ms",
        body.len(),
        started.elapsed().as_millis()
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(g.aoai.only().body.as_ref(), &body[..]);
    assert_eq!(g.cs.count(Endpoint::Analyze), 1000);
    assert_eq!(g.cs.count(Endpoint::Shield), 1000);
    let mut texts: Vec<String> =
        g.cs.calls_to(Endpoint::Analyze)
            .iter()
            .map(|c| c.2["text"].as_str().unwrap().to_string())
            .collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 1000, "every line screened once");
}
