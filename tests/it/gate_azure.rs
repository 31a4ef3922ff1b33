//! The whole handler with its Azure parts: managed identity instead of keys, and the abuse log
//! in Cosmos DB (the SDK's in-memory emulator with fault injection) surviving an outage and a
//! restart. Black-box: the app on port 0; assertions on what the client, AOAI, Content Safety,
//! the identity endpoint and Cosmos each saw.

use crate::common;
use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aoai_fwdproxy::app::AppState;
use azure_data_cosmos::fault_injection::{
    FaultInjectionConditionBuilder, FaultInjectionErrorType, FaultInjectionResultBuilder,
    FaultInjectionRuleBuilder, FaultOperationType,
};
use common::*;
use support::cosmos_emu::Emu;
use support::mi_stub;

const CHAT_URL: &str =
    "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=2024-10-21";

#[tokio::test]
async fn managed_identity_replaces_every_key_and_tokens_are_cached() {
    let mi = mi_stub::stub();
    let client_id = "00000000-0000-0000-0000-00000000a1a1";
    let aoai = MockAoai::start().await;
    let cs = MockContentSafety::start().await;
    let cs_base = cs.base();
    let app = TestApp::start(
        &aoai.base(),
        &[
            ("AOAI_AUTH", "managed_identity"),
            ("AOAI_OUTAPIKEY", ""),
            ("AZURE_CLIENT_ID", client_id),
            ("CONTENT_SAFETY_ENDPOINT", &cs_base),
        ],
    )
    .await;
    for i in 0..5 {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"question {i}"}}]}}"#);
        assert_eq!(app.post(CHAT_URL, &body).await.status(), 200);
    }
    let seen = aoai.seen();
    assert_eq!(seen.len(), 5);
    for s in &seen {
        assert!(s.headers.get("api-key").is_none(), "no key in keyless mode");
        let auth = s.headers["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with(&format!("Bearer tok-{client_id}-")),
            "{auth}"
        );
        assert!(!auth.contains(IN_KEY));
    }
    for (_, headers, _) in cs.calls() {
        assert!(headers.get("ocp-apim-subscription-key").is_none());
        assert!(headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer tok-"));
    }
    // five requests, ten Content Safety calls, one token: cached, never per request
    assert_eq!(mi.calls(client_id), 1);
    assert_eq!(
        mi.resources(client_id),
        ["https://cognitiveservices.azure.com"]
    );
}

fn upsert_outage() -> Arc<azure_data_cosmos::fault_injection::FaultInjectionRule> {
    let result = FaultInjectionResultBuilder::new()
        .with_error(FaultInjectionErrorType::ServiceUnavailable)
        .build();
    Arc::new(
        FaultInjectionRuleBuilder::new("cosmos-down", result)
            .with_condition(
                FaultInjectionConditionBuilder::new()
                    .with_operation_type(FaultOperationType::UpsertItem)
                    .build(),
            )
            .build(),
    )
}

/// The issue's "done when": a flagged prompt gets AOAI's content-filter error, never reaches
/// AOAI, and lands exactly once in Cosmos even though Cosmos is down when it happens and the
/// handler restarts before Cosmos is back.
#[tokio::test]
async fn blocked_prompt_lands_exactly_once_in_cosmos_across_an_outage_and_a_restart() {
    let emu = Emu::start().await;
    let aoai = MockAoai::start().await;
    let cs = MockContentSafety::start().await;
    let dir = std::env::temp_dir().join(format!("fwdproxy-gate-azure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spool = dir.join("spool.jsonl");
    let _ = std::fs::remove_file(&spool);
    let _ = std::fs::remove_file(dir.join("spool.jsonl.shipping"));
    let spool_s = spool.display().to_string();
    let cs_base = cs.base();
    let mut extra: Vec<(String, String)> = emu.pairs();
    extra.extend(
        [
            ("CONTENT_SAFETY_ENDPOINT", cs_base.as_str()),
            ("CONTENT_SAFETY_KEY", CS_KEY),
            ("USER_CHECK", "registered"),
            ("REGISTERED_USERS", "alice"),
            ("AUDIT_SPOOL_PATH", spool_s.as_str()),
            ("AUDIT_MAX_ATTEMPTS", "2"),
            ("AUDIT_RETRY_BASE_MS", "10"),
            ("AUDIT_FLUSH_TIMEOUT_MS", "2000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let extra_ref: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();

    // First life: Cosmos answers 503 to every write.
    let down = emu.account(vec![upsert_outage()]);
    let state = AppState::with_cosmos_builder(
        test_settings(&aoai.base(), &extra_ref),
        down.builder_factory(),
    )
    .await
    .unwrap();
    let app = TestApp::with_state(state.clone()).await;
    let started = Instant::now();
    let resp = app
        .client
        .post(app.url(CHAT_URL))
        .header("api-key", IN_KEY)
        .header("content-type", "application/json")
        .header("x-request-id", "blocked-during-outage")
        .body(r#"{"user":"alice","messages":[{"role":"user","content":"plan a bloodbath"}]}"#)
        .send()
        .await
        .unwrap();
    let answered_in = started.elapsed();
    assert_eq!(assert_aoai_error(resp, 400).await, "content_filter");
    assert!(
        aoai.seen().is_empty(),
        "the blocked prompt never reaches AOAI"
    );
    // the client is not held up by Cosmos retries
    assert!(answered_in < Duration::from_secs(2), "{answered_in:?}");

    // SIGTERM while Cosmos is still down: the record was already durable in the journal
    // (the refusal was answered only after that), whether rotated for shipping or not.
    drop(app);
    let report = state.audit.shutdown(Duration::from_secs(5)).await;
    assert!(!report.completed, "nothing could be shipped: {report:?}");
    let spooled = [spool.clone(), dir.join("spool.jsonl.shipping")]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<String>();
    assert_eq!(
        spooled.lines().count(),
        1,
        "one record journaled: {spooled}"
    );
    assert!(spooled.contains("blocked-during-outage"));
    assert!(
        emu.abuse_ids().await.0.is_empty(),
        "nothing reached Cosmos during the outage"
    );
    drop(state);

    // Second life: Cosmos is back; the spool is replayed at start.
    let up = emu.account(vec![]);
    let state = AppState::with_cosmos_builder(
        test_settings(&aoai.base(), &extra_ref),
        up.builder_factory(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ids, dup) = emu.abuse_ids().await;
        assert!(!dup, "a replay must never duplicate");
        if ids.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spooled record was not replayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An unregistered user while Cosmos is healthy: written directly, once.
    let app = TestApp::with_state(state.clone()).await;
    let resp = app
        .post(
            CHAT_URL,
            r#"{"user":"mallory","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(assert_aoai_error(resp, 403).await, "unregistered_user");
    drop(app);
    let report = state.audit.shutdown(Duration::from_secs(10)).await;
    assert!(report.completed);
    let (ids, dup) = emu.abuse_ids().await;
    assert_eq!(
        ids.len(),
        2,
        "exactly the two non-compliant requests: {ids:?}"
    );
    assert!(!dup);
    assert!(aoai.seen().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
