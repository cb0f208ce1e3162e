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

/// Reads the hello (with its fds) from a blocking stream, and nothing after
/// it: what follows the newline is the next message, read by whoever reads
/// the stream next.
///
/// Each round looks first (`MSG_PEEK`, which without a control buffer
/// installs no fd) and then takes off the stream only the bytes up to the
/// newline, or all it saw when there is no newline yet, with `recvmsg`,
/// which brings the fds along with the first byte. It used to take one
/// byte per `recvmsg`: a few hundred system calls per hello, in every
/// reload (BENCHMARKS.md 3b).
pub fn receive_hello(stream: &UnixStream) -> io::Result<(ShimMessage, Vec<OwnedFd>)> {
    let closed_early = || {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the shim closed the connection before its hello",
        )
    };
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut seen = vec![0u8; MAX_MESSAGE_BYTES + 1];
    loop {
        let n = nix::sys::socket::recv(stream.as_raw_fd(), &mut seen, MsgFlags::MSG_PEEK)
            .map_err(io::Error::from)?;
        if n == 0 {
            return Err(closed_early());
        }
        let wanted = seen[..n]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(n, |at| at + 1);
        // May take fewer than `wanted` (the kernel stops at the end of a
        // message that carried fds), never more.
        let (taken, received) = reload_server::inherit::recv_with_fds(
            stream.as_fd(),
            &mut seen[..wanted],
            MAX_LISTENERS,
        )?;
        fds.extend(received);
        if taken == 0 {
            return Err(closed_early());
        }
        line.extend_from_slice(&seen[..taken]);
        // Only the bytes up to the first newline are ever taken, so a
        // newline can only be the last of them.
        if line.last() == Some(&b'\n') {
            line.pop();
            break;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    fn hello() -> ShimMessage {
        ShimMessage::Hello {
            spec: Box::new(ShimSpec {
                service: "web".into(),
                version: "1.2.3".into(),
                sha256: "ab".repeat(32),
                program: "/srv/web".into(),
                args: vec!["--listen-name".into(), "http".into()],
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                working_dir: "/".into(),
                listeners: vec!["http".into(), "admin".into()],
                socket_path: "/run/reload/web.sock".into(),
                notify_path: None,
                sealed_image: true,
                image_script: false,
            }),
            shim_pid: 42,
            pid: 43,
            start_time: 1000,
            running_ms: 5,
            exited: None,
        }
    }

    /// (device, inode) of what an fd refers to.
    fn identity(fd: BorrowedFd<'_>) -> (u64, u64) {
        let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
        let meta = file.metadata().unwrap();
        (meta.dev(), meta.ino())
    }

    #[test]
    fn the_hello_comes_with_its_fds_and_leaves_the_next_message_on_the_stream() {
        let (agent, shim) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<std::fs::File> = ["a", "b"]
            .iter()
            .map(|name| std::fs::File::create(dir.path().join(name)).unwrap())
            .collect();
        let sent: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        send_with_fds(&shim, &hello(), &sent).unwrap();
        // Already waiting behind the hello when the agent reads it.
        let next = ShimMessage::Output {
            stream: "stdout".into(),
            line: "listening".into(),
        };
        send_with_fds(&shim, &next, &[]).unwrap();
        drop(shim);

        let (message, fds) = receive_hello(&agent).unwrap();
        match message {
            ShimMessage::Hello { spec, pid, .. } => {
                assert_eq!(spec.listeners, ["http", "admin"]);
                assert_eq!(pid, 43);
            }
            other => panic!("not a hello: {other:?}"),
        }
        let got: Vec<_> = fds.iter().map(|fd| identity(fd.as_fd())).collect();
        let want: Vec<_> = sent.iter().map(|fd| identity(*fd)).collect();
        assert_eq!(got, want);
        let mut rest = String::new();
        (&agent).read_to_string(&mut rest).unwrap();
        let mut expected = serde_json::to_string(&next).unwrap();
        expected.push('\n');
        assert_eq!(rest, expected, "the message after the hello was touched");
    }

    #[test]
    fn a_hello_written_in_pieces_is_read_whole() {
        let (agent, shim) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("listener")).unwrap();
        let mut line = serde_json::to_vec(&hello()).unwrap();
        line.push(b'\n');
        let (first, rest) = line.split_at(10);
        // The first piece with the fd, as send_with_fds does.
        sendmsg::<()>(
            shim.as_raw_fd(),
            &[IoSlice::new(first)],
            &[ControlMessage::ScmRights(&[file.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let rest = rest.to_vec();
        let writer = std::thread::spawn(move || {
            let mut shim = shim;
            for piece in rest.chunks(7) {
                std::thread::sleep(std::time::Duration::from_millis(1));
                shim.write_all(piece).unwrap();
            }
            shim
        });
        let (message, fds) = receive_hello(&agent).unwrap();
        assert!(matches!(message, ShimMessage::Hello { shim_pid: 42, .. }));
        assert_eq!(fds.len(), 1);
        assert_eq!(identity(fds[0].as_fd()), identity(file.as_fd()));
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_shim_that_closes_mid_hello_is_an_unexpected_end() {
        let (agent, mut shim) = UnixStream::pair().unwrap();
        shim.write_all(br#"{"hello":{"spec""#).unwrap();
        drop(shim);
        let err = receive_hello(&agent).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn a_hello_longer_than_a_message_may_be_is_refused() {
        let (agent, shim) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut shim = shim;
            // Stops once the agent gives up and closes its end.
            let _ = shim.write_all(&vec![b'x'; MAX_MESSAGE_BYTES * 2]);
        });
        let err = receive_hello(&agent).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(agent);
        writer.join().unwrap();
    }
}
