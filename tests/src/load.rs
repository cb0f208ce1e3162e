//! A load client that never retries and counts every failed request, the
//! way `wrk` does.
//!
//! Why it exists: a client that retries hides the requests a server drops.
//! Go's HTTP client, for one, silently resends a request when a keep-alive
//! connection it reused turns out to be closed, so a reload that loses one
//! request per keep-alive connection looks perfect through it. That is what
//! nginx does: it closes an idle keep-alive connection at the moment the
//! client sends its next request on it, so a client that does not retry
//! loses about one request per keep-alive connection per reload.
//! Our reload tests must prove that *not one* request fails, so they need a
//! client that reports every drop instead of papering over it.
//!
//! The client is hand-written HTTP/1.1 over [`tokio::net::TcpStream`] (no
//! hyper, no reqwest, so no hidden retry or connection pool logic). Each of
//! [`LoadConfig::connections`] workers sends `GET {path} HTTP/1.1` with a
//! `Host` header (plus `Connection: close` in
//! [`ConnectionMode::NewConnectionPerRequest`]), with `TCP_NODELAY` set, and
//! reads the whole response: status line, headers (names are matched
//! case-insensitively), and the body by `Content-Length`, by
//! `Transfer-Encoding: chunked`, or up to the end of the connection when the
//! response has neither. Interim `1xx` responses are skipped.
//!
//! # Failure rules
//!
//! A request either *succeeds* (a complete response arrived, whatever its
//! status: counted in [`LoadReport::requests`], and in
//! [`LoadReport::non_200`] when the status is not 200) or *fails* (counted
//! once in [`LoadReport::failures`]). It fails on:
//!
//! - a connect error (refused, unreachable, ...);
//! - a write error, a read error (such as a reset), or the end of the
//!   connection before the response is complete, *including with 0 response
//!   bytes on a reused keep-alive connection*: that is exactly the nginx
//!   keep-alive race, and `wrk` counts it too;
//! - a malformed response (bad status line or headers, bad chunk framing,
//!   conflicting lengths, an unexpected `101`, or bytes the server sent
//!   while no request was outstanding);
//! - [`LoadConfig::request_timeout`] passing before the response is complete;
//!   it bounds one request: connect (when one is needed), write and the whole
//!   response.
//!
//! A failed request is never retried: the worker drops the connection,
//! pauses for 1 ms (so that a dead server does not turn the workers into a
//! busy loop that starves the server under test) and goes on with its next
//! request on a new connection.
//!
//! Connection reuse in [`ConnectionMode::KeepAlive`]:
//!
//! - after a complete response carrying `Connection: close` (or an HTTP/1.0
//!   response without `Connection: keep-alive`, or a body delimited by the
//!   end of the connection), the worker waits briefly for the server to close,
//!   closes its side, and connects anew for the next request: not a failure;
//! - after any other complete response, the next request goes on the same
//!   connection. Just before writing it, the worker checks without blocking
//!   whether the server already closed the idle connection (a pending end of
//!   stream or reset). That counts as a failure too: HTTP allows it, but a
//!   client like `wrk` writes its next request into such a connection and
//!   fails, which is the very race a draining server must avoid by answering
//!   with `Connection: close` instead. Once the request is written, any error
//!   on that connection is a failure, with no retry.
//!
//! In [`ConnectionMode::NewConnectionPerRequest`] every request connects,
//! sends `Connection: close`, reads the full response and closes.
//!
//! Latency is recorded per successful request, from the start of the
//! request (including the connect when there is one) to the last byte of the
//! response, in a fixed-size histogram ([`LatencyHistogram`]) so memory stays
//! bounded however long the run is.
//!
//! [`LoadRun::stop`] lets every worker finish the request it is in (so
//! stopping never manufactures a failure) and then returns the totals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How many failure descriptions a report keeps.
pub const MAX_FAILURE_SAMPLES: usize = 20;

/// Largest response head (status line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Largest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE_BYTES: usize = 4096;

/// After a response that announced the end of the connection, how long the
/// worker waits at most for the server to close first.
const MAX_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Pause after a failure before the next request.
const FAILURE_PAUSE: Duration = Duration::from_millis(1);

/// How the workers use connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionMode {
    /// Reuse each connection for the next request until the server says
    /// `Connection: close` (or closes an idle connection); see the module docs.
    KeepAlive,
    /// One connection per request, with `Connection: close`.
    NewConnectionPerRequest,
}

/// What to load and how.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Server address.
    pub addr: SocketAddr,
    /// Request target, such as `/` or `/healthz`.
    pub path: String,
    /// Number of concurrent workers, each with at most one open connection.
    pub connections: usize,
    /// Keep-alive or a new connection per request.
    pub mode: ConnectionMode,
    /// Bound on one request: connect (if needed), write and the full response.
    pub request_timeout: Duration,
}

