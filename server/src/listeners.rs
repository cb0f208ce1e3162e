//! Inherited listening sockets, by name (systemd socket-activation protocol).
//!
//! The process that starts us (the reload agent, or systemd) passes its
//! listening sockets as fds 3, 4, … and describes them in three variables:
//!
//! - `LISTEN_FDS=n`: how many fds, starting at 3;
//! - `LISTEN_FDNAMES=a:b:c`: their names, in order (optional; unnamed fds are
//!   called `unknown`, as systemd does);
//! - `LISTEN_PID=<pid>`: whom they are for. The variables are inherited by
//!   every child, so a process only takes the fds when `LISTEN_PID` is its own
//!   pid; otherwise they were meant for an ancestor.
//!
//! [`Listeners::from_env`] reads and removes the variables, and
//! [`Listeners::tcp`], [`Listeners::unix`] and [`Listeners::udp`] hand out a
//! socket by name, binding a fallback address when the name was not passed
//! (the "run alone" mode, also what tests use).
//!
//! This is the only module in the crate with `unsafe` code: claiming ownership
//! of an fd by number cannot be checked by the compiler.

#![deny(unsafe_op_in_unsafe_fn)]

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::libc;
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// The first inherited fd: 0, 1 and 2 are stdio.
pub const LISTEN_FDS_START: RawFd = 3;

/// Name systemd gives to fds that `LISTEN_FDNAMES` does not name.
pub const UNKNOWN_NAME: &str = "unknown";

const VAR_FDS: &str = "LISTEN_FDS";
const VAR_NAMES: &str = "LISTEN_FDNAMES";
const VAR_PID: &str = "LISTEN_PID";

/// Why an inherited socket could not be read or handed out.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "{var}={value:?} is invalid ({reason}); the process that starts this program must set \
         LISTEN_FDS to the number of fds passed from fd 3 on and LISTEN_PID to this process's pid"
    )]
    InvalidEnv {
        var: &'static str,
        value: String,
        reason: String,
    },

    #[error(
        "LISTEN_FDS={fds} but LISTEN_FDNAMES names {names} sockets; the fd order is ambiguous, so \
         nothing was taken: pass exactly one name per fd (or no LISTEN_FDNAMES at all)"
    )]
    NameCountMismatch { fds: usize, names: usize },

    #[error(
        "LISTEN_FDS says fd {fd} was passed, but it is not open ({errno}); the parent must clear \
         FD_CLOEXEC on every fd it passes, in the child only"
    )]
    FdNotOpen { fd: RawFd, errno: Errno },

    #[error("could not set FD_CLOEXEC on inherited fd {fd}: {errno}")]
    Cloexec { fd: RawFd, errno: Errno },

    #[error(
        "listener {name:?} was asked for as {wanted}, but the inherited fd {fd} is {actual}; \
         fix the socket declaration of this service or the name the program asks for"
    )]
    WrongKind {
        name: String,
        fd: RawFd,
        wanted: &'static str,
        actual: SocketKind,
    },

    #[error("listener {name:?} was already taken; each named listener can be taken only once")]
    AlreadyTaken { name: String },

    #[error(
        "{count} inherited fds are named {name:?}; give each socket its own name \
         (LISTEN_FDNAMES, or FileDescriptorName= under systemd) so they can be told apart"
    )]
    AmbiguousName { name: String, count: usize },

    #[error(
        "listener {name:?} was not inherited and binding the fallback {addr} failed: {source}; \
         if another process holds that address, stop it or pick another with the program's flags \
         (under the reload agent this socket should have been passed: check the service's socket names)"
    )]
    Bind {
        name: String,
        addr: String,
        #[source]
        source: io::Error,
    },

    #[error("could not prepare listener {name:?} for async use: {source}")]
    Setup {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// What an inherited fd turned out to be (detected with `SO_TYPE` and
/// `getsockname`), so a mix-up is reported in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `SOCK_STREAM` on `AF_INET`/`AF_INET6`; `listening` is `SO_ACCEPTCONN`.
    Tcp { listening: bool },
    /// `SOCK_DGRAM` on `AF_INET`/`AF_INET6`.
    Udp,
    /// `SOCK_STREAM` on `AF_UNIX`.
    UnixStream { listening: bool },
    /// `SOCK_DGRAM` on `AF_UNIX`.
    UnixDatagram,
    /// A socket of another type or family (netlink, SEQPACKET, …).
    OtherSocket,
    /// Not a socket at all (a pipe, a file, …).
    NotSocket,
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketKind::Tcp { listening: true } => "a listening TCP socket",
            SocketKind::Tcp { listening: false } => "a TCP socket that is not listening",
            SocketKind::Udp => "a UDP socket",
            SocketKind::UnixStream { listening: true } => "a listening Unix stream socket",
            SocketKind::UnixStream { listening: false } => {
                "a Unix stream socket that is not listening"
            }
            SocketKind::UnixDatagram => "a Unix datagram socket",
            SocketKind::OtherSocket => "a socket of another type or address family",
            SocketKind::NotSocket => "not a socket",
        })
    }
}

