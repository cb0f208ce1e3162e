//! Probation: after READY, a new process serves beside the old one and must
//! prove itself (alive, and healthy on its own port when it has one) before
//! the handoff commits to it. See ARCHITECTURE.md, "Probation".

use std::time::{Duration, Instant};

use reload_proto::v1 as pb;

use super::error::StartFailure;
use super::health;
use super::process::{describe_exit, Process};
use super::service::Service;
use crate::events::{EventBus, EventFields};
use crate::state::ArtifactRef;

/// `[service.probation]`: the new process must stay alive and pass its
/// health check `healthy_checks` times in a row, over at least
/// `healthy_for`. Any exit or failed check ends it: REVERTED.
pub(super) async fn run(
    service: &Service,
    new_ref: &ArtifactRef,
    process: &Process,
    events: &EventBus,
) -> Result<(), StartFailure> {
    let emit = |message: String| {
        events.emit(
            pb::EventKind::Probation,
            EventFields {
                service: &service.config.name,
                version: &new_ref.version,
                sha256: &new_ref.sha256,
                pid: process.pid,
                message,
            },
        )
    };
    let probation = &service.config.probation;
    if probation.healthy_for.is_zero() {
        return Ok(());
    }
    let started = Instant::now();
    let message = format!(
        "probation of {} (pid {}): {} healthy checks in a row over {}; the old process serves meanwhile",
        new_ref.version,
        process.pid,
        probation.healthy_checks,
        humantime::format_duration(probation.healthy_for)
    );
    emit(message);
    let reverted = |reason: String| StartFailure {
        outcome: pb::ReloadOutcome::Reverted,
        reason,
        new_pid: process.pid,
    };
    let mut streak = 0;
    loop {
        tokio::select! {
            status = process.wait() => {
                return Err(reverted(format!(
                    "{} during probation, {} after READY; stderr: {}",
                    describe_exit(status),
                    humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64)),
                    process.stderr_tail()
                )));
            }
            _ = tokio::time::sleep(probation.interval) => {}
        }
        if !health::check(&service.config, process).await {
            return Err(reverted(format!(
                "failed its health check during probation ({}, after {streak} healthy); stderr: {}",
                describe_health(&service.config),
                process.stderr_tail()
            )));
        }
        streak += 1;
        let left = probation.healthy_for.saturating_sub(started.elapsed());
        if streak >= probation.healthy_checks && left.is_zero() {
            return Ok(());
        }
        if streak <= probation.healthy_checks {
            // Progress for people watching (`reloadctl activate`).
            let message = format!(
                "probation of {}: check {streak}/{} passed, {} left",
                new_ref.version,
                probation.healthy_checks,
                humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
            );
            emit(message);
        }
    }
}

/// The health check, for failure reasons.
fn describe_health(config: &crate::config::ServiceConfig) -> String {
    use crate::config::HealthProbe;
    let place = if config.health_private {
        "on its private port"
    } else {
        "on the shared listener"
    };
    match &config.health {
        HealthProbe::None => "none configured: alive is healthy".into(),
        HealthProbe::Http { path, .. } => format!("http GET {path} {place}"),
        HealthProbe::Tcp { .. } => format!("tcp connect {place}"),
        HealthProbe::Exec { command } => format!("exec {}", command.join(" ")),
    }
}
