//! Per-upstream state: what each AOAI resource last told us about its capacity, and the rule
//! that picks the next one to try.
//!
//! One [`Health`] per upstream, each behind one short mutex (a few field reads and writes under
//! it, never held across an await): requests read and update it at every pick and every answer,
//! and a lock-free design would need several atomics kept consistent with each other for no
//! measurable gain at AOAI's request rates.
//!
//! AOAI's rate limits are per deployment (each has its own tokens- and requests-per-minute), so
//! cool-downs, remaining readings and 5xx fences are kept per deployment name of each resource
//! (the route's deployment, or the body's `model` on v1 routes; `""` when neither is known): a
//! throttled `gpt-4o` does not send `text-embedding-3-large` elsewhere, and a deployment that
//! answers 500 (or an input AOAI fails on) does not fence the others. The circuit is the
//! resource's own: only a failed connection says the resource is in trouble.
//!
//! Every deployment that answered is tracked, with or without `x-ratelimit-remaining-*`
//! readings (provisioned deployments send none): a resource is out of capacity only when its
//! circuit is open or every deployment it has seen is cooling down. What is unknown is never
//! down.
//!
//! # States
//! - **cooling down** until an instant: AOAI answered 429; the wait is its `retry-after-ms`, else
//!   `retry-after` (seconds), else [`Tuning::default_cool_down`], at most
//!   [`Tuning::max_cool_down`]. A later 429 can only lengthen it.
//! - **fenced** until an instant: a 500/502/503/504 for this deployment, for
//!   [`Tuning::circuit_open`] (reported as [`Availability::Open`]); any other answer for the
//!   deployment lifts it.
//! - **circuit open** until an instant: a failed exchange (connection refused, reset, TLS) opened
//!   it for [`Tuning::circuit_open`]. Once that passed it is *half-open*: the next request that
//!   picks it is the one probe ([`Availability::Probe`]); others skip it until the probe's answer
//!   closes the circuit (any answer, a 429 or a 5xx included: the resource is reachable) or a
//!   failure opens it again.
//! - **low**: its last answer, less than [`Tuning::steer`] ago, said `x-ratelimit-remaining-
//!   requests: 0` or `x-ratelimit-remaining-tokens` below what this request needs. Such an
//!   upstream is tried only after every ready one (it is not refused: the numbers are estimates).
//! - **ready**: none of these.
//!
//! The pick is ordered, never round robin: the first ready (or probe-able) upstream in
//! configuration order, then the first low one; each upstream at most once per request. When
//! none is usable and not every one is cooling down, [`fallback`] names the one whose circuit or
//! fence opened earliest: open circuits alone never refuse a request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};

/// The pool's timing knobs (settings `SPILLOVER_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Cool-down after a 429 that carries neither `retry-after-ms` nor `retry-after`.
    pub default_cool_down: Duration,
    /// The longest cool-down honoured; a longer `retry-after` is cut to it (the next 429 puts
    /// the upstream back at once, so nothing is lost but one attempt).
    pub max_cool_down: Duration,
    /// How long a 5xx or a failed exchange keeps the circuit open before one probe.
    pub circuit_open: Duration,
    /// How long a low `x-ratelimit-remaining-*` reading steers requests away.
    pub steer: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            default_cool_down: Duration::from_millis(1000),
            max_cool_down: Duration::from_secs(60),
            circuit_open: Duration::from_millis(5000),
            steer: Duration::from_millis(1000),
        }
    }
}

/// What one exchange with an upstream came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 429, with the wait it asked for (already parsed, see [`retry_wait`]).
    Throttled(Option<Duration>),
    /// 500, 502, 503 or 504.
    ServerError,
    /// No answer: connection refused or reset, TLS failure, the upstream closed early.
    Failed,
    /// Any other answer: the resource is alive and took the request.
    Answered,
}

impl Outcome {
    /// Classify an answer's status and headers.
    pub fn of(status: StatusCode, headers: &HeaderMap) -> Self {
        match status.as_u16() {
            429 => Outcome::Throttled(retry_wait(headers)),
            500 | 502 | 503 | 504 => Outcome::ServerError,
            _ => Outcome::Answered,
        }
    }

    /// Whether the request may go on to the next upstream.
    pub fn retryable(self) -> bool {
        !matches!(self, Outcome::Answered)
    }
}

/// The wait a 429 asks for: `retry-after-ms` (milliseconds), else `retry-after` (whole seconds;
/// an HTTP date is not something AOAI sends and counts as absent).
pub fn retry_wait(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.min(1e9) / 1000.0));
    }
    number("retry-after").map(|s| Duration::from_secs_f64(s.min(1e6)))
}

/// `x-ratelimit-remaining-requests` and `-tokens` of an answer; `-1`, garbage or absent is
/// unknown.
pub fn remaining(headers: &HeaderMap) -> Remaining {
    const REQUESTS: http::HeaderName =
        http::HeaderName::from_static("x-ratelimit-remaining-requests");
    const TOKENS: http::HeaderName = http::HeaderName::from_static("x-ratelimit-remaining-tokens");
    let read = |name: http::HeaderName| -> Option<u64> {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<i64>()
            .ok()?
            .try_into()
            .ok()
    };
    Remaining {
        requests: read(REQUESTS),
        tokens: read(TOKENS),
    }
}

