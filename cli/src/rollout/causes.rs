//! The one place a gRPC status becomes a rollout failure cause.

use tonic::{Code, Status};

use super::journal::Cause;

/// Transport trouble means the agent could not be reached; anything the
/// agent said itself is a refusal.
pub fn cause_of(status: &Status) -> Cause {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Cause::Unreachable
        }
        _ => Cause::Rejected,
    }
}
