//! The launcher's child processes, and the guarantee that none outlives the launcher.
//!
//! Four layers, because each covers a way the others can miss:
//! 1. Every child runs in **its own process group** (`setpgid`), so a terminal's Ctrl-C reaches
//!    only the launcher, which then stops the children in order (SIGTERM, a grace period for
//!    in-flight streams, then SIGKILL) instead of everything dying at once mid-request.
//! 2. [`Children`] stops them all when dropped: a normal return, an error, or a panic that
//!    unwinds through `main`.
//! 3. A **panic hook** SIGKILLs every live child group first, for a panic on another thread or
//!    one that aborts instead of unwinding.
//! 4. On Linux each child asks the kernel for **`PR_SET_PDEATHSIG`** = SIGTERM, so even a
//!    SIGKILLed launcher takes its children with it. (The signal fires when the *thread* that
//!    forked exits; children are therefore spawned from the main thread only, which lives as
//!    long as the process.)

use std::io;
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Process group ids of live children, for the panic hook.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// SIGKILL every live child's process group. Safe to call from a panic hook.
pub fn kill_all_now() {
    let pids = match LIVE.try_lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(_) => return,
    };
    for pid in pids {
        signal_group(pid, Signal::Kill);
    }
}

/// Chain a hook that kills every child before the default panic message.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_all_now();
        previous(info);
    }));
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Term,
    Kill,
}

#[cfg(unix)]
fn signal_group(pid: u32, signal: Signal) {
    let sig = match signal {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    // The group id is our own child's pid (setpgid(0, 0) in the child), never 0 or 1.
    unsafe {
        libc::kill(-pid, sig);
    }
}

#[cfg(not(unix))]
fn signal_group(_pid: u32, _signal: Signal) {}

/// One started child.
pub struct ChildProc {
    pub name: String,
    pub pid: u32,
    child: Child,
    exited: Option<ExitStatus>,
}

/// The launcher's children; dropping it stops them all.
#[derive(Default)]
pub struct Children {
    list: Vec<ChildProc>,
}

impl Children {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start `cmd` in its own process group, tied to this process's life.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> io::Result<u32> {
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
            #[cfg(target_os = "linux")]
            {
                let parent = std::process::id();
                // SAFETY: the closure runs in the forked child before exec and only calls
                // async-signal-safe functions (prctl, getppid); it allocates nothing.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        // The launcher died between fork and prctl: do not run orphaned.
                        if libc::getppid() as u32 != parent {
                            return Err(io::Error::other("launcher exited during spawn"));
                        }
                        Ok(())
                    });
                }
            }
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
        self.list.push(ChildProc {
            name: name.to_string(),
            pid,
            child,
            exited: None,
        });
        Ok(pid)
    }

    pub fn pids(&self) -> Vec<(String, u32)> {
        self.list.iter().map(|c| (c.name.clone(), c.pid)).collect()
    }

    /// Children that exited since the last call, with their status.
    pub fn newly_exited(&mut self) -> Vec<(String, u32, ExitStatus)> {
        let mut out = Vec::new();
        for c in &mut self.list {
            if c.exited.is_none() {
                if let Ok(Some(status)) = c.child.try_wait() {
                    c.exited = Some(status);
                    forget(c.pid);
                    out.push((c.name.clone(), c.pid, status));
                }
            }
        }
        out
    }

    /// Whether the named child has exited (and how).
    pub fn exit_status(&mut self, name: &str) -> Option<ExitStatus> {
        let c = self.list.iter_mut().find(|c| c.name == name)?;
        if c.exited.is_none() {
            if let Ok(Some(status)) = c.child.try_wait() {
                c.exited = Some(status);
                forget(c.pid);
            }
        }
        c.exited
    }

    /// SIGTERM every child's group, wait up to `grace` for them to exit, SIGKILL the rest,
    /// and reap them all. Blocking, bounded by `grace` plus one second.
    pub fn terminate(&mut self, grace: Duration) {
        for c in self.list.iter().filter(|c| c.exited.is_none()) {
            signal_group(c.pid, Signal::Term);
        }
        let deadline = Instant::now() + grace;
        loop {
            let mut running = 0;
            for c in self.list.iter_mut().filter(|c| c.exited.is_none()) {
                match c.child.try_wait() {
                    Ok(Some(status)) => c.exited = Some(status),
                    Ok(None) => running += 1,
                    Err(_) => {}
                }
            }
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        for c in &mut self.list {
            if c.exited.is_none() {
                // The group too: a handler could have started helpers of its own.
                signal_group(c.pid, Signal::Kill);
                let _ = c.child.kill();
                let reap_deadline = Instant::now() + Duration::from_secs(1);
                while Instant::now() < reap_deadline {
                    if let Ok(Some(status)) = c.child.try_wait() {
                        c.exited = Some(status);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            forget(c.pid);
        }
    }
}

fn forget(pid: u32) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
}

impl Drop for Children {
    fn drop(&mut self) {
        if self.list.iter().any(|c| c.exited.is_none()) {
            self.terminate(Duration::from_secs(5));
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as i32, 0) == 0 }
    }

    #[test]
    fn terminate_stops_children_and_their_groups() {
        let mut children = Children::new();
        let mut cmd = Command::new("sh");
        // The shell starts a grandchild in the same group and waits.
        cmd.args(["-c", "sleep 30 & wait"]);
        let pid = children.spawn("sleeper", cmd).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(alive(pid));
        let started = Instant::now();
        children.terminate(Duration::from_secs(2));
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(children.exit_status("sleeper").is_some());
        assert!(LIVE.lock().unwrap().iter().all(|p| *p != pid));
    }

    #[test]
    fn drop_stops_children() {
        let pid;
        {
            let mut children = Children::new();
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            pid = children.spawn("sleep", cmd).unwrap();
        }
        // Reaped by Drop, so the pid no longer names our child.
        assert!(
            !alive(pid)
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |s| !s.contains("(sleep)"))
        );
    }
}
