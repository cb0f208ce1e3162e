//! The services this agent runs, and everything done to them.
//!
//! Layout:
//! - [`Services`] (this file): the registry of declared services, built
//!   once at start (binding, or taking over, every listener), and the entry
//!   points the API calls: activate, rollback, status, stop.
//! - [`service`]: one service's sockets, serving process and status.
//! - [`handoff`]: one reload as one sequence, verify -> preflight -> spawn
//!   -> ready -> commit -> drain; [`preflight`] and [`readiness`] are two of
//!   its steps.
//! - [`probation`]: after READY, the new process proves itself beside the
//!   old one before the handoff commits to it.
//! - [`monitor`]: the task per service that restarts a process that exits
//!   on its own, with backoff.
//! - [`process`]: a process as the agent tracks it (pidfd, output, group).
//! - [`sockets`]: binding listeners once, sockets given by systemd's fd
//!   store or the previous image, and giving them back to the fd store.
//! - [`adopt`]: what crosses the agent's in-place re-exec, both ways.
//! - [`health`]: the steady-state health probes.
//! - [`output`]: each service's recent output, kept on disk for `ReadLogs`.
//!
//! Nothing here speaks gRPC: refusals are [`ServiceError`]s, which the API
//! turns into status codes.

mod adopt;
mod error;
mod handoff;
mod health;
mod monitor;
mod output;
mod preflight;
mod probation;
mod process;
mod readiness;
mod service;
mod shim;
mod sockets;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use reload_proto::v1 as pb;
use tokio::sync::watch;

pub use error::ServiceError;
pub use handoff::{Fence, Handoff, UNFENCED};
pub use health::start_probes;
pub use output::{OutputLogs, ServiceOutput};
pub use preflight::{run_preflight, PreflightFailure};
pub use process::describe_exit;
pub use readiness::http_get_ok;
pub use service::Service;
pub use sockets::{fd_store_name, GivenSocket, FD_STORE_PREFIX};

use crate::config::ServiceConfig;
use crate::handover::{FdsToPass, ServiceHandover};
use crate::store::Admission;
use process::drain;
use service::Observed;
use sockets::{assign_given, bind_one, BoundListener};

/// See the module docs.
pub struct Services {
    by_name: BTreeMap<String, Arc<Service>>,
    handoff: Arc<Handoff>,
    /// Set once the agent is stopping: monitors stop restarting.
    stopping: Arc<AtomicBool>,
    /// (service, listener) of given sockets no listener took: their
    /// fd-store entries go.
    unused_given: Vec<(String, String)>,
}

