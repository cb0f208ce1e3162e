//! The rollout journal: one JSON line per state change, appended and
//! fsync'd before the rollout acts on it, so `reloadctl resume` (after
//! Ctrl-C, a crash or SIGKILL) knows exactly what was done. The same lines
//! are the `--output json` event stream.
//!
//! Host states are many and come from many tasks at once (a thousand hosts
//! staging and rolling), so their fsyncs are grouped: a writer appends its
//! line under the journal's lock, then waits, off the lock and off the
//! async runtime's threads, for one thread that fsyncs on behalf of every
//! line written since its last fsync ([`Journal::append_deferred`]). Each
//! writer still acts only once its own line is on disk; it just shares the
//! fsync with the others that wrote meanwhile.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};

use super::settings::RolloutSettings;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Already on the target version: left alone.
    Skipped,
    Staged,
    Activating,
    /// The new process is serving; the health gate runs next.
    Activated,
    Healthy,
    Failed,
    Reverted,
    RevertFailed,
    /// Its outcome was unknown at the halt (no answer came back); asked
    /// afterwards, it had not changed: nothing to revert.
    Unchanged,
}

/// Why a host failed, kept apart because each calls for another response.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The agent could not be reached.
    Unreachable,
    /// The agent refused: verification, lease, unknown service.
    Rejected,
    /// The new process never became ready; the old one still serves.
    ReloadFailed,
    /// Ready, but not healthy within the healthy deadline.
    Unhealthy,
    /// A later rollout took the host over (a higher fencing token): this
    /// rollout may never act on it again.
    Superseded,
    /// The lease could not be renewed in time: the rollout stopped
    /// touching the host.
    LeaseLost,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Done,
    HaltedReverted,
    HaltedPartial,
    Aborted,
    NotStarted,
    /// A later rollout superseded this one: it stopped, and reverted
    /// nothing (that would undo the later rollout's work).
    Superseded,
}

impl Outcome {
    /// The exit code that tells this outcome apart (see `reloadctl push --help`).
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::NotStarted => 1,
            Outcome::HaltedReverted => 3,
            Outcome::HaltedPartial => 4,
            Outcome::Aborted => 5,
            Outcome::Superseded => 6,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    Plan {
        service: String,
        version: String,
        sha256: String,
        size: u64,
        artifact: PathBuf,
        hosts: Vec<String>,
        /// Host indexes per wave, the canary first.
        waves: Vec<Vec<usize>>,
        /// Every knob, so a resume runs with what was planned.
        settings: Box<RolloutSettings>,
        /// `push --allow-downgrade`: the operator asked to go below the
        /// agents' downgrade floor.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allow_downgrade: bool,
        /// Where the agents fetch the release, if not from the CLI.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fetch_url: Option<String>,
    },
    /// A new generation took the leases (a start or a resume).
    Leased {
        generation: u64,
        /// Who runs it ("reloadctl push web 1.5 by alice@box pid 42 ...").
        #[serde(default, skip_serializing_if = "String::is_empty")]
        holder: String,
        /// The fencing token each agent granted this run (host -> token):
        /// a resume that finds a higher one on an agent was superseded.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        tokens: BTreeMap<String, u64>,
    },
    Wave {
        index: usize,
        of: usize,
        hosts: Vec<String>,
    },
    Host {
        host: String,
        state: HostState,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        cause: Option<Cause>,
        #[serde(skip_serializing_if = "String::is_empty", default)]
        message: String,
    },
    Halted {
        reason: String,
    },
    Paused {
        reason: String,
    },
    Finished {
        outcome: Outcome,
        hosts: usize,
        healthy: usize,
        skipped: usize,
        failed: usize,
        reverted: usize,
        /// Changed by this rollout and not reverted: on its version now.
        #[serde(default)]
        left: usize,
        bytes_sent: u64,
        elapsed_seconds: f64,
    },
}

/// A journal line: the record with its rollout and time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Line {
    pub rollout: String,
    pub seq: u64,
    pub time: String,
    #[serde(flatten)]
    pub record: Record,
}

