//! The agent's side of the shims (see [`crate::shim`]): starting one for a
//! new service process, finding the running ones when the agent starts
//! (after a crash, a restart or an in-place upgrade alike), and turning a
//! shim's connection into a [`Process`]: its output into the agent's log,
//! its exit into the process's exit status.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{getsockname, SockaddrStorage};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::process::Process;
use crate::config::PROBE_LISTENER;
use crate::main_thread::Launcher;
use crate::shim::protocol::{
    receive_hello, AgentMessage, ShimMessage, ShimSpec, WaitStatus, IMAGE_FD_NAME, SHIM_ARG,
    SPEC_VAR,
};

/// Lines of a process's stderr kept for failure reasons.
const STDERR_TAIL_LINES: usize = 12;

/// How long a shim may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the shim socket files in `state/run/` are called.
const SOCKET_SUFFIX: &str = ".shim";

/// A service process behind a shim, as the shim described it.
pub(super) struct Attached {
    pub spec: ShimSpec,
    pub shim_pid: u32,
    pub pid: u32,
    pub start_time: u64,
    pub running_ms: u64,
    /// Set when the service ended before this agent attached.
    pub exited: Option<WaitStatus>,
    /// Duplicates of the service's listening sockets, by name (without the
    /// private health port).
    pub listeners: Vec<(String, OwnedFd)>,
    /// The process's private health port, if it has one.
    pub probe: Option<SocketAddr>,
    stream: UnixStream,
}

/// Where the shim of a new process listens.
pub(super) fn socket_path(run_dir: &Path, service: &str, serial: &str) -> PathBuf {
    run_dir.join(format!("{service}-{serial}{SOCKET_SUFFIX}"))
}

/// Starts a shim that starts the process `spec` describes with `sockets`,
/// and waits for its hello. The fork runs on the main thread (see
/// [`crate::main_thread`]).
pub(super) async fn start(
    launcher: &Launcher,
    spec: ShimSpec,
    mut sockets: Vec<(String, OwnedFd)>,
    image: OwnedFd,
) -> Result<Attached, String> {
    // After the listeners, by name: the shim takes it apart from them.
    sockets.push((IMAGE_FD_NAME.to_string(), image));
    let (ours, theirs) =
        UnixStream::pair().map_err(|err| format!("cannot make the shim's socket pair: {err}"))?;
    let env = vec![(
        SPEC_VAR.to_string(),
        serde_json::to_string(&spec).expect("specs serialize"),
    )];
    let child = launcher
        .run(move || -> std::io::Result<u32> {
            let mut command = reload_server::spawn::command(reload_server::spawn::SpawnSpec {
                // The running agent's own image, even if its file was
                // replaced since it started.
                program: Path::new("/proc/self/exe"),
                args: &[SHIM_ARG.to_string()],
                env,
                working_dir: Path::new("/"),
                sockets: sockets
                    .iter()
                    .map(|(n, fd)| (n.clone(), fd.as_fd()))
                    .collect(),
                // The point of a shim: it does not die with the agent.
                die_with_parent: false,
                own_process_group: true,
                image: None,
            })?;
            command
                .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let child = command.spawn()?;
            Ok(child.id())
        })
        .await
        .ok_or_else(|| "the agent is stopping".to_string())?
        .map_err(|err| format!("cannot start the shim: {err}"))?;
    reap_when_it_ends(child);
    let attached = tokio::task::spawn_blocking(move || hello(ours, HELLO_TIMEOUT))
        .await
        .map_err(|err| err.to_string())?;
    attached.map_err(|err| format!("the shim (pid {child}) failed: {err}"))
}

/// A shim this agent process forked is its child until it exits: reap it
/// then, or it stays a zombie. (Shims found at start are not our children;
/// reaping those fails with ECHILD, which is fine.)
fn reap_when_it_ends(shim_pid: u32) {
    if let Ok(pidfd) = reload_server::spawn::pidfd_open(shim_pid) {
        tokio::spawn(async move {
            let _ = reload_server::spawn::reap(pidfd).await;
        });
    }
}

/// Reads a shim's hello on a fresh connection.
fn hello(stream: UnixStream, timeout: Duration) -> Result<Attached, String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|err| err.to_string())?;
    let (message, fds) = receive_hello(&stream).map_err(|err| err.to_string())?;
    stream
        .set_read_timeout(None)
        .map_err(|err| err.to_string())?;
    match message {
        ShimMessage::Hello {
            spec,
            shim_pid,
            pid,
            start_time,
            running_ms,
            exited,
        } => {
            if fds.len() != spec.listeners.len() {
                return Err(format!(
                    "the shim sent {} listening sockets for {} listeners",
                    fds.len(),
                    spec.listeners.len()
                ));
            }
            let (probes, listeners): (Vec<_>, Vec<_>) = spec
                .listeners
                .iter()
                .cloned()
                .zip(fds)
                .partition(|(name, _)| name == PROBE_LISTENER);
            let probe = probes.first().and_then(|(_, fd)| {
                let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
                Some(SocketAddr::V4((*addr.as_sockaddr_in()?).into()))
            });
            Ok(Attached {
                listeners,
                probe,
                spec: *spec,
                shim_pid,
                pid,
                start_time,
                running_ms,
                exited,
                stream,
            })
        }
        ShimMessage::SpawnFailed { reason } => Err(reason),
        other => Err(format!("the shim began with {other:?} instead of a hello")),
    }
}

