//! What must survive an agent restart: per service, the artifact that is
//! current and the one before it (what Rollback activates).
//!
//! One small JSON file, rewritten whole on every change through a temp file,
//! fsync and rename (then an fsync of the folder), so a crash leaves either
//! the old or the new state, never half of one. The folder's fsync may be
//! left to the caller ([`StateFile::write`], [`Written::sync`]): a handoff
//! signals the old process between the two (see `services::handoff`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A stored artifact, by hash, with its version for people.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub sha256: String,
    pub version: String,
}

/// Versions a service ran, most recent last in `history`: a forward
/// activation pushes the version it replaces, a rollback pops. So after a
/// bad release is reverted, the bad release is not what the next rollback
/// activates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVersions {
    pub current: Option<ArtifactRef>,
    #[serde(default)]
    pub history: Vec<ArtifactRef>,
    /// The downgrade floor: the highest version ever activated.
    #[serde(default)]
    pub highest_version: Option<String>,
    /// sha256 of every artifact activated here (the last few hundred): a
    /// downgrade may only return to one of these, unless signed for it.
    #[serde(default)]
    pub activated: Vec<String>,
    /// Stopped on purpose (StopService): not started, after a crash or an
    /// agent restart, until the next activation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

/// Activated artifacts remembered for the downgrade check.
const ACTIVATED_LEN: usize = 256;

/// Versions remembered for rollback.
pub const HISTORY_LEN: usize = 8;

impl ServiceVersions {
    /// What a rollback activates.
    pub fn previous(&self) -> Option<&ArtifactRef> {
        self.history.last()
    }

    /// The versions after `next` became current; `rollback` when it was
    /// activated as a rollback to the top of the history.
    pub fn after(&self, next: &ArtifactRef, rollback: bool) -> ServiceVersions {
        let mut history = self.history.clone();
        let is_top = history.last().is_some_and(|top| top.sha256 == next.sha256);
        if rollback && is_top {
            history.pop();
        } else if let Some(current) = &self.current {
            if current.sha256 != next.sha256 {
                history.push(current.clone());
            }
        }
        let excess = history.len().saturating_sub(HISTORY_LEN);
        history.drain(..excess);
        let next_semver = reload_artifact::version::parse_version(&next.version).ok();
        let highest = self
            .highest_version
            .as_deref()
            .and_then(|v| reload_artifact::version::parse_version(v).ok());
        let highest_version = match (highest, next_semver) {
            (Some(h), Some(n)) if h >= n => Some(h.to_string()),
            (_, Some(n)) => Some(n.to_string()),
            (h, None) => h.map(|h| h.to_string()),
        };
        let mut activated = self.activated.clone();
        activated.retain(|sha| *sha != next.sha256);
        activated.push(next.sha256.clone());
        let excess = activated.len().saturating_sub(ACTIVATED_LEN);
        activated.drain(..excess);
        ServiceVersions {
            current: Some(next.clone()),
            history,
            highest_version,
            activated,
            // An activation starts what a stop had stopped.
            stopped: false,
        }
    }

