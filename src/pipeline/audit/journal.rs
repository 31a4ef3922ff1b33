//! The write-ahead journal: where a record becomes durable before its refusal is answered.
//!
//! # Group commit
//! One dedicated OS thread owns the file. Callers hand it a serialised line and await a
//! oneshot; the thread takes everything queued (up to [`MAX_BATCH`] lines / [`MAX_BATCH_BYTES`]),
//! writes it with one `write`, makes it durable with one `fdatasync`, and answers every caller
//! of the batch. A storm therefore costs one fsync per batch, not one per record, and no fsync
//! ever runs on the async request threads. A failed write or fsync answers every caller of the
//! batch with the error (their refusals are not answered as recorded) and cuts the file back to
//! its last good length, so the next batch starts on a fresh line.
//!
//! # Files
//! - `<journal>`: appends. Without Cosmos DB this is `AUDIT_LOG_PATH` and nothing else happens.
//! - `<journal>.shipping` (Cosmos DB only): the shipper asks the thread to [`Journal::rotate`]:
//!   it renames `<journal>` and starts a fresh one (in the same thread as appends, so no append
//!   can land in the renamed file). The shipper deletes `.shipping` once every record in it is
//!   in Cosmos DB (or in `.rejected`); a crash at any point leaves each record in one of the two
//!   files, and the next start ships `.shipping` first.
//! - `<journal>.rejected`: torn lines and records Cosmos DB refused for good, for a person.
//! - `<journal>.lock`: an advisory `flock` held for the life of the process. A second process
//!   on the same journal refuses to start, naming the path and the holder's pid. Inside one
//!   process, a second [`Journal::open`] of the same path shares the first (tests start several
//!   apps in one process). On a file system without advisory locks (`ENOLCK`, `EOPNOTSUPP`: some
//!   network shares) the journal is used unlocked, with a warning: the per-instance directory
//!   is then the only guard.
//!
//! # Torn lines
//! A crash mid-append can leave an unterminated last line, possibly cut inside a UTF-8
//! character. At open the tail after the last newline is moved to `.rejected` (kept as is, when
//! it is a whole record) and the file cut back, so new appends never glue onto it. Readers take
//! the file as bytes, never as text: a line that is not a record goes to `.rejected`, and the
//! records glued onto a torn line are salvaged (each record starts with `{"id":"`). Nothing
//! unreadable ever stops what follows.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, Notify};

/// Lines per group commit at most.
pub const MAX_BATCH: usize = 4096;
/// Bytes per group commit at most (a batch may exceed it by one record).
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Where each record starts on a line: the id is serialised first.
const RECORD_START: &[u8] = br#"{"id":""#;

/// Why a record could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct JournalError(pub String);

impl From<std::io::Error> for JournalError {
    fn from(e: std::io::Error) -> Self {
        JournalError(e.to_string())
    }
}

/// Why a journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "{path} is in use by another process (pid {holder}); give each process its own journal"
    )]
    Held { path: String, holder: String },
    #[error("{path} cannot be opened: {error}")]
    Io { path: String, error: std::io::Error },
}

enum Cmd {
    Append {
        line: Vec<u8>,
        done: oneshot::Sender<Result<(), JournalError>>,
    },
    Rotate {
        done: oneshot::Sender<Result<bool, JournalError>>,
    },
}

struct Shared {
    /// Bytes in `<journal>` known good (committed and synced).
    len: AtomicU64,
    /// Committed batches, and fsyncs.
    commits: AtomicU64,
    /// Woken after every commit (the shipper waits on it).
    committed: Notify,
}

