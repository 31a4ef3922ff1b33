//! The Function App's managed identity as a source of Entra bearer tokens.
//!
//! On App Service and Functions, `azure_identity`'s `ManagedIdentityCredential` finds the
//! identity endpoint through `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` (set by the platform) and
//! asks it for a token per resource. [`TokenSource`] wraps it with a cache of its own so the
//! request path never waits for a token fetch once the first one is done:
//!
//! - a token is reused until `refresh_at` (five minutes before it expires, or half its lifetime
//!   for short-lived tokens);
//! - after `refresh_at` the current token is still returned at once while one background task
//!   fetches the next (single flight: a burst of requests starts one fetch, not one each);
//! - when a fetch fails and the current token is still valid, the current one is used and the
//!   failure is logged; only when no valid token remains does [`TokenSource::bearer`] fail.
//!
//! The same credential is handed to the Azure SDK clients (Cosmos DB, Key Vault) through
//! [`TokenSource::credential`]; they keep their own cache.
//!
//! Settings: `AZURE_CLIENT_ID` selects a user-assigned identity by client id; unset means the
//! system-assigned identity.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use http::HeaderValue;

use crate::settings::{Secret, SettingsError, Source};

/// Scope of Azure OpenAI and of Azure AI Content Safety (both Cognitive Services).
pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// The longest time before expiry at which a token is renewed (the Azure SDK's own margin, so
/// the SDK's cache below ours hands out a fresh token when we ask for one).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// A token this close to expiry (or a tenth of its lifetime, when shorter) is not handed out any
/// more: the request it authorises may take longer than that to reach the service.
const MIN_VALIDITY: Duration = Duration::from_secs(10);
/// One token fetch may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The managed identity could not be set up (no identity endpoint, bad client id).
    #[error("managed identity unavailable: {0}")]
    Unavailable(String),
    /// The identity endpoint refused or failed the token request.
    #[error("token request for {scope} failed: {message}")]
    Token { scope: String, message: String },
    /// The identity endpoint did not answer in time.
    #[error("token request for {scope} timed out")]
    Timeout { scope: String },
}

/// Settings of the managed identity.
#[derive(Debug, Clone, Default)]
pub struct IdentitySettings {
    /// `AZURE_CLIENT_ID`: client id of a user-assigned identity; `None` = system-assigned.
    pub client_id: Option<String>,
}

impl IdentitySettings {
    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        let client_id = src.get("AZURE_CLIENT_ID")?.map(str::to_string);
        if let Some(id) = &client_id {
            let ok = id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
            if !ok {
                return Err(SettingsError::new(
                    "AZURE_CLIENT_ID",
                    "must be the client id (a GUID) of a user-assigned managed identity",
                ));
            }
        }
        Ok(IdentitySettings { client_id })
    }
}

/// A cached token for one scope.
#[derive(Clone)]
struct Cached {
    token: Secret,
    header: HeaderValue,
    refresh_at: Instant,
    /// `expires_at` less the minimum validity: past this, the token is not used.
    usable_until: Instant,
}

struct Inner {
    credential: Arc<dyn TokenCredential>,
    cache: RwLock<HashMap<String, Cached>>,
    /// Single flight: one fetch at a time, whatever the number of waiting requests.
    fetching: Arc<tokio::sync::Mutex<()>>,
    fetches: AtomicU64,
    failures: AtomicU64,
}

