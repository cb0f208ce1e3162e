//! Steady-state health probes: the agent's view of whether each service is healthy,
//! reported on gRPC (`GetStatus`, `grpc.health.v1` per service name) and on
//! the HTTP `/healthz` endpoint that load balancers and `reloadctl` poll.

use std::sync::Arc;

use reload_proto::v1 as pb;
use tonic_health::ServingStatus;

use super::process::Process;
use super::readiness::http_get_ok;
use super::service::Service;
use crate::config::{HealthProbe, ServiceConfig};
use crate::events::EventBus;
use crate::events::EventFields;

async fn probe_once(service: &Service) -> bool {
    match service.observe(|o| o.process.clone()) {
        Some(process) => check(&service.config, &process).await,
        None => false,
    }
}

/// One health check of `process` as `config` says: on its private port
/// when the service has one (only that process answers there), else on
/// the configured listener (which any process of the service may answer).
pub(super) async fn check(config: &ServiceConfig, process: &Process) -> bool {
    let address = |listener: &Option<String>| match config.health_private {
        true => process.probe,
        false => config.tcp_address(listener.as_deref()),
    };
    match &config.health {
        HealthProbe::None => true,
        HealthProbe::Http { path, listener } => match address(listener) {
            Some(address) => http_get_ok(address, path, config.health_timeout).await,
            None => false,
        },
        HealthProbe::Tcp { listener } => match address(listener) {
            Some(address) => matches!(
                tokio::time::timeout(
                    config.health_timeout,
                    tokio::net::TcpStream::connect(address)
                )
                .await,
                Ok(Ok(_))
            ),
            None => false,
        },
        HealthProbe::Exec { command } => {
            let mut child = tokio::process::Command::new(&command[0]);
            // The service's environment, not the agent's (which may hold
            // credentials, NOTIFY_SOCKET, LISTEN_FDS...).
            child
                .env_clear()
                .env(
                    "PATH",
                    std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
                )
                .envs(config.env.iter().cloned())
                .env("RELOAD_SERVICE", &config.name)
                .args(&command[1..])
                .current_dir(&config.working_dir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            matches!(
                tokio::time::timeout(config.health_timeout, child.status()).await,
                Ok(Ok(status)) if status.success()
            )
        }
    }
}

/// Probes every service at its interval, forever.
pub fn start_probes<'a>(
    services: impl Iterator<Item = &'a Arc<Service>>,
    events: &Arc<EventBus>,
    reporter: tonic_health::server::HealthReporter,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    for service in services {
        let (events, service, reporter) = (events.clone(), service.clone(), reporter.clone());
        tasks.spawn(async move {
            let mut interval = tokio::time::interval(service.config.health_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // A new serving process (a handoff committed, a restart) is
            // probed at once rather than up to an interval later: the
            // rollout's health gate waits for this agent's verdict, and
            // with 2 s probes a wave would otherwise idle up to 2 s.
            let mut process_changed = service.changed.subscribe();
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    Ok(()) = process_changed.changed() => {
                        process_changed.borrow_and_update();
                        interval.reset();
                    }
                }
                let healthy = probe_once(&service).await;
                let Some(health) = service.record_health(healthy) else {
                    continue;
                };
                let serving = if health == pb::HealthState::Healthy {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter
                    .set_service_status(&service.config.name, serving)
                    .await;
                let status = service.status();
                events.emit(
                    pb::EventKind::HealthChanged,
                    EventFields {
                        service: &service.config.name,
                        version: &status.current_version,
                        sha256: &status.current_sha256,
                        pid: status.pid,
                        message: format!("health is now {}", health.as_str_name()),
                    },
                );
            }
        });
    }
}