/// The journal of one path (see the module doc).
pub struct Journal {
    path: PathBuf,
    shipping: PathBuf,
    rejected: PathBuf,
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    rejected_lock: Mutex<()>,
    /// What the journal holds (`abuse`, `usage`), for log lines.
    kind: &'static str,
    /// The advisory lock, released when the journal is dropped.
    _lock: File,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Journal>>> {
    static OPEN: std::sync::OnceLock<Mutex<HashMap<PathBuf, Weak<Journal>>>> =
        std::sync::OnceLock::new();
    OPEN.get_or_init(Default::default)
}

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

impl Journal {
    /// Open (or share, inside this process) the journal of `R` items (`kind` names them in log
    /// lines) at `path`: lock it, set a torn tail aside, and start its thread. `capacity` lines
    /// may wait for the thread before [`Journal::append`] waits for room.
    pub fn open<R: DeserializeOwned>(
        path: &Path,
        capacity: usize,
        kind: &'static str,
    ) -> Result<Arc<Journal>, OpenError> {
        let mut open = registry().lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, j| j.strong_count() > 0);
        if let Some(j) = open.get(path).and_then(Weak::upgrade) {
            return Ok(j);
        }
        let io = |error: std::io::Error| OpenError::Io {
            path: path.display().to_string(),
            error,
        };
        let lock = lock_own(path)?;
        let rejected = with_suffix(path, ".rejected");
        let len = repair_tail::<R>(path, &rejected, kind).map_err(io)?;
        let file = open_append(path).map_err(io)?;
        // The file's directory entry must survive a crash as much as its records do.
        sync_dir(path).map_err(io)?;
        let shared = Arc::new(Shared {
            len: AtomicU64::new(len),
            commits: AtomicU64::new(0),
            committed: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let journal = Arc::new(Journal {
            path: path.to_path_buf(),
            shipping: with_suffix(path, ".shipping"),
            rejected,
            tx,
            shared: shared.clone(),
            rejected_lock: Mutex::new(()),
            kind,
            _lock: lock,
        });
        let thread = Writer {
            rx,
            file: Some(file),
            path: journal.path.clone(),
            shipping: journal.shipping.clone(),
            shared,
            kind,
            repair: repair_tail::<R>,
        };
        std::thread::Builder::new()
            .name(format!("{kind}-journal"))
            .spawn(move || thread.run())
            .map_err(io)?;
        open.insert(path.to_path_buf(), Arc::downgrade(&journal));
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shipping_path(&self) -> &Path {
        &self.shipping
    }

    pub fn rejected_path(&self) -> &Path {
        &self.rejected
    }

    /// What the journal holds (`abuse`, `usage`).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Bytes waiting in `<journal>` (not yet rotated for shipping).
    pub fn pending_bytes(&self) -> u64 {
        self.shared.len.load(Ordering::SeqCst)
    }

    /// Group commits (fsyncs) so far.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::SeqCst)
    }

    /// Resolves after the next commit (or at once when one happened since the last call).
    pub async fn committed(&self) {
        self.shared.committed.notified().await
    }

    /// Append one record line (`\n`-terminated) and return once it is on disk.
    pub async fn append(&self, line: Vec<u8>) -> Result<(), JournalError> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Cmd::Append { line, done })
            .await
            .map_err(|_| JournalError("the journal thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| JournalError("the journal thread has stopped".into()))?
    }

    /// Rename `<journal>` to `.shipping` and start a fresh one; `false` when there was
    /// nothing to rotate or `.shipping` still exists.
    pub async fn rotate(&self) -> Result<bool, JournalError> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Cmd::Rotate { done })
            .await
            .map_err(|_| JournalError("the journal thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| JournalError("the journal thread has stopped".into()))?
    }

    /// Append raw lines (torn lines, refused records) to `.rejected`, durably. Blocking.
    pub fn reject(&self, lines: &[Vec<u8>]) -> std::io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let _g = self.rejected_lock.lock().unwrap_or_else(|e| e.into_inner());
        append_rejected(&self.rejected, lines)
    }
}

fn append_rejected(rejected: &Path, lines: &[Vec<u8>]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for l in lines {
        buf.extend_from_slice(l);
        if !l.ends_with(b"\n") {
            buf.push(b'\n');
        }
    }
    let mut f = open_append(rejected)?;
    f.write_all(&buf)?;
    f.sync_data()
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// [`lock`], waiting up to 2 s when the holder is this very process: a journal of ours whose
/// last user is gone but whose drop (which releases the lock) has not finished yet.
fn lock_own(path: &Path) -> Result<File, OpenError> {
    let me = std::process::id().to_string();
    for _ in 0..400 {
        match lock(path) {
            Err(OpenError::Held { holder, .. }) if holder == me => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            other => return other,
        }
    }
    lock(path)
}

/// Take the advisory lock `<journal>.lock`, writing our pid into it.
fn lock(path: &Path) -> Result<File, OpenError> {
    // Named after the file the journal really is: two paths to one file (a symlink, `..`) must
    // meet at one lock (a red-team finding: a symlinked journal let two processes share it).
    // (created first, so a symlink to a journal not yet written resolves too)
    let _ = open_append(path);
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let lock_path = with_suffix(&real, ".lock");
    let io = |error: std::io::Error| OpenError::Io {
        path: lock_path.display().to_string(),
        error,
    };
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim().chars().take(20).collect::<String>();
            return Err(OpenError::Held {
                path: path.display().to_string(),
                holder: if holder.is_empty() {
                    "unknown".into()
                } else {
                    holder
                },
            });
        }
        Err(std::fs::TryLockError::Error(e))
            if e.kind() == std::io::ErrorKind::Unsupported
                || matches!(e.raw_os_error(), Some(37 | 38 | 95)) =>
        {
            // ENOLCK / ENOSYS / EOPNOTSUPP: a file system without advisory locks (some network
            // shares). Refusing to start would be worse than relying on the per-instance
            // directory alone; say so.
            tracing::warn!(
                target: "audit",
                path = %lock_path.display(),
                error = %e,
                "the file system does not support advisory locks: the abuse journal is not locked; keep one process per journal (per-instance directory)"
            );
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    f.set_len(0).map_err(io)?;
    f.write_all(std::process::id().to_string().as_bytes())
        .map_err(io)?;
    Ok(f)
}

/// Set an unterminated last line aside in `rejected` and cut the file back to the last
/// newline (a tail that is a whole `R` only lacks its newline: it is kept). Returns the file's
/// length afterwards (0 when it does not exist).
pub(crate) fn repair_tail<R: DeserializeOwned>(
    path: &Path,
    rejected: &Path,
    kind: &'static str,
) -> std::io::Result<u64> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Find the last newline, reading backwards in blocks.
    let mut end = len;
    let mut cut = None;
    let mut block = vec![0u8; 64 * 1024];
    while end > 0 && cut.is_none() {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut block[..n])?;
        if let Some(i) = block[..n].iter().rposition(|&b| b == b'\n') {
            cut = Some(start + i as u64 + 1);
        }
        end = start;
    }
    let keep = cut.unwrap_or(0);
    if keep == len {
        return Ok(len);
    }
    let mut tail = Vec::with_capacity((len - keep) as usize);
    f.seek(SeekFrom::Start(keep))?;
    f.read_to_end(&mut tail)?;
    if serde_json::from_slice::<R>(&tail).is_ok() {
        // Whole record, only its newline missing: keep it.
        f.seek(SeekFrom::End(0))?;
        f.write_all(b"\n")?;
        f.sync_data()?;
        return Ok(len + 1);
    }
    tracing::error!(
        target: "audit",
        kind,
        path = %path.display(),
        bytes = tail.len(),
        "torn last line in the {kind} journal (a crash mid-append) set aside in the rejected file"
    );
    append_rejected(rejected, &[tail])?;
    f.set_len(keep)?;
    f.sync_data()?;
    Ok(keep)
}

