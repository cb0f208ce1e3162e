//! The gRPC surface of the agent: `reload.v1` handlers plus the one place
//! where internal errors become `tonic::Status` codes.
//!
//! Every call checks the caller's right (read or deploy), and every call
//! that changes something is audited. The work itself lives elsewhere:
//! the store, the supervisor, the leases, and [`crate::upgrade`] for
//! `UpgradeAgent`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reload_artifact::verify::check_platform;
use reload_artifact::{VerifiedManifest, VerifyError};
use reload_proto::prost_types;
use reload_proto::v1 as pb;
use reload_proto::v1::upload_artifact_request::Part;
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::audit::{AuditEntry, AuditLog};
use crate::config::AgentConfig;
use crate::events::EventFields;
use crate::store::{ArtifactStore, StoreError, StoredArtifact};
use crate::supervisor::Supervisor;

/// The handlers: a cheap handle on the shared [`AgentState`].
#[derive(Clone)]
pub struct AgentApi(Arc<AgentState>);

impl std::ops::Deref for AgentApi {
    type Target = AgentState;
    fn deref(&self) -> &AgentState {
        &self.0
    }
}

/// Everything the handlers share.
pub struct AgentState {
    config: AgentConfig,
    store: Arc<ArtifactStore>,
    /// One permit per upload allowed to run at once.
    upload_slots: Arc<Semaphore>,
    started: SystemTime,
    supervisor: Arc<Supervisor>,
    leases: Arc<crate::lease::Leases>,
    audit: AuditLog,
    upgrades: crate::upgrade::Upgrades,
    /// Per client identity: tokens left and when they were counted.
    rate: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl AgentApi {
    pub fn new(
        config: AgentConfig,
        store: Arc<ArtifactStore>,
        supervisor: Arc<Supervisor>,
        leases: Arc<crate::lease::Leases>,
        audit: AuditLog,
        upgrades: crate::upgrade::Upgrades,
    ) -> AgentApi {
        let upload_slots = Arc::new(Semaphore::new(config.limits.max_concurrent_uploads));
        AgentApi(Arc::new(AgentState {
            config,
            store,
            upload_slots,
            started: SystemTime::now(),
            supervisor,
            leases,
            audit,
            upgrades,
            rate: Default::default(),
        }))
    }
}

impl AgentState {
    /// Runs blocking store work off the async threads.
    async fn with_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ArtifactStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|err| Status::internal(format!("store task failed: {err}")))?
            .map_err(store_status)
    }

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

    /// Every check an envelope must pass on this agent before any byte of
    /// its file is accepted.
    fn verify_envelope(&self, envelope: &[u8]) -> Result<VerifiedManifest, Status> {
        let counted = |err: VerifyError| {
            self.supervisor
                .metrics
                .verification_failures
                .get_or_create(&crate::metrics::Reason {
                    reason: verify_reason(&err).into(),
                })
                .inc();
            verify_status(err)
        };
        let verified = self
            .config
            .trusted_keys
            .verify_envelope(envelope, SystemTime::now())
            .map_err(counted)?;
        check_platform(&verified.manifest).map_err(counted)?;
        let limit = self.config.limits.max_artifact_bytes;
        if verified.manifest.size > limit {
            return Err(Status::resource_exhausted(format!(
                "artifact {} {} is {} bytes, above this agent's max_artifact_size of {limit} bytes; raise [limits] max_artifact_size in the agent config",
                verified.manifest.service, verified.manifest.version, verified.manifest.size
            )));
        }
        Ok(verified)
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
        let verified = self.verify_envelope(&envelope)?;
        let span = tracing::info_span!(
            "upload",
            service = %verified.manifest.service,
            version = %verified.manifest.version,
            sha256 = %verified.manifest.sha256,
        );
        let (check, check_envelope) = (verified.clone(), envelope.clone());
        if let Some(existing) = self
            .with_store(move |store| store.restore_existing(&check, &check_envelope))
            .await?
        {
            span.in_scope(|| tracing::info!("artifact already stored; upload skipped"));
            return Ok(pb::UploadArtifactResponse {
                artifact: Some(artifact_info(&existing)),
                already_present: true,
                bytes_received: 0,
            });
        }

        self.check_free_space(verified.manifest.size)?;
        let mut upload = self
            .store
            .begin_upload(verified, envelope)
            .map_err(store_status)?;
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
                    upload.write_chunk(chunk).await.map_err(store_status)?;
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
        let stored = upload.finish(&self.store).await.map_err(store_status)?;
        span.in_scope(|| tracing::info!(bytes = received, "artifact verified and stored"));
        self.supervisor.events.emit(
            pb::EventKind::ArtifactStored,
            EventFields {
                service: &stored.manifest.service,
                version: &stored.manifest.version,
                sha256: &stored.manifest.sha256,
                pid: 0,
                message: format!(
                    "stored {} {} ({received} bytes)",
                    stored.manifest.service, stored.manifest.version
                ),
            },
        );
        Ok(pb::UploadArtifactResponse {
            artifact: Some(artifact_info(&stored)),
            already_present: false,
            bytes_received: received,
        })
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

/// The gRPC code of each verification failure (see artifacts.proto).
fn verify_code(err: &VerifyError) -> Code {
    match err {
        VerifyError::Malformed(_)
        | VerifyError::WrongPayloadType { .. }
        | VerifyError::PayloadNotManifest(_)
        | VerifyError::InvalidManifest(_) => Code::InvalidArgument,
        VerifyError::NoSignature
        | VerifyError::UntrustedKey { .. }
        | VerifyError::BadSignature { .. }
        | VerifyError::RevokedKey { .. }
        | VerifyError::BelowThreshold { .. } => Code::PermissionDenied,
        VerifyError::Expired { .. } | VerifyError::WrongPlatform { .. } => Code::FailedPrecondition,
        VerifyError::ContentMismatch(_) => Code::DataLoss,
    }
}

/// A verification failure as a metric label.
fn verify_reason(err: &VerifyError) -> &'static str {
    match err {
        VerifyError::Malformed(_) => "malformed",
        VerifyError::WrongPayloadType { .. } => "wrong_payload_type",
        VerifyError::NoSignature => "no_signature",
        VerifyError::UntrustedKey { .. } => "untrusted_key",
        VerifyError::BadSignature { .. } => "bad_signature",
        VerifyError::RevokedKey { .. } => "revoked_key",
        VerifyError::BelowThreshold { .. } => "below_threshold",
        VerifyError::PayloadNotManifest(_) => "payload_not_manifest",
        VerifyError::InvalidManifest(_) => "invalid_manifest",
        VerifyError::Expired { .. } => "expired",
        VerifyError::WrongPlatform { .. } => "wrong_platform",
        VerifyError::ContentMismatch(_) => "content_mismatch",
    }
}

