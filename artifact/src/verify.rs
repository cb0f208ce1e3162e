//! The one verification policy, shared by the agent and `reloadctl verify`.
//!
//! Order matters: the envelope's structure is checked, then its signatures
//! over the raw payload bytes, and only then is the payload parsed as a
//! manifest (DSSE's "verify, then parse"), so no untrusted JSON reaches the
//! manifest parser. Each failure is its own [`VerifyError`] variant so the
//! agent can map it to the right gRPC status and a person can act on it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::dsse::{pae, Envelope, PAYLOAD_TYPE};
use crate::keys::PublicKey;
use crate::manifest::{Manifest, ManifestError};
use crate::MAX_ENVELOPE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("envelope is not valid DSSE JSON: {0}")]
    Malformed(String),
    #[error("envelope payloadType is {found:?}, expected {PAYLOAD_TYPE:?}: this is not a reload manifest")]
    WrongPayloadType { found: String },
    #[error("envelope has no signature: sign it with `reloadctl sign --key KEY ...`")]
    NoSignature,
    #[error("envelope is signed only by untrusted key(s) {key_ids:?}; the trusted keys are {trusted:?}: sign with a trusted key or add its public key to the trust list")]
    UntrustedKey {
        key_ids: Vec<String>,
        trusted: Vec<String>,
    },
    #[error("signature by trusted key {key_id} does not match the payload: the envelope was altered after signing or signed over other content")]
    BadSignature { key_id: String },
    #[error(
        "envelope is signed only by revoked key(s) {key_ids:?}: sign it again with a current key"
    )]
    RevokedKey { key_ids: Vec<String> },
    #[error("{service} needs signatures by {need} distinct trusted keys, found {have} ({key_ids:?}): add signatures (reloadctl sign --key A --key B)")]
    BelowThreshold {
        service: String,
        need: usize,
        have: usize,
        key_ids: Vec<String>,
    },
    #[error("payload is not a manifest: {0}")]
    PayloadNotManifest(String),
    #[error("manifest is invalid: {0}")]
    InvalidManifest(#[from] ManifestError),
    #[error("manifest for {service} {version} expired at {expires}, {ago} ago: sign the artifact again to renew it")]
    Expired {
        service: String,
        version: String,
        expires: String,
        ago: String,
    },
    #[error("artifact is built for {os}/{arch}, but this host is {host_os}/{host_arch}")]
    WrongPlatform {
        os: String,
        arch: String,
        host_os: &'static str,
        host_arch: &'static str,
    },
    #[error("file does not match its manifest: {0}")]
    ContentMismatch(String),
}

/// A manifest whose envelope passed every check.
#[derive(Clone, Debug)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    /// Trusted keys whose signatures verified.
    pub key_ids: Vec<String>,
}

