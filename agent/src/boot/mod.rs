//! Start-up and the serve loop, as a few named steps:
//! [`bind`] (a fresh start binds, or takes from systemd, its sockets),
//! [`prepare`] (everything checked and built before the first byte is
//! served: store, services, listeners, the agent's own versions), and
//! [`run`] (serve until a stop signal or an accepted upgrade). `main.rs`
//! reads the whole environment before any thread starts and acts on the
//! [`Exit`] on the main thread.

mod bind;
mod prepare;
mod run;

use anyhow::Context;

pub use bind::{bind, Bound, SystemdSockets};

use crate::config::AgentConfig;
use crate::handover::Inherited;
use crate::main_thread::Launcher;
use crate::selfupgrade::UpgradeExec;
use crate::signals::AgentSignals;

/// How the agent starts.
pub enum Start {
    /// A fresh process, with what [`bind`] bound or was given.
    Fresh(Bound),
    /// An image after an in-place upgrade (or a fallback to the previous
    /// image): everything comes from the handover.
    Inherited(Box<Inherited>),
}

/// How [`serve`] ended; the main thread acts on it.
pub enum Exit {
    /// Shut down by a signal; every service was stopped.
    Stopped,
    /// An upgrade was accepted: re-execute in place.
    Upgrade(Box<UpgradeExec>),
    /// This image started from a handover and failed before serving; see
    /// [`crate::selfupgrade::fall_back_or`] for what happens next.
    FallBack {
        inherited: Box<Inherited>,
        error: anyhow::Error,
    },
}

/// Parses the `[tls]` certificate and key as the agent will at start
/// (`--check` runs it, so an in-place upgrade or a config reload with a
/// broken key is refused before anything changes).
pub fn check_tls(config: &AgentConfig) -> anyhow::Result<()> {
    if let Some(tls) = &config.tls {
        crate::connections::tls::acceptors(tls, !config.anonymous_health.is_empty())
            .context("the [tls] certificate or key")?;
    }
    Ok(())
}

/// Opens the store and serves the gRPC API until SIGTERM or SIGINT (then
/// stops every service) or an accepted upgrade (then returns what the main
/// thread needs to re-execute, services untouched). `signals` must have
/// been installed before anything else (see [`crate::signals`]);
/// `agent_args` are the process's arguments, read before threads started.
pub async fn serve(
    config: AgentConfig,
    start: Start,
    signals: AgentSignals,
    agent_args: Vec<String>,
    launcher: Launcher,
) -> anyhow::Result<Exit> {
    let (bound, inherited) = match start {
        Start::Fresh(bound) => (Some(bound), None),
        Start::Inherited(inherited) => (None, Some(*inherited)),
    };
    let prepared = prepare::prepare(config, bound, inherited.as_ref(), agent_args, launcher).await;
    let prepared = match (prepared, inherited) {
        (Ok(prepared), _) => prepared,
        (Err(error), Some(inherited)) => {
            return Ok(Exit::FallBack {
                inherited: Box::new(inherited),
                error,
            })
        }
        (Err(error), None) => return Err(error),
    };
    // The inherited originals close here; everything runs on duplicates.
    prepared.run(signals).await
}
