//! `reloadctl rollouts` and `reloadctl rollouts show ID`: what the
//! project's rollouts did, read back from their journals.
//!
//! Every rollout leaves a journal in [`Journal::folder`] (see
//! [`super::journal`]); this module only reads them, so it works the same
//! for rollouts that finished, were paused, died, or run right now. It
//! never takes a journal's [`RunLock`]: holding it, even briefly, would
//! make a `resume` started at that moment fail, and a running rollout must
//! be listable. Whether a live process runs a rollout is probed with
//! [`RunLock::is_held`]. A journal may be appended to while it is read; a
//! torn last line is ignored, as on resume ([`journal::read_lines`]).
//!
//! A rollout's state is that of its last run: running while a process
//! holds its lock; otherwise the outcome of the last `Finished` record, or
//! interrupted-unfinished when there is none, or when a later generation
//! leased the hosts again (a resume whose process ended before it
//! finished).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::json;

use super::journal::{self, HostRecord, HostState, Journal, Line, Outcome, Record, RunLock};
use super::output::cause_name;
use super::project::Project;
use super::UsageError;

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutState {
    /// A live process holds the journal's lock.
    Running,
    /// Its last run was paused (Ctrl-C); `reloadctl resume` continues it.
    Paused,
    Done,
    HaltedReverted,
    HaltedPartial,
    NotStarted,
    /// Its last run ended without a `Finished` record and nobody holds the
    /// lock: the process was killed, crashed, or its machine went down.
    Interrupted,
    /// A later rollout took a host over: it stopped for good.
    Superseded,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Done => "done",
            RolloutState::HaltedReverted => "halted-reverted",
            RolloutState::HaltedPartial => "halted-partial",
            RolloutState::NotStarted => "not-started",
            RolloutState::Interrupted => "interrupted-unfinished",
            RolloutState::Superseded => "superseded",
        }
    }

    fn of_outcome(outcome: Outcome) -> RolloutState {
        match outcome {
            Outcome::Done => RolloutState::Done,
            Outcome::HaltedReverted => RolloutState::HaltedReverted,
            Outcome::HaltedPartial => RolloutState::HaltedPartial,
            Outcome::Aborted => RolloutState::Paused,
            Outcome::NotStarted => RolloutState::NotStarted,
            Outcome::Superseded => RolloutState::Superseded,
        }
    }
}

/// One journal, read without its lock.
struct History {
    id: String,
    journal: PathBuf,
    lines: Vec<Line>,
    /// A live process held the lock when the journal was last read.
    running: bool,
}

/// The plan record's fields this module shows.
struct PlanView<'a> {
    service: &'a str,
    version: &'a str,
    sha256: &'a str,
    size: u64,
    artifact: &'a Path,
    hosts: &'a [String],
    waves: &'a [Vec<usize>],
    canary: usize,
    allow_downgrade: bool,
}

impl History {
    fn read(journal: &Path) -> anyhow::Result<History> {
        let id = journal
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The lock is probed on both sides of the read: a run that ended
        // while the journal was read had written its last lines by then
        // (it appends them before it lets go of the lock), so they are
        // read again rather than the rollout shown as interrupted.
        let held_before = RunLock::is_held(journal)?;
        let mut lines = journal::read_lines(journal)?;
        let running = RunLock::is_held(journal)?;
        if held_before && !running {
            lines = journal::read_lines(journal)?;
        }
        if let Some(first) = lines.first() {
            if !matches!(first.record, Record::Plan { .. }) {
                bail!(
                    "journal {} line 1 is a {} record, not the plan a journal starts with: the journal is damaged",
                    journal.display(),
                    event_name(&first.record)
                );
            }
        }
        Ok(History {
            id,
            journal: journal.to_path_buf(),
            lines,
            running,
        })
    }