/// Counts of a load run, so far or in total.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Responses fully received, whatever their status.
    pub requests: u64,
    /// Requests that failed: connect errors, resets, end of connection before
    /// a full response, timeouts, malformed responses.
    pub failures: u64,
    /// Complete responses whose status was not 200 (also in `requests`).
    pub non_200: u64,
    /// Complete responses by their `x-version` header (absent: not counted).
    pub by_version: BTreeMap<String, u64>,
    /// Distinct values of the `x-pid` response header.
    pub pids: BTreeSet<u32>,
    /// The first [`MAX_FAILURE_SAMPLES`] failure descriptions.
    pub failure_samples: Vec<String>,
    /// Latency of each successful request.
    pub latencies: LatencyHistogram,
    /// The part of `latencies` of requests that went on a connection that
    /// had already answered one: in keep-alive runs, what is left once the
    /// reconnections are taken out (a reload's cost to the clients it does
    /// not move).
    pub reused_connection_latencies: LatencyHistogram,
    /// Total body bytes of the complete responses.
    pub body_bytes: u64,
    /// Time from the start of the run to this report (or to the stop).
    pub elapsed: Duration,
}

impl LoadReport {
    /// Median latency of the successful requests (zero when there were none).
    pub fn p50(&self) -> Duration {
        self.latencies.quantile(0.50)
    }

    /// 99th percentile latency of the successful requests (zero when there
    /// were none).
    pub fn p99(&self) -> Duration {
        self.latencies.quantile(0.99)
    }

    /// Panics unless every request was answered 200 (and there were some),
    /// showing the first failures.
    pub fn assert_no_failures(&self) {
        assert_eq!(
            self.failures,
            0,
            "{}\nfirst failures: {:#?}",
            self.summary(),
            self.failure_samples
        );
        assert_eq!(self.non_200, 0, "{}", self.summary());
        assert!(self.requests > 0, "{}", self.summary());
    }

    /// One line with every count, for logs and assertion messages.
    pub fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        };
        let mut line = format!(
            "{} requests ({rate:.0}/s over {:.2?}), {} failures, {} non-200, \
             latency p50 {:.2?} p99 {:.2?} max {:.2?}, {} body bytes, versions {:?}, pids {:?}",
            self.requests,
            self.elapsed,
            self.failures,
            self.non_200,
            self.p50(),
            self.p99(),
            self.latencies.max(),
            self.body_bytes,
            self.by_version,
            self.pids,
        );
        if let Some(first) = self.failure_samples.first() {
            let _ = write!(line, ", first failure: {first}");
        }
        line
    }
}

/// Latency histogram with a fixed size (about 15 KiB) and a relative error
/// of at most about 3% (32 linear sub-buckets per power of two of
/// nanoseconds). Quantiles report the upper edge of their bucket, capped at
/// the largest value recorded, so they never understate.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
    sum_nanos: u128,
    min_nanos: u64,
    max_nanos: u64,
}

const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
const HISTOGRAM_BUCKETS: usize = SUB_BUCKETS + (64 - SUB_BUCKET_BITS as usize) * SUB_BUCKETS;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: vec![0; HISTOGRAM_BUCKETS],
            count: 0,
            sum_nanos: 0,
            min_nanos: u64::MAX,
            max_nanos: 0,
        }
    }
}

impl LatencyHistogram {
    fn bucket_of(nanos: u64) -> usize {
        if nanos < SUB_BUCKETS as u64 {
            return nanos as usize;
        }
        let exponent = 63 - nanos.leading_zeros();
        let shift = exponent - SUB_BUCKET_BITS;
        let sub = (nanos >> shift) as usize & (SUB_BUCKETS - 1);
        SUB_BUCKETS + shift as usize * SUB_BUCKETS + sub
    }

    /// Largest value that falls in `bucket`.
    fn bucket_high(bucket: usize) -> u64 {
        if bucket < SUB_BUCKETS {
            return bucket as u64;
        }
        let shift = (bucket - SUB_BUCKETS) / SUB_BUCKETS;
        let sub = ((bucket - SUB_BUCKETS) % SUB_BUCKETS) as u64;
        let low = (SUB_BUCKETS as u64 + sub) << shift;
        low.saturating_add((1u64 << shift) - 1)
    }

    /// Adds one sample.
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket_of(nanos)] += 1;
        self.count += 1;
        self.sum_nanos += u128::from(nanos);
        self.min_nanos = self.min_nanos.min(nanos);
        self.max_nanos = self.max_nanos.max(nanos);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest sample (zero when empty).
    pub fn min(&self) -> Duration {
        if self.count == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.min_nanos)
        }
    }

    /// Largest sample (zero when empty).
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_nanos)
    }

    /// Mean of the samples (zero when empty).
    pub fn mean(&self) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let mean = self.sum_nanos / u128::from(self.count);
        Duration::from_nanos(u64::try_from(mean).unwrap_or(u64::MAX))
    }

    /// The `q` quantile (`q` in 0..=1), such as 0.99 for p99; zero when
    /// empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (bucket, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let high = Self::bucket_high(bucket).min(self.max_nanos);
                return Duration::from_nanos(high.max(self.min_nanos));
            }
        }
        self.max()
    }
}

