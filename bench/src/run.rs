//! The orchestrator: starts the upstream, nginx and the handler variants, measures each side by
//! side in one run (interleaved rounds, so a noisy neighbour hits every target alike), prints one
//! markdown table and writes it to the output file.
//!
//! Layout on 2 cores: every proxy under test on core 0 (one at a time carries load; the idle
//! ones sleep in epoll), the orchestrator, its latency/stream client, wrk and the zero-latency
//! upstream on core 1.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{self, Conn};
use crate::procfs::{self, Proc};
use crate::upstream::{CHUNKS, GAP};

const PROXY_CORE: usize = 0;
const LOAD_CORE: usize = 1;
const IN_KEY: &str = "bench-internal-key-0123456789abcdef";
const OUT_KEY: &str = "bench-real-aoai-key-fedcba9876543210";
const CS_KEY: &str = "bench-content-safety-key-0123456789";
const DEPLOYMENT: &str = "gpt-4o";
const API_VERSION: &str = "2024-10-21";
const HEALTH: &str = "/api/FwdProxy/openai/deployments/health/check";
const BODY: &str = r#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Tell me a joke about reverse proxies."}],"max_tokens":100,"temperature":0.7,"user":"alice"}"#;
const STREAM_BODY: &str = r#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Tell me a joke about reverse proxies."}],"max_tokens":100,"temperature":0.7,"user":"alice","stream":true}"#;

struct Cfg {
    handler: PathBuf,
    bench: PathBuf,
    nginx: PathBuf,
    wrk: PathBuf,
    out: PathBuf,
    work: PathBuf,
    secs: u64,
    rounds: usize,
    lat_secs: f64,
    streams: usize,
    starts: usize,
    commit: String,
    nice: i32,
    alt: Vec<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Nginx,
    Handler,
}

struct Target {
    name: String,
    /// The handler binary (handler targets).
    bin: PathBuf,
    kind: Kind,
    env: Vec<(&'static str, String)>,
    proc: Option<Proc>,
    addr: SocketAddr,
    path: String,
    key: &'static str,
    ready_ms: Vec<f64>,
    idle_rss_kb: u64,
    peak_rss_kb: u64,
    cpu_us: Vec<f64>,
    sys_us: Vec<f64>,
    rps: Vec<f64>,
    wrk_p50: Vec<f64>,
    wrk_p99: Vec<f64>,
    lat_ns: Vec<u64>,
    /// Latency with the proxy moved onto the load core (no cross-core wake-ups).
    lat_one_ns: Vec<u64>,
    ttfb_ns: Vec<u64>,
    /// First byte with the proxy on the load core.
    ttfb_one_ns: Vec<u64>,
    gaps_ns: Vec<u64>,
    streams_ok: usize,
    streams_bad: usize,
    /// CPU ticks and requests of the 1-connection latency runs.
    cpu1_ticks: u64,
    cpu1_reqs: u64,
    coalesced: usize,
}

impl Target {
    fn new(name: &str, kind: Kind, env: Vec<(&'static str, String)>) -> Self {
        Target {
            name: name.to_string(),
            bin: PathBuf::new(),
            kind,
            env,
            proc: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            path: String::new(),
            key: IN_KEY,
            ready_ms: Vec::new(),
            idle_rss_kb: 0,
            peak_rss_kb: 0,
            cpu_us: Vec::new(),
            sys_us: Vec::new(),
            rps: Vec::new(),
            wrk_p50: Vec::new(),
            wrk_p99: Vec::new(),
            lat_ns: Vec::new(),
            lat_one_ns: Vec::new(),
            ttfb_ns: Vec::new(),
            ttfb_one_ns: Vec::new(),
            gaps_ns: Vec::new(),
            streams_ok: 0,
            streams_bad: 0,
            cpu1_ticks: 0,
            cpu1_reqs: 0,
            coalesced: 0,
        }
    }

    /// user + system ticks of the proxy (direct: none).
    fn cpu_total(&self) -> u64 {
        self.proc.as_ref().map_or(0, |p| {
            let (u, s) = p.cpu_ticks();
            u + s
        })
    }

    fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of nanosecond samples, in µs.
fn pct_us(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1] as f64 / 1000.0
}

fn read_first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default()
}

fn machine() -> (String, String, String) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    // SAFETY: sysconf has no preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let online = read_first_line("/sys/devices/system/cpu/online");
    let kernel = read_first_line("/proc/sys/kernel/osrelease");
    (
        format!("{model}, {ncpu} cores online ({online})"),
        kernel,
        read_first_line("/proc/loadavg"),
    )
}

