//! `ServiceControl`: activate, rollback, status and the event stream of the
//! services this agent runs (the work is in [`crate::services`]).

use reload_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::auth::{audit_result, reload_audit, Right};
use super::AgentApi;
use crate::lease::{CallerFence, Fence};
use crate::services::{ServiceError, Services};

/// A reload call as the audit log records it.
struct ReloadCall {
    name: &'static str,
    identity: String,
    service: String,
    lease: Option<pb::LeaseRef>,
    /// What was asked for; empty for a rollback, which records the
    /// artifact it went back to.
    sha256: String,
    /// The audit line's `detail`.
    detail: &'static str,
}

type Reloaded = (pb::ReloadResult, pb::ServiceStatus);

/// The caller's lease check, for the services to run again under the
/// service's reload lock and at the commit point.
fn lease_fence(api: &AgentApi, lease: Option<pb::LeaseRef>) -> std::sync::Arc<CallerFence> {
    std::sync::Arc::new(CallerFence::new(api.leases.clone(), lease))
}

impl AgentApi {
    /// Runs a reload, after the caller's right and the lease, with its
    /// audit line, in a task of its own: a caller that disconnects (a CLI
    /// killed mid-rollout) must not cancel a reload half-way, with a new
    /// process started that nobody supervises, nor leave it unaudited.
    async fn run_reload<F, Fut>(
        &self,
        call: ReloadCall,
        allowed: Result<(), Status>,
        work: F,
    ) -> Result<Reloaded, Status>
    where
        F: FnOnce(std::sync::Arc<Services>, std::sync::Arc<CallerFence>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Reloaded, ServiceError>> + Send,
    {
        let api = self.clone();
        tokio::spawn(async move {
            let result = async {
                allowed?;
                let fence = lease_fence(&api, call.lease.clone());
                drop(fence.hold()?);
                Ok(work(api.services.clone(), fence).await?)
            }
            .await;
            let (version, outcome) = reload_audit(&result);
            let sha256 = match (&result, call.sha256.is_empty()) {
                (Ok((_, status)), true) => status.current_sha256.clone(),
                _ => call.sha256.clone(),
            };
            api.audit_detailed(
                &call.identity,
                call.name,
                &call.service,
                &version,
                &sha256,
                outcome,
                call.detail,
            );
            result
        })
        .await
        .map_err(|err| Status::internal(format!("the reload task failed: {err}")))?
        .map(|(mut result, mut status)| {
            crate::redact::reload_result(&mut result);
            if let Some(last) = status.last_reload.as_mut() {
                crate::redact::reload_result(last);
            }
            (result, status)
        })
    }
}

#[tonic::async_trait]
impl pb::service_control_server::ServiceControl for AgentApi {
    async fn activate(
        &self,
        request: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivateResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "Activate");
        let request = request.into_inner();
        let call = ReloadCall {
            name: "Activate",
            // An explicit downgrade stands out in the audit log.
            detail: if request.allow_downgrade {
                "allow_downgrade"
            } else {
                ""
            },
            identity,
            service: request.service.clone(),
            lease: request.lease,
            sha256: request.sha256.clone(),
        };
        let (result, status) = self
            .run_reload(call, allowed, move |services, fence| async move {
                services
                    .activate(
                        &request.service,
                        &request.sha256,
                        request.allow_downgrade,
                        &*fence,
                    )
                    .await
            })
            .await?;
        Ok(Response::new(pb::ActivateResponse {
            result: Some(result),
            status: Some(status),
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "Rollback");
        let request = request.into_inner();
        let call = ReloadCall {
            name: "Rollback",
            identity,
            service: request.service.clone(),
            lease: request.lease,
            sha256: String::new(),
            detail: "",
        };
        let (result, status) = self
            .run_reload(call, allowed, move |services, fence| async move {
                services
                    .rollback(&request.service, request.allow_downgrade, &*fence)
                    .await
            })
            .await?;
        Ok(Response::new(pb::RollbackResponse {
            result: Some(result),
            status: Some(status),
        }))
    }

    async fn stop_service(
        &self,
        request: Request<pb::StopServiceRequest>,
    ) -> Result<Response<pb::StopServiceResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "StopService");
        let request = request.into_inner();
        // To the end, and audited, even if the caller goes away (see
        // run_reload).
        let api = self.clone();
        tokio::spawn(async move {
            let result = async {
                allowed?;
                let fence = lease_fence(&api, request.lease.clone());
                drop(fence.hold()?);
                Ok(api.services.stop(&request.service, &*fence).await?)
            }
            .await;
            let (version, sha256) = match &result {
                Ok((_, _, status)) => (
                    status.current_version.clone(),
                    status.current_sha256.clone(),
                ),
                Err(_) => Default::default(),
            };
            api.audit(
                &identity,
                "StopService",
                &request.service,
                &version,
                &sha256,
                audit_result(&result),
            );
            result.map(|(stopped_pid, outcome, status)| {
                Response::new(pb::StopServiceResponse {
                    stopped_pid,
                    outcome,
                    status: Some(status),
                })
            })
        })
        .await
        .map_err(|err| Status::internal(format!("the stop task failed: {err}")))?
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.check_read(&request, "GetStatus")?;
        let name = request.into_inner().service;
        let mut services: Vec<pb::ServiceStatus> = if name.is_empty() {
            self.services.services().map(|s| s.status()).collect()
        } else {
            vec![self.services.service(&name)?.status()]
        };
        for status in &mut services {
            if let Some(last) = status.last_reload.as_mut() {
                crate::redact::reload_result(last);
            }
        }
        Ok(Response::new(pb::GetStatusResponse { services }))
    }

