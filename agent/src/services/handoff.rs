//! [`Handoff`]: one reload of a service, as one sequence.
//!
//! verify -> preflight -> spawn -> ready -> probation -> commit -> drain:
//! 1. verify: the stored artifact is checked again, as at upload (see
//!    [`ArtifactVerifier`]): a file changed in the store is never run;
//! 2. preflight: the new binary runs once with the preflight arguments,
//!    without sockets, bounded in time;
//! 3. spawn: the new process starts in its own process group with the
//!    *same* listening sockets as the serving one; both accept from the
//!    same kernel queue, so nothing queued is lost (a fresh SO_REUSEPORT
//!    socket would not do: its queue is reset when one side closes);
//! 4. ready: its readiness condition, bounded by the readiness timeout; a
//!    crash or a timeout kills the new process group and leaves the old
//!    process serving, untouched;
//! 5. probation (see [`super::probation`]): the new process serves beside
//!    the old one and must stay alive and healthy for a while; if it does
//!    not, it is drained and the old one goes on (REVERTED), nothing
//!    committed;
//! 6. commit: the new version is made current and written (its bytes
//!    fsync'd, renamed over the state file) before the old process is told
//!    anything; the folder's fsync, which makes the rename durable across a
//!    power loss, follows the drain signal and precedes the answer. Why
//!    that order is safe: an agent crash at any point after the rename
//!    finds the new state (the processes outlive it and are adopted as the
//!    new version); a power loss before the folder's fsync ends every
//!    process and may bring back the old state, whole, at boot, but no
//!    caller was told the new version succeeded, since the answer waits
//!    for that fsync. So no caller is ever told of a version a reboot
//!    would not bring back, and the fsync is not between READY and the
//!    traffic moving to the new process;
//! 7. drain: the old process gets its drain signal, the drain timeout, then
//!    SIGKILL of its group. The service's reload lock is held until the
//!    drain ends, so the next reload waits for it (bounded).
//!
//! A crash restart (see [`super::monitor`]) runs steps 1-4 too.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use reload_proto::v1 as pb;

use super::error::{ServiceError, StartFailure};
use super::output::OutputLogs;
use super::preflight::run_preflight;
use super::probation;
use super::process::{describe_exit, drain, Process};
use super::readiness::{describe_readiness, wait_ready, NotifyPath};
use super::service::Service;
use super::shim;
use crate::config::{Readiness, PROBE_LISTENER};
use crate::events::{EventBus, EventFields};
use crate::main_thread::Launcher;
use crate::metrics::SharedMetrics;
use crate::shim::protocol::ShimSpec;
use crate::state::{ArtifactRef, StateFile};
use crate::store::{Admission, ArtifactVerifier, SealedImage, StoredArtifact};

/// The caller's fence (see [`crate::lease`]): checked under the service's
/// reload lock, and held across the commit (the agent's own actions pass
/// [`UNFENCED`]).
pub use crate::lease::{Fence, UNFENCED};

/// What every reload and restart of any service uses; see the module docs.
pub struct Handoff {
    verifier: Arc<ArtifactVerifier>,
    state: Arc<StateFile>,
    events: Arc<EventBus>,
    metrics: SharedMetrics,
    /// Forks happen on the main thread (see [`crate::main_thread`]).
    launcher: Launcher,
    /// Where per-spawn notify sockets are made.
    run_dir: PathBuf,
    spawn_counter: AtomicU64,
    /// Names this agent image's notify sockets apart from those of the
    /// image before an in-place upgrade (still in use by adopted processes).
    image_started_ms: u128,
    /// Where every process's output is kept for `ReadLogs`.
    output: Arc<OutputLogs>,
}

impl Handoff {
    pub fn new(
        verifier: Arc<ArtifactVerifier>,
        state: Arc<StateFile>,
        events: Arc<EventBus>,
        metrics: SharedMetrics,
        launcher: Launcher,
        run_dir: PathBuf,
        output: Arc<OutputLogs>,
    ) -> Handoff {
        Handoff {
            output,
            verifier,
            state,
            events,
            metrics,
            launcher,
            run_dir,
            spawn_counter: AtomicU64::new(0),
            image_started_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        }
    }

    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    pub(super) fn state(&self) -> &StateFile {
        &self.state
    }

