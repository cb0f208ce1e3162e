//! The [`RolloutEngine`]: every decision of a rollout, over a [`Fleet`].
//!
//! One run (a push, or a resume) goes:
//!
//! 1. Fence: take the lease on every host in sorted host order. Of two
//!    concurrent pushes the one that gets the first host wins; the other
//!    fails there, gives back what it took, and changes nothing.
//! 2. Stage every host still to do, `max_parallel` at once, in wave order,
//!    in the background: hosts already on the target are skipped, the
//!    others get the release. Each wave starts once its own hosts are
//!    staged, so the later waves' hosts stage while the canary runs. On a
//!    fresh push a host that could not be staged by the time the first wave
//!    is staged stops the rollout before any host changes; one found later
//!    (or on a resume) is a failed host, counted against the budget: with
//!    the default budget of 0 the rollout halts before the next wave and
//!    reverts what it changed. `stage_first` waits for every host before
//!    the first wave instead.
//! 3. Waves: activate and gate ([`HealthGate`]) up to `max_parallel` hosts
//!    at once. Past the failure budget, no further host is started; the
//!    hosts in flight finish, then the rollout halts and, with auto-revert,
//!    reverts in parallel exactly the hosts it activated. Past the progress
//!    deadline it halts the same way. Ctrl-C lets the hosts in flight
//!    finish, then pauses (the journal says where to resume).
//!
//! Every host state is journaled (fsync'd) before the engine acts on it,
//! then shown by the [`Reporter`]. A resumed host journaled as
//! `activating` or `activated` is first settled through the fleet, so no
//! host is activated twice.
//!
//! Fencing: each host grants this run its own fencing token, journaled
//! with the generation, and every call to that host carries it. Leases are
//! renewed on every host at once, each call bounded, every sixth of the
//! TTL; a host whose lease could not be renewed while a third of it was
//! still left is given up (the agent may hand it to another rollout once
//! it expires): no further call goes there and the rollout halts, naming
//! it. A host that answers "superseded" (a later rollout took it over)
//! stops the rollout at once, with nothing reverted: a revert would undo
//! the later rollout's work.
//!
//! Revert after a halt covers the hosts whose outcome is unknown too (an
//! activation cut off by the progress deadline): the engine asks the host
//! what it runs and reverts it if it changed; the summary says which hosts
//! were reverted, which were left on the new version and which never
//! changed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::fleet::{Fleet, HostFailure, Lease, Staged, LEASE_TTL};
use super::gate::HealthGate;
pub use super::journal::HostRecord;
use super::journal::{Cause, HostState, Journal, Outcome, Record};
use super::output::Reporter;
use super::plan::RolloutPlan;

/// Hosts whose staging task exists at once; the others wait as a list
/// entry, not as a future (at 1,000 hosts the futures of hosts waiting
/// their turn were 3.5 MiB of the CLI). Four times the status calls
/// staging makes at once, so the window never starves them.
pub(super) const STAGING_WINDOW: usize = 4 * super::grpc_fleet::STAGING_STATUS_CHECKS;

/// How this run starts.
pub struct RunStart {
    /// This run's fence: the rollout at the next generation (the tokens
    /// come from the hosts).
    pub lease: Lease,
    /// How long a lease lasts unrenewed ([`LEASE_TTL`]; shorter in tests).
    pub lease_ttl: Duration,
    /// Who holds the leases, for the agents' logs and refusals.
    pub holder: String,
    /// Take the leases even from another rollout.
    pub force_takeover: bool,
    /// A new push rather than a resume: a host that cannot be staged stops
    /// it before anything changes.
    pub fresh: bool,
    /// A resume: the tokens the hosts granted the last run, from the
    /// journal. Before anything else the engine asks every host whether a
    /// later rollout took it over since (see [`RolloutEngine::superseded_since`]).
    pub resumed_tokens: Option<BTreeMap<String, u64>>,
}

pub struct RolloutEngine<F> {
    plan: RolloutPlan,
    fleet: Arc<F>,
    start: RunStart,
    journal: Mutex<Journal>,
    hosts: Mutex<Vec<HostRecord>>,
    /// Bytes uploaded while staging, for the finished record.
    bytes_sent: AtomicU64,
    report: Reporter,
    /// Each host's lease, with the token it granted.
    leases: Mutex<Vec<Lease>>,
    /// Set when the rollout must stop touching hosts: superseded, or a
    /// lease lost.
    stop: Mutex<Option<Stop>>,
}

/// Staging as it goes on beside the waves.
struct StagingProgress {
    /// Per host: its staging has ended (staged, skipped or failed), or it
    /// needed none.
    ended: Mutex<Vec<bool>>,
    /// Hosts that could not be staged.
    failed: AtomicUsize,
    /// A staging result could not be journaled: the rollout stops.
    error: Mutex<Option<anyhow::Error>>,
    changed: tokio::sync::Notify,
}

