//! What must survive an agent restart: per service, the artifact that is
//! current and the one before it (what Rollback activates).
//!
//! One small JSON file, rewritten whole on every change through a temp file,
//! fsync and rename (then an fsync of the folder), so a crash leaves either
//! the old or the new state, never half of one.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A stored artifact, by hash, with its version for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub sha256: String,
    pub version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVersions {
    pub current: Option<ArtifactRef>,
    pub previous: Option<ArtifactRef>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFileContents {
    services: BTreeMap<String, ServiceVersions>,
}

pub struct StateFile {
    path: PathBuf,
    contents: Mutex<StateFileContents>,
}

impl StateFile {
    /// Reads `services.json` in `dir`, or starts empty when there is none.
    pub fn open(dir: &Path) -> anyhow::Result<StateFile> {
        let path = dir.join("services.json");
        let contents = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is damaged; fix it or move it away (the agent then starts every service as never activated)",
                    path.display()
                )
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => StateFileContents::default(),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(StateFile {
            path,
            contents: Mutex::new(contents),
        })
    }

    pub fn get(&self, service: &str) -> ServiceVersions {
        let contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
        contents.services.get(service).cloned().unwrap_or_default()
    }

    /// Records `versions` for `service` durably before returning.
    pub fn set(&self, service: &str, versions: ServiceVersions) -> anyhow::Result<()> {
        let mut contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
        contents.services.insert(service.to_string(), versions);
        let bytes = serde_json::to_vec_pretty(&*contents).expect("state serializes");
        let dir = self.path.parent().expect("state file has a folder");
        let temp = dir.join(format!(".services.json.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&temp, &self.path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path()).unwrap();
        assert_eq!(state.get("web"), ServiceVersions::default());
        let v = |s: &str| ArtifactRef {
            sha256: s.repeat(64),
            version: "1.0.0".into(),
        };
        let versions = ServiceVersions {
            current: Some(v("a")),
            previous: Some(v("b")),
        };
        state.set("web", versions.clone()).unwrap();
        let again = StateFile::open(dir.path()).unwrap();
        assert_eq!(again.get("web"), versions);
        fs::write(dir.path().join("services.json"), b"{").unwrap();
        let err = StateFile::open(dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("damaged"));
    }
}
