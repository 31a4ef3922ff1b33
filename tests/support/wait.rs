//! The one bounded wait of the tests: poll a condition until it holds or a deadline passes.
//! Never a sleep used as synchronisation: the caller asserts on the result, and the bound is a
//! generous ceiling (a slow shared machine only makes the loop run longer, not fail).

use std::time::{Duration, Instant};

/// How long a test waits for something that should happen at once on any machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Poll `check` every few milliseconds for at most `limit`; true once it held.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for plain (non-async) checks on a blocking thread.
pub fn eventually_blocking(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Await `fut` for at most `limit`, failing the test with `what` when it takes longer.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {limit:?}"),
    }
}
