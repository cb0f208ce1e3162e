//! The one place a gRPC status becomes a rollout failure cause.

use tonic::{Code, Status};

use super::journal::Cause;

/// Transport trouble means the agent could not be reached; anything the
/// agent said itself is a refusal.
pub fn cause_of(status: &Status) -> Cause {
    let fence = status.metadata().get(reload_proto::v1::FENCE_TRAILER);
    if fence.is_some_and(|v| v == reload_proto::v1::FENCE_SUPERSEDED) {
        return Cause::Superseded;
    }
    // Made on this side from a broken connection (an "h2 protocol error",
    // a TLS/plaintext mismatch): the agent said nothing.
    if crate::client::is_transport_failure(status) {
        return Cause::Unreachable;
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Cause::Unreachable
        }
        _ => Cause::Rejected,
    }
}