fn verify_status(err: VerifyError) -> Status {
    tracing::warn!(error = %err, "artifact rejected");
    Status::new(verify_code(&err), err.to_string())
}

/// The one conversion from store errors to gRPC statuses.
fn store_status(err: StoreError) -> Status {
    let code = match &err {
        StoreError::Verify(inner) => verify_code(inner),
        StoreError::TooLarge { .. } => Code::ResourceExhausted,
        StoreError::Truncated { .. } | StoreError::Damaged { .. } => Code::DataLoss,
        StoreError::BadRequest(_) => Code::InvalidArgument,
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            Code::ResourceExhausted
        }
        StoreError::Io { .. } => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(error = %err, "artifact store failure");
    } else {
        tracing::warn!(error = %err, "artifact rejected");
    }
    Status::new(code, err.to_string())
}

/// What a caller may do (see `[rights]` in the agent config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    Read,
    Deploy,
}

impl Right {
    fn name(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Deploy => "deploy",
        }
    }
}

/// The names a TLS client certificate carries: its common name and its
/// DNS and URI subject alternative names.
fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n)
                | x509_parser::extensions::GeneralName::URI(n) => names.push(n.to_string()),
                _ => {}
            }
        }
    }
    names
}

impl AgentState {
    /// Who is calling, for checks and the audit log.
    fn caller<T>(&self, request: &Request<T>) -> (String, Vec<String>) {
        if self.config.tls.is_none() {
            let peer = request
                .remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            return (format!("insecure:{peer}"), Vec::new());
        }
        let names = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|leaf| certificate_names(leaf.as_ref())))
            .unwrap_or_default();
        let shown = names
            .first()
            .cloned()
            .unwrap_or_else(|| "unknown-certificate".into());
        (shown, names)
    }

    /// A token bucket per identity: `requests_per_second`, bursts of twice
    /// that. A runaway script cannot starve the agent or other callers.
    fn take_token(&self, identity: &str) -> Result<(), Status> {
        let rate = self.config.limits.requests_per_second as f64;
        let now = std::time::Instant::now();
        let mut buckets = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, (_, seen)| now.duration_since(*seen) < Duration::from_secs(60));
        }
        let (tokens, seen) = buckets
            .entry(identity.to_string())
            .or_insert((2.0 * rate, now));
        *tokens = (*tokens + now.duration_since(*seen).as_secs_f64() * rate).min(2.0 * rate);
        *seen = now;
        if *tokens < 1.0 {
            return Err(Status::resource_exhausted(format!(
                "{identity:?} is over {rate} calls per second ([limits] requests_per_second); slow down and retry"
            )));
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Checks `right` for the caller; returns who it is either way.
    fn authorize<T>(
        &self,
        request: &Request<T>,
        right: Right,
        call: &str,
    ) -> (String, Result<(), Status>) {
        let (shown, names) = self.caller(request);
        if let Err(status) = self.take_token(&shown) {
            return (shown, Err(status));
        }
        if self.config.tls.is_none() {
            // Plaintext is loopback-only by config: whoever is on this
            // machine may act, as the start-up warning says.
            return (shown, Ok(()));
        }
        let rights = &self.config.rights;
        let allowed: Vec<&String> = match right {
            Right::Deploy => rights.deploy.iter().collect(),
            Right::Read => rights.deploy.iter().chain(&rights.read).collect(),
        };
        if names.iter().any(|n| allowed.contains(&n)) {
            return (shown, Ok(()));
        }
        let status = Status::permission_denied(format!(
            "identity {shown:?} (certificate names {names:?}) lacks the {} right needed for {call}; the agent config's [rights] grant it to {allowed:?}",
            right.name()
        ));
        (shown, Err(status))
    }

    fn audit(
        &self,
        identity: &str,
        call: &str,
        service: &str,
        version: &str,
        sha256: &str,
        result: Result<(), String>,
    ) {
        self.audit.record(AuditEntry {
            identity,
            call,
            service,
            version,
            sha256,
            result: result.err().unwrap_or_else(|| "ok".into()),
        });
    }

    /// Read calls: checked, not audited.
    fn check_read<T>(&self, request: &Request<T>, call: &str) -> Result<(), Status> {
        self.authorize(request, Right::Read, call).1
    }
}