pub struct Journal {
    pub path: PathBuf,
    rollout: String,
    file: Arc<File>,
    /// Held while this process runs the rollout (see [`RunLock`]).
    _lock: RunLock,
    seq: u64,
    /// The `seq` of the last line written to the file (maybe not synced
    /// yet); read by the fsync thread before each fsync.
    written: Arc<AtomicU64>,
    /// To the fsync thread of [`Journal::append_deferred`], started by its
    /// first call.
    group_sync: Option<mpsc::Sender<SyncWaiter>>,
    /// How many fsyncs the fsync thread has made (for tests).
    group_fsyncs: Arc<AtomicU64>,
    /// Also print each line on stdout (`--output json`).
    echo: bool,
}

/// A line waiting for the fsync thread: its seq and where to answer.
type SyncWaiter = (u64, tokio::sync::oneshot::Sender<Result<(), String>>);

/// A line written by [`Journal::append_deferred`], not yet known durable.
#[must_use = "a deferred line may only be acted on once durable() returns"]
pub struct PendingSync {
    answer: tokio::sync::oneshot::Receiver<Result<(), String>>,
    path: PathBuf,
}

impl PendingSync {
    /// Waits until the line is on disk. Err: the fsync failed (the error
    /// names the journal) or the fsync thread is gone.
    pub async fn durable(self) -> anyhow::Result<()> {
        let cannot_write =
            |e: String| anyhow!("cannot write the journal {}: {e}", self.path.display());
        match self.answer.await {
            Ok(result) => result.map_err(cannot_write),
            Err(_) => Err(cannot_write("its fsync thread ended".into())),
        }
    }
}

/// The fsync thread: takes every waiter that has arrived, fsyncs once for
/// all of them, answers them, and again. While one fsync runs the next
/// writers queue up, so under load one fsync covers many lines; when idle,
/// a lone writer waits for its own fsync only.
fn run_group_sync(
    file: Arc<File>,
    written: Arc<AtomicU64>,
    fsyncs: Arc<AtomicU64>,
    waiters: mpsc::Receiver<SyncWaiter>,
) {
    let mut synced = 0;
    // After a failed fsync the kernel may have dropped the dirty pages
    // and a later fsync may succeed without them: every later line fails
    // too, and the rollout stops.
    let mut failed: Option<String> = None;
    while let Ok(first) = waiters.recv() {
        let mut batch = vec![first];
        batch.extend(waiters.try_iter());
        if failed.is_none() && batch.iter().any(|(seq, _)| *seq > synced) {
            // Read before the fsync: every line up to here is in the file,
            // so this fsync covers it. A waiter's line was written before
            // it queued, so it is covered.
            let upto = written.load(Ordering::Acquire);
            fsyncs.fetch_add(1, Ordering::Relaxed);
            match file.sync_data() {
                Ok(()) => synced = upto,
                Err(e) => failed = Some(e.to_string()),
            }
        }
        for (_, answer) in batch {
            let _ = answer.send(match &failed {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            });
        }
    }
}

impl Journal {
    pub fn folder(base: &Path) -> PathBuf {
        base.join(".reloadctl").join("rollouts")
    }

    pub fn create(base: &Path, rollout: &str, echo: bool) -> anyhow::Result<Journal> {
        let dir = Journal::folder(base);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{rollout}.jsonl"));
        let lock = RunLock::take(&path)?;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create the journal {}", path.display()))?;
        File::open(&dir)?.sync_all()?;
        Ok(Journal {
            path,
            rollout: rollout.to_string(),
            file: Arc::new(file),
            _lock: lock,
            seq: 0,
            written: Arc::new(AtomicU64::new(0)),
            group_sync: None,
            group_fsyncs: Arc::new(AtomicU64::new(0)),
            echo,
        })
    }

    /// Reopens a journal to append to it; returns its lines so far.
    pub fn reopen(path: &Path, echo: bool) -> anyhow::Result<(Journal, Vec<Line>)> {
        // Before reading: another process may still be appending.
        let lock = RunLock::take(path)?;
        let lines = read_lines(path)?;
        let Some(first) = lines.first() else {
            bail!("journal {} is empty", path.display());
        };
        let file = OpenOptions::new().append(true).open(path)?;
        let seq = lines.last().map(|l| l.seq).unwrap_or(0);
        let journal = Journal {
            path: path.to_path_buf(),
            rollout: first.rollout.clone(),
            file: Arc::new(file),
            _lock: lock,
            seq,
            written: Arc::new(AtomicU64::new(seq)),
            group_sync: None,
            group_fsyncs: Arc::new(AtomicU64::new(0)),
            echo,
        };
        Ok((journal, lines))
    }

