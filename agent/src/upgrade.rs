//! `UpgradeAgent`, the agent's in-place self-upgrade: what is checked
//! before the agent commits to re-executing itself, and the execve at the
//! end. What crosses the exec is described in [`crate::handover`].
//!
//! The order matters. Everything that can refuse comes first, while the
//! agent still serves: the artifact is verified like any other (signed for
//! service `reload-agent`), held to the agent's own downgrade floor, and run
//! with `--check` on the current config (it must exit 0 and speak our
//! handover protocol). Then every service's reload lock is taken, so no
//! reload, restart or drain is half-way when the image changes. Only then
//! is the call answered; the gRPC server stops accepting, lets calls in
//! flight finish (bounded), and the main thread execs.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use reload_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::handover::{exec_in_place, Exe, FdsToPass, Handover, UpgradeRecord, PROTOCOL};

/// How long `--check` of a new agent binary may take.
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long calls in flight may run on after the upgrade is answered; the
/// rest are cut by the exec (their clients see UNAVAILABLE and retry).
pub const DRAIN_CALLS_TIMEOUT: Duration = Duration::from_secs(10);

/// What this agent process runs, for GetAgentInfo and the next upgrade.
pub struct AgentImage {
    /// sha256 of /proc/self/exe, hashed at start.
    pub executable_sha256: String,
    /// The image the process was started with (see
    /// [`Handover::installed_exe_fd`]).
    pub installed_exe: OwnedFd,
    pub last_upgrade: Option<pb::AgentUpgradeResult>,
    /// The arguments the agent was first started with: every image runs
    /// with them, so the preflight does too.
    pub args: Vec<String>,
}

impl AgentImage {
    /// Hashes the running executable.
    pub fn hash_own_executable() -> anyhow::Result<String> {
        let mut file = std::fs::File::open("/proc/self/exe")
            .context("cannot open /proc/self/exe to hash the running agent")?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).context("cannot read the running agent binary")?;
        Ok(hex::encode(hasher.finalize()))
    }
}

/// The image to execute.
pub enum Target {
    /// A verified artifact in the store (content-addressed and pinned, so
    /// the path names exactly the verified bytes).
    Artifact(PathBuf),
    /// An image by an open fd: the installed binary (held since the
    /// process started; a rollback), or the running one (a config reload).
    Image(OwnedFd),
}

/// An accepted upgrade, on its way from the handler to the serve loop.
pub struct Accepted {
    pub target: Target,
    pub record: UpgradeRecord,
    /// Every service's reload lock, held until execve.
    pub guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

/// One upgrade at a time, and the channel to the serve loop.
pub struct Upgrades {
    busy: AtomicBool,
    accepted: Mutex<Option<tokio::sync::oneshot::Sender<Accepted>>>,
    pub image: AgentImage,
}

/// Clears the busy flag unless the upgrade went ahead.
pub struct BusyGuard<'a> {
    upgrades: &'a Upgrades,
    armed: bool,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.upgrades.busy.store(false, Ordering::SeqCst);
        }
    }
}

impl Upgrades {
    pub fn new(image: AgentImage, accepted: tokio::sync::oneshot::Sender<Accepted>) -> Upgrades {
        Upgrades {
            busy: AtomicBool::new(false),
            accepted: Mutex::new(Some(accepted)),
            image,
        }
    }

    pub fn in_progress(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    pub fn begin(&self) -> Result<BusyGuard<'_>, Status> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(Status::aborted(
                "an upgrade of this agent is already in progress; wait for it (reloadctl status shows the agent's pid and version)",
            ));
        }
        Ok(BusyGuard {
            upgrades: self,
            armed: true,
        })
    }

    /// Hands the accepted upgrade to the serve loop. After this the agent
    /// re-executes; the busy flag stays set.
    pub fn commit(&self, mut busy: BusyGuard<'_>, accepted: Accepted) -> Result<(), Status> {
        let sender = self
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Status::aborted("this agent is already stopping or upgrading"))?;
        sender
            .send(accepted)
            .map_err(|_| Status::aborted("this agent is stopping"))?;
        busy.armed = false;
        Ok(())
    }
}

/// Runs `program <the agent's arguments> --check` and requires exit 0 and
/// our handover protocol in what it prints: a binary that cannot start,
/// does not take these arguments, cannot read this config (and its TLS
/// files), or cannot take over this agent's state is refused while the
/// agent still runs.
pub async fn preflight(program: &Path, args: &[String]) -> Result<(), Status> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .arg("--check")
        .env_remove(crate::handover::ENV_VAR)
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let failed = |what: String| {
        Status::failed_precondition(format!(
            "the new agent binary failed its preflight (`{} --check`): {what}; the running agent is unchanged",
            args.join(" ")
        ))
    };
    let output = tokio::time::timeout(PREFLIGHT_TIMEOUT, command.output())
        .await
        .map_err(|_| {
            failed(format!(
                "it did not finish within {}",
                humantime::format_duration(PREFLIGHT_TIMEOUT)
            ))
        })?
        .map_err(|err| failed(format!("it could not be run: {err}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(failed(format!(
            "{}; stderr: {}",
            crate::supervisor::describe_exit(output.status),
            tail(stderr.trim(), 400)
        )));
    }
    let expected = format!("handover protocol {PROTOCOL}");
    if !stdout.lines().any(|line| line.trim() == expected) {
        return Err(failed(format!(
            "it does not print {expected:?}, so it cannot take over this agent's services and sockets; upgrade through a release that speaks protocol {PROTOCOL}"
        )));
    }
    Ok(())
}

fn tail(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Everything the main thread needs to re-execute the agent.
pub struct UpgradeExec {
    pub target: Target,
    pub previous_exe: OwnedFd,
    pub description: Handover,
    pub fds: FdsToPass,
    /// Held to the exec: no reload starts meanwhile.
    pub guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
    /// Set by SIGTERM/SIGINT after the upgrade was accepted.
    pub stop_request: crate::signals::StopRequest,
}

impl UpgradeExec {
    /// Re-executes into the new image; if execve itself fails, into the
    /// previous image with the same handover. Returns only if both fail.
    pub fn exec(mut self) -> anyhow::Error {
        // From here the signals wait for the next image's handlers (see
        // crate::signals); a stop already asked for travels with it.
        crate::signals::block();
        self.description.pending_stop = self.stop_request.is_set();
        if let Err(err) = self.fds.keep_across_exec() {
            return anyhow::Error::new(err).context("cannot pass the agent's fds across exec");
        }
        // systemd shows the unit as reloading until the new image's READY=1.
        let monotonic_usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        let _ = reload_server::notify::notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS=re-executing in place into {} {}",
            self.description.upgrade.to_version, self.description.upgrade.to_sha256
        ));
        let failure = match &self.target {
            Target::Artifact(path) => exec_in_place(Exe::Path(path), &self.description),
            Target::Image(fd) => exec_in_place(Exe::Fd(fd.as_fd()), &self.description),
        }
        .unwrap_err();
        tracing::error!(error = %format!("{failure:#}"), "execve of the new agent image failed; re-executing the previous image");
        let mut description = self.description.clone();
        description.upgrade.fallback_reason =
            Some(format!("execve of the new image failed: {failure:#}"));
        match exec_in_place(Exe::Fd(self.previous_exe.as_fd()), &description) {
            Ok(never) => match never {},
            Err(err) => err.context("re-executing the previous agent image failed too"),
        }
    }
}
