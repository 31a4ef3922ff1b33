//! `fwdproxy-load`: a steady, open-loop load of chat completions against a running local set,
//! and the figures of the spillover benchmark (`bench/spillover.sh`).
//!
//! Open loop: request `k` leaves at `start + k / rate` whatever the earlier ones are doing, as
//! independent clients would send them, so a slow or throttled upstream cannot slow the load
//! down and hide its own cost. Each request carries its own `x-request-id`; the handler logs that
//! id on its one request line, so the client's view (status, latency, which simulated resource
//! answered: the simulator's `x-sim-resource` header passes through) is joined with the
//! handler's (`attempts`, `upstream`, when it logs them) per request.
//!
//! Bounded in time and count: at most `max_requests`, sent within `duration`, each cut at
//! `timeout`; loopback only (the URL comes from the launcher's ready file).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The gateway's base URL (`http://127.0.0.1:port`).
    pub gateway_url: String,
    pub key: String,
    pub user: String,
    pub deployment: String,
    pub api_version: String,
    /// Requests per second.
    pub rate: f64,
    pub duration: Duration,
    pub max_requests: u64,
    pub timeout: Duration,
    /// Completion tokens asked for (the simulator's answers are cut there).
    pub max_tokens: u64,
    /// Prefix of every request id, so two runs never share ids.
    pub id_prefix: String,
}

/// One request as the client saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub id: String,
    /// When it was sent, ms after the start of the load.
    pub sent_ms: f64,
    /// How late it left against its schedule (`k / rate`): a starved machine shows here.
    #[serde(default)]
    pub late_ms: f64,
    /// 0: no HTTP answer (connection failure or timeout; see `error`).
    pub status: u16,
    /// Until the whole body was read.
    pub latency_ms: f64,
    /// `x-sim-resource` of the answer: the simulated resource that answered.
    pub resource: Option<String>,
    pub error: Option<String>,
}

/// What the handler logged about one request (its `target: "request"` line).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logged {
    pub status: Option<u64>,
    pub attempts: Option<u64>,
    pub upstream: Option<String>,
    /// `total_tokens` of the answer's usage.
    pub total_tokens: Option<u64>,
}

/// The request body of request `k`: a short prompt that varies with `k` (so answers vary in
/// length as real ones do) and a completion cap, so each request costs a few dozen tokens.
pub fn body(k: u64, user: &str, max_tokens: u64) -> Value {
    const TOPICS: &[&str] = &[
        "the quarterly report",
        "a support ticket about a late delivery",
        "the meeting notes from Monday",
        "a product description for a kettle",
        "the release notes of version 2.3",
        "an email asking for a refund",
    ];
    json!({
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": format!("Request {k}: summarise {}.", TOPICS[(k % TOPICS.len() as u64) as usize])},
        ],
        "max_tokens": max_tokens,
        "user": user,
    })
}

/// Send the load and return every outcome, in send order.
pub async fn run(cfg: &LoadConfig) -> Result<Vec<Outcome>, String> {
    if !(cfg.rate > 0.0 && cfg.rate <= 1000.0) {
        return Err(format!("rate {} must be in (0, 1000] requests/s", cfg.rate));
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(cfg.timeout)
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!(
        "{}/openai/deployments/{}/chat/completions?api-version={}",
        cfg.gateway_url.trim_end_matches('/'),
        cfg.deployment,
        cfg.api_version
    );
    let url = Arc::new(url);
    let planned = ((cfg.duration.as_secs_f64() * cfg.rate).floor() as u64).min(cfg.max_requests);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(planned as usize);
    for k in 0..planned {
        let at = start + Duration::from_secs_f64(k as f64 / cfg.rate);
        tokio::time::sleep_until(at.into()).await;
        let id = format!("{}-{k:06}", cfg.id_prefix);
        let request = client
            .post(url.as_str())
            .header("api-key", &cfg.key)
            .header("x-request-id", &id)
            .header("content-type", "application/json")
            .body(body(k, &cfg.user, cfg.max_tokens).to_string());
        let sent_ms = start.elapsed().as_secs_f64() * 1000.0;
        let late_ms = (sent_ms - k as f64 * 1000.0 / cfg.rate).max(0.0);
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let (status, resource, error) = match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let resource = r
                        .headers()
                        .get("x-sim-resource")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    match r.bytes().await {
                        Ok(_) => (status, resource, None),
                        Err(e) => (status, resource, Some(format!("body: {e}"))),
                    }
                }
                Err(e) => (0, None, Some(e.to_string())),
            };
            Outcome {
                id,
                sent_ms,
                late_ms,
                status,
                latency_ms: t0.elapsed().as_secs_f64() * 1000.0,
                resource,
                error,
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        // Each request is cut by the client's timeout, so this join is bounded.
        out.push(t.await.map_err(|e| format!("a request task failed: {e}"))?);
    }
    Ok(out)
}

