//! The monitor: one task per service that keeps its serving process
//! running. When the process exits on its own, the monitor records why and
//! starts the current version again after a backoff that doubles on every
//! failed attempt up to `max_backoff` (reset after a stable run); the
//! sockets stay open meanwhile, so clients wait in the backlog instead of
//! being refused. A restart is verified and preflighted like an activation
//! (see [`super::handoff`]): a binary changed in the store must not come
//! back through a crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reload_proto::v1 as pb;

use super::handoff::Handoff;
use super::process::describe_exit;
use super::service::Service;
use crate::events::EventFields;
use crate::state::ArtifactRef;

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
                    let current = versions.current.unwrap_or_else(|| ArtifactRef { sha256: String::new(), version: String::new() });
                    handoff.events().emit(pb::EventKind::Exited, EventFields {
                        service: &service.config.name,
                        version: &current.version,
                        sha256: &current.sha256,
                        pid: process.pid,
                        message: format!("exited unexpectedly ({}); restarting in {}; sockets stay open. stderr: {}",
                            describe_exit(status), humantime::format_duration(backoff), process.stderr_tail()),
                    });
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
        match handoff.start(&service, &current.sha256).await {
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