/// The parsed environment: one name per fd, fd `LISTEN_FDS_START + index`.
///
/// Empty when nothing was passed to this process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListenEnv {
    pub names: Vec<String>,
}

/// Parse the socket-activation variables, with the environment injected
/// (`vars` looks a variable up) so the rules can be tested without touching
/// the real process environment.
///
/// Mirrors systemd's `sd_listen_fds_with_names`: no `LISTEN_PID`, or one that
/// is not `our_pid`, means "nothing for us" (not an error); a
/// `LISTEN_FDNAMES` with a different count than `LISTEN_FDS` is an error
/// (guessing which name goes with which fd could hand out the wrong socket).
pub fn parse_listen_env(
    vars: impl Fn(&str) -> Option<String>,
    our_pid: u32,
) -> Result<ListenEnv, ListenError> {
    let Some(pid) = vars(VAR_PID) else {
        tracing::debug!("no LISTEN_PID: no sockets inherited");
        return Ok(ListenEnv::default());
    };
    let pid: u32 = pid.trim().parse().map_err(|e| ListenError::InvalidEnv {
        var: VAR_PID,
        value: pid.clone(),
        reason: format!("not a pid: {e}"),
    })?;
    if pid != our_pid {
        // The variables leaked from an ancestor; the fds (if still open) are
        // not ours to take.
        tracing::debug!(
            listen_pid = pid,
            our_pid,
            "LISTEN_PID is not our pid: no sockets taken"
        );
        return Ok(ListenEnv::default());
    }

    let Some(fds) = vars(VAR_FDS) else {
        return Ok(ListenEnv::default());
    };
    let count: usize = fds.trim().parse().map_err(|e| ListenError::InvalidEnv {
        var: VAR_FDS,
        value: fds.clone(),
        reason: format!("not a count: {e}"),
    })?;
    // fd numbers are ints; a count that overflows them is garbage.
    if count > (RawFd::MAX - LISTEN_FDS_START) as usize {
        return Err(ListenError::InvalidEnv {
            var: VAR_FDS,
            value: fds,
            reason: "too large".to_owned(),
        });
    }

    let names = match vars(VAR_NAMES) {
        None => vec![UNKNOWN_NAME.to_owned(); count],
        Some(joined) => {
            // "".split(':') yields one empty name; with zero fds that is zero names.
            let names: Vec<String> = if joined.is_empty() && count == 0 {
                Vec::new()
            } else {
                joined
                    .split(':')
                    .map(|n| if n.is_empty() { UNKNOWN_NAME } else { n }.to_owned())
                    .collect()
            };
            if names.len() != count {
                return Err(ListenError::NameCountMismatch {
                    fds: count,
                    names: names.len(),
                });
            }
            names
        }
    };
    Ok(ListenEnv { names })
}

/// One inherited fd.
#[derive(Debug)]
struct Inherited {
    name: String,
    /// `None` once handed out.
    fd: Option<OwnedFd>,
    raw: RawFd,
    kind: SocketKind,
}

/// The sockets passed to this process, handed out by name.
#[derive(Debug, Default)]
pub struct Listeners {
    inherited: Vec<Inherited>,
    /// Every name handed out so far, inherited or bound as a fallback.
    taken: HashSet<String>,
}

