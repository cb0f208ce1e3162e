//! The shim: a tiny process per running service process, so that services
//! outlive their agent. `reload-agent --shim` (the agent's own binary in
//! another mode) is started by the agent for every service process, in a
//! process group of its own and with no tie to the agent's life; it starts
//! the service as its own child and then:
//!
//! - holds a duplicate of every listening socket of the service, and hands
//!   them to any agent that connects (a restarted agent takes its sockets
//!   back from the shims instead of binding, which would fail: the service
//!   holds them);
//! - reads the service's stdout and stderr at once, whatever happens to the
//!   agent (a service never blocks on a full pipe nor gets EPIPE), cuts
//!   lines at [`protocol::MAX_LINE_BYTES`], and forwards them; while no
//!   agent reads, up to [`OUTBOX_BYTES`] wait in memory and beyond that the
//!   oldest lines are dropped and counted (the agent logs how many);
//! - waits for the service's main process, kills its whole process group
//!   (forked workers must not keep the sockets or the port), reaps it and
//!   keeps the exit status until an agent has seen it, then exits;
//! - listens on a Unix socket in the agent's `state/run/` for the next
//!   agent: an agent that starts finds its services by these sockets.
//!
//! When the agent dies the shim is reparented to init (or the service
//! manager) and goes on; the service notices nothing. The service gets
//! PR_SET_PDEATHSIG towards the shim, so a shim killed by hand does not
//! leave an unsupervised service behind.

pub mod protocol;

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use protocol::{send_with_fds, AgentMessage, ShimMessage, ShimSpec, WaitStatus, MAX_LINE_BYTES};

/// Output kept while no agent reads it; beyond this the oldest lines go.
pub const OUTBOX_BYTES: usize = 4 * 1024 * 1024;

/// How long the pipes may stay open after the service's group was killed
/// (a process outside the group that inherited them) before the exit is
/// reported anyway.
const PIPE_DRAIN: Duration = Duration::from_secs(1);

/// The shim's entry point (`reload-agent --shim`, with the spec in
/// [`protocol::SPEC_VAR`]). Single-threaded: it forks the service.
pub fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("reload-agent shim: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let spec: ShimSpec = serde_json::from_str(
        &std::env::var(protocol::SPEC_VAR).context("no shim spec in the environment")?,
    )
    .context("the shim spec is not valid")?;
    // Before any thread exists: reading LISTEN_FDS also removes it.
    let mut passed = reload_server::Listeners::from_env().context("reading LISTEN_FDS")?;
    let listeners = spec
        .listeners
        .iter()
        .map(|name| {
            passed
                .take_fd(name)?
                .with_context(|| format!("listener {name:?} was not passed to the shim"))
        })
        .collect::<anyhow::Result<Vec<OwnedFd>>>()?;
    let image = if spec.sealed_image {
        Some(
            passed
                .take_fd(protocol::IMAGE_FD_NAME)?
                .context("the agent named a sealed image but did not pass it")?,
        )
    } else {
        None
    };
    // The agent that started us is at the other end of stdin.
    let first =
        std::os::unix::net::UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(spec, listeners, image, first))
}

/// Output waiting for an agent, bounded.
#[derive(Default)]
struct Outbox {
    queue: VecDeque<ShimMessage>,
    bytes: usize,
    dropped_lines: u64,
    dropped_bytes: u64,
    exit: Option<WaitStatus>,
}

impl Outbox {
    fn push_output(&mut self, stream: &str, line: String) {
        self.bytes += line.len();
        self.queue.push_back(ShimMessage::Output {
            stream: stream.to_string(),
            line,
        });
        while self.bytes > OUTBOX_BYTES {
            match self.queue.pop_front() {
                Some(ShimMessage::Output { line, .. }) => {
                    self.bytes -= line.len();
                    self.dropped_lines += 1;
                    self.dropped_bytes += line.len() as u64;
                }
                Some(_) | None => break,
            }
        }
    }

    /// The next message to send: dropped counts first, then output, then
    /// (once everything before it went) the exit.
    fn next(&mut self, exit_sent: bool) -> Option<ShimMessage> {
        if self.dropped_lines > 0 {
            let message = ShimMessage::Dropped {
                lines: self.dropped_lines,
                bytes: self.dropped_bytes,
            };
            (self.dropped_lines, self.dropped_bytes) = (0, 0);
            return Some(message);
        }
        if let Some(message) = self.queue.pop_front() {
            if let ShimMessage::Output { line, .. } = &message {
                self.bytes -= line.len();
            }
            return Some(message);
        }
        match self.exit {
            Some(status) if !exit_sent => Some(ShimMessage::Exited { status }),
            _ => None,
        }
    }
}

/// What the connection loop shares with the pipe readers and the reaper.
struct Shared {
    outbox: Mutex<Outbox>,
    changed: Notify,
}

