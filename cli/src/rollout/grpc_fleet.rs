//! The real [`Fleet`]: the agents over tonic.
//!
//! Every call is bounded by a timeout, and gRPC statuses become a
//! [`Cause`] here and nowhere else: transport trouble means the agent could
//! not be reached, anything the agent said itself is a refusal. A service
//! rollout activates and rolls back a service; an agent rollout
//! (`push --agent`) has each agent upgrade itself in place
//! ([`super::agent_upgrade`]) and gates on every service it runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reload_artifact::envelope_path_for;
use reload_proto::v1 as pb;
use tonic::transport::Channel;
use tonic::Code;

use super::agent_upgrade::{agent_info, upgrade_agent, UPGRADE_TIMEOUT};
use super::causes::cause_of;
use super::fleet::{
    Activated, FenceState, Fleet, HealthChanges, HostFailure, Lease, LeaseGrant, LeaseRefusal,
    Probe, Staged, LEASE_TTL,
};
use super::journal::Cause;
use super::output::LiveView;
use super::peer_tree::{PeerTree, Turn};
use super::ranked_slots::RankedSlots;
use super::small_calls;
use crate::client::upload;

/// What the fleet is moved to; fixed at plan time.
#[derive(Clone, Debug)]
pub struct Target {
    /// The service, or [`super::project::AGENT_SERVICE`] for an agent
    /// rollout.
    pub service: String,
    pub version: String,
    pub sha256: String,
    /// The signed release, its envelope beside it.
    pub artifact: PathBuf,
    /// `push --allow-downgrade`: the operator accepts going below the
    /// agents' downgrade floor.
    pub allow_downgrade: bool,
    /// Where the agents fetch the release (FetchArtifact); `None`: upload.
    pub fetch_url: Option<String>,
    /// `[rollout] peer_fetch`: the degree of the peer tree; 0: off.
    pub peer_fetch: usize,
}

impl Target {
    /// An agent rollout: each host's agent upgrades itself in place
    /// (UpgradeAgent) instead of activating a service.
    pub fn agent(&self) -> bool {
        self.service == super::project::AGENT_SERVICE
    }
}

pub struct GrpcFleet {
    target: Arc<Target>,
    /// One lazily connected channel per host, by its `host:port`.
    channels: HashMap<String, Channel>,
    /// Where the agents' activation steps are shown.
    live: Arc<LiveView>,
    /// With `peer_fetch`: who stages from whom.
    peer_tree: Option<Arc<PeerTree>>,
    /// Uploads from this process at once (see [`MAX_CONCURRENT_UPLOADS`]).
    uploads: Arc<tokio::sync::Semaphore>,
    /// Staging's "what does the host run?" calls at once, lowest rank
    /// first (see [`STAGING_STATUS_CHECKS`]).
    status_checks: Arc<RankedSlots>,
}

/// Hosts asked at once what they run before being staged. The engine
/// starts every host's staging at once; without this, a thousand status
/// calls answer in whatever order the machine schedules them, and the
/// hosts reach the upload slots and the peer tree in that order, so the
/// next wave's hosts wait behind later waves' (measured at 1,000 hosts:
/// the second wave waited 3 to 8 s for its staging). Slots go to the
/// lowest rank (wave order) waiting, and the calls are short, so 64 at
/// once still keeps any tree or uplink busy.
pub(super) const STAGING_STATUS_CHECKS: usize = 64;

/// Uploads the CLI runs at once, whatever `max_parallel`: a few streams
/// fill the uplink of one machine, and each upload in flight holds up to
/// an agent's flow-control window (8 MiB) of the release in this process,
/// so 50 at once cost 185 MiB of memory and no time.
const MAX_CONCURRENT_UPLOADS: usize = 4;

fn failure((cause, message): (Cause, String)) -> HostFailure {
    HostFailure { cause, message }
}

