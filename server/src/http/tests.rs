//! Drain semantics, checked with real sockets and a hand-written HTTP/1.1
//! client that never retries, so a dropped request cannot hide.
//!
//! The tests run on Tokio's current-thread runtime (the `#[tokio::test]`
//! default). [`Server::begin_drain`] relies on it: the shutdown future
//! acknowledges from inside the server task, which then drops the listener
//! and enters the drain without yielding, before the test task runs again.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;

/// Upper bound for anything a test waits for; generous so a loaded machine
/// does not fail tests, yet a hang fails instead of blocking forever.
const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?} waiting for {what}"))
}

/// What the test service lets a test control and observe.
struct Probe {
    /// Told when a `/slow` or `/hang` request has reached the service.
    started: Option<mpsc::UnboundedSender<&'static str>>,
    /// `/slow` waits for a permit here.
    release: Semaphore,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            started: None,
            release: Semaphore::new(0),
        }
    }
}

async fn handle(probe: Arc<Probe>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    match path.as_str() {
        "/slow" | "/hang" => {
            if let Some(started) = &probe.started {
                let _ = started.send(if path == "/slow" { "slow" } else { "hang" });
            }
            if path == "/hang" {
                std::future::pending::<()>().await;
            }
            let permit = probe.release.acquire().await.expect("semaphore open");
            permit.forget();
        }
        _ => {}
    }
    Response::new(Full::new(Bytes::from(format!("hello {path}\n"))))
}

/// A `serve_http` running in a task, with its drain under the test's control.
struct Server {
    addr: SocketAddr,
    trigger: Option<oneshot::Sender<()>>,
    /// Fires once the server has dropped its listener and is draining.
    draining: Option<oneshot::Receiver<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl Server {
    async fn start(config: DrainConfig, probe: Arc<Probe>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, triggered) = oneshot::channel::<()>();
        let (entered, draining) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = triggered.await;
            let _ = entered.send(());
        };
        let service = service_fn(move |request| {
            let probe = probe.clone();
            async move { Ok::<_, Infallible>(handle(probe, request).await) }
        });
        let task = tokio::spawn(serve_http(listener, service, shutdown, config));
        Server {
            addr,
            trigger: Some(trigger),
            draining: Some(draining),
            task,
        }
    }

    async fn begin_drain(&mut self) {
        self.trigger.take().unwrap().send(()).unwrap();
        within("the drain to begin", self.draining.take().unwrap())
            .await
            .unwrap();
    }

    async fn finished(self) -> io::Result<()> {
        within("serve_http to return", self.task).await.unwrap()
    }
}

#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A minimal HTTP/1.1 client on one connection: no pooling, no retries.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, path: &str) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await.unwrap();
    }

    async fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Read one response with a `Content-Length` body.
    async fn response(&mut self) -> io::Result<RawResponse> {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8(self.buf[..head_len].to_vec()).unwrap();
        let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = response
            .header("content-length")
            .expect("content-length")
            .parse()
            .unwrap();
        while self.buf.len() < head_len + len {
            self.fill().await?;
        }
        response.body = self.buf[head_len..head_len + len].to_vec();
        self.buf.drain(..head_len + len);
        Ok(response)
    }

    async fn get(&mut self, path: &str) -> RawResponse {
        self.send(path).await;
        within("a response", self.response()).await.unwrap()
    }

    /// Wait until the server closes the connection; fail if it sends more.
    async fn expect_eof(&mut self) {
        let mut chunk = [0u8; 1024];
        let n = within(
            "the server to close the connection",
            self.stream.read(&mut chunk),
        )
        .await
        .expect("a clean close, not a reset");
        assert!(
            self.buf.is_empty() && n == 0,
            "expected EOF, got {n} more bytes"
        );
    }
}

/// A close window of exactly `spread` whatever the connection count (a
/// share as long as the window), for tests of the moments within it.
fn fixed_window(spread: Duration) -> DrainConfig {
    DrainConfig {
        drain_timeout: Duration::from_secs(60),
        idle_grace: Duration::from_secs(60),
        close_spread: spread,
        close_spread_per_connection: Some(spread),
    }
}

