//! What a fresh start binds, or is given by systemd: the gRPC listeners
//! (`[agent] listen`, or the `grpc` socket of reload-agent.socket) and the
//! service listeners systemd kept in its fd store across an agent crash or
//! restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};

use crate::config::AgentConfig;
use crate::services::FD_STORE_PREFIX;

/// The sockets systemd passed (`LISTEN_FDS`), read from the environment
/// before any thread starts: reading them also removes the variables, and
/// editing the environment is not thread-safe.
pub struct SystemdSockets(reload_server::Listeners);

impl SystemdSockets {
    pub fn from_env() -> anyhow::Result<SystemdSockets> {
        Ok(SystemdSockets(
            reload_server::Listeners::from_env().context("reading LISTEN_FDS")?,
        ))
    }
}

/// What a fresh start binds or is given by systemd.
pub struct Bound {
    pub grpc: Vec<TcpListener>,
    /// Service listeners systemd kept in its fd store for us (named
    /// `reload-svc/<service>/<listener>`), from before an agent crash or
    /// restart: used instead of binding again.
    pub stored: BTreeMap<String, OwnedFd>,
}

/// Connections the kernel holds for the agent to accept (also capped by
/// `net.core.somaxconn`). A burst beyond the queue (a fleet-wide rollout, a
/// flood of connections that will never finish a handshake) has its
/// handshakes dropped, and the clients retry a second or more later, the
/// legitimate ones among them; the default of 1024 is small next to
/// `[limits] max_connections`.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening TCP socket on `addr` for the agent's own ports (gRPC,
/// health), with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As TcpListener::bind does: a restarted agent rebinds at once, past
    // the previous one's connections in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds every configured gRPC address, and takes what systemd passed: the
/// `grpc` socket of reload-agent.socket and the fd store. Kept apart from
/// serving so the caller can report bind errors before anything else
/// starts.
pub async fn bind(config: &AgentConfig, systemd: SystemdSockets) -> anyhow::Result<Bound> {
    let SystemdSockets(mut inherited) = systemd;
    let mut stored = BTreeMap::new();
    for name in inherited.names() {
        if name.starts_with(FD_STORE_PREFIX) {
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
        // The rule of `insecure = true` holds for a socket systemd made
        // too: plaintext, unauthenticated gRPC only on loopback.
        let addr = listener.local_addr()?;
        if config.tls.is_none() && !addr.ip().is_loopback() {
            anyhow::bail!(
                "insecure = true is for loopback only, but systemd passed a gRPC socket on {addr} (reload-agent.socket ListenStream=); listen on 127.0.0.1 there, or configure [tls]"
            );
        }
        tracing::info!("using the gRPC socket passed by systemd");
        return Ok(Bound {
            grpc: vec![listener],
            stored,
        });
    }
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let listener =
            listen(*addr).with_context(|| format!("cannot listen on {addr} ([agent] listen)"))?;
        listeners.push(listener);
    }
    Ok(Bound {
        grpc: listeners,
        stored,
    })
}