fn nginx_conf(work: &Path, port: u16, upstream: u16) -> PathBuf {
    let dir = work.join("nginx");
    for d in ["logs", "client_body", "proxy"] {
        std::fs::create_dir_all(dir.join(d)).expect("nginx dirs");
    }
    let d = dir.display();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;\n"
    } else {
        ""
    };
    let conf = format!(
        r#"# The simplest reverse proxy equivalent to the handler's forward path: path rewrite,
# api-key swap, keep-alive upstream pool, no response buffering. One worker (pinned to the
# proxy core by the bench, like the handler). access_log on: the handler also writes one line per
# request.
{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    upstream aoai {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location = {HEALTH} {{
            default_type application/json;
            return 200 '{{"status":"ok"}}';
        }}
        location ~ ^/api/FwdProxy/openai/deployments/([A-Za-z0-9._-]+)/chatcompletions$ {{
            proxy_pass http://aoai/openai/deployments/$1/chat/completions$is_args$args;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header api-key "{OUT_KEY}";
            proxy_buffering off;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    path
}

/// Start one instance of a proxy target on a fresh port, pinned to the proxy core; returns the
/// process and its start-to-ready time in ms.
fn start(cfg: &Cfg, t: &Target, upstream: u16) -> (Proc, SocketAddr, f64) {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = match t.kind {
        Kind::Handler => {
            let mut c = Command::new(&t.bin);
            c.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("AOAI_HOSTNAME", format!("http://127.0.0.1:{upstream}"))
                .env("AOAI_INAPIKEY", IN_KEY)
                .env("AOAI_OUTAPIKEY", OUT_KEY)
                .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
                // each variant its own journal: the handler locks it against a second process
                .env(
                    "AUDIT_LOG_PATH",
                    cfg.work.join(format!("abuse-log-{}.jsonl", slug(&t.name))),
                )
                .env(
                    "AUDIT_SPOOL_PATH",
                    cfg.work.join(format!("abuse-spool-{}.jsonl", slug(&t.name))),
                );
            for (k, v) in &t.env {
                c.env(k, v);
            }
            // The handler's one JSON line per request goes to a file, as it would to the host.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(cfg.work.join(format!("{}.log", slug(&t.name))))
                .expect("handler log");
            c.current_dir(&cfg.work)
                .stdout(log)
                .stderr(Stdio::inherit())
                .stdin(Stdio::null());
            c
        }
        Kind::Nginx => {
            let conf = nginx_conf(&cfg.work, port, upstream);
            let mut c = Command::new(&cfg.nginx);
            c.arg("-p")
                .arg(cfg.work.join("nginx"))
                .arg("-e")
                .arg(cfg.work.join("nginx/logs/error.log"))
                .arg("-c")
                .arg(conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            c
        }
        Kind::Direct => unreachable!(),
    };
    procfs::pin(&mut cmd, PROXY_CORE);
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", t.name));
    let mut p = Proc {
        child,
        name: t.name.clone(),
    };
    let ready = client::wait_ready(addr, HEALTH, Duration::from_secs(10));
    match ready {
        Some(at) => {
            let ms = (at - t0).as_secs_f64() * 1000.0;
            (p, addr, ms)
        }
        None => {
            p.kill_now();
            panic!("{} did not answer its health route within 10 s", p.name)
        }
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

struct Wrk {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    bad: u64,
    errors: String,
}

fn parse_dur_us(s: &str) -> f64 {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mult
}

fn wrk(cfg: &Cfg, t: &Target, secs: f64) -> Wrk {
    let script = cfg.work.join(format!("wrk-{}.lua", slug(&t.name)));
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.body = '{BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"api-key\"] = \"{}\"\n",
        t.key
    );
    std::fs::write(&script, lua).expect("wrk script");
    let mut cmd = Command::new(&cfg.wrk);
    cmd.args(["-t1", "-c32", "--latency", "--timeout", "5s"])
        .arg(format!("-d{}s", secs.max(1.0).round() as u64))
        .arg("-s")
        .arg(&script)
        .arg(t.url())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    procfs::pin(&mut cmd, LOAD_CORE);
    let out = cmd.output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut w = Wrk {
        requests: 0,
        rps: 0.0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        bad: 0,
        errors: String::new(),
    };
    for l in text.lines() {
        let l = l.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if l.contains(" requests in ") {
            w.requests = l
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("50%") {
            w.p50_us = parse_dur_us(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            w.p99_us = parse_dur_us(v);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.bad = v.trim().parse().unwrap_or(0);
        } else if l.starts_with("Socket errors:") {
            w.errors = l.to_string();
        }
    }
    if w.requests == 0 {
        eprintln!("wrk printed:\n{text}");
    }
    w
}

/// Closed loop on one keep-alive connection for `secs` (at most `max` requests): per-request
/// latency in ns.
fn latency(t: &Target, secs: f64, max: usize, out: &mut Vec<u64>) {
    let req = client::post(
        &t.path,
        &[("Content-Type", "application/json"), ("api-key", t.key)],
        BODY,
    );
    let mut c = Conn::connect(t.addr).expect("connect");
    for _ in 0..200 {
        let r = c.exchange(&req).expect("warm-up request");
        assert_eq!(r.status, 200, "{}: status {}", t.name, r.status);
    }
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0;
    while n < max && Instant::now() < until {
        let t0 = Instant::now();
        let r = c.exchange(&req).expect("request");
        let ns = t0.elapsed().as_nanos() as u64;
        assert_eq!(r.status, 200, "{}: status {}", t.name, r.status);
        out.push(ns);
        n += 1;
        if r.close {
            c = Conn::connect(t.addr).expect("reconnect");
        }
    }
}

/// Time to first byte only (streams on the load core: gaps are judged on the main layout).
fn stream_ttfb_only(t: &mut Target, n: usize) {
    let req = client::post(
        &t.path,
        &[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("api-key", t.key),
        ],
        STREAM_BODY,
    );
    let mut c = Conn::connect(t.addr).expect("connect");
    for _ in 0..n {
        let t0 = Instant::now();
        let r = c.exchange(&req).expect("stream");
        if let (200, Some(first)) = (r.status, r.first_body) {
            t.ttfb_one_ns.push((first - t0).as_nanos() as u64);
        }
        if r.close {
            c = Conn::connect(t.addr).expect("reconnect");
        }
    }
}

fn stream(t: &mut Target, n: usize) {
    let req = client::post(
        &t.path,
        &[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("api-key", t.key),
        ],
        STREAM_BODY,
    );
    let mut c = Conn::connect(t.addr).expect("connect");
    for _ in 0..n {
        let t0 = Instant::now();
        let r = c.exchange(&req).expect("stream");
        if r.status != 200 || r.events.len() != CHUNKS || r.first_body.is_none() {
            t.streams_bad += 1;
            continue;
        }
        t.streams_ok += 1;
        t.ttfb_ns
            .push((r.first_body.unwrap() - t0).as_nanos() as u64);
        for w in r.events.windows(2) {
            let g = (w[1] - w[0]).as_nanos() as u64;
            if g < (GAP / 2).as_nanos() as u64 {
                t.coalesced += 1;
            }
            t.gaps_ns.push(g);
        }
        if r.close {
            c = Conn::connect(t.addr).expect("reconnect");
        }
    }
}

pub fn main(args: &[String]) {
    let need = |n: &str| -> PathBuf {
        PathBuf::from(arg(args, n).unwrap_or_else(|| panic!("run: {n} is required")))
    };
    let cfg = Cfg {
        handler: need("--handler"),
        bench: std::env::current_exe().expect("own path"),
        nginx: need("--nginx"),
        wrk: need("--wrk"),
        out: need("--out"),
        work: need("--work"),
        secs: env_or("BENCH_SECS", 5),
        rounds: env_or("BENCH_ROUNDS", 3),
        lat_secs: env_or("BENCH_LAT_SECS", 2.0),
        streams: env_or("BENCH_STREAMS", 20),
        starts: env_or("BENCH_STARTS", 7),
        commit: arg(args, "--commit").unwrap_or_default(),
        nice: env_or("BENCH_NICE", -15),
        alt: std::env::var("BENCH_ALT")
            .unwrap_or_default()
            .split(',')
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect(),
    };
    std::fs::create_dir_all(&cfg.work).expect("work dir");
    let (cpu, kernel, load_before) = machine();
    procfs::pin_self(LOAD_CORE);
    // Other work on the machine (compilers) shares both cores: the bench and everything it
    // starts run at a raised priority so they are not preempted mid-measurement.
    let nice = procfs::renice_self(cfg.nice);
    let began = Instant::now();

    // The upstream, on the load core.
    let mut up_cmd = Command::new(&cfg.bench);
    up_cmd
        .args(["upstream", "--out-key", OUT_KEY, "--cs-key", CS_KEY])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    procfs::pin(&mut up_cmd, LOAD_CORE);
    let mut up = Proc {
        child: up_cmd.spawn().expect("start upstream"),
        name: "upstream".into(),
    };
    let mut line = String::new();
    BufReader::new(up.child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("upstream ready line");
    let ports: Vec<u16> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.parse().ok())
        .collect();
    let (aoai_port, cs_port) = (ports[0], ports[1]);

    let user_env = vec![
        ("USER_CHECK", "registered".to_string()),
        ("REGISTERED_USERS", "alice,bob,carol".to_string()),
    ];
    let mut screen_env = user_env.clone();
    screen_env.push((
        "CONTENT_SAFETY_ENDPOINT",
        format!("http://127.0.0.1:{cs_port}"),
    ));
    screen_env.push(("CONTENT_SAFETY_KEY", CS_KEY.to_string()));
    let handler = |name: &str, bin: &Path, env: &Vec<(&'static str, String)>| {
        let mut t = Target::new(name, Kind::Handler, env.clone());
        t.bin = bin.to_path_buf();
        t
    };
    let mut targets = vec![
        Target::new("direct to upstream", Kind::Direct, vec![]),
        Target::new("nginx", Kind::Nginx, vec![]),
        handler(
            "handler: auth",
            &cfg.handler,
            &vec![("USER_CHECK", "off".into())],
        ),
        handler("handler: auth + user check", &cfg.handler, &user_env),
        handler(
            "handler: auth + user check + screening",
            &cfg.handler,
            &screen_env,
        ),
    ];
    // A/B: other handler binaries (proposed changes) measured in the same run.
    // BENCH_ALT="label=/path/to/handler,label2=/path2"; BENCH_ALT_SCREENING=1 adds their
    // screening rows too.
    for (i, alt) in cfg.alt.iter().enumerate() {
        let (label, path) = match alt.split_once('=') {
            Some((l, p)) => (l.to_string(), PathBuf::from(p)),
            None => (format!("alt{}", i + 1), PathBuf::from(alt)),
        };
        targets.push(handler(
            &format!("{label}: auth + user check"),
            &path,
            &user_env,
        ));
        if std::env::var("BENCH_ALT_SCREENING").is_ok_and(|v| v == "1") {
            targets.push(handler(
                &format!("{label}: auth + user check + screening"),
                &path,
                &screen_env,
            ));
        }
    }
    let proxied = format!(
        "/api/FwdProxy/openai/deployments/{DEPLOYMENT}/chatcompletions?api-version={API_VERSION}"
    );

    // Start-to-ready: several starts each, the last one stays up for the load phase.
    for t in targets.iter_mut() {
        if t.kind == Kind::Direct {
            t.addr = SocketAddr::from(([127, 0, 0, 1], aoai_port));
            t.path = format!(
                "/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
            );
            t.key = OUT_KEY;
            continue;
        }
        t.path = proxied.clone();
        for i in 0..cfg.starts {
            let (mut p, addr, ms) = start(&cfg, t, aoai_port);
            t.ready_ms.push(ms);
            if i + 1 == cfg.starts {
                t.addr = addr;
                t.proc = Some(p);
            } else {
                p.stop(Duration::from_secs(2));
            }
        }
        eprintln!(
            "[bench] {}: start to ready {:.1} ms (median of {})",
            t.name,
            median(&t.ready_ms),
            t.ready_ms.len()
        );
    }
    // Idle RSS after start and one request each (the pools and lazy statics exist).
    for t in targets.iter_mut() {
        let mut v = Vec::new();
        latency(t, 0.0, 0, &mut v);
        if let Some(p) = &t.proc {
            std::thread::sleep(Duration::from_millis(200));
            t.idle_rss_kb = p.rss_kb("VmRSS");
        }
    }

    // Load: 32 connections, interleaved rounds. The first round is preceded by a 1 s warm-up.
    let tck = procfs::clk_tck();
    for round in 0..cfg.rounds {
        for t in targets.iter_mut() {
            if round == 0 {
                let w = wrk(&cfg, t, 1.0);
                assert!(w.requests > 0, "{}: warm-up served no request", t.name);
            }
            let pid_cpu = |t: &Target| -> (u64, u64) {
                match &t.proc {
                    Some(p) => p.cpu_ticks(),
                    None => up.cpu_ticks(),
                }
            };
            let c0 = pid_cpu(t);
            let w = wrk(&cfg, t, cfg.secs as f64);
            let c1 = pid_cpu(t);
            assert!(w.requests > 0, "{}: wrk served no request", t.name);
            assert!(w.bad == 0, "{}: {} answers were not 2xx", t.name, w.bad);
            if !w.errors.is_empty() {
                eprintln!("[bench] {}: {}", t.name, w.errors);
            }
            let per_req = |ticks: u64| ticks as f64 / tck * 1e6 / w.requests as f64;
            let us = per_req((c1.0 + c1.1) - (c0.0 + c0.1));
            t.sys_us.push(per_req(c1.1 - c0.1));
            eprintln!(
                "[bench] round {} {}: {:.1} µs CPU/req, {:.0} req/s",
                round + 1,
                t.name,
                us,
                w.rps
            );
            t.cpu_us.push(us);
            t.rps.push(w.rps);
            t.wrk_p50.push(w.p50_us);
            t.wrk_p99.push(w.p99_us);
        }
    }
    for t in targets.iter_mut() {
        if let Some(p) = &t.proc {
            t.peak_rss_kb = p.rss_kb("VmHWM");
        }
    }

    // Latency at 1 connection and streaming, interleaved rounds as well.
    let lat_rounds = cfg.rounds.max(1);
    for _ in 0..lat_rounds {
        for t in targets.iter_mut() {
            let mut v = std::mem::take(&mut t.lat_ns);
            let n0 = v.len();
            let c0 = t.cpu_total();
            latency(t, cfg.lat_secs / lat_rounds as f64, 200_000, &mut v);
            t.cpu1_ticks += t.cpu_total() - c0;
            t.cpu1_reqs += (v.len() - n0 + 200) as u64;
            t.lat_ns = v;
            // The same with the proxy on the load core: what one core (a Consumption instance)
            // sees, without the cross-core wake-ups this VM makes expensive.
            if let Some(p) = &t.proc {
                let pids = p.pids();
                pids.iter().for_each(|&pid| procfs::repin(pid, LOAD_CORE));
                let mut v = std::mem::take(&mut t.lat_one_ns);
                latency(t, cfg.lat_secs / lat_rounds as f64, 200_000, &mut v);
                t.lat_one_ns = v;
                stream_ttfb_only(t, cfg.streams.div_ceil(lat_rounds));
                pids.iter().for_each(|&pid| procfs::repin(pid, PROXY_CORE));
            }
            stream(t, cfg.streams.div_ceil(lat_rounds));
        }
    }
    let load_after = read_first_line("/proc/loadavg");

    // Stop the proxies and the upstream.
    for t in targets.iter_mut() {
        if let Some(mut p) = t.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }
    up.stop(Duration::from_secs(2));

    let report = report(
        &cfg,
        &targets,
        &cpu,
        &kernel,
        &load_before,
        &load_after,
        began.elapsed(),
        nice,
    );
    print!("{report}");
    if let Some(dir) = cfg.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut f = std::fs::File::create(&cfg.out).expect("write results");
    f.write_all(report.as_bytes()).expect("write results");
    eprintln!("[bench] written to {}", cfg.out.display());
}

fn fmt(v: f64, prec: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.prec$}")
    }
}

fn signed(v: f64, prec: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:+.prec$}")
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &Cfg,
    ts: &[Target],
    cpu: &str,
    kernel: &str,
    load_before: &str,
    load_after: &str,
    took: Duration,
    nice: i32,
) -> String {
    let direct = &ts[0];
    let nginx = &ts[1];
    let h_auth = &ts[2];
    let h_user = &ts[3];
    let h_screen = &ts[4];
    let d50 = pct_us(&direct.lat_ns, 50.0);
    let d99 = pct_us(&direct.lat_ns, 99.0);
    let dttfb = pct_us(&direct.ttfb_ns, 50.0);
    let ncpu = median(&nginx.cpu_us);
    let tck = procfs::clk_tck();
    let mut s = String::new();
    s.push_str("# aoai-fwdproxy benchmark: handler vs nginx\n\n");
    s.push_str(&format!(
        "- machine: {cpu}; kernel {kernel}\n- load average before: {load_before}; after: {load_after}\n"
    ));
    if !cfg.commit.is_empty() {
        s.push_str(&format!("- handler built from: {}\n", cfg.commit));
    }
    for alt in &cfg.alt {
        s.push_str(&format!("- alternative handler (A/B rows): {alt}\n"));
    }
    s.push_str(&format!(
        "- layout: each proxy pinned to core {PROXY_CORE} (handler: one runtime thread, as it sees 1 core; nginx: master + `worker_processes 1`); \
wrk (`-t1 -c32`), this client and the zero-latency upstream pinned to core {LOAD_CORE}; all of them at nice {nice}\n\
- load: {} rounds × {} s of wrk at 32 connections per target, interleaved (first preceded by 1 s warm-up); \
CPU = utime+stime from /proc/<pid>/stat (nginx: master + worker) over each window ÷ requests, median of rounds\n\
- latency: 1 keep-alive connection, closed loop, {} s per target in {} slices; streaming: {} streams of {CHUNKS} events {} ms apart per target\n\
- start to ready: spawn → first 200 from the health route, median of {} starts; RSS: VmRSS idle after 1 request, VmHWM after load (nginx: sum of master + worker)\n\
- body: {}-byte chat request (`user` alice, registered); answer: {}-byte chat completion JSON; took {:.0} s\n\n",
        cfg.rounds,
        cfg.secs,
        cfg.lat_secs,
        cfg.rounds,
        cfg.streams.div_ceil(cfg.rounds.max(1)) * cfg.rounds.max(1),
        GAP.as_millis(),
        cfg.starts,
        BODY.len(),
        crate_completion_len(),
        took.as_secs_f64()
    ));
    s.push_str("| target | CPU µs/req @32 (of it kernel) | ÷ nginx | req/s @32 | p50 @32 (ms) | p99 @32 (ms) | CPU µs/req @1 | p50 @1 (µs) | p99 @1 (µs) | added p50 @1 (µs) | added p99 @1 (µs) | added p50 @1, one core (µs) | stream first byte (µs) | added first byte (µs) | gaps min / p50 / max (ms) | coalesced gaps | idle RSS (MB) | peak RSS (MB) | start→ready (ms) |\n");
    s.push_str(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for t in ts {
        let c = median(&t.cpu_us);
        let p50 = pct_us(&t.lat_ns, 50.0);
        let p99 = pct_us(&t.lat_ns, 99.0);
        let ttfb = pct_us(&t.ttfb_ns, 50.0);
        let direct_row = t.kind == Kind::Direct;
        let mb = |kb: u64| {
            if t.proc.is_none() && kb == 0 && direct_row {
                "–".to_string()
            } else {
                fmt(kb as f64 / 1024.0, 1)
            }
        };
        s.push_str(&format!(
            "| {}{} | {} ({}) | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {}{} | {} | {} | {} |\n",
            t.name,
            if direct_row { " (CPU: the upstream itself)" } else { "" },
            fmt(c, 1),
            fmt(median(&t.sys_us), 1),
            if direct_row { "–".into() } else { fmt(c / ncpu, 2) },
            median(&t.rps),
            fmt(median(&t.wrk_p50) / 1000.0, 2),
            fmt(median(&t.wrk_p99) / 1000.0, 2),
            if direct_row || t.cpu1_reqs == 0 {
                "–".into()
            } else {
                fmt(t.cpu1_ticks as f64 / tck * 1e6 / t.cpu1_reqs as f64, 1)
            },
            fmt(p50, 1),
            fmt(p99, 1),
            if direct_row { "–".into() } else { signed(p50 - d50, 1) },
            if direct_row { "–".into() } else { signed(p99 - d99, 1) },
            if direct_row { "–".into() } else { signed(pct_us(&t.lat_one_ns, 50.0) - d50, 1) },
            fmt(ttfb, 0),
            if direct_row { "–".into() } else { signed(ttfb - dttfb, 0) },
            fmt(pct_us(&t.gaps_ns, 0.0) / 1000.0, 2),
            fmt(pct_us(&t.gaps_ns, 50.0) / 1000.0, 2),
            fmt(pct_us(&t.gaps_ns, 100.0) / 1000.0, 2),
            t.coalesced,
            if t.streams_bad > 0 {
                format!(" ({} of {} streams broken)", t.streams_bad, t.streams_bad + t.streams_ok)
            } else {
                String::new()
            },
            if direct_row { "–".into() } else { mb(t.idle_rss_kb) },
            if direct_row { "–".into() } else { mb(t.peak_rss_kb) },
            if direct_row { "–".into() } else { fmt(median(&t.ready_ms), 1) },
        ));
    }

    // Targets, for the handler with auth and user check on (the configuration the targets name),
    // and for the first A/B build when it has its screening row too.
    let mut sets: Vec<(String, &Target, &Target, Vec<&Target>)> = vec![(
        "handler".into(),
        h_user,
        h_screen,
        vec![h_auth, h_user, h_screen],
    )];
    if ts.len() >= 7 && ts[6].name.ends_with("+ screening") {
        let label = ts[5]
            .name
            .trim_end_matches(": auth + user check")
            .to_string();
        sets.push((label, &ts[5], &ts[6], vec![&ts[5], &ts[6]]));
    }
    let floor = direct.coalesced.max(nginx.coalesced);
    let one = |t: &Target| pct_us(&t.lat_one_ns, 50.0) - d50;
    let one_ttfb = |t: &Target| pct_us(&t.ttfb_one_ns, 50.0) - pct_us(&direct.ttfb_ns, 50.0);
    let ok = |b: bool| if b { "met" } else { "**missed**" };
    let mut rows: Vec<(String, String, Vec<String>)> = vec![
        (
            "CPU per request ÷ nginx (32 connections)".into(),
            "≤ 1.20".into(),
            vec![],
        ),
        (
            "added latency p50 at 1 connection: proxy on its own core · on the load core".into(),
            "≤ 100 µs".into(),
            vec![],
        ),
        (
            "streaming added first byte: own core · load core".into(),
            "≤ 300 µs".into(),
            vec![],
        ),
        (
            format!(
                "no chunk coalescing: coalesced gaps (< {:.1} ms), worst variant",
                GAP.as_secs_f64() * 500.0
            ),
            format!(
                "all streams whole; ≤ noise floor (direct {}, nginx {}) + 1% of gaps",
                direct.coalesced, nginx.coalesced
            ),
            vec![],
        ),
        (
            "peak RSS under 32 connections, worst variant".into(),
            "≤ 30 MB".into(),
            vec![],
        ),
        (
            "start to ready, median, worst variant".into(),
            "≤ 50 ms".into(),
            vec![],
        ),
        (
            "screening on ÷ off, CPU per request (zero-latency stub)".into(),
            "≤ 2.00".into(),
            vec![],
        ),
    ];
    for (_, user, screen, variants) in &sets {
        let cpu = median(&user.cpu_us);
        let ratio = cpu / ncpu;
        let added50 = pct_us(&user.lat_ns, 50.0) - d50;
        let added_ttfb = pct_us(&user.ttfb_ns, 50.0) - dttfb;
        let peak_mb = variants
            .iter()
            .map(|t| t.peak_rss_kb as f64 / 1024.0)
            .fold(0.0, f64::max);
        let ready = variants
            .iter()
            .map(|t| median(&t.ready_ms))
            .fold(0.0, f64::max);
        // Coalescing caused by the machine (a preempted upstream or client) shows on the direct
        // and nginx rows too; the handler must not add to it.
        // Nagle-style coalescing hits a large share of gaps (a third to a half); a preempted
        // client or upstream makes the odd one. Allowed: the noise floor plus 1% of the gaps.
        let worst = variants
            .iter()
            .max_by_key(|t| t.coalesced)
            .expect("a variant");
        let coalesced = worst.coalesced;
        let allowance = floor + worst.gaps_ns.len().div_ceil(100);
        let broken: usize = variants.iter().map(|t| t.streams_bad).sum();
        let screen_ratio = median(&screen.cpu_us) / cpu;
        let cells = [
            format!(
                "{ratio:.2} ({} vs {} µs) {}",
                fmt(cpu, 1),
                fmt(ncpu, 1),
                ok(ratio <= 1.2)
            ),
            format!(
                "{} µs {} · {} µs {}",
                signed(added50, 1),
                ok(added50 <= 100.0),
                signed(one(user), 1),
                ok(one(user) <= 100.0)
            ),
            format!(
                "{} µs {} · {} µs {}",
                signed(added_ttfb, 0),
                ok(added_ttfb <= 300.0),
                signed(one_ttfb(user), 0),
                ok(one_ttfb(user) <= 300.0)
            ),
            format!(
                "{coalesced} of {} {}",
                worst.gaps_ns.len(),
                ok(broken == 0 && coalesced <= allowance)
            ),
            format!("{peak_mb:.1} MB {}", ok(peak_mb <= 30.0)),
            format!("{ready:.1} ms {}", ok(ready <= 50.0)),
            format!(
                "{screen_ratio:.2} ({} vs {} µs) {}",
                fmt(median(&screen.cpu_us), 1),
                fmt(cpu, 1),
                ok(screen_ratio <= 2.0)
            ),
        ];
        for (row, cell) in rows.iter_mut().zip(cells) {
            row.2.push(cell);
        }
    }
    s.push_str(&format!(
        "\n| target (auth + user check unless named) | goal | {} |\n|---|---|{}\n",
        sets.iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(sets.len())
    ));
    for (name, goal, cells) in rows {
        s.push_str(&format!("| {name} | {goal} | {} |\n", cells.join(" | ")));
    }
    s.push_str(&format!(
        "\nOther baselines at 1 connection, proxy on the load core: nginx added p50 {} µs, first byte {} µs.\n",
        signed(one(nginx), 1),
        signed(one_ttfb(nginx), 0)
    ));
    s.push_str(&format!(
        "\nPer-round CPU µs/req (noise check): {}\n",
        ts.iter()
            .map(|t| format!(
                "{}: {}",
                t.name,
                t.cpu_us
                    .iter()
                    .map(|v| format!("{v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    s
}

fn crate_completion_len() -> usize {
    crate::upstream::completion_len()
}