/// The public keys whose signatures are accepted, by key id.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
    /// Tolerated clock difference between signer and verifier for expiry.
    clock_skew: Duration,
    /// Key ids whose signatures never count, trusted or not.
    revoked: std::collections::BTreeSet<String>,
    /// Per service, how many distinct trusted keys must have signed.
    thresholds: BTreeMap<String, usize>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>, clock_skew: Duration) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.id().to_string(), k)).collect(),
            clock_skew,
            revoked: Default::default(),
            thresholds: Default::default(),
        }
    }

    /// Signatures by these key ids never count (a leaked key).
    pub fn with_revoked(mut self, key_ids: impl IntoIterator<Item = String>) -> TrustedKeys {
        self.revoked = key_ids.into_iter().collect();
        self
    }

    /// `service` needs signatures by `count` distinct trusted keys.
    pub fn with_threshold(mut self, service: &str, count: usize) -> TrustedKeys {
        self.thresholds.insert(service.to_string(), count);
        self
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks an envelope: structure, signatures, manifest fields, expiry.
    /// Does not look at the file's bytes (see [`check_content`]) or the
    /// platform (see [`check_platform`]).
    pub fn verify_envelope(
        &self,
        bytes: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedManifest, VerifyError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(VerifyError::Malformed(format!(
                "it is {} bytes, above the {MAX_ENVELOPE_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|err| VerifyError::Malformed(err.to_string()))?;
        if envelope.payload_type != PAYLOAD_TYPE {
            return Err(VerifyError::WrongPayloadType {
                found: envelope.payload_type,
            });
        }
        let payload = BASE64
            .decode(envelope.payload.as_bytes())
            .map_err(|err| VerifyError::Malformed(format!("payload is not base64: {err}")))?;
        if envelope.signatures.is_empty() {
            return Err(VerifyError::NoSignature);
        }
        let message = pae(&envelope.payload_type, &payload);
        let mut verified = Vec::new();
        let mut untrusted = Vec::new();
        let mut revoked = Vec::new();
        let mut bad = None;
        for signature in &envelope.signatures {
            if self.revoked.contains(&signature.keyid) {
                revoked.push(signature.keyid.clone());
                continue;
            }
            let Some(key) = self.keys.get(&signature.keyid) else {
                untrusted.push(signature.keyid.clone());
                continue;
            };
            let sig = BASE64.decode(signature.sig.as_bytes()).unwrap_or_default();
            if key.verify(&message, &sig) {
                if !verified.contains(&signature.keyid) {
                    verified.push(signature.keyid.clone());
                }
            } else {
                bad.get_or_insert_with(|| signature.keyid.clone());
            }
        }
        if verified.is_empty() {
            return Err(match bad {
                Some(key_id) => VerifyError::BadSignature { key_id },
                None if !revoked.is_empty() && untrusted.is_empty() => {
                    VerifyError::RevokedKey { key_ids: revoked }
                }
                None => VerifyError::UntrustedKey {
                    key_ids: untrusted,
                    trusted: self.ids(),
                },
            });
        }
        let manifest: Manifest = serde_json::from_slice(&payload)
            .map_err(|err| VerifyError::PayloadNotManifest(err.to_string()))?;
        manifest.validate()?;
        let need = self.thresholds.get(&manifest.service).copied().unwrap_or(1);
        if verified.len() < need {
            return Err(VerifyError::BelowThreshold {
                service: manifest.service,
                need,
                have: verified.len(),
                key_ids: verified,
            });
        }
        let expires = manifest.expires_at()?;
        if now > expires + self.clock_skew {
            let ago = now.duration_since(expires).unwrap_or_default();
            return Err(VerifyError::Expired {
                service: manifest.service,
                version: manifest.version,
                expires: manifest.expires,
                ago: humantime::format_duration(Duration::from_secs(ago.as_secs())).to_string(),
            });
        }
        Ok(VerifiedManifest {
            manifest,
            key_ids: verified,
        })
    }
}

/// Refuses a manifest built for another os/arch than this host's.
pub fn check_platform(manifest: &Manifest) -> Result<(), VerifyError> {
    if manifest.matches_this_platform() {
        Ok(())
    } else {
        Err(VerifyError::WrongPlatform {
            os: manifest.os.clone(),
            arch: manifest.arch.clone(),
            host_os: std::env::consts::OS,
            host_arch: std::env::consts::ARCH,
        })
    }
}

/// Compares what was received or read against what the manifest states.
pub fn check_content(manifest: &Manifest, sha256_hex: &str, size: u64) -> Result<(), VerifyError> {
    if size != manifest.size {
        return Err(VerifyError::ContentMismatch(format!(
            "{size} bytes, but the manifest says {}; the file changed after signing or was cut short: sign it again or upload it again",
            manifest.size
        )));
    }
    if sha256_hex != manifest.sha256 {
        return Err(VerifyError::ContentMismatch(format!(
            "sha256 is {sha256_hex}, but the manifest says {}; the file changed after signing or in transit: sign it again or upload it again",
            manifest.sha256
        )));
    }
    Ok(())
}

/// Streams a file through sha256 without holding it in memory.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn manifest(now: SystemTime) -> Manifest {
        Manifest::new(
            "web",
            "1.4",
            &"ab".repeat(32),
            3,
            now,
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    #[test]
    fn each_failure_is_told_apart() {
        let now = SystemTime::now();
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let trusted = TrustedKeys::new([key.public()], Duration::from_secs(0));
        let good = Envelope::sign_manifest(&manifest(now), &[&key]).to_json();
        let ok = trusted.verify_envelope(&good, now).unwrap();
        assert_eq!(ok.key_ids, vec![key.id().to_string()]);
        assert_eq!(ok.manifest.version, "1.4.0");

        let by_other = Envelope::sign_manifest(&manifest(now), &[&other]).to_json();
        assert!(matches!(
            trusted.verify_envelope(&by_other, now),
            Err(VerifyError::UntrustedKey { .. })
        ));

        let mut unsigned = Envelope::sign_manifest(&manifest(now), &[&key]);
        unsigned.signatures.clear();
        assert!(matches!(
            trusted.verify_envelope(&unsigned.to_json(), now),
            Err(VerifyError::NoSignature)
        ));

        // A valid signature moved onto another payload.
        let mut moved = Envelope::sign_manifest(&manifest(now), &[&key]);
        let mut m2 = manifest(now);
        m2.version = "9.9.9".into();
        moved.payload = Envelope::sign_manifest(&m2, &[&key]).payload;
        assert!(matches!(
            trusted.verify_envelope(&moved.to_json(), now),
            Err(VerifyError::BadSignature { .. })
        ));

        let not_json = Envelope::sign_payload(PAYLOAD_TYPE, b"not json", &[&key]).to_json();
        assert!(matches!(
            trusted.verify_envelope(&not_json, now),
            Err(VerifyError::PayloadNotManifest(_))
        ));
        let wrong_type = Envelope::sign_payload("text/plain", b"{}", &[&key]).to_json();
        assert!(matches!(
            trusted.verify_envelope(&wrong_type, now),
            Err(VerifyError::WrongPayloadType { .. })
        ));
        assert!(matches!(
            trusted.verify_envelope(b"{", now),
            Err(VerifyError::Malformed(_))
        ));

        let later = now + Duration::from_secs(7200);
        let err = trusted.verify_envelope(&good, later).unwrap_err();
        assert!(err.to_string().contains("ago"), "{err}");
        assert!(matches!(err, VerifyError::Expired { .. }));
        // Within the allowed skew it still passes.
        let lenient = TrustedKeys::new([key.public()], Duration::from_secs(3601));
        lenient.verify_envelope(&good, later).unwrap();
    }

    #[test]
    fn revoked_keys_never_count_and_thresholds_need_distinct_keys() {
        let now = SystemTime::now();
        let (a, b) = (SigningKey::generate(), SigningKey::generate());
        let trusted = TrustedKeys::new([a.public(), b.public()], Duration::ZERO);
        let by_a = Envelope::sign_manifest(&manifest(now), &[&a]).to_json();
        let by_both = Envelope::sign_manifest(&manifest(now), &[&a, &b]).to_json();
        trusted.clone().verify_envelope(&by_a, now).unwrap();
        let revoked = trusted.clone().with_revoked([a.id().to_string()]);
        assert!(matches!(
            revoked.verify_envelope(&by_a, now),
            Err(VerifyError::RevokedKey { .. })
        ));
        assert_eq!(
            revoked.verify_envelope(&by_both, now).unwrap().key_ids,
            vec![b.id().to_string()]
        );
        let two = trusted.with_threshold("web", 2);
        let err = two.verify_envelope(&by_a, now).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::BelowThreshold {
                    need: 2,
                    have: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(two.verify_envelope(&by_both, now).unwrap().key_ids.len(), 2);
        // The same key twice is one key.
        let twice = Envelope::sign_manifest(&manifest(now), &[&a, &a]).to_json();
        assert!(matches!(
            two.verify_envelope(&twice, now),
            Err(VerifyError::BelowThreshold { have: 1, .. })
        ));
    }

    #[test]
    fn content_must_match_exactly() {
        let m = manifest(SystemTime::now());
        check_content(&m, &"ab".repeat(32), 3).unwrap();
        assert!(check_content(&m, &"ab".repeat(32), 4).is_err());
        assert!(check_content(&m, &"cd".repeat(32), 3).is_err());
    }
}
