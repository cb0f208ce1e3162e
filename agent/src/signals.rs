//! The agent's signals across an in-place exec.
//!
//! execve resets every caught signal to its default action, and the default
//! of SIGTERM, SIGINT and SIGHUP is to terminate: a `systemctl reload` that
//! lands while the new image starts up would kill the agent, and with it
//! (PDEATHSIG) every service. So these signals are blocked on every thread
//! but the main one: `main` blocks them before the runtime's threads exist
//! (threads inherit the mask), and unblocks them on the main thread alone
//! once the handlers are installed and the image is committed to serving
//! (a start-up that fails and falls back leaves them pending for the
//! previous image). The kernel then delivers them to the
//! main thread only; when an upgrade is accepted the main thread blocks
//! them too, and from then on whatever arrives stays pending, across the
//! exec (the mask and pending signals survive it), until the new image has
//! its handlers and unblocks. No window in which a signal kills the agent
//! or is lost.
//!
//! A SIGTERM or SIGINT the old image took just before that is remembered
//! ([`StopRequest`]) and passed on, so the new image stops right after it
//! starts. Children get a clean mask: std resets it in the child before
//! exec.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, SignalKind};

/// The signals the agent acts on.
fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Blocks the handled signals on the calling thread: the main thread,
/// before the runtime starts and again just before execve.
pub fn block() {
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None);
}

/// Unblocks them on the calling thread: the main thread, once the handlers
/// are installed and the agent serves. The runtime's threads keep them
/// blocked.
pub fn unblock() {
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled()), None);
}

/// The agent's signal streams, installed before anything else starts.
pub struct AgentSignals {
    pub stop: StopSignals,
    pub hup: tokio::signal::unix::Signal,
}

/// SIGTERM and SIGINT.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl AgentSignals {
    /// Installs the handlers. Must run inside the runtime.
    pub fn install() -> std::io::Result<AgentSignals> {
        Ok(AgentSignals {
            stop: StopSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            },
            hup: signal(SignalKind::hangup())?,
        })
    }
}

impl StopSignals {
    /// Waits for SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

/// Set when a stop was asked for while an upgrade was under way.
#[derive(Clone, Default)]
pub struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
