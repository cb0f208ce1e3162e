//! `reload-agent`: the per-host daemon that accepts signed artifacts over
//! gRPC, verifies them and keeps them in a content-addressed store.
//!
//! Layout:
//! - [`config`]: the TOML config, checked and resolved (`--check` stops here).
//! - [`store`]: the artifact store; the only code that writes under
//!   `store_dir`, and the only place that decides when a file becomes
//!   visible under its final name.
//! - [`api`]: the `reload.v1` gRPC handlers and the mapping of errors to
//!   status codes.
//! - [`supervisor`]: services: start, socket-preserving reload, drain,
//!   restart with backoff; `listeners` binds their sockets once,
//!   `reload_server::spawn` starts a process with them, [`state`]
//!   persists current/previous versions, [`probe`] and `health_http` report
//!   health, [`events`] fans out every state change.
//! - [`serve`]: binds nothing itself; it takes already-bound listeners (from
//!   [`bind`], a systemd socket, or the previous image after an in-place
//!   upgrade) so they share one path.
//! - [`upgrade`] and [`handover`]: `UpgradeAgent`, the in-place re-exec
//!   that keeps the pid, the sockets and the running services;
//!   [`main_thread`] is why forks and the exec happen on the main thread.
//!
//! Verification rules live in the `reload-artifact` crate, shared with
//! `reloadctl verify`. The wire types live in `reload-proto`.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod config;
pub mod events;
pub mod handover;
mod health_http;
pub mod lease;
mod listeners;
pub mod main_thread;
pub mod metrics;
pub mod probe;
pub mod signals;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod upgrade;

use std::sync::Arc;

use anyhow::Context;
use reload_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::AgentApi;
use crate::config::AgentConfig;
use crate::handover::{FdsToPass, Handover, Inherited};
use crate::store::ArtifactStore;
use crate::upgrade::{AgentImage, UpgradeExec};

/// Sends forks and the final exec to the main thread; see [`main_thread`].
pub type Launcher = main_thread::MainThread<anyhow::Result<Exit>>;

/// How the agent starts.
pub enum Start {
    /// A fresh process, with what [`bind`] bound or was given.
    Fresh(Bound),
    /// An image after an in-place upgrade (or a fallback to the previous
    /// image): everything comes from the handover.
    Inherited(Box<Inherited>),
}

/// How [`serve`] ended; the main thread acts on it.
pub enum Exit {
    /// Shut down by a signal; every service was stopped.
    Stopped,
    /// An upgrade was accepted: re-execute in place.
    Upgrade(Box<UpgradeExec>),
    /// This image failed its start-up checks after an upgrade: re-execute
    /// the previous image with the same handover.
    FallBack {
        inherited: Box<Inherited>,
        error: anyhow::Error,
    },
}

