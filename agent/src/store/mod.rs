//! The artifact store: verified files under their sha256, nothing else.
//!
//! Layout inside `store_dir` (mode 0700):
//! - `sha256/<hex>`: the file's bytes, mode 0500, only ever created by an
//!   atomic rename after every check passed;
//! - `sha256/<hex>.<service>.dsse.json`: the envelope that admitted it for
//!   `service` (re-verified before activation), one per service the same
//!   bytes were signed for, so a second service's signature never replaces
//!   the first's; its mtime is when the artifact was last stored for that
//!   service. (`<hex>.dsse.json`, from before, is renamed at start.);
//! - `tmp/`: uploads in progress, each an `O_EXCL` 0600 file, removed when the
//!   upload fails or its client goes away, and emptied at start.
//!
//! The envelope is renamed into place before the file, so a crash between
//! the two leaves an orphan envelope (removed at start), never a file without
//! the signature that admitted it. Commits and pruning hold one lock, so a
//! prune never races a commit of the same service.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use reload_artifact::dsse::Envelope;
use reload_artifact::manifest::validate_sha256_hex;
use reload_artifact::verify::{check_content, hash_file};
use reload_artifact::{Manifest, VerifiedManifest, VerifyError};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

mod sealed;
mod verifier;
pub use sealed::SealedImage;
pub use verifier::{Admission, ArtifactRejected, ArtifactVerifier};

/// Chunks queued between the gRPC receiver and the hashing writer thread;
/// enough to keep both busy, small enough to bound memory per upload.
const WRITER_QUEUE_CHUNKS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("upload sent more than the {size} bytes its manifest states; stopped after {received} bytes")]
    TooLarge { size: u64, received: u64 },
    #[error("upload ended after {received} of the {size} bytes its manifest states: the stream was truncated; upload again")]
    Truncated { size: u64, received: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("stored artifact {sha256} is damaged: {detail}; upload it again")]
    Damaged { sha256: String, detail: String },
    #[error("artifact store I/O failed while {doing}: {source}")]
    Io { doing: String, source: io::Error },
}

fn io_err(doing: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let doing = doing.into();
    move |source| StoreError::Io { doing, source }
}

/// An artifact as it sits in the store.
#[derive(Clone, Debug)]
pub struct StoredArtifact {
    pub manifest: Manifest,
    pub key_ids: Vec<String>,
    pub stored_at: SystemTime,
    /// The file, for execution.
    pub path: PathBuf,
}

pub struct ArtifactStore {
    objects: PathBuf,
    tmp: PathBuf,
    keep_versions: usize,
    commit_lock: Mutex<()>,
    temp_counter: AtomicU64,
    /// Per service, artifacts pruning must keep whatever their age: the
    /// current and previous versions (the service registry says which).
    pinned: Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    /// Damaged entries set aside (see [`ArtifactStore::quarantine`]).
    /// Shared with the metrics (`reload_store_quarantined_total`).
    quarantined: prometheus_client::metrics::counter::Counter,
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err(format!("creating {}", path.display())))
}

/// Removes a file that may already be gone: whatever else touches the
/// store (another process, an operator) must not keep the agent from
/// starting.
fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", path.display()))(err))
        }
        _ => Ok(()),
    }
}

fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err(format!("syncing directory {}", path.display())))
}

