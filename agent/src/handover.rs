//! The agent's in-place self-upgrade: what one image of the agent process
//! hands the next across `execve`.
//!
//! `UpgradeAgent` ends with the agent calling execve on the new binary *in
//! the same process*: the pid stays, so systemd's view of the unit and every
//! service's parent stay as they were. Everything the new image needs that
//! is not on disk travels as open fds (close-on-exec cleared on exactly
//! these) plus a JSON description of them in `RELOAD_AGENT_HANDOVER`:
//!
//! - the gRPC and health listeners, so clients queue in the backlog instead
//!   of being refused while the new image starts;
//! - every service's listening sockets;
//! - (service processes do not cross it: they run under shims, which the
//!   new image finds and attaches to as any starting agent does);
//! - an fd of the image being replaced, so a new image that fails its
//!   start-up checks can re-execute the previous one with the same
//!   handover (and a `fallback_reason`), instead of losing the services.
//!
//! Versions, leases and history are already on disk (state and lease files,
//! fsync'd on every change), so the new image reads them as any start does.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The environment variable that carries the description.
pub const ENV_VAR: &str = "RELOAD_AGENT_HANDOVER";

/// Bumped on any incompatible change of [`Handover`] or of what crosses
/// the exec with it (2: service processes no longer cross it, they run
/// under shims; as in 1, SIGTERM, SIGINT and SIGHUP
/// arrive blocked and the new image unblocks them once it serves, see
/// crate::signals). `reload-agent --check` prints the protocol it speaks;
/// an upgrade to a binary that does not speak ours is refused before
/// anything is stopped.
pub const PROTOCOL: u32 = 2;

/// The service name agent artifacts are signed for.
pub const AGENT_SERVICE: &str = "reload-agent";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handover {
    pub protocol: u32,
    /// The agent's arguments as it was first started (argv[1..]): every
    /// image, the fallback included, runs with these, whatever the image
    /// that failed was started with.
    pub args: Vec<String>,
    /// The image being replaced (opened from /proc/self/exe).
    pub previous_exe_fd: RawFd,
    /// The image this process was started with (the installed binary),
    /// kept open for its whole life: what a rollback past the first
    /// upgraded image returns to, even if the file was replaced on disk.
    pub installed_exe_fd: RawFd,
    pub grpc_fds: Vec<RawFd>,
    pub health_fd: Option<RawFd>,
    pub services: Vec<ServiceHandover>,
    pub upgrade: UpgradeRecord,
    /// SIGTERM or SIGINT came while the previous image was handing over:
    /// the new image stops (draining its services) as soon as it runs.
    #[serde(default)]
    pub pending_stop: bool,
}

/// A service's sockets. Its processes do not cross the exec: they run under
/// shims (see crate::shim), which the new image finds and attaches to as
/// any starting agent does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceHandover {
    pub name: String,
    /// (listener name, fd), in the service's LISTEN_FDS order.
    pub listeners: Vec<(String, RawFd)>,
    pub restarts: u32,
}

/// What the upgrade was, for `GetAgentInfo.last_upgrade` and the state file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub from_version: String,
    pub from_sha256: String,
    pub to_version: String,
    pub to_sha256: String,
    /// The target is the installed binary, not a stored artifact.
    pub to_installed: bool,
    /// Asked for as a rollback (the history is popped, not pushed).
    pub rollback: bool,
    /// The same image again, to read the config anew (SIGHUP).
    #[serde(default)]
    pub config_reload: bool,
    /// Set when the new image failed its start-up checks and this is the
    /// previous image running again.
    pub fallback_reason: Option<String>,
}

/// Collects the fds of a handover while it is built: each is a duplicate
/// the builder owns, kept open until execve.
#[derive(Default)]
pub struct FdsToPass {
    fds: Vec<OwnedFd>,
}

impl FdsToPass {
    /// Duplicates `fd` for the new image and returns the duplicate's number.
    pub fn pass(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<RawFd> {
        let owned = fd.try_clone_to_owned()?;
        let raw = owned.as_raw_fd();
        self.fds.push(owned);
        Ok(raw)
    }

    /// Clears close-on-exec on every collected fd. Only right just before
    /// execve: from here on, any process this one starts would inherit them.
    pub fn keep_across_exec(&self) -> std::io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        for fd in &self.fds {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
        }
        Ok(())
    }
}

/// A handover taken by the new image: each fd claimed once, as an owned fd.
/// The originals stay here (the numbers the description names) until the
/// agent serves, so a start-up failure can still pass them on unchanged to
/// the fallback image; everything else works on duplicates.
pub struct Inherited {
    pub description: Handover,
    originals: Vec<OwnedFd>,
    by_number: BTreeMap<RawFd, usize>,
}

