//! The gRPC port, from accept to the stream tonic serves.
//!
//! tonic's own TLS accept has no deadline and no cap (it waits for every
//! handshake, in a set that grows with each connection), so the agent does
//! the part before HTTP/2 itself and hands tonic only connections that
//! finished it:
//!
//! 1. accept, and take a slot in the port's [`ConnectionBudget`] (or close
//!    the connection at once);
//! 2. in a task of its own, under one deadline (`handshake_timeout` from
//!    accept): the TLS handshake with the same rustls config tonic would
//!    build (mutual TLS, ALPN h2), then the 24-byte HTTP/2 client preface,
//!    read and checked here (a peer that finishes TLS and sends nothing is
//!    closed like one that never starts it);
//! 3. the result, a [`GrpcConnection`], goes to tonic through a channel.
//!    It replays the preface it consumed, closes itself once no call has
//!    been open for `idle_timeout` (and nothing has come for
//!    [`READ_GRACE`]), and gives its budget slot back when tonic drops it.
//!
//! Two things must still reach the handlers: the client certificate
//! (`Request::peer_certs`, read by `api::auth`) and the peer address
//! (`Request::remote_addr`). tonic puts the [`Connected::ConnectInfo`] of
//! the stream it serves on each request; a [`GrpcConnection`]'s is
//! [`GrpcConnectInfo`], which carries tonic's own record of the inner
//! stream (`TlsConnectInfo<TcpConnectInfo>`, or `TcpConnectInfo` in
//! insecure mode) and the connection's count of open calls. [`CountCalls`],
//! the service tonic runs, puts tonic's record back on the request where
//! `peer_certs` and `remote_addr` look for it, and counts each call from
//! its start until its response body is dropped (finished or reset).

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::Connected;

use super::{Admission, CloseReason, ConnectionBudget};
use crate::config::ConnectionLimits;

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An idle connection is closed by ending its byte stream, not with a
/// GOAWAY (tonic keeps hyper's graceful shutdown to itself), so a request
/// that arrived just as the idle timeout ran out would be lost with it.
/// Hence bytes received are always handed to hyper first, and a connection
/// counts as idle only once nothing has come for this long either: by then
/// a call those bytes opened is counted. (A client that sends something,
/// pings included, at least this often keeps its connection; it has a
/// certificate, and its connections count against its per-peer cap.)
const READ_GRACE: Duration = Duration::from_millis(500);

/// Accept errors (EMFILE and friends) are retried after this, instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How an accepted TCP connection becomes the byte stream HTTP/2 runs on.
pub trait Handshake: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// `[tls]`: mutual TLS with the agent's CA.
pub struct MutualTls(pub tokio_rustls::TlsAcceptor);

impl Handshake for MutualTls {
    type Stream = tokio_rustls::server::TlsStream<TcpStream>;
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        self.0.accept(tcp)
    }
}

/// `insecure = true`: plaintext on loopback.
pub struct Plaintext;

impl Handshake for Plaintext {
    type Stream = TcpStream;
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        std::future::ready(Ok(tcp))
    }
}

/// The gRPC port: its handshake, its budget and its deadlines.
pub struct GrpcPort<H> {
    handshake: H,
    budget: Arc<ConnectionBudget>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

impl<H: Handshake> GrpcPort<H> {
    pub fn new(
        handshake: H,
        budget: Arc<ConnectionBudget>,
        limits: &ConnectionLimits,
    ) -> Arc<GrpcPort<H>> {
        Arc::new(GrpcPort {
            handshake,
            budget,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
        })
    }

    /// Accepts on `listener` and sends every connection that finished its
    /// handshake to `established`, until `stop` completes (handshakes in
    /// progress are dropped then; the listener too, the caller keeps a
    /// duplicate for a handover).
    pub async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        established: tokio::sync::mpsc::Sender<GrpcConnection<H::Stream>>,
        stop: impl Future<Output = ()>,
    ) {
        let addr = listener.local_addr().ok();
        let mut handshakes = JoinSet::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        // Over a cap: dropped here, closed at once.
                        let Some(admission) = self.budget.admit(peer) else { continue };
                        let port = self.clone();
                        let established = established.clone();
                        handshakes.spawn(async move {
                            if let Some(connection) = port.establish(tcp, peer, admission).await {
                                let _ = established.send(connection).await;
                            }
                        });
                    }
                    Err(err) => {
                        tracing::warn!(?addr, error = %err, "gRPC accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                // Reap finished handshakes so the set stays as small as
                // the handshakes in progress.
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                () = &mut stop => return,
            }
        }
    }

    /// TLS (or nothing, in insecure mode) and the HTTP/2 preface, within
    /// the handshake timeout and unless the budget evicts the connection
    /// meanwhile.
    async fn establish(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        mut admission: Admission,
    ) -> Option<GrpcConnection<H::Stream>> {
        // gRPC is many small frames; Nagle's delay would hold each answer
        // for the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut stream = self.handshake.handshake(tcp).await?;
            let mut preface = [0; PREFACE.len()];
            stream.read_exact(&mut preface).await?;
            if preface != *PREFACE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the client did not start HTTP/2 (gRPC needs it)",
                ));
            }
            Ok(stream)
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.handshake_timeout, handshake) => outcome,
            () = admission.evicted() => {
                tracing::debug!(%peer, "gRPC: handshake cut short, the port is full");
                admission.closing(CloseReason::Evicted);
                return None;
            }
        };
        match outcome {
            Ok(Ok(stream)) => {
                admission.established();
                Some(GrpcConnection::new(stream, admission, self.idle_timeout))
            }
            Ok(Err(err)) => {
                tracing::debug!(%peer, error = %err, "gRPC: handshake failed");
                admission.closing(CloseReason::HandshakeFailed);
                None
            }
            Err(_) => {
                tracing::debug!(%peer, timeout = ?self.handshake_timeout, "gRPC: no TLS handshake and HTTP/2 preface within the handshake timeout");
                admission.closing(CloseReason::HandshakeTimeout);
                None
            }
        }
    }
}

