//! Standalone self-upgrade, for programs that run without an agent.
//!
//! The old recipe (spawn `argv[0]`, exit) changes the pid under the
//! supervisor, loses the sockets' queue or leaks them, checks nothing, and
//! has no way back. Here: [`SelfUpgrade::enable`] resolves our executable's
//! path once at start (so an atomic rename of a new file there is what the
//! next upgrade runs) and keeps duplicates of our listening sockets. On the
//! signal (SIGHUP by default) or [`SelfUpgrade::upgrade_now`], it starts
//! that path with our arguments and environment, our sockets as fds 3.. by
//! the socket-activation protocol, and a private `NOTIFY_SOCKET`; it waits
//! for the child's `READY=1` within a timeout. Ready: the pid file (if any)
//! is rewritten atomically, a supervisor above us (systemd) is told
//! `MAINPID=<child>`, and [`SelfUpgrade::wait_for_successor`] returns so
//! the caller drains and exits. Not ready, or exited: the child's group is
//! killed and reaped, and we keep serving.
//!
//! One upgrade at a time: a new process that is asked to upgrade while its
//! parent still drains first waits for the parent to be gone, at most the
//! drain timeout. The child notices its parent's death by its parent pid
//! changing.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::notify::Notifier;
use crate::spawn::{spawn, SpawnSpec};

/// Set for the child: the supervisor's notify socket, to tell it our pid
/// when we upgrade in turn.
const VAR_UPSTREAM_NOTIFY: &str = "RELOAD_UPSTREAM_NOTIFY_SOCKET";

