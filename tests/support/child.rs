//! One test's body in a child process of the test binary, for the rare test that must change
//! process-wide state other tests read (environment variables). The integration tests are one
//! binary, so they share one process; such a test runs itself again as the only test of a fresh
//! process instead of serialising the others around it.
//!
//! ```ignore
//! #[tokio::test]
//! async fn changes_the_environment() {
//!     if support::child::in_parent(module_path!(), "changes_the_environment") {
//!         return; // the child ran the body below and passed
//!     }
//!     std::env::set_var("X", "y"); // only in the child
//! }
//! ```

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::wait::eventually_blocking;

/// Set in the child to the name of the one test it runs.
const MARK: &str = "FWDPROXY_TEST_CHILD";

/// How long the child may take: generous, it runs one test.
const CHILD_LIMIT: Duration = Duration::from_secs(120);

/// In the parent: runs this test binary again with only `module::name` selected, fails the test
/// unless exactly that one test ran and passed, and returns true (the caller returns at once).
/// In the child: returns false, and the caller runs the test's body.
pub fn in_parent(module: &str, name: &str) -> bool {
    // module_path!() is `it::identity_header`; the harness names the test without the crate.
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    let test = if module.is_empty() {
        name.to_string()
    } else {
        format!("{module}::{name}")
    };
    if std::env::var(MARK).as_deref() == Ok(test.as_str()) {
        return false;
    }
    let mut child = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([test.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env(MARK, &test)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the test binary starts again");
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = None;
    let done = eventually_blocking(CHILD_LIMIT, || {
        status = child.try_wait().expect("waiting for the child");
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        done,
        "{test} in a child process: not done within {CHILD_LIMIT:?}\n{out}\n{err}"
    );
    let status = status.unwrap();
    assert!(
        status.success() && out.contains("test result: ok. 1 passed"),
        "{test} in a child process: {status}\n{out}\n{err}"
    );
    true
}
