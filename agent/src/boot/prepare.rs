//! Start-up, before the first byte is served, as named steps. After an
//! in-place upgrade every failure here is a failed start-up check: the
//! caller falls back to the previous image with nothing lost, so anything
//! that can fail must happen here, not once serving.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use anyhow::Context;
use reload_proto::v1 as pb;
use tokio::net::TcpListener;

use super::bind::Bound;
use crate::api::{AgentApi, ApiRooms};
use crate::audit::AuditLog;
use crate::config::{AgentConfig, ConnectionLimits};
use crate::events::{EventBus, EventFields};
use crate::handover::{Handover, Inherited};
use crate::lease::Leases;
use crate::main_thread::Launcher;
use crate::metrics::{Metrics, SharedMetrics};
use crate::selfupgrade::{
    Accepted, AgentImage, AgentVersions, SelfUpgrade, Upgrades, AGENT_SERVICE,
};
use crate::services::{GivenSocket, Handoff, Services, FD_STORE_PREFIX};
use crate::state::{ArtifactRef, StateFile};
use crate::store::{ArtifactStore, ArtifactVerifier};

/// Room for the envelope and protobuf framing above the chunk limit, so an
/// oversized chunk reaches our own check (RESOURCE_EXHAUSTED with a clear
/// message) instead of tonic's generic decode limit.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// The sockets this image serves on, with duplicates kept for a handover
/// (the accept loops own, and on an upgrade drop, the originals).
pub(super) struct ControlListeners {
    pub grpc: Vec<TcpListener>,
    pub grpc_fds: Vec<OwnedFd>,
    /// Mutual TLS on gRPC; `None` with `insecure = true`.
    pub grpc_tls: Option<tokio_rustls::TlsAcceptor>,
    pub health: Option<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    pub health_fd: Option<OwnedFd>,
    /// `[limits]` for connections to both ports, `max_total` fitted to
    /// the open-file limit.
    pub connections: ConnectionLimits,
    pub max_message: usize,
    /// Who may read the health endpoint and /metrics (with TLS).
    pub rights: crate::config::RightsSection,
    /// `[agent] anonymous_health`.
    pub anonymous_health: Vec<String>,
}

/// What the serve loop needs to build the next image's handover.
pub(super) struct NextImage {
    pub accepted: tokio::sync::oneshot::Receiver<Accepted>,
    pub installed_exe: OwnedFd,
    /// The arguments the agent was first started with.
    pub agent_args: Vec<String>,
    /// A stop was asked for while the previous image handed over.
    pub stop_at_once: bool,
}

/// Everything set up and checked, not yet serving.
pub(super) struct Prepared {
    pub api: AgentApi,
    pub services: Arc<Services>,
    pub leases: Arc<Leases>,
    pub metrics: SharedMetrics,
    pub selfupgrade: Arc<SelfUpgrade>,
    pub audit: Arc<AuditLog>,
    pub listeners: ControlListeners,
    pub next_image: NextImage,
    pub launcher: Launcher,
    /// `[agent] stop_services_on_exit`.
    pub stop_services_on_exit: bool,
}

