//! Starting a process with listening sockets by the socket-activation
//! protocol: the agent's handoff, and the standalone self-upgrade of
//! [`crate::upgrade`]. One of the two modules of this crate with `unsafe`.
//!
//! The new process receives its sockets through systemd's socket-activation
//! protocol: fds 3, 4, ... in the declared order, `LISTEN_FDS=n`,
//! `LISTEN_FDNAMES=a:b`, and `LISTEN_PID=<its own pid>`. The pid is only known
//! after fork, and between fork and exec a multi-threaded parent's child may
//! not allocate (another thread may have held the allocator's lock at fork).
//! So everything the child needs is built before the fork: the program path,
//! argv and envp as C strings with their pointer arrays, and a fixed-width
//! `LISTEN_PID=` slot. After the fork the child only makes async-signal-safe
//! system calls: it moves the sockets to 3.. (clearing CLOEXEC on exactly
//! those fds, in the child only), marks every other fd close-on-exec, writes
//! its pid into the slot, asks to be told when its parent dies, and calls
//! execve itself.
//!
//! std (through tokio) has already made the process group, stdio and the
//! signal mask by the time our `pre_exec` hook runs; if our execve fails, the
//! error travels back to the parent's `spawn()` as usual.
#![deny(unsafe_op_in_unsafe_fn)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;

/// Decimal digits reserved for the pid in `LISTEN_PID=`; Linux pids are at
/// most 4194304 (7 digits).
const PID_DIGITS: usize = 10;

/// Where the fd-by-fd fallback of close_range stops.
const FALLBACK_FD_LIMIT: RawFd = 65536;

/// What a new process is made of, built before the fork.
pub struct SpawnSpec<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    /// The whole environment of the child (nothing else is inherited).
    pub env: Vec<(String, String)>,
    pub working_dir: &'a Path,
    /// Listening sockets, in LISTEN_FDS order, with their names.
    pub sockets: Vec<(String, BorrowedFd<'a>)>,
    /// SIGTERM the child when its parent dies (a supervised service). Not
    /// for a self-upgrade, whose child outlives the parent by design.
    pub die_with_parent: bool,
    /// Run the child in a process group of its own (a supervised service,
    /// so its whole group can be signalled).
    pub own_process_group: bool,
    /// Execute this fd (`execveat(fd, "", AT_EMPTY_PATH)`) instead of
    /// `program`, which is then only the child's argv[0]: a verified image
    /// that no path can swap. With `script`, the fd stays open across the
    /// exec (at the fd after the sockets), for the interpreter to read it
    /// through `/dev/fd/N`.
    pub image: Option<ExecFd<'a>>,
}

/// An executable by fd, see [`SpawnSpec::image`].
#[derive(Clone, Copy, Debug)]
pub struct ExecFd<'a> {
    pub fd: BorrowedFd<'a>,
    pub script: bool,
}

/// Everything `execve` needs, in memory the child can use without
/// allocating. The pointer arrays point into the C strings' heap buffers,
/// which do not move when this struct moves.
struct ExecImage {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp: Vec<Vec<u8>>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Index in `envp` of the `LISTEN_PID=` entry, if sockets are passed.
    pid_slot: Option<usize>,
    /// Source fds of the sockets, in order.
    socket_fds: Vec<RawFd>,
    /// The agent's pid: the child exits if it was already orphaned.
    agent_pid: libc::pid_t,
    die_with_parent: bool,
    /// The image to execute by fd, and whether it must survive the exec.
    image_fd: Option<RawFd>,
    image_script: bool,
}

// SAFETY: the raw pointers only point into buffers owned by the same struct;
// the struct is moved into the pre_exec closure and used only in the forked
// child, where no other thread exists.
unsafe impl Send for ExecImage {}
unsafe impl Sync for ExecImage {}

