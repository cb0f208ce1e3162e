//! An HTTP/2 client that never retries, and a load run on it: what the
//! HTTP/2 and gRPC reload tests count failed streams with.
//!
//! Why not `h2load` or tonic's `Channel` as the judge:
//!
//! - `h2load` (nghttp2 1.52) never reconnects after a GOAWAY: the client
//!   that received one stops, and every request it had left is counted as
//!   failed, whatever the server did (a run of 30000 requests over 20
//!   connections with one graceful reload: 13477 "failed", none of them
//!   sent). So a long run measures a server that is never drained, not a
//!   reload. The tests run it in short runs instead ([`crate::h2load`]).
//! - tonic's `Channel` (hyper's HTTP/2 client) fails the first call made
//!   after a GOAWAY arrived while a stream was open, without sending it
//!   (hyper's dispatch task learns of the GOAWAY only when that call
//!   reaches it): a client bug that would count as the server's.
//!
//! [`H2Channel`] does what RFC 9113 §6.8 asks of a client, on the `h2`
//! crate: one connection at a time for all its streams; once that
//! connection has received a GOAWAY, no new stream goes on it, and the next
//! request opens a new connection. Nothing is ever sent twice: a request
//! counts as sent once `h2` accepted its stream, and from then on any
//! reset, refusal (a stream above the GOAWAY's last stream id), end of the
//! connection or timeout is a failure of that request. A request that `h2`
//! refused to open because the GOAWAY had arrived a moment before (it never
//! left the client) goes on a new connection instead; those are counted in
//! [`H2Totals::sent_elsewhere_after_goaway`] and shown, not hidden (gRPC
//! clients call this a transparent retry; no byte of it reached the old
//! server).
//!
//! [`H2Channel`] is also a tower service, so a tonic client runs on it
//! ([`H2Channel::grpc`]): the gRPC test's calls travel the same way.
//!
//! [`H2LoadRun`] is `connections` channels with `streams` requests in
//! flight on each, counting into a [`LoadReport`] like
//! [`crate::load::LoadRun`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;

use crate::load::{LoadReport, MAX_FAILURE_SAMPLES};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts kept by a channel (and summed by a load run).
#[derive(Debug, Default)]
pub struct H2Totals {
    /// Connections opened (one, plus one after each GOAWAY or close).
    pub connections: AtomicU64,
    /// Requests `h2` would not open on a connection that had just received
    /// a GOAWAY, sent on the next connection instead (never on the wire
    /// before; see the module docs).
    pub sent_elsewhere_after_goaway: AtomicU64,
}

/// One logical HTTP/2 channel to `addr`: a connection at a time, replaced
/// after a GOAWAY or the end of the connection.
#[derive(Clone)]
pub struct H2Channel {
    addr: SocketAddr,
    current: Arc<tokio::sync::Mutex<Option<h2::client::SendRequest<Bytes>>>>,
    pub totals: Arc<H2Totals>,
}

impl H2Channel {
    pub fn new(addr: SocketAddr) -> H2Channel {
        H2Channel::with_totals(addr, Arc::default())
    }

    /// A channel counting into `totals` (shared by a load run).
    pub fn with_totals(addr: SocketAddr, totals: Arc<H2Totals>) -> H2Channel {
        H2Channel {
            addr,
            current: Arc::default(),
            totals,
        }
    }

    /// A sender on a connection that has not received a GOAWAY, opening a
    /// new connection if needed. `stale` is a sender found unusable.
    async fn sender(&self) -> Result<h2::client::SendRequest<Bytes>, BoxError> {
        let mut current = self.current.lock().await;
        if let Some(send) = current.as_ref() {
            // Ready unless the connection received a GOAWAY or ended.
            if let Ok(send) = send.clone().ready().await {
                return Ok(send);
            }
        }
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(async move {
            // Its end (GOAWAY done, closed) shows in the sender's readiness.
            let _ = connection.await;
        });
        self.totals.connections.fetch_add(1, Ordering::Relaxed);
        *current = Some(send.clone());
        Ok(send.ready().await?)
    }

    /// Sends `request` and returns the response head with its body. An
    /// error after the stream was opened is that request's failure.
    pub async fn send<B>(&self, request: Request<B>) -> Result<Response<RecvBody>, BoxError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        let head = Request::from_parts(parts, ());
        let mut first = true;
        let (response, stream) = loop {
            let mut send = self.sender().await?;
            match send.send_request(head.clone(), end_of_stream) {
                Ok(opened) => break opened,
                // Refused before a stream existed: the GOAWAY arrived between
                // the readiness check and now (module docs). Once only.
                Err(e) if e.is_go_away() && first => {
                    first = false;
                    self.totals
                        .sent_elsewhere_after_goaway
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        };
        if !end_of_stream {
            tokio::spawn(send_body(body, stream));
        }
        let response = response.await?;
        Ok(response.map(RecvBody))
    }

    /// A tonic client `C` (a generated `...Client::new`) on this channel.
    pub fn grpc<C>(&self, new: impl FnOnce(H2Channel) -> C) -> C {
        new(self.clone())
    }
}

/// Streams a request body into an opened stream (gRPC requests have one).
async fn send_body<B>(mut body: B, mut stream: h2::SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            stream.send_reset(h2::Reason::CANCEL);
            return;
        };
        let sent = match frame.into_data() {
            Ok(data) => stream.send_data(data, false),
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => return drop(stream.send_trailers(trailers)),
                Err(_) => Ok(()),
            },
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}

