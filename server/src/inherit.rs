//! Taking ownership of file descriptors that an earlier image of this same
//! process left open across `execve`: the agent's in-place self-upgrade
//! passes its sockets, pipes and pidfds this way, by number, in a
//! description it puts in the environment.
//!
//! A number is only a claim that an fd is open; this module checks it is,
//! refuses to hand out the same number twice (two owners would close it
//! twice) and marks it close-on-exec again, so it does not leak into the
//! processes this image starts.

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
