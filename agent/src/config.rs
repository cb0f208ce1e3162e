//! The agent's TOML config: what it listens on, which keys it trusts, where
//! it stores artifacts and the limits that keep a client from exhausting it.
//!
//! Relative paths are resolved against the config file's own folder, so a
//! config and its keys can be moved together. Every setting but the trusted
//! keys has a default that works on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytesize::ByteSize;
use reload_artifact::{PublicKey, TrustedKeys};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    limits: LimitsSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AgentSection {
    /// gRPC addresses.
    listen: Vec<SocketAddr>,
    store_dir: PathBuf,
    /// SPKI PEM files of the keys whose signatures are accepted.
    trusted_keys: Vec<PathBuf>,
    keep_versions: usize,
    /// How far a signer's clock may be ahead before a manifest counts as
    /// expired here.
    #[serde(with = "humantime_serde")]
    clock_skew: Duration,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7700))],
            store_dir: PathBuf::from("store"),
            trusted_keys: Vec::new(),
            keep_versions: 3,
            clock_skew: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    max_artifact_size: ByteSize,
    max_chunk_size: ByteSize,
    max_concurrent_uploads: usize,
    /// An upload that sends nothing for this long is cut off.
    #[serde(with = "humantime_serde")]
    upload_idle_timeout: Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_artifact_size: ByteSize::gib(1),
            max_chunk_size: ByteSize::mib(1),
            max_concurrent_uploads: 4,
            upload_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// The checked, resolved config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: Vec<SocketAddr>,
    pub store_dir: PathBuf,
    pub trusted_keys: TrustedKeys,
    pub keep_versions: usize,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_artifact_bytes: u64,
    pub max_chunk_bytes: u64,
    pub max_concurrent_uploads: usize,
    pub upload_idle_timeout: Duration,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agent config {}", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        AgentConfig::parse(&text, base)
            .with_context(|| format!("agent config {} is not valid", path.display()))
    }

    /// Parses config text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<AgentConfig> {
        let file: ConfigFile = toml::from_str(text)?;
        let agent = file.agent;
        let limits = file.limits;
        if agent.listen.is_empty() {
            bail!("[agent] listen is empty: give at least one address, e.g. listen = [\"127.0.0.1:7700\"]");
        }
        if agent.trusted_keys.is_empty() {
            bail!("[agent] trusted_keys is empty: the agent would refuse every artifact; list the public key files (from `reloadctl keygen`), e.g. trusted_keys = [\"release.pub\"]");
        }
        if agent.keep_versions == 0 {
            bail!("[agent] keep_versions must be at least 1");
        }
        let mut keys = Vec::new();
        for path in &agent.trusted_keys {
            let key = PublicKey::load(&base.join(path))
                .with_context(|| format!("[agent] trusted_keys entry {}", path.display()))?;
            keys.push(key);
        }
        let max_chunk_bytes = limits.max_chunk_size.as_u64();
        if !(1024..=16 * 1024 * 1024).contains(&max_chunk_bytes) {
            bail!(
                "[limits] max_chunk_size must be between 1 KiB and 16 MiB, not {}",
                limits.max_chunk_size
            );
        }
        if limits.max_concurrent_uploads == 0 {
            bail!("[limits] max_concurrent_uploads must be at least 1");
        }
        if limits.upload_idle_timeout.is_zero() {
            bail!("[limits] upload_idle_timeout must be above zero");
        }
        Ok(AgentConfig {
            listen: agent.listen,
            store_dir: base.join(agent.store_dir),
            trusted_keys: TrustedKeys::new(keys, agent.clock_skew),
            keep_versions: agent.keep_versions,
            limits: Limits {
                max_artifact_bytes: limits.max_artifact_size.as_u64(),
                max_chunk_bytes,
                max_concurrent_uploads: limits.max_concurrent_uploads,
                upload_idle_timeout: limits.upload_idle_timeout,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(dir: &Path) {
        let key = reload_artifact::SigningKey::generate();
        std::fs::write(dir.join("release.pub"), key.public().to_pem()).unwrap();
    }

    #[test]
    fn minimal_config_gets_loopback_defaults() {
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let config =
            AgentConfig::parse("[agent]\ntrusted_keys = [\"release.pub\"]\n", dir.path()).unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:7700".parse().unwrap()]);
        assert_eq!(config.store_dir, dir.path().join("store"));
        assert_eq!(config.limits.max_chunk_bytes, 1024 * 1024);
        assert_eq!(config.trusted_keys.ids().len(), 1);
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let err = AgentConfig::parse("[agent]\n", dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("trusted_keys is empty"),
            "{err:#}"
        );
        let err = AgentConfig::parse("[agent]\nlisen = []\n", dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
        let err = AgentConfig::parse("[agent]\ntrusted_keys = [\"missing.pub\"]\n", dir.path())
            .unwrap_err();
        assert!(format!("{err:#}").contains("missing.pub"), "{err:#}");
        let err = AgentConfig::parse(
            "[agent]\ntrusted_keys = [\"release.pub\"]\n[limits]\nmax_chunk_size = \"64 MiB\"\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("max_chunk_size"), "{err:#}");
    }
}