/// While a host's activation runs on the agent, its steps (verifying,
/// preflight, spawning, ready, probation check n/N) become the host's
/// phase in the live view: the activation waits for them, and a person
/// should see why. `None` if the agent does not let us watch.
async fn activation_progress(
    channel: Channel,
    host: &str,
    service: &str,
    live: Arc<LiveView>,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut events = small_calls::server_streaming::<_, pb::Event>(
        channel,
        "/reload.v1.ServiceControl/WatchEvents",
        pb::WatchEventsRequest {
            service: service.to_string(),
        },
    )
    .await
    .ok()?
    .into_inner();
    let host = host.to_string();
    Some(tokio::spawn(async move {
        use pb::EventKind as K;
        while let Ok(Some(event)) = events.message().await {
            let kind = pb::EventKind::try_from(event.kind).unwrap_or_default();
            let step = match kind {
                K::Verifying | K::Spawning | K::Ready | K::Draining => "activating",
                K::Preflight => "preflight",
                K::Probation => "probation",
                _ => continue,
            };
            // Agent messages already name the step ("probation of 1.1.0:
            // check 1/2 passed"); only prefix those that do not.
            if event.message.starts_with(step) {
                live.phase(&host, &event.message);
            } else {
                live.phase(&host, &format!("{step}: {}", event.message));
            }
        }
    }))
}

fn pb_lease(lease: &Lease) -> pb::LeaseRef {
    pb::LeaseRef {
        rollout_id: lease.rollout.clone(),
        generation: lease.generation,
        token: lease.token,
    }
}

