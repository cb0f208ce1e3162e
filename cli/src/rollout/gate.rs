//! The [`HealthGate`]: when an activated host counts as healthy.
//!
//! It polls [`Fleet::probe`] until the host has given `healthy_checks`
//! healthy answers in a row spanning at least `min_healthy_time` (a bad
//! answer resets both), within `healthy_deadline`. Three unanswered polls
//! in a row make the cause "unreachable"; a probe that reports the process
//! gone or a refusal ends the gate at once. The poll interval is the
//! window divided by the checks, kept between 100 ms and 2 s so a short
//! window is not hammered and a long one is not sampled too rarely; a
//! report from the agent that the health changed (its events, see
//! [`Fleet::health_changes`]) brings the next poll forward, so the window
//! starts when the agent saw the process healthy, not a tick later.

use std::time::{Duration, Instant};

use super::fleet::{Fleet, HostFailure, Probe};
use super::journal::Cause;
use super::settings::RolloutSettings;

/// Unanswered polls in a row after which the host is unreachable.
const UNANSWERED_LIMIT: u32 = 3;

pub struct HealthGate<'a> {
    settings: &'a RolloutSettings,
}

impl<'a> HealthGate<'a> {
    pub fn new(settings: &'a RolloutSettings) -> HealthGate<'a> {
        HealthGate { settings }
    }

    /// Waits until `host`, now on process `pid`, passes the gate.
    pub async fn wait_healthy<F: Fleet>(
        &self,
        fleet: &F,
        host: &str,
        pid: u32,
        progress: &(dyn Fn(String) + Sync),
    ) -> Result<(), HostFailure> {
        let s = self.settings;
        let poll = (s.min_healthy_time / s.healthy_checks)
            .clamp(Duration::from_millis(100), Duration::from_secs(2));
        let deadline = Instant::now() + s.healthy_deadline;
        let (mut streak, mut since) = (0u32, None::<Instant>);
        let mut last = String::from("no answer yet");
        let mut unanswered = 0;
        // Before the first poll: a change between the two is not missed.
        let changes = fleet.health_changes(host).await;
        loop {
            let healthy = match fleet.probe(host, pid).await {
                Probe::Healthy => {
                    unanswered = 0;
                    true
                }
                Probe::NotYet(seen) => {
                    unanswered = 0;
                    last = seen;
                    false
                }
                Probe::Fatal(failure) => return Err(failure),
                Probe::NoAnswer => {
                    unanswered += 1;
                    if unanswered >= UNANSWERED_LIMIT {
                        return Err(HostFailure::new(
                            Cause::Unreachable,
                            "the agent stopped answering during the health gate",
                        ));
                    }
                    false
                }
            };
            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
            progress(if healthy {
                // The streak counting this result; the window since the first.
                let (n, window) = (streak + 1, since.map(|t| t.elapsed()).unwrap_or_default());
                if n >= s.healthy_checks {
                    format!(
                        "health gate: healthy {n} times in a row; {}s of the {} min-healthy-time to go, {left}s left",
                        s.min_healthy_time.saturating_sub(window).as_secs(),
                        humantime::format_duration(s.min_healthy_time)
                    )
                } else {
                    format!(
                        "health gate: {n}/{} healthy in a row, {left}s left",
                        s.healthy_checks
                    )
                }
            } else {
                format!("health gate: not healthy yet ({last}), {left}s left")
            });
            let mut wait = poll;
            if healthy {
                streak += 1;
                let first = *since.get_or_insert_with(Instant::now);
                if streak >= s.healthy_checks && first.elapsed() >= s.min_healthy_time {
                    return Ok(());
                }
                // Enough checks already: the next one is due when the
                // window closes, not a whole poll interval later.
                if streak >= s.healthy_checks {
                    wait = poll.min(s.min_healthy_time.saturating_sub(first.elapsed()));
                }
            } else {
                streak = 0;
                since = None;
            }
            if Instant::now() >= deadline {
                return Err(HostFailure::new(
                    Cause::Unhealthy,
                    format!(
                        "not healthy within {} (last: {last})",
                        humantime::format_duration(s.healthy_deadline)
                    ),
                ));
            }
            match &changes {
                Some(changes) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = changes.changed() => {}
                    }
                }
                None => tokio::time::sleep(wait).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::fake_fleet::FakeFleet;
    use std::sync::Arc;

    /// 2 checks over 2 s: a poll a second. The host turns healthy 100 ms
    /// after its activation.
    async fn gate_time(reported: bool) -> Duration {
        let settings = RolloutSettings {
            healthy_checks: 2,
            min_healthy_time: Duration::from_secs(2),
            ..RolloutSettings::default()
        };
        let fleet = FakeFleet::new();
        fleet.probes("h1:7700", vec![Probe::NotYet("UNKNOWN".into())]);
        let report = Arc::new(tokio::sync::Notify::new());
        if reported {
            fleet.reports_health("h1:7700", report.clone());
        }
        let began = Instant::now();
        let turns_healthy = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            report.notify_one();
        });
        HealthGate::new(&settings)
            .wait_healthy(&fleet, "h1:7700", 1001, &|_| {})
            .await
            .unwrap();
        turns_healthy.await.unwrap();
        began.elapsed()
    }

    #[tokio::test]
    async fn the_agents_report_starts_the_window_when_the_host_turned_healthy() {
        // Polling alone sees it healthy at the second poll (1 s), so the
        // 2 s window ends at 3 s; the report brings that poll to 100 ms,
        // and the window ends at 2.1 s.
        let (polled, reported) = tokio::join!(gate_time(false), gate_time(true));
        assert!(polled >= Duration::from_secs(3), "polling only: {polled:?}");
        assert!(
            reported < Duration::from_millis(2600),
            "with the agent's report: {reported:?}"
        );
    }
}
