//! Readiness and status messages to the supervisor (sd_notify protocol).
//!
//! The supervisor (the reload agent, or systemd) names a Unix datagram socket
//! in `NOTIFY_SOCKET`: a path, or an abstract name when it starts with `@`.
//! Each message is one datagram of `KEY=VALUE` lines. The agent only counts a
//! new process as started, and only then tells the old one to drain, once it
//! has received `READY=1`.
//!
//! The free functions ([`ready`], [`stopping`], [`status`], [`notify`]) read
//! `NOTIFY_SOCKET` once and remove it from the environment on first use, so
//! programs we spawn never send readiness on our behalf. Without
//! `NOTIFY_SOCKET` they return `Ok(false)`: the program runs alone, which is
//! fine. [`Notifier`] is the same thing pointed at an explicit socket.

#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::OnceLock;

const VAR_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "NOTIFY_SOCKET={value:?} is not usable ({reason}); the supervisor must set it to an \
         absolute socket path or an abstract name starting with '@'"
    )]
    InvalidSocket { value: OsString, reason: String },

    #[error(
        "could not send {message:?} to the notify socket {target:?}: {source}; is the supervisor \
         still listening there?"
    )]
    Send {
        target: OsString,
        message: String,
        #[source]
        source: io::Error,
    },
}

/// A handle on one notify socket.
#[derive(Debug)]
pub struct Notifier {
    /// As given (for error messages).
    target: OsString,
    addr: SocketAddr,
}

impl Notifier {
    /// Point at `socket`: a filesystem path, or `@name` for an abstract
    /// socket (Linux).
    pub fn new(socket: impl AsRef<OsStr>) -> Result<Notifier, NotifyError> {
        let target = socket.as_ref().to_owned();
        let invalid = |reason: String| NotifyError::InvalidSocket {
            value: target.clone(),
            reason,
        };
        let bytes = target.as_bytes();
        let addr = match bytes.first() {
            None => return Err(invalid("empty".to_owned())),
            Some(b'@') => abstract_addr(&bytes[1..]).map_err(|e| invalid(e.to_string()))?,
            Some(b'/') => SocketAddr::from_pathname(&target).map_err(|e| invalid(e.to_string()))?,
            Some(_) => return Err(invalid("a relative path".to_owned())),
        };
        Ok(Notifier { target, addr })
    }

    /// Send a raw message: `KEY=VALUE` lines separated by `\n`.
    pub fn notify(&self, message: &str) -> Result<(), NotifyError> {
        let send_error = |source| NotifyError::Send {
            target: self.target.clone(),
            message: message.to_owned(),
            source,
        };
        // A fresh unbound socket per message, as sd_notify does: messages are
        // rare, and there is no connection state to keep or to leak.
        let socket = UnixDatagram::unbound().map_err(send_error)?;
        let sent = socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map_err(send_error)?;
        if sent != message.len() {
            return Err(send_error(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("datagram truncated to {sent} of {} bytes", message.len()),
            )));
        }
        Ok(())
    }

    /// Sends `message` with `fds` attached (SCM_RIGHTS): how a program
    /// hands sockets to systemd's fd store (`FDSTORE=1`, `FDNAME=...`).
    pub fn notify_with_fds(
        &self,
        message: &str,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), NotifyError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::os::fd::AsRawFd;
        let send_error = |source| NotifyError::Send {
            target: self.target.clone(),
            message: message.to_owned(),
            source,
        };
        let bytes = self.target.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => UnixAddr::new_abstract(&bytes[1..]),
            _ => UnixAddr::new(Path::new(&self.target)),
        }
        .map_err(|errno| send_error(errno.into()))?;
        let socket = UnixDatagram::unbound().map_err(send_error)?;
        let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let control = [ControlMessage::ScmRights(&raw)];
        let iov = [io::IoSlice::new(message.as_bytes())];
        let sent = sendmsg(
            socket.as_raw_fd(),
            &iov,
            if raw.is_empty() { &[] } else { &control },
            MsgFlags::empty(),
            Some(&addr),
        )
        .map_err(|errno| send_error(errno.into()))?;
        if sent != message.len() {
            return Err(send_error(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("datagram truncated to {sent} of {} bytes", message.len()),
            )));
        }
        Ok(())
    }

    /// `READY=1`: startup is finished and the program serves.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.notify("READY=1")
    }

    /// `STOPPING=1`: the program is draining and will exit.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.notify("STOPPING=1")
    }

    /// `STATUS=<text>`: a one-line human-readable status. Newlines are
    /// replaced by spaces, since each line of a message is one `KEY=VALUE`.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STATUS={}", text.replace('\n', " ")))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract Unix sockets exist only on Linux",
    ))
}

