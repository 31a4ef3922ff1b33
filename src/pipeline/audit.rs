//! Stage 5, **audit**: runs whenever an earlier stage finds a request non-compliant (user
//! missing or unregistered, content blocked, attack detected).
//!
//! Turns the finding into one [`AbuseRecord`] and hands it to [`Audit::submit`], which never
//! blocks the client's answer on Cosmos DB, never fails the request and never drops a record.
//! Short-circuits nothing.
//!
//! # Where records go
//! - Without `COSMOS_ENDPOINT`: appended to `AUDIT_LOG_PATH` (JSON Lines, fsync'd per record).
//! - With Cosmos DB ([`Audit::start`] with a [`CosmosAccount`]):
//!
//! ```text
//! submit ──try_send──▶ bounded queue (AUDIT_QUEUE_CAPACITY) ──▶ worker ──upsert_item──▶ Cosmos DB
//!    │ queue full / closed                                        │ retries: 429 (retry-after),
//!    ▼                                                            │ 408/449/5xx, transport, timeouts
//! spool (AUDIT_SPOOL_PATH, fsync'd JSON Lines) ◀── Cosmos stays down ┘
//!    └──────── replayed by the worker when Cosmos answers again, and at start ────────▶
//! ```
//!
//! Ids are idempotent (request id + reason) and writes are upserts, so a record written twice
//! (a timeout after the service committed, a replay of a partly replayed spool) is still one
//! item. Cosmos refusing a record for good (400, 413) sends it to `<spool>.rejected`, never to
//! nowhere.
//!
//! # Spool protocol
//! Appends go to `<spool>`. A replay first renames `<spool>` to `<spool>.replaying` (so new
//! appends start a fresh file), upserts every record in it, and deletes it only when every
//! record is confirmed written (or moved to `.rejected`). A crash at any point leaves each
//! record in one of the two files, and the next start replays `.replaying` first.
//!
//! # Shutdown
//! [`Audit::shutdown`] (on SIGTERM) closes the queue, writes what is queued to Cosmos until the
//! deadline, and spools the rest; [`Audit::flush`] does the same without closing.
//!
//! Logs (target `audit`) name record ids, reasons and counts, never the prompt text or a key.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::clients::cosmos::{CosmosAccount, CosmosError, CosmosSettings};
use crate::settings::{SettingsError, Source};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The body carried no `user` although the user check requires one.
    MissingUser,
    /// The `user` is not in the registry.
    UnregisteredUser,
    /// The body could not be inspected (not JSON, wrong content type, `user` not a string).
    InvalidBody,
    /// Content Safety found a harm category at or above its threshold, or a blocklist hit.
    ContentFiltered,
    /// Prompt Shields detected a jailbreak in the user prompt.
    JailbreakDetected,
    /// Prompt Shields detected an indirect attack in documents or tool content.
    IndirectAttackDetected,
    /// The body was over `MAX_BODY_BYTES` (refused 413 before it was read).
    RequestTooLarge,
    /// More text than one request may have screened: refused unscreened.
    TooLongToScreen,
    /// Too many screened requests at once in this process: refused unscreened (429).
    ScreeningBusy,
    /// Screening was unavailable and `CONTENT_SAFETY_FAIL_OPEN=true` let the request through
    /// unscreened: not a refusal, but the record of a prompt nobody screened.
    PassedUnscreened,
}

/// One non-compliant request. Partition key: `user` (`"(none)"` when the request named none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbuseRecord {
    /// Idempotent id: the request id plus the reason, so a replay never duplicates.
    pub id: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub request_id: String,
    pub caller: String,
    pub user: String,
    pub deployment: Option<String>,
    pub operation: String,
    pub reason: Reason,
    /// Verdict details: categories and severities, shield results, blocklist hits.
    pub details: serde_json::Value,
    /// The prompt text (unless `AUDIT_CAPTURE_PROMPT=false`); `details.prompt_fields` says
    /// which field and role each piece came from.
    pub prompt: Option<String>,
    /// `X-Forwarded-For` as AppGW set it.
    pub client_ip: Option<String>,
}

/// Partition key value for requests that named no user.
pub const NO_USER: &str = "(none)";

/// Cosmos DB refuses items over 2 MB; records are kept under this size by cutting the prompt
/// (the cut is noted in `details.prompt_truncated_bytes`).
pub const MAX_RECORD_BYTES: usize = 1_900_000;