impl GrpcFleet {
    /// Channels connect on first use, so an unreachable host fails its own
    /// calls and not the construction.
    pub fn new(target: Target, hosts: &[String], live: Arc<LiveView>) -> anyhow::Result<GrpcFleet> {
        let channels = hosts
            .iter()
            .map(|h| Ok((h.clone(), crate::client::endpoint(h)?.connect_lazy())))
            .collect::<anyhow::Result<_>>()?;
        let peer_tree = (target.peer_fetch > 0).then(|| PeerTree::new(target.peer_fetch));
        Ok(GrpcFleet {
            target: Arc::new(target),
            channels,
            live,
            peer_tree,
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS)),
            status_checks: RankedSlots::new(STAGING_STATUS_CHECKS),
        })
    }

    fn channel(&self, host: &str) -> Channel {
        self.channels
            .get(host)
            .expect("the engine only names planned hosts")
            .clone()
    }

    /// Gets the release onto the host: from hosts that hold it already
    /// (`peer_fetch`, see [`PeerTree`]), else as [`Self::stage_directly`].
    async fn upload_release(&self, host: &str, rank: u64) -> Result<Staged, HostFailure> {
        let envelope = std::fs::read(envelope_path_for(&self.target.artifact))
            .map_err(|e| HostFailure::new(Cause::Rejected, e.to_string()))?;
        let Some(tree) = &self.peer_tree else {
            return self.stage_directly(host, envelope).await;
        };
        let ticket = tree.turn(host, rank).await;
        let peers = match &ticket.turn {
            Turn::Seed => {
                let staged = self.stage_directly(host, envelope).await?;
                tree.holds(host);
                return Ok(staged);
            }
            Turn::Fetch(peers) => peers.clone(),
        };
        self.live
            .phase(host, &format!("staging: fetching from peer {}", peers[0]));
        match self.fetch_release(host, envelope.clone(), peers).await {
            Ok(staged) => {
                tree.holds(host);
                Ok(staged)
            }
            Err(failure) => {
                // Its place under the peer is free again before the upload.
                drop(ticket);
                self.live.println(&format!(
                    "{host}: the peer fetch failed ({}); sending it the release directly",
                    failure.message
                ));
                let staged = self.stage_directly(host, envelope).await?;
                tree.holds(host);
                Ok(staged)
            }
        }
    }

    /// Uploads the release unless the host has it, or has the host fetch
    /// it from the repository (`artifact_url`).
    async fn stage_directly(&self, host: &str, envelope: Vec<u8>) -> Result<Staged, HostFailure> {
        let target = &self.target;
        if target.fetch_url.is_some() {
            return self.fetch_release(host, envelope, Vec::new()).await;
        }
        let _slot = self.uploads.acquire().await;
        let outcome = upload(
            host,
            self.channel(host),
            &target.artifact,
            envelope,
            &target.sha256,
            false,
        )
        .await
        .map_err(|e| {
            let text = format!("{e:#}");
            // An agent that went away mid-upload is unreachable, not a
            // refusal: the connection broke below gRPC.
            let cause = if text.contains("cannot reach")
                || text.contains("Unavailable")
                || text.contains("failed in transport")
            {
                Cause::Unreachable
            } else {
                Cause::Rejected
            };
            HostFailure::new(cause, text)
        })?;
        Ok(Staged::Uploaded {
            bytes_sent: outcome.bytes_sent,
        })
    }

    /// FetchArtifact: the host takes the bytes from `peers` (in order),
    /// then from the repository (`artifact_url`, if set); only the envelope
    /// leaves this process.
    async fn fetch_release(
        &self,
        host: &str,
        envelope: Vec<u8>,
        peers: Vec<String>,
    ) -> Result<Staged, HostFailure> {
        let sent = envelope.len() as u64;
        let url = self.target.fetch_url.clone().unwrap_or_default();
        let from = peers
            .first()
            .map(|peer| format!("peer {peer}"))
            .unwrap_or_else(|| url.clone());
        let answer = small_calls::unary::<_, pb::UploadArtifactResponse>(
            self.channel(host),
            "/reload.v1.ArtifactService/FetchArtifact",
            pb::FetchArtifactRequest {
                envelope,
                url,
                peers,
            },
        )
        .await
        .map_err(|s| {
            HostFailure::new(
                cause_of(&s),
                format!("fetching from {from} ({:?}): {}", s.code(), s.message()),
            )
        })?
        .into_inner();
        if !answer.skipped_sources.is_empty() {
            self.live.println(&format!(
                "{host}: fetched from {} after skipping {}",
                answer.source,
                answer.skipped_sources.join("; ")
            ));
        }
        Ok(Staged::Uploaded {
            bytes_sent: if answer.already_present { 0 } else { sent },
        })
    }

    /// A service rollout's poll: the new process `pid` is current, running
    /// and healthy.
    async fn probe_service(&self, host: &str, pid: u32) -> Probe {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            small_calls::get_status(self.channel(host), &self.target.service),
        )
        .await;
        match answer {
            Ok(Ok(response)) => {
                let status = response
                    .into_inner()
                    .services
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                let health = pb::HealthState::try_from(status.health).unwrap_or_default();
                let state = pb::ServiceState::try_from(status.state).unwrap_or_default();
                if status.pid != pid {
                    return Probe::Fatal(HostFailure::new(
                        Cause::Unhealthy,
                        format!(
                            "the new process (pid {pid}) is gone: now pid {} in state {}",
                            status.pid,
                            state.as_str_name()
                        ),
                    ));
                }
                if state == pb::ServiceState::Running && health == pb::HealthState::Healthy {
                    Probe::Healthy
                } else {
                    Probe::NotYet(format!("{} {}", state.as_str_name(), health.as_str_name()))
                }
            }
            Ok(Err(s)) if cause_of(&s) == Cause::Rejected => {
                Probe::Fatal(HostFailure::new(Cause::Rejected, s.message()))
            }
            _ => Probe::NoAnswer,
        }
    }

    /// An agent rollout's poll: the agent (still pid `pid`) runs the
    /// release, and every service it runs is running and healthy.
    async fn probe_agent(&self, host: &str, pid: u32) -> Probe {
        let info = match agent_info(self.channel(host)).await {
            Ok(info) => info,
            Err((Cause::Rejected, message)) => {
                return Probe::Fatal(HostFailure::new(Cause::Rejected, message))
            }
            Err(_) => return Probe::NoAnswer,
        };
        if info.pid != pid {
            return Probe::Fatal(HostFailure::new(
                Cause::Unhealthy,
                format!("the agent restarted (pid {pid} is now {})", info.pid),
            ));
        }
        if info.executable_sha256 != self.target.sha256 {
            return Probe::Fatal(HostFailure::new(
                Cause::Unhealthy,
                format!(
                    "the agent no longer runs {} (its executable is {})",
                    self.target.version, info.executable_sha256
                ),
            ));
        }
        let status = match tokio::time::timeout(
            Duration::from_secs(5),
            small_calls::get_status(self.channel(host), ""),
        )
        .await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(s)) if cause_of(&s) == Cause::Rejected => {
                return Probe::Fatal(HostFailure::new(Cause::Rejected, s.message()))
            }
            _ => return Probe::NoAnswer,
        };
        let unwell: Vec<String> = status
            .services
            .iter()
            .filter(|s| !s.current_version.is_empty())
            .filter(|s| {
                s.state != pb::ServiceState::Running as i32
                    || s.health != pb::HealthState::Healthy as i32
            })
            .map(|s| {
                format!(
                    "{} {} {}",
                    s.name,
                    pb::ServiceState::try_from(s.state)
                        .unwrap_or_default()
                        .as_str_name(),
                    pb::HealthState::try_from(s.health)
                        .unwrap_or_default()
                        .as_str_name()
                )
            })
            .collect();
        if unwell.is_empty() {
            Probe::Healthy
        } else {
            Probe::NotYet(unwell.join(", "))
        }
    }
}

