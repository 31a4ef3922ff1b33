//! The Cosmos DB account of the abuse log and the user registry, with `azure_data_cosmos`.
//!
//! [`CosmosAccount`] connects lazily: building a Cosmos client reads the account's metadata, and
//! a Cosmos outage at start must not stop the handler (abuse records go to the durable spool
//! meanwhile, see [`crate::pipeline::audit`]). Each call that needs a container asks for it; a
//! failed connection is retried by the next call.
//!
//! Auth: `COSMOS_KEY` (shared key) when set, otherwise the managed identity (a token credential;
//! the identity needs the "Cosmos DB Built-in Data Contributor" data-plane role). Databases and
//! containers are created by the infrastructure (Bicep), not here: data-plane roles cannot
//! create them.
//!
//! Containers: `COSMOS_CONTAINER` holds abuse records (partition key `/user`);
//! `COSMOS_USAGE_CONTAINER` holds usage summaries (partition key `/caller`, see
//! [`crate::pipeline::meter::summary`]);
//! `COSMOS_USERS_CONTAINER` holds one item per registered user (`id` = user name, or a `user`
//! field; `"enabled": false` excludes an item), read by [`CosmosAccount::list_users`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use azure_data_cosmos::clients::ContainerClient;
use azure_data_cosmos::options::Region;
use azure_data_cosmos::{
    AccountEndpoint, AccountReference, CosmosClient, CosmosClientBuilder, FeedScope, Query,
    RoutingStrategy,
};
use futures_util::TryStreamExt;
use serde::Deserialize;
use url::Url;

pub use azure_data_cosmos::CosmosError;

use crate::clients::keyvault::VaultSecret;
use crate::settings::{is_loopback_host, Secret, SettingsError, Source};

/// Registry reads stop after this many users (a users container is not meant to be larger; a
/// bound keeps a mistaken container from eating the handler's memory).
pub const MAX_USERS: usize = 1_000_000;

/// Cosmos DB settings.
#[derive(Debug, Clone)]
pub struct CosmosSettings {
    /// `COSMOS_ENDPOINT`: `https://<account>.documents.azure.com:443/` (http only for loopback).
    pub endpoint: Url,
    /// `COSMOS_KEY`: the account key; `None` = managed identity.
    pub key: Option<Secret>,
    /// `COSMOS_DATABASE` (default `fwdproxy`).
    pub database: String,
    /// `COSMOS_CONTAINER` (default `abuse-log`): abuse records, partition key `/user`.
    pub container: String,
    /// `COSMOS_USERS_CONTAINER` (default `users`): the user registry.
    pub users_container: String,
    /// `COSMOS_USAGE_CONTAINER` (default `usage`): usage summaries, partition key `/caller`.
    pub usage_container: String,
    /// `COSMOS_REGION`, else App Service's `REGION_NAME`: route to the nearest region first.
    pub region: Option<String>,
    /// `COSMOS_USERS_REFRESH_SECS` (default 300): how often the user registry is re-read.
    pub users_refresh: Duration,
}

