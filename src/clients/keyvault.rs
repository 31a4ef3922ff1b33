//! Secrets from Azure Key Vault, fetched with `azure_security_keyvault_secrets`.
//!
//! Two ways to keep a key in Key Vault:
//! - App Service Key Vault references (`@Microsoft.KeyVault(SecretUri=…)` as the app setting's
//!   value): the platform resolves them before the handler starts; nothing to code, and an
//!   unresolved reference stops the start with a message (see [`crate::settings::Source::get`]).
//! - A secret URI setting (`AOAI_OUTAPIKEY_SECRET_URI`, `CONTENT_SAFETY_KEY_SECRET_URI`,
//!   `COSMOS_KEY_SECRET_URI`): the handler fetches the secret at start with its managed identity
//!   ([`VaultSecret::fetch`]), re-fetches it on demand ([`VaultSecret::refresh`], called when
//!   AOAI answers 401 after a key rotation) and every `KEYVAULT_REFRESH_SECS`
//!   ([`VaultSecret::spawn_periodic`]).
//!
//! Refreshes are single flight and spaced by a minimum gap, so a burst of 401s makes one Key
//! Vault call, not one per request. A failed refresh keeps the last good value. The value never
//! reaches a log line: logs name the setting and the secret's version only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use azure_security_keyvault_secrets::{
    models::SecretClientGetSecretOptions, SecretClient, SecretClientOptions,
};
use url::Url;

use crate::settings::{Secret, SettingsError, Source};

/// Default spacing of periodic refreshes.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
/// Default minimum gap between two on-demand refreshes.
pub const DEFAULT_MIN_REFRESH_GAP: Duration = Duration::from_secs(30);
/// One Key Vault call may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
#[error("Key Vault secret for {setting}: {message}")]
pub struct KeyVaultError {
    pub setting: &'static str,
    pub message: String,
}

/// A parsed secret URI: `https://{vault}.vault.azure.net/secrets/{name}[/{version}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretUri {
    /// The setting that named it, for messages.
    pub setting: &'static str,
    /// `https://{vault}.vault.azure.net/`
    pub vault_url: String,
    pub name: String,
    /// A pinned version; `None` follows the latest (what rotation needs).
    pub version: Option<String>,
}

impl SecretUri {
    pub fn parse(setting: &'static str, value: &str) -> Result<Self, SettingsError> {
        let url = Url::parse(value).map_err(|e| {
            SettingsError::new(setting, format!("is not a Key Vault secret URI ({e})"))
        })?;
        if url.scheme() != "https" {
            return Err(SettingsError::new(
                setting,
                "must be an https:// Key Vault secret URI (Key Vault tokens never travel over http)",
            ));
        }
        if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
            return Err(SettingsError::new(
                setting,
                "must be https://<vault>.vault.azure.net/secrets/<name>[/<version>]",
            ));
        }
        let segments: Vec<&str> = url
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.len() <= 127
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        let (name, version) = match segments.as_slice() {
            ["secrets", name] if valid_name(name) => (name.to_string(), None),
            ["secrets", name, version] if valid_name(name) && valid_name(version) => {
                (name.to_string(), Some(version.to_string()))
            }
            _ => {
                return Err(SettingsError::new(
                    setting,
                    "must be https://<vault>.vault.azure.net/secrets/<name>[/<version>]",
                ))
            }
        };
        let mut vault = url.clone();
        vault.set_path("/");
        Ok(SecretUri {
            setting,
            vault_url: vault.to_string(),
            name,
            version,
        })
    }
}

/// The Key Vault settings: which secrets to fetch and how often to refresh them.
#[derive(Debug, Clone)]
pub struct KeyVaultSettings {
    /// `AOAI_OUTAPIKEY_SECRET_URI`: the real AOAI key.
    pub aoai_key: Option<SecretUri>,
    /// `CONTENT_SAFETY_KEY_SECRET_URI`: the Content Safety key.
    pub content_safety_key: Option<SecretUri>,
    /// `COSMOS_KEY_SECRET_URI`: the Cosmos DB account key.
    pub cosmos_key: Option<SecretUri>,
    /// `KEYVAULT_REFRESH_SECS` (default 3600, `0` = only at start and on demand).
    pub refresh: Option<Duration>,
}

