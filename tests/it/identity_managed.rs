//! `AOAI_AUTH=managed_identity`: tokens come from the Functions managed-identity endpoint (a
//! local stub that checks `X-IDENTITY-HEADER` and counts calls), are cached, and are renewed
//! before they expire, never per request.

use crate::support;

use std::time::Duration;

use aoai_fwdproxy::clients::identity::{IdentitySettings, TokenSource, COGNITIVE_SERVICES_SCOPE};
use aoai_fwdproxy::settings::Source;
use support::mi_stub;
use support::wait::{eventually, within, PATIENCE};

fn user_assigned(id: &str) -> TokenSource {
    mi_stub::stub();
    TokenSource::managed_identity(&IdentitySettings {
        client_id: Some(id.to_string()),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_share_one_token_fetch() {
    let id = "11111111-1111-1111-1111-111111111111";
    let source = user_assigned(id);
    let stub = mi_stub::stub();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let s = source.clone();
        tasks.spawn(async move { s.bearer(COGNITIVE_SERVICES_SCOPE).await.unwrap() });
    }
    let mut tokens = Vec::new();
    while let Some(t) = tasks.join_next().await {
        tokens.push(t.unwrap());
    }
    for _ in 0..300 {
        tokens.push(source.bearer(COGNITIVE_SERVICES_SCOPE).await.unwrap());
    }
    assert_eq!(tokens.len(), 500);
    assert!(tokens.iter().all(|t| t.expose() == format!("tok-{id}-1")));
    assert_eq!(stub.calls(id), 1, "500 requests must cost one token fetch");
    assert_eq!(source.fetches(), 1);
    // The scope becomes the resource, without /.default.
    assert_eq!(stub.resources(id), ["https://cognitiveservices.azure.com"]);

    let header = source
        .authorization(COGNITIVE_SERVICES_SCOPE)
        .await
        .unwrap();
    assert_eq!(header.to_str().unwrap(), format!("Bearer tok-{id}-1"));
    assert!(header.is_sensitive());
    assert_eq!(format!("{:?}", tokens[0]), "*****");
    assert!(!format!("{source:?}").contains("tok-"));
    assert_eq!(stub.calls(id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_renewed_before_it_expires_without_making_requests_wait() {
    let id = "22222222-2222-2222-2222-222222222222";
    let stub = mi_stub::stub();
    // 8 s tokens: renewal due after 4 s (half the lifetime), unusable after 7.2 s.
    stub.set_lifetime(id, 8);
    let source = user_assigned(id);

    let first = source.bearer(COGNITIVE_SERVICES_SCOPE).await.unwrap();
    assert_eq!(first.expose(), format!("tok-{id}-1"));
    for _ in 0..50 {
        assert_eq!(
            source
                .bearer(COGNITIVE_SERVICES_SCOPE)
                .await
                .unwrap()
                .expose(),
            first.expose()
        );
    }
    assert_eq!(stub.calls(id), 1, "not due yet: the cached token serves");

    // Real time must pass for the token to become due (the cache reads the monotonic clock);
    // this sleep waits for the clock, it synchronises nothing.
    tokio::time::sleep(Duration::from_millis(4300)).await;
    // Due: the current (still valid) token comes back at once, the renewal runs behind it.
    // The stub holds every token request for this identity, so a caller that waited for the
    // renewal would never return: returning at all proves it did not wait.
    stub.hold(id);
    let again = within(
        PATIENCE,
        "a due token must not wait for its renewal",
        source.bearer(COGNITIVE_SERVICES_SCOPE),
    )
    .await
    .unwrap();
    assert_eq!(again.expose(), first.expose());
    assert!(
        eventually(PATIENCE, async || stub.waiting(id) == 1).await,
        "the renewal started in the background"
    );
    assert_eq!(stub.calls(id), 1);
    stub.release(id);
    assert!(eventually(PATIENCE, async || stub.calls(id) == 2).await);
    assert!(
        eventually(PATIENCE, async || {
            source
                .bearer(COGNITIVE_SERVICES_SCOPE)
                .await
                .unwrap()
                .expose()
                == format!("tok-{id}-2")
        })
        .await,
        "the renewed token is used"
    );
    // Many requests right after the renewal start no further fetch.
    for _ in 0..100 {
        source.bearer(COGNITIVE_SERVICES_SCOPE).await.unwrap();
    }
    assert_eq!(stub.calls(id), 2, "renewed once, before expiry");
}

#[tokio::test]
async fn system_assigned_identity_sends_the_identity_header() {
    let stub = mi_stub::stub();
    let settings =
        IdentitySettings::from_source(&Source::from_map([("AZURE_CLIENT_ID", "")])).unwrap();
    assert!(settings.client_id.is_none());
    let source = TokenSource::managed_identity(&settings).unwrap();
    let t = source.bearer(COGNITIVE_SERVICES_SCOPE).await.unwrap();
    assert!(t.expose().starts_with("tok-(system)-"));
    assert!(stub.calls(mi_stub::SYSTEM) >= 1);
    assert_eq!(stub.refused(), 0, "every request carried X-IDENTITY-HEADER");
}

#[test]
fn client_id_setting_is_checked() {
    let ok = IdentitySettings::from_source(&Source::from_map([(
        "AZURE_CLIENT_ID",
        "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    )]))
    .unwrap();
    assert_eq!(
        ok.client_id.as_deref(),
        Some("3fa85f64-5717-4562-b3fc-2c963f66afa6")
    );
    let e = IdentitySettings::from_source(&Source::from_map([("AZURE_CLIENT_ID", "not a guid")]))
        .unwrap_err();
    assert_eq!(e.name, "AZURE_CLIENT_ID");
}
