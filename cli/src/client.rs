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

/// `host`, `host:port`, `[v6]:port` -> `host:port`.
pub fn normalize_host(host: &str) -> anyhow::Result<String> {
    let host = host.trim();
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        bail!(
            "{host:?} is not a host: write host or host:port, e.g. 127.0.0.1:{DEFAULT_AGENT_PORT}"
        );
    }
    let has_port = if host.starts_with('[') {
        host.contains("]:")
    } else {
        host.matches(':').count() == 1
    };
    if !has_port {
        return Ok(format!("{host}:{DEFAULT_AGENT_PORT}"));
    }
    let port = host.rsplit(':').next().unwrap_or_default();
    port.parse::<u16>()
        .map_err(|_| anyhow!("{host:?} has an invalid port {port:?}"))?;
    Ok(host.to_string())
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

/// Sets how agents are reached, once: the first call wins (flags are
/// applied before the project file is read).
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
        let mut detail = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(inner) = source {
            detail.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        anyhow!("cannot reach the agent at {host}: {detail}; is reload-agent running there, is the address in its [agent] listen, and do TLS settings match on both sides?")
    })
}

/// Puts a gRPC failure into one line: who refused, the code, the reason.
pub fn describe_status(host: &str, doing: &str, status: &tonic::Status) -> anyhow::Error {
    anyhow!(
        "agent {host} refused to {doing} ({:?}): {}",
        status.code(),
        status.message()
    )
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
}