pub(super) async fn prepare(
    config: AgentConfig,
    bound: Option<Bound>,
    inherited: Option<&Inherited>,
    agent_args: Vec<String>,
    launcher: Launcher,
) -> anyhow::Result<Prepared> {
    let executable_sha256 = check_own_image(inherited).await?;
    let store = open_store(&config).await?;
    let (grpc, stored) = match bound {
        Some(bound) => (Some(bound.grpc), bound.stored),
        None => (None, Default::default()),
    };
    let given = given_sockets(stored, inherited)?;
    let grpc = grpc_listeners(&config, grpc, inherited)?;

    let metrics: SharedMetrics = Arc::new(Metrics::new(store.quarantined_counter()));
    let events = Arc::new(EventBus::default());
    crate::redact::set_folders(&config.store_dir, &config.state_dir);
    let state = Arc::new(StateFile::open(&config.state_dir)?);
    let verifier = Arc::new(ArtifactVerifier::new(
        store.clone(),
        config.trusted_keys.clone(),
        config.limits.max_artifact_bytes,
        metrics.clone(),
    ));
    let handoff = Handoff::new(
        verifier.clone(),
        state.clone(),
        events.clone(),
        metrics.clone(),
        launcher.clone(),
        config.state_dir.join("run"),
        crate::services::OutputLogs::open(&config.state_dir.join("logs"))?,
    );
    let services = Arc::new(Services::new(&config.services, Arc::new(handoff), given)?);
    let listeners = control_listeners(&config, grpc, inherited).await?;
    let leases = Arc::new(Leases::open(&config.state_dir)?);
    let audit = Arc::new(AuditLog::open(&config.audit_path, config.audit_max_bytes)?);
    let installed_exe = match inherited {
        Some(inherited) => inherited.dup(inherited.description.installed_exe_fd)?,
        None => crate::handover::open_own_exe()
            .context("cannot open /proc/self/exe")?
            .into(),
    };
    let agent_args = match inherited {
        Some(inherited) => inherited.description.args.clone(),
        None => agent_args,
    };
    let stop_at_once = inherited.is_some_and(|h| h.description.pending_stop);

    // Committed: from here this image serves. The fd store follows its
    // listeners; record how it got here.
    services.keep_listeners_in_fd_store();
    let versions = AgentVersions::new(state, store);
    let last_upgrade = match inherited {
        Some(inherited) => Some(upgrade_result(&versions, &events, &inherited.description)?),
        None => {
            // A fresh start runs the installed binary: the agent artifacts
            // of an earlier process are history only for the floor.
            versions.forget_image()?;
            None
        }
    };
    versions.pin();
    record_image_metric(
        &metrics,
        &versions,
        &executable_sha256,
        last_upgrade.as_ref(),
    );
    let (accepted_tx, accepted) = tokio::sync::oneshot::channel();
    let image = AgentImage {
        executable_sha256,
        installed_exe: installed_exe.try_clone()?,
        last_upgrade,
        args: agent_args.clone(),
    };
    let longest_drain = config
        .services
        .iter()
        .map(|s| s.drain.bound())
        .max()
        .unwrap_or_default();
    let selfupgrade = Arc::new(SelfUpgrade::new(
        Upgrades::new(image, accepted_tx),
        versions,
        verifier.clone(),
        services.clone(),
        longest_drain,
    ));
    let stop_services_on_exit = config.stop_services_on_exit;
    let fetcher = Arc::new(crate::fetch::Fetcher::new(&config.fetch).context("[fetch]")?);
    let api = AgentApi::new(ApiRooms {
        config,
        verifier,
        services: services.clone(),
        leases: leases.clone(),
        audit: audit.clone(),
        selfupgrade: selfupgrade.clone(),
        metrics: metrics.clone(),
        fetcher,
    });
    Ok(Prepared {
        api,
        services,
        leases,
        metrics,
        selfupgrade,
        audit,
        listeners,
        next_image: NextImage {
            accepted,
            installed_exe,
            agent_args,
            stop_at_once,
        },
        launcher,
        stop_services_on_exit,
    })
}

/// Who this image is. After an upgrade, the first start-up check: the
/// image that started must be the one that was verified (an artifact that
/// wraps or fetches another binary is refused this way).
async fn check_own_image(inherited: Option<&Inherited>) -> anyhow::Result<String> {
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
    Ok(executable_sha256)
}

/// A folder others may write to could have its artifacts or state swapped
/// or removed under the agent: refuse to start on one. Its group counts as
/// others (a store mode 0770 was accepted, and a deploy group's member is
/// not meant to be able to edit what the agent keeps).
fn refuse_writable_by_others(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode();
        let who = if mode & 0o002 != 0 {
            "everyone".to_string()
        } else if mode & 0o020 != 0 {
            format!("its group (gid {})", meta.gid())
        } else {
            return Ok(());
        };
        anyhow::bail!(
            "{} is writable by {who} (mode {:o}); only the agent's user may write it: run chmod 700 on it",
            dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}

async fn open_store(config: &AgentConfig) -> anyhow::Result<Arc<ArtifactStore>> {
    for dir in [&config.store_dir, &config.state_dir] {
        refuse_writable_by_others(dir)?;
    }
    let (store_dir, keep_versions) = (config.store_dir.clone(), config.keep_versions);
    let store = tokio::task::spawn_blocking(move || ArtifactStore::open(&store_dir, keep_versions))
        .await?
        .with_context(|| {
            format!(
                "cannot open the artifact store {}",
                config.store_dir.display()
            )
        })?;
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create the state folder {}",
            config.state_dir.display()
        )
    })?;
    Ok(Arc::new(store))
}

/// Service sockets not bound here: systemd's fd store on a fresh start,
/// the previous image's after an in-place one.
fn given_sockets(
    stored: std::collections::BTreeMap<String, OwnedFd>,
    inherited: Option<&Inherited>,
) -> anyhow::Result<Vec<GivenSocket>> {
    let Some(inherited) = inherited else {
        return Ok(stored
            .into_iter()
            .filter_map(|(name, fd)| {
                let (service, listener) = name.strip_prefix(FD_STORE_PREFIX)?.split_once('/')?;
                Some(GivenSocket {
                    service: service.to_string(),
                    listener: listener.to_string(),
                    fd,
                })
            })
            .collect());
    };
    inherited
        .description
        .services
        .iter()
        .flat_map(|s| s.listeners.iter().map(move |(l, fd)| (&s.name, l, *fd)))
        .map(|(service, listener, fd)| {
            Ok(GivenSocket {
                service: service.clone(),
                listener: listener.clone(),
                fd: inherited.dup(fd)?,
            })
        })
        .collect()
}