/// Every shim still running from an earlier agent process (or image): a
/// socket file in `run_dir` with a shim behind it. A file nobody answers
/// on is stale (its shim ended) and is removed. A shim whose service still
/// runs must prove it is the process it says (pidfd and start time).
pub(super) fn discover(run_dir: &Path) -> Vec<Attached> {
    discover_within(run_dir, HELLO_TIMEOUT)
}

fn discover_within(run_dir: &Path, timeout: Duration) -> Vec<Attached> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if !path.to_string_lossy().ends_with(SOCKET_SUFFIX) {
            continue;
        }
        let stream = match UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                tracing::info!(path = %path.display(), "no shim listens there any more; removing its stale socket");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot connect to a shim");
                continue;
            }
        };
        match hello(stream, timeout) {
            Ok(attached) if attached.exited.is_none() && !same_process(&attached) => {
                tracing::warn!(path = %path.display(), pid = attached.pid, "a shim names a process that is not the one it started; ignoring it");
            }
            Ok(attached) => {
                // After an in-place upgrade the shims this process forked
                // are still its children: reap them when they end.
                reap_when_it_ends(attached.shim_pid);
                found.push(attached)
            }
            // A shim that is there but does not answer (stopped with
            // SIGSTOP, or starved) still runs its service, which holds the
            // port: its socket is kept for the next start, and this one
            // fails to bind that listener, saying so, rather than lose the
            // process.
            Err(err) => {
                tracing::error!(path = %path.display(), error = %err, "a shim listens but did not say what it runs (stopped, or overloaded?); its service is not adopted and its socket is kept");
            }
        }
    }
    found
}

/// The pid still names the process the shim started: it can be opened as
/// a pidfd and started at the recorded time.
fn same_process(attached: &Attached) -> bool {
    reload_server::spawn::pidfd_open(attached.pid).is_ok()
        && reload_server::spawn::start_time(attached.pid).ok() == Some(attached.start_time)
}

/// A process from its shim: its output goes to the agent's log (the tail of
/// stderr kept for failure reasons), its exit to [`Process::wait`].
pub(super) fn watch(
    service: &str,
    attached: Attached,
    output: Arc<super::ServiceOutput>,
) -> std::io::Result<Process> {
    let Attached {
        spec,
        pid,
        shim_pid,
        probe,
        start_time,
        running_ms,
        exited,
        stream,
        ..
    } = attached;
    // Opened now, while the shim (the only one that reaps the process)
    // has not reported its exit, and checked against the start time the
    // shim read right after the fork: every later signal goes to this
    // process's group and cannot reach a process that reuses its number.
    let pidfd = exited
        .is_none()
        .then(|| reload_server::spawn::pidfd_open_checked(pid, start_time).ok())
        .flatten()
        .map(Arc::new);
    let version = spec.version;
    let started = Instant::now()
        .checked_sub(Duration::from_millis(running_ms))
        .unwrap_or_else(Instant::now);
    let (exit_tx, exit_rx) = watch::channel(None);
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (service, task_tail, task_pidfd) = (service.to_string(), tail.clone(), pidfd.clone());
    tokio::spawn(async move {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut status = exited;
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(service, pid, error = %err, "cannot read from the shim");
                    break;
                }
            };
            match serde_json::from_str::<ShimMessage>(&line) {
                Ok(ShimMessage::Output { stream, line }) => {
                    tracing::info!(service, version, pid, stream, "{line}");
                    output.push(super::output::OutputLine::new(
                        pid, &version, &stream, &line,
                    ));
                    if stream == "stderr" {
                        let mut tail = task_tail.lock().unwrap_or_else(|p| p.into_inner());
                        if tail.len() == STDERR_TAIL_LINES {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                }
                Ok(ShimMessage::Dropped { lines, bytes }) => {
                    tracing::warn!(service, version, pid, lines, bytes, "output lines dropped: no agent read them in time and the shim's buffer was full");
                }
                Ok(ShimMessage::Exited { status: ended }) => {
                    status = Some(ended);
                    break;
                }
                Ok(_) | Err(_) => {
                    tracing::warn!(service, pid, "unexpected message from the shim");
                }
            }
        }
        let status = match status {
            Some(status) => {
                let mut line = serde_json::to_vec(&AgentMessage::ExitSeen).expect("serializes");
                line.push(b'\n');
                let _ = write.write_all(&line).await;
                status
            }
            None => {
                // The shim went away without the exit (killed by hand):
                // the service gets SIGTERM from its parent's death; make
                // sure its group is gone before it is restarted.
                tracing::warn!(
                    service,
                    pid,
                    shim_pid,
                    "the shim ended without reporting the exit; killing the process group"
                );
                if let Some(pidfd) = &task_pidfd {
                    super::process::signal_group_of(
                        pid,
                        pidfd.as_fd(),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                // A "stopped" wait status never comes from an exit: it
                // stands for "ended, status unknown" (see describe_exit).
                WaitStatus(0x7f)
            }
        };
        let _ = exit_tx.send(Some(status.exit_status()));
    });
    Ok(Process::new(
        pid, shim_pid, probe, started, pidfd, exit_rx, tail,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket file nobody listens on is stale and goes; a shim that
    /// listens but does not answer (SIGSTOPped) keeps its socket.
    #[test]
    fn stale_sockets_go_and_silent_shims_stay() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("web-1-0.shim");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let silent = dir.path().join("web-1-1.shim");
        let _listening = std::os::unix::net::UnixListener::bind(&silent).unwrap();
        let found = discover_within(dir.path(), Duration::from_millis(200));
        assert!(found.is_empty());
        assert!(!stale.exists(), "the stale socket was removed");
        assert!(silent.exists(), "the silent shim's socket was kept");
    }
}
