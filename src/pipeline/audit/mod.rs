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
//! The machinery of steps 2–6 is [`durable::Durable`], generic over the item kind: the meter's
//! usage summaries use a second one ([`Audit::companion`]) with its own journal beside this one
//! (`usage-journal.jsonl`) and its own container, so nothing about the usage summaries can slow
//! or hold back an abuse record.
//!
//! Logs (target `audit`) name record ids, reasons and counts, never the prompt text or a key.

pub mod cosmos_writer;
pub mod durable;
pub mod journal;
pub mod paths;
pub mod record;
pub mod settings;
pub mod shipper;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clients::cosmos::CosmosAccount;
use crate::settings::SettingsError;

pub use durable::{Durable, Item};
pub use journal::JournalError;
pub use record::{client_ip, AbuseRecord, Reason, MAX_RECORD_BYTES, NO_USER};
pub use settings::AuditSettings;

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

/// Upserts in flight at most for a companion log ([`Audit::companion`]).
pub const COMPANION_CONCURRENCY: usize = 4;

/// The abuse log.
pub struct Audit {
    settings: AuditSettings,
    log: Durable<AbuseRecord>,
    /// The account, when records go to Cosmos DB (for companion logs, see [`Audit::companion`]).
    account: Option<Arc<CosmosAccount>>,
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
        let cosmos = account
            .clone()
            .zip(settings.cosmos.as_ref().map(|c| c.container.clone()));
        let log = Durable::start(&target.path, target.setting, &settings, cosmos)?;
        Ok(Audit {
            settings,
            log,
            account,
        })
    }

    /// Another durable log beside the abuse log, of `R` items shipped to `container` of the
    /// same Cosmos DB account: its journal is a sibling of the abuse journal (see
    /// [`paths::companion`]), with the same settings but at most [`COMPANION_CONCURRENCY`]
    /// upserts in flight. `None` without Cosmos DB.
    pub fn companion<R: Item>(&self, container: &str) -> Result<Option<Durable<R>>, SettingsError> {
        let Some(account) = &self.account else {
            return Ok(None);
        };
        let path = paths::companion(&self.log.journal_path(), R::KIND);
        // A companion kind is low-rate and written in bursts (a minute's records at once): a
        // few upserts in flight ship it within seconds and keep the burst's CPU (request
        // signing, TLS) from crowding the request path and the abuse log's own shipper.
        let mut settings = self.settings.clone();
        settings.concurrency = settings.concurrency.min(COMPANION_CONCURRENCY);
        Durable::start(
            &path,
            "AUDIT_SPOOL_PATH",
            &settings,
            Some((account.clone(), container.to_string())),
        )
        .map(Some)
    }

    pub fn capture_prompt(&self) -> bool {
        self.settings.capture_prompt
    }

    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// The journal file (with Cosmos DB, `<it>.shipping` may hold records too).
    pub fn journal_path(&self) -> PathBuf {
        self.log.journal_path()
    }

    /// The counters so far.
    pub fn stats(&self) -> AuditStats {
        self.log.stats()
    }

    /// Group commits (fsyncs) of the journal so far.
    pub fn commits(&self) -> u64 {
        self.log.commits()
    }

    /// Make one record durable; returns once it is (see the module doc, steps 2–3). An error
    /// means the refusal must not be answered as recorded.
    pub async fn record(&self, record: AbuseRecord) -> Result<(), AuditFailed> {
        let record = if self.log.ships() {
            record::fit_for_cosmos(record)
        } else {
            record
        };
        match self.log.append(&record).await {
            Ok(()) => Ok(()),
            Err(error) => {
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
        }
    }

    /// Wait until the journal is empty (everything in Cosmos DB), for at most `deadline`.
    /// Without Cosmos DB there is nothing to wait for: every record is already in the log.
    pub async fn flush(&self, deadline: Duration) -> FlushReport {
        self.log.flush(deadline).await
    }

    /// Flush (as [`Audit::flush`], but at once when the shipper found Cosmos DB down: waiting
    /// would only delay the exit) and stop the shipper. Records keep being journaled: what was
    /// not shipped is shipped by the next start. Call on SIGTERM after the server stopped.
    pub async fn shutdown(&self, deadline: Duration) -> FlushReport {
        self.log.shutdown(deadline).await
    }
}
