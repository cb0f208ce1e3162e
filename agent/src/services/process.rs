//! One process of a service as the agent tracks it: its pid and pidfd, the
//! reaper that waits on the pidfd (never on a bare pid, which the kernel may
//! give to another process once this one is reaped), its output forwarded
//! to the agent's log with the tail of stderr kept for failure reasons, and
//! the signals that drain or kill its whole process group.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use super::readiness::NotifyPath;

/// Lines of a process's stderr kept for failure reasons.
const STDERR_TAIL_LINES: usize = 12;

/// One process of a service, as the agent tracks it.
#[derive(Clone)]
pub struct Process {
    pub pid: u32,
    pub(super) started: Instant,
    /// `Some(status)` once the process has exited and been reaped.
    exited: watch::Receiver<Option<ExitStatus>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Duplicates of the fds the agent holds for this process, for a
    /// handover to the next agent image.
    pub(super) fds: Arc<ProcessFds>,
}

pub(super) struct ProcessFds {
    pub(super) pidfd: OwnedFd,
    pub(super) stdout: Option<OwnedFd>,
    pub(super) stderr: Option<OwnedFd>,
    pub(super) notify: Mutex<Option<(OwnedFd, PathBuf)>>,
}

impl Process {
    /// Keeps the process's notify socket open for its whole life and logs
    /// what it says there (STATUS=, STOPPING=1): a program that notifies
    /// while draining must not find the socket gone.
    pub(super) fn listen_for_notifications(
        &self,
        service: &str,
        socket: tokio::net::UnixDatagram,
        path: NotifyPath,
    ) {
        let (service, pid, process) = (service.to_string(), self.pid, self.clone());
        if let Ok(dup) = socket.as_fd().try_clone_to_owned() {
            *self.fds.notify.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((dup, path.0.clone()));
        }
        tokio::spawn(async move {
            let _path = path;
            let mut buffer = vec![0u8; 4096];
            loop {
                tokio::select! {
                    received = socket.recv(&mut buffer) => match received {
                        Ok(n) => {
                            let message = String::from_utf8_lossy(&buffer[..n]);
                            tracing::debug!(service, pid, notify = %message.trim(), "notification");
                        }
                        Err(_) => return,
                    },
                    _ = process.wait() => return,
                }
            }
        });
    }

    pub(super) async fn wait(&self) -> ExitStatus {
        let mut exited = self.exited.clone();
        let status = exited
            .wait_for(Option::is_some)
            .await
            .map(|s| s.expect("checked by wait_for"));
        // The sender lives in the reaper task until it has sent the status.
        status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(0))
    }

    pub(super) fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.is_empty() {
            "(nothing on stderr)".into()
        } else {
            tail.iter().cloned().collect::<Vec<_>>().join(" | ")
        }
    }

    pub(super) fn signal_group(&self, signal: Signal) {
        // ESRCH: the whole group is gone already.
        let _ = killpg(Pid::from_raw(self.pid as i32), signal);
    }

    /// Kills the whole process group and waits until the leader is reaped.
    pub(super) async fn kill(&self) {
        self.signal_group(Signal::SIGKILL);
        self.wait().await;
    }
}

/// reasons.
pub(super) fn watch_process(
    service: &str,
    pid: u32,
    pidfd: OwnedFd,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    started: Instant,
) -> std::io::Result<Process> {
    let fds = Arc::new(ProcessFds {
        pidfd: pidfd.try_clone()?,
        stdout: stdout.as_ref().map(|fd| fd.try_clone()).transpose()?,
        stderr: stderr.as_ref().map(|fd| fd.try_clone()).transpose()?,
        notify: Mutex::new(None),
    });
    let (exit_tx, exit_rx) = watch::channel(None);
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(stdout) = stdout {
        log_lines(stdout, service, pid, "stdout", None)?;
    }
    if let Some(stderr) = stderr {
        log_lines(stderr, service, pid, "stderr", Some(stderr_tail.clone()))?;
    }
    tokio::spawn(async move {
        let status = reload_server::spawn::reap(pidfd)
            .await
            .unwrap_or_else(|err| {
                // ECHILD: the previous agent image reaped it between taking the
                // handover snapshot and execve. It is gone; how it ended is not
                // known.
                tracing::warn!(pid, error = %err, "cannot reap the process; treating it as exited");
                // A "stopped" wait status never comes from WEXITED: it
                // stands for "ended, status unknown" (see describe_exit).
                std::os::unix::process::ExitStatusExt::from_raw(0x7f)
            });
        let _ = exit_tx.send(Some(status));
    });
    Ok(Process {
        pid,
        started,
        exited: exit_rx,
        stderr_tail,
        fds,
    })
}

/// Forwards each line a process writes on `pipe` to the log, keeping the
/// last few in `tail` if given (failure reasons quote them).
fn log_lines(
    pipe: OwnedFd,
    service: &str,
    pid: u32,
    stream: &'static str,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) -> std::io::Result<()> {
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
    let service = service.to_string();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(service, pid, stream, "{line}");
            if let Some(tail) = &tail {
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
    Ok(())
}

/// Signals the process group, waits up to `timeout` for the leader, then
/// SIGKILLs whatever of the group is left. Returns what happened, for people.
pub(super) async fn drain(process: &Process, signal: Signal, timeout: Duration) -> String {
    process.signal_group(signal);
    let outcome = match tokio::time::timeout(timeout, process.wait()).await {
        Ok(status) => format!("drained and {}", describe_exit(status)),
        Err(_) => {
            process.kill().await;
            format!(
                "did not exit within {} and was killed",
                humantime::format_duration(timeout)
            )
        }
    };
    // Stragglers of the group (workers the service started) go too.
    process.signal_group(Signal::SIGKILL);
    outcome
}

/// How a process ended, for people.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!(
            "killed by {}",
            Signal::try_from(signal)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| format!("signal {signal}"))
        ),
        _ => "ended (exit status unknown)".into(),
    }
}