/// The receiving side, for a supervisor: waits on its notify socket until a
/// datagram says `READY=1` (one `KEY=VALUE` line among others), ignoring
/// every other message (`STATUS=`, `MAINPID=`). The agent waits for its
/// services this way, and the standalone self-upgrade for its successor.
pub async fn recv_ready(socket: &tokio::net::UnixDatagram) -> io::Result<()> {
    let mut buffer = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buffer).await?;
        if String::from_utf8_lossy(&buffer[..n])
            .lines()
            .any(|line| line.trim() == "READY=1")
        {
            return Ok(());
        }
    }
}

/// The process-wide notifier, from `NOTIFY_SOCKET`, read once.
///
/// `None` when the variable was not set. Only the reason is kept for an
/// invalid value, since the error itself is not `Clone`.
fn from_env() -> Option<&'static Result<Notifier, (OsString, String)>> {
    static NOTIFIER: OnceLock<Option<Result<Notifier, (OsString, String)>>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| {
            let value = std::env::var_os(VAR_NOTIFY_SOCKET);
            let _ = RAW_VALUE.set(value.clone());
            let value = value?;
            // Our children must not inherit it: a grandchild could otherwise
            // report READY for a process that is not ready.
            std::env::remove_var(VAR_NOTIFY_SOCKET);
            Some(Notifier::new(&value).map_err(|e| match e {
                NotifyError::InvalidSocket { value, reason } => (value, reason),
                other => (value, other.to_string()),
            }))
        })
        .as_ref()
}

/// The `NOTIFY_SOCKET` value this process was started with (read once, like
/// every function here): a self-upgrade passes it on so the next process
/// can tell the supervisor (systemd) its new main pid.
pub fn socket_value() -> Option<OsString> {
    from_env();
    RAW_VALUE.get().cloned().flatten()
}

/// `NOTIFY_SOCKET` as read by [`from_env`], before it was removed.
static RAW_VALUE: OnceLock<Option<OsString>> = OnceLock::new();

/// Whether a supervisor listens (`NOTIFY_SOCKET` was set, even to an
/// unusable value). The first call reads and removes the variable, so calling
/// this first thing in `main` keeps that edit away from other threads.
pub fn enabled() -> bool {
    from_env().is_some()
}

/// Where messages go after [`redirect`]: `Some(None)` means nowhere.
static REDIRECT: std::sync::Mutex<Option<Option<Notifier>>> = std::sync::Mutex::new(None);

/// Sends later messages to `target` instead of `NOTIFY_SOCKET` (or nowhere
/// with `None`). A process started by a self-upgrade reports READY to its
/// parent's private socket; after that, its supervisor is the one to hear
/// from it.
pub fn redirect(target: Option<&std::ffi::OsStr>) -> Result<(), NotifyError> {
    let notifier = target.map(Notifier::new).transpose()?;
    *REDIRECT.lock().unwrap_or_else(|p| p.into_inner()) = Some(notifier);
    Ok(())
}