    /// None only for an empty journal: its process ended between creating
    /// the file and writing the plan ([`History::read`] refuses a journal
    /// that starts with anything else).
    fn plan(&self) -> Option<PlanView<'_>> {
        match &self.lines.first()?.record {
            Record::Plan {
                service,
                version,
                sha256,
                size,
                artifact,
                hosts,
                waves,
                settings,
                allow_downgrade,
                ..
            } => Some(PlanView {
                service,
                version,
                sha256,
                size: *size,
                artifact,
                hosts,
                waves,
                canary: settings.canary,
                allow_downgrade: *allow_downgrade,
            }),
            _ => None,
        }
    }

    /// The `Finished` line that ended the last run, if the last run ended.
    fn final_line(&self) -> Option<&Line> {
        let finished = self
            .lines
            .iter()
            .rposition(|l| matches!(l.record, Record::Finished { .. }))?;
        let leased = self
            .lines
            .iter()
            .rposition(|l| matches!(l.record, Record::Leased { .. }));
        // A generation that leased after it is a resume that never finished.
        if leased.is_some_and(|l| l > finished) {
            return None;
        }
        Some(&self.lines[finished])
    }

    fn state(&self) -> RolloutState {
        if self.running {
            return RolloutState::Running;
        }
        match self.final_line().map(|l| &l.record) {
            Some(Record::Finished { outcome, .. }) => RolloutState::of_outcome(*outcome),
            _ => RolloutState::Interrupted,
        }
    }

    fn halted(&self) -> bool {
        self.lines
            .iter()
            .any(|l| matches!(l.record, Record::Halted { .. }))
    }

    /// Whether `reloadctl resume` would continue it (the checks it makes).
    fn resumable(&self) -> bool {
        self.plan().is_some() && !self.running && !super::finished(&self.lines) && !self.halted()
    }

    /// Each host's state as the journal leaves it, in plan order.
    fn hosts(&self) -> Vec<(&str, HostRecord)> {
        let Some(plan) = self.plan() else {
            return Vec::new();
        };
        let records = HostRecord::from_journal(plan.hosts, &self.lines);
        plan.hosts.iter().map(String::as_str).zip(records).collect()
    }

    /// Hosts on the target version (healthy or skipped), and all hosts.
    fn done_of_total(&self) -> (usize, usize) {
        let hosts = self.hosts();
        let done = hosts
            .iter()
            .filter(|(_, r)| matches!(r.state, Some(HostState::Healthy | HostState::Skipped)))
            .count();
        (done, hosts.len())
    }

    /// Who ran it last: the holder of the last `Leased` record.
    fn holder(&self) -> Option<&str> {
        self.lines.iter().rev().find_map(|l| match &l.record {
            Record::Leased { holder, .. } if !holder.is_empty() => Some(holder.as_str()),
            Record::Leased { .. } => Some(""),
            _ => None,
        })
    }

    /// The pid written in the lock file by the process that holds it.
    fn running_pid(&self) -> Option<String> {
        if !self.running {
            return None;
        }
        let pid = std::fs::read_to_string(RunLock::path_for(&self.journal)).ok()?;
        Some(pid.trim().to_string()).filter(|p| !p.is_empty())
    }
}

/// `alice@box` out of a holder "reloadctl push web 1.5 by alice@box pid
/// 42 (rollout ...)"; a holder of another form whole; None when there is
/// none (journals from before holders were recorded).
pub fn who(holder: &str) -> Option<String> {
    let holder = holder.trim();
    if holder.is_empty() {
        return None;
    }
    for (at, by) in holder.match_indices(" by ") {
        if let Some((user_at_machine, _)) = holder[at + by.len()..].split_once(' ') {
            if user_at_machine.contains('@') {
                return Some(user_at_machine.to_string());
            }
        }
    }
    Some(holder.to_string())
}

/// One line of `reloadctl rollouts` (also its `--output json` object).
#[derive(Debug, Serialize)]
pub struct Row {
    pub id: String,
    pub service: Option<String>,
    pub version: Option<String>,
    /// A [`RolloutState::name`], or "damaged" for a journal that cannot be
    /// read (then `error` says why).
    pub state: String,
    pub hosts_done: usize,
    pub hosts_total: usize,
    /// The time of the journal's first line.
    pub started: Option<String>,
    /// `user@machine` of [`Row::holder`], see [`who`].
    pub by: Option<String>,
    /// Who ran it last, as its last run recorded it.
    pub holder: Option<String>,
    pub journal: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Newest first: the start, else (no line to tell) the file's mtime.
    #[serde(skip)]
    sort_key: SystemTime,
}

impl Row {
    fn of(history: &History) -> Row {
        let plan = history.plan();
        let (hosts_done, hosts_total) = history.done_of_total();
        let started = history.lines.first().map(|l| l.time.clone());
        let holder = history.holder().filter(|h| !h.is_empty());
        Row {
            id: history.id.clone(),
            service: plan.as_ref().map(|p| p.service.to_string()),
            version: plan.as_ref().map(|p| p.version.to_string()),
            state: history.state().name().to_string(),
            hosts_done,
            hosts_total,
            sort_key: started
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .unwrap_or_else(|| modified(&history.journal)),
            started,
            by: holder.and_then(who),
            holder: holder.map(str::to_string),
            journal: history.journal.clone(),
            error: None,
        }
    }

