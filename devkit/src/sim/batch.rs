//! Files and batches for the AOAI simulator: a minimal lifecycle, enough for the OpenAI SDK's
//! `files.create(purpose="batch")`, `batches.create`, `batches.retrieve` and
//! `files.content(output_file_id)` to run against the local set.
//!
//! Routes (both `/openai/…?api-version=…` and `/openai/v1/…`): `files` (POST multipart upload,
//! GET list), `files/{id}` (GET, DELETE), `files/{id}/content` (GET), `batches` (POST create,
//! GET list), `batches/{id}` (GET), `batches/{id}/cancel` (POST). A batch completes as soon as
//! it is created: each input line gets a canned answer in the output file (status 200), so a
//! client polling `retrieve` sees `completed` at once. Bounded: at most [`MAX_ITEMS`] files and
//! batches are kept (the oldest go first).

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

/// Most files (and batches) kept at once.
pub const MAX_ITEMS: usize = 256;

#[derive(Debug, Clone)]
struct File {
    meta: Value,
    content: Vec<u8>,
}

/// The simulator's files and batches.
#[derive(Debug, Default)]
pub struct Store {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    files: BTreeMap<String, File>,
    batches: BTreeMap<String, Value>,
}

impl Inner {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{:06}", self.next)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn answer(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: u16, code: &str, message: &str) -> Response {
    answer(status, json!({"error": {"code": code, "message": message}}))
}

/// Answer `path` when it is a files or batches route (`None` otherwise: not ours).
pub fn handle(
    store: &Store,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (rest, v1) = match segs.as_slice() {
        ["openai", "v1", rest @ ..] => (rest, true),
        ["openai", rest @ ..] => (rest, false),
        _ => return None,
    };
    if !matches!(rest.first(), Some(&"files") | Some(&"batches")) {
        return None;
    }
    let has_version = query.is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=")));
    if !v1 && !has_version {
        return Some(error(
            400,
            "BadRequest",
            "Missing required query parameter: api-version",
        ));
    }
    let mut s = store.inner.lock().unwrap_or_else(|e| e.into_inner());
    Some(match (method.clone(), rest) {
        (Method::POST, ["files"]) => upload(&mut s, headers, body),
        (Method::GET, ["files"]) => answer(
            200,
            json!({"object": "list", "data": s.files.values().map(|f| f.meta.clone()).collect::<Vec<_>>()}),
        ),
        (Method::GET, ["files", id]) => match s.files.get(*id) {
            Some(f) => answer(200, f.meta.clone()),
            None => not_found(),
        },
        (Method::DELETE, ["files", id]) => match s.files.remove(*id) {
            Some(_) => answer(200, json!({"id": id, "object": "file", "deleted": true})),
            None => not_found(),
        },
        (Method::GET, ["files", id, "content"]) => match s.files.get(*id) {
            Some(f) => Response::builder()
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .body(Body::from(f.content.clone()))
                .unwrap_or_else(|_| error(500, "InternalServerError", "response")),
            None => not_found(),
        },
        (Method::POST, ["batches"]) => create_batch(&mut s, body),
        (Method::GET, ["batches"]) => answer(
            200,
            json!({"object": "list", "data": s.batches.values().cloned().collect::<Vec<_>>(), "has_more": false}),
        ),
        (Method::GET, ["batches", id]) => match s.batches.get(*id) {
            Some(b) => answer(200, b.clone()),
            None => not_found(),
        },
        (Method::POST, ["batches", id, "cancel"]) => match s.batches.get_mut(*id) {
            Some(b) => {
                if b["status"] != "completed" {
                    b["status"] = "cancelled".into();
                    b["cancelled_at"] = now().into();
                }
                answer(200, b.clone())
            }
            None => not_found(),
        },
        _ => error(405, "MethodNotAllowed", "The HTTP method is not allowed."),
    })
}

fn not_found() -> Response {
    error(404, "NotFound", "The requested resource does not exist.")
}

fn bound<T>(map: &mut BTreeMap<String, T>) {
    while map.len() >= MAX_ITEMS {
        let Some(first) = map.keys().next().cloned() else {
            break;
        };
        map.remove(&first);
    }
}

