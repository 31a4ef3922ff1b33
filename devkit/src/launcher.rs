//! `fwdproxy-dev`: the whole set on one machine, one command.
//!
//! ```text
//! client ─▶ gateway emulator 127.0.0.1:8080 (rewrite rules + probe from infra/)
//!             ├─▶ handler #1 (real `handler` process) ─▶ AOAI simulator #1
//!             ├─▶ handler #2 ────────────────────────▶ AOAI simulator #2
//!             └─▶ …            each handler also ─▶ Content Safety simulator (shared)
//! ```
//!
//! Order of start: the gateway's port is bound first (so a busy 8080 fails in milliseconds),
//! then the simulators (in this process), then the `handler` processes (children, see
//! [`crate::procs`]), each waited for on its own health route; then the gateway probes them
//! once and serves, and the set is *ready* when a health request through the gateway's rewrite
//! path answers 200. Ctrl-C, SIGTERM or SIGHUP stop the gateway, then the handlers (SIGTERM,
//! a grace period, SIGKILL), then the simulators.
//!
//! Each handler gets its own settings, as one Function App per AOAI resource does: its own port,
//! its own simulated resource and out key, `USER_CHECK=registered` with `REGISTERED_USERS`,
//! `CONTENT_SAFETY_ENDPOINT`/`CONTENT_SAFETY_KEY` pointing at the simulator, and
//! `AUDIT_LOG_PATH` in its own directory under the run directory, where its log also goes.
//! Handler settings inherited from the caller's environment are removed first, so a stray
//! `COSMOS_ENDPOINT` cannot send the local set's records to a real database.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::appgw::RewriteRules;
use crate::gateway::{self, GatewayConfig, ProbeSettings, RunningGateway};
use crate::procs::{self, Children};
use crate::server::{self, RunningServer};
use crate::sim::aoai::{self, models, AoaiConfig, Deployment, FailureKind};
use crate::sim::content_safety::{self, ContentSafetyConfig, TermsFile};

/// The internal key of the local set (also in `tests/postman/local.postman_environment.json`).
pub const DEFAULT_KEY: &str = "local-dev-internal-key-0001";
pub const DEFAULT_USERS: &str = "alice,bob";
pub const API_VERSION: &str = "2024-10-21";
pub const POSTMAN_ENV: &str = "tests/postman/local.postman_environment.json";
pub const POSTMAN_COLLECTION: &str = "tests/postman/aoai-fwdproxy.postman_collection.json";
const HEALTH_VIA_GATEWAY: &str = "/openai/deployments/health/check";
const HANDLER_HEALTH: &str = "/api/FwdProxy/openai/deployments/health/check";
/// How long one handler may take to answer its health route after spawn.
const HANDLER_READY_TIMEOUT: Duration = Duration::from_secs(30);
const GATEWAY_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Handlers get this long to finish in-flight streams on stop (their SHUTDOWN_GRACE_MS).
const HANDLER_STOP_GRACE: Duration = Duration::from_secs(5);
const MAX_BACKENDS: usize = 16;
/// Run directories kept under `target/fwdproxy-dev` when `--run-dir` is not given.
const KEEP_RUNS: usize = 10;

/// Prefixes and names of handler settings that must not leak in from the caller's environment.
const SCRUBBED_PREFIXES: &[&str] = &[
    "AOAI_",
    "COSMOS_",
    "CONTENT_SAFETY_",
    "AUDIT_",
    "KEY_VAULT",
    "KEYVAULT",
    "IDENTITY_",
    "MSI_",
    "FUNCTIONS_",
];
const SCRUBBED_NAMES: &[&str] = &[
    "USER_CHECK",
    "REGISTERED_USERS",
    "FWDPROXY_LOCAL_SETTINGS",
    "MAX_BODY_BYTES",
    "SHUTDOWN_GRACE_MS",
    "HEALTH_REFLECTS_CAPACITY",
];

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    pub backends: usize,
    pub gateway_port: u16,
    pub handler_port: u16,
    pub aoai_port: u16,
    pub cs_port: u16,
    pub key: String,
    pub users: String,
    pub handler: Option<PathBuf>,
    pub no_build: bool,
    pub run_dir: Option<PathBuf>,
    pub ready_file: Option<PathBuf>,
    pub pass_unmatched: bool,
    pub probe_interval: Option<u64>,
    pub unhealthy_threshold: Option<u32>,
    pub quiet: bool,
    pub ms_per_token: u64,
    pub first_token_ms: u64,
    /// Tokens per minute of each simulated resource: one value for all, or one per backend.
    pub tpm: Vec<u64>,
    /// Requests per minute of each simulated resource, as `tpm`.
    pub rpm: Vec<u64>,
    /// Give each handler its sibling simulated resources as backups (`AOAI_BACKUPS`).
    pub spillover: bool,
    pub fail_rate: f64,
    pub fail_kind: FailureKind,
    pub slow_ms: u64,
    pub deployments: Option<Vec<Deployment>>,
    pub cs_terms: Option<PathBuf>,
    pub cs_fail_rate: f64,
    pub no_content_safety: bool,
    pub handler_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backends: 2,
            gateway_port: 8080,
            handler_port: 0,
            aoai_port: 0,
            cs_port: 0,
            key: DEFAULT_KEY.into(),
            users: DEFAULT_USERS.into(),
            handler: None,
            no_build: false,
            run_dir: None,
            ready_file: None,
            pass_unmatched: false,
            probe_interval: None,
            unhealthy_threshold: None,
            quiet: false,
            ms_per_token: 15,
            first_token_ms: 150,
            tpm: vec![100_000],
            rpm: vec![600],
            spillover: false,
            fail_rate: 0.0,
            fail_kind: FailureKind::Status(500),
            slow_ms: 10_000,
            deployments: None,
            cs_terms: None,
            cs_fail_rate: 0.0,
            no_content_safety: false,
            handler_env: Vec::new(),
        }
    }
}

