//! Every route the router accepts and refuses, through the app: one table, one row per route,
//! method or bad path, each checked on both sides — what the client got (status, AOAI-shaped
//! error code) and what the upstream mock saw (method, path, query), or that it saw nothing.

use crate::common;

use common::support::app::raw_request;
use common::*;

/// What the upstream must have seen for a row: nothing, or exactly this request.
#[derive(Debug)]
enum Upstream {
    Nothing,
    /// method, path, query (`None`: no query string at all)
    Saw(&'static str, &'static str, Option<&'static str>),
}
use Upstream::*;

/// One row: method, client path and query, client status, error code (for handler errors).
struct Row {
    method: &'static str,
    path: &'static str,
    status: u16,
    code: Option<&'static str>,
    upstream: Upstream,
}

const fn ok(method: &'static str, path: &'static str, upstream: Upstream) -> Row {
    Row {
        method,
        path,
        status: 200,
        code: None,
        upstream,
    }
}

const fn refused(method: &'static str, path: &'static str, status: u16, code: &'static str) -> Row {
    Row {
        method,
        path,
        status,
        code: Some(code),
        upstream: Nothing,
    }
}

const Q: &str = "api-version=2024-10-21";
// `code` (a Functions key) is dropped, everything else is passed on in order, still encoded.
const QUERY_OUT: Option<&str> = Some("api-version=2024-10-21&extra=a%26b");

macro_rules! p {
    ($($part:expr),+) => { concat!($($part),+) };
}

fn rows() -> Vec<Row> {
    vec![
        // --- deployments: the AppGW short names ---
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chatcompletions", "?api-version=2024-10-21&code=functions-key-secret&extra=a%26b"),
            Saw("POST", "/openai/deployments/gpt-4o/chat/completions", QUERY_OUT)),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/extensionschatcompletions", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/extensions/chat/completions", Some(Q))),
        // --- deployments: native AOAI operation paths ---
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chat/completions", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/chat/completions", Some(Q))),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/extensions/chat/completions", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/extensions/chat/completions", Some(Q))),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/completions", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/completions", Some(Q))),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/embeddings", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/embeddings", Some(Q))),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/images/generations", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/images/generations", Some(Q))),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/audio/transcriptions", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/audio/transcriptions", Some(Q))),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/audio/translations", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/audio/translations", Some(Q))),
        ok("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/audio/speech", "?api-version=2024-10-21"),
            Saw("POST", "/openai/deployments/gpt-4o/audio/speech", Some(Q))),
        // deployment names: letters, digits, '-', '_', '.' up to 64
        ok("POST", "/api/FwdProxy/openai/deployments/My.model_v2-1/chatcompletions?api-version=2024-10-21",
            Saw("POST", "/openai/deployments/My.model_v2-1/chat/completions", Some(Q))),
        // the route prefix matches case-insensitively, as the Functions host matches routes
        ok("POST", "/API/fwdproxy/OpenAI/deployments/gpt-4o/chatcompletions?api-version=2024-10-21",
            Saw("POST", "/openai/deployments/gpt-4o/chat/completions", Some(Q))),
        // --- the v1 surface: no api-version needed, one passed on when given ---
        ok("POST", p!("/api/FwdProxy/openai/v1", "/chat/completions"), Saw("POST", "/openai/v1/chat/completions", None)),
        ok("POST", p!("/api/FwdProxy/openai/v1", "/completions"), Saw("POST", "/openai/v1/completions", None)),
        ok("POST", p!("/api/FwdProxy/openai/v1", "/embeddings"), Saw("POST", "/openai/v1/embeddings", None)),
        ok("POST", p!("/api/FwdProxy/openai/v1", "/responses?api-version=preview&code=k"),
            Saw("POST", "/openai/v1/responses", Some("api-version=preview"))),
        ok("GET", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123"), Saw("GET", "/openai/v1/responses/resp_abc123", None)),
        ok("DELETE", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123"), Saw("DELETE", "/openai/v1/responses/resp_abc123", None)),
        ok("GET", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123/input_items?limit=5&order=asc"),
            Saw("GET", "/openai/v1/responses/resp_abc123/input_items", Some("limit=5&order=asc"))),
        ok("POST", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123/cancel"),
            Saw("POST", "/openai/v1/responses/resp_abc123/cancel", None)),
        ok("GET", p!("/api/FwdProxy/openai/v1", "/models"), Saw("GET", "/openai/v1/models", None)),
        ok("GET", p!("/api/FwdProxy/openai/v1", "/models/gpt-4o"), Saw("GET", "/openai/v1/models/gpt-4o", None)),
        // --- issue 19: the AzureOpenAI client's responses/files/batches form, and v1 files ---
        ok("GET", p!("/api/FwdProxy/openai", "/responses/resp_abc123?api-version=2024-10-21"),
            Saw("GET", "/openai/responses/resp_abc123", Some(Q))),
        ok("GET", p!("/api/FwdProxy/openai", "/files/file-1/content?api-version=2024-10-21"),
            Saw("GET", "/openai/files/file-1/content", Some(Q))),
        ok("GET", p!("/api/FwdProxy/openai/v1", "/files"), Saw("GET", "/openai/v1/files", None)),
        ok("POST", p!("/api/FwdProxy/openai", "/batches/batch_1/cancel?api-version=2024-10-21"),
            Saw("POST", "/openai/batches/batch_1/cancel", Some(Q))),
        // --- health: GET and HEAD, no key needed, never upstream ---
        ok("GET", "/api/FwdProxy/openai/deployments/health/check", Nothing),
        ok("HEAD", "/api/FwdProxy/openai/deployments/health/check", Nothing),
        // --- wrong methods: 405 ---
        refused("POST", "/api/FwdProxy/openai/deployments/health/check", 405, "method_not_allowed"),
        refused("DELETE", "/api/FwdProxy/openai/deployments/health/check", 405, "method_not_allowed"),
        refused("GET", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chatcompletions?api-version=2024-10-21"), 405, "method_not_allowed"),
        refused("PUT", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/embeddings?api-version=2024-10-21"), 405, "method_not_allowed"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/chat/completions"), 405, "method_not_allowed"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/responses"), 405, "method_not_allowed"),
        refused("POST", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123"), 405, "method_not_allowed"),
        refused("PATCH", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123"), 405, "method_not_allowed"),
        refused("DELETE", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123/input_items"), 405, "method_not_allowed"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/responses/resp_abc123/cancel"), 405, "method_not_allowed"),
        refused("POST", p!("/api/FwdProxy/openai/v1", "/models"), 405, "method_not_allowed"),
        refused("DELETE", p!("/api/FwdProxy/openai/v1", "/models/gpt-4o"), 405, "method_not_allowed"),
        // --- bad paths: 400 ---
        refused("POST", "/api/FwdProxy/openai/deployments/a%2Fb/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/a%2fb/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/..%2F..%2Fadmin/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/%2e%2e/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/../chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/gpt-4o/./chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments//chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions/?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/x%0Ay/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/x%00/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/a~b/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("POST", "/api/FwdProxy/openai/deployments/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/chatcompletions?api-version=2024-10-21", 400, "invalid_path"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/responses/resp%2F..%2Fx"), 400, "invalid_path"),
        refused("POST", p!("/api/FwdProxy/openai/v1", "/responses/resp_1/cancel/"), 400, "invalid_path"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/responses/../models"), 400, "invalid_path"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/responses/resp%5F1"), 400, "invalid_path"),
        // --- bad queries: 400 ---
        refused("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chatcompletions"), 400, "invalid_query"),
        refused("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chatcompletions?api-version="), 400, "invalid_query"),
        refused("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chatcompletions?api-version=1&api-version=2"), 400, "invalid_query"),
        refused("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chatcompletions?api-version=1%0d%0aX:1"), 400, "invalid_query"),
        refused("POST", p!("/api/FwdProxy/openai/v1", "/responses?x=%07"), 400, "invalid_query"),
        // --- unknown: 404 ---
        refused("POST", "/", 404, "404"),
        refused("GET", "/api/other", 404, "404"),
        refused("POST", "/api/FwdProxy/openai/models?api-version=1", 404, "404"),
        refused("POST", "/api/FwdProxy/openai/deployments/gpt-4o?api-version=1", 404, "404"),
        refused("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/fine-tunes?api-version=1"), 404, "404"),
        refused("POST", p!("/api/FwdProxy/openai/deployments/gpt-4o", "/chat/completions/extra?api-version=1"), 404, "404"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/fine_tuning/jobs"), 404, "404"),
        refused("GET", p!("/api/FwdProxy/openai", "/realtime?api-version=1"), 404, "404"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/responses/resp_1/input_items/x"), 404, "404"),
        refused("GET", p!("/api/FwdProxy/openai/v1", "/models/a/b"), 404, "404"),
    ]
}

