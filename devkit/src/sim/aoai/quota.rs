//! Per-deployment requests-per-minute and tokens-per-minute limits: token buckets holding one
//! minute of quota, refilled continuously; over a limit → AOAI's 429.
//!
//! Headers as AOAI sends them: a 429 carries `retry-after` (whole seconds, rounded up) and
//! `retry-after-ms`; every answer, 429 included, carries `x-ratelimit-remaining-requests` and
//! `x-ratelimit-remaining-tokens`. On a 429 these say what is really left: the limit that was hit
//! reads (near) zero, the other keeps its level (a token-throttled 429 may still show requests
//! remaining), so a client steering on them sees which limit bit.

use super::*;

// ---------------------------------------------------------------------------------------------
// Quota.

/// A token bucket holding at most one minute of quota, refilled continuously.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    capacity: f64,
    level: f64,
}

impl Bucket {
    fn new(per_minute: u64) -> Self {
        Bucket {
            capacity: per_minute as f64,
            level: per_minute as f64,
        }
    }
    fn refill(&mut self, elapsed: Duration) {
        self.level = (self.level + elapsed.as_secs_f64() * self.capacity / 60.0).min(self.capacity);
    }
    /// Time until `amount` is available (zero when it is).
    fn wait_for(&self, amount: f64) -> Duration {
        if self.level >= amount {
            return Duration::ZERO;
        }
        let amount = amount.min(self.capacity);
        Duration::from_secs_f64((amount - self.level) * 60.0 / self.capacity.max(1.0))
    }
}

#[derive(Debug)]
pub(super) struct Quota {
    pub(super) requests: Option<Bucket>,
    pub(super) tokens: Option<Bucket>,
    last: Instant,
}

/// What remains after a request was charged.
#[derive(Debug, Clone, Copy)]
pub(super) struct Remaining {
    pub(super) requests: u64,
    pub(super) tokens: u64,
}

/// A refused charge: how long until it would pass, and what is left meanwhile.
#[derive(Debug, Clone, Copy)]
pub(super) struct Throttled {
    pub(super) wait: Duration,
    pub(super) remaining: Remaining,
}

/// Charge one request and `tokens`; `Err` when the deployment is over a limit (nothing charged).
pub(super) fn charge(
    sim: &AoaiSim,
    deployment: &str,
    tokens: usize,
) -> Result<Remaining, Throttled> {
    let mut limits = sim.limits.lock().unwrap_or_else(|e| e.into_inner());
    let quota = limits
        .entry(deployment.to_string())
        .or_insert_with(|| Quota {
            requests: (sim.config.rpm > 0).then(|| Bucket::new(sim.config.rpm)),
            tokens: (sim.config.tpm > 0).then(|| Bucket::new(sim.config.tpm)),
            last: Instant::now(),
        });
    let now = Instant::now();
    let elapsed = now.duration_since(quota.last);
    quota.last = now;
    for b in [&mut quota.requests, &mut quota.tokens]
        .into_iter()
        .flatten()
    {
        b.refill(elapsed);
    }
    let tokens = tokens as f64;
    let wait = [
        quota.requests.as_ref().map(|b| b.wait_for(1.0)),
        quota
            .tokens
            .as_ref()
            .map(|b| b.wait_for(tokens.min(b.capacity))),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(Duration::ZERO);
    if !wait.is_zero() {
        return Err(Throttled {
            wait,
            remaining: remaining(quota),
        });
    }
    if let Some(b) = quota.requests.as_mut() {
        b.level -= 1.0;
    }
    if let Some(b) = quota.tokens.as_mut() {
        b.level = (b.level - tokens).max(0.0);
    }
    Ok(remaining(quota))
}

/// What the buckets hold now, in whole units (an unlimited one reads as a large number).
fn remaining(quota: &Quota) -> Remaining {
    let level = |b: &Option<Bucket>| b.as_ref().map_or(u64::MAX >> 12, |b| b.level as u64);
    Remaining {
        requests: level(&quota.requests),
        tokens: level(&quota.tokens),
    }
}

/// AOAI's 429; `remaining` `None` (a forced 429 by `x-sim-ratelimit`) reads as nothing left.
pub(super) fn too_many_requests(
    sim: &AoaiSim,
    op: Op,
    api_version: &str,
    wait: Duration,
    remaining: Option<Remaining>,
) -> Response {
    let ms = wait.as_millis().max(1) as u64;
    let secs = ms.div_ceil(1000).max(1);
    let mut response = aoai_error(
        429,
        "429",
        &format!(
            "Requests to the {} Operation under Azure OpenAI API version {api_version} have \
             exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry \
             after {secs} second{}. Please go here: https://aka.ms/oai/quotaincrease if you \
             would like to further increase the default rate limit.",
            op.operation_name(),
            if secs == 1 { "" } else { "s" }
        ),
    );
    let h = response.headers_mut();
    h.insert("retry-after", HeaderValue::from(secs));
    h.insert("retry-after-ms", HeaderValue::from(ms));
    let left = remaining.unwrap_or(Remaining {
        requests: 0,
        tokens: 0,
    });
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from(left.requests),
    );
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from(left.tokens),
    );
    if let Ok(v) = HeaderValue::from_str(&sim.config.name) {
        h.insert("x-sim-resource", v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_and_say_how_long_to_wait() {
        let mut b = Bucket::new(60); // one per second
        b.level = 0.0;
        assert_eq!(b.wait_for(1.0), Duration::from_secs(1));
        b.refill(Duration::from_millis(500));
        assert!((b.level - 0.5).abs() < 1e-9);
        b.refill(Duration::from_secs(3600));
        assert_eq!(b.level, 60.0);
        // A request bigger than the whole bucket waits for a full bucket, not forever.
        b.level = 0.0;
        assert_eq!(b.wait_for(1e9), Duration::from_secs(60));
    }
}
