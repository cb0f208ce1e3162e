//! What each service wrote: its recent output, kept so that `reloadctl
//! logs` (`ReadLogs`) can show it, including after the agent restarted.
//!
//! Every line a process writes reaches the agent through its shim
//! ([`super::shim`]); here it goes into a ring of the most recent lines
//! (bounded by bytes) and is appended to `state_dir/logs/<service>.log`,
//! one JSON object a line, rotated to `<service>.log.1` at
//! [`FILE_LIMIT`] (so at most twice that on disk per service). A starting
//! agent fills the ring from those files.
//!
//! Why files in the state folder rather than a ring kept in the shim: the
//! shim lives only as long as its process (a service that crashed, or was
//! replaced by a reload, takes its shim's memory with it, and those are
//! the lines someone wants to read), and a ring in each shim would need a
//! second conversation in the shim protocol for every read. The file costs
//! a small append per line (no fsync: an agent crash or restart keeps what
//! the kernel has, which is all of it; a power cut may lose the last
//! seconds), and the shim's own buffer still covers the time no agent runs.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reload_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Bytes of lines the ring keeps per service (about 10,000 lines of 100
/// bytes).
pub const RING_BYTES: usize = 1024 * 1024;
/// A service's log file is rotated at this size.
pub const FILE_LIMIT: u64 = 1024 * 1024;
/// Lines a follower may be behind before it is dropped.
const FOLLOW_BUFFER: usize = 4096;

/// One line, as kept on disk and sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputLine {
    /// Milliseconds since the Unix epoch.
    pub ms: u64,
    pub pid: u32,
    pub version: String,
    pub stream: String,
    pub line: String,
}

impl OutputLine {
    pub fn new(pid: u32, version: &str, stream: &str, line: &str) -> OutputLine {
        OutputLine {
            ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            pid,
            version: version.to_string(),
            stream: stream.to_string(),
            line: line.to_string(),
        }
    }

    pub fn to_proto(&self) -> pb::OutputLine {
        pb::OutputLine {
            time: Some((UNIX_EPOCH + Duration::from_millis(self.ms)).into()),
            pid: self.pid,
            version: self.version.clone(),
            stream: self.stream.clone(),
            line: self.line.clone(),
        }
    }
}

/// Every service's output; see the module docs.
pub struct OutputLogs {
    dir: PathBuf,
    by_service: Mutex<BTreeMap<String, Arc<ServiceOutput>>>,
}

impl OutputLogs {
    /// The folder is created (0700: the output may hold secrets).
    pub fn open(dir: &Path) -> anyhow::Result<Arc<OutputLogs>> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("cannot restrict {} to 0700", dir.display()))?;
        Ok(Arc::new(OutputLogs {
            dir: dir.to_path_buf(),
            by_service: Mutex::new(BTreeMap::new()),
        }))
    }

    /// The output of `service`, read back from its files on first use.
    pub fn service(&self, service: &str) -> Arc<ServiceOutput> {
        let mut by_service = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        by_service
            .entry(service.to_string())
            .or_insert_with(|| Arc::new(ServiceOutput::load(&self.dir, service)))
            .clone()
    }
}

/// One service's output: the ring, its file, its followers.
pub struct ServiceOutput {
    inner: Mutex<Ring>,
    followers: broadcast::Sender<OutputLine>,
}

struct Ring {
    lines: VecDeque<OutputLine>,
    bytes: usize,
    path: PathBuf,
    file: Option<File>,
    file_bytes: u64,
}

