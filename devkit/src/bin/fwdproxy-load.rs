//! `fwdproxy-load`: steady chat load against a running `fwdproxy-dev` set, and the report of
//! the spillover benchmark. See [`fwdproxy_devkit::load`] and `bench/spillover.sh`.
//!
//! ```text
//! fwdproxy-load run --ready READY.json --label NAME --out SUMMARY.json
//!                   [--rate 9] [--secs 60] [--max-requests 2000] [--timeout-secs 30]
//!                   [--max-tokens 20] [--requests-out REQUESTS.jsonl] [--note TEXT]
//! fwdproxy-load report --out TABLE.md SUMMARY.json…
//! ```
//! `run` exits 1 when the run did not measure what it should (see `load::problems`), after
//! writing its summary; `report` writes the table of the summaries given.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fwdproxy_devkit::load::{self, LoadConfig, Summary};
use serde_json::Value;

const USAGE: &str = "\
usage: fwdproxy-load run --ready READY.json --label NAME --out SUMMARY.json
                         [--rate 9] [--secs 60] [--max-requests 2000] [--timeout-secs 30]
                         [--max-tokens 20] [--requests-out REQUESTS.jsonl] [--note TEXT]
       fwdproxy-load report --out TABLE.md SUMMARY.json...";

/// How long the handlers get to write the log lines of answered requests (written when each
/// response body ends, so normally already there).
const LOG_WAIT: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]).await,
        Some("report") => report(&args[1..]),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(msg) => {
            eprintln!("fwdproxy-load: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Named options (`--name value` / `--name=value`) in order, and the positional arguments.
type Parsed = (Vec<(String, String)>, Vec<String>);

/// `--name value` / `--name=value` pairs and the rest (positional).
fn flags(args: &[String]) -> Result<Parsed, String> {
    let mut named = Vec::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            let (n, v) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (
                    name.to_string(),
                    it.next()
                        .ok_or_else(|| format!("--{name} needs a value\n{USAGE}"))?
                        .clone(),
                ),
            };
            named.push((n, v));
        } else {
            rest.push(a.clone());
        }
    }
    Ok((named, rest))
}

fn get<'a>(named: &'a [(String, String)], name: &str) -> Option<&'a str> {
    named
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn num<T: std::str::FromStr>(
    named: &[(String, String)],
    name: &str,
    default: T,
) -> Result<T, String> {
    match get(named, name) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("--{name}: {v:?} is not a number")),
        None => Ok(default),
    }
}