#[derive(Clone, Debug)]
pub struct UpgradeConfig {
    /// Starts an upgrade (SIGHUP by default).
    pub signal: SignalKind,
    /// A child not ready by then is killed; we keep serving.
    pub ready_timeout: Duration,
    /// How long this process drains after a successful upgrade; a new
    /// process waits at most this long for its parent before upgrading.
    pub drain_timeout: Duration,
    /// Rewritten atomically with the serving pid after every upgrade.
    pub pid_file: Option<PathBuf>,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            signal: SignalKind::hangup(),
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            pid_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start {path}: {source}")]
    Spawn {
        path: String,
        source: std::io::Error,
    },
    #[error("the new process (pid {pid}) exited before it was ready ({status})")]
    ExitedBeforeReady { pid: u32, status: String },
    #[error("the new process (pid {pid}) was not ready within {timeout:?}; it was killed")]
    ReadyTimeout { pid: u32, timeout: Duration },
    #[error("self-upgrade I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

pub struct SelfUpgrade {
    exe: PathBuf,
    args: Vec<OsString>,
    sockets: Vec<(String, OwnedFd)>,
    config: UpgradeConfig,
    upstream: Option<OsString>,
    signal: tokio::sync::Mutex<Signal>,
    /// Serializes upgrades started by signal and by API.
    running: tokio::sync::Mutex<()>,
    counter: AtomicU64,
    parent: u32,
    /// Started by a self-upgrade (READY goes to the parent, later messages
    /// to the supervisor).
    upgraded_child: bool,
}

impl SelfUpgrade {
    /// Enables self-upgrade: call at start, inside the runtime, with the
    /// listening sockets to hand on (name, socket), after they were taken
    /// (inherited or bound). Installs the signal handler at once.
    pub fn enable(
        sockets: &[(&str, &dyn AsFd)],
        config: UpgradeConfig,
    ) -> std::io::Result<SelfUpgrade> {
        let exe = std::env::current_exe()?;
        let upstream = match std::env::var_os(VAR_UPSTREAM_NOTIFY) {
            Some(value) => {
                std::env::remove_var(VAR_UPSTREAM_NOTIFY);
                Some(value)
            }
            None => crate::notify::socket_value(),
        };
        let owned = sockets
            .iter()
            .map(|(name, socket)| Ok((name.to_string(), socket.as_fd().try_clone_to_owned()?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let signal = signal(config.signal)?;
        let upgrade: SelfUpgrade = SelfUpgrade {
            exe,
            args: std::env::args_os().skip(1).collect(),
            sockets: owned,
            config,
            upstream,
            signal: tokio::sync::Mutex::new(signal),
            running: tokio::sync::Mutex::new(()),
            counter: AtomicU64::new(0),
            parent: std::os::unix::process::parent_id(),
            upgraded_child: std::env::var_os("RELOAD_UPGRADE_CHILD").is_some(),
        };
        Ok(upgrade)
    }

    /// Call once this process is ready (after `notify::ready()`): writes our
    /// pid to the pid file, and in a process started by an upgrade, points
    /// later notifications (STATUS, STOPPING) at the supervisor instead of
    /// the parent's private socket.
    pub fn announce_ready(&self) -> std::io::Result<()> {
        if self.upgraded_child {
            if let Err(err) = crate::notify::redirect(self.upstream.as_deref()) {
                tracing::warn!(error = %err, "the supervisor's notify socket is unusable");
            }
        }
        self.write_pid_file(std::process::id())
    }

    fn write_pid_file(&self, pid: u32) -> std::io::Result<()> {
        let Some(path) = &self.config.pid_file else {
            return Ok(());
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let temp = dir.join(format!(
            ".{}.{}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&temp, format!("{pid}\n"))?;
        std::fs::File::open(&temp)?.sync_all()?;
        std::fs::rename(&temp, path)
    }

    /// Waits, at most the drain timeout, for the process that started us to
    /// be gone (our parent pid changes when it exits).
    async fn wait_for_parent(&self) {
        let deadline = tokio::time::Instant::now() + self.config.drain_timeout;
        while std::os::unix::process::parent_id() == self.parent
            && tokio::time::Instant::now() < deadline
        {
            if !self.upgraded_child {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns once an upgrade succeeded: the new process serves; drain and
    /// exit now. Failed upgrades are logged, and it waits for the next
    /// signal.
    pub async fn wait_for_successor(&self) -> u32 {
        loop {
            self.signal.lock().await.recv().await;
            match self.upgrade_now().await {
                Ok(pid) => return pid,
                Err(err) => {
                    tracing::error!(error = %err, "self-upgrade failed; this process keeps serving")
                }
            }
        }
    }

    /// Starts the binary at our path and waits for it to be ready. On
    /// success the caller should drain and exit.
    pub async fn upgrade_now(&self) -> Result<u32, UpgradeError> {
        let _one_at_a_time = self.running.lock().await;
        self.wait_for_parent().await;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let notify_path =
            std::env::temp_dir().join(format!("reload-upgrade-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&notify_path);
        let notify = tokio::net::UnixDatagram::bind(&notify_path)?;
        let _cleanup = RemoveOnDrop(notify_path.clone());

        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "LISTEN_FDS"
                        | "LISTEN_PID"
                        | "LISTEN_FDNAMES"
                        | "NOTIFY_SOCKET"
                        | VAR_UPSTREAM_NOTIFY
                        | "RELOAD_UPGRADE_CHILD"
                )
            })
            .collect();
        env.push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
        env.push(("RELOAD_UPGRADE_CHILD".into(), "1".into()));
        if let Some(upstream) = &self.upstream {
            env.push((
                VAR_UPSTREAM_NOTIFY.into(),
                upstream.to_string_lossy().into_owned(),
            ));
        }
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(&a.clone().into_vec()).into_owned())
            .collect();
        let cwd = std::env::current_dir()?;
        let mut child = spawn(SpawnSpec {
            program: &self.exe,
            args: &args,
            env,
            working_dir: &cwd,
            sockets: self
                .sockets
                .iter()
                .map(|(name, fd)| (name.clone(), fd.as_fd()))
                .collect(),
            die_with_parent: false,
            own_process_group: false,
            image: None,
        })
        .map_err(|source| UpgradeError::Spawn {
            path: self.exe.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(pid, path = %self.exe.display(), "self-upgrade: started the new process, waiting for READY=1");

        let ready = crate::notify::recv_ready(&notify);
        let outcome = tokio::time::timeout(self.config.ready_timeout, async {
            tokio::select! {
                status = child.wait() => Err(status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())),
                result = ready => Ok(result),
            }
        })
        .await;
        match outcome {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => {
                let _ = child.kill().await;
                return Err(UpgradeError::Io(err));
            }
            Ok(Err(status)) => return Err(UpgradeError::ExitedBeforeReady { pid, status }),
            Err(_) => {
                let _ = child.kill().await;
                return Err(UpgradeError::ReadyTimeout {
                    pid,
                    timeout: self.config.ready_timeout,
                });
            }
        }
        // The child now serves; it is reaped by whoever inherits it once we
        // exit. Record it, and tell a supervisor above us.
        self.write_pid_file(pid)?;
        if let Some(upstream) = &self.upstream {
            match Notifier::new(upstream) {
                Ok(notifier) => {
                    if let Err(err) = notifier.notify(&format!("MAINPID={pid}\nREADY=1")) {
                        tracing::warn!(error = %err, "could not tell the supervisor the new main pid");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "the supervisor's notify socket is unusable")
                }
            }
        }
        // Detach: the child must outlive us (no kill on drop; tokio's Child
        // does not kill unless asked).
        drop(child);
        tracing::info!(
            pid,
            "self-upgrade: the new process is ready; draining this one"
        );
        Ok(pid)
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
