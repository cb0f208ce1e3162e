//! Drain-aware HTTP/1.1 and HTTP/2 serving on hyper, and the signal that
//! starts a drain.
//!
//! [`serve_http`] accepts connections and serves each in the protocol it
//! speaks (HTTP/1.1, or HTTP/2 with prior knowledge, "h2c", which is what
//! gRPC clients and `h2load` send; [`serve_https`] does the same over TLS,
//! choosing by ALPN). When its `shutdown` future completes it drains
//! without dropping a request:
//!
//! 1. The listener is dropped at once. Under the reload agent the listening
//!    socket is shared with the agent and the new process (same kernel queue),
//!    so closing our fd does not close the socket: whatever is queued, or
//!    connects later, is accepted by the new process.
//! 2. Each open connection is told to go at its own moment within a
//!    window after the drain began, not all at once: told together,
//!    thousands of keep-alive clients reconnect in the same millisecond and
//!    the new process takes the whole burst of handshakes at once
//!    (HAProxy's `close-spread-time` spreads its closes for the same
//!    reason). The window is sized by the connections open when the drain
//!    begins ([`DrainConfig::close_spread_per_connection`] each, at most
//!    [`DrainConfig::close_spread`]): a window longer than the burst needs
//!    keeps two processes serving side by side, which costs more than a
//!    small burst.
//! 3. How a connection is told depends on its protocol (see
//!    `http/connection.rs` for the details):
//!    - HTTP/1.1: its *next* response carries `Connection: close`, and hyper
//!      closes it after writing that response. A request that is in flight,
//!      or arrives during the drain, is answered. Closing idle keep-alive
//!      connections right away would lose requests: a client may be sending
//!      its next request at that instant and gets a reset instead. That race
//!      is how nginx loses about one request per keep-alive connection per
//!      reload to a client that does not retry (measured with wrk and hey,
//!      50 connections, 10 reloads). A connection that stays idle for
//!      [`DrainConfig::idle_grace`] after its moment is closed (a client
//!      that sends nothing has nothing to lose).
//!    - HTTP/2: the two-step GOAWAY (last stream id 2^31-1 and a PING, then
//!      once the PING is answered the real last stream id), as gRPC core,
//!      HAProxy, Envoy and Jetty do; the streams in flight finish, then the
//!      connection closes. One client keeps one connection for many
//!      streams, so closing it, or a one-step GOAWAY, loses every stream on
//!      the wire.
//! 4. After [`DrainConfig::drain_timeout`] the remaining connections are
//!    dropped. `serve_http` returns as soon as every connection is done.
//!
//! [`shutdown_signal`] is the usual `shutdown` future: SIGTERM, SIGINT or
//! SIGQUIT (nginx-like programs drain on SIGQUIT, so the agent may send it).

#![forbid(unsafe_code)]

mod connection;
mod shutdown_ping;

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};

use connection::{DrainSlot, Protocol};

type BoxError = Box<dyn StdError + Send + Sync>;

/// The default close-spread window is this fraction of the drain timeout.
/// Small on purpose: the drain lasts at least the window, and the agent
/// starts the next reload of a service only once the previous drain ended.
const DEFAULT_SPREAD_DIVISOR: u32 = 20;

/// The default share of the window each open clear-text connection takes
/// (see [`DrainConfig::close_spread_per_connection`]): the new process
/// takes at most about 10,000 reconnections a second, each an accept and a
/// first request, a fraction of a core. 50 connections are told within
/// 5 ms; 10,000 over 1 s. Measured (BENCHMARKS.md §3b): on 2 cores, a
/// fixed 500 ms window for 50 connections raised p99 more than telling
/// them all at once, because the old and the new process then serve side
/// by side for the whole window.
pub const CLEAR_TEXT_SPREAD_PER_CONNECTION: Duration = Duration::from_micros(100);

/// The same over TLS: a new TLS connection also costs the new process a
/// handshake (a key exchange and a signature, many times an accept), so
/// the reconnections come ten times slower. Not measured here; a server
/// that knows its handshake cost sets its own share.
pub const TLS_SPREAD_PER_CONNECTION: Duration = Duration::from_millis(1);