    pub(super) fn verifier(&self) -> &ArtifactVerifier {
        &self.verifier
    }

    pub(super) fn output(&self) -> &OutputLogs {
        &self.output
    }

    pub(super) fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }

    /// Steps 1-4: verify, preflight, spawn, wait for ready.
    pub(super) async fn start(
        &self,
        service: &Service,
        sha256: &str,
        admission: Admission,
    ) -> Result<Process, StartFailure> {
        let (artifact, image) = self.verify(service, sha256, admission).await?;
        self.preflight(service, &artifact, &image).await?;
        self.spawn_until_ready(service, &artifact, &image).await
    }

    /// The stored artifact's envelope checked again as one of this service,
    /// and its bytes as the sealed image that is executed (verified once;
    /// see [`crate::store::SealedImage`]).
    async fn verify(
        &self,
        service: &Service,
        sha256: &str,
        admission: Admission,
    ) -> Result<(StoredArtifact, Arc<SealedImage>), StartFailure> {
        self.verifier
            .sealed(sha256, Some(&service.config.name), admission)
            .await
            .map_err(|err| {
                StartFailure::new(pb::ReloadOutcome::VerificationFailed, err.to_string())
            })
    }

    fn child_env(&self, service: &Service, artifact: &StoredArtifact) -> Vec<(String, String)> {
        let mut env = vec![(
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )];
        env.extend(service.config.env.iter().cloned());
        env.push(("RELOAD_SERVICE".into(), service.config.name.clone()));
        env.push((
            "RELOAD_SERVICE_VERSION".into(),
            artifact.manifest.version.clone(),
        ));
        env.push((
            "RELOAD_ARTIFACT_SHA256".into(),
            artifact.manifest.sha256.clone(),
        ));
        env
    }

    /// Runs the new binary with the preflight arguments, without sockets,
    /// bounded in time (see [`super::preflight`]).
    async fn preflight(
        &self,
        service: &Service,
        artifact: &StoredArtifact,
        image: &SealedImage,
    ) -> Result<(), StartFailure> {
        let config = &service.config;
        if config.preflight_args.is_empty() {
            return Ok(());
        }
        self.events.emit(
            pb::EventKind::Preflight,
            EventFields {
                service: &config.name,
                version: &artifact.manifest.version,
                sha256: &artifact.manifest.sha256,
                pid: 0,
                message: format!(
                    "preflight: {} {}",
                    artifact.manifest.version,
                    config.preflight_args.join(" ")
                ),
            },
        );
        // The sealed image, by its fd (see `SealedImage`), with the
        // service's environment and nothing else of the agent's.
        let command = reload_server::spawn::command(reload_server::spawn::SpawnSpec {
            program: &artifact.path,
            args: &config.preflight_args,
            env: self.child_env(service, artifact),
            working_dir: &config.working_dir,
            sockets: Vec::new(),
            die_with_parent: false,
            own_process_group: true,
            image: Some(reload_server::spawn::ExecFd {
                fd: image.fd(),
                script: image.script,
            }),
        })
        .map_err(|err| {
            StartFailure::new(
                pb::ReloadOutcome::PreflightFailed,
                format!("cannot prepare the preflight: {err}"),
            )
        })?;
        run_preflight(command, config.preflight_timeout)
            .await
            .map(|_| ())
            .map_err(|failure| {
                StartFailure::new(
                    pb::ReloadOutcome::PreflightFailed,
                    format!("preflight `{}` {failure}", config.preflight_args.join(" ")),
                )
            })
    }

    /// Spawns the artifact with the service's sockets and waits until it is
    /// ready. On any failure the new process group is killed and reaped.
    async fn spawn_until_ready(
        &self,
        service: &Service,
        artifact: &StoredArtifact,
        image: &SealedImage,
    ) -> Result<Process, StartFailure> {
        let config = &service.config;
        let n = self.spawn_counter.fetch_add(1, Ordering::Relaxed);
        let mut env = self.child_env(service, artifact);
        let notify = if config.readiness == Readiness::Notify {
            let path = self.run_dir.join(format!(
                "{}-{}-{n}.notify",
                config.name, self.image_started_ms
            ));
            let socket = tokio::net::UnixDatagram::bind(&path).map_err(|err| {
                StartFailure::new(
                    pb::ReloadOutcome::SpawnFailed,
                    format!("cannot create the notify socket {}: {err}", path.display()),
                )
            })?;
            env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
            Some((socket, NotifyPath(path)))
        } else {
            None
        };
        self.events.emit(
            pb::EventKind::Spawning,
            EventFields {
                service: &config.name,
                version: &artifact.manifest.version,
                sha256: &artifact.manifest.sha256,
                pid: 0,
                message: format!("spawning {}", artifact.manifest.version),
            },
        );
        let spawn_failed =
            |reason: String| StartFailure::new(pb::ReloadOutcome::SpawnFailed, reason);
        let mut sockets = service
            .sockets
            .iter()
            .map(|l| Ok((l.name.clone(), l.fd.try_clone()?)))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|err| spawn_failed(format!("cannot duplicate a listening socket: {err}")))?;
        if config.health_private {
            // A port only this process listens on: health checks there
            // reach it, not whichever process accepted from the shared
            // socket.
            let probe = std::net::TcpListener::bind(("127.0.0.1", 0))
                .map_err(|err| spawn_failed(format!("cannot bind a private health port: {err}")))?;
            sockets.push((PROBE_LISTENER.to_string(), OwnedFd::from(probe)));
        }
        let spec = ShimSpec {
            service: config.name.clone(),
            version: artifact.manifest.version.clone(),
            sha256: artifact.manifest.sha256.clone(),
            program: artifact.path.clone(),
            args: config.args.clone(),
            env,
            working_dir: config.working_dir.clone(),
            listeners: sockets.iter().map(|(name, _)| name.clone()).collect(),
            socket_path: shim::socket_path(
                &self.run_dir,
                &config.name,
                &format!("{}-{n}", self.image_started_ms),
            ),
            notify_path: notify.as_ref().map(|(_, path)| path.0.clone()),
            sealed_image: true,
            image_script: image.script,
        };
        let image_fd = image
            .try_clone_fd()
            .map_err(|err| spawn_failed(format!("cannot duplicate the sealed image: {err}")))?;
        let attached = shim::start(&self.launcher, spec, sockets, image_fd)
            .await
            .map_err(spawn_failed)?;
        let pid = attached.pid;
        let process = shim::watch(&config.name, attached, self.output.service(&config.name))
            .map_err(|err| spawn_failed(format!("cannot watch pid {pid}: {err}")))?;
        let spawned = Instant::now();
        let ready = tokio::time::timeout(config.ready_timeout, async {
            tokio::select! {
                status = process.wait() => Err(status),
                () = wait_ready(&config.readiness, notify.as_ref().map(|(s, _)| s)) => Ok(()),
            }
        })
        .await;
        let failure = match ready {
            Ok(Ok(())) => {
                self.metrics
                    .handoff_seconds
                    .get_or_create(&crate::metrics::ServicePhase {
                        service: config.name.clone(),
                        phase: "start_to_ready".into(),
                    })
                    .observe(spawned.elapsed().as_secs_f64());
                if let Some((socket, path)) = notify {
                    process.listen_for_notifications(&config.name, socket, path);
                }
                return Ok(process);
            }
            Ok(Err(status)) => StartFailure {
                outcome: pb::ReloadOutcome::ExitedBeforeReady,
                reason: format!(
                    "exited before ready ({}); stderr: {}",
                    describe_exit(status),
                    process.stderr_tail()
                ),
                new_pid: process.pid,
            },
            Err(_) => StartFailure {
                outcome: pb::ReloadOutcome::ReadyTimeout,
                reason: format!(
                    "not ready within {} (readiness: {}); killed. stderr: {}",
                    humantime::format_duration(config.ready_timeout),
                    describe_readiness(&config.readiness),
                    process.stderr_tail()
                ),
                new_pid: process.pid,
            },
        };
        process.kill().await;
        Err(failure)
    }

    /// Activates stored artifact `sha256` for `service`; `rollback` when it
    /// goes back to the top of the history. Errors are refusals before
    /// anything started; a reload that ran reports its outcome in the
    /// result, whatever it was.
    pub(super) async fn activate(
        &self,
        service: &Arc<Service>,
        sha256: &str,
        rollback: bool,
        allow_downgrade: bool,
        fence: &dyn Fence,
        admission: Admission,
    ) -> Result<pb::ReloadResult, ServiceError> {
        let name = &service.config.name;
        let store = self.verifier.store().clone();
        let sha = sha256.to_string();
        let wanted = name.clone();
        let artifact = tokio::task::spawn_blocking(move || {
            // This service's envelope, or else any (for the refusal).
            match store.stat(&sha, Some(&wanted))? {
                Some(mine) => Ok(Some(mine)),
                None => store.stat(&sha, None),
            }
        })
        .await
        .map_err(|e| ServiceError::Task(e.to_string()))?
        .map_err(ServiceError::Lookup)?
        .ok_or_else(|| ServiceError::ArtifactNotStored(sha256.to_string()))?;
        if artifact.manifest.service != *name {
            return Err(ServiceError::WrongService {
                sha256: sha256.to_string(),
                service: artifact.manifest.service.clone(),
                version: artifact.manifest.version.clone(),
                wanted: name.clone(),
            });
        }
        if service.reloading.swap(true, Ordering::SeqCst) {
            return Err(ServiceError::ReloadRunning(name.clone()));
        }
        let _reloading = ResetOnDrop(&service.reloading);
        let guard = service.reload_lock().await?;
        // The lease is checked again under the lock: a rollout taken over
        // while this call waited for a drain must not act now.
        drop(fence.hold().map_err(ServiceError::Fenced)?);
        // Under the lock: a reload that finished meanwhile may have raised
        // the floor.
        service
            .observe(|o| o.versions.clone())
            .check_floor(&artifact.manifest, allow_downgrade)?;
        Ok(self
            .replace(service, artifact, guard, rollback, fence, admission)
            .await)
    }

    /// The sequence of the module docs, under the service's reload lock
    /// (`guard`, handed on to the drain).
    async fn replace(
        &self,
        service: &Arc<Service>,
        artifact: StoredArtifact,
        guard: tokio::sync::OwnedMutexGuard<()>,
        rollback: bool,
        fence: &dyn Fence,
        admission: Admission,
    ) -> pb::ReloadResult {
        let (old_process, old_versions) =
            service.observe(|o| (o.process.clone(), o.versions.clone()));
        let new_ref = ArtifactRef {
            sha256: artifact.manifest.sha256.clone(),
            version: artifact.manifest.version.clone(),
        };
        let mut result = pb::ReloadResult {
            outcome: pb::ReloadOutcome::Unspecified as i32,
            reason: String::new(),
            from_version: old_versions
                .current
                .as_ref()
                .map(|a| a.version.clone())
                .unwrap_or_default(),
            to_version: new_ref.version.clone(),
            old_pid: old_process.as_ref().map(|p| p.pid).unwrap_or(0),
            new_pid: 0,
            started: Some(SystemTime::now().into()),
            finished: None,
        };
        service.set_state(if old_process.is_some() {
            pb::ServiceState::Reloading
        } else {
            pb::ServiceState::Starting
        });
        self.emit(
            service,
            &new_ref,
            pb::EventKind::Verifying,
            0,
            format!("verifying {}", new_ref.version),
        );

        // The state file as the commit will have it, written and fsync'd
        // while the new process starts (see `StateFile::prepare`): the
        // commit then only renames it. Dropped (and removed) on a failure.
        let next_versions = old_versions.after(&new_ref, rollback);
        let prepared = {
            let (state, name, versions) = (
                self.state.clone(),
                service.config.name.clone(),
                next_versions.clone(),
            );
            tokio::task::spawn_blocking(move || state.prepare(&name, versions))
        };

        // Steps 1-4. A failure leaves the old process serving, untouched.
        let new_process = match self.start(service, &new_ref.sha256, admission).await {
            Ok(process) => process,
            Err(failure) => {
                self.record_failure(
                    service,
                    &new_ref,
                    &mut result,
                    failure,
                    old_process.is_some(),
                );
                return result;
            }
        };
        let new_pid = new_process.pid;
        result.new_pid = new_pid;
        self.emit(
            service,
            &new_ref,
            pb::EventKind::Ready,
            new_pid,
            format!("{} is ready (pid {new_pid})", new_ref.version),
        );

        // Probation: the old process serves beside the new one until the
        // new one has proven itself; on a failure the new one goes and the
        // old one simply goes on (REVERTED).
        let proven = probation::run(service, &new_ref, &new_process, &self.events).await;
        // Step 5, at the commit point: a lease lost meanwhile (taken over by
        // another rollout) means this call may not commit; the fence is
        // held across the commit, so no grant slips in between. Current,
        // durably, before the old process is told to go.
        let prepared = match prepared.await {
            Ok(Ok(prepared)) => Some(prepared),
            // Written at the commit instead.
            Ok(Err(err)) => {
                tracing::warn!(service = %service.config.name, error = %format!("{err:#}"), "could not write the next state ahead");
                None
            }
            Err(_) => None,
        };
        let mut written = None;
        let refused = match proven.and_then(|()| {
            fence.hold().map_err(|fenced| {
                StartFailure::new(
                    pb::ReloadOutcome::Reverted,
                    format!("the lease was lost before the commit ({fenced}); the new process is drained"),
                )
            })
        }) {
            Ok(hold) => {
                written = self.commit(
                    service,
                    &new_ref,
                    next_versions,
                    prepared,
                    new_process.clone(),
                    hold.token,
                );
                None
            }
            Err(failure) => Some(failure),
        };
        if let Some(failure) = refused {
            // Drained, not killed: it may hold connections it accepted from
            // the shared socket during probation, whose requests it answers
            // (with `Connection: close`) before it goes.
            let config = &service.config;
            drain(&new_process, config.drain).await;
            self.record_failure(
                service,
                &new_ref,
                &mut result,
                failure,
                old_process.is_some(),
            );
            return result;
        }
        result.outcome = pb::ReloadOutcome::Succeeded as i32;
        result.finished = Some(SystemTime::now().into());
        service.observe(|o| o.last_reload = Some(result.clone()));
        self.count_reload(&service.config.name, result.outcome);

        // Step 6.
        match old_process {
            Some(old) => self.drain_in_background(service, &new_ref, new_pid, old, guard),
            None => self.emit(
                service,
                &new_ref,
                pb::EventKind::Done,
                new_pid,
                format!("{} started (pid {new_pid})", new_ref.version),
            ),
        }
        // Durable before the answer (see the module docs).
        if let Some(Err(err)) = written.map(crate::state::Written::sync) {
            tracing::error!(service = %service.config.name, version = %new_ref.version, error = %format!("{err:#}"), "could not persist the new current version");
        }
        result
    }

    fn emit(
        &self,
        service: &Service,
        artifact: &ArtifactRef,
        kind: pb::EventKind,
        pid: u32,
        message: String,
    ) {
        self.events.emit(
            kind,
            EventFields {
                service: &service.config.name,
                version: &artifact.version,
                sha256: &artifact.sha256,
                pid,
                message,
            },
        );
    }

    /// A reload that produced no ready process: reported, counted, and the
    /// service left as it was (serving with the old process, if any).
    fn record_failure(
        &self,
        service: &Service,
        new_ref: &ArtifactRef,
        result: &mut pb::ReloadResult,
        failure: StartFailure,
        old_serving: bool,
    ) {
        result.outcome = failure.outcome as i32;
        result.reason = failure.reason.clone();
        result.new_pid = failure.new_pid;
        result.finished = Some(SystemTime::now().into());
        service.observe(|o| o.last_reload = Some(result.clone()));
        self.count_reload(&service.config.name, result.outcome);
        service.set_state(if old_serving {
            pb::ServiceState::Running
        } else {
            pb::ServiceState::Failed
        });
        let message = format!(
            "reload to {} failed ({}): {}; {}",
            new_ref.version,
            failure.outcome.as_str_name(),
            failure.reason,
            if old_serving {
                "the old process keeps serving"
            } else {
                "nothing is serving"
            }
        );
        self.emit(
            service,
            new_ref,
            pb::EventKind::Failed,
            failure.new_pid,
            message,
        );
    }

    /// Makes `new_process` the serving one and `versions` current: written
    /// first (durable once the returned [`crate::state::Written`] is
    /// synced), then pinned in the store (pruning keeps current and
    /// history), then in memory.
    fn commit(
        &self,
        service: &Service,
        new_ref: &ArtifactRef,
        versions: crate::state::ServiceVersions,
        prepared: Option<crate::state::Prepared>,
        new_process: Process,
        token: u64,
    ) -> Option<crate::state::Written> {
        let name = &service.config.name;
        // Under the fence: the log orders commits among the grants.
        tracing::info!(service = %name, version = %new_ref.version, pid = new_process.pid, token, "committing under fencing token");
        let written = match prepared {
            Some(prepared) => self.state.commit_prepared(prepared, name, versions.clone()),
            None => self.state.write(name, versions.clone()),
        };
        let written = match written {
            Ok(written) => Some(written),
            Err(err) => {
                // Serving is right; only the memory of it across a restart
                // is at risk. Say so loudly.
                tracing::error!(service = %name, version = %new_ref.version, error = %format!("{err:#}"), "could not persist the new current version");
                None
            }
        };
        self.verifier.store().pin(name, versions.pinned());
        self.verifier
            .keep_images(&self.verifier.store().pinned_all());
        service.observe(|o| {
            o.versions = versions;
            o.process = Some(new_process);
            o.health = pb::HealthState::Unknown;
            o.consecutive_healthy = 0;
        });
        service.set_state(pb::ServiceState::Running);
        service.bump();
        written
    }

    /// Drains the old process in a task of its own. The reload lock
    /// (`guard`) moves into it: the next reload of this service waits for
    /// the drain (bounded by the drain timeout).
    fn drain_in_background(
        &self,
        service: &Service,
        new_ref: &ArtifactRef,
        new_pid: u32,
        old: Process,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) {
        let config = &service.config;
        let message = format!(
            "draining pid {} with {} (up to {})",
            old.pid,
            config.drain.describe(),
            humantime::format_duration(config.drain.bound())
        );
        self.emit(service, new_ref, pb::EventKind::Draining, old.pid, message);
        let events = self.events.clone();
        let metrics = self.metrics.clone();
        let plan = config.drain;
        let (name, version, sha) = (
            config.name.clone(),
            new_ref.version.clone(),
            new_ref.sha256.clone(),
        );
        tokio::spawn(async move {
            let draining = Instant::now();
            let outcome = drain(&old, plan).await;
            metrics
                .handoff_seconds
                .get_or_create(&crate::metrics::ServicePhase {
                    service: name.clone(),
                    phase: "drain".into(),
                })
                .observe(draining.elapsed().as_secs_f64());
            events.emit(
                pb::EventKind::Done,
                EventFields {
                    service: &name,
                    version: &version,
                    sha256: &sha,
                    pid: new_pid,
                    message: format!("reload to {version} done; old pid {} {outcome}", old.pid),
                },
            );
            drop(guard);
        });
    }

    fn count_reload(&self, service: &str, outcome: i32) {
        self.metrics
            .reloads
            .get_or_create(&crate::metrics::ServiceResult {
                service: service.to_string(),
                result: crate::metrics::outcome_label(outcome),
            })
            .inc();
    }
}

/// Clears a flag when the reload that set it ends, however it ends.
struct ResetOnDrop<'a>(&'a AtomicBool);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