    /// Whether the current version should be running.
    pub fn should_run(&self) -> bool {
        self.current.is_some() && !self.stopped
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct StateFileContents {
    services: BTreeMap<String, ServiceVersions>,
}

/// Why an activation below the downgrade floor was refused.
#[derive(Debug, thiserror::Error)]
pub enum DowngradeRefused {
    #[error("{what}; a downgrade must be asked for explicitly (allow_downgrade; reloadctl activate --allow-downgrade, reloadctl rollback)")]
    NotAskedFor { what: String },
    #[error("{what}, was never activated here, and is not signed with downgrade permission; sign it with `reloadctl sign --allow-downgrade` if it is meant to go below the floor")]
    NotPermitted { what: String },
}

impl ServiceVersions {
    /// The downgrade floor: a version below the highest ever activated
    /// needs an explicit allow-downgrade on the call, and then must be a
    /// build this agent ran before or one signed with downgrade permission.
    /// A signed but older build (with a known hole) cannot be slipped back
    /// in. The same rule holds for services and for the agent's own
    /// releases.
    pub fn check_floor(
        &self,
        manifest: &reload_artifact::Manifest,
        allow_downgrade: bool,
    ) -> Result<(), DowngradeRefused> {
        let Some(highest) = self
            .highest_version
            .as_deref()
            .and_then(|v| reload_artifact::version::parse_version(v).ok())
        else {
            return Ok(());
        };
        if manifest.semver() >= highest {
            return Ok(());
        }
        let what = format!(
            "{} {} is below {highest}, the highest version this agent activated",
            manifest.service, manifest.version
        );
        if !allow_downgrade {
            return Err(DowngradeRefused::NotAskedFor { what });
        }
        let ran_here = self.activated.contains(&manifest.sha256);
        if !ran_here && !manifest.allow_downgrade {
            return Err(DowngradeRefused::NotPermitted { what });
        }
        tracing::warn!(service = %manifest.service, version = %manifest.version, %highest, "downgrade allowed below the floor");
        Ok(())
    }

    /// Every artifact these versions may return to (current and history):
    /// what the store must not prune.
    pub fn pinned(&self) -> Vec<String> {
        self.current
            .iter()
            .chain(&self.history)
            .map(|a| a.sha256.clone())
            .collect()
    }
}

pub struct StateFile {
    path: PathBuf,
    contents: Mutex<StateFileContents>,
    /// Bumped under the `contents` lock at each change: a [`Prepared`]
    /// file is only put in place if nothing changed since it was written.
    generation: std::sync::atomic::AtomicU64,
    /// Names the temp files apart.
    temp_counter: std::sync::atomic::AtomicU64,
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
        // Temp files a crash left behind: never the state (only a rename
        // makes one that). Those of a live process other than this one (an
        // agent whose handoff prepared its next state) are its own.
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(".services.json.") else {
                    continue;
                };
                let pid = rest.split('.').next().unwrap_or_default();
                let ours = pid == std::process::id().to_string();
                if ours || !Path::new("/proc").join(pid).exists() || pid.is_empty() {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(StateFile {
            path,
            contents: Mutex::new(contents),
            generation: Default::default(),
            temp_counter: Default::default(),
        })
    }

    /// A temp file name of this process no other call uses.
    fn temp_path(&self) -> PathBuf {
        let n = self
            .temp_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.path.parent().expect("state file has a folder");
        dir.join(format!(".services.json.{}.{n}", std::process::id()))
    }

    /// Writes `bytes` to a new temp file and fsyncs its data.
    fn write_temp(&self, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let temp = self.temp_path();
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(bytes)?;
            file.sync_data()
        };
        if let Err(err) = write() {
            let _ = fs::remove_file(&temp);
            return Err(err).with_context(|| format!("cannot write {}", temp.display()));
        }
        Ok(temp)
    }

    /// Writes, ahead of time, the state file as it will be once `versions`
    /// are `service`'s (a handoff does this while the new process starts,
    /// so the fsync is not between READY and the traffic moving). Nothing
    /// changes until [`StateFile::commit_prepared`]; dropping the result
    /// removes the file. Blocking.
    pub fn prepare(&self, service: &str, versions: ServiceVersions) -> anyhow::Result<Prepared> {
        let (bytes, generation) = {
            let contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = contents.clone();
            next.services.insert(service.to_string(), versions.clone());
            (
                serde_json::to_vec_pretty(&next).expect("state serializes"),
                self.generation.load(std::sync::atomic::Ordering::SeqCst),
            )
        };
        let temp = self.write_temp(&bytes)?;
        Ok(Prepared {
            temp: Some(temp),
            generation,
            service: service.to_string(),
            versions,
        })
    }

    /// Records `versions` for `service` as [`StateFile::write`] does, by
    /// renaming `prepared` into place if it holds exactly that change and
    /// nothing changed since it was written (else it is written now).
    pub fn commit_prepared(
        &self,
        mut prepared: Prepared,
        service: &str,
        versions: ServiceVersions,
    ) -> anyhow::Result<Written> {
        let mut contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        if prepared.generation != current
            || prepared.service != service
            || prepared.versions != versions
        {
            drop(contents);
            return self.write(service, versions);
        }
        let temp = prepared
            .temp
            .take()
            .expect("a prepared file is committed once");
        if fs::rename(&temp, &self.path).is_err() {
            // Gone (removed by hand, or by an open of this folder): write it
            // now, as without a prepared file.
            let _ = fs::remove_file(&temp);
            drop(contents);
            return self.write(service, versions);
        }
        contents.services.insert(service.to_string(), versions);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self.written())
    }

    /// What is left to do for durability: the folder's fsync.
    fn written(&self) -> Written {
        Written {
            dir: self
                .path
                .parent()
                .expect("state file has a folder")
                .to_path_buf(),
        }
    }

    pub fn get(&self, service: &str) -> ServiceVersions {
        let contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
        contents.services.get(service).cloned().unwrap_or_default()
    }

    /// Records `versions` for `service` durably before returning.
    pub fn set(&self, service: &str, versions: ServiceVersions) -> anyhow::Result<()> {
        self.write(service, versions)?.sync()
    }

    /// Records `versions` for `service`: the new file's bytes are fsync'd
    /// and it has replaced the old one when this returns, so a crash of
    /// the agent from here on finds it, and no crash finds half a file. It
    /// is durable across a power loss once [`Written::sync`] (the folder's
    /// fsync, which makes the rename durable) has returned; until then a
    /// power loss may bring back the state before it, whole.
    pub fn write(&self, service: &str, versions: ServiceVersions) -> anyhow::Result<Written> {
        let mut contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
        contents.services.insert(service.to_string(), versions);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let bytes = serde_json::to_vec_pretty(&*contents).expect("state serializes");
        let temp = self.write_temp(&bytes)?;
        if let Err(err) = fs::rename(&temp, &self.path) {
            let _ = fs::remove_file(&temp);
            return Err(err).with_context(|| format!("cannot write {}", self.path.display()));
        }
        Ok(self.written())
    }
}