    /// Appends and fsyncs one record; only then may the rollout act on it.
    pub fn append(&mut self, record: Record) -> anyhow::Result<()> {
        self.append_with(record, true)
    }

    /// Appends one record the rollout may act on before it is on disk: it
    /// is synced with the next record that is (one fsync covers the whole
    /// file). For what a resume finds out again anyway, such as a host
    /// having staged the release: with 1,000 hosts staging at once on a
    /// busy disk, an fsync per staged host held every wave back.
    pub fn append_unsynced(&mut self, record: Record) -> anyhow::Result<()> {
        self.append_with(record, false)
    }

    /// Appends one record and returns at once; the rollout may act on it
    /// once [`PendingSync::durable`] returns. Many tasks appending at once
    /// share fsyncs (see the module docs), and none of them holds the lock
    /// or an async runtime thread while the disk works.
    pub fn append_deferred(&mut self, record: Record) -> anyhow::Result<PendingSync> {
        self.append_with(record, false)?;
        if self.group_sync.is_none() {
            let (sender, receiver) = mpsc::channel();
            let (file, written) = (self.file.clone(), self.written.clone());
            let fsyncs = self.group_fsyncs.clone();
            std::thread::Builder::new()
                .name("journal-fsync".into())
                .spawn(move || run_group_sync(file, written, fsyncs, receiver))
                .context("cannot start the journal's fsync thread")?;
            self.group_sync = Some(sender);
        }
        let waiters = self.group_sync.as_ref().expect("started just above");
        let (answer, answered) = tokio::sync::oneshot::channel();
        waiters.send((self.seq, answer)).map_err(|_| {
            anyhow!(
                "cannot write the journal {}: its fsync thread ended",
                self.path.display()
            )
        })?;
        Ok(PendingSync {
            answer: answered,
            path: self.path.clone(),
        })
    }

    fn append_with(&mut self, record: Record, sync: bool) -> anyhow::Result<()> {
        self.seq += 1;
        let line = Line {
            rollout: self.rollout.clone(),
            seq: self.seq,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            record,
        };
        let mut text = serde_json::to_string(&line).expect("journal lines serialize");
        text.push('\n');
        (&*self.file)
            .write_all(text.as_bytes())
            .and_then(|_| {
                self.written.store(self.seq, Ordering::Release);
                match sync {
                    true => self.file.sync_data(),
                    false => Ok(()),
                }
            })
            .with_context(|| format!("cannot write the journal {}", self.path.display()))?;
        if self.echo {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    }
}

/// One process at a time runs a rollout: an exclusive `flock` on
/// `<id>.lock` beside the journal `<id>.jsonl`, a file which holds the pid
/// of the process that has it. A second `resume` of a rollout that still
/// runs (or two at once) fails at once, naming that pid, instead of both
/// acting on the same hosts. The kernel drops the lock when the process
/// ends, however it ends, so a held lock means a live run; the file itself
/// stays behind and means nothing.
pub struct RunLock {
    /// Held, never read: dropping it unlocks.
    _held: nix::fcntl::Flock<File>,
}

/// How long [`RunLock::take`] keeps trying a lock that is held. A run holds
/// its lock for as long as it runs; [`RunLock::is_held`] (`reloadctl
/// rollouts`) holds it for microseconds, and a resume started at that
/// moment must not be refused in the name of a pid that has long ended.
const PROBE_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

impl RunLock {
    /// The lock file of `journal`.
    pub fn path_for(journal: &Path) -> PathBuf {
        journal.with_extension("lock")
    }

    pub fn take(journal: &Path) -> anyhow::Result<RunLock> {
        use nix::fcntl::{Flock, FlockArg};
        let path = RunLock::path_for(journal);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let give_up = std::time::Instant::now() + PROBE_GRACE;
        let locked = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Err((unlocked, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < give_up =>
                {
                    file = unlocked;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other,
            }
        };
        match locked {
            Ok(mut locked) => {
                locked.set_len(0)?;
                write!(&mut *locked, "{}", std::process::id())?;
                locked.sync_data()?;
                Ok(RunLock { _held: locked })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "rollout journal {} is in use by reloadctl pid {}: wait for that run to finish, or stop it (Ctrl-C pauses a rollout) before resuming",
                    journal.display(),
                    holder.trim()
                )
            }
            Err((_, errno)) => Err(anyhow::anyhow!("cannot lock {}: {errno}", path.display())),
        }
    }

