//! [`SealedImage`]: the bytes that run are the bytes that were verified.
//!
//! Hashing a stored file by path and then executing the same path leaves a
//! window: a writer that swaps the file between the two (a rename over it,
//! or a write in place, on an inotify close event) gets its own program run
//! with the agent's blessing. So the agent never executes a store path.
//! It copies the stored file into a memfd, hashing the bytes *as they go
//! into the memfd*, compares that hash with the signed one, and seals the
//! memfd (no write, no resize, no further seals): from then on nobody,
//! root included, can change what the fd holds. The preflight, every spawn
//! and every crash restart execute that fd (`execveat(fd, "",
//! AT_EMPTY_PATH)`), as runc does with its own binary (CVE-2019-5736).
//!
//! `#!` scripts: the kernel hands the interpreter `/dev/fd/N`, which it
//! opens after the exec, so the fd must survive the exec (it is not
//! close-on-exec for them, and stays open in the script's process); it is
//! the same sealed memfd, so the interpreter reads the verified bytes too.
//!
//! Verification happens once per image: the agent keeps the sealed images
//! of the artifacts it may run (see [`super::ArtifactVerifier`]), so an
//! activation or a crash restart of a known artifact re-hashes nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use sha2::{Digest, Sha256};

/// A verified artifact in a sealed memfd.
#[derive(Debug)]
pub struct SealedImage {
    fd: OwnedFd,
    pub sha256: String,
    pub size: u64,
    /// Starts with `#!`: an interpreter opens it again after the exec.
    pub script: bool,
}

impl SealedImage {
    /// Copies `source` into a new memfd, hashing the copy; `Err` with the
    /// hash and size found if they are not `sha256` and `size` (the caller
    /// turns that into its refusal). `name` shows in /proc (`memfd:NAME`).
    pub fn copy_verified(
        source: &Path,
        name: &str,
        sha256: &str,
        size: u64,
    ) -> std::io::Result<Result<SealedImage, (String, u64)>> {
        let fd = memfd_create(
            name.replace('\0', "_").as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut input = File::open(source)?;
        let mut memfd = File::from(fd);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut copied = 0u64;
        loop {
            let n = input.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            // Hashed from the buffer that is written: what the memfd holds
            // is exactly what was hashed, whatever the source does next.
            hasher.update(&buffer[..n]);
            memfd.write_all(&buffer[..n])?;
            copied += n as u64;
            if copied > size {
                // Longer than signed: no need to read on.
                break;
            }
        }
        let found = hex::encode(hasher.finalize());
        if found != sha256 || copied != size {
            return Ok(Err((found, copied)));
        }
        let script = {
            let mut magic = [0u8; 2];
            let mut head = &memfd;
            use std::io::Seek;
            head.seek(std::io::SeekFrom::Start(0))?;
            head.read(&mut magic)? == 2 && magic == *b"#!"
        };
        let fd = OwnedFd::from(memfd);
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SEAL
                    | SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_WRITE,
            ),
        )?;
        Ok(Ok(SealedImage {
            fd,
            sha256: sha256.to_string(),
            size,
            script,
        }))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A duplicate, to hand to another process (a shim).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn a_copy_is_sealed_and_a_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        let bytes = b"#!/bin/sh\necho verified\n".to_vec();
        std::fs::write(&path, &bytes).unwrap();
        let image = SealedImage::copy_verified(&path, "test", &sha(&bytes), bytes.len() as u64)
            .unwrap()
            .unwrap();
        assert!(image.script);
        // Sealed: no write, no resize, through any fd of it.
        let mut writer = File::from(image.try_clone_fd().unwrap());
        assert!(writer.write_all(b"x").is_err());
        assert!(writer.set_len(1).is_err());
        let copy = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&image.fd())
        );
        assert_eq!(std::fs::read(copy).unwrap(), bytes);
        // Changed after the hash the caller expected: refused, with what
        // was found.
        std::fs::write(&path, b"#!/bin/sh\necho wrapper\n").unwrap();
        let (found, size) =
            SealedImage::copy_verified(&path, "test", &sha(&bytes), bytes.len() as u64)
                .unwrap()
                .unwrap_err();
        assert_ne!(found, sha(&bytes));
        assert_eq!(size, 23);
    }
}
