//! What the bench reads from `/proc`, and process handling: pinning, stopping.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// (utime, stime) of a process (all its threads, dead ones included), in clock ticks.
pub fn cpu_ticks(pid: i32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return (0, 0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (utime, stime)
}

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A `VmXXX:` line of `/proc/<pid>/status`, in kB.
pub fn status_kb(pid: i32, field: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Direct children of `pid` (nginx workers of a master).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            if let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) {
                let ppid: i32 = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if ppid == pid {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

/// Pin the process that `cmd` starts to `core` (set between fork and exec, so no `taskset`
/// process sits in the start time).
pub fn pin(cmd: &mut Command, core: usize) -> &mut Command {
    // SAFETY: sched_setaffinity is async-signal-safe; the set is built on the stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Move every thread of `pid` to `core` (affinity is per thread).
pub fn repin(pid: i32, core: usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for e in dir.flatten() {
        if let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() {
            // SAFETY: as in `pin`; a thread that has exited meanwhile only makes this fail.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(core, &mut set);
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
        }
    }
}

/// Raise (negative) or lower the calling process's nice value; children inherit it. Returns
/// the value in force afterwards.
pub fn renice_self(nice: i32) -> i32 {
    // With autogroup scheduling (sched_autogroup_enabled=1), nice only ranks tasks inside one
    // session's group and groups share a core evenly; the group's own nice is set here. The
    // group is this run's session (bench/run.sh and what it starts), no one else's.
    let _ = std::fs::write("/proc/self/autogroup", nice.to_string());
    // SAFETY: setpriority/getpriority on our own process.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    }
}

/// Pin the calling process (and the children it starts later, unless they pin themselves).
pub fn pin_self(core: usize) {
    // SAFETY: as above.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A child process that is stopped when dropped: SIGTERM, then SIGKILL after a grace, and the
/// same for the children it forked (nginx workers).
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The process and its direct children.
    pub fn pids(&self) -> Vec<i32> {
        let mut v = vec![self.pid()];
        v.extend(children(self.pid()));
        v
    }

    /// (user, system) ticks of the process and its children.
    pub fn cpu_ticks(&self) -> (u64, u64) {
        self.pids()
            .into_iter()
            .map(cpu_ticks)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    pub fn rss_kb(&self, field: &str) -> u64 {
        self.pids().into_iter().map(|p| status_kb(p, field)).sum()
    }

    pub fn stop(&mut self, grace: Duration) {
        let kids = children(self.pid());
        // SAFETY: signalling our own child (and its children) by pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let until = Instant::now() + grace;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > until {
                unsafe { libc::kill(self.pid(), libc::SIGKILL) };
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for k in kids {
            if std::fs::metadata(format!("/proc/{k}")).is_ok() {
                unsafe { libc::kill(k, libc::SIGKILL) };
            }
        }
    }

    pub fn kill_now(&mut self) {
        let kids = children(self.pid());
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
        for k in kids {
            unsafe { libc::kill(k, libc::SIGKILL) };
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(2));
        }
    }
}