fn inherited_tcp(inherited: &Inherited, fd: std::os::fd::RawFd) -> anyhow::Result<TcpListener> {
    let listener = std::net::TcpListener::from(inherited.dup(fd)?);
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

fn grpc_listeners(
    config: &AgentConfig,
    bound: Option<Vec<TcpListener>>,
    inherited: Option<&Inherited>,
) -> anyhow::Result<Vec<TcpListener>> {
    let grpc = match (bound, inherited) {
        (Some(listeners), _) => return Ok(listeners),
        (None, Some(inherited)) => inherited
            .description
            .grpc_fds
            .iter()
            .map(|fd| inherited_tcp(inherited, *fd))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("taking the gRPC listeners from the previous image")?,
        (None, None) => anyhow::bail!("no gRPC listeners"),
    };
    // Listeners pass across the exec as they are: a changed address takes
    // a restart.
    let serving: Vec<_> = grpc.iter().filter_map(|l| l.local_addr().ok()).collect();
    if config
        .listen
        .iter()
        .any(|a| a.port() != 0 && !serving.contains(a))
    {
        tracing::warn!(?serving, configured = ?config.listen, "[agent] listen changed; the agent keeps the sockets it had until it restarts");
    }
    Ok(grpc)
}

/// The health listener (bound, or the previous image's), TLS parsed now,
/// the connection limits, and duplicates for a handover.
async fn control_listeners(
    config: &AgentConfig,
    grpc: Vec<TcpListener>,
    inherited: Option<&Inherited>,
) -> anyhow::Result<ControlListeners> {
    let health_listener = match (
        inherited.and_then(|h| Some((h, h.description.health_fd?))),
        config.health_listen,
    ) {
        (Some((inherited, fd)), Some(_)) => Some(inherited_tcp(inherited, fd)?),
        (_, Some(addr)) => Some(
            super::bind::listen(addr)
                .with_context(|| format!("cannot listen on {addr} ([agent] health_listen)"))?,
        ),
        (_, None) => None,
    };
    // Parsed now, so a broken key fails the start-up (tonic would only
    // have found out at the first handshake).
    let acceptors = config
        .tls
        .as_ref()
        .map(|tls| crate::connections::tls::acceptors(tls, !config.anonymous_health.is_empty()))
        .transpose()
        .context("the [tls] certificate or key")?;
    let health = match health_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "serving HTTP /healthz");
            Some((listener, acceptors.as_ref().map(|a| a.health.clone())))
        }
        None => None,
    };
    let ports = 1 + usize::from(health.is_some());
    let connections =
        crate::connections::fit_to_open_files(config.limits.connections.clone(), ports);
    let grpc_fds = grpc
        .iter()
        .map(|l| l.as_fd().try_clone_to_owned())
        .collect::<std::io::Result<Vec<_>>>()?;
    let health_fd = health
        .as_ref()
        .map(|(l, _)| l.as_fd().try_clone_to_owned())
        .transpose()?;
    Ok(ControlListeners {
        grpc,
        grpc_fds,
        grpc_tls: acceptors.map(|a| a.grpc),
        health,
        health_fd,
        connections,
        max_message: config.limits.max_chunk_bytes as usize + MESSAGE_OVERHEAD_BYTES,
        rights: config.rights.clone(),
        anonymous_health: config.anonymous_health.clone(),
    })
}

fn record_image_metric(
    metrics: &Metrics,
    versions: &AgentVersions,
    executable_sha256: &str,
    last_upgrade: Option<&pb::AgentUpgradeResult>,
) {
    metrics
        .agent_image
        .get_or_create(&crate::metrics::AgentImage {
            executable_sha256: executable_sha256.to_string(),
            artifact_version: versions.running(executable_sha256),
            last_upgrade: match last_upgrade.map(|u| u.outcome()) {
                None => "none",
                Some(pb::AgentUpgradeOutcome::Succeeded) => "succeeded",
                Some(_) => "fell_back",
            }
            .into(),
        })
        .set(1);
}

/// What the image that starts after an upgrade reports (and records) about it.
fn upgrade_result(
    versions: &AgentVersions,
    events: &EventBus,
    description: &Handover,
) -> anyhow::Result<pb::AgentUpgradeResult> {
    let record = &description.upgrade;
    let (outcome, reason) = match &record.fallback_reason {
        Some(reason) => (pb::AgentUpgradeOutcome::FellBack, reason.clone()),
        None => {
            if record.to_installed {
                versions.forget_image()?;
            } else {
                versions.record(
                    &ArtifactRef {
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
    events.emit(
        pb::EventKind::AgentUpgraded,
        EventFields {
            service: AGENT_SERVICE,
            version: &record.to_version,
            sha256: &record.to_sha256,
            pid: std::process::id(),
            message,
        },
    );
    Ok(result)
}
