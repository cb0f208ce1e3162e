//! A hostile client as a process of its own, for floods larger than one
//! process's open-file limit allows: it holds `count` idle connections to
//! the agent, each from a chosen loopback source address, and watches
//! when the agent closes each. The connection-hygiene tests start several
//! of these side by side.
//!
//! ```text
//! reload-flood tcp <target> <count> <first> <per-source> <per-second> <watch-ms>
//! reload-flood tls <target> <count> <first> <per-source> <per-second> <watch-ms> <dir> <client>
//! ```
//!
//! `tcp`: connections that never start TLS; `tls`: TLS sessions (client
//! certificate `<dir>/certs/<client>.pem`, ALPN h2) that finish their
//! handshake and then send nothing. Connection `i` comes from
//! `source_address((first + i) / per-source)`. At most `per-second` are
//! opened each second: what is tested is how many idle connections the
//! agent survives, not how fast it can take new ones (a flood of connects
//! overflows any listener's accept queue whatever the program behind it
//! does; that is for SYN cookies and a firewall's rate limits). Each is
//! watched for
//! `watch-ms` after it connected. Prints a line `connected` once every
//! connect has been tried (so a test can start the next flood then), and
//! at the end one JSON line: how many opened (and in how long), how many
//! could not, how many the agent closed, how many were still open at
//! their deadline, and the slowest close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reload_tests::hostile::{
    closed_by_peer, connect_from, raise_open_file_limit, source_address, tls_client_config,
    tls_from,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connects in flight at once: more only overflow the agent's accept
/// backlog, and a dropped SYN costs a second-long retry.
const CONNECTS_IN_FLIGHT: usize = 256;
/// What a connect or TLS handshake may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one connection ended.
enum Watched {
    /// Could not connect (or finish TLS): the reason.
    Failed(String),
    /// Connected at `opened` (since the flood began); closed by the agent
    /// `closed_after` later, or still open at its deadline (`None`).
    Held {
        opened: Duration,
        closed_after: Option<Duration>,
    },
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "reload-flood tcp|tls <target> <count> <first> <per-source> <watch-ms> [<dir> <client>]";
    let arg = |i: usize| args.get(i).unwrap_or_else(|| panic!("usage: {usage}"));
    let kind = arg(0).clone();
    let target: SocketAddr = arg(1).parse().expect("target host:port");
    let count: usize = arg(2).parse().expect("count");
    let first: usize = arg(3).parse().expect("first");
    let per_source: usize = arg(4).parse().expect("per-source");
    let per_second: usize = arg(5).parse().expect("per-second");
    let watch = Duration::from_millis(arg(6).parse().expect("watch-ms"));
    let tls = match kind.as_str() {
        "tcp" => None,
        "tls" => Some(tls_client_config(
            std::path::Path::new(arg(7)),
            arg(8),
            &[b"h2"],
        )),
        other => panic!("unknown kind {other:?}: {usage}"),
    };
    // Every connection, plus the runtime's own and some slack.
    raise_open_file_limit(count as u64 + 256);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let summary = runtime.block_on(flood(
        tls, target, count, first, per_source, per_second, watch,
    ));
    println!("{summary}");
}

async fn flood(
    tls: Option<Arc<rustls::ClientConfig>>,
    target: SocketAddr,
    count: usize,
    first: usize,
    per_source: usize,
    per_second: usize,
    watch: Duration,
) -> serde_json::Value {
    let since = Instant::now();
    // Paced by the millisecond.
    let per_tick = per_second.div_ceil(1000).max(1);
    let mut ticker = tokio::time::interval(
        Duration::from_millis(1).mul_f64(per_tick as f64 * 1000.0 / per_second.max(1) as f64),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTS_IN_FLIGHT));
    let (tried, mut connects) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watched = JoinSet::new();
    for i in 0..count {
        if i % per_tick == 0 {
            ticker.tick().await;
        }
        let (slots, tls, tried) = (slots.clone(), tls.clone(), tried.clone());
        let source = source_address((first + i) / per_source);
        watched.spawn(async move {
            let slot = slots.acquire_owned().await.expect("never closed");
            let connecting = Instant::now();
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
                match &tls {
                    None => connect_from(source, target).await.map(Stream::Tcp),
                    Some(config) => tls_from(config, source, target)
                        .await
                        .map(|s| Stream::Tls(Box::new(s))),
                }
            })
            .await;
            drop(slot);
            let _ = tried.send(());
            let stream = match connected {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => return Watched::Failed(format!("{source}: {err}")),
                Err(_) => {
                    return Watched::Failed(format!(
                        "{source}: no connection within {CONNECT_TIMEOUT:?}"
                    ))
                }
            };
            // Timed from the start of the connect: the agent's clock for
            // this connection starts at its accept, within that span.
            let deadline = connecting + watch;
            let closed = match stream {
                Stream::Tcp(s) => closed_by_peer(s, deadline).await,
                Stream::Tls(s) => closed_by_peer(s, deadline).await,
            };
            Watched::Held {
                opened: connecting - since,
                closed_after: closed.ok().map(|at| at - connecting),
            }
        });
    }
    drop(tried);
    for _ in 0..count {
        connects.recv().await;
    }
    println!("connected");
    let (mut failed, mut closed, mut still_open) = (Vec::new(), 0usize, 0usize);
    let (mut last_opened, mut slowest_close) = (Duration::ZERO, Duration::ZERO);
    while let Some(done) = watched.join_next().await {
        match done.expect("a watch task panicked") {
            Watched::Failed(why) => failed.push(why),
            Watched::Held {
                opened,
                closed_after,
            } => {
                last_opened = last_opened.max(opened);
                match closed_after {
                    Some(after) => {
                        closed += 1;
                        slowest_close = slowest_close.max(after);
                    }
                    None => still_open += 1,
                }
            }
        }
    }
    failed.truncate(5);
    serde_json::json!({
        "count": count,
        "opened_within_ms": last_opened.as_millis() as u64,
        "failed": count - closed - still_open,
        "first_failures": failed,
        "closed": closed,
        "still_open": still_open,
        "slowest_close_ms": slowest_close.as_millis() as u64,
    })
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}