/// No close spread: these tests are about what each connection is told.
fn config(drain_timeout: Duration, idle_grace: Duration) -> DrainConfig {
    DrainConfig {
        drain_timeout,
        idle_grace,
        close_spread: Duration::ZERO,
        close_spread_per_connection: None,
    }
}

/// (i) The nginx race: a keep-alive client sends its next request after the
/// drain began. It must be answered, with `Connection: close`, then closed.
#[tokio::test]
async fn keep_alive_request_during_drain_is_answered_with_close() {
    let probe = Arc::new(Probe::default());
    // Grace and timeout far beyond the test's patience: only the
    // `Connection: close` response may end this connection.
    let mut server = Server::start(
        config(Duration::from_secs(60), Duration::from_secs(60)),
        probe,
    )
    .await;
    let mut client = RawClient::connect(server.addr).await;

    let first = client.get("/one").await;
    assert_eq!(first.status, 200);
    assert!(!first.closes(), "no drain yet: {first:?}");

    server.begin_drain().await;
    let second = client.get("/two").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, b"hello /two\n");
    assert!(second.closes(), "drain response must close: {second:?}");
    client.expect_eof().await;

    // Its only connection is done, so serve_http returns long before the grace.
    server.finished().await.unwrap();
}

/// (ii) On drain the listener is closed at once: with nobody else holding
/// the socket, new connects are refused, even while old connections drain.
#[tokio::test]
async fn listener_is_closed_when_the_drain_begins() {
    let probe = Arc::new(Probe::default());
    let mut server = Server::start(
        config(Duration::from_secs(60), Duration::from_secs(60)),
        probe,
    )
    .await;
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);

    server.begin_drain().await;
    let err = TcpStream::connect(server.addr)
        .await
        .expect_err("the listener should be closed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    // The old connection is still served while draining.
    let response = client.get("/").await;
    assert_eq!(response.status, 200);
    assert!(response.closes());
    client.expect_eof().await;
    server.finished().await.unwrap();
}

/// (iii) A connection that stays idle is closed once the grace is over.
#[tokio::test]
async fn idle_connection_is_closed_after_the_grace() {
    let probe = Arc::new(Probe::default());
    let grace = Duration::from_millis(200);
    let mut server = Server::start(config(Duration::from_secs(60), grace), probe).await;
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);

    let before_drain = Instant::now();
    server.begin_drain().await;
    client.expect_eof().await;
    assert!(
        before_drain.elapsed() >= grace,
        "closed after {:?}, before the grace of {grace:?}",
        before_drain.elapsed()
    );
    server.finished().await.unwrap();
}

/// (iv) A slow request in flight when the drain begins completes with 200,
/// even when the idle grace ends while it is still running.
#[tokio::test]
async fn in_flight_request_completes() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let probe = Arc::new(Probe {
        started: Some(started_tx),
        ..Probe::default()
    });
    let mut server = Server::start(
        config(Duration::from_secs(60), Duration::from_millis(100)),
        probe.clone(),
    )
    .await;

    let mut slow = RawClient::connect(server.addr).await;
    slow.send("/slow").await;
    assert_eq!(
        within("the slow request to start", started.recv()).await,
        Some("slow")
    );
    let mut idle = RawClient::connect(server.addr).await;
    assert_eq!(idle.get("/").await.status, 200);

    server.begin_drain().await;
    // The idle connection closing shows the grace is over and the slow one
    // has been told to close when idle: its request must survive that.
    idle.expect_eof().await;
    probe.release.add_permits(1);

    let response = within("the slow response", slow.response()).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello /slow\n");
    assert!(response.closes(), "{response:?}");
    slow.expect_eof().await;
    server.finished().await.unwrap();
}

/// The drain is bounded: a request that never completes is dropped when the
/// drain timeout is reached, and serve_http returns.
#[tokio::test]
async fn drain_timeout_drops_what_is_left() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let probe = Arc::new(Probe {
        started: Some(started_tx),
        ..Probe::default()
    });
    let timeout = Duration::from_millis(300);
    let mut server = Server::start(config(timeout, Duration::from_millis(50)), probe).await;
    let mut stuck = RawClient::connect(server.addr).await;
    stuck.send("/hang").await;
    assert_eq!(
        within("the stuck request to start", started.recv()).await,
        Some("hang")
    );

    let before_drain = Instant::now();
    server.begin_drain().await;
    server.finished().await.unwrap();
    assert!(
        before_drain.elapsed() >= timeout,
        "returned after {:?}",
        before_drain.elapsed()
    );
    // The connection is gone without a response (EOF or reset).
    let ended = within("the stuck connection to end", stuck.response()).await;
    assert!(ended.is_err(), "expected no response, got {ended:?}");
}