/// How long a drain may take, and how its closes are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    /// From the start of the drain until the remaining connections are
    /// dropped. Keep it below the supervisor's kill timeout, so the program
    /// exits on its own terms.
    pub drain_timeout: Duration,
    /// How long an HTTP/1.1 connection may stay idle after its moment to go
    /// before it is closed. Long enough for a client in the middle of
    /// sending its next request to get it through (and get `Connection:
    /// close` back); bounded by `drain_timeout`.
    pub idle_grace: Duration,
    /// The longest window over which the open connections are told to go,
    /// one at a time (`Connection: close` on HTTP/1.1, GOAWAY on HTTP/2).
    /// The window used is `close_spread_per_connection` times the
    /// connections open when the drain begins, at most this. Zero tells
    /// them all at once. The drain takes at least the window when
    /// connections are open; keep it well below `drain_timeout`.
    pub close_spread: Duration,
    /// How much of the window each open connection takes; `None`: the
    /// protocol's default, [`CLEAR_TEXT_SPREAD_PER_CONNECTION`] for
    /// [`serve_http`] and [`TLS_SPREAD_PER_CONNECTION`] for
    /// [`serve_https`]. A window sized by the count keeps a few connections
    /// from holding two processes side by side for the whole window, and
    /// many from reconnecting in one burst.
    pub close_spread_per_connection: Option<Duration>,
}

impl DrainConfig {
    /// The defaults for a drain of `drain_timeout`: an idle grace of 1 s
    /// (at most the timeout) and a close spread of at most a twentieth of
    /// the timeout, sized by the open connections (the protocol's default
    /// share each).
    pub fn for_timeout(drain_timeout: Duration) -> Self {
        DrainConfig {
            drain_timeout,
            idle_grace: Duration::from_secs(1).min(drain_timeout),
            close_spread: drain_timeout / DEFAULT_SPREAD_DIVISOR,
            close_spread_per_connection: None,
        }
    }

    /// The window for `open` connections: `open` shares, at most
    /// `close_spread` and `drain_timeout`.
    fn spread_for(&self, open: usize, default_share: Duration) -> Duration {
        let share = self.close_spread_per_connection.unwrap_or(default_share);
        let sized = u32::try_from(open)
            .ok()
            .and_then(|open| share.checked_mul(open))
            .unwrap_or(Duration::MAX);
        sized.min(self.close_spread).min(self.drain_timeout)
    }
}

impl Default for DrainConfig {
    /// A 30 s drain, 1 s idle grace, closes spread over at most 1.5 s.
    fn default() -> Self {
        DrainConfig::for_timeout(Duration::from_secs(30))
    }
}

/// Where the server is in its life; every connection watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving with keep-alive.
    Serving,
    /// Listener gone since `since`; each connection goes at its moment
    /// in the `spread` after it.
    Draining { since: Instant, spread: Duration },
}

/// Serve HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until
/// `shutdown` completes, then drain (see the module docs for the exact
/// semantics).
///
/// Returns `Ok(())` once every connection is done or dropped, or the
/// listener's error if accepting failed for good (after draining the
/// connections that were open).
pub async fn serve_http<S, B>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    config: DrainConfig,
) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let share = CLEAR_TEXT_SPREAD_PER_CONNECTION;
    serve_with(
        listener,
        shutdown,
        config,
        share,
        move |stream, phase, slot| connection::serve_plain(stream, service.clone(), phase, slot),
    )
    .await
}

/// Like [`serve_http`], over TLS: each connection's handshake (bounded by
/// `handshake_timeout`) runs in its own task, and the protocol is the one
/// ALPN chose (`h2`, else HTTP/1.1). Offer both in the config's
/// `alpn_protocols` (`[b"h2", b"http/1.1"]`) for clients to pick HTTP/2.
pub async fn serve_https<S, B>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    service: S,
    shutdown: impl Future<Output = ()>,
    config: DrainConfig,
) -> io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_with(
        listener,
        shutdown,
        config,
        TLS_SPREAD_PER_CONNECTION,
        move |stream, mut phase, slot| {
            let (acceptor, service) = (acceptor.clone(), service.clone());
            async move {
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!("TLS handshake timed out"),
                    };
                let protocol = match stream.get_ref().1.alpn_protocol() {
                    Some(b"h2") => Protocol::Http2,
                    _ => Protocol::Http1,
                };
                connection::serve(stream, protocol, service, &mut phase, slot).await;
            }
        },
    )
    .await
}