    fn damaged(journal: &Path, error: &anyhow::Error) -> Row {
        Row {
            id: journal
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            service: None,
            version: None,
            state: "damaged".into(),
            hosts_done: 0,
            hosts_total: 0,
            started: None,
            by: None,
            holder: None,
            journal: journal.to_path_buf(),
            error: Some(format!("{error:#}")),
            sort_key: modified(journal),
        }
    }
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Every rollout journaled in `folder`, newest first; none when the folder
/// does not exist (no rollout was ever pushed from this project). A journal
/// that cannot be read is a "damaged" row, so one bad file does not hide
/// the others.
pub fn rows(folder: &Path) -> anyhow::Result<Vec<Row>> {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", folder.display())),
    };
    let mut rows = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", folder.display()))?
            .path();
        // Journals only (beside them: their run locks).
        if path.extension().is_none_or(|e| e != "jsonl") || !path.is_file() {
            continue;
        }
        rows.push(match History::read(&path) {
            Ok(history) => Row::of(&history),
            Err(err) => Row::damaged(&path, &err),
        });
    }
    rows.sort_by(|a, b| b.sort_key.cmp(&a.sort_key).then_with(|| a.id.cmp(&b.id)));
    Ok(rows)
}

/// The aligned table `reloadctl rollouts` prints.
pub fn render_rows(rows: &[Row]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut table = vec![[
        "ID", "SERVICE", "VERSION", "STATE", "HOSTS", "STARTED", "BY",
    ]
    .map(String::from)
    .to_vec()];
    for row in rows {
        table.push(vec![
            row.id.clone(),
            dash(&row.service),
            dash(&row.version),
            row.state.clone(),
            if row.error.is_some() {
                "-".into()
            } else {
                format!("{}/{}", row.hosts_done, row.hosts_total)
            },
            row.started
                .as_deref()
                .map(to_seconds)
                .unwrap_or_else(|| "-".into()),
            dash(&row.by),
        ]);
    }
    align(&table, "")
}

/// The one line said when there is no rollout to list.
fn nothing_to_list(folder: &Path) -> String {
    format!(
        "no rollouts in {}: none was pushed from this project yet (`reloadctl push` starts one; --config for another project)",
        folder.display()
    )
}

/// `reloadctl rollouts`: the table (or JSON lines) on stdout. Exit code 1
/// when a journal could not be read (the others are listed all the same).
pub fn list(config: &Path, json: bool) -> anyhow::Result<u8> {
    let project = Project::load(config).map_err(|e| anyhow::Error::new(UsageError(e)))?;
    let folder = Journal::folder(&project.base);
    let rows = rows(&folder)?;
    if rows.is_empty() {
        // Stdout stays empty for scripts reading JSON lines.
        if json {
            eprintln!("{}", nothing_to_list(&folder));
        } else {
            println!("{}", nothing_to_list(&folder));
        }
        return Ok(0);
    }
    let mut text = String::new();
    if json {
        for row in &rows {
            text.push_str(&serde_json::to_string(row)?);
            text.push('\n');
        }
    } else {
        text = render_rows(&rows);
    }
    print_stdout(&text)?;
    let damaged: Vec<&Row> = rows.iter().filter(|r| r.error.is_some()).collect();
    for row in &damaged {
        eprintln!(
            "reloadctl: {} (listed as damaged)",
            row.error.as_deref().unwrap_or_default()
        );
    }
    Ok(if damaged.is_empty() { 0 } else { 1 })
}

/// The journal of rollout `id` in `folder`; a usage error (exit code 2)
/// when there is none.
fn find(folder: &Path, id: &str) -> anyhow::Result<PathBuf> {
    // An id names a file in the folder, never a path elsewhere.
    let plain = !id.is_empty() && !id.starts_with('.') && !id.contains(['/', '\\']);
    let path = folder.join(format!("{id}.jsonl"));
    if plain && path.is_file() {
        return Ok(path);
    }
    Err(anyhow::Error::new(UsageError(anyhow!(
        "no rollout {id:?} in {}: `reloadctl rollouts` lists the rollout ids there (with --config for another project's rollouts)",
        folder.display()
    ))))
}

/// `reloadctl rollouts show ID`: one rollout, on stdout.
pub fn show(config: &Path, id: &str, json: bool) -> anyhow::Result<u8> {
    let project = Project::load(config).map_err(|e| anyhow::Error::new(UsageError(e)))?;
    let history = History::read(&find(&Journal::folder(&project.base), id)?)?;
    let text = if json {
        format!("{}\n", show_json(&history))
    } else {
        render_show(&history)
    };
    print_stdout(&text)?;
    Ok(0)
}

fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// What `reloadctl rollouts show` prints for people.
fn render_show(history: &History) -> String {
    let state = history.state();
    let mut out = String::new();
    let _ = writeln!(out, "rollout {}: {}", history.id, state.name());
    let _ = writeln!(out, "journal  {}", history.journal.display());
    let Some(plan) = history.plan() else {
        let _ = writeln!(
            out,
            "the journal is empty: the process that created it ended before it wrote the plan, so the rollout changed nothing"
        );
        return out;
    };
    let _ = writeln!(
        out,
        "plan     {} {} (sha256 {}, {} bytes, {}) to {} host(s) in {} wave(s); allow_downgrade {}",
        plan.service,
        plan.version,
        plan.sha256.get(..12).unwrap_or(plan.sha256),
        plan.size,
        plan.artifact.display(),
        plan.hosts.len(),
        plan.waves.len(),
        if plan.allow_downgrade { "yes" } else { "no" }
    );
    let waves: Vec<Vec<String>> = plan
        .waves
        .iter()
        .enumerate()
        .map(|(i, wave)| vec![wave_name(i, plan.canary), wave_hosts(&plan, wave).join(" ")])
        .collect();
    out.push_str(&align(&waves, "  "));

    let runs: Vec<Vec<String>> = history
        .lines
        .iter()
        .filter_map(|l| match &l.record {
            Record::Leased {
                generation, holder, ..
            } => Some(vec![
                format!("generation {generation}"),
                to_seconds(&l.time),
                if holder.is_empty() {
                    "(holder not recorded)".to_string()
                } else {
                    holder.clone()
                },
            ]),
            _ => None,
        })
        .collect();
    if runs.is_empty() {
        let _ = writeln!(out, "runs     none took the leases");
    } else {
        let _ = writeln!(out, "runs");
        out.push_str(&align(&runs, "  "));
    }

    let mut hosts = vec![["HOST", "STATE", "CAUSE", "DETAIL"]
        .map(String::from)
        .to_vec()];
    for (host, record) in history.hosts() {
        hosts.push(vec![
            host.to_string(),
            record
                .state
                .map(snake_name)
                .unwrap_or_else(|| "untouched".into()),
            record.cause.map(cause_name).unwrap_or("-").to_string(),
            record.message,
        ]);
    }
    let _ = writeln!(out, "hosts");
    out.push_str(&align(&hosts, "  "));

    // Every halt and pause, in order: a rollout paused, resumed and then
    // halted shows both.
    let stops: Vec<Vec<String>> = history
        .lines
        .iter()
        .filter_map(|l| match &l.record {
            Record::Halted { reason } => {
                Some(vec!["halted".into(), to_seconds(&l.time), reason.clone()])
            }
            Record::Paused { reason } => {
                Some(vec!["paused".into(), to_seconds(&l.time), reason.clone()])
            }
            _ => None,
        })
        .collect();
    out.push_str(&align(&stops, ""));

    let outcome = match history.final_line() {
        Some(Line {
            time,
            record:
                Record::Finished {
                    hosts,
                    healthy,
                    skipped,
                    failed,
                    reverted,
                    bytes_sent,
                    elapsed_seconds,
                    ..
                },
            ..
        }) if !history.running => format!(
            "{} at {}: {healthy} healthy, {skipped} skipped, {failed} failed, {reverted} reverted of {hosts} host(s); the last run took {elapsed_seconds:.1}s and sent {bytes_sent} bytes",
            state.name(),
            to_seconds(time),
        ),
        _ if history.running => match history.running_pid() {
            Some(pid) => format!("none yet: reloadctl pid {pid} runs it now"),
            None => "none yet: a reloadctl process runs it now".into(),
        },
        _ => "none: the process that ran it ended before it finished (killed, crashed, or its machine went down)".into(),
    };
    let _ = writeln!(out, "outcome  {outcome}");
    if let Some(hint) = next_step(history) {
        let _ = writeln!(out, "{hint}");
    }
    out
}

/// What to do next, for a rollout that stopped without finishing.
fn next_step(history: &History) -> Option<String> {
    match history.state() {
        RolloutState::Paused | RolloutState::Interrupted if history.resumable() => Some(format!(
            "resume with `reloadctl resume {}`",
            history.id
        )),
        RolloutState::Interrupted if history.halted() && !super::finished(&history.lines) => Some(
            "it halted, and `reloadctl resume` does not continue a halted rollout: check the hosts with `reloadctl status HOSTS_FILE`, then push again or `reloadctl rollback`".into(),
        ),
        _ => None,
    }
}

