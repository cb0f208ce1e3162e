//! One accepted connection: which protocol it speaks, serving it, and when
//! and how it is told to go away once the drain began.
//!
//! The protocol is known before the first request is parsed: with TLS it is
//! what ALPN chose; in clear text a connection that opens with the HTTP/2
//! connection preface (`PRI * HTTP/2.0...`, "prior knowledge" h2c, what
//! gRPC clients and `h2load` send) is HTTP/2, anything else HTTP/1.1. The
//! bytes read to decide are replayed to hyper ([`Rewind`]).
//!
//! Each connection has its own moment to go, [`DrainSlot`]: a fixed point
//! in the close-spread window, so the keep-alive clients of a draining
//! process reconnect a few at a time instead of all in the same
//! millisecond (the new process would take the whole burst of handshakes at
//! once, which is what raised p99 during reloads). Until its moment the
//! connection is served as usual; then
//!
//! - HTTP/1.1: its next response carries `Connection: close` (and hyper
//!   closes after writing it); if it stays idle for the idle grace after its
//!   moment, it is closed: a client that sends nothing loses nothing.
//! - HTTP/2: hyper's graceful shutdown, which (through the `h2` crate) is
//!   the two-step GOAWAY: GOAWAY with last stream id 2^31-1 and a PING, and
//!   only once the PING is answered the GOAWAY with the real last stream id.
//!   A stream the client opened before it saw the first GOAWAY reached us
//!   before its PING answer, so it is below the final last stream id and is
//!   served (and so is one the Rust `h2` client queued before it read the
//!   GOAWAY but writes after its PING answer: `shutdown_ping` holds that
//!   answer back a moment). The streams in flight finish, then the
//!   connection closes. A
//!   one-step GOAWAY with the current last stream id would refuse the
//!   streams already on the wire, and a client that does not retry loses
//!   them. `tests::http2_drain_is_a_two_step_goaway` watches the frames.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderValue, CONNECTION};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use super::shutdown_ping::HoldShutdownPong;
use super::Phase;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The HTTP/2 connection preface a client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The two protocols served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// When one connection is told to go, relative to the start of the drain.
#[derive(Debug, Clone, Copy)]
pub(super) struct DrainSlot {
    /// Its point in the close-spread window, as a fraction of the window
    /// (whose length is known only once the drain begins: it is sized by
    /// the connections open then).
    pub fraction: f64,
    /// How long it may stay idle after that point (HTTP/1.1 only).
    pub idle_grace: Duration,
}

impl DrainSlot {
    /// The slot of the `n`th accepted connection. Fractions follow the
    /// golden-ratio sequence (`n * 0.618...` modulo 1): whatever set of
    /// connections is open when the drain begins, their moments are
    /// spread about evenly over the window, with no random source.
    pub fn nth(n: u64, idle_grace: Duration) -> DrainSlot {
        const GOLDEN: f64 = 0.618_033_988_749_894_9;
        DrainSlot {
            fraction: (n as f64 * GOLDEN).fract(),
            idle_grace,
        }
    }

    /// Waits for the drain to begin, then until this connection's moment.
    async fn reached(&self, phase: &mut watch::Receiver<Phase>) {
        sleep_until(self.go_at(phase).await).await;
    }

    /// The instant this connection is told to go, once the drain began. A
    /// server that is gone (the sender dropped) counts as draining now.
    async fn go_at(&self, phase: &mut watch::Receiver<Phase>) -> Instant {
        let draining = phase
            .wait_for(|p| matches!(p, Phase::Draining { .. }))
            .await
            .map(|p| *p);
        match draining {
            Ok(Phase::Draining { since, spread }) => since + spread.mul_f64(self.fraction),
            Ok(Phase::Serving) | Err(_) => Instant::now(),
        }
    }

    /// Whether this connection's moment has passed.
    fn passed(&self, phase: &watch::Receiver<Phase>) -> bool {
        match *phase.borrow() {
            Phase::Serving => false,
            Phase::Draining { since, spread } => {
                Instant::now() >= since + spread.mul_f64(self.fraction)
            }
        }
    }
}

