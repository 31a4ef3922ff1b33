//! Test harness, under the names the older tests use: everything here delegates to the one
//! test-support module (`tests/support`), which a test can also take directly.
//!
//! [`MockAoai`] records every request it receives (method, path, query, headers, body) and
//! answers with the [`Reply`] the test scripted, so a test asserts on both what the client got
//! and what the upstream saw. [`TestApp`] runs the real router and server loop in-process.
#![allow(dead_code, unused_imports)]

/// The one test-support module, under the path the older tests use (`common::support::…`).
pub use crate::support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::HeaderMap;
use http_body_util::BodyExt;

pub use support::aoai::{serve_mock, MockAoai, Reply, Seen};
pub use support::app::{
    assert_aoai_error, test_settings, TestApp, API, IN_KEY, OTHER_KEY, OUT_KEY,
};
pub use support::scratch::read_jsonl;
pub use support::wait::{eventually, PATIENCE};

/// A loopback address nothing listens on, for the rest of the process: the port stays bound
/// (never listening) so no other test can take it.
pub async fn closed_port() -> String {
    let refusing = Box::leak(Box::new(support::aoai::refusing_port()));
    refusing.url.clone()
}

/// The Content Safety fake lives in `tests/support/content_safety.rs` (one fake for every
/// test); `MockContentSafety` is its old name here.
pub use support::content_safety::{
    Canned, ContentSafetyFake, CsCall, Endpoint, ATTACK, BLOCKLISTED, CS_KEY, FLAGS,
};
pub type MockContentSafety = ContentSafetyFake;

/// A fresh temp file path for this test (in its own directory).
pub fn temp_path(name: &str) -> std::path::PathBuf {
    support::scratch::leaked_file("test", &format!("{name}.jsonl"))
}

/// The gate on: the user check (`alice` and `bob` registered) and screening, against a fake AOAI
/// and the Content Safety fake, abuse records in `audit`. `extra` settings replace these.
pub struct Gate {
    pub aoai: MockAoai,
    pub cs: MockContentSafety,
    pub app: TestApp,
    pub audit: std::path::PathBuf,
}

pub async fn gate(extra: &[(&str, &str)]) -> Gate {
    let aoai = MockAoai::start().await;
    let cs = MockContentSafety::start().await;
    let audit = temp_path("audit");
    let mut settings: Vec<(&str, String)> = vec![
        ("USER_CHECK", "registered".into()),
        ("REGISTERED_USERS", "alice, bob".into()),
        ("CONTENT_SAFETY_ENDPOINT", cs.base()),
        ("CONTENT_SAFETY_KEY", CS_KEY.into()),
        ("AUDIT_LOG_PATH", audit.display().to_string()),
    ];
    for (k, v) in extra {
        settings.retain(|(n, _)| n != k);
        settings.push((k, v.to_string()));
    }
    let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = TestApp::start(&aoai.base(), &pairs).await;
    Gate {
        aoai,
        cs,
        app,
        audit,
    }
}