impl KeyVaultSettings {
    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        let uri = |name: &'static str| -> Result<Option<SecretUri>, SettingsError> {
            src.get(name)?
                .map(|v| SecretUri::parse(name, v))
                .transpose()
        };
        let secs: u64 = src.number("KEYVAULT_REFRESH_SECS", DEFAULT_REFRESH.as_secs())?;
        Ok(KeyVaultSettings {
            aoai_key: uri("AOAI_OUTAPIKEY_SECRET_URI")?,
            content_safety_key: uri("CONTENT_SAFETY_KEY_SECRET_URI")?,
            cosmos_key: uri("COSMOS_KEY_SECRET_URI")?,
            refresh: (secs > 0).then(|| Duration::from_secs(secs)),
        })
    }

    /// True when any secret comes from Key Vault (so the managed identity is needed).
    pub fn any(&self) -> bool {
        self.aoai_key.is_some() || self.content_safety_key.is_some() || self.cosmos_key.is_some()
    }
}

struct Inner {
    uri: SecretUri,
    client: SecretClient,
    value: RwLock<Secret>,
    version: RwLock<Option<String>>,
    /// Single flight and the time of the last completed refresh.
    refreshing: tokio::sync::Mutex<Instant>,
    min_gap: Mutex<Duration>,
    fetches: AtomicU64,
    failures: AtomicU64,
}

/// One secret from Key Vault: its current value and how to renew it.
#[derive(Clone)]
pub struct VaultSecret {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VaultSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSecret")
            .field("setting", &self.inner.uri.setting)
            .field("name", &self.inner.uri.name)
            .field("version", &self.version())
            .field("value", &"*****")
            .finish()
    }
}

impl VaultSecret {
    /// Fetch the secret now (at start), with the default client options.
    pub async fn fetch(
        uri: &SecretUri,
        credential: Arc<dyn TokenCredential>,
    ) -> Result<Self, KeyVaultError> {
        Self::fetch_with(uri, credential, SecretClientOptions::default()).await
    }