pub const USAGE: &str = "\
fwdproxy-dev: the whole aoai-fwdproxy set on loopback (gateway emulator, N real handler
processes, one simulated AOAI resource per handler, a Content Safety simulator).

USAGE: cargo run --release --bin fwdproxy-dev -- [OPTIONS]

The set
  --backends N              handler processes, one per simulated AOAI resource [2]
  --gateway-port PORT       gateway emulator port on 127.0.0.1 [8080] (0 = any free port)
  --handler-port PORT       first handler port, +1 per backend [0 = any free ports]
  --aoai-port PORT          first AOAI simulator port, +1 per backend [0 = any]
  --cs-port PORT            Content Safety simulator port [0 = any]
  --key KEY                 internal key callers send as api-key [local-dev-internal-key-0001]
  --users A,B               REGISTERED_USERS of every handler [alice,bob]
  --handler-env NAME=VALUE  extra handler setting (repeatable), e.g. CONTENT_SAFETY_FAIL_OPEN=true
  --handler PATH            handler binary [the one next to this program]
  --no-build                never run `cargo build --bin handler` (fail if it is missing)
  --run-dir DIR             logs and audit files [target/fwdproxy-dev/run-<time>]
  --ready-file PATH         write a JSON description of the set there once it is ready
  --quiet                   no per-request gateway lines
  --spillover               give each handler the other simulated resources as backups, in
                            order from the next one after its own (wrapping): AOAI_BACKUPS with
                            their URLs and AOAI_BACKUP_OUTAPIKEYS with their keys (needs 2+
                            backends). Without it each handler knows only its own resource
Gateway emulator
  --probe-interval SECS     override infra/appgw-probe.json's intervalSeconds
  --unhealthy-threshold N   override infra/appgw-probe.json's unhealthyThreshold
  --pass-unmatched          forward paths no rewrite rule matches unchanged, as AppGW does,
                            instead of answering 404
AOAI simulator
  --ms-per-token MS         time per generated token [15]
  --first-token-ms MS       time to the first token [150]
  --tpm N[,N…]              tokens per minute per deployment, 0 = unlimited [100000]; one value
                            for every resource or one per backend in order (--tpm 1000,40000,40000)
  --rpm N[,N…]              requests per minute per deployment, 0 = unlimited [600]; as --tpm
  --fail-rate F             share of requests (0-1) that fail with --fail-kind [0]
  --fail-kind KIND          500|502|503|504|slow|slow:<ms>|reset [500]
  --slow-ms MS              how long `slow` waits [10000]
  --deployments A,B=MODEL   deployments that exist, each NAME or NAME=MODEL [any name]; the
                            model decides the operations it serves (gpt-4o: chat, responses;
                            gpt-35-turbo-instruct: completions; text-embedding-3-small:
                            embeddings; dall-e-3, gpt-image-1: images; tts-1: speech; whisper:
                            transcriptions), e.g. emb=text-embedding-3-small,img=dall-e-3,tts=tts-1.
                            A name without a model is taken as the model's name
  Per request: headers x-sim-fail: 500|503|slow|slow:<ms>|reset and x-sim-ratelimit: <secs>.
Content Safety simulator
  --cs-terms FILE           terms, jailbreak patterns and blocklists (JSON) [built-in demo list]
  --cs-fail-rate F          share of screening calls answered 503 [0]
  --no-content-safety       run the handlers without screening
  -h, --help                this text
";

impl Options {
    /// Parse `args` (without the program name). `Err` carries the message to print.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut o = Options::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{flag}: {v:?} is not a valid number"))
            }
            fn rate(flag: &str, v: String) -> Result<f64, String> {
                let f: f64 = num(flag, v)?;
                if (0.0..=1.0).contains(&f) {
                    Ok(f)
                } else {
                    Err(format!("{flag} must be between 0 and 1"))
                }
            }
            match flag.as_str() {
                "-h" | "--help" => return Err(USAGE.to_string()),
                "--backends" => o.backends = num(&flag, value(&flag)?)?,
                "--gateway-port" => o.gateway_port = num(&flag, value(&flag)?)?,
                "--handler-port" => o.handler_port = num(&flag, value(&flag)?)?,
                "--aoai-port" => o.aoai_port = num(&flag, value(&flag)?)?,
                "--cs-port" => o.cs_port = num(&flag, value(&flag)?)?,
                "--key" => o.key = value(&flag)?,
                "--users" => o.users = value(&flag)?,
                "--handler-env" => {
                    let v = value(&flag)?;
                    let (k, val) = v
                        .split_once('=')
                        .ok_or_else(|| format!("{flag} takes NAME=VALUE, got {v:?}"))?;
                    o.handler_env.push((k.to_string(), val.to_string()));
                }
                "--handler" => o.handler = Some(PathBuf::from(value(&flag)?)),
                "--no-build" => o.no_build = true,
                "--run-dir" => o.run_dir = Some(PathBuf::from(value(&flag)?)),
                "--ready-file" => o.ready_file = Some(PathBuf::from(value(&flag)?)),
                "--quiet" => o.quiet = true,
                "--probe-interval" => o.probe_interval = Some(num(&flag, value(&flag)?)?),
                "--unhealthy-threshold" => o.unhealthy_threshold = Some(num(&flag, value(&flag)?)?),
                "--pass-unmatched" => o.pass_unmatched = true,
                "--ms-per-token" => o.ms_per_token = num(&flag, value(&flag)?)?,
                "--first-token-ms" => o.first_token_ms = num(&flag, value(&flag)?)?,
                "--tpm" => o.tpm = per_backend(&flag, &value(&flag)?)?,
                "--rpm" => o.rpm = per_backend(&flag, &value(&flag)?)?,
                "--spillover" => o.spillover = true,
                "--fail-rate" => o.fail_rate = rate(&flag, value(&flag)?)?,
                "--fail-kind" => o.fail_kind = value(&flag)?.parse()?,
                "--slow-ms" => o.slow_ms = num(&flag, value(&flag)?)?,
                "--deployments" => o.deployments = Some(models::parse_list(&value(&flag)?)?),
                "--cs-terms" => o.cs_terms = Some(PathBuf::from(value(&flag)?)),
                "--cs-fail-rate" => o.cs_fail_rate = rate(&flag, value(&flag)?)?,
                "--no-content-safety" => o.no_content_safety = true,
                other => return Err(format!("unknown option {other:?}\n\n{USAGE}")),
            }
        }
        if o.backends == 0 || o.backends > MAX_BACKENDS {
            return Err(format!("--backends must be 1-{MAX_BACKENDS}"));
        }
        for (flag, list) in [("--tpm", &o.tpm), ("--rpm", &o.rpm)] {
            if list.len() != 1 && list.len() != o.backends {
                return Err(format!(
                    "{flag} has {} values but there are {} backends (--backends {}): give one \
                     value for all, or exactly one per backend",
                    list.len(),
                    o.backends,
                    o.backends
                ));
            }
        }
        if o.spillover && o.backends < 2 {
            return Err(
                "--spillover needs at least 2 backends: a handler's backups are the other \
                 simulated resources"
                    .into(),
            );
        }
        if o.key.chars().count() < 16 || o.key.contains(char::is_whitespace) {
            return Err(
                "--key must be at least 16 characters without spaces (the handler's rule)".into(),
            );
        }
        for (flag, base) in [
            ("--handler-port", o.handler_port),
            ("--aoai-port", o.aoai_port),
        ] {
            if base != 0 && usize::from(base) + o.backends > 65_535 {
                return Err(format!(
                    "{flag}: {base} + {} backends is past port 65535",
                    o.backends
                ));
            }
        }
        Ok(o)
    }

    /// Tokens per minute of backend `i` (0-based).
    pub fn tpm_of(&self, i: usize) -> u64 {
        pick(&self.tpm, i)
    }

    /// Requests per minute of backend `i` (0-based).
    pub fn rpm_of(&self, i: usize) -> u64 {
        pick(&self.rpm, i)
    }
}

