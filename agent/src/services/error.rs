//! Why a call on a service was refused before anything started. A reload
//! that ran is not an error: it reports its outcome in its `ReloadResult`.

use reload_proto::v1 as pb;

use crate::lease::LeaseError;
use crate::state::DowngradeRefused;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("this agent has no service named {name:?}; its config declares {declared:?}")]
    Unknown { name: String, declared: Vec<String> },
    #[error("this agent holds no artifact with sha256 {0}; upload it first (reloadctl upload)")]
    ArtifactNotStored(String),
    /// The sha256 could not be looked up (malformed, or the store failed).
    #[error("{0}")]
    Lookup(StoreError),
    #[error("artifact {sha256} is {service} {version}, not an artifact of service {wanted:?}")]
    WrongService {
        sha256: String,
        service: String,
        version: String,
        wanted: String,
    },
    #[error("a reload of {0:?} is already running; wait for it to finish (reloadctl status)")]
    ReloadRunning(String),
    #[error("the previous reload of {name:?} did not finish within {bound}")]
    PreviousReloadStuck { name: String, bound: String },
    #[error("service {0:?} has no previous version to roll back to")]
    NoPreviousVersion(String),
    /// The agent is about to re-execute itself and waits for reloads and
    /// drains to end first.
    #[error("service {name:?} is still reloading or draining after {bound}; upgrade the agent when it is done")]
    StillReloading { name: String, bound: String },
    #[error(transparent)]
    Downgrade(#[from] DowngradeRefused),
    /// The caller's lease no longer holds (checked under the reload lock).
    #[error(transparent)]
    Fenced(LeaseError),
    #[error("{0}")]
    Task(String),
}

/// Why a start or reload did not produce a ready process.
pub(super) struct StartFailure {
    pub(super) outcome: pb::ReloadOutcome,
    pub(super) reason: String,
    pub(super) new_pid: u32,
}

impl StartFailure {
    pub(super) fn new(outcome: pb::ReloadOutcome, reason: impl Into<String>) -> StartFailure {
        StartFailure {
            outcome,
            reason: reason.into(),
            new_pid: 0,
        }
    }
}