/// `reloadctl rollouts show --output json`: one object. Halts, pauses and
/// the outcome are the journal lines themselves.
fn show_json(history: &History) -> serde_json::Value {
    let state = history.state();
    let plan = history.plan().map(|plan| {
        json!({
            "service": plan.service,
            "version": plan.version,
            "sha256": plan.sha256,
            "size": plan.size,
            "artifact": plan.artifact,
            "hosts": plan.hosts,
            "waves": plan.waves.iter().map(|w| wave_hosts(&plan, w)).collect::<Vec<_>>(),
            "allow_downgrade": plan.allow_downgrade,
        })
    });
    let runs: Vec<serde_json::Value> = history
        .lines
        .iter()
        .filter_map(|l| match &l.record {
            Record::Leased {
                generation,
                holder,
                tokens,
            } => Some(json!({
                "generation": generation,
                "time": l.time,
                "holder": Some(holder).filter(|h| !h.is_empty()),
                "by": who(holder),
                "tokens": tokens,
            })),
            _ => None,
        })
        .collect();
    let hosts: Vec<serde_json::Value> = history
        .hosts()
        .into_iter()
        .map(|(host, record)| {
            json!({
                "host": host,
                "state": record.state,
                "cause": record.cause,
                "message": record.message,
            })
        })
        .collect();
    let stops: Vec<&Line> = history
        .lines
        .iter()
        .filter(|l| matches!(l.record, Record::Halted { .. } | Record::Paused { .. }))
        .collect();
    json!({
        "id": history.id,
        "state": state.name(),
        "journal": history.journal,
        "running_pid": history.running_pid(),
        "plan": plan,
        "runs": runs,
        "hosts": hosts,
        "stops": stops,
        "outcome": history.final_line().filter(|_| !history.running),
        "next": next_step(history),
    })
}

fn wave_name(index: usize, canary: usize) -> String {
    if index == 0 && canary > 0 {
        "canary".into()
    } else {
        format!("wave {}", index + 1)
    }
}

fn wave_hosts<'a>(plan: &PlanView<'a>, wave: &[usize]) -> Vec<&'a str> {
    wave.iter()
        .map(|&i| plan.hosts.get(i).map_or("?", String::as_str))
        .collect()
}

/// A host state as the journal spells it (`revert_failed`).
fn snake_name(state: HostState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{state:?}"))
}