/// The accept loop and the drain, for connections served by `serve_one`.
async fn serve_with<F, Fut>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    config: DrainConfig,
    default_share: Duration,
    serve_one: F,
) -> io::Result<()>
where
    F: Fn(TcpStream, watch::Receiver<Phase>, DrainSlot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    // Connection tasks live in the set, so dropping `serve_http`'s future
    // (or the drain timeout) aborts them all.
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let mut failure = None;
    let mut accepted_count = 0u64;

    loop {
        tokio::select! {
            // Checked first: once shutdown is asked for, accept nothing more.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Small responses must not wait for Nagle's algorithm.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    let slot = DrainSlot::nth(accepted_count, config.idle_grace);
                    accepted_count += 1;
                    connections.spawn(serve_one(stream, phase_rx.clone(), slot));
                    tracing::trace!(%peer, "accepted");
                }
                Err(e) => match classify_accept_error(&e) {
                    AcceptError::Connection => {
                        tracing::debug!(error = %e, "accept: connection failed before it was accepted");
                    }
                    AcceptError::Resources => {
                        // Out of fds or memory: retrying at once would spin.
                        // Wait a little, but keep honouring shutdown.
                        tracing::warn!(error = %e, "accept failed, retrying in 100ms");
                        tokio::select! {
                            () = sleep(Duration::from_millis(100)) => {}
                            () = &mut shutdown => break,
                        }
                    }
                    AcceptError::Fatal => {
                        tracing::error!(error = %e, "the listener is broken: draining and giving up");
                        failure = Some(e);
                        break;
                    }
                },
            },
            // Reap finished connections so the set does not grow forever.
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                report_join(joined);
            }
        }
    }

    // (1) Close our fd of the listening socket before anything else, so this
    // process takes no new connection; the socket itself lives on in the
    // agent and the new process. Nothing between `break` and here awaits.
    drop(listener);
    // (2) From now on each connection goes at its moment.
    let started = Instant::now();
    // The set may still hold a few connections that just ended (not yet
    // reaped): the window can come out a share or two long, never short.
    let spread = config.spread_for(connections.len(), default_share);
    phase_tx.send_replace(Phase::Draining {
        since: started,
        spread,
    });
    tracing::info!(
        open_connections = connections.len(),
        drain_timeout = ?config.drain_timeout,
        idle_grace = ?config.idle_grace,
        close_spread = ?spread,
        "draining",
    );

    let hard_deadline = deadline_after(started, config.drain_timeout);
    loop {
        tokio::select! {
            joined = connections.join_next() => match joined {
                Some(joined) => report_join(joined),
                None => {
                    tracing::info!(took = ?started.elapsed(), "drained: all connections closed");
                    break;
                }
            },
            // (4) Out of time: drop whatever is left.
            () = sleep_until(hard_deadline) => {
                tracing::warn!(
                    dropped_connections = connections.len(),
                    "drain timeout reached: dropping the remaining connections",
                );
                connections.shutdown().await;
                break;
            }
        }
    }

    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `start + after`, or a time far enough away when that overflows.
fn deadline_after(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn report_join(joined: Result<(), JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            tracing::error!(error = %e, "a connection task panicked");
        }
    }
}

enum AcceptError {
    /// That one connection failed (reset before accept, …): carry on.
    Connection,
    /// The process is out of something (fds, memory): retry after a pause.
    Resources,
    /// The listener itself is unusable: stop accepting.
    Fatal,
}

fn classify_accept_error(e: &io::Error) -> AcceptError {
    use nix::libc;
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Resources,
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => AcceptError::Fatal,
        // accept(2): Linux reports pending network errors of the new
        // connection (ECONNABORTED, EPROTO, ENETDOWN, EHOSTUNREACH, …) from
        // accept itself; they concern that connection only.
        _ => AcceptError::Connection,
    }
}

/// A `shutdown` future for [`serve_http`] that completes on SIGTERM, SIGINT
/// or SIGQUIT.
///
/// The handlers are installed when this is *called*, not when the future is
/// first polled: call it before announcing readiness, since the agent may send
/// the drain signal the moment it sees `READY=1`, and a signal without a
/// handler kills the process instead of draining it. Must be called inside a
/// Tokio runtime.
pub fn shutdown_signal() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    shutdown_on(&[
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::quit(),
    ])
}

/// Like [`shutdown_signal`], for the given signals. With none, the future
/// never completes.
pub fn shutdown_on(kinds: &[SignalKind]) -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut streams = kinds
        .iter()
        .map(|&kind| Ok((kind, signal(kind)?)))
        .collect::<io::Result<Vec<_>>>()?;
    Ok(async move {
        let received = std::future::poll_fn(|cx| {
            for (kind, stream) in &mut streams {
                // `Ready(None)` means the signal driver is gone (the runtime
                // is shutting down): stopping is right then as well.
                if stream.poll_recv(cx).is_ready() {
                    return Poll::Ready(*kind);
                }
            }
            Poll::Pending
        })
        .await;
        let raw = received.as_raw_value();
        match nix::sys::signal::Signal::try_from(raw) {
            Ok(name) => tracing::info!(signal = %name, "drain signal received"),
            Err(_) => tracing::info!(signal = raw, "drain signal received"),
        }
    })
}

#[cfg(test)]
mod tests;