impl Services {
    /// Binds every service's sockets and reads the persisted versions. Binds
    /// before anything starts, so a port in use stops the agent at once.
    ///
    /// Sockets `given` (systemd's fd store, or the previous image's after an
    /// in-place upgrade) and those the running shims hold are used instead
    /// of binding where they match. Processes that run under shims are
    /// adopted, not restarted (see [`adopt`]). A listener the config added
    /// since is bound; a service it removed is drained.
    pub fn new(
        services: &[ServiceConfig],
        handoff: Arc<Handoff>,
        mut given: Vec<GivenSocket>,
    ) -> anyhow::Result<Services> {
        let run_dir = handoff.run_dir().to_path_buf();
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        // The shims' sockets hand out listening sockets and take orders:
        // only the agent's user may reach them.
        std::fs::set_permissions(
            &run_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .with_context(|| format!("cannot restrict {} to 0700", run_dir.display()))?;
        // What runs already, under shims; their sockets are the services'.
        let mut found = shim::discover(&run_dir);
        given.extend(adopt::shim_sockets(&mut found));
        // Notify sockets of an earlier agent are gone with it; adopted
        // processes get theirs bound again.
        for entry in std::fs::read_dir(&run_dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "notify") {
                let _ = std::fs::remove_file(path);
            }
        }
        let state = handoff.state();
        // Sockets not bound here go to their listeners first, and those no
        // listener takes are closed, before anything is bound.
        let (mut assigned, unused_given) = assign_given(services, given);
        let mut by_name = BTreeMap::new();
        for config in services {
            let versions = state.get(&config.name);
            handoff
                .verifier()
                .store()
                .pin(&config.name, versions.pinned());
            let sockets = config
                .listeners
                .iter()
                .map(|listener| {
                    let fd = match assigned.remove(&(config.name.clone(), listener.name.clone())) {
                        Some(fd) => fd,
                        None => bind_one(listener).with_context(|| {
                            format!(
                                "service {:?}: cannot bind listener {:?}",
                                config.name, listener.name
                            )
                        })?,
                    };
                    Ok(BoundListener {
                        name: listener.name.clone(),
                        fd,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut found)
                .into_iter()
                .partition(|a| a.spec.service == config.name);
            found = others;
            let adopted = adopt::adopt(
                config,
                versions.current.as_ref(),
                versions.should_run(),
                mine,
                handoff.output(),
            );
            let state = match (&adopted.serving, versions.should_run()) {
                (Some(_), _) => pb::ServiceState::Running,
                // A persisted current version is started by the monitor.
                (None, true) => pb::ServiceState::Starting,
                (None, false) => pb::ServiceState::Stopped,
            };
            let current = versions.current.clone().unwrap_or_default();
            let service = Service {
                sockets,
                config: config.clone(),
                reloading: AtomicBool::new(false),
                reload: Arc::new(tokio::sync::Mutex::new(())),
                observed: Mutex::new(Observed {
                    state,
                    // An adopted process has been running since before this
                    // agent started.
                    state_since: adopted
                        .serving
                        .as_ref()
                        .and_then(|p| SystemTime::now().checked_sub(p.started.elapsed()))
                        .unwrap_or_else(SystemTime::now),
                    health: pb::HealthState::Unknown,
                    consecutive_healthy: 0,
                    versions,
                    process: adopted.serving,
                    restarts: adopted.ended.len() as u32,
                    last_reload: None,
                }),
                changed: watch::channel(0).0,
            };
            for ended in adopted.ended {
                handoff.events().emit(
                    pb::EventKind::Exited,
                    crate::events::EventFields {
                        service: &config.name,
                        version: &current.version,
                        sha256: &current.sha256,
                        pid: 0,
                        message: format!("{ended}; restarting it; sockets stayed open"),
                    },
                );
            }
            by_name.insert(config.name.clone(), Arc::new(service));
        }
        adopt::drain_undeclared(found, handoff.output());
        Ok(Services {
            by_name,
            handoff,
            stopping: Arc::new(AtomicBool::new(false)),
            unused_given,
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_name.values()
    }

    pub fn service(&self, name: &str) -> Result<&Arc<Service>, ServiceError> {
        self.by_name.get(name).ok_or_else(|| ServiceError::Unknown {
            name: name.to_string(),
            declared: self.by_name.keys().cloned().collect(),
        })
    }

    /// The kept output of service `name` (see [`output`]).
    pub fn output(&self, name: &str) -> Result<Arc<ServiceOutput>, ServiceError> {
        self.service(name)?;
        Ok(self.handoff.output().service(name))
    }

    pub fn events(&self) -> &Arc<crate::events::EventBus> {
        self.handoff.events()
    }

    /// Starts the monitor of every service (which also starts the persisted
    /// current version).
    pub fn start_monitors(&self) {
        for service in self.by_name.values() {
            let (service, handoff, stopping) =
                (service.clone(), self.handoff.clone(), self.stopping.clone());
            tokio::spawn(monitor::monitor(service, handoff, stopping));
        }
    }

    /// Activates stored artifact `sha256` for service `name`; see
    /// [`handoff`].
    pub async fn activate(
        &self,
        name: &str,
        sha256: &str,
        allow_downgrade: bool,
        fence: &dyn Fence,
    ) -> Result<(pb::ReloadResult, pb::ServiceStatus), ServiceError> {
        let service = self.service(name)?;
        let result = self
            .handoff
            .activate(
                service,
                sha256,
                false,
                allow_downgrade,
                fence,
                Admission::New,
            )
            .await?;
        Ok((result, service.status()))
    }

    /// Activates the previous version: the top of the history, which the
    /// activation pops.
    pub async fn rollback(
        &self,
        name: &str,
        allow_downgrade: bool,
        fence: &dyn Fence,
    ) -> Result<(pb::ReloadResult, pb::ServiceStatus), ServiceError> {
        let service = self.service(name)?;
        let previous = service
            .observe(|o| o.versions.previous().cloned())
            .ok_or_else(|| ServiceError::NoPreviousVersion(name.to_string()))?;
        let result = self
            .handoff
            .activate(
                service,
                &previous.sha256,
                true,
                allow_downgrade,
                fence,
                Admission::New,
            )
            .await?;
        Ok((result, service.status()))
    }

    /// The pids of the serving processes.
    pub fn running(&self) -> Vec<u32> {
        self.by_name
            .values()
            .filter_map(|s| s.serving_pid())
            .collect()
    }

    /// StopService: drains the serving process (its drain signal, the
    /// drain timeout, SIGKILL of its group) and keeps the service stopped,
    /// persisted, until the next activation. Returns the stopped pid (0 if
    /// none ran) and how it ended.
    pub async fn stop(
        &self,
        name: &str,
        fence: &dyn Fence,
    ) -> Result<(u32, String, pb::ServiceStatus), ServiceError> {
        let service = self.service(name)?;
        if service.reloading.load(Ordering::SeqCst) {
            return Err(ServiceError::ReloadRunning(name.to_string()));
        }
        // Also keeps the monitor from restarting anything meanwhile.
        let _guard = service.reload_lock().await?;
        let mut versions = service.observe(|o| o.versions.clone());
        versions.stopped = true;
        // The commit point, under the caller's fence (see handoff).
        {
            let hold = fence.hold().map_err(ServiceError::Fenced)?;
            self.handoff
                .state()
                .set(name, versions.clone())
                .map_err(|err| ServiceError::Task(format!("cannot persist the stop: {err:#}")))?;
            tracing::info!(service = %name, token = hold.token, "stop committed under fencing token");
        }
        let process = service.observe(|o| {
            o.versions = versions;
            o.process.take()
        });
        service.set_state(pb::ServiceState::Stopped);
        service.bump();
        let (pid, outcome) = match process {
            Some(process) => {
                let pid = process.pid;
                (pid, drain(&process, service.config.drain).await)
            }
            None => (0, "nothing was running".to_string()),
        };
        let current = service
            .observe(|o| o.versions.current.clone())
            .unwrap_or_default();
        self.handoff.events().emit(
            pb::EventKind::Stopped,
            crate::events::EventFields {
                service: name,
                version: &current.version,
                sha256: &current.sha256,
                pid,
                message: format!("stopped on request: pid {pid} {outcome}; stays stopped until the next activation"),
            },
        );
        Ok((pid, outcome, service.status()))
    }

    /// Every service's sockets, for the next image.
    pub fn handover(&self, fds: &mut FdsToPass) -> std::io::Result<Vec<ServiceHandover>> {
        adopt::export(self.by_name.values(), fds)
    }

    /// See [`sockets::keep_in_fd_store`]; called once this image is
    /// committed to serving.
    pub fn keep_listeners_in_fd_store(&self) {
        sockets::keep_in_fd_store(
            self.by_name
                .values()
                .map(|s| (s.config.name.as_str(), s.sockets.as_slice())),
            &self.unused_given,
        );
    }

    /// Stops every service process (agent shutdown): drain signal, then
    /// SIGKILL after the drain timeout.
    pub async fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut drains = Vec::new();
        for service in self.by_name.values() {
            // Waits for a reload in progress; holding the lock also keeps
            // the monitor from starting anything meanwhile.
            let _guard = service.reload.lock().await;
            let process = service.observe(|o| o.process.take());
            service.set_state(pb::ServiceState::Stopped);
            service.bump();
            if let Some(process) = process {
                let plan = service.config.drain;
                drains.push(async move { drain(&process, plan).await });
            }
        }
        for drain in drains {
            drain.await;
        }
    }

    /// Before the agent re-executes itself: waits for every reload in
    /// progress (and its drain) to end, then keeps reloads, restarts and
    /// monitors from starting anything for as long as the guards live (to
    /// execve).
    pub async fn quiesce(
        &self,
        bound: Duration,
    ) -> Result<Vec<tokio::sync::OwnedMutexGuard<()>>, ServiceError> {
        let mut guards = Vec::new();
        for service in self.by_name.values() {
            let guard = tokio::time::timeout(bound, service.reload.clone().lock_owned())
                .await
                .map_err(|_| ServiceError::StillReloading {
                    name: service.config.name.clone(),
                    bound: humantime::format_duration(bound).to_string(),
                })?;
            guards.push(guard);
        }
        Ok(guards)
    }
}