/// With no connection open, serve_http returns right away, not after the
/// grace or the timeout.
#[tokio::test]
async fn returns_at_once_without_connections() {
    let probe = Arc::new(Probe::default());
    let mut server = Server::start(
        config(Duration::from_secs(60), Duration::from_secs(60)),
        probe,
    )
    .await;
    server.begin_drain().await;
    server.finished().await.unwrap();
}

/// Opens `count` keep-alive connections, begins the drain, and has each
/// client send back to back until it is told to close: when each was told
/// (since the drain began), sorted. Every request must be answered.
async fn close_moments(server: &mut Server, count: usize) -> Vec<Duration> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let mut client = RawClient::connect(server.addr).await;
        assert_eq!(client.get("/").await.status, 200);
        clients.push(client);
    }
    let drain_began = Instant::now();
    server.begin_drain().await;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                loop {
                    let response = client.get("/").await;
                    assert_eq!(response.status, 200);
                    if response.closes() {
                        client.expect_eof().await;
                        return drain_began.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    let mut told = Vec::new();
    for task in tasks {
        told.push(within("a client to be told to close", task).await.unwrap());
    }
    told.sort();
    told
}

/// The window is sized by the connections open when the drain begins:
/// 10 connections at 40 ms each are told within about 400 ms, not over
/// the 60 s maximum, and still one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_window_is_sized_by_the_open_connections() {
    let mut server = Server::start(
        DrainConfig {
            drain_timeout: Duration::from_secs(120),
            idle_grace: Duration::from_secs(60),
            close_spread: Duration::from_secs(60),
            close_spread_per_connection: Some(Duration::from_millis(40)),
        },
        Arc::new(Probe::default()),
    )
    .await;
    let told = close_moments(&mut server, 10).await;
    let (first, last) = (told[0], told[told.len() - 1]);
    let window = Duration::from_millis(400);
    assert!(first < window / 4, "first close after {first:?}: {told:?}");
    assert!(last >= window / 2, "last close after {last:?}: {told:?}");
    assert!(last < window + Duration::from_millis(400), "{told:?}");
    server.finished().await.unwrap();
}

#[test]
fn the_close_window_is_the_shares_at_most_the_spread_and_the_timeout() {
    let config = DrainConfig {
        drain_timeout: Duration::from_secs(10),
        idle_grace: Duration::from_secs(1),
        close_spread: Duration::from_millis(500),
        close_spread_per_connection: None,
    };
    let share = Duration::from_micros(100);
    assert_eq!(config.spread_for(0, share), Duration::ZERO);
    assert_eq!(config.spread_for(50, share), Duration::from_millis(5));
    assert_eq!(
        config.spread_for(100_000, share),
        Duration::from_millis(500)
    );
    // An overflowing product is the longest window, not a panic.
    let huge = DrainConfig {
        close_spread_per_connection: Some(Duration::MAX),
        ..config
    };
    assert_eq!(huge.spread_for(3, share), Duration::from_millis(500));
    // Never longer than the drain itself.
    let short = DrainConfig {
        drain_timeout: Duration::from_millis(200),
        ..config
    };
    assert_eq!(short.spread_for(100_000, share), Duration::from_millis(200));
}

/// Keep-alive clients are told to go one after another over the close
/// spread, not in one burst: each of 10 busy connections gets its
/// `Connection: close` at its own moment within the window, and none loses
/// a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_closes_are_spread_over_the_window() {
    let probe = Arc::new(Probe::default());
    let spread = Duration::from_millis(600);
    let mut server = Server::start(fixed_window(spread), probe).await;
    let told = close_moments(&mut server, 10).await;
    let (first, last) = (told[0], told[told.len() - 1]);
    // Spread: the first within the first quarter of the window, the last in
    // its second half, and no burst of them all at once.
    assert!(first < spread / 4, "first close after {first:?}: {told:?}");
    assert!(last >= spread / 2, "last close after {last:?}: {told:?}");
    assert!(last < spread + Duration::from_millis(400), "{told:?}");
    let in_first_tenth = told.iter().filter(|t| **t < spread / 10).count();
    assert!(in_first_tenth <= 3, "a burst of closes: {told:?}");
    server.finished().await.unwrap();
}

