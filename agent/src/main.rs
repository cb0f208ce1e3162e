//! `reload-agent --config agent.toml`: the per-host daemon. See the library
//! docs (`lib.rs`) for the layout; this file only parses flags, sets up
//! logging and waits for a termination signal.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use reload_agent::config::AgentConfig;

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
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("reload-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = AgentConfig::load(&args.config)?;
    if args.check {
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
        return Ok(());
    }
    for addr in &config.listen {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "listening beyond loopback without TLS: anyone who reaches this address can upload signed artifacts and read the store");
        }
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listeners = reload_agent::bind(&config).await?;
        reload_agent::serve(config, listeners, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
