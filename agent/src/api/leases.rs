//! `LeaseService`: the rollout leases that fence one rollout from another
//! (the rules are in [`crate::lease`]).

use reload_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::auth::{audit_result, describe_lease_ref, Right};
use super::AgentApi;

#[tonic::async_trait]
impl pb::lease_service_server::LeaseService for AgentApi {
    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "AcquireLease");
        let request = request.into_inner();
        let asked = describe_lease_ref(request.r#ref.as_ref());
        let result = allowed.and_then(|()| Ok(self.leases.acquire(request)?));
        // Granted: the ref with its token.
        let rollout = match &result {
            Ok(granted) => {
                describe_lease_ref(granted.lease.as_ref().and_then(|l| l.r#ref.as_ref()))
            }
            Err(_) => asked,
        };
        self.audit(
            &identity,
            "AcquireLease",
            "",
            &rollout,
            "",
            audit_result(&result),
        );
        result.map(Response::new)
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        // Renewals are frequent and change no holder: checked, not audited.
        self.authorize(&request, Right::Deploy, "RenewLease").1?;
        Ok(Response::new(self.leases.renew(request.into_inner())?))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "ReleaseLease");
        let request = request.into_inner();
        let rollout = describe_lease_ref(request.r#ref.as_ref());
        let result = allowed.and_then(|()| Ok(self.leases.release(request)?));
        self.audit(
            &identity,
            "ReleaseLease",
            "",
            &rollout,
            "",
            audit_result(&result),
        );
        result.map(|()| Response::new(pb::ReleaseLeaseResponse {}))
    }

    async fn get_lease(
        &self,
        request: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::GetLeaseResponse>, Status> {
        self.check_read(&request, "GetLease")?;
        Ok(Response::new(self.leases.get()))
    }
}
