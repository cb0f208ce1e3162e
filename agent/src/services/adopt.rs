//! Taking over what runs already: the service processes under shims from
//! an earlier agent process (a crash, a kill, a restart) or image (an
//! in-place upgrade), found by their shims' sockets; and, for an in-place
//! exec, what this image hands the next (the listening sockets, see
//! [`crate::handover`]).
//!
//! Per service, the serving process is the newest running one of the
//! current version; the others (an old process that was draining when the
//! agent went away) are drained again. A service whose process ended while
//! no agent ran is reported with its exit status and restarted by the
//! monitor, with backoff.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::output::OutputLogs;
use super::process::{describe_exit, drain, Process};
use super::readiness::NotifyPath;
use super::service::Service;
use super::shim::{watch, Attached};
use super::sockets::GivenSocket;
use crate::config::ServiceConfig;
use crate::handover::{FdsToPass, ServiceHandover};
use crate::state::ArtifactRef;

/// The listening sockets the shims hold, as given sockets: a restarted
/// agent takes these instead of binding (the services hold the ports).
pub(super) fn shim_sockets(found: &mut [Attached]) -> Vec<GivenSocket> {
    found
        .iter_mut()
        .flat_map(|attached| {
            let service = attached.spec.service.clone();
            std::mem::take(&mut attached.listeners)
                .into_iter()
                .map(move |(listener, fd)| GivenSocket {
                    service: service.clone(),
                    listener,
                    fd,
                })
        })
        .collect()
}

/// What adopting one service's shims gave.
#[derive(Default)]
pub(super) struct Adopted {
    /// The serving process.
    pub serving: Option<Process>,
    /// Exit statuses of processes that ended while no agent ran.
    pub ended: Vec<String>,
}

/// Adopts the shims of service `config` (all of `found` are of it): see the
/// module docs.
pub(super) fn adopt(
    config: &ServiceConfig,
    current: Option<&ArtifactRef>,
    should_run: bool,
    mut found: Vec<Attached>,
    output: &OutputLogs,
) -> Adopted {
    let mut adopted = Adopted::default();
    // Newest first: of two running processes of the current version (a
    // reload to the same release), the later one serves.
    found.sort_by_key(|a| a.running_ms);
    for attached in found {
        let (pid, exited) = (attached.pid, attached.exited);
        let is_current = current.is_some_and(|c| c.sha256 == attached.spec.sha256);
        let notify_path = attached.spec.notify_path.clone();
        let process = match watch(&config.name, attached, output.service(&config.name)) {
            Ok(process) => process,
            Err(err) => {
                tracing::error!(service = %config.name, pid, error = %err, "cannot attach to the shim");
                continue;
            }
        };
        if let Some(status) = exited {
            let how = describe_exit(status.exit_status());
            if is_current && should_run {
                // The service itself ended: reported, and restarted.
                adopted
                    .ended
                    .push(format!("pid {pid} {how} while no agent was running"));
            } else {
                // An old process that was draining (or a stopped service's):
                // its end is what was asked for.
                tracing::info!(service = %config.name, pid, "a process that was not serving ended ({how}) while no agent was running");
            }
            continue;
        }
        if is_current && adopted.serving.is_none() {
            tracing::info!(service = %config.name, pid, shim = process.shim_pid, "adopted the running process");
            if let Some(path) = notify_path {
                // The earlier agent's notify socket is gone with it; the
                // service still sends to this path (STATUS=, STOPPING=1).
                let _ = std::fs::remove_file(&path);
                if let Ok(socket) = tokio::net::UnixDatagram::bind(&path) {
                    process.listen_for_notifications(&config.name, socket, NotifyPath(path));
                }
            }
            adopted.serving = Some(process);
            continue;
        }
        tracing::warn!(service = %config.name, pid, "a process that is not the current one still runs (it was draining, or its release is no longer current); draining it");
        let plan = config.drain;
        tokio::spawn(async move {
            drain(&process, plan).await;
        });
    }
    adopted
}

/// Shims of a service the config no longer declares: drained rather than
/// left running with nobody to supervise them.
pub(super) fn drain_undeclared(found: Vec<Attached>, output: &OutputLogs) {
    for attached in found {
        let (service, pid) = (attached.spec.service.clone(), attached.pid);
        let exited = attached.exited.is_some();
        let Ok(process) = watch(&service, attached, output.service(&service)) else {
            continue;
        };
        if exited {
            continue;
        }
        tracing::warn!(%service, pid, "the config no longer declares this service; draining its process");
        tokio::spawn(async move {
            let plan = crate::config::DrainPlan {
                pre: None,
                signal: Signal::SIGTERM,
                timeout: Duration::from_secs(30),
            };
            drain(&process, plan).await;
        });
    }
}

/// Every service's sockets, for the next image.
pub(super) fn export<'a>(
    services: impl Iterator<Item = &'a Arc<Service>>,
    fds: &mut FdsToPass,
) -> std::io::Result<Vec<ServiceHandover>> {
    services
        .map(|service| {
            let listeners = service
                .sockets
                .iter()
                .map(|l| Ok((l.name.clone(), fds.pass(l.fd.as_fd())?)))
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok(ServiceHandover {
                name: service.config.name.clone(),
                listeners,
                restarts: service.observe(|o| o.restarts),
            })
        })
        .collect()
}
