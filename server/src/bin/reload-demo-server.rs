//! `reload-demo-server`: the program the end-to-end tests and the README demo
//! roll out, and a short example of the `reload-server` library.
//!
//! It serves a few HTTP routes, over HTTP/1.1 and HTTP/2 with prior
//! knowledge (told apart by the connection's first bytes, so `curl` and
//! `h2load` both work), on an inherited listener (or its own, when run
//! alone), says READY=1 to the supervisor, and drains on SIGTERM, SIGINT or
//! SIGQUIT. Every response names the version and pid that produced it
//! (`x-version`, `x-pid`), so load tests can tell old and new processes apart.
//! Flags make it misbehave on purpose: slow to start, never ready, crashing
//! before ready, failing its preflight, slow requests.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use reload_server::http::{serve_http, shutdown_signal, DrainConfig};
use reload_server::upgrade::{SelfUpgrade, UpgradeConfig};
use reload_server::{notify, Listeners};

#[derive(Debug, Parser)]
#[command(name = "reload-demo-server", disable_version_flag = true)]
/// Demo HTTP service for the reload orchestrator.
struct Args {
    /// Print `reload-demo-server <version>` and exit: the agent's preflight check.
    #[arg(long)]
    version: bool,
    /// Make `--version` print an error and exit 1 (a failing preflight).
    #[arg(long)]
    fail_preflight: bool,
    /// Name of the inherited listener to serve on.
    #[arg(long, value_name = "NAME", default_value = "http")]
    listen_name: String,
    /// Address to bind when the listener was not inherited (running alone).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// Version to report when RELOAD_SERVICE_VERSION is not set.
    #[arg(long)]
    label: Option<String>,
    /// Wait this long before accepting and sending READY=1 (e.g. `300ms`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    startup_delay: Duration,
    /// After the startup delay, exit with CODE instead of becoming ready.
    #[arg(long, value_name = "CODE")]
    exit_before_ready: Option<u8>,
    /// Send READY=1, never accept, and exit with status 3 this long after
    /// (a release that claims readiness it does not have).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    exit_after_ready: Option<Duration>,
    /// Serve normally, then exit with status 3 this long after READY (a
    /// release that crashes after it passed its probation).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    crash_after: Option<Duration>,
    /// Serve, but never send READY=1.
    #[arg(long)]
    never_ready: bool,
    /// Exit before ready (status 4) when running as one of these versions
    /// (comma-separated). Set per host through the environment, it makes a
    /// release fail on some hosts only, as a host-specific config would.
    #[arg(
        long,
        value_name = "VERSIONS",
        env = "DEMO_FAIL_VERSIONS",
        value_delimiter = ','
    )]
    fail_versions: Vec<String>,
    /// Serve, but answer `/healthz` with 503: ready, never healthy.
    #[arg(long)]
    unhealthy: bool,
    /// Standalone self-upgrade: on SIGHUP, start the binary now at our path
    /// with our socket, wait for its READY, then drain and exit.
    #[arg(long)]
    self_upgrade: bool,
    /// With --self-upgrade: the serving pid, rewritten atomically when ready.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<std::path::PathBuf>,
    /// Wait this long before answering every request.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    request_delay: Duration,
    /// Exit status after a clean drain.
    #[arg(long, value_name = "CODE", default_value_t = 0)]
    exit_code: u8,
    /// Longest drain before the remaining connections are dropped.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10s")]
    drain_timeout: Duration,
    /// How long an idle keep-alive connection is kept once the drain told
    /// it to go.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1s")]
    idle_grace: Duration,
    /// Longest window over which open connections are told to go during
    /// the drain (`Connection: close` for HTTP/1.1, GOAWAY for HTTP/2), so
    /// clients reconnect a few at a time. Default: a twentieth of the drain timeout
    /// when another process accepts from the same socket meanwhile (an
    /// inherited listener, or --self-upgrade); else 0: on a socket nobody
    /// shares, spreading only keeps the port closed longer before a
    /// restart.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    close_spread: Option<Duration>,
    /// How much of the close-spread window each open connection takes: the
    /// window used is this times the connections open when the drain
    /// begins, at most --close-spread. Default: 100us (1ms with TLS).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    close_spread_per_connection: Option<Duration>,
}

