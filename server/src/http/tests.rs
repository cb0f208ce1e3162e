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

fn config(drain_timeout: Duration, idle_grace: Duration) -> DrainConfig {
    DrainConfig {
        drain_timeout,
        idle_grace,
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
