//! Ships the journal to Cosmos DB in the background (Cosmos mode only).
//!
//! One task, one file at a time: it ships `<journal>.shipping` when one exists (left by an
//! earlier pass or an earlier process: this is the replay at start), otherwise asks the journal
//! to rotate what has been appended since. Records go out in chunks of [`CHUNK`] through the
//! [`Writer`]'s retries. A chunk that cannot be written (Cosmos down) pauses the pass: the
//! shipper waits `AUDIT_REPLAY_INTERVAL_MS` (doubling up to 60 s) and resumes at that chunk.
//! Only when every record of the file is in Cosmos DB (or in `.rejected`) is the file deleted.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::cosmos_writer::{Outcome, Writer};
use super::durable::Item;
use super::journal::{read_chunk, Journal};
use super::Counters;

/// Records read and written as one chunk.
pub const CHUNK: usize = 512;
/// Longest pause while Cosmos DB is down.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// What the shipper and [`super::Audit`] share.
#[derive(Default)]
pub struct ShipState {
    /// Cosmos DB did not take a chunk: the shipper is pausing.
    pub down: AtomicBool,
    /// Wakes the shipper (a flush wants the journal emptied now).
    pub kick: Notify,
}

/// Ships the journal of `R` items to their container.
pub struct Shipper<R> {
    pub journal: Arc<Journal>,
    pub writer: Arc<Writer>,
    pub counters: Arc<Counters>,
    pub state: Arc<ShipState>,
    pub stop: watch::Receiver<bool>,
    pub item: PhantomData<fn() -> R>,
}

impl<R: Item> Shipper<R> {
    pub async fn run(mut self) {
        let first_pause = self.writer.settings.replay_interval;
        let mut pause = first_pause;
        let mut offset = 0u64;
        let shipping = self.journal.shipping_path().to_path_buf();
        loop {
            if *self.stop.borrow() {
                return;
            }
            if !tokio::fs::try_exists(&shipping).await.unwrap_or(false) {
                offset = 0;
                match self.journal.rotate().await {
                    Ok(true) => {}
                    Ok(false) => {
                        tokio::select! {
                            _ = self.journal.committed() => {}
                            _ = self.state.kick.notified() => {}
                            _ = self.stop.changed() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(target: "audit", kind = R::KIND, error = %e, "{} journal could not be rotated for shipping", R::KIND);
                        self.sleep(pause).await;
                        continue;
                    }
                }
            }
            let started = Instant::now();
            let shipped_before = self.counters.shipped.load(Ordering::Relaxed);
            match self.ship(&shipping, &mut offset).await {
                Ok(()) => {
                    let path = shipping.clone();
                    let removed = tokio::task::spawn_blocking(move || remove_durably(&path))
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|r| r);
                    if let Err(e) = removed {
                        tracing::error!(target: "audit", kind = R::KIND, error = %e, "shipped journal file could not be removed; it will be shipped again (same ids: no duplicates)");
                        self.sleep(pause).await;
                        continue;
                    }
                    offset = 0;
                    if self.state.down.swap(false, Ordering::Relaxed) {
                        tracing::info!(target: "audit", kind = R::KIND, "Cosmos DB answers again: {} journal shipping resumed", R::KIND);
                    }
                    pause = first_pause;
                    tracing::debug!(
                        target: "audit",
                        kind = R::KIND,
                        records = self.counters.shipped.load(Ordering::Relaxed) - shipped_before,
                        ship_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "journal shipped to Cosmos DB"
                    );
                }
                Err(why) => {
                    if *self.stop.borrow() {
                        return;
                    }
                    if !self.state.down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            target: "audit",
                            kind = R::KIND,
                            error = %why,
                            "Cosmos DB unavailable: {} records stay in the journal until it answers",
                            R::KIND
                        );
                    }
                    self.sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    async fn sleep(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.changed() => {}
        }
    }

    /// Ship `path` from `offset` to its end; on failure `offset` is the chunk to resume at.
    async fn ship(&mut self, path: &Path, offset: &mut u64) -> Result<(), String> {
        loop {
            if *self.stop.borrow() {
                return Err("stopping".into());
            }
            let (p, at): (PathBuf, u64) = (path.to_path_buf(), *offset);
            let chunk = tokio::task::spawn_blocking(move || read_chunk::<R>(&p, at, CHUNK))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("journal unreadable: {e}"))?;
            if !chunk.torn.is_empty() {
                tracing::error!(
                    target: "audit",
                    kind = R::KIND,
                    lines = chunk.torn.len(),
                    "unreadable {} journal lines (a crash mid-append) set aside in the rejected file",
                    R::KIND
                );
                self.reject(chunk.torn).await?;
            }
            if !chunk.records.is_empty() {
                let outcomes = self.writer.write_all(&chunk.records).await;
                let mut refused = Vec::new();
                let mut down = None;
                let mut written = 0u64;
                for (record, outcome) in chunk.records.iter().zip(outcomes) {
                    match outcome {
                        Outcome::Written => written += 1,
                        Outcome::Rejected(why) => {
                            tracing::error!(
                                target: "audit",
                                kind = R::KIND,
                                record_id = %record.id(),
                                error = %why,
                                "Cosmos DB refused the {} record for good; kept in the rejected file",
                                R::KIND
                            );
                            refused.push(serde_json::to_vec(record).unwrap_or_default());
                        }
                        Outcome::Down(why) => down = Some(why),
                    }
                }
                self.counters.shipped.fetch_add(written, Ordering::Relaxed);
                self.reject(refused).await?;
                if let Some(why) = down {
                    return Err(why);
                }
            }
            *offset = chunk.next;
            if chunk.eof {
                return Ok(());
            }
        }
    }

    async fn reject(&self, lines: Vec<Vec<u8>>) -> Result<(), String> {
        if lines.is_empty() {
            return Ok(());
        }
        let n = lines.len() as u64;
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || journal.reject(&lines))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("rejected file unwritable: {e}"))?;
        self.counters.rejected.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

fn remove_durably(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