/// The state file as it will be after one change, written and fsync'd
/// beside the real one (see [`StateFile::prepare`]).
pub struct Prepared {
    /// `None` once renamed into place.
    temp: Option<PathBuf>,
    generation: u64,
    service: String,
    versions: ServiceVersions,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

/// A state change written and in place, not yet durable across a power
/// loss: see [`StateFile::write`].
#[must_use = "the change is durable only after sync()"]
pub struct Written {
    dir: PathBuf,
}

impl Written {
    /// The folder's fsync: the rename, and with it the change, is durable.
    pub fn sync(self) -> anyhow::Result<()> {
        fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync the folder {}", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_pops_and_forward_pushes() {
        let v = |s: &str| ArtifactRef {
            sha256: s.repeat(64),
            version: s.into(),
        };
        let start = ServiceVersions::default()
            .after(&v("a"), false)
            .after(&v("b"), false)
            .after(&v("c"), false);
        assert_eq!(start.previous(), Some(&v("b")));
        // A bad release reverted: c is not remembered as "previous".
        let reverted = start.after(&v("b"), true);
        assert_eq!(
            (reverted.current.clone(), reverted.previous()),
            (Some(v("b")), Some(&v("a")))
        );
        let again = reverted.after(&v("a"), true);
        assert_eq!(again.previous(), None);
        // Activating the current version again changes nothing.
        assert_eq!(again.after(&v("a"), false).history, vec![]);
    }

    #[test]
    fn the_floor_only_rises() {
        let v = |sha: &str, version: &str| ArtifactRef {
            sha256: sha.repeat(64),
            version: version.into(),
        };
        let versions = ServiceVersions::default()
            .after(&v("a", "1.0.0"), false)
            .after(&v("b", "2.0.0"), false)
            .after(&v("a", "1.0.0"), true);
        assert_eq!(versions.highest_version.as_deref(), Some("2.0.0"));
        assert_eq!(versions.activated, vec!["b".repeat(64), "a".repeat(64)]);
    }

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
            history: vec![v("b")],
            highest_version: Some("2.0.0".into()),
            activated: vec!["b".repeat(64), "a".repeat(64)],
            stopped: true,
        };
        state.set("web", versions.clone()).unwrap();
        let again = StateFile::open(dir.path()).unwrap();
        assert_eq!(again.get("web"), versions);
        fs::write(dir.path().join("services.json"), b"{").unwrap();
        let err = StateFile::open(dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("damaged"));
    }

    fn versions_of(sha: &str) -> ServiceVersions {
        ServiceVersions::default().after(
            &ArtifactRef {
                sha256: sha.repeat(64),
                version: "1.0.0".into(),
            },
            false,
        )
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".services.json."))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_prepared_state_is_renamed_in_unless_the_state_changed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path()).unwrap();
        // Prepared, then committed as is: the file on disk has it.
        let prepared = state.prepare("web", versions_of("a")).unwrap();
        assert_eq!(temp_files(dir.path()).len(), 1);
        let on_disk = || fs::read_to_string(dir.path().join("services.json")).unwrap_or_default();
        assert!(
            !on_disk().contains(&"a".repeat(64)),
            "prepared is not committed"
        );
        state
            .commit_prepared(prepared, "web", versions_of("a"))
            .unwrap()
            .sync()
            .unwrap();
        assert_eq!(
            StateFile::open(dir.path()).unwrap().get("web"),
            versions_of("a")
        );
        assert!(temp_files(dir.path()).is_empty());

        // Another service committed between prepare and commit: the
        // prepared file lacks that change, so the state is written anew
        // and both changes are on disk.
        let prepared = state.prepare("web", versions_of("b")).unwrap();
        state.set("api", versions_of("c")).unwrap();
        state
            .commit_prepared(prepared, "web", versions_of("b"))
            .unwrap()
            .sync()
            .unwrap();
        let reopened = StateFile::open(dir.path()).unwrap();
        assert_eq!(reopened.get("web"), versions_of("b"));
        assert_eq!(reopened.get("api"), versions_of("c"));
        assert!(temp_files(dir.path()).is_empty());

        // A handoff that failed drops its prepared file: nothing changes.
        drop(state.prepare("web", versions_of("d")).unwrap());
        assert!(temp_files(dir.path()).is_empty());
        assert_eq!(
            StateFile::open(dir.path()).unwrap().get("web"),
            versions_of("b")
        );
    }

    #[test]
    fn temp_files_a_crash_left_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path()).unwrap();
        std::mem::forget(state.prepare("web", versions_of("a")).unwrap());
        assert_eq!(temp_files(dir.path()).len(), 1);
        StateFile::open(dir.path()).unwrap();
        assert!(temp_files(dir.path()).is_empty());
    }
}
