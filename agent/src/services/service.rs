//! One declared service: its config, its listening sockets (bound once, for
//! the agent's whole life), at most one serving process, and what a status
//! report shows about it. The locks that order reloads live here too:
//! `reloading` refuses a second reload while one is starting a process, and
//! the `reload` mutex is held by a reload from start to the end of the old
//! process's drain, and by each restart attempt, so a reload that arrives
//! while the previous one drains waits at most the drain timeout.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reload_proto::v1 as pb;
use tokio::sync::watch;

use super::error::ServiceError;
use super::process::Process;
use super::sockets::BoundListener;
use crate::config::ServiceConfig;
use crate::state::ServiceVersions;

/// What a status report shows; changed under one lock.
pub(super) struct Observed {
    pub(super) state: pb::ServiceState,
    pub(super) state_since: SystemTime,
    pub(super) health: pb::HealthState,
    pub(super) consecutive_healthy: u32,
    pub(super) versions: ServiceVersions,
    /// The serving process.
    pub(super) process: Option<Process>,
    pub(super) restarts: u32,
    pub(super) last_reload: Option<pb::ReloadResult>,
}

pub struct Service {
    pub config: ServiceConfig,
    pub(super) sockets: Vec<BoundListener>,
    pub(super) reloading: AtomicBool,
    pub(super) reload: Arc<tokio::sync::Mutex<()>>,
    pub(super) observed: Mutex<Observed>,
    /// Bumped whenever the serving process changes, to wake the monitor.
    pub(super) changed: watch::Sender<u64>,
}

impl Service {
    pub(super) fn observe<T>(&self, f: impl FnOnce(&mut Observed) -> T) -> T {
        f(&mut self.observed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn set_state(&self, state: pb::ServiceState) {
        self.observe(|o| {
            if o.state != state {
                o.state = state;
                o.state_since = SystemTime::now();
            }
        });
    }

    /// The reload lock. A previous reload may still be draining its old
    /// process: waits for it, bounded by the drain timeout (plus the
    /// SIGKILL and reap).
    pub(super) async fn reload_lock(
        &self,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, ServiceError> {
        let bound = self.config.drain.bound() + Duration::from_secs(5);
        tokio::time::timeout(bound, self.reload.clone().lock_owned())
            .await
            .map_err(|_| ServiceError::PreviousReloadStuck {
                name: self.config.name.clone(),
                bound: humantime::format_duration(bound).to_string(),
            })
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn status(&self) -> pb::ServiceStatus {
        self.observe(|o| pb::ServiceStatus {
            name: self.config.name.clone(),
            state: o.state as i32,
            health: o.health as i32,
            consecutive_healthy: o.consecutive_healthy,
            current_version: o
                .versions
                .current
                .as_ref()
                .map(|a| a.version.clone())
                .unwrap_or_default(),
            current_sha256: o
                .versions
                .current
                .as_ref()
                .map(|a| a.sha256.clone())
                .unwrap_or_default(),
            previous_version: o
                .versions
                .previous()
                .map(|a| a.version.clone())
                .unwrap_or_default(),
            previous_sha256: o
                .versions
                .previous()
                .map(|a| a.sha256.clone())
                .unwrap_or_default(),
            pid: o.process.as_ref().map(|p| p.pid).unwrap_or(0),
            restarts: o.restarts,
            last_reload: o.last_reload.clone(),
            state_since: Some(o.state_since.into()),
            downgrade_floor: o.versions.highest_version.clone().unwrap_or_default(),
        })
    }

    pub fn serving_pid(&self) -> Option<u32> {
        self.observe(|o| o.process.as_ref().map(|p| p.pid))
    }

    /// Records a probe result; returns the new health if it changed.
    pub fn record_health(&self, healthy: bool) -> Option<pb::HealthState> {
        self.observe(|o| {
            let health = if healthy {
                o.consecutive_healthy = o.consecutive_healthy.saturating_add(1);
                pb::HealthState::Healthy
            } else {
                o.consecutive_healthy = 0;
                pb::HealthState::Unhealthy
            };
            (o.health != health).then(|| {
                o.health = health;
                health
            })
        })
    }
}
