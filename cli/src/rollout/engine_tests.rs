//! The engine's decisions against the in-memory [`FakeFleet`]: which hosts
//! get which calls, the outcome (and so the exit code), and what the
//! journal records.

use std::time::Duration;

use super::engine::{HostRecord, RolloutEngine, RunStart, STAGING_WINDOW};
use super::fake_fleet::{pid_of, FakeFleet, Op};
use super::fleet::{FenceState, HostFailure, Lease, Probe};
use super::journal::{self, Cause, HostState, Journal, Line, Outcome, Record};
use super::output::Reporter;
use super::output::{verdict, Changes};
use super::plan::{failure_budget, parse_waves, plan_waves, RolloutPlan};
use super::settings::RolloutSettings;

fn hosts(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("h{i}:7700")).collect()
}

/// Settings that gate at the first healthy answer, so tests run fast.
fn fast() -> RolloutSettings {
    RolloutSettings {
        canary: 1,
        waves: "100%".into(),
        max_parallel: 4,
        healthy_checks: 1,
        min_healthy_time: Duration::ZERO,
        healthy_deadline: Duration::from_millis(400),
        progress_deadline: Duration::from_secs(30),
        max_failures: "0".into(),
        auto_revert: true,
        pause_between_waves: Duration::ZERO,
        peer_fetch: 0,
        stage_first: false,
    }
}

fn plan(hosts: Vec<String>, settings: RolloutSettings) -> RolloutPlan {
    let waves = parse_waves(&settings.waves).unwrap();
    RolloutPlan {
        service: "web".into(),
        version: "2.0.0".into(),
        sha256: "ab".repeat(32),
        size: 10,
        artifact: "/nonexistent/web-2.0.0".into(),
        waves: plan_waves(hosts.len(), settings.canary, &waves),
        budget: failure_budget(&settings.max_failures, hosts.len()).unwrap(),
        hosts,
        settings,
        allow_downgrade: false,
        fetch_url: None,
    }
}

struct Finished {
    outcome: Outcome,
    lines: Vec<Line>,
    _dir: tempfile::TempDir,
}

impl Finished {
    /// The last state journaled for `host`, with its cause.
    fn state(&self, host: &str) -> Option<(HostState, Option<Cause>)> {
        self.lines.iter().rev().find_map(|l| match &l.record {
            Record::Host {
                host: h,
                state,
                cause,
                ..
            } if h == host => Some((*state, *cause)),
            _ => None,
        })
    }

    /// Every state journaled for `host`, in order.
    fn states(&self, host: &str) -> Vec<HostState> {
        self.lines
            .iter()
            .filter_map(|l| match &l.record {
                Record::Host { host: h, state, .. } if h == host => Some(*state),
                _ => None,
            })
            .collect()
    }

    fn halted(&self) -> Option<String> {
        self.lines.iter().find_map(|l| match &l.record {
            Record::Halted { reason } => Some(reason.clone()),
            _ => None,
        })
    }

    fn waves(&self) -> Vec<usize> {
        self.lines
            .iter()
            .filter_map(|l| match &l.record {
                Record::Wave { index, .. } => Some(*index),
                _ => None,
            })
            .collect()
    }

    fn finished(&self) -> Record {
        self.lines.last().unwrap().record.clone()
    }
}

/// Runs `plan` on `fleet` from scratch (generation 1).
async fn push(plan: RolloutPlan, fleet: &FakeFleet) -> Finished {
    let records = vec![HostRecord::default(); plan.hosts.len()];
    run(plan, fleet, records, 1, true, std::future::pending()).await
}

async fn run(
    plan: RolloutPlan,
    fleet: &FakeFleet,
    records: Vec<HostRecord>,
    generation: u64,
    fresh: bool,
    interrupt: impl std::future::Future<Output = ()> + Send + 'static,
) -> Finished {
    run_custom(plan, fleet, records, generation, fresh, interrupt, |_| {}).await
}

/// [`run`], with the run's start adjusted (lease TTL, resumed tokens).
async fn run_custom(
    plan: RolloutPlan,
    fleet: &FakeFleet,
    records: Vec<HostRecord>,
    generation: u64,
    fresh: bool,
    interrupt: impl std::future::Future<Output = ()> + Send + 'static,
    adjust: impl FnOnce(&mut RunStart),
) -> Finished {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::create(dir.path(), "r1", false).unwrap();
    let path = journal.path.clone();
    let mut start = RunStart::new(
        Lease {
            rollout: "r1".into(),
            generation,
            token: 0,
        },
        "test".into(),
        false,
        fresh,
    );
    adjust(&mut start);
    let engine = RolloutEngine::new(
        plan,
        fleet.clone(),
        journal,
        records,
        start,
        Reporter::quiet(),
    );
    let outcome = tokio::time::timeout(Duration::from_secs(20), engine.run(interrupt))
        .await
        .expect("the rollout ends")
        .unwrap();
    Finished {
        outcome,
        lines: journal::read_lines(&path).unwrap(),
        _dir: dir,
    }
}

fn failure(cause: Cause) -> HostFailure {
    HostFailure::new(cause, format!("{cause:?} on purpose"))
}

fn sorted(mut hosts: Vec<String>) -> Vec<String> {
    hosts.sort();
    hosts
}