async fn run(args: &[String]) -> Result<bool, String> {
    let (named, rest) = flags(args)?;
    if !rest.is_empty() {
        return Err(format!("unexpected {rest:?}\n{USAGE}"));
    }
    for (n, _) in &named {
        if ![
            "ready",
            "label",
            "out",
            "rate",
            "secs",
            "max-requests",
            "timeout-secs",
            "max-tokens",
            "requests-out",
            "note",
        ]
        .contains(&n.as_str())
        {
            return Err(format!("unknown option --{n}\n{USAGE}"));
        }
    }
    let ready_path =
        PathBuf::from(get(&named, "ready").ok_or(format!("--ready is required\n{USAGE}"))?);
    let label = get(&named, "label").ok_or(format!("--label is required\n{USAGE}"))?;
    let out = PathBuf::from(get(&named, "out").ok_or(format!("--out is required\n{USAGE}"))?);
    let ready: Value = serde_json::from_slice(
        &std::fs::read(&ready_path).map_err(|e| format!("{}: {e}", ready_path.display()))?,
    )
    .map_err(|e| format!("{}: {e}", ready_path.display()))?;
    let text = |v: &Value, what: &str| {
        v.as_str()
            .map(str::to_string)
            .ok_or(format!("the ready file has no {what}"))
    };
    let gateway_url = text(&ready["gateway_url"], "gateway_url")?;
    // Loopback only: this tool sends load, and the ready file could name anything.
    if !gateway_url.starts_with("http://127.0.0.1:") {
        return Err(format!(
            "refusing to send load to {gateway_url}: loopback only"
        ));
    }
    let run_dir = PathBuf::from(text(&ready["run_dir"], "run_dir")?);
    let spillover = ready["spillover"].as_bool().unwrap_or(false);
    let tpm: Vec<u64> = ready["backends"]
        .as_array()
        .map(|b| b.iter().filter_map(|x| x["tpm"].as_u64()).collect())
        .unwrap_or_default();
    let rate: f64 = num(&named, "rate", 9.0)?;
    let secs: f64 = num(&named, "secs", 60.0)?;
    if !(1.0..=600.0).contains(&secs) {
        return Err("--secs must be 1-600".into());
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let cfg = LoadConfig {
        gateway_url,
        key: text(&ready["internal_key"], "internal_key")?,
        user: text(&ready["registered_users"][0], "registered user")?,
        deployment: "gpt-4o".into(),
        api_version: text(&ready["api_version"], "api_version")?,
        rate,
        duration: Duration::from_secs_f64(secs),
        max_requests: num(&named, "max-requests", 2000)?,
        timeout: Duration::from_secs(num(&named, "timeout-secs", 30)?),
        max_tokens: num(&named, "max-tokens", 20)?,
        id_prefix: format!("load-{label}-{stamp}"),
    };
    let planned = ((secs * rate).floor() as u64).min(cfg.max_requests);
    println!(
        "[fwdproxy-load] {label}: {planned} chat requests at {rate} req/s to {} ({}; TPM {:?})",
        cfg.gateway_url,
        if spillover {
            "handlers with --spillover"
        } else {
            "plain round robin"
        },
        tpm
    );
    let outcomes = load::run(&cfg).await?;
    if let Some(path) = get(&named, "requests-out") {
        let lines: Vec<String> = outcomes
            .iter()
            .filter_map(|o| serde_json::to_string(o).ok())
            .collect();
        std::fs::write(path, lines.join("\n") + "\n").map_err(|e| format!("{path}: {e}"))?;
    }
    // The handlers write each request's line when its response ends; give the last ones a
    // bounded moment.
    let answered = outcomes.iter().filter(|o| o.status != 0).count();
    let deadline = Instant::now() + LOG_WAIT;
    let logs = loop {
        let logs = load::read_handler_logs(&run_dir);
        let found = outcomes.iter().filter(|o| logs.contains_key(&o.id)).count();
        if found >= answered || Instant::now() >= deadline {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut summary = load::summarize(label, spillover, rate, tpm, planned, &outcomes, &logs);
    summary.note = get(&named, "note").unwrap_or_default().to_string();
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&summary).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("{}", load::markdown(std::slice::from_ref(&summary)));
    let problems = load::problems(&summary);
    if problems.is_empty() {
        println!("[fwdproxy-load] {label}: as expected");
        Ok(true)
    } else {
        for p in &problems {
            eprintln!("[fwdproxy-load] {label}: NOT AS EXPECTED: {p}");
        }
        Ok(false)
    }
}

fn report(args: &[String]) -> Result<bool, String> {
    let (named, files) = flags(args)?;
    let out = get(&named, "out").ok_or(format!("--out is required\n{USAGE}"))?;
    if files.is_empty() {
        return Err(format!("no summaries given\n{USAGE}"));
    }
    let mut runs: Vec<Summary> = Vec::new();
    for f in &files {
        let bytes = std::fs::read(Path::new(f)).map_err(|e| format!("{f}: {e}"))?;
        runs.push(serde_json::from_slice(&bytes).map_err(|e| format!("{f}: {e}"))?);
    }
    let mut md = load::markdown(&runs);
    for r in &runs {
        for p in load::problems(r) {
            md.push_str(&format!("\n- **{}: not as expected**: {p}", r.label));
        }
    }
    md.push('\n');
    std::fs::write(out, &md).map_err(|e| format!("{out}: {e}"))?;
    print!("{md}");
    Ok(true)
}
