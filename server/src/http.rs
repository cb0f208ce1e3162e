//! Drain-aware HTTP/1.1 serving on hyper, and the signal that starts a drain.
//!
//! [`serve_http`] accepts and serves connections until its `shutdown` future
//! completes, then drains without dropping a request:
//!
//! 1. The listener is dropped at once. Under the reload agent the listening
//!    socket is shared with the agent and the new process (same kernel queue),
//!    so closing our fd does not close the socket: whatever is queued, or
//!    connects later, is accepted by the new process.
//! 2. Each open connection answers its *next* request with
//!    `Connection: close`, and hyper closes it after writing that response. A
//!    request that is in flight, or arrives during the drain, is answered.
//!    Closing idle keep-alive connections right away would lose requests: a
//!    client may be sending its next request at that instant and gets a reset
//!    instead. That race is how nginx loses about one request per keep-alive
//!    connection per reload to a client that does not retry (measured with
//!    wrk and hey, 50 connections, 10 reloads).
//! 3. A connection that stays idle for [`DrainConfig::idle_grace`] after the
//!    drain began is closed (a client that sends nothing has nothing to lose).
//! 4. After [`DrainConfig::drain_timeout`] the remaining connections are
//!    dropped. `serve_http` returns as soon as every connection is done.
//!
//! [`shutdown_signal`] is the usual `shutdown` future: SIGTERM, SIGINT or
//! SIGQUIT (nginx-like programs drain on SIGQUIT, so the agent may send it).

#![forbid(unsafe_code)]

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};

type BoxError = Box<dyn StdError + Send + Sync>;

/// How long a drain may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    /// From the start of the drain until the remaining connections are
    /// dropped. Keep it below the supervisor's kill timeout, so the program
    /// exits on its own terms.
    pub drain_timeout: Duration,
    /// How long a connection may stay idle after the drain began before it is
    /// closed. Long enough for a client in the middle of sending its next
    /// request to get it through (and get `Connection: close` back); capped
    /// by what is left of `drain_timeout`.
    pub idle_grace: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            drain_timeout: Duration::from_secs(30),
            idle_grace: Duration::from_secs(1),
        }
    }
}

/// Where the server is in its life; every connection watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving with keep-alive.
    Serving,
    /// Listener gone; every response carries `Connection: close`.
    Draining,
    /// `idle_grace` is over: connections close as soon as they are idle.
    CloseIdle,
}

/// Serve HTTP/1.1 on `listener` until `shutdown` completes, then drain (see
/// the module docs for the exact semantics).
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
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    // Connection tasks live in the set, so dropping `serve_http`'s future
    // (or the drain timeout) aborts them all.
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let mut failure = None;

    loop {
        tokio::select! {
            // Checked first: once shutdown is asked for, accept nothing more.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let service = DrainAware { inner: service.clone(), phase: phase_rx.clone() };
                    connections.spawn(serve_connection(stream, service, phase_rx.clone()));
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
    // (2) From now on every response says `Connection: close`.
    phase_tx.send_replace(Phase::Draining);
    let started = Instant::now();
    tracing::info!(
        open_connections = connections.len(),
        drain_timeout = ?config.drain_timeout,
        idle_grace = ?config.idle_grace,
        "draining",
    );

    let hard_deadline = deadline_after(started, config.drain_timeout);
    let idle_deadline = deadline_after(started, config.idle_grace.min(config.drain_timeout));
    let mut idle_closed = false;
    loop {
        tokio::select! {
            joined = connections.join_next() => match joined {
                Some(joined) => report_join(joined),
                None => {
                    tracing::info!(took = ?started.elapsed(), "drained: all connections closed");
                    break;
                }
            },
            // (3) Idle connections have had their grace period.
            () = sleep_until(idle_deadline), if !idle_closed => {
                idle_closed = true;
                phase_tx.send_replace(Phase::CloseIdle);
            }
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

/// Serve one connection until it closes, or close it once it is idle after
/// the idle grace.
async fn serve_connection<S, B>(
    stream: TcpStream,
    service: DrainAware<S>,
    mut phase: watch::Receiver<Phase>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Small responses must not wait for Nagle's algorithm.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = pin!(conn);

    // Not `graceful_shutdown` at the start of the drain: on an idle
    // keep-alive connection it closes the socket at once, under a client that
    // may be sending its next request. `DrainAware` makes the next response
    // close the connection instead; only after the grace period is an idle
    // connection closed (and a busy one finishes its request first).
    let close_when_idle = async {
        // An error means the server is gone; closing is right then too.
        let _ = phase.wait_for(|p| *p == Phase::CloseIdle).await;
    };
    tokio::select! {
        result = conn.as_mut() => return report_connection_end(result),
        () = close_when_idle => {}
    }
    conn.as_mut().graceful_shutdown();
    report_connection_end(conn.await);
}

fn report_connection_end(result: hyper::Result<()>) {
    // Clients resetting or half-sending requests is normal traffic, not an
    // error of this server.
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
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

/// Wraps the program's service: once the drain has begun, every response
/// carries `Connection: close`, which makes hyper close the connection right
/// after writing it.
#[derive(Clone)]
struct DrainAware<S> {
    inner: S,
    phase: watch::Receiver<Phase>,
}

impl<S, B> Service<Request<Incoming>> for DrainAware<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let response = self.inner.call(request);
        let phase = self.phase.clone();
        Box::pin(async move {
            let mut response = response.await?;
            // Decided when the response is ready, not when the request came
            // in: a request that was in flight when the drain began must
            // close its connection too.
            if *phase.borrow() != Phase::Serving {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
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