impl ArtifactStore {
    /// Opens (or creates) the store, removing what an earlier crash left:
    /// temp files, and envelopes or files without their other half.
    pub fn open(root: &Path, keep_versions: usize) -> Result<ArtifactStore, StoreError> {
        let store = ArtifactStore {
            objects: root.join("sha256"),
            tmp: root.join("tmp"),
            keep_versions,
            commit_lock: Mutex::new(()),
            temp_counter: AtomicU64::new(0),
            pinned: Mutex::new(Default::default()),
            quarantined: Default::default(),
        };
        create_private_dir(root)?;
        create_private_dir(&store.objects)?;
        create_private_dir(&store.tmp)?;
        for entry in fs::read_dir(&store.tmp).map_err(io_err("listing the temp folder"))? {
            let path = entry.map_err(io_err("listing the temp folder"))?.path();
            tracing::info!(path = %path.display(), "removing an upload left by an earlier run");
            remove_if_present(&path)?;
        }
        store.migrate_envelope_names()?;
        for entry in fs::read_dir(&store.objects).map_err(io_err("listing the store"))? {
            let path = entry.map_err(io_err("listing the store"))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let complete = match parse_envelope_name(name) {
                Some((hex, _)) => store.objects.join(hex).exists(),
                None => validate_sha256_hex(name).is_ok() && !store.services_of(name)?.is_empty(),
            };
            if !complete {
                tracing::warn!(path = %path.display(), "removing an incomplete store entry");
                remove_if_present(&path)?;
            }
        }
        fsync_dir(&store.objects)?;
        Ok(store)
    }

