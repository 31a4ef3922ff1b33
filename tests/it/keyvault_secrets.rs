//! Secrets by URI from Key Vault: fetched at start with the managed identity, re-fetched on
//! demand (AOAI answered 401) and periodically — against a local HTTPS vault with a CA the test
//! generates, speaking the 401 challenge and then `{"value","id"}`.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use aoai_fwdproxy::app::AppState;
use aoai_fwdproxy::clients::identity::{IdentitySettings, TokenSource};
use aoai_fwdproxy::clients::keyvault::{KeyVaultSettings, SecretUri, VaultSecret};
use aoai_fwdproxy::pipeline::audit::Audit;
use aoai_fwdproxy::pipeline::auth::Authenticator;
use aoai_fwdproxy::pipeline::forward::{Upstream, UpstreamAuth};
use aoai_fwdproxy::pipeline::policy::UserRegistry;
use aoai_fwdproxy::settings::Source;
use azure_core::http::{ClientOptions, Transport};
use azure_security_keyvault_secrets::SecretClientOptions;
use support::aoai::{MockAoai, Reply};
use support::app::{test_settings, TestApp, API, IN_KEY};
use support::keyvault_stub::KeyVaultStub;
use support::mi_stub;
use support::scratch::Scratch;
use support::wait::{eventually, PATIENCE};

fn options(vault: &KeyVaultStub) -> SecretClientOptions {
    SecretClientOptions {
        client_options: ClientOptions {
            transport: Some(Transport::new(Arc::new(vault.client()))),
            ..Default::default()
        },
        // The challenge names vault.azure.net while the vault is 127.0.0.1.
        verify_challenge_resource: Some(false),
        ..Default::default()
    }
}

fn identity(client_id: &str) -> TokenSource {
    mi_stub::stub();
    TokenSource::managed_identity(&IdentitySettings {
        client_id: Some(client_id.into()),
    })
    .unwrap()
}

fn uri(vault: &KeyVaultStub, name: &str) -> SecretUri {
    SecretUri::parse(
        "AOAI_OUTAPIKEY_SECRET_URI",
        &format!("{}/secrets/{name}", vault.url),
    )
    .unwrap()
}

#[tokio::test]
async fn fetched_at_start_through_the_challenge_with_a_managed_identity_token() {
    let vault = KeyVaultStub::start().await;
    vault.put("aoai-key", "first-real-aoai-key-0001");
    let id = "44444444-4444-4444-4444-444444444444";
    let mi = identity(id);

    let secret =
        VaultSecret::fetch_with(&uri(&vault, "aoai-key"), mi.credential(), options(&vault))
            .await
            .unwrap();
    assert_eq!(secret.current().expose(), "first-real-aoai-key-0001");
    assert_eq!(secret.version().as_deref(), Some("v1"));
    assert_eq!(secret.setting(), "AOAI_OUTAPIKEY_SECRET_URI");
    assert!(
        vault.challenged() >= 1,
        "the SDK first asks without a token"
    );
    assert_eq!(vault.served(), 1);
    assert_eq!(vault.tokens(), [format!("tok-{id}-1")]);
    // The token was asked for the vault's resource, as the challenge named it.
    assert_eq!(mi_stub::stub().resources(id), ["https://vault.azure.net"]);
    let shown = format!("{secret:?}");
    assert!(!shown.contains("first-real"), "{shown}");
}