/// Records the worker takes from the queue at a time.
const BATCH: usize = 256;
/// Spooled records written concurrently as one chunk of a replay.
const REPLAY_CHUNK: usize = 512;
/// Chunks per replay turn before the worker looks at its queue again.
const REPLAY_ROUND: usize = 8;
/// Longest wait between two replay attempts while Cosmos is down.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// Longest backoff between two tries of one record.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Audit settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// `AUDIT_LOG_PATH`: JSON Lines sink when Cosmos DB is not configured.
    pub log_path: PathBuf,
    /// `AUDIT_CAPTURE_PROMPT`: put the prompt text into abuse records.
    pub capture_prompt: bool,
    /// `COSMOS_*`: the abuse log in Cosmos DB, when `COSMOS_ENDPOINT` is set.
    pub cosmos: Option<CosmosSettings>,
    /// `AUDIT_SPOOL_PATH`: durable spool while Cosmos DB is unreachable.
    pub spool_path: PathBuf,
    /// `AUDIT_QUEUE_CAPACITY`: records held in memory for the Cosmos writer.
    pub queue_capacity: usize,
    /// `AUDIT_WRITE_CONCURRENCY`: upserts in flight at once.
    pub concurrency: usize,
    /// `AUDIT_WRITE_TIMEOUT_MS`: one upsert (with the SDK's own retries) may take this long.
    pub write_timeout: Duration,
    /// `AUDIT_MAX_ATTEMPTS`: tries per record before it goes to the spool.
    pub max_attempts: u32,
    /// `AUDIT_RETRY_BASE_MS`: first backoff between tries (doubles, with jitter, up to 5 s).
    pub retry_base: Duration,
    /// `AUDIT_REPLAY_INTERVAL_MS`: first wait before replaying the spool while Cosmos is down
    /// (doubles up to 60 s).
    pub replay_interval: Duration,
    /// `AUDIT_FLUSH_TIMEOUT_MS`: how long SIGTERM gives queued records to reach Cosmos before
    /// they are spooled.
    pub flush_timeout: Duration,
}

impl AuditSettings {
    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        let positive = |name: &'static str, default: u64| -> Result<u64, SettingsError> {
            let v = src.number(name, default)?;
            if v == 0 {
                return Err(SettingsError::new(name, "must be above 0"));
            }
            Ok(v)
        };
        let queue_capacity = positive("AUDIT_QUEUE_CAPACITY", 10_000)?;
        if queue_capacity > 1_000_000 {
            return Err(SettingsError::new(
                "AUDIT_QUEUE_CAPACITY",
                "must be at most 1000000 (records wait in memory)",
            ));
        }
        let concurrency = positive("AUDIT_WRITE_CONCURRENCY", 16)?;
        if concurrency > 256 {
            return Err(SettingsError::new(
                "AUDIT_WRITE_CONCURRENCY",
                "must be between 1 and 256",
            ));
        }
        let max_attempts = positive("AUDIT_MAX_ATTEMPTS", 5)?;
        if max_attempts > 100 {
            return Err(SettingsError::new(
                "AUDIT_MAX_ATTEMPTS",
                "must be between 1 and 100",
            ));
        }
        Ok(AuditSettings {
            log_path: PathBuf::from(src.get("AUDIT_LOG_PATH")?.unwrap_or("abuse-log.jsonl")),
            capture_prompt: src.flag("AUDIT_CAPTURE_PROMPT", true)?,
            cosmos: CosmosSettings::from_source(src)?,
            spool_path: PathBuf::from(src.get("AUDIT_SPOOL_PATH")?.unwrap_or("abuse-spool.jsonl")),
            queue_capacity: queue_capacity as usize,
            concurrency: concurrency as usize,
            write_timeout: Duration::from_millis(positive("AUDIT_WRITE_TIMEOUT_MS", 10_000)?),
            max_attempts: max_attempts as u32,
            retry_base: Duration::from_millis(src.number("AUDIT_RETRY_BASE_MS", 200u64)?),
            replay_interval: Duration::from_millis(positive("AUDIT_REPLAY_INTERVAL_MS", 5_000)?),
            flush_timeout: Duration::from_millis(src.number("AUDIT_FLUSH_TIMEOUT_MS", 10_000u64)?),
        })
    }
}

/// Counters of the abuse log, for logs, health output and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuditStats {
    /// Records handed to [`Audit::submit`].
    pub submitted: u64,
    /// Records confirmed written (to Cosmos DB, or to `AUDIT_LOG_PATH` without Cosmos).
    pub written: u64,
    /// Upsert tries that failed and were tried again.
    pub retries: u64,
    /// Records appended to the spool.
    pub spooled: u64,
    /// Spooled records confirmed written by a replay.
    pub replayed: u64,
    /// Records Cosmos DB refused for good, kept in `<spool>.rejected`.
    pub rejected: u64,
    /// Records that could be written nowhere (disk and Cosmos both failing): logged as errors.
    pub lost: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    written: AtomicU64,
    retries: AtomicU64,
    spooled: AtomicU64,
    replayed: AtomicU64,
    rejected: AtomicU64,
    lost: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> AuditStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AuditStats {
            submitted: g(&self.submitted),
            written: g(&self.written),
            retries: g(&self.retries),
            spooled: g(&self.spooled),
            replayed: g(&self.replayed),
            rejected: g(&self.rejected),
            lost: g(&self.lost),
        }
    }
}