/// One value for all backends, or the `i`-th of one per backend (lengths checked by `parse`).
fn pick(list: &[u64], i: usize) -> u64 {
    match list {
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}

/// `N` or `N,N,…` (spaces around values allowed); every value a whole number.
fn per_backend(flag: &str, v: &str) -> Result<Vec<u64>, String> {
    v.split(',')
        .map(|part| {
            let part = part.trim();
            part.parse::<u64>().map_err(|_| {
                format!("{flag}: {part:?} in {v:?} is not a whole number (give N or N,N,…)")
            })
        })
        .collect()
}

/// The backups of backend `i` among `n`: the others, starting with the next one and wrapping,
/// so each resource is the first backup of exactly one sibling and spilled load spreads out.
pub fn backups_of(i: usize, n: usize) -> Vec<usize> {
    (i + 1..n).chain(0..i.min(n)).collect()
}

/// One backend of the running set.
#[derive(Debug, Clone)]
struct BackendInfo {
    name: String,
    handler_url: String,
    handler_pid: u32,
    aoai_url: String,
    aoai_name: String,
    tpm: u64,
    rpm: u64,
    /// `AOAI_BACKUPS` of this handler (with `--spillover`).
    backups: Option<String>,
    dir: PathBuf,
}

/// One simulated AOAI resource: its name, base URL and key.
#[derive(Debug, Clone)]
pub struct SimResource {
    pub name: String,
    pub url: String,
    pub key: String,
}

/// The Content Safety simulator as handlers' settings name it.
#[derive(Debug, Clone)]
pub struct ScreeningRef {
    pub url: String,
    pub key: String,
    /// Blocklist names, comma-separated (may be empty).
    pub blocklists: String,
}

/// The settings handler `i` (0-based) of the set starts with: its own port and resource, the
/// internal key and users, screening, its audit file under `dir`; with `--spillover` its
/// backups (the sibling resources from [`backups_of`], URLs in `AOAI_BACKUPS` and keys in
/// `AOAI_BACKUP_OUTAPIKEYS`, same order, comma-separated); last `--handler-env`, which wins.
pub fn handler_settings(
    opts: &Options,
    i: usize,
    resources: &[SimResource],
    screening: Option<&ScreeningRef>,
    dir: &Path,
) -> BTreeMap<String, String> {
    // 0: the handler binds any free port and names it in its ready log line, read by the
    // launcher (binding a probe socket and dropping it would race other processes for it).
    let handler_port = if opts.handler_port == 0 {
        0
    } else {
        opts.handler_port + i as u16
    };
    let own = &resources[i];
    let mut settings: BTreeMap<String, String> = BTreeMap::new();
    settings.insert(
        "FUNCTIONS_CUSTOMHANDLER_PORT".into(),
        handler_port.to_string(),
    );
    settings.insert("AOAI_HOSTNAME".into(), own.url.clone());
    settings.insert("AOAI_INAPIKEY".into(), opts.key.clone());
    settings.insert("AOAI_OUTAPIKEY".into(), own.key.clone());
    if opts.spillover {
        let backups: Vec<&SimResource> = backups_of(i, resources.len())
            .into_iter()
            .map(|j| &resources[j])
            .collect();
        let join = |f: fn(&SimResource) -> &str| {
            backups.iter().map(|r| f(r)).collect::<Vec<_>>().join(",")
        };
        settings.insert("AOAI_BACKUPS".into(), join(|r| &r.url));
        settings.insert("AOAI_BACKUP_OUTAPIKEYS".into(), join(|r| &r.key));
    }
    settings.insert("USER_CHECK".into(), "registered".into());
    settings.insert("REGISTERED_USERS".into(), opts.users.clone());
    if let Some(cs) = screening {
        settings.insert("CONTENT_SAFETY_ENDPOINT".into(), cs.url.clone());
        settings.insert("CONTENT_SAFETY_KEY".into(), cs.key.clone());
        if !cs.blocklists.is_empty() {
            settings.insert("CONTENT_SAFETY_BLOCKLISTS".into(), cs.blocklists.clone());
        }
    }
    settings.insert(
        "AUDIT_LOG_PATH".into(),
        dir.join("audit.jsonl").display().to_string(),
    );
    settings.insert(
        "SHUTDOWN_GRACE_MS".into(),
        HANDLER_STOP_GRACE.as_millis().to_string(),
    );
    for (k, v) in &opts.handler_env {
        settings.insert(k.clone(), v.clone());
    }
    settings
}

/// Everything the set runs; dropping it stops everything.
struct Set {
    gateway: Option<RunningGateway>,
    children: Children,
    sims: Vec<RunningServer>,
}

impl Set {
    async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        // Blocking but bounded (grace + 1 s); run on this (main) thread, which owns the children.
        self.children.terminate(HANDLER_STOP_GRACE);
        for s in self.sims.drain(..) {
            s.stop().await;
        }
    }
}