/// Entra tokens from a credential, cached per scope and renewed before they expire.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("fetches", &self.fetches())
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// The managed identity of the Function App (`IDENTITY_ENDPOINT`/`IDENTITY_HEADER`), or the
    /// VM's instance metadata service elsewhere.
    pub fn managed_identity(settings: &IdentitySettings) -> Result<Self, IdentityError> {
        let options = ManagedIdentityCredentialOptions {
            user_assigned_id: settings.client_id.clone().map(UserAssignedId::ClientId),
            ..Default::default()
        };
        let credential = ManagedIdentityCredential::new(Some(options))
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        Ok(Self::from_credential(credential))
    }

    /// Any credential (tests, or another identity kind).
    pub fn from_credential(credential: Arc<dyn TokenCredential>) -> Self {
        TokenSource {
            inner: Arc::new(Inner {
                credential,
                cache: RwLock::new(HashMap::new()),
                fetching: Arc::new(tokio::sync::Mutex::new(())),
                fetches: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// The credential, for Azure SDK clients (Cosmos DB, Key Vault).
    pub fn credential(&self) -> Arc<dyn TokenCredential> {
        self.inner.credential.clone()
    }

    /// How many token fetches this source has started (a counter for logs and tests).
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// How many token fetches failed.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// A bearer token for `scope` (e.g. [`COGNITIVE_SERVICES_SCOPE`]), from the cache when it
    /// holds one that is not due for renewal.
    pub async fn bearer(&self, scope: &str) -> Result<Secret, IdentityError> {
        self.cached(scope).await.map(|c| c.token)
    }

    /// `Authorization: Bearer …` for `scope`, as a header value marked sensitive.
    pub async fn authorization(&self, scope: &str) -> Result<HeaderValue, IdentityError> {
        self.cached(scope).await.map(|c| c.header)
    }

    async fn cached(&self, scope: &str) -> Result<Cached, IdentityError> {
        let now = Instant::now();
        if let Some(c) = self.peek(scope) {
            if now < c.refresh_at {
                return Ok(c);
            }
            if now < c.usable_until {
                // Due for renewal but still good: answer now, renew in the background.
                if let Ok(guard) = self.inner.fetching.clone().try_lock_owned() {
                    let this = self.clone();
                    let scope = scope.to_string();
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(e) = this.fetch(&scope).await {
                            tracing::warn!(
                                target: "identity",
                                scope = %scope,
                                error = %e,
                                "token renewal failed; the current token stays in use until it expires"
                            );
                        }
                    });
                }
                return Ok(c);
            }
        }
        let _guard = self.inner.fetching.lock().await;
        // Another request may have fetched while we waited.
        if let Some(c) = self.peek(scope) {
            if Instant::now() < c.refresh_at {
                return Ok(c);
            }
        }
        self.fetch(scope).await
    }

    fn peek(&self, scope: &str) -> Option<Cached> {
        self.inner
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(scope)
            .cloned()
    }

    /// Fetch a token now and cache it. Callers hold the `fetching` lock.
    async fn fetch(&self, scope: &str) -> Result<Cached, IdentityError> {
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let got = tokio::time::timeout(
            FETCH_TIMEOUT,
            self.inner.credential.get_token(&[scope], None),
        )
        .await;
        let token = match got {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                return Err(IdentityError::Token {
                    scope: scope.to_string(),
                    message: e.to_string(),
                });
            }
            Err(_) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                return Err(IdentityError::Timeout {
                    scope: scope.to_string(),
                });
            }
        };
        let lifetime = (token.expires_on - azure_core::time::OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        let expires_at = started + lifetime;
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        let mut header = HeaderValue::from_str(&format!("Bearer {}", token.token.secret()))
            .map_err(|_| IdentityError::Token {
                scope: scope.to_string(),
                message: "the token is not a valid header value".into(),
            })?;
        header.set_sensitive(true);
        let cached = Cached {
            token: Secret::new(token.token.secret()),
            header,
            refresh_at: expires_at - margin,
            usable_until: expires_at - MIN_VALIDITY.min(lifetime / 10),
        };
        tracing::info!(
            target: "identity",
            scope = %scope,
            valid_s = lifetime.as_secs(),
            fetch_ms = started.elapsed().as_secs_f64() * 1000.0,
            "token fetched"
        );
        self.inner
            .cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(scope.to_string(), cached.clone());
        Ok(cached)
    }
}
