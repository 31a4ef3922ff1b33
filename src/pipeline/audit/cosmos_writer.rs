//! Upserts records into their container (the abuse log's, or the usage summaries'), with
//! retries.
//!
//! Ids are made once per record, writes are upserts: a record written twice (a timeout after
//! the service committed, a shipping pass repeated after a crash) is still one item. 429, 408,
//! 449, 5xx, transport errors and timeouts are retried with backoff, honouring Cosmos DB's
//! `x-ms-retry-after-ms`; 400 and 413 are final (the record goes to `.rejected`); 401/403 make
//! the account re-read its key (Key Vault rotation) before the next try.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::durable::Item;
use super::settings::AuditSettings;
use super::Counters;
use crate::clients::cosmos::{CosmosAccount, CosmosError};

/// Longest backoff between two tries of one record.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How one record's write ended.
#[derive(Debug)]
pub enum Outcome {
    Written,
    /// Cosmos refused it for good (400, 413): it goes to `.rejected`.
    Rejected(String),
    /// Cosmos did not take it within the tries: it stays in the journal.
    Down(String),
}

enum Failure {
    Permanent(String),
    Transient {
        message: String,
        retry_after: Option<Duration>,
        unauthorized: bool,
    },
}

fn classify(e: &CosmosError) -> Failure {
    let code = u16::from(e.status().status_code());
    let message = format!("status {code}: {e}");
    if matches!(code, 400 | 413) {
        return Failure::Permanent(message);
    }
    let retry_after = e
        .response()
        .and_then(|r| r.headers().retry_after_ms)
        .map(Duration::from_millis);
    Failure::Transient {
        message,
        retry_after,
        unauthorized: matches!(code, 401 | 403),
    }
}

/// Writes records of one kind to their container.
pub struct Writer {
    pub account: Arc<CosmosAccount>,
    /// The container's name (`COSMOS_CONTAINER`, `COSMOS_USAGE_CONTAINER`).
    pub container: String,
    pub settings: AuditSettings,
    pub counters: Arc<Counters>,
}

impl Writer {
    /// One record, retried up to `AUDIT_MAX_ATTEMPTS` times.
    pub async fn write<R: Item>(&self, record: &R) -> Outcome {
        let mut backoff = self.settings.retry_base;
        let mut last = String::new();
        for attempt in 1..=self.settings.max_attempts {
            let (message, retry_after) = match self.try_once(record).await {
                Ok(()) => return Outcome::Written,
                Err(Failure::Permanent(m)) => return Outcome::Rejected(m),
                Err(Failure::Transient {
                    message,
                    retry_after,
                    unauthorized,
                }) => {
                    if unauthorized {
                        self.account.key_rejected().await;
                    }
                    (message, retry_after)
                }
            };
            last = message;
            if attempt == self.settings.max_attempts {
                break;
            }
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            let wait = retry_after
                .map(|r| r.min(MAX_BACKOFF * 6))
                .unwrap_or_else(|| jitter(backoff));
            tracing::debug!(
                target: "audit",
                kind = R::KIND,
                record_id = %record.id(),
                attempt,
                wait_ms = wait.as_millis() as u64,
                honours_retry_after = retry_after.is_some(),
                error = %last,
                "record upsert failed; retrying"
            );
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Outcome::Down(last)
    }

    /// One try within `AUDIT_WRITE_TIMEOUT_MS` (used directly when the journal is unwritable).
    async fn try_once<R: Item>(&self, record: &R) -> Result<(), Failure> {
        match tokio::time::timeout(self.settings.write_timeout, self.upsert(record)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Transient {
                message: format!(
                    "no answer within {} ms",
                    self.settings.write_timeout.as_millis()
                ),
                retry_after: None,
                unauthorized: false,
            }),
        }
    }

    /// One try, for a record the journal could not take: true when Cosmos DB acknowledged it.
    pub async fn acknowledge<R: Item>(&self, record: &R) -> bool {
        self.try_once(record).await.is_ok()
    }

    async fn upsert<R: Item>(&self, record: &R) -> Result<(), CosmosError> {
        let container = self.account.container(&self.container).await?;
        container
            .upsert_item(record.partition_key(), record.id(), record, None)
            .await?;
        Ok(())
    }

    /// Write `records`, `AUDIT_WRITE_CONCURRENCY` at a time; the outcome of each, in order.
    /// Once a group ends with Cosmos down, the rest are not tried.
    pub async fn write_all<R: Item>(&self, records: &[R]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(records.len());
        let mut groups = records.chunks(self.settings.concurrency);
        for group in groups.by_ref() {
            let writes: Vec<_> = group.iter().map(|r| self.write(r)).collect();
            outcomes.extend(futures_util::future::join_all(writes).await);
            if outcomes.iter().any(|o| matches!(o, Outcome::Down(_))) {
                break;
            }
        }
        for _ in groups.flatten() {
            outcomes.push(Outcome::Down("not tried: Cosmos DB unavailable".into()));
        }
        outcomes
    }
}

/// Half to full `d`, so concurrent writers do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let fraction = 0.5 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(fraction)
}