/// Run the set until a stop signal. `Err` carries a message for the user.
pub async fn run(opts: Options, started: Instant) -> Result<(), String> {
    procs::install_panic_hook();
    let handler = find_or_build_handler(&opts)?;
    let build_done = started.elapsed();

    let run_dir = match &opts.run_dir {
        Some(d) => d.clone(),
        None => {
            let dir = default_run_dir();
            if let Some(parent) = dir.parent() {
                prune_old_runs(parent, KEEP_RUNS - 1);
            }
            dir
        }
    };
    fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create the run directory {}: {e}", run_dir.display()))?;
    let run_dir = run_dir.canonicalize().unwrap_or(run_dir);

    // The gateway port first: the one most likely to be taken.
    let gateway_listener = server::bind_loopback(opts.gateway_port)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on 127.0.0.1:{} for the gateway emulator: {e}\n\
             (is another fwdproxy-dev running? choose another port with --gateway-port)",
                opts.gateway_port
            )
        })?;

    let mut set = Set {
        gateway: None,
        children: Children::new(),
        sims: Vec::new(),
    };

    let cs_key = "local-content-safety-key-0001".to_string();
    let mut blocklists = String::new();
    let cs_url = if opts.no_content_safety {
        None
    } else {
        let terms = match &opts.cs_terms {
            Some(path) => {
                let text = fs::read_to_string(path)
                    .map_err(|e| format!("--cs-terms {}: {e}", path.display()))?;
                TermsFile::from_json(&text)
                    .map_err(|e| format!("--cs-terms {}: {e}", path.display()))?
            }
            None => TermsFile::demo(),
        };
        blocklists = terms
            .blocklists
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        let (server, _sim) = content_safety::start(
            ContentSafetyConfig {
                key: cs_key.clone(),
                terms,
                failure_rate: opts.cs_fail_rate,
            },
            opts.cs_port,
        )
        .await
        .map_err(|e| format!("Content Safety simulator on port {}: {e}", opts.cs_port))?;
        let url = server.url();
        set.sims.push(server);
        Some(url)
    };

    // Every simulated resource first: with --spillover each handler's settings name its siblings.
    let mut resources = Vec::new();
    for i in 0..opts.backends {
        let n = i + 1;
        let port = if opts.aoai_port == 0 {
            0
        } else {
            opts.aoai_port + i as u16
        };
        let name = format!("aoai-sim-{n}");
        let key = format!("sim-aoai-{n}-out-key-0123456789");
        let (server, _sim) = aoai::start(
            AoaiConfig {
                name: name.clone(),
                region: format!("local-{n}"),
                key: key.clone(),
                deployments: opts.deployments.clone(),
                time_per_token: Duration::from_millis(opts.ms_per_token),
                first_token: Duration::from_millis(opts.first_token_ms),
                tpm: opts.tpm_of(i),
                rpm: opts.rpm_of(i),
                failure_rate: opts.fail_rate,
                failure_kind: opts.fail_kind,
                slow: Duration::from_millis(opts.slow_ms),
            },
            port,
        )
        .await
        .map_err(|e| format!("AOAI simulator {n} on port {port}: {e}"))?;
        resources.push(SimResource {
            name,
            url: server.url(),
            key,
        });
        set.sims.push(server);
    }
    let screening = cs_url.as_ref().map(|url| ScreeningRef {
        url: url.clone(),
        key: cs_key.clone(),
        blocklists: blocklists.clone(),
    });

    let mut backends = Vec::new();
    for i in 0..opts.backends {
        let n = i + 1;
        let dir = run_dir.join(format!("backend-{n}"));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let settings = handler_settings(&opts, i, &resources, screening.as_ref(), &dir);
        let handler_port: u16 = settings["FUNCTIONS_CUSTOMHANDLER_PORT"]
            .parse()
            .unwrap_or(0);
        write_settings_file(&dir, &settings);

        let log_path = dir.join("handler.log");
        let log_start = fs::metadata(&log_path).map_or(0, |m| m.len());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut cmd = Command::new(&handler);
        cmd.current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        for (k, _) in std::env::vars() {
            if SCRUBBED_PREFIXES.iter().any(|p| k.starts_with(p))
                || SCRUBBED_NAMES.contains(&k.as_str())
            {
                cmd.env_remove(&k);
            }
        }
        cmd.envs(&settings);
        let name = format!("handler-{n}");
        let pid = set
            .children
            .spawn(&name, cmd)
            .map_err(|e| format!("cannot start {}: {e}", handler.display()))?;
        let handler_port = if handler_port == 0 {
            match ready_port(&name, &log_path, log_start, &mut set.children).await {
                Ok(port) => port,
                Err(e) => {
                    set.stop().await;
                    return Err(e);
                }
            }
        } else {
            handler_port
        };
        backends.push(BackendInfo {
            name,
            handler_url: format!("http://127.0.0.1:{handler_port}"),
            handler_pid: pid,
            aoai_url: resources[i].url.clone(),
            aoai_name: resources[i].name.clone(),
            tpm: opts.tpm_of(i),
            rpm: opts.rpm_of(i),
            backups: settings.get("AOAI_BACKUPS").cloned(),
            dir,
        });
    }

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    for b in &backends {
        if let Err(e) = wait_handler(&client, b, &mut set.children).await {
            set.stop().await;
            return Err(e);
        }
    }

    let mut probe = ProbeSettings::load_default()?;
    if let Some(s) = opts.probe_interval {
        probe.interval = Duration::from_secs(s.max(1));
    }
    if let Some(n) = opts.unhealthy_threshold {
        probe.unhealthy_threshold = n.max(1);
    }
    let gateway = gateway::start(
        GatewayConfig {
            backends: backends.iter().map(|b| b.handler_url.clone()).collect(),
            rules: Arc::new(RewriteRules::load_default().map_err(|e| e.to_string())?),
            probe: probe.clone(),
            request_timeout: gateway::DEFAULT_REQUEST_TIMEOUT,
            pass_unmatched: opts.pass_unmatched,
            access_log: !opts.quiet,
        },
        gateway_listener,
    )
    .await
    .map_err(|e| format!("gateway emulator: {e}"))?;
    let gateway_url = gateway.url();
    set.gateway = Some(gateway);

    if let Err(e) = wait_gateway(&client, &gateway_url).await {
        set.stop().await;
        return Err(e);
    }
    let ready = started.elapsed();

    print_banner(&Banner {
        opts: &opts,
        gateway_url: &gateway_url,
        backends: &backends,
        cs_url: cs_url.as_deref(),
        run_dir: &run_dir,
        probe: &probe,
        ready,
        build: build_done,
    });
    if let Some(path) = &opts.ready_file {
        write_ready_file(
            path,
            &opts,
            &gateway_url,
            &backends,
            cs_url.as_deref(),
            &run_dir,
            ready,
        )?;
    }

    let outcome = wait_for_stop(&mut set.children).await;
    println!("\nstopping the set ({outcome}) …");
    set.stop().await;
    println!(
        "stopped: gateway, {} handler(s), simulators.",
        backends.len()
    );
    Ok(())
}

