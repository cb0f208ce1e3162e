//! What clients may see of this host's file system: nothing. Error texts
//! and reload reasons are written for the agent's own log, with absolute
//! paths (`/var/lib/reload-agent/store/sha256/<hex>`), which tell an
//! operator at the host where to look but tell a remote caller how the
//! host is laid out. Everything the gRPC API sends passes through
//! [`for_client`], which names the agent's folders by role instead
//! (`<store>/sha256/<hex>`, `<state>/run/...`); the log keeps the full text.

use std::path::Path;
use std::sync::OnceLock;

/// The agent's folders, longest first, with the name clients see instead.
static FOLDERS: OnceLock<Vec<(String, &'static str)>> = OnceLock::new();

/// Sets the folders once, at start (later calls change nothing).
pub fn set_folders(store_dir: &Path, state_dir: &Path) {
    let absolute = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| std::env::current_dir().unwrap_or_default().join(p))
            .display()
            .to_string()
    };
    let mut folders = vec![
        (absolute(store_dir), "<store>"),
        (absolute(state_dir), "<state>"),
        (store_dir.display().to_string(), "<store>"),
        (state_dir.display().to_string(), "<state>"),
    ];
    folders.retain(|(path, _)| path.len() > 1);
    folders.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let _ = FOLDERS.set(folders);
}

/// `text` with the agent's folders named by role.
pub fn for_client(text: &str) -> String {
    let mut out = text.to_string();
    for (path, name) in FOLDERS.get().map(Vec::as_slice).unwrap_or_default() {
        if out.contains(path.as_str()) {
            out = out.replace(path.as_str(), name);
        }
    }
    out
}

/// A reload result as clients get it.
pub fn reload_result(result: &mut reload_proto::v1::ReloadResult) {
    result.reason = for_client(&result.reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_folders_are_named_by_role() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&store).unwrap();
        set_folders(&store, &state);
        let text = format!(
            "reading {}/sha256/ab failed; socket {}/run/web.notify",
            store.display(),
            state.display()
        );
        assert_eq!(
            for_client(&text),
            "reading <store>/sha256/ab failed; socket <state>/run/web.notify"
        );
        assert_eq!(for_client("no paths here"), "no paths here");
    }
}