impl Listeners {
    /// Take the sockets passed to this process, and remove `LISTEN_FDS`,
    /// `LISTEN_FDNAMES` and `LISTEN_PID` from the environment (always, so our
    /// own children never see them).
    ///
    /// Call it early in `main`, before other threads exist: it edits the
    /// process environment, which is not thread-safe in libc.
    pub fn from_env() -> Result<Listeners, ListenError> {
        let parsed = parse_listen_env(|k| std::env::var(k).ok(), std::process::id());
        for var in [VAR_FDS, VAR_NAMES, VAR_PID] {
            std::env::remove_var(var);
        }
        let parsed = parsed?;

        let mut inherited = Vec::with_capacity(parsed.names.len());
        for (i, name) in parsed.names.into_iter().enumerate() {
            let raw = LISTEN_FDS_START + i as RawFd;
            // Check that the fd is open before claiming it: an OwnedFd for a
            // closed number would later close some unrelated file that
            // happens to reuse the number.
            // SAFETY: fcntl(F_GETFD) only reads the fd's flags and is defined
            // for any integer; a closed fd gives EBADF, no memory is touched.
            let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
            if flags < 0 {
                return Err(ListenError::FdNotOpen {
                    fd: raw,
                    errno: Errno::last(),
                });
            }
            // SAFETY: `raw` is open (checked just above), and the
            // socket-activation protocol with LISTEN_PID == our pid gives
            // this process ownership of fds 3..3+LISTEN_FDS; nothing else in
            // the process claims them, and `from_env` reads the (now removed)
            // variables, so a second call finds nothing to take again.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // The parent cleared CLOEXEC to pass the fd to us; set it back so
            // programs we spawn do not hold our listening sockets open.
            fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|errno| ListenError::Cloexec { fd: raw, errno })?;
            let kind = socket_kind(&fd);
            tracing::debug!(fd = raw, %name, %kind, "inherited socket");
            inherited.push(Inherited {
                name,
                fd: Some(fd),
                raw,
                kind,
            });
        }
        Ok(Listeners {
            inherited,
            taken: HashSet::new(),
        })
    }

    /// A listener set with nothing inherited: every `tcp`/`unix`/`udp` call
    /// binds its fallback. Handy in tests.
    pub fn none() -> Listeners {
        Listeners::default()
    }

    /// The inherited fd named `name`, of whatever socket kind; `None` if
    /// there is none (nothing is bound in its place).
    pub fn take_fd(&mut self, name: &str) -> Result<Option<OwnedFd>, ListenError> {
        self.take(name, "a socket", |_| true)
    }

    /// Names of the inherited sockets not yet taken, in fd order.
    pub fn names(&self) -> Vec<String> {
        self.inherited
            .iter()
            .filter(|i| i.fd.is_some())
            .map(|i| i.name.clone())
            .collect()
    }

    /// The TCP listener named `name`: the inherited one, or else a fresh one
    /// bound to `fallback`.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn tcp(
        &mut self,
        name: &str,
        fallback: SocketAddr,
    ) -> Result<tokio::net::TcpListener, ListenError> {
        let std_listener = match self.take(name, "a listening TCP socket", |k| {
            k == SocketKind::Tcp { listening: true }
        })? {
            Some(fd) => std::net::TcpListener::from(fd),
            // A plain bind (std sets SO_REUSEADDR, never SO_REUSEPORT): with
            // SO_REUSEPORT a second process could bind a *separate* queue
            // next to the inherited one, and connections queued there are
            // reset when either side closes.
            None => self.bound(name, &fallback, std::net::TcpListener::bind(fallback))?,
        };
        let setup = |source| ListenError::Setup {
            name: name.to_owned(),
            source,
        };
        std_listener.set_nonblocking(true).map_err(setup)?;
        tokio::net::TcpListener::from_std(std_listener).map_err(setup)
    }

    /// The Unix stream listener named `name`: the inherited one, or else one
    /// bound at `fallback_path` (which must not exist yet).
    ///
    /// Must be called inside a Tokio runtime.
    pub fn unix(
        &mut self,
        name: &str,
        fallback_path: &Path,
    ) -> Result<tokio::net::UnixListener, ListenError> {
        let std_listener = match self.take(name, "a listening Unix stream socket", |k| {
            k == SocketKind::UnixStream { listening: true }
        })? {
            Some(fd) => std::os::unix::net::UnixListener::from(fd),
            None => self.bound(
                name,
                &fallback_path.display(),
                std::os::unix::net::UnixListener::bind(fallback_path),
            )?,
        };
        let setup = |source| ListenError::Setup {
            name: name.to_owned(),
            source,
        };
        std_listener.set_nonblocking(true).map_err(setup)?;
        tokio::net::UnixListener::from_std(std_listener).map_err(setup)
    }

    /// The UDP socket named `name`: the inherited one, or else one bound to
    /// `fallback`.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn udp(
        &mut self,
        name: &str,
        fallback: SocketAddr,
    ) -> Result<tokio::net::UdpSocket, ListenError> {
        let std_socket = match self.take(name, "a UDP socket", |k| k == SocketKind::Udp)? {
            Some(fd) => std::net::UdpSocket::from(fd),
            None => self.bound(name, &fallback, std::net::UdpSocket::bind(fallback))?,
        };
        let setup = |source| ListenError::Setup {
            name: name.to_owned(),
            source,
        };
        std_socket.set_nonblocking(true).map_err(setup)?;
        tokio::net::UdpSocket::from_std(std_socket).map_err(setup)
    }

    /// Hand out the inherited fd named `name` if there is one and it is of
    /// the wanted kind; `Ok(None)` means "not inherited, bind the fallback"
    /// (the caller then records the name with [`Listeners::bound`]).
    fn take(
        &mut self,
        name: &str,
        wanted: &'static str,
        is_wanted: impl Fn(SocketKind) -> bool,
    ) -> Result<Option<OwnedFd>, ListenError> {
        if self.taken.contains(name) {
            return Err(ListenError::AlreadyTaken {
                name: name.to_owned(),
            });
        }
        let mut matching = self.inherited.iter_mut().filter(|i| i.name == name);
        let Some(found) = matching.next() else {
            tracing::debug!(name, "listener not inherited: binding the fallback address");
            return Ok(None);
        };
        let others = matching.count();
        if others > 0 {
            return Err(ListenError::AmbiguousName {
                name: name.to_owned(),
                count: others + 1,
            });
        }
        if !is_wanted(found.kind) {
            return Err(ListenError::WrongKind {
                name: name.to_owned(),
                fd: found.raw,
                wanted,
                actual: found.kind,
            });
        }
        self.taken.insert(name.to_owned());
        Ok(found.fd.take())
    }

    /// Record a fallback bind of `name` (when it succeeded), so the name
    /// cannot be taken twice either way.
    fn bound<T>(
        &mut self,
        name: &str,
        addr: &dyn fmt::Display,
        bind: io::Result<T>,
    ) -> Result<T, ListenError> {
        let socket = bind.map_err(|source| ListenError::Bind {
            name: name.to_owned(),
            addr: addr.to_string(),
            source,
        })?;
        self.taken.insert(name.to_owned());
        Ok(socket)
    }
}

