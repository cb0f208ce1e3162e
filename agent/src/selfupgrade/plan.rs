//! [`SelfUpgrade`]: what an `UpgradeAgent` call (or SIGHUP) runs, in the
//! order of the module docs: pick the target (a stored agent artifact, or
//! for a rollback past the first upgraded image, the installed binary),
//! verify it like any artifact, hold it to the agent's own downgrade floor,
//! preflight it with `--check`, take every service's reload lock, and hand
//! the accepted upgrade to the serve loop. Any refusal leaves the running
//! agent exactly as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reload_proto::v1 as pb;

use super::{
    Accepted, AgentVersions, BusyGuard, Target, UpgradeError, Upgrades, AGENT_SERVICE,
    PREFLIGHT_TIMEOUT,
};
use crate::events::EventFields;
use crate::handover::{UpgradeRecord, PROTOCOL};
use crate::lease::{Fence, UNFENCED};
use crate::services::{run_preflight, PreflightFailure, Services};
use crate::store::ArtifactVerifier;

/// See the module docs.
pub struct SelfUpgrade {
    upgrades: Upgrades,
    versions: AgentVersions,
    verifier: Arc<ArtifactVerifier>,
    services: Arc<Services>,
    /// How long to wait for reloads and drains in progress before the
    /// exec: the longest drain timeout, plus the SIGKILL and reap.
    quiesce_bound: Duration,
}

impl SelfUpgrade {
    pub fn new(
        upgrades: Upgrades,
        versions: AgentVersions,
        verifier: Arc<ArtifactVerifier>,
        services: Arc<Services>,
        longest_drain: Duration,
    ) -> SelfUpgrade {
        SelfUpgrade {
            upgrades,
            versions,
            verifier,
            services,
            quiesce_bound: longest_drain + Duration::from_secs(5),
        }
    }

    pub fn image(&self) -> &super::AgentImage {
        &self.upgrades.image
    }

    pub fn in_progress(&self) -> bool {
        self.upgrades.in_progress()
    }

    /// The version of the agent artifact this process runs, if it runs one.
    pub fn running_artifact_version(&self) -> String {
        self.versions
            .running(&self.upgrades.image.executable_sha256)
    }

    fn running_version(&self) -> String {
        match self.running_artifact_version() {
            v if v.is_empty() => format!("{} (installed)", env!("CARGO_PKG_VERSION")),
            v => v,
        }
    }

    /// `UpgradeAgent`, once the caller's right and lease were checked.
    pub async fn upgrade(
        &self,
        request: pb::UpgradeAgentRequest,
        fence: &dyn Fence,
    ) -> Result<pb::UpgradeAgentResponse, UpgradeError> {
        let busy = self.upgrades.begin()?;
        let running_sha = self.upgrades.image.executable_sha256.clone();
        let mut record = UpgradeRecord {
            from_version: self.running_version(),
            from_sha256: running_sha.clone(),
            rollback: request.rollback,
            ..Default::default()
        };
        let (target, preflight_path) = if request.rollback {
            if !request.sha256.is_empty() {
                return Err(UpgradeError::BothTargets);
            }
            self.rollback_target(&mut record).await?
        } else {
            if request.sha256.is_empty() {
                return Err(UpgradeError::NoTarget);
            }
            let (artifact, image) = self.sealed_target(&request.sha256).await?;
            self.versions
                .get()
                .check_floor(&artifact.manifest, request.allow_downgrade)?;
            record.to_version = artifact.manifest.version.clone();
            record.to_sha256 = artifact.manifest.sha256.clone();
            image
        };
        if record.to_sha256 == running_sha {
            return Err(UpgradeError::AlreadyRunning {
                version: record.to_version,
                sha256: running_sha,
            });
        }
        self.reexec(busy, target, preflight_path, record, fence)
            .await
    }

    /// An agent artifact verified into a sealed image (see
    /// [`crate::store::SealedImage`]): the preflight and the exec run that
    /// fd, never the store's path, so the bytes that become the agent are
    /// the bytes that were verified.
    async fn sealed_target(
        &self,
        sha256: &str,
    ) -> Result<(crate::store::StoredArtifact, (Target, PathBuf)), UpgradeError> {
        let (artifact, image) = self
            .verifier
            .sealed(sha256, Some(AGENT_SERVICE), crate::store::Admission::New)
            .await?;
        let fd = image.try_clone_fd().map_err(|e| {
            UpgradeError::Internal(format!("cannot duplicate the sealed agent image: {e}"))
        })?;
        let path = fd_path(&fd);
        Ok((artifact, (Target::Image(fd), path)))
    }

    /// What a rollback runs: the previous agent release, or past the first
    /// upgraded image, the installed binary (held open since start).
    async fn rollback_target(
        &self,
        record: &mut UpgradeRecord,
    ) -> Result<(Target, PathBuf), UpgradeError> {
        let versions = self.versions.get();
        let image = &self.upgrades.image;
        if let Some(previous) = versions.previous() {
            let (artifact, image) = self.sealed_target(&previous.sha256).await?;
            record.to_version = artifact.manifest.version.clone();
            record.to_sha256 = artifact.manifest.sha256.clone();
            return Ok(image);
        }
        if versions
            .current
            .as_ref()
            .is_none_or(|c| c.sha256 != image.executable_sha256)
        {
            return Err(UpgradeError::NothingToRollBackTo);
        }
        let fd = image.installed_exe.try_clone().map_err(|e| {
            UpgradeError::Internal(format!("cannot duplicate the installed image's fd: {e}"))
        })?;
        let path = fd_path(&image.installed_exe);
        record.to_version = "installed".into();
        record.to_sha256 = hash_path(&path).await?;
        record.to_installed = true;
        Ok((Target::Image(fd), path))
    }

