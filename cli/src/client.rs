//! Talking to agents: addresses, connections, uploads, and gRPC errors put
//! into words a person can act on.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use reload_proto::v1 as pb;
use reload_proto::v1::artifact_service_client::ArtifactServiceClient;
use tonic::transport::{Channel, Endpoint};

/// The agent's gRPC port when a host is written without one.
pub const DEFAULT_AGENT_PORT: u16 = 7700;

/// Chunk size of uploads: large enough that per-message overhead is noise,
/// well below every agent's chunk limit (1 MiB by default, 1 KiB minimum is
/// never used in practice).
pub const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;

/// `host`, `host:port`, `[v6]:port` -> `host:port`. The host must be an IP
/// address or a DNS name: `127.0.0.3.7700` (a dot typed for the colon) is
/// refused here, naming it, rather than later as "invalid dns name".
pub fn normalize_host(host: &str) -> anyhow::Result<String> {
    let host = host.trim();
    let not_a_host = |why: String| anyhow!("`{host}` is not host[:port]: {why}");
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(not_a_host(format!(
            "write host or host:port, e.g. 127.0.0.1:{DEFAULT_AGENT_PORT}"
        )));
    }
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| not_a_host("an IPv6 address needs its closing `]`".into()))?;
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(not_a_host(format!("`{inside}` is not an IPv6 address")));
        }
        match after.strip_prefix(':') {
            Some(port) => (host[..inside.len() + 2].to_string(), Some(port)),
            None if after.is_empty() => (host.to_string(), None),
            None => return Err(not_a_host("write [v6 address]:port".into())),
        }
    } else {
        match host.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(not_a_host(
                    "an IPv6 address is written in brackets, e.g. [::1]:7700".into(),
                ))
            }
            Some((name, port)) => (name.to_string(), Some(port)),
            None => (host.to_string(), None),
        }
    };
    if !name.starts_with('[') {
        check_host_name(&name).map_err(not_a_host)?;
    }
    let port = match port {
        None => DEFAULT_AGENT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| not_a_host(format!("`{port}` is not a port number")))?,
    };
    Ok(format!("{name}:{port}"))
}

/// An IPv4 address or a DNS name (RFC 1123 labels, the last not all
/// digits: that is an IPv4 address with a typo).
fn check_host_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let labels: Vec<&str> = name.split('.').collect();
    let numeric = |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit());
    if labels.iter().all(|l| numeric(l)) {
        // 127.0.0.3.7700: a port after a dot instead of a colon.
        if labels.len() == 5 {
            let ip = labels[..4].join(".");
            if ip.parse::<std::net::Ipv4Addr>().is_ok() {
                return Err(format!(
                    "not an IPv4 address (did you mean {ip}:{}?)",
                    labels[4]
                ));
            }
        }
        return Err("not an IPv4 address".into());
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !labels.iter().all(|l| label_ok(l)) {
        return Err("not a DNS name (letters, digits, `-` and dots) nor an IP address".into());
    }
    if labels.last().is_some_and(|l| numeric(l)) {
        return Err("a DNS name does not end in a number: is it a mistyped IP address?".into());
    }
    Ok(())
}

/// Mutual TLS settings, from flags, the environment or the project file.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// CA that signed the agents' certificates.
    pub ca: Option<std::path::PathBuf>,
    /// This client's certificate and key (its identity for the agents'
    /// [rights]).
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    /// Name to check the agents' certificates against, when it is not the
    /// host name or IP dialled.
    pub server_name: Option<String>,
}

struct Transport {
    tls: Option<(
        tonic::transport::Certificate,
        tonic::transport::Identity,
        Option<String>,
    )>,
    insecure: bool,
}

static TRANSPORT: std::sync::OnceLock<Transport> = std::sync::OnceLock::new();

