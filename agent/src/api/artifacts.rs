//! `ArtifactService`: stat, upload, list and validate. An upload's envelope
//! is verified before any byte is accepted (see
//! [`crate::store::ArtifactVerifier`]); the bytes stream into the store,
//! which alone decides when a file becomes visible under its final name.

use std::time::Duration;

use reload_artifact::VerifiedManifest;
use reload_proto::prost_types;
use reload_proto::v1 as pb;
use reload_proto::v1::upload_artifact_request::Part;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{audit_result, Right};
use super::{AgentApi, AgentState};
use crate::events::EventFields;
use crate::store::StoredArtifact;

impl AgentState {
    /// Refuses an upload that would leave less than `min_free_space` on the
    /// store's disk: a full disk breaks the agent's state, not just uploads.
    fn check_free_space(&self, size: u64) -> Result<(), Status> {
        let stats = nix::sys::statvfs::statvfs(self.store.temp_dir()).map_err(|err| {
            Status::internal(format!(
                "cannot read the free space of the store's disk: {err}"
            ))
        })?;
        let free = stats.blocks_available() as u64 * stats.fragment_size() as u64;
        let margin = self.config.limits.min_free_bytes;
        if free < size.saturating_add(margin) {
            return Err(Status::resource_exhausted(format!(
                "the store's disk has {free} bytes free; this artifact needs {size} and {margin} must stay free ([limits] min_free_space): free space or prune old artifacts"
            )));
        }
        Ok(())
    }

    async fn upload(
        &self,
        mut stream: Streaming<pb::UploadArtifactRequest>,
    ) -> Result<pb::UploadArtifactResponse, Status> {
        let idle = self.config.limits.upload_idle_timeout;
        let envelope = match next_message(&mut stream, idle).await? {
            Some(pb::UploadArtifactRequest {
                part: Some(Part::Envelope(envelope)),
            }) => envelope,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first UploadArtifact message must carry the envelope (field `envelope`), not a chunk",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "the upload stream ended before its first message (the envelope)",
                ))
            }
        };
        let verified = self.verifier.check_envelope(&envelope)?;
        let span = tracing::info_span!(
            "upload",
            service = %verified.manifest.service,
            version = %verified.manifest.version,
            sha256 = %verified.manifest.sha256,
        );
        if let Some(present) = self.already_stored(&verified, &envelope, &span).await? {
            return Ok(present);
        }

        self.check_free_space(verified.manifest.size)?;
        let mut upload = self.store.begin_upload(verified, envelope)?;
        let max_chunk = self.config.limits.max_chunk_bytes;
        while let Some(message) = next_message(&mut stream, idle).await? {
            match message.part {
                Some(Part::Chunk(chunk)) => {
                    if chunk.len() as u64 > max_chunk {
                        return Err(Status::resource_exhausted(format!(
                            "a chunk of {} bytes is above this agent's max_chunk_size of {max_chunk} bytes; send smaller chunks (reloadctl sends 256 KiB)",
                            chunk.len()
                        )));
                    }
                    upload.write_chunk(chunk).await?;
                }
                Some(Part::Envelope(_)) => {
                    return Err(Status::invalid_argument(
                        "the envelope was sent twice; send it only in the first message",
                    ))
                }
                None => {
                    return Err(Status::invalid_argument(
                        "an UploadArtifact message carried neither envelope nor chunk",
                    ))
                }
            }
        }
        let received = upload.received();
        let stored = upload.finish(&self.store).await?;
        span.in_scope(|| tracing::info!(bytes = received, "artifact verified and stored"));
        self.stored_event(
            &stored,
            format!(
                "stored {} {} ({received} bytes)",
                stored.manifest.service, stored.manifest.version
            ),
        );
        Ok(pb::UploadArtifactResponse {
            artifact: Some(artifact_info(&stored)),
            already_present: false,
            bytes_received: received,
            ..Default::default()
        })
    }
}

