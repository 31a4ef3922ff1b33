//! Stage 5, **audit**: runs whenever an earlier stage refuses a request (user missing or
//! unregistered, a body that cannot be inspected, content blocked, attack detected).
//!
//! **A refusal is answered only once its record is durable.** The platform recycles instances
//! with SIGKILL at will, so a record waiting in memory is a record lost; the way of a record,
//! top to bottom:
//!
//! 1. [`record`]: the refusal becomes an [`AbuseRecord`] with an id made once (every later copy
//!    carries it, so nothing downstream can duplicate it). `client_ip` is the last
//!    `X-Forwarded-For` entry (the one Application Gateway appended), port stripped.
//! 2. [`Audit::record`] serialises it to one JSON line and awaits the [`journal`]: a dedicated
//!    thread appends the lines of every waiting caller with one write and one `fdatasync`
//!    (group commit) and answers each. Only then does the request path answer the refusal.
//! 3. If the journal cannot be written (disk full, EIO): with Cosmos DB, one direct upsert is
//!    tried, and its acknowledgement counts as durable; otherwise [`Audit::record`] fails and
//!    the client gets **503 `audit_unavailable`** instead of the refusal (still not forwarded):
//!    a refusal is never answered as if it were recorded. An error log line names the record.
//! 4. Without Cosmos DB the journal *is* the abuse log: `AUDIT_LOG_PATH`, JSON Lines.
//! 5. With Cosmos DB the [`shipper`] ships the journal in the background: it rotates it to
//!    `<journal>.shipping`, upserts every record through the [`cosmos_writer`] (retries with
//!    backoff honouring `x-ms-retry-after-ms`), and deletes the file once every record is in
//!    Cosmos DB. While Cosmos is down the records simply stay in the journal; a file left by an
//!    earlier process is shipped first at start (the replay).
//! 6. Torn lines (a crash mid-append, even inside a UTF-8 character) are set aside in
//!    `<journal>.rejected` and never stop what follows; so are records Cosmos refuses for good.
//!
//! Where the journal lives is decided by [`paths`]: a per-instance directory under `AUDIT_DIR`,
//! default `$HOME/data/aoai-fwdproxy/<WEBSITE_INSTANCE_ID or host name>/`, never the working
//! directory (a read-only package mount on Azure). A journal is locked by its process; a second
//! process on the same journal refuses to start.
//!
//! Not handled: a journal whose instance never comes back (scale-in) stays in its directory
//! under `AUDIT_DIR` until an instance with that id starts again; nothing adopts it, because on
//! shared network storage an advisory lock cannot prove that its owner is gone, and shipping a
//! live instance's journal from under it would lose its next records.
//!
//! Logs (target `audit`) name record ids, reasons and counts, never the prompt text or a key.

pub mod cosmos_writer;
pub mod journal;
pub mod paths;
pub mod record;
pub mod settings;
pub mod shipper;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::clients::cosmos::CosmosAccount;
use crate::settings::SettingsError;

pub use journal::JournalError;
pub use record::{client_ip, AbuseRecord, Reason, MAX_RECORD_BYTES, NO_USER};
pub use settings::AuditSettings;

use cosmos_writer::Writer;
use journal::{Journal, OpenError};
use shipper::{ShipState, Shipper};

/// Counters of the abuse log, for logs, health output and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuditStats {
    /// Records handed to [`Audit::record`].
    pub submitted: u64,
    /// Records made durable in the journal.
    pub journaled: u64,
    /// Records the journal could not take but Cosmos DB acknowledged directly.
    pub acknowledged: u64,
    /// Records made durable nowhere: their requests were answered 503, not as refused.
    pub failed: u64,
    /// Records confirmed in Cosmos DB by the shipper.
    pub shipped: u64,
    /// Upsert tries that failed and were tried again.
    pub retries: u64,
    /// Lines set aside in `<journal>.rejected` (torn, or refused by Cosmos DB for good).
    pub rejected: u64,
}

#[derive(Default)]
pub struct Counters {
    submitted: AtomicU64,
    journaled: AtomicU64,
    acknowledged: AtomicU64,
    failed: AtomicU64,
    shipped: AtomicU64,
    retries: AtomicU64,
    rejected: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> AuditStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AuditStats {
            submitted: g(&self.submitted),
            journaled: g(&self.journaled),
            acknowledged: g(&self.acknowledged),
            failed: g(&self.failed),
            shipped: g(&self.shipped),
            retries: g(&self.retries),
            rejected: g(&self.rejected),
        }
    }
}