fn c_string(text: &[u8], what: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

impl ExecImage {
    fn new(spec: &SpawnSpec<'_>) -> io::Result<ExecImage> {
        let program = c_string(spec.program.as_os_str().as_bytes(), "program path")?;
        let mut argv = vec![program.clone()];
        for arg in spec.args {
            argv.push(c_string(OsStr::new(arg).as_bytes(), "an argument")?);
        }
        let mut envp: Vec<Vec<u8>> = Vec::new();
        for (key, value) in &spec.env {
            let entry = c_string(format!("{key}={value}").as_bytes(), "an environment entry")?;
            envp.push(entry.into_bytes_with_nul());
        }
        let mut pid_slot = None;
        if !spec.sockets.is_empty() {
            let names: Vec<&str> = spec.sockets.iter().map(|(name, _)| name.as_str()).collect();
            envp.push(format!("LISTEN_FDS={}\0", spec.sockets.len()).into_bytes());
            envp.push(format!("LISTEN_FDNAMES={}\0", names.join(":")).into_bytes());
            let mut slot = b"LISTEN_PID=".to_vec();
            slot.extend(std::iter::repeat_n(b'0', PID_DIGITS));
            slot.push(0);
            pid_slot = Some(envp.len());
            envp.push(slot);
        }
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp_ptrs = envp
            .iter()
            .map(|e| e.as_ptr().cast::<libc::c_char>())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(ExecImage {
            program,
            _argv: argv,
            argv_ptrs,
            envp,
            envp_ptrs,
            pid_slot,
            socket_fds: spec.sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect(),
            // SAFETY: getpid has no preconditions.
            agent_pid: unsafe { libc::getpid() },
            die_with_parent: spec.die_with_parent,
            image_fd: spec.image.map(|i| i.fd.as_raw_fd()),
            image_script: spec.image.is_some_and(|i| i.script),
        })
    }

    /// Runs in the forked child. Only async-signal-safe calls, no
    /// allocation, no locks.
    fn exec_in_child(&mut self) -> io::Result<()> {
        let n = self.socket_fds.len() as RawFd;
        // Move every socket above the target range first, so that placing
        // socket i at fd 3+i never overwrites a socket not yet placed.
        let floor = 3
            + n
            + self
                .socket_fds
                .iter()
                .copied()
                .chain(self.image_fd)
                .max()
                .unwrap_or(0);
        if let Some(fd) = self.image_fd.as_mut() {
            // SAFETY: fcntl on an fd that is open in this process.
            let high = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, floor) };
            if high < 0 {
                return Err(io::Error::last_os_error());
            }
            *fd = high;
        }
        for fd in self.socket_fds.iter_mut() {
            // SAFETY: fcntl on an fd that is open in this process.
            let high = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, floor) };
            if high < 0 {
                return Err(io::Error::last_os_error());
            }
            *fd = high;
        }
        for (i, fd) in self.socket_fds.iter().enumerate() {
            // dup2 leaves CLOEXEC clear on the new fd: exactly the passed
            // sockets survive the exec; the high copies are CLOEXEC.
            // SAFETY: both fds are valid; the target is ours to replace.
            if unsafe { libc::dup2(*fd, 3 + i as RawFd) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Nothing else this process holds reaches the new program: fds it
        // inherited from whatever started it (a shell, a service manager)
        // and did not mark close-on-exec would otherwise leak into every
        // service. Marked close-on-exec rather than closed, so std's
        // exec-error pipe still works until execve.
        // The image goes right after the sockets (LISTEN_FDS does not count
        // it). dup2 clears CLOEXEC; an ELF image gets it back, so only a
        // script's interpreter sees the fd.
        let image_at = 3 + n;
        if let Some(fd) = self.image_fd {
            // SAFETY: both fds are valid; the target is ours to replace.
            if unsafe { libc::dup2(fd, image_at) } < 0 {
                return Err(io::Error::last_os_error());
            }
            if !self.image_script {
                // SAFETY: fcntl on the fd just placed.
                unsafe { libc::fcntl(image_at, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        let first_unpassed = (3 + n + RawFd::from(self.image_fd.is_some())) as libc::c_uint;
        // SAFETY: close_range only changes flags of fds of this process.
        let marked = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first_unpassed,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if marked != 0 {
            // Before Linux 5.11: the same, one fd at a time.
            for fd in first_unpassed as RawFd..FALLBACK_FD_LIMIT {
                // SAFETY: fcntl on a closed number fails with EBADF, harmlessly.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        if let Some(slot) = self.pid_slot {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() } as u32;
            write_decimal(&mut self.envp[slot][b"LISTEN_PID=".len()..], pid);
        }
        if self.die_with_parent {
            // If the agent dies, the service is told to drain (SIGTERM), so
            // a restarted agent can bind its sockets again. Set it, then
            // check the agent did not die before it took effect.
            // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                if libc::getppid() != self.agent_pid {
                    libc::_exit(1);
                }
            }
        }
        if self.image_fd.is_some() {
            // SAFETY: the fd is open; "" with AT_EMPTY_PATH executes it;
            // argv and envp as below.
            unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    image_at,
                    c"".as_ptr(),
                    self.argv_ptrs.as_ptr(),
                    self.envp_ptrs.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            }
            return Err(io::Error::last_os_error());
        }
        // SAFETY: program, argv and envp are NUL-terminated strings owned by
        // self, and both pointer arrays end with a null pointer.
        unsafe {
            libc::execve(
                self.program.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            );
        }
        Err(io::Error::last_os_error())
    }
}

/// Writes `value` in decimal at the start of `slot` and terminates
/// it with NUL (the slot has room for PID_DIGITS digits plus the NUL that
/// follows). No allocation.
fn write_decimal(slot: &mut [u8], mut value: u32) {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (value % 10) as u8;
        value /= 10;
        len += 1;
        if value == 0 || len == PID_DIGITS {
            break;
        }
    }
    for i in 0..len {
        slot[i] = digits[len - 1 - i];
    }
    slot[len] = 0;
}

/// The command for `spec`, with the pre-exec hook that places the sockets;
/// the caller may still set stdio before spawning it.
pub fn command(spec: SpawnSpec<'_>) -> io::Result<std::process::Command> {
    let mut image = ExecImage::new(&spec)?;
    let mut command = std::process::Command::new(spec.program);
    command.current_dir(spec.working_dir);
    if spec.own_process_group {
        use std::os::unix::process::CommandExt;
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    // SAFETY: the hook runs in the forked child before exec; it only makes
    // async-signal-safe system calls on data prepared before the fork (see
    // ExecImage::exec_in_child), and never returns on success.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || image.exec_in_child());
    }
    Ok(command)
}

/// Starts the process described by `spec` as a tokio child (the standalone
/// self-upgrade, which reaps it with tokio). With `own_process_group` it also
/// gets a null stdin and piped stdout/stderr; otherwise it inherits our stdio
/// and process group.
pub fn spawn(spec: SpawnSpec<'_>) -> io::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::from(command(spec)?);
    command.kill_on_drop(false);
    command.spawn()
}

/// A started process known by a pidfd rather than by a tokio `Child`: a
/// pidfd can be passed across an exec of the parent, so a re-executed agent
/// adopts its children (and reaps them) without any risk of pid reuse.
pub struct ServiceChild {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Starts the process described by `spec` and opens a pidfd for it. The
/// caller reaps it (waitid on the pidfd); nothing else does.
///
/// `die_with_parent` ties the child to the *thread* that forks it (that is
/// how PR_SET_PDEATHSIG works), so a caller that later re-executes itself
/// must fork from the thread that will call execve: every other thread ends
/// at exec, and the children it forked would be signalled.
pub fn spawn_service(spec: SpawnSpec<'_>) -> io::Result<ServiceChild> {
    let mut child = command(spec)?.spawn()?;
    let pid = child.id();
    // Not yet reaped by anyone (std's Child does not reap on drop), so the
    // pid still names our child, even if it has already exited.
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
    };
    Ok(ServiceChild {
        pid,
        pidfd,
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    })
}

/// pidfd_open(2): an fd that refers to process `pid` for as long as the fd
/// is open, readable once the process exits. Linux 5.3 or later.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    // pidfds are created close-on-exec.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// `PIDFD_SIGNAL_PROCESS_GROUP` (Linux 6.9): signal the process group the
/// pidfd's process leads. Not in the libc crate yet.
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

/// Sends `signal` to the process group led by the process behind `pidfd`.
///
/// A process group's id is its leader's pid, and `killpg(pid)` after the
/// leader was reaped may reach a stranger's group that got the pid since.
/// A pidfd names the process itself, never its number: the kernel resolves
/// the group through the pidfd's own `struct pid`, which is never reused,
/// so a group whose leader is gone is still the right one (its workers get
/// the signal) and a new process with the same number is never touched.
///
/// Kernels before 6.9 do not know the flag (EINVAL): there the pidfd is
/// used to check the leader has not been reaped, then `killpg` is called;
/// the leaders this is used for are reaped only by their own shim, which
/// signals the group itself before it reaps, so the gap is the time
/// between the two calls. `ESRCH` (the whole group is gone) is `Ok`.
pub fn signal_group(pidfd: BorrowedFd<'_>, signal: nix::sys::signal::Signal) -> io::Result<()> {
    let send = |sig: libc::c_int, flags: libc::c_uint| -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes an fd we borrow for the call, a
        // signal number, a null siginfo (the kernel fills one in as for
        // kill) and flags; it touches no memory of ours.
        let result = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                flags,
            )
        };
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let gone = |err: &io::Error| err.raw_os_error() == Some(libc::ESRCH);
    match send(signal as libc::c_int, PIDFD_SIGNAL_PROCESS_GROUP) {
        Ok(()) => Ok(()),
        Err(err) if gone(&err) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            // An older kernel. Signal 0 checks the leader is not reaped
            // (a zombie still answers), so its pid is still its own.
            match send(0, 0) {
                Ok(()) => {}
                Err(err) if gone(&err) => return Ok(()),
                Err(err) => return Err(err),
            }
            let pgid = pidfd_pid(pidfd)?;
            match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
                Err(errno) => Err(errno.into()),
            }
        }
        Err(err) => Err(err),
    }
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo` (`Pid:` is -1 once
/// the process was reaped).
pub fn pidfd_pid(pidfd: BorrowedFd<'_>) -> io::Result<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// Opens a pidfd for `pid` and checks it is the process that started at
/// `start_time` (see [`start_time`]): a pid read from elsewhere (a shim's
/// message) may have been reused by the time it is opened. The check runs
/// after the open: a process alive at the check was alive at the open, so
/// a match proves the pidfd names that process.
pub fn pidfd_open_checked(pid: u32, started_at: u64) -> io::Result<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    if start_time(pid)? != started_at {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(pidfd)
}

/// Waits for the process behind `pidfd` (our child) to exit and reaps it.
/// Must run inside a tokio runtime.
pub async fn reap(pidfd: OwnedFd) -> io::Result<std::process::ExitStatus> {
    reap_after(pidfd, || {}).await
}

/// Like [`reap`], but calls `before_reap` once the process has exited and
/// before it is reaped: while it is a zombie its pid, and so its process
/// group's id, cannot be given to another process, so `before_reap` may
/// signal the group safely.
pub async fn reap_after(
    pidfd: OwnedFd,
    before_reap: impl FnOnce(),
) -> io::Result<std::process::ExitStatus> {
    use nix::errno::Errno;
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    use std::os::fd::AsFd;
    use std::os::unix::process::ExitStatusExt;
    use tokio::io::unix::AsyncFd;
    // SAFETY: the AsyncFd owns the pidfd, so the fd stays open, and is not
    // reused for anything else, for as long as it is registered.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|err| err.into_parts().1)?;
    let id = || Id::PIDFd(pidfd.get_ref().as_fd());
    loop {
        let mut ready = pidfd.readable().await?;
        match waitid(
            id(),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => break,
            // Still running (a spurious wake-up), or interrupted.
            Ok(_) | Err(Errno::EINTR) => ready.clear_ready(),
            Err(errno) => return Err(errno.into()),
        }
    }
    before_reap();
    loop {
        match waitid(id(), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(std::process::ExitStatus::from_raw((code & 0xff) << 8))
            }
            Ok(WaitStatus::Signaled(_, signal, core)) => {
                return Ok(std::process::ExitStatus::from_raw(
                    signal as i32 | if core { 0x80 } else { 0 },
                ))
            }
            Err(Errno::EINTR) => continue,
            Ok(other) => {
                return Err(io::Error::other(format!(
                    "unexpected wait status {other:?}"
                )))
            }
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`). With a pidfd, what proves that a pid read from a
/// file or a message still names the same process: a pid can be reused,
/// a (pid, start time) pair cannot.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Field 2, the command name, is in parentheses and may hold spaces.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unreadable /proc/<pid>/stat"))?;
    after_name
        .split_whitespace()
        .nth(19)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| io::Error::other("no start time in /proc/<pid>/stat"))
}

