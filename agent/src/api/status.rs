//! The one place where the agent's errors become gRPC statuses. Every room
//! below the API returns its own error type (thiserror); the handlers turn
//! them into a `tonic::Status` with `?`, through the conversions here, so a
//! code means the same thing whichever call returns it:
//!
//! | code | meaning |
//! | --- | --- |
//! | INVALID_ARGUMENT | the request is malformed |
//! | NOT_FOUND | no such service or stored artifact |
//! | FAILED_PRECONDITION | the state forbids it: downgrade, expired, wrong platform or service |
//! | ALREADY_EXISTS | the agent already runs that release |
//! | ABORTED | a conflict: a reload or upgrade in progress, a lease held by another rollout |
//! | RESOURCE_EXHAUSTED | a limit: size, chunk, slots, rate, disk |
//! | PERMISSION_DENIED | untrusted or revoked signature, or the caller lacks the right |
//! | DATA_LOSS | the bytes do not match their signed hash |
//! | INTERNAL | the agent itself failed (I/O, a task) |

use reload_artifact::VerifyError;
use tonic::{Code, Status};

use crate::lease::LeaseError;
use crate::selfupgrade::UpgradeError;
use crate::services::ServiceError;
use crate::state::DowngradeRefused;
use crate::store::{ArtifactRejected, StoreError};

/// The gRPC code of each verification failure (see artifacts.proto).
fn verify_code(err: &VerifyError) -> Code {
    match err {
        VerifyError::Malformed(_)
        | VerifyError::WrongPayloadType { .. }
        | VerifyError::PayloadNotManifest(_)
        | VerifyError::InvalidManifest(_) => Code::InvalidArgument,
        VerifyError::NoSignature
        | VerifyError::UntrustedKey { .. }
        | VerifyError::BadSignature { .. }
        | VerifyError::RevokedKey { .. }
        | VerifyError::BelowThreshold { .. } => Code::PermissionDenied,
        VerifyError::Expired { .. } | VerifyError::WrongPlatform { .. } => Code::FailedPrecondition,
        VerifyError::ContentMismatch(_) => Code::DataLoss,
    }
}

fn store_code(err: &StoreError) -> Code {
    match err {
        StoreError::Verify(inner) => verify_code(inner),
        StoreError::TooLarge { .. } => Code::ResourceExhausted,
        StoreError::Truncated { .. } | StoreError::Damaged { .. } => Code::DataLoss,
        StoreError::BadRequest(_) => Code::InvalidArgument,
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            Code::ResourceExhausted
        }
        StoreError::Io { .. } => Code::Internal,
    }
}

/// A status whose code says the agent failed, not the caller, is logged as
/// an error; the rest were the caller's to fix.
fn logged(code: Code, message: String) -> Status {
    if code == Code::Internal {
        tracing::error!(error = %message, "agent failure");
    }
    // The log above has the paths; the caller gets the folders by role.
    Status::new(code, crate::redact::for_client(&message))
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Status {
        if store_code(&err) != Code::Internal {
            tracing::warn!(error = %err, "artifact rejected");
        }
        logged(store_code(&err), err.to_string())
    }
}

impl From<ArtifactRejected> for Status {
    fn from(err: ArtifactRejected) -> Status {
        let code = match &err {
            ArtifactRejected::Verify(inner) => verify_code(inner),
            ArtifactRejected::Store(inner) => store_code(inner),
            ArtifactRejected::TooLarge { .. } => Code::ResourceExhausted,
            ArtifactRejected::NotStored(_) => Code::NotFound,
            ArtifactRejected::WrongService { .. } => Code::FailedPrecondition,
            ArtifactRejected::Task(_) => Code::Internal,
        };
        logged(code, err.to_string())
    }
}

impl From<DowngradeRefused> for Status {
    fn from(err: DowngradeRefused) -> Status {
        Status::failed_precondition(err.to_string())
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        let err = match err {
            ServiceError::Fenced(inner) => return inner.into(),
            other => other,
        };
        let code = match &err {
            ServiceError::Unknown { .. } | ServiceError::ArtifactNotStored(_) => Code::NotFound,
            ServiceError::Lookup(_) => Code::InvalidArgument,
            ServiceError::WrongService { .. }
            | ServiceError::NoPreviousVersion(_)
            | ServiceError::Downgrade(_) => Code::FailedPrecondition,
            ServiceError::ReloadRunning(_)
            | ServiceError::PreviousReloadStuck { .. }
            | ServiceError::StillReloading { .. } => Code::Aborted,
            ServiceError::Fenced(_) => unreachable!("answered above"),
            ServiceError::Task(_) => Code::Internal,
        };
        logged(code, err.to_string())
    }
}

impl From<LeaseError> for Status {
    fn from(err: LeaseError) -> Status {
        let code = match &err {
            LeaseError::BadRequest(_) => Code::InvalidArgument,
            LeaseError::Fenced(_) | LeaseError::Superseded { .. } => Code::Aborted,
            LeaseError::Persist(_) => Code::Internal,
        };
        let superseded = matches!(err, LeaseError::Superseded { .. });
        let mut status = logged(code, err.to_string());
        if superseded {
            // The machine-readable verdict: clients in any language read
            // trailers; the message is for people.
            status.metadata_mut().insert(
                reload_proto::v1::FENCE_TRAILER,
                reload_proto::v1::FENCE_SUPERSEDED.parse().expect("ascii"),
            );
        }
        status
    }
}

impl From<UpgradeError> for Status {
    fn from(err: UpgradeError) -> Status {
        let code = match err {
            UpgradeError::Artifact(inner) => return inner.into(),
            UpgradeError::Downgrade(inner) => return inner.into(),
            UpgradeError::Services(inner) => return inner.into(),
            UpgradeError::Fenced(inner) => return inner.into(),
            UpgradeError::InProgress | UpgradeError::Stopping(_) => Code::Aborted,
            UpgradeError::BothTargets | UpgradeError::NoTarget => Code::InvalidArgument,
            UpgradeError::NothingToRollBackTo | UpgradeError::Preflight { .. } => {
                Code::FailedPrecondition
            }
            UpgradeError::AlreadyRunning { .. } => Code::AlreadyExists,
            UpgradeError::Internal(_) => Code::Internal,
        };
        logged(code, err.to_string())
    }
}