impl Shared {
    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn serve(
    spec: ShimSpec,
    listeners: Vec<OwnedFd>,
    image: Option<OwnedFd>,
    first: std::os::unix::net::UnixStream,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&spec.socket_path);
    let control = match UnixListener::bind(&spec.socket_path) {
        Ok(control) => control,
        Err(err) => {
            // Said to the agent, which reports it as the spawn's failure.
            let reason = format!(
                "the shim cannot listen on {} ({err}); a shorter state_dir path helps if it is too long for a Unix socket",
                spec.socket_path.display()
            );
            let _ = send_with_fds(&first, &ShimMessage::SpawnFailed { reason }, &[]);
            return Ok(());
        }
    };
    let _socket_file = RemoveOnDrop(spec.socket_path.clone());
    let sockets = spec
        .listeners
        .iter()
        .cloned()
        .zip(listeners.iter().map(|fd| fd.as_fd()))
        .collect();
    let child = reload_server::spawn::spawn_service(reload_server::spawn::SpawnSpec {
        program: &spec.program,
        args: &spec.args,
        env: spec.env.clone(),
        working_dir: &spec.working_dir,
        sockets,
        die_with_parent: true,
        own_process_group: true,
        image: image.as_ref().map(|fd| reload_server::spawn::ExecFd {
            fd: fd.as_fd(),
            script: spec.image_script,
        }),
    });
    let child = match child {
        Ok(child) => child,
        Err(err) => {
            let reason = format!("spawn failed: {err}");
            let message = ShimMessage::SpawnFailed { reason };
            let _ = send_with_fds(&first, &message, &[]);
            return Ok(());
        }
    };
    let pid = child.pid;
    let start_time = reload_server::spawn::start_time(pid).unwrap_or(0);
    let started = Instant::now();
    let shared = Arc::new(Shared {
        outbox: Mutex::new(Outbox::default()),
        changed: Notify::new(),
    });
    let mut readers = tokio::task::JoinSet::new();
    for (fd, stream) in [(child.stdout, "stdout"), (child.stderr, "stderr")] {
        if let Some(fd) = fd {
            let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
            readers.spawn(forward_lines(pipe, stream, shared.clone()));
        }
    }
    {
        let shared = shared.clone();
        let pidfd = child.pidfd;
        tokio::spawn(async move {
            let status = wait_and_kill_group(pid, pidfd).await;
            // What the group wrote before it died comes first.
            let _ = tokio::time::timeout(PIPE_DRAIN, async {
                while readers.join_next().await.is_some() {}
            })
            .await;
            shared.outbox().exit = Some(status);
            shared.changed.notify_one();
        });
    }
    let hello = |exited: Option<WaitStatus>| ShimMessage::Hello {
        spec: Box::new(spec.clone()),
        shim_pid: std::process::id(),
        pid,
        start_time,
        running_ms: started.elapsed().as_millis() as u64,
        exited,
    };
    let mut connection = Some(first);
    loop {
        if let Some(stream) = connection.take() {
            let exited = shared.outbox().exit;
            let fds: Vec<_> = listeners.iter().map(|fd| fd.as_fd()).collect();
            if send_with_fds(&stream, &hello(exited), &fds).is_ok() {
                stream.set_nonblocking(true)?;
                let stream = UnixStream::from_std(stream)?;
                tokio::select! {
                    done = talk(stream, &shared) => if done { return Ok(()) },
                    accepted = control.accept() => {
                        if let Ok((next, _)) = accepted {
                            connection = Some(next.into_std()?);
                            connection.as_ref().map(|s| s.set_nonblocking(false)).transpose()?;
                        }
                        continue;
                    }
                }
            }
        }
        // No agent: wait for the next one (output keeps being read).
        if let Ok((next, _)) = control.accept().await {
            let next = next.into_std()?;
            next.set_nonblocking(false)?;
            connection = Some(next);
        }
    }
}

/// Sends what waits in the outbox and reads the agent's answers, until the
/// connection breaks (false) or the agent saw the exit (true).
async fn talk(stream: UnixStream, shared: &Shared) -> bool {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut exit_sent = false;
    loop {
        let next = shared.outbox().next(exit_sent);
        if let Some(message) = next {
            exit_sent |= matches!(message, ShimMessage::Exited { .. });
            let mut line = serde_json::to_vec(&message).expect("messages serialize");
            line.push(b'\n');
            if write.write_all(&line).await.is_err() {
                return false;
            }
            continue;
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Ok(AgentMessage::ExitSeen) = serde_json::from_str(&line) {
                        if exit_sent {
                            return true;
                        }
                    }
                }
                _ => return false,
            },
        }
    }
}

/// Reads a pipe to its end, cutting lines at [`MAX_LINE_BYTES`].
async fn forward_lines(
    mut pipe: tokio::net::unix::pipe::Receiver,
    stream: &'static str,
    shared: Arc<Shared>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut pushed = false;
        for &byte in &buffer[..n] {
            if byte == b'\n' || line.len() == MAX_LINE_BYTES {
                let text = String::from_utf8_lossy(&line).into_owned();
                shared.outbox().push_output(stream, text);
                line.clear();
                pushed = true;
                if byte == b'\n' {
                    continue;
                }
            }
            line.push(byte);
        }
        if pushed {
            shared.changed.notify_one();
        }
    }
    if !line.is_empty() {
        let text = String::from_utf8_lossy(&line).into_owned();
        shared.outbox().push_output(stream, text);
        shared.changed.notify_one();
    }
}

/// Waits for the main process to end, kills its whole process group while
/// the main process is a zombie (so the group's id cannot have been reused),
/// then reaps it.
async fn wait_and_kill_group(pid: u32, pidfd: OwnedFd) -> WaitStatus {
    let status = reload_server::spawn::reap_after(pidfd, || {
        // Workers it forked must not keep the port, nor outlive it.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    })
    .await;
    match status {
        Ok(status) => WaitStatus(std::os::unix::process::ExitStatusExt::into_raw(status)),
        // Cannot happen for our own child; "ended, status unknown".
        Err(_) => WaitStatus(0x7f),
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