#[tokio::test]
async fn a_healthy_fleet_is_done_each_host_activated_once_under_every_lease() {
    let fleet = FakeFleet::new();
    fleet.upload_bytes(10);
    let settings = RolloutSettings {
        waves: "1,50%,100%".into(),
        ..fast()
    };
    let done = push(plan(hosts(4), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::Done);
    assert_eq!(done.outcome.exit_code(), 0);
    assert_eq!(sorted(fleet.hosts_with(Op::Activate)), hosts(4));
    assert_eq!(done.waves(), vec![1, 2, 3]);
    for host in hosts(4) {
        assert_eq!(
            done.states(&host),
            vec![
                HostState::Staged,
                HostState::Activating,
                HostState::Activated,
                HostState::Healthy
            ]
        );
    }
    // Fence first: every lease before any stage, and all given back.
    let calls = fleet.calls();
    let last_acquire = calls.iter().rposition(|c| c.op == Op::Acquire).unwrap();
    let first_stage = calls.iter().position(|c| c.op == Op::Stage).unwrap();
    assert!(last_acquire < first_stage, "{calls:?}");
    assert_eq!(sorted(fleet.hosts_with(Op::Release)), hosts(4));
    assert!(calls.iter().filter(|c| c.op == Op::Activate).all(|c| c
        .lease
        .as_ref()
        .unwrap()
        .generation
        == 1));
    // Each host's calls carry the fencing token it granted, journaled.
    assert!(calls
        .iter()
        .filter(|c| matches!(c.op, Op::Activate | Op::Release))
        .all(|c| c.lease.as_ref().unwrap().token == 1));
    let tokens = done
        .lines
        .iter()
        .find_map(|l| match &l.record {
            Record::Leased { tokens, .. } => Some(tokens.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(tokens.keys().cloned().collect::<Vec<_>>(), hosts(4));
    assert!(tokens.values().all(|&t| t == 1));
    match done.finished() {
        Record::Finished {
            outcome,
            healthy,
            failed,
            bytes_sent,
            ..
        } => {
            assert_eq!(
                (outcome, healthy, failed, bytes_sent),
                (Outcome::Done, 4, 0, 40)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn leases_are_taken_in_host_order_whatever_the_file_order() {
    let fleet = FakeFleet::new();
    let file_order = vec!["h3:7700".to_string(), "h1:7700".into(), "h2:7700".into()];
    push(plan(file_order, fast()), &fleet).await;
    assert_eq!(fleet.hosts_with(Op::Acquire), hosts(3));
}

#[tokio::test]
async fn a_refused_lease_starts_nothing_and_gives_back_the_leases_taken() {
    let fleet = FakeFleet::new();
    fleet.refuse_lease("h2:7700", "held by reloadctl push web 3.0 (rollout r0)");
    let done = push(plan(hosts(3), fast()), &fleet).await;
    assert_eq!(done.outcome, Outcome::NotStarted);
    assert_eq!(done.outcome.exit_code(), 1);
    // The first host alone, then the others at once; every lease taken is
    // given back.
    assert_eq!(fleet.hosts_with(Op::Acquire)[0], "h1:7700");
    assert_eq!(sorted(fleet.hosts_with(Op::Acquire)), hosts(3));
    assert_eq!(
        sorted(fleet.hosts_with(Op::Release)),
        vec!["h1:7700", "h3:7700"]
    );
    assert!(fleet.hosts_with(Op::Stage).is_empty());
    assert!(fleet.hosts_with(Op::Activate).is_empty());
    assert_eq!(
        done.halted().unwrap(),
        "h2:7700: held by reloadctl push web 3.0 (rollout r0)"
    );
    assert!(!done
        .lines
        .iter()
        .any(|l| matches!(l.record, Record::Leased { .. })));
}

#[tokio::test]
async fn a_staging_failure_stops_a_push_before_any_activation() {
    let fleet = FakeFleet::new();
    // The canary, the first wave: the push stops with nothing changed.
    fleet.fail_stage("h1:7700", failure(Cause::Unreachable));
    let done = push(plan(hosts(4), fast()), &fleet).await;
    assert_eq!(done.outcome, Outcome::NotStarted);
    // The first wave is staged alone, first.
    assert_eq!(fleet.hosts_with(Op::Stage)[0], "h1:7700");
    assert!(fleet.hosts_with(Op::Activate).is_empty());
    assert!(fleet.hosts_with(Op::Revert).is_empty());
    assert_eq!(
        done.state("h1:7700"),
        Some((HostState::Failed, Some(Cause::Unreachable)))
    );
    assert_eq!(
        done.halted().unwrap(),
        "1 host(s) could not be staged; no host was changed"
    );
    assert_eq!(sorted(fleet.hosts_with(Op::Release)), hosts(4));
}

#[tokio::test]
async fn later_waves_stage_while_the_canary_runs() {
    let fleet = FakeFleet::new();
    let slow = Duration::from_millis(300);
    fleet.stage_delay("h3:7700", slow);
    let done = push(plan(hosts(3), fast()), &fleet).await;
    assert_eq!(done.outcome, Outcome::Done);
    let calls = fleet.calls();
    let at = |op: Op, host: &str| {
        calls
            .iter()
            .find(|c| c.op == op && c.host == host)
            .unwrap()
            .at
    };
    // The canary was activated while h3 was still staging, and h3 was
    // activated only once staged.
    assert!(
        at(Op::Activate, "h1:7700") < at(Op::Stage, "h3:7700") + slow,
        "{calls:?}"
    );
    assert!(at(Op::Activate, "h3:7700") >= at(Op::Stage, "h3:7700") + slow);
    for host in hosts(3) {
        assert_eq!(done.state(&host), Some((HostState::Healthy, None)));
    }
}

#[tokio::test]
async fn hosts_are_staged_ranked_in_wave_order() {
    let fleet = FakeFleet::new();
    let settings = RolloutSettings {
        waves: "1,50%,100%".into(),
        ..fast()
    };
    // File order is not wave order.
    let file_order: Vec<String> = ["h5", "h2", "h6", "h1", "h4", "h3"]
        .iter()
        .map(|h| format!("{h}:7700"))
        .collect();
    let plan = plan(file_order, settings);
    let waves: Vec<Vec<String>> = plan
        .waves
        .iter()
        .map(|wave| wave.iter().map(|&i| plan.hosts[i].clone()).collect())
        .collect();
    assert_eq!(push(plan, &fleet).await.outcome, Outcome::Done);
    let ranks: Vec<Vec<u64>> = waves
        .iter()
        .map(|wave| wave.iter().map(|h| fleet.stage_rank(h)).collect())
        .collect();
    let mut flat: Vec<u64> = ranks.iter().flatten().copied().collect();
    assert!(flat.windows(2).all(|w| w[0] < w[1]), "{waves:?}: {ranks:?}");
    flat.sort();
    assert_eq!(flat, (0..6).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_host_that_cannot_be_staged_once_the_canary_changed_halts_and_reverts_it() {
    let fleet = FakeFleet::new();
    fleet
        .stage_delay("h4:7700", Duration::from_millis(200))
        .fail_stage("h4:7700", failure(Cause::Unreachable));
    let done = push(plan(hosts(4), fast()), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    // The canary changed before h4's staging failed; no later host did,
    // and the canary is back.
    assert_eq!(fleet.hosts_with(Op::Activate), vec!["h1:7700"]);
    assert_eq!(fleet.hosts_with(Op::Revert), vec!["h1:7700"]);
    assert_eq!(
        done.state("h4:7700"),
        Some((HostState::Failed, Some(Cause::Unreachable)))
    );
    assert_eq!(done.state("h1:7700"), Some((HostState::Reverted, None)));
    let reason = done.halted().unwrap();
    assert!(
        reason.contains("1 host(s) failed") && reason.contains("1 of them could not be staged"),
        "{reason}"
    );
}

#[tokio::test]
async fn with_stage_first_a_late_host_that_cannot_be_staged_stops_the_push_before_the_canary() {
    let fleet = FakeFleet::new();
    fleet
        .stage_delay("h4:7700", Duration::from_millis(200))
        .fail_stage("h4:7700", failure(Cause::Unreachable));
    let settings = RolloutSettings {
        stage_first: true,
        ..fast()
    };
    let done = push(plan(hosts(4), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::NotStarted);
    assert!(fleet.hosts_with(Op::Activate).is_empty());
    assert!(fleet.hosts_with(Op::Revert).is_empty());
    assert_eq!(sorted(fleet.hosts_with(Op::Stage)), hosts(4));
    assert_eq!(
        done.state("h4:7700"),
        Some((HostState::Failed, Some(Cause::Unreachable)))
    );
    assert!(done.halted().unwrap().contains("no host was changed"));
}

#[tokio::test]
async fn hosts_already_on_the_target_are_skipped_never_activated_nor_reverted() {
    let fleet = FakeFleet::new();
    fleet.on_target("h1:7700").on_target("h3:7700");
    fleet.probe_always("h4:7700", Probe::NotYet("RUNNING UNHEALTHY".into()));
    let settings = RolloutSettings {
        canary: 0,
        max_failures: "1".into(),
        ..fast()
    };
    let done = push(plan(hosts(4), settings), &fleet).await;
    assert_eq!(
        done.outcome,
        Outcome::Done,
        "one failure is within the budget"
    );
    assert_eq!(
        sorted(fleet.hosts_with(Op::Activate)),
        vec!["h2:7700", "h4:7700"]
    );
    assert_eq!(done.states("h1:7700"), vec![HostState::Skipped]);
    assert_eq!(done.states("h3:7700"), vec![HostState::Skipped]);
    match done.finished() {
        Record::Finished {
            healthy,
            skipped,
            failed,
            ..
        } => assert_eq!((healthy, skipped, failed), (1, 2, 1)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_budget_absorbs_n_failures() {
    let fleet = FakeFleet::new();
    fleet
        .fail_activate("h2:7700", failure(Cause::ReloadFailed))
        .fail_activate("h4:7700", failure(Cause::ReloadFailed));
    let settings = RolloutSettings {
        max_failures: "2".into(),
        ..fast()
    };
    let done = push(plan(hosts(5), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::Done);
    assert_eq!(done.halted(), None);
    assert_eq!(sorted(fleet.hosts_with(Op::Activate)), hosts(5));
    assert!(fleet.hosts_with(Op::Revert).is_empty());
}

#[tokio::test]
async fn the_budget_halts_at_n_plus_one_and_no_further_host_is_touched() {
    let fleet = FakeFleet::new();
    fleet
        .fail_activate("h2:7700", failure(Cause::ReloadFailed))
        .fail_activate("h3:7700", failure(Cause::ReloadFailed));
    // One at a time, so the host after the second failure is never begun.
    let settings = RolloutSettings {
        max_failures: "1".into(),
        max_parallel: 1,
        ..fast()
    };
    let done = push(plan(hosts(5), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    assert_eq!(done.outcome.exit_code(), 3);
    assert_eq!(
        done.halted().unwrap(),
        "2 host(s) failed, above the budget of 1 (--max-failures 1)"
    );
    assert_eq!(
        fleet.hosts_with(Op::Activate),
        vec!["h1:7700", "h2:7700", "h3:7700"]
    );
    assert_eq!(done.states("h4:7700"), vec![HostState::Staged]);
    assert_eq!(done.states("h5:7700"), vec![HostState::Staged]);
}

#[tokio::test]
async fn a_failed_canary_halts_before_the_waves() {
    let fleet = FakeFleet::new();
    fleet.probe_always("h1:7700", Probe::NotYet("RUNNING UNHEALTHY".into()));
    let settings = RolloutSettings {
        waves: "1,50%,100%".into(),
        ..fast()
    };
    let done = push(plan(hosts(4), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    assert_eq!(done.waves(), vec![1], "only the canary wave ran");
    assert_eq!(fleet.hosts_with(Op::Activate), vec!["h1:7700"]);
    assert_eq!(fleet.hosts_with(Op::Revert), vec!["h1:7700"]);
    assert_eq!(
        done.state("h1:7700"),
        Some((HostState::Reverted, Some(Cause::Unhealthy)))
    );
}

#[tokio::test]
async fn auto_revert_reverts_exactly_the_hosts_this_rollout_changed() {
    let fleet = FakeFleet::new();
    // h1 healthy (changed), h2 reload failed (never activated), h3 activated
    // but unhealthy (changed), h4 already on target, h5 never begun.
    fleet
        .fail_activate("h2:7700", failure(Cause::ReloadFailed))
        .probe_always("h3:7700", Probe::NotYet("RUNNING UNHEALTHY".into()))
        .on_target("h4:7700");
    let settings = RolloutSettings {
        canary: 0,
        max_parallel: 1,
        max_failures: "1".into(),
        ..fast()
    };
    let done = push(plan(hosts(5), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    assert_eq!(
        sorted(fleet.hosts_with(Op::Revert)),
        vec!["h1:7700", "h3:7700"]
    );
    assert_eq!(done.state("h1:7700"), Some((HostState::Reverted, None)));
    assert_eq!(
        done.state("h2:7700"),
        Some((HostState::Failed, Some(Cause::ReloadFailed)))
    );
    assert_eq!(
        done.state("h3:7700"),
        Some((HostState::Reverted, Some(Cause::Unhealthy)))
    );
    assert_eq!(done.states("h4:7700"), vec![HostState::Skipped]);
    assert_eq!(done.states("h5:7700"), vec![HostState::Staged]);
    // The revert carries this rollout's lease.
    assert!(fleet
        .calls()
        .iter()
        .filter(|c| c.op == Op::Revert)
        .all(|c| c.lease.as_ref().unwrap().rollout == "r1"));
}

#[tokio::test]
async fn without_auto_revert_a_halt_leaves_the_hosts_as_they_are() {
    let fleet = FakeFleet::new();
    fleet.probe_always("h2:7700", Probe::NotYet("RUNNING UNHEALTHY".into()));
    let settings = RolloutSettings {
        auto_revert: false,
        ..fast()
    };
    let done = push(plan(hosts(3), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedPartial);
    assert_eq!(done.outcome.exit_code(), 4);
    assert!(fleet.hosts_with(Op::Revert).is_empty());
    assert_eq!(done.state("h1:7700"), Some((HostState::Healthy, None)));
}

#[tokio::test]
async fn a_failed_revert_makes_the_halt_partial() {
    let fleet = FakeFleet::new();
    fleet
        .probe_always("h3:7700", Probe::NotYet("STARTING UNKNOWN".into()))
        .fail_revert("h2:7700", "no previous version");
    let done = push(plan(hosts(3), fast()), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedPartial);
    assert_eq!(
        sorted(fleet.hosts_with(Op::Revert)),
        vec!["h1:7700", "h2:7700", "h3:7700"]
    );
    assert_eq!(done.state("h2:7700"), Some((HostState::RevertFailed, None)));
    assert_eq!(done.state("h1:7700"), Some((HostState::Reverted, None)));
}

#[tokio::test]
async fn causes_are_kept_apart_and_each_halts_with_exit_code_3() {
    /// How the canary fails, and the cause it must be journaled with.
    type Setup = fn(&FakeFleet);
    let cases: [(Cause, Setup); 5] = [
        (Cause::Rejected, |f| {
            f.fail_activate("h1:7700", failure(Cause::Rejected));
        }),
        (Cause::ReloadFailed, |f| {
            f.fail_activate("h1:7700", failure(Cause::ReloadFailed));
        }),
        (Cause::Unreachable, |f| {
            f.probe_always("h1:7700", Probe::NoAnswer);
        }),
        (Cause::Unhealthy, |f| {
            f.probe_always("h1:7700", Probe::NotYet("RUNNING UNHEALTHY".into()));
        }),
        (Cause::Unhealthy, |f| {
            let gone = HostFailure::new(Cause::Unhealthy, "the new process is gone");
            f.probe_always("h1:7700", Probe::Fatal(gone));
        }),
    ];
    for (cause, setup) in cases {
        let fleet = FakeFleet::new();
        setup(&fleet);
        let done = push(plan(hosts(3), fast()), &fleet).await;
        let failed = done.lines.iter().find_map(|l| match &l.record {
            Record::Host {
                state: HostState::Failed,
                cause,
                message,
                ..
            } => Some((*cause, message.clone())),
            _ => None,
        });
        assert_eq!(
            failed.as_ref().map(|f| f.0),
            Some(Some(cause)),
            "{failed:?}"
        );
        assert_eq!(done.outcome.exit_code(), 3, "{cause:?}");
        assert_eq!(fleet.hosts_with(Op::Activate), vec!["h1:7700"], "{cause:?}");
        if cause == Cause::Unreachable {
            assert_eq!(
                failed.unwrap().1,
                "the agent stopped answering during the health gate"
            );
        }
    }
}

#[tokio::test]
async fn the_gate_needs_a_streak_and_forgives_fewer_than_three_silences() {
    let fleet = FakeFleet::new();
    fleet.probes(
        "h1:7700",
        vec![
            Probe::NoAnswer,
            Probe::NoAnswer,
            Probe::Healthy,
            Probe::NotYet("RUNNING UNHEALTHY".into()),
            Probe::Healthy,
        ],
    );
    let settings = RolloutSettings {
        healthy_checks: 2,
        healthy_deadline: Duration::from_secs(5),
        ..fast()
    };
    let done = push(plan(hosts(1), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::Done);
    // The unhealthy answer reset the streak: two more healthy ones needed.
    assert_eq!(
        fleet
            .hosts_with(Op::Probe)
            .iter()
            .filter(|h| *h == "h1:7700")
            .count(),
        6
    );
}

#[tokio::test]
async fn a_lost_lease_shows_as_refusals_and_halts() {
    let fleet = FakeFleet::new();
    let lost = || HostFailure::new(Cause::Rejected, "the lease is held by another rollout");
    fleet
        .fail_activate("h2:7700", lost())
        .fail_activate("h3:7700", lost());
    let settings = RolloutSettings {
        max_parallel: 1,
        ..fast()
    };
    let done = push(plan(hosts(4), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    assert_eq!(
        done.state("h2:7700"),
        Some((HostState::Failed, Some(Cause::Rejected)))
    );
    assert_eq!(fleet.hosts_with(Op::Activate), vec!["h1:7700", "h2:7700"]);
    assert_eq!(fleet.hosts_with(Op::Revert), vec!["h1:7700"]);
}

#[tokio::test]
async fn max_parallel_bounds_the_hosts_in_flight() {
    let fleet = FakeFleet::new();
    fleet.activate_delay(Duration::from_millis(60));
    let settings = RolloutSettings {
        canary: 0,
        max_parallel: 2,
        ..fast()
    };
    let done = push(plan(hosts(6), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::Done);
    assert_eq!(fleet.max_in_flight(), 2);
}

/// With `max_parallel` above the window, no more than the window's hosts
/// stage at once, and every host is still staged and changed.
#[tokio::test]
async fn staging_keeps_at_most_its_window_of_hosts_in_flight() {
    let fleet = FakeFleet::new();
    let n = STAGING_WINDOW + 44;
    let all = hosts(n);
    for host in &all {
        fleet.stage_delay(host, Duration::from_millis(20));
    }
    let settings = RolloutSettings {
        max_parallel: n,
        ..fast()
    };
    let done = push(plan(all, settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::Done);
    assert_eq!(fleet.hosts_with(Op::Stage).len(), n);
    assert_eq!(fleet.hosts_with(Op::Activate).len(), n);
    // All but the canary (staged alone first) would stage at once
    // without the window.
    assert_eq!(fleet.max_staging(), STAGING_WINDOW);
}

#[tokio::test]
async fn the_progress_deadline_halts_and_reverts_what_changed() {
    let fleet = FakeFleet::new();
    fleet.hang_activate("h2:7700");
    let settings = RolloutSettings {
        progress_deadline: Duration::from_millis(300),
        ..fast()
    };
    let done = push(plan(hosts(3), settings), &fleet).await;
    assert_eq!(
        done.halted().unwrap(),
        "the progress deadline of 300ms passed"
    );
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    // h2 never answered its activation: asked after the halt, it had not
    // changed, so nothing is reverted there; h3, beside it in the wave,
    // had.
    assert_eq!(
        sorted(fleet.hosts_with(Op::Revert)),
        vec!["h1:7700", "h3:7700"]
    );
    assert_eq!(fleet.hosts_with(Op::Settle), vec!["h2:7700"]);
    assert_eq!(done.state("h2:7700"), Some((HostState::Unchanged, None)));
}

/// The case: the progress deadline hit while a host was
/// activating, no result came back, and the host went on to run the new
/// version afterwards. The revert asks it, finds it changed, and reverts
/// it too; the summary counts it as reverted.
#[tokio::test]
async fn a_progress_deadline_mid_activation_reverts_that_host_too() {
    let fleet = FakeFleet::new();
    fleet
        .hang_activate("h1:7700")
        .settles("h1:7700", Ok(Some(pid_of("h1:7700"))));
    let settings = RolloutSettings {
        progress_deadline: Duration::from_millis(300),
        ..fast()
    };
    let plan = plan(hosts(3), settings);
    let done = push(plan.clone(), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    assert_eq!(fleet.hosts_with(Op::Revert), vec!["h1:7700"]);
    assert_eq!(
        done.states("h1:7700"),
        vec![
            HostState::Staged,
            HostState::Activating,
            HostState::Activated,
            HostState::Reverted
        ]
    );
    let records = HostRecord::from_journal(&plan.hosts, &done.lines);
    let changes = Changes::of(&plan, &records);
    assert_eq!(changes.reverted, vec!["h1:7700"]);
    assert_eq!(changes.unchanged, vec!["h2:7700", "h3:7700"]);
    assert_eq!(verdict(done.outcome, &changes), "halted and reverted");
}

/// A canary refused (a downgrade the agent will not take): nothing
/// changed, and the summary says so instead of "halted and reverted".
#[tokio::test]
async fn a_refused_canary_is_summarised_as_nothing_changed() {
    let fleet = FakeFleet::new();
    fleet.fail_activate(
        "h1:7700",
        HostFailure::new(Cause::Rejected, "2.0.0 is below the floor 3.0.0"),
    );
    let plan = plan(hosts(3), fast());
    let done = push(plan.clone(), &fleet).await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    assert!(fleet.hosts_with(Op::Revert).is_empty());
    let records = HostRecord::from_journal(&plan.hosts, &done.lines);
    let changes = Changes::of(&plan, &records);
    assert!(changes.reverted.is_empty() && changes.left.is_empty());
    assert_eq!(changes.unchanged, hosts(3));
    assert_eq!(
        verdict(done.outcome, &changes),
        "halted; no host was changed, nothing to revert"
    );
    assert_eq!(
        changes.describe("2.0.0"),
        "reverted: none; left on 2.0.0: none; never changed: h1:7700 h2:7700 h3:7700"
    );
}

/// Hole (c): leases were renewed host by host, each call waiting up to 5 s,
/// and failures were ignored, so a few unreachable hosts let the other
/// leases lapse while the rollout went on. Renewals now go to every host at
/// once, each bounded; a host whose lease cannot be renewed in time is
/// given up (no further call goes there) and the rollout halts, naming it.
#[tokio::test]
async fn a_lease_that_cannot_be_renewed_in_time_halts_the_rollout_naming_the_host() {
    let fleet = FakeFleet::new();
    fleet
        .hang_renew("h3:7700")
        .activate_delay(Duration::from_millis(250));
    let settings = RolloutSettings {
        max_parallel: 1,
        canary: 0,
        ..fast()
    };
    let ttl = Duration::from_millis(600);
    let done = run_custom(
        plan(hosts(6), settings),
        &fleet,
        vec![HostRecord::default(); 6],
        1,
        true,
        std::future::pending(),
        |start| start.lease_ttl = ttl,
    )
    .await;
    let reason = done.halted().unwrap();
    assert!(
        reason.contains("the lease on h3:7700 could not be renewed in time"),
        "{reason}"
    );
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    // Given up: never activated, reverted or released.
    let calls = fleet.calls();
    let to_h3: Vec<Op> = calls
        .iter()
        .filter(|c| c.host == "h3:7700")
        .map(|c| c.op.clone())
        .filter(|op| !matches!(op, Op::Acquire | Op::Stage | Op::Renew))
        .collect();
    assert!(to_h3.is_empty(), "{to_h3:?}");
    // The hanging host did not hold up the others' renewals.
    for host in ["h1:7700", "h2:7700", "h6:7700"] {
        let renewals = calls
            .iter()
            .filter(|c| c.op == Op::Renew && c.host == host)
            .count();
        assert!(renewals >= 2, "{host} renewed {renewals} times: {calls:?}");
    }
    // Halted before the rollout could reach every host.
    assert!(fleet.hosts_with(Op::Activate).len() < 6);
}

/// A host answering "superseded" (a later rollout took it over) stops the
/// rollout at once: no further host starts, and nothing is reverted (that
/// would undo the later rollout's work). Exit code 6.
#[tokio::test]
async fn a_superseded_host_stops_the_rollout_and_nothing_is_reverted() {
    let fleet = FakeFleet::new();
    fleet.fail_activate(
        "h2:7700",
        HostFailure::new(
            Cause::Superseded,
            "superseded: fencing token 1 of rollout r1 is below token 2",
        ),
    );
    let settings = RolloutSettings {
        max_parallel: 1,
        max_failures: "2".into(),
        ..fast()
    };
    let done = push(plan(hosts(4), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::Superseded);
    assert_eq!(done.outcome.exit_code(), 6);
    assert!(done.halted().unwrap().contains("h2:7700: superseded"));
    assert_eq!(fleet.hosts_with(Op::Activate), vec!["h1:7700", "h2:7700"]);
    assert!(fleet.hosts_with(Op::Revert).is_empty());
    // The leases it still holds are given back; not h2's.
    assert_eq!(
        sorted(fleet.hosts_with(Op::Release)),
        vec!["h1:7700", "h3:7700", "h4:7700"]
    );
}

/// The sequence: a push paused after its canary, a newer push took
/// every host, then `resume`: the hosts granted the newer rollout higher
/// tokens, so the resume is refused before it takes a lease, and changes
/// nothing.
#[tokio::test]
async fn a_resume_superseded_by_a_later_rollout_changes_nothing() {
    let fleet = FakeFleet::new();
    for (i, host) in hosts(3).iter().enumerate() {
        fleet.fence_state(
            host,
            FenceState {
                highest_token: 7 + i as u64,
                highest_rollout: "r9".into(),
                highest_holder: "reloadctl push web 3.0.0 by ci@runner".into(),
                running_sha256: "cd".repeat(32),
                running_version: "3.0.0".into(),
            },
        );
    }
    let mut records = vec![HostRecord::default(); 3];
    records[0].state = Some(HostState::Healthy);
    records[0].changed = true;
    let tokens = hosts(3).into_iter().map(|h| (h, 1)).collect();
    let done = run_custom(
        plan(hosts(3), fast()),
        &fleet,
        records,
        2,
        false,
        std::future::pending(),
        |start| start.resumed_tokens = Some(tokens),
    )
    .await;
    assert_eq!(done.outcome, Outcome::Superseded);
    let reason = done.halted().unwrap();
    assert!(
        reason.contains("h2:7700 was taken over by rollout r9 (reloadctl push web 3.0.0 by ci@runner) with fencing token 8"),
        "{reason}"
    );
    let changed: Vec<Op> = fleet
        .calls()
        .into_iter()
        .map(|c| c.op)
        .filter(|op| *op != Op::FenceState)
        .collect();
    assert!(changed.is_empty(), "{changed:?}");
}

/// Also superseded: a host this rollout finished runs something else now
/// (an operator's activate, which takes no lease), although no token moved.
#[tokio::test]
async fn a_resume_refuses_when_a_finished_host_was_changed_behind_its_back() {
    let fleet = FakeFleet::new();
    let ours = FenceState {
        highest_token: 1,
        highest_rollout: "r1".into(),
        running_sha256: "ab".repeat(32),
        running_version: "2.0.0".into(),
        ..FenceState::default()
    };
    for host in hosts(3) {
        fleet.fence_state(&host, ours.clone());
    }
    fleet.fence_state(
        "h1:7700",
        FenceState {
            running_sha256: "ef".repeat(32),
            running_version: "1.9.0".into(),
            ..ours.clone()
        },
    );
    let mut records = vec![HostRecord::default(); 3];
    records[0].state = Some(HostState::Healthy);
    records[0].changed = true;
    let tokens = hosts(3).into_iter().map(|h| (h, 1)).collect();
    let resume = |records, tokens| {
        run_custom(
            plan(hosts(3), fast()),
            &fleet,
            records,
            2,
            false,
            std::future::pending(),
            move |start| start.resumed_tokens = Some(tokens),
        )
    };
    let done = resume(records.clone(), tokens).await;
    assert_eq!(done.outcome, Outcome::Superseded);
    assert!(done
        .halted()
        .unwrap()
        .contains("h1:7700 runs 1.9.0 now, not the 2.0.0 this rollout left there"));
    // Our own tokens and versions: the resume goes on.
    fleet.fence_state("h1:7700", ours);
    let tokens = hosts(3).into_iter().map(|h| (h, 1)).collect();
    let done = resume(records, tokens).await;
    assert_eq!(done.outcome, Outcome::Done);
}

#[tokio::test]
async fn waves_are_paused_between() {
    let fleet = FakeFleet::new();
    let pause = Duration::from_millis(250);
    let settings = RolloutSettings {
        pause_between_waves: pause,
        ..fast()
    };
    let done = push(plan(hosts(3), settings), &fleet).await;
    assert_eq!(done.outcome, Outcome::Done);
    let calls = fleet.calls();
    let canary_gated = calls
        .iter()
        .filter(|c| c.op == Op::Probe && c.host == "h1:7700")
        .map(|c| c.at)
        .max()
        .unwrap();
    let next = calls
        .iter()
        .filter(|c| c.op == Op::Activate && c.host != "h1:7700")
        .map(|c| c.at)
        .min()
        .unwrap();
    assert!(next - canary_gated >= pause, "{:?}", next - canary_gated);
}

#[tokio::test]
async fn ctrl_c_finishes_the_hosts_in_flight_then_pauses() {
    let fleet = FakeFleet::new();
    fleet.interrupt_on_activate("h1:7700");
    let notify = fleet.interrupt.clone();
    let plan = plan(hosts(3), fast());
    let records = vec![HostRecord::default(); 3];
    let interrupt = async move { notify.notified().await };
    let done = run(plan, &fleet, records, 1, true, interrupt).await;
    assert_eq!(done.outcome, Outcome::Aborted);
    assert_eq!(done.outcome.exit_code(), 5);
    assert_eq!(fleet.hosts_with(Op::Activate), vec!["h1:7700"]);
    assert_eq!(done.state("h1:7700"), Some((HostState::Healthy, None)));
    assert!(done.lines.iter().any(
        |l| matches!(&l.record, Record::Paused { reason } if reason == "interrupted (Ctrl-C)")
    ));
    assert_eq!(done.halted(), None);
    assert!(fleet.hosts_with(Op::Revert).is_empty());
}

/// A journal as a crashed push left it: h1 healthy, h2 journaled as
/// activating, h3 activated, h4 staged.
fn crashed_journal(dir: &std::path::Path) -> Vec<HostRecord> {
    let mut journal = Journal::create(dir, "r0", false).unwrap();
    let host = |host: &str, state| Record::Host {
        host: host.into(),
        state,
        cause: None,
        message: String::new(),
    };
    for record in [
        Record::Leased {
            generation: 1,
            holder: String::new(),
            tokens: Default::default(),
        },
        host("h1:7700", HostState::Staged),
        host("h2:7700", HostState::Staged),
        host("h3:7700", HostState::Staged),
        host("h4:7700", HostState::Staged),
        host("h1:7700", HostState::Activating),
        host("h1:7700", HostState::Activated),
        host("h1:7700", HostState::Healthy),
        host("h2:7700", HostState::Activating),
        host("h3:7700", HostState::Activating),
        host("h3:7700", HostState::Activated),
    ] {
        journal.append(record).unwrap();
    }
    let path = journal.path.clone();
    drop(journal);
    let (_, lines) = Journal::reopen(&path, false).unwrap();
    HostRecord::from_journal(&hosts(4), &lines)
}

#[tokio::test]
async fn resume_settles_journaled_activations_and_activates_no_host_twice() {
    let dir = tempfile::tempdir().unwrap();
    let records = crashed_journal(dir.path());
    let fleet = FakeFleet::new();
    // The agent finished h2's activation after the CLI died.
    fleet
        .settles("h2:7700", Ok(Some(pid_of("h2:7700"))))
        .settles("h3:7700", Ok(Some(pid_of("h3:7700"))));
    let settings = RolloutSettings {
        canary: 0,
        ..fast()
    };
    let done = run(
        plan(hosts(4), settings),
        &fleet,
        records,
        2,
        false,
        std::future::pending(),
    )
    .await;
    assert_eq!(done.outcome, Outcome::Done);
    assert_eq!(fleet.hosts_with(Op::Activate), vec!["h4:7700"]);
    // h2 was `activating` when the last run died: its activation is
    // waited for before any lease is taken (a new lease generation would
    // fence it, and it would be activated twice), then settled with h3.
    assert_eq!(
        sorted(fleet.hosts_with(Op::Settle)),
        vec!["h2:7700", "h2:7700", "h3:7700"]
    );
    let calls = fleet.calls();
    let first = |op: Op| calls.iter().position(|c| c.op == op).unwrap();
    assert!(first(Op::Settle) < first(Op::Acquire), "{calls:?}");
    assert_eq!(calls[first(Op::Settle)].host, "h2:7700");
    // Only the staged host is staged again; the healthy one is left alone.
    assert_eq!(fleet.hosts_with(Op::Stage), vec!["h4:7700"]);
    assert!(!fleet.hosts_with(Op::Probe).contains(&"h1:7700".to_string()));
    assert_eq!(
        done.states("h2:7700"),
        vec![HostState::Activated, HostState::Healthy]
    );
    assert_eq!(done.states("h3:7700"), vec![HostState::Healthy]);
    // The resume fences with the next generation.
    assert!(fleet
        .calls()
        .iter()
        .filter_map(|c| c.lease.as_ref())
        .all(|l| l.generation == 2));
}

#[tokio::test]
async fn resume_activates_a_host_whose_activation_never_landed() {
    let dir = tempfile::tempdir().unwrap();
    let records = crashed_journal(dir.path());
    let fleet = FakeFleet::new();
    fleet.settles("h3:7700", Ok(Some(pid_of("h3:7700"))));
    let settings = RolloutSettings {
        canary: 0,
        ..fast()
    };
    let done = run(
        plan(hosts(4), settings),
        &fleet,
        records,
        2,
        false,
        std::future::pending(),
    )
    .await;
    assert_eq!(done.outcome, Outcome::Done);
    assert_eq!(
        sorted(fleet.hosts_with(Op::Activate)),
        vec!["h2:7700", "h4:7700"]
    );
}

#[tokio::test]
async fn a_resumed_rollout_reverts_hosts_changed_before_the_crash() {
    let dir = tempfile::tempdir().unwrap();
    let records = crashed_journal(dir.path());
    let fleet = FakeFleet::new();
    // h2's activation never landed and now fails: the rollout halts.
    fleet
        .settles("h3:7700", Ok(Some(pid_of("h3:7700"))))
        .fail_activate("h2:7700", failure(Cause::ReloadFailed));
    let settings = RolloutSettings {
        canary: 0,
        max_parallel: 1,
        ..fast()
    };
    let done = run(
        plan(hosts(4), settings),
        &fleet,
        records,
        2,
        false,
        std::future::pending(),
    )
    .await;
    assert_eq!(done.outcome, Outcome::HaltedReverted);
    // h1 changed in the first run, h3 before the crash; h2 never changed.
    assert_eq!(
        sorted(fleet.hosts_with(Op::Revert)),
        vec!["h1:7700", "h3:7700"]
    );
    assert!(!fleet
        .hosts_with(Op::Activate)
        .contains(&"h4:7700".to_string()));
}

#[tokio::test]
async fn a_resume_goes_on_past_a_host_it_cannot_stage_counting_it_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let records = crashed_journal(dir.path());
    let fleet = FakeFleet::new();
    fleet
        .settles("h2:7700", Ok(Some(pid_of("h2:7700"))))
        .settles("h3:7700", Ok(Some(pid_of("h3:7700"))))
        .fail_stage("h4:7700", failure(Cause::Unreachable));
    let settings = RolloutSettings {
        canary: 0,
        max_failures: "1".into(),
        ..fast()
    };
    let done = run(
        plan(hosts(4), settings),
        &fleet,
        records,
        2,
        false,
        std::future::pending(),
    )
    .await;
    assert_eq!(done.outcome, Outcome::Done);
    assert_eq!(done.halted(), None);
    assert_eq!(
        done.state("h4:7700"),
        Some((HostState::Failed, Some(Cause::Unreachable)))
    );
    assert!(fleet.hosts_with(Op::Activate).is_empty());
    assert_eq!(done.state("h2:7700"), Some((HostState::Healthy, None)));
}

/// A renewal answered "superseded" (taken over while the rollout ran)
/// stops it the same way, before its next host.
#[tokio::test]
async fn a_renewal_answered_superseded_stops_the_rollout() {
    let fleet = FakeFleet::new();
    fleet
        .fail_renew(
            "h4:7700",
            HostFailure::new(Cause::Superseded, "superseded: token 1 is below token 2"),
        )
        .activate_delay(Duration::from_millis(200));
    let settings = RolloutSettings {
        max_parallel: 1,
        canary: 0,
        ..fast()
    };
    let done = run_custom(
        plan(hosts(6), settings),
        &fleet,
        vec![HostRecord::default(); 6],
        1,
        true,
        std::future::pending(),
        |start| start.lease_ttl = Duration::from_millis(600),
    )
    .await;
    assert_eq!(done.outcome, Outcome::Superseded);
    assert!(done.halted().unwrap().contains("token 1 is below token 2"));
    assert!(fleet.hosts_with(Op::Revert).is_empty());
    assert!(fleet.hosts_with(Op::Activate).len() < 6);
}
