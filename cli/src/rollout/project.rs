//! `reloadctl.toml`, the project file: which service this project deploys,
//! where its signed releases are, which keys to trust locally, and the
//! rollout defaults. Every setting can be overridden by a `push` flag.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::path::{Path, PathBuf};

use super::settings::RolloutSettings;

pub const DEFAULT_FILE: &str = "reloadctl.toml";

/// The service name agent releases are signed for.
pub const AGENT_SERVICE: &str = "reload-agent";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub service: String,
    /// Path of a release, `{version}` replaced by the version as typed, or
    /// else as normalized (`1.4` then `1.4.0`). Relative to this file.
    pub artifact: String,
    /// Where agent releases are, for `push --agent`, in the same form (e.g.
    /// "releases/reload-agent-{version}").
    #[serde(default)]
    pub agent_artifact: Option<String>,
    /// Public keys a release must be signed by, checked before any agent
    /// is contacted. Relative to this file.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    #[serde(default)]
    pub rollout: RolloutSettings,
    /// Mutual TLS to the agents; paths relative to this file.
    pub tls: Option<TlsSection>,
    #[serde(skip)]
    pub base: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_name: Option<String>,
}

impl Project {
    pub fn load(path: &Path) -> anyhow::Result<Project> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the project file {}; write one (see README, \"Rollouts\") or pass --config", path.display())
        })?;
        let mut project: Project = toml::from_str(&text)
            .with_context(|| format!("project file {} is not valid", path.display()))?;
        project.base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        reload_artifact::manifest::validate_service_name(&project.service)
            .with_context(|| format!("{}: service", path.display()))?;
        if project.service == AGENT_SERVICE {
            bail!(
                "{}: service = {AGENT_SERVICE:?} is the name agent releases are signed for; name your service otherwise (agent releases go through `push --agent` and agent_artifact)",
                path.display()
            );
        }
        for (key, template) in [
            ("artifact", Some(&project.artifact)),
            ("agent_artifact", project.agent_artifact.as_ref()),
        ] {
            if let Some(template) = template {
                if !template.contains("{version}") {
                    bail!(
                        "{}: {key} = {template:?} must contain {{version}}, e.g. \"releases/web-{{version}}\"",
                        path.display(),
                    );
                }
            }
        }
        Ok(project)
    }

    /// The release file of `version` (typed form first, then normalized).
    /// The release file of `service` (the project's, or the agent's) at a
    /// version, as typed or else normalized.
    pub fn artifact_path(
        &self,
        service: &str,
        typed: &str,
        normalized: &str,
    ) -> anyhow::Result<PathBuf> {
        let template = if service == AGENT_SERVICE {
            self.agent_artifact.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "the project file has no agent_artifact: add e.g. agent_artifact = \"releases/reload-agent-{{version}}\" to say where agent releases are"
                )
            })?
        } else {
            &self.artifact
        };
        let candidates: Vec<PathBuf> = [typed, normalized]
            .iter()
            .map(|v| self.base.join(template.replace("{version}", v)))
            .collect();
        candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "no release {normalized} of {service}: none of {} exists; sign it there with `reloadctl sign`",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Applies the file's [tls] unless flags set the transport already.
    pub fn configure_transport(&self) -> anyhow::Result<()> {
        if let Some(tls) = &self.tls {
            crate::client::configure_transport(
                &crate::client::TlsSettings {
                    ca: Some(self.base.join(&tls.ca)),
                    cert: Some(self.base.join(&tls.cert)),
                    key: Some(self.base.join(&tls.key)),
                    server_name: tls.server_name.clone(),
                },
                false,
            )?;
        }
        Ok(())
    }

    pub fn trusted_key_paths(&self) -> Vec<PathBuf> {
        self.trusted_keys
            .iter()
            .map(|p| self.base.join(p))
            .collect()
    }
}
