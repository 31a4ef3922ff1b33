//! The real `handler` binary, started as the Functions host starts it (settings from the
//! environment only, in a directory without `local.settings.json`) on port 0: the port is read
//! back from its `ready` log line, never guessed by binding and dropping a socket.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wait::{eventually_blocking, PATIENCE};

pub const HANDLER: &str = env!("CARGO_BIN_EXE_handler");

/// A fresh directory for one handler's abuse journal: a journal is locked by the process using
/// it, so concurrent handlers on the default place would refuse to start.
fn unique_audit_dir() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("fwdproxy-handler-{}-{n}", std::process::id()))
}

/// A `handler` command with exactly these variables (plus `PATH`, and its own `AUDIT_DIR`
/// unless `envs` names one), run in `dir`.
pub fn command(dir: &Path, envs: &[(String, String)]) -> Command {
    let mut cmd = Command::new(HANDLER);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AUDIT_DIR", unique_audit_dir())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// A running handler process; killed when dropped.
pub struct Handler {
    pub child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    addr: Option<SocketAddr>,
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(l) => sink.lock().unwrap().push(l),
                Err(_) => return,
            }
        }
    });
    lines
}

/// The address named by the `ready` log line among `lines`, once it was written.
fn ready_addr(lines: &Mutex<Vec<String>>) -> Option<SocketAddr> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "ready")
        .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()))
}

impl Handler {
    /// Spawn with `envs`; `FUNCTIONS_CUSTOMHANDLER_PORT` is 0 unless `envs` sets it.
    pub fn spawn_in(dir: &Path, envs: &[(String, String)]) -> Self {
        let mut envs = envs.to_vec();
        if !envs
            .iter()
            .any(|(k, _)| k == "FUNCTIONS_CUSTOMHANDLER_PORT")
        {
            envs.push(("FUNCTIONS_CUSTOMHANDLER_PORT".into(), "0".into()));
        }
        let mut child = command(dir, &envs).spawn().unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Handler {
            child,
            stdout,
            stderr,
            addr: None,
        }
    }

    /// Spawn in the system temp directory (no `local.settings.json` there).
    pub fn spawn(envs: &[(String, String)]) -> Self {
        Self::spawn_in(&std::env::temp_dir(), envs)
    }

    /// Wait (bounded) for the `ready` log line and return the address it names.
    pub fn ready(&mut self) -> SocketAddr {
        if let Some(a) = self.addr {
            return a;
        }
        let mut exited = None;
        let (stdout, child) = (&self.stdout, &mut self.child);
        let found = eventually_blocking(PATIENCE, || {
            if ready_addr(stdout).is_some() {
                return true;
            }
            exited = child.try_wait().unwrap();
            exited.is_some()
        });
        let addr = ready_addr(&self.stdout).unwrap_or_else(|| {
            panic!(
                "handler not ready (found: {found}, exited: {exited:?}); stdout: {:?} stderr: {:?}",
                self.stdout_lines(),
                self.stderr_lines()
            )
        });
        assert_ne!(
            addr.port(),
            0,
            "the ready line names the port it listens on"
        );
        self.addr = Some(addr);
        addr
    }

    /// `http://addr{path}` of the ready handler.
    pub fn url(&mut self, path_and_query: &str) -> String {
        format!("http://{}{}", self.ready(), path_and_query)
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The JSON log lines so far; a stdout line that is not JSON fails the test.
    pub fn log(&self) -> Vec<serde_json::Value> {
        self.stdout_lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Wait (bounded) until a log line satisfies `pred`.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        assert!(
            eventually_blocking(PATIENCE, || self.log().iter().any(&pred)),
            "no log line {what}: {:?}",
            self.stdout_lines()
        );
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait (bounded) for the process to exit; once it has, every output line was collected.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut status = None;
        let exited = eventually_blocking(within, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        if !exited {
            let _ = self.child.kill();
            panic!("handler did not exit within {within:?}");
        }
        // The reader threads end at EOF, which follows the exit closely; wait for it (bounded).
        eventually_blocking(PATIENCE, || {
            Arc::strong_count(&self.stdout) == 1 && Arc::strong_count(&self.stderr) == 1
        });
        status.unwrap()
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the handler to its exit with exactly `envs` (a refused start): status, stdout, stderr.
pub fn run_to_exit(envs: &[(String, String)]) -> (ExitStatus, String, String) {
    let mut h = Handler::spawn(envs);
    let status = h.wait_exit(PATIENCE);
    (
        status,
        h.stdout_lines().join("\n"),
        h.stderr_lines().join("\n"),
    )
}