/// Send a raw message to `NOTIFY_SOCKET`. `Ok(false)` when there is none.
///
/// The first call of any function here reads and removes `NOTIFY_SOCKET`
/// from the environment; make it early in `main` if the program spawns
/// threads or children (environment edits are not thread-safe in libc).
pub fn notify(message: &str) -> Result<bool, NotifyError> {
    if let Some(redirected) = REDIRECT.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return match redirected {
            Some(notifier) => notifier.notify(message).map(|()| true),
            None => Ok(false),
        };
    }
    match from_env() {
        None => Ok(false),
        Some(Ok(notifier)) => notifier.notify(message).map(|()| true),
        Some(Err((value, reason))) => Err(NotifyError::InvalidSocket {
            value: value.clone(),
            reason: reason.clone(),
        }),
    }
}

/// [`Notifier::notify_with_fds`] to `NOTIFY_SOCKET` (or the redirect).
/// `Ok(false)` when there is none.
pub fn notify_with_fds(
    message: &str,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<bool, NotifyError> {
    if let Some(redirected) = REDIRECT.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return match redirected {
            Some(notifier) => notifier.notify_with_fds(message, fds).map(|()| true),
            None => Ok(false),
        };
    }
    match from_env() {
        None => Ok(false),
        Some(Ok(notifier)) => notifier.notify_with_fds(message, fds).map(|()| true),
        Some(Err((value, reason))) => Err(NotifyError::InvalidSocket {
            value: value.clone(),
            reason: reason.clone(),
        }),
    }
}

/// `READY=1` to `NOTIFY_SOCKET`. `Ok(false)` when there is none.
pub fn ready() -> Result<bool, NotifyError> {
    notify("READY=1")
}

/// `STOPPING=1` to `NOTIFY_SOCKET`. `Ok(false)` when there is none.
pub fn stopping() -> Result<bool, NotifyError> {
    notify("STOPPING=1")
}

/// `STATUS=<text>` to `NOTIFY_SOCKET`. `Ok(false)` when there is none.
pub fn status(text: &str) -> Result<bool, NotifyError> {
    notify(&format!("STATUS={}", text.replace('\n', " ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket
            .recv(&mut buf)
            .expect("a datagram within the timeout");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn receiver(socket: UnixDatagram) -> UnixDatagram {
        // A bound: the datagrams are already queued when recv runs, but a
        // broken sender must fail the test rather than hang it.
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        socket
    }

    #[test]
    fn sends_exact_datagrams_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let supervisor = receiver(UnixDatagram::bind(&path).unwrap());

        let notifier = Notifier::new(&path).unwrap();
        notifier.ready().unwrap();
        notifier.status("draining\n2 connections").unwrap();
        notifier.stopping().unwrap();
        notifier.notify("RELOADING=1\nMONOTONIC_USEC=1").unwrap();

        assert_eq!(recv(&supervisor), "READY=1");
        assert_eq!(recv(&supervisor), "STATUS=draining 2 connections");
        assert_eq!(recv(&supervisor), "STOPPING=1");
        assert_eq!(recv(&supervisor), "RELOADING=1\nMONOTONIC_USEC=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("reload-server-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let supervisor = receiver(UnixDatagram::bind_addr(&addr).unwrap());

        Notifier::new(format!("@{name}")).unwrap().ready().unwrap();
        assert_eq!(recv(&supervisor), "READY=1");
    }

    #[test]
    fn rejects_unusable_values() {
        for bad in ["", "relative/notify.sock"] {
            let err = Notifier::new(bad).unwrap_err();
            assert!(
                matches!(err, NotifyError::InvalidSocket { .. }),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn missing_listener_is_a_send_error() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::new(dir.path().join("nobody.sock")).unwrap();
        let err = notifier.ready().unwrap_err();
        assert!(matches!(err, NotifyError::Send { .. }), "{err:?}");
        assert!(err.to_string().contains("READY=1"), "{err}");
    }
}