impl StagingProgress {
    fn lock_ended(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the staging of every host in `hosts` has ended. Err: a
    /// result could not be journaled.
    async fn wait_for(&self, hosts: &[usize]) -> anyhow::Result<()> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the look, so an end between the two is not
            // missed.
            changed.as_mut().enable();
            if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(e.context("journaling a staging result"));
            }
            if hosts.iter().all(|&i| self.lock_ended()[i]) {
                return Ok(());
            }
            changed.await;
        }
    }
}

/// Aborts the task when dropped: the background staging ends with the run.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the rollout stopped on its own.
#[derive(Clone, Debug)]
enum Stop {
    /// A host said a later rollout took over: nothing may be reverted.
    Superseded { host: usize, message: String },
    /// A host's lease could not be renewed in time.
    LeaseLost { host: usize, message: String },
}

impl RunStart {
    /// A run with the production lease TTL.
    pub fn new(lease: Lease, holder: String, force_takeover: bool, fresh: bool) -> RunStart {
        RunStart {
            lease,
            lease_ttl: LEASE_TTL,
            holder,
            force_takeover,
            fresh,
            resumed_tokens: None,
        }
    }
}

impl<F: Fleet> RolloutEngine<F> {
    /// `hosts`: each host's record so far (all default on a fresh push).
    pub fn new(
        plan: RolloutPlan,
        fleet: F,
        journal: Journal,
        hosts: Vec<HostRecord>,
        start: RunStart,
        report: Reporter,
    ) -> Arc<RolloutEngine<F>> {
        let leases = vec![start.lease.clone(); plan.hosts.len()];
        Arc::new(RolloutEngine {
            plan,
            fleet: Arc::new(fleet),
            start,
            journal: Mutex::new(journal),
            hosts: Mutex::new(hosts),
            bytes_sent: AtomicU64::new(0),
            report,
            leases: Mutex::new(leases),
            stop: Mutex::new(None),
        })
    }

    /// Runs the rollout to its outcome. `interrupt` completes on Ctrl-C;
    /// it is first polled once the first wave's hosts are staged, so an
    /// interrupt before that keeps its default effect (nothing has changed
    /// yet).
    pub async fn run(
        self: Arc<Self>,
        interrupt: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Outcome> {
        if let Some(tokens) = &self.start.resumed_tokens {
            if let Some(reason) = self.superseded_since(tokens).await {
                self.record(Record::Halted {
                    reason: reason.clone(),
                })?;
                self.report.halted(&reason);
                return self.finish(Outcome::Superseded);
            }
        }
        // A resumed host whose activation was in flight when the last run
        // died: let the agent finish it before the new lease generation
        // fences it. Fenced at its commit, it would be reverted, and this
        // run would activate the host a second time.
        if !self.start.fresh {
            self.wait_for_activations_in_flight().await;
        }
        // Fence first: nothing is staged or changed without every lease.
        // Leases last from before they were asked for, as the engine counts.
        let leased_at = Instant::now();
        if let Err(reason) = self.acquire_leases().await {
            self.record(Record::Halted {
                reason: reason.clone(),
            })?;
            self.report.not_started(&reason);
            return self.finish(Outcome::NotStarted);
        }
        let tokens: BTreeMap<String, u64> = self
            .plan
            .hosts
            .iter()
            .zip(self.all_leases())
            .map(|(host, lease)| (host.clone(), lease.token))
            .collect();
        self.record(Record::Leased {
            generation: self.start.lease.generation,
            holder: self.start.holder.clone(),
            tokens,
        })?;
        let renewer = tokio::spawn(self.clone().renew_leases(leased_at));
        let result = self.clone().run_fenced(interrupt).await;
        renewer.abort();
        let all: Vec<usize> = (0..self.plan.hosts.len()).collect();
        self.release_leases(&all).await;
        let outcome = result?;
        self.finish(outcome)
    }

    /// Waits (through [`Fleet::settle`], which needs no lease) until every
    /// host journaled `activating` has ended the activation it was given.
    async fn wait_for_activations_in_flight(&self) {
        let mut waits = JoinSet::new();
        for (i, record) in self.snapshot().iter().enumerate() {
            if record.state == Some(HostState::Activating) {
                let (fleet, host) = (self.fleet.clone(), self.plan.hosts[i].clone());
                waits.spawn(async move {
                    let _ = fleet.settle(&host).await;
                });
            }
        }
        while waits.join_next().await.is_some() {}
    }

    fn record(&self, record: Record) -> anyhow::Result<()> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(record)
    }