impl Fleet for GrpcFleet {
    async fn acquire_lease(
        &self,
        host: &str,
        lease: &Lease,
        holder: &str,
        force: bool,
    ) -> Result<LeaseGrant, LeaseRefusal> {
        let request = pb::AcquireLeaseRequest {
            r#ref: Some(pb_lease(lease)),
            holder: holder.to_string(),
            ttl: Some(LEASE_TTL.try_into().expect("small duration")),
            force_takeover: force,
        };
        let acquire = small_calls::unary::<_, pb::AcquireLeaseResponse>(
            self.channel(host),
            "/reload.v1.LeaseService/AcquireLease",
            request,
        );
        match tokio::time::timeout(Duration::from_secs(10), acquire).await {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                let token = response
                    .lease
                    .and_then(|l| l.r#ref)
                    .map(|r| r.token)
                    .unwrap_or_default();
                if token == 0 {
                    return Err(LeaseRefusal(
                        "the agent granted no fencing token: it is older than this reloadctl; upgrade it first (`reloadctl push --agent`)".into(),
                    ));
                }
                Ok(LeaseGrant {
                    displaced: response.displaced.map(|d| d.holder),
                    token,
                })
            }
            Ok(Err(status)) if status.code() == Code::Aborted => {
                Err(LeaseRefusal(status.message().to_string()))
            }
            // Below gRPC (a TLS/plaintext mismatch is the usual one on a
            // first push): said as what it is, not as a lease refusal.
            Ok(Err(status)) if crate::client::is_transport_failure(&status) => {
                Err(LeaseRefusal(format!(
                    "{:#}",
                    crate::client::describe_status(host, "grant a lease", &status)
                )))
            }
            Ok(Err(status)) => Err(LeaseRefusal(format!(
                "cannot take the lease ({:?}): {}",
                status.code(),
                status.message()
            ))),
            Err(_) => Err(LeaseRefusal("unreachable (no answer within 10s)".into())),
        }
    }

    async fn renew_lease(&self, host: &str, lease: &Lease) -> Result<(), HostFailure> {
        let request = pb::RenewLeaseRequest {
            r#ref: Some(pb_lease(lease)),
            ttl: Some(LEASE_TTL.try_into().expect("small")),
        };
        // The engine bounds the call.
        small_calls::unary::<_, pb::RenewLeaseResponse>(
            self.channel(host),
            "/reload.v1.LeaseService/RenewLease",
            request,
        )
        .await
        .map(drop)
        .map_err(|s| HostFailure::new(cause_of(&s), format!("RenewLease: {}", s.message())))
    }

