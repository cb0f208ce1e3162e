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
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

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

/// What each host of a running rollout is doing now, shared by the
/// [`Reporter`], the fleet (which hears the agents' events: preflight,
/// probation) and the Ctrl-C handler (which says what a pause waits for).
///
/// On a terminal it is drawn with indicatif: one line per host in flight
/// (its phase and for how long) under an overall line, redrawn as the
/// waits go on, so a health gate or a preflight that takes seconds is seen
/// taking them. Elsewhere (CI logs, a pipe) it prints plain lines: each
/// state change, and a host's phase when it changes or every 5 s.
pub struct LiveView {
    phases: Mutex<BTreeMap<String, Phase>>,
    bars: Option<Bars>,
    /// Plain lines for people (off with `--output json`).
    plain: bool,
    started: Instant,
}

struct Phase {
    text: String,
    since: Instant,
    /// When a plain line last said it.
    printed: Instant,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    hosts: Mutex<BTreeMap<String, ProgressBar>>,
}

/// How often a plain line repeats a phase that has not changed.
const PLAIN_REPEAT: Duration = Duration::from_secs(5);

impl LiveView {
    /// `human`: lines for people at all; drawn live if stderr is a
    /// terminal.
    pub fn new(human: bool) -> Arc<LiveView> {
        Arc::new(LiveView::with_terminal(
            human,
            human && std::io::stderr().is_terminal(),
        ))
    }

