//! Usage summaries: one record per caller × user × deployment × minute, aggregated in memory
//! and handed, minute by minute, to a durable log shipped to the Cosmos DB `usage` container
//! (partition key `/caller`; `COSMOS_USAGE_CONTAINER`).
//!
//! - Each metered answer is added when its request ends ([`Summaries::add`]): its exact usage,
//!   or — when AOAI reported none — a count of answers without usage and the tokens the budget
//!   kept for them (its reservation), so a summary says how much of it is estimated.
//! - [`spawn_flusher`] takes every closed minute's records ([`Summaries::take_closed`]) shortly
//!   after the minute ends and appends them to the usage journal ([`Durable::append_all`]): one
//!   write, one fsync; the shipper upserts them. On SIGTERM the open minute is taken too
//!   ([`Summaries::take_all`]).
//! - An `id` is `<instance>.<run>.<unix minute>.<n>`: `run` is made once per process, `n`
//!   counts the records of the process. Instances and restarts (even within one minute) never
//!   overwrite each other's records, a replayed upsert (same id, from the journal) is
//!   idempotent, and an answer that ends after its minute was taken (or a clock stepped back)
//!   makes a second record for that minute instead of replacing the first. Totals are a **sum**
//!   over records; no record is ever an update of another.
//!
//! What is not counted: answers still running when the process is killed (SIGKILL: the open
//! minute is in memory), and answers that end after the SIGTERM flush (after the shutdown
//! grace); their log lines still carry their usage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Usage;
use crate::pipeline::audit::{Durable, FlushReport, Item};

/// One Cosmos DB item of the `usage` container (partition key `/caller`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSummary {
    /// `<instance>.<run>.<unix minute>.<n>`; serialised first (the journal reader needs it).
    pub id: String,
    /// The minute's start, RFC 3339 UTC.
    pub minute: String,
    /// The minute's day, `YYYY-MM-DD` UTC (a property to group by: SDKs that plan queries
    /// themselves cannot group by an expression such as `SUBSTRING(c.minute, 0, 10)`).
    #[serde(default)]
    pub day: String,
    pub caller: String,
    /// The body's `user` (`(none)` when the request named none or its body was not read).
    pub user: String,
    /// The deployment from the path; on the `v1` routes, the body's `model`.
    pub deployment: String,
    /// `WEBSITE_INSTANCE_ID` (or the host name).
    pub instance: String,
    /// The process that made the record (one per start).
    pub run: String,
    /// Successful metered answers.
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    /// Exact: the sum of AOAI's `usage.total_tokens`.
    pub total_tokens: u64,
    /// Answers of `requests` whose usage AOAI did not report (a stream that could not be asked
    /// for it, a client gone before the usage chunk): not in the token sums above.
    #[serde(default)]
    pub requests_without_usage: u64,
    /// What the budget charged for those answers (their reservations: an estimate); 0 for an
    /// unlimited caller.
    #[serde(default)]
    pub estimated_tokens: u64,
}

impl Item for UsageSummary {
    const KIND: &'static str = "usage";
    fn id(&self) -> &str {
        &self.id
    }
    fn partition_key(&self) -> String {
        self.caller.clone()
    }
}

/// What one answer adds to its summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measured {
    /// AOAI's usage (exact).
    Usage(Usage),
    /// No usage reported; the budget kept this reservation (an estimate).
    Estimate(u64),
    /// No usage reported and nothing estimated (an unlimited caller).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// Unix time / 60.
    minute: i64,
    caller: String,
    user: String,
    deployment: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    requests: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
    reasoning: u64,
    total: u64,
    without_usage: u64,
    estimated: u64,
}

/// The open minutes of one process.
#[derive(Debug)]
pub struct Summaries {
    instance: String,
    run: String,
    /// Records made so far (the `<n>` of the ids).
    made: AtomicU64,
    open: Mutex<HashMap<Key, Totals>>,
}

/// The user of a request without one.
pub const NO_USER: &str = "(none)";