/// HTTP/2 frames, written and read by hand so nothing between the test and
/// the server retries, reorders or hides a frame.
mod h2_frames {
    use super::*;

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    #[derive(Debug)]
    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    impl Frame {
        /// The last stream id of a GOAWAY frame.
        pub fn last_stream_id(&self) -> u32 {
            u32::from_be_bytes(self.payload[..4].try_into().unwrap()) & 0x7fff_ffff
        }
    }

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// The HEADERS frame of a GET of `path` on stream `id`, with no body.
    /// The header block is HPACK without the dynamic table or Huffman
    /// coding.
    pub fn headers(id: u32, path: &str) -> Vec<u8> {
        // :method GET, :scheme http (static table entries 2 and 6), then
        // :path and :authority as literals with indexed names.
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x01, 4]);
        block.extend_from_slice(b"test");
        frame(HEADERS, END_STREAM | END_HEADERS, id, &block)
    }

    pub fn ping_ack(payload: &[u8]) -> Vec<u8> {
        frame(PING, ACK, 0, payload)
    }

    pub struct H2Client {
        stream: TcpStream,
    }

    impl H2Client {
        /// Connects and sends the preface and an empty SETTINGS frame.
        pub async fn connect(addr: SocketAddr) -> H2Client {
            let mut client = H2Client {
                stream: TcpStream::connect(addr).await.unwrap(),
            };
            client
                .stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            client.write(SETTINGS, 0, 0, &[]).await;
            client
        }

        pub async fn write(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            self.write_all(&frame(kind, flags, stream, payload)).await;
        }

        pub async fn write_all(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        /// GET `path` on stream `id`, with no body.
        pub async fn get(&mut self, id: u32, path: &str) {
            self.write_all(&headers(id, path)).await;
        }

        /// The next frame other than SETTINGS and WINDOW_UPDATE (a SETTINGS
        /// frame is acknowledged as a client must); `None` at the end of
        /// the connection.
        pub async fn next(&mut self) -> Option<Frame> {
            loop {
                let mut head = [0u8; 9];
                match within("a frame", self.stream.read_exact(&mut head)).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return None,
                    Err(e) => panic!("reading a frame: {e}"),
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                within("a frame's payload", self.stream.read_exact(&mut payload))
                    .await
                    .unwrap();
                let frame = Frame {
                    kind: head[3],
                    flags: head[4],
                    stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
                    payload,
                };
                match frame.kind {
                    SETTINGS if frame.flags & ACK == 0 => self.write(SETTINGS, ACK, 0, &[]).await,
                    SETTINGS | 0x8 => {}
                    _ => return Some(frame),
                }
            }
        }
    }
}