    /// Journals a host state and waits until it is on disk (the fsync is
    /// shared with the other hosts' states written meanwhile: see
    /// [`Journal::append_deferred`]), then shows it. Memory follows the
    /// journal's file at once, so a task cancelled while it waits leaves
    /// the two the same. Other hosts' tasks may so see a state before it is
    /// on disk; what they do on it is to stop starting hosts (the failure
    /// budget) or to revert a host seen activated, both of which a resume
    /// after a crash finds again (an `activating` host is settled first).
    async fn host(
        &self,
        index: usize,
        state: HostState,
        cause: Option<Cause>,
        message: impl Into<String>,
    ) -> anyhow::Result<()> {
        let message = message.into();
        let record = self.host_record(index, state, cause, &message);
        // A block, not drop(): the lock guard must not live in the future.
        let (pending, done) = {
            let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            let pending = journal.append_deferred(record)?;
            (pending, self.remember(index, state, cause, &message))
        };
        pending.durable().await?;
        self.show(index, done, state, cause, &message);
        Ok(())
    }

    /// [`Self::host`] for a state a resume finds out again by itself
    /// (staged, skipped: staging is asked of the host anew): the rollout
    /// need not wait for the disk (see [`Journal::append_unsynced`]).
    fn host_unsynced(&self, index: usize, state: HostState, message: String) -> anyhow::Result<()> {
        let record = self.host_record(index, state, None, &message);
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.append_unsynced(record)?;
        let done = self.remember(index, state, None, &message);
        drop(journal);
        self.show(index, done, state, None, &message);
        Ok(())
    }

    fn host_record(
        &self,
        index: usize,
        state: HostState,
        cause: Option<Cause>,
        message: &str,
    ) -> Record {
        let (plan, host) = (&self.plan, &self.plan.hosts[index]);
        tracing::info!(rollout = %self.start.lease.rollout, service = %plan.service, version = %plan.version, host = %host, state = ?state, cause = ?cause, "{message}");
        Record::Host {
            host: host.clone(),
            state,
            cause,
            message: message.to_string(),
        }
    }

    /// Updates a host's record in memory (under the journal's lock, so
    /// memory holds what the file holds, in its order); returns how many
    /// hosts are done.
    fn remember(
        &self,
        index: usize,
        state: HostState,
        cause: Option<Cause>,
        message: &str,
    ) -> usize {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let record = &mut hosts[index];
        record.state = Some(state);
        record.cause = cause;
        record.message = message.to_string();
        if state == HostState::Activated {
            record.changed = true;
        }
        hosts
            .iter()
            .filter(|h| matches!(h.state, Some(HostState::Healthy | HostState::Skipped)))
            .count()
    }

    fn show(
        &self,
        index: usize,
        done: usize,
        state: HostState,
        cause: Option<Cause>,
        message: &str,
    ) {
        let (plan, host) = (&self.plan, &self.plan.hosts[index]);
        self.report
            .host(host, (done, plan.hosts.len()), state, cause, message);
    }

    async fn fail(&self, index: usize, failure: HostFailure) -> anyhow::Result<()> {
        self.host(
            index,
            HostState::Failed,
            Some(failure.cause),
            failure.message,
        )
        .await
    }

    fn snapshot(&self) -> Vec<HostRecord> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One host's state and cause, without copying every host's record
    /// (a wave of hundreds of hosts asks this for each).
    fn state_of(&self, index: usize) -> (Option<HostState>, Option<Cause>) {
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        (hosts[index].state, hosts[index].cause)
    }