/// Wait for Ctrl-C, SIGTERM or SIGHUP, reporting handlers that exit meanwhile.
async fn wait_for_stop(children: &mut Children) -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut hup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(h)) => (t, h),
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                return "Ctrl-C";
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return "Ctrl-C",
                _ = term.recv() => return "SIGTERM",
                _ = hup.recv() => return "SIGHUP",
                _ = tick.tick() => {
                    for (name, pid, status) in children.newly_exited() {
                        eprintln!(
                            "[fwdproxy-dev] {name} (pid {pid}) exited unexpectedly: {status}; \
                             the gateway takes it out of rotation after its failed probes"
                        );
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = children;
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

fn default_run_dir() -> PathBuf {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
        .filter(|t| t.file_name().is_some_and(|n| n == "target"))
        .unwrap_or_else(std::env::temp_dir);
    target
        .join("fwdproxy-dev")
        .join(format!("run-{stamp}-{}", std::process::id()))
}

/// Remove all but the newest `keep` `run-*` directories under `parent` (names start with the
/// start time in seconds, so they sort by age).
fn prune_old_runs(parent: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let mut runs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("run-"))
        })
        .collect();
    runs.sort();
    let excess = runs.len().saturating_sub(keep);
    for old in runs.into_iter().take(excess) {
        let _ = fs::remove_dir_all(old);
    }
}

/// The settings each handler got, for the curious (keys included: they are local demo keys).
fn write_settings_file(dir: &Path, settings: &BTreeMap<String, String>) {
    let doc = serde_json::json!({"IsEncrypted": false, "Values": settings});
    let _ = fs::write(
        dir.join("settings.json"),
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    );
}