/// What an upstream said it has left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

impl Remaining {
    fn known(&self) -> bool {
        self.requests.is_some() || self.tokens.is_some()
    }
}

/// Whether an upstream may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Ready,
    /// Half-open: this request would be the one probe.
    Probe,
    /// Its last reading says it is (nearly) out of quota for this request.
    Low,
    /// 429: not before this instant.
    Cooling(Instant),
    /// 5xx or failed: not before this instant.
    Open(Instant),
    /// Half-open with its probe in flight.
    Probing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed,
    /// Open until the instant; half-open after it.
    Open(Instant),
    /// Half-open, one probe in flight.
    Probing,
}

/// At most this many deployments are tracked per resource; past it, entries that say nothing
/// any more (cool-down over, reading stale) are dropped first, and a new one is not tracked when
/// none can be (names come from clients: a flood of made-up names must not grow memory).
const MAX_TRACKED: usize = 256;

/// What one deployment of a resource said about its quota.
#[derive(Debug, Default, Clone, Copy)]
struct Quota {
    cool_until: Option<Instant>,
    /// A 500/502/503/504 for this deployment: not before this instant (a deployment that
    /// fails does not say the resource's other deployments do).
    open_until: Option<Instant>,
    remaining: Remaining,
    /// When `remaining` was read.
    seen_at: Option<Instant>,
}

impl Quota {
    fn cooling(&self, now: Instant) -> Option<Instant> {
        self.cool_until.filter(|u| *u > now)
    }

    fn open(&self, now: Instant) -> Option<Instant> {
        self.open_until.filter(|u| *u > now)
    }

    /// Still says something at `now`: cooling down or failing, or a reading younger than
    /// `steer`.
    fn live(&self, now: Instant, steer: Duration) -> bool {
        self.cooling(now).is_some()
            || self.open(now).is_some()
            || self
                .seen_at
                .is_some_and(|at| now.saturating_duration_since(at) < steer)
    }
}

#[derive(Debug)]
struct State {
    circuit: Circuit,
    /// Per deployment name.
    quotas: HashMap<Box<str>, Quota>,
}

impl State {
    /// The deployment's entry, made when there is room (see [`MAX_TRACKED`]).
    fn quota_mut(&mut self, key: &str, now: Instant, tuning: &Tuning) -> Option<&mut Quota> {
        if !self.quotas.contains_key(key) {
            if self.quotas.len() >= MAX_TRACKED {
                self.quotas.retain(|_, q| q.live(now, tuning.steer));
            }
            if self.quotas.len() >= MAX_TRACKED {
                return None;
            }
            self.quotas.insert(key.into(), Quota::default());
        }
        self.quotas.get_mut(key)
    }

    /// With deployments tracked and every one of them cooling down: the soonest end.
    fn all_cooling(&self, now: Instant) -> Option<Instant> {
        let mut soonest: Option<Instant> = None;
        for q in self.quotas.values() {
            let until = q.cooling(now)?;
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
        }
        soonest
    }
}

/// Counters of one upstream (monotonic, relaxed: read for reports, never for decisions).
#[derive(Debug, Default)]
pub struct Counters {
    /// Exchanges started (every attempt counts).
    pub requests: AtomicU64,
    /// 429 answers.
    pub throttled: AtomicU64,
    /// 500/502/503/504 answers.
    pub server_errors: AtomicU64,
    /// Exchanges that got no answer (connection refused or reset, TLS).
    pub connect_failures: AtomicU64,
    /// Times a 429 started a cool-down of a deployment (a 429 during one only lengthens it).
    pub cool_downs: AtomicU64,
    /// Times the circuit opened (from closed or after a failed probe).
    pub circuit_opens: AtomicU64,
    /// Times a request passed this upstream over because its remaining quota was low.
    pub steered_away: AtomicU64,
}

/// A copy of one upstream's counters and state, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStats {
    /// The host (and port) of the upstream; never a key.
    pub name: String,
    pub requests: u64,
    pub throttled: u64,
    pub server_errors: u64,
    pub connect_failures: u64,
    pub cool_downs: u64,
    pub circuit_opens: u64,
    pub steered_away: u64,
    /// Right now: `open` or `probing` (the circuit), `cooling` (every deployment it tracks is
    /// cooling down), else `ready`.
    pub state: &'static str,
}