/// What [`Audit::flush`] and [`Audit::shutdown`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Queued records confirmed in Cosmos DB.
    pub written: u64,
    /// Queued records that went to the spool (deadline reached, or Cosmos down).
    pub spooled: u64,
    /// False when the worker did not answer before the deadline (records still queued stay in
    /// memory; the spool holds everything the worker had given up on).
    pub completed: bool,
}

/// The abuse log.
pub struct Audit {
    settings: AuditSettings,
    counters: Arc<Counters>,
    sink: Sink,
}

enum Sink {
    File(Mutex<()>),
    Cosmos(CosmosSink),
}

struct CosmosSink {
    queue: mpsc::Sender<AbuseRecord>,
    control: mpsc::Sender<Control>,
    /// The deadline of a flush, so a write in progress (retrying through an outage) gives way
    /// and its records are spooled instead of being cut off by the end of the process.
    hurry: watch::Sender<Option<tokio::time::Instant>>,
    spool: Arc<Spool>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

enum Control {
    Flush {
        deadline: tokio::time::Instant,
        close: bool,
        done: oneshot::Sender<FlushReport>,
    },
}

impl Audit {
    /// The JSON Lines sink at `AUDIT_LOG_PATH`, whatever the Cosmos settings say. Use
    /// [`Audit::start`] to get the Cosmos DB writer.
    pub fn new(settings: AuditSettings) -> Self {
        if settings.cosmos.is_some() {
            tracing::warn!(
                target: "audit",
                "COSMOS_ENDPOINT is set but this abuse log writes to AUDIT_LOG_PATH only (built with Audit::new, not Audit::start)"
            );
        }
        Audit {
            settings,
            counters: Arc::new(Counters::default()),
            sink: Sink::File(Mutex::new(())),
        }
    }

    /// The abuse log as configured: with `account` (built from `settings.cosmos`), the Cosmos DB
    /// writer with its queue, retries and spool, whose worker starts at once (and replays a spool
    /// left by an earlier run); without, the JSON Lines file. Call inside a Tokio runtime.
    /// Fails only when the spool cannot be opened.
    pub fn start(
        settings: AuditSettings,
        account: Option<Arc<CosmosAccount>>,
    ) -> Result<Self, SettingsError> {
        let Some(account) = account else {
            return Ok(Audit::new(settings));
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            SettingsError::new(
                "COSMOS_ENDPOINT",
                "the Cosmos DB writer needs a Tokio runtime",
            )
        })?;
        let spool = Arc::new(Spool::open(&settings.spool_path)?);
        let counters = Arc::new(Counters::default());
        let (queue, queue_rx) = mpsc::channel(settings.queue_capacity);
        let (control, control_rx) = mpsc::channel(4);
        let (hurry, hurry_rx) = watch::channel(None);
        let writer = Writer {
            account,
            settings: settings.clone(),
            counters: counters.clone(),
        };
        let worker = Worker {
            writer: Arc::new(writer),
            spool: spool.clone(),
            queue: queue_rx,
            control: control_rx,
            hurry: hurry_rx,
            down: false,
            probe_wait: settings.replay_interval,
            next_probe: tokio::time::Instant::now(),
            cursor: None,
        };
        let handle = runtime.spawn(worker.run());
        tracing::info!(
            target: "audit",
            capacity = settings.queue_capacity,
            spool = %settings.spool_path.display(),
            pending = spool.has_pending(),
            "abuse log: Cosmos DB writer started"
        );
        Ok(Audit {
            settings,
            counters,
            sink: Sink::Cosmos(CosmosSink {
                queue,
                control,
                hurry,
                spool,
                worker: Mutex::new(Some(handle)),
            }),
        })
    }

    pub fn capture_prompt(&self) -> bool {
        self.settings.capture_prompt
    }

    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// The counters so far.
    pub fn stats(&self) -> AuditStats {
        self.counters.snapshot()
    }

    /// Record one non-compliant request. Never fails the request and never waits for Cosmos
    /// DB: the record is queued for the writer, or, when the queue is full or closed, appended
    /// to the spool (local disk, fsync'd) right here.
    pub fn submit(&self, record: AbuseRecord) {
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        match &self.sink {
            Sink::File(lock) => self.write_file(lock, &record),
            Sink::Cosmos(sink) => {
                let record = fit_for_cosmos(record);
                match sink.queue.try_send(record) {
                    Ok(()) => {}
                    Err(e) => {
                        let why = match &e {
                            mpsc::error::TrySendError::Full(_) => "queue full",
                            mpsc::error::TrySendError::Closed(_) => "writer stopped",
                        };
                        let record = e.into_inner();
                        tracing::warn!(
                            target: "audit",
                            record_id = %record.id,
                            why,
                            "abuse record spooled without queueing"
                        );
                        spool_records(&sink.spool, &self.counters, &[record], why);
                    }
                }
            }
        }
    }

