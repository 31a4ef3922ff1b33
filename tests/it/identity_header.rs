//! A wrong `IDENTITY_HEADER` makes the identity endpoint refuse: the token source fails with an
//! error that names the scope and never the header's value. (Its own process, a child of the test
//! binary: it changes the environment the credential reads, which the other tests share.)

use crate::support;

use aoai_fwdproxy::clients::identity::{IdentitySettings, TokenSource, COGNITIVE_SERVICES_SCOPE};
use support::mi_stub;

#[tokio::test]
async fn a_refused_token_request_is_an_error_without_secrets() {
    if support::child::in_parent(
        module_path!(),
        "a_refused_token_request_is_an_error_without_secrets",
    ) {
        return;
    }
    let stub = mi_stub::stub();
    std::env::set_var("IDENTITY_HEADER", "wrong-header-value-xyz");
    let source = TokenSource::managed_identity(&IdentitySettings {
        client_id: Some("33333333-3333-3333-3333-333333333333".into()),
    })
    .unwrap();
    let e = source.bearer(COGNITIVE_SERVICES_SCOPE).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("cognitiveservices"), "{text}");
    assert!(!text.contains("wrong-header-value-xyz"), "{text}");
    assert!(!text.contains(mi_stub::IDENTITY_HEADER), "{text}");
    assert!(stub.refused() >= 1);
    assert_eq!(stub.calls("33333333-3333-3333-3333-333333333333"), 0);
    assert_eq!(source.failures(), 1);
}