/// Room for the envelope and protobuf framing above the chunk limit, so an
/// oversized chunk reaches our own check (RESOURCE_EXHAUSTED with a clear
/// message) instead of tonic's generic decode limit.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// HTTP/2 flow-control window for each stream and connection: a few chunks
/// in flight per upload.
const UPLOAD_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// Larger HTTP/2 frames: fewer frame headers and wake-ups per chunk.
const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// A folder others may write to could have its artifacts or state swapped
/// under the agent: refuse to start on one.
fn refuse_world_writable(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 {
            anyhow::bail!(
                "{} is writable by everyone (mode {:o}); run chmod 700 on it",
                dir.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

/// Parses the `[tls]` certificate and key as the agent will at start
/// (`--check` runs it, so an in-place upgrade or a config reload with a
/// broken key is refused before anything changes).
pub fn check_tls(config: &AgentConfig) -> anyhow::Result<()> {
    if let Some(tls) = &config.tls {
        health_http::tls_acceptor(tls).context("the [tls] certificate or key")?;
    }
    Ok(())
}

/// What a fresh start binds or is given by systemd.
pub struct Bound {
    pub grpc: Vec<TcpListener>,
    /// Service listeners systemd kept in its fd store for us (named
    /// `reload-svc/<service>/<listener>`), from before an agent crash or
    /// restart: used instead of binding again.
    pub stored: std::collections::BTreeMap<String, std::os::fd::OwnedFd>,
}

/// The fd-store name of a service listener.
pub fn fd_store_name(service: &str, listener: &str) -> String {
    format!("reload-svc/{service}/{listener}")
}

/// Binds every configured gRPC address, and takes what systemd passed: the
/// `grpc` socket of reload-agent.socket and the fd store. Kept apart from
/// [`serve`] so the caller can report bind errors before anything else
/// starts.
pub async fn bind(config: &AgentConfig) -> anyhow::Result<Bound> {
    let mut inherited = reload_server::Listeners::from_env().context("reading LISTEN_FDS")?;
    let mut stored = std::collections::BTreeMap::new();
    for name in inherited.names() {
        if name.starts_with("reload-svc/") {
            if let Some(fd) = inherited.take_fd(&name)? {
                stored.insert(name, fd);
            }
        }
    }
    if !stored.is_empty() {
        tracing::info!(
            count = stored.len(),
            "service listeners kept by systemd's fd store"
        );
    }
    // Under systemd socket activation (reload-agent.socket), the gRPC port
    // arrives as a listener named "grpc" and replaces [agent] listen.
    if inherited.names().iter().any(|n| n == "grpc") {
        let listener = inherited
            .tcp("grpc", config.listen[0])
            .context("taking the systemd socket named grpc")?;
        tracing::info!("using the gRPC socket passed by systemd");
        return Ok(Bound {
            grpc: vec![listener],
            stored,
        });
    }
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ([agent] listen)"))?;
        listeners.push(listener);
    }
    Ok(Bound {
        grpc: listeners,
        stored,
    })
}

/// Opens the store and serves the gRPC API until SIGTERM or SIGINT (then
/// stops every service) or an accepted upgrade (then returns what the main
/// thread needs to re-execute, services untouched). `signals` must have
/// been installed before anything else (see [`signals`]).
///
/// After an upgrade, any failure before the server runs is a failed
/// start-up check: the result is [`Exit::FallBack`], unless this image is
/// already the fallback.
pub async fn serve(
    config: AgentConfig,
    start: Start,
    signals: signals::AgentSignals,
    launcher: Launcher,
) -> anyhow::Result<Exit> {
    let (bound, inherited) = match start {
        Start::Fresh(bound) => (Some(bound), None),
        Start::Inherited(inherited) => (None, Some(*inherited)),
    };
    let prepared = prepare(config, bound, inherited.as_ref(), launcher).await;
    let prepared = match (prepared, inherited) {
        (Ok(prepared), _) => prepared,
        (Err(error), Some(inherited))
            if inherited.description.upgrade.fallback_reason.is_none() =>
        {
            return Ok(Exit::FallBack {
                inherited: Box::new(inherited),
                error,
            })
        }
        (Err(error), _) => return Err(error),
    };
    // The inherited originals close here; everything runs on duplicates.
    prepared.run(signals).await
}

/// Everything set up and checked, not yet serving.
struct Prepared {
    api: AgentApi,
    supervisor: Arc<supervisor::Supervisor>,
    grpc: Vec<TcpListener>,
    /// Duplicates of `grpc` and of the health listener, for a handover.
    grpc_fds: Vec<std::os::fd::OwnedFd>,
    health: Option<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    health_fd: Option<std::os::fd::OwnedFd>,
    leases: Arc<lease::Leases>,
    server_tls: Option<tonic::transport::ServerTlsConfig>,
    max_message: usize,
    accepted: tokio::sync::oneshot::Receiver<upgrade::Accepted>,
    installed_exe: std::os::fd::OwnedFd,
    /// The arguments the agent was first started with.
    agent_args: Vec<String>,
    /// A stop was asked for while the previous image handed over.
    stop_at_once: bool,
    launcher: Launcher,
}

fn inherited_tcp(inherited: &Inherited, fd: std::os::fd::RawFd) -> anyhow::Result<TcpListener> {
    let listener = std::net::TcpListener::from(inherited.dup(fd)?);
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

async fn prepare(
    config: AgentConfig,
    bound: Option<Bound>,
    inherited: Option<&Inherited>,
    launcher: Launcher,
) -> anyhow::Result<Prepared> {
    // Who this image is. After an upgrade, the first start-up check: the
    // image that started must be the one that was verified (an artifact
    // that wraps or fetches another binary is refused this way).
    let executable_sha256 = tokio::task::spawn_blocking(AgentImage::hash_own_executable).await??;
    if let Some(inherited) = inherited {
        let expected = &inherited.description.upgrade.to_sha256;
        if inherited.description.upgrade.fallback_reason.is_none() && *expected != executable_sha256
        {
            anyhow::bail!(
                "the image that started has sha256 {executable_sha256}, not the verified {expected}: an agent artifact must be the agent executable itself"
            );
        }
    }
    for dir in [&config.store_dir, &config.state_dir] {
        refuse_world_writable(dir)?;
    }
    let store_dir = config.store_dir.clone();
    let keep_versions = config.keep_versions;
    let store = tokio::task::spawn_blocking(move || ArtifactStore::open(&store_dir, keep_versions))
        .await?
        .with_context(|| {
            format!(
                "cannot open the artifact store {}",
                config.store_dir.display()
            )
        })?;
    let store = Arc::new(store);
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create the state folder {}",
            config.state_dir.display()
        )
    })?;
    let (grpc, stored) = match bound {
        Some(bound) => (Some(bound.grpc), bound.stored),
        None => (None, Default::default()),
    };
    // Service sockets not bound here: systemd's fd store on a fresh start,
    // the previous image's after an in-place one.
    let given: Vec<supervisor::GivenSocket> = match inherited {
        None => stored
            .into_iter()
            .filter_map(|(name, fd)| {
                let (service, listener) = name.strip_prefix("reload-svc/")?.split_once('/')?;
                Some(supervisor::GivenSocket {
                    service: service.to_string(),
                    listener: listener.to_string(),
                    fd,
                })
            })
            .collect(),
        Some(inherited) => inherited
            .description
            .services
            .iter()
            .flat_map(|s| s.listeners.iter().map(move |(l, fd)| (&s.name, l, *fd)))
            .map(|(service, listener, fd)| {
                Ok(supervisor::GivenSocket {
                    service: service.clone(),
                    listener: listener.clone(),
                    fd: inherited.dup(fd)?,
                })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let grpc = match (grpc, inherited) {
        (Some(listeners), _) => listeners,
        (None, Some(inherited)) => inherited
            .description
            .grpc_fds
            .iter()
            .map(|fd| inherited_tcp(inherited, *fd))
            .collect::<anyhow::Result<_>>()
            .context("taking the gRPC listeners from the previous image")?,
        (None, None) => anyhow::bail!("no gRPC listeners"),
    };
    if inherited.is_some() {
        // Listeners pass across the exec as they are: a changed address
        // takes a restart.
        let serving: Vec<_> = grpc.iter().filter_map(|l| l.local_addr().ok()).collect();
        if config
            .listen
            .iter()
            .any(|a| a.port() != 0 && !serving.contains(a))
        {
            tracing::warn!(?serving, configured = ?config.listen, "[agent] listen changed; the agent keeps the sockets it had until it restarts");
        }
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let supervisor = Arc::new(supervisor::Supervisor::new(
        &config.services,
        &config.state_dir,
        store.clone(),
        config.trusted_keys.clone(),
        Arc::new(events::EventBus::default()),
        metrics.clone(),
        launcher.clone(),
        inherited,
        given,
    )?);
    let health_listener = match (
        inherited.and_then(|h| Some((h, h.description.health_fd?))),
        config.health_listen,
    ) {
        (Some((inherited, fd)), Some(_)) => Some(inherited_tcp(inherited, fd)?),
        (_, Some(addr)) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} ([agent] health_listen)"))?;
            Some(listener)
        }
        (_, None) => None,
    };
    // Everything that can fail is done here, before the first byte is
    // served: after an upgrade, a failure here falls back to the previous
    // image with nothing lost.
    let health = match health_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "serving HTTP /healthz");
            let acceptor = config
                .tls
                .as_ref()
                .map(health_http::tls_acceptor)
                .transpose()?;
            Some((listener, acceptor))
        }
        None => None,
    };
    let server_tls = match &config.tls {
        Some(tls) => {
            // Parsed by rustls now (tonic would only at the first handshake).
            check_tls(&config)?;
            Some(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key))
                    // Mutual TLS: a client without a certificate from this CA
                    // does not get past the handshake.
                    .client_ca_root(tonic::transport::Certificate::from_pem(&tls.ca)),
            )
        }
        None => None,
    };
    // Duplicates of the listeners, kept for a handover: the accept loops
    // own (and on an upgrade, drop) the originals.
    let grpc_fds = grpc
        .iter()
        .map(|l| std::os::fd::AsFd::as_fd(l).try_clone_to_owned())
        .collect::<std::io::Result<Vec<_>>>()?;
    let health_fd = health
        .as_ref()
        .map(|(l, _)| std::os::fd::AsFd::as_fd(l).try_clone_to_owned())
        .transpose()?;
    let max_message = config.limits.max_chunk_bytes as usize + MESSAGE_OVERHEAD_BYTES;
    let leases = Arc::new(lease::Leases::open(&config.state_dir)?);
    let audit = audit::AuditLog::open(&config.audit_path, config.audit_max_bytes)?;
    let installed_exe = match inherited {
        Some(inherited) => inherited.dup(inherited.description.installed_exe_fd)?,
        None => handover::open_own_exe()
            .context("cannot open /proc/self/exe")?
            .into(),
    };
    let agent_args = match inherited {
        Some(inherited) => inherited.description.args.clone(),
        None => std::env::args().skip(1).collect(),
    };
    let stop_at_once = inherited.is_some_and(|h| h.description.pending_stop);

    // Committed: from here this image serves. The fd store follows its
    // listeners; record how it got here.
    supervisor.keep_listeners_in_fd_store();
    let last_upgrade = match inherited {
        Some(inherited) => Some(upgrade_result(&supervisor, &inherited.description)?),
        None => {
            // A fresh start runs the installed binary: the agent artifacts
            // of an earlier process are history only for the floor.
            supervisor.forget_agent_image()?;
            None
        }
    };
    supervisor.pin_agent_versions();
    metrics
        .agent_image
        .get_or_create(&metrics::AgentImage {
            executable_sha256: executable_sha256.clone(),
            artifact_version: supervisor
                .agent_versions()
                .current
                .filter(|c| c.sha256 == executable_sha256)
                .map(|c| c.version)
                .unwrap_or_default(),
            last_upgrade: match last_upgrade.as_ref().map(|u| u.outcome()) {
                None => "none",
                Some(pb::AgentUpgradeOutcome::Succeeded) => "succeeded",
                Some(_) => "fell_back",
            }
            .into(),
        })
        .set(1);
    let (accepted_tx, accepted) = tokio::sync::oneshot::channel();
    let image = AgentImage {
        executable_sha256,
        installed_exe: installed_exe.try_clone()?,
        last_upgrade,
        args: agent_args.clone(),
    };
    let api = AgentApi::new(
        config,
        store,
        supervisor.clone(),
        leases.clone(),
        audit,
        upgrade::Upgrades::new(image, accepted_tx),
    );
    Ok(Prepared {
        api,
        supervisor,
        grpc,
        grpc_fds,
        health,
        health_fd,
        leases,
        server_tls,
        max_message,
        accepted,
        installed_exe,
        agent_args,
        stop_at_once,
        launcher,
    })
}