    /// Write what is queued to Cosmos DB until `deadline`, spool the rest, and report.
    pub async fn flush(&self, deadline: Duration) -> FlushReport {
        self.control(deadline, false).await
    }

    /// Flush (as [`Audit::flush`]) and stop the writer; later submits go to the spool. Call on
    /// SIGTERM after the server stopped taking requests.
    pub async fn shutdown(&self, deadline: Duration) -> FlushReport {
        let report = self.control(deadline, true).await;
        if let Sink::Cosmos(sink) = &self.sink {
            let handle = sink.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(h) = handle {
                if !report.completed {
                    h.abort();
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), h).await;
            }
        }
        let stats = self.stats();
        tracing::info!(
            target: "audit",
            written = report.written,
            spooled = report.spooled,
            completed = report.completed,
            total_written = stats.written,
            total_spooled = stats.spooled,
            total_replayed = stats.replayed,
            "abuse log flushed for shutdown"
        );
        report
    }

    async fn control(&self, deadline: Duration, close: bool) -> FlushReport {
        let Sink::Cosmos(sink) = &self.sink else {
            return FlushReport {
                completed: true,
                ..Default::default()
            };
        };
        let until = tokio::time::Instant::now() + deadline;
        sink.hurry.send_replace(Some(until));
        let (done, answer) = oneshot::channel();
        let sent = tokio::time::timeout_at(
            until,
            sink.control.send(Control::Flush {
                deadline: until,
                close,
                done,
            }),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return FlushReport::default();
        }
        // The worker spools whatever is left at the deadline; give it a moment past it.
        let report = match tokio::time::timeout_at(until + Duration::from_secs(2), answer).await {
            Ok(Ok(report)) => report,
            _ => FlushReport::default(),
        };
        if !close {
            sink.hurry.send_replace(None);
        }
        report
    }

    fn write_file(&self, lock: &Mutex<()>, record: &AbuseRecord) {
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        match append_lines(&self.settings.log_path, std::slice::from_ref(record)) {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    target: "audit",
                    record_id = %record.id,
                    reason = ?record.reason,
                    "abuse record written"
                );
            }
            Err(e) => {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    target: "audit",
                    record_id = %record.id,
                    error = %e,
                    "abuse record could not be written"
                );
            }
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        // Without an explicit shutdown the worker ends when the queue closes: it sees the queue
        // end, spools nothing more than it holds and exits.
        if let Sink::Cosmos(sink) = &self.sink {
            if sink.spool.has_pending() {
                tracing::debug!(target: "audit", "abuse log dropped with a pending spool");
            }
        }
    }
}

/// Keep a record under Cosmos DB's item size limit by cutting the prompt.
fn fit_for_cosmos(mut record: AbuseRecord) -> AbuseRecord {
    // Most records are small: skip the measuring serialisation unless the prompt is large.
    if record.prompt.as_ref().map_or(0, String::len) < MAX_RECORD_BYTES / 8 {
        return record;
    }
    let size = serde_json::to_vec(&record).map(|v| v.len()).unwrap_or(0);
    if size <= MAX_RECORD_BYTES {
        return record;
    }
    if let Some(prompt) = record.prompt.take() {
        let over = size - MAX_RECORD_BYTES;
        // JSON escaping can make the prompt longer on the wire than in memory; cut with margin.
        let mut keep = prompt.len().saturating_sub(over.saturating_mul(2) + 1024);
        while keep > 0 && !prompt.is_char_boundary(keep) {
            keep -= 1;
        }
        if let serde_json::Value::Object(map) = &mut record.details {
            map.insert("prompt_truncated_bytes".into(), prompt.len().into());
        } else {
            record.details = serde_json::json!({
                "verdict": record.details,
                "prompt_truncated_bytes": prompt.len(),
            });
        }
        record.prompt = Some(prompt[..keep].to_string());
    }
    record
}

/// Append JSON lines and fsync.
fn append_lines(path: &Path, records: &[AbuseRecord]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(records.len() * 512);
    for r in records {
        serde_json::to_writer(&mut buf, r)?;
        buf.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&buf)?;
    f.sync_data()
}

fn spool_records(spool: &Spool, counters: &Counters, records: &[AbuseRecord], why: &str) {
    if records.is_empty() {
        return;
    }
    match spool.append(records) {
        Ok(()) => {
            counters
                .spooled
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                target: "audit",
                count = records.len(),
                why,
                spooled_total = counters.spooled.load(Ordering::Relaxed),
                "abuse records spooled"
            );
        }
        Err(e) => {
            counters
                .lost
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            for r in records {
                tracing::error!(
                    target: "audit",
                    record_id = %r.id,
                    reason = ?r.reason,
                    user = %r.user,
                    error = %e,
                    "abuse record LOST: the spool cannot be written"
                );
            }
        }
    }
}

