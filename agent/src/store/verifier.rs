//! [`ArtifactVerifier`]: the one set of rules an artifact must pass on this
//! agent, whoever asks. An upload checks the envelope before it accepts a
//! byte; an activation, a crash restart, `ValidateArtifact` and
//! `UpgradeAgent` check the stored file again before they use it. They all
//! call this type, so the rules (trusted keys and thresholds, expiry,
//! platform, the agent's size limit, the service the artifact is signed for,
//! the bytes against the signed hash) cannot drift apart, and every refusal
//! is counted in `reload_agent_verification_failures_total` by reason.
//!
//! The signature rules themselves live in `reload-artifact`, shared with
//! `reloadctl verify`; this type adds what only the agent knows (its
//! config's limits, what its store holds).
//!
//! What is executed comes from [`ArtifactVerifier::sealed`]: the stored
//! bytes verified into a [`SealedImage`] (see there for why), kept for as
//! long as a service pins the artifact, so the hash is computed once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use reload_artifact::verify::check_platform;
use reload_artifact::{TrustedKeys, VerifiedManifest, VerifyError};

use super::{ArtifactStore, SealedImage, StoreError, StoredArtifact};
use crate::metrics::SharedMetrics;

/// Why the agent is about to run an artifact: expiry is an admission rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// An upload, an activation, an upgrade: every rule, expiry included.
    New,
    /// A version this agent admitted before, started again by the agent
    /// itself (a crash restart, a start after an agent restart or a
    /// reboot, a crash-loop revert): every rule but expiry. A manifest's
    /// expiry bounds how long a signed release may be *admitted* (so a
    /// frozen or replayed old release cannot be pushed), not how long an
    /// admitted one may keep serving: otherwise a healthy service becomes
    /// an outage at its first crash after the expiry.
    Readmitted,
}

/// Why an artifact may not be used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactRejected {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("artifact {service} {version} is {size} bytes, above this agent's max_artifact_size of {limit} bytes; raise [limits] max_artifact_size in the agent config")]
    TooLarge {
        service: String,
        version: String,
        size: u64,
        limit: u64,
    },
    #[error("this agent holds no artifact with sha256 {0}; upload it first (reloadctl upload)")]
    NotStored(String),
    #[error("{}", wrong_service(.sha256, .service, .version, .expected))]
    WrongService {
        sha256: String,
        service: String,
        version: String,
        expected: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the verification task failed: {0}")]
    Task(String),
}

fn wrong_service(sha256: &str, service: &str, version: &str, expected: &str) -> String {
    if expected == crate::selfupgrade::AGENT_SERVICE {
        format!("artifact {sha256} is {service} {version}, not an agent artifact: sign agent builds for service \"{expected}\"")
    } else {
        format!("artifact {sha256} is signed for service {service:?} ({version}), not {expected:?}")
    }
}

impl ArtifactRejected {
    /// The metric label of a refusal.
    fn reason(&self) -> &'static str {
        match self {
            ArtifactRejected::Verify(err) | ArtifactRejected::Store(StoreError::Verify(err)) => {
                verify_reason(err)
            }
            ArtifactRejected::TooLarge { .. } => "too_large",
            ArtifactRejected::NotStored(_) => "not_stored",
            ArtifactRejected::WrongService { .. } => "wrong_service",
            ArtifactRejected::Store(StoreError::Damaged { .. }) => "content_mismatch",
            ArtifactRejected::Store(_) | ArtifactRejected::Task(_) => "store_error",
        }
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

/// See the module docs. Cheap to share: everything inside is an `Arc` or
/// small.
pub struct ArtifactVerifier {
    store: Arc<ArtifactStore>,
    trusted: TrustedKeys,
    max_artifact_bytes: u64,
    metrics: SharedMetrics,
    /// The sealed images made so far, by sha256 (see [`Self::keep_images`]).
    images: Mutex<HashMap<String, Arc<SealedImage>>>,
}

impl ArtifactVerifier {
    pub fn new(
        store: Arc<ArtifactStore>,
        trusted: TrustedKeys,
        max_artifact_bytes: u64,
        metrics: SharedMetrics,
    ) -> ArtifactVerifier {
        ArtifactVerifier {
            store,
            trusted,
            max_artifact_bytes,
            metrics,
            images: Mutex::new(HashMap::new()),
        }
    }

    /// A stored artifact as [`Self::check_stored`] checks it (envelope,
    /// size limit, service), and its bytes as a [`SealedImage`]: the one
    /// thing the agent executes. The image is made (copied and hashed) the
    /// first time and kept; a copy whose hash is not the signed one is
    /// refused as damaged, and nothing is kept.
    pub async fn sealed(
        &self,
        sha256: &str,
        service: Option<&str>,
        admission: Admission,
    ) -> Result<(StoredArtifact, Arc<SealedImage>), ArtifactRejected> {
        let cached = self
            .images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned();
        let (store, trusted, limit) = (
            self.store.clone(),
            self.trusted.clone(),
            self.max_artifact_bytes,
        );
        let (sha, service) = (sha256.to_string(), service.map(str::to_string));
        let checked = tokio::task::spawn_blocking(move || {
            let (stored, _) = check_entry(&store, &trusted, limit, &sha, service, admission)?;
            if let Some(image) = cached {
                return Ok((stored, image));
            }
            let manifest = &stored.manifest;
            let name = format!("{}-{}", manifest.service, manifest.version);
            let copied = SealedImage::copy_verified(&stored.path, &name, &sha, manifest.size)
                .map_err(|source| StoreError::Io {
                    doing: format!("copying artifact {sha} into a sealed image"),
                    source,
                })?;
            match copied {
                Ok(image) => Ok((stored, Arc::new(image))),
                Err((found, size)) => Err(ArtifactRejected::Store(StoreError::Damaged {
                    sha256: sha.clone(),
                    detail: format!(
                        "the stored file now hashes to {found} ({size} bytes), not the signed {sha} ({} bytes): it was changed after upload",
                        manifest.size
                    ),
                })),
            }
        })
        .await
        .unwrap_or_else(|err| Err(ArtifactRejected::Task(err.to_string())));
        let (stored, image) = self.counted(checked)?;
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sha256.to_string())
            .or_insert_with(|| image.clone());
        Ok((stored, image))
    }

