//! A service's listening sockets: bound once when the agent starts (or
//! taken from systemd's fd store, or from the previous agent image), kept
//! for the agent's whole life, and handed as duplicates to each process of
//! the service. The sockets never close across reloads, crashes and
//! restarts: clients queue in the kernel's backlog meanwhile instead of
//! being refused.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

use anyhow::{bail, Context};
use nix::sys::socket::{
    bind, getsockname, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog,
    SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};

use crate::config::{ListenerConfig, ListenerKind, ServiceConfig};
use std::collections::BTreeMap;
use std::os::fd::AsFd;

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

/// The fd-store name of a service listener.
pub fn fd_store_name(service: &str, listener: &str) -> String {
    format!("{FD_STORE_PREFIX}{service}/{listener}")
}

/// What every service listener's fd-store name starts with.
pub const FD_STORE_PREFIX: &str = "reload-svc/";

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
pub(super) fn assign_given(
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

/// Under systemd (NOTIFY_SOCKET), gives every service listener to the
/// service manager's fd store (FDSTORE=1; the unit needs
/// FileDescriptorStoreMax=), so that even a crash of the agent does not
/// close them: systemd passes them back on restart and clients wait in
/// the backlog meanwhile. Given sockets no listener took are removed
/// first (systemd skips an fd it already holds, so a renamed
/// listener's socket must leave under its old name before it can come
/// back under the new one; a re-addressed one must not stay beside its
/// replacement). Called once this image is committed to serving.
pub(super) fn keep_in_fd_store<'a>(
    services: impl Iterator<Item = (&'a str, &'a [BoundListener])>,
    unused_given: &[(String, String)],
) {
    if !reload_server::notify::enabled() {
        return;
    }
    for (service, listener) in unused_given {
        let name = fd_store_name(service, listener);
        let _ = reload_server::notify::notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }
    let mut kept = 0;
    for (service, listeners) in services {
        for listener in listeners {
            let name = fd_store_name(service, &listener.name);
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
        removed = unused_given.len(),
        "service listeners in systemd's fd store"
    );
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