/// The fields of a `multipart/form-data` body, leniently (the handler in front reads strictly).
fn form_fields<'a>(headers: &HeaderMap, body: &'a [u8]) -> Vec<(String, &'a [u8])> {
    let Some(boundary) = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| {
            ct.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
                .map(|b| b.trim_matches('"').to_string())
        })
    else {
        return Vec::new();
    };
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = find(rest, delim.as_bytes()) {
        rest = &rest[at + delim.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let Some(head_end) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let after = &rest[head_end + 4..];
        let end = find(after, format!("\r\n{delim}").as_bytes()).unwrap_or(after.len());
        let name = head
            .split(';')
            .find_map(|p| p.trim().strip_prefix("name="))
            .map(|n| n.trim_matches('"').to_string())
            .unwrap_or_default();
        out.push((name, &after[..end]));
        rest = &after[end..];
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn upload(s: &mut Inner, headers: &HeaderMap, body: &[u8]) -> Response {
    let fields = form_fields(headers, body);
    let get = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    let (Some(purpose), Some(content)) = (get("purpose"), get("file")) else {
        return error(
            400,
            "invalidPayload",
            "The upload must be multipart/form-data with 'purpose' and 'file'.",
        );
    };
    let purpose = String::from_utf8_lossy(purpose).to_string();
    bound(&mut s.files);
    let id = s.id("file");
    let meta = json!({
        "id": id, "object": "file", "bytes": content.len(), "created_at": now(),
        "filename": "input.jsonl", "purpose": purpose, "status": "processed",
    });
    s.files.insert(
        id,
        File {
            meta: meta.clone(),
            content: content.to_vec(),
        },
    );
    answer(200, meta)
}

fn canned(url: &str, body: &Value) -> Value {
    let model = body.get("model").cloned().unwrap_or(Value::Null);
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10});
    if url.ends_with("embeddings") {
        return json!({"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5}});
    }
    if url.ends_with("responses") {
        return json!({"object": "response", "status": "completed", "model": model,
            "output": [{"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "Simulated batch answer."}]}],
            "usage": {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10}});
    }
    json!({"object": "chat.completion", "model": model, "choices": [{"index": 0,
        "message": {"role": "assistant", "content": "Simulated batch answer."},
        "finish_reason": "stop"}], "usage": usage})
}

fn create_batch(s: &mut Inner, body: &[u8]) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (Some(file_id), Some(endpoint)) = (
        req.get("input_file_id").and_then(Value::as_str),
        req.get("endpoint").and_then(Value::as_str),
    ) else {
        return error(
            400,
            "invalidPayload",
            "input_file_id and endpoint are required.",
        );
    };
    let Some(input) = s.files.get(file_id).cloned() else {
        return error(404, "NotFound", "The input file does not exist.");
    };
    let mut output = String::new();
    let mut failed = 0;
    let mut total = 0;
    for line in input.content.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        total += 1;
        let Ok(l) = serde_json::from_slice::<Value>(line) else {
            failed += 1;
            continue;
        };
        let url = l["url"].as_str().unwrap_or(endpoint);
        let n = s.next + total;
        output.push_str(
            &json!({
                "id": format!("batch_req_{n}"),
                "custom_id": l["custom_id"],
                "response": {"status_code": 200, "request_id": format!("req-{n}"),
                    "body": canned(url, &l["body"])},
                "error": null,
            })
            .to_string(),
        );
        output.push('\n');
    }
    bound(&mut s.files);
    bound(&mut s.batches);
    let out_id = s.id("file");
    let out_meta = json!({
        "id": out_id, "object": "file", "bytes": output.len(), "created_at": now(),
        "filename": "output.jsonl", "purpose": "batch_output", "status": "processed",
    });
    s.files.insert(
        out_id.clone(),
        File {
            meta: out_meta,
            content: output.into_bytes(),
        },
    );
    let id = s.id("batch");
    let t = now();
    let batch = json!({
        "id": id, "object": "batch", "endpoint": endpoint, "errors": null,
        "input_file_id": file_id, "completion_window": req.get("completion_window").cloned().unwrap_or("24h".into()),
        "status": "completed", "output_file_id": out_id, "error_file_id": null,
        "created_at": t, "in_progress_at": t, "finalizing_at": t, "completed_at": t,
        "expires_at": t + 86_400, "failed_at": null, "cancelled_at": null,
        "request_counts": {"total": total, "completed": total - failed, "failed": failed},
        "metadata": req.get("metadata").cloned().unwrap_or(Value::Null),
    });
    s.batches.insert(id, batch.clone());
    answer(200, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(store: &Store, method: Method, path: &str, ct: Option<&str>, body: &[u8]) -> Value {
        let mut h = HeaderMap::new();
        if let Some(ct) = ct {
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        }
        let resp = handle(
            store,
            &method,
            path,
            Some("api-version=2024-10-21"),
            &h,
            body,
        )
        .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let bytes = futures_executor(resp);
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    }

    fn futures_executor(resp: Response) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap()
                .to_vec()
        })
    }

    #[test]
    fn a_batch_runs_from_upload_to_output() {
        let store = Store::default();
        let line = r#"{"custom_id":"t1","method":"POST","url":"/chat/completions","body":{"model":"gpt-4o","messages":[]}}"#;
        let body = format!(
            "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n{line}\n\r\n--b--\r\n"
        );
        let f = call(
            &store,
            Method::POST,
            "/openai/files",
            Some("multipart/form-data; boundary=b"),
            body.as_bytes(),
        );
        assert_eq!(f["purpose"], "batch");
        let create = json!({"input_file_id": f["id"], "endpoint": "/chat/completions", "completion_window": "24h"});
        let b = call(
            &store,
            Method::POST,
            "/openai/v1/batches",
            None,
            create.to_string().as_bytes(),
        );
        assert_eq!(b["status"], "completed");
        assert_eq!(b["request_counts"]["total"], 1);
        let got = call(
            &store,
            Method::GET,
            &format!("/openai/batches/{}", b["id"].as_str().unwrap()),
            None,
            b"",
        );
        assert_eq!(got["id"], b["id"]);
        let out = call(
            &store,
            Method::GET,
            &format!(
                "/openai/files/{}/content",
                b["output_file_id"].as_str().unwrap()
            ),
            None,
            b"",
        );
        let out: Value = serde_json::from_str(
            out.as_str()
                .unwrap_or(&out.to_string())
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(out["custom_id"], "t1");
        assert_eq!(out["response"]["status_code"], 200);
        assert!(handle(
            &store,
            &Method::GET,
            "/openai/deployments/x/chat/completions",
            None,
            &HeaderMap::new(),
            b""
        )
        .is_none());
    }
}