    type WatchEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.check_read(&request, "WatchEvents")?;
        use tokio_stream::StreamExt;
        let service = request.into_inner().service;
        if !service.is_empty() {
            self.services.service(&service)?;
        }
        let events = tokio_stream::wrappers::BroadcastStream::new(self.services.events().subscribe())
            .filter_map(move |event| match event {
                Ok(mut event) if service.is_empty() || event.service == service => {
                    event.message = crate::redact::for_client(&event.message);
                    Some(Ok(event))
                }
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(Status::resource_exhausted(format!(
                        "this watcher fell {n} events behind and was dropped; watch again and read GetStatus"
                    ))))
                }
            })
            // After a lag error the stream ends: a watcher must not believe
            // it saw every event.
            .map_while({
                let mut ended = false;
                move |item| {
                    if ended {
                        return None;
                    }
                    ended = item.is_err();
                    Some(item)
                }
            })
            .map(Some)
            // The agent re-executing itself ends the stream.
            .merge(
                tokio_stream::wrappers::WatchStream::new(self.services.events().closing())
                    .filter(|closing| *closing)
                    .map(|_| None),
            )
            .map_while(|item| item);
        Ok(Response::new(Box::pin(events)))
    }

    type ReadLogsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::OutputLine, Status>> + Send>>;

    async fn read_logs(
        &self,
        request: Request<pb::ReadLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        use tokio_stream::StreamExt;
        // A read, but audited: a service's output may carry what it logs
        // about its users, and who read it is worth knowing.
        let (identity, allowed) = self.authorize(&request, Right::Read, "ReadLogs");
        let pb::ReadLogsRequest {
            service,
            lines,
            follow,
        } = request.into_inner();
        let detail = format!(
            "read: {lines} lines{}",
            if follow { ", follow" } else { "" }
        );
        let output = allowed.and_then(|()| Ok(self.services.output(&service)?));
        self.audit_detailed(
            &identity,
            "ReadLogs",
            &service,
            "",
            "",
            audit_result(&output),
            &detail,
        );
        let (recent, receiver) = output?.recent_and_follow(lines as usize);
        let recent = tokio_stream::iter(recent.into_iter().map(|l| Ok(l.to_proto())));
        if !follow {
            return Ok(Response::new(Box::pin(recent)));
        }
        let new_lines = tokio_stream::wrappers::BroadcastStream::new(receiver)
            .map(|line| match line {
                Ok(line) => Ok(line.to_proto()),
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Err(Status::resource_exhausted(format!(
                        "this follower fell {n} lines behind and was dropped; read again"
                    )))
                }
            })
            // After a lag the stream ends: a reader must not believe it saw
            // every line.
            .map_while({
                let mut ended = false;
                move |item| {
                    if ended {
                        return None;
                    }
                    ended = item.is_err();
                    Some(item)
                }
            })
            .map(Some)
            // The agent re-executing itself ends the stream.
            .merge(
                tokio_stream::wrappers::WatchStream::new(self.services.events().closing())
                    .filter(|closing| *closing)
                    .map(|_| None),
            )
            .map_while(|item| item);
        Ok(Response::new(Box::pin(recent.chain(new_lines))))
    }
}
