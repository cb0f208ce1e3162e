//! Running services: start, reload with the same sockets, drain, restart.
//!
//! Each declared service has its listening sockets (bound once, see
//! [`crate::listeners`]), at most one *serving* process, and a monitor task
//! that restarts the serving process with backoff when it exits on its own.
//!
//! A reload ([`Supervisor::activate`]) follows DESIGN.md section 3:
//! re-verify the stored artifact, preflight it, spawn it with the same
//! sockets beside the serving process (both accept from the same kernel
//! queue), wait for readiness, and only then make it current, persist that,
//! and drain the old process (its signal, the drain timeout, then SIGKILL of
//! its group). Any failure before ready kills the new process group and
//! leaves the old process serving, untouched.
//!
//! Concurrency: `reloading` refuses a second reload while one is starting a
//! process; the `reload` mutex is held by a reload from start to the end of
//! the old process's drain, and by each restart attempt, so a reload that
//! arrives while the previous one drains waits at most the drain timeout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use reload_artifact::verify::check_platform;
use reload_artifact::TrustedKeys;
use reload_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tonic::Status;

use crate::config::{ListenerConfig, ListenerKind, Readiness, ServiceConfig};
use crate::events::{EventBus, EventFields};
use crate::handover::{FdsToPass, Inherited, ProcessHandover, ServiceHandover};
use crate::listeners::{bind_one, bound_as, BoundListener};
use crate::state::{ArtifactRef, ServiceVersions, StateFile};
use crate::store::{ArtifactStore, StoredArtifact};
use crate::Launcher;
use reload_server::spawn::{spawn_service, ServiceChild, SpawnSpec};

/// Lines of a process's stderr kept for failure reasons.
const STDERR_TAIL_LINES: usize = 12;
/// A process that ran this long before exiting resets the restart backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// One process of a service, as the agent tracks it.
#[derive(Clone)]
pub struct Process {
    pub pid: u32,
    started: Instant,
    /// `Some(status)` once the process has exited and been reaped.
    exited: watch::Receiver<Option<ExitStatus>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Duplicates of the fds the agent holds for this process, for a
    /// handover to the next agent image.
    fds: Arc<ProcessFds>,
}

struct ProcessFds {
    pidfd: OwnedFd,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    notify: Mutex<Option<(OwnedFd, PathBuf)>>,
}

impl Process {
    /// Keeps the process's notify socket open for its whole life and logs
    /// what it says there (STATUS=, STOPPING=1): a program that notifies
    /// while draining must not find the socket gone.
    fn listen_for_notifications(
        &self,
        service: &str,
        socket: tokio::net::UnixDatagram,
        path: NotifyPath,
    ) {
        let (service, pid, process) = (service.to_string(), self.pid, self.clone());
        if let Ok(dup) = socket.as_fd().try_clone_to_owned() {
            *self.fds.notify.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((dup, path.0.clone()));
        }
        tokio::spawn(async move {
            let _path = path;
            let mut buffer = vec![0u8; 4096];
            loop {
                tokio::select! {
                    received = socket.recv(&mut buffer) => match received {
                        Ok(n) => {
                            let message = String::from_utf8_lossy(&buffer[..n]);
                            tracing::debug!(service, pid, notify = %message.trim(), "notification");
                        }
                        Err(_) => return,
                    },
                    _ = process.wait() => return,
                }
            }
        });
    }

    async fn wait(&self) -> ExitStatus {
        let mut exited = self.exited.clone();
        let status = exited
            .wait_for(Option::is_some)
            .await
            .map(|s| s.expect("checked by wait_for"));
        // The sender lives in the reaper task until it has sent the status.
        status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(0))
    }

    fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.is_empty() {
            "(nothing on stderr)".into()
        } else {
            tail.iter().cloned().collect::<Vec<_>>().join(" | ")
        }
    }

    fn signal_group(&self, signal: Signal) {
        // ESRCH: the whole group is gone already.
        let _ = killpg(Pid::from_raw(self.pid as i32), signal);
    }

    /// Kills the whole process group and waits until the leader is reaped.
    async fn kill(&self) {
        self.signal_group(Signal::SIGKILL);
        self.wait().await;
    }
}

/// What a status report shows; changed under one lock.
struct Observed {
    state: pb::ServiceState,
    state_since: SystemTime,
    health: pb::HealthState,
    consecutive_healthy: u32,
    versions: ServiceVersions,
    /// The serving process.
    process: Option<Process>,
    restarts: u32,
    last_reload: Option<pb::ReloadResult>,
}

pub struct Service {
    pub config: ServiceConfig,
    sockets: Vec<BoundListener>,
    reloading: AtomicBool,
    reload: Arc<tokio::sync::Mutex<()>>,
    observed: Mutex<Observed>,
    /// Bumped whenever the serving process changes, to wake the monitor.
    changed: watch::Sender<u64>,
}