    /// `<hex>.dsse.json` (one envelope per file, before envelopes were kept
    /// per service) becomes `<hex>.<service>.dsse.json`.
    fn migrate_envelope_names(&self) -> Result<(), StoreError> {
        for entry in fs::read_dir(&self.objects).map_err(io_err("listing the store"))? {
            let path = entry.map_err(io_err("listing the store"))?.path();
            let Some(hex) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".dsse.json"))
                .filter(|hex| validate_sha256_hex(hex).is_ok())
            else {
                continue;
            };
            let service = fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Envelope>(&bytes).ok())
                .and_then(|envelope| envelope.unverified_manifest().ok())
                .map(|manifest| manifest.service);
            match service {
                Some(service) => {
                    let target = self.envelope_path(hex, &service);
                    fs::rename(&path, &target)
                        .map_err(io_err(format!("renaming to {}", target.display())))?;
                }
                // Unreadable: the scan after this removes it as incomplete
                // (its file then has no envelope, and goes too).
                None => remove_if_present(&path)?,
            }
        }
        Ok(())
    }

    fn envelope_path(&self, sha256: &str, service: &str) -> PathBuf {
        self.objects.join(format!("{sha256}.{service}.dsse.json"))
    }

    /// The services the file `sha256` holds an envelope for, sorted.
    fn services_of(&self, sha256: &str) -> Result<Vec<String>, StoreError> {
        let mut services = Vec::new();
        for entry in fs::read_dir(&self.objects).map_err(io_err("listing the store"))? {
            let name = entry.map_err(io_err("listing the store"))?.file_name();
            if let Some((hex, service)) = name.to_str().and_then(parse_envelope_name) {
                if hex == sha256 {
                    services.push(service.to_string());
                }
            }
        }
        services.sort();
        Ok(services)
    }

    pub fn temp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The stored artifact with this sha256, as signed for `service` (or,
    /// with `None`, for the first service it was stored for), if the store
    /// holds it.
    pub fn stat(
        &self,
        sha256: &str,
        service: Option<&str>,
    ) -> Result<Option<StoredArtifact>, StoreError> {
        validate_sha256_hex(sha256).map_err(|e| StoreError::BadRequest(e.to_string()))?;
        let path = self.objects.join(sha256);
        if !path.exists() {
            return Ok(None);
        }
        let service = match service {
            Some(service) => service.to_string(),
            None => match self.services_of(sha256)?.into_iter().next() {
                Some(first) => first,
                None => return Ok(None),
            },
        };
        match self.read_entry(sha256, &service) {
            Ok(found) => Ok(Some(found)),
            // Pruned between the exists() check and the read.
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// The services `sha256` is stored for.
    pub fn stored_for(&self, sha256: &str) -> Result<Vec<String>, StoreError> {
        validate_sha256_hex(sha256).map_err(|e| StoreError::BadRequest(e.to_string()))?;
        self.services_of(sha256)
    }

    fn read_entry(&self, sha256: &str, service: &str) -> Result<StoredArtifact, StoreError> {
        let envelope_path = self.envelope_path(sha256, service);
        let bytes = fs::read(&envelope_path)
            .map_err(io_err(format!("reading {}", envelope_path.display())))?;
        let stored_at = fs::metadata(&envelope_path)
            .and_then(|m| m.modified())
            .map_err(io_err(format!("reading {}", envelope_path.display())))?;
        let damaged = |detail: String| StoreError::Damaged {
            sha256: sha256.to_string(),
            detail,
        };
        // The envelope was verified before it was stored; this only reads it.
        let envelope: Envelope =
            serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        let manifest = envelope.unverified_manifest().map_err(damaged)?;
        if manifest.service != service || manifest.sha256 != sha256 {
            return Err(damaged(format!(
                "the envelope stored for {service} is signed for {} {}",
                manifest.service, manifest.sha256
            )));
        }
        Ok(StoredArtifact {
            manifest,
            key_ids: envelope.signatures.into_iter().map(|s| s.keyid).collect(),
            stored_at,
            path: self.objects.join(sha256),
        })
    }

    /// The stored envelope bytes for `service`, for re-verification.
    pub fn envelope_bytes(&self, sha256: &str, service: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.envelope_path(sha256, service);
        fs::read(&path).map_err(io_err(format!("reading {}", path.display())))
    }

    /// Every stored artifact (of one service, if given), newest first.
    pub fn list(&self, service: Option<&str>) -> Result<Vec<StoredArtifact>, StoreError> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.objects).map_err(io_err("listing the store"))? {
            let name = entry.map_err(io_err("listing the store"))?.file_name();
            let Some((hex, stored_for)) = name.to_str().and_then(parse_envelope_name) else {
                continue;
            };
            if service.is_some_and(|s| s != stored_for) {
                continue;
            }
            match self.stat(hex, Some(stored_for)) {
                Ok(Some(artifact)) => {
                    if service.is_none_or(|s| s == artifact.manifest.service) {
                        found.push(artifact);
                    }
                }
                Ok(None) => {}
                // One damaged entry must not take every upload and listing
                // down with it: set aside, and the rest goes on.
                Err(StoreError::Damaged { sha256, detail }) => {
                    self.quarantine(&sha256, stored_for, &detail)?
                }
                Err(err) => return Err(err),
            }
        }
        found.sort_by(|a, b| {
            b.stored_at
                .cmp(&a.stored_at)
                .then_with(|| b.manifest.semver().cmp(&a.manifest.semver()))
        });
        Ok(found)
    }

    /// Moves a damaged entry (its envelope and its file) to
    /// `<store>/quarantine/`, where an operator can look at it; the agent
    /// no longer sees it (upload the release again to use it).
    fn quarantine(&self, sha256: &str, service: &str, detail: &str) -> Result<(), StoreError> {
        let folder = self
            .objects
            .parent()
            .expect("the objects folder is in the store")
            .join("quarantine");
        create_private_dir(&folder)?;
        let envelope = format!("{sha256}.{service}.dsse.json");
        let mut names = vec![envelope.clone()];
        // The file too, unless another service's envelope still vouches
        // for it.
        if self.services_of(sha256)?.iter().all(|s| s == service) {
            names.push(sha256.to_string());
        }
        for name in names {
            let from = self.objects.join(&name);
            match fs::rename(&from, folder.join(&name)) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(format!("quarantining {}", from.display()))(err))
                }
                _ => {}
            }
        }
        fsync_dir(&self.objects)?;
        self.quarantined.inc();
        tracing::error!(sha256, detail, folder = %folder.display(), "a damaged store entry was moved to quarantine; upload that release again to use it");
        Ok(())
    }

    /// The count of damaged entries set aside since the agent started,
    /// for the metrics to share.
    pub fn quarantined_counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.quarantined.clone()
    }

    /// Re-reads a stored file and checks its bytes against its manifest.
    pub fn check_stored_content(&self, artifact: &StoredArtifact) -> Result<(), StoreError> {
        let (sha256, size) = hash_file(&artifact.path)
            .map_err(io_err(format!("reading {}", artifact.path.display())))?;
        check_content(&artifact.manifest, &sha256, size).map_err(|err| StoreError::Damaged {
            sha256: artifact.manifest.sha256.clone(),
            detail: err.to_string(),
        })
    }

    /// The file is already stored (for this service or another): the
    /// envelope for this service is added, or replaces the stored one
    /// unless that would shorten its expiry (a re-upload must not turn a
    /// release that runs into one that cannot be admitted sooner); either
    /// way it is marked as just stored, so pruning keeps it. `None`: the
    /// file must be uploaded.
    pub fn restore_existing(
        &self,
        verified: &VerifiedManifest,
        envelope: &[u8],
    ) -> Result<Option<StoredArtifact>, StoreError> {
        let (sha256, service) = (&verified.manifest.sha256, &verified.manifest.service);
        let _guard = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(existing) = self.stat(sha256, None)? else {
            return Ok(None);
        };
        if existing.manifest.size != verified.manifest.size {
            // Same sha256, another size: the new manifest is wrong, and
            // hashing the upload would show it; let the upload run and fail.
            return Ok(None);
        }
        let replace = match self.stat(sha256, Some(service)) {
            Ok(Some(mine)) => {
                let expiry = |m: &Manifest| m.expires_at().ok();
                expiry(&verified.manifest) >= expiry(&mine.manifest)
                    && self.envelope_bytes(sha256, service)? != envelope
            }
            Ok(None) | Err(StoreError::Damaged { .. }) => true,
            Err(err) => return Err(err),
        };
        if replace {
            self.write_envelope(sha256, service, envelope)?;
        } else {
            let path = self.envelope_path(sha256, service);
            File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()))
                .map_err(io_err(format!("touching {}", path.display())))?;
        }
        fsync_dir(&self.objects)?;
        self.prune(service)?;
        self.stat(sha256, Some(service))
    }

    fn new_temp_path(&self, label: &str) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{label}.{}.{n}", std::process::id()))
    }

    fn write_envelope(
        &self,
        sha256: &str,
        service: &str,
        envelope: &[u8],
    ) -> Result<(), StoreError> {
        let temp = TempPath(self.new_temp_path(&format!("{sha256}.{service}.dsse.json")));
        let mut file = create_exclusive(&temp.0)?;
        file.write_all(envelope)
            .and_then(|_| file.sync_all())
            .map_err(io_err(format!("writing {}", temp.0.display())))?;
        let target = self.envelope_path(sha256, service);
        fs::rename(&temp.0, &target)
            .map_err(io_err(format!("renaming to {}", target.display())))?;
        temp.keep();
        Ok(())
    }

    /// Starts an upload of a verified manifest's file.
    pub fn begin_upload(
        &self,
        verified: VerifiedManifest,
        envelope: Vec<u8>,
    ) -> Result<Upload, StoreError> {
        let temp = TempPath(self.new_temp_path(&verified.manifest.sha256));
        let file = create_exclusive(&temp.0)?;
        let (sender, receiver) = mpsc::channel(WRITER_QUEUE_CHUNKS);
        let writer =
            tokio::task::spawn_blocking(move || write_and_hash(file, receiver, Sha256::new(), 0));
        Ok(Upload {
            verified,
            envelope,
            temp,
            sender: Some(sender),
            writer: Some(writer),
            received: 0,
        })
    }

    /// Starts or resumes a fetch of a verified manifest's file. A fetch's
    /// bytes so far live in `tmp/fetch-<sha256>.part`, which is kept when a
    /// fetch is cut short ([`Upload::suspend`]) and removed when its bytes
    /// are refused; here they are hashed again (a file in the store folder
    /// proves nothing by itself) and the returned upload continues after
    /// them. Returns the upload and how many bytes it already holds.
    /// Blocking: it reads the partial file.
    pub fn resume_fetch(
        &self,
        verified: VerifiedManifest,
        envelope: Vec<u8>,
    ) -> Result<(Upload, u64), StoreError> {
        let path = self
            .tmp
            .join(format!("fetch-{}.part", verified.manifest.sha256));
        let doing = || format!("resuming {}", path.display());
        let mut hasher = Sha256::new();
        let mut held = 0u64;
        let file = match OpenOptions::new().read(true).append(true).open(&path) {
            Ok(mut file) => {
                // Its writer left it read-only when it stopped.
                file.set_permissions(fs::Permissions::from_mode(0o600))
                    .map_err(io_err(doing()))?;
                held = io::copy(
                    &mut (&mut file).take(verified.manifest.size + 1),
                    &mut HashWriter(&mut hasher),
                )
                .map_err(io_err(doing()))?;
                if held > verified.manifest.size {
                    // Not a prefix of this file: start again.
                    file.set_len(0).map_err(io_err(doing()))?;
                    hasher = Sha256::new();
                    held = 0;
                }
                file
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => create_exclusive(&path)?,
            Err(err) => return Err(io_err(doing())(err)),
        };
        let (sender, receiver) = mpsc::channel(WRITER_QUEUE_CHUNKS);
        let writer =
            tokio::task::spawn_blocking(move || write_and_hash(file, receiver, hasher, held));
        Ok((
            Upload {
                verified,
                envelope,
                temp: TempPath(path),
                sender: Some(sender),
                writer: Some(writer),
                received: held,
            },
            held,
        ))
    }

    /// Makes a fully received, checked upload visible under its final name.
    fn commit(&self, upload: &mut Upload) -> Result<StoredArtifact, StoreError> {
        let manifest = &upload.verified.manifest;
        let sha256 = manifest.sha256.clone();
        let _guard = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.write_envelope(&sha256, &manifest.service, &upload.envelope)?;
        let target = self.objects.join(&sha256);
        fs::rename(&upload.temp.0, &target)
            .map_err(io_err(format!("renaming to {}", target.display())))?;
        upload.temp.keep_ref();
        fsync_dir(&self.objects)?;
        self.prune(&manifest.service)?;
        self.read_entry(&sha256, &manifest.service)
    }

    /// Marks the artifacts of `service` that pruning must keep.
    pub fn pin(&self, service: &str, sha256s: Vec<String>) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.insert(service.to_string(), sha256s);
    }

    /// Every artifact some service pins (its current and history).
    pub fn pinned_all(&self) -> std::collections::HashSet<String> {
        let pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.values().flatten().cloned().collect()
    }

    /// Keeps the newest `keep_versions` artifacts of `service`, and always
    /// the pinned ones. Caller holds the commit lock.
    fn prune(&self, service: &str) -> Result<(), StoreError> {
        let artifacts = self.list(Some(service))?;
        let pinned = self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
            .unwrap_or_default();
        let mut removed = false;
        let prunable = artifacts
            .iter()
            .skip(self.keep_versions)
            .filter(|a| !pinned.contains(&a.manifest.sha256));
        for old in prunable {
            tracing::info!(
                service,
                version = %old.manifest.version,
                sha256 = %old.manifest.sha256,
                "pruning an old artifact (keep_versions = {})",
                self.keep_versions
            );
            // The file first (unless another service's envelope still
            // vouches for it): an envelope alone is cleaned up at start, a
            // file without its envelope could not be re-verified.
            let sha256 = &old.manifest.sha256;
            if self.services_of(sha256)?.iter().all(|s| s == service) {
                fs::remove_file(&old.path)
                    .map_err(io_err(format!("removing {}", old.path.display())))?;
            }
            let envelope = self.envelope_path(sha256, service);
            fs::remove_file(&envelope)
                .map_err(io_err(format!("removing {}", envelope.display())))?;
            removed = true;
        }
        if removed {
            fsync_dir(&self.objects)?;
        }
        Ok(())
    }
}

