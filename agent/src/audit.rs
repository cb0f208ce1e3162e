//! The audit log: one JSON line per mutating call, accepted or refused,
//! fsync'd before the call returns, append-only, rotated by size (the full
//! file becomes `<name>.1`, replacing an older `.1`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<File>,
}

/// One audited call.
pub struct AuditEntry<'a> {
    pub identity: &'a str,
    pub call: &'a str,
    pub service: &'a str,
    pub version: &'a str,
    pub sha256: &'a str,
    /// `ok`, or the status code and message of a refusal.
    pub result: String,
    /// What the call asked for beyond the usual, written only when set
    /// (`allow_downgrade`).
    pub detail: &'a str,
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl AuditLog {
    pub fn open(path: &Path, max_bytes: u64) -> anyhow::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file =
            open(path).with_context(|| format!("cannot open the audit log {}", path.display()))?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            max_bytes,
            file: Mutex::new(file),
        })
    }

    /// Appends and fsyncs. A failure to audit is logged loudly but does not
    /// undo the call it describes (that already happened).
    pub fn record(&self, entry: AuditEntry<'_>) {
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "identity": entry.identity,
            "call": entry.call,
            "service": entry.service,
            "version": entry.version,
            "sha256": entry.sha256,
            "result": entry.result,
        });
        let mut line = line;
        if !entry.detail.is_empty() {
            line["detail"] = entry.detail.into();
        }
        let mut text = line.to_string();
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| -> std::io::Result<()> {
            if file.metadata()?.len() + text.len() as u64 > self.max_bytes {
                let rotated = self.path.with_extension(match self.path.extension() {
                    Some(ext) => format!("{}.1", ext.to_string_lossy()),
                    None => "1".into(),
                });
                std::fs::rename(&self.path, rotated)?;
                *file = open(&self.path)?;
            }
            file.write_all(text.as_bytes())?;
            file.sync_data()
        })();
        if let Err(err) = result {
            tracing::error!(error = %err, path = %self.path.display(), "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_and_the_log_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, 600).unwrap();
        for i in 0..6 {
            log.record(AuditEntry {
                identity: "deployer",
                call: "Activate",
                service: "web",
                version: "1.0.0",
                sha256: &format!("{i}"),
                result: "ok".into(),
                detail: "",
            });
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("audit.log.1")).unwrap();
        assert!(current.len() <= 600 && !rotated.is_empty());
        for line in current.lines().chain(rotated.lines()) {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(entry["identity"], "deployer");
        }
        // The newest entry is in the current file, the one before the
        // rotation in `.1`.
        assert!(
            current.lines().last().unwrap().contains("\"sha256\":\"5\""),
            "{current}"
        );
        assert!(rotated.lines().count() >= 1);
    }
}