/// Open records at most: past it, further new keys go to one overflow key per caller,
/// deployment and minute (user `*`), so a client that invents a new `user` per request cannot
/// grow memory without bound (the sums stay whole).
pub const MAX_KEYS_PER_MINUTE: usize = 100_000;
/// The user of the overflow key.
pub const OVERFLOW_USER: &str = "*";

/// A safe id segment: `[A-Za-z0-9_-]`, at most 64 characters (Cosmos ids exclude `/ \ ? #`).
fn segment(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if out.is_empty() {
        "instance".into()
    } else {
        out
    }
}

impl Summaries {
    /// `instance` names this handler instance (App Service's `WEBSITE_INSTANCE_ID`); a fresh
    /// run id names this process.
    pub fn new(instance: &str) -> Self {
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        Summaries {
            instance: segment(instance),
            run,
            made: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// This process's run id.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// Add one answer at `unix_secs`.
    pub fn add(
        &self,
        caller: &str,
        user: Option<&str>,
        deployment: Option<&str>,
        measured: Measured,
        unix_secs: i64,
    ) {
        let minute = unix_secs.div_euclid(60);
        let mut key = Key {
            minute,
            caller: caller.to_string(),
            user: user
                .filter(|u| !u.is_empty())
                .unwrap_or(NO_USER)
                .to_string(),
            deployment: deployment.unwrap_or("").to_string(),
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !open.contains_key(&key) && open.len() >= MAX_KEYS_PER_MINUTE {
            key.user = OVERFLOW_USER.to_string();
        }
        let t = open.entry(key).or_default();
        t.requests += 1;
        match measured {
            Measured::Usage(u) => {
                t.prompt += u.prompt_tokens;
                t.cached += u.cached_tokens.unwrap_or(0);
                t.completion += u.completion_tokens;
                t.reasoning += u.reasoning_tokens.unwrap_or(0);
                t.total += u.total_tokens;
            }
            Measured::Estimate(tokens) => {
                t.without_usage += 1;
                t.estimated += tokens;
            }
            Measured::Unknown => t.without_usage += 1,
        }
    }

    /// Remove and return the records of every minute that ended at or before `unix_secs`
    /// (the current minute stays open).
    pub fn take_closed(&self, unix_secs: i64) -> Vec<UsageSummary> {
        self.take(Some(unix_secs.div_euclid(60)))
    }

    /// Remove and return every record, the open minute's too (on SIGTERM).
    pub fn take_all(&self) -> Vec<UsageSummary> {
        self.take(None)
    }

    /// Records waiting in memory.
    pub fn open_records(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Answers counted in the records waiting in memory.
    pub fn open_requests(&self) -> u64 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.values().map(|t| t.requests).sum()
    }

    fn take(&self, before: Option<i64>) -> Vec<UsageSummary> {
        let taken: Vec<(Key, Totals)> = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            match before {
                None => open.drain().collect(),
                Some(current) => {
                    let closed: Vec<Key> = open
                        .keys()
                        .filter(|k| k.minute < current)
                        .cloned()
                        .collect();
                    closed
                        .into_iter()
                        .filter_map(|k| open.remove_entry(&k))
                        .collect()
                }
            }
        };
        let mut out: Vec<UsageSummary> = taken
            .into_iter()
            .map(|(key, t)| {
                let n = self.made.fetch_add(1, Ordering::Relaxed);
                let minute = time::OffsetDateTime::from_unix_timestamp(key.minute * 60)
                    .ok()
                    .and_then(|m| {
                        m.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                let day = minute.get(..10).unwrap_or_default().to_string();
                UsageSummary {
                    id: format!("{}.{}.{}.{n}", self.instance, self.run, key.minute),
                    minute,
                    day,
                    caller: key.caller,
                    user: key.user,
                    deployment: key.deployment,
                    instance: self.instance.clone(),
                    run: self.run.clone(),
                    requests: t.requests,
                    prompt_tokens: t.prompt,
                    cached_tokens: t.cached,
                    completion_tokens: t.completion,
                    reasoning_tokens: t.reasoning,
                    total_tokens: t.total,
                    requests_without_usage: t.without_usage,
                    estimated_tokens: t.estimated,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How long after a minute's end its records are taken: answers that ended in the minute's last
/// moments have had their requests' end run by then.
const CLOSE_DELAY: Duration = Duration::from_secs(2);

/// Every minute (shortly after it ends), hand the closed minutes' records to `log`. Runs until
/// aborted; [`flush_all`] takes the rest on shutdown.
pub fn spawn_flusher(
    summaries: Arc<Summaries>,
    log: Arc<Durable<UsageSummary>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let into_minute = Duration::from_millis((now.as_millis() % 60_000) as u64);
            let wait = Duration::from_secs(60) - into_minute + CLOSE_DELAY;
            tokio::time::sleep(wait).await;
            let records = summaries.take_closed(unix_now());
            if records.is_empty() {
                continue;
            }
            let n = records.len();
            let lost = log.append_all(records).await;
            tracing::debug!(
                target: "usage",
                records = n,
                lost,
                "usage summaries of the closed minute journaled"
            );
        }
    })
}

/// Hand every record still in memory (the open minute too) to `log`; on SIGTERM, after the
/// server stopped. Returns how many records were handed.
pub async fn flush_all(summaries: &Summaries, log: &Durable<UsageSummary>) -> usize {
    let records = summaries.take_all();
    let n = records.len();
    if n > 0 {
        log.append_all(records).await;
    }
    n
}

/// The usage summaries of this process and their durable log (Cosmos DB configured).
pub struct UsageLog {
    summaries: Arc<Summaries>,
    log: Arc<Durable<UsageSummary>>,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl UsageLog {
    /// Start handing closed minutes to `log` ([`spawn_flusher`]). Call inside a Tokio runtime.
    pub fn start(summaries: Summaries, log: Durable<UsageSummary>) -> Self {
        let (summaries, log) = (Arc::new(summaries), Arc::new(log));
        let flusher = spawn_flusher(summaries.clone(), log.clone());
        UsageLog {
            summaries,
            log,
            flusher: Mutex::new(Some(flusher)),
        }
    }

    pub fn summaries(&self) -> &Summaries {
        &self.summaries
    }

    /// The summaries, for a request to add its answer to when it ends.
    pub fn shared(&self) -> Arc<Summaries> {
        self.summaries.clone()
    }

    /// The durable log (journal and shipper) of the summaries.
    pub fn log(&self) -> &Durable<UsageSummary> {
        &self.log
    }

    /// Hand everything in memory (the open minute too) to the journal now, and wait up to
    /// `deadline` for it to be shipped. For tests and [`UsageLog::shutdown`].
    pub async fn flush(&self, deadline: Duration) -> FlushReport {
        flush_all(&self.summaries, &self.log).await;
        self.log.flush(deadline).await
    }

    /// On SIGTERM, after the server stopped: stop the minute task, journal every record in
    /// memory (the open minute's too), give the shipper up to `deadline`, stop it.
    pub async fn shutdown(&self, deadline: Duration) -> FlushReport {
        if let Some(t) = self
            .flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
        let records = flush_all(&self.summaries, &self.log).await;
        tracing::info!(target: "usage", records, "usage summaries of the open minute journaled");
        self.log.shutdown(deadline).await
    }
}

impl Drop for UsageLog {
    fn drop(&mut self) {
        if let Some(t) = self
            .flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(p: u64, c: u64, cached: Option<u64>) -> Measured {
        Measured::Usage(Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            cached_tokens: cached,
            reasoning_tokens: None,
        })
    }

    #[test]
    fn one_record_per_caller_user_deployment_minute() {
        let s = Summaries::new("i1");
        let t0: i64 = 1_800_000_000 / 60 * 60;
        s.add("a", Some("alice"), Some("gpt-4o"), u(10, 5, Some(4)), t0);
        s.add("a", Some("alice"), Some("gpt-4o"), u(1, 1, None), t0 + 59);
        s.add("a", None, Some("gpt-4o"), u(2, 0, None), t0 + 1);
        s.add(
            "a",
            Some("alice"),
            Some("gpt-4o"),
            Measured::Estimate(40),
            t0 + 2,
        );
        s.add(
            "a",
            Some("alice"),
            Some("gpt-4o"),
            Measured::Unknown,
            t0 + 3,
        );
        s.add("a", Some("alice"), Some("gpt-4o"), u(7, 0, None), t0 + 60);
        // the minute still open is kept
        assert!(s.take_closed(t0 + 59).is_empty());
        let closed = s.take_closed(t0 + 60);
        assert_eq!(closed.len(), 2);
        let alice = closed.iter().find(|r| r.user == "alice").unwrap();
        assert_eq!(
            (
                alice.requests,
                alice.prompt_tokens,
                alice.cached_tokens,
                alice.completion_tokens,
                alice.total_tokens,
                alice.requests_without_usage,
                alice.estimated_tokens,
            ),
            (4, 11, 4, 6, 17, 2, 40)
        );
        assert_eq!(alice.instance, "i1");
        assert_eq!(alice.run, s.run());
        assert!(alice.minute.ends_with(":00Z"), "{}", alice.minute);
        assert!(alice.minute.starts_with(&alice.day) && alice.day.len() == 10);
        assert!(closed
            .iter()
            .any(|r| r.user == NO_USER && r.total_tokens == 2));
        // taken once; the next minute follows
        assert!(s.take_closed(t0 + 60).is_empty());
        let next = s.take_all();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].prompt_tokens, 7);
        assert_ne!(next[0].id, alice.id);
    }

    #[test]
    fn ids_never_repeat_across_runs_late_answers_or_odd_names() {
        let t0: i64 = 1_800_000_000 / 60 * 60;
        let first = Summaries::new("pd0/inst?#\\x");
        let second = Summaries::new("pd0/inst?#\\x");
        assert_ne!(first.run(), second.run());
        let mut ids = std::collections::HashSet::new();
        for s in [&first, &second] {
            s.add("a", Some("a/b?c#d\\e"), Some("d"), u(1, 1, None), t0);
            let taken = s.take_closed(t0 + 60);
            // an answer that ends after its minute was taken makes a second record
            s.add("a", Some("a/b?c#d\\e"), Some("d"), u(1, 1, None), t0 + 30);
            for r in taken.into_iter().chain(s.take_all()) {
                assert!(
                    !r.id.contains(['/', '\\', '?', '#']) && r.id.len() <= 255,
                    "{}",
                    r.id
                );
                assert_eq!(r.user, "a/b?c#d\\e", "the fields keep the real names");
                assert!(ids.insert(r.id.clone()), "{} twice", r.id);
            }
        }
        assert_eq!(ids.len(), 4);
    }

    #[test]
    fn the_serialised_id_comes_first() {
        let s = Summaries::new("i");
        s.add("a", None, None, Measured::Unknown, 0);
        let text = serde_json::to_string(&s.take_all()[0]).unwrap();
        assert!(text.starts_with(r#"{"id":""#), "{text}");
    }

    #[test]
    fn invented_users_cannot_grow_one_minute_without_bound() {
        let s = Summaries::new("i");
        for i in 0..MAX_KEYS_PER_MINUTE + 10 {
            s.add("a", Some(&format!("u{i}")), None, u(1, 0, None), 0);
        }
        assert_eq!(s.open_records(), MAX_KEYS_PER_MINUTE + 1);
        let all = s.take_all();
        let overflow = all.iter().find(|r| r.user == OVERFLOW_USER).unwrap();
        assert_eq!(overflow.requests, 10);
        assert_eq!(
            all.iter().map(|r| r.prompt_tokens).sum::<u64>(),
            (MAX_KEYS_PER_MINUTE + 10) as u64
        );
    }
}
