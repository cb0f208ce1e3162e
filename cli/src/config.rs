//! Where the settings of a command that talks to agents come from, for
//! every such command (`push`, `resume`, `status`, `rollback`, `stop`,
//! `activate`, `upload`, `artifacts`, `logs`): flags first, then the
//! environment (`RELOADCTL_TLS_*`, read by clap with the flags), then the
//! project file's `[tls]`, each setting on its own. Paths from flags and the
//! environment are relative to the current folder, paths in the file to the
//! file's folder, so a command run from another folder with `--config`
//! finds the same certificates.
//!
//! The project file is `--config` (or `RELOADCTL_CONFIG`), else
//! `reloadctl.toml` in the current folder if there is one: a file named
//! explicitly must exist, the default one may be absent (then flags and the
//! environment are all there is).

use std::path::PathBuf;

use crate::client::TlsSettings;
use crate::rollout::project::{ProjectFile, DEFAULT_FILE};

/// The project file a command uses.
#[derive(Clone, Debug)]
pub struct ConfigPath {
    pub path: PathBuf,
    /// Named by `--config` or `RELOADCTL_CONFIG`: it must exist.
    pub explicit: bool,
}

impl ConfigPath {
    pub fn new(flag: Option<PathBuf>) -> ConfigPath {
        match flag {
            Some(path) => ConfigPath {
                path,
                explicit: true,
            },
            None => ConfigPath {
                path: PathBuf::from(DEFAULT_FILE),
                explicit: false,
            },
        }
    }

    /// The file, if there is one to read: an explicit one that is missing
    /// or invalid is an error, and so is an invalid default one (a typo in
    /// `[tls]` must not silently mean plaintext).
    pub fn load_optional(&self) -> anyhow::Result<Option<ProjectFile>> {
        if !self.explicit && !self.path.exists() {
            return Ok(None);
        }
        ProjectFile::load(&self.path).map(Some)
    }
}

/// Flags and environment over the file, setting by setting.
pub fn connection_settings(flags: TlsSettings, file: Option<&ProjectFile>) -> TlsSettings {
    let file = file.and_then(ProjectFile::tls_settings).unwrap_or_default();
    TlsSettings {
        ca: flags.ca.or(file.ca),
        cert: flags.cert.or(file.cert),
        key: flags.key.or(file.key),
        server_name: flags.server_name.or(file.server_name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn file_in(dir: &Path, text: &str) -> ProjectFile {
        let path = dir.join("reloadctl.toml");
        std::fs::write(&path, text).unwrap();
        ProjectFile::load(&path).unwrap()
    }

    #[test]
    fn file_paths_are_relative_to_the_files_folder_and_flags_win_per_setting() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("deploy");
        std::fs::create_dir(&sub).unwrap();
        let file = file_in(
            &sub,
            "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/me.pem\"\nkey = \"certs/me.key\"\n",
        );
        let only_file = connection_settings(TlsSettings::default(), Some(&file));
        assert_eq!(only_file.ca, Some(sub.join("certs/ca.pem")));
        assert_eq!(only_file.key, Some(sub.join("certs/me.key")));
        let flags = TlsSettings {
            cert: Some(PathBuf::from("other.pem")),
            ..Default::default()
        };
        let merged = connection_settings(flags, Some(&file));
        assert_eq!(merged.cert, Some(PathBuf::from("other.pem")));
        assert_eq!(merged.ca, Some(sub.join("certs/ca.pem")));
    }

    #[test]
    fn a_missing_default_file_is_no_file_but_a_named_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("nope.toml");
        let default = ConfigPath {
            path: absent.clone(),
            explicit: false,
        };
        assert!(default.load_optional().unwrap().is_none());
        let named = ConfigPath {
            path: absent,
            explicit: true,
        };
        let err = format!("{:#}", named.load_optional().unwrap_err());
        assert!(err.contains("nope.toml"), "{err}");
        // Only [tls] is a valid file for the commands that talk to agents.
        let file = file_in(dir.path(), "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n");
        assert!(file.service.is_none() && file.tls.is_some());
    }
}
