//! Taking ownership of file descriptors that an earlier image of this same
//! process left open across `execve`: the agent's in-place self-upgrade
//! passes its sockets, pipes and pidfds this way, by number, in a
//! description it puts in the environment.
//!
//! A number is only a claim that an fd is open; this module checks it is,
//! refuses to hand out the same number twice (two owners would close it
//! twice) and marks it close-on-exec again, so it does not leak into the
//! processes this image starts.
//!
//! Also [`recv_with_fds`]: fds another process sends over a Unix socket
//! (SCM_RIGHTS), owned as they arrive.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

static CLAIMED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Takes ownership of inherited fd `fd`. Fails if it is stdio, not open, or
/// already claimed.
pub fn claim_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is stdio, not an inherited descriptor"),
        ));
    }
    let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
    if claimed.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is named twice in the inherited state"),
        ));
    }
    // SAFETY: F_GETFD only reads the flags of `fd`; it fails with EBADF if
    // the number is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("fd {fd} is not open: {}", io::Error::last_os_error()),
        ));
    }
    // SAFETY: as above; sets only the close-on-exec flag.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    claimed.insert(fd);
    // SAFETY: the fd is open, was left to this image by the previous one,
    // and the registry above makes this the only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Receives from a Unix socket into `buffer`, taking ownership of the fds
/// that arrive with it as SCM_RIGHTS (close-on-exec, at most `max_fds`).
/// Returns the number of bytes received (0 at the end of the stream).
pub fn recv_with_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    buffer: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use std::os::fd::AsRawFd;
    let space = libc_cmsg_space(max_fds);
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields set
    // below point into `iov` and `control`, which outlive the call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space as _;
    // SAFETY: recvmsg writes at most iov_len bytes into `buffer` and at most
    // msg_controllen bytes into `control`, as the header says.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by msg_controllen; each SCM_RIGHTS payload is an array of fds
    // the kernel just installed in this process, owned by nobody else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {max_fds} fds arrived; the extra ones were closed"),
        ));
    }
    Ok((n as usize, fds))
}

fn libc_cmsg_space(max_fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}