/// A lease reference as the audit log shows it.
fn describe_lease_ref(lease: Option<&pb::LeaseRef>) -> String {
    lease
        .map(|r| format!("rollout {} generation {}", r.rollout_id, r.generation))
        .unwrap_or_default()
}

/// How a call ended, for the audit log.
fn audit_result<T>(result: &Result<T, Status>) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// A reload that ran is audited with its outcome.
fn reload_audit<T>(result: &Result<(pb::ReloadResult, T), Status>) -> (String, Result<(), String>) {
    match result {
        Ok((reload, _)) if reload.outcome == pb::ReloadOutcome::Succeeded as i32 => {
            (reload.to_version.clone(), Ok(()))
        }
        Ok((reload, _)) => {
            let outcome = pb::ReloadOutcome::try_from(reload.outcome).unwrap_or_default();
            (
                reload.to_version.clone(),
                Err(format!("{}: {}", outcome.as_str_name(), reload.reason)),
            )
        }
        Err(_) => (String::new(), audit_result(result)),
    }
}

impl AgentState {
    /// The version of the agent artifact this process runs, if it runs one.
    fn running_artifact_version(&self) -> String {
        self.supervisor
            .agent_versions()
            .current
            .filter(|c| c.sha256 == self.upgrades.image.executable_sha256)
            .map(|c| c.version)
            .unwrap_or_default()
    }