/// Every request line of every `backend-*/handler.log` under `run_dir`, by request id.
pub fn read_handler_logs(run_dir: &Path) -> HashMap<String, Logged> {
    let mut by_id = HashMap::new();
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return by_id;
    };
    for entry in entries.filter_map(Result::ok) {
        let log = entry.path().join("handler.log");
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        for line in text.lines() {
            if let Some((id, logged)) = parse_request_line(line) {
                by_id.insert(id, logged);
            }
        }
    }
    by_id
}

/// A handler log line of `target: "request"` → its request id and what it says. `attempts` and
/// `upstream` are read when present, as a number or a numeric string and as any scalar.
pub fn parse_request_line(line: &str) -> Option<(String, Logged)> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v.get("target")?.as_str()? != "request" {
        return None;
    }
    let id = v.get("request_id")?.as_str()?.to_string();
    let number = |v: &Value| match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    Some((
        id,
        Logged {
            status: v.get("status").and_then(number),
            attempts: v.get("attempts").and_then(number),
            upstream: v.get("upstream").and_then(scalar),
            total_tokens: v.get("total_tokens").and_then(number),
        },
    ))
}

/// p50 / p95 / p99 of a set of latencies (nearest rank).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Percentiles {
            count: v.len() as u64,
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
        })
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub label: String,
    /// When and on what the run happened (free text from the caller).
    #[serde(default)]
    pub note: String,
    pub spillover: bool,
    pub rate: f64,
    pub seconds: f64,
    /// TPM of each simulated resource, in order.
    pub tpm: Vec<u64>,
    /// Requests the load meant to send (rate × duration, capped).
    pub planned: u64,
    pub requests: u64,
    pub ok: u64,
    pub throttled: u64,
    /// Any other status, or no answer at all.
    pub other: u64,
    pub no_answer: u64,
    /// Statuses other than 200 and 429, with counts (0 = no answer).
    pub other_statuses: BTreeMap<u16, u64>,
    pub all: Option<Percentiles>,
    pub answered_200: Option<Percentiles>,
    /// Requests the handler logged with `attempts` = 1 that were answered 200; `None` when the
    /// handler's log lines carry no `attempts` field.
    pub first_attempt_200: Option<Percentiles>,
    /// Requests whose log line says `attempts` > 1.
    pub retried: Option<u64>,
    /// Mean `total_tokens` of the 200s, from the handlers' logs: what one request costs.
    #[serde(default)]
    pub mean_tokens: Option<f64>,
    /// Request lines found in the handlers' logs for this run's requests.
    pub logged: u64,
    /// Of those, lines carrying `attempts`.
    pub logged_attempts: u64,
    /// Per simulated resource that answered (`x-sim-resource`): (200s, 429s).
    pub by_resource: BTreeMap<String, (u64, u64)>,
    /// Per `upstream` the handler logged: requests.
    pub by_upstream: BTreeMap<String, u64>,
    /// The first few transport errors, for the report's reader.
    pub errors: Vec<String>,
    /// The latest any request left against its schedule.
    #[serde(default)]
    pub max_late_ms: f64,
}

impl Summary {
    pub fn pct(&self, n: u64) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            100.0 * n as f64 / self.requests as f64
        }
    }
}

