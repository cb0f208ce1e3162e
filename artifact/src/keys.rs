//! Ed25519 key files and key ids.
//!
//! Private keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) and public keys
//! SPKI PEM (`-----BEGIN PUBLIC KEY-----`): exactly what
//! `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write, so
//! teams keep their tooling and HSM exports. A key id is the sha256 of the
//! public key's SPKI DER encoding in hex: derived, never chosen, so a signer
//! cannot claim another key's id.

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::Signer;
use pkcs8::spki;
use sha2::{Digest, Sha256};

const OID_ED25519: &str = "1.3.101.112";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The I/O error is part of the message and deliberately not a
    /// `source`: an error chain printed whole (`{:#}`) would say it twice.
    #[error("cannot read key file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} is not a PEM file ({detail}); expected a file starting with -----BEGIN {expected}-----")]
    NotPem {
        path: String,
        expected: &'static str,
        detail: String,
    },
    #[error("{path} holds a {found} key, but only Ed25519 keys are supported; make one with `reloadctl keygen` or `openssl genpkey -algorithm ed25519`")]
    NotEd25519 { path: String, found: String },
    #[error("{path} is a {found}, but a {expected} is needed here{hint}")]
    WrongKind {
        path: String,
        found: String,
        expected: &'static str,
        hint: &'static str,
    },
    #[error("{path} is not a valid Ed25519 {expected}: {detail}")]
    Invalid {
        path: String,
        expected: &'static str,
        detail: String,
    },
}

/// Names the algorithm of an OID the way people know it.
fn algorithm_name(oid: &str) -> String {
    match oid {
        "1.2.840.113549.1.1.1" => "RSA".into(),
        "1.2.840.10045.2.1" => "ECDSA (EC)".into(),
        "1.3.101.110" => "X25519".into(),
        "1.3.101.111" => "X448".into(),
        "1.3.101.113" => "Ed448".into(),
        "1.2.840.10040.4.1" => "DSA".into(),
        other => format!("non-Ed25519 (algorithm OID {other})"),
    }
}

/// The key id of a public key: hex sha256 of its SPKI DER encoding.
pub fn key_id(key: &ed25519_dalek::VerifyingKey) -> String {
    let der = key
        .to_public_key_der()
        .expect("encoding a 32-byte Ed25519 key as SPKI DER cannot fail");
    hex::encode(Sha256::digest(der.as_bytes()))
}

fn decode_pem(
    path: &str,
    text: &str,
    expected: &'static str,
) -> Result<(String, Vec<u8>), KeyError> {
    let (label, der) =
        pkcs8::der::pem::decode_vec(text.trim().as_bytes()).map_err(|err| KeyError::NotPem {
            path: path.to_string(),
            expected,
            detail: err.to_string(),
        })?;
    Ok((label.to_string(), der))
}

/// Explains a PEM label that is not the one wanted.
fn wrong_label(path: &str, label: &str, expected: &'static str) -> KeyError {
    match label {
        "RSA PRIVATE KEY" | "RSA PUBLIC KEY" => KeyError::NotEd25519 {
            path: path.into(),
            found: "RSA".into(),
        },
        "EC PRIVATE KEY" => KeyError::NotEd25519 {
            path: path.into(),
            found: "ECDSA (EC)".into(),
        },
        "OPENSSH PRIVATE KEY" => KeyError::WrongKind {
            path: path.into(),
            found: "OpenSSH private key".into(),
            expected,
            hint: "; convert it with `ssh-keygen -p -m PKCS8 -f KEY` or make one with `reloadctl keygen`",
        },
        "PUBLIC KEY" => KeyError::WrongKind {
            path: path.into(),
            found: "public key".into(),
            expected,
            hint: "; signing needs the private key file (`.key`, from `reloadctl keygen`)",
        },
        "PRIVATE KEY" => KeyError::WrongKind {
            path: path.into(),
            found: "private key".into(),
            expected,
            hint: "; give the public key (`.pub`), made with `openssl pkey -pubout` or `reloadctl keygen`",
        },
        "CERTIFICATE" => KeyError::WrongKind {
            path: path.into(),
            found: "certificate".into(),
            expected,
            hint: "",
        },
        other => KeyError::WrongKind {
            path: path.into(),
            found: format!("PEM block labelled {other:?}"),
            expected,
            hint: "",
        },
    }
}

