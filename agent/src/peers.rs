//! Peer fetches: a release is uploaded to one agent (or fetched by it from
//! a repository) and the other agents of the fleet fetch it from agents
//! that hold it, so it leaves the deployer's machine once. This is both
//! sides of that: [`PeerClient`] reads from a peer (FetchArtifact's
//! `peers`), and [`read_stored`] serves a stored file to one
//! (ReadArtifact).
//!
//! Peers are no more trusted than a repository: what a peer sends goes
//! through the upload's writer and the store checks size and sha256
//! against the signed manifest, so a damaged or lying peer costs a retry
//! elsewhere, never a bad release. What is guarded here is the transport:
//! mutual TLS with this agent's certificate as its client identity and
//! the peer's checked against the fleet's CA, or, for an insecure agent,
//! plaintext to loopback addresses only (as its own API).

use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::time::Duration;

use reload_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Status, Streaming};

use crate::config::PeerFetch;

/// Bytes per ReadArtifact message: large enough that framing costs
/// little, well under gRPC's default 4 MiB message limit.
const READ_CHUNK_BYTES: usize = 512 * 1024;

/// What a ReadArtifact stream yields.
pub type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadArtifactResponse, Status>> + Send>>;

/// Calls peers for FetchArtifact; built once from `[fetch] peers`.
pub struct PeerClient {
    /// `None`: peers are off on this agent.
    config: Option<PeerFetch>,
}

impl PeerClient {
    pub fn new(config: Option<PeerFetch>) -> PeerClient {
        PeerClient { config }
    }

    /// FAILED_PRECONDITION unless `[fetch] peers = true`, or if a peer
    /// address is not one this agent may call.
    pub fn check_allowed(&self, peers: &[String]) -> Result<(), Status> {
        let Some(config) = &self.config else {
            return Err(Status::failed_precondition(
                "this agent fetches from no peer: set peers = true under [fetch] in its config (and grant the peers' identity the fetch right under [rights] on every agent)",
            ));
        };
        for peer in peers {
            let host = host_of(peer)?;
            if config.tls.is_none() && !is_loopback(host) {
                return Err(Status::failed_precondition(format!(
                    "peer {peer} is not on loopback, and this agent has no [tls] to call it with: an insecure agent fetches only from loopback peers"
                )));
            }
        }
        Ok(())
    }

    /// Opens ReadArtifact of `sha256` from byte `offset` on `peer`,
    /// connecting within `idle`. Errors are the peer's status, or
    /// UNAVAILABLE / DEADLINE_EXCEEDED for the connection.
    pub async fn read(
        &self,
        peer: &str,
        sha256: &str,
        offset: u64,
        idle: Duration,
    ) -> Result<Streaming<pb::ReadArtifactResponse>, Status> {
        self.check_allowed(std::slice::from_ref(&peer.to_string()))?;
        let config = self.config.as_ref().expect("checked above");
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{peer}"))
            .map_err(|err| Status::invalid_argument(format!("peer {peer:?}: {err}")))?
            .connect_timeout(idle)
            .tcp_nodelay(true)
            // As the CLI's uploads: a window that keeps a fast link busy.
            .initial_stream_window_size(8 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024);
        if let Some(tls) = &config.tls {
            let name = host_of(peer)?.trim_start_matches('[').trim_end_matches(']');
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&tls.ca))
                        .identity(Identity::from_pem(&tls.cert, &tls.key))
                        .domain_name(name),
                )
                .map_err(|err| Status::internal(format!("peer TLS settings: {err}")))?;
        }
        let channel = tokio::time::timeout(idle, endpoint.connect())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("no connection to peer {peer} within {idle:?}"))
            })?
            .map_err(|err| {
                Status::unavailable(format!("cannot connect to peer {peer}: {}", describe(&err)))
            })?;
        let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
        let answer = tokio::time::timeout(
            idle,
            client.read_artifact(pb::ReadArtifactRequest {
                sha256: sha256.to_string(),
                offset,
            }),
        )
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!("peer {peer} did not answer within {idle:?}"))
        })??;
        Ok(answer.into_inner())
    }
}

/// A transport error with its causes (tonic's own text is only "transport
/// error").
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The host part of `host:port`.
fn host_of(peer: &str) -> Result<&str, Status> {
    match peer.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(host),
        _ => Err(Status::invalid_argument(format!(
            "peer {peer:?} is not host:port (e.g. \"10.0.0.7:7700\")"
        ))),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Streams `file` from `offset` on, read on a blocking thread, a bounded
/// queue ahead of the client; `permit` (a peer-read slot) is held until
/// the stream ends or the client goes.
pub fn read_stored(
    mut file: std::fs::File,
    offset: u64,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> ReadStream {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        if let Err(err) = file.seek(SeekFrom::Start(offset)) {
            let _ = sender.blocking_send(Err(Status::internal(format!(
                "seeking the stored file: {err}"
            ))));
            return;
        }
        loop {
            let mut chunk = vec![0u8; READ_CHUNK_BYTES];
            let read = match file.read(&mut chunk) {
                Ok(0) => return,
                Ok(read) => read,
                Err(err) => {
                    let _ = sender.blocking_send(Err(Status::internal(format!(
                        "reading the stored file: {err}"
                    ))));
                    return;
                }
            };
            chunk.truncate(read);
            let message = pb::ReadArtifactResponse {
                chunk: chunk.into(),
            };
            if sender.blocking_send(Ok(message)).is_err() {
                // The peer went away.
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insecure_agent_calls_only_loopback_peers_and_only_when_configured() {
        let off = PeerClient::new(None);
        let err = off.check_allowed(&["127.0.0.2:7700".into()]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("peers = true"), "{}", err.message());
        let insecure = PeerClient::new(Some(PeerFetch { tls: None }));
        assert!(insecure
            .check_allowed(&["127.0.0.2:7700".into(), "[::1]:7700".into()])
            .is_ok());
        let err = insecure
            .check_allowed(&["10.0.0.7:7700".into()])
            .unwrap_err();
        assert!(err.message().contains("loopback"), "{}", err.message());
        let err = insecure.check_allowed(&["127.0.0.2".into()]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
