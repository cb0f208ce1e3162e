//! What the agent and a shim say to each other: JSON, one message a line,
//! over a Unix stream socket. The shim's first message on every connection
//! is a [`ShimMessage::Hello`] that carries, as SCM_RIGHTS, a duplicate of
//! every listening socket of its service, so an agent that starts while the
//! service runs takes the sockets back instead of binding them (which would
//! fail: the service holds them).

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::{Deserialize, Serialize};

/// The environment variable that carries the [`ShimSpec`].
pub const SPEC_VAR: &str = "RELOAD_SHIM";

/// The first argument that makes `reload-agent` a shim.
pub const SHIM_ARG: &str = "--shim";

/// The longest line of service output forwarded as one; longer lines are
/// split. Bounds the memory a service can make the shim and the agent hold.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// The longest message either side reads (a line of output escaped as
/// JSON is at most six times longer).
pub const MAX_MESSAGE_BYTES: usize = 8 * MAX_LINE_BYTES;

/// Most listening sockets a hello carries.
pub const MAX_LISTENERS: usize = 64;

/// The name (in the shim's LISTEN_FDNAMES) of the fd that carries the
/// sealed image the shim executes, after the listeners.
pub const IMAGE_FD_NAME: &str = "reload-sealed-image";

/// What a shim runs, from the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShimSpec {
    pub service: String,
    pub version: String,
    pub sha256: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The service's whole environment.
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    /// Names of the listeners the shim got as fds 3.., in order.
    pub listeners: Vec<String>,
    /// Where the shim listens for agents that start later.
    pub socket_path: PathBuf,
    /// The service's NOTIFY_SOCKET, if it has one.
    pub notify_path: Option<PathBuf>,
    /// The shim got the verified image as the fd [`IMAGE_FD_NAME`] and
    /// executes that, never `program` (which is only argv[0]).
    #[serde(default)]
    pub sealed_image: bool,
    /// The image starts with `#!`.
    #[serde(default)]
    pub image_script: bool,
}

/// How a process ended, as `waitpid` reports it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaitStatus(pub i32);

impl WaitStatus {
    pub fn exit_status(self) -> std::process::ExitStatus {
        std::os::unix::process::ExitStatusExt::from_raw(self.0)
    }
}

/// Shim to agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimMessage {
    /// Who this shim runs; listener fds ride along.
    Hello {
        spec: Box<ShimSpec>,
        shim_pid: u32,
        /// The service's main process, and its start time in clock ticks
        /// since boot (field 22 of /proc/<pid>/stat): with a pidfd, what
        /// proves the pid still names this process.
        pid: u32,
        start_time: u64,
        /// How long the service has run.
        running_ms: u64,
        /// Set when the service already ended (while no agent listened).
        exited: Option<WaitStatus>,
    },
    /// A line (or a piece of a long line) the service wrote.
    Output { stream: String, line: String },
    /// Lines dropped because no agent read them and the buffer was full.
    Dropped { lines: u64, bytes: u64 },
    /// The service could not be started at all (instead of a hello).
    SpawnFailed { reason: String },
    /// The service's main process ended; its process group was killed.
    Exited { status: WaitStatus },
}

/// Agent to shim.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentMessage {
    /// The agent knows the service ended: the shim may go.
    ExitSeen,
}

/// Sends one message, with `fds` as SCM_RIGHTS when given.
pub fn send_with_fds(
    stream: &UnixStream,
    message: &ShimMessage,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < line.len() {
        let iov = [IoSlice::new(&line[sent..])];
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &cmsgs
        } else {
            &[]
        };
        sent += sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
    }
    Ok(())
}

/// Reads the hello (with its fds) from a blocking stream. Reads one byte at
/// a time up to the newline, so nothing after the hello is consumed (the
/// fds arrive with its first byte).
pub fn receive_hello(stream: &UnixStream) -> io::Result<(ShimMessage, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let (n, received) =
            reload_server::inherit::recv_with_fds(stream.as_fd(), &mut byte, MAX_LISTENERS)?;
        fds.extend(received);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the shim closed the connection before its hello",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_MESSAGE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the shim's hello is too long",
            ));
        }
    }
    let message = serde_json::from_slice(&line).map_err(io::Error::other)?;
    Ok((message, fds))
}
