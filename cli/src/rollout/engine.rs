//! The [`RolloutEngine`]: every decision of a rollout, over a [`Fleet`].
//!
//! One run (a push, or a resume) goes:
//!
//! 1. Fence: take the lease on every host in sorted host order. Of two
//!    concurrent pushes the one that gets the first host wins; the other
//!    fails there, gives back what it took, and changes nothing.
//! 2. Stage every host still to do, `max_parallel` at once: hosts already on
//!    the target are skipped, the others get the release. On a fresh push a
//!    host that cannot be staged stops the rollout before any host changes
//!    (a resume goes on: its failed hosts count against the budget).
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
//! host is activated twice. Leases are renewed every third of their TTL
//! while the run lasts and released at its end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::task::JoinSet;

use super::fleet::{Fleet, HostFailure, Lease, Staged, LEASE_TTL};
use super::gate::HealthGate;
pub use super::journal::HostRecord;
use super::journal::{Cause, HostState, Journal, Outcome, Record};
use super::output::Reporter;
use super::plan::RolloutPlan;

/// How this run starts.
pub struct RunStart {
    /// This run's fence: the rollout at the next generation.
    pub lease: Lease,
    /// Who holds the leases, for the agents' logs and refusals.
    pub holder: String,
    /// Take the leases even from another rollout.
    pub force_takeover: bool,
    /// A new push rather than a resume: a host that cannot be staged stops
    /// it before anything changes.
    pub fresh: bool,
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
        Arc::new(RolloutEngine {
            plan,
            fleet: Arc::new(fleet),
            start,
            journal: Mutex::new(journal),
            hosts: Mutex::new(hosts),
            bytes_sent: AtomicU64::new(0),
            report,
        })
    }

    /// Runs the rollout to its outcome. `interrupt` completes on Ctrl-C;
    /// it is first polled once staging is over, so an interrupt before
    /// that keeps its default effect (nothing has changed yet).
    pub async fn run(
        self: Arc<Self>,
        interrupt: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Outcome> {
        // Fence first: nothing is staged or changed without every lease.
        if let Err(reason) = self.acquire_leases().await {
            self.record(Record::Halted {
                reason: reason.clone(),
            })?;
            self.report.not_started(&reason);
            return self.finish(Outcome::NotStarted);
        }
        self.record(Record::Leased {
            generation: self.start.lease.generation,
            holder: self.start.holder.clone(),
            tokens: Default::default(),
        })?;
        let renewer = tokio::spawn(self.clone().renew_leases());
        let result = self.clone().run_fenced(interrupt).await;
        renewer.abort();
        let all: Vec<usize> = (0..self.plan.hosts.len()).collect();
        self.release_leases(&all).await;
        let outcome = result?;
        self.finish(outcome)
    }

    fn record(&self, record: Record) -> anyhow::Result<()> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(record)
    }

    /// Journals a host state, then updates memory and the screen.
    fn host(
        &self,
        index: usize,
        state: HostState,
        cause: Option<Cause>,
        message: impl Into<String>,
    ) -> anyhow::Result<()> {
        let message = message.into();
        let (plan, host) = (&self.plan, &self.plan.hosts[index]);
        tracing::info!(rollout = %self.start.lease.rollout, service = %plan.service, version = %plan.version, host = %host, state = ?state, cause = ?cause, "{message}");
        self.record(Record::Host {
            host: host.clone(),
            state,
            cause,
            message: message.clone(),
        })?;
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let record = &mut hosts[index];
        record.state = Some(state);
        record.cause = cause;
        record.message = message.clone();
        if state == HostState::Activated {
            record.changed = true;
        }
        let done = hosts
            .iter()
            .filter(|h| matches!(h.state, Some(HostState::Healthy | HostState::Skipped)))
            .count();
        drop(hosts);
        self.report
            .host(host, (done, plan.hosts.len()), state, cause, &message);
        Ok(())
    }

    fn fail(&self, index: usize, failure: HostFailure) -> anyhow::Result<()> {
        self.host(
            index,
            HostState::Failed,
            Some(failure.cause),
            failure.message,
        )
    }

    fn snapshot(&self) -> Vec<HostRecord> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn failures(&self) -> usize {
        self.snapshot()
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
        let mut taken = Vec::new();
        for i in order {
            let lease = &self.start.lease;
            let grant = self
                .fleet
                .acquire_lease(
                    &hosts[i],
                    lease,
                    &self.start.holder,
                    self.start.force_takeover,
                )
                .await;
            match grant {
                Ok(grant) => {
                    if let Some(displaced) = grant.displaced {
                        self.report.took_over(&hosts[i], &displaced);
                    }
                    taken.push(i);
                }
                Err(refusal) => {
                    self.release_leases(&taken).await;
                    return Err(format!("{}: {}", hosts[i], refusal.0));
                }
            }
        }
        Ok(())
    }

    /// Keeps the leases alive; aborted when the run ends.
    async fn renew_leases(self: Arc<Self>) {
        loop {
            tokio::time::sleep(LEASE_TTL / 3).await;
            for host in &self.plan.hosts {
                self.fleet.renew_lease(host, &self.start.lease).await;
            }
        }
    }

    async fn release_leases(&self, indexes: &[usize]) {
        let mut releases = JoinSet::new();
        for &i in indexes {
            let (fleet, host, lease) = (
                self.fleet.clone(),
                self.plan.hosts[i].clone(),
                self.start.lease.clone(),
            );
            releases.spawn(async move { fleet.release_lease(&host, &lease).await });
        }
        while releases.join_next().await.is_some() {}
    }

    /// Stages every host that still needs it, in parallel (bounded). Some:
    /// the rollout stops here.
    async fn stage_all(&self) -> anyhow::Result<Option<Outcome>> {
        let todo: Vec<usize> = self
            .snapshot()
            .iter()
            .enumerate()
            .filter(|(_, h)| matches!(h.state, None | Some(HostState::Staged)))
            .map(|(i, _)| i)
            .collect();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(self.plan.settings.max_parallel));
        let mut staging = JoinSet::new();
        for i in todo {
            let (fleet, host, semaphore) = (
                self.fleet.clone(),
                self.plan.hosts[i].clone(),
                semaphore.clone(),
            );
            staging.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                (i, fleet.stage(&host).await)
            });
        }
        let mut unstaged = Vec::new();
        while let Some(done) = staging.join_next().await {
            let (i, result) = done?;
            match result {
                Ok(Staged::AlreadyOnTarget) => self.host(i, HostState::Skipped, None, "")?,
                Ok(Staged::Uploaded { bytes_sent }) => {
                    self.bytes_sent.fetch_add(bytes_sent, Ordering::SeqCst);
                    self.host(i, HostState::Staged, None, "")?
                }
                Err(failure) => unstaged.push((i, failure)),
            }
        }
        if unstaged.is_empty() {
            return Ok(None);
        }
        unstaged.sort_by_key(|(i, _)| *i);
        let count = unstaged.len();
        for (i, failure) in unstaged {
            self.fail(i, failure)?;
        }
        if !self.start.fresh {
            return Ok(None);
        }
        let reason = format!("{count} host(s) could not be staged; no host was changed");
        self.record(Record::Halted {
            reason: reason.clone(),
        })?;
        self.report.not_started(&reason);
        Ok(Some(Outcome::NotStarted))
    }

    async fn run_fenced(
        self: Arc<Self>,
        interrupt: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Outcome> {
        if let Some(outcome) = self.stage_all().await? {
            return Ok(outcome);
        }
        let settings = &self.plan.settings;
        let interrupted = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (interrupted, engine) = (interrupted.clone(), self.clone());
            tokio::spawn(async move {
                interrupt.await;
                interrupted.store(true, Ordering::SeqCst);
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
            let pending: Vec<usize> = wave
                .iter()
                .copied()
                .filter(|&i| {
                    !matches!(
                        self.snapshot()[i].state,
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
                if stop.load(Ordering::SeqCst) || interrupted.load(Ordering::SeqCst) {
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
            let failures = self.failures();
            if failures > self.plan.budget {
                halt = Some(format!(
                    "{failures} host(s) failed, above the budget of {} (--max-failures {})",
                    self.plan.budget, settings.max_failures
                ));
                break;
            }
            if interrupted.load(Ordering::SeqCst) {
                watcher.abort();
                self.record(Record::Paused {
                    reason: "interrupted (Ctrl-C)".into(),
                })?;
                return Ok(Outcome::Aborted);
            }
            if Instant::now() >= deadline {
                halt = Some(deadline_passed());
                break;
            }
        }
        watcher.abort();
        let Some(reason) = halt else {
            return Ok(Outcome::Done);
        };
        self.record(Record::Halted {
            reason: reason.clone(),
        })?;
        self.report.halted(&reason);
        if !settings.auto_revert {
            return Ok(Outcome::HaltedPartial);
        }
        Ok(if self.revert().await? {
            Outcome::HaltedReverted
        } else {
            Outcome::HaltedPartial
        })
    }

    /// One host through its step: activate (unless already done) and gate.
    async fn roll_host(&self, index: usize) -> anyhow::Result<()> {
        let host = &self.plan.hosts[index];
        let previous = self.snapshot()[index].state;
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
                        )?;
                    }
                    pid = Some(current);
                }
                Ok(None) => {}
                Err(failure) => return self.fail(index, failure),
            }
        }
        let pid = match pid {
            Some(pid) => pid,
            None => {
                self.host(index, HostState::Activating, None, "")?;
                match self.fleet.activate(host, &self.start.lease).await {
                    Ok(activated) => {
                        self.host(index, HostState::Activated, None, activated.message)?;
                        activated.pid
                    }
                    Err(failure) => return self.fail(index, failure),
                }
            }
        };
        let gate = HealthGate::new(&self.plan.settings);
        match gate.wait_healthy(&*self.fleet, host, pid).await {
            Ok(()) => self.host(index, HostState::Healthy, None, ""),
            Err(failure) => self.fail(index, failure),
        }
    }

    /// Rolls back, in parallel, every host this rollout activated and has
    /// not reverted yet. True: all of them are back.
    async fn revert(self: &Arc<Self>) -> anyhow::Result<bool> {
        let changed: Vec<usize> = self
            .snapshot()
            .iter()
            .enumerate()
            .filter(|(_, h)| h.changed && h.state != Some(HostState::Reverted))
            .map(|(i, _)| i)
            .collect();
        self.report.reverting(changed.len());
        let mut reverts = JoinSet::new();
        for i in changed {
            let engine = self.clone();
            reverts.spawn(async move {
                let host = &engine.plan.hosts[i];
                let (state, message) = match engine.fleet.revert(host, &engine.start.lease).await {
                    Ok(message) => (HostState::Reverted, message),
                    Err(message) => (HostState::RevertFailed, message),
                };
                // The host keeps the cause it failed with, if it did.
                let cause = engine.snapshot()[i].cause;
                engine.host(i, state, cause, message)
            });
        }
        while let Some(done) = reverts.join_next().await {
            done??;
        }
        Ok(self
            .snapshot()
            .iter()
            .all(|h| h.state != Some(HostState::RevertFailed)))
    }
}