/// Find out what an fd is, for error messages and the kind check.
fn socket_kind(fd: &OwnedFd) -> SocketKind {
    let ty = match getsockopt(fd, sockopt::SockType) {
        Ok(ty) => ty,
        Err(Errno::ENOTSOCK) => return SocketKind::NotSocket,
        Err(_) => return SocketKind::OtherSocket,
    };
    let family = getsockname::<SockaddrStorage>(fd.as_fd().as_raw_fd())
        .ok()
        .and_then(|addr| addr.family());
    let listening = || getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
    match (family, ty) {
        (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Stream) => SocketKind::Tcp {
            listening: listening(),
        },
        (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Datagram) => SocketKind::Udp,
        (Some(AddressFamily::Unix), SockType::Stream) => SocketKind::UnixStream {
            listening: listening(),
        },
        (Some(AddressFamily::Unix), SockType::Datagram) => SocketKind::UnixDatagram,
        _ => SocketKind::OtherSocket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn names(list: &[&str]) -> ListenEnv {
        ListenEnv {
            names: list.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn our_pid_takes_named_fds() {
        let vars = env(&[
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "3"),
            ("LISTEN_FDNAMES", "http:admin:metrics"),
        ]);
        assert_eq!(
            parse_listen_env(vars, 42).unwrap(),
            names(&["http", "admin", "metrics"])
        );
    }

    #[test]
    fn other_pid_takes_nothing() {
        let vars = env(&[
            ("LISTEN_PID", "41"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "http:admin"),
        ]);
        assert_eq!(parse_listen_env(vars, 42).unwrap(), ListenEnv::default());
    }

    #[test]
    fn no_pid_takes_nothing() {
        let vars = env(&[("LISTEN_FDS", "2")]);
        assert_eq!(parse_listen_env(vars, 42).unwrap(), ListenEnv::default());
    }

    #[test]
    fn missing_names_are_unknown() {
        let vars = env(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "2")]);
        assert_eq!(
            parse_listen_env(vars, 7).unwrap(),
            names(&["unknown", "unknown"])
        );
    }

    #[test]
    fn empty_name_is_unknown() {
        let vars = env(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", ":admin"),
        ]);
        assert_eq!(
            parse_listen_env(vars, 7).unwrap(),
            names(&["unknown", "admin"])
        );
    }

    #[test]
    fn zero_fds_is_empty() {
        let vars = env(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "0"),
            ("LISTEN_FDNAMES", ""),
        ]);
        assert_eq!(parse_listen_env(vars, 7).unwrap(), ListenEnv::default());
    }

    #[test]
    fn name_count_mismatch_is_an_error() {
        let vars = env(&[
            ("LISTEN_PID", "7"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "http"),
        ]);
        let err = parse_listen_env(vars, 7).unwrap_err();
        assert!(
            matches!(err, ListenError::NameCountMismatch { fds: 2, names: 1 }),
            "{err:?}"
        );
    }

    #[test]
    fn fds_not_a_number_is_an_error() {
        let vars = env(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "two")]);
        let err = parse_listen_env(vars, 7).unwrap_err();
        assert!(
            matches!(
                err,
                ListenError::InvalidEnv {
                    var: "LISTEN_FDS",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("LISTEN_FDS=\"two\""), "{err}");
    }

    #[test]
    fn pid_not_a_number_is_an_error() {
        let vars = env(&[("LISTEN_PID", "me"), ("LISTEN_FDS", "1")]);
        let err = parse_listen_env(vars, 7).unwrap_err();
        assert!(
            matches!(
                err,
                ListenError::InvalidEnv {
                    var: "LISTEN_PID",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn fallback_binds_and_names_are_taken_once() {
        let mut listeners = Listeners::none();
        assert!(listeners.names().is_empty());
        let tcp = listeners
            .tcp("http", "127.0.0.1:0".parse().unwrap())
            .unwrap();
        assert!(tcp.local_addr().unwrap().port() != 0);
        let err = listeners
            .tcp("http", "127.0.0.1:0".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, ListenError::AlreadyTaken { .. }), "{err:?}");
        let udp = listeners
            .udp("dns", "127.0.0.1:0".parse().unwrap())
            .unwrap();
        assert!(udp.local_addr().unwrap().port() != 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let _unix = listeners.unix("admin", &path).unwrap();
        assert!(path.exists());
    }

    #[tokio::test]
    async fn failed_fallback_bind_can_be_retried() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_addr = busy.local_addr().unwrap();
        let mut listeners = Listeners::none();
        let err = listeners.tcp("http", busy_addr).unwrap_err();
        assert!(matches!(err, ListenError::Bind { .. }), "{err:?}");
        assert!(err.to_string().contains(&busy_addr.to_string()), "{err}");
        // The failed attempt did not use the name up.
        listeners
            .tcp("http", "127.0.0.1:0".parse().unwrap())
            .unwrap();
    }

    #[test]
    fn socket_kinds_are_detected() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            socket_kind(&OwnedFd::from(tcp)),
            SocketKind::Tcp { listening: true }
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(socket_kind(&OwnedFd::from(udp)), SocketKind::Udp);
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        assert_eq!(
            socket_kind(&OwnedFd::from(unix)),
            SocketKind::UnixStream { listening: true }
        );
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(socket_kind(&OwnedFd::from(file)), SocketKind::NotSocket);
    }

    #[test]
    fn wrong_kind_names_the_listener() {
        // Build the inherited table directly (the real-fd path is covered by
        // the end-to-end tests, which spawn real processes).
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let fd = OwnedFd::from(unix);
        let raw = fd.as_raw_fd();
        let kind = socket_kind(&fd);
        let mut listeners = Listeners {
            inherited: vec![Inherited {
                name: "http".to_owned(),
                fd: Some(fd),
                raw,
                kind,
            }],
            taken: HashSet::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let err = listeners
            .tcp("http", "127.0.0.1:0".parse().unwrap())
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"http\""), "{msg}");
        assert!(msg.contains("Unix stream socket"), "{msg}");
        // Still there, and can be taken as what it is.
        assert_eq!(listeners.names(), vec!["http".to_owned()]);
        let _unix = listeners.unix("http", &dir.path().join("unused")).unwrap();
        assert!(listeners.names().is_empty());
    }
}