/// One upstream's state and counters.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    pub counters: Counters,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(State {
                circuit: Circuit::Closed,
                quotas: HashMap::new(),
            }),
            counters: Counters::default(),
        }
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this upstream may take a request for deployment `key` needing `need` tokens at
    /// `now` (no change).
    pub fn availability(
        &self,
        now: Instant,
        key: &str,
        need: u64,
        tuning: &Tuning,
    ) -> Availability {
        availability(&self.lock(), now, key, need, tuning)
    }

    /// As [`Health::availability`], but a half-open upstream is claimed for this request's probe
    /// (then [`Availability::Probe`] is returned once, and [`Availability::Probing`] to everyone
    /// else until [`Health::record`] or [`Health::release_probe`]).
    fn claim(&self, now: Instant, key: &str, need: u64, tuning: &Tuning) -> Availability {
        let mut s = self.lock();
        let a = availability(&s, now, key, need, tuning);
        if a == Availability::Probe {
            s.circuit = Circuit::Probing;
        }
        a
    }

    /// Take in the outcome of an exchange for deployment `key` that ended at `now`; `remaining`
    /// is what its answer said (nothing for [`Outcome::Failed`]).
    pub fn record(
        &self,
        outcome: Outcome,
        key: &str,
        remaining: Remaining,
        now: Instant,
        tuning: &Tuning,
    ) {
        let c = &self.counters;
        let mut s = self.lock();
        // Every deployment that answered is tracked (when there is room), readings or not: the
        // health route calls a resource out of capacity only when every deployment it has seen
        // is cooling down, and a deployment that answered without `x-ratelimit-remaining-*`
        // (provisioned ones send none) is one it has seen.
        if outcome != Outcome::Failed {
            if let Some(q) = s.quota_mut(key, now, tuning) {
                if remaining.known() {
                    q.remaining = remaining;
                    q.seen_at = Some(now);
                }
                if outcome == Outcome::Answered {
                    q.open_until = None;
                }
            }
        }
        match outcome {
            Outcome::Throttled(wait) => {
                c.throttled.fetch_add(1, Ordering::Relaxed);
                // a wait under a millisecond (`retry-after: 0`) is no wait: take the default,
                // or every request would hit the throttled deployment again at once
                let wait = wait
                    .filter(|w| *w >= Duration::from_millis(1))
                    .unwrap_or(tuning.default_cool_down)
                    .min(tuning.max_cool_down);
                let until = now + wait;
                if let Some(q) = s.quota_mut(key, now, tuning) {
                    let running = q.cooling(now);
                    if running.is_none() {
                        c.cool_downs.fetch_add(1, Ordering::Relaxed);
                    }
                    q.cool_until = Some(running.map_or(until, |u| u.max(until)));
                }
                // it answered: the resource is up
                s.circuit = Circuit::Closed;
            }
            Outcome::ServerError => {
                // the deployment's own: a 500 for one deployment (a bad deployment, or an input
                // AOAI fails on) must not fence the resource's others
                c.server_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(q) = s.quota_mut(key, now, tuning) {
                    if q.open(now).is_none() {
                        c.circuit_opens.fetch_add(1, Ordering::Relaxed);
                    }
                    q.open_until = Some(now + tuning.circuit_open);
                }
                // it answered: the resource is reachable
                if s.circuit == Circuit::Probing
                    || matches!(s.circuit, Circuit::Open(u) if u <= now)
                {
                    s.circuit = Circuit::Closed;
                }
            }
            Outcome::Failed => {
                c.connect_failures.fetch_add(1, Ordering::Relaxed);
                let was_open = matches!(s.circuit, Circuit::Open(u) if u > now);
                if !was_open {
                    c.circuit_opens.fetch_add(1, Ordering::Relaxed);
                }
                s.circuit = Circuit::Open(now + tuning.circuit_open);
            }
            Outcome::Answered => s.circuit = Circuit::Closed,
        }
    }

    /// A probe that ended without an outcome (the request was dropped): half-open again, so the
    /// next request probes.
    pub fn release_probe(&self, now: Instant) {
        let mut s = self.lock();
        if s.circuit == Circuit::Probing {
            s.circuit = Circuit::Open(now);
        }
    }

    /// The instant deployment `key` of this upstream is cooling down until, if it is at `now`.
    pub fn cooling_until(&self, key: &str, now: Instant) -> Option<Instant> {
        self.lock().quotas.get(key).and_then(|q| q.cooling(now))
    }

    /// The instant it may take requests for deployment `key` again, when it may not now
    /// (cooling down or circuit open; a probe in flight counts as about a second).
    pub fn blocked_until(&self, key: &str, now: Instant, tuning: &Tuning) -> Option<Instant> {
        blocked(availability(&self.lock(), now, key, 0, tuning), now)
    }

    /// As [`Health::blocked_until`] for the resource as a whole: circuit open, or every
    /// deployment it tracks cooling down (what the health route reports).
    pub fn resource_blocked_until(&self, now: Instant) -> Option<Instant> {
        let s = self.lock();
        circuit_availability(&s, now)
            .and_then(|a| blocked(a, now))
            .or_else(|| s.all_cooling(now))
    }

    pub fn stats(&self, name: &str, now: Instant) -> UpstreamStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        let state = {
            let s = self.lock();
            match circuit_availability(&s, now) {
                Some(Availability::Open(_)) => "open",
                Some(Availability::Probing) => "probing",
                _ if s.all_cooling(now).is_some() => "cooling",
                _ => "ready",
            }
        };
        UpstreamStats {
            name: name.to_string(),
            requests: g(&c.requests),
            throttled: g(&c.throttled),
            server_errors: g(&c.server_errors),
            connect_failures: g(&c.connect_failures),
            cool_downs: g(&c.cool_downs),
            circuit_opens: g(&c.circuit_opens),
            steered_away: g(&c.steered_away),
            state,
        }
    }
}

