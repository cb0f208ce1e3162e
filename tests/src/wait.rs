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
                "timed out after {timeout:?} waiting for {what} (an observation was still running); last observed: {}",
                shown(&last)
            ),
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last observed: {}",
                shown(&last)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The last value observed, for a failure message.
fn shown<T: Debug>(last: &Option<T>) -> String {
    match last {
        Some(value) => format!("{value:?}"),
        None => "nothing (no observation finished)".to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_value_that_met_the_condition() {
        let mut calls = 0;
        let value = eventually(
            "the third call",
            Duration::from_secs(5),
            async || {
                calls += 1;
                calls
            },
            |n| *n == 3,
        )
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a value above 10; last observed: 1")]
    async fn eventually_fails_with_what_it_waited_for_and_what_it_saw() {
        eventually(
            "a value above 10",
            Duration::from_millis(100),
            async || 1,
            |n| *n > 10,
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "an observation was still running")]
    async fn eventually_does_not_wait_past_its_deadline_for_a_hung_observation() {
        eventually(
            "an answer",
            Duration::from_millis(100),
            async || std::future::pending::<u32>().await,
            |_| true,
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "to stay the same for")]
    async fn settled_fails_on_a_value_that_keeps_changing() {
        let mut n = 0;
        settled(
            "a counter",
            Duration::from_millis(200),
            Duration::from_millis(100),
            async || {
                n += 1;
                n
            },
        )
        .await;
    }
}
