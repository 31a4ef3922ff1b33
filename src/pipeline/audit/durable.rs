//! One durable log of items of one kind: its own [`journal`](super::journal) (group-commit
//! fdatasync), and with Cosmos DB its own [`shipper`](super::shipper) and
//! [`writer`](super::cosmos_writer) into its own container.
//!
//! The abuse log is one ([`super::Audit`]); the usage summaries of the meter are another (one
//! journal per container, not one journal with a kind field): an outage, a throttled or a
//! missing `usage` container then never holds an abuse record back, abuse group commits never
//! share a batch with usage lines, and journals written before usage summaries existed are read
//! as they are.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use super::cosmos_writer::{Outcome, Writer};
use super::journal::{Journal, JournalError, OpenError};
use super::settings::AuditSettings;
use super::shipper::{ShipState, Shipper};
use super::{AuditStats, Counters, FlushReport};
use crate::clients::cosmos::CosmosAccount;
use crate::settings::SettingsError;

/// An item of a durable log.
pub trait Item: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Names the kind in log lines and the journal's thread (`abuse`, `usage`).
    const KIND: &'static str;
    /// The item's id, made once when the item is built (every copy carries it: replays and
    /// retries upsert the same item). Serialised **first** (`{"id":"…`): the journal reader
    /// finds item starts by it when it salvages items glued onto a torn line.
    fn id(&self) -> &str;
    /// The value of the container's partition key.
    fn partition_key(&self) -> String;
}

/// Journal bytes handed to the journal thread at once by [`Durable::append_all`].
const APPEND_ALL_BYTES: usize = 1 << 20;

/// A durable log of `R` items (see the module doc).
pub struct Durable<R> {
    counters: Arc<Counters>,
    journal: Arc<Journal>,
    cosmos: Option<CosmosSide>,
    item: PhantomData<fn() -> R>,
}