/// The durable spool: `<path>` takes appends, `<path>.replaying` is being replayed,
/// `<path>.rejected` keeps what Cosmos refused for good.
struct Spool {
    path: PathBuf,
    replaying: PathBuf,
    rejected: PathBuf,
    /// Serialises appends with the rename that starts a replay.
    lock: Mutex<()>,
    pending: AtomicBool,
}

impl Spool {
    fn open(path: &Path) -> Result<Self, SettingsError> {
        let with_suffix = |s: &str| {
            let mut p = path.as_os_str().to_owned();
            p.push(s);
            PathBuf::from(p)
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                SettingsError::new(
                    "AUDIT_SPOOL_PATH",
                    format!("cannot create {}: {e}", dir.display()),
                )
            })?;
        }
        // Prove now that the spool can be written: it is the last line of defence.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                SettingsError::new(
                    "AUDIT_SPOOL_PATH",
                    format!("cannot open {}: {e}", path.display()),
                )
            })?;
        let spool = Spool {
            path: path.to_path_buf(),
            replaying: with_suffix(".replaying"),
            rejected: with_suffix(".rejected"),
            lock: Mutex::new(()),
            pending: AtomicBool::new(false),
        };
        let pending = non_empty(&spool.path) || spool.replaying.exists();
        spool.pending.store(pending, Ordering::Relaxed);
        Ok(spool)
    }

    fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    fn append(&self, records: &[AbuseRecord]) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        append_lines(&self.path, records)?;
        self.pending.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn reject(&self, records: &[AbuseRecord]) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        append_lines(&self.rejected, records)
    }

    fn reject_line(&self, line: &str) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.rejected)?;
        f.write_all(line.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_data()
    }

    /// The file to replay next: `.replaying` when a replay was interrupted, else the spool
    /// itself renamed to `.replaying`. `None` when nothing is pending.
    fn take_for_replay(&self) -> std::io::Result<Option<PathBuf>> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.replaying.exists() {
            return Ok(Some(self.replaying.clone()));
        }
        if !non_empty(&self.path) {
            self.pending.store(false, Ordering::Relaxed);
            return Ok(None);
        }
        std::fs::rename(&self.path, &self.replaying)?;
        sync_dir(&self.path);
        Ok(Some(self.replaying.clone()))
    }

    /// Every record of `.replaying` is confirmed: remove it.
    fn finish_replay(&self) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::remove_file(&self.replaying)?;
        sync_dir(&self.replaying);
        if !non_empty(&self.path) {
            self.pending.store(false, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn non_empty(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.len() > 0)
        .unwrap_or(false)
}

/// Make a rename or removal durable.
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// How one record's write ended.
#[derive(Debug)]
enum Outcome {
    Written,
    /// Cosmos refused it for good (400, 413): it goes to `.rejected`.
    Rejected(String),
    /// Cosmos did not take it within the tries: it goes to the spool.
    Down(String),
}

/// What a failed try means.
enum Failure {
    Permanent(String),
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
}

fn classify(e: &CosmosError) -> Failure {
    let status = e.status();
    let code = u16::from(status.status_code());
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
    }
}

/// Writes records to the abuse-log container with retries.
struct Writer {
    account: Arc<CosmosAccount>,
    settings: AuditSettings,
    counters: Arc<Counters>,
}

impl Writer {
    async fn write(&self, record: &AbuseRecord) -> Outcome {
        let mut backoff = self.settings.retry_base;
        let mut last = String::new();
        for attempt in 1..=self.settings.max_attempts {
            let failure = match tokio::time::timeout(
                self.settings.write_timeout,
                self.upsert(record),
            )
            .await
            {
                Ok(Ok(())) => return Outcome::Written,
                Ok(Err(e)) => classify(&e),
                Err(_) => Failure::Transient {
                    message: format!(
                        "no answer within {} ms",
                        self.settings.write_timeout.as_millis()
                    ),
                    retry_after: None,
                },
            };
            let (message, retry_after) = match failure {
                Failure::Permanent(m) => return Outcome::Rejected(m),
                Failure::Transient {
                    message,
                    retry_after,
                } => (message, retry_after),
            };
            if attempt == self.settings.max_attempts {
                last = message;
                break;
            }
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            let wait = retry_after
                .map(|r| r.min(MAX_BACKOFF * 6))
                .unwrap_or_else(|| jitter(backoff));
            tracing::warn!(
                target: "audit",
                record_id = %record.id,
                attempt,
                wait_ms = wait.as_millis() as u64,
                honours_retry_after = retry_after.is_some(),
                error = %message,
                retries_total = self.counters.retries.load(Ordering::Relaxed),
                "abuse record write failed; retrying"
            );
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            last = message;
        }
        Outcome::Down(last)
    }