    fn with_terminal(human: bool, terminal: bool) -> LiveView {
        let bars = terminal.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new_spinner());
            overall.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}")
                    .expect("static template"),
            );
            overall.enable_steady_tick(Duration::from_millis(120));
            Bars {
                multi,
                overall,
                hosts: Mutex::new(BTreeMap::new()),
            }
        });
        LiveView {
            phases: Mutex::new(BTreeMap::new()),
            plain: human && !terminal,
            bars,
            started: Instant::now(),
        }
    }

    /// A line above the live lines (or on stderr).
    pub fn println(&self, line: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// The overall line: counts, wave, whatever the engine says last.
    pub fn overall(&self, text: &str) {
        if let Some(bars) = &self.bars {
            bars.overall.set_message(text.to_string());
        }
    }

    /// `host` is now doing `text` (activating, preflight, probation, the
    /// health gate...).
    pub fn phase(&self, host: &str, text: &str) {
        let now = Instant::now();
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let (changed, due) = match phases.get(host) {
            Some(p) => (
                first_words(&p.text) != first_words(text),
                now.duration_since(p.printed) >= PLAIN_REPEAT,
            ),
            None => (true, true),
        };
        let since = match phases.get(host) {
            Some(p) if !changed => p.since,
            _ => now,
        };
        let printed = match phases.get(host) {
            Some(p) if !(changed || due) => p.printed,
            _ => now,
        };
        phases.insert(
            host.to_string(),
            Phase {
                text: text.to_string(),
                since,
                printed,
            },
        );
        drop(phases);
        if let Some(bars) = &self.bars {
            let mut hosts = bars.hosts.lock().unwrap_or_else(|p| p.into_inner());
            let bar = hosts.entry(host.to_string()).or_insert_with(|| {
                let bar = bars.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {prefix:<22} {wide_msg} ({elapsed})")
                        .expect("static template"),
                );
                bar.set_prefix(host.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            });
            if changed {
                bar.reset_elapsed();
            }
            bar.set_message(text.to_string());
        } else if self.plain && (changed || due) {
            eprintln!(
                "[{:>6.1}s] {host:<22}   {text}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// `host` is no longer in flight (healthy, failed, skipped...).
    pub fn settled(&self, host: &str) {
        self.phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host);
        if let Some(bars) = &self.bars {
            if let Some(bar) = bars
                .hosts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(host)
            {
                bar.finish_and_clear();
                bars.multi.remove(&bar);
            }
        }
    }

    /// The hosts in flight and what each waits in, for a second Ctrl-C.
    pub fn waiting_for(&self) -> Vec<String> {
        let phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        phases
            .iter()
            .map(|(host, p)| {
                format!(
                    "{host} ({}, for {:.0}s)",
                    p.text,
                    p.since.elapsed().as_secs_f64()
                )
            })
            .collect()
    }

    /// Said on every Ctrl-C after the first, in both output modes: the
    /// pause waits for the hosts in flight, and these are they.
    pub fn print_waiting(&self) {
        let waiting = self.waiting_for();
        let line = if waiting.is_empty() {
            "still pausing: writing the journal and releasing the leases".to_string()
        } else {
            format!(
                "still waiting for {} host(s) in flight before pausing: {}. A host is not left half-way; Ctrl-C again repeats this, and a kill leaves the journal for `reloadctl resume`",
                waiting.len(),
                waiting.join("; ")
            )
        };
        self.println(&line);
    }

    /// Ends the live lines (before the summary).
    pub fn finish(&self) {
        if let Some(bars) = &self.bars {
            for (_, bar) in
                std::mem::take(&mut *bars.hosts.lock().unwrap_or_else(|p| p.into_inner()))
            {
                bar.finish_and_clear();
            }
            bars.overall.finish_and_clear();
        }
    }
}

/// A phase's kind: its text without the numbers that change as it goes
/// ("health gate: 1/3 healthy, 8s left" and "... 2/3 ..., 7s left" are
/// one phase).
fn first_words(text: &str) -> String {
    text.split(':').next().unwrap_or(text).to_string()
}

/// The live view of one rollout run (a push, or one resume).
pub struct Reporter {
    /// Lines for people; off with `--output json`.
    human: bool,
    /// When this run started: the elapsed time in each line.
    started: Instant,
    live: Arc<LiveView>,
    /// The overall line's parts.
    wave: Mutex<String>,
}

impl Reporter {
    pub fn new(live: Arc<LiveView>) -> Reporter {
        Reporter {
            human: live.plain || live.bars.is_some(),
            started: Instant::now(),
            live,
            wave: Mutex::new(String::new()),
        }
    }

    /// Without a terminal and without lines for people (tests, JSON).
    #[cfg(test)]
    pub fn quiet() -> Reporter {
        Reporter::new(Arc::new(LiveView::with_terminal(false, false)))
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// A host's phase within its state (the gate's progress).
    pub fn phase(&self, host: &str, text: &str) {
        self.live.phase(host, text);
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
        match state {
            HostState::Staged => {}
            HostState::Activating => self.live.phase(host, "activating"),
            HostState::Activated => self.live.phase(host, "activated, health gate"),
            _ => self.live.settled(host),
        }
        let wave = self.wave.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.live
            .overall(&format!("{done}/{total} hosts done{wave}"));
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
        self.live.println(&format!(
            "[{:>6.1}s {done}/{total} done] {host:<22} {}{cause}{message}",
            self.elapsed().as_secs_f64(),
            state_name(state)
        ));
    }

    pub fn took_over(&self, host: &str, displaced: &str) {
        if self.human {
            self.live
                .println(&format!("{host}: took the lease over from {displaced:?}"));
        }
    }

    /// Said in both output modes: it explains exit code 1.
    pub fn not_started(&self, reason: &str) {
        self.live
            .println(&format!("reloadctl: rollout not started: {reason}"));
    }

    /// Said in both output modes, the moment Ctrl-C arrives.
    pub fn interrupted(&self) {
        self.live.println("\ninterrupted: finishing the hosts in flight, then pausing (resume with `reloadctl resume`); Ctrl-C again says what it waits for");
    }

    pub fn wave(&self, index: usize, of: usize, hosts: usize) {
        *self.wave.lock().unwrap_or_else(|p| p.into_inner()) = format!(", wave {index}/{of}");
        if self.human {
            self.live
                .println(&format!("wave {index}/{of}: {hosts} host(s)"));
        }
    }

    pub fn halted(&self, reason: &str) {
        if self.human {
            self.live
                .println(&format!("halted: {reason}; no further host is touched"));
        }
    }

    pub fn reverting(&self, hosts: usize) {
        if self.human && hosts > 0 {
            self.live.println(&format!(
                "reverting {hosts} host(s) this rollout changed, in parallel"
            ));
        }
    }

    /// The table of every host and the one-line verdict, on stdout.
    pub fn summary(&self, plan: &RolloutPlan, hosts: &[HostRecord], outcome: Outcome) {
        self.live.finish();
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
        // Hosts that run the release's bytes under another version (an
        // agent whose installed binary is the release) are not "on" it as
        // `status` shows: said, so "done" is not read as more than it is.
        let elsewhere: Vec<String> = plan
            .hosts
            .iter()
            .zip(hosts)
            .filter_map(|(host, record)| {
                let reported = record.message.strip_prefix(SAME_BYTES)?;
                let reported = reported.split(':').next().unwrap_or_default().trim();
                Some(format!("{host} ({reported})"))
            })
            .collect();
        if !elsewhere.is_empty() {
            println!(
                "not upgraded, already running these exact bytes and still reporting another version: {}",
                elsewhere.join(", ")
            );
        }
        if matches!(
            outcome,
            Outcome::HaltedReverted | Outcome::HaltedPartial | Outcome::Superseded
        ) {
            println!("{}", changes.describe(&plan.version));
        }
    }
}

/// How the engine words a host skipped because it runs the release's bytes
/// under another version ([`super::fleet::Staged::SameBytesAs`]); the
/// summary finds those hosts by it.
pub const SAME_BYTES: &str = "runs these exact bytes already, as ";

/// The summary's first word(s): never "reverted" when nothing was, never a
/// plain "done" when no host changed.
pub fn verdict(outcome: Outcome, changes: &Changes) -> &'static str {
    match outcome {
        Outcome::Done if changes.left.is_empty() => "done, nothing changed",
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
