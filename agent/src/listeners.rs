//! Binding a service's listening sockets, once, when the agent starts.
//!
//! The agent keeps these fds for its whole life and hands duplicates to each
//! process of the service, so the sockets never close across reloads,
//! crashes and restarts: clients queue in the kernel's backlog meanwhile
//! instead of being refused.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

use anyhow::{bail, Context};
use nix::sys::socket::{
    bind, getsockname, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog,
    SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};

use crate::config::{ListenerConfig, ListenerKind};

/// Long backlog: during a handoff and a restart, connections wait here.
const BACKLOG: i32 = 4096;

pub struct BoundListener {
    pub name: String,
    pub fd: OwnedFd,
}

/// Binds one listener as configured (a stale Unix socket file is replaced).
pub fn bind_one(config: &ListenerConfig) -> anyhow::Result<OwnedFd> {
    let flags = SockFlag::SOCK_CLOEXEC;
    match config.kind() {
        ListenerKind::Tcp(addr) => {
            let family = if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, flags, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
                .with_context(|| format!("bind {addr}"))?;
            listen(&fd, Backlog::new(BACKLOG)?)?;
            Ok(fd)
        }
        ListenerKind::Udp(addr) => {
            let family = if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Datagram, flags, None)?;
            bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
                .with_context(|| format!("bind {addr}"))?;
            Ok(fd)
        }
        ListenerKind::Unix => {
            let path = config.unix.as_ref().expect("unix listener has a path");
            // A socket file left by an earlier agent is ours to replace;
            // anything else at that path is not.
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
                Ok(_) => bail!(
                    "{} exists and is not a socket; remove it or choose another path",
                    path.display()
                ),
                Err(_) => {}
            }
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            bind(fd.as_raw_fd(), &UnixAddr::new(path)?)
                .with_context(|| format!("bind {}", path.display()))?;
            listen(&fd, Backlog::new(BACKLOG)?)?;
            Ok(fd)
        }
    }
}

/// Whether `fd` is a socket of the kind and at the address `config` asks
/// for: a socket kept across an exec or in systemd's fd store is reused
/// only then (a listener whose address changed is bound anew; one renamed
/// or moved to another service keeps its socket).
pub fn bound_as(fd: &OwnedFd, config: &ListenerConfig) -> bool {
    let Ok(addr) = getsockname::<SockaddrStorage>(fd.as_raw_fd()) else {
        return false;
    };
    let Ok(kind) = getsockopt(fd, sockopt::SockType) else {
        return false;
    };
    let ip_port = || {
        if let Some(v4) = addr.as_sockaddr_in() {
            Some(std::net::SocketAddr::from((v4.ip(), v4.port())))
        } else {
            addr.as_sockaddr_in6()
                .map(|v6| std::net::SocketAddr::from((v6.ip(), v6.port())))
        }
    };
    // Port 0 asks for any port: the one the socket got is as good.
    let same = |want: std::net::SocketAddr, got: Option<std::net::SocketAddr>| {
        got.is_some_and(|got| got == want || (want.port() == 0 && got.ip() == want.ip()))
    };
    match config.kind() {
        ListenerKind::Tcp(want) => kind == SockType::Stream && same(want, ip_port()),
        ListenerKind::Udp(want) => kind == SockType::Datagram && same(want, ip_port()),
        ListenerKind::Unix => {
            kind == SockType::Stream
                && addr.family() == Some(AddressFamily::Unix)
                && addr.as_unix_addr().and_then(|u| u.path()) == config.unix.as_deref()
        }
    }
}