#[cfg(test)]
mod tests {
    use super::write_decimal;

    #[test]
    fn start_time_names_this_process_and_not_another() {
        let own = super::start_time(std::process::id()).unwrap();
        assert!(own > 0);
        assert_eq!(super::start_time(std::process::id()).unwrap(), own);
        assert!(super::start_time(u32::MAX / 2).is_err());
    }

    /// A `sleep 60` in a process group of its own.
    fn group_leader() -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    /// Starts group leaders until one gets `pid`, by setting the last pid
    /// the kernel gave out (root only); `None` if another process keeps
    /// taking it first.
    fn leader_with_pid(pid: u32) -> Option<std::process::Child> {
        for _ in 0..50 {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
                .expect("setting ns_last_pid (needs root)");
            let mut child = group_leader();
            if child.id() == pid {
                return Some(child);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }

    fn running(child: &mut std::process::Child) -> bool {
        child.try_wait().unwrap().is_none()
    }

    #[test]
    fn a_group_signal_through_a_pidfd_never_reaches_the_process_that_reused_the_pid() {
        let may_choose_pids = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/kernel/ns_last_pid")
            .is_ok();
        if !may_choose_pids {
            eprintln!(
                "SKIPPED: a_group_signal_through_a_pidfd_never_reaches_the_process_that_reused_the_pid \
                 needs root to choose the next pid (/proc/sys/kernel/ns_last_pid)"
            );
            return;
        }
        // The stale handle: a leader that ended and was reaped.
        let mut first = group_leader();
        let pid = first.id();
        let pidfd = super::pidfd_open(pid).unwrap();
        first.kill().unwrap();
        first.wait().unwrap();
        // A stranger's group takes the number: `killpg(pid)` would hit it.
        let mut stranger = leader_with_pid(pid).expect("no process got the reused pid in 50 tries");
        assert_eq!(
            nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)))
                .unwrap()
                .as_raw(),
            pid as i32
        );