/// What the image that starts after an upgrade reports (and records) about it.
fn upgrade_result(
    supervisor: &supervisor::Supervisor,
    description: &Handover,
) -> anyhow::Result<pb::AgentUpgradeResult> {
    let record = &description.upgrade;
    let (outcome, reason) = match &record.fallback_reason {
        Some(reason) => (pb::AgentUpgradeOutcome::FellBack, reason.clone()),
        None => {
            if record.to_installed {
                supervisor.forget_agent_image()?;
            } else {
                supervisor.record_agent_version(
                    &state::ArtifactRef {
                        sha256: record.to_sha256.clone(),
                        version: record.to_version.clone(),
                    },
                    record.rollback,
                )?;
            }
            (pb::AgentUpgradeOutcome::Succeeded, String::new())
        }
    };
    let result = pb::AgentUpgradeResult {
        outcome: outcome as i32,
        reason: reason.clone(),
        from_version: record.from_version.clone(),
        from_sha256: record.from_sha256.clone(),
        to_version: record.to_version.clone(),
        to_sha256: record.to_sha256.clone(),
        finished: Some(std::time::SystemTime::now().into()),
        config_reload: record.config_reload,
    };
    let message = match outcome {
        pb::AgentUpgradeOutcome::Succeeded if record.config_reload => format!(
            "agent re-executed in place with its config read again (pid {})",
            std::process::id()
        ),
        pb::AgentUpgradeOutcome::Succeeded => format!(
            "agent upgraded in place from {} to {} (pid {})",
            record.from_version,
            record.to_version,
            std::process::id()
        ),
        _ => format!(
            "agent upgrade to {} failed, the previous image {} runs again: {reason}",
            record.to_version, record.from_version
        ),
    };
    supervisor.events.emit(
        pb::EventKind::AgentUpgraded,
        events::EventFields {
            service: handover::AGENT_SERVICE,
            version: &record.to_version,
            sha256: &record.to_sha256,
            pid: std::process::id(),
            message,
        },
    );
    Ok(result)
}

