//! What a rollout tells people: one line per host state change on stderr,
//! a few lines about waves, halts and reverts, the summary table on stdout,
//! and the dry-run plan. Nothing here decides anything; the engine calls a
//! [`Reporter`] after it has journaled what it did.
//!
//! With `--output json` the journal lines are the events (the journal
//! echoes them on stdout, see [`super::journal`]) and the human lines are
//! off, except the two that explain an exit: "rollout not started" and the
//! Ctrl-C notice.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::journal::{Cause, HostRecord, HostState, Outcome};
use super::plan::RolloutPlan;

pub fn state_name(state: HostState) -> &'static str {
    match state {
        HostState::Skipped => "skipped (already on the target version)",
        HostState::Staged => "staged",
        HostState::Activating => "activating",
        HostState::Activated => "activated, gating",
        HostState::Healthy => "healthy",
        HostState::Failed => "FAILED",
        HostState::Reverted => "reverted",
        HostState::RevertFailed => "REVERT FAILED",
        HostState::Unchanged => "unchanged (the activation never took effect)",
    }
}

pub fn cause_name(cause: Cause) -> &'static str {
    match cause {
        Cause::Unreachable => "unreachable",
        Cause::Rejected => "rejected",
        Cause::ReloadFailed => "reload failed",
        Cause::Unhealthy => "unhealthy after reload",
        Cause::Superseded => "superseded by a later rollout",
        Cause::LeaseLost => "lease lost",
    }
}

/// The live view of one rollout run (a push, or one resume).
pub struct Reporter {
    /// Lines for people; off with `--output json`.
    human: bool,
    /// When this run started: the elapsed time in each line.
    started: Instant,
}

impl Reporter {
    pub fn new(human: bool) -> Reporter {
        Reporter {
            human,
            started: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `[  12.3s 2/8 done] web-1:7700  healthy`.
    pub fn host(
        &self,
        host: &str,
        (done, total): (usize, usize),
        state: HostState,
        cause: Option<Cause>,
        message: &str,
    ) {
        if !self.human {
            return;
        }
        let cause = cause
            .map(|c| format!(" ({})", cause_name(c)))
            .unwrap_or_default();
        let message = if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        };
        eprintln!(
            "[{:>6.1}s {done}/{total} done] {host:<22} {}{cause}{message}",
            self.elapsed().as_secs_f64(),
            state_name(state)
        );
    }

    pub fn took_over(&self, host: &str, displaced: &str) {
        if self.human {
            eprintln!("{host}: took the lease over from {displaced:?}");
        }
    }

    /// Said in both output modes: it explains exit code 1.
    pub fn not_started(&self, reason: &str) {
        eprintln!("reloadctl: rollout not started: {reason}");
    }

    /// Said in both output modes, the moment Ctrl-C arrives.
    pub fn interrupted(&self) {
        eprintln!("\ninterrupted: finishing the hosts in flight, then pausing (resume with `reloadctl resume`)");
    }

    pub fn wave(&self, index: usize, of: usize, hosts: usize) {
        if self.human {
            eprintln!("wave {index}/{of}: {hosts} host(s)");
        }
    }

    pub fn halted(&self, reason: &str) {
        if self.human {
            eprintln!("halted: {reason}; no further host is touched");
        }
    }

    pub fn reverting(&self, hosts: usize) {
        if self.human && hosts > 0 {
            eprintln!("reverting {hosts} host(s) this rollout changed, in parallel");
        }
    }

    /// The table of every host and the one-line verdict, on stdout.
    pub fn summary(&self, plan: &RolloutPlan, hosts: &[HostRecord], outcome: Outcome) {
        if !self.human {
            return;
        }
        println!("{:<24} {:<14} {:<24} DETAIL", "HOST", "STATE", "CAUSE");
        for (host, record) in plan.hosts.iter().zip(hosts) {
            let state = record
                .state
                .map(|s| format!("{s:?}").to_lowercase())
                .unwrap_or_else(|| "untouched".into());
            let cause = record.cause.map(cause_name).unwrap_or("-");
            println!("{host:<24} {state:<14} {cause:<24} {}", record.message);
        }
        let mut by_cause: BTreeMap<Cause, usize> = BTreeMap::new();
        for cause in hosts.iter().filter_map(|h| h.cause) {
            *by_cause.entry(cause).or_default() += 1;
        }
        let causes: Vec<String> = by_cause
            .iter()
            .map(|(c, n)| format!("{n} {}", cause_name(*c)))
            .collect();
        let changes = Changes::of(plan, hosts);
        println!(
            "{}: {} {} on {} hosts in {:.1}s{}",
            verdict(outcome, &changes),
            plan.service,
            plan.version,
            plan.hosts.len(),
            self.elapsed().as_secs_f64(),
            if causes.is_empty() {
                String::new()
            } else {
                format!("; failures: {}", causes.join(", "))
            }
        );
        if matches!(
            outcome,
            Outcome::HaltedReverted | Outcome::HaltedPartial | Outcome::Superseded
        ) {
            println!("{}", changes.describe(&plan.version));
        }
    }
}

/// The summary's first word(s): never "reverted" when nothing was.
pub fn verdict(outcome: Outcome, changes: &Changes) -> &'static str {
    match outcome {
        Outcome::Done => "done",
        Outcome::HaltedReverted if changes.reverted.is_empty() => {
            "halted; no host was changed, nothing to revert"
        }
        Outcome::HaltedReverted => "halted and reverted",
        Outcome::HaltedPartial => "halted, NOT fully reverted",
        Outcome::Aborted => "paused",
        Outcome::NotStarted => "not started",
        Outcome::Superseded => "superseded by a later rollout; stopped, nothing reverted",
    }
}