    /// UpgradeAgent after the caller's right and lease: see crate::upgrade
    /// for the order of the checks.
    async fn upgrade_agent_checked(
        &self,
        request: pb::UpgradeAgentRequest,
    ) -> Result<pb::UpgradeAgentResponse, Status> {
        use crate::handover::UpgradeRecord;
        use crate::upgrade::Target;
        let busy = self.upgrades.begin()?;
        let running_sha = self.upgrades.image.executable_sha256.clone();
        let running_version = self.running_version();
        let versions = self.supervisor.agent_versions();
        let mut record = UpgradeRecord {
            from_version: running_version.clone(),
            from_sha256: running_sha.clone(),
            rollback: request.rollback,
            ..Default::default()
        };
        // What to run: a stored artifact, or (rollback past the first
        // upgraded image) the installed binary.
        let (target, preflight_path) = if request.rollback {
            if !request.sha256.is_empty() {
                return Err(Status::invalid_argument(
                    "UpgradeAgent takes either `sha256` or `rollback`, not both",
                ));
            }
            match versions.previous() {
                Some(previous) => {
                    let artifact = self.verified_agent_artifact(&previous.sha256).await?;
                    record.to_version = artifact.manifest.version.clone();
                    record.to_sha256 = artifact.manifest.sha256.clone();
                    (Target::Artifact(artifact.path.clone()), artifact.path)
                }
                None if versions.current.as_ref().is_some_and(|c| c.sha256 == running_sha) => {
                    let fd = self.upgrades.image.installed_exe.try_clone().map_err(|e| {
                        Status::internal(format!("cannot duplicate the installed image's fd: {e}"))
                    })?;
                    let path = PathBuf::from(format!(
                        "/proc/{}/fd/{}",
                        std::process::id(),
                        std::os::fd::AsRawFd::as_raw_fd(&self.upgrades.image.installed_exe)
                    ));
                    let sha = hash_path(&path).await?;
                    record.to_version = "installed".into();
                    record.to_sha256 = sha;
                    record.to_installed = true;
                    (Target::Image(fd), path)
                }
                None => {
                    return Err(Status::failed_precondition(
                        "this agent runs the binary it was installed with and has no earlier agent to roll back to",
                    ))
                }
            }
        } else {
            if request.sha256.is_empty() {
                return Err(Status::invalid_argument(
                    "UpgradeAgent needs `sha256`: a stored artifact signed for service \"reload-agent\" (reloadctl upload it first)",
                ));
            }
            let artifact = self.verified_agent_artifact(&request.sha256).await?;
            crate::supervisor::check_downgrade_floor(
                &versions,
                &artifact,
                request.allow_downgrade,
            )?;
            record.to_version = artifact.manifest.version.clone();
            record.to_sha256 = artifact.manifest.sha256.clone();
            (Target::Artifact(artifact.path.clone()), artifact.path)
        };
        if record.to_sha256 == running_sha {
            return Err(Status::already_exists(format!(
                "this agent already runs {} (sha256 {running_sha}); to re-read its config, send it SIGHUP (systemctl reload reload-agent)",
                record.to_version
            )));
        }
        self.reexec(busy, target, preflight_path, record).await
    }