        use std::os::fd::AsFd;
        super::signal_group(pidfd.as_fd(), nix::sys::signal::Signal::SIGKILL).unwrap();
        // SIGKILL takes effect before kill(2) returns to its sender; give
        // a loaded machine a margin all the same before looking.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let survived = running(&mut stranger);
        let _ = stranger.kill();
        let _ = stranger.wait();
        assert!(
            survived,
            "the signal for a reaped process's group killed the process that reused its pid"
        );
    }

    #[test]
    fn a_group_signal_through_a_pidfd_reaches_every_process_of_a_live_group() {
        use std::os::unix::process::CommandExt;
        // A leader with a worker in its group, like gunicorn and its workers.
        let dir = tempfile::tempdir().unwrap();
        let worker_pid = dir.path().join("worker");
        let mut leader = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sleep 60 & echo $! > {}; wait",
                worker_pid.display()
            ))
            .process_group(0)
            .spawn()
            .unwrap();
        let pidfd = super::pidfd_open(leader.id()).unwrap();
        let worker: i32 = loop {
            match std::fs::read_to_string(&worker_pid) {
                Ok(text) if text.ends_with('\n') => break text.trim().parse().unwrap(),
                _ => std::thread::yield_now(),
            }
        };
        use std::os::fd::AsFd;
        super::signal_group(pidfd.as_fd(), nix::sys::signal::Signal::SIGKILL).unwrap();
        let status = leader.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        // The worker is gone too (reparented and reaped, or a zombie).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap_or_default();
            if state.is_empty()
                || state
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker {worker} outlived the group signal"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn pid_is_written_and_terminated() {
        let mut slot = *b"0000000000\0";
        write_decimal(&mut slot, 4_194_304);
        assert_eq!(&slot[..8], b"4194304\0");
        let mut slot = *b"0000000000\0";
        write_decimal(&mut slot, 7);
        assert_eq!(&slot[..2], b"7\0");
    }
}
