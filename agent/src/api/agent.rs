//! `AgentService`: what this agent process runs, and `UpgradeAgent`, its
//! in-place self-upgrade (the work is in [`crate::selfupgrade`]).

use reload_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::auth::{audit_result, Right};
use super::AgentApi;
use crate::lease::{CallerFence, Fence};

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn get_agent_info(
        &self,
        request: Request<pb::GetAgentInfoRequest>,
    ) -> Result<Response<pb::GetAgentInfoResponse>, Status> {
        self.check_read(&request, "GetAgentInfo")?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let limits = &self.config.limits;
        Ok(Response::new(pb::GetAgentInfoResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname,
            pid: std::process::id(),
            started: Some(self.started.into()),
            limits: Some(pb::Limits {
                max_artifact_bytes: limits.max_artifact_bytes,
                max_chunk_bytes: limits.max_chunk_bytes,
            }),
            trusted_key_ids: self.config.trusted_keys.ids(),
            services: self
                .config
                .services
                .iter()
                .map(|s| s.name.clone())
                .collect(),
            keep_versions: self.config.keep_versions as u32,
            executable_sha256: self.selfupgrade.image().executable_sha256.clone(),
            artifact_version: self.selfupgrade.running_artifact_version(),
            last_upgrade: self.selfupgrade.image().last_upgrade.clone(),
            upgrade_in_progress: self.selfupgrade.in_progress(),
        }))
    }

    async fn upgrade_agent(
        &self,
        request: Request<pb::UpgradeAgentRequest>,
    ) -> Result<Response<pb::UpgradeAgentResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "UpgradeAgent");
        let request = request.into_inner();
        // To the end, and audited, even if the caller goes away (see
        // Activate).
        let api = self.clone();
        tokio::spawn(async move {
            let sha256 = request.sha256.clone();
            let result = async {
                allowed?;
                let fence = CallerFence::new(api.leases.clone(), request.lease.clone());
                drop(fence.hold()?);
                Ok(api.selfupgrade.upgrade(request, &fence).await?)
            }
            .await;
            let version = result
                .as_ref()
                .map(|r| r.new_version.clone())
                .unwrap_or_default();
            let sha256 = result
                .as_ref()
                .map(|r| r.new_sha256.clone())
                .unwrap_or(sha256);
            api.audit(
                &identity,
                "UpgradeAgent",
                crate::selfupgrade::AGENT_SERVICE,
                &version,
                &sha256,
                audit_result(&result),
            );
            result.map(Response::new)
        })
        .await
        .map_err(|err| Status::internal(format!("the upgrade task failed: {err}")))?
    }
}