    async fn fence_state(&self, host: &str) -> Result<FenceState, HostFailure> {
        let timeout = Duration::from_secs(10);
        let unreachable = || HostFailure::new(Cause::Unreachable, "no answer within 10s");
        let lease = tokio::time::timeout(timeout, small_calls::get_lease(self.channel(host)))
            .await
            .map_err(|_| unreachable())?
            .map_err(|s| HostFailure::new(cause_of(&s), format!("GetLease: {}", s.message())))?
            .into_inner();
        let (running_sha256, running_version) = if self.target.agent() {
            let info = agent_info(self.channel(host)).await.map_err(failure)?;
            (info.executable_sha256, info.artifact_version)
        } else {
            let status = tokio::time::timeout(
                timeout,
                small_calls::get_status(self.channel(host), &self.target.service),
            )
            .await
            .map_err(|_| unreachable())?
            .map_err(|s| HostFailure::new(cause_of(&s), format!("status: {}", s.message())))?
            .into_inner();
            let service = status.services.into_iter().next().unwrap_or_default();
            (service.current_sha256, service.current_version)
        };
        Ok(FenceState {
            highest_token: lease.highest_token,
            highest_rollout: lease.highest_ref.map(|r| r.rollout_id).unwrap_or_default(),
            highest_holder: lease.highest_holder,
            running_sha256,
            running_version,
        })
    }

    async fn release_lease(&self, host: &str, lease: &Lease) {
        let request = pb::ReleaseLeaseRequest {
            r#ref: Some(pb_lease(lease)),
        };
        let release = small_calls::release_lease(self.channel(host), request);
        let _ = tokio::time::timeout(Duration::from_secs(5), release).await;
    }

    async fn stage(&self, host: &str, rank: u64) -> Result<Staged, HostFailure> {
        let target = &self.target;
        let status_check = self.status_checks.acquire(rank).await;
        if target.agent() {
            let info = agent_info(self.channel(host)).await.map_err(failure)?;
            drop(status_check);
            if info.executable_sha256 == target.sha256 {
                // Started from the signed release (an earlier push): it is
                // on the target, and says so. Otherwise it is an installed
                // binary with the same bytes, which reports its own version.
                if info.artifact_version == target.version {
                    return Ok(Staged::AlreadyOnTarget);
                }
                let reported_as = if info.artifact_version.is_empty() {
                    format!("{} (installed)", info.agent_version)
                } else {
                    info.artifact_version
                };
                return Ok(Staged::SameBytesAs { reported_as });
            }
            return self.upload_release(host, rank).await;
        }
        let status = tokio::time::timeout(
            Duration::from_secs(10),
            small_calls::get_status(self.channel(host), &target.service),
        )
        .await
        .map_err(|_| HostFailure::new(Cause::Unreachable, "no answer within 10s"))?
        .map_err(|s| HostFailure::new(cause_of(&s), format!("status: {}", s.message())))?
        .into_inner();
        drop(status_check);
        let running_target = status.services.first().is_some_and(|s| {
            s.current_sha256 == target.sha256 && s.state == pb::ServiceState::Running as i32
        });
        if running_target {
            if let Some(tree) = &self.peer_tree {
                tree.holds(host);
            }
            return Ok(Staged::AlreadyOnTarget);
        }
        self.upload_release(host, rank).await
    }

    async fn activate(&self, host: &str, lease: &Lease) -> Result<Activated, HostFailure> {
        let target = &self.target;
        if target.agent() {
            let (pid, version) = upgrade_agent(
                self.channel(host),
                Some(&target.sha256),
                pb_lease(lease),
                target.allow_downgrade,
            )
            .await
            .map_err(failure)?;
            return Ok(Activated {
                pid,
                message: format!("agent pid {pid} re-executed into {version}"),
            });
        }
        let request = pb::ActivateRequest {
            service: target.service.clone(),
            sha256: target.sha256.clone(),
            lease: Some(pb_lease(lease)),
            allow_downgrade: target.allow_downgrade,
        };
        let progress =
            activation_progress(self.channel(host), host, &target.service, self.live.clone()).await;
        let activate = small_calls::unary::<_, pb::ActivateResponse>(
            self.channel(host),
            "/reload.v1.ServiceControl/Activate",
            request,
        );
        let response = tokio::time::timeout(Duration::from_secs(300), activate).await;
        if let Some(progress) = progress {
            progress.abort();
        }
        let response = match response {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Err(HostFailure::new(cause_of(&status), status.message())),
            Err(_) => {
                return Err(HostFailure::new(
                    Cause::Unreachable,
                    "Activate did not answer within 300s",
                ))
            }
        };
        let result = response.result.unwrap_or_default();
        if result.outcome != pb::ReloadOutcome::Succeeded as i32 {
            return Err(HostFailure::new(Cause::ReloadFailed, result.reason));
        }
        Ok(Activated {
            pid: result.new_pid,
            message: format!("pid {} -> {}", result.old_pid, result.new_pid),
        })
    }