    /// SIGHUP: re-executes the running image in place, so the agent reads
    /// its config again without touching its services. The new config is
    /// checked first (`--check`); a config that does not load leaves the
    /// agent as it is.
    pub async fn reload_config(&self) -> Result<pb::UpgradeAgentResponse, Status> {
        use crate::handover::UpgradeRecord;
        use crate::upgrade::Target;
        let busy = self.upgrades.begin()?;
        let running_sha = self.upgrades.image.executable_sha256.clone();
        let version = self.running_version();
        let image: std::os::fd::OwnedFd = crate::handover::open_own_exe()
            .map_err(|e| Status::internal(format!("cannot open /proc/self/exe: {e}")))?
            .into();
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&image)
        ));
        let record = UpgradeRecord {
            from_version: version.clone(),
            from_sha256: running_sha.clone(),
            to_version: version,
            to_sha256: running_sha,
            to_installed: self.running_artifact_version().is_empty(),
            config_reload: true,
            ..Default::default()
        };
        self.reexec(busy, Target::Image(image), path, record).await
    }

    /// SIGHUP's handler: [`AgentState::reload_config`], logged and audited.
    pub async fn reload_config_on_signal(&self) {
        tracing::info!("SIGHUP: re-executing in place to read the config again");
        let result = self.reload_config().await;
        if let Err(status) = &result {
            tracing::error!(error = %status.message(), "the config was not reloaded; the agent runs on with the config it has");
            let _ = reload_server::notify::status(&format!(
                "config not reloaded: {}",
                status.message()
            ));
        }
        let version = result
            .as_ref()
            .map(|r| r.new_version.clone())
            .unwrap_or_default();
        self.audit(
            "SIGHUP",
            "ReloadConfig",
            crate::handover::AGENT_SERVICE,
            &version,
            &self.upgrades.image.executable_sha256,
            audit_result(&result),
        );
    }

    fn running_version(&self) -> String {
        match self.running_artifact_version() {
            v if v.is_empty() => format!("{} (installed)", env!("CARGO_PKG_VERSION")),
            v => v,
        }
    }

    /// The part every in-place re-exec shares: preflight, quiesce, answer.
    async fn reexec(
        &self,
        busy: crate::upgrade::BusyGuard<'_>,
        target: crate::upgrade::Target,
        preflight_path: PathBuf,
        record: crate::handover::UpgradeRecord,
    ) -> Result<pb::UpgradeAgentResponse, Status> {
        use crate::handover::AGENT_SERVICE;
        use crate::upgrade::Accepted;
        self.supervisor.events.emit(
            pb::EventKind::Preflight,
            EventFields {
                service: AGENT_SERVICE,
                version: &record.to_version,
                sha256: &record.to_sha256,
                pid: std::process::id(),
                message: format!("preflight of agent {}: --check", record.to_version),
            },
        );
        crate::upgrade::preflight(&preflight_path, &self.upgrades.image.args).await?;
        // No reload, restart or drain may be half-way at the exec.
        let bound = self
            .config
            .services
            .iter()
            .map(|s| s.drain_timeout)
            .max()
            .unwrap_or_default()
            + Duration::from_secs(5);
        let guards = self.supervisor.quiesce(bound).await?;
        let response = pb::UpgradeAgentResponse {
            previous_version: record.from_version.clone(),
            new_version: record.to_version.clone(),
            pid: std::process::id(),
            new_sha256: record.to_sha256.clone(),
        };
        self.supervisor.events.emit(
            pb::EventKind::AgentUpgrading,
            EventFields {
                service: AGENT_SERVICE,
                version: &record.to_version,
                sha256: &record.to_sha256,
                pid: std::process::id(),
                message: format!(
                    "re-executing in place: {} -> {}",
                    response.previous_version, response.new_version
                ),
            },
        );
        self.upgrades.commit(
            busy,
            Accepted {
                target,
                record,
                guards,
            },
        )?;
        Ok(response)
    }

    /// A stored artifact whose bytes still match its hash, with its
    /// envelope; NOT_FOUND if the store does not hold it.
    async fn stored_with_envelope(
        &self,
        sha256: &str,
    ) -> Result<(StoredArtifact, Vec<u8>), Status> {
        let lookup = sha256.to_string();
        self.with_store(move |store| {
            let Some(stored) = store.stat(&lookup)? else {
                return Ok(None);
            };
            store.check_stored_content(&stored)?;
            let envelope = store.envelope_bytes(&lookup)?;
            Ok(Some((stored, envelope)))
        })
        .await?
        .ok_or_else(|| {
            Status::not_found(format!(
                "this agent holds no artifact with sha256 {sha256}; upload it first (reloadctl upload)"
            ))
        })
    }

    /// A stored agent artifact, verified now as at upload: bytes, signature,
    /// expiry, platform, and signed for service `reload-agent`.
    async fn verified_agent_artifact(&self, sha256: &str) -> Result<StoredArtifact, Status> {
        let (stored, envelope) = self.stored_with_envelope(sha256).await?;
        let verified = self.verify_envelope(&envelope)?;
        if verified.manifest.service != crate::handover::AGENT_SERVICE {
            return Err(Status::failed_precondition(format!(
                "artifact {sha256} is {} {}, not an agent artifact: sign agent builds for service \"{}\"",
                verified.manifest.service,
                verified.manifest.version,
                crate::handover::AGENT_SERVICE
            )));
        }
        Ok(stored)
    }
}

/// sha256 of a file, off the async threads.
async fn hash_path(path: &std::path::Path) -> Result<String, Status> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok::<_, std::io::Error>(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| Status::internal(format!("cannot hash the installed agent binary: {e}")))
}

