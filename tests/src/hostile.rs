//! Hostile clients, for the connection-hygiene tests: TCP connections
//! from chosen loopback source addresses that never start TLS, TLS
//! sessions that finish their handshake and send nothing, and the watch
//! that tells when the agent closed one. Also a client TLS config from
//! `reloadctl certs` files, an HTTPS GET for the health port, and the
//! process's open-file limit.
//!
//! Loopback is all of 127.0.0.0/8: binding a client socket to 127.0.x.y
//! before connecting makes the agent see a peer of that address, so one
//! machine plays many peers (the agent's caps are per peer address).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Raises this process's open-file limit (soft and hard) to `limit`;
/// processes it starts afterwards, the agent among them, inherit it.
/// Raising the hard limit needs root (or CAP_SYS_RESOURCE): the failure
/// says so.
pub fn raise_open_file_limit(limit: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= limit {
        return;
    }
    setrlimit(Resource::RLIMIT_NOFILE, limit, hard.max(limit)).unwrap_or_else(|err| {
        panic!(
            "this test needs an open-file limit of {limit} (it has {soft}, hard {hard}): {err}; run it as root or raise the hard limit (ulimit -Hn)"
        )
    });
}

/// The `i`-th of many distinct loopback source addresses: 127.0.1.1,
/// 127.0.1.2, ... (never 127.0.0.x, which the tests' own clients use).
pub fn source_address(i: usize) -> IpAddr {
    let (high, low) = (1 + i / 250, 1 + i % 250);
    assert!(high < 256, "source_address({i}): out of 127.0.0.0/8");
    IpAddr::from([127, 0, high as u8, low as u8])
}

/// A TCP connection to `target` from `source` (port chosen by the kernel).
pub async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// Waits until the peer closes `stream` (end of stream, or an error such
/// as a reset or a TLS session cut without close_notify), reading and
/// dropping anything it sends meanwhile. `Ok(when)` if it did by
/// `deadline`, `Err(())` if the connection was still open then.
pub async fn closed_by_peer<S: AsyncRead + Unpin>(
    mut stream: S,
    deadline: Instant,
) -> Result<Instant, ()> {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(Instant::now()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// Whether the peer has closed `stream` within `wait` (see
/// [`closed_by_peer`]).
pub async fn closed_within<S: AsyncRead + Unpin>(stream: S, wait: Duration) -> bool {
    closed_by_peer(stream, Instant::now() + wait).await.is_ok()
}

/// What every HTTP/2 client sends first.
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection from `source` that finished the (plaintext) HTTP/2
/// handshake as far as the agent checks it, the client preface, and then
/// says nothing.
pub async fn silent_http2_from(source: IpAddr, target: SocketAddr) -> TcpStream {
    let mut stream = connect_from(source, target).await.unwrap();
    stream.write_all(HTTP2_PREFACE).await.unwrap();
    stream
}

/// A client TLS config for the agent's CA in `dir/certs/ca.pem`, presenting
/// the client certificate `dir/certs/<client>.pem`, offering `alpn`.
pub fn tls_client_config(dir: &Path, client: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |name: &str| {
        std::fs::read(dir.join("certs").join(name))
            .unwrap_or_else(|err| panic!("reading certs/{name} in {}: {err}", dir.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read("ca.pem")) {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(&read(&format!("{client}.pem")))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&read(&format!("{client}.key"))).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS session to `target` from `source` that finished its handshake.
pub async fn tls_from(
    config: &Arc<rustls::ClientConfig>,
    source: IpAddr,
    target: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = connect_from(source, target).await?;
    let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
}

/// `GET path` over HTTPS (HTTP/1.1, `Connection: close`) with `config`;
/// the whole response as text.
pub async fn https_get(
    config: &Arc<rustls::ClientConfig>,
    target: SocketAddr,
    path: &str,
) -> std::io::Result<String> {
    let mut stream = tls_from(config, [127, 0, 0, 1].into(), target).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    // The agent ends the session without close_notify: what came before
    // the end is the answer.
    let _ = stream.read_to_end(&mut response).await;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// The value of the Prometheus sample `name{labels...}` in `text` (a
/// `/metrics` page), 0 when there is none yet (a counter not yet counted).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0.0)
}

/// How many files the process `pid` has open.
pub fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// A connection from `source` that sent the HTTP/2 client preface and got
/// the server's first frame back: past every check the agent makes before
/// serving it (its handshake is over), and then silent.
pub async fn established_http2_from(source: IpAddr, target: SocketAddr) -> TcpStream {
    let mut stream = silent_http2_from(source, target).await;
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut first))
        .await
        .expect("the agent answers the HTTP/2 preface with its SETTINGS within 5 s")
        .expect("the agent answers the HTTP/2 preface with its SETTINGS");
    stream
}

/// `GET path` (HTTP/1.1, `Connection: close`) from the loopback address
/// `source`: the status line, e.g. `HTTP/1.1 200 OK`.
pub async fn http_status_from(
    source: IpAddr,
    target: SocketAddr,
    path: &str,
) -> std::io::Result<String> {
    let mut stream = connect_from(source, target).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    Ok(text.lines().next().unwrap_or_default().to_string())
}