impl CosmosSettings {
    /// `None` when `COSMOS_ENDPOINT` is unset (no Cosmos DB: abuse records go to
    /// `AUDIT_LOG_PATH`, the registry is `REGISTERED_USERS` alone).
    pub fn from_source(src: &Source) -> Result<Option<Self>, SettingsError> {
        let Some(raw) = src.get("COSMOS_ENDPOINT")? else {
            return Ok(None);
        };
        let endpoint = Url::parse(raw).map_err(|e| {
            SettingsError::new(
                "COSMOS_ENDPOINT",
                format!("must be https://<account>.documents.azure.com:443/ ({e})"),
            )
        })?;
        let host = endpoint
            .host()
            .ok_or_else(|| SettingsError::new("COSMOS_ENDPOINT", "has no host"))?;
        match endpoint.scheme() {
            "https" => {}
            "http" if is_loopback_host(&host) => {}
            _ => {
                return Err(SettingsError::new(
                    "COSMOS_ENDPOINT",
                    "must use https:// (http:// only for a loopback emulator)",
                ))
            }
        }
        let name = |setting: &'static str, default: &str| -> Result<String, SettingsError> {
            let v = src.get(setting)?.unwrap_or(default);
            let ok = !v.is_empty()
                && v.len() <= 255
                && !v.chars().any(|c| "/\\?#".contains(c) || c.is_control());
            if ok {
                Ok(v.to_string())
            } else {
                Err(SettingsError::new(
                    setting,
                    "must be 1-255 characters without / \\ ? #",
                ))
            }
        };
        Ok(Some(CosmosSettings {
            endpoint,
            key: src.get("COSMOS_KEY")?.map(Secret::new),
            database: name("COSMOS_DATABASE", "fwdproxy")?,
            container: name("COSMOS_CONTAINER", "abuse-log")?,
            users_container: name("COSMOS_USERS_CONTAINER", "users")?,
            usage_container: name("COSMOS_USAGE_CONTAINER", "usage")?,
            region: match src.get("COSMOS_REGION")? {
                Some(r) => Some(r.to_string()),
                None => src.get("REGION_NAME")?.map(str::to_string),
            },
            users_refresh: {
                let secs: u64 = src.number("COSMOS_USERS_REFRESH_SECS", 300)?;
                if secs == 0 {
                    return Err(SettingsError::new(
                        "COSMOS_USERS_REFRESH_SECS",
                        "must be above 0",
                    ));
                }
                Duration::from_secs(secs)
            },
        }))
    }
}

/// Makes the [`CosmosClientBuilder`] each connection starts from. The default is
/// `CosmosClientBuilder::new`; tests hand one with the SDK's in-memory emulator runtime and
/// fault-injection rules.
pub type BuilderFactory = Arc<dyn Fn() -> CosmosClientBuilder + Send + Sync>;

enum Auth {
    Key(Secret),
    /// `COSMOS_KEY_SECRET_URI`: the current value of the Key Vault secret, refreshed every
    /// `KEYVAULT_REFRESH_SECS` and on a 401/403 from Cosmos DB ([`CosmosAccount::key_rejected`]).
    Vault(VaultSecret),
    Token(Arc<dyn TokenCredential>),
}

/// The Cosmos DB account, connected on first use and shared.
pub struct CosmosAccount {
    settings: CosmosSettings,
    auth: Auth,
    builder: BuilderFactory,
    /// The client, and the key it was built with (a changed key rebuilds it).
    client: tokio::sync::Mutex<Option<(CosmosClient, Option<Secret>)>>,
    containers: Mutex<HashMap<String, ContainerClient>>,
}

impl std::fmt::Debug for CosmosAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CosmosAccount")
            .field("endpoint", &self.settings.endpoint.as_str())
            .field("database", &self.settings.database)
            .field("key_auth", &!matches!(self.auth, Auth::Token(_)))
            .finish_non_exhaustive()
    }
}

impl CosmosAccount {
    /// The account from its settings. Without `COSMOS_KEY`, `credential` (the managed
    /// identity) is required.
    pub fn new(
        settings: CosmosSettings,
        credential: Option<Arc<dyn TokenCredential>>,
    ) -> Result<Self, SettingsError> {
        let auth = match (&settings.key, credential) {
            (Some(key), _) => Auth::Key(key.clone()),
            (None, Some(c)) => Auth::Token(c),
            (None, None) => {
                return Err(SettingsError::new(
                    "COSMOS_KEY",
                    "is unset and no managed identity is available for Cosmos DB",
                ))
            }
        };
        Ok(CosmosAccount {
            settings,
            auth,
            builder: Arc::new(CosmosClientBuilder::new),
            client: tokio::sync::Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        })
    }

    /// Take the Cosmos DB key from Key Vault (`COSMOS_KEY_SECRET_URI`) instead of `COSMOS_KEY`:
    /// each connection uses the secret's current value, and a new value (periodic refresh or
    /// [`CosmosAccount::key_rejected`]) makes the next call connect again with it.
    pub fn with_vault_key(mut self, secret: VaultSecret) -> Self {
        self.auth = Auth::Vault(secret);
        self
    }