impl AgentState {
    /// FetchArtifact: the envelope checked as for an upload, then the bytes
    /// from each source in turn (the peers, then the repository) until one
    /// delivers the signed file, into the store by the same path an upload
    /// takes. Bytes a source got before it stopped are kept for the next
    /// source (or the next fetch) to resume after; bytes that turn out not
    /// to be the signed file are discarded.
    async fn fetch(
        &self,
        request: pb::FetchArtifactRequest,
    ) -> Result<pb::UploadArtifactResponse, Status> {
        let pb::FetchArtifactRequest {
            envelope,
            url,
            peers,
        } = request;
        if url.is_empty() && peers.is_empty() {
            return Err(Status::invalid_argument(
                "FetchArtifact needs a `url` or `peers` to fetch from",
            ));
        }
        if !url.is_empty() {
            self.fetcher.check_allowed(&url).map_err(fetch_status)?;
        }
        if !peers.is_empty() {
            self.peers.check_allowed(&peers)?;
        }
        let verified = self.verifier.check_envelope(&envelope)?;
        let manifest = verified.manifest.clone();
        let span = tracing::info_span!(
            "fetch",
            service = %manifest.service,
            version = %manifest.version,
            sha256 = %manifest.sha256,
        );
        if let Some(present) = self.already_stored(&verified, &envelope, &span).await? {
            return Ok(present);
        }
        self.check_free_space(manifest.size)?;
        // One fetch of a file at a time: they would share its partial file.
        let _fetching = FetchingGuard::take(&self.fetching, &manifest.sha256).ok_or_else(|| {
            Status::aborted(format!(
                "a fetch of {} is already running on this agent; retry when it ends",
                manifest.sha256
            ))
        })?;
        let deadline = tokio::time::Instant::now() + self.config.limits.upload_max_duration;
        let sources: Vec<Source> = peers
            .into_iter()
            .map(Source::Peer)
            .chain((!url.is_empty()).then_some(Source::Repository(url)))
            .collect();
        let mut skipped = Vec::new();
        let mut last_error = None;
        for source in &sources {
            match self
                .fetch_from(source, &verified, &envelope, deadline)
                .await
            {
                Ok((stored, received, resumed)) => {
                    span.in_scope(|| {
                        tracing::info!(
                            bytes = received,
                            resumed_from = resumed,
                            %source,
                            skipped = ?skipped,
                            "artifact fetched, verified and stored"
                        )
                    });
                    let resumed_note = if resumed > 0 {
                        format!(", resumed after {resumed}")
                    } else {
                        String::new()
                    };
                    self.stored_event(
                        &stored,
                        format!(
                            "fetched {} {} from {source} ({received} bytes{resumed_note})",
                            stored.manifest.service, stored.manifest.version
                        ),
                    );
                    return Ok(pb::UploadArtifactResponse {
                        artifact: Some(artifact_info(&stored)),
                        already_present: false,
                        bytes_received: received,
                        source: source.to_string(),
                        skipped_sources: skipped,
                    });
                }
                Err(status) => {
                    span.in_scope(|| tracing::warn!(%source, error = %status.message(), "fetch source skipped"));
                    skipped.push(format!("{source}: {}", status.message()));
                    last_error = Some(status);
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        let last = last_error.expect("at least one source was tried");
        if sources.len() == 1 {
            return Err(last);
        }
        Err(Status::new(
            last.code(),
            format!(
                "no source delivered the signed file: {}",
                skipped.join("; ")
            ),
        ))
    }

    /// One source's attempt: resumes after the bytes kept from earlier
    /// attempts, streams the rest into the store and finishes. Returns the
    /// stored artifact, the bytes received from this source and the bytes
    /// it resumed after.
    async fn fetch_from(
        &self,
        source: &Source,
        verified: &VerifiedManifest,
        envelope: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<(StoredArtifact, u64, u64), Status> {
        let limits = &self.config.limits;
        let size = verified.manifest.size;
        let resume = || {
            let (v, e) = (verified.clone(), envelope.to_vec());
            self.with_store(move |store| store.resume_fetch(v, e))
        };
        let (mut upload, mut held) = resume().await?;
        let resumed;
        if held < size {
            let mut body = match self.open_source(source, verified, held).await {
                Ok((body, from)) => {
                    if from != held {
                        // The whole file instead of the rest of it.
                        drop(upload);
                        (upload, held) = resume().await?;
                    }
                    body
                }
                Err(status) => {
                    upload.suspend().await;
                    return Err(status);
                }
            };
            resumed = held;
            loop {
                let wait = limits
                    .upload_idle_timeout
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                let data = match tokio::time::timeout(
                    wait,
                    tokio_stream::StreamExt::next(&mut body),
                )
                .await
                {
                    Ok(None) => break,
                    Ok(Some(Ok(data))) => data,
                    Ok(Some(Err(err))) => {
                        let got = upload.received();
                        upload.suspend().await;
                        return Err(Status::data_loss(format!(
                            "the connection to {source} ended after {got} of {size} bytes ({err}); they are kept: fetch again to resume"
                        )));
                    }
                    Err(_) => {
                        let got = upload.received();
                        upload.suspend().await;
                        let why = if tokio::time::Instant::now() >= deadline {
                            format!(
                                "the fetch took longer than {} in all ([limits] upload_max_duration)",
                                humantime::format_duration(limits.upload_max_duration)
                            )
                        } else {
                            format!(
                                "{source} sent nothing for {} ([limits] upload_idle_timeout)",
                                humantime::format_duration(limits.upload_idle_timeout)
                            )
                        };
                        return Err(Status::deadline_exceeded(format!(
                            "{why}; the {got} of {size} bytes fetched are kept: fetch again to resume"
                        )));
                    }
                };
                // More than the manifest's size: not the signed file; its
                // bytes go (the upload is dropped).
                upload.write_chunk(data).await?;
            }
            if upload.received() < size {
                let got = upload.received();
                upload.suspend().await;
                return Err(Status::data_loss(format!(
                    "{source} ended the file after {got} of {size} bytes; they are kept: fetch again to resume"
                )));
            }
        } else {
            // Every byte came before (a fetch cut off after its last one):
            // no request, the hash decides.
            resumed = held;
        }
        let received = upload.received() - resumed;
        let stored = upload.finish(&self.store).await.map_err(|err| {
            let status = Status::from(err);
            if status.code() != tonic::Code::DataLoss {
                return status;
            }
            Status::data_loss(format!(
                "{source} sent bytes that are not the signed file ({}); they were discarded",
                status.message()
            ))
        })?;
        Ok((stored, received, resumed))
    }

    /// The bytes of `source` from `from` on (or from 0, if it can only send
    /// the whole file), and where they start.
    async fn open_source(
        &self,
        source: &Source,
        verified: &VerifiedManifest,
        from: u64,
    ) -> Result<(ByteStream, u64), Status> {
        let idle = self.config.limits.upload_idle_timeout;
        match source {
            Source::Repository(url) => {
                let fetched = self
                    .fetcher
                    .get(url, from, idle)
                    .await
                    .map_err(fetch_status)?;
                let body = http_body_util::BodyStream::new(fetched.body);
                let data = tokio_stream::StreamExt::filter_map(body, |frame| match frame {
                    Ok(frame) => frame.into_data().ok().map(Ok),
                    Err(err) => Some(Err(err.to_string())),
                });
                Ok((Box::pin(data), fetched.from))
            }
            Source::Peer(peer) => {
                let stream = self
                    .peers
                    .read(peer, &verified.manifest.sha256, from, idle)
                    .await
                    .map_err(|status| {
                        Status::new(status.code(), format!("peer {peer}: {}", status.message()))
                    })?;
                let data = tokio_stream::StreamExt::map(stream, |message| {
                    message
                        .map(|m| m.chunk)
                        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
                });
                Ok((Box::pin(data), from))
            }
        }
    }

    /// Tells watchers a release was stored.
    fn stored_event(&self, stored: &StoredArtifact, message: String) {
        self.services.events().emit(
            pb::EventKind::ArtifactStored,
            EventFields {
                service: &stored.manifest.service,
                version: &stored.manifest.version,
                sha256: &stored.manifest.sha256,
                pid: 0,
                message,
            },
        );
    }

    /// The answer to an upload or a fetch of bytes the store holds
    /// already (their envelope kept or renewed, see `restore_existing`):
    /// nothing more is read.
    async fn already_stored(
        &self,
        verified: &VerifiedManifest,
        envelope: &[u8],
        span: &tracing::Span,
    ) -> Result<Option<pb::UploadArtifactResponse>, Status> {
        let (check, check_envelope) = (verified.clone(), envelope.to_vec());
        let existing = self
            .with_store(move |store| store.restore_existing(&check, &check_envelope))
            .await?;
        Ok(existing.map(|existing| {
            span.in_scope(|| {
                tracing::info!("artifact already stored; its bytes are not read again")
            });
            pb::UploadArtifactResponse {
                artifact: Some(artifact_info(&existing)),
                already_present: true,
                ..Default::default()
            }
        }))
    }

    /// What an upload or a fetch counts and audits.
    fn count_and_audit(
        &self,
        identity: &str,
        call: &str,
        result: &Result<pb::UploadArtifactResponse, Status>,
    ) {
        let manifest = result
            .as_ref()
            .ok()
            .and_then(|r| r.artifact.as_ref())
            .and_then(|a| a.manifest.clone())
            .unwrap_or_default();
        let (label, bytes) = match result {
            Ok(r) if r.already_present => ("already_present", 0),
            Ok(r) => ("stored", r.bytes_received),
            Err(_) => ("refused", 0),
        };
        let label = crate::metrics::Result_ {
            result: label.into(),
        };
        self.metrics.uploads.get_or_create(&label).inc();
        self.metrics
            .upload_bytes
            .get_or_create(&label)
            .inc_by(bytes);
        self.audit(
            identity,
            call,
            &manifest.service,
            &manifest.version,
            &manifest.sha256,
            audit_result(result),
        );
    }
}

/// Where FetchArtifact takes the bytes from.
enum Source {
    /// Another agent (host:port), by ReadArtifact.
    Peer(String),
    /// An artifact repository's URL.
    Repository(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Peer(peer) => write!(f, "peer {peer}"),
            Source::Repository(url) => f.write_str(url),
        }
    }
}

/// A source's bytes, in order; an error is the transport's, as text.
type ByteStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<bytes::Bytes, String>> + Send>>;

/// A fetch's repository error as a status (see the proto's codes).
fn fetch_status(err: crate::fetch::FetchError) -> Status {
    use crate::fetch::FetchError;
    match err {
        FetchError::NotAllowed(why) => Status::failed_precondition(why),
        FetchError::Unavailable(why) => Status::unavailable(why),
        FetchError::TimedOut(why) => Status::deadline_exceeded(format!(
            "{why}; fetch again to retry (bytes already fetched are kept)"
        )),
    }
}

/// The sha256 of a file being fetched, taken from the set while the fetch
/// runs.
pub(super) struct FetchingGuard<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    sha256: String,
}

impl<'a> FetchingGuard<'a> {
    fn take(
        set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
        sha256: &str,
    ) -> Option<FetchingGuard<'a>> {
        let mut held = set.lock().unwrap_or_else(|p| p.into_inner());
        held.insert(sha256.to_string()).then(|| FetchingGuard {
            set,
            sha256: sha256.to_string(),
        })
    }
}

impl Drop for FetchingGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.sha256);
    }
}