#[tonic::async_trait]
impl pb::artifact_service_server::ArtifactService for AgentApi {
    async fn stat_artifact(
        &self,
        request: Request<pb::StatArtifactRequest>,
    ) -> Result<Response<pb::StatArtifactResponse>, Status> {
        self.check_read(&request, "StatArtifact")?;
        let sha256 = request.into_inner().sha256;
        let found = self.with_store(move |store| store.stat(&sha256)).await?;
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
        let manifest = result
            .as_ref()
            .ok()
            .and_then(|r| r.artifact.as_ref())
            .and_then(|a| a.manifest.clone())
            .unwrap_or_default();
        let (label, bytes) = match &result {
            Ok(r) if r.already_present => ("already_present", 0),
            Ok(r) => ("stored", r.bytes_received),
            Err(_) => ("refused", 0),
        };
        let label = crate::metrics::Result_ {
            result: label.into(),
        };
        self.supervisor.metrics.uploads.get_or_create(&label).inc();
        self.supervisor
            .metrics
            .upload_bytes
            .get_or_create(&label)
            .inc_by(bytes);
        self.audit(
            &identity,
            "UploadArtifact",
            &manifest.service,
            &manifest.version,
            &manifest.sha256,
            audit_result(&result),
        );
        result.map(Response::new)
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
            Some(Target::Envelope(envelope)) => verified_info(&self.verify_envelope(&envelope)?),
            Some(Target::Sha256(sha256)) => {
                let (stored, envelope) = self.stored_with_envelope(&sha256).await?;
                let verified = self.verify_envelope(&envelope)?;
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

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn get_agent_info(
        &self,
        request: Request<pb::GetAgentInfoRequest>,
    ) -> Result<Response<pb::GetAgentInfoResponse>, Status> {
        self.check_read(&request, "GetAgentInfo")?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let limits = &self.config.limits;
        Ok(Response::new(pb::GetAgentInfoResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname,
            pid: std::process::id(),
            started: Some(self.started.into()),
            limits: Some(pb::Limits {
                max_artifact_bytes: limits.max_artifact_bytes,
                max_chunk_bytes: limits.max_chunk_bytes,
            }),
            trusted_key_ids: self.config.trusted_keys.ids(),
            services: self
                .config
                .services
                .iter()
                .map(|s| s.name.clone())
                .collect(),
            keep_versions: self.config.keep_versions as u32,
            executable_sha256: self.upgrades.image.executable_sha256.clone(),
            artifact_version: self.running_artifact_version(),
            last_upgrade: self.upgrades.image.last_upgrade.clone(),
            upgrade_in_progress: self.upgrades.in_progress(),
        }))
    }

    async fn upgrade_agent(
        &self,
        request: Request<pb::UpgradeAgentRequest>,
    ) -> Result<Response<pb::UpgradeAgentResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "UpgradeAgent");
        let request = request.into_inner();
        // To the end, and audited, even if the caller goes away (see
        // Activate).
        let api = self.clone();
        tokio::spawn(async move {
            let sha256 = request.sha256.clone();
            let result = async {
                allowed?;
                api.leases.check_mutation(request.lease.as_ref())?;
                api.upgrade_agent_checked(request).await
            }
            .await;
            let version = result
                .as_ref()
                .map(|r| r.new_version.clone())
                .unwrap_or_default();
            let sha256 = result
                .as_ref()
                .map(|r| r.new_sha256.clone())
                .unwrap_or(sha256);
            api.audit(
                &identity,
                "UpgradeAgent",
                crate::handover::AGENT_SERVICE,
                &version,
                &sha256,
                audit_result(&result),
            );
            result.map(Response::new)
        })
        .await
        .map_err(|err| Status::internal(format!("the upgrade task failed: {err}")))?
    }
}

