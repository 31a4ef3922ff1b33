//! Usage summaries: one record per caller × user × deployment × minute, aggregated in memory.
//!
//! Not wired into the request path yet: the records are meant for a Cosmos DB `usage` container
//! through the abuse log's durable writer, which is being rebuilt (write-ahead journal). Once it
//! takes records of other kinds, the meter adds each answer's usage here ([`Summaries::add`])
//! and a task hands the records of every closed minute ([`Summaries::take_closed`]) to it.
//! Until then nothing calls `add`, so nothing accumulates.
//!
//! The record's `id` names the instance, so instances never overwrite each other's record and a
//! replayed upsert is idempotent; totals across instances are a sum over `minute`.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use super::Usage;

/// One Cosmos DB item of the `usage` container (partition key `/caller`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageSummary {
    pub id: String,
    /// The minute's start, RFC 3339 UTC.
    pub minute: String,
    pub caller: String,
    pub user: String,
    pub deployment: String,
    pub instance: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    pub total_tokens: u64,
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
}

/// The open minutes of one instance.
#[derive(Debug)]
pub struct Summaries {
    instance: String,
    open: Mutex<HashMap<Key, Totals>>,
}

/// The user of a request without one.
pub const NO_USER: &str = "-";

impl Summaries {
    /// `instance` names this handler instance (App Service's `WEBSITE_INSTANCE_ID`).
    pub fn new(instance: impl Into<String>) -> Self {
        Summaries {
            instance: instance.into(),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Add one answer's usage at `unix_secs`.
    pub fn add(
        &self,
        caller: &str,
        user: Option<&str>,
        deployment: Option<&str>,
        usage: &Usage,
        unix_secs: i64,
    ) {
        let key = Key {
            minute: unix_secs.div_euclid(60),
            caller: caller.to_string(),
            user: user.unwrap_or(NO_USER).to_string(),
            deployment: deployment.unwrap_or("").to_string(),
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let t = open.entry(key).or_default();
        t.requests += 1;
        t.prompt += usage.prompt_tokens;
        t.cached += usage.cached_tokens.unwrap_or(0);
        t.completion += usage.completion_tokens;
        t.reasoning += usage.reasoning_tokens.unwrap_or(0);
        t.total += usage.total_tokens;
    }

    /// Remove and return the records of every minute that ended at or before `unix_secs`
    /// (the current minute stays open). On shutdown, pass a time past the last minute.
    pub fn take_closed(&self, unix_secs: i64) -> Vec<UsageSummary> {
        let current = unix_secs.div_euclid(60);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let closed: Vec<Key> = open
            .keys()
            .filter(|k| k.minute < current)
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(closed.len());
        for key in closed {
            let t = open.remove(&key).unwrap_or_default();
            let minute = time::OffsetDateTime::from_unix_timestamp(key.minute * 60)
                .ok()
                .and_then(|m| {
                    m.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            out.push(UsageSummary {
                id: format!(
                    "{}|{}|{}|{}|{}",
                    self.instance, key.caller, key.user, key.deployment, key.minute
                ),
                minute,
                caller: key.caller,
                user: key.user,
                deployment: key.deployment,
                instance: self.instance.clone(),
                requests: t.requests,
                prompt_tokens: t.prompt,
                cached_tokens: t.cached,
                completion_tokens: t.completion,
                reasoning_tokens: t.reasoning,
                total_tokens: t.total,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(p: u64, c: u64, cached: Option<u64>) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            cached_tokens: cached,
            reasoning_tokens: None,
        }
    }

    #[test]
    fn one_record_per_caller_user_deployment_minute() {
        let s = Summaries::new("i1");
        let t0: i64 = 1_800_000_000 / 60 * 60;
        s.add("a", Some("alice"), Some("gpt-4o"), &u(10, 5, Some(4)), t0);
        s.add("a", Some("alice"), Some("gpt-4o"), &u(1, 1, None), t0 + 59);
        s.add("a", None, Some("gpt-4o"), &u(2, 0, None), t0 + 1);
        s.add("a", Some("alice"), Some("gpt-4o"), &u(7, 0, None), t0 + 60);
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
                alice.total_tokens
            ),
            (2, 11, 4, 6, 17)
        );
        assert_eq!(alice.instance, "i1");
        assert!(alice.minute.ends_with(":00Z"), "{}", alice.minute);
        assert!(closed
            .iter()
            .any(|r| r.user == NO_USER && r.total_tokens == 2));
        // taken once; the next minute follows
        assert!(s.take_closed(t0 + 60).is_empty());
        let next = s.take_closed(t0 + 120);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].prompt_tokens, 7);
        assert_ne!(next[0].id, alice.id);
    }
}