/// The HTTP/2 drain is the two-step GOAWAY, observed frame by frame: first
/// GOAWAY with last stream id 2^31-1 and a PING; a stream the client opens
/// before it answers the PING (it was on the wire when the server decided
/// to go) is still served, and so is one written right behind the answer
/// (see `shutdown_ping`); only after the PING answer comes the GOAWAY with
/// the real last stream id; the stream that was in flight when the drain
/// began completes; then the connection closes.
#[tokio::test]
async fn http2_drain_is_a_two_step_goaway() {
    use h2_frames::*;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let probe = Arc::new(Probe {
        started: Some(started_tx),
        ..Probe::default()
    });
    let mut server = Server::start(
        config(Duration::from_secs(60), Duration::from_secs(60)),
        probe.clone(),
    )
    .await;
    let mut client = H2Client::connect(server.addr).await;
    client.get(1, "/slow").await;
    assert_eq!(
        within("the slow request to start", started.recv()).await,
        Some("slow")
    );

    server.begin_drain().await;
    let goaway = client.next().await.expect("a frame after the drain began");
    assert_eq!(goaway.kind, GOAWAY, "{goaway:?}");
    assert_eq!(
        goaway.last_stream_id(),
        0x7fff_ffff,
        "first GOAWAY: {goaway:?}"
    );
    let ping = client.next().await.expect("a PING after the first GOAWAY");
    assert_eq!((ping.kind, ping.flags & ACK), (PING, 0), "{ping:?}");

    // Stream 3 left the client before it read the GOAWAY. Stream 5 was
    // opened before too but is written right behind the PING answer, as
    // the Rust `h2` client does with streams it had queued: one write, so
    // the server reads both at once.
    client.get(3, "/three").await;
    client
        .write_all(&[ping_ack(&ping.payload), headers(5, "/five")].concat())
        .await;

    let (mut final_goaway, mut ended) = (None, Vec::new());
    let mut released = false;
    while let Some(frame) = client.next().await {
        match frame.kind {
            GOAWAY => final_goaway = Some(frame.last_stream_id()),
            HEADERS | DATA if frame.flags & END_STREAM != 0 => ended.push(frame.stream),
            _ => {}
        }
        // Once 3 and 5 are answered, let the slow one finish.
        if ended.contains(&3) && ended.contains(&5) && !released {
            released = true;
            probe.release.add_permits(1);
        }
    }
    assert_eq!(final_goaway, Some(5), "the second GOAWAY names stream 5");
    assert_eq!(ended, vec![3, 5, 1], "all answered, the slow one last");
    server.finished().await.unwrap();
}

/// Over TLS the protocol is the one ALPN chose: a client offering `h2`
/// gets HTTP/2, one offering `http/1.1` gets HTTP/1.1, on the same
/// listener.
#[tokio::test]
async fn tls_serves_the_protocol_alpn_chose() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let probe = Arc::new(Probe::default());
    let service = service_fn(move |request| {
        let probe = probe.clone();
        async move { Ok::<_, Infallible>(handle(probe, request).await) }
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve_https(
        listener,
        Arc::new(server_config),
        Duration::from_secs(5),
        service,
        async move {
            let _ = stopped.await;
        },
        config(Duration::from_secs(5), Duration::from_secs(1)),
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    for (alpn, expected) in [
        (&b"h2"[..], http::Version::HTTP_2),
        (&b"http/1.1"[..], http::Version::HTTP_11),
    ] {
        let mut client_config = rustls::ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        client_config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let request = Request::get("https://localhost/tls")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = if expected == http::Version::HTTP_2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            within("an HTTP/2 response", send.send_request(request))
                .await
                .unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            within("an HTTP/1.1 response", send.send_request(request))
                .await
                .unwrap()
        };
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), expected, "ALPN {alpn:?}");
    }
    stop.send(()).unwrap();
    within("serve_https to return", server)
        .await
        .unwrap()
        .unwrap();
}

/// HTTP/2 connections get their first GOAWAY at their own moments in the
/// close spread too, not all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_goaways_are_spread_over_the_window() {
    use h2_frames::*;
    let spread = Duration::from_millis(600);
    let mut server = Server::start(fixed_window(spread), Arc::new(Probe::default())).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut client = H2Client::connect(server.addr).await;
        // One answered stream: the connection is served, not in detection.
        client.get(1, "/").await;
        loop {
            let frame = client.next().await.expect("a response");
            if frame.flags & END_STREAM != 0 {
                break;
            }
        }
        clients.push(client);
    }
    let drain_began = Instant::now();
    server.begin_drain().await;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                loop {
                    let frame = client.next().await.expect("a GOAWAY before the end");
                    if frame.kind == GOAWAY {
                        return drain_began.elapsed();
                    }
                }
            })
        })
        .collect();
    let mut told = Vec::new();
    for task in tasks {
        told.push(within("a GOAWAY", task).await.unwrap());
    }
    told.sort();
    let (first, last) = (told[0], told[told.len() - 1]);
    assert!(first < spread / 4, "first GOAWAY after {first:?}: {told:?}");
    assert!(last >= spread / 2, "last GOAWAY after {last:?}: {told:?}");
    let in_first_tenth = told.iter().filter(|t| **t < spread / 10).count();
    assert!(in_first_tenth <= 3, "a burst of GOAWAYs: {told:?}");
    server.finished().await.unwrap();
}