impl Ring {
    fn push(&mut self, line: OutputLine) {
        self.bytes += line.line.len();
        self.lines.push_back(line);
        while self.bytes > RING_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.line.len(),
                None => break,
            }
        }
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl ServiceOutput {
    fn load(dir: &Path, service: &str) -> ServiceOutput {
        let path = dir.join(format!("{service}.log"));
        let mut ring = Ring {
            lines: VecDeque::new(),
            bytes: 0,
            path: path.clone(),
            file: None,
            file_bytes: 0,
        };
        for file in [rotated(&path), path.clone()] {
            let Ok(file) = File::open(&file) else {
                continue;
            };
            // A torn last line (the agent killed mid-write) is skipped.
            for line in BufReader::new(file).lines().map_while(Result::ok) {
                if let Ok(line) = serde_json::from_str::<OutputLine>(&line) {
                    ring.push(line);
                }
            }
        }
        ring.file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        // Opened now rather than at the first line, so the agent holds the
        // same files whether or not its service has said anything yet (an
        // upgrade's fd check compares them); a failure is retried then.
        ring.file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .ok();
        ServiceOutput {
            inner: Mutex::new(ring),
            followers: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }

    /// Keeps a line: in the ring, in the file, to every follower.
    pub fn push(&self, line: OutputLine) {
        let mut ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = Self::append(&mut ring, &line) {
            // Reading logs is a convenience: a full disk must not stop the
            // service's output from being read (the shim) or logged.
            ring.file = None;
            tracing::warn!(path = %ring.path.display(), error = %err, "cannot keep service output on disk");
        }
        ring.push(line.clone());
        let _ = self.followers.send(line);
    }

    fn append(ring: &mut Ring, line: &OutputLine) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(line).expect("serializes");
        bytes.push(b'\n');
        if ring.file_bytes + bytes.len() as u64 > FILE_LIMIT && ring.file_bytes > 0 {
            ring.file = None;
            std::fs::rename(&ring.path, rotated(&ring.path))?;
            ring.file_bytes = 0;
        }
        if ring.file.is_none() {
            ring.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&ring.path)?,
            );
        }
        ring.file
            .as_mut()
            .expect("opened above")
            .write_all(&bytes)?;
        ring.file_bytes += bytes.len() as u64;
        Ok(())
    }

    /// The last `count` lines kept (all with 0), oldest first, and a
    /// receiver of the lines after them: taken together, under the lock,
    /// so a follower misses nothing in between.
    pub fn recent_and_follow(
        &self,
        count: usize,
    ) -> (Vec<OutputLine>, broadcast::Receiver<OutputLine>) {
        let ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let skip = match count {
            0 => 0,
            n => ring.lines.len().saturating_sub(n),
        };
        let lines = ring.lines.iter().skip(skip).cloned().collect();
        (lines, self.followers.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_survive_a_reload_of_the_files_and_rotate_within_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let logs = OutputLogs::open(dir.path()).unwrap();
        let web = logs.service("web");
        for i in 0..3 {
            web.push(OutputLine::new(7, "1.0.0", "stdout", &format!("line {i}")));
        }
        // Another agent (a restart) reads what the first kept.
        let again = OutputLogs::open(dir.path()).unwrap().service("web");
        let (lines, _) = again.recent_and_follow(2);
        let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["line 1", "line 2"]);
        assert_eq!(again.recent_and_follow(0).0.len(), 3);

        // Past FILE_LIMIT the file rotates; the newest lines are kept.
        let long = "x".repeat(10_000);
        for _ in 0..250 {
            web.push(OutputLine::new(7, "1.0.0", "stderr", &long));
        }
        let on_disk = |name: &str| {
            std::fs::metadata(dir.path().join(name))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        assert!(on_disk("web.log") <= FILE_LIMIT && on_disk("web.log.1") <= FILE_LIMIT);
        let reread = OutputLogs::open(dir.path()).unwrap().service("web");
        let (lines, _) = reread.recent_and_follow(0);
        assert!(lines.iter().map(|l| l.line.len()).sum::<usize>() <= RING_BYTES);
        assert_eq!(lines.last().unwrap().line, long);
    }

    #[tokio::test]
    async fn a_follower_gets_the_lines_after_its_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let web = OutputLogs::open(dir.path()).unwrap().service("web");
        web.push(OutputLine::new(1, "1.0.0", "stdout", "before"));
        let (recent, mut follow) = web.recent_and_follow(10);
        web.push(OutputLine::new(1, "1.0.0", "stdout", "after"));
        assert_eq!(recent.len(), 1);
        assert_eq!(follow.recv().await.unwrap().line, "after");
    }
}