    /// Fetch the secret now with explicit client options (a custom transport, or
    /// `verify_challenge_resource: Some(false)` for a local test vault).
    pub async fn fetch_with(
        uri: &SecretUri,
        credential: Arc<dyn TokenCredential>,
        options: SecretClientOptions,
    ) -> Result<Self, KeyVaultError> {
        let client = SecretClient::new(&uri.vault_url, credential, Some(options)).map_err(|e| {
            KeyVaultError {
                setting: uri.setting,
                message: e.to_string(),
            }
        })?;
        let inner = Arc::new(Inner {
            uri: uri.clone(),
            client,
            value: RwLock::new(Secret::new("")),
            version: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(Instant::now()),
            min_gap: Mutex::new(DEFAULT_MIN_REFRESH_GAP),
            fetches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        let secret = VaultSecret { inner };
        secret.get().await?;
        Ok(secret)
    }

    /// The current value.
    pub fn current(&self) -> Secret {
        self.inner
            .value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The version of the current value (the last segment of Key Vault's `id`).
    pub fn version(&self) -> Option<String> {
        self.inner
            .version
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The setting this secret answers for.
    pub fn setting(&self) -> &'static str {
        self.inner.uri.setting
    }

    /// Key Vault calls made so far (start, refreshes).
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// Failed Key Vault calls so far.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// The minimum gap between two refreshes ([`DEFAULT_MIN_REFRESH_GAP`] unless set).
    pub fn set_min_refresh_gap(&self, gap: Duration) {
        *self.inner.min_gap.lock().unwrap_or_else(|e| e.into_inner()) = gap;
    }

    /// Re-fetch the secret (AOAI answered 401: the key may have been rotated). Returns whether
    /// the value changed. Concurrent callers share one call; a call within the minimum gap of
    /// the last one returns `Ok(false)` without asking Key Vault. On failure the last good value
    /// stays in use.
    pub async fn refresh(&self) -> Result<bool, KeyVaultError> {
        let gap = *self.inner.min_gap.lock().unwrap_or_else(|e| e.into_inner());
        let asked = Instant::now();
        let mut last = self.inner.refreshing.lock().await;
        if *last >= asked || last.elapsed() < gap {
            // Someone refreshed while we waited, or very recently.
            return Ok(false);
        }
        let before = self.current();
        let result = self.get().await;
        *last = Instant::now();
        result.map(|()| self.current() != before)
    }

    /// Refresh every `every` until the returned task is aborted.
    pub fn spawn_periodic(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = this.refresh().await {
                    tracing::warn!(target: "keyvault", error = %e, "periodic refresh failed; keeping the last good value");
                }
            }
        })
    }

    /// One Key Vault call; on success the value and version are replaced.
    async fn get(&self) -> Result<(), KeyVaultError> {
        let uri = &self.inner.uri;
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let err = |message: String| KeyVaultError {
            setting: uri.setting,
            message,
        };
        let options = SecretClientGetSecretOptions {
            secret_version: uri.version.clone(),
            ..Default::default()
        };
        let started = Instant::now();
        let result = tokio::time::timeout(
            CALL_TIMEOUT,
            self.inner.client.get_secret(&uri.name, Some(options)),
        )
        .await;
        let response = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                return Err(err(e.to_string()));
            }
            Err(_) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                return Err(err("Key Vault did not answer in time".into()));
            }
        };
        let secret = response.into_model().map_err(|e| {
            self.inner.failures.fetch_add(1, Ordering::Relaxed);
            err(format!("unexpected answer: {e}"))
        })?;
        let Some(value) = secret.value.filter(|v| !v.is_empty()) else {
            self.inner.failures.fetch_add(1, Ordering::Relaxed);
            return Err(err("the secret has no value".into()));
        };
        let version = secret
            .id
            .as_deref()
            .and_then(|id| id.rsplit('/').next())
            .map(str::to_string);
        let changed = *self.inner.value.read().unwrap_or_else(|e| e.into_inner())
            != Secret::new(value.as_str());
        *self.inner.value.write().unwrap_or_else(|e| e.into_inner()) = Secret::new(value);
        *self
            .inner
            .version
            .write()
            .unwrap_or_else(|e| e.into_inner()) = version.clone();
        tracing::info!(
            target: "keyvault",
            setting = uri.setting,
            secret = %uri.name,
            version = version.as_deref().unwrap_or(""),
            changed,
            fetch_ms = started.elapsed().as_secs_f64() * 1000.0,
            "secret fetched"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_uris_parse() {
        let u = SecretUri::parse("X", "https://v1.vault.azure.net/secrets/aoai-key").unwrap();
        assert_eq!(u.vault_url, "https://v1.vault.azure.net/");
        assert_eq!(u.name, "aoai-key");
        assert_eq!(u.version, None);
        let u = SecretUri::parse("X", "https://v1.vault.azure.net/secrets/k/0123abcd/").unwrap();
        assert_eq!(u.version.as_deref(), Some("0123abcd"));
        for bad in [
            "http://v1.vault.azure.net/secrets/k",
            "https://v1.vault.azure.net/keys/k",
            "https://v1.vault.azure.net/secrets/",
            "https://v1.vault.azure.net/secrets/k?x=1",
            "https://v1.vault.azure.net/secrets/a_b",
            "v1.vault.azure.net/secrets/k",
        ] {
            let e = SecretUri::parse("X", bad).unwrap_err();
            assert_eq!(e.name, "X", "{bad}");
        }
    }

    #[test]
    fn settings_default_refresh_and_off() {
        let s = KeyVaultSettings::from_source(&Source::from_map([(
            "AOAI_OUTAPIKEY_SECRET_URI",
            "https://v.vault.azure.net/secrets/k",
        )]))
        .unwrap();
        assert!(s.any());
        assert_eq!(s.refresh, Some(DEFAULT_REFRESH));
        let s = KeyVaultSettings::from_source(&Source::from_map([("KEYVAULT_REFRESH_SECS", "0")]))
            .unwrap();
        assert!(!s.any());
        assert_eq!(s.refresh, None);
    }
}