/// Records read from a journal file, from a byte offset.
#[derive(Debug)]
pub struct Chunk<R> {
    pub records: Vec<R>,
    /// Lines (or parts of lines) that are not records.
    pub torn: Vec<Vec<u8>>,
    /// Where the next chunk starts.
    pub next: u64,
    pub eof: bool,
}

/// Read up to `max` records from `path` starting at byte `offset`. Blocking.
pub fn read_chunk<R: DeserializeOwned>(
    path: &Path,
    offset: u64,
    max: usize,
) -> std::io::Result<Chunk<R>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut reader = std::io::BufReader::with_capacity(256 * 1024, f);
    let mut chunk = Chunk {
        records: Vec::new(),
        torn: Vec::new(),
        next: offset,
        eof: false,
    };
    let mut line = Vec::new();
    while chunk.records.len() < max {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            chunk.eof = true;
            break;
        }
        chunk.next += n as u64;
        parse_line(&line, &mut chunk.records, &mut chunk.torn);
    }
    Ok(chunk)
}

/// One line: a record, or torn bytes — with the records glued onto a torn line salvaged.
pub(crate) fn parse_line<R: DeserializeOwned>(
    line: &[u8],
    records: &mut Vec<R>,
    torn: &mut Vec<Vec<u8>>,
) {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    if body.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    if let Ok(r) = serde_json::from_slice::<R>(body) {
        records.push(r);
        return;
    }
    let mut starts: Vec<usize> = body
        .windows(RECORD_START.len())
        .enumerate()
        .filter(|(_, w)| *w == RECORD_START)
        .map(|(i, _)| i)
        .collect();
    if starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    starts.push(body.len());
    for pair in starts.windows(2) {
        let piece = &body[pair[0]..pair[1]];
        match serde_json::from_slice::<R>(piece) {
            Ok(r) => records.push(r),
            Err(_) if !piece.is_empty() => torn.push(piece.to_vec()),
            Err(_) => {}
        }
    }
}