/// A response body read from `h2`, giving back flow-control capacity as it
/// is read (else a long stream stalls at the window).
pub struct RecvBody(h2::RecvStream);

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let stream = &mut self.0;
        match stream.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = stream.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => match stream.poll_trailers(cx) {
                Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Poll::Ready(Ok(None)) => Poll::Ready(None),
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// tonic's clients call a tower service with their requests.
impl tonic::codegen::Service<Request<tonic::body::Body>> for H2Channel {
    type Response = Response<RecvBody>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<RecvBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move {
            // tonic leaves the scheme and authority to the channel.
            let (mut parts, body) = request.into_parts();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into());
            parts.uri = format!("http://{}{path}", channel.addr).parse()?;
            channel.send(Request::from_parts(parts, body)).await
        })
    }
}

/// What to load and how.
#[derive(Clone, Debug)]
pub struct H2LoadConfig {
    pub addr: SocketAddr,
    pub path: String,
    /// Channels (clients), each one connection at a time.
    pub connections: usize,
    /// Requests in flight on each channel.
    pub streams: usize,
    /// Bound on one request: open the stream, the whole response.
    pub request_timeout: Duration,
}

/// A running HTTP/2 load; [`H2LoadRun::stop`] returns the totals.
pub struct H2LoadRun {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Tally>>,
    pub totals: Arc<H2Totals>,
    started: Instant,
    workers: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Tally {
    report: LoadReport,
}

impl H2LoadRun {
    pub fn start(config: H2LoadConfig) -> H2LoadRun {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Tally::default()));
        let totals = Arc::new(H2Totals::default());
        let mut workers = Vec::new();
        for _ in 0..config.connections {
            let channel = H2Channel::with_totals(config.addr, totals.clone());
            for _ in 0..config.streams {
                let (channel, stop, shared) = (channel.clone(), stop.clone(), shared.clone());
                let config = config.clone();
                workers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Acquire) {
                        request_once(&channel, &config, &shared).await;
                    }
                }));
            }
        }
        H2LoadRun {
            stop,
            shared,
            totals,
            started: Instant::now(),
            workers,
        }
    }

    pub fn snapshot(&self) -> LoadReport {
        let mut report = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report
            .clone();
        report.elapsed = self.started.elapsed();
        report
    }

    /// Waits until `n` more responses than now have come back (panics
    /// after 30 s without them).
    pub async fn wait_for_requests(&self, n: u64) {
        let start = self.snapshot().requests;
        crate::eventually(
            format!("{n} more HTTP/2 responses (the load made no progress)"),
            Duration::from_secs(30),
            async || {
                let report = self.snapshot();
                (report.requests, report.summary())
            },
            |(requests, _)| *requests >= start + n,
        )
        .await;
    }

    /// Lets every request in flight finish, then returns the totals.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Release);
        let elapsed = self.started.elapsed();
        for worker in self.workers {
            let _ = worker.await;
        }
        let mut report = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report
            .clone();
        report.elapsed = elapsed;
        report
    }

    /// Connections opened and requests sent elsewhere after a GOAWAY, for
    /// the summary.
    pub fn connection_summary(&self) -> String {
        format!(
            "{} connections opened, {} requests opened on a new connection because the GOAWAY came first",
            self.totals.connections.load(Ordering::Relaxed),
            self.totals.sent_elsewhere_after_goaway.load(Ordering::Relaxed)
        )
    }
}

async fn request_once(channel: &H2Channel, config: &H2LoadConfig, shared: &Mutex<Tally>) {
    let began = Instant::now();
    let request = Request::get(format!("http://{}{}", config.addr, config.path))
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("a valid request");
    let outcome = tokio::time::timeout(config.request_timeout, async {
        let response = channel.send(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, BoxError>((parts, body))
    })
    .await;
    let failed = !matches!(outcome, Ok(Ok(_)));
    record(outcome, began, config, shared);
    // A failed request is not retried; the pause keeps a dead server from
    // turning the workers into a busy loop (as `load` does).
    if failed {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

type Outcome =
    Result<Result<(http::response::Parts, Bytes), BoxError>, tokio::time::error::Elapsed>;

fn record(outcome: Outcome, began: Instant, config: &H2LoadConfig, shared: &Mutex<Tally>) {
    let mut tally = shared.lock().unwrap_or_else(PoisonError::into_inner);
    let report = &mut tally.report;
    match outcome {
        Ok(Ok((parts, body))) => {
            report.requests += 1;
            if parts.status != 200 {
                report.non_200 += 1;
            }
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
            if let Some(version) = header("x-version") {
                *report.by_version.entry(version.to_owned()).or_default() += 1;
            }
            if let Some(pid) = header("x-pid").and_then(|p| p.parse().ok()) {
                report.pids.insert(pid);
            }
            report.body_bytes += body.len() as u64;
            report.latencies.record(began.elapsed());
        }
        Ok(Err(e)) => {
            report.failures += 1;
            if report.failure_samples.len() < MAX_FAILURE_SAMPLES {
                report
                    .failure_samples
                    .push(format!("HTTP/2 request failed: {e}"));
            }
        }
        Err(_) => {
            report.failures += 1;
            if report.failure_samples.len() < MAX_FAILURE_SAMPLES {
                report.failure_samples.push(format!(
                    "HTTP/2 request timed out after {:?}",
                    config.request_timeout
                ));
            }
        }
    }
}