impl Service {
    fn observe<T>(&self, f: impl FnOnce(&mut Observed) -> T) -> T {
        f(&mut self.observed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn set_state(&self, state: pb::ServiceState) {
        self.observe(|o| {
            if o.state != state {
                o.state = state;
                o.state_since = SystemTime::now();
            }
        });
    }

    fn bump(&self) {
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

/// Why a start or reload did not produce a ready process.
struct StartFailure {
    outcome: pb::ReloadOutcome,
    reason: String,
    new_pid: u32,
}

impl StartFailure {
    fn new(outcome: pb::ReloadOutcome, reason: impl Into<String>) -> StartFailure {
        StartFailure {
            outcome,
            reason: reason.into(),
            new_pid: 0,
        }
    }
}

pub struct Supervisor {
    services: BTreeMap<String, Arc<Service>>,
    store: Arc<ArtifactStore>,
    trusted: TrustedKeys,
    state: StateFile,
    run_dir: PathBuf,
    spawn_counter: AtomicU64,
    /// Names this agent image's notify sockets apart from those of the
    /// image before an in-place upgrade (still in use by adopted processes).
    image_started_ms: u128,
    /// Set once the agent is stopping: monitors stop restarting.
    stopping: AtomicBool,
    pub events: Arc<EventBus>,
    pub metrics: crate::metrics::SharedMetrics,
    launcher: Launcher,
    /// (service, listener) of given sockets no listener took: their
    /// fd-store entries go.
    unused_given: Vec<(String, String)>,
}

impl Supervisor {
    /// Binds every service's sockets and reads the persisted versions. Binds
    /// before anything starts, so a port in use stops the agent at once.
    ///
    /// After an in-place upgrade (`inherited`), the sockets and the serving
    /// processes of the previous agent image are taken over instead: nothing
    /// is bound again or restarted. A listener the config added since is
    /// bound; a service it removed is drained.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        services: &[ServiceConfig],
        state_dir: &Path,
        store: Arc<ArtifactStore>,
        trusted: TrustedKeys,
        events: Arc<EventBus>,
        metrics: crate::metrics::SharedMetrics,
        launcher: Launcher,
        inherited: Option<&Inherited>,
        given: Vec<GivenSocket>,
    ) -> anyhow::Result<Supervisor> {
        let run_dir = state_dir.join("run");
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        // Notify sockets of processes from an earlier run are stale, except
        // those of processes adopted from the previous image.
        let adopted_notify: BTreeSet<PathBuf> = inherited
            .iter()
            .flat_map(|h| &h.description.services)
            .filter_map(|s| s.process.as_ref()?.notify_path.clone())
            .collect();
        for entry in std::fs::read_dir(&run_dir)? {
            let path = entry?.path();
            if !adopted_notify.contains(&path) {
                let _ = std::fs::remove_file(path);
            }
        }
        let state = StateFile::open(state_dir)?;
        // Sockets not bound here go to their listeners first, and those no
        // listener takes are closed, before anything is bound.
        let (mut assigned, unused_given) = assign_given(services, given);
        let mut by_name = BTreeMap::new();
        let mut adopted = Vec::new();
        for config in services {
            let versions = state.get(&config.name);
            store.pin(&config.name, pinned_shas(&versions));
            let handed_over = inherited.and_then(|h| Some((h, h.service(&config.name)?)));
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
            let (process, restarts) = match handed_over {
                Some((inherited, handed)) => (
                    handed
                        .process
                        .as_ref()
                        .map(|p| adopt_process(&config.name, p, inherited))
                        .transpose()?,
                    handed.restarts,
                ),
                None => (None, 0),
            };
            let state = match (&process, &versions.current) {
                (Some(_), _) => pb::ServiceState::Running,
                // A persisted current version is started by the monitor.
                (None, Some(_)) => pb::ServiceState::Starting,
                (None, None) => pb::ServiceState::Stopped,
            };
            if let Some((process, _)) = &process {
                adopted.push((config.name.clone(), process.pid));
            }
            let service = Service {
                sockets,
                config: config.clone(),
                reloading: AtomicBool::new(false),
                reload: Arc::new(tokio::sync::Mutex::new(())),
                observed: Mutex::new(Observed {
                    state,
                    // An adopted process has been running since before this
                    // image started.
                    state_since: handed_over
                        .and_then(|(_, h)| h.process.as_ref())
                        .and_then(|p| {
                            SystemTime::now().checked_sub(Duration::from_millis(p.running_ms))
                        })
                        .unwrap_or_else(SystemTime::now),
                    health: pb::HealthState::Unknown,
                    consecutive_healthy: 0,
                    versions,
                    process: None,
                    restarts,
                    last_reload: None,
                }),
                changed: watch::channel(0).0,
            };
            if let Some((process, notify)) = process {
                if let Some((socket, path)) = notify {
                    process.listen_for_notifications(&config.name, socket, NotifyPath(path));
                }
                service.observe(|o| o.process = Some(process));
            }
            by_name.insert(config.name.clone(), Arc::new(service));
        }
        for (name, pid) in &adopted {
            tracing::info!(service = %name, pid, "adopted the serving process from the previous agent image");
        }
        if let Some(inherited) = inherited {
            for handed in &inherited.description.services {
                if by_name.contains_key(&handed.name) {
                    continue;
                }
                let Some(p) = &handed.process else { continue };
                // The config no longer declares this service: drain it
                // rather than leave a process nobody supervises.
                let (process, _) = adopt_process(&handed.name, p, inherited)?;
                tracing::warn!(service = %handed.name, pid = process.pid, "the config no longer declares this service; draining its process");
                tokio::spawn(async move {
                    drain(&process, Signal::SIGTERM, Duration::from_secs(30)).await;
                });
            }
        }
        Ok(Supervisor {
            services: by_name,
            store,
            trusted,
            state,
            run_dir,
            spawn_counter: AtomicU64::new(0),
            image_started_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
            stopping: AtomicBool::new(false),
            events,
            metrics,
            launcher,
            unused_given,
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn service(&self, name: &str) -> Result<&Arc<Service>, Status> {
        self.services.get(name).ok_or_else(|| {
            Status::not_found(format!(
                "this agent has no service named {name:?}; its config declares {:?}",
                self.services.keys().collect::<Vec<_>>()
            ))
        })
    }

    /// Starts the monitor of every service (which also starts the persisted
    /// current version).
    pub fn start_monitors(self: &Arc<Self>) {
        for service in self.services.values() {
            let (supervisor, service) = (self.clone(), service.clone());
            tokio::spawn(async move { supervisor.monitor(service).await });
        }
    }

    /// Watches the serving process; starts it when it should run and does
    /// not, with exponential backoff between failed attempts.
    async fn monitor(&self, service: Arc<Service>) {
        let mut changed = service.changed.subscribe();
        let mut backoff = service.config.initial_backoff;
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let (process, should_run) =
                service.observe(|o| (o.process.clone(), o.versions.current.is_some()));
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
                            backoff = service.config.initial_backoff;
                        }
                        let versions = service.observe(|o| o.versions.clone());
                        let current = versions.current.unwrap_or_else(|| ArtifactRef { sha256: String::new(), version: String::new() });
                        self.events.emit(pb::EventKind::Exited, EventFields {
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
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let (process, current) =
                service.observe(|o| (o.process.clone(), o.versions.current.clone()));
            let Some(current) = current.filter(|_| process.is_none()) else {
                continue;
            };
            match self.start_artifact(&service, &current.sha256).await {
                Ok(process) => {
                    let pid = process.pid;
                    service.observe(|o| o.process = Some(process));
                    service.set_state(pb::ServiceState::Running);
                    self.events.emit(
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
                    self.events.emit(
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

    /// Verify, preflight and start a stored artifact, waiting for readiness.
    async fn start_artifact(
        &self,
        service: &Service,
        sha256: &str,
    ) -> Result<Process, StartFailure> {
        let artifact = self.verify(service, sha256).await?;
        self.preflight(service, &artifact).await?;
        self.start_process(service, &artifact).await
    }

    /// Re-reads and re-verifies a stored artifact: hash, signature, expiry,
    /// platform, service name.
    async fn verify(
        &self,
        service: &Service,
        sha256: &str,
    ) -> Result<StoredArtifact, StartFailure> {
        self.verify_stored(&service.config.name, sha256)
            .await
            .map_err(|reason| StartFailure::new(pb::ReloadOutcome::VerificationFailed, reason))
    }

    /// Re-reads and re-verifies stored artifact `sha256` as one of service
    /// `name` (also the agent's own artifacts, as service `reload-agent`).
    pub async fn verify_stored(&self, name: &str, sha256: &str) -> Result<StoredArtifact, String> {
        let store = self.store.clone();
        let trusted = self.trusted.clone();
        let sha = sha256.to_string();
        let name = name.to_string();
        let checked = tokio::task::spawn_blocking(move || -> Result<StoredArtifact, String> {
            let artifact = store
                .stat(&sha)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!("artifact {sha} is not in the store (pruned or never uploaded)")
                })?;
            store
                .check_stored_content(&artifact)
                .map_err(|e| e.to_string())?;
            let envelope = store.envelope_bytes(&sha).map_err(|e| e.to_string())?;
            let verified = trusted
                .verify_envelope(&envelope, SystemTime::now())
                .map_err(|e| e.to_string())?;
            check_platform(&verified.manifest).map_err(|e| e.to_string())?;
            if verified.manifest.service != name {
                return Err(format!(
                    "artifact is signed for service {:?}, not {name:?}",
                    verified.manifest.service
                ));
            }
            Ok(artifact)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        checked
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
    /// bounded in time: catches a binary that cannot even start (wrong
    /// architecture, missing libraries, a broken build) before any process
    /// is replaced.
    async fn preflight(
        &self,
        service: &Service,
        artifact: &StoredArtifact,
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
        let mut command = tokio::process::Command::new(&artifact.path);
        command
            .args(&config.preflight_args)
            .env_clear()
            .envs(self.child_env(service, artifact))
            .current_dir(&config.working_dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let failed = |reason: String| StartFailure::new(pb::ReloadOutcome::PreflightFailed, reason);
        let output = match tokio::time::timeout(config.preflight_timeout, command.output()).await {
            Err(_) => {
                return Err(failed(format!(
                    "preflight `{}` did not finish within {}",
                    config.preflight_args.join(" "),
                    humantime::format_duration(config.preflight_timeout)
                )))
            }
            Ok(Err(err)) => {
                return Err(failed(format!("preflight could not run the binary: {err}")))
            }
            Ok(Ok(output)) => output,
        };
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(failed(format!(
            "preflight `{}` {}; stderr: {}",
            config.preflight_args.join(" "),
            describe_exit(output.status),
            last_chars(stderr.trim(), 500)
        )))
    }

    /// Spawns the artifact with the service's sockets and waits until it is
    /// ready. On any failure the new process group is killed and reaped.
    async fn start_process(
        &self,
        service: &Service,
        artifact: &StoredArtifact,
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
        let sockets = service
            .sockets
            .iter()
            .map(|l| Ok((l.name.clone(), l.fd.try_clone()?)))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|err| spawn_failed(format!("cannot duplicate a listening socket: {err}")))?;
        let (program, args, working_dir) = (
            artifact.path.clone(),
            config.args.clone(),
            config.working_dir.clone(),
        );
        // Forked on the main thread: see crate::main_thread.
        let child = self
            .launcher
            .run(move || {
                spawn_service(SpawnSpec {
                    program: &program,
                    args: &args,
                    env,
                    working_dir: &working_dir,
                    sockets: sockets
                        .iter()
                        .map(|(name, fd)| (name.clone(), fd.as_fd()))
                        .collect(),
                    die_with_parent: true,
                    own_process_group: true,
                })
            })
            .await
            .ok_or_else(|| spawn_failed("the agent is stopping".into()))?
            .map_err(|err| spawn_failed(format!("spawn failed: {err}")))?;
        let ServiceChild {
            pid,
            pidfd,
            stdout,
            stderr,
        } = child;
        let process = watch_process(&config.name, pid, pidfd, stdout, stderr, Instant::now())
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

    /// Activates a stored artifact; see the module docs.
    pub async fn activate(
        &self,
        name: &str,
        sha256: &str,
        allow_downgrade: bool,
    ) -> Result<(pb::ReloadResult, pb::ServiceStatus), Status> {
        self.activate_as(name, sha256, false, allow_downgrade).await
    }

    /// `rollback`: this activation goes back to the top of the history.
    async fn activate_as(
        &self,
        name: &str,
        sha256: &str,
        rollback: bool,
        allow_downgrade: bool,
    ) -> Result<(pb::ReloadResult, pb::ServiceStatus), Status> {
        let service = self.service(name)?.clone();
        let sha = sha256.to_string();
        let found = {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.stat(&sha))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        let artifact = found.ok_or_else(|| {
            Status::not_found(format!("this agent holds no artifact with sha256 {sha256}; upload it first (reloadctl upload)"))
        })?;
        if artifact.manifest.service != name {
            return Err(Status::failed_precondition(format!(
                "artifact {sha256} is {} {}, not an artifact of service {name:?}",
                artifact.manifest.service, artifact.manifest.version
            )));
        }
        if service.reloading.swap(true, Ordering::SeqCst) {
            return Err(Status::aborted(format!(
                "a reload of {name:?} is already running; wait for it to finish (reloadctl status)"
            )));
        }
        let _reloading = ResetOnDrop(&service.reloading);
        // A previous reload may still be draining its old process: wait for
        // it, bounded by the drain timeout (plus the SIGKILL and reap).
        let bound = service.config.drain_timeout + Duration::from_secs(5);
        let guard = tokio::time::timeout(bound, service.reload.clone().lock_owned())
            .await
            .map_err(|_| {
                Status::aborted(format!(
                    "the previous reload of {name:?} did not finish within {}",
                    humantime::format_duration(bound)
                ))
            })?;
        // Under the lock: a reload that finished meanwhile may have raised
        // the floor.
        check_downgrade_floor(
            &service.observe(|o| o.versions.clone()),
            &artifact,
            allow_downgrade,
        )?;
        let result = self.replace(&service, artifact, guard, rollback).await;
        Ok((result, service.status()))
    }

    /// Rolls back to the previous version.
    pub async fn rollback(
        &self,
        name: &str,
        allow_downgrade: bool,
    ) -> Result<(pb::ReloadResult, pb::ServiceStatus), Status> {
        let service = self.service(name)?;
        let previous = service
            .observe(|o| o.versions.previous().cloned())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "service {name:?} has no previous version to roll back to"
                ))
            })?;
        self.activate_as(name, &previous.sha256, true, allow_downgrade)
            .await
    }

    async fn replace(
        &self,
        service: &Arc<Service>,
        artifact: StoredArtifact,
        guard: tokio::sync::OwnedMutexGuard<()>,
        rollback: bool,
    ) -> pb::ReloadResult {
        let config = &service.config;
        let started = SystemTime::now();
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
            started: Some(started.into()),
            finished: None,
        };
        let fields = |pid: u32, message: String| EventFields {
            service: &config.name,
            version: &new_ref.version,
            sha256: &new_ref.sha256,
            pid,
            message,
        };
        if old_process.is_some() {
            service.set_state(pb::ServiceState::Reloading);
        } else {
            service.set_state(pb::ServiceState::Starting);
        }
        self.events.emit(
            pb::EventKind::Verifying,
            fields(0, format!("verifying {}", new_ref.version)),
        );
        let started_process = match self.verify(service, &new_ref.sha256).await {
            Ok(verified) => match self.preflight(service, &verified).await {
                Ok(()) => self.start_process(service, &verified).await,
                Err(failure) => Err(failure),
            },
            Err(failure) => Err(failure),
        };
        let new_process = match started_process {
            Ok(process) => process,
            Err(failure) => {
                result.outcome = failure.outcome as i32;
                result.reason = failure.reason.clone();
                result.new_pid = failure.new_pid;
                result.finished = Some(SystemTime::now().into());
                let state_after = if old_process.is_some() {
                    pb::ServiceState::Running
                } else {
                    pb::ServiceState::Failed
                };
                service.observe(|o| o.last_reload = Some(result.clone()));
                self.count_reload(&config.name, result.outcome);
                service.set_state(state_after);
                self.events.emit(
                    pb::EventKind::Failed,
                    fields(
                        failure.new_pid,
                        format!(
                            "reload to {} failed ({}): {}; {}",
                            new_ref.version,
                            failure.outcome.as_str_name(),
                            failure.reason,
                            if old_process.is_some() {
                                "the old process keeps serving"
                            } else {
                                "nothing is serving"
                            }
                        ),
                    ),
                );
                return result;
            }
        };
        let new_pid = new_process.pid;
        result.new_pid = new_pid;
        self.events.emit(
            pb::EventKind::Ready,
            fields(
                new_pid,
                format!("{} is ready (pid {new_pid})", new_ref.version),
            ),
        );

        // Make it current, durably, before the old process is told to go.
        let versions = old_versions.after(&new_ref, rollback);
        if let Err(err) = self.state.set(&config.name, versions.clone()) {
            // Serving is right; only the memory of it across a restart is
            // at risk. Say so loudly.
            tracing::error!(service = %config.name, error = %format!("{err:#}"), "could not persist the new current version");
        }
        self.store.pin(&config.name, pinned_shas(&versions));
        service.observe(|o| {
            o.versions = versions;
            o.process = Some(new_process);
            o.health = pb::HealthState::Unknown;
            o.consecutive_healthy = 0;
        });
        service.set_state(pb::ServiceState::Running);
        service.bump();
        result.outcome = pb::ReloadOutcome::Succeeded as i32;
        result.finished = Some(SystemTime::now().into());
        service.observe(|o| o.last_reload = Some(result.clone()));
        self.count_reload(&config.name, result.outcome);

        match old_process {
            Some(old) => {
                self.events.emit(
                    pb::EventKind::Draining,
                    fields(
                        old.pid,
                        format!(
                            "draining pid {} with {} (up to {})",
                            old.pid,
                            config.drain_signal,
                            humantime::format_duration(config.drain_timeout)
                        ),
                    ),
                );
                let events = self.events.clone();
                let metrics = self.metrics.clone();
                let (signal, timeout) = (config.drain_signal, config.drain_timeout);
                let (name, version, sha) = (
                    config.name.clone(),
                    new_ref.version.clone(),
                    new_ref.sha256.clone(),
                );
                // The guard moves into the drain: the next reload of this
                // service waits for it (bounded by the drain timeout).
                tokio::spawn(async move {
                    let draining = Instant::now();
                    let outcome = drain(&old, signal, timeout).await;
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
                            message: format!(
                                "reload to {version} done; old pid {} {outcome}",
                                old.pid
                            ),
                        },
                    );
                    drop(guard);
                });
            }
            None => {
                self.events.emit(
                    pb::EventKind::Done,
                    fields(
                        new_pid,
                        format!("{} started (pid {new_pid})", new_ref.version),
                    ),
                );
            }
        }
        result
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

    /// Stops every service process (agent shutdown): drain signal, then
    /// SIGKILL after the drain timeout.
    pub async fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut drains = Vec::new();
        for service in self.services.values() {
            // Waits for a reload in progress; holding the lock also keeps
            // the monitor from starting anything meanwhile.
            let _guard = service.reload.lock().await;
            let process = service.observe(|o| o.process.take());
            service.set_state(pb::ServiceState::Stopped);
            service.bump();
            if let Some(process) = process {
                let (signal, timeout) = (service.config.drain_signal, service.config.drain_timeout);
                drains.push(async move { drain(&process, signal, timeout).await });
            }
        }
        for drain in drains {
            drain.await;
        }
    }
}

/// A listening socket the agent did not bind itself: kept for it in
/// systemd's fd store, or handed over by the previous agent image; named by
/// the service and listener it belonged to.
pub struct GivenSocket {
    pub service: String,
    pub listener: String,
    pub fd: OwnedFd,
}

/// Which given socket each configured listener takes: one of the kind and
/// at the address the config asks for, its own (same service and name)
/// first, else (a listener renamed or moved to another service) any other
/// at that exact address; never one socket for two listeners, and a
/// listener on port 0 only its own. The rest are closed here, before
/// anything is bound (an old socket left open would collide with the new
/// bind); their (service, listener) names are returned.
#[allow(clippy::type_complexity)]
fn assign_given(
    services: &[ServiceConfig],
    given: Vec<GivenSocket>,
) -> (BTreeMap<(String, String), OwnedFd>, Vec<(String, String)>) {
    let mut pool: Vec<Option<GivenSocket>> = given.into_iter().map(Some).collect();
    let mut assigned = BTreeMap::new();
    let wanted: Vec<(&ServiceConfig, &ListenerConfig)> = services
        .iter()
        .flat_map(|s| s.listeners.iter().map(move |l| (s, l)))
        .collect();
    for own_only in [true, false] {
        for (service, listener) in &wanted {
            let key = (service.name.clone(), listener.name.clone());
            if assigned.contains_key(&key) {
                continue;
            }
            let fixed_address = match listener.kind() {
                ListenerKind::Tcp(addr) | ListenerKind::Udp(addr) => addr.port() != 0,
                ListenerKind::Unix => true,
            };
            if !own_only && !fixed_address {
                continue;
            }
            let found = pool.iter().position(|g| {
                g.as_ref().is_some_and(|g| {
                    (!own_only || (g.service == service.name && g.listener == listener.name))
                        && bound_as(&g.fd, listener)
                })
            });
            if let Some(socket) = found.and_then(|i| pool[i].take()) {
                tracing::info!(service = %service.name, listener = %listener.name, from = %format!("{}/{}", socket.service, socket.listener), "listener keeps the socket it was given");
                assigned.insert(key, socket.fd);
            }
        }
    }
    let unused = pool
        .into_iter()
        .flatten()
        .map(|g| (g.service, g.listener))
        .collect();
    (assigned, unused)
}

/// A process of the previous agent image, watched by this one, with its
/// notify socket if it had one.
#[allow(clippy::type_complexity)]
fn adopt_process(
    service: &str,
    handed: &ProcessHandover,
    inherited: &Inherited,
) -> anyhow::Result<(Process, Option<(tokio::net::UnixDatagram, PathBuf)>)> {
    let pidfd = inherited.dup(handed.pidfd)?;
    let stdout = handed.stdout_fd.map(|fd| inherited.dup(fd)).transpose()?;
    let stderr = handed.stderr_fd.map(|fd| inherited.dup(fd)).transpose()?;
    let started = Instant::now()
        .checked_sub(Duration::from_millis(handed.running_ms))
        .unwrap_or_else(Instant::now);
    let process = watch_process(service, handed.pid, pidfd, stdout, stderr, started)
        .with_context(|| format!("service {service:?}: cannot adopt pid {}", handed.pid))?;
    let notify = match (handed.notify_fd, &handed.notify_path) {
        (Some(fd), Some(path)) => {
            let socket = std::os::unix::net::UnixDatagram::from(inherited.dup(fd)?);
            socket.set_nonblocking(true)?;
            Some((tokio::net::UnixDatagram::from_std(socket)?, path.clone()))
        }
        _ => None,
    };
    Ok((process, notify))
}

/// Watches a child (one this image spawned, or one adopted from the
/// previous agent image): reaps it by pidfd in a task of its own, and
/// forwards its output to the log, keeping the tail of stderr for failure
/// reasons.
fn watch_process(
    service: &str,
    pid: u32,
    pidfd: OwnedFd,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    started: Instant,
) -> std::io::Result<Process> {
    let fds = Arc::new(ProcessFds {
        pidfd: pidfd.try_clone()?,
        stdout: stdout.as_ref().map(|fd| fd.try_clone()).transpose()?,
        stderr: stderr.as_ref().map(|fd| fd.try_clone()).transpose()?,
        notify: Mutex::new(None),
    });
    let (exit_tx, exit_rx) = watch::channel(None);
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(stdout) = stdout {
        log_lines(stdout, service, pid, "stdout", None)?;
    }
    if let Some(stderr) = stderr {
        log_lines(stderr, service, pid, "stderr", Some(stderr_tail.clone()))?;
    }
    tokio::spawn(async move {
        let status = reload_server::spawn::reap(pidfd)
            .await
            .unwrap_or_else(|err| {
                // ECHILD: the previous agent image reaped it between taking the
                // handover snapshot and execve. It is gone; how it ended is not
                // known.
                tracing::warn!(pid, error = %err, "cannot reap the process; treating it as exited");
                // A "stopped" wait status never comes from WEXITED: it
                // stands for "ended, status unknown" (see describe_exit).
                std::os::unix::process::ExitStatusExt::from_raw(0x7f)
            });
        let _ = exit_tx.send(Some(status));
    });
    Ok(Process {
        pid,
        started,
        exited: exit_rx,
        stderr_tail,
        fds,
    })
}

/// Forwards each line a process writes on `pipe` to the log, keeping the
/// last few in `tail` if given (failure reasons quote them).
fn log_lines(
    pipe: OwnedFd,
    service: &str,
    pid: u32,
    stream: &'static str,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) -> std::io::Result<()> {
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
    let service = service.to_string();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(service, pid, stream, "{line}");
            if let Some(tail) = &tail {
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
    Ok(())
}

impl Supervisor {
    /// Before the agent re-executes itself: waits for every reload in
    /// progress (and its drain) to end, then keeps reloads, restarts and
    /// monitors from starting anything for as long as the guards live (to
    /// execve).
    pub async fn quiesce(
        &self,
        bound: Duration,
    ) -> Result<Vec<tokio::sync::OwnedMutexGuard<()>>, Status> {
        let mut guards = Vec::new();
        for service in self.services.values() {
            let guard = tokio::time::timeout(bound, service.reload.clone().lock_owned())
                .await
                .map_err(|_| {
                    Status::aborted(format!(
                        "service {:?} is still reloading or draining after {}; upgrade the agent when it is done",
                        service.config.name,
                        humantime::format_duration(bound)
                    ))
                })?;
            guards.push(guard);
        }
        Ok(guards)
    }

    /// Every service's sockets and serving process, for the next image.
    pub fn handover(&self, fds: &mut FdsToPass) -> std::io::Result<Vec<ServiceHandover>> {
        self.services
            .values()
            .map(|service| {
                let listeners = service
                    .sockets
                    .iter()
                    .map(|l| Ok((l.name.clone(), fds.pass(l.fd.as_fd())?)))
                    .collect::<std::io::Result<Vec<_>>>()?;
                let (process, restarts) = service.observe(|o| (o.process.clone(), o.restarts));
                let process = match process {
                    None => None,
                    Some(p) => {
                        let notify = p.fds.notify.lock().unwrap_or_else(|e| e.into_inner());
                        let (notify_fd, notify_path) = match notify.as_ref() {
                            Some((fd, path)) => (Some(fds.pass(fd.as_fd())?), Some(path.clone())),
                            None => (None, None),
                        };
                        Some(ProcessHandover {
                            pid: p.pid,
                            pidfd: fds.pass(p.fds.pidfd.as_fd())?,
                            stdout_fd: p
                                .fds
                                .stdout
                                .as_ref()
                                .map(|fd| fds.pass(fd.as_fd()))
                                .transpose()?,
                            stderr_fd: p
                                .fds
                                .stderr
                                .as_ref()
                                .map(|fd| fds.pass(fd.as_fd()))
                                .transpose()?,
                            notify_fd,
                            notify_path,
                            running_ms: p.started.elapsed().as_millis() as u64,
                        })
                    }
                };
                Ok(ServiceHandover {
                    name: service.config.name.clone(),
                    listeners,
                    process,
                    restarts,
                })
            })
            .collect()
    }

    /// The agent's own versions (current, history, downgrade floor), kept
    /// in the state file under the agent artifacts' service name.
    pub fn agent_versions(&self) -> ServiceVersions {
        self.state.get(crate::handover::AGENT_SERVICE)
    }

    /// Records that the agent now runs `next`, and keeps it and its
    /// predecessors from being pruned.
    pub fn record_agent_version(&self, next: &ArtifactRef, rollback: bool) -> anyhow::Result<()> {
        let versions = self.agent_versions().after(next, rollback);
        self.store
            .pin(crate::handover::AGENT_SERVICE, pinned_shas(&versions));
        self.state.set(crate::handover::AGENT_SERVICE, versions)
    }

    /// The agent runs the binary it was installed with (a fresh start, or
    /// a rollback to it): no agent artifact is current, and the artifacts
    /// of an earlier image are no rollback target. The floor stays.
    pub fn forget_agent_image(&self) -> anyhow::Result<()> {
        let mut versions = self.agent_versions();
        if versions.current.is_none() && versions.history.is_empty() {
            return Ok(());
        }
        versions.current = None;
        versions.history.clear();
        self.store.pin(crate::handover::AGENT_SERVICE, Vec::new());
        self.state.set(crate::handover::AGENT_SERVICE, versions)
    }

    /// Under systemd (NOTIFY_SOCKET), gives every service listener to the
    /// service manager's fd store (FDSTORE=1; the unit needs
    /// FileDescriptorStoreMax=), so that even a crash of the agent does not
    /// close them: systemd passes them back on restart and clients wait in
    /// the backlog meanwhile. Given sockets no listener took are removed
    /// first (systemd skips an fd it already holds, so a renamed
    /// listener's socket must leave under its old name before it can come
    /// back under the new one; a re-addressed one must not stay beside its
    /// replacement). Called once this image is committed to serving.
    pub fn keep_listeners_in_fd_store(&self) {
        if !reload_server::notify::enabled() {
            return;
        }
        for (service, listener) in &self.unused_given {
            let name = crate::fd_store_name(service, listener);
            let _ = reload_server::notify::notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        }
        let mut kept = 0;
        for service in self.services.values() {
            for listener in &service.sockets {
                let name = crate::fd_store_name(&service.config.name, &listener.name);
                match reload_server::notify::notify_with_fds(
                    &format!("FDSTORE=1\nFDNAME={name}"),
                    &[listener.fd.as_fd()],
                ) {
                    Ok(_) => kept += 1,
                    Err(err) => {
                        tracing::warn!(%name, error = %err, "could not give the listener to systemd's fd store; an agent crash would close it")
                    }
                }
            }
        }
        tracing::info!(
            kept,
            removed = self.unused_given.len(),
            "service listeners in systemd's fd store"
        );
    }

    /// Keeps the agent's own artifacts (current and history) from being
    /// pruned; called at start.
    pub fn pin_agent_versions(&self) {
        self.store.pin(
            crate::handover::AGENT_SERVICE,
            pinned_shas(&self.agent_versions()),
        );
    }
}

/// The downgrade floor: a version below the highest ever activated needs an
/// explicit allow-downgrade on the call, and then must be a build this agent
/// ran before or one signed with downgrade permission. A signed but older
/// build (with a known hole) cannot be slipped back in.
pub fn check_downgrade_floor(
    versions: &ServiceVersions,
    artifact: &StoredArtifact,
    allow_downgrade: bool,
) -> Result<(), Status> {
    let Some(highest) = versions
        .highest_version
        .as_deref()
        .and_then(|v| reload_artifact::version::parse_version(v).ok())
    else {
        return Ok(());
    };
    let target = artifact.manifest.semver();
    if target >= highest {
        return Ok(());
    }
    let what = format!(
        "{} {} is below {highest}, the highest version this agent activated",
        artifact.manifest.service, artifact.manifest.version
    );
    if !allow_downgrade {
        return Err(Status::failed_precondition(format!(
            "{what}; a downgrade must be asked for explicitly (allow_downgrade; reloadctl activate --allow-downgrade, reloadctl rollback)"
        )));
    }
    let ran_here = versions.activated.contains(&artifact.manifest.sha256);
    if !ran_here && !artifact.manifest.allow_downgrade {
        return Err(Status::failed_precondition(format!(
            "{what}, was never activated here, and is not signed with downgrade permission; sign it with `reloadctl sign --allow-downgrade` if it is meant to go below the floor"
        )));
    }
    tracing::warn!(service = %artifact.manifest.service, version = %artifact.manifest.version, %highest, "downgrade allowed below the floor");
    Ok(())
}

fn pinned_shas(versions: &ServiceVersions) -> Vec<String> {
    versions
        .current
        .iter()
        .chain(&versions.history)
        .map(|a| a.sha256.clone())
        .collect()
}

/// Signals the process group, waits up to `timeout` for the leader, then
/// SIGKILLs whatever of the group is left. Returns what happened, for people.
async fn drain(process: &Process, signal: Signal, timeout: Duration) -> String {
    process.signal_group(signal);
    let outcome = match tokio::time::timeout(timeout, process.wait()).await {
        Ok(status) => format!("drained and {}", describe_exit(status)),
        Err(_) => {
            process.kill().await;
            format!(
                "did not exit within {} and was killed",
                humantime::format_duration(timeout)
            )
        }
    };
    // Stragglers of the group (workers the service started) go too.
    process.signal_group(Signal::SIGKILL);
    outcome
}

/// Waits until the readiness condition holds. Never returns otherwise; the
/// caller bounds it with the readiness timeout and the process's exit.
async fn wait_ready(readiness: &Readiness, notify: Option<&tokio::net::UnixDatagram>) {
    match readiness {
        Readiness::Notify => {
            let socket = notify.expect("a notify socket is made for notify readiness");
            let mut buffer = vec![0u8; 4096];
            loop {
                let Ok(n) = socket.recv(&mut buffer).await else {
                    return std::future::pending().await;
                };
                let message = String::from_utf8_lossy(&buffer[..n]);
                if message.lines().any(|line| line.trim() == "READY=1") {
                    return;
                }
            }
        }
        Readiness::Delay { delay } => tokio::time::sleep(*delay).await,
        Readiness::Tcp { address } => loop {
            if tokio::net::TcpStream::connect(address).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
        Readiness::Http { address, path } => loop {
            if crate::probe::http_get_ok(*address, path, Duration::from_secs(2)).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    }
}

fn describe_readiness(readiness: &Readiness) -> String {
    match readiness {
        Readiness::Notify => "READY=1 on NOTIFY_SOCKET".into(),
        Readiness::Delay { delay } => format!("delay {}", humantime::format_duration(*delay)),
        Readiness::Tcp { address } => format!("tcp connect to {address}"),
        Readiness::Http { address, path } => format!("http GET {address}{path}"),
    }
}

pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!(
            "killed by {}",
            Signal::try_from(signal)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| format!("signal {signal}"))
        ),
        _ => "ended (exit status unknown)".into(),
    }
}

fn last_chars(text: &str, n: usize) -> &str {
    let start = text.len().saturating_sub(n);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    &text[start..]
}

/// Removes a notify socket file when the spawn it belongs to is over.
struct NotifyPath(PathBuf);

impl Drop for NotifyPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct ResetOnDrop<'a>(&'a AtomicBool);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(toml: &str) -> Vec<ServiceConfig> {
        let dir = tempfile::tempdir().unwrap();
        let key = reload_artifact::SigningKey::generate();
        std::fs::write(dir.path().join("release.pub"), key.public().to_pem()).unwrap();
        let text = format!("[agent]\ninsecure = true\ntrusted_keys = [\"release.pub\"]\n{toml}");
        crate::config::AgentConfig::parse(&text, dir.path())
            .unwrap()
            .services
    }

    fn listening() -> (OwnedFd, u16) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener.into(), port)
    }

    fn given(service: &str, listener: &str, fd: OwnedFd) -> GivenSocket {
        GivenSocket {
            service: service.into(),
            listener: listener.into(),
            fd,
        }
    }

    #[test]
    fn given_sockets_go_by_address_never_twice_and_the_rest_are_closed() {
        let (a, a_port) = listening();
        let (b, b_port) = listening();
        let (c, _) = listening();
        let (ephemeral, _) = listening();
        let config = services(&format!(
            r#"
[[service]]
name = "web"
[[service.listener]]
name = "public"
tcp = "127.0.0.1:{a_port}"
[[service]]
name = "api"
[[service.listener]]
name = "http"
tcp = "127.0.0.1:{b_port}"
[[service.listener]]
name = "admin"
tcp = "127.0.0.1:0"
"#
        ));
        let (assigned, unused) = assign_given(
            &config,
            vec![
                // web's listener was called "http": renamed, same address.
                given("web", "http", a),
                // b moved from service "old" to api.
                given("old", "http", b),
                // c's address is no longer configured.
                given("web", "metrics", c),
                // A port-0 socket of another listener is not taken by
                // api's port-0 listener.
                given("web", "debug", ephemeral),
            ],
        );
        let port_of = |key: (&str, &str)| {
            let fd = &assigned[&(key.0.to_string(), key.1.to_string())];
            std::net::TcpListener::from(fd.try_clone().unwrap())
                .local_addr()
                .unwrap()
                .port()
        };
        assert_eq!(port_of(("web", "public")), a_port);
        assert_eq!(port_of(("api", "http")), b_port);
        assert!(!assigned.contains_key(&("api".to_string(), "admin".to_string())));
        assert_eq!(assigned.len(), 2);
        assert_eq!(
            unused,
            vec![
                ("web".to_string(), "metrics".to_string()),
                ("web".to_string(), "debug".to_string())
            ]
        );
    }
}
