//! A stub of the App Service / Functions managed-identity endpoint
//! (`GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=…[&client_id=…]` with header
//! `X-IDENTITY-HEADER: $IDENTITY_HEADER`).
//!
//! One stub per test process: `azure_identity` reads `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`
//! from the environment, which every test in the process shares. It runs on its own thread and
//! runtime so it outlives each `#[tokio::test]` runtime. Tests keep apart by asking for
//! different user-assigned client ids: calls are counted per client id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, Uri};

pub const IDENTITY_HEADER: &str = "stub-identity-header-value-0123";
/// The system-assigned identity's key in the counters.
pub const SYSTEM: &str = "(system)";

#[derive(Default)]
pub struct MiState {
    /// Token requests per client id that passed the header check.
    calls: HashMap<String, u32>,
    /// Requests refused for a missing or wrong `X-IDENTITY-HEADER`.
    pub refused: u32,
    /// Token lifetime per client id, seconds (default 3600).
    lifetimes: HashMap<String, i64>,
    /// Resources asked for, per client id.
    resources: HashMap<String, Vec<String>>,
    /// Client ids whose token requests wait for [`MiStub::release`] (see [`MiStub::hold`]).
    holds: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Token requests waiting at a hold, per client id.
    waiting: HashMap<String, u32>,
}

pub struct MiStub {
    pub endpoint: String,
    state: Arc<Mutex<MiState>>,
}

impl MiStub {
    pub fn calls(&self, client_id: &str) -> u32 {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }
    pub fn refused(&self) -> u32 {
        self.state.lock().unwrap().refused
    }
    pub fn resources(&self, client_id: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .resources
            .get(client_id)
            .cloned()
            .unwrap_or_default()
    }
    /// From now on, token requests for `client_id` wait until [`MiStub::release`]: lets a test
    /// prove a caller did not wait for a fetch (it returned while the fetch was held) without
    /// timing it.
    pub fn hold(&self, client_id: &str) {
        self.state
            .lock()
            .unwrap()
            .holds
            .insert(client_id.into(), Arc::new(tokio::sync::Semaphore::new(0)));
    }
    /// Let every held and future token request for `client_id` through.
    pub fn release(&self, client_id: &str) {
        if let Some(gate) = self.state.lock().unwrap().holds.remove(client_id) {
            gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
        }
    }
    /// Token requests for `client_id` waiting at a hold right now.
    pub fn waiting(&self, client_id: &str) -> u32 {
        self.state
            .lock()
            .unwrap()
            .waiting
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }
    pub fn set_lifetime(&self, client_id: &str, secs: i64) {
        self.state
            .lock()
            .unwrap()
            .lifetimes
            .insert(client_id.into(), secs);
    }
}

/// The process's stub; sets `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` on first use.
pub fn stub() -> &'static MiStub {
    static STUB: OnceLock<MiStub> = OnceLock::new();
    STUB.get_or_init(|| {
        let state = Arc::new(Mutex::new(MiState::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let s = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route("/msi/token", axum::routing::get(token))
                    .with_state(s);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let endpoint = format!("http://{addr}/msi/token");
        // Edition 2021: set_var is safe; the stub is set up before any credential reads it.
        std::env::set_var("IDENTITY_ENDPOINT", &endpoint);
        std::env::set_var("IDENTITY_HEADER", IDENTITY_HEADER);
        MiStub { endpoint, state }
    })
}

async fn token(State(state): State<Arc<Mutex<MiState>>>, uri: Uri, headers: HeaderMap) -> Response {
    let who = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "client_id")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| SYSTEM.to_string());
    let gate = {
        let mut st = state.lock().unwrap();
        let gate = st.holds.get(&who).cloned();
        if gate.is_some() {
            *st.waiting.entry(who.clone()).or_default() += 1;
        }
        gate
    };
    if let Some(gate) = gate {
        if let Ok(permit) = gate.acquire().await {
            permit.forget();
        }
        *state.lock().unwrap().waiting.entry(who).or_default() -= 1;
    }
    issue(&state, &uri, &headers)
}

fn issue(state: &Mutex<MiState>, uri: &Uri, headers: &HeaderMap) -> Response {
    let q: HashMap<String, String> = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let mut st = state.lock().unwrap();
    if headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        != Some(IDENTITY_HEADER)
    {
        st.refused += 1;
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"error":"missing or wrong X-IDENTITY-HEADER"}"#,
        )
            .into_response();
    }
    if q.get("api-version").map(String::as_str) != Some("2019-08-01") {
        return (StatusCode::BAD_REQUEST, r#"{"error":"api-version"}"#).into_response();
    }
    let Some(resource) = q.get("resource").cloned() else {
        return (StatusCode::BAD_REQUEST, r#"{"error":"resource"}"#).into_response();
    };
    let who = q
        .get("client_id")
        .cloned()
        .unwrap_or_else(|| SYSTEM.to_string());
    let n = {
        let c = st.calls.entry(who.clone()).or_default();
        *c += 1;
        *c
    };
    st.resources
        .entry(who.clone())
        .or_default()
        .push(resource.clone());
    let lifetime = st.lifetimes.get(&who).copied().unwrap_or(3600);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = serde_json::json!({
        "access_token": format!("tok-{who}-{n}"),
        "expires_on": (now + lifetime).to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": who,
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}