    async fn probe(&self, host: &str, pid: u32) -> Probe {
        if self.target.agent() {
            self.probe_agent(host, pid).await
        } else {
            self.probe_service(host, pid).await
        }
    }

    /// The service's events on the host: a health change, an exit or a
    /// restart wakes the gate. Agent rollouts poll only (the stream ends
    /// at the agent's exec).
    async fn health_changes(&self, host: &str) -> Option<HealthChanges> {
        if self.target.agent() {
            return None;
        }
        let mut events = tokio::time::timeout(
            Duration::from_secs(5),
            small_calls::server_streaming::<_, pb::Event>(
                self.channel(host),
                "/reload.v1.ServiceControl/WatchEvents",
                pb::WatchEventsRequest {
                    service: self.target.service.clone(),
                },
            ),
        )
        .await
        .ok()?
        .ok()?
        .into_inner();
        let wake = Arc::new(tokio::sync::Notify::new());
        let waker = wake.clone();
        let follower = tokio::spawn(async move {
            use pb::EventKind as K;
            while let Ok(Some(event)) = events.message().await {
                if matches!(
                    K::try_from(event.kind),
                    Ok(K::HealthChanged | K::Exited | K::Restarted | K::Failed)
                ) {
                    waker.notify_one();
                }
            }
        });
        Some(HealthChanges::new(wake, follower))
    }

    async fn settle(&self, host: &str) -> Result<Option<u32>, HostFailure> {
        let target = &self.target;
        if target.agent() {
            // An upgrade this CLI asked for before it died may still be
            // under way (preflight, drain, exec): wait for it to end.
            let deadline = Instant::now() + UPGRADE_TIMEOUT;
            loop {
                match agent_info(self.channel(host)).await {
                    Ok(info) if !info.upgrade_in_progress || Instant::now() >= deadline => {
                        return Ok((info.executable_sha256 == target.sha256).then_some(info.pid));
                    }
                    Err(err) if Instant::now() >= deadline => return Err(failure(err)),
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = small_calls::get_status(self.channel(host), &target.service)
                .await
                .map_err(|s| HostFailure::new(cause_of(&s), s.message()))?
                .into_inner()
                .services
                .into_iter()
                .next()
                .unwrap_or_default();
            let reloading = matches!(
                pb::ServiceState::try_from(status.state),
                Ok(pb::ServiceState::Reloading | pb::ServiceState::Starting)
            );
            if !reloading || Instant::now() >= deadline {
                return Ok((status.current_sha256 == target.sha256).then_some(status.pid));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn revert(&self, host: &str, lease: &Lease) -> Result<String, String> {
        if self.target.agent() {
            return match upgrade_agent(self.channel(host), None, pb_lease(lease), true).await {
                Ok((_, version)) => Ok(format!("agent back on {version}")),
                Err((_, message)) => Err(message),
            };
        }
        // Back to what it ran before this rollout: below the floor the new
        // version set, and known to the agent.
        let request = pb::RollbackRequest {
            service: self.target.service.clone(),
            lease: Some(pb_lease(lease)),
            allow_downgrade: true,
        };
        let rollback = small_calls::unary::<_, pb::RollbackResponse>(
            self.channel(host),
            "/reload.v1.ServiceControl/Rollback",
            request,
        );
        match tokio::time::timeout(Duration::from_secs(300), rollback).await {
            Ok(Ok(response)) => {
                let result = response.into_inner().result.unwrap_or_default();
                if result.outcome == pb::ReloadOutcome::Succeeded as i32 {
                    Ok(format!("back on {}", result.to_version))
                } else {
                    Err(result.reason)
                }
            }
            Ok(Err(status)) => Err(status.message().to_string()),
            Err(_) => Err("Rollback did not answer within 300s".into()),
        }
    }
}
