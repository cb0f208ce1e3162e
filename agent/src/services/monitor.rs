//! The monitor: one task per service that keeps its serving process
//! running. When the process exits on its own, the monitor records why and
//! starts the current version again after a backoff that doubles on every
//! failed attempt up to `max_backoff` (reset after a stable run); the
//! sockets stay open meanwhile, so clients wait in the backlog instead of
//! being refused. A restart is verified and preflighted like an activation
//! (see [`super::handoff`]): a binary changed in the store must not come
//! back through a crash.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reload_proto::v1 as pb;

use super::handoff::{Handoff, UNFENCED};
use super::process::describe_exit;
use super::service::Service;
use crate::config::Probation;
use crate::events::EventFields;
use crate::state::ArtifactRef;
use crate::store::Admission;

/// A process that ran this long before exiting resets the restart backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// Watches the serving process; starts it when it should run and does
/// not, with exponential backoff between failed attempts and between
/// crashes that come soon after a start.
pub(super) async fn monitor(
    service: Arc<Service>,
    handoff: Arc<Handoff>,
    stopping: Arc<AtomicBool>,
) {
    let mut changed = service.changed.subscribe();
    let (initial, max) = (service.config.initial_backoff, service.config.max_backoff);
    let mut backoff = initial;
    // The delay after the next crash of a process that became ready and
    // then died soon: it grows with every such crash in a row, so a
    // release that crash-loops after READY is not restarted ten times a
    // second forever. A stable run resets it.
    let mut after_quick_crash = initial;
    // Recent crashes of the current release: a crash loop reverts it.
    let mut crashes = CrashLoop::default();
    loop {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (process, should_run) =
            service.observe(|o| (o.process.clone(), o.versions.should_run()));
        if let Some(process) = process {
            tokio::select! {
                status = process.wait() => {
                    let _guard = service.reload.lock().await;
                    let still_current = service.serving_pid() == Some(process.pid);
                    if !still_current {
                        continue;
                    }
                    service.observe(|o| {
                        o.process = None;
                        o.restarts += 1;
                        o.health = pb::HealthState::Unhealthy;
                        o.consecutive_healthy = 0;
                    });
                    service.set_state(pb::ServiceState::Backoff);
                    if process.started.elapsed() >= STABLE_RUN {
                        backoff = initial;
                        after_quick_crash = (initial * 2).min(max);
                    } else {
                        backoff = after_quick_crash;
                        after_quick_crash = (after_quick_crash * 2).min(max);
                    }
                    let versions = service.observe(|o| o.versions.clone());
                    let current = versions.current.clone().unwrap_or_default();
                    let revert_to = crashes
                        .crashed(&service.config.probation, &current)
                        .then(|| versions.previous().cloned())
                        .flatten()
                        .filter(|previous| previous.sha256 != current.sha256);
                    let next = match &revert_to {
                        Some(previous) => format!(
                            "{} crashes within {}: a crash loop; reverting to {}",
                            crashes.count(),
                            humantime::format_duration(service.config.probation.crash_window),
                            previous.version
                        ),
                        None => format!("restarting in {}", humantime::format_duration(backoff)),
                    };
                    handoff.events().emit(pb::EventKind::Exited, EventFields {
                        service: &service.config.name,
                        version: &current.version,
                        sha256: &current.sha256,
                        pid: process.pid,
                        message: format!("exited unexpectedly ({}); {next}; sockets stay open. stderr: {}",
                            describe_exit(status), process.stderr_tail()),
                    });
                    drop(_guard);
                    if let Some(previous) = revert_to {
                        crashes = CrashLoop::default();
                        revert(&service, &handoff, &current, &previous).await;
                    }
                }
                _ = changed.changed() => {}
            }
            continue;
        }
        if !should_run {
            if changed.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Should run, does not: one start attempt after the backoff.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = changed.changed() => continue,
        }
        let _guard = service.reload.lock().await;
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (process, current) =
            service.observe(|o| (o.process.clone(), o.versions.current.clone()));
        let Some(current) = current.filter(|_| process.is_none()) else {
            continue;
        };
        match handoff
            .start(&service, &current.sha256, Admission::Readmitted)
            .await
        {
            Ok(process) => {
                let pid = process.pid;
                service.observe(|o| o.process = Some(process));
                service.set_state(pb::ServiceState::Running);
                handoff.events().emit(
                    pb::EventKind::Restarted,
                    EventFields {
                        service: &service.config.name,
                        version: &current.version,
                        sha256: &current.sha256,
                        pid,
                        message: format!("started {} (pid {pid})", current.version),
                    },
                );
            }
            Err(failure) => {
                backoff = (backoff * 2).min(service.config.max_backoff);
                service.set_state(pb::ServiceState::Backoff);
                handoff.events().emit(
                    pb::EventKind::Failed,
                    EventFields {
                        service: &service.config.name,
                        version: &current.version,
                        sha256: &current.sha256,
                        pid: failure.new_pid,
                        message: format!(
                            "start failed: {}; next attempt in {}",
                            failure.reason,
                            humantime::format_duration(backoff)
                        ),
                    },
                );
            }
        }
    }
}

/// The crashes of one release in a rolling window.
#[derive(Default)]
struct CrashLoop {
    sha256: String,
    at: VecDeque<Instant>,
}

impl CrashLoop {
    /// Records a crash of `current`; true when they now make a crash loop.
    fn crashed(&mut self, probation: &Probation, current: &ArtifactRef) -> bool {
        if self.sha256 != current.sha256 {
            self.sha256 = current.sha256.clone();
            self.at.clear();
        }
        let now = Instant::now();
        self.at.push_back(now);
        while self
            .at
            .front()
            .is_some_and(|t| now.duration_since(*t) > probation.crash_window)
        {
            self.at.pop_front();
        }
        probation.crash_loop > 0 && self.at.len() >= probation.crash_loop as usize
    }

    fn count(&self) -> usize {
        self.at.len()
    }
}

/// A release in a crash loop goes back to the one before it, by the agent
/// itself: the same handoff as a rollback (verified, preflighted, on
/// probation), allowed below the floor since it ran here before.
async fn revert(
    service: &Arc<Service>,
    handoff: &Handoff,
    current: &ArtifactRef,
    previous: &ArtifactRef,
) {
    tracing::warn!(service = %service.config.name, from = %current.version, to = %previous.version, "crash loop: reverting to the previous release");
    match handoff
        // The previous release was admitted before: its expiry is not
        // checked again (see `Admission`).
        .activate(
            service,
            &previous.sha256,
            true,
            true,
            UNFENCED,
            Admission::Readmitted,
        )
        .await
    {
        Ok(result) if result.outcome == pb::ReloadOutcome::Succeeded as i32 => {}
        Ok(result) => {
            tracing::error!(service = %service.config.name, reason = %result.reason, "the revert after a crash loop failed; restarting the current release with backoff")
        }
        Err(err) => {
            tracing::error!(service = %service.config.name, error = %err, "the revert after a crash loop was refused; restarting the current release with backoff")
        }
    }
}