    /// Whether a live process runs the rollout of `journal` now. Reading
    /// takes no lock (a running rollout must be listable), so this only
    /// probes: a shared, non-blocking `flock` of the lock file, given back
    /// at once. It fails only while a run holds its exclusive lock. Probes
    /// do not block one another, and never create or write the file.
    pub fn is_held(journal: &Path) -> anyhow::Result<bool> {
        use nix::fcntl::{Flock, FlockArg};
        let path = RunLock::path_for(journal);
        let file = match File::open(&path) {
            Ok(file) => file,
            // No run ever locked it (a journal from before run locks).
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err).with_context(|| format!("cannot open {}", path.display())),
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            // Dropping the probe unlocks at once.
            Ok(_probe) => Ok(false),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(true),
            Err((_, errno)) => Err(anyhow::anyhow!(
                "cannot check whether {} is held: {errno}",
                path.display()
            )),
        }
    }
}

/// Reads a journal. A torn last line (a crash mid-write) is ignored: it was
/// never fsync'd, so nothing acted on it.
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<Line>> {
    let file =
        File::open(path).with_context(|| format!("cannot open the journal {}", path.display()))?;
    let mut lines = Vec::new();
    let raw: Vec<String> = BufReader::new(file).lines().collect::<Result<_, _>>()?;
    let count = raw.len();
    for (i, text) in raw.into_iter().enumerate() {
        match serde_json::from_str::<Line>(&text) {
            Ok(line) => lines.push(line),
            Err(_) if i + 1 == count => break,
            Err(err) => bail!(
                "journal {} line {} is damaged: {err}",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(lines)
}

/// What the engine knows of one host.
#[derive(Clone, Debug, Default)]
pub struct HostRecord {
    pub state: Option<HostState>,
    pub cause: Option<Cause>,
    pub message: String,
    /// This rollout activated it: a revert must roll it back.
    pub changed: bool,
}

impl HostRecord {
    /// The hosts' states as the journal left them (for `resume`).
    pub fn from_journal(hosts: &[String], lines: &[Line]) -> Vec<HostRecord> {
        let mut records = vec![HostRecord::default(); hosts.len()];
        for line in lines {
            if let Record::Host {
                host,
                state,
                cause,
                message,
            } = &line.record
            {
                if let Some(i) = hosts.iter().position(|h| h == host) {
                    records[i].state = Some(*state);
                    records[i].cause = *cause;
                    records[i].message = message.clone();
                    records[i].changed |= *state == HostState::Activated;
                }
            }
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed fsync fails the line waiting for it and every later one,
    /// even if a later fsync would succeed: the kernel may have dropped
    /// the unwritten pages. A pipe's fd refuses fsync (EINVAL).
    #[test]
    fn a_failed_fsync_fails_its_lines_and_every_later_one() {
        let (_read_end, write_end) = nix::unistd::pipe().unwrap();
        let file = Arc::new(File::from(write_end));
        let (written, fsyncs) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (waiters, receiver) = mpsc::channel();
        let thread = {
            let (written, fsyncs) = (written.clone(), fsyncs.clone());
            std::thread::spawn(move || run_group_sync(file, written, fsyncs, receiver))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for seq in 1..=3 {
            written.store(seq, Ordering::Release);
            let (answer, answered) = tokio::sync::oneshot::channel();
            waiters.send((seq, answer)).unwrap();
            let pending = PendingSync {
                answer: answered,
                path: PathBuf::from("r1.jsonl"),
            };
            let err = runtime.block_on(pending.durable()).unwrap_err();
            assert!(
                format!("{err:#}").starts_with("cannot write the journal r1.jsonl: "),
                "{err:#}"
            );
        }
        // Only the first line was tried; the others failed without an fsync.
        assert_eq!(fsyncs.load(Ordering::Relaxed), 1);
        drop(waiters);
        thread.join().unwrap();
    }

    /// The race the group commit exists for: many tasks on a
    /// multi-threaded runtime appending at once. Every line comes back
    /// once its writer was told it is durable, each exactly once, in seq
    /// order, and the fsyncs were shared.
    #[test]
    fn lines_appended_at_once_by_many_tasks_share_fsyncs_and_all_arrive() {
        const TASKS: u64 = 8;
        const EACH: u64 = 50;
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(std::sync::Mutex::new(
            Journal::create(dir.path(), "r1", false).unwrap(),
        ));
        let path = journal.lock().unwrap().path.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for task in 0..TASKS {
                let journal = journal.clone();
                tasks.spawn(async move {
                    for n in 0..EACH {
                        let record = Record::Paused {
                            reason: format!("task {task} line {n}"),
                        };
                        let pending = journal.lock().unwrap().append_deferred(record).unwrap();
                        pending.durable().await.unwrap();
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        });
        let lines = read_lines(&path).unwrap();
        let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, (1..=TASKS * EACH).collect::<Vec<_>>());
        let mut reasons: Vec<String> = lines
            .iter()
            .map(|l| match &l.record {
                Record::Paused { reason } => reason.clone(),
                other => panic!("unexpected record {other:?}"),
            })
            .collect();
        reasons.sort();
        reasons.dedup();
        assert_eq!(reasons.len() as u64, TASKS * EACH);
        let fsyncs = journal.lock().unwrap().group_fsyncs.load(Ordering::Relaxed);
        println!("{} lines, {fsyncs} fsyncs", TASKS * EACH);
        assert!(
            (1..TASKS * EACH).contains(&fsyncs),
            "{fsyncs} fsyncs for {} lines: none shared",
            TASKS * EACH
        );
    }

    #[test]
    fn a_journal_in_use_cannot_be_reopened_and_the_refusal_names_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = Journal::create(dir.path(), "r1", false).unwrap();
        running
            .append(Record::Leased {
                generation: 1,
                holder: String::new(),
                tokens: BTreeMap::new(),
            })
            .unwrap();
        let path = running.path.clone();
        // A second run (another open of the lock file, as another process
        // would make) is refused at once.
        let err = Journal::reopen(&path, false).err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("in use by reloadctl pid {}", std::process::id())),
            "{text}"
        );
        // The lock goes with the run that held it.
        drop(running);
        let (_, lines) = Journal::reopen(&path, false).unwrap();
        assert_eq!(lines.len(), 1);
    }

    #[test]
    fn a_probe_sees_a_running_journal_without_taking_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = Journal::folder(dir.path()).join("r1.jsonl");
        // Never run: no lock file, and the probe makes none.
        assert!(!RunLock::is_held(&path).unwrap());
        assert!(!RunLock::path_for(&path).exists());
        let running = Journal::create(dir.path(), "r1", false).unwrap();
        assert!(RunLock::is_held(&path).unwrap());
        // Probing twice changes nothing for the run: it still holds the
        // lock, and another run is still refused.
        assert!(RunLock::is_held(&path).unwrap());
        let refused = format!("{:#}", RunLock::take(&path).err().unwrap());
        assert!(refused.contains("in use by reloadctl pid"), "{refused}");
        drop(running);
        // The lock file stays, but nobody holds it.
        assert!(RunLock::path_for(&path).exists());
        assert!(!RunLock::is_held(&path).unwrap());
        RunLock::take(&path).unwrap();
    }

    #[test]
    fn a_run_that_starts_while_a_probe_holds_the_lock_is_not_refused() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().unwrap();
        drop(Journal::create(dir.path(), "r1", false).unwrap());
        let path = Journal::folder(dir.path()).join("r1.jsonl");
        // A probe caught mid-way: its shared lock, given back shortly.
        let probe = Flock::lock(
            File::open(RunLock::path_for(&path)).unwrap(),
            FlockArg::LockSharedNonblock,
        )
        .map_err(|(_, errno)| errno)
        .unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(probe);
        });
        RunLock::take(&path).unwrap();
        release.join().unwrap();
    }

    #[test]
    fn lines_round_trip_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::create(dir.path(), "r1", false).unwrap();
        journal
            .append(Record::Leased {
                generation: 1,
                holder: String::new(),
                tokens: BTreeMap::new(),
            })
            .unwrap();
        journal
            .append(Record::Host {
                host: "a:1".into(),
                state: HostState::Failed,
                cause: Some(Cause::Unreachable),
                message: "gone".into(),
            })
            .unwrap();
        let path = journal.path.clone();
        drop(journal);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"rollout\":\"r1\",\"se")
            .unwrap();
        let (mut again, lines) = Journal::reopen(&path, false).unwrap();
        assert_eq!(lines.len(), 2);
        assert!(matches!(
            lines[1].record,
            Record::Host {
                state: HostState::Failed,
                cause: Some(Cause::Unreachable),
                ..
            }
        ));
        again.append(Record::Halted { reason: "x".into() }).unwrap();
    }
}