/// Join the client's outcomes with the handler's log lines into the run's figures.
pub fn summarize(
    label: &str,
    spillover: bool,
    rate: f64,
    tpm: Vec<u64>,
    planned: u64,
    outcomes: &[Outcome],
    logs: &HashMap<String, Logged>,
) -> Summary {
    let mut s = Summary {
        label: label.to_string(),
        note: String::new(),
        spillover,
        rate,
        seconds: outcomes
            .iter()
            .map(|o| (o.sent_ms + o.latency_ms) / 1000.0)
            .fold(0.0, f64::max),
        tpm,
        planned,
        requests: outcomes.len() as u64,
        ok: 0,
        throttled: 0,
        other: 0,
        no_answer: 0,
        other_statuses: BTreeMap::new(),
        all: Percentiles::of(&outcomes.iter().map(|o| o.latency_ms).collect::<Vec<_>>()),
        answered_200: None,
        first_attempt_200: None,
        retried: None,
        mean_tokens: None,
        logged: 0,
        logged_attempts: 0,
        by_resource: BTreeMap::new(),
        by_upstream: BTreeMap::new(),
        errors: Vec::new(),
        max_late_ms: outcomes.iter().map(|o| o.late_ms).fold(0.0, f64::max),
    };
    let mut ok_latencies = Vec::new();
    let mut first_latencies = Vec::new();
    let mut retried = 0;
    let mut tokens = Vec::new();
    for o in outcomes {
        match o.status {
            200 => {
                s.ok += 1;
                ok_latencies.push(o.latency_ms);
            }
            429 => s.throttled += 1,
            other => {
                s.other += 1;
                *s.other_statuses.entry(other).or_default() += 1;
                if other == 0 {
                    s.no_answer += 1;
                }
            }
        }
        if let Some(e) = &o.error {
            if s.errors.len() < 5 {
                s.errors.push(format!("{}: {e}", o.id));
            }
        }
        if let Some(r) = &o.resource {
            let e = s.by_resource.entry(r.clone()).or_default();
            match o.status {
                200 => e.0 += 1,
                429 => e.1 += 1,
                _ => {}
            }
        }
        if let Some(l) = logs.get(&o.id) {
            s.logged += 1;
            if let (200, Some(t)) = (o.status, l.total_tokens) {
                tokens.push(t as f64);
            }
            if let Some(u) = &l.upstream {
                *s.by_upstream.entry(u.clone()).or_default() += 1;
            }
            if let Some(a) = l.attempts {
                s.logged_attempts += 1;
                if a > 1 {
                    retried += 1;
                } else if o.status == 200 {
                    first_latencies.push(o.latency_ms);
                }
            }
        }
    }
    s.answered_200 = Percentiles::of(&ok_latencies);
    if !tokens.is_empty() {
        s.mean_tokens = Some(tokens.iter().sum::<f64>() / tokens.len() as f64);
    }
    if s.logged_attempts > 0 {
        s.first_attempt_200 = Percentiles::of(&first_latencies);
        s.retried = Some(retried);
    }
    s
}

/// What is off about a run: empty when the run measured what it was meant to.
///
/// Always: every planned request was sent and answered (no transport errors, at most 1 % other
/// statuses), the handlers logged the requests. Round robin: the small resource's 429s reach
/// the clients (≥ 5 %), else the set-up does not show the problem at all. Spillover: the handler
/// logs `attempts` (else it does not read `AOAI_BACKUPS` yet), ≤ 1 % 429 and ≥ 99 % 200.
pub fn problems(s: &Summary) -> Vec<String> {
    let mut p = Vec::new();
    if s.requests != s.planned {
        p.push(format!(
            "sent {} requests, planned {}",
            s.requests, s.planned
        ));
    }
    if s.no_answer > 0 {
        p.push(format!(
            "{} requests got no answer (e.g. {})",
            s.no_answer,
            s.errors.first().map_or("-", String::as_str)
        ));
    }
    if s.pct(s.other) > 1.0 {
        p.push(format!(
            "{:.1} % answered neither 200 nor 429: {:?}",
            s.pct(s.other),
            s.other_statuses
        ));
    }
    // The load is open loop on a timer; a request leaving a second late means this process got
    // no CPU for that long, and the handlers on the same machine likely neither.
    if s.max_late_ms > 1000.0 {
        p.push(format!(
            "the load generator fell {:.1} s behind its schedule: the machine was starved, \
             latencies are not trustworthy (run again on a quieter machine)",
            s.max_late_ms / 1000.0
        ));
    }
    if s.requests > 0 && s.logged * 100 < s.requests * 95 {
        p.push(format!(
            "only {} of {} requests found in the handlers' logs",
            s.logged, s.requests
        ));
    }
    if s.spillover {
        if s.logged_attempts == 0 {
            p.push(
                "the handlers log no `attempts` field: this handler does not do spillover yet \
                 (merge the handler side of issue 14, then run again)"
                    .into(),
            );
        }
        if s.pct(s.throttled) > 1.0 {
            p.push(format!(
                "{:.2} % of clients got 429 with spillover (expected ≤ 1 %)",
                s.pct(s.throttled)
            ));
        }
        if s.pct(s.ok) < 99.0 {
            p.push(format!(
                "{:.2} % answered 200 with spillover (expected ≥ 99 %)",
                s.pct(s.ok)
            ));
        }
    } else if s.pct(s.throttled) < 5.0 {
        p.push(format!(
            "only {:.2} % 429 under plain round robin (expected ≥ 5 %): the set-up does not \
             show the problem (are the TPMs 1000,40000,40000?)",
            s.pct(s.throttled)
        ));
    }
    p
}

