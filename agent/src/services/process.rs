//! One process of a service as the agent tracks it: its pid, the shim that
//! is its parent (see [`crate::shim`]; the exit status and the output come
//! from there, see [`super::shim`]), and the signals that drain or kill its
//! whole process group: sent through a pidfd, never by pid number, because
//! the agent is not the process's parent and cannot know when its number
//! is free for another process (see [`reload_server::spawn::signal_group`]).

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::signal::Signal;
use tokio::sync::watch;

use super::readiness::NotifyPath;
use crate::config::DrainPlan;

/// One process of a service, as the agent tracks it.
#[derive(Clone)]
pub struct Process {
    pub pid: u32,
    /// The shim the process runs under.
    pub shim_pid: u32,
    /// Its private health port (`[service.health] private`), which only it
    /// listens on.
    pub probe: Option<std::net::SocketAddr>,
    pub(super) started: Instant,
    /// A pidfd of the process, checked against its start time when opened;
    /// `None` when it had already ended then (its shim killed its group).
    pidfd: Option<Arc<OwnedFd>>,
    /// `Some(status)` once the process has exited (and its shim reaped it).
    exited: watch::Receiver<Option<ExitStatus>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Process {
    pub(super) fn new(
        pid: u32,
        shim_pid: u32,
        probe: Option<std::net::SocketAddr>,
        started: Instant,
        pidfd: Option<Arc<OwnedFd>>,
        exited: watch::Receiver<Option<ExitStatus>>,
        stderr_tail: Arc<Mutex<VecDeque<String>>>,
    ) -> Process {
        Process {
            pid,
            shim_pid,
            probe,
            started,
            pidfd,
            exited,
            stderr_tail,
        }
    }

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
        if let Some(pidfd) = &self.pidfd {
            signal_group_of(self.pid, pidfd.as_fd(), signal);
        }
    }

    /// Kills the whole process group and waits until the leader is reaped.
    pub(super) async fn kill(&self) {
        self.signal_group(Signal::SIGKILL);
        self.wait().await;
    }
}

/// Signals the group led by the process behind `pidfd` (a gone group is
/// fine; anything else is logged: the service may outlive what was meant
/// to end it).
pub(super) fn signal_group_of(pid: u32, pidfd: std::os::fd::BorrowedFd<'_>, signal: Signal) {
    if let Err(err) = reload_server::spawn::signal_group(pidfd, signal) {
        tracing::error!(pid, signal = signal.as_str(), error = %err, "cannot signal the process group");
    }
}

/// Drains as `plan` says: the first signal (if any) and its wait, cut
/// short if the process exits; then the drain signal, up to its timeout
/// for the leader; then SIGKILL to whatever of the group is left. Returns
/// what happened, for people.
pub(super) async fn drain(process: &Process, plan: DrainPlan) -> String {
    if let Some((pre, wait)) = plan.pre {
        process.signal_group(pre);
        if let Ok(status) = tokio::time::timeout(wait, process.wait()).await {
            process.signal_group(Signal::SIGKILL);
            return format!("exited on {pre} ({})", describe_exit(status));
        }
    }
    let (signal, timeout) = (plan.signal, plan.timeout);
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