#[tokio::test]
async fn refresh_picks_up_a_rotated_key_once_for_a_burst_of_401s() {
    let vault = KeyVaultStub::start().await;
    vault.put("aoai-key", "old-key-aaaaaaaaaaaa");
    let mi = identity("55555555-5555-5555-5555-555555555555");
    let secret =
        VaultSecret::fetch_with(&uri(&vault, "aoai-key"), mi.credential(), options(&vault))
            .await
            .unwrap();
    secret.set_min_refresh_gap(Duration::ZERO);

    // Nothing rotated yet: a refresh finds the same value.
    assert!(!secret.refresh().await.unwrap());
    assert_eq!(vault.served(), 2);

    vault.put("aoai-key", "new-key-bbbbbbbbbbbb");
    let first = secret.refresh().await.unwrap();
    assert!(first, "the rotated key is picked up");
    assert_eq!(secret.current().expose(), "new-key-bbbbbbbbbbbb");
    assert_eq!(secret.version().as_deref(), Some("v2"));

    // A burst of 401s right after: one gap-limited call at most, here none.
    secret.set_min_refresh_gap(Duration::from_secs(30));
    let served = vault.served();
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let s = secret.clone();
        burst.spawn(async move { s.refresh().await.unwrap() });
    }
    while let Some(r) = burst.join_next().await {
        assert!(!r.unwrap());
    }
    assert_eq!(
        vault.served(),
        served,
        "a burst of 401s must not hammer Key Vault"
    );
}

#[tokio::test]
async fn periodic_refresh_and_a_failing_vault_keeps_the_last_good_value() {
    let vault = KeyVaultStub::start().await;
    vault.put("cs-key", "content-safety-key-1");
    let mi = identity("66666666-6666-6666-6666-666666666666");
    let secret = VaultSecret::fetch_with(&uri(&vault, "cs-key"), mi.credential(), options(&vault))
        .await
        .unwrap();
    secret.set_min_refresh_gap(Duration::ZERO);
    vault.put("cs-key", "content-safety-key-2");
    let task = secret.spawn_periodic(Duration::from_millis(200));
    eventually(PATIENCE, async || {
        secret.current().expose() == "content-safety-key-2"
    })
    .await;
    assert_eq!(secret.current().expose(), "content-safety-key-2");
    task.abort();

    // The vault refuses from now on: refresh fails, the value stays.
    vault.forbid();
    let e = secret.refresh().await.unwrap_err();
    assert_eq!(e.setting, "AOAI_OUTAPIKEY_SECRET_URI");
    assert!(!e.to_string().contains("content-safety-key"));
    assert_eq!(secret.current().expose(), "content-safety-key-2");
    assert!(secret.failures() >= 1);
}

#[tokio::test]
async fn an_unknown_secret_fails_the_start_with_the_setting_named() {
    let vault = KeyVaultStub::start().await;
    let mi = identity("77777777-7777-7777-7777-777777777777");
    let e = VaultSecret::fetch_with(&uri(&vault, "missing"), mi.credential(), options(&vault))
        .await
        .unwrap_err();
    assert_eq!(e.setting, "AOAI_OUTAPIKEY_SECRET_URI");
}

#[tokio::test]
async fn without_the_test_ca_the_vault_is_not_trusted() {
    let vault = KeyVaultStub::start().await;
    vault.put("aoai-key", "never-seen-key-000000");
    let mi = identity("88888888-8888-8888-8888-888888888888");
    let untrusted = SecretClientOptions {
        client_options: ClientOptions {
            transport: Some(Transport::new(Arc::new(
                reqwest::Client::builder().no_proxy().build().unwrap(),
            ))),
            retry: azure_core::http::RetryOptions::none(),
            ..Default::default()
        },
        verify_challenge_resource: Some(false),
        ..Default::default()
    };
    assert!(
        VaultSecret::fetch_with(&uri(&vault, "aoai-key"), mi.credential(), untrusted)
            .await
            .is_err()
    );
    assert_eq!(vault.served(), 0);
}

