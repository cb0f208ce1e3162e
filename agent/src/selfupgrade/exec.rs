//! The execve that ends an accepted upgrade, and the single rule for
//! failures on either side of it: an image that cannot be started, or that
//! started after an upgrade and failed a start-up check, hands over to the
//! previous image ([`crate::handover::exec_previous`]), which adopts the
//! same services and reports FELL_BACK. An image that is itself the
//! fallback never falls back again: it fails, loudly.

use std::os::fd::{AsFd, OwnedFd};

use super::Target;
use crate::handover::{exec_in_place, exec_previous, FdsToPass, Handover, Inherited};

/// After an upgrade, `error` before this image serves is a failed start-up
/// check: back to the previous image (returns only if that fails).
/// Otherwise (a fresh start, or this image is already the fallback) the
/// error itself.
pub fn fall_back_or(inherited: Option<Inherited>, error: anyhow::Error) -> anyhow::Error {
    match inherited {
        Some(inherited) if inherited.description.upgrade.fallback_reason.is_none() => {
            let reason = format!("{error:#}");
            tracing::error!(%reason, "the new agent image failed its start-up checks; re-executing the previous image");
            inherited.fall_back(&reason)
        }
        _ => error,
    }
}

/// Everything the main thread needs to re-execute the agent.
pub struct UpgradeExec {
    pub target: Target,
    pub previous_exe: OwnedFd,
    pub description: Handover,
    pub fds: FdsToPass,
    /// Held to the exec: no reload starts meanwhile.
    pub guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
    /// Set by SIGTERM/SIGINT after the upgrade was accepted.
    pub stop_request: crate::signals::StopRequest,
}

impl UpgradeExec {
    /// Re-executes into the new image; if execve itself fails, into the
    /// previous image with the same handover. Returns only if both fail.
    pub fn exec(mut self) -> anyhow::Error {
        // From here the signals wait for the next image's handlers (see
        // crate::signals); a stop already asked for travels with it.
        crate::signals::block();
        self.description.pending_stop = self.stop_request.is_set();
        if let Err(err) = self.fds.keep_across_exec() {
            return anyhow::Error::new(err).context("cannot pass the agent's fds across exec");
        }
        // systemd shows the unit as reloading until the new image's READY=1.
        let monotonic_usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        let _ = reload_server::notify::notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS=re-executing in place into {} {}",
            self.description.upgrade.to_version, self.description.upgrade.to_sha256
        ));
        let failure = match &self.target {
            Target::Image(fd) => exec_in_place(fd.as_fd(), &self.description),
        }
        .unwrap_err();
        tracing::error!(error = %format!("{failure:#}"), "execve of the new agent image failed; re-executing the previous image");
        exec_previous(
            self.previous_exe.as_fd(),
            &self.description,
            &self.fds,
            &format!("execve of the new image failed: {failure:#}"),
        )
    }
}