    /// SIGHUP: re-executes the running image in place, so the agent reads
    /// its config again without touching its services. The new config is
    /// checked first (`--check`); a config that does not load leaves the
    /// agent as it is.
    pub async fn reload_config(&self) -> Result<pb::UpgradeAgentResponse, UpgradeError> {
        let busy = self.upgrades.begin()?;
        let running_sha = self.upgrades.image.executable_sha256.clone();
        let version = self.running_version();
        let image: std::os::fd::OwnedFd = crate::handover::open_own_exe()
            .map_err(|e| UpgradeError::Internal(format!("cannot open /proc/self/exe: {e}")))?
            .into();
        let path = fd_path(&image);
        let record = UpgradeRecord {
            from_version: version.clone(),
            from_sha256: running_sha.clone(),
            to_version: version,
            to_sha256: running_sha,
            to_installed: self.running_artifact_version().is_empty(),
            config_reload: true,
            ..Default::default()
        };
        self.reexec(busy, Target::Image(image), path, record, UNFENCED)
            .await
    }

    /// The part every in-place re-exec shares: preflight, quiesce, answer.
    async fn reexec(
        &self,
        busy: BusyGuard<'_>,
        target: Target,
        preflight_path: PathBuf,
        record: UpgradeRecord,
        fence: &dyn Fence,
    ) -> Result<pb::UpgradeAgentResponse, UpgradeError> {
        let events = self.services.events();
        events.emit(
            pb::EventKind::Preflight,
            EventFields {
                service: AGENT_SERVICE,
                version: &record.to_version,
                sha256: &record.to_sha256,
                pid: std::process::id(),
                message: format!("preflight of agent {}: --check", record.to_version),
            },
        );
        preflight(&preflight_path, &self.upgrades.image.args).await?;
        // No reload, restart or drain may be half-way at the exec.
        let guards = self.services.quiesce(self.quiesce_bound).await?;
        let response = pb::UpgradeAgentResponse {
            previous_version: record.from_version.clone(),
            new_version: record.to_version.clone(),
            pid: std::process::id(),
            new_sha256: record.to_sha256.clone(),
        };
        // The commit point: a rollout taken over during the preflight or
        // the quiesce does not get to replace the agent. Held to the
        // commit, so no lease is granted in between.
        let hold = fence.hold()?;
        tracing::info!(token = hold.token, to = %record.to_version, "agent upgrade committed under fencing token");
        events.emit(
            pb::EventKind::AgentUpgrading,
            EventFields {
                service: AGENT_SERVICE,
                version: &record.to_version,
                sha256: &record.to_sha256,
                pid: std::process::id(),
                message: format!(
                    "re-executing in place: {} -> {}",
                    response.previous_version, response.new_version
                ),
            },
        );
        self.upgrades.commit(
            busy,
            Accepted {
                target,
                record,
                guards,
            },
        )?;
        drop(hold);
        Ok(response)
    }
}

/// Runs `program <the agent's arguments> --check` and requires exit 0 and
/// our handover protocol in what it prints: a binary that cannot start,
/// does not take these arguments, cannot read this config (and its TLS
/// files), or cannot take over this agent's state is refused while the
/// agent still runs.
async fn preflight(program: &Path, args: &[String]) -> Result<(), UpgradeError> {
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .arg("--check")
        .env_remove(crate::handover::ENV_VAR)
        .env_remove("NOTIFY_SOCKET");
    let failed = |what: String| UpgradeError::Preflight {
        args: args.join(" "),
        what,
    };
    let output =
        run_preflight(command, PREFLIGHT_TIMEOUT)
            .await
            .map_err(|failure| match failure {
                PreflightFailure::TimedOut(_) => failed(format!("it {failure}")),
                PreflightFailure::CouldNotRun(err) => failed(format!("it could not be run: {err}")),
                PreflightFailure::Failed { .. } => failed(failure.to_string()),
            })?;
    let expected = format!("handover protocol {PROTOCOL}");
    if !String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.trim() == expected)
    {
        return Err(failed(format!(
            "it does not print {expected:?}, so it cannot take over this agent's services and sockets; upgrade through a release that speaks protocol {PROTOCOL}"
        )));
    }
    Ok(())
}

/// A path that opens exactly the file behind `fd`, for programs that take
/// a path (the preflight).
fn fd_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(fd)
    ))
}

/// sha256 of a file, off the async threads.
async fn hash_path(path: &Path) -> Result<String, UpgradeError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || reload_artifact::verify::hash_file(&path))
        .await
        .map_err(|e| UpgradeError::Internal(e.to_string()))?
        .map(|(sha256, _)| sha256)
        .map_err(|e| UpgradeError::Internal(format!("cannot hash the installed agent binary: {e}")))
}