#[test]
fn settings_name_each_secret_uri() {
    let s = KeyVaultSettings::from_source(&Source::from_map([
        (
            "AOAI_OUTAPIKEY_SECRET_URI",
            "https://v.vault.azure.net/secrets/aoai",
        ),
        (
            "CONTENT_SAFETY_KEY_SECRET_URI",
            "https://v.vault.azure.net/secrets/cs/abc123",
        ),
        (
            "COSMOS_KEY_SECRET_URI",
            "https://v.vault.azure.net/secrets/cosmos",
        ),
        ("KEYVAULT_REFRESH_SECS", "600"),
    ]))
    .unwrap();
    assert_eq!(s.aoai_key.unwrap().name, "aoai");
    assert_eq!(
        s.content_safety_key.unwrap().version.as_deref(),
        Some("abc123")
    );
    assert_eq!(s.cosmos_key.unwrap().setting, "COSMOS_KEY_SECRET_URI");
    assert_eq!(s.refresh, Some(Duration::from_secs(600)));
    let e = KeyVaultSettings::from_source(&Source::from_map([(
        "COSMOS_KEY_SECRET_URI",
        "http://v.vault.azure.net/secrets/cosmos",
    )]))
    .unwrap_err();
    assert_eq!(e.name, "COSMOS_KEY_SECRET_URI");
}

/// Through the app: AOAI answers 401 to the old key, the handler passes the 401 on and re-reads
/// the key from Key Vault (once), and the next request carries the rotated key.
#[tokio::test]
async fn a_401_from_aoai_makes_the_app_re_read_the_key_from_key_vault() {
    let vault = KeyVaultStub::start().await;
    vault.put("aoai-key", "old-aoai-key-0000000000");
    let mi = identity("99999999-9999-9999-9999-999999999999");
    let secret =
        VaultSecret::fetch_with(&uri(&vault, "aoai-key"), mi.credential(), options(&vault))
            .await
            .unwrap();
    secret.set_min_refresh_gap(Duration::ZERO);
    assert_eq!(vault.served(), 1);

    let aoai = MockAoai::start().await;
    let scratch = Scratch::new("kv-401");
    let audit_log = scratch.file("audit.jsonl").display().to_string();
    let settings = test_settings(
        &aoai.base(),
        &[
            ("AOAI_OUTAPIKEY", ""),
            (
                "AOAI_OUTAPIKEY_SECRET_URI",
                "https://v.vault.azure.net/secrets/aoai-key",
            ),
            ("AUDIT_LOG_PATH", &audit_log),
        ],
    );
    // The app as AppState::new builds it, with the vault secret fetched through the test CA.
    let state = Arc::new(AppState {
        auth: Authenticator::new(&settings.callers),
        upstream: Upstream::new(&settings, UpstreamAuth::Vault(secret.clone())).unwrap(),
        registry: Arc::new(UserRegistry::new(settings.policy.registered_users.clone())),
        content_safety: None,
        audit: Audit::start(settings.audit.clone(), None).unwrap(),
        budgets: aoai_fwdproxy::pipeline::budget::Budgets::new(&settings.budget, []),
        usage: None,
        settings,
    });
    let app = TestApp::with_state(state).await;
    let url = format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}");
    let chat = r#"{"messages":[{"role":"user","content":"hi"}]}"#;

    // The key was rotated in the vault; AOAI already refuses the old one.
    vault.put("aoai-key", "new-aoai-key-1111111111");
    let refusal =
        r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key."}}"#;
    aoai.reply(Reply::Fixed(
        401,
        vec![("content-type", "application/json")],
        refusal,
    ));
    let resp = app.post(&url, chat).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.text().await.unwrap(),
        refusal,
        "AOAI's 401 passes through"
    );
    assert_eq!(aoai.only().headers["api-key"], "old-aoai-key-0000000000");

    // The re-read happens behind the answer: wait for it (bounded), then for nothing more.
    assert!(
        eventually(PATIENCE, async || secret.current().expose()
            == "new-aoai-key-1111111111")
        .await,
        "the key was not re-read after AOAI's 401"
    );
    assert_eq!(vault.served(), 2, "one re-read for one 401");

    aoai.reply(Reply::Fixed(
        200,
        vec![("content-type", "application/json")],
        "{}",
    ));
    let resp = app.post(&url, chat).await;
    assert_eq!(resp.status(), 200);
    let seen = aoai.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].headers["api-key"], "new-aoai-key-1111111111");
    assert!(!format!("{:?}", seen[1].headers).contains("old-aoai-key"));
    // A success asks Key Vault for nothing.
    assert_eq!(vault.served(), 2);
    assert!(!format!("{:?}", seen[1].headers).contains(IN_KEY));
}

