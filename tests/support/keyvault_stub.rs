//! A Key Vault over HTTPS on loopback, with a CA the test generates.
//!
//! It speaks the data-plane protocol the SDK expects: a request without a bearer token gets
//! `401` with `WWW-Authenticate: Bearer authorization="…", resource="https://vault.azure.net"`;
//! with a token, `GET /secrets/{name}/[{version}]?api-version=…` answers
//! `{"value": …, "id": "https://…/secrets/{name}/{version}", "attributes": {…}}`. The value can be
//! rotated by the test, and every call is counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Default)]
pub struct VaultState {
    /// name → (value, version)
    secrets: HashMap<String, (String, u32)>,
    pub challenged: u32,
    pub served: u32,
    /// Bearer tokens seen on authorised calls.
    pub tokens: Vec<String>,
    /// Answer every authorised call with 403 (the identity lost its role).
    pub forbidden: bool,
}

pub struct KeyVaultStub {
    pub url: String,
    /// The CA's certificate (PEM) that signed the stub's server certificate.
    pub ca_pem: String,
    state: Arc<Mutex<VaultState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl KeyVaultStub {
    pub async fn start() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let state = Arc::new(Mutex::new(VaultState::default()));
        let router = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => return,
                    },
                    _ = &mut stopped => return,
                };
                let acceptor = acceptor.clone();
                let router = router.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        KeyVaultStub {
            url: format!("https://{addr}"),
            ca_pem: ca.pem(),
            state,
            stop: Some(stop),
        }
    }

    /// Set (or rotate) a secret: each call makes a new version.
    pub fn put(&self, name: &str, value: &str) {
        let mut st = self.state.lock().unwrap();
        let version = st.secrets.get(name).map(|(_, v)| v + 1).unwrap_or(1);
        st.secrets.insert(name.into(), (value.into(), version));
    }

    /// From now on, answer 403 Forbidden (as when the identity loses its Key Vault role).
    pub fn forbid(&self) {
        self.state.lock().unwrap().forbidden = true;
    }

    pub fn served(&self) -> u32 {
        self.state.lock().unwrap().served
    }
    pub fn challenged(&self) -> u32 {
        self.state.lock().unwrap().challenged
    }
    pub fn tokens(&self) -> Vec<String> {
        self.state.lock().unwrap().tokens.clone()
    }

    /// A client that trusts only the test CA, for the SDK's transport.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .no_proxy()
            .build()
            .unwrap()
    }
}

impl Drop for KeyVaultStub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn answer(State(state): State<Arc<Mutex<VaultState>>>, req: Request) -> Response {
    let mut st = state.lock().unwrap();
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(token) = bearer else {
        st.challenged += 1;
        return (
            StatusCode::UNAUTHORIZED,
            [(
                "www-authenticate",
                r#"Bearer authorization="https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000", resource="https://vault.azure.net""#,
            )],
            r#"{"error":{"code":"Unauthorized","message":"AKV10000: Request is missing a Bearer or PoP token."}}"#,
        )
            .into_response();
    };
    if st.forbidden {
        return (
            StatusCode::FORBIDDEN,
            r#"{"error":{"code":"Forbidden","message":"Caller is not authorized to perform action on resource."}}"#,
        )
            .into_response();
    }
    let query = req.uri().query().unwrap_or("");
    if !query.contains("api-version=") {
        return (
            StatusCode::BAD_REQUEST,
            r#"{"error":{"code":"BadParameter","message":"api-version"}}"#,
        )
            .into_response();
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let parts: Vec<&str> = req
        .uri()
        .path()
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let (name, version) = match parts.as_slice() {
        ["secrets", name] => (name.to_string(), None),
        ["secrets", name, version] => (name.to_string(), Some(version.to_string())),
        _ => return (StatusCode::NOT_FOUND, "{}").into_response(),
    };
    let Some((value, current)) = st.secrets.get(&name).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"SecretNotFound","message":"not found"}}"#,
        )
            .into_response();
    };
    if version.is_some_and(|v| v != format!("v{current}")) {
        return (
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"SecretNotFound","message":"version"}}"#,
        )
            .into_response();
    }
    st.served += 1;
    st.tokens.push(token);
    let body = serde_json::json!({
        "value": value,
        "id": format!("https://{host}/secrets/{name}/v{current}"),
        "attributes": {"enabled": true, "created": 1700000000, "updated": 1700000000, "recoveryLevel": "Recoverable+Purgeable"},
        "tags": {}
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}
