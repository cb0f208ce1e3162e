//! Signed artifacts: what is signed, how, and how it is checked.
//!
//! An artifact is a file plus a [`Manifest`] (service, version, sha256, size,
//! os, arch, created, expires). The manifest travels as a DSSE envelope
//! ([`dsse`]) signed with Ed25519 keys stored as PKCS#8 / SPKI PEM ([`keys`]),
//! the same files `openssl genpkey -algorithm ed25519` writes. [`verify`]
//! holds the one policy both the agent and `reloadctl verify` apply.
//!
//! Layout:
//! - [`version`]: semver parsing where `1.4` means `1.4.0`.
//! - [`manifest`]: the signed statement and its field rules.
//! - [`keys`]: key files, key ids, key generation.
//! - [`dsse`]: the envelope format and its pre-authentication encoding.
//! - [`verify`]: trusted keys and the checks, with errors that say what to do.
//!
//! This crate touches no network and no store: the agent owns the store,
//! the CLI owns the user's files. It forbids unsafe code.
#![forbid(unsafe_code)]

pub mod dsse;
pub mod keys;
pub mod manifest;
pub mod verify;
pub mod version;

pub use dsse::{Envelope, PAYLOAD_TYPE};
pub use keys::{key_id, KeyError, PublicKey, SigningKey};
pub use manifest::{Manifest, ManifestError};
pub use verify::{TrustedKeys, VerifiedManifest, VerifyError};

/// Largest envelope accepted anywhere. Real ones are well under 2 KiB; the
/// bound keeps a hostile client from making the agent parse megabytes of JSON.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

/// The file name `reloadctl sign` writes beside the artifact.
pub fn envelope_path_for(artifact: &std::path::Path) -> std::path::PathBuf {
    let mut name = artifact.as_os_str().to_owned();
    name.push(".dsse.json");
    std::path::PathBuf::from(name)
}