impl Prepared {
    async fn run(self, signals: signals::AgentSignals) -> anyhow::Result<Exit> {
        let Prepared {
            api,
            supervisor,
            grpc,
            grpc_fds,
            health,
            health_fd,
            leases,
            server_tls,
            max_message,
            accepted,
            installed_exe,
            agent_args,
            stop_at_once,
            launcher,
        } = self;
        let signals::AgentSignals {
            stop: stop_signals,
            hup: mut hangup,
        } = signals;
        // Committed: let the signals in on the main thread (see
        // crate::signals). What came while this image started up, across
        // an exec too, is delivered now; had the start-up failed, it would
        // have stayed pending for the image that falls back.
        launcher.run(signals::unblock).await;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        supervisor.start_monitors();
        // Everything that may fork on a runtime thread (exec health
        // probes) runs in `background`, which is ended, and waited for,
        // before an exec clears close-on-exec on the fds it passes.
        let mut background = tokio::task::JoinSet::new();
        probe::start_probes(&supervisor, health_reporter.clone(), &mut background);
        // Stops accepting (gRPC and /healthz) when an upgrade is accepted:
        // new connections wait in the backlog for the next image.
        let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
        if let Some((listener, acceptor)) = health {
            let mut accepting = accepting.clone();
            let serving = health_http::serve(listener, supervisor.clone(), leases, acceptor);
            background.spawn(async move {
                tokio::select! {
                    _ = serving => {}
                    _ = accepting.wait_for(|stop| *stop) => {}
                }
            });
        }
        // SIGHUP (systemctl reload): read the config again by re-executing
        // the same image in place; services are untouched.
        {
            let api = api.clone();
            background.spawn(async move {
                while hangup.recv().await.is_some() {
                    api.reload_config_on_signal().await;
                }
            });
        }
        health_reporter
            .set_serving::<pb::artifact_service_server::ArtifactServiceServer<AgentApi>>()
            .await;
        health_reporter
            .set_serving::<pb::agent_service_server::AgentServiceServer<AgentApi>>()
            .await;
        health_reporter
            .set_serving::<pb::service_control_server::ServiceControlServer<AgentApi>>()
            .await;
        health_reporter
            .set_serving::<pb::lease_service_server::LeaseServiceServer<AgentApi>>()
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        // Several listeners feed one server through a channel of accepted
        // connections.
        let (connections, incoming) = tokio::sync::mpsc::channel(64);
        for listener in grpc {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "serving gRPC");
            let connections = connections.clone();
            let mut accepting = accepting.clone();
            background.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        accepted = listener.accept() => accepted.map(|(stream, _)| stream),
                        _ = accepting.wait_for(|stop| *stop) => return,
                    };
                    if let Err(err) = &accepted {
                        tracing::warn!(%addr, error = %err, "accept failed");
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                    if connections.send(accepted).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(connections);

        let mut server = tonic::transport::Server::builder();
        match server_tls {
            Some(tls) => {
                server = server
                    .tls_config(tls)
                    .context("the [tls] certificate or key is not valid PEM")?;
            }
            None => tracing::warn!("insecure = true: plaintext gRPC without client authentication; anyone on this machine can deploy. Configure [tls] for anything but development"),
        }
        // systemd Type=notify: serving from here on (no-op without
        // NOTIFY_SOCKET). After an upgrade this tells systemd the same pid
        // is ready again.
        let _ = reload_server::notify::ready();
        let _ = reload_server::notify::status("serving");

        // The server stops on SIGTERM/SIGINT or on an accepted upgrade; on
        // an upgrade the stop signals come back to be watched to the exec.
        let (upgrade_tx, upgrade_rx) =
            tokio::sync::oneshot::channel::<(upgrade::Accepted, signals::StopSignals)>();
        let stop = {
            let events = supervisor.events.clone();
            let mut stop_signals = stop_signals;
            async move {
                if stop_at_once {
                    tracing::info!("a stop was asked for during the in-place upgrade");
                    return;
                }
                tokio::select! {
                    _ = stop_signals.recv() => {}
                    accepted = accepted => {
                        if let Ok(accepted) = accepted {
                            let _ = stop_accepting.send(true);
                            // Watch streams never end by themselves.
                            events.close();
                            let _ = upgrade_tx.send((accepted, stop_signals));
                        }
                    }
                }
            }
        };
        let serving = server
            // HTTP/2's default 64 KiB windows cap an upload at a few dozen MiB/s
            // even on loopback; artifacts are large, so let the window grow.
            .initial_stream_window_size(Some(UPLOAD_WINDOW_BYTES))
            .initial_connection_window_size(Some(UPLOAD_WINDOW_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                pb::artifact_service_server::ArtifactServiceServer::new(api.clone())
                    .max_decoding_message_size(max_message),
            )
            .add_service(pb::agent_service_server::AgentServiceServer::new(
                api.clone(),
            ))
            .add_service(pb::service_control_server::ServiceControlServer::new(
                api.clone(),
            ))
            .add_service(pb::lease_service_server::LeaseServiceServer::new(api))
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), stop);
        tokio::pin!(serving);
        let mut upgrade_rx = upgrade_rx;
        let stop_request = signals::StopRequest::default();
        let accepted = tokio::select! {
            served = &mut serving => {
                served.context("gRPC server failed")?;
                upgrade_rx.try_recv().ok().map(|(accepted, _)| accepted)
            }
            accepted = &mut upgrade_rx => match accepted {
                Ok((accepted, mut stop_signals)) => {
                    // From now on SIGTERM, SIGINT and SIGHUP stay pending
                    // (blocked on every thread, see crate::signals) and
                    // reach the next image's handlers.
                    launcher.run(signals::block).await;
                    // Calls in flight (the UpgradeAgent answer among them)
                    // get a bounded time to finish; the exec cuts the rest.
                    // A stop asked for meanwhile wins over the upgrade.
                    let stopped = tokio::select! {
                        drained = tokio::time::timeout(upgrade::DRAIN_CALLS_TIMEOUT, &mut serving) => {
                            if drained.is_err() {
                                tracing::warn!("calls still in flight after {}; the exec ends them", humantime::format_duration(upgrade::DRAIN_CALLS_TIMEOUT));
                            }
                            false
                        }
                        _ = stop_signals.recv() => true,
                    };
                    if stopped {
                        None
                    } else {
                        // From here to the exec, a stop is passed on.
                        let stop_request = stop_request.clone();
                        tokio::spawn(async move {
                            stop_signals.recv().await;
                            stop_request.set();
                        });
                        Some(accepted)
                    }
                }
                Err(_) => None,
            }
        };
        // Aborted and waited for: no task is half-way through a fork when
        // close-on-exec is cleared for the exec.
        background.shutdown().await;
        if accepted.is_some() {
            // A signal taken just before the block above reaches its stream
            // through the runtime's driver: give it a moment to be counted.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let Some(accepted) = accepted else {
            tracing::info!("stopping every service");
            let _ = reload_server::notify::stopping();
            supervisor.stop_all().await;
            return Ok(Exit::Stopped);
        };
        let mut fds = FdsToPass::default();
        let previous_exe: std::os::fd::OwnedFd = handover::open_own_exe()
            .context("cannot open /proc/self/exe")?
            .into();
        let description = Handover {
            protocol: handover::PROTOCOL,
            args: agent_args,
            previous_exe_fd: fds.pass(std::os::fd::AsFd::as_fd(&previous_exe))?,
            installed_exe_fd: fds.pass(std::os::fd::AsFd::as_fd(&installed_exe))?,
            grpc_fds: grpc_fds
                .iter()
                .map(|fd| fds.pass(std::os::fd::AsFd::as_fd(fd)))
                .collect::<std::io::Result<_>>()?,
            health_fd: health_fd
                .as_ref()
                .map(|fd| fds.pass(std::os::fd::AsFd::as_fd(fd)))
                .transpose()?,
            services: supervisor.handover(&mut fds)?,
            upgrade: accepted.record,
            pending_stop: false,
        };
        Ok(Exit::Upgrade(Box::new(UpgradeExec {
            target: accepted.target,
            previous_exe,
            description,
            fds,
            guards: accepted.guards,
            stop_request,
        })))
    }
}