    /// Cosmos DB answered 401/403: re-read the key from Key Vault (single flight, spaced) and
    /// reconnect when it changed. Nothing to do with a fixed key or a token credential.
    pub async fn key_rejected(&self) {
        let Auth::Vault(secret) = &self.auth else {
            return;
        };
        match secret.refresh().await {
            Ok(true) => {
                tracing::info!(target: "cosmos", "Cosmos DB key re-read from Key Vault after a 401: reconnecting");
                self.reset().await;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(target: "cosmos", error = %e, "re-reading the Cosmos DB key from Key Vault failed; keeping the last good value")
            }
        }
    }

    /// Start every connection from `builder()` instead of `CosmosClientBuilder::new()`.
    pub fn with_builder(mut self, builder: BuilderFactory) -> Self {
        self.builder = builder;
        self
    }

    /// The factory connections start from (to build a sibling account with other settings).
    pub fn builder_factory(&self) -> BuilderFactory {
        self.builder.clone()
    }

    pub fn settings(&self) -> &CosmosSettings {
        &self.settings
    }

    /// Forget the client and containers, so the next call connects again (after the key was
    /// rotated, for instance).
    pub async fn reset(&self) {
        *self.client.lock().await = None;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    async fn client(&self) -> Result<CosmosClient, CosmosError> {
        let key = match &self.auth {
            Auth::Key(k) => Some(k.clone()),
            Auth::Vault(v) => Some(v.current()),
            Auth::Token(_) => None,
        };
        let mut slot = self.client.lock().await;
        match slot.as_ref() {
            Some((c, built_with)) if *built_with == key => return Ok(c.clone()),
            Some(_) => {
                // The key was rotated: containers resolved with the old client go too.
                self.containers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            }
            None => {}
        }
        let endpoint: AccountEndpoint = self.settings.endpoint.as_str().parse().map_err(|e| {
            CosmosError::builder()
                .with_message(format!("COSMOS_ENDPOINT is not a Cosmos endpoint: {e}"))
                .build()
        })?;
        let account = match (&self.auth, &key) {
            (Auth::Token(c), _) => AccountReference::with_credential(endpoint, c.clone()),
            // Key and Vault auth always carry a key (see above).
            (_, k) => AccountReference::with_authentication_key(
                endpoint,
                azure_core::credentials::Secret::new(
                    k.as_ref()
                        .map(|k| k.expose().to_string())
                        .unwrap_or_default(),
                ),
            ),
        };
        let routing = match &self.settings.region {
            Some(r) => RoutingStrategy::ProximityTo(Region::from(r.clone())),
            None => RoutingStrategy::PreferredRegions(Vec::new()),
        };
        let client = (self.builder)().build(account, routing).await?;
        tracing::info!(target: "cosmos", endpoint = %self.settings.endpoint, "connected to Cosmos DB");
        *slot = Some((client.clone(), key));
        Ok(client)
    }

    /// A container of the database, cached once resolved (and dropped when the key changes).
    pub async fn container(&self, name: &str) -> Result<ContainerClient, CosmosError> {
        // A connection in progress holds the lock: skip the check then (it uses the new key).
        let rotated = match &self.auth {
            Auth::Vault(v) => self.client.try_lock().is_ok_and(|slot| {
                let current = v.current();
                slot.as_ref()
                    .is_some_and(|(_, k)| k.as_ref() != Some(&current))
            }),
            _ => false,
        };
        if rotated {
            self.reset().await;
        }
        if let Some(c) = self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(c.clone());
        }
        let client = self.client().await?;
        let container = client
            .database_client(self.settings.database.as_str())
            .container_client(name, None)
            .await?;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), container.clone());
        Ok(container)
    }

    /// The abuse-log container (`COSMOS_CONTAINER`).
    pub async fn abuse_container(&self) -> Result<ContainerClient, CosmosError> {
        self.container(&self.settings.container).await
    }

    /// Every registered user in `COSMOS_USERS_CONTAINER`: each item's `user` field when it has
    /// one, its `id` otherwise; items with `"enabled": false` are left out.
    pub async fn list_users(&self) -> Result<HashSet<String>, CosmosError> {
        #[derive(Deserialize)]
        struct UserItem {
            id: String,
            #[serde(default)]
            user: Option<String>,
            #[serde(default)]
            enabled: Option<bool>,
        }
        let container = self.container(&self.settings.users_container).await?;
        let query = Query::from("SELECT c.id, c.user, c.enabled FROM c");
        let mut items = container
            .query_items::<UserItem>(query, FeedScope::full_container(), None)
            .await?;
        let mut users = HashSet::new();
        while let Some(item) = items.try_next().await? {
            if item.enabled == Some(false) {
                continue;
            }
            let name = item.user.filter(|u| !u.is_empty()).unwrap_or(item.id);
            users.insert(name);
            if users.len() >= MAX_USERS {
                tracing::warn!(target: "cosmos", max = MAX_USERS, "user registry truncated");
                break;
            }
        }
        Ok(users)
    }
}