/// The next message, or a DEADLINE_EXCEEDED if the client stalls: a slow
/// or stuck client must not hold an upload slot and a temp file forever.
async fn next_message(
    stream: &mut Streaming<pb::UploadArtifactRequest>,
    idle: Duration,
) -> Result<Option<pb::UploadArtifactRequest>, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the upload sent nothing for {}; it was cut off (upload_idle_timeout)",
            humantime::format_duration(idle)
        ))),
    }
}

fn timestamp(text: &str) -> Option<prost_types::Timestamp> {
    humantime::parse_rfc3339(text).ok().map(Into::into)
}

fn manifest_pb(m: &reload_artifact::Manifest) -> pb::ArtifactManifest {
    pb::ArtifactManifest {
        service: m.service.clone(),
        version: m.version.clone(),
        sha256: m.sha256.clone(),
        size: m.size,
        os: m.os.clone(),
        arch: m.arch.clone(),
        created: timestamp(&m.created),
        expires: timestamp(&m.expires),
        allow_downgrade: m.allow_downgrade,
    }
}

pub fn artifact_info(artifact: &StoredArtifact) -> pb::ArtifactInfo {
    pb::ArtifactInfo {
        manifest: Some(manifest_pb(&artifact.manifest)),
        key_ids: artifact.key_ids.clone(),
        stored_at: Some(artifact.stored_at.into()),
    }
}

