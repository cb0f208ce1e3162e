//! The agent's in-place upgrade as the CLI drives it over gRPC
//! (`push --agent` and its revert): ask, then follow the agent through its
//! re-exec until the new image answers, telling a refusal from a fallback
//! from a call that was merely cut. Used by [`super::grpc_fleet`] only.

use std::time::{Duration, Instant};

use reload_proto::v1 as pb;
use tonic::transport::Channel;
use tonic::Code;

use super::causes::cause_of;
use super::journal::Cause;

/// How long an agent's in-place upgrade may take, from the call to the new
/// image answering: the preflight (30 s at most), the longest drain of a
/// reload in progress, the drain of calls in flight and the exec.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(300);

/// GetAgentInfo, bounded.
pub async fn agent_info(channel: Channel) -> Result<pb::GetAgentInfoResponse, (Cause, String)> {
    tokio::time::timeout(
        Duration::from_secs(10),
        super::small_calls::get_agent_info(channel),
    )
    .await
    .map_err(|_| (Cause::Unreachable, "no answer within 10s".to_string()))?
    .map(|r| r.into_inner())
    .map_err(|s| (cause_of(&s), format!("agent info: {}", s.message())))
}

/// Asks the agent to upgrade itself in place (to `sha256`, or with `None`
/// back to the agent it ran before), then waits for the new image to
/// answer and say how it went. Returns the agent's pid and what it runs.
///
/// The agent carries an accepted upgrade through even if this call is cut
/// (a slow preflight, a network blip), and may be busy with another
/// re-exec (a SIGHUP config reload, or this CLI's own call from before it
/// was resumed). So: a refusal ends it; "already in progress" and a cut
/// call wait for the agent to be idle, then look at what it runs and ask
/// again only if the change did not happen.
pub async fn upgrade_agent(
    channel: Channel,
    sha256: Option<&str>,
    lease: pb::LeaseRef,
    allow_downgrade: bool,
) -> Result<(u32, String), (Cause, String)> {
    let deadline = Instant::now() + UPGRADE_TIMEOUT;
    let before = agent_info(channel.clone()).await?;
    let done = |info: &pb::GetAgentInfoResponse| match sha256 {
        Some(sha) => info.executable_sha256 == sha,
        None => info.executable_sha256 != before.executable_sha256,
    };
    if sha256.is_some() && done(&before) {
        return Ok((before.pid, running(&before)));
    }
    loop {
        let mut agent = pb::agent_service_client::AgentServiceClient::new(channel.clone());
        let request = pb::UpgradeAgentRequest {
            sha256: sha256.unwrap_or_default().to_string(),
            lease: Some(lease.clone()),
            allow_downgrade,
            rollback: sha256.is_none(),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::time::timeout(left, agent.upgrade_agent(request)).await;
        let refusal = match answer {
            Ok(Ok(_)) => None,
            Ok(Err(status)) if cause_of(&status) == Cause::Superseded => {
                Some((Cause::Superseded, status.message().to_string()))
            }
            Ok(Err(status)) => match status.code() {
                Code::Aborted if status.message().contains("already in progress") => None,
                Code::AlreadyExists => None,
                Code::Aborted | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument => {
                    Some((Cause::Rejected, status.message().to_string()))
                }
                Code::FailedPrecondition => {
                    Some((Cause::ReloadFailed, status.message().to_string()))
                }
                // Transport trouble: the call may or may not have landed.
                _ => None,
            },
            Err(_) => None,
        };
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        // Accepted, busy, or unknown: wait until no re-exec is under way,
        // then see what runs.
        let info = wait_until_idle(&channel, &before, deadline).await?;
        if done(&info) {
            return Ok((info.pid, running(&info)));
        }
        let fresh = info.started != before.started;
        if let Some(last) = info.last_upgrade.as_ref().filter(|_| fresh) {
            let ours = !last.config_reload
                && last.from_sha256 == before.executable_sha256
                && sha256.is_none_or(|sha| last.to_sha256 == sha);
            if ours && last.outcome == pb::AgentUpgradeOutcome::FellBack as i32 {
                return Err((
                    Cause::ReloadFailed,
                    format!(
                        "the new agent image did not start, the previous one runs again: {}",
                        last.reason
                    ),
                ));
            }
        }
        if Instant::now() >= deadline {
            return Err((
                Cause::Unreachable,
                format!(
                    "the agent did not complete its upgrade within {}",
                    humantime::format_duration(UPGRADE_TIMEOUT)
                ),
            ));
        }
        // Not done and not failed (the call never landed, or another
        // re-exec was in the way): ask again.
    }
}

/// What an agent runs, for people: its release, or the installed build.
fn running(info: &pb::GetAgentInfoResponse) -> String {
    if info.artifact_version.is_empty() {
        format!("{} (installed)", info.agent_version)
    } else {
        info.artifact_version.clone()
    }
}

/// Polls GetAgentInfo until the agent answers with no re-exec under way
/// (the old image answers until it execs, the new one once it serves).
async fn wait_until_idle(
    channel: &Channel,
    before: &pb::GetAgentInfoResponse,
    deadline: Instant,
) -> Result<pb::GetAgentInfoResponse, (Cause, String)> {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(info) = agent_info(channel.clone()).await {
            if info.pid != before.pid {
                return Err((
                    Cause::ReloadFailed,
                    format!(
                        "the agent restarted during its upgrade (pid {} is now {})",
                        before.pid, info.pid
                    ),
                ));
            }
            if !info.upgrade_in_progress {
                return Ok(info);
            }
        }
        if Instant::now() >= deadline {
            return Err((
                Cause::Unreachable,
                format!(
                    "the agent did not come back from its upgrade within {}",
                    humantime::format_duration(UPGRADE_TIMEOUT)
                ),
            ));
        }
    }
}