/// The handler next to this program, built when missing (or, under `cargo run`, refreshed so
/// the set runs the code in the working tree).
fn find_or_build_handler(opts: &Options) -> Result<PathBuf, String> {
    if let Some(path) = &opts.handler {
        return if path.is_file() {
            Ok(path.clone())
        } else {
            Err(format!("--handler {}: no such file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this program: {e}"))?;
    let dir = exe
        .parent()
        .ok_or("cannot locate this program's directory")?
        .to_path_buf();
    let handler = dir.join(format!("handler{}", std::env::consts::EXE_SUFFIX));
    let under_cargo = std::env::var_os("CARGO").is_some();
    if opts.no_build || (handler.is_file() && !under_cargo) {
        return if handler.is_file() {
            Ok(handler)
        } else {
            Err(format!(
                "{} is missing: build it with `cargo build --release --bin handler`",
                handler.display()
            ))
        };
    }
    let release = dir.file_name().is_some_and(|n| n == "release");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or("cannot locate the workspace")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--bin", "handler"]);
    if release {
        cmd.arg("--release");
    }
    println!(
        "[fwdproxy-dev] {} the handler: cargo build{} --bin handler (a first release build takes minutes) …",
        if handler.is_file() { "checking" } else { "building" },
        if release { " --release" } else { "" }
    );
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo to build the handler: {e}"))?;
    if !status.success() || !handler.is_file() {
        return Err(format!(
            "building the handler failed ({status}); try `cargo build --release --bin handler`"
        ));
    }
    Ok(handler)
}

/// The port a handler started with `FUNCTIONS_CUSTOMHANDLER_PORT=0` listens on, from the `addr`
/// of its `ready` log line (written after `start` bytes of its log).
async fn ready_port(
    name: &str,
    log_path: &Path,
    start: u64,
    children: &mut Children,
) -> Result<u16, String> {
    let deadline = Instant::now() + HANDLER_READY_TIMEOUT;
    while Instant::now() < deadline {
        let text = fs::read(log_path).unwrap_or_default();
        let fresh = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default());
        let port = fresh
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "ready")
            .and_then(|v| v["addr"].as_str()?.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
            .filter(|p| *p != 0);
        if let Some(port) = port {
            return Ok(port);
        }
        if let Some(status) = children.exit_status(name) {
            return Err(format!(
                "{name} exited during start ({status}). Its log ({}):\n{}",
                log_path.display(),
                tail(log_path, 20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!(
        "{name} did not log its ready line within {} s. Its log:\n{}",
        HANDLER_READY_TIMEOUT.as_secs(),
        tail(log_path, 20)
    ))
}

async fn wait_handler(
    client: &reqwest::Client,
    b: &BackendInfo,
    children: &mut Children,
) -> Result<(), String> {
    let url = format!("{}{HANDLER_HEALTH}", b.handler_url);
    let deadline = Instant::now() + HANDLER_READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = children.exit_status(&b.name) {
            return Err(format!(
                "{} exited during start ({status}). Its log ({}):\n{}",
                b.name,
                b.dir.join("handler.log").display(),
                tail(&b.dir.join("handler.log"), 20)
            ));
        }
        if let Ok(r) = client.get(&url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!(
        "{} did not answer {url} within {} s. Its log:\n{}",
        b.name,
        HANDLER_READY_TIMEOUT.as_secs(),
        tail(&b.dir.join("handler.log"), 20)
    ))
}

async fn wait_gateway(client: &reqwest::Client, gateway_url: &str) -> Result<(), String> {
    let url = format!("{gateway_url}{HEALTH_VIA_GATEWAY}");
    let deadline = Instant::now() + GATEWAY_READY_TIMEOUT;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "the gateway did not answer {url} with 200 within {} s (last: {last})",
        GATEWAY_READY_TIMEOUT.as_secs()
    ))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct Banner<'a> {
    opts: &'a Options,
    gateway_url: &'a str,
    backends: &'a [BackendInfo],
    cs_url: Option<&'a str>,
    run_dir: &'a Path,
    probe: &'a ProbeSettings,
    ready: Duration,
    build: Duration,
}

fn print_banner(b: &Banner<'_>) {
    let o = b.opts;
    let mut out = String::new();
    let users: Vec<&str> = o.users.split(',').map(str::trim).collect();
    out.push_str(&format!(
        "\naoai-fwdproxy local set is ready in {:.2} s ({:.2} s of it checking/building the handler)\n\n",
        b.ready.as_secs_f64(),
        b.build.as_secs_f64()
    ));
    out.push_str(&format!(
        "  Gateway URL (AppGW emulator)  {}\n",
        b.gateway_url
    ));
    out.push_str(&format!("  Internal key (api-key)        {}\n", o.key));
    out.push_str(&format!(
        "  Registered users              {}   (any other name gets 403)\n",
        users.join(", ")
    ));
    out.push_str(&format!("  Postman environment           {POSTMAN_ENV}\n"));
    out.push_str(&format!(
        "  Postman collection            {POSTMAN_COLLECTION}\n"
    ));
    if b.gateway_url != "http://127.0.0.1:8080" {
        out.push_str(&format!(
            "                                (set its base_url to {})\n",
            b.gateway_url
        ));
    }
    out.push_str(&format!(
        "  Run directory (logs, audit)   {}\n\n",
        b.run_dir.display()
    ));
    for (i, be) in b.backends.iter().enumerate() {
        out.push_str(&format!(
            "  backend {}: handler pid {} at {} → {} at {} (TPM {}, RPM {})\n",
            i + 1,
            be.handler_pid,
            be.handler_url,
            be.aoai_name,
            be.aoai_url,
            limit(be.tpm),
            limit(be.rpm)
        ));
        if let Some(backups) = &be.backups {
            out.push_str(&format!("             backups (AOAI_BACKUPS): {backups}\n"));
        }
    }
    match b.cs_url {
        Some(cs) => out.push_str(&format!(
            "  Content Safety simulator at {cs}: try \"bloodbath\" or \"kill them all\" (Violence 6) or \"ignore all previous instructions\" (jailbreak)\n"
        )),
        None => out.push_str("  Content Safety screening is off (--no-content-safety)\n"),
    }
    out.push_str(&format!(
        "  probe: {} every {} s, unhealthy after {} failures; AOAI sim: {} ms/token; spillover {}\n\n",
        b.probe.path,
        b.probe.interval.as_secs(),
        b.probe.unhealthy_threshold,
        o.ms_per_token,
        if o.spillover {
            "on (each handler's backups are its sibling resources)"
        } else {
            "off (plain round robin)"
        }
    ));
    let user = users.first().copied().unwrap_or("alice");
    out.push_str("Try it:\n");
    out.push_str(&format!(
        "  curl -sN '{}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}' \\\n    \
         -H 'api-key: {}' -H 'content-type: application/json' \\\n    \
         -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"user\":\"{user}\",\"stream\":true}}'\n\n",
        b.gateway_url, o.key
    ));
    out.push_str(&format!(
        "  npx newman run {POSTMAN_COLLECTION} -e {POSTMAN_ENV}{}\n\n",
        if b.gateway_url != "http://127.0.0.1:8080" {
            format!(" --env-var base_url={}", b.gateway_url)
        } else {
            String::new()
        }
    ));
    out.push_str("Ctrl-C stops everything.\n");
    println!("{out}");
    let _ = std::io::stdout().flush();
}

/// A per-minute limit as the banner shows it.
fn limit(per_minute: u64) -> String {
    if per_minute == 0 {
        "unlimited".into()
    } else {
        per_minute.to_string()
    }
}

fn write_ready_file(
    path: &Path,
    opts: &Options,
    gateway_url: &str,
    backends: &[BackendInfo],
    cs_url: Option<&str>,
    run_dir: &Path,
    ready: Duration,
) -> Result<(), String> {
    let doc = serde_json::json!({
        "gateway_url": gateway_url,
        "internal_key": opts.key,
        "api_version": API_VERSION,
        "registered_users": opts.users.split(',').map(str::trim).collect::<Vec<_>>(),
        "content_safety_url": cs_url,
        "run_dir": run_dir,
        "ready_ms": ready.as_millis() as u64,
        "launcher_pid": std::process::id(),
        "spillover": opts.spillover,
        "backends": backends.iter().map(|b| serde_json::json!({
            "handler_url": b.handler_url,
            "handler_pid": b.handler_pid,
            "aoai_url": b.aoai_url,
            "aoai_name": b.aoai_name,
            "tpm": b.tpm,
            "rpm": b.rpm,
            "backups": b.backups,
            "dir": b.dir,
        })).collect::<Vec<_>>(),
    });
    // Written whole then renamed, so a watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap_or_default())
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|e| format!("--ready-file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn no_arguments_give_the_documented_defaults() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.backends, 2);
        assert_eq!(o.gateway_port, 8080);
        assert_eq!(o.key, DEFAULT_KEY);
        assert_eq!(o.users, "alice,bob");
    }

    #[test]
    fn flags_parse_in_both_spellings() {
        let o = parse(&[
            "--backends",
            "3",
            "--gateway-port=0",
            "--ms-per-token",
            "2",
            "--fail-kind",
            "reset",
            "--fail-rate=0.25",
            "--handler-env",
            "CONTENT_SAFETY_FAIL_OPEN=true",
            "--deployments",
            "gpt-4o, emb=text-embedding-3-small",
        ])
        .unwrap();
        assert_eq!(o.backends, 3);
        assert_eq!(o.gateway_port, 0);
        assert_eq!(o.ms_per_token, 2);
        assert_eq!(o.fail_kind, FailureKind::Reset);
        assert_eq!(o.fail_rate, 0.25);
        assert_eq!(
            o.handler_env,
            vec![("CONTENT_SAFETY_FAIL_OPEN".into(), "true".into())]
        );
        assert_eq!(
            o.deployments.unwrap(),
            vec![
                Deployment::named("gpt-4o"),
                Deployment {
                    name: "emb".into(),
                    model: "text-embedding-3-small".into()
                }
            ]
        );
    }

    #[test]
    fn old_runs_are_pruned_to_the_newest() {
        let root = std::env::temp_dir().join(format!("fwdproxy-prune-{}", std::process::id()));
        for n in ["run-100-1", "run-200-1", "run-300-1", "other"] {
            fs::create_dir_all(root.join(n)).unwrap();
        }
        prune_old_runs(&root, 2);
        let mut left: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["other", "run-200-1", "run-300-1"]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn tpm_and_rpm_take_one_value_for_all_or_one_per_backend() {
        let o = parse(&["--backends", "3", "--tpm", "1000,40000, 40000", "--rpm=6"]).unwrap();
        assert_eq!(o.tpm, [1000, 40_000, 40_000]);
        assert_eq!(
            (0..3).map(|i| o.tpm_of(i)).collect::<Vec<_>>(),
            [1000, 40_000, 40_000]
        );
        assert_eq!((0..3).map(|i| o.rpm_of(i)).collect::<Vec<_>>(), [6, 6, 6]);
        // The flag may come before --backends: the count is checked once all flags are read.
        let o = parse(&["--rpm", "1,2", "--backends", "2"]).unwrap();
        assert_eq!((o.rpm_of(0), o.rpm_of(1)), (1, 2));
        // Defaults: one value for every backend.
        let o = parse(&["--backends", "4"]).unwrap();
        assert!((0..4).all(|i| o.tpm_of(i) == 100_000 && o.rpm_of(i) == 600));
        // 0 = unlimited is a value like any other.
        assert_eq!(parse(&["--tpm", "0,5"]).unwrap().tpm, [0, 5]);
    }

    #[test]
    fn a_per_backend_count_that_does_not_match_is_a_usage_error() {
        for (args, says) in [
            (
                &["--backends", "3", "--tpm", "1,2"][..],
                "--tpm has 2 values but there are 3",
            ),
            (
                &["--tpm", "1,2,3"][..],
                "--tpm has 3 values but there are 2",
            ),
            (
                &["--backends", "1", "--rpm", "1,1"][..],
                "--rpm has 2 values but there are 1",
            ),
            (&["--tpm", "1,,2"][..], "not a whole number"),
            (&["--tpm", "1,2,"][..], "not a whole number"),
            (&["--tpm", ""][..], "not a whole number"),
            (&["--rpm", "-1,2"][..], "not a whole number"),
            (&["--tpm", "1.5,2"][..], "not a whole number"),
            (&["--tpm", "1;2"][..], "not a whole number"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }

    #[test]
    fn spillover_needs_siblings() {
        assert!(parse(&["--spillover"]).unwrap().spillover);
        assert!(!parse(&[]).unwrap().spillover);
        let err = parse(&["--spillover", "--backends", "1"]).unwrap_err();
        assert!(err.contains("at least 2 backends"), "{err}");
    }

    #[test]
    fn backups_are_the_others_from_the_next_one_wrapping() {
        assert_eq!(backups_of(0, 3), [1, 2]);
        assert_eq!(backups_of(1, 3), [2, 0]);
        assert_eq!(backups_of(2, 3), [0, 1]);
        assert_eq!(backups_of(0, 1), Vec::<usize>::new());
        for n in 1..=MAX_BACKENDS {
            let mut first_backups = Vec::new();
            for i in 0..n {
                let b = backups_of(i, n);
                // every sibling once, never itself
                assert_eq!(b.len(), n - 1);
                assert!(!b.contains(&i));
                let mut sorted = b.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), n - 1);
                first_backups.extend(b.first().copied());
            }
            // each resource is the first backup of exactly one sibling
            first_backups.sort_unstable();
            if n > 1 {
                assert_eq!(first_backups, (0..n).collect::<Vec<_>>());
            }
        }
    }

    fn resources(n: usize) -> Vec<SimResource> {
        (1..=n)
            .map(|k| SimResource {
                name: format!("aoai-sim-{k}"),
                url: format!("http://127.0.0.1:{}", 9000 + k),
                key: format!("key-{k}"),
            })
            .collect()
    }

    #[test]
    fn spillover_gives_each_handler_its_siblings_with_their_keys_in_order() {
        let o = parse(&["--backends", "3", "--spillover"]).unwrap();
        let r = resources(3);
        let dir = Path::new("/tmp/x");
        let expect = [
            (
                0,
                "http://127.0.0.1:9002,http://127.0.0.1:9003",
                "key-2,key-3",
            ),
            (
                1,
                "http://127.0.0.1:9003,http://127.0.0.1:9001",
                "key-3,key-1",
            ),
            (
                2,
                "http://127.0.0.1:9001,http://127.0.0.1:9002",
                "key-1,key-2",
            ),
        ];
        for (i, urls, keys) in expect {
            let s = handler_settings(&o, i, &r, None, dir);
            assert_eq!(s["AOAI_HOSTNAME"], r[i].url);
            assert_eq!(s["AOAI_OUTAPIKEY"], r[i].key);
            assert_eq!(s["AOAI_BACKUPS"], urls, "handler {i}");
            assert_eq!(s["AOAI_BACKUP_OUTAPIKEYS"], keys, "handler {i}");
            // key i of the list belongs to URL i of the list
            for (url, key) in s["AOAI_BACKUPS"]
                .split(',')
                .zip(s["AOAI_BACKUP_OUTAPIKEYS"].split(','))
            {
                let owner = r.iter().find(|x| x.url == url).unwrap();
                assert_eq!(owner.key, key);
            }
            // keyed backups follow AOAI_AUTH=key, the default: nothing else is set for them
            assert!(!s.contains_key("AOAI_AUTH"));
            assert!(!s.contains_key("HEALTH_REFLECTS_CAPACITY"));
        }
    }

    #[test]
    fn without_spillover_no_handler_has_backups() {
        let o = parse(&["--backends", "3"]).unwrap();
        let r = resources(3);
        for i in 0..3 {
            let s = handler_settings(&o, i, &r, None, Path::new("/tmp/x"));
            assert!(s.keys().all(|k| !k.starts_with("AOAI_BACKUP")), "{s:?}");
            assert_eq!(s["AOAI_HOSTNAME"], r[i].url);
        }
    }

    #[test]
    fn handler_settings_carry_the_set_and_handler_env_wins() {
        let o = parse(&[
            "--backends",
            "2",
            "--spillover",
            "--handler-port",
            "7100",
            "--handler-env",
            "HEALTH_REFLECTS_CAPACITY=true",
            "--handler-env",
            "AOAI_BACKUPS=http://127.0.0.1:1",
        ])
        .unwrap();
        let cs = ScreeningRef {
            url: "http://127.0.0.1:5000".into(),
            key: "cs-key".into(),
            blocklists: String::new(),
        };
        let s = handler_settings(&o, 1, &resources(2), Some(&cs), Path::new("/run/backend-2"));
        assert_eq!(s["FUNCTIONS_CUSTOMHANDLER_PORT"], "7101");
        assert_eq!(s["AOAI_INAPIKEY"], DEFAULT_KEY);
        assert_eq!(s["USER_CHECK"], "registered");
        assert_eq!(s["REGISTERED_USERS"], "alice,bob");
        assert_eq!(s["CONTENT_SAFETY_ENDPOINT"], cs.url);
        assert_eq!(s["CONTENT_SAFETY_KEY"], "cs-key");
        assert!(!s.contains_key("CONTENT_SAFETY_BLOCKLISTS"));
        assert_eq!(s["AUDIT_LOG_PATH"], "/run/backend-2/audit.jsonl");
        assert_eq!(s["HEALTH_REFLECTS_CAPACITY"], "true");
        assert_eq!(s["AOAI_BACKUPS"], "http://127.0.0.1:1");
        // the keys stay those of the set's siblings; the user overrode only the URLs
        assert_eq!(s["AOAI_BACKUP_OUTAPIKEYS"], "key-1");
    }

    #[test]
    fn stray_spillover_settings_of_the_caller_are_scrubbed() {
        for name in [
            "AOAI_BACKUPS",
            "AOAI_BACKUP_OUTAPIKEYS",
            "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS",
            "HEALTH_REFLECTS_CAPACITY",
        ] {
            assert!(
                SCRUBBED_PREFIXES.iter().any(|p| name.starts_with(p))
                    || SCRUBBED_NAMES.contains(&name),
                "{name}"
            );
        }
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        assert!(parse(&["--backends", "0"]).is_err());
        assert!(parse(&["--backends"])
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse(&["--fail-rate", "2"]).is_err());
        assert!(parse(&["--fail-kind", "404"]).is_err());
        assert!(parse(&["--key", "short"]).is_err());
        assert!(parse(&["--what"]).unwrap_err().contains("unknown option"));
        assert!(parse(&["--help"]).unwrap_err().contains("USAGE"));
        assert!(parse(&["--handler-port", "65535", "--backends", "2"]).is_err());
        assert!(parse(&["--deployments", "emb=a/b"]).is_err());
        assert!(parse(&["--deployments", "x,x=gpt-4o"]).is_err());
    }
}