impl Args {
    /// `shared`: another process accepts from our listening socket while
    /// we drain (see `--close-spread`).
    fn drain_config(&self, shared: bool) -> DrainConfig {
        let defaults = DrainConfig::for_timeout(self.drain_timeout);
        let spread = if shared {
            defaults.close_spread
        } else {
            Duration::ZERO
        };
        DrainConfig {
            idle_grace: self.idle_grace,
            close_spread: self.close_spread.unwrap_or(spread),
            close_spread_per_connection: self.close_spread_per_connection,
            ..defaults
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The agent sets RELOAD_SERVICE_VERSION from the signed manifest.
    let version = std::env::var("RELOAD_SERVICE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| args.label.clone())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());

    if args.version {
        if args.fail_preflight {
            eprintln!("reload-demo-server: preflight failed on purpose (--fail-preflight)");
            return ExitCode::FAILURE;
        }
        println!("reload-demo-server {version}");
        return ExitCode::SUCCESS;
    }

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in the agent's logs.
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Both edit the environment, so they run before the runtime starts threads.
    let listeners = Listeners::from_env();
    let supervised = notify::enabled();

    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                let listeners = listeners.context("reading inherited sockets")?;
                run(args, version, listeners, supervised).await
            })
        });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reload-demo-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: Args,
    version: String,
    mut listeners: Listeners,
    supervised: bool,
) -> anyhow::Result<ExitCode> {
    let pid = std::process::id();
    let inherited = listeners.names().contains(&args.listen_name);
    let listener = listeners
        .tcp(&args.listen_name, args.bind)
        .context("taking the HTTP listener")?;
    let addr = listener.local_addr()?;
    let demo = Demo::new(&version, pid, args.request_delay, args.unhealthy)?;

    // Handlers first: the agent may send the drain signal right after READY=1.
    let mut shutdown = Box::pin(shutdown_signal().context("installing signal handlers")?);
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

    // Not accepting yet: connections wait in the listening socket's queue,
    // which the old process (sharing it) keeps serving meanwhile.
    tokio::select! {
        () = tokio::time::sleep(args.startup_delay) => {}
        () = &mut shutdown => {
            let _ = notify::stopping();
            return Ok(ExitCode::from(args.exit_code));
        }
    }
    if args.fail_versions.iter().any(|v| v.trim() == version) {
        tracing::error!(%version, "exiting before ready: this version is in DEMO_FAIL_VERSIONS");
        return Ok(ExitCode::from(4));
    }
    if let Some(code) = args.exit_before_ready {
        tracing::error!(code, "exiting before ready (--exit-before-ready)");
        return Ok(ExitCode::from(code));
    }
    let readiness = if args.never_ready {
        "never ready (--never-ready)"
    } else {
        notify::ready().context("sending READY=1")?;
        if supervised {
            "READY=1 sent"
        } else {
            "no NOTIFY_SOCKET"
        }
    };
    if let Some(upgrade) = &upgrade {
        upgrade.announce_ready().context("writing the pid file")?;
    }
    if let Some(after) = args.exit_after_ready {
        tracing::error!(
            "ready, but not accepting; exiting in {}",
            humantime::format_duration(after)
        );
        tokio::time::sleep(after).await;
        return Ok(ExitCode::from(3));
    }
    if let Some(after) = args.crash_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tracing::error!("crashing on purpose (--crash-after)");
            std::process::exit(3);
        });
    }
    // A private health port of this process alone (the agent's
    // `[service.health] private`): the same answers, health included.
    if listeners.names().iter().any(|n| n == "probe") {
        let probe = listeners
            .tcp("probe", "127.0.0.1:0".parse()?)
            .context("taking the probe listener")?;
        let demo = demo.clone();
        let service = service_fn(move |request| {
            let demo = demo.clone();
            async move { Ok::<_, Infallible>(demo.respond(request).await) }
        });
        // The probe port is this process's own.
        let config = args.drain_config(false);
        tokio::spawn(serve_http(
            probe,
            service,
            std::future::pending::<()>(),
            config,
        ));
    }
    let source = if inherited { "inherited" } else { "bound" };
    tracing::info!(
        "reload-demo-server {version} pid {pid} serving on {addr} ({source} listener {:?}); {readiness}",
        args.listen_name
    );

    let service = service_fn(move |request| {
        let demo = demo.clone();
        async move { Ok::<_, Infallible>(demo.respond(request).await) }
    });
    let shutdown = async move {
        match &upgrade {
            Some(upgrade) => {
                tokio::select! {
                    () = shutdown => {}
                    pid = upgrade.wait_for_successor() => tracing::info!(successor = pid, "upgraded; draining"),
                }
            }
            None => shutdown.await,
        }
        if let Err(e) = notify::stopping() {
            tracing::warn!(error = %e, "could not send STOPPING=1");
        }
    };
    let config = args.drain_config(inherited || args.self_upgrade);
    serve_http(listener, service, shutdown, config)
        .await
        .context("serving HTTP")?;
    tracing::info!(exit_code = args.exit_code, "drained, exiting");
    Ok(ExitCode::from(args.exit_code))
}

/// The request handler's state: who we are, how slow to be.
#[derive(Clone)]
struct Demo {
    version: String,
    pid: u32,
    /// Checked once at startup, so responses cannot fail to build.
    version_header: HeaderValue,
    request_delay: Duration,
    unhealthy: bool,
}

impl Demo {
    fn new(
        version: &str,
        pid: u32,
        request_delay: Duration,
        unhealthy: bool,
    ) -> anyhow::Result<Demo> {
        let version_header = HeaderValue::from_str(version)
            .with_context(|| format!("version {version:?} cannot be sent as an HTTP header"))?;
        Ok(Demo {
            version: version.to_owned(),
            pid,
            version_header,
            request_delay,
            unhealthy,
        })
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.request_delay.is_zero() {
            tokio::time::sleep(self.request_delay).await;
        }
        let text = "text/plain; charset=utf-8";
        let (status, content_type, body) = match request.uri().path() {
            "/" => (
                StatusCode::OK,
                text,
                format!("hello from {} pid {}\n", self.version, self.pid),
            ),
            "/version" => (
                StatusCode::OK,
                "application/json",
                format!(
                    "{}\n",
                    serde_json::json!({ "version": self.version, "pid": self.pid })
                ),
            ),
            "/healthz" if self.unhealthy => (
                StatusCode::SERVICE_UNAVAILABLE,
                text,
                "unhealthy (--unhealthy)\n".to_owned(),
            ),
            "/healthz" => (StatusCode::OK, text, "ok\n".to_owned()),
            _ => (StatusCode::NOT_FOUND, text, "not found\n".to_owned()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(
            HeaderName::from_static("x-version"),
            self.version_header.clone(),
        );
        headers.insert(
            HeaderName::from_static("x-pid"),
            HeaderValue::from(self.pid),
        );
        response
    }
}