/// Make a rename or creation durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    File::open(dir)?.sync_all()
}

/// The journal thread.
struct Writer {
    rx: mpsc::Receiver<Cmd>,
    /// `None` after a failed reopen; the next commit tries again.
    file: Option<File>,
    path: PathBuf,
    shipping: PathBuf,
    shared: Arc<Shared>,
    kind: &'static str,
    /// [`repair_tail`] for the journal's item type.
    repair: fn(&Path, &Path, &'static str) -> std::io::Result<u64>,
}

impl Writer {
    fn run(mut self) {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut waiting = Vec::new();
        let mut rotations = Vec::new();
        while let Some(first) = self.rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Cmd::Append { line, done } => {
                        buf.extend_from_slice(&line);
                        waiting.push(done);
                    }
                    Cmd::Rotate { done } => rotations.push(done),
                }
                if waiting.len() < MAX_BATCH && buf.len() < MAX_BATCH_BYTES {
                    next = self.rx.try_recv().ok();
                }
            }
            if !waiting.is_empty() {
                let result = self.commit(&buf);
                if let Err(e) = &result {
                    tracing::error!(
                        target: "audit",
                        kind = self.kind,
                        path = %self.path.display(),
                        records = waiting.len(),
                        error = %e,
                        "{} journal write failed: these records are not durable (refusals are not answered as recorded)",
                        self.kind
                    );
                }
                for w in waiting.drain(..) {
                    let _ = w.send(result.clone());
                }
                buf.clear();
                self.shared.committed.notify_one();
            }
            for r in rotations.drain(..) {
                let _ = r.send(self.rotate());
            }
        }
    }

    fn commit(&mut self, buf: &[u8]) -> Result<(), JournalError> {
        // A journal deleted under the running process (an operator, a cleanup job) would take
        // every later record with it when the process exits: one fstat per batch notices, and
        // the journal is made again at its path (a red-team finding).
        if let Some(f) = &self.file {
            use std::os::unix::fs::MetadataExt;
            if f.metadata().is_ok_and(|m| m.nlink() == 0) {
                tracing::warn!(
                    target: "audit",
                    kind = self.kind,
                    path = %self.path.display(),
                    "the {} journal was deleted while in use: made again at its path",
                    self.kind
                );
                self.file = None;
                self.shared.len.store(0, Ordering::SeqCst);
            }
        }
        if self.file.is_none() {
            self.file = Some(open_append(&self.path)?);
            let _ = sync_dir(&self.path);
        }
        let f = self.file.as_mut().expect("opened above");
        let before = self.shared.len.load(Ordering::SeqCst);
        match f.write_all(buf).and_then(|()| f.sync_data()) {
            Ok(()) => {
                self.shared
                    .len
                    .store(before + buf.len() as u64, Ordering::SeqCst);
                self.shared.commits.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                // Take back a partial write so the next batch starts on a fresh line.
                if f.set_len(before).and_then(|()| f.sync_data()).is_err() {
                    // Unknown state: reopen (and repair) before the next batch.
                    self.file = None;
                    let rejected = with_suffix(&self.path, ".rejected");
                    if let Ok(len) = (self.repair)(&self.path, &rejected, self.kind) {
                        self.shared.len.store(len, Ordering::SeqCst);
                    }
                }
                Err(e.into())
            }
        }
    }

    fn rotate(&mut self) -> Result<bool, JournalError> {
        if self.shared.len.load(Ordering::SeqCst) == 0 || self.shipping.exists() {
            return Ok(false);
        }
        std::fs::rename(&self.path, &self.shipping)?;
        self.file = None;
        self.shared.len.store(0, Ordering::SeqCst);
        sync_dir(&self.path)?;
        // A failed open is retried by the next commit; the rotation itself is done.
        if let Ok(f) = open_append(&self.path) {
            self.file = Some(f);
            let _ = sync_dir(&self.path);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{sample, AbuseRecord};
    use super::*;

    fn repair_tail(path: &Path, rejected: &Path) -> std::io::Result<u64> {
        super::repair_tail::<AbuseRecord>(path, rejected, "abuse")
    }

    fn read_chunk(path: &Path, offset: u64, max: usize) -> std::io::Result<Chunk<AbuseRecord>> {
        super::read_chunk(path, offset, max)
    }

    fn open(path: &Path, capacity: usize) -> Result<Arc<Journal>, OpenError> {
        Journal::open::<AbuseRecord>(path, capacity, "abuse")
    }

    fn line(id: &str) -> Vec<u8> {
        let mut l = serde_json::to_vec(&sample(id, Some("héllo wörld ✓".into()))).unwrap();
        l.push(b'\n');
        l
    }

    fn ids(chunk: &Chunk<AbuseRecord>) -> Vec<String> {
        chunk.records.iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn a_torn_multibyte_tail_is_set_aside_and_appends_start_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let whole = line("a");
        let torn = line("b");
        // cut inside a multi-byte character (the 'ö' of the prompt, 2 bytes)
        let cut = torn.windows(2).position(|w| w == "ö".as_bytes()).unwrap() + 1;
        assert!(std::str::from_utf8(&torn[..cut]).is_err());
        std::fs::write(&path, [whole.clone(), torn[..cut].to_vec()].concat()).unwrap();
        let rejected = with_suffix(&path, ".rejected");
        let len = repair_tail(&path, &rejected).unwrap();
        assert_eq!(len, whole.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        assert_eq!(
            std::fs::read(&rejected).unwrap(),
            [&torn[..cut], b"\n"].concat()
        );
        // a whole record whose newline is missing is kept
        std::fs::write(
            &path,
            [whole.clone(), line("c")[..line("c").len() - 1].to_vec()].concat(),
        )
        .unwrap();
        repair_tail(&path, &rejected).unwrap();
        let c = read_chunk(&path, 0, 100).unwrap();
        assert_eq!(ids(&c), ["a", "c"]);
        assert!(c.torn.is_empty());
        // a file that is one torn line (no newline at all), and an empty file
        std::fs::write(&path, &torn[..cut]).unwrap();
        assert_eq!(repair_tail(&path, &rejected).unwrap(), 0);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(repair_tail(&path, &rejected).unwrap(), 0);
        assert_eq!(repair_tail(&dir.path().join("none"), &rejected).unwrap(), 0);
    }

    #[test]
    fn torn_lines_in_the_middle_never_block_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let b = line("b");
        let mut text = line("a");
        // a torn line with a record glued onto it, invalid UTF-8, garbage, blank lines
        text.extend_from_slice(&b[..b.len() / 2]);
        text.extend_from_slice(&line("c"));
        text.extend_from_slice(b"\xff\xfe\x00garbage\n\n   \n");
        text.extend_from_slice(&[0u8; 40]);
        text.push(b'\n');
        text.extend_from_slice(&line("d"));
        text.extend_from_slice(&b[..b.len() - 30]); // torn tail
        std::fs::write(&path, &text).unwrap();
        let all = read_chunk(&path, 0, 100).unwrap();
        assert_eq!(ids(&all), ["a", "c", "d"]);
        assert_eq!(all.torn.len(), 4, "{:?}", all.torn);
        assert!(all.eof);
        assert_eq!(all.next, text.len() as u64);
        // chunked reading from offsets sees the same records
        let mut got = Vec::new();
        let mut at = 0;
        for _ in 0..10 {
            let c = read_chunk(&path, at, 1).unwrap();
            got.extend(ids(&c));
            at = c.next;
            if c.eof {
                break;
            }
        }
        assert_eq!(got, ["a", "c", "d"]);
    }

    #[tokio::test]
    async fn a_journal_deleted_while_in_use_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.jsonl");
        let j = open(&path, 8).unwrap();
        j.append(line("before")).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        j.append(line("after")).await.unwrap();
        assert_eq!(ids(&read_chunk(&path, 0, 10).unwrap()), ["after"]);
        assert_eq!(j.pending_bytes(), std::fs::metadata(&path).unwrap().len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_answers_every_caller_with_few_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let j = open(&path, 10_000).unwrap();
        let n = 2000;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let j = j.clone();
                tokio::spawn(async move { j.append(line(&format!("r{i}"))).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let c = read_chunk(&path, 0, 10_000).unwrap();
        assert_eq!(c.records.len(), n);
        assert!(j.commits() < n as u64, "batched: {} commits", j.commits());
        assert_eq!(j.pending_bytes(), std::fs::metadata(&path).unwrap().len());
        // rotation: appends after it land in a fresh file
        assert!(j.rotate().await.unwrap());
        assert!(!j.rotate().await.unwrap(), ".shipping still there");
        j.append(line("after")).await.unwrap();
        assert_eq!(
            read_chunk(j.shipping_path(), 0, 10_000)
                .unwrap()
                .records
                .len(),
            n
        );
        assert_eq!(ids(&read_chunk(&path, 0, 10).unwrap()), ["after"]);
        // the same path in the same process shares the journal
        let again = open(&path, 1).unwrap();
        assert!(Arc::ptr_eq(&j, &again));
    }

    #[test]
    fn a_journal_locked_elsewhere_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.jsonl");
        // Another open file description holding the flock, as another process would.
        let held = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(with_suffix(&path, ".lock"))
            .unwrap();
        held.try_lock().unwrap();
        std::fs::write(with_suffix(&path, ".lock"), b"4242").unwrap();
        let e = open(&path, 8).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, OpenError::Held { .. }), "{text}");
        assert!(
            text.contains("pid 4242") && text.contains("held.jsonl"),
            "{text}"
        );
        drop(held);
        assert!(open(&path, 8).is_ok(), "free once the holder is gone");
    }

    #[test]
    fn a_symlink_to_a_held_journal_meets_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(dir.path()).unwrap();
        let real = dir.join("abuse.jsonl");
        let alias = dir.join("alias.jsonl");
        std::os::unix::fs::symlink(&real, &alias).unwrap();
        let held = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(with_suffix(&real, ".lock"))
            .unwrap();
        held.try_lock().unwrap();
        let e = open(&alias, 8).unwrap_err();
        assert!(matches!(e, OpenError::Held { .. }), "{e}");
        drop(held);
    }
}