    /// Drops the sealed images of artifacts no service pins any more (they
    /// hold memory: one copy of each binary).
    pub fn keep_images(&self, pinned: &HashSet<String>) {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|sha, _| pinned.contains(sha));
    }

    pub fn store(&self) -> &Arc<ArtifactStore> {
        &self.store
    }

    /// Every check an envelope must pass on this agent: signatures by
    /// trusted keys, expiry, platform, and the size limit.
    pub fn check_envelope(&self, envelope: &[u8]) -> Result<VerifiedManifest, ArtifactRejected> {
        self.counted(check_envelope(
            &self.trusted,
            self.max_artifact_bytes,
            envelope,
        ))
    }

    /// A stored artifact, checked now as at upload (envelope, size limit,
    /// the file's bytes against the signed hash) and, with `service`, signed
    /// for that service. Runs off the async threads: it reads the file.
    pub async fn check_stored(
        &self,
        sha256: &str,
        service: Option<&str>,
    ) -> Result<(StoredArtifact, VerifiedManifest), ArtifactRejected> {
        let (store, trusted, limit) = (
            self.store.clone(),
            self.trusted.clone(),
            self.max_artifact_bytes,
        );
        let (sha256, service) = (sha256.to_string(), service.map(str::to_string));
        let checked = tokio::task::spawn_blocking(move || {
            let (stored, verified) =
                check_entry(&store, &trusted, limit, &sha256, service, Admission::New)?;
            store.check_stored_content(&stored)?;
            Ok((stored, verified))
        })
        .await
        .unwrap_or_else(|err| Err(ArtifactRejected::Task(err.to_string())));
        self.counted(checked)
    }

    fn counted<T>(&self, result: Result<T, ArtifactRejected>) -> Result<T, ArtifactRejected> {
        if let Err(err) = &result {
            tracing::warn!(error = %err, "artifact rejected");
            self.metrics
                .verification_failures
                .get_or_create(&crate::metrics::Reason {
                    reason: err.reason().into(),
                })
                .inc();
        }
        result
    }
}

/// The stored entry of `sha256` and its envelope, checked (not its bytes).
fn check_entry(
    store: &ArtifactStore,
    trusted: &TrustedKeys,
    limit: u64,
    sha256: &str,
    service: Option<String>,
    admission: Admission,
) -> Result<(StoredArtifact, VerifiedManifest), ArtifactRejected> {
    let stored = match store.stat(sha256, service.as_deref())? {
        Some(stored) => stored,
        None => {
            // Stored for another service only: say so.
            let other = store.stat(sha256, None)?;
            return Err(match (other, service) {
                (Some(other), Some(expected)) => ArtifactRejected::WrongService {
                    sha256: sha256.to_string(),
                    service: other.manifest.service,
                    version: other.manifest.version,
                    expected,
                },
                _ => ArtifactRejected::NotStored(sha256.to_string()),
            });
        }
    };
    let envelope = store.envelope_bytes(sha256, &stored.manifest.service)?;
    let verified = match check_envelope(trusted, limit, &envelope) {
        Err(ArtifactRejected::Verify(VerifyError::Expired {
            ref service,
            ref version,
            ref expires,
            ..
        })) if admission == Admission::Readmitted && humantime::parse_rfc3339(expires).is_ok() => {
            // Every other rule again, as of the instant it expired.
            let at = humantime::parse_rfc3339(expires).expect("checked in the guard");
            tracing::info!(%service, %version, %expires, "starting an admitted release again although its manifest has expired since (expiry is checked when a release is admitted)");
            check_envelope_at(trusted, limit, &envelope, at)?
        }
        other => other?,
    };
    if let Some(expected) = service {
        if verified.manifest.service != expected {
            return Err(ArtifactRejected::WrongService {
                sha256: sha256.to_string(),
                service: verified.manifest.service,
                version: verified.manifest.version,
                expected,
            });
        }
    }
    Ok((stored, verified))
}

fn check_envelope(
    trusted: &TrustedKeys,
    limit: u64,
    envelope: &[u8],
) -> Result<VerifiedManifest, ArtifactRejected> {
    check_envelope_at(trusted, limit, envelope, SystemTime::now())
}

fn check_envelope_at(
    trusted: &TrustedKeys,
    limit: u64,
    envelope: &[u8],
    now: SystemTime,
) -> Result<VerifiedManifest, ArtifactRejected> {
    let verified = trusted.verify_envelope(envelope, now)?;
    check_platform(&verified.manifest)?;
    if verified.manifest.size > limit {
        return Err(ArtifactRejected::TooLarge {
            service: verified.manifest.service,
            version: verified.manifest.version,
            size: verified.manifest.size,
            limit,
        });
    }
    Ok(verified)
}