fn ms(v: f64) -> String {
    format!("{v:.0}")
}

fn pcts(p: Option<Percentiles>) -> [String; 4] {
    match p {
        Some(p) => [p.count.to_string(), ms(p.p50), ms(p.p95), ms(p.p99)],
        None => ["–".into(), "–".into(), "–".into(), "–".into()],
    }
}

/// The markdown table of `runs` (one column per run), and per-resource counts below it.
pub fn markdown(runs: &[Summary]) -> String {
    let mut out = String::new();
    let header: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{} ({})",
                r.label,
                if r.spillover {
                    "--spillover"
                } else {
                    "round robin"
                }
            )
        })
        .collect();
    out.push_str(&format!("| | {} |\n", header.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---:|".repeat(runs.len())));
    let mut row = |name: &str, cell: &dyn Fn(&Summary) -> String| {
        let cells: Vec<String> = runs.iter().map(cell).collect();
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    };
    row("run", &|r| r.note.clone());
    row("load", &|r| {
        format!(
            "{:.1} req/s for {:.0} s, TPM {}",
            r.rate,
            r.seconds,
            r.tpm
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        )
    });
    row(
        "tokens per request (mean of the 200s)",
        &|r| match r.mean_tokens {
            Some(t) => format!(
                "{t:.0}: {:.0} TPM offered of {} summed",
                t * r.rate * 60.0,
                r.tpm.iter().sum::<u64>()
            ),
            None => "not logged".into(),
        },
    );
    row("requests", &|r| r.requests.to_string());
    row("latest send behind schedule", &|r| {
        format!("{:.0} ms", r.max_late_ms)
    });
    row("200", &|r| format!("{} ({:.2} %)", r.ok, r.pct(r.ok)));
    row("429 to the client", &|r| {
        format!("{} ({:.2} %)", r.throttled, r.pct(r.throttled))
    });
    row("other status or no answer", &|r| {
        format!(
            "{} ({:.2} %), no answer: {}",
            r.other,
            r.pct(r.other),
            r.no_answer
        )
    });
    row("retried on another upstream", &|r| match r.retried {
        Some(n) => format!("{n} ({:.2} %)", r.pct(n)),
        None => "not logged".into(),
    });
    for (name, pick) in [
        ("all requests", 0usize),
        ("answered 200", 1),
        ("200 on the first attempt", 2),
    ] {
        let cells = |r: &Summary| {
            pcts(match pick {
                0 => r.all,
                1 => r.answered_200,
                _ => r.first_attempt_200,
            })
        };
        row(&format!("{name}: n"), &|r| {
            if pick == 2 && r.logged_attempts == 0 {
                "not logged".into()
            } else {
                cells(r)[0].clone()
            }
        });
        for (i, q) in ["p50", "p95", "p99"].iter().enumerate() {
            row(&format!("{name}: {q} ms"), &|r| {
                if pick == 2 && r.logged_attempts == 0 {
                    "–".into()
                } else {
                    cells(r)[i + 1].clone()
                }
            });
        }
    }
    row("answered by (200 / 429)", &|r| {
        r.by_resource
            .iter()
            .map(|(k, (ok, t))| format!("{k}: {ok} / {t}"))
            .collect::<Vec<_>>()
            .join("; ")
    });
    row("upstream (handler log)", &|r| {
        if r.by_upstream.is_empty() {
            "not logged".into()
        } else {
            r.by_upstream
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(k: u64, status: u16, latency_ms: f64, resource: &str) -> Outcome {
        Outcome {
            id: format!("t-{k:06}"),
            sent_ms: k as f64 * 100.0,
            late_ms: 0.0,
            status,
            latency_ms,
            resource: (!resource.is_empty()).then(|| resource.to_string()),
            error: (status == 0).then(|| "connection refused".to_string()),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&v).unwrap();
        assert_eq!((p.count, p.p50, p.p95, p.p99), (100, 50.0, 95.0, 99.0));
        let one = Percentiles::of(&[7.0]).unwrap();
        assert_eq!((one.p50, one.p95, one.p99), (7.0, 7.0, 7.0));
        // order of input does not matter
        let p = Percentiles::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((p.p50, p.p99), (2.0, 3.0));
        assert!(Percentiles::of(&[]).is_none());
    }

    #[test]
    fn request_lines_are_read_with_or_without_attempts() {
        let (id, l) = parse_request_line(
            r#"{"timestamp":"x","level":"INFO","target":"request","request_id":"a-1","status":200,"attempts":2,"upstream":"aoai-sim-2"}"#,
        )
        .unwrap();
        assert_eq!(id, "a-1");
        assert_eq!(
            l,
            Logged {
                status: Some(200),
                attempts: Some(2),
                upstream: Some("aoai-sim-2".into()),
                total_tokens: None,
            }
        );
        let (_, l) = parse_request_line(
            r#"{"target":"request","request_id":"a-2","status":429,"attempts":"1","upstream":3}"#,
        )
        .unwrap();
        assert_eq!((l.attempts, l.upstream.as_deref()), (Some(1), Some("3")));
        let (_, l) =
            parse_request_line(r#"{"target":"request","request_id":"a-3","status":200}"#).unwrap();
        assert_eq!((l.attempts, l.upstream), (None, None));
        // other lines, other targets, broken JSON
        for line in [
            r#"{"target":"audit","request_id":"a-4"}"#,
            r#"{"message":"ready"}"#,
            "not json",
            "",
            r#"{"target":"request"}"#,
        ] {
            assert!(parse_request_line(line).is_none(), "{line}");
        }
    }

    #[test]
    fn a_summary_counts_every_request_once_and_joins_the_logs() {
        let outcomes = vec![
            outcome(0, 200, 100.0, "aoai-sim-1"),
            outcome(1, 200, 300.0, "aoai-sim-2"),
            outcome(2, 429, 5.0, "aoai-sim-1"),
            outcome(3, 502, 10.0, ""),
            outcome(4, 0, 30_000.0, ""),
        ];
        let mut logs = HashMap::new();
        let log = |a: Option<u64>, u: &str| Logged {
            status: None,
            attempts: a,
            upstream: Some(u.into()),
            total_tokens: Some(if u == "aoai-sim-1" { 40 } else { 60 }),
        };
        logs.insert("t-000000".to_string(), log(Some(1), "aoai-sim-1"));
        logs.insert("t-000001".to_string(), log(Some(2), "aoai-sim-2"));
        logs.insert("t-000002".to_string(), log(Some(3), "aoai-sim-1"));
        logs.insert("other-run".to_string(), log(Some(1), "aoai-sim-1"));
        let s = summarize("x", true, 9.0, vec![1000, 40000], 5, &outcomes, &logs);
        assert_eq!(
            (s.requests, s.ok, s.throttled, s.other, s.no_answer),
            (5, 2, 1, 2, 1)
        );
        assert_eq!(s.ok + s.throttled + s.other, s.requests);
        assert_eq!(s.other_statuses, BTreeMap::from([(0, 1), (502, 1)]));
        assert_eq!(s.logged, 3, "lines of other runs are not counted");
        assert_eq!(s.retried, Some(2));
        let first = s.first_attempt_200.unwrap();
        assert_eq!((first.count, first.p50), (1, 100.0));
        assert_eq!(s.answered_200.unwrap().count, 2);
        assert_eq!(s.all.unwrap().count, 5);
        assert_eq!(
            s.by_resource,
            BTreeMap::from([("aoai-sim-1".into(), (1, 1)), ("aoai-sim-2".into(), (1, 0))])
        );
        assert_eq!(s.by_upstream["aoai-sim-1"], 2);
        assert_eq!(s.errors.len(), 1);
        // tokens of the 200s only (the 429's line is not counted)
        assert_eq!(s.mean_tokens, Some(50.0));
        assert!((s.seconds - 30.4).abs() < 1e-9);
    }

    #[test]
    fn without_attempts_in_the_logs_the_first_attempt_row_says_so() {
        let outcomes = vec![outcome(0, 200, 100.0, "aoai-sim-1")];
        let mut logs = HashMap::new();
        logs.insert("t-000000".to_string(), Logged::default());
        let s = summarize("rr", false, 9.0, vec![1], 1, &outcomes, &logs);
        assert_eq!((s.logged, s.logged_attempts), (1, 0));
        assert!(s.first_attempt_200.is_none() && s.retried.is_none());
        let md = markdown(&[s]);
        assert!(
            md.contains("| 200 on the first attempt: n | not logged |"),
            "{md}"
        );
        assert!(
            md.contains("| retried on another upstream | not logged |"),
            "{md}"
        );
    }

    fn run_with(spillover: bool, ok: u64, throttled: u64, other: u64) -> Summary {
        run_planned(spillover, ok, throttled, other, ok + throttled + other)
    }

    fn run_planned(spillover: bool, ok: u64, throttled: u64, other: u64, planned: u64) -> Summary {
        let mut outcomes = Vec::new();
        let mut logs = HashMap::new();
        let mut k = 0;
        for (status, n) in [(200, ok), (429, throttled), (500, other)] {
            for _ in 0..n {
                let o = outcome(k, status, 10.0, "aoai-sim-1");
                logs.insert(
                    o.id.clone(),
                    Logged {
                        attempts: spillover.then_some(1),
                        ..Logged::default()
                    },
                );
                outcomes.push(o);
                k += 1;
            }
        }
        summarize("r", spillover, 9.0, vec![1], planned, &outcomes, &logs)
    }

    #[test]
    fn problems_name_what_is_off_for_each_half() {
        // Round robin: the 429s must show.
        assert!(problems(&run_with(false, 90, 10, 0)).is_empty());
        let p = problems(&run_with(false, 97, 3, 0));
        assert!(p.iter().any(|m| m.contains("expected ≥ 5 %")), "{p:?}");
        // Spillover: ≤ 1 % 429 and ≥ 99 % 200.
        assert!(problems(&run_with(true, 995, 5, 0)).is_empty());
        let p = problems(&run_with(true, 980, 20, 0));
        assert!(p.iter().any(|m| m.contains("expected ≤ 1 %")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("expected ≥ 99 %")), "{p:?}");
        // A spillover run against a handler that logs no attempts is refused outright.
        let mut s = run_with(true, 100, 0, 0);
        s.logged_attempts = 0;
        let p = problems(&s);
        assert!(
            p.iter().any(|m| m.contains("does not do spillover yet")),
            "{p:?}"
        );
        // Either half: missing requests, other statuses, unlogged requests.
        let p = problems(&run_planned(false, 80, 10, 10, 120));
        assert!(p.iter().any(|m| m.contains("planned 120")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("neither 200 nor 429")), "{p:?}");
        let mut s = run_with(false, 90, 10, 0);
        s.max_late_ms = 1500.0;
        assert!(problems(&s).iter().any(|m| m.contains("1.5 s behind")));
        s.max_late_ms = 0.0;
        s.logged = 50;
        assert!(problems(&s)
            .iter()
            .any(|m| m.contains("found in the handlers' logs")));
    }

    #[test]
    fn bodies_are_small_capped_and_carry_the_user() {
        let b = body(7, "alice", 40);
        assert_eq!(b["user"], "alice");
        assert_eq!(b["max_tokens"], 40);
        assert!(b["messages"][1]["content"]
            .as_str()
            .unwrap()
            .starts_with("Request 7:"));
        assert_ne!(
            body(1, "a", 1)["messages"][1],
            body(2, "a", 1)["messages"][1]
        );
    }

    #[test]
    fn the_table_has_one_column_per_run() {
        let md = markdown(&[run_with(false, 90, 10, 0), run_with(true, 100, 0, 0)]);
        let lines: Vec<&str> = md.lines().collect();
        assert!(lines[0].contains("round robin") && lines[0].contains("--spillover"));
        let cols = lines[0].matches('|').count();
        assert!(lines.iter().all(|l| l.matches('|').count() == cols), "{md}");
        assert!(
            md.contains("| 429 to the client | 10 (10.00 %) | 0 (0.00 %) |"),
            "{md}"
        );
    }
}