/// Spillover with keys from Key Vault (`AOAI_BACKUP_OUTAPIKEY_SECRET_URIS`): each resource gets
/// its own vault key, and a 401 from a backup re-reads that backup's key (not the primary's).
#[tokio::test]
async fn each_backup_has_its_own_vault_key_re_read_on_its_401() {
    let vault = KeyVaultStub::start().await;
    vault.put("primary-key", "primary-vault-key-00000000");
    vault.put("backup-key", "backup-vault-key-old-000000");
    let mi = identity("6b6b6b6b-6b6b-6b6b-6b6b-6b6b6b6b6b6b");
    let fetch = |name: &'static str| {
        let (uri, credential, options) = (uri(&vault, name), mi.credential(), options(&vault));
        async move {
            VaultSecret::fetch_with(&uri, credential, options)
                .await
                .unwrap()
        }
    };
    let (primary_key, backup_key) = (fetch("primary-key").await, fetch("backup-key").await);
    backup_key.set_min_refresh_gap(Duration::ZERO);

    let primary = MockAoai::start().await;
    let backup = MockAoai::start().await;
    let scratch = Scratch::new("kv-spill");
    let audit_log = scratch.file("audit.jsonl").display().to_string();
    let backups = backup.base();
    let settings = test_settings(
        &primary.base(),
        &[
            ("AOAI_OUTAPIKEY", ""),
            (
                "AOAI_OUTAPIKEY_SECRET_URI",
                "https://v.vault.azure.net/secrets/primary-key",
            ),
            ("AOAI_BACKUPS", &backups),
            (
                "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS",
                "https://v.vault.azure.net/secrets/backup-key",
            ),
            ("AUDIT_LOG_PATH", &audit_log),
        ],
    );
    let upstream = Upstream::with_backups(
        &settings,
        UpstreamAuth::Vault(primary_key.clone()),
        vec![UpstreamAuth::Vault(backup_key.clone())],
    )
    .unwrap();
    let state = Arc::new(AppState {
        auth: Authenticator::new(&settings.callers),
        upstream,
        registry: Arc::new(UserRegistry::new(settings.policy.registered_users.clone())),
        content_safety: None,
        audit: Audit::start(settings.audit.clone(), None).unwrap(),
        budgets: aoai_fwdproxy::pipeline::budget::Budgets::new(&settings.budget, []),
        usage: None,
        settings,
    });
    let app = TestApp::with_state(state).await;
    let url = format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}");
    let chat = r#"{"messages":[{"role":"user","content":"hi"}]}"#;

    primary.reply(Reply::Fixed(429, vec![("retry-after-ms", "600000")], "{}"));
    vault.put("backup-key", "backup-vault-key-new-111111");
    backup.reply(Reply::Fixed(
        401,
        vec![],
        r#"{"error":{"code":"401","message":"no"}}"#,
    ));
    let resp = app.post(&url, chat).await;
    assert_eq!(resp.status(), 401, "a backup's 401 passes through");
    assert_eq!(
        primary.only().headers["api-key"],
        "primary-vault-key-00000000"
    );
    assert_eq!(
        backup.only().headers["api-key"],
        "backup-vault-key-old-000000"
    );
    assert!(
        eventually(PATIENCE, async || backup_key.current().expose()
            == "backup-vault-key-new-111111")
        .await,
        "the backup's key was not re-read after its 401"
    );
    assert_eq!(vault.served(), 3, "two fetches at start, one re-read");
    assert_eq!(primary_key.current().expose(), "primary-vault-key-00000000");

    backup.reply(Reply::Fixed(200, vec![], "{}"));
    let resp = app.post(&url, chat).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(primary.seen().len(), 1, "the primary is still cooling down");
    assert_eq!(
        backup.seen()[1].headers["api-key"],
        "backup-vault-key-new-111111"
    );
    assert!(!format!("{:?}", backup.seen()[1].headers).contains(IN_KEY));
}