/// A running load: `connections` Tokio tasks sending requests until stopped.
///
/// Dropping it without [`LoadRun::stop`] also tells the workers to stop.
pub struct LoadRun {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl LoadRun {
    /// Starts the workers. Must be called inside a Tokio runtime (it panics
    /// otherwise).
    pub fn start(config: LoadConfig) -> LoadRun {
        let config = Arc::new(config);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            started: Instant::now(),
            stopped_after: Mutex::new(None),
            totals: Mutex::new(Totals::default()),
        });
        let workers = (0..config.connections)
            .map(|id| tokio::spawn(worker(id, Arc::clone(&config), Arc::clone(&shared))))
            .collect();
        LoadRun { shared, workers }
    }

    /// The counts so far; cheap enough to poll (one lock, a ~15 KiB copy).
    pub fn snapshot(&self) -> LoadReport {
        self.shared.report()
    }

    /// Waits until `n` more responses than now have come back (panics
    /// after 30 s without them): traffic really reaches whatever serves.
    pub async fn wait_for_requests(&self, n: u64) {
        let start = self.snapshot().requests;
        crate::eventually(
            format!("{n} more responses (the load made no progress)"),
            Duration::from_secs(30),
            async || {
                let report = self.snapshot();
                (report.requests, report.summary())
            },
            |(requests, _)| *requests >= start + n,
        )
        .await;
    }

    /// Stops every worker after the request it is in and returns the totals.
    /// Takes at most about one `request_timeout`.
    pub async fn stop(mut self) -> LoadReport {
        self.shared.signal_stop();
        for handle in std::mem::take(&mut self.workers) {
            if let Err(e) = handle.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        self.shared.report()
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        self.shared.signal_stop();
    }
}

struct Shared {
    stop: AtomicBool,
    started: Instant,
    stopped_after: Mutex<Option<Duration>>,
    totals: Mutex<Totals>,
}

#[derive(Default)]
struct Totals {
    requests: u64,
    failures: u64,
    non_200: u64,
    by_version: BTreeMap<String, u64>,
    pids: BTreeSet<u32>,
    failure_samples: Vec<String>,
    latencies: LatencyHistogram,
    reused_connection_latencies: LatencyHistogram,
    body_bytes: u64,
}

impl Shared {
    fn signal_stop(&self) {
        let mut stopped = self
            .stopped_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if stopped.is_none() {
            *stopped = Some(self.started.elapsed());
        }
        self.stop.store(true, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record_response(&self, response: &Response, latency: Duration, reused: bool) {
        let mut t = self.totals();
        t.requests += 1;
        if response.status != 200 {
            t.non_200 += 1;
        }
        if let Some(version) = &response.version {
            *t.by_version.entry(version.clone()).or_default() += 1;
        }
        if let Some(pid) = response.pid {
            t.pids.insert(pid);
        }
        t.body_bytes += response.body_len;
        t.latencies.record(latency);
        if reused {
            t.reused_connection_latencies.record(latency);
        }
    }

    fn record_failure(&self, describe: impl FnOnce() -> String) {
        let mut t = self.totals();
        t.failures += 1;
        if t.failure_samples.len() < MAX_FAILURE_SAMPLES {
            t.failure_samples.push(describe());
        }
    }

    fn report(&self) -> LoadReport {
        let elapsed = self
            .stopped_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unwrap_or_else(|| self.started.elapsed());
        let t = self.totals();
        LoadReport {
            requests: t.requests,
            failures: t.failures,
            non_200: t.non_200,
            by_version: t.by_version.clone(),
            pids: t.pids.clone(),
            failure_samples: t.failure_samples.clone(),
            latencies: t.latencies.clone(),
            reused_connection_latencies: t.reused_connection_latencies.clone(),
            body_bytes: t.body_bytes,
            elapsed,
        }
    }
}

/// Why one request failed.
#[derive(Debug)]
enum Failure {
    Connect(io::Error),
    Write(io::Error),
    Read(io::Error),
    /// End of the connection before the response was complete.
    Eof,
    Malformed(String),
    /// Bytes arrived on a kept-alive connection with no request outstanding.
    Unsolicited(usize),
    /// The server closed a kept-alive connection without `Connection:
    /// close` while it was idle. Legal HTTP, but `wrk` would have written its
    /// next request into it and failed, and so would most clients: the race
    /// by which nginx loses about one request per keep-alive connection per
    /// reload (it closes the idle connection just as the client sends its
    /// next request on it). Counted as a failure.
    IdleClosed,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failed: {e}"),
            Failure::Write(e) => write!(f, "write failed: {e}"),
            Failure::Read(e) => write!(f, "read failed: {e}"),
            Failure::Eof => write!(f, "connection closed by the server"),
            Failure::Malformed(why) => write!(f, "malformed response: {why}"),
            Failure::Unsolicited(n) => write!(
                f,
                "server sent {n} unsolicited byte(s) on an idle keep-alive connection"
            ),
            Failure::IdleClosed => write!(
                f,
                "server closed an idle keep-alive connection without Connection: close"
            ),
        }
    }
}