/// Read the user registry now and then every `COSMOS_USERS_REFRESH_SECS`, handing each good
/// read to `apply` (the registry replaces its remote copy). A failed read is logged and the
/// last good copy stays; the first read is retried after 5 s while none has succeeded. One
/// read may take at most 30 s. Runs until the task is aborted.
pub fn spawn_user_refresh(
    account: Arc<CosmosAccount>,
    apply: impl Fn(HashSet<String>) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    const READ_TIMEOUT: Duration = Duration::from_secs(30);
    const FIRST_RETRY: Duration = Duration::from_secs(5);
    let every = account.settings.users_refresh;
    tokio::spawn(async move {
        let mut loaded = false;
        loop {
            let started = std::time::Instant::now();
            match tokio::time::timeout(READ_TIMEOUT, account.list_users()).await {
                Ok(Ok(users)) => {
                    tracing::info!(
                        target: "registry",
                        users = users.len(),
                        read_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "user registry refreshed from Cosmos DB"
                    );
                    apply(users);
                    loaded = true;
                }
                Ok(Err(e)) => tracing::warn!(
                    target: "registry",
                    error = %e,
                    kept_last_good_copy = loaded,
                    "user registry refresh failed; keeping the last good copy"
                ),
                Err(_) => tracing::warn!(
                    target: "registry",
                    kept_last_good_copy = loaded,
                    "user registry refresh timed out; keeping the last good copy"
                ),
            }
            tokio::time::sleep(if loaded {
                every
            } else {
                every.min(FIRST_RETRY)
            })
            .await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_defaults_and_checks() {
        assert!(
            CosmosSettings::from_source(&Source::from_map(Vec::<(String, String)>::new()))
                .unwrap()
                .is_none()
        );
        let s = CosmosSettings::from_source(&Source::from_map([(
            "COSMOS_ENDPOINT",
            "https://acct.documents.azure.com:443/",
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(s.database, "fwdproxy");
        assert_eq!(s.container, "abuse-log");
        assert_eq!(s.users_container, "users");
        assert_eq!(s.usage_container, "usage");
        assert!(s.key.is_none());
        for (k, v) in [
            ("COSMOS_ENDPOINT", "http://acct.documents.azure.com/"),
            ("COSMOS_ENDPOINT", "not a url"),
            ("COSMOS_CONTAINER", "a/b"),
            ("COSMOS_USAGE_CONTAINER", "u#1"),
        ] {
            let mut pairs = vec![("COSMOS_ENDPOINT", "https://acct.documents.azure.com/")];
            pairs.retain(|(n, _)| *n != k);
            pairs.push((k, v));
            let e = CosmosSettings::from_source(&Source::from_map(pairs)).unwrap_err();
            assert_eq!(e.name, k);
        }
        assert!(CosmosSettings::from_source(&Source::from_map([(
            "COSMOS_ENDPOINT",
            "http://127.0.0.1:8081/"
        )]))
        .is_ok());
    }

    #[test]
    fn key_never_printed() {
        let s = CosmosSettings::from_source(&Source::from_map([
            ("COSMOS_ENDPOINT", "https://acct.documents.azure.com/"),
            ("COSMOS_KEY", "c2VjcmV0LWNvc21vcy1rZXk="),
        ]))
        .unwrap()
        .unwrap();
        let account = CosmosAccount::new(s.clone(), None).unwrap();
        for text in [format!("{s:?}"), format!("{account:?}")] {
            assert!(!text.contains("c2VjcmV0"), "{text}");
        }
        let mut no_key = s;
        no_key.key = None;
        assert_eq!(
            CosmosAccount::new(no_key, None).unwrap_err().name,
            "COSMOS_KEY"
        );
    }
}
