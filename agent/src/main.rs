//! `reload-agent --config agent.toml`: the per-host daemon. See the library
//! docs (`lib.rs`) for the layout. This file parses flags, sets up logging,
//! reads *all* of the environment (arguments, `NOTIFY_SOCKET`, `LISTEN_FDS`,
//! the handover of a previous image) before any thread starts, since
//! reading some of it also edits it and libc's environment is not
//! thread-safe, then runs the main thread's loop (see
//! `reload_agent::main_thread`) until the agent stops or re-executes.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use reload_agent::boot::{Exit, Start, SystemdSockets};
use reload_agent::config::AgentConfig;
use reload_agent::handover::{self, Inherited};
use reload_agent::main_thread::{run_jobs, Launcher};
use reload_agent::selfupgrade::fall_back_or;
use reload_agent::signals::AgentSignals;

#[derive(Parser)]
#[command(
    version,
    about = "Per-host daemon: accepts signed artifacts over gRPC, verifies and stores them",
    after_help = "Example:\n  reload-agent --config /etc/reload/agent.toml --check\n  reload-agent --config /etc/reload/agent.toml"
)]
struct Args {
    /// The agent's TOML config.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Validate the config (and the trusted keys it names), then exit.
    #[arg(long)]
    check: bool,
    /// Log line format; filter with RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // `reload-agent --shim`: the parent of one service process (see
    // reload_agent::shim), started by the agent; not for people.
    if std::env::args_os().nth(1).as_deref()
        == Some(reload_agent::shim::protocol::SHIM_ARG.as_ref())
    {
        return reload_agent::shim::main();
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => return refused_arguments(err),
    };
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("reload-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Arguments this build does not take. Right after an in-place upgrade
/// that is a failed start-up check (the release renamed a flag the agent
/// runs with): the previous image comes back. Otherwise clap's message.
fn refused_arguments(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let upgrading = std::env::var_os(handover::ENV_VAR).is_some()
        && !matches!(
            err.kind(),
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
        );
    if upgrading {
        init_logging(LogFormat::Text);
        if let Ok(Some(inherited)) = Inherited::from_env() {
            let error = anyhow::anyhow!("this agent does not take its arguments: {err}");
            eprintln!("reload-agent: {:#}", fall_back_or(Some(inherited), error));
            return ExitCode::FAILURE;
        }
    }
    err.exit()
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.check {
        let config = AgentConfig::load(&args.config)?;
        // What the agent would fail on at start, beyond the config's own
        // checks: the TLS certificate and key as rustls reads them.
        reload_agent::boot::check_tls(&config)?;
        println!(
            "{}: ok ({} trusted key(s), store {}, listen {})",
            args.config.display(),
            config.trusted_keys.ids().len(),
            config.store_dir.display(),
            config
                .listen
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        // What an agent about to upgrade into this binary looks for.
        println!("reload-agent {}", env!("CARGO_PKG_VERSION"));
        println!("handover protocol {}", handover::PROTOCOL);
        return Ok(());
    }
    // After an in-place upgrade, the previous image left its sockets,
    // services and state here. Everything from the environment is taken
    // before any thread starts.
    let inherited = Inherited::from_env().context("taking over from the previous agent image")?;
    let agent_args: Vec<String> = std::env::args().skip(1).collect();
    // Reads NOTIFY_SOCKET and removes it (services must not see it).
    let _ = reload_server::notify::enabled();
    let systemd = match inherited {
        Some(_) => None,
        None => Some(SystemdSockets::from_env()?),
    };
    let config = match AgentConfig::load(&args.config) {
        Ok(config) => config,
        // The config changed since the preflight: a failed start-up check.
        Err(err) => return Err(fall_back_or(inherited, err)),
    };
    if inherited.is_none() {
        for addr in &config.listen {
            if !addr.ip().is_loopback() && config.tls.is_none() {
                tracing::warn!(%addr, "listening beyond loopback without TLS: anyone who reaches this address can upload signed artifacts and read the store");
            }
        }
    }
    // Only the main thread takes SIGTERM, SIGINT and SIGHUP, and only once
    // the handlers are in (see reload_agent::signals): block them before
    // the runtime's threads exist, so they inherit the mask.
    reload_agent::signals::block();
    let runtime = tokio::runtime::Runtime::new()?;
    // The main thread only forks services and execs (see
    // reload_agent::main_thread); the agent itself runs on the runtime.
    let (launcher, jobs) = Launcher::new();
    let finisher = launcher.clone();
    let serving = runtime.spawn(async move {
        // Handlers first; the signals are let in once this image is
        // committed to serving (see reload_agent::signals).
        let signals = AgentSignals::install().context("installing the signal handlers")?;
        let start = match (inherited, systemd) {
            (Some(inherited), _) => Start::Inherited(Box::new(inherited)),
            (None, Some(systemd)) => {
                Start::Fresh(reload_agent::boot::bind(&config, systemd).await?)
            }
            (None, None) => unreachable!("systemd sockets are read for every fresh start"),
        };
        reload_agent::boot::serve(config, start, signals, agent_args, launcher).await
    });
    // Even a panic ends the main thread's loop (the launcher's other
    // handles would keep it waiting forever).
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let exit = serving
            .await
            .unwrap_or_else(|err| Err(anyhow::anyhow!("the agent's main task failed: {err}")));
        let _ = exit_tx.send(exit);
        finisher.finish();
    });
    run_jobs(jobs);
    let exit = exit_rx
        .recv()
        .context("the agent's runtime ended without a result")??;
    match exit {
        Exit::Stopped => Ok(()),
        Exit::Upgrade(upgrade) => {
            tracing::info!(
                to = %upgrade.description.upgrade.to_version,
                "re-executing in place"
            );
            Err(upgrade.exec())
        }
        Exit::FallBack { inherited, error } => Err(fall_back_or(Some(*inherited), error)),
    }
}
