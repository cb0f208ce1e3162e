//! `reload-greeter`: a tonic gRPC service run by the reload agent, the
//! example of `reload_server::grpc`.
//!
//! What a gRPC service needs to be reloaded without failing a call, in the
//! order `main` does it: take the listener the agent passes (or bind one
//! when run alone), install the drain signal handlers, say READY=1, and
//! serve with `reload_server::grpc::serve_grpc`, which on the drain signal
//! stops accepting and gives each client connection the two-step GOAWAY at
//! its own moment in the close-spread window, letting the calls in flight
//! (a server stream included) finish. Every answer names the version and
//! pid that produced it, so tests can tell old and new processes apart.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use reload_example_greeter::v1::greeter_server::{Greeter, GreeterServer};
use reload_example_greeter::v1::{CountReply, CountRequest, HelloReply, HelloRequest};
use reload_server::http::{shutdown_signal, DrainConfig};
use reload_server::upgrade::{SelfUpgrade, UpgradeConfig};
use reload_server::{grpc, notify, Listeners};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

#[derive(Debug, Parser)]
#[command(name = "reload-greeter", disable_version_flag = true)]
/// Example gRPC service for the reload orchestrator.
struct Args {
    /// Print `reload-greeter <version>` and exit: the agent's preflight.
    #[arg(long)]
    version: bool,
    /// Name of the inherited listener to serve on.
    #[arg(long, value_name = "NAME", default_value = "grpc")]
    listen_name: String,
    /// Address to bind when the listener was not inherited (running alone).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    bind: SocketAddr,
    /// Longest drain before the remaining connections are dropped.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10s")]
    drain_timeout: Duration,
    /// Longest window over which client connections get their GOAWAY (100us
    /// of it per open connection). Default: a twentieth of the drain
    /// timeout on an inherited listener or with --self-upgrade, else 0.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    close_spread: Option<Duration>,
    /// Standalone self-upgrade (no agent): on SIGHUP, start the binary now
    /// at our path with our socket, wait for its READY, then drain.
    #[arg(long)]
    self_upgrade: bool,
    /// With --self-upgrade: the serving pid, rewritten atomically when ready.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<std::path::PathBuf>,
}

/// The service: who we are.
struct Service {
    version: String,
    pid: u32,
}

type CountStream = Pin<Box<dyn Stream<Item = Result<CountReply, Status>> + Send>>;

#[tonic::async_trait]
impl Greeter for Service {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            message: format!("hello {}", request.into_inner().name),
            version: self.version.clone(),
            pid: self.pid,
        }))
    }

    type CountToStream = CountStream;

    async fn count_to(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<CountStream>, Status> {
        let CountRequest { count, interval_ms } = request.into_inner();
        let (version, pid) = (self.version.clone(), self.pid);
        let interval = Duration::from_millis(interval_ms.into());
        let stream = async_stream(count, interval, version, pid);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `count` replies, one every `interval`, from a task feeding a channel.
fn async_stream(
    count: u32,
    interval: Duration,
    version: String,
    pid: u32,
) -> impl Stream<Item = Result<CountReply, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for n in 1..=count {
            if n > 1 {
                tokio::time::sleep(interval).await;
            }
            let reply = CountReply {
                n,
                version: version.clone(),
                pid,
            };
            if tx.send(Ok(reply)).await.is_err() {
                return; // the client went away
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The agent sets RELOAD_SERVICE_VERSION from the signed manifest.
    let version = std::env::var("RELOAD_SERVICE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
    if args.version {
        println!("reload-greeter {version}");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // Edits the environment: before the runtime starts its threads.
    let listeners = Listeners::from_env();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                run(
                    args,
                    version,
                    listeners.context("reading inherited sockets")?,
                )
                .await
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reload-greeter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, version: String, mut listeners: Listeners) -> anyhow::Result<()> {
    let pid = std::process::id();
    let inherited = listeners.names().contains(&args.listen_name);
    let listener = listeners
        .tcp(&args.listen_name, args.bind)
        .context("taking the gRPC listener")?;
    let addr = listener.local_addr()?;
    // Handlers before READY=1: the agent may send the drain signal at once.
    let signal = shutdown_signal().context("installing signal handlers")?;
    let upgrade = if args.self_upgrade {
        let config = UpgradeConfig {
            drain_timeout: args.drain_timeout,
            pid_file: args.pid_file.clone(),
            ..UpgradeConfig::default()
        };
        let socket: &dyn std::os::fd::AsFd = &listener;
        Some(
            SelfUpgrade::enable(&[(args.listen_name.as_str(), socket)], config)
                .context("enabling self-upgrade")?,
        )
    } else {
        None
    };
    notify::ready().context("sending READY=1")?;
    if let Some(upgrade) = &upgrade {
        upgrade.announce_ready().context("writing the pid file")?;
    }
    // Drain on the signal, or once a self-upgrade's new process is ready.
    let shutdown = async move {
        match &upgrade {
            Some(upgrade) => tokio::select! {
                () = signal => {}
                pid = upgrade.wait_for_successor() => tracing::info!(successor = pid, "upgraded; draining"),
            },
            None => signal.await,
        }
        let _ = notify::stopping();
    };
    tracing::info!("reload-greeter {version} pid {pid} serving gRPC on {addr}");

    let routes = tonic::service::Routes::new(GreeterServer::new(Service { version, pid }));
    // Spread the GOAWAYs only when another process accepts from the same
    // socket meanwhile; on a socket nobody shares, spreading only keeps
    // the port closed longer before a restart.
    let defaults = DrainConfig::for_timeout(args.drain_timeout);
    let spread = if inherited || args.self_upgrade {
        defaults.close_spread
    } else {
        Duration::ZERO
    };
    let config = DrainConfig {
        close_spread: args.close_spread.unwrap_or(spread),
        ..defaults
    };
    grpc::serve_grpc(listener, routes, shutdown, config)
        .await
        .context("serving gRPC")?;
    tracing::info!("drained, exiting");
    Ok(())
}
