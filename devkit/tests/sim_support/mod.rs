//! A simulated AOAI resource on port 0 with a client, shared by the simulator's test modules
//! (`devkit/tests/it`).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use fwdproxy_devkit::server::RunningServer;
use fwdproxy_devkit::sim::aoai::{self, AoaiConfig, AoaiSim};
use serde_json::Value;

pub const KEY: &str = "test-sim-key-0123456789";
pub const Q: &str = "api-version=2024-10-21";

pub struct Sim {
    pub server: RunningServer,
    pub sim: Arc<AoaiSim>,
    pub client: reqwest::Client,
}

impl Sim {
    pub async fn start(tweak: impl FnOnce(&mut AoaiConfig)) -> Self {
        let mut config = AoaiConfig {
            name: "sim-t".into(),
            key: KEY.into(),
            time_per_token: Duration::ZERO,
            first_token: Duration::ZERO,
            ..AoaiConfig::default()
        };
        tweak(&mut config);
        let (server, sim) = aoai::start(config, 0).await.unwrap();
        Sim {
            server,
            sim,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.server.url()))
            .header("api-key", KEY)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.req(reqwest::Method::GET, path).send().await.unwrap()
    }
}

/// Status, then the error code of an AOAI-shaped error body.
pub async fn error_code(resp: reqwest::Response, status: u16) -> String {
    assert_eq!(resp.status().as_u16(), status);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    body["error"]["code"].as_str().unwrap_or("").to_string()
}

/// `(event, data)` pairs of an SSE body with `event:` lines.
pub fn named_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}