    async fn upsert(&self, record: &AbuseRecord) -> Result<(), CosmosError> {
        let container = self.account.abuse_container().await?;
        container
            .upsert_item(record.user.clone(), &record.id, record, None)
            .await?;
        Ok(())
    }

    /// Write `records`, `AUDIT_WRITE_CONCURRENCY` at a time; the outcome of each, in order.
    /// Once a group ends with Cosmos down, the rest are not tried (they go to the spool).
    async fn write_all(&self, records: &[AbuseRecord]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(records.len());
        let mut groups = records.chunks(self.settings.concurrency);
        for group in groups.by_ref() {
            let writes: Vec<_> = group.iter().map(|r| self.write(r)).collect();
            outcomes.extend(futures_util::future::join_all(writes).await);
            if outcomes.iter().any(|o| matches!(o, Outcome::Down(_))) {
                // Cosmos is down: the rest would only wait through the same retries.
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

struct Worker {
    writer: Arc<Writer>,
    spool: Arc<Spool>,
    queue: mpsc::Receiver<AbuseRecord>,
    control: mpsc::Receiver<Control>,
    hurry: watch::Receiver<Option<tokio::time::Instant>>,
    /// Cosmos did not take a record within its tries: spool new records until a replay works.
    down: bool,
    probe_wait: Duration,
    next_probe: tokio::time::Instant,
    /// Where an unfinished replay stands.
    cursor: Option<ReplayCursor>,
}

struct ReplayCursor {
    lines: std::io::Lines<std::io::BufReader<std::fs::File>>,
    done: usize,
    started: Instant,
}

impl Worker {
    async fn run(mut self) {
        let mut control_open = true;
        loop {
            let replay_due = self.spool.has_pending() || self.down;
            // Unbiased: the queue and a long replay take turns.
            tokio::select! {
                msg = self.control.recv(), if control_open => match msg {
                    Some(Control::Flush { deadline, close, done }) => {
                        if close {
                            self.queue.close();
                        }
                        let report = self.drain(deadline).await;
                        let _ = done.send(report);
                        if close {
                            return;
                        }
                    }
                    None => control_open = false,
                },
                batch = recv_batch(&mut self.queue) => match batch {
                    Some(batch) => self.handle(batch).await,
                    None => {
                        // Every sender is gone (the Audit was dropped): nothing more can come.
                        return;
                    }
                },
                _ = tokio::time::sleep_until(self.next_probe), if replay_due => {
                    self.replay().await;
                }
            }
        }
    }

    /// A batch from the queue: write it, or spool it while Cosmos is down.
    async fn handle(&mut self, batch: Vec<AbuseRecord>) {
        if self.down {
            spool_records(&self.spool, &self.writer.counters, &batch, "cosmos down");
            return;
        }
        let mut hurry = self.hurry.clone();
        let writer = self.writer.clone();
        let outcomes = tokio::select! {
            o = writer.write_all(&batch) => o,
            _ = hurried(&mut hurry) => {
                // A flush is due: these may be in Cosmos already; the replay upserts them
                // again under the same ids.
                spool_records(&self.spool, &self.writer.counters, &batch, "flush deadline");
                return;
            }
        };
        self.settle(batch, outcomes, false);
    }

    /// Count and route outcomes: written, rejected, or spooled (which marks Cosmos down).
    /// Returns whether every record is settled without the spool.
    fn settle(&mut self, batch: Vec<AbuseRecord>, outcomes: Vec<Outcome>, replay: bool) -> bool {
        let counters = &self.writer.counters;
        let mut to_spool = Vec::new();
        let mut to_reject = Vec::new();
        let mut written = 0u64;
        let mut down_reason = None;
        for (record, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Written => written += 1,
                Outcome::Rejected(why) => {
                    tracing::error!(
                        target: "audit",
                        record_id = %record.id,
                        error = %why,
                        "Cosmos DB refused the abuse record for good; kept in the rejected file"
                    );
                    to_reject.push(record);
                }
                Outcome::Down(why) => {
                    down_reason = Some(why);
                    to_spool.push(record);
                }
            }
        }
        counters.written.fetch_add(written, Ordering::Relaxed);
        if replay {
            counters.replayed.fetch_add(written, Ordering::Relaxed);
        }
        if !to_reject.is_empty() {
            match self.spool.reject(&to_reject) {
                Ok(()) => {
                    counters
                        .rejected
                        .fetch_add(to_reject.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(target: "audit", error = %e, "rejected file unwritable; spooling instead");
                    to_spool.extend(to_reject);
                }
            }
        }
        let clean = to_spool.is_empty();
        if !replay && !clean {
            spool_records(&self.spool, counters, &to_spool, "cosmos unavailable");
        }
        if let Some(why) = down_reason {
            if !self.down {
                tracing::warn!(target: "audit", error = %why, "Cosmos DB unavailable: spooling abuse records until it answers");
            }
            self.down = true;
            self.next_probe = tokio::time::Instant::now() + self.probe_wait;
            self.probe_wait = (self.probe_wait * 2).min(MAX_PROBE_INTERVAL);
        }
        clean
    }

    /// Replay the spool, [`REPLAY_ROUND`] chunks per call, so a large spool and the queue take
    /// turns. The cursor survives between calls; any failure drops it, and the next replay
    /// starts the file again from the top (records written twice keep their ids: no duplicates).
    async fn replay(&mut self) {
        let mut cursor = match self.cursor.take() {
            Some(c) => c,
            None => match self.open_replay() {
                Some(c) => c,
                None => return,
            },
        };
        let writer = self.writer.clone();
        for _ in 0..REPLAY_ROUND {
            let mut chunk = Vec::with_capacity(REPLAY_CHUNK);
            let mut eof = false;
            while chunk.len() < REPLAY_CHUNK {
                match cursor.lines.next() {
                    None => {
                        eof = true;
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::error!(target: "audit", error = %e, "spool read failed; replay later");
                        self.next_probe = tokio::time::Instant::now() + self.probe_wait;
                        return;
                    }
                    Some(Ok(line)) if line.trim().is_empty() => {}
                    Some(Ok(line)) => match serde_json::from_str::<AbuseRecord>(&line) {
                        Ok(r) => chunk.push(r),
                        Err(e) => {
                            // A torn line from a crash mid-append: keep it for a person to read.
                            tracing::error!(target: "audit", error = %e, "unreadable spool line moved to the rejected file");
                            if self.spool.reject_line(&line).is_ok() {
                                self.writer
                                    .counters
                                    .rejected
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    },
                }
            }
            let n = chunk.len();
            let mut hurry = self.hurry.clone();
            let outcomes = tokio::select! {
                o = writer.write_all(&chunk) => o,
                // A flush is due: leave the file as it is, the next start replays it.
                _ = hurried(&mut hurry) => return,
            };
            if !self.settle(chunk, outcomes, true) {
                // Cosmos is down again: the file stays as it is.
                tracing::warn!(
                    target: "audit",
                    replayed_so_far = cursor.done,
                    next_try_ms = self.next_probe.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64,
                    "spool replay interrupted: Cosmos DB unavailable"
                );
                return;
            }
            cursor.done += n;
            if eof {
                return self.end_replay(cursor);
            }
        }
        // More to replay: let the queue have a turn, then go on.
        self.next_probe = tokio::time::Instant::now();
        self.cursor = Some(cursor);
    }

    fn open_replay(&mut self) -> Option<ReplayCursor> {
        let file = match self.spool.take_for_replay() {
            Ok(Some(f)) => f,
            Ok(None) => {
                self.down = false;
                return None;
            }
            Err(e) => {
                tracing::error!(target: "audit", error = %e, "spool cannot be prepared for replay");
                self.next_probe = tokio::time::Instant::now() + MAX_PROBE_INTERVAL;
                return None;
            }
        };
        match std::fs::File::open(&file) {
            Ok(f) => Some(ReplayCursor {
                lines: std::io::BufReader::new(f).lines(),
                done: 0,
                started: Instant::now(),
            }),
            Err(e) => {
                tracing::error!(target: "audit", error = %e, "spool cannot be read");
                self.next_probe = tokio::time::Instant::now() + MAX_PROBE_INTERVAL;
                None
            }
        }
    }

    fn end_replay(&mut self, cursor: ReplayCursor) {
        if let Err(e) = self.spool.finish_replay() {
            tracing::error!(target: "audit", error = %e, "replayed spool could not be removed; it will be replayed again (no duplicates: same ids)");
            self.next_probe = tokio::time::Instant::now() + self.probe_wait;
            return;
        }
        self.down = false;
        self.probe_wait = self.writer.settings.replay_interval;
        self.next_probe = tokio::time::Instant::now();
        tracing::info!(
            target: "audit",
            records = cursor.done,
            replay_ms = cursor.started.elapsed().as_secs_f64() * 1000.0,
            replayed_total = self.writer.counters.replayed.load(Ordering::Relaxed),
            "spool replayed into Cosmos DB"
        );
    }

    /// Write everything queued until `deadline`; spool what is left then.
    async fn drain(&mut self, deadline: tokio::time::Instant) -> FlushReport {
        let mut report = FlushReport {
            completed: true,
            ..Default::default()
        };
        loop {
            let mut batch = Vec::new();
            while batch.len() < BATCH {
                match self.queue.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return report;
            }
            let n = batch.len() as u64;
            if self.down || tokio::time::Instant::now() >= deadline {
                spool_records(&self.spool, &self.writer.counters, &batch, "flush");
                report.spooled += n;
                continue;
            }
            let writer = self.writer.clone();
            match tokio::time::timeout_at(deadline, writer.write_all(&batch)).await {
                Ok(outcomes) => {
                    let spooled_before = self.writer.counters.spooled.load(Ordering::Relaxed);
                    let written_before = self.writer.counters.written.load(Ordering::Relaxed);
                    self.settle(batch, outcomes, false);
                    report.written +=
                        self.writer.counters.written.load(Ordering::Relaxed) - written_before;
                    report.spooled +=
                        self.writer.counters.spooled.load(Ordering::Relaxed) - spooled_before;
                }
                Err(_) => {
                    // Some of these may be in Cosmos already; the replay upserts them again
                    // under the same ids, so none is duplicated.
                    spool_records(&self.spool, &self.writer.counters, &batch, "flush deadline");
                    report.spooled += n;
                }
            }
        }
    }
}

/// Resolves shortly before the deadline of a requested flush; never without one.
async fn hurried(hurry: &mut watch::Receiver<Option<tokio::time::Instant>>) {
    loop {
        let due = *hurry.borrow_and_update();
        if let Some(deadline) = due {
            let margin = Duration::from_millis(500);
            tokio::time::sleep_until(deadline.checked_sub(margin).unwrap_or(deadline)).await;
            return;
        }
        if hurry.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Wait for at least one record, then take what else is queued, up to [`BATCH`].
async fn recv_batch(queue: &mut mpsc::Receiver<AbuseRecord>) -> Option<Vec<AbuseRecord>> {
    let mut batch = Vec::new();
    if queue.recv_many(&mut batch, BATCH).await == 0 {
        return None;
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, prompt: Option<String>) -> AbuseRecord {
        AbuseRecord {
            id: id.into(),
            timestamp: "2026-01-01T00:00:00Z".into(),
            request_id: id.into(),
            caller: "default".into(),
            user: "u".into(),
            deployment: Some("gpt-4o".into()),
            operation: "chat_completions".into(),
            reason: Reason::ContentFiltered,
            details: serde_json::json!({"hate": 4}),
            prompt,
            client_ip: None,
        }
    }

    #[test]
    fn oversized_prompts_are_cut_under_the_item_limit() {
        let big = "é\"".repeat(1_500_000);
        let r = fit_for_cosmos(record("a", Some(big.clone())));
        let size = serde_json::to_vec(&r).unwrap().len();
        assert!(size <= MAX_RECORD_BYTES, "{size}");
        assert_eq!(r.details["prompt_truncated_bytes"], big.len());
        assert_eq!(r.details["hate"], 4);
        let small = fit_for_cosmos(record("b", Some("hi".into())));
        assert_eq!(small.prompt.as_deref(), Some("hi"));
    }

    #[test]
    fn settings_defaults_and_bounds() {
        let s =
            AuditSettings::from_source(&Source::from_map(Vec::<(String, String)>::new())).unwrap();
        assert_eq!(s.queue_capacity, 10_000);
        assert!(s.cosmos.is_none());
        for (k, v) in [
            ("AUDIT_QUEUE_CAPACITY", "0"),
            ("AUDIT_QUEUE_CAPACITY", "many"),
            ("AUDIT_WRITE_CONCURRENCY", "1000"),
            ("AUDIT_MAX_ATTEMPTS", "0"),
        ] {
            let e = AuditSettings::from_source(&Source::from_map([(k, v)])).unwrap_err();
            assert_eq!(e.name, k);
        }
    }

    #[test]
    fn spool_rotates_only_when_finished() {
        let dir = std::env::temp_dir().join(format!("audit-spool-{}", uuid::Uuid::new_v4()));
        let path = dir.join("spool.jsonl");
        let spool = Spool::open(&path).unwrap();
        assert!(!spool.has_pending());
        spool
            .append(&[record("1", None), record("2", None)])
            .unwrap();
        assert!(spool.has_pending());
        let file = spool.take_for_replay().unwrap().unwrap();
        assert!(file.ends_with("spool.jsonl.replaying"));
        // New appends land in a fresh spool while the replay runs.
        spool.append(&[record("3", None)]).unwrap();
        // An interrupted replay hands out the same file again.
        assert_eq!(spool.take_for_replay().unwrap().unwrap(), file);
        spool.finish_replay().unwrap();
        assert!(spool.has_pending());
        let next = spool.take_for_replay().unwrap().unwrap();
        let text = std::fs::read_to_string(&next).unwrap();
        assert_eq!(text.lines().count(), 1);
        spool.finish_replay().unwrap();
        assert!(!spool.has_pending());
        assert!(spool.take_for_replay().unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