/// The calls open on one connection, and since when none has been.
#[derive(Debug)]
pub struct CallCount {
    state: Mutex<(usize, Instant)>,
}

impl CallCount {
    fn new() -> Arc<CallCount> {
        Arc::new(CallCount {
            state: Mutex::new((0, Instant::now())),
        })
    }

    fn opened(self: &Arc<Self>) -> OpenCall {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        OpenCall(self.clone())
    }

    /// When the last call ended; `None` while one is open.
    fn idle_since(&self) -> Option<Instant> {
        let (open, since) = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        (open == 0).then_some(since)
    }
}

/// One call in progress; ends when dropped.
struct OpenCall(Arc<CallCount>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            state.1 = Instant::now();
        }
    }
}

/// A gRPC connection past its handshake, as tonic serves it.
pub struct GrpcConnection<S> {
    stream: S,
    /// How much of [`PREFACE`] (read by the handshake) is still to be
    /// handed to tonic.
    preface_left: usize,
    calls: Arc<CallCount>,
    idle_timeout: Duration,
    /// When to look at `calls` again.
    idle_check: Pin<Box<Sleep>>,
    /// When bytes last came from the peer.
    last_read: Instant,
    /// Closed for idleness: every read from now on is the end of stream.
    closed_idle: bool,
    admission: Admission,
}

impl<S> GrpcConnection<S> {
    fn new(stream: S, admission: Admission, idle_timeout: Duration) -> GrpcConnection<S> {
        GrpcConnection {
            stream,
            preface_left: PREFACE.len(),
            calls: CallCount::new(),
            idle_timeout,
            idle_check: Box::pin(tokio::time::sleep(idle_timeout)),
            last_read: Instant::now(),
            closed_idle: false,
            admission,
        }
    }

    /// Whether the connection is idle: no call open for the idle timeout,
    /// and nothing received for [`READ_GRACE`]. Looked at only when the
    /// socket has nothing to read: HTTP/2 always has a read pending, so the
    /// timer's wake-up reaches here, and an end of stream makes hyper close
    /// the connection (and drop this, closing the socket).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let next = match self.calls.idle_since() {
                Some(since) => {
                    let idle_at = (since + self.idle_timeout).max(self.last_read + READ_GRACE);
                    if now >= idle_at {
                        return true;
                    }
                    idle_at
                }
                None => now + self.idle_timeout,
            };
            self.idle_check.as_mut().reset(next);
        }
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GrpcConnection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.preface_left > 0 && buf.remaining() > 0 {
            let start = PREFACE.len() - this.preface_left;
            let n = this.preface_left.min(buf.remaining());
            buf.put_slice(&PREFACE[start..start + n]);
            this.preface_left -= n;
            return Poll::Ready(Ok(()));
        }
        if this.closed_idle {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.last_read = Instant::now();
                read
            }
            // The peer's end of stream, or an error: hyper closes.
            Poll::Ready(_) => read,
            Poll::Pending if this.idle_expired(cx) => {
                tracing::debug!("gRPC: closing a connection with no call for the idle timeout");
                this.admission.closing(CloseReason::Idle);
                this.closed_idle = true;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GrpcConnection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// What tonic puts on each request of a [`GrpcConnection`]: tonic's record
/// of the inner stream (`T`), and the connection's open calls.
#[derive(Clone, Debug)]
pub struct GrpcConnectInfo<T> {
    transport: T,
    calls: Arc<CallCount>,
}

impl<S: Connected> Connected for GrpcConnection<S> {
    type ConnectInfo = GrpcConnectInfo<S::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        GrpcConnectInfo {
            transport: self.stream.connect_info(),
            calls: self.calls.clone(),
        }
    }
}

/// The service tonic runs for a [`GrpcConnection`] of inner connect info
/// `T`: the agent's routes, with each call counted on its connection and
/// tonic's `T` put back on the request (see the module doc).
pub struct CountCalls<S, T> {
    inner: S,
    transport: PhantomData<fn() -> T>,
}

impl<S, T> CountCalls<S, T> {
    pub fn new(inner: S) -> CountCalls<S, T> {
        CountCalls {
            inner,
            transport: PhantomData,
        }
    }
}

impl<S: Clone, T> Clone for CountCalls<S, T> {
    fn clone(&self) -> Self {
        CountCalls::new(self.inner.clone())
    }
}

impl<S, T> tonic::codegen::Service<http::Request<Body>> for CountCalls<S, T>
where
    S: tonic::codegen::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let open = request
            .extensions()
            .get::<GrpcConnectInfo<T>>()
            .cloned()
            .map(|info| {
                request.extensions_mut().insert(info.transport);
                info.calls.opened()
            });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match open {
                Some(open) => response.map(|body| Body::new(CountedBody { body, _open: open })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call counted as open until hyper drops
/// it: after the last frame, or when the client resets the stream.
struct CountedBody {
    body: Body,
    _open: OpenCall,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        HttpBody::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        HttpBody::size_hint(&self.body)
    }
}