/// An Ed25519 private key with its key id.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> SigningKey {
        let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        SigningKey::from_dalek(key)
    }

    fn from_dalek(key: ed25519_dalek::SigningKey) -> SigningKey {
        let id = key_id(&key.verifying_key());
        SigningKey { key, id }
    }

    pub fn from_pem(path: &str, text: &str) -> Result<SigningKey, KeyError> {
        const EXPECTED: &str = "PRIVATE KEY";
        let (label, der) = decode_pem(path, text, EXPECTED)?;
        if label != EXPECTED {
            return Err(wrong_label(path, &label, "Ed25519 private key (PKCS#8)"));
        }
        let info =
            pkcs8::PrivateKeyInfo::try_from(der.as_slice()).map_err(|err| KeyError::Invalid {
                path: path.into(),
                expected: "private key (PKCS#8)",
                detail: err.to_string(),
            })?;
        let oid = info.algorithm.oid.to_string();
        if oid != OID_ED25519 {
            return Err(KeyError::NotEd25519 {
                path: path.into(),
                found: algorithm_name(&oid),
            });
        }
        let key =
            ed25519_dalek::SigningKey::from_pkcs8_der(&der).map_err(|err| KeyError::Invalid {
                path: path.into(),
                expected: "private key (PKCS#8)",
                detail: err.to_string(),
            })?;
        Ok(SigningKey::from_dalek(key))
    }

    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| KeyError::Read {
            path: shown.clone(),
            error,
        })?;
        SigningKey::from_pem(&shown, &text)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from_dalek(self.key.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// PKCS#8 PEM, as `openssl genpkey -algorithm ed25519` writes it.
    pub fn to_pem(&self) -> String {
        self.key
            .to_pkcs8_pem(pkcs8::LineEnding::LF)
            .expect("encoding an Ed25519 key as PKCS#8 cannot fail")
            .to_string()
    }
}

/// An Ed25519 public key with its key id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
    id: String,
}

impl PublicKey {
    fn from_dalek(key: ed25519_dalek::VerifyingKey) -> PublicKey {
        let id = key_id(&key);
        PublicKey { key, id }
    }

    pub fn from_pem(path: &str, text: &str) -> Result<PublicKey, KeyError> {
        const EXPECTED: &str = "PUBLIC KEY";
        let (label, der) = decode_pem(path, text, EXPECTED)?;
        if label != EXPECTED {
            return Err(wrong_label(path, &label, "Ed25519 public key (SPKI)"));
        }
        let info = spki::SubjectPublicKeyInfoRef::try_from(der.as_slice()).map_err(|err| {
            KeyError::Invalid {
                path: path.into(),
                expected: "public key (SPKI)",
                detail: err.to_string(),
            }
        })?;
        let oid = info.algorithm.oid.to_string();
        if oid != OID_ED25519 {
            return Err(KeyError::NotEd25519 {
                path: path.into(),
                found: algorithm_name(&oid),
            });
        }
        let key = ed25519_dalek::VerifyingKey::from_public_key_der(&der).map_err(|err| {
            KeyError::Invalid {
                path: path.into(),
                expected: "public key (SPKI)",
                detail: err.to_string(),
            }
        })?;
        Ok(PublicKey::from_dalek(key))
    }

    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| KeyError::Read {
            path: shown.clone(),
            error,
        })?;
        PublicKey::from_pem(&shown, &text)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Strict verification (rejects small-order keys and non-canonical
    /// signatures), so one signature has exactly one valid encoding.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 64]>::try_from(signature) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        self.key.verify_strict(message, &signature).is_ok()
    }

    /// SPKI PEM, as `openssl pkey -pubout` writes it.
    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(pkcs8::LineEnding::LF)
            .expect("encoding an Ed25519 key as SPKI cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_the_key_id() {
        let key = SigningKey::generate();
        let again = SigningKey::from_pem("k", &key.to_pem()).unwrap();
        assert_eq!(key.id(), again.id());
        let public = PublicKey::from_pem("p", &key.public().to_pem()).unwrap();
        assert_eq!(public.id(), key.id());
        assert_eq!(key.id().len(), 64);
        let sig = key.sign(b"hello");
        assert!(public.verify(b"hello", &sig));
        assert!(!public.verify(b"hellO", &sig));
    }

    #[test]
    fn swapped_files_get_a_hint() {
        let key = SigningKey::generate();
        let err = SigningKey::from_pem("release.pub", &key.public().to_pem()).unwrap_err();
        assert!(
            err.to_string().contains("signing needs the private key"),
            "{err}"
        );
        let err = PublicKey::from_pem("release.key", &key.to_pem()).unwrap_err();
        assert!(err.to_string().contains("give the public key"), "{err}");
        let err = PublicKey::from_pem("junk", "hello").unwrap_err();
        assert!(err.to_string().contains("not a PEM file"), "{err}");
    }
}
