//! Waiting for something another process or task makes true, without
//! sleeping a guessed time: poll an observation until it satisfies a
//! condition, and when the deadline passes, fail with what was awaited and
//! what was last seen (the way linkerd2-proxy's `assert_eventually!` does).
//!
//! - [`eventually`]: an async observation (a gRPC call, an HTTP request, a
//!   look at `/proc`) and a condition on it; returns the value that met it.
//! - [`wait_for`]: a yes/no condition with nothing more to show.
//! - [`settled`]: an observation that stops changing (fds after an exec,
//!   a pid file after a storm of upgrades).

use std::fmt::{Debug, Display};
use std::time::Duration;

use tokio::time::Instant;

/// How often the helpers look again: fast enough not to slow the tests,
/// slow enough not to load the machine.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Observes with `observe` until `done` holds for the value, and returns
/// that value. Panics with `what`, the timeout and the last value observed
/// once `timeout` has passed (an observation still running then is
/// abandoned: a hung call fails the wait too).
pub async fn eventually<T: Debug>(
    what: impl Display,
    timeout: Duration,
    mut observe: impl AsyncFnMut() -> T,
    mut done: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last: Option<T> = None;
    loop {
        match tokio::time::timeout_at(deadline, observe()).await {
            Ok(value) if done(&value) => return value,
            Ok(value) => last = Some(value),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what} (an observation was still running); last observed: {last:?}"
            ),
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until `condition` holds; panics with `what` after `timeout`. For
/// a yes/no condition another process or task makes true (a process gone,
/// a file written); prefer [`eventually`] when there is a value to show.
pub async fn wait_for(what: impl Display, timeout: Duration, mut condition: impl FnMut() -> bool) {
    eventually(what, timeout, async || condition(), |holds| *holds).await;
}

/// Observes with `observe` until the value has stayed the same for
/// `quiet`, and returns it. Panics with `what` and the last value if that
/// does not happen within `timeout`.
pub async fn settled<T: Debug + PartialEq>(
    what: impl Display,
    timeout: Duration,
    quiet: Duration,
    mut observe: impl AsyncFnMut() -> T,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = observe().await;
    let mut since = Instant::now();
    loop {
        if since.elapsed() >= quiet {
            return last;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what} to stay the same for {quiet:?}; last observed: {last:?}"
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        let now = observe().await;
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}
