//! The preflight: run a new binary once, without sockets and bounded in
//! time, before anything is replaced. A service's release runs its
//! `preflight_args` (`--version` by default); a new agent binary runs
//! `--check` on the agent's config. Either way a binary that cannot even
//! start (wrong architecture, missing libraries, a broken build, a flag it
//! does not take) is refused while the running process goes on untouched.

use std::process::{ExitStatus, Output};
use std::time::Duration;

use super::process::describe_exit;

/// Characters of a failed preflight's stderr quoted in its reason.
const STDERR_QUOTED_CHARS: usize = 500;

/// Why a preflight did not pass.
#[derive(Debug, thiserror::Error)]
pub enum PreflightFailure {
    #[error("did not finish within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("could not run the binary: {0}")]
    CouldNotRun(std::io::Error),
    #[error("{}; stderr: {stderr}", describe_exit(*.status))]
    Failed { status: ExitStatus, stderr: String },
}

/// Reads a child's pipe to its end, on a task of its own.
fn read_all(pipe: Option<impl Into<std::os::fd::OwnedFd>>) -> tokio::task::JoinHandle<Vec<u8>> {
    let pipe = pipe.map(|pipe| tokio::net::unix::pipe::Receiver::from_owned_fd(pipe.into()));
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(Ok(mut pipe)) = pipe {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut bytes).await;
        }
        bytes
    })
}

/// Runs `command` (stdin closed, in a process group of its own) for at
/// most `timeout` and requires exit status 0; on success its output.
///
/// The child is reaped through a pidfd by this function alone (std's
/// `Child` does not reap on drop, tokio is not involved), and its group
/// is killed while its leader is an unreaped zombie or, on a timeout,
/// still running: so the kill cannot reach a process that took its
/// number, and nothing it started (gunicorn's workers, a launcher's
/// children) outlives the preflight.
pub async fn run_preflight(
    mut command: std::process::Command,
    timeout: Duration,
) -> Result<Output, PreflightFailure> {
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().map_err(PreflightFailure::CouldNotRun)?;
    let kill_group = |pidfd: &std::os::fd::OwnedFd| {
        if let Err(err) =
            reload_server::spawn::signal_group(pidfd.as_fd(), nix::sys::signal::Signal::SIGKILL)
        {
            tracing::error!(error = %err, "cannot kill the preflight's process group");
        }
    };
    let pidfd = match reload_server::spawn::pidfd_open(child.id()) {
        Ok(pidfd) => pidfd,
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PreflightFailure::CouldNotRun(err));
        }
    };
    let reaper = pidfd.try_clone().map_err(PreflightFailure::CouldNotRun)?;
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let finished = tokio::time::timeout(timeout, async {
        let status = reload_server::spawn::reap_after(reaper, || kill_group(&pidfd)).await;
        // With the whole group gone, every writer of the pipes is too.
        let (stdout, stderr) = (stdout.await, stderr.await);
        (status, stdout, stderr)
    })
    .await;
    let output = match finished {
        Ok((status, stdout, stderr)) => Output {
            status: status.map_err(PreflightFailure::CouldNotRun)?,
            stdout: stdout.unwrap_or_default(),
            stderr: stderr.unwrap_or_default(),
        },
        Err(_) => {
            // Not reaped: the leader's number is still its own.
            kill_group(&pidfd);
            let _ = reload_server::spawn::reap(pidfd).await;
            return Err(PreflightFailure::TimedOut(timeout));
        }
    };
    if output.status.success() {
        return Ok(output);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(PreflightFailure::Failed {
        status: output.status,
        stderr: last_chars(stderr.trim(), STDERR_QUOTED_CHARS).to_string(),
    })
}

/// The last `n` bytes of `text`, moved forward to a character boundary.
fn last_chars(text: &str, n: usize) -> &str {
    let start = text.len().saturating_sub(n);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_chars_never_splits_a_character() {
        assert_eq!(last_chars("abcdef", 3), "def");
        assert_eq!(last_chars("ab", 10), "ab");
        // "é" is two bytes: a cut inside it moves past it.
        assert_eq!(last_chars("aéb", 2), "b");
    }

    #[tokio::test]
    async fn a_failing_binary_is_refused_with_its_stderr() {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", "echo broken build >&2; exit 3"]);
        let err = run_preflight(command, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "exit status 3; stderr: broken build");
    }

    #[tokio::test]
    async fn a_binary_that_hangs_is_cut_off_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child");
        let mut command = std::process::Command::new("sh");
        command.args([
            "-c",
            &format!("sleep 30 & echo $! > {}; wait", pid_file.display()),
        ]);
        let err = run_preflight(command, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(err, PreflightFailure::TimedOut(_)), "{err}");
        let child: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild went with the group (a zombie at most, until init
        // reaps it).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let gone = state.is_empty()
                || state
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z');
            if gone {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the preflight's child {child} survived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