impl TlsSettings {
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// Sets how agents are reached, once, from the settings
/// [`crate::config`] merged (flags, environment, project file).
pub fn configure_transport(settings: &TlsSettings, insecure: bool) -> anyhow::Result<()> {
    if TRANSPORT.get().is_some() {
        return Ok(());
    }
    let tls = if settings.is_set() {
        let read = |path: &Option<std::path::PathBuf>, what: &str| -> anyhow::Result<Vec<u8>> {
            let path = path.as_ref().ok_or_else(|| {
                anyhow!("TLS needs --tls-ca, --tls-cert and --tls-key together; {what} is missing")
            })?;
            std::fs::read(path)
                .with_context(|| format!("cannot read the TLS {what} {}", path.display()))
        };
        let ca = tonic::transport::Certificate::from_pem(read(&settings.ca, "CA")?);
        let identity = tonic::transport::Identity::from_pem(
            read(&settings.cert, "certificate")?,
            read(&settings.key, "key")?,
        );
        Some((ca, identity, settings.server_name.clone()))
    } else {
        None
    };
    let _ = TRANSPORT.set(Transport { tls, insecure });
    Ok(())
}

fn is_loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The endpoint of an agent: mutual TLS when configured; plaintext only to
/// loopback addresses or with an explicit --insecure.
pub fn endpoint(host: &str) -> anyhow::Result<Endpoint> {
    let host = normalize_host(host)?;
    let transport = TRANSPORT.get_or_init(|| Transport {
        tls: None,
        insecure: false,
    });
    let scheme = if transport.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}"))
        .with_context(|| format!("{host:?} is not a valid agent address"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Large windows: see UPLOAD_WINDOW_BYTES in the agent.
        .initial_stream_window_size(8 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .max_frame_size(1024 * 1024);
    match &transport.tls {
        Some((ca, identity, server_name)) => {
            let name = server_name.clone().unwrap_or_else(|| {
                let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(&host);
                name.trim_start_matches('[').trim_end_matches(']').to_string()
            });
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(identity.clone())
                .domain_name(name);
            endpoint = endpoint.tls_config(tls).context("TLS settings")?;
        }
        None if transport.insecure || is_loopback(&host) => {}
        None => bail!(
            "agent {host} is not on loopback and no TLS is configured: pass --tls-ca, --tls-cert and --tls-key (or [tls] in reloadctl.toml; `reloadctl certs` makes a development set), or --insecure for a plaintext agent"
        ),
    }
    Ok(endpoint)
}

pub async fn connect(host: &str) -> anyhow::Result<Channel> {
    let endpoint = endpoint(host)?;
    let host = normalize_host(host)?;
    endpoint.connect().await.map_err(|err| {
        if let Some(mismatch) = protocol_mismatch(&host) {
            return anyhow!(mismatch);
        }
        let mut detail = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(inner) = source {
            detail.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        anyhow!("cannot reach the agent at {host}: {detail}; is reload-agent running there, is the address in its [agent] listen, and do TLS settings match on both sides?")
    })
}

/// Puts a gRPC failure into one line. An answer from the agent is a
/// refusal: who refused, the code, the reason. A failure below gRPC (the
/// connection broke, or the two ends speak different protocols) is not the
/// agent refusing anything, and says what went wrong instead.
pub fn describe_status(host: &str, doing: &str, status: &tonic::Status) -> anyhow::Error {
    if is_transport_failure(status) {
        if let Some(mismatch) = protocol_mismatch(host) {
            return anyhow!(mismatch);
        }
        return anyhow!(
            "the call to {doing} on the agent at {host} failed in transport ({:?}): {}; is reload-agent running there, and do TLS settings match on both sides?",
            status.code(),
            status.message()
        );
    }
    anyhow!(
        "agent {host} refused to {doing} ({:?}): {}",
        status.code(),
        status.message()
    )
}

/// A status made on this side from a connection error (it carries the
/// error as its source), not one the agent sent.
pub fn is_transport_failure(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// What answers on an agent's port, as far as the first bytes it sends
/// tell.
#[derive(Debug, PartialEq, Eq)]
enum Speaks {
    Tls,
    Plaintext,
    Unknown,
}

/// After a failure below gRPC: does the agent speak what this client
/// sent? A plaintext HTTP/2 client talking to a TLS agent (or the other
/// way round) sees only "h2 protocol error" or "corrupt message"; the
/// person needs "this side sent plaintext, that side wants TLS" and what
/// to set. `None` when the protocols match or the port does not say.
pub fn protocol_mismatch(host: &str) -> Option<String> {
    let client_tls = TRANSPORT.get().is_some_and(|t| t.tls.is_some());
    let speaks = match tokio::runtime::Handle::try_current() {
        // A short blocking probe, on an error path only; block_in_place lets
        // the runtime's other tasks go on meanwhile.
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| probe_protocol(host))
        }
        _ => probe_protocol(host),
    };
    match (speaks, client_tls) {
        (Speaks::Tls, false) => Some(format!(
            "{host} speaks TLS, this client sent plaintext: set [tls] in reloadctl.toml or --tls-ca, --tls-cert and --tls-key (or RELOADCTL_TLS_*; `reloadctl certs` makes a development set)"
        )),
        (Speaks::Plaintext, true) => Some(format!(
            "{host} speaks plaintext (an agent with insecure = true), this client sent TLS: configure [tls] on that agent, or reach it without --tls-*/[tls] in reloadctl.toml (plaintext goes only to loopback, or with --insecure)"
        )),
        _ => None,
    }
}

/// A TLS ClientHello: any TLS server answers it with a TLS record (its
/// ServerHello, or an alert refusing these parameters), and an HTTP/2
/// server closes on it (not its preface).
fn client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03]; // TLS 1.2
    body.extend_from_slice(&[0x2a; 32]); // random
    body.push(0); // no session id
                  // TLS_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                  // TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0xc0, 0x2f, 0xc0, 0x2b]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut record = vec![0x16, 0x03, 0x01, 0, 0, 0x01, 0, 0, 0];
    let handshake_len = body.len();
    record[7] = (handshake_len >> 8) as u8;
    record[8] = handshake_len as u8;
    let record_len = handshake_len + 4;
    record[3] = (record_len >> 8) as u8;
    record[4] = record_len as u8;
    record.extend(body);
    record
}

/// The HTTP/2 client preface and an empty SETTINGS frame: an HTTP/2 server
/// answers with a frame of its own (SETTINGS, or GOAWAY).
const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Asks the port twice, each on a fresh connection bounded to a second:
/// first as TLS, then as HTTP/2 in plaintext.
fn probe_protocol(host: &str) -> Speaks {
    let first_bytes = |hello: &[u8]| -> Option<Vec<u8>> {
        use std::io::{Read, Write};
        use std::net::ToSocketAddrs;
        let addr = host.to_socket_addrs().ok()?.next()?;
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .ok()?;
        stream.write_all(hello).ok()?;
        let mut reply = [0u8; 9];
        let mut filled = 0;
        while filled < reply.len() {
            match stream.read(&mut reply[filled..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        Some(reply[..filled].to_vec())
    };
    match first_bytes(&client_hello()) {
        // A record of type alert (21) or handshake (22), version 3.x.
        Some(reply) if reply.len() >= 2 && matches!(reply[0], 0x15 | 0x16) && reply[1] == 3 => {
            return Speaks::Tls
        }
        None => return Speaks::Unknown,
        _ => {}
    }
    match first_bytes(H2_HELLO) {
        // A frame header: 24-bit length, then the type (SETTINGS 4, GOAWAY 7).
        Some(reply) if reply.len() >= 4 && matches!(reply[3], 0x04 | 0x07) => Speaks::Plaintext,
        _ => Speaks::Unknown,
    }
}

pub struct UploadOutcome {
    pub info: pb::ArtifactInfo,
    pub already_present: bool,
    pub bytes_sent: u64,
}

/// Stats the artifact, and uploads it only if the agent lacks it.
pub async fn upload(
    host: &str,
    channel: Channel,
    file: &Path,
    envelope: Vec<u8>,
    sha256: &str,
    show_progress: bool,
) -> anyhow::Result<UploadOutcome> {
    let mut client =
        ArtifactServiceClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
    // Present for *this* service: the same bytes signed for another one
    // still need this envelope (the agent keeps one per service).
    let service = serde_json::from_slice::<reload_artifact::dsse::Envelope>(&envelope)
        .ok()
        .and_then(|e| e.unverified_manifest().ok())
        .map(|m| m.service)
        .unwrap_or_default();
    let stat = client
        .stat_artifact(pb::StatArtifactRequest {
            sha256: sha256.to_string(),
            service,
        })
        .await
        .map_err(|s| describe_status(host, "look up the artifact", &s))?
        .into_inner();
    if let (true, Some(info)) = (stat.present, stat.artifact) {
        return Ok(UploadOutcome {
            info,
            already_present: true,
            bytes_sent: 0,
        });
    }

    let reader =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let size = reader.metadata()?.len();
    let progress = if show_progress {
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("upload to {host}"));
        bar
    } else {
        ProgressBar::hidden()
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    let feeder_progress = progress.clone();
    let feeder =
        tokio::task::spawn_blocking(move || feed_upload(reader, envelope, sender, feeder_progress));
    let result = client
        .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await;
    progress.finish_and_clear();
    let read_result = feeder.await?;
    let response = result
        .map_err(|s| describe_status(host, "store the artifact", &s))?
        .into_inner();
    read_result.with_context(|| format!("reading {} failed during the upload", file.display()))?;
    let info = response
        .artifact
        .ok_or_else(|| anyhow!("agent {host} answered the upload without artifact info"))?;
    Ok(UploadOutcome {
        info,
        already_present: response.already_present,
        bytes_sent: response.bytes_received,
    })
}

/// Chunk buffers handed back after tonic has sent them. Reusing them keeps
/// the upload from touching fresh memory for every chunk: page faults on
/// new allocations cost more CPU than the copies themselves.
#[derive(Clone, Default)]
struct ChunkPool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// A filled buffer; returns itself to its pool when dropped.
struct PooledChunk {
    buffer: Vec<u8>,
    len: usize,
    pool: ChunkPool,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        self.pool
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buffer);
    }
}

impl ChunkPool {
    fn take(&self) -> Vec<u8> {
        let reused = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        reused.unwrap_or_else(|| vec![0u8; UPLOAD_CHUNK_BYTES])
    }
}

/// Runs on a blocking thread: sends the envelope, then the file in chunks
/// as the stream drains, so the whole file is never in memory.
fn feed_upload(
    mut reader: std::fs::File,
    envelope: Vec<u8>,
    sender: tokio::sync::mpsc::Sender<pb::UploadArtifactRequest>,
    progress: ProgressBar,
) -> std::io::Result<()> {
    use pb::upload_artifact_request::Part;
    use std::io::Read;
    let first = pb::UploadArtifactRequest {
        part: Some(Part::Envelope(envelope)),
    };
    if sender.blocking_send(first).is_err() {
        return Ok(());
    }
    let pool = ChunkPool::default();
    loop {
        let mut buffer = pool.take();
        let mut filled = 0;
        while filled < buffer.len() {
            match reader.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        progress.inc(filled as u64);
        let chunk = bytes::Bytes::from_owner(PooledChunk {
            buffer,
            len: filled,
            pool: pool.clone(),
        });
        let message = pb::UploadArtifactRequest {
            part: Some(Part::Chunk(chunk)),
        };
        if sender.blocking_send(message).is_err() {
            // The agent answered early (already stored, or refused); its
            // answer carries the reason.
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn hosts_get_the_default_port() {
        assert_eq!(normalize_host("127.0.0.2").unwrap(), "127.0.0.2:7700");
        assert_eq!(normalize_host("web-1:9000").unwrap(), "web-1:9000");
        assert_eq!(normalize_host("[::1]:9000").unwrap(), "[::1]:9000");
        assert_eq!(normalize_host("[::1]").unwrap(), "[::1]:7700");
        assert!(normalize_host("web-1:http").is_err());
        assert!(normalize_host("http://x").is_err());
    }

    #[test]
    fn a_dot_typed_for_the_colon_is_named_with_a_suggestion() {
        let err = normalize_host("127.0.0.3.7700").unwrap_err().to_string();
        assert!(
            err.contains("`127.0.0.3.7700` is not host[:port]") && err.contains("127.0.0.3:7700"),
            "{err}"
        );
        for bad in [
            "web_1",
            "-web",
            "10.0.0.256",
            "a..b",
            "host:0",
            "::1",
            "[zz]:1",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(
            normalize_host("web-1.example.net").unwrap(),
            "web-1.example.net:7700"
        );
    }
}