/// A record's `event` name as the journal spells it (`leased`).
fn event_name(record: &Record) -> String {
    serde_json::to_value(record)
        .ok()
        .and_then(|v| v.get("event")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// A journal time to the second, for tables; as written if it does not
/// parse.
fn to_seconds(time: &str) -> String {
    humantime::parse_rfc3339_weak(time)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|_| time.to_string())
}

/// Rows as columns padded to their widest cell, each line after `indent`;
/// the last column is not padded.
fn align(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_string();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 < row.len() {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use super::*;
    use crate::rollout::journal::Cause;
    use crate::rollout::settings::RolloutSettings;

    const HOSTS: [&str; 3] = ["a:7700", "b:7700", "c:7700"];

    fn plan() -> Record {
        Record::Plan {
            service: "web".into(),
            version: "1.5.0".into(),
            sha256: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            size: 1024,
            artifact: "/releases/web-1.5.0".into(),
            hosts: HOSTS.map(String::from).to_vec(),
            waves: vec![vec![0], vec![1, 2]],
            settings: Box::new(RolloutSettings::default()),
            allow_downgrade: false,
            fetch_url: None,
        }
    }

    fn leased(generation: u64, holder: &str) -> Record {
        Record::Leased {
            generation,
            holder: holder.into(),
            tokens: BTreeMap::new(),
        }
    }

    fn host(index: usize, state: HostState) -> Record {
        Record::Host {
            host: HOSTS[index].into(),
            state,
            cause: None,
            message: String::new(),
        }
    }

    fn finished(outcome: Outcome, healthy: usize, skipped: usize) -> Record {
        Record::Finished {
            outcome,
            hosts: HOSTS.len(),
            healthy,
            skipped,
            failed: 0,
            reverted: 0,
            left: 0,
            bytes_sent: 2048,
            elapsed_seconds: 12.34,
        }
    }

    fn holder(id: &str) -> String {
        format!("reloadctl push web 1.5.0 by alice@box pid 42 (rollout {id})")
    }

    /// Writes a journal of `records` and closes it (its run ended).
    fn write(base: &Path, id: &str, records: Vec<Record>) -> PathBuf {
        let journal = open(base, id, records);
        let path = journal.path.clone();
        drop(journal);
        path
    }

    /// Writes a journal of `records` and keeps it open: its run goes on.
    fn open(base: &Path, id: &str, records: Vec<Record>) -> Journal {
        let mut journal = Journal::create(base, id, false).unwrap();
        for record in records {
            journal.append(record).unwrap();
        }
        // Starts a millisecond apart at least, so newest-first is certain.
        std::thread::sleep(std::time::Duration::from_millis(5));
        journal
    }

    fn read(base: &Path, id: &str) -> History {
        History::read(&Journal::folder(base).join(format!("{id}.jsonl"))).unwrap()
    }

    /// One rollout done, one paused, one whose process died, one running.
    fn four_rollouts(base: &Path) -> Journal {
        write(
            base,
            "r-done",
            vec![
                plan(),
                leased(1, &holder("r-done")),
                host(0, HostState::Healthy),
                host(1, HostState::Healthy),
                host(2, HostState::Skipped),
                finished(Outcome::Done, 2, 1),
            ],
        );
        write(
            base,
            "r-paused",
            vec![
                plan(),
                leased(1, &holder("r-paused")),
                host(0, HostState::Healthy),
                Record::Paused {
                    reason: "interrupted (Ctrl-C)".into(),
                },
                finished(Outcome::Aborted, 1, 0),
            ],
        );
        // A journal from before holders were recorded, whose process was
        // killed mid-activation.
        write(
            base,
            "r-died",
            vec![
                plan(),
                leased(1, ""),
                host(0, HostState::Healthy),
                host(1, HostState::Activating),
            ],
        );
        open(
            base,
            "r-running",
            vec![plan(), leased(1, "deploy bot"), host(0, HostState::Skipped)],
        )
    }

    #[test]
    fn the_list_shows_each_rollouts_state_hosts_and_holder_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let running = four_rollouts(dir.path());
        let rows = rows(&Journal::folder(dir.path())).unwrap();
        let seen: Vec<(&str, &str, usize, usize, Option<&str>)> = rows
            .iter()
            .map(|r| {
                (
                    r.id.as_str(),
                    r.state.as_str(),
                    r.hosts_done,
                    r.hosts_total,
                    r.by.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("r-running", "running", 1, 3, Some("deploy bot")),
                ("r-died", "interrupted-unfinished", 1, 3, None),
                ("r-paused", "paused", 1, 3, Some("alice@box")),
                ("r-done", "done", 3, 3, Some("alice@box")),
            ]
        );
        assert_eq!(rows[3].holder.as_deref(), Some(holder("r-done").as_str()));
        assert!(rows.iter().all(|r| r.service.as_deref() == Some("web")
            && r.version.as_deref() == Some("1.5.0")
            && r.started.is_some()));

        let table = render_rows(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(
            lines[0].starts_with("ID         SERVICE  VERSION  STATE"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("r-died     web      1.5.0    interrupted-unfinished  1/3"),
            "{table}"
        );
        assert!(lines[2].ends_with(" -"), "{table}");
        assert!(lines[4].ends_with(" alice@box"), "{table}");
        // Columns line up: every STATE cell starts where the header's does.
        let column = lines[0].find("STATE").unwrap();
        for line in &lines[1..] {
            assert_eq!(&line[column - 2..column], "  ", "{table}");
            assert_ne!(line.as_bytes()[column], b' ', "{table}");
        }

        // The run ends: the same journal now reads as its outcome.
        let mut running = running;
        running.append(finished(Outcome::Done, 1, 1)).unwrap();
        drop(running);
        assert_eq!(rows_state(dir.path(), "r-running"), "done");
    }

    fn rows_state(base: &Path, id: &str) -> String {
        rows(&Journal::folder(base))
            .unwrap()
            .into_iter()
            .find(|r| r.id == id)
            .unwrap()
            .state
    }

    #[test]
    fn listing_a_running_rollout_does_not_get_in_its_way() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = open(dir.path(), "r1", vec![plan(), leased(1, "x")]);
        assert_eq!(rows_state(dir.path(), "r1"), "running");
        // The run goes on writing, and a second run is still refused.
        running.append(host(0, HostState::Healthy)).unwrap();
        let refused = format!("{:#}", Journal::reopen(&running.path, false).err().unwrap());
        assert!(refused.contains("in use by reloadctl pid"), "{refused}");
        let history = read(dir.path(), "r1");
        assert_eq!(history.done_of_total(), (1, 3));
        assert_eq!(history.running_pid(), Some(std::process::id().to_string()));
        let text = render_show(&history);
        assert!(
            text.contains(&format!(
                "outcome  none yet: reloadctl pid {} runs it now",
                std::process::id()
            )),
            "{text}"
        );
        assert!(!text.contains("resume with"), "{text}");
    }

    #[test]
    fn a_resume_that_died_after_a_pause_is_interrupted_not_paused() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "r1",
            vec![
                plan(),
                leased(1, &holder("r1")),
                Record::Paused {
                    reason: "interrupted (Ctrl-C)".into(),
                },
                finished(Outcome::Aborted, 0, 0),
                leased(2, "reloadctl push web 1.5.0 by bob@ci pid 7 (rollout r1)"),
                host(0, HostState::Activated),
            ],
        );
        let rows = rows(&Journal::folder(dir.path())).unwrap();
        assert_eq!(rows[0].state, "interrupted-unfinished");
        // The last run's holder.
        assert_eq!(rows[0].by.as_deref(), Some("bob@ci"));
        let text = render_show(&read(dir.path(), "r1"));
        assert!(text.contains("runs\n  generation 1  "), "{text}");
        assert!(text.contains("by alice@box pid 42"), "{text}");
        assert!(text.contains("\n  generation 2  "), "{text}");
        assert!(text.contains("by bob@ci pid 7"), "{text}");
        assert!(
            text.contains("outcome  none: the process that ran it ended before it finished"),
            "{text}"
        );
        assert!(
            text.ends_with("resume with `reloadctl resume r1`\n"),
            "{text}"
        );
    }

    #[test]
    fn show_tells_the_plan_runs_hosts_stops_and_outcome() {
        let dir = tempfile::tempdir().unwrap();
        drop(four_rollouts(dir.path()));
        let paused = render_show(&read(dir.path(), "r-paused"));
        let expected_start = format!(
            "rollout r-paused: paused\n\
             journal  {}\n\
             plan     web 1.5.0 (sha256 0123456789ab, 1024 bytes, /releases/web-1.5.0) to 3 host(s) in 2 wave(s); allow_downgrade no\n  \
             canary  a:7700\n  \
             wave 2  b:7700 c:7700\n\
             runs\n  \
             generation 1  ",
            Journal::folder(dir.path()).join("r-paused.jsonl").display()
        );
        assert!(paused.starts_with(&expected_start), "{paused}");
        assert!(
            paused.contains(
                "  reloadctl push web 1.5.0 by alice@box pid 42 (rollout r-paused)\n\
                 hosts\n  \
                 HOST    STATE      CAUSE  DETAIL\n  \
                 a:7700  healthy    -\n  \
                 b:7700  untouched  -\n  \
                 c:7700  untouched  -\n\
                 paused  "
            ),
            "{paused}"
        );
        assert!(
            paused.contains("  interrupted (Ctrl-C)\noutcome  paused at "),
            "{paused}"
        );
        assert!(
            paused.contains(": 1 healthy, 0 skipped, 0 failed, 0 reverted of 3 host(s); the last run took 12.3s and sent 2048 bytes\n"),
            "{paused}"
        );
        assert!(
            paused.ends_with("\nresume with `reloadctl resume r-paused`\n"),
            "{paused}"
        );

        let done = render_show(&read(dir.path(), "r-done"));
        assert!(done.starts_with("rollout r-done: done\n"), "{done}");
        assert!(done.contains("\n  c:7700  skipped  -"), "{done}");
        assert!(done.contains("\noutcome  done at "), "{done}");
        assert!(!done.contains("resume"), "{done}");

        let died = render_show(&read(dir.path(), "r-died"));
        assert!(died.contains("(holder not recorded)"), "{died}");
        assert!(died.contains("\n  b:7700  activating  -"), "{died}");
        assert!(
            died.ends_with("resume with `reloadctl resume r-died`\n"),
            "{died}"
        );

        let json = show_json(&read(dir.path(), "r-paused"));
        assert_eq!(json["state"], "paused");
        assert_eq!(
            json["plan"]["waves"],
            json!([["a:7700"], ["b:7700", "c:7700"]])
        );
        assert_eq!(json["runs"][0]["by"], "alice@box");
        assert_eq!(
            json["hosts"][0],
            json!({"host": "a:7700", "state": "healthy", "cause": null, "message": ""})
        );
        assert_eq!(json["stops"][0]["event"], "paused");
        assert_eq!(json["outcome"]["outcome"], "aborted");
        assert_eq!(json["next"], "resume with `reloadctl resume r-paused`");
    }

    #[test]
    fn a_halted_rollout_shows_why_and_each_hosts_cause_and_is_not_offered_a_resume() {
        let dir = tempfile::tempdir().unwrap();
        let failed = Record::Host {
            host: HOSTS[1].into(),
            state: HostState::Failed,
            cause: Some(Cause::Unhealthy),
            message: "not healthy within 2m".into(),
        };
        let reason = "2 host(s) failed, above the budget of 0 (--max-failures 0)";
        let mut records = vec![
            plan(),
            leased(1, &holder("r1")),
            host(0, HostState::Activated),
            failed,
            Record::Halted {
                reason: reason.into(),
            },
        ];
        // Its process died while reverting.
        write(dir.path(), "r-mid-revert", records.clone());
        records.push(host(0, HostState::Reverted));
        records.push(finished(Outcome::HaltedReverted, 0, 0));
        write(dir.path(), "r-reverted", records);

        let reverted = render_show(&read(dir.path(), "r-reverted"));
        assert!(
            reverted.starts_with("rollout r-reverted: halted-reverted\n"),
            "{reverted}"
        );
        assert!(
            reverted.contains("\n  a:7700  reverted   -\n"),
            "{reverted}"
        );
        assert!(
            reverted
                .contains("\n  b:7700  failed     unhealthy after reload  not healthy within 2m\n"),
            "{reverted}"
        );
        assert!(
            reverted.contains(&format!("  {reason}\noutcome  halted-reverted at ")),
            "{reverted}"
        );
        assert!(reverted.contains("\nhalted  "), "{reverted}");
        assert!(!reverted.contains("resume"), "{reverted}");

        let mid = render_show(&read(dir.path(), "r-mid-revert"));
        assert!(
            mid.starts_with("rollout r-mid-revert: interrupted-unfinished\n"),
            "{mid}"
        );
        assert!(
            mid.ends_with("it halted, and `reloadctl resume` does not continue a halted rollout: check the hosts with `reloadctl status HOSTS_FILE`, then push again or `reloadctl rollback`\n"),
            "{mid}"
        );
    }

    #[test]
    fn an_unknown_id_is_a_usage_error_that_says_where_it_looked_and_how_to_list() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Journal::folder(dir.path());
        for id in ["nope", "../r1", ""] {
            let err = find(&folder, id).err().unwrap();
            assert!(err.downcast_ref::<UsageError>().is_some());
            let text = format!("{err:#}");
            assert!(text.contains(&folder.display().to_string()), "{text}");
            assert!(
                text.contains("`reloadctl rollouts` lists the rollout ids"),
                "{text}"
            );
        }
        write(dir.path(), "r1", vec![plan()]);
        assert_eq!(find(&folder, "r1").unwrap(), folder.join("r1.jsonl"));
    }

    #[test]
    fn a_damaged_line_names_the_file_and_line_and_the_list_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "r-good", vec![plan(), leased(1, "x")]);
        let path = write(dir.path(), "r-bad", vec![plan()]);
        // A damaged line with a good one after it: unlike a torn last line
        // (never fsync'd, so nothing acted on it), it is not skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(
                b"{\"rollout\": oops\n\
                  {\"rollout\":\"r-bad\",\"seq\":3,\"time\":\"2024-01-01T00:00:00.000Z\",\"event\":\"paused\",\"reason\":\"x\"}\n",
            )
            .unwrap();

        let err = History::read(&path).err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("journal {} line 2 is damaged", path.display())),
            "{text}"
        );

        let rows = rows(&Journal::folder(dir.path())).unwrap();
        let bad = rows.iter().find(|r| r.id == "r-bad").unwrap();
        assert_eq!(bad.state, "damaged");
        assert!(bad.error.as_deref().unwrap().contains("line 2 is damaged"));
        let good = rows.iter().find(|r| r.id == "r-good").unwrap();
        assert_eq!(good.state, "interrupted-unfinished");
    }

    #[test]
    fn an_empty_journal_and_one_without_a_plan_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        // Its process ended between creating the file and the plan.
        write(dir.path(), "r-empty", vec![]);
        let empty = read(dir.path(), "r-empty");
        assert_eq!(empty.state(), RolloutState::Interrupted);
        let text = render_show(&empty);
        assert!(text.contains("the journal is empty"), "{text}");
        assert!(!text.contains("resume with"), "{text}");

        write(dir.path(), "r-headless", vec![leased(1, "x")]);
        let path = Journal::folder(dir.path()).join("r-headless.jsonl");
        let text = format!("{:#}", History::read(&path).err().unwrap());
        assert!(
            text.contains(&format!(
                "journal {} line 1 is a leased record, not the plan",
                path.display()
            )),
            "{text}"
        );
    }

    #[test]
    fn no_folder_or_an_empty_one_lists_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let folder = Journal::folder(dir.path());
        assert!(rows(&folder).unwrap().is_empty());
        std::fs::create_dir_all(&folder).unwrap();
        assert!(rows(&folder).unwrap().is_empty());
        let message = nothing_to_list(&folder);
        assert!(message.contains(&folder.display().to_string()));
        assert!(!message.contains('\n'));
    }

    #[test]
    fn who_is_the_user_at_machine_of_a_holder_when_it_names_one() {
        assert_eq!(
            who("reloadctl push web 1.5.0 by alice@box pid 42 (rollout 3f)").as_deref(),
            Some("alice@box")
        );
        // The first " by " is not always the one.
        assert_eq!(
            who("started by hand by bob@ci pid 1").as_deref(),
            Some("bob@ci")
        );
        assert_eq!(who("deploy bot").as_deref(), Some("deploy bot"));
        assert_eq!(who("run by hand").as_deref(), Some("run by hand"));
        assert_eq!(who(""), None);
        assert_eq!(who("  "), None);
    }
}