fn verified_info(verified: &VerifiedManifest) -> pb::ArtifactInfo {
    pb::ArtifactInfo {
        manifest: Some(manifest_pb(&verified.manifest)),
        key_ids: verified.key_ids.clone(),
        stored_at: None,
    }
}

#[tonic::async_trait]
impl pb::artifact_service_server::ArtifactService for AgentApi {
    async fn stat_artifact(
        &self,
        request: Request<pb::StatArtifactRequest>,
    ) -> Result<Response<pb::StatArtifactResponse>, Status> {
        self.check_read(&request, "StatArtifact")?;
        let request = request.into_inner();
        let (sha256, service) = (request.sha256, request.service);
        let found = self
            .with_store(move |store| {
                store.stat(&sha256, (!service.is_empty()).then_some(service.as_str()))
            })
            .await?;
        Ok(Response::new(pb::StatArtifactResponse {
            present: found.is_some(),
            artifact: found.as_ref().map(artifact_info),
        }))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::UploadArtifactRequest>>,
    ) -> Result<Response<pb::UploadArtifactResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "UploadArtifact");
        let result = match allowed {
            Err(status) => Err(status),
            Ok(()) => match self.upload_slots.clone().try_acquire_owned() {
                Err(_) => Err(Status::resource_exhausted(format!(
                    "{} uploads are already running on this agent (max_concurrent_uploads); retry when one finishes",
                    self.config.limits.max_concurrent_uploads
                ))),
                Ok(_slot) => {
                    let max = self.config.limits.upload_max_duration;
                    match tokio::time::timeout(max, self.upload(request.into_inner())).await {
                        Ok(result) => result,
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "the upload took longer than {} in all and was cut off ([limits] upload_max_duration)",
                            humantime::format_duration(max)
                        ))),
                    }
                }
            },
        };
        self.count_and_audit(&identity, "UploadArtifact", &result);
        result.map(Response::new)
    }

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<pb::UploadArtifactResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "FetchArtifact");
        let result = match allowed {
            Err(status) => Err(status),
            Ok(()) => match self.upload_slots.clone().try_acquire_owned() {
                Err(_) => Err(Status::resource_exhausted(format!(
                    "{} uploads or fetches are already running on this agent (max_concurrent_uploads); retry when one finishes",
                    self.config.limits.max_concurrent_uploads
                ))),
                Ok(_slot) => self.fetch(request.into_inner()).await,
            },
        };
        self.count_and_audit(&identity, "FetchArtifact", &result);
        result.map(Response::new)
    }

    type ReadArtifactStream = crate::peers::ReadStream;

    async fn read_artifact(
        &self,
        request: Request<pb::ReadArtifactRequest>,
    ) -> Result<Response<Self::ReadArtifactStream>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Fetch, "ReadArtifact");
        allowed?;
        let pb::ReadArtifactRequest { sha256, offset } = request.into_inner();
        let permit = self.peer_read_slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} peer reads are already running on this agent ([limits] max_concurrent_peer_reads); fetch from another peer or retry",
                self.config.limits.max_concurrent_peer_reads
            ))
        })?;
        let wanted = sha256.clone();
        let stored = self
            .with_store(move |store| store.stat(&wanted, None))
            .await?
            .ok_or_else(|| Status::not_found(format!("this agent does not hold {sha256}")))?;
        // Opened before the size check: pruning after this cannot take the
        // bytes from under the stream.
        let file = std::fs::File::open(&stored.path).map_err(|err| {
            Status::not_found(format!("this agent no longer holds {sha256}: {err}"))
        })?;
        if offset > stored.manifest.size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of {sha256} ({} bytes)",
                stored.manifest.size
            )));
        }
        tracing::info!(%identity, sha256 = %stored.manifest.sha256, offset, "serving a stored artifact to a peer");
        Ok(Response::new(crate::peers::read_stored(
            file, offset, permit,
        )))
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        self.check_read(&request, "ListArtifacts")?;
        let service = request.into_inner().service;
        let found = self
            .with_store(move |store| store.list((!service.is_empty()).then_some(service.as_str())))
            .await?;
        Ok(Response::new(pb::ListArtifactsResponse {
            artifacts: found.iter().map(artifact_info).collect(),
        }))
    }

    async fn validate_artifact(
        &self,
        request: Request<pb::ValidateArtifactRequest>,
    ) -> Result<Response<pb::ValidateArtifactResponse>, Status> {
        self.check_read(&request, "ValidateArtifact")?;
        use pb::validate_artifact_request::Target;
        let info = match request.into_inner().target {
            Some(Target::Envelope(envelope)) => {
                verified_info(&self.verifier.check_envelope(&envelope)?)
            }
            Some(Target::Sha256(sha256)) => {
                let (stored, verified) = self.verifier.check_stored(&sha256, None).await?;
                let mut info = verified_info(&verified);
                info.stored_at = Some(stored.stored_at.into());
                info
            }
            None => return Err(Status::invalid_argument(
                "ValidateArtifact needs a target: `sha256` of a stored artifact or an `envelope`",
            )),
        };
        Ok(Response::new(pb::ValidateArtifactResponse {
            artifact: Some(info),
        }))
    }
}