/// What a halted rollout left behind, host by host: the exact account the
/// summary owes (never "reverted" for a host that was not).
pub struct Changes<'a> {
    pub reverted: Vec<&'a str>,
    /// Changed by this rollout and still on its version.
    pub left: Vec<&'a str>,
    pub unchanged: Vec<&'a str>,
}

impl<'a> Changes<'a> {
    pub fn of(plan: &'a RolloutPlan, hosts: &[HostRecord]) -> Changes<'a> {
        let mut changes = Changes {
            reverted: Vec::new(),
            left: Vec::new(),
            unchanged: Vec::new(),
        };
        for (host, record) in plan.hosts.iter().zip(hosts) {
            let list = match record.state {
                Some(HostState::Reverted) => &mut changes.reverted,
                Some(HostState::Skipped) => continue,
                _ if record.changed => &mut changes.left,
                _ => &mut changes.unchanged,
            };
            list.push(host);
        }
        changes
    }

    pub fn describe(&self, version: &str) -> String {
        let list = |hosts: &[&str]| match hosts.len() {
            0 => "none".to_string(),
            _ => hosts.join(" "),
        };
        format!(
            "reverted: {}; left on {version}: {}; never changed: {}",
            list(&self.reverted),
            list(&self.left),
            list(&self.unchanged)
        )
    }
}

/// `push`: the first line, naming the rollout and its journal.
pub fn print_start(rollout: &str, plan: &RolloutPlan, journal: &Path) {
    eprintln!(
        "rollout {rollout}: {} {} to {} hosts in {} waves (journal {})",
        plan.service,
        plan.version,
        plan.hosts.len(),
        plan.waves.len(),
        journal.display()
    );
}

/// `resume`: the first line.
pub fn print_resume(rollout: &str, generation: u64, journal: &Path) {
    eprintln!(
        "resuming rollout {rollout} (generation {generation}) from {}",
        journal.display()
    );
}

/// `push --dry-run`: the plan, on stdout.
pub fn print_plan(plan: &RolloutPlan) {
    println!(
        "plan: {} {} (sha256 {}, {} bytes) to {} hosts",
        plan.service,
        plan.version,
        plan.sha256,
        plan.size,
        plan.hosts.len()
    );
    for (i, wave) in plan.waves.iter().enumerate() {
        let name = if i == 0 && plan.settings.canary > 0 {
            "canary".to_string()
        } else {
            format!("wave {}", i + 1)
        };
        let hosts: Vec<&str> = wave.iter().map(|&h| plan.hosts[h].as_str()).collect();
        println!("  {name}: {}", hosts.join(" "));
    }
    let s = &plan.settings;
    println!(
        "  gate: {} consecutive healthy checks over at least {} within {}; at most {} failed host(s); auto-revert {}; max {} hosts at once",
        s.healthy_checks,
        humantime::format_duration(s.min_healthy_time),
        humantime::format_duration(s.healthy_deadline),
        plan.budget,
        if s.auto_revert { "on" } else { "off" },
        s.max_parallel
    );
    if plan.allow_downgrade {
        println!("  --allow-downgrade: hosts may go below their downgrade floor");
    }
}