/// `<hex>.<service>.dsse.json` → (hex, service).
fn parse_envelope_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_suffix(".dsse.json")?;
    let (hex, service) = (rest.get(..64)?, rest.get(64..)?.strip_prefix('.')?);
    (validate_sha256_hex(hex).is_ok() && !service.is_empty()).then_some((hex, service))
}

fn create_exclusive(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("creating {}", path.display())))
}

/// Runs on a blocking thread: hashes and writes each chunk as it arrives,
/// so the whole file is never in memory and hashing overlaps receiving.
/// `hasher` and `size` already hold the bytes the file starts with (a
/// resumed fetch).
fn write_and_hash(
    mut file: File,
    mut chunks: mpsc::Receiver<Bytes>,
    mut hasher: Sha256,
    mut size: u64,
) -> io::Result<(String, u64)> {
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        size += chunk.len() as u64;
    }
    file.set_permissions(fs::Permissions::from_mode(0o500))?;
    file.sync_all()?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// Feeds what is written to it to a hasher (for `io::copy`).
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A path in `tmp/` removed on drop unless kept: every early return, error
/// or dropped upload (a client that went away) cleans up after itself.
struct TempPath(PathBuf);

impl TempPath {
    fn keep(self) {
        std::mem::forget(self);
    }
    fn keep_ref(&mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// One upload in progress. Dropping it removes its temp file.
pub struct Upload {
    verified: VerifiedManifest,
    envelope: Vec<u8>,
    temp: TempPath,
    sender: Option<mpsc::Sender<Bytes>>,
    writer: Option<tokio::task::JoinHandle<io::Result<(String, u64)>>>,
    received: u64,
}

impl Upload {
    pub fn manifest(&self) -> &Manifest {
        &self.verified.manifest
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Stops a fetch cut short and keeps its bytes (flushed and synced)
    /// for [`ArtifactStore::resume_fetch`].
    pub async fn suspend(mut self) {
        let _ = self.join_writer().await;
        self.temp.keep_ref();
    }

    /// Queues the next chunk; refuses it if it would pass the manifest's size.
    pub async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let size = self.verified.manifest.size;
        let received = self.received + chunk.len() as u64;
        if received > size {
            return Err(StoreError::TooLarge { size, received });
        }
        self.received = received;
        let sender = self.sender.as_ref().expect("sender lives until finish");
        if sender.send(chunk).await.is_err() {
            // The writer stopped early: only an I/O error does that.
            return Err(self
                .join_writer()
                .await
                .err()
                .unwrap_or_else(|| StoreError::Io {
                    doing: "writing the upload".into(),
                    source: io::Error::other("writer stopped"),
                }));
        }
        Ok(())
    }

    async fn join_writer(&mut self) -> Result<(String, u64), StoreError> {
        self.sender.take();
        let writer = self.writer.take().expect("writer joined once");
        writer
            .await
            .map_err(|err| StoreError::Io {
                doing: "writing the upload".into(),
                source: io::Error::other(err),
            })?
            .map_err(io_err(format!("writing {}", self.temp.0.display())))
    }

    /// Checks size and hash, then stores the artifact under its final name.
    pub async fn finish(
        mut self,
        store: &std::sync::Arc<ArtifactStore>,
    ) -> Result<StoredArtifact, StoreError> {
        let (sha256, size) = self.join_writer().await?;
        let manifest = &self.verified.manifest;
        if size < manifest.size {
            return Err(StoreError::Truncated {
                size: manifest.size,
                received: size,
            });
        }
        check_content(manifest, &sha256, size)?;
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.commit(&mut self))
            .await
            .map_err(|err| StoreError::Io {
                doing: "committing the upload".into(),
                source: io::Error::other(err),
            })?
    }
}
