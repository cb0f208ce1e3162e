//! An in-memory [`Fleet`] for the engine's unit tests.
//!
//! Every host behaves well (leases granted, staged by an upload, activated
//! to pid 1000 + its number, healthy at once, reverted) unless a test says
//! otherwise per host. Every call is logged in order with its time, so a
//! test asserts what the engine did to which host, not how. Clones share
//! their state: the test keeps one and hands the other to the engine.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::fleet::{
    Activated, FenceState, Fleet, HostFailure, Lease, LeaseGrant, LeaseRefusal, Probe, Staged,
};

/// One call the engine made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Acquire,
    Renew,
    Release,
    Stage,
    Activate,
    Probe,
    Settle,
    Revert,
    FenceState,
}

#[derive(Clone, Debug)]
pub struct Call {
    pub op: Op,
    pub host: String,
    /// The lease the call carried, if it takes one.
    pub lease: Option<Lease>,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    on_target: HashSet<String>,
    lease_refusals: HashMap<String, String>,
    stage_failures: HashMap<String, HostFailure>,
    /// How long staging takes on a host (default: no time).
    stage_delays: HashMap<String, Duration>,
    /// The rank each host was staged with.
    stage_ranks: HashMap<String, u64>,
    upload_bytes: u64,
    activate_failures: HashMap<String, HostFailure>,
    hanging: HashSet<String>,
    activate_delay: Duration,
    in_flight: usize,
    max_in_flight: usize,
    staging: usize,
    max_staging: usize,
    /// Answers given in order, then `probe_after` (default: healthy).
    probes: HashMap<String, VecDeque<Probe>>,
    probe_after: HashMap<String, Probe>,
    settles: HashMap<String, Result<Option<u32>, HostFailure>>,
    revert_failures: HashMap<String, String>,
    interrupt_on: Option<String>,
    /// The last fencing token each host granted.
    tokens: HashMap<String, u64>,
    renew_failures: HashMap<String, HostFailure>,
    hanging_renewals: HashSet<String>,
    fence_states: HashMap<String, FenceState>,
    /// Hosts that report health changes: notified by the test.
    health_reports: HashMap<String, Arc<Notify>>,
}

#[derive(Clone, Default)]
pub struct FakeFleet {
    state: Arc<Mutex<State>>,
    /// Notified when the host named by `interrupt_on_activate` activates:
    /// the tests' Ctrl-C.
    pub interrupt: Arc<Notify>,
}

/// The pid a host's new process gets: 1000 + the number in `hN:port`.
pub fn pid_of(host: &str) -> u32 {
    let number: String = host.chars().filter(char::is_ascii_digit).take(1).collect();
    1000 + number.parse::<u32>().unwrap_or(0)
}

impl FakeFleet {
    pub fn new() -> FakeFleet {
        FakeFleet::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn log(&self, op: Op, host: &str, lease: Option<&Lease>) {
        self.with(|s| {
            s.calls.push(Call {
                op,
                host: host.to_string(),
                lease: lease.cloned(),
                at: Instant::now(),
            })
        });
    }

    pub fn on_target(&self, host: &str) -> &Self {
        self.with(|s| s.on_target.insert(host.into()));
        self
    }

    pub fn refuse_lease(&self, host: &str, reason: &str) -> &Self {
        self.with(|s| s.lease_refusals.insert(host.into(), reason.into()));
        self
    }

    pub fn fail_stage(&self, host: &str, failure: HostFailure) -> &Self {
        self.with(|s| s.stage_failures.insert(host.into(), failure));
        self
    }

    /// Staging `host` takes `delay` (then succeeds or fails as set).
    pub fn stage_delay(&self, host: &str, delay: Duration) -> &Self {
        self.with(|s| s.stage_delays.insert(host.into(), delay));
        self
    }

    /// The rank `host` was staged with.
    pub fn stage_rank(&self, host: &str) -> u64 {
        self.with(|s| s.stage_ranks[host])
    }

    pub fn upload_bytes(&self, bytes: u64) -> &Self {
        self.with(|s| s.upload_bytes = bytes);
        self
    }

    pub fn fail_activate(&self, host: &str, failure: HostFailure) -> &Self {
        self.with(|s| s.activate_failures.insert(host.into(), failure));
        self
    }

    /// Activate never answers.
    pub fn hang_activate(&self, host: &str) -> &Self {
        self.with(|s| s.hanging.insert(host.into()));
        self
    }

    pub fn activate_delay(&self, delay: Duration) -> &Self {
        self.with(|s| s.activate_delay = delay);
        self
    }

    /// The first probes of `host` answer these, in order.
    pub fn probes(&self, host: &str, probes: Vec<Probe>) -> &Self {
        self.with(|s| s.probes.insert(host.into(), probes.into()));
        self
    }

    /// Every probe of `host` (after the scripted ones) answers this.
    pub fn probe_always(&self, host: &str, probe: Probe) -> &Self {
        self.with(|s| s.probe_after.insert(host.into(), probe));
        self
    }

    pub fn settles(&self, host: &str, result: Result<Option<u32>, HostFailure>) -> &Self {
        self.with(|s| s.settles.insert(host.into(), result));
        self
    }

    pub fn fail_revert(&self, host: &str, reason: &str) -> &Self {
        self.with(|s| s.revert_failures.insert(host.into(), reason.into()));
        self
    }

    /// Every renewal of `host`'s lease fails with `failure`.
    pub fn fail_renew(&self, host: &str, failure: HostFailure) -> &Self {
        self.with(|s| s.renew_failures.insert(host.into(), failure));
        self
    }

    /// Renewals of `host`'s lease never answer (a partition).
    pub fn hang_renew(&self, host: &str) -> &Self {
        self.with(|s| s.hanging_renewals.insert(host.into()));
        self
    }

    pub fn fence_state(&self, host: &str, state: FenceState) -> &Self {
        self.with(|s| s.fence_states.insert(host.into(), state));
        self
    }

    pub fn interrupt_on_activate(&self, host: &str) -> &Self {
        self.with(|s| s.interrupt_on = Some(host.into()));
        self
    }

    /// The host reports health changes: each `notify_one` on `report` is
    /// one report (see [`Fleet::health_changes`]).
    pub fn reports_health(&self, host: &str, report: Arc<Notify>) -> &Self {
        self.with(|s| s.health_reports.insert(host.to_string(), report));
        self
    }

    pub fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }

    /// The hosts that got `op`, in call order.
    pub fn hosts_with(&self, op: Op) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.op == op)
            .map(|c| c.host)
            .collect()
    }

    /// The most hosts that were activating at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.with(|s| s.max_in_flight)
    }

    /// The most hosts that were staging at the same time.
    pub fn max_staging(&self) -> usize {
        self.with(|s| s.max_staging)
    }
}

impl Fleet for FakeFleet {
    async fn acquire_lease(
        &self,
        host: &str,
        lease: &Lease,
        _holder: &str,
        _force: bool,
    ) -> Result<LeaseGrant, LeaseRefusal> {
        self.log(Op::Acquire, host, Some(lease));
        if let Some(reason) = self.with(|s| s.lease_refusals.get(host).cloned()) {
            return Err(LeaseRefusal(reason));
        }
        let token = self.with(|s| {
            let token = s.tokens.entry(host.to_string()).or_insert(0);
            *token += 1;
            *token
        });
        Ok(LeaseGrant {
            displaced: None,
            token,
        })
    }

    async fn renew_lease(&self, host: &str, lease: &Lease) -> Result<(), HostFailure> {
        self.log(Op::Renew, host, Some(lease));
        let (failure, hang) = self.with(|s| {
            (
                s.renew_failures.get(host).cloned(),
                s.hanging_renewals.contains(host),
            )
        });
        if hang {
            std::future::pending::<()>().await;
        }
        failure.map_or(Ok(()), Err)
    }

    async fn fence_state(&self, host: &str) -> Result<FenceState, HostFailure> {
        self.log(Op::FenceState, host, None);
        Ok(self.with(|s| s.fence_states.get(host).cloned().unwrap_or_default()))
    }

    async fn release_lease(&self, host: &str, lease: &Lease) {
        self.log(Op::Release, host, Some(lease));
    }

    async fn stage(&self, host: &str, rank: u64) -> Result<Staged, HostFailure> {
        self.log(Op::Stage, host, None);
        let delay = self.with(|s| {
            s.stage_ranks.insert(host.into(), rank);
            s.staging += 1;
            s.max_staging = s.max_staging.max(s.staging);
            s.stage_delays.get(host).copied()
        });
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        self.with(|s| {
            s.staging -= 1;
            if let Some(failure) = s.stage_failures.get(host) {
                return Err(failure.clone());
            }
            if s.on_target.contains(host) {
                return Ok(Staged::AlreadyOnTarget);
            }
            Ok(Staged::Uploaded {
                bytes_sent: s.upload_bytes,
            })
        })
    }

    async fn activate(&self, host: &str, lease: &Lease) -> Result<Activated, HostFailure> {
        self.log(Op::Activate, host, Some(lease));
        let (delay, hang, interrupt) = self.with(|s| {
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
            (
                s.activate_delay,
                s.hanging.contains(host),
                s.interrupt_on.as_deref() == Some(host),
            )
        });
        if interrupt {
            self.interrupt.notify_one();
            // Let the engine's watcher see it before this host is done.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(delay).await;
        self.with(|s| {
            s.in_flight -= 1;
            if let Some(failure) = s.activate_failures.get(host) {
                return Err(failure.clone());
            }
            let pid = pid_of(host);
            Ok(Activated {
                pid,
                message: format!("pid {} -> {pid}", pid - 500),
            })
        })
    }

    async fn probe(&self, host: &str, _pid: u32) -> Probe {
        self.log(Op::Probe, host, None);
        self.with(|s| {
            if let Some(next) = s.probes.get_mut(host).and_then(VecDeque::pop_front) {
                return next;
            }
            s.probe_after.get(host).cloned().unwrap_or(Probe::Healthy)
        })
    }

    async fn health_changes(&self, host: &str) -> Option<super::fleet::HealthChanges> {
        let report = self.with(|s| s.health_reports.get(host).cloned())?;
        // The test's reports stand for the agent's events.
        let follower = tokio::spawn(std::future::pending::<()>());
        Some(super::fleet::HealthChanges::new(report, follower))
    }

    async fn settle(&self, host: &str) -> Result<Option<u32>, HostFailure> {
        self.log(Op::Settle, host, None);
        self.with(|s| s.settles.get(host).cloned().unwrap_or(Ok(None)))
    }

    async fn revert(&self, host: &str, lease: &Lease) -> Result<String, String> {
        self.log(Op::Revert, host, Some(lease));
        match self.with(|s| s.revert_failures.get(host).cloned()) {
            Some(reason) => Err(reason),
            None => Ok("back on 1.0.0".into()),
        }
    }
}
