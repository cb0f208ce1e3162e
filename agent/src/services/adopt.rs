//! Across the agent's in-place re-exec: what this image hands the next
//! (every service's sockets and serving process, see [`crate::handover`])
//! and how the next image adopts the processes it is handed: watched by
//! pidfd, their output pipes and notify socket taken over, never
//! restarted.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::process::{watch_process, Process};
use super::service::Service;
use crate::handover::{FdsToPass, Inherited, ProcessHandover, ServiceHandover};

/// A process of the previous agent image, watched by this one, with its
/// notify socket if it had one.
#[allow(clippy::type_complexity)]
pub(super) fn adopt_process(
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

/// Every service's sockets and serving process, for the next image.
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