impl Inherited {
    /// Reads and claims the handover this image was started with, if any.
    pub fn from_env() -> anyhow::Result<Option<Inherited>> {
        let Ok(text) = std::env::var(ENV_VAR) else {
            return Ok(None);
        };
        let description: Handover = serde_json::from_str(&text)
            .with_context(|| format!("{ENV_VAR} is not a handover this agent understands"))?;
        if description.protocol != PROTOCOL {
            anyhow::bail!(
                "handover protocol {} from the previous agent image; this agent speaks {PROTOCOL}",
                description.protocol
            );
        }
        let mut numbers = vec![description.previous_exe_fd, description.installed_exe_fd];
        numbers.extend(&description.grpc_fds);
        numbers.extend(description.health_fd);
        for service in &description.services {
            numbers.extend(service.listeners.iter().map(|(_, fd)| *fd));
        }
        let mut originals = Vec::new();
        let mut by_number = BTreeMap::new();
        for number in numbers {
            let fd = reload_server::inherit::claim_fd(number)
                .with_context(|| format!("taking fd {number} from the previous agent image"))?;
            by_number.insert(number, originals.len());
            originals.push(fd);
        }
        Ok(Some(Inherited {
            description,
            originals,
            by_number,
        }))
    }

    /// A duplicate of inherited fd `number`, owned by the caller.
    pub fn dup(&self, number: RawFd) -> anyhow::Result<OwnedFd> {
        let index = self
            .by_number
            .get(&number)
            .with_context(|| format!("fd {number} is not part of the handover"))?;
        Ok(self.originals[*index].as_fd().try_clone_to_owned()?)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceHandover> {
        self.description.services.iter().find(|s| s.name == name)
    }

    /// The new image failed before serving: re-execute the previous image
    /// with the same handover and the reason. Returns only if that fails.
    pub fn fall_back(self, reason: &str) -> anyhow::Error {
        let exe = match self.dup(self.description.previous_exe_fd) {
            Ok(exe) => exe,
            Err(err) => return err.context("re-executing the previous agent image failed too"),
        };
        let passing = FdsToPass {
            fds: self.originals,
        };
        exec_previous(exe.as_fd(), &self.description, &passing, reason)
    }
}

/// The one way back: re-executes the previous image (by fd: it may have
/// been replaced on disk, by a package upgrade, since it started) with the
/// same handover and `reason` as its `fallback_reason`, so it adopts the
/// same services and reports the failed upgrade. Returns only if that
/// fails too.
pub fn exec_previous(
    previous_exe: BorrowedFd<'_>,
    description: &Handover,
    passing: &FdsToPass,
    reason: &str,
) -> anyhow::Error {
    let mut description = description.clone();
    description.upgrade.fallback_reason = Some(reason.to_string());
    // See crate::signals: nothing may terminate the process between the
    // exec and the handlers of the image that comes back.
    crate::signals::block();
    let result = passing
        .keep_across_exec()
        .map_err(anyhow::Error::new)
        .and_then(|()| exec_in_place(previous_exe, &description));
    match result {
        Ok(never) => match never {},
        Err(err) => err.context("re-executing the previous agent image failed too"),
    }
}

/// Replaces this process's image with the open image `exe` (fexecve: never
/// a path, which another writer could swap; a sealed verified image, the
/// installed binary held since start, or the running one), keeping the
/// pid, the same arguments and environment, plus the handover description.
/// Returns only on failure.
pub fn exec_in_place(
    exe: BorrowedFd<'_>,
    description: &Handover,
) -> anyhow::Result<std::convert::Infallible> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let text = serde_json::to_string(description)?;
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "reload-agent".into());
    let mut args = vec![CString::new(argv0.as_bytes()).context("argv[0] contains NUL")?];
    for arg in &description.args {
        args.push(CString::new(arg.as_bytes()).context("an argument contains NUL")?);
    }
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        if key == ENV_VAR || key == "NOTIFY_SOCKET" {
            continue;
        }
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend(value.as_bytes());
        env.push(CString::new(entry).context("an environment entry contains NUL")?);
    }
    // NOTIFY_SOCKET was taken out of our environment when first read (so
    // services never see it); the next image must still reach systemd.
    if let Some(socket) = reload_server::notify::socket_value() {
        let mut entry = b"NOTIFY_SOCKET=".to_vec();
        entry.extend(socket.as_bytes());
        env.push(CString::new(entry).context("NOTIFY_SOCKET contains NUL")?);
    }
    env.push(CString::new(format!("{ENV_VAR}={text}"))?);
    // A `#!` image is read again by its interpreter through /dev/fd/N
    // after the exec: that fd must survive it.
    let mut magic = [0u8; 2];
    if nix::sys::uio::pread(exe, &mut magic, 0) == Ok(2) && magic == *b"#!" {
        nix::fcntl::fcntl(
            exe,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
    }
    let errno = nix::unistd::fexecve(exe, &args, &env).unwrap_err();
    Err(anyhow::anyhow!("execve failed: {errno}"))
}

/// An fd of the running image, for the description's `previous_exe_fd`.
pub fn open_own_exe() -> std::io::Result<std::fs::File> {
    std::fs::File::open("/proc/self/exe")
}