fn blocked(a: Availability, now: Instant) -> Option<Instant> {
    match a {
        Availability::Cooling(u) | Availability::Open(u) => Some(u),
        Availability::Probing => Some(now + Duration::from_secs(1)),
        _ => None,
    }
}

/// The circuit's say: `None` when it is closed.
fn circuit_availability(s: &State, now: Instant) -> Option<Availability> {
    match s.circuit {
        Circuit::Open(until) if until > now => Some(Availability::Open(until)),
        Circuit::Open(_) => Some(Availability::Probe),
        Circuit::Probing => Some(Availability::Probing),
        Circuit::Closed => None,
    }
}

fn availability(s: &State, now: Instant, key: &str, need: u64, tuning: &Tuning) -> Availability {
    let quota = s.quotas.get(key).copied().unwrap_or_default();
    if let Some(until) = quota.cooling(now) {
        return Availability::Cooling(until);
    }
    if let Some(a) = circuit_availability(s, now) {
        return a;
    }
    if let Some(until) = quota.open(now) {
        return Availability::Open(until);
    }
    let fresh = quota
        .seen_at
        .is_some_and(|at| now.saturating_duration_since(at) < tuning.steer);
    let low = quota.remaining.requests == Some(0)
        || quota.remaining.tokens.is_some_and(|t| t < need.max(1));
    if fresh && low {
        Availability::Low
    } else {
        Availability::Ready
    }
}

/// The upstream a request tries next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    /// This attempt is the half-open probe: its outcome closes or reopens the circuit, and it
    /// must be released when the request ends without one.
    pub probe: bool,
}

/// Pick the next upstream among `pool` (in order) not yet `tried`, for a request to deployment
/// `key` needing `need` tokens: the first ready or half-open one (claiming its probe), else the
/// first low one; `None` when every untried upstream is cooling down, open or probing. Counts
/// `steered_away` on the low ones passed over.
pub fn pick(
    pool: &[&Health],
    tried: &[bool],
    now: Instant,
    key: &str,
    need: u64,
    tuning: &Tuning,
) -> Option<Pick> {
    let mut low = Vec::new();
    for (index, h) in pool.iter().enumerate() {
        if tried.get(index).copied().unwrap_or(false) {
            continue;
        }
        match h.claim(now, key, need, tuning) {
            Availability::Ready => {
                for &l in &low {
                    let passed: &Health = pool[l];
                    passed.counters.steered_away.fetch_add(1, Ordering::Relaxed);
                }
                return Some(Pick {
                    index,
                    probe: false,
                });
            }
            Availability::Probe => {
                return Some(Pick { index, probe: true });
            }
            Availability::Low => low.push(index),
            _ => {}
        }
    }
    low.first().map(|&index| Pick {
        index,
        probe: false,
    })
}