/// Where a request is, for failure descriptions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Stage {
    #[default]
    Connect,
    Write,
    Response,
}

/// Progress of the current request, kept outside its future so that it can
/// still be described after a timeout dropped that future.
#[derive(Debug, Default)]
struct Progress {
    stage: Stage,
    /// Whether the request went on a connection that had already carried a
    /// response.
    reused: bool,
    /// Response bytes received for this request.
    received: usize,
}

/// A complete response.
#[derive(Debug)]
struct Response {
    status: u16,
    version: Option<String>,
    pid: Option<u32>,
    /// The server may take another request on this connection.
    keep_alive: bool,
    body_len: u64,
    /// The body, only when asked for (tests).
    body: Vec<u8>,
}

/// A connection plus the bytes read from it but not consumed yet.
struct HttpConn<S> {
    io: S,
    buf: BytesMut,
    /// Complete responses received on this connection.
    responses: u64,
}

impl<S: AsyncRead + Unpin> HttpConn<S> {
    fn new(io: S) -> Self {
        HttpConn {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            responses: 0,
        }
    }

    /// Reads more bytes into `buf`; the end of the stream is an error here
    /// (callers that accept it check for it themselves).
    async fn fill(&mut self, progress: &mut Progress) -> Result<(), Failure> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8 * 1024);
        }
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Err(Failure::Eof),
            Ok(n) => {
                progress.received += n;
                Ok(())
            }
            Err(e) => Err(Failure::Read(e)),
        }
    }

    /// Reads one complete response, skipping interim 1xx responses.
    async fn read_response(
        &mut self,
        progress: &mut Progress,
        keep_body: bool,
    ) -> Result<Response, Failure> {
        loop {
            let head = self.read_head(progress).await?;
            if (100..200).contains(&head.status) {
                if head.status == 101 {
                    return Err(Failure::Malformed(
                        "101 Switching Protocols to a plain GET".into(),
                    ));
                }
                continue;
            }
            let mut body = Vec::new();
            let mut response = Response {
                status: head.status,
                version: head.version,
                pid: head.pid,
                keep_alive: head.keep_alive,
                body_len: 0,
                body: Vec::new(),
            };
            let sink = keep_body.then_some(&mut body);
            response.body_len = match head.framing {
                Framing::Empty => 0,
                Framing::Length(n) => self.read_exact_body(n, progress, sink).await?,
                Framing::Chunked => self.read_chunked_body(progress, sink).await?,
                Framing::UntilClose => {
                    response.keep_alive = false;
                    self.read_body_until_close(progress, sink).await?
                }
            };
            response.body = body;
            return Ok(response);
        }
    }

    async fn read_head(&mut self, progress: &mut Progress) -> Result<Head, Failure> {
        let mut searched: usize = 0;
        loop {
            let from = searched.saturating_sub(3);
            if let Some(at) = find(&self.buf[from..], b"\r\n\r\n") {
                let head = self.buf.split_to(from + at + 4);
                return parse_head(&head[..head.len() - 4]);
            }
            searched = self.buf.len();
            if searched > MAX_HEAD_BYTES {
                return Err(Failure::Malformed(format!(
                    "no end of headers within {MAX_HEAD_BYTES} bytes"
                )));
            }
            self.fill(progress).await?;
        }
    }

    async fn read_exact_body(
        &mut self,
        len: u64,
        progress: &mut Progress,
        mut sink: Option<&mut Vec<u8>>,
    ) -> Result<u64, Failure> {
        let mut left = len;
        while left > 0 {
            if self.buf.is_empty() {
                self.fill(progress).await?;
            }
            let take = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            if let Some(sink) = sink.as_deref_mut() {
                sink.extend_from_slice(&self.buf[..take]);
            }
            self.buf.advance(take);
            left -= take as u64;
        }
        Ok(len)
    }

    async fn read_line(&mut self, progress: &mut Progress) -> Result<BytesMut, Failure> {
        let mut searched: usize = 0;
        loop {
            let from = searched.saturating_sub(1);
            if let Some(at) = find(&self.buf[from..], b"\r\n") {
                let mut line = self.buf.split_to(from + at + 2);
                line.truncate(line.len() - 2);
                return Ok(line);
            }
            searched = self.buf.len();
            if searched > MAX_CHUNK_LINE_BYTES {
                return Err(Failure::Malformed(format!(
                    "chunk line longer than {MAX_CHUNK_LINE_BYTES} bytes"
                )));
            }
            self.fill(progress).await?;
        }
    }

    async fn read_chunked_body(
        &mut self,
        progress: &mut Progress,
        mut sink: Option<&mut Vec<u8>>,
    ) -> Result<u64, Failure> {
        let mut total = 0u64;
        loop {
            let line = self.read_line(progress).await?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                // Trailer fields, up to an empty line.
                while !self.read_line(progress).await?.is_empty() {}
                return Ok(total);
            }
            total += self
                .read_exact_body(size, progress, sink.as_deref_mut())
                .await?;
            if !self.read_line(progress).await?.is_empty() {
                return Err(Failure::Malformed("chunk data not followed by CRLF".into()));
            }
        }
    }

    async fn read_body_until_close(
        &mut self,
        progress: &mut Progress,
        mut sink: Option<&mut Vec<u8>>,
    ) -> Result<u64, Failure> {
        let mut total = 0u64;
        loop {
            total += self.buf.len() as u64;
            if let Some(sink) = sink.as_deref_mut() {
                sink.extend_from_slice(&self.buf);
            }
            self.buf.clear();
            match self.fill(progress).await {
                Ok(()) => {}
                Err(Failure::Eof) => return Ok(total),
                Err(e) => return Err(e),
            }
        }
    }
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