struct CosmosSide {
    writer: Arc<Writer>,
    state: Arc<ShipState>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<R: Item> Durable<R> {
    /// Open the journal at `path` (`setting` is what an operator changes to move it) and, with
    /// `cosmos` (the account and the container's name), start shipping it at once, beginning
    /// with what an earlier process left. Call inside a Tokio runtime when `cosmos` is given.
    pub fn start(
        path: &Path,
        setting: &'static str,
        settings: &AuditSettings,
        cosmos: Option<(Arc<CosmosAccount>, String)>,
    ) -> Result<Self, SettingsError> {
        let journal = Journal::open::<R>(path, settings.queue_capacity, R::KIND)
            .map_err(|e: OpenError| SettingsError::new(setting, e.to_string()))?;
        let counters = Arc::new(Counters::default());
        let cosmos = match cosmos {
            None => None,
            Some((account, container)) => {
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    SettingsError::new(
                        "COSMOS_ENDPOINT",
                        "the Cosmos DB shipper needs a Tokio runtime",
                    )
                })?;
                let writer = Arc::new(Writer {
                    account,
                    container,
                    settings: settings.clone(),
                    counters: counters.clone(),
                });
                let state = Arc::new(ShipState::default());
                let (stop, stop_rx) = watch::channel(false);
                let shipper = Shipper::<R> {
                    journal: journal.clone(),
                    writer: writer.clone(),
                    counters: counters.clone(),
                    state: state.clone(),
                    stop: stop_rx,
                    item: PhantomData,
                };
                let task = runtime.spawn(shipper.run());
                Some(CosmosSide {
                    writer,
                    state,
                    stop,
                    task: Mutex::new(Some(task)),
                })
            }
        };
        tracing::info!(
            target: "audit",
            kind = R::KIND,
            journal = %path.display(),
            cosmos = cosmos.is_some(),
            pending_bytes = journal.pending_bytes(),
            "durable log ready"
        );
        Ok(Durable {
            counters,
            journal,
            cosmos,
            item: PhantomData,
        })
    }

    /// Whether the items are shipped to Cosmos DB.
    pub fn ships(&self) -> bool {
        self.cosmos.is_some()
    }

    /// The journal file (with Cosmos DB, `<it>.shipping` may hold items too).
    pub fn journal_path(&self) -> PathBuf {
        self.journal.path().to_path_buf()
    }

    /// The counters so far.
    pub fn stats(&self) -> AuditStats {
        self.counters.snapshot()
    }

    /// Group commits (fsyncs) of the journal so far.
    pub fn commits(&self) -> u64 {
        self.journal.commits()
    }

    /// Make one item durable; returns once it is: in the journal, or — the journal unwritable —
    /// acknowledged by one direct upsert to Cosmos DB. An error means it is durable nowhere.
    pub async fn append(&self, record: &R) -> Result<(), JournalError> {
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(JournalError(e.to_string()));
            }
        };
        line.push(b'\n');
        let error = match self.journal.append(line).await {
            Ok(()) => {
                self.counters.journaled.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => e,
        };
        if let Some(cosmos) = &self.cosmos {
            if cosmos.writer.acknowledge(record).await {
                self.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "audit",
                    kind = R::KIND,
                    record_id = %record.id(),
                    error = %error,
                    "{} journal unwritable; the record was acknowledged by Cosmos DB directly",
                    R::KIND
                );
                return Ok(());
            }
        }
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        Err(error)
    }

    /// Make many items durable with few group commits (up to 1 MiB of lines per append): for a
    /// low-rate kind written in bulk (the usage summaries of a minute). They are serialised on a
    /// blocking thread, so a large batch takes no time from the request path's runtime threads.
    /// Items the journal cannot take are written to Cosmos DB directly (with the writer's
    /// retries). Returns how many are durable nowhere (each named in an error log line).
    pub async fn append_all(&self, records: Vec<R>) -> usize {
        let (records, groups) = match tokio::task::spawn_blocking(move || {
            let groups = serialise_groups(&records);
            (records, groups)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(target: "audit", kind = R::KIND, error = %e, "records could not be serialised");
                return 0;
            }
        };
        let mut lost = 0;
        for (range, buf, lines) in groups {
            let group = &records[range];
            self.counters.submitted.fetch_add(lines, Ordering::Relaxed);
            let error = match self.journal.append(buf).await {
                Ok(()) => {
                    self.counters.journaled.fetch_add(lines, Ordering::Relaxed);
                    continue;
                }
                Err(e) => e,
            };
            let outcomes = match &self.cosmos {
                Some(cosmos) => cosmos.writer.write_all(group).await,
                None => Vec::new(),
            };
            for (i, record) in group.iter().enumerate() {
                if matches!(outcomes.get(i), Some(Outcome::Written)) {
                    self.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                lost += 1;
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    target: "audit",
                    kind = R::KIND,
                    record_id = %record.id(),
                    error = %error,
                    "{} record could not be made durable (journal unwritable, Cosmos DB did not take it)",
                    R::KIND
                );
            }
        }
        lost
    }

    /// Wait until the journal is empty (everything in Cosmos DB), for at most `deadline`.
    /// Without Cosmos DB there is nothing to wait for: every item is already in the journal.
    pub async fn flush(&self, deadline: Duration) -> FlushReport {
        self.wait_shipped(deadline, false).await
    }

    async fn wait_shipped(&self, deadline: Duration, unless_down: bool) -> FlushReport {
        let Some(cosmos) = &self.cosmos else {
            return FlushReport {
                completed: true,
                pending_bytes: 0,
            };
        };
        let until = tokio::time::Instant::now() + deadline;
        loop {
            // The active length first: a rotation renames the file before it zeroes the
            // length, so a zero length read first means the rename is already visible.
            let active = self.journal.pending_bytes();
            let shipping = tokio::fs::metadata(self.journal.shipping_path())
                .await
                .map(|m| m.len())
                .ok();
            let pending = active + shipping.unwrap_or(0);
            if pending == 0 && shipping.is_none() {
                return FlushReport {
                    completed: true,
                    pending_bytes: 0,
                };
            }
            // Cosmos DB down: waiting would only delay the exit; the journal keeps it all.
            if tokio::time::Instant::now() >= until
                || unless_down && cosmos.state.down.load(Ordering::Relaxed)
            {
                return FlushReport {
                    completed: false,
                    pending_bytes: pending,
                };
            }
            cosmos.state.kick.notify_one();
            tokio::time::sleep(Duration::from_millis(20).min(deadline)).await;
        }
    }

    /// Flush (as [`Durable::flush`], but at once when the shipper found Cosmos DB down: waiting
    /// would only delay the exit) and stop the shipper. Items keep being journaled: what was
    /// not shipped is shipped by the next start.
    pub async fn shutdown(&self, deadline: Duration) -> FlushReport {
        let report = self.wait_shipped(deadline, true).await;
        if let Some(cosmos) = &self.cosmos {
            let _ = cosmos.stop.send(true);
            let task = cosmos.task.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut t) = task {
                if tokio::time::timeout(Duration::from_secs(1), &mut t)
                    .await
                    .is_err()
                {
                    t.abort();
                }
            }
        }
        let stats = self.stats();
        tracing::info!(
            target: "audit",
            kind = R::KIND,
            completed = report.completed,
            pending_bytes = report.pending_bytes,
            journaled = stats.journaled,
            shipped = stats.shipped,
            failed = stats.failed,
            "{} log stopped",
            R::KIND
        );
        report
    }
}

/// `records` as journal lines in groups of about [`APPEND_ALL_BYTES`]: (the records of the
/// group, its lines, how many lines).
fn serialise_groups<R: Item>(records: &[R]) -> Vec<(std::ops::Range<usize>, Vec<u8>, u64)> {
    let mut groups = Vec::new();
    let mut start = 0;
    while start < records.len() {
        let mut buf = Vec::new();
        let mut lines = 0u64;
        let mut end = start;
        while end < records.len() && buf.len() < APPEND_ALL_BYTES {
            match serde_json::to_vec(&records[end]) {
                Ok(line) => {
                    buf.extend_from_slice(&line);
                    buf.push(b'\n');
                    lines += 1;
                }
                Err(e) => tracing::error!(
                    target: "audit",
                    kind = R::KIND,
                    record_id = %records[end].id(),
                    error = %e,
                    "record could not be serialised"
                ),
            }
            end += 1;
        }
        groups.push((start..end, buf, lines));
        start = end;
    }
    groups
}

impl<R> Drop for Durable<R> {
    fn drop(&mut self) {
        if let Some(cosmos) = &self.cosmos {
            let _ = cosmos.stop.send(true);
            if let Some(t) = cosmos.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                t.abort();
            }
        }
    }
}