#[tonic::async_trait]
impl pb::service_control_server::ServiceControl for AgentApi {
    async fn activate(
        &self,
        request: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivateResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "Activate");
        let request = request.into_inner();
        // The reload and its audit line run in a task of their own: a caller
        // that disconnects (a CLI killed mid-rollout) must not cancel a
        // reload half-way, with a new process started that nobody
        // supervises, nor leave it unaudited.
        let api = self.clone();
        let (result, status) = tokio::spawn(async move {
            let result = async {
                allowed?;
                api.leases.check_mutation(request.lease.as_ref())?;
                api.supervisor
                    .activate(&request.service, &request.sha256, request.allow_downgrade)
                    .await
            }
            .await;
            let (version, outcome) = reload_audit(&result);
            api.audit(
                &identity,
                "Activate",
                &request.service,
                &version,
                &request.sha256,
                outcome,
            );
            result
        })
        .await
        .map_err(|err| Status::internal(format!("the reload task failed: {err}")))??;
        Ok(Response::new(pb::ActivateResponse {
            result: Some(result),
            status: Some(status),
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "Rollback");
        let request = request.into_inner();
        // Runs to the end even if the caller goes away (see Activate).
        let api = self.clone();
        let (result, status) = tokio::spawn(async move {
            let result = async {
                allowed?;
                api.leases.check_mutation(request.lease.as_ref())?;
                api.supervisor
                    .rollback(&request.service, request.allow_downgrade)
                    .await
            }
            .await;
            let (version, outcome) = reload_audit(&result);
            let sha256 = result
                .as_ref()
                .map(|(_, s)| s.current_sha256.clone())
                .unwrap_or_default();
            api.audit(
                &identity,
                "Rollback",
                &request.service,
                &version,
                &sha256,
                outcome,
            );
            result
        })
        .await
        .map_err(|err| Status::internal(format!("the rollback task failed: {err}")))??;
        Ok(Response::new(pb::RollbackResponse {
            result: Some(result),
            status: Some(status),
        }))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.check_read(&request, "GetStatus")?;
        let name = request.into_inner().service;
        let services = if name.is_empty() {
            self.supervisor.services().map(|s| s.status()).collect()
        } else {
            vec![self.supervisor.service(&name)?.status()]
        };
        Ok(Response::new(pb::GetStatusResponse { services }))
    }

    type WatchEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.check_read(&request, "WatchEvents")?;
        use tokio_stream::StreamExt;
        let service = request.into_inner().service;
        if !service.is_empty() {
            self.supervisor.service(&service)?;
        }
        let events = tokio_stream::wrappers::BroadcastStream::new(self.supervisor.events.subscribe())
            .filter_map(move |event| match event {
                Ok(event) if service.is_empty() || event.service == service => Some(Ok(event)),
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(Status::resource_exhausted(format!(
                        "this watcher fell {n} events behind and was dropped; watch again and read GetStatus"
                    ))))
                }
            })
            // After a lag error the stream ends: a watcher must not believe
            // it saw every event.
            .map_while({
                let mut ended = false;
                move |item| {
                    if ended {
                        return None;
                    }
                    ended = item.is_err();
                    Some(item)
                }
            })
            .map(Some)
            // The agent re-executing itself ends the stream.
            .merge(
                tokio_stream::wrappers::WatchStream::new(self.supervisor.events.closing())
                    .filter(|closing| *closing)
                    .map(|_| None),
            )
            .map_while(|item| item);
        Ok(Response::new(Box::pin(events)))
    }
}

#[tonic::async_trait]
impl pb::lease_service_server::LeaseService for AgentApi {
    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "AcquireLease");
        let request = request.into_inner();
        let rollout = describe_lease_ref(request.r#ref.as_ref());
        let result = allowed.and_then(|()| self.leases.acquire(request));
        self.audit(
            &identity,
            "AcquireLease",
            "",
            &rollout,
            "",
            audit_result(&result),
        );
        result.map(Response::new)
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        // Renewals are frequent and change no holder: checked, not audited.
        self.authorize(&request, Right::Deploy, "RenewLease").1?;
        self.leases.renew(request.into_inner()).map(Response::new)
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let (identity, allowed) = self.authorize(&request, Right::Deploy, "ReleaseLease");
        let request = request.into_inner();
        let rollout = describe_lease_ref(request.r#ref.as_ref());
        let result = allowed.and_then(|()| self.leases.release(request));
        self.audit(
            &identity,
            "ReleaseLease",
            "",
            &rollout,
            "",
            audit_result(&result),
        );
        result.map(|()| Response::new(pb::ReleaseLeaseResponse {}))
    }

    async fn get_lease(
        &self,
        request: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::GetLeaseResponse>, Status> {
        self.check_read(&request, "GetLease")?;
        Ok(Response::new(self.leases.get()))
    }
}