struct Head {
    status: u16,
    version: Option<String>,
    pid: Option<u32>,
    keep_alive: bool,
    framing: Framing,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn parse_head(head: &[u8]) -> Result<Head, Failure> {
    let malformed = |why: String| Failure::Malformed(why);
    let text =
        std::str::from_utf8(head).map_err(|_| malformed("response head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let (http_version, rest) = status_line
        .split_once(' ')
        .ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;
    let http_10 = match http_version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(malformed(format!("bad status line {status_line:?}"))),
    };
    let code = rest.get(..3).unwrap_or_default();
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|s| (100..1000).contains(s) && code.bytes().all(|b| b.is_ascii_digit()))
        .filter(|_| rest.len() == 3 || rest.as_bytes()[3] == b' ')
        .ok_or_else(|| malformed(format!("bad status line {status_line:?}")))?;

    let mut version = None;
    let mut pid = None;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("bad header line {line:?}")))?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(malformed(format!("bad header name in {line:?}")));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .map_err(|_| malformed(format!("bad Content-Length {value:?}")))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(malformed("conflicting Content-Length headers".into()));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding frames the body.
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                chunked = coding.eq_ignore_ascii_case("chunked");
                other_coding = !chunked;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            connection_close |= has_token(value, "close");
            connection_keep_alive |= has_token(value, "keep-alive");
        } else if name.eq_ignore_ascii_case("x-version") {
            version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("x-pid") {
            pid = value.parse().ok();
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if other_coding {
        Framing::UntilClose
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let keep_alive = if http_10 {
        connection_keep_alive && !connection_close
    } else {
        !connection_close
    };
    Ok(Head {
        status,
        version,
        pid,
        keep_alive,
        framing,
    })
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, Failure> {
    let text = std::str::from_utf8(line).unwrap_or_default();
    let size = text.split(';').next().unwrap_or_default().trim();
    if size.is_empty() || size.len() > 15 {
        return Err(Failure::Malformed(format!("bad chunk size line {text:?}")));
    }
    u64::from_str_radix(size, 16)
        .map_err(|_| Failure::Malformed(format!("bad chunk size line {text:?}")))
}

/// Whether an idle keep-alive connection may carry the next request.
enum Idle {
    Open,
    /// The server closed (or reset) it while no request was outstanding.
    Closed,
    Unsolicited(usize),
}

/// Looks, without blocking and without Tokio's cached readiness (which may
/// lag), at whether the server closed an idle connection: peeks on a
/// duplicate of the socket, which shares its non-blocking mode.
fn idle_state(conn: &HttpConn<TcpStream>) -> Idle {
    use std::os::fd::AsFd;
    if !conn.buf.is_empty() {
        return Idle::Unsolicited(conn.buf.len());
    }
    let Ok(fd) = conn.io.as_fd().try_clone_to_owned() else {
        // Cannot tell: use the connection; an error on it will count.
        return Idle::Open;
    };
    let socket = std::net::TcpStream::from(fd);
    let mut byte = [0u8; 1];
    match socket.peek(&mut byte) {
        Ok(0) => Idle::Closed,
        Ok(n) => Idle::Unsolicited(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Idle::Open,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Idle::Open,
        Err(_) => Idle::Closed,
    }
}

fn request_bytes(config: &LoadConfig) -> Vec<u8> {
    let close = match config.mode {
        ConnectionMode::KeepAlive => "",
        ConnectionMode::NewConnectionPerRequest => "Connection: close\r\n",
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{close}\r\n",
        config.path, config.addr
    )
    .into_bytes()
}

/// One request: reuse or open the connection, write, read the response.
async fn exchange(
    config: &LoadConfig,
    request: &[u8],
    slot: &mut Option<HttpConn<TcpStream>>,
    progress: &mut Progress,
) -> Result<Response, Failure> {
    if let Some(conn) = slot.as_ref() {
        match idle_state(conn) {
            Idle::Open => {}
            Idle::Closed => {
                *slot = None;
                progress.reused = true;
                return Err(Failure::IdleClosed);
            }
            Idle::Unsolicited(n) => {
                progress.reused = true;
                return Err(Failure::Unsolicited(n));
            }
        }
    }
    let conn = match slot {
        Some(conn) => conn,
        None => {
            progress.stage = Stage::Connect;
            let stream = TcpStream::connect(config.addr)
                .await
                .map_err(Failure::Connect)?;
            stream.set_nodelay(true).map_err(Failure::Connect)?;
            slot.insert(HttpConn::new(stream))
        }
    };
    progress.reused = conn.responses > 0;
    progress.stage = Stage::Write;
    conn.io.write_all(request).await.map_err(Failure::Write)?;
    progress.stage = Stage::Response;
    let response = conn.read_response(progress, false).await?;
    conn.responses += 1;
    Ok(response)
}

/// After a response that ends the connection: give the server a moment to
/// close first (so the client does not collect TIME_WAIT sockets), then
/// close. Never a failure: the response was complete.
async fn close_after_response(mut conn: HttpConn<TcpStream>, budget: Duration) {
    let wait = budget.min(MAX_CLOSE_WAIT);
    let mut scratch = [0u8; 1024];
    let _ = tokio::time::timeout(wait, async {
        while let Ok(n) = conn.io.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn worker(id: usize, config: Arc<LoadConfig>, shared: Arc<Shared>) {
    let request = request_bytes(&config);
    let mut slot: Option<HttpConn<TcpStream>> = None;
    let mut number = 0u64;
    while !shared.stopping() {
        number += 1;
        let mut progress = Progress::default();
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            config.request_timeout,
            exchange(&config, &request, &mut slot, &mut progress),
        )
        .await;
        let failure = match outcome {
            Ok(Ok(response)) => {
                shared.record_response(&response, started.elapsed(), progress.reused);
                let ends_connection =
                    !response.keep_alive || config.mode == ConnectionMode::NewConnectionPerRequest;
                if ends_connection {
                    if let Some(conn) = slot.take() {
                        let budget = config.request_timeout.saturating_sub(started.elapsed());
                        close_after_response(conn, budget).await;
                    }
                }
                continue;
            }
            Ok(Err(failure)) => failure.to_string(),
            Err(_) => format!(
                "timed out after {:?} during {}",
                config.request_timeout,
                match progress.stage {
                    Stage::Connect => "connect",
                    Stage::Write => "write",
                    Stage::Response => "response",
                }
            ),
        };
        slot = None;
        shared.record_failure(|| {
            format!(
                "conn {id} req {number} ({} connection): {failure} after {} response bytes",
                if progress.reused { "reused" } else { "new" },
                progress.received
            )
        });
        tokio::time::sleep(FAILURE_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;
    use tokio::net::TcpListener;

    /// What the in-test server does on each connection.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Behavior {
        /// Answers every request with `Content-Length`, keeps the connection
        /// (honours `Connection: close` in the request).
        KeepAlive,
        /// Same with a chunked body written in several pieces.
        KeepAliveChunked,
        /// Answers with `Connection: close`, then closes.
        CloseEachResponse,
        /// Answers the first request without `Connection: close`, then reads
        /// the next request and closes without answering: with a FIN on
        /// even connections, with a reset on odd ones.
        DropNextRequest,
        /// Reads requests and never answers.
        Silent,
    }

    const BODY: &[u8] = b"ok\n";
    const CHUNKED_BODY: &[u8] = b"hello world";

    struct TestServer {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl TestServer {
        async fn start(behavior: Behavior) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let accepted = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&accepted);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let index = counter.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _ = serve(stream, behavior, index).await;
                    });
                }
            });
            TestServer {
                addr,
                accepted,
                task,
            }
        }

        fn accepted(&self) -> u64 {
            self.accepted.load(Ordering::SeqCst) as u64
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Reads one request head; returns it, or `None` at the end of the
    /// connection.
    async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(at) = find(buf, b"\r\n\r\n") {
                let head: Vec<u8> = buf.drain(..at + 4).collect();
                return Some(String::from_utf8_lossy(&head).into_owned());
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn serve(mut stream: TcpStream, behavior: Behavior, index: usize) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let mut buf = Vec::new();
        let mut answered = 0u64;
        while let Some(request) = read_request(&mut stream, &mut buf).await {
            let close_requested = request.to_ascii_lowercase().contains("connection: close");
            let close = if close_requested {
                "Connection: close\r\n"
            } else {
                ""
            };
            match behavior {
                Behavior::KeepAlive => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nX-Version: 1.2.3\r\nx-PID: 4242\r\n{close}\r\n",
                        BODY.len()
                    );
                    stream.write_all(&[head.as_bytes(), BODY].concat()).await?;
                }
                Behavior::KeepAliveChunked => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-version: 2.0.0\r\n{close}\r\n"
                    );
                    stream.write_all(head.as_bytes()).await?;
                    for piece in [
                        &b"5;ext=1\r\nhel"[..],
                        b"lo\r\n6\r\n wor",
                        b"ld\r\n0\r\n",
                        b"x-trailer: yes\r\n\r\n",
                    ] {
                        stream.write_all(piece).await?;
                        tokio::task::yield_now().await;
                    }
                }
                Behavior::CloseEachResponse => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\nx-version: 1.0.0\r\n\r\n",
                        BODY.len()
                    );
                    stream.write_all(&[head.as_bytes(), BODY].concat()).await?;
                    return Ok(());
                }
                Behavior::DropNextRequest => {
                    if answered > 0 {
                        // The client has sent its next request: close under it.
                        if index % 2 == 1 {
                            stream.set_zero_linger()?;
                        }
                        return Ok(());
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-version: 1.0.0\r\n\r\n",
                        BODY.len()
                    );
                    stream.write_all(&[head.as_bytes(), BODY].concat()).await?;
                }
                Behavior::Silent => continue,
            }
            if close_requested {
                return Ok(());
            }
            answered += 1;
        }
        Ok(())
    }

    fn config(addr: SocketAddr, connections: usize, mode: ConnectionMode) -> LoadConfig {
        LoadConfig {
            addr,
            path: "/".into(),
            connections,
            mode,
            request_timeout: Duration::from_secs(5),
        }
    }

    async fn run_for(config: LoadConfig, duration: Duration) -> LoadReport {
        let run = LoadRun::start(config);
        tokio::time::sleep(duration).await;
        run.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn well_behaved_keep_alive_server_has_no_failures_and_reuses_connections() {
        let server = TestServer::start(Behavior::KeepAlive).await;
        let report = run_for(
            config(server.addr, 8, ConnectionMode::KeepAlive),
            Duration::from_millis(300),
        )
        .await;
        let summary = report.summary();
        assert_eq!(report.failures, 0, "{summary}");
        assert!(report.requests > 0, "{summary}");
        assert_eq!(report.non_200, 0, "{summary}");
        assert_eq!(
            report.by_version.get("1.2.3"),
            Some(&report.requests),
            "{summary}"
        );
        assert_eq!(report.pids, BTreeSet::from([4242]), "{summary}");
        assert_eq!(report.body_bytes, report.requests * BODY.len() as u64);
        assert_eq!(report.latencies.count(), report.requests);
        assert!(report.p50() > Duration::ZERO && report.p50() <= report.p99());
        assert_eq!(server.accepted(), 8, "one connection per worker: {summary}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_a_keep_alive_connection_under_a_sent_request_counts_failures() {
        let server = TestServer::start(Behavior::DropNextRequest).await;
        let connections = 4;
        let report = run_for(
            config(server.addr, connections, ConnectionMode::KeepAlive),
            Duration::from_millis(300),
        )
        .await;
        let summary = report.summary();
        assert!(report.failures > 0, "{summary}");
        assert!(report.requests > 0, "{summary}");
        // Each connection carries one answered and one dropped request; no
        // retry turns the dropped ones into successes.
        assert!(
            report.requests <= report.failures + connections as u64,
            "{summary}"
        );
        assert!(!report.failure_samples.is_empty());
        assert!(report.failure_samples.len() <= MAX_FAILURE_SAMPLES);
        for sample in &report.failure_samples {
            assert!(
                sample.contains("(reused connection)")
                    && sample.ends_with("after 0 response bytes"),
                "{sample}"
            );
        }
        assert!(
            report
                .failure_samples
                .iter()
                .any(|s| s.contains("closed by the server")),
            "a FIN is seen as the end of the connection: {:?}",
            report.failure_samples
        );
        assert!(
            report
                .failure_samples
                .iter()
                .any(|s| s.contains("read failed")),
            "a reset is seen as a read error: {:?}",
            report.failure_samples
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_close_responses_reconnect_without_failures() {
        let server = TestServer::start(Behavior::CloseEachResponse).await;
        let report = run_for(
            config(server.addr, 4, ConnectionMode::KeepAlive),
            Duration::from_millis(300),
        )
        .await;
        let summary = report.summary();
        assert_eq!(report.failures, 0, "{summary}");
        assert!(report.requests > 0, "{summary}");
        assert_eq!(report.by_version.get("1.0.0"), Some(&report.requests));
        assert!(server.accepted() >= report.requests, "{summary}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_connection_per_request_has_no_failures() {
        let server = TestServer::start(Behavior::KeepAlive).await;
        let report = run_for(
            config(server.addr, 4, ConnectionMode::NewConnectionPerRequest),
            Duration::from_millis(300),
        )
        .await;
        let summary = report.summary();
        assert_eq!(report.failures, 0, "{summary}");
        assert!(report.requests > 0, "{summary}");
        assert!(server.accepted() >= report.requests, "{summary}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_port_counts_every_request_as_failed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let report = run_for(
            config(addr, 2, ConnectionMode::NewConnectionPerRequest),
            Duration::from_millis(100),
        )
        .await;
        let summary = report.summary();
        assert_eq!(report.requests, 0, "{summary}");
        assert!(report.failures > 0, "{summary}");
        assert_eq!(report.latencies.count(), 0);
        assert_eq!(report.p99(), Duration::ZERO);
        assert!(report.failure_samples.len() <= MAX_FAILURE_SAMPLES);
        assert!(
            report.failure_samples[0].contains("connect failed"),
            "{summary}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unanswered_requests_time_out_as_failures() {
        let server = TestServer::start(Behavior::Silent).await;
        let mut cfg = config(server.addr, 2, ConnectionMode::KeepAlive);
        cfg.request_timeout = Duration::from_millis(100);
        let run = LoadRun::start(cfg);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stopping = Instant::now();
        let report = run.stop().await;
        assert!(stopping.elapsed() < Duration::from_secs(1));
        let summary = report.summary();
        assert_eq!(report.requests, 0, "{summary}");
        assert!(report.failures >= 2, "{summary}");
        assert!(
            report.failure_samples[0].contains("timed out after 100ms during response"),
            "{summary}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunked_keep_alive_responses_are_framed_exactly() {
        let server = TestServer::start(Behavior::KeepAliveChunked).await;
        let report = run_for(
            config(server.addr, 4, ConnectionMode::KeepAlive),
            Duration::from_millis(300),
        )
        .await;
        let summary = report.summary();
        assert_eq!(report.failures, 0, "{summary}");
        assert!(report.requests > 4, "{summary}");
        assert_eq!(report.by_version.get("2.0.0"), Some(&report.requests));
        assert_eq!(
            report.body_bytes,
            report.requests * CHUNKED_BODY.len() as u64
        );
        // A framing error would have broken the next response on the same
        // connection; the connections were all reused.
        assert_eq!(server.accepted(), 4, "{summary}");
    }

    /// Hands out its bytes one at a time, to exercise every partial read.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.1 < self.0.len() && buf.remaining() > 0 {
                let byte = self.0[self.1];
                buf.put_slice(&[byte]);
                self.1 += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    async fn parse_all(bytes: &[u8]) -> Vec<Result<Response, Failure>> {
        let mut conn = HttpConn::new(Trickle(bytes.to_vec(), 0));
        let mut out = Vec::new();
        loop {
            let mut progress = Progress::default();
            let result = conn.read_response(&mut progress, true).await;
            let eof = matches!(result, Err(Failure::Eof)) && progress.received == 0;
            if eof {
                return out;
            }
            let stop = result.is_err();
            out.push(result);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn chunked_bodies_with_extensions_and_trailers_parse() {
        let stream = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, CHUNKED\r\nX-Version: 3.1.4\r\nx-pid: 77\r\n\r\n\
            4;name=value\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n\
            HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: Close\r\n\r\nbusy\
            HTTP/1.0 204 No Content\r\n\r\n";
        let responses = parse_all(stream).await;
        assert_eq!(responses.len(), 3, "{responses:?}");
        let first = responses[0].as_ref().expect("first response");
        assert_eq!(first.status, 200);
        assert_eq!(first.body, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(first.body_len, first.body.len() as u64);
        assert_eq!(first.version.as_deref(), Some("3.1.4"));
        assert_eq!(first.pid, Some(77));
        assert!(first.keep_alive);
        let second = responses[1].as_ref().expect("second response");
        assert_eq!((second.status, &second.body[..]), (503, &b"busy"[..]));
        assert!(!second.keep_alive);
        let third = responses[2].as_ref().expect("third response");
        assert_eq!((third.status, third.body_len), (204, 0));
        assert!(!third.keep_alive, "HTTP/1.0 without keep-alive");
    }

    #[tokio::test]
    async fn truncated_and_malformed_responses_fail() {
        let cases: [(&[u8], &str); 5] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
                "closed by the server",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
                "closed by the server",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "bad chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                "conflicting",
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "bad status line"),
        ];
        for (bytes, expected) in cases {
            let results = parse_all(bytes).await;
            let last = results.last().expect("one result");
            let err = last.as_ref().expect_err("must fail").to_string();
            assert!(
                err.contains(expected),
                "{err} for {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // A body delimited by the end of the connection is complete at EOF.
        let results = parse_all(b"HTTP/1.1 200 OK\r\n\r\nuntil close").await;
        let response = results[0].as_ref().expect("complete at EOF");
        assert_eq!(response.body, b"until close");
        assert!(!response.keep_alive);
    }

    #[test]
    fn histogram_quantiles_are_close_and_never_understate() {
        let mut h = LatencyHistogram::default();
        for micros in 1..=1000u64 {
            h.record(Duration::from_micros(micros));
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.min(), Duration::from_micros(1));
        assert_eq!(h.max(), Duration::from_micros(1000));
        for (q, exact) in [(0.5, 500u64), (0.99, 990), (1.0, 1000)] {
            let got = h.quantile(q).as_nanos() as f64;
            let exact = (exact * 1000) as f64;
            assert!(
                got >= exact && got <= exact * 1.04,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.mean(), Duration::from_nanos(500_500));
        for nanos in [0u64, 1, 31, 32, 63, 64, 1_000_000, u64::MAX] {
            let bucket = LatencyHistogram::bucket_of(nanos);
            assert!(bucket < HISTOGRAM_BUCKETS);
            assert!(LatencyHistogram::bucket_high(bucket) >= nanos);
        }
    }
}
