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

/// `reloadctl.toml` as written: every key optional, so that a file with
/// only `[tls]` serves the commands that just talk to agents (`status`,
/// `rollback`, `logs`...). [`ProjectFile::load`] is the one reader of the
/// file; [`Project`] is what `push` and `resume` need of it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    pub service: Option<String>,
    pub artifact: Option<String>,
    #[serde(default)]
    pub agent_artifact: Option<String>,
    /// Where the agents fetch the release themselves (`FetchArtifact`),
    /// `{version}` replaced by the signed version (`1.5.0`): the CLI then
    /// sends each agent the envelope only.
    #[serde(default)]
    pub artifact_url: Option<String>,
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    #[serde(default)]
    pub rollout: RolloutSettings,
    pub tls: Option<TlsSection>,
    /// The file's folder: relative paths in the file are relative to it,
    /// whatever folder reloadctl runs in.
    #[serde(skip)]
    pub base: PathBuf,
}

impl ProjectFile {
    /// Reads and parses the file; relative paths are resolved against its
    /// folder by the accessors.
    pub fn load(path: &Path) -> anyhow::Result<ProjectFile> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the project file {}; write one (`reloadctl init`, or see README, \"Rollouts\") or pass --config", path.display())
        })?;
        let mut file: ProjectFile = toml::from_str(&text)
            .with_context(|| format!("project file {} is not valid", path.display()))?;
        file.base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(file)
    }

    /// `[tls]` with its paths resolved against the file's folder.
    pub fn tls_settings(&self) -> Option<crate::client::TlsSettings> {
        self.tls.as_ref().map(|tls| crate::client::TlsSettings {
            ca: Some(self.base.join(&tls.ca)),
            cert: Some(self.base.join(&tls.cert)),
            key: Some(self.base.join(&tls.key)),
            server_name: tls.server_name.clone(),
        })
    }
}

/// The project as `push`, `resume` and `rollouts` need it: a service and
/// where its releases are.
#[derive(Debug)]
pub struct Project {
    pub service: String,
    /// Path of a release, `{version}` replaced by the version (see
    /// [`Project::artifact_path`]). Relative to this file.
    pub artifact: String,
    /// Where agent releases are, for `push --agent`, in the same form (e.g.
    /// "releases/reload-agent-{version}").
    pub agent_artifact: Option<String>,
    /// See [`ProjectFile::artifact_url`].
    pub artifact_url: Option<String>,
    /// Public keys a release must be signed by, checked before any agent
    /// is contacted. Relative to this file.
    pub trusted_keys: Vec<PathBuf>,
    pub rollout: RolloutSettings,
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
        let file = ProjectFile::load(path)?;
        let missing = |key: &str, example: &str| {
            anyhow::anyhow!(
                "{}: {key} is missing; rollouts need it, e.g. {key} = {example}",
                path.display()
            )
        };
        let project = Project {
            service: file.service.ok_or_else(|| missing("service", "\"web\""))?,
            artifact: file
                .artifact
                .ok_or_else(|| missing("artifact", "\"releases/web-{version}\""))?,
            agent_artifact: file.agent_artifact,
            artifact_url: file.artifact_url,
            trusted_keys: file.trusted_keys,
            rollout: file.rollout,
            base: file.base,
        };
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

    /// The release file of `service` (the project's, or the agent's) whose
    /// envelope is signed for `normalized` (the version typed, as semver).
    /// People name files as they typed the version when signing (`web-1.5`,
    /// `web-v1.5`, `web-1.5.0`), and type it differently at push; so every
    /// spelling of the version is tried, and the first file whose envelope
    /// says this service at this version wins. A file there signed as
    /// another version is passed over and named in the error.
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
        let mut tried: Vec<PathBuf> = Vec::new();
        let mut signed_otherwise: Vec<String> = Vec::new();
        for spelling in version_spellings(typed, normalized) {
            let path = self.base.join(template.replace("{version}", &spelling));
            if tried.contains(&path) {
                continue;
            }
            tried.push(path.clone());
            if !path.exists() {
                continue;
            }
            match signed_as(&path) {
                Some((s, v)) if s == service && v == normalized => return Ok(path),
                Some((s, v)) => {
                    signed_otherwise.push(format!("{} is signed as {s} {v}", path.display()))
                }
                None => signed_otherwise.push(format!(
                    "{} has no readable envelope ({})",
                    path.display(),
                    reload_artifact::envelope_path_for(&path).display()
                )),
            }
        }
        let otherwise = if signed_otherwise.is_empty() {
            String::new()
        } else {
            format!(" ({})", signed_otherwise.join("; "))
        };
        bail!(
            "no release {normalized} of {service}: tried {}{otherwise}; sign it there with `reloadctl sign --service {service} --version {normalized} FILE`",
            tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        )
    }

    pub fn trusted_key_paths(&self) -> Vec<PathBuf> {
        self.trusted_keys
            .iter()
            .map(|p| self.base.join(p))
            .collect()
    }
}

/// Every way a version may be written in a file name, most literal first:
/// as typed, without a leading `v`, the semver form, its short forms
/// (`1.5` for `1.5.0`, `1` for `1.0.0`), and each with a `v`. Each once.
pub fn version_spellings(typed: &str, normalized: &str) -> Vec<String> {
    let typed = typed.trim();
    let bare = typed.strip_prefix('v').unwrap_or(typed);
    let mut forms = vec![typed.to_string(), bare.to_string(), normalized.to_string()];
    if let Some(short) = normalized.strip_suffix(".0") {
        if !short.contains(['-', '+']) {
            forms.push(short.to_string());
            if let Some(shorter) = short.strip_suffix(".0") {
                forms.push(shorter.to_string());
            }
        }
    }
    let with_v: Vec<String> = forms.iter().map(|f| format!("v{f}")).collect();
    forms.extend(with_v);
    let mut unique = Vec::new();
    for form in forms {
        if !form.starts_with("vv") && !unique.contains(&form) {
            unique.push(form);
        }
    }
    unique
}

/// The service and version a file's envelope names (not verified: the
/// release is verified once chosen).
fn signed_as(path: &Path) -> Option<(String, String)> {
    let bytes = std::fs::read(reload_artifact::envelope_path_for(path)).ok()?;
    let manifest = serde_json::from_slice::<reload_artifact::Envelope>(&bytes)
        .ok()?
        .unverified_manifest()
        .ok()?;
    Some((manifest.service, manifest.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_once_most_literal_first() {
        assert_eq!(
            version_spellings("v1.5", "1.5.0"),
            ["v1.5", "1.5", "1.5.0", "v1.5.0"]
        );
        assert_eq!(
            version_spellings("1.5.0", "1.5.0"),
            ["1.5.0", "1.5", "v1.5.0", "v1.5"]
        );
        assert_eq!(version_spellings("2", "2.0.0")[..3], ["2", "2.0.0", "2.0"]);
        assert_eq!(
            version_spellings("1.5.0-rc.1", "1.5.0-rc.1"),
            ["1.5.0-rc.1", "v1.5.0-rc.1"]
        );
    }
}