    fn failures(&self) -> usize {
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|h| h.state == Some(HostState::Failed))
            .count()
    }

    fn finish(&self, outcome: Outcome) -> anyhow::Result<Outcome> {
        let hosts = self.snapshot();
        let count = |f: &dyn Fn(&HostRecord) -> bool| hosts.iter().filter(|h| f(h)).count();
        self.record(Record::Finished {
            outcome,
            hosts: hosts.len(),
            healthy: count(&|h| h.state == Some(HostState::Healthy)),
            skipped: count(&|h| h.state == Some(HostState::Skipped)),
            failed: count(&|h| h.cause.is_some()),
            reverted: count(&|h| h.state == Some(HostState::Reverted)),
            left: count(&|h| h.changed && h.state != Some(HostState::Reverted)),
            bytes_sent: self.bytes_sent.load(Ordering::SeqCst),
            elapsed_seconds: self.report.elapsed().as_secs_f64(),
        })?;
        self.report.summary(&self.plan, &hosts, outcome);
        Ok(outcome)
    }

    /// Leases on every host, in host order (see the module docs). Err: why
    /// not, every lease taken given back.
    async fn acquire_leases(&self) -> Result<(), String> {
        let hosts = &self.plan.hosts;
        let mut order: Vec<usize> = (0..hosts.len()).collect();
        order.sort_by(|a, b| hosts[*a].cmp(&hosts[*b]));
        let Some((&first, rest)) = order.split_first() else {
            return Ok(());
        };
        // The first host in sorted order alone: every push asks for it
        // first, so of two pushes over the same hosts exactly one gets it
        // and the other stops there, holding nothing. Past it, nothing
        // depends on the order (the agents' leases keep holders apart),
        // so a new push asks the rest at once: a thousand hosts cost one
        // round trip, not a thousand. A resume goes host by host, as
        // before, after waiting for the activations its dead predecessor
        // left in flight (see `run`).
        if !self.start.fresh {
            for &i in &order {
                if let Err(reason) = self.acquire_one(i).await {
                    let taken: Vec<usize> = order.iter().copied().take_while(|&t| t != i).collect();
                    self.release_leases(&taken).await;
                    return Err(reason);
                }
            }
            return Ok(());
        }
        self.acquire_one(first).await?;
        let mut asks = JoinSet::new();
        for &i in rest {
            let (fleet, host, lease, holder, force) = (
                self.fleet.clone(),
                hosts[i].clone(),
                self.start.lease.clone(),
                self.start.holder.clone(),
                self.start.force_takeover,
            );
            asks.spawn(
                async move { (i, fleet.acquire_lease(&host, &lease, &holder, force).await) },
            );
        }
        let mut taken = vec![first];
        let mut refused = Vec::new();
        while let Some(done) = asks.join_next().await {
            let (i, grant) = done.map_err(|e| format!("lease task failed: {e}"))?;
            match grant {
                Ok(grant) => {
                    self.granted(i, grant);
                    taken.push(i);
                }
                Err(refusal) => refused.push((i, refusal.0)),
            }
        }
        // The first refusal in host order, so the message does not depend
        // on which answer came first.
        refused.sort_by(|a, b| hosts[a.0].cmp(&hosts[b.0]));
        match refused.into_iter().next() {
            None => Ok(()),
            Some((i, reason)) => {
                self.release_leases(&taken).await;
                Err(format!("{}: {reason}", hosts[i]))
            }
        }
    }

    /// Takes host `i`'s lease alone (see [`Self::acquire_leases`]).
    async fn acquire_one(&self, i: usize) -> Result<(), String> {
        let host = &self.plan.hosts[i];
        let grant = self
            .fleet
            .acquire_lease(
                host,
                &self.start.lease,
                &self.start.holder,
                self.start.force_takeover,
            )
            .await
            .map_err(|refusal| format!("{host}: {}", refusal.0))?;
        self.granted(i, grant);
        Ok(())
    }

    /// Records a granted lease (and says whom it displaced).
    fn granted(&self, i: usize, grant: super::fleet::LeaseGrant) {
        if let Some(displaced) = grant.displaced {
            self.report.took_over(&self.plan.hosts[i], &displaced);
        }
        self.leases.lock().unwrap_or_else(|p| p.into_inner())[i].token = grant.token;
    }

    /// A resume's first question: did a later rollout take any host over
    /// since this rollout's last run? Yes if a host granted a higher token
    /// to another rollout than it granted ours (tokens only grow), or if a
    /// host this rollout finished no longer runs its release (changed
    /// without a lease: an operator's activate). Some: why, for people;
    /// then nothing is changed. A host that does not answer is left to the
    /// lease step, which fails on it anyway.
    pub async fn superseded_since(&self, tokens: &BTreeMap<String, u64>) -> Option<String> {
        let mut asks = JoinSet::new();
        for (i, host) in self.plan.hosts.iter().enumerate() {
            let (fleet, host) = (self.fleet.clone(), host.clone());
            asks.spawn(async move { (i, fleet.fence_state(&host).await) });
        }
        let records = self.snapshot();
        let mut reasons = Vec::new();
        while let Some(done) = asks.join_next().await {
            let Ok((i, Ok(state))) = done else {
                continue;
            };
            let host = &self.plan.hosts[i];
            let ours = tokens.get(host).copied().unwrap_or(0);
            if state.highest_rollout != self.start.lease.rollout && state.highest_token > ours {
                reasons.push((
                    i,
                    format!(
                        "{host} was taken over by rollout {} ({}) with fencing token {} (this rollout's: {ours})",
                        state.highest_rollout, state.highest_holder, state.highest_token
                    ),
                ));
                continue;
            }
            let finished_here = matches!(
                records[i].state,
                Some(HostState::Healthy | HostState::Activated)
            );
            if finished_here && state.running_sha256 != self.plan.sha256 {
                reasons.push((
                    i,
                    format!(
                        "{host} runs {} now, not the {} this rollout left there",
                        if state.running_version.is_empty() {
                            "nothing"
                        } else {
                            &state.running_version
                        },
                        self.plan.version
                    ),
                ));
            }
        }
        if reasons.is_empty() {
            return None;
        }
        reasons.sort();
        let reasons: Vec<String> = reasons.into_iter().map(|(_, r)| r).collect();
        Some(format!(
            "rollout {} was superseded, so it is not resumed and nothing was changed: {}",
            self.start.lease.rollout,
            reasons.join("; ")
        ))
    }

    /// Host `index`'s lease, with its token.
    fn lease(&self, index: usize) -> Lease {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())[index].clone()
    }

    fn all_leases(&self) -> Vec<Lease> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn stopped(&self) -> Option<Stop> {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first reason to stop wins; a superseded verdict outranks a lost
    /// lease (it forbids the revert).
    fn stop_with(&self, stop: Stop) {
        let mut current = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        let replace = matches!(
            (&*current, &stop),
            (None, _) | (Some(Stop::LeaseLost { .. }), Stop::Superseded { .. })
        );
        if replace {
            tracing::warn!(stop = ?stop, "the rollout stops touching hosts");
            *current = Some(stop);
        }
    }

    /// The host may still get calls under this run's lease (renewals,
    /// the release, a revert): all but the one a stop names. Whether
    /// anything may still be *changed* is [`Self::stopped`].
    fn may_touch(&self, index: usize) -> bool {
        match self.stopped() {
            Some(Stop::Superseded { host, .. } | Stop::LeaseLost { host, .. }) => host != index,
            None => true,
        }
    }

    /// Keeps the leases alive, every host at once, until the run ends
    /// (aborted then); see the module docs for when a lease is given up.
    async fn renew_leases(self: Arc<Self>, leased_at: Instant) {
        let ttl = self.start.lease_ttl;
        let mut valid_until = vec![leased_at + ttl; self.plan.hosts.len()];
        let mut last_error = vec![String::new(); self.plan.hosts.len()];
        loop {
            tokio::time::sleep(ttl / 6).await;
            let mut renewals = JoinSet::new();
            for (i, lease) in self.all_leases().into_iter().enumerate() {
                if !self.may_touch(i) {
                    continue;
                }
                let (fleet, host) = (self.fleet.clone(), self.plan.hosts[i].clone());
                renewals.spawn(async move {
                    let sent = Instant::now();
                    let renewed =
                        tokio::time::timeout(ttl / 6, fleet.renew_lease(&host, &lease)).await;
                    (i, sent, renewed)
                });
            }
            while let Some(done) = renewals.join_next().await {
                let Ok((i, sent, renewed)) = done else {
                    continue;
                };
                match renewed {
                    Ok(Ok(())) => valid_until[i] = sent + ttl,
                    Ok(Err(failure)) if failure.cause == Cause::Superseded => {
                        self.stop_with(Stop::Superseded {
                            host: i,
                            message: format!("{}: {}", self.plan.hosts[i], failure.message),
                        });
                    }
                    Ok(Err(failure)) => last_error[i] = failure.message,
                    Err(_) => {
                        last_error[i] =
                            format!("no answer within {}", humantime::format_duration(ttl / 6))
                    }
                }
            }
            let now = Instant::now();
            for (i, until) in valid_until.iter().enumerate() {
                if self.may_touch(i) && until.saturating_duration_since(now) < ttl / 3 {
                    self.stop_with(Stop::LeaseLost {
                        host: i,
                        message: format!(
                            "the lease on {} could not be renewed in time ({}); this rollout no longer touches it",
                            self.plan.hosts[i], last_error[i]
                        ),
                    });
                }
            }
        }
    }

    async fn release_leases(&self, indexes: &[usize]) {
        let mut releases = JoinSet::new();
        for &i in indexes {
            if !self.may_touch(i) {
                continue;
            }
            let (fleet, host, lease) = (
                self.fleet.clone(),
                self.plan.hosts[i].clone(),
                self.lease(i),
            );
            releases.spawn(async move { fleet.release_lease(&host, &lease).await });
        }
        while releases.join_next().await.is_some() {}
    }

    /// Stages every host that still needs it, in the background, in wave
    /// order, `max_parallel` at once (and at most [`STAGING_WINDOW`]
    /// tasks alive): the waves run while later waves'
    /// hosts are still staging, and each wave waits for its own hosts
    /// ([`StagingProgress::wait_for`]). Dropping the guard stops it.
    fn start_staging(self: &Arc<Self>) -> (Arc<StagingProgress>, AbortOnDrop) {
        let records = self.snapshot();
        let needs_staging = |i: usize| matches!(records[i].state, None | Some(HostState::Staged));
        // Wave order, so the hosts needed first are staged first (and, with
        // peer fetch, are first in line for a peer).
        let mut in_wave = vec![false; records.len()];
        let mut todo: Vec<usize> = self.plan.waves.iter().flatten().copied().collect();
        todo.iter().for_each(|&i| in_wave[i] = true);
        todo.extend((0..records.len()).filter(|&i| !in_wave[i]));
        todo.retain(|&i| needs_staging(i));
        let progress = Arc::new(StagingProgress {
            ended: Mutex::new((0..records.len()).map(|i| !needs_staging(i)).collect()),
            failed: AtomicUsize::new(0),
            error: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
        });
        // The first wave's hosts go alone: with peer fetch the canary is
        // then the seed, not whichever host's status call answered first.
        let first_wave: std::collections::HashSet<usize> = self
            .plan
            .waves
            .first()
            .map(|wave| wave.iter().copied().collect())
            .unwrap_or_default();
        // Each host's rank is its place in wave order.
        // (host index, rank)
        type Ranked = Vec<(usize, u64)>;
        let (first, rest): (Ranked, Ranked) = todo
            .into_iter()
            .zip(0u64..)
            .partition(|(i, _)| first_wave.contains(i));
        let (engine, shared) = (self.clone(), progress.clone());
        let task = tokio::spawn(async move {
            let semaphore = Arc::new(tokio::sync::Semaphore::new(
                engine.plan.settings.max_parallel,
            ));
            for batch in [first, rest] {
                let mut staging = JoinSet::new();
                let mut batch = batch.into_iter();
                loop {
                    // A host's task exists only once it is within the
                    // window: a thousand futures waiting for their turn
                    // cost megabytes, and hosts come in wave order anyway.
                    while staging.len() < STAGING_WINDOW {
                        let Some((i, rank)) = batch.next() else { break };
                        let (fleet, host, semaphore) = (
                            engine.fleet.clone(),
                            engine.plan.hosts[i].clone(),
                            semaphore.clone(),
                        );
                        staging.spawn(async move {
                            let _permit = semaphore.acquire_owned().await;
                            (i, fleet.stage(&host, rank).await)
                        });
                    }
                    let Some(done) = staging.join_next().await else {
                        break;
                    };
                    let recorded = match done {
                        Ok((i, result)) => engine.staged(i, result, &shared).await.map(|()| i),
                        Err(e) => Err(e.into()),
                    };
                    match recorded {
                        Ok(i) => shared.lock_ended()[i] = true,
                        Err(e) => *shared.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
                    }
                    shared.changed.notify_waiters();
                }
            }
        });
        (progress, AbortOnDrop(task))
    }

    /// Journals one host's staging result.
    async fn staged(
        &self,
        i: usize,
        result: Result<Staged, HostFailure>,
        progress: &StagingProgress,
    ) -> anyhow::Result<()> {
        // Not fsync'd: a resume asks each host again what it holds.
        let unsynced = |state, message: String| self.host_unsynced(i, state, message);
        match result {
            Ok(Staged::AlreadyOnTarget) => unsynced(HostState::Skipped, String::new()),
            Ok(Staged::SameBytesAs { reported_as }) => unsynced(
                HostState::Skipped,
                format!(
                    "{}{reported_as}: nothing to upgrade, and it goes on reporting {reported_as} (the agent does not re-execute the executable it runs)",
                    super::output::SAME_BYTES
                ),
            ),
            Ok(Staged::Uploaded { bytes_sent }) => {
                self.bytes_sent.fetch_add(bytes_sent, Ordering::SeqCst);
                unsynced(HostState::Staged, String::new())
            }
            Err(failure) => {
                progress.failed.fetch_add(1, Ordering::SeqCst);
                self.fail(i, failure).await
            }
        }
    }

    async fn run_fenced(
        self: Arc<Self>,
        interrupt: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Outcome> {
        let settings = &self.plan.settings;
        let (staging, stop_staging) = self.start_staging();
        // The first wave starts once its own hosts are staged (every host,
        // with `stage_first`). A fresh push with a host that could not be
        // staged by then stops here, with no host changed; one found later
        // counts against the failure budget like any failed host (see the
        // module docs).
        let before_first_wave: Vec<usize> = match settings.stage_first {
            true => (0..self.plan.hosts.len()).collect(),
            false => self.plan.waves.first().cloned().unwrap_or_default(),
        };
        staging.wait_for(&before_first_wave).await?;
        let unstaged = staging.failed.load(Ordering::SeqCst);
        if unstaged > 0 && self.start.fresh {
            let reason = format!("{unstaged} host(s) could not be staged; no host was changed");
            self.record(Record::Halted {
                reason: reason.clone(),
            })?;
            self.report.not_started(&reason);
            return Ok(Outcome::NotStarted);
        }
        let interrupted = Arc::new(AtomicBool::new(false));
        // Wakes a wave waiting for its hosts' staging.
        let interrupt_seen = Arc::new(tokio::sync::Notify::new());
        let watcher = {
            let (interrupted, seen, engine) =
                (interrupted.clone(), interrupt_seen.clone(), self.clone());
            tokio::spawn(async move {
                interrupt.await;
                interrupted.store(true, Ordering::SeqCst);
                seen.notify_one();
                engine.report.interrupted();
            })
        };
        let deadline = Instant::now() + settings.progress_deadline;
        let deadline_passed = || {
            format!(
                "the progress deadline of {} passed",
                humantime::format_duration(settings.progress_deadline)
            )
        };
        let mut halt: Option<String> = None;
        'waves: for (w, wave) in self.plan.waves.iter().enumerate() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let staged = tokio::select! {
                staged = tokio::time::timeout(remaining, staging.wait_for(wave)) => staged,
                () = interrupt_seen.notified() => Ok(Ok(())),
            };
            match staged {
                Ok(result) => result?,
                Err(_) => {
                    halt = Some(deadline_passed());
                    break 'waves;
                }
            }
            if interrupted.load(Ordering::SeqCst) {
                return self.pause(&watcher);
            }
            // Hosts that could not be staged are failed hosts.
            let failures = self.failures();
            if failures > self.plan.budget {
                let unstaged = staging.failed.load(Ordering::SeqCst);
                halt = Some(format!(
                    "{failures} host(s) failed, above the budget of {} (--max-failures {}); {unstaged} of them could not be staged",
                    self.plan.budget, settings.max_failures
                ));
                break;
            }
            let records = self.snapshot();
            let pending: Vec<usize> = wave
                .iter()
                .copied()
                .filter(|&i| {
                    !matches!(
                        records[i].state,
                        Some(
                            HostState::Healthy
                                | HostState::Skipped
                                | HostState::Failed
                                | HostState::Reverted
                        )
                    )
                })
                .collect();
            if pending.is_empty() {
                continue;
            }
            if w > 0 && !settings.pause_between_waves.is_zero() {
                tokio::time::sleep(settings.pause_between_waves).await;
            }
            self.record(Record::Wave {
                index: w + 1,
                of: self.plan.waves.len(),
                hosts: pending
                    .iter()
                    .map(|&i| self.plan.hosts[i].clone())
                    .collect(),
            })?;
            self.report
                .wave(w + 1, self.plan.waves.len(), pending.len());
            let semaphore = Arc::new(tokio::sync::Semaphore::new(settings.max_parallel));
            let mut running = JoinSet::new();
            // Set by the host that took the failures past the budget: no
            // further host of this wave starts.
            let stop = Arc::new(AtomicBool::new(false));
            for i in pending {
                let permit = semaphore.clone().acquire_owned().await?;
                if stop.load(Ordering::SeqCst)
                    || interrupted.load(Ordering::SeqCst)
                    || self.stopped().is_some()
                {
                    break;
                }
                let (engine, stop, budget) = (self.clone(), stop.clone(), self.plan.budget);
                running.spawn(async move {
                    let _permit = permit;
                    let result = engine.roll_host(i).await;
                    if engine.failures() > budget {
                        stop.store(true, Ordering::SeqCst);
                    }
                    result
                });
                // Let tasks that finished free their permits before deciding.
                while let Some(done) = running.try_join_next() {
                    done??;
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let drained = tokio::time::timeout(remaining, async {
                while let Some(done) = running.join_next().await {
                    done??;
                }
                anyhow::Ok(())
            })
            .await;
            match drained {
                Ok(result) => result?,
                Err(_) => {
                    running.abort_all();
                    halt = Some(deadline_passed());
                    break 'waves;
                }
            }
            if let Some(stopped) = self.stopped() {
                halt = Some(match stopped {
                    Stop::Superseded { message, .. } | Stop::LeaseLost { message, .. } => message,
                });
                break;
            }
            let failures = self.failures();
            if failures > self.plan.budget {
                halt = Some(format!(
                    "{failures} host(s) failed, above the budget of {} (--max-failures {})",
                    self.plan.budget, settings.max_failures
                ));
                break;
            }
            if interrupted.load(Ordering::SeqCst) {
                return self.pause(&watcher);
            }
            if Instant::now() >= deadline {
                halt = Some(deadline_passed());
                break;
            }
        }
        watcher.abort();
        // Whatever is left of staging is not needed after a halt.
        drop(stop_staging);
        // A stop that came while the last wave finished.
        if let (None, Some(Stop::Superseded { message, .. })) = (&halt, self.stopped()) {
            halt = Some(message);
        }
        let Some(reason) = halt else {
            return Ok(Outcome::Done);
        };
        self.record(Record::Halted {
            reason: reason.clone(),
        })?;
        self.report.halted(&reason);
        if let Some(Stop::Superseded { host, .. }) = self.stopped() {
            // Reverting would undo the later rollout's work.
            tracing::warn!(host = %self.plan.hosts[host], "superseded: nothing is reverted");
            return Ok(Outcome::Superseded);
        }
        if !settings.auto_revert {
            return Ok(Outcome::HaltedPartial);
        }
        Ok(if self.revert().await? {
            Outcome::HaltedReverted
        } else {
            Outcome::HaltedPartial
        })
    }

    /// Ctrl-C seen between steps: the rollout pauses where it is, to be
    /// resumed.
    fn pause(&self, watcher: &tokio::task::JoinHandle<()>) -> anyhow::Result<Outcome> {
        watcher.abort();
        self.record(Record::Paused {
            reason: "interrupted (Ctrl-C)".into(),
        })?;
        Ok(Outcome::Aborted)
    }

    /// One host through its step: activate (unless already done) and gate.
    async fn roll_host(&self, index: usize) -> anyhow::Result<()> {
        let host = &self.plan.hosts[index];
        let (previous, _) = self.state_of(index);
        // After a crash, the agent may have finished what the journal only
        // shows as started: never activate a host twice.
        let mut pid = None;
        if matches!(previous, Some(HostState::Activating | HostState::Activated)) {
            match self.fleet.settle(host).await {
                Ok(Some(current)) => {
                    if previous == Some(HostState::Activating) {
                        self.host(
                            index,
                            HostState::Activated,
                            None,
                            "found activated when resuming",
                        )
                        .await?;
                    }
                    pid = Some(current);
                }
                Ok(None) => {}
                Err(failure) => return self.fail(index, failure).await,
            }
        }
        let pid = match pid {
            Some(pid) => pid,
            None => {
                if self.stopped().is_some() {
                    // Stopped while this host waited for its turn.
                    return Ok(());
                }
                self.host(index, HostState::Activating, None, "").await?;
                match self.fleet.activate(host, &self.lease(index)).await {
                    Ok(activated) => {
                        self.host(index, HostState::Activated, None, activated.message)
                            .await?;
                        activated.pid
                    }
                    Err(failure) => {
                        if failure.cause == Cause::Superseded {
                            self.stop_with(Stop::Superseded {
                                host: index,
                                message: format!("{host}: {}", failure.message),
                            });
                        }
                        return self.fail(index, failure).await;
                    }
                }
            }
        };
        let gate = HealthGate::new(&self.plan.settings);
        let progress = |text: String| self.report.phase(host, &text);
        match gate.wait_healthy(&*self.fleet, host, pid, &progress).await {
            Ok(()) => self.host(index, HostState::Healthy, None, "").await,
            Err(failure) => self.fail(index, failure).await,
        }
    }

    /// Rolls back, in parallel, every host this rollout activated and has
    /// not reverted yet, and every host whose activation has no known
    /// outcome (asked first: reverted if it changed). True: all of them are
    /// back, or never changed.
    async fn revert(self: &Arc<Self>) -> anyhow::Result<bool> {
        let candidates: Vec<usize> = self
            .snapshot()
            .iter()
            .enumerate()
            .filter(|(_, h)| {
                (h.changed && h.state != Some(HostState::Reverted))
                    || h.state == Some(HostState::Activating)
            })
            .map(|(i, _)| i)
            .filter(|&i| self.may_touch(i))
            .collect();
        self.report.reverting(candidates.len());
        let mut reverts = JoinSet::new();
        for i in candidates {
            let engine = self.clone();
            reverts.spawn(async move {
                let host = &engine.plan.hosts[i];
                // The host keeps the cause it failed with, if it did.
                let (state, cause) = engine.state_of(i);
                if state == Some(HostState::Activating) {
                    // No answer came back: ask what it runs (waiting while
                    // it still works on the activation).
                    match engine.fleet.settle(host).await {
                        Ok(Some(pid)) => {
                            engine
                                .host(
                                    i,
                                    HostState::Activated,
                                    cause,
                                    format!("found on the new version (pid {pid}) after the halt"),
                                )
                                .await?
                        }
                        Ok(None) => {
                            return engine
                                .host(
                                    i,
                                    HostState::Unchanged,
                                    cause,
                                    "asked after the halt: still on its previous version",
                                )
                                .await
                        }
                        Err(failure) => {
                            return engine
                                .host(
                                    i,
                                    HostState::RevertFailed,
                                    cause,
                                    format!(
                                        "its outcome is unknown and it could not be asked: {}",
                                        failure.message
                                    ),
                                )
                                .await
                        }
                    }
                }
                let (state, message) = match engine.fleet.revert(host, &engine.lease(i)).await {
                    Ok(message) => (HostState::Reverted, message),
                    Err(message) => (HostState::RevertFailed, message),
                };
                engine.host(i, state, cause, message).await
            });
        }
        while let Some(done) = reverts.join_next().await {
            done??;
        }
        Ok(self.snapshot().iter().enumerate().all(|(i, h)| {
            h.state != Some(HostState::RevertFailed)
                    // A host given up (lease lost) that this run changed
                    // stays changed.
                    && (self.may_touch(i) || !h.changed || h.state == Some(HostState::Reverted))
        }))
    }
}
