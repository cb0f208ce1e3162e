//! `reload-small-server`: the smallest program that takes part in a
//! handoff correctly, for benchmarks that run a thousand services on one
//! machine (`reload-bench rollout-scale`).
//!
//! The demo server is 4.3 MiB stripped (hyper, h2, rustls, tokio); a
//! rollout of 1,000 hosts on one machine then moves 4.3 GiB through one
//! disk and two cores, and the benchmark measures the machine's staging
//! rather than the rollout. This one uses the standard library, plain
//! threads and the `reload-server` pieces that need no runtime (inherited
//! sockets, sd_notify), and strips to a few hundred KiB.
//!
//! What it does, as the protocol asks: serves HTTP/1.1 on every inherited
//! listening TCP socket (the service's `http` and the agent's private
//! `probe`), or binds `127.0.0.1:8080` alone; answers `/healthz` with
//! `ok` and everything else with its version and pid (`x-version`,
//! `x-pid`); says READY=1 once it accepts; on SIGTERM, SIGINT or SIGQUIT
//! says STOPPING=1, stops accepting (the queue lives on in the agent and
//! the new process), answers each open connection's next request with
//! `Connection: close`, and exits once they are done or after
//! `--drain-timeout`. `--version` prints the version (the preflight).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use reload_server::{notify, Listeners};

/// How often an accepting thread looks at the drain flag: a blocked
/// `accept` is not woken by another thread, and `shutdown` on a listening
/// socket the agent shares would stop it for every process.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// A connection that sends nothing for this long is closed while serving.
const IDLE: Duration = Duration::from_secs(30);
/// While draining, a connection idle this long (counted from the drain's
/// start at the earliest) is closed. Not at once: the client may be
/// sending its next request right now, and closing under it loses that
/// request (the race nginx loses one request per connection to).
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How often a connection waiting for its next request looks at the
/// drain.
const IDLE_POLL: Duration = Duration::from_millis(200);

struct Server {
    version: String,
    pid: u32,
    /// When the drain started; unset while serving.
    drain_started: std::sync::OnceLock<Instant>,
    /// Connections open now; the drain waits for them.
    open: AtomicUsize,
}

impl Server {
    fn draining(&self) -> bool {
        self.drain_started.get().is_some()
    }
}

fn main() -> ExitCode {
    let version = std::env::var("RELOAD_SERVICE_VERSION")
        .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_string());
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("reload-small-server {version}");
        return ExitCode::SUCCESS;
    }
    let drain_timeout = match args.iter().position(|a| a == "--drain-timeout") {
        Some(i) => match args.get(i + 1).map(|v| humantime::parse_duration(v)) {
            Some(Ok(timeout)) => timeout,
            _ => {
                eprintln!("reload-small-server: --drain-timeout takes a duration, e.g. 10s");
                return ExitCode::from(2);
            }
        },
        None => Duration::from_secs(10),
    };
    match run(version, drain_timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reload-small-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(version: String, drain_timeout: Duration) -> anyhow::Result<()> {
    // Before any thread exists: these edit the environment, and the mask is
    // inherited by every thread, so only `wait` below receives the signals.
    let mut listeners = Listeners::from_env()?;
    let signals = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT]);
    signals.thread_block()?;

    let mut sockets = Vec::new();
    for name in listeners.names() {
        if let Some(fd) = listeners.take_fd(&name)? {
            sockets.push(TcpListener::from(fd));
        }
    }
    if sockets.is_empty() {
        sockets.push(TcpListener::bind("127.0.0.1:8080")?);
    }
    let server = Arc::new(Server {
        version,
        pid: std::process::id(),
        drain_started: std::sync::OnceLock::new(),
        open: AtomicUsize::new(0),
    });
    let mut accepting = Vec::new();
    for socket in sockets {
        socket.set_nonblocking(true)?;
        let server = server.clone();
        accepting.push(std::thread::spawn(move || accept_loop(&server, &socket)));
    }
    notify::ready()?;

    let signal = signals.wait()?;
    server.drain_started.get_or_init(Instant::now);
    let _ = notify::stopping();
    eprintln!("reload-small-server: {signal:?}, draining");
    // The accepting threads end within one poll interval: after that no
    // connection is taken from the shared queue.
    for thread in accepting {
        let _ = thread.join();
    }
    let deadline = Instant::now() + drain_timeout;
    while server.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn accept_loop(server: &Arc<Server>, socket: &TcpListener) {
    while !server.draining() {
        let mut ready = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(ACCEPT_POLL).expect("100 ms fits");
        if !matches!(poll(&mut ready, timeout), Ok(n) if n > 0) {
            continue;
        }
        let Ok((stream, _)) = socket.accept() else {
            // Another process took it from the shared queue first.
            continue;
        };
        server.open.fetch_add(1, Ordering::SeqCst);
        let server = server.clone();
        std::thread::spawn(move || {
            let _ = serve(&server, stream);
            server.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Serves one connection's requests, keep-alive until the client or the
/// drain says otherwise.
fn serve(server: &Server, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        if !next_request_arrives(server, &mut reader)? {
            return Ok(());
        }
        reader.get_ref().set_read_timeout(Some(IDLE))?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut client_closes = line.trim_end().ends_with("HTTP/1.0");
        let mut body_bytes = 0usize;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                body_bytes = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection") {
                client_closes = value.eq_ignore_ascii_case("close");
            }
        }
        // A body is read and ignored, so the next request starts where it
        // should.
        std::io::copy(
            &mut (&mut reader).take(body_bytes as u64),
            &mut std::io::sink(),
        )?;
        let body = match path.as_str() {
            "/healthz" => "ok\n".to_string(),
            _ => format!("hello from {} pid {}\n", server.version, server.pid),
        };
        let close = client_closes || server.draining();
        // One write: `write!` on the socket would send each piece apart,
        // and Nagle's algorithm holds the later pieces for the client's
        // delayed ACK (40 ms).
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-version: {}\r\nx-pid: {}\r\nconnection: {}\r\n\r\n{body}",
            body.len(),
            server.version,
            server.pid,
            if close { "close" } else { "keep-alive" },
        );
        writer.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

/// Waits for the first byte of the next request. False: the client
/// closed, or the connection stayed idle past its grace.
fn next_request_arrives(
    server: &Server,
    reader: &mut BufReader<TcpStream>,
) -> std::io::Result<bool> {
    let idle_since = Instant::now();
    reader.get_ref().set_read_timeout(Some(IDLE_POLL))?;
    loop {
        match reader.fill_buf() {
            Ok([]) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let grace_left = match server.drain_started.get() {
                    Some(&drain) => DRAIN_GRACE.saturating_sub(drain.max(idle_since).elapsed()),
                    None => IDLE.saturating_sub(idle_since.elapsed()),
                };
                if grace_left.is_zero() {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