/// What [`Audit::flush`] and [`Audit::shutdown`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// True when nothing was left to ship (always true without Cosmos DB).
    pub completed: bool,
    /// Journal bytes not yet in Cosmos DB (they stay on disk for the next start).
    pub pending_bytes: u64,
}

/// A record that could not be made durable.
#[derive(Debug, thiserror::Error)]
#[error("abuse record {id} could not be made durable: {error}")]
pub struct AuditFailed {
    pub id: String,
    pub error: JournalError,
}

/// The abuse log.
pub struct Audit {
    settings: AuditSettings,
    counters: Arc<Counters>,
    journal: Arc<Journal>,
    cosmos: Option<CosmosSide>,
}

struct CosmosSide {
    writer: Arc<Writer>,
    state: Arc<ShipState>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Audit {
    /// The abuse log as configured: the journal at its resolved path (see [`paths`]), and with
    /// `account` (built from `settings.cosmos`) the shipper to Cosmos DB, which starts at once
    /// and ships what an earlier process left. Call inside a Tokio runtime when `account` is
    /// given. Fails, naming the setting, when no writable place exists or another process
    /// holds the journal.
    pub fn start(
        settings: AuditSettings,
        account: Option<Arc<CosmosAccount>>,
    ) -> Result<Self, SettingsError> {
        let mut settings = settings;
        if account.is_none() {
            // Without an account there is nothing to ship to: the journal is the log file.
            settings.cosmos = None;
        }
        let target = paths::resolve(&settings)?;
        let journal = Journal::open(&target.path, settings.queue_capacity)
            .map_err(|e: OpenError| SettingsError::new(target.setting, e.to_string()))?;
        let counters = Arc::new(Counters::default());
        let cosmos = match account {
            None => None,
            Some(account) => {
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    SettingsError::new(
                        "COSMOS_ENDPOINT",
                        "the Cosmos DB shipper needs a Tokio runtime",
                    )
                })?;
                let writer = Arc::new(Writer {
                    account,
                    settings: settings.clone(),
                    counters: counters.clone(),
                });
                let state = Arc::new(ShipState::default());
                let (stop, stop_rx) = watch::channel(false);
                let shipper = Shipper {
                    journal: journal.clone(),
                    writer: writer.clone(),
                    counters: counters.clone(),
                    state: state.clone(),
                    stop: stop_rx,
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
            journal = %target.path.display(),
            cosmos = cosmos.is_some(),
            pending_bytes = journal.pending_bytes(),
            "abuse log ready"
        );
        Ok(Audit {
            settings,
            counters,
            journal,
            cosmos,
        })
    }

    pub fn capture_prompt(&self) -> bool {
        self.settings.capture_prompt
    }

    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// The journal file (with Cosmos DB, `<it>.shipping` may hold records too).
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

    /// Make one record durable; returns once it is (see the module doc, steps 2–3). An error
    /// means the refusal must not be answered as recorded.
    pub async fn record(&self, record: AbuseRecord) -> Result<(), AuditFailed> {
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        let record = if self.cosmos.is_some() {
            record::fit_for_cosmos(record)
        } else {
            record
        };
        let mut line = match serde_json::to_vec(&record) {
            Ok(l) => l,
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(AuditFailed {
                    id: record.id,
                    error: JournalError(e.to_string()),
                });
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
            if cosmos.writer.acknowledge(&record).await {
                self.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "audit",
                    record_id = %record.id,
                    error = %error,
                    "abuse journal unwritable; the record was acknowledged by Cosmos DB directly"
                );
                return Ok(());
            }
        }
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            target: "audit",
            record_id = %record.id,
            request_id = %record.request_id,
            reason = ?record.reason,
            error = %error,
            "abuse record could not be made durable: the request is answered 503"
        );
        Err(AuditFailed {
            id: record.id,
            error,
        })
    }

    /// Wait until the journal is empty (everything in Cosmos DB), for at most `deadline`.
    /// Without Cosmos DB there is nothing to wait for: every record is already in the log.
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

    /// Flush (as [`Audit::flush`], but at once when the shipper found Cosmos DB down: waiting
    /// would only delay the exit) and stop the shipper. Records keep being journaled: what was
    /// not shipped is shipped by the next start. Call on SIGTERM after the server stopped.
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
            completed = report.completed,
            pending_bytes = report.pending_bytes,
            journaled = stats.journaled,
            shipped = stats.shipped,
            failed = stats.failed,
            "abuse log stopped"
        );
        report
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        if let Some(cosmos) = &self.cosmos {
            let _ = cosmos.stop.send(true);
            if let Some(t) = cosmos.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                t.abort();
            }
        }
    }
}