/// Reads the first bytes of a clear-text connection to tell HTTP/2 with
/// prior knowledge from HTTP/1.1. Returns the protocol and the bytes read,
/// to be replayed; `None` if the client closed before saying anything.
pub(super) async fn detect<IO: AsyncRead + Unpin>(
    io: &mut IO,
) -> io::Result<Option<(Protocol, Bytes)>> {
    let mut read = BytesMut::with_capacity(H2_PREFACE.len());
    while read.len() < H2_PREFACE.len() {
        // At most the rest of the preface: nothing of the request beyond it
        // is consumed here.
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - read.len();
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok(if read.is_empty() {
                None
            } else {
                Some((Protocol::Http1, read.freeze()))
            });
        }
        read.extend_from_slice(&chunk[..n]);
        if !H2_PREFACE.starts_with(&read) {
            return Ok(Some((Protocol::Http1, read.freeze())));
        }
    }
    Ok(Some((Protocol::Http2, read.freeze())))
}

/// Serves one connection in clear text: detects its protocol (closing it
/// if it says nothing until its idle deadline in the drain), then serves.
pub(super) async fn serve_plain<IO, S, B>(
    mut io: IO,
    service: S,
    mut phase: watch::Receiver<Phase>,
    slot: DrainSlot,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // A connection that has not sent a byte is idle: it gets the idle grace
    // after its moment, like an idle HTTP/1.1 keep-alive connection.
    let give_up = async {
        let at = slot.go_at(&mut phase.clone()).await + slot.idle_grace;
        sleep_until(at).await;
    };
    let detected = tokio::select! {
        detected = detect(&mut io) => detected,
        () = give_up => return,
    };
    match detected {
        Ok(Some((protocol, prefix))) => {
            let io = Rewind::new(prefix, io);
            serve(io, protocol, service, &mut phase, slot).await;
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "connection failed before its first request"),
    }
}

/// Serves one connection whose protocol is known, with the drain of the
/// module docs.
pub(super) async fn serve<IO, S, B>(
    io: IO,
    protocol: Protocol,
    service: S,
    phase: &mut watch::Receiver<Phase>,
    slot: DrainSlot,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    match protocol {
        Protocol::Http1 => {
            let service = CloseWhenDue {
                inner: service,
                phase: phase.clone(),
                slot,
            };
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), service);
            let mut conn = pin!(conn);
            // Not `graceful_shutdown` at the connection's moment: on an idle
            // keep-alive connection it closes the socket at once, under a
            // client that may be sending its next request. `CloseWhenDue`
            // makes the next response close the connection instead; only
            // after the idle grace is an idle connection closed (and a busy
            // one finishes its request first).
            let idle_over = async {
                slot.reached(phase).await;
                tokio::time::sleep(slot.idle_grace).await;
            };
            tokio::select! {
                result = conn.as_mut() => return report_end(result),
                () = idle_over => {}
            }
            conn.as_mut().graceful_shutdown();
            report_end(conn.await);
        }
        Protocol::Http2 => {
            // The PING answer is held back a moment (see `shutdown_ping`).
            let io = HoldShutdownPong::new(io);
            let conn = http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service);
            let mut conn = pin!(conn);
            tokio::select! {
                result = conn.as_mut() => return report_end(result),
                () = slot.reached(phase) => {}
            }
            // The two-step GOAWAY (module docs); the connection future ends
            // once the streams in flight are done.
            conn.as_mut().graceful_shutdown();
            report_end(conn.await);
        }
    }
}

fn report_end(result: hyper::Result<()>) {
    // Clients resetting or half-sending requests is normal traffic, not an
    // error of this server.
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Wraps the program's service on an HTTP/1.1 connection: once the
/// connection's moment in the drain has passed, every response carries
/// `Connection: close`, which makes hyper close the connection right after
/// writing it.
#[derive(Clone)]
struct CloseWhenDue<S> {
    inner: S,
    phase: watch::Receiver<Phase>,
    slot: DrainSlot,
}

impl<S, B> Service<Request<Incoming>> for CloseWhenDue<S>
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
        let (phase, slot) = (self.phase.clone(), self.slot);
        Box::pin(async move {
            let mut response = response.await?;
            // Decided when the response is ready, not when the request came
            // in: a request that was in flight when the moment came must
            // close its connection too.
            if slot.passed(&phase) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

/// An I/O whose first reads return bytes already read from it.
pub(super) struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Rewind { prefix, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