/// When [`pick`] found nothing and the request has made no attempt: the untried upstream whose
/// circuit (the resource's or the deployment's) reopens soonest, i.e. opened earliest, or whose
/// probe is in flight — tried anyway, as a probe, rather than refusing the client for open
/// circuits alone (a 5xx a moment ago is no proof of one now). `None` when every untried one is
/// cooling down for this deployment (then the client gets the 429 with the shortest wait).
pub fn fallback(
    pool: &[&Health],
    tried: &[bool],
    now: Instant,
    key: &str,
    tuning: &Tuning,
) -> Option<Pick> {
    let mut best: Option<(Instant, usize)> = None;
    for (index, h) in pool.iter().enumerate() {
        if tried.get(index).copied().unwrap_or(false) {
            continue;
        }
        let until = match h.availability(now, key, 0, tuning) {
            Availability::Open(u) => u,
            Availability::Probing => now + tuning.circuit_open,
            Availability::Ready | Availability::Probe | Availability::Low => now,
            Availability::Cooling(_) => continue,
        };
        if best.is_none_or(|(b, _)| until < b) {
            best = Some((until, index));
        }
    }
    best.map(|(_, index)| Pick {
        index,
        probe: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "gpt-4o";

    impl Health {
        fn record_k(&self, o: Outcome, r: Remaining, now: Instant, t: &Tuning) {
            self.record(o, K, r, now, t)
        }
    }

    fn t() -> Tuning {
        Tuning::default()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_wait_prefers_milliseconds_and_ignores_what_is_not_a_number() {
        let w = |p: &[(&'static str, &str)]| retry_wait(&headers(p));
        assert_eq!(
            w(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            Some(ms(250))
        );
        assert_eq!(w(&[("retry-after", "3")]), Some(ms(3000)));
        assert_eq!(
            w(&[("retry-after-ms", "12.5")]),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(w(&[("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")]), None);
        assert_eq!(
            w(&[("retry-after-ms", "-5"), ("retry-after", "2")]),
            Some(ms(2000))
        );
        assert_eq!(w(&[("retry-after-ms", "NaN")]), None);
        assert_eq!(w(&[("retry-after-ms", "inf")]), None);
        assert_eq!(w(&[]), None);
        // huge values do not overflow Duration
        assert!(w(&[("retry-after-ms", "1e300")]).is_some());
        assert!(w(&[("retry-after", "99999999999999999999")]).is_some());
    }

    #[test]
    fn remaining_treats_minus_one_and_garbage_as_unknown() {
        let r = remaining(&headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "1200"),
        ]));
        assert_eq!(
            r,
            Remaining {
                requests: None,
                tokens: Some(1200)
            }
        );
        let r = remaining(&headers(&[("x-ratelimit-remaining-requests", "many")]));
        assert_eq!(r, Remaining::default());
    }

    #[test]
    fn classifies_statuses() {
        let h = HeaderMap::new();
        for s in [500u16, 502, 503, 504] {
            assert_eq!(
                Outcome::of(StatusCode::from_u16(s).unwrap(), &h),
                Outcome::ServerError
            );
        }
        for s in [
            200u16, 201, 204, 301, 400, 401, 403, 404, 408, 413, 501, 505,
        ] {
            let o = Outcome::of(StatusCode::from_u16(s).unwrap(), &h);
            assert_eq!(o, Outcome::Answered, "{s}");
            assert!(!o.retryable());
        }
        assert_eq!(
            Outcome::of(StatusCode::TOO_MANY_REQUESTS, &h),
            Outcome::Throttled(None)
        );
    }

    #[test]
    fn a_429_cools_down_for_its_wait_and_expires() {
        let (h, now) = (Health::default(), Instant::now());
        h.record_k(
            Outcome::Throttled(Some(ms(300))),
            Remaining::default(),
            now,
            &t(),
        );
        assert_eq!(
            h.availability(now, K, 1, &t()),
            Availability::Cooling(now + ms(300))
        );
        assert_eq!(
            h.availability(now + ms(299), K, 1, &t()),
            Availability::Cooling(now + ms(300))
        );
        assert_eq!(
            h.availability(now + ms(300), K, 1, &t()),
            Availability::Ready
        );
        assert_eq!(h.counters.cool_downs.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_429_without_a_wait_takes_the_default_and_a_long_one_is_capped() {
        let (h, now) = (Health::default(), Instant::now());
        let tuning = t();
        h.record_k(Outcome::Throttled(None), Remaining::default(), now, &tuning);
        assert_eq!(
            h.cooling_until(K, now),
            Some(now + tuning.default_cool_down)
        );
        let h = Health::default();
        h.record_k(
            Outcome::Throttled(Some(Duration::from_secs(86_400))),
            Remaining::default(),
            now,
            &tuning,
        );
        assert_eq!(h.cooling_until(K, now), Some(now + tuning.max_cool_down));
    }

    #[test]
    fn a_later_429_only_lengthens_a_cool_down() {
        let (h, now) = (Health::default(), Instant::now());
        h.record_k(
            Outcome::Throttled(Some(ms(1000))),
            Remaining::default(),
            now,
            &t(),
        );
        h.record_k(
            Outcome::Throttled(Some(ms(100))),
            Remaining::default(),
            now + ms(10),
            &t(),
        );
        assert_eq!(h.cooling_until(K, now + ms(10)), Some(now + ms(1000)));
        h.record_k(
            Outcome::Throttled(Some(ms(2000))),
            Remaining::default(),
            now + ms(20),
            &t(),
        );
        assert_eq!(h.cooling_until(K, now + ms(20)), Some(now + ms(2020)));
        assert_eq!(
            h.counters.cool_downs.load(Ordering::Relaxed),
            1,
            "one cool-down, lengthened"
        );
        assert_eq!(h.counters.throttled.load(Ordering::Relaxed), 3);
        // after it ended, a new 429 is a new cool-down
        h.record_k(
            Outcome::Throttled(Some(ms(1))),
            Remaining::default(),
            now + ms(5000),
            &t(),
        );
        assert_eq!(h.counters.cool_downs.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_circuit_opens_then_lets_exactly_one_probe_through() {
        let (h, now) = (Health::default(), Instant::now());
        let tuning = t();
        for failure in [Outcome::ServerError, Outcome::Failed] {
            let h2 = Health::default();
            h2.record_k(failure, Remaining::default(), now, &tuning);
            assert_eq!(
                h2.availability(now, K, 1, &tuning),
                Availability::Open(now + tuning.circuit_open)
            );
        }
        h.record_k(Outcome::Failed, Remaining::default(), now, &tuning);
        let later = now + tuning.circuit_open;
        assert_eq!(h.claim(later, K, 1, &tuning), Availability::Probe);
        assert_eq!(
            h.claim(later, K, 1, &tuning),
            Availability::Probing,
            "one probe at a time"
        );
        assert_eq!(
            h.blocked_until(K, later, &tuning),
            Some(later + Duration::from_secs(1))
        );
        // the probe fails: open again, counted as a second opening
        h.record_k(Outcome::Failed, Remaining::default(), later, &tuning);
        assert_eq!(
            h.availability(later, K, 1, &tuning),
            Availability::Open(later + tuning.circuit_open)
        );
        assert_eq!(h.counters.circuit_opens.load(Ordering::Relaxed), 2);
        // the next probe succeeds (a 429 counts: the resource answered)
        let again = later + tuning.circuit_open;
        assert_eq!(h.claim(again, K, 1, &tuning), Availability::Probe);
        h.record_k(
            Outcome::Throttled(Some(ms(10))),
            Remaining::default(),
            again,
            &tuning,
        );
        assert_eq!(
            h.availability(again + ms(10), K, 1, &tuning),
            Availability::Ready
        );
    }

    #[test]
    fn a_dropped_probe_is_released_for_the_next_request() {
        let (h, now) = (Health::default(), Instant::now());
        h.record_k(Outcome::Failed, Remaining::default(), now, &t());
        let later = now + t().circuit_open;
        assert_eq!(h.claim(later, K, 1, &t()), Availability::Probe);
        h.release_probe(later);
        assert_eq!(h.claim(later, K, 1, &t()), Availability::Probe);
        // releasing after an outcome changes nothing
        h.record_k(Outcome::Answered, Remaining::default(), later, &t());
        h.release_probe(later);
        assert_eq!(h.availability(later, K, 1, &t()), Availability::Ready);
    }

    #[test]
    fn failures_while_open_do_not_count_new_openings() {
        let (h, now) = (Health::default(), Instant::now());
        h.record_k(Outcome::ServerError, Remaining::default(), now, &t());
        h.record_k(
            Outcome::ServerError,
            Remaining::default(),
            now + ms(1),
            &t(),
        );
        assert_eq!(h.counters.circuit_opens.load(Ordering::Relaxed), 1);
        assert_eq!(h.counters.server_errors.load(Ordering::Relaxed), 2);
        assert_eq!(
            h.availability(now + ms(1), K, 1, &t()),
            Availability::Open(now + ms(1) + t().circuit_open)
        );
    }

    #[test]
    fn low_remaining_steers_for_a_while_and_depends_on_the_need() {
        let (h, now) = (Health::default(), Instant::now());
        let tuning = t();
        h.record_k(
            Outcome::Answered,
            Remaining {
                requests: Some(10),
                tokens: Some(500),
            },
            now,
            &tuning,
        );
        assert_eq!(h.availability(now, K, 400, &tuning), Availability::Ready);
        assert_eq!(h.availability(now, K, 501, &tuning), Availability::Low);
        assert_eq!(
            h.availability(now + tuning.steer, K, 501, &tuning),
            Availability::Ready,
            "stale reading"
        );
        h.record_k(
            Outcome::Answered,
            Remaining {
                requests: Some(0),
                tokens: Some(90_000),
            },
            now,
            &tuning,
        );
        assert_eq!(
            h.availability(now, K, 1, &tuning),
            Availability::Low,
            "no requests left"
        );
        h.record_k(
            Outcome::Answered,
            Remaining {
                requests: Some(5),
                tokens: Some(0),
            },
            now,
            &tuning,
        );
        assert_eq!(
            h.availability(now, K, 0, &tuning),
            Availability::Low,
            "no tokens left"
        );
        // an answer without the headers keeps the last reading
        h.record_k(
            Outcome::Answered,
            Remaining::default(),
            now + ms(1),
            &tuning,
        );
        assert_eq!(
            h.availability(now + ms(1), K, 0, &tuning),
            Availability::Low
        );
        h.record_k(
            Outcome::Answered,
            Remaining {
                requests: None,
                tokens: Some(5000),
            },
            now + ms(2),
            &tuning,
        );
        assert_eq!(
            h.availability(now + ms(2), K, 100, &tuning),
            Availability::Ready
        );
    }

    #[test]
    fn picks_in_order_skipping_tried_blocked_and_low() {
        let now = Instant::now();
        let tuning = t();
        let pool: Vec<Health> = (0..4).map(|_| Health::default()).collect();
        let refs: Vec<&Health> = pool.iter().collect();
        let p = |tried: &[bool]| pick(&refs, tried, now, K, 100, &tuning).map(|p| p.index);
        assert_eq!(p(&[false; 4]), Some(0), "primary first when healthy");
        assert_eq!(p(&[true, false, false, false]), Some(1));
        pool[0].record_k(
            Outcome::Throttled(Some(ms(500))),
            Remaining::default(),
            now,
            &tuning,
        );
        pool[1].record_k(Outcome::ServerError, Remaining::default(), now, &tuning);
        pool[2].record_k(
            Outcome::Answered,
            Remaining {
                requests: Some(3),
                tokens: Some(10),
            },
            now,
            &tuning,
        );
        assert_eq!(
            p(&[false; 4]),
            Some(3),
            "the low one is passed over for a ready one"
        );
        assert_eq!(pool[2].counters.steered_away.load(Ordering::Relaxed), 1);
        assert_eq!(
            p(&[false, false, false, true]),
            Some(2),
            "a low one before none at all"
        );
        assert_eq!(p(&[false, false, true, true]), None);
        assert_eq!(p(&[true; 4]), None);
    }

    #[test]
    fn a_half_open_primary_is_probed_before_a_ready_backup() {
        let now = Instant::now();
        let tuning = t();
        let pool: Vec<Health> = (0..2).map(|_| Health::default()).collect();
        let refs: Vec<&Health> = pool.iter().collect();
        pool[0].record_k(Outcome::Failed, Remaining::default(), now, &tuning);
        let later = now + tuning.circuit_open;
        assert_eq!(
            pick(&refs, &[false, false], later, K, 1, &tuning),
            Some(Pick {
                index: 0,
                probe: true
            })
        );
        assert_eq!(
            pick(&refs, &[false, false], later, K, 1, &tuning),
            Some(Pick {
                index: 1,
                probe: false
            })
        );
    }

    #[test]
    fn deployments_cool_down_apart_and_the_circuit_is_shared() {
        let (h, now, tuning) = (Health::default(), Instant::now(), t());
        h.record(
            Outcome::Throttled(Some(ms(500))),
            "gpt-4o",
            Remaining::default(),
            now,
            &tuning,
        );
        assert_eq!(
            h.availability(now, "gpt-4o", 1, &tuning),
            Availability::Cooling(now + ms(500))
        );
        assert_eq!(
            h.availability(now, "embeddings", 1, &tuning),
            Availability::Ready
        );
        assert_eq!(
            h.resource_blocked_until(now),
            Some(now + ms(500)),
            "all it tracks cools"
        );
        h.record(
            Outcome::Answered,
            "embeddings",
            Remaining {
                requests: Some(9),
                tokens: Some(9000),
            },
            now,
            &tuning,
        );
        assert_eq!(
            h.resource_blocked_until(now),
            None,
            "embeddings still has room"
        );
        assert_eq!(h.stats("x", now).state, "ready");
        h.record(
            Outcome::Failed,
            "embeddings",
            Remaining::default(),
            now,
            &tuning,
        );
        assert_eq!(
            h.availability(now, "gpt-4o", 1, &tuning),
            Availability::Cooling(now + ms(500))
        );
        assert_eq!(
            h.availability(now, "other", 1, &tuning),
            Availability::Open(now + tuning.circuit_open)
        );
        assert_eq!(h.stats("x", now).state, "open");
    }

    #[test]
    fn a_5xx_fences_its_deployment_only_and_a_failed_connection_the_resource() {
        let (h, now, tuning) = (Health::default(), Instant::now(), t());
        for s in [500u16, 502, 503, 504] {
            let h = Health::default();
            let o = Outcome::of(StatusCode::from_u16(s).unwrap(), &HeaderMap::new());
            h.record(o, "attacker", Remaining::default(), now, &tuning);
            assert_eq!(
                h.availability(now, "attacker", 1, &tuning),
                Availability::Open(now + tuning.circuit_open),
                "{s}"
            );
            for other in ["victim", "", "gpt-4o"] {
                assert_eq!(
                    h.availability(now, other, 1, &tuning),
                    Availability::Ready,
                    "{s}"
                );
            }
            assert_eq!(h.resource_blocked_until(now), None, "{s}: not the resource");
            assert_eq!(h.stats("x", now).state, "ready");
            // reopens for a probe-free retry once the time passed; an answer clears it at once
            h.record(
                Outcome::Answered,
                "attacker",
                Remaining::default(),
                now,
                &tuning,
            );
            assert_eq!(
                h.availability(now, "attacker", 1, &tuning),
                Availability::Ready
            );
        }
        h.record(
            Outcome::Failed,
            "attacker",
            Remaining::default(),
            now,
            &tuning,
        );
        for any in ["attacker", "victim"] {
            assert_eq!(
                h.availability(now, any, 1, &tuning),
                Availability::Open(now + tuning.circuit_open)
            );
        }
        assert_eq!(
            h.resource_blocked_until(now),
            Some(now + tuning.circuit_open)
        );
    }

    #[test]
    fn a_resource_that_answered_without_readings_is_not_out_of_capacity() {
        let (h, now, tuning) = (Health::default(), Instant::now(), t());
        assert_eq!(h.resource_blocked_until(now), None, "fresh is not down");
        for _ in 0..3 {
            h.record(
                Outcome::Answered,
                "gpt-4o",
                Remaining::default(),
                now,
                &tuning,
            );
        }
        h.record(
            Outcome::Throttled(Some(Duration::from_secs(60))),
            "tiny2",
            Remaining::default(),
            now,
            &tuning,
        );
        assert_eq!(h.resource_blocked_until(now), None, "gpt-4o serves");
        assert_eq!(h.stats("x", now).state, "ready");
        // only when the served one cools down too
        h.record(
            Outcome::Throttled(Some(ms(500))),
            "gpt-4o",
            Remaining::default(),
            now,
            &tuning,
        );
        assert_eq!(h.resource_blocked_until(now), Some(now + ms(500)));
        // a 5xx answer is an answer from a deployment seen: no longer "all cooling"
        h.record(
            Outcome::ServerError,
            "emb",
            Remaining::default(),
            now,
            &tuning,
        );
        assert_eq!(h.resource_blocked_until(now), None);
    }

    #[test]
    fn a_zero_wait_cools_down_for_the_default() {
        let (now, tuning) = (Instant::now(), t());
        for hdr in [
            ("retry-after", "0"),
            ("retry-after-ms", "0"),
            ("retry-after-ms", "0.5"),
            ("retry-after", "0.0000001"),
        ] {
            let h = Health::default();
            let o = Outcome::of(StatusCode::TOO_MANY_REQUESTS, &headers(&[hdr]));
            h.record_k(o, Remaining::default(), now, &tuning);
            assert_eq!(
                h.cooling_until(K, now),
                Some(now + tuning.default_cool_down),
                "{hdr:?}"
            );
        }
        // a real short wait is honoured
        let h = Health::default();
        h.record_k(
            Outcome::Throttled(Some(ms(1))),
            Remaining::default(),
            now,
            &tuning,
        );
        assert_eq!(h.cooling_until(K, now), Some(now + ms(1)));
    }

    #[test]
    fn fallback_tries_the_circuit_that_opened_earliest_never_a_cooling_one() {
        let (now, tuning) = (Instant::now(), t());
        let hs: Vec<Health> = (0..3).map(|_| Health::default()).collect();
        let pool: Vec<&Health> = hs.iter().collect();
        hs[0].record_k(
            Outcome::ServerError,
            Remaining::default(),
            now + ms(20),
            &tuning,
        );
        hs[1].record_k(Outcome::Failed, Remaining::default(), now + ms(10), &tuning);
        hs[2].record_k(
            Outcome::Throttled(Some(ms(100))),
            Remaining::default(),
            now,
            &tuning,
        );
        let at = now + ms(30);
        assert_eq!(pick(&pool, &[false; 3], at, K, 1, &tuning), None);
        assert_eq!(
            fallback(&pool, &[false; 3], at, K, &tuning),
            Some(Pick {
                index: 1,
                probe: false
            })
        );
        assert_eq!(
            fallback(&pool, &[false, true, false], at, K, &tuning),
            Some(Pick {
                index: 0,
                probe: false
            })
        );
        assert_eq!(fallback(&pool, &[true, true, false], at, K, &tuning), None);
        // another deployment is not fenced by the 5xx on K
        assert_eq!(
            pick(&pool, &[false; 3], at, "other", 1, &tuning),
            Some(Pick {
                index: 0,
                probe: false
            })
        );
    }

    #[test]
    fn made_up_deployment_names_cannot_grow_the_state_without_bound() {
        let (h, now, tuning) = (Health::default(), Instant::now(), t());
        for i in 0..1_000 {
            let name = format!("d{i}");
            h.record(
                Outcome::Throttled(Some(ms(60_000))),
                &name,
                Remaining {
                    requests: Some(1),
                    tokens: Some(1),
                },
                now,
                &tuning,
            );
        }
        assert_eq!(h.lock().quotas.len(), MAX_TRACKED);
        assert_eq!(h.counters.throttled.load(Ordering::Relaxed), 1_000);
        // once they say nothing any more, new names are tracked again
        let later = now + Duration::from_secs(120);
        h.record(
            Outcome::Throttled(Some(ms(10))),
            "fresh",
            Remaining::default(),
            later,
            &tuning,
        );
        assert_eq!(h.cooling_until("fresh", later), Some(later + ms(10)));
        assert_eq!(h.lock().quotas.len(), 1);
    }

    /// Every sequence of outcomes and times leaves a state whose answers are consistent: a
    /// blocked upstream is never picked, `blocked_until` is in the future, cool-downs end.
    #[test]
    fn random_sequences_keep_the_invariants() {
        let tuning = Tuning {
            default_cool_down: ms(50),
            max_cool_down: ms(400),
            circuit_open: ms(70),
            steer: ms(30),
        };
        let start = Instant::now();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let pool: Vec<Health> = (0..3).map(|_| Health::default()).collect();
            let refs: Vec<&Health> = pool.iter().collect();
            let mut now = start;
            for _ in 0..60 {
                now += ms(next() % 40);
                let i = (next() % 3) as usize;
                let outcome = match next() % 5 {
                    0 => Outcome::Throttled(Some(ms(next() % 1000))),
                    1 => Outcome::Throttled(None),
                    2 => Outcome::ServerError,
                    3 => Outcome::Failed,
                    _ => Outcome::Answered,
                };
                let rem = Remaining {
                    requests: Some(next() % 3),
                    tokens: Some(next() % 200),
                };
                pool[i].record_k(outcome, rem, now, &tuning);
                if let Some(p) = pick(&refs, &[false; 3], now, K, next() % 300, &tuning) {
                    assert!(pool[p.index].cooling_until(K, now).is_none());
                    if p.probe {
                        if next() % 2 == 0 {
                            pool[p.index].release_probe(now);
                        } else {
                            pool[p.index].record_k(
                                Outcome::Answered,
                                Remaining::default(),
                                now,
                                &tuning,
                            );
                        }
                    }
                } else {
                    for h in &pool {
                        let until = h
                            .blocked_until(K, now, &tuning)
                            .expect("nothing picked: all blocked or low");
                        assert!(until > now);
                        assert!(
                            until
                                <= now
                                    + tuning
                                        .max_cool_down
                                        .max(tuning.circuit_open)
                                        .max(Duration::from_secs(1))
                        );
                    }
                }
            }
            // long after, everything is usable again (no probe left claimed)
            let much_later = now + Duration::from_secs(10);
            for h in &pool {
                assert!(h.blocked_until(K, much_later, &tuning).is_none());
            }
        }
    }
}
