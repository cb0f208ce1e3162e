//! The [`Fleet`]: everything a rollout asks of the agents, and nothing it
//! decides.
//!
//! The engine ([`super::engine`]) only sees this trait, so its decisions
//! (waves, the failure budget, halting, reverting exactly what it changed,
//! resuming) are unit-tested against an in-memory fake
//! (`fake_fleet.rs`), the way linkerd2-proxy tests its stacks. The real
//! implementation is [`super::grpc_fleet::GrpcFleet`]: tonic channels,
//! timeouts, and the translation of gRPC codes into a [`Cause`].
//!
//! Each operation names a host and, when it changes anything, carries the
//! [`Lease`] that fences it. A fleet knows its target (the service or the
//! agent release, its sha256) from construction, so the calls say only
//! *where* and *under which lease*. Failures come back as a
//! [`HostFailure`]: a cause and a message for people; the engine decides
//! what a failure means for the rollout.
//!
//! Fencing tokens ride in [`Lease`]: each host grants its own, so the
//! engine keeps one `Lease` per host. An agent's verdict that a later
//! rollout superseded this one comes back as [`Cause::Superseded`].

use std::future::Future;
use std::time::Duration;

use super::journal::Cause;

/// How long a lease lasts without renewal; the engine renews every third
/// of it.
pub const LEASE_TTL: Duration = Duration::from_secs(60);

/// The fence every mutating call carries: this rollout, at this generation
/// (a resume takes the next one, which makes the agents refuse an older
/// process of the same rollout), with the fencing token the host granted
/// (0 until it did).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub rollout: String,
    pub generation: u64,
    pub token: u64,
}

/// Why a host did not do what was asked, kept apart by cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFailure {
    pub cause: Cause,
    pub message: String,
}

impl HostFailure {
    pub fn new(cause: Cause, message: impl Into<String>) -> HostFailure {
        HostFailure {
            cause,
            message: message.into(),
        }
    }
}

/// Why a lease was not granted: the text after the host's name in "rollout
/// not started: HOST: ...".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRefusal(pub String);

/// A granted lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The holder whose lease this one replaced (`--force-takeover`).
    pub displaced: Option<String>,
    /// The host's fencing token for this run.
    pub token: u64,
}

/// What a host says of the leases it granted, for `resume` to tell whether
/// a later rollout took over since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceState {
    /// The highest fencing token the host granted (0: none).
    pub highest_token: u64,
    /// The rollout it was granted to, and who ran it.
    pub highest_rollout: String,
    pub highest_holder: String,
    /// The sha256 of what the host runs now (empty: nothing).
    pub running_sha256: String,
    pub running_version: String,
}

/// Wakes the health gate (see [`Fleet::health_changes`]); the task that
/// follows the host's reports ends with it.
pub struct HealthChanges {
    wake: std::sync::Arc<tokio::sync::Notify>,
    follower: tokio::task::JoinHandle<()>,
}

impl HealthChanges {
    /// `wake` is notified by `follower` at each report.
    pub fn new(
        wake: std::sync::Arc<tokio::sync::Notify>,
        follower: tokio::task::JoinHandle<()>,
    ) -> HealthChanges {
        HealthChanges { wake, follower }
    }

    /// Returns at the next report (at once if one came since the last
    /// call).
    pub async fn changed(&self) {
        self.wake.notified().await
    }
}

impl Drop for HealthChanges {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// What staging found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Staged {
    /// The host already runs the target: it is left alone.
    AlreadyOnTarget,
    /// The host runs these exact bytes already, but not as the target
    /// release: an agent whose installed binary is byte-identical to the
    /// agent release. It is left alone (the agent refuses to re-execute
    /// the executable it runs), and it goes on reporting `reported_as`;
    /// the summary must say so rather than claim the target version.
    SameBytesAs { reported_as: String },
    /// The host holds the release now (`bytes_sent` is 0 when it had it).
    Uploaded { bytes_sent: u64 },
}

/// A host that took the target: the process the health gate is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activated {
    /// The new service process, or for an agent rollout the agent's (same)
    /// pid.
    pub pid: u32,
    /// For people: what changed ("pid 10 -> 11").
    pub message: String,
}

/// One health-gate poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Healthy,
    /// Not (yet) healthy: what was seen.
    NotYet(String),
    /// Over: the process the gate is about is gone, or the agent refused.
    Fatal(HostFailure),
    /// No answer; a few in a row make the host unreachable.
    NoAnswer,
}

/// The operations a rollout needs from its hosts. Futures are `Send` so the
/// engine can run hosts in parallel on tokio tasks.
pub trait Fleet: Send + Sync + 'static {
    /// Takes the lease on one host, for `ttl`-long periods renewed by
    /// [`Fleet::renew_lease`]. `force` takes it from another holder.
    fn acquire_lease(
        &self,
        host: &str,
        lease: &Lease,
        holder: &str,
        force: bool,
    ) -> impl Future<Output = Result<LeaseGrant, LeaseRefusal>> + Send;

    /// Extends the lease for another `ttl`. The engine bounds the call and
    /// halts when a lease cannot be renewed in time.
    fn renew_lease(
        &self,
        host: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<(), HostFailure>> + Send;

    /// The host's fencing state and what it runs (read right only).
    fn fence_state(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<FenceState, HostFailure>> + Send;

    /// Gives the lease back; best effort.
    fn release_lease(&self, host: &str, lease: &Lease) -> impl Future<Output = ()> + Send;

    /// Skips a host already on the target, else makes sure it holds the
    /// release. `rank`: the host's place in the order the rollout needs
    /// hosts in (wave order); where hosts wait for a source (peer fetch),
    /// lower ranks go first.
    fn stage(
        &self,
        host: &str,
        rank: u64,
    ) -> impl Future<Output = Result<Staged, HostFailure>> + Send;

    /// Switches the host to the target: a service activation, or the
    /// agent's in-place upgrade.
    fn activate(
        &self,
        host: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<Activated, HostFailure>> + Send;

    /// One health poll of the process `pid` (see [`Probe`]).
    fn probe(&self, host: &str, pid: u32) -> impl Future<Output = Probe> + Send;

    /// The host's own reports that the service's health may have changed
    /// (the agent's events), subscribed to before the gate's first poll:
    /// the gate polls as soon as the agent has seen a change instead of at
    /// its next tick. `None`: the gate only polls on its own.
    fn health_changes(&self, host: &str) -> impl Future<Output = Option<HealthChanges>> + Send {
        let _ = host;
        async { None }
    }

    /// After a crash: waits while the host still works on an activation it
    /// was given, then tells whether it runs the target, and on which pid.
    fn settle(&self, host: &str) -> impl Future<Output = Result<Option<u32>, HostFailure>> + Send;

    /// Puts back what the host ran before this rollout. Ok: for people,
    /// what runs now; Err: why it could not.
    fn revert(
        &self,
        host: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<String, String>> + Send;
}