#[tokio::test]
async fn every_route_method_and_bad_path() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let rows = rows();
    let mut expected_upstream = 0;
    for row in &rows {
        let what = format!("{} {}", row.method, row.path);
        let body = if matches!(row.method, "POST" | "PUT" | "PATCH") {
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#
        } else {
            ""
        };
        let before = aoai.seen().len();
        let resp = raw_request(
            app.addr,
            row.method,
            row.path,
            &[("api-key", IN_KEY), ("content-type", "application/json")],
            body,
        )
        .await;
        assert!(resp.headers.get("x-request-id").is_some(), "{what}");
        match row.code {
            None => {
                assert_eq!(resp.status, row.status, "{what}");
                match &row.upstream {
                    // health answers itself
                    Nothing if row.method == "HEAD" => assert!(resp.body.is_empty(), "{what}"),
                    Nothing => {
                        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
                        assert_eq!(v["status"], "ok", "{what}");
                    }
                    // the upstream's answer, byte for byte
                    Saw(..) => {
                        assert_eq!(resp.body, common::support::aoai::DEFAULT_ANSWER, "{what}")
                    }
                }
            }
            Some(code) => assert_eq!(resp.aoai_error(row.status, &what), code, "{what}"),
        }
        let seen = aoai.seen();
        match &row.upstream {
            Nothing => assert_eq!(seen.len(), before, "{what}: the upstream saw a request"),
            Saw(method, path, query) => {
                expected_upstream += 1;
                assert_eq!(
                    seen.len(),
                    before + 1,
                    "{what}: exactly one upstream request"
                );
                let s = seen.last().unwrap();
                assert_eq!(s.method, *method, "{what}");
                assert_eq!(s.path, *path, "{what}");
                assert_eq!(s.query.as_deref(), *query, "{what}");
                assert!(s.body_error.is_none(), "{what}");
                assert_eq!(s.headers["api-key"], OUT_KEY, "{what}");
                if *method == "POST" {
                    assert!(!s.body.is_empty(), "{what}: the body went upstream");
                }
                let all = format!("{:?} {:?}", s.headers, s.query);
                assert!(
                    !all.contains("functions-key-secret") && !all.contains(IN_KEY),
                    "{what}"
                );
            }
        }
    }
    assert_eq!(aoai.seen().len(), expected_upstream);
    assert!(rows.len() > 60, "the table covers every route");
}

/// Health needs no key; every other route does, and refuses before anything goes upstream.
#[tokio::test]
async fn only_health_is_open_without_a_key() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    for row in rows().iter().filter(|r| r.code.is_none()) {
        let what = format!("{} {}", row.method, row.path);
        let resp = raw_request(app.addr, row.method, row.path, &[], "{}").await;
        match row.upstream {
            Nothing => assert_eq!(resp.status, 200, "{what}"),
            Saw(..) => assert_eq!(resp.aoai_error(401, &what), "401", "{what}"),
        }
    }
    aoai.assert_untouched("requests without a key");
}
