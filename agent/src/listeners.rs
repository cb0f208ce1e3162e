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
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage, UnixAddr,
};

use crate::config::{ListenerConfig, ListenerKind};

/// Long backlog: during a handoff and a restart, connections wait here.
const BACKLOG: i32 = 4096;

pub struct BoundListener {
    pub name: String,
    pub fd: OwnedFd,
}

pub fn bind_all(service: &str, listeners: &[ListenerConfig]) -> anyhow::Result<Vec<BoundListener>> {
    listeners
        .iter()
        .map(|config| {
            let fd = bind_one(config).with_context(|| {
                format!(
                    "service {service:?}: cannot bind listener {:?}",
                    config.name
                )
            })?;
            Ok(BoundListener {
                name: config.name.clone(),
                fd,
            })
        })
        .collect()
}

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
