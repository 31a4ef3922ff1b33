//! The Cosmos DB SDK's own in-memory emulator (feature `__internal_in_memory_emulator`), with
//! the SDK's public `fault_injection` rules, behind the handler's [`CosmosAccount`].
//!
//! Each [`Emu`] is a separate virtual account holding database `fwdproxy` with the containers
//! `abuse-log` (partition key `/user`), `users` (partition key `/id`) and `usage` (partition key
//! `/caller`). Clients built from it
//! share its store, so a "restarted" handler sees what the first one wrote.

use std::collections::HashSet;
use std::sync::Arc;

use aoai_fwdproxy::clients::cosmos::{CosmosAccount, CosmosSettings};
use aoai_fwdproxy::settings::Source;
use azure_data_cosmos::fault_injection::FaultInjectionRule;
use azure_data_cosmos::options::Region;
use azure_data_cosmos::{
    AccountEndpoint, AccountReference, CosmosClientBuilder, CosmosRuntime, CosmosRuntimeBuilder,
    FeedScope, Query, RoutingStrategy,
};
use azure_data_cosmos_driver::in_memory_emulator::{
    EmulatorStore, InMemoryEmulatorHttpClient, VirtualAccountConfig, VirtualRegion,
};
use futures_util::TryStreamExt;

pub const ENDPOINT: &str = "https://eastus.emulator.local";
/// The emulator accepts any well-formed key.
pub const KEY: &str = "dGVzdGtleQ==";
pub const DATABASE: &str = "fwdproxy";
pub const CONTAINER: &str = "abuse-log";
pub const USERS: &str = "users";
pub const USAGE: &str = "usage";

pub struct Emu {
    pub store: Arc<EmulatorStore>,
    runtime: CosmosRuntime,
}

impl Emu {
    pub async fn start() -> Self {
        let config = VirtualAccountConfig::new(vec![VirtualRegion::new(
            "East US",
            azure_core::http::Url::parse(ENDPOINT).unwrap(),
        )])
        .unwrap();
        let emulator = Arc::new(InMemoryEmulatorHttpClient::new(config));
        let store = emulator.store();
        store.create_database(DATABASE);
        for (name, pk) in [(CONTAINER, "/user"), (USERS, "/id"), (USAGE, "/caller")] {
            store.create_container(
                DATABASE,
                name,
                serde_json::from_value(serde_json::json!({
                    "paths": [pk], "kind": "Hash", "version": 2
                }))
                .unwrap(),
            );
        }
        let runtime = CosmosRuntimeBuilder::from(emulator.runtime_builder())
            .build()
            .await
            .unwrap();
        Emu { store, runtime }
    }

    /// The settings a handler would have for this account.
    pub fn pairs(&self) -> Vec<(String, String)> {
        [
            ("COSMOS_ENDPOINT", ENDPOINT),
            ("COSMOS_KEY", KEY),
            ("COSMOS_DATABASE", DATABASE),
            ("COSMOS_CONTAINER", CONTAINER),
            ("COSMOS_USERS_CONTAINER", USERS),
            ("COSMOS_USAGE_CONTAINER", USAGE),
            ("COSMOS_REGION", "East US"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn settings(&self) -> CosmosSettings {
        CosmosSettings::from_source(&Source::from_map(self.pairs()))
            .unwrap()
            .unwrap()
    }

    /// The handler's account on this emulator, with `rules` injected below the SDK's retries.
    pub fn account(&self, rules: Vec<Arc<FaultInjectionRule>>) -> Arc<CosmosAccount> {
        let runtime = self.runtime.clone();
        let factory = move || {
            let b = CosmosClientBuilder::new().with_runtime(runtime.clone());
            if rules.is_empty() {
                b
            } else {
                b.with_fault_injection_rules(rules.clone()).unwrap()
            }
        };
        Arc::new(
            CosmosAccount::new(self.settings(), None)
                .unwrap()
                .with_builder(Arc::new(factory)),
        )
    }

    /// A fault-free client of the same account, to look at what is stored.
    pub async fn container(&self, name: &str) -> azure_data_cosmos::clients::ContainerClient {
        let account = AccountReference::with_authentication_key(
            ENDPOINT.parse::<AccountEndpoint>().unwrap(),
            azure_core::credentials::Secret::new(KEY),
        );
        CosmosClientBuilder::new()
            .with_runtime(self.runtime.clone())
            .build(account, RoutingStrategy::ProximityTo(Region::EAST_US))
            .await
            .unwrap()
            .database_client(DATABASE)
            .container_client(name, None)
            .await
            .unwrap()
    }

    /// Every id in the abuse-log container, and whether one refusal is stored twice.
    ///
    /// Item ids are unique per partition by construction (an upsert of the same id overwrites),
    /// so comparing ids alone could never find a duplicate. A refusal is identified by its
    /// request id and reason: the same pair under two ids (a replay that minted a new id, a
    /// record written to two partitions) is the duplicate this flag reports.
    pub async fn abuse_ids(&self) -> (Vec<String>, bool) {
        #[derive(serde::Deserialize)]
        struct Item {
            id: String,
            #[serde(default)]
            request_id: String,
            #[serde(default)]
            reason: serde_json::Value,
        }
        let c = self.container(CONTAINER).await;
        let mut it = c
            .query_items::<Item>(
                Query::from("SELECT c.id, c.request_id, c.reason FROM c"),
                FeedScope::full_container(),
                None,
            )
            .await
            .unwrap();
        let mut items = Vec::new();
        while let Some(i) = it.try_next().await.unwrap() {
            items.push(i);
        }
        let refusals: HashSet<(&str, String)> = items
            .iter()
            .map(|i| (i.request_id.as_str(), i.reason.to_string()))
            .collect();
        let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
        let unique_ids: HashSet<&String> = ids.iter().collect();
        let dup = refusals.len() != items.len() || unique_ids.len() != ids.len();
        (ids, dup)
    }

    pub async fn abuse_count(&self) -> usize {
        let (ids, dup) = self.abuse_ids().await;
        assert!(!dup, "an abuse record is stored twice");
        ids.len()
    }
}
