//! The manifest: the signed statement about one artifact file.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::version::parse_version;

/// What a signer states about a file. Its JSON form is the DSSE payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The service the file may run as; becomes part of paths on the agent,
    /// so [`validate_service_name`] restricts it.
    pub service: String,
    /// Normalized semver (`1.4` is stored as `1.4.0`).
    pub version: String,
    /// sha256 of the file, 64 lowercase hex digits.
    pub sha256: String,
    /// Exact file size in bytes; the agent stops an upload that goes past it.
    pub size: u64,
    /// `std::env::consts::OS` of the target, or `any`.
    pub os: String,
    /// `std::env::consts::ARCH` of the target, or `any`.
    pub arch: String,
    /// RFC 3339, UTC (`2026-11-26T18:51:08Z`).
    pub created: String,
    /// RFC 3339, UTC. The agent refuses the manifest after this instant, so a
    /// leaked old signed build cannot be replayed forever.
    pub expires: String,
    /// The signer allows activating this build below an agent's downgrade
    /// floor (highest version ever activated). Absent means no.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("service name {0:?} is not allowed: use 1-64 characters of A-Z a-z 0-9 . _ - and do not start with a dot")]
    ServiceName(String),
    #[error("{0}")]
    Version(String),
    #[error("sha256 {0:?} is not 64 lowercase hex digits")]
    Sha256(String),
    #[error("{field} {value:?} is not an RFC 3339 UTC time such as 2026-11-26T18:51:08Z")]
    Time { field: &'static str, value: String },
    #[error("expires ({expires}) is not after created ({created})")]
    ExpiresBeforeCreated { created: String, expires: String },
    #[error("{field} {value:?} is not allowed: use lowercase letters, digits and _ (like linux, x86_64) or \"any\"")]
    Platform { field: &'static str, value: String },
}

/// Service names end up in file names, log lines and metric labels.
pub fn validate_service_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::ServiceName(name.to_string()))
    }
}

/// sha256 hex as the API and the store use it.
pub fn validate_sha256_hex(text: &str) -> Result<(), ManifestError> {
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(ManifestError::Sha256(text.to_string()))
    }
}

fn validate_platform(field: &'static str, value: &str) -> Result<(), ManifestError> {
    let ok = !value.is_empty()
        && value.len() <= 32
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ManifestError::Platform {
            field,
            value: value.to_string(),
        })
    }
}

pub fn format_time(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

pub fn parse_time(field: &'static str, value: &str) -> Result<SystemTime, ManifestError> {
    humantime::parse_rfc3339(value).map_err(|_| ManifestError::Time {
        field,
        value: value.to_string(),
    })
}

impl Manifest {
    /// A manifest for a file of `size` bytes hashing to `sha256`, valid from
    /// `now` for `valid_for`, for this machine's os/arch.
    pub fn new(
        service: &str,
        version: &str,
        sha256: &str,
        size: u64,
        now: SystemTime,
        valid_for: Duration,
    ) -> Result<Manifest, ManifestError> {
        let version = parse_version(version).map_err(ManifestError::Version)?;
        let manifest = Manifest {
            service: service.to_string(),
            version: version.to_string(),
            sha256: sha256.to_string(),
            size,
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            created: format_time(now),
            expires: format_time(now + valid_for),
            allow_downgrade: false,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks every field's form (not the signature, not expiry).
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_service_name(&self.service)?;
        let version = parse_version(&self.version).map_err(ManifestError::Version)?;
        if version.to_string() != self.version {
            return Err(ManifestError::Version(format!(
                "version {:?} is not normalized (expected {:?}); sign it again with reloadctl sign",
                self.version,
                version.to_string()
            )));
        }
        validate_sha256_hex(&self.sha256)?;
        validate_platform("os", &self.os)?;
        validate_platform("arch", &self.arch)?;
        let created = self.created_at()?;
        let expires = self.expires_at()?;
        if expires <= created {
            return Err(ManifestError::ExpiresBeforeCreated {
                created: self.created.clone(),
                expires: self.expires.clone(),
            });
        }
        Ok(())
    }

    pub fn created_at(&self) -> Result<SystemTime, ManifestError> {
        parse_time("created", &self.created)
    }

    pub fn expires_at(&self) -> Result<SystemTime, ManifestError> {
        parse_time("expires", &self.expires)
    }

    pub fn semver(&self) -> semver::Version {
        // validate() has checked it parses; a manifest that was never
        // validated falls back to 0.0.0 rather than panicking.
        parse_version(&self.version).unwrap_or(semver::Version::new(0, 0, 0))
    }

    /// True when the file runs on this machine.
    pub fn matches_this_platform(&self) -> bool {
        (self.os == "any" || self.os == std::env::consts::OS)
            && (self.arch == "any" || self.arch == std::env::consts::ARCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_that_could_escape_a_path_are_refused() {
        for bad in [
            "",
            "a/b",
            "..",
            "../x",
            ".hidden",
            "a\0b",
            "sp ace",
            &"x".repeat(65),
        ] {
            assert!(validate_service_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["web", "api-v2", "db_1.main"] {
            validate_service_name(good).unwrap();
        }
    }

    #[test]
    fn new_normalizes_the_version_and_validates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let m = Manifest::new(
            "web",
            "1.4",
            &"a".repeat(64),
            10,
            now,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(m.version, "1.4.0");
        assert_eq!(m.created, "2027-01-15T08:00:00Z");
        assert_eq!(m.expires, "2027-01-15T08:01:00Z");
        m.validate().unwrap();
        let mut bad = m.clone();
        bad.sha256 = "A".repeat(64);
        assert!(matches!(bad.validate(), Err(ManifestError::Sha256(_))));
        let mut bad = m;
        bad.expires = bad.created.clone();
        assert!(matches!(
            bad.validate(),
            Err(ManifestError::ExpiresBeforeCreated { .. })
        ));
    }
}
