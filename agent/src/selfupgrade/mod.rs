//! The agent's in-place self-upgrade (`UpgradeAgent`, and SIGHUP's config
//! reload, which is the same re-exec into the running image): the only code
//! that executes the agent. What crosses the exec is described in
//! [`crate::handover`].
//!
//! The order matters. Everything that can refuse comes first, while the
//! agent still serves: the artifact is verified like any other (signed for
//! service `reload-agent`), held to the agent's own downgrade floor, and run
//! with `--check` on the current config (it must exit 0 and speak our
//! handover protocol). Then every service's reload lock is taken, so no
//! reload, restart or drain is half-way when the image changes. Only then
//! is the call answered; the gRPC server stops accepting, lets calls in
//! flight finish (bounded), and the main thread execs.
//!
//! Layout: [`plan`] decides what to run and checks it ([`SelfUpgrade`]);
//! [`versions`] keeps the agent's own release history and downgrade floor;
//! [`exec`] is the execve and the single fallback rule; this file holds
//! the hand-off from an accepted call to the serve loop ([`Upgrades`]).

mod exec;
mod plan;
mod versions;

pub use exec::{fall_back_or, UpgradeExec};
pub use plan::SelfUpgrade;
pub use versions::AgentVersions;

pub use crate::handover::AGENT_SERVICE;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use reload_proto::v1 as pb;

use crate::handover::UpgradeRecord;

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
        let (sha256, _) =
            reload_artifact::verify::hash_file(std::path::Path::new("/proc/self/exe"))
                .context("cannot read /proc/self/exe to hash the running agent")?;
        Ok(sha256)
    }
}

/// The image to execute.
pub enum Target {
    /// An image by an open fd: a verified agent artifact in a sealed memfd,
    /// the installed binary (held since the process started; a rollback),
    /// or the running one (a config reload). Never a path another writer
    /// could swap.
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

    pub fn begin(&self) -> Result<BusyGuard<'_>, UpgradeError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(UpgradeError::InProgress);
        }
        Ok(BusyGuard {
            upgrades: self,
            armed: true,
        })
    }

    /// Hands the accepted upgrade to the serve loop. After this the agent
    /// re-executes; the busy flag stays set.
    pub fn commit(&self, mut busy: BusyGuard<'_>, accepted: Accepted) -> Result<(), UpgradeError> {
        let sender = self
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(UpgradeError::Stopping(
                "this agent is already stopping or upgrading",
            ))?;
        sender
            .send(accepted)
            .map_err(|_| UpgradeError::Stopping("this agent is stopping"))?;
        busy.armed = false;
        Ok(())
    }
}

/// Why an upgrade (or a config reload) was refused; the running agent is
/// unchanged whenever one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade of this agent is already in progress; wait for it (reloadctl status shows the agent's pid and version)")]
    InProgress,
    #[error("{0}")]
    Stopping(&'static str),
    #[error("UpgradeAgent takes either `sha256` or `rollback`, not both")]
    BothTargets,
    #[error("UpgradeAgent needs `sha256`: a stored artifact signed for service \"reload-agent\" (reloadctl upload it first)")]
    NoTarget,
    #[error(
        "this agent runs the binary it was installed with and has no earlier agent to roll back to"
    )]
    NothingToRollBackTo,
    #[error("this agent already runs {version} (sha256 {sha256}); to re-read its config, send it SIGHUP (systemctl reload reload-agent)")]
    AlreadyRunning { version: String, sha256: String },
    #[error("the new agent binary failed its preflight (`{args} --check`): {what}; the running agent is unchanged")]
    Preflight { args: String, what: String },
    #[error(transparent)]
    Artifact(#[from] crate::store::ArtifactRejected),
    #[error(transparent)]
    Downgrade(#[from] crate::state::DowngradeRefused),
    #[error(transparent)]
    Services(#[from] crate::services::ServiceError),
    #[error(transparent)]
    Fenced(#[from] crate::lease::LeaseError),
    /// The agent's own files or fds failed it (/proc/self/exe, a dup).
    #[error("{0}")]
    Internal(String),
}
