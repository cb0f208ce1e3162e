//! [`AgentVersions`]: the agent's own releases, kept in the state file like
//! a service's (current, history for rollback, downgrade floor) under the
//! service name agent artifacts are signed for, and pinned in the store so
//! pruning never removes an image the agent may return to.

use std::sync::Arc;

use super::AGENT_SERVICE;
use crate::state::{ArtifactRef, ServiceVersions, StateFile};
use crate::store::ArtifactStore;

pub struct AgentVersions {
    state: Arc<StateFile>,
    store: Arc<ArtifactStore>,
}

impl AgentVersions {
    pub fn new(state: Arc<StateFile>, store: Arc<ArtifactStore>) -> AgentVersions {
        AgentVersions { state, store }
    }

    /// Current, history and floor.
    pub fn get(&self) -> ServiceVersions {
        self.state.get(AGENT_SERVICE)
    }

    /// The version of the agent artifact with this sha256, if it is the
    /// current one (an image started from the installed binary runs none).
    pub fn running(&self, executable_sha256: &str) -> String {
        self.get()
            .current
            .filter(|c| c.sha256 == executable_sha256)
            .map(|c| c.version)
            .unwrap_or_default()
    }

    /// Records that the agent now runs `next`, and keeps it and its
    /// predecessors from being pruned.
    pub fn record(&self, next: &ArtifactRef, rollback: bool) -> anyhow::Result<()> {
        let versions = self.get().after(next, rollback);
        self.store.pin(AGENT_SERVICE, versions.pinned());
        self.state.set(AGENT_SERVICE, versions)
    }

    /// The agent runs the binary it was installed with (a fresh start, or
    /// a rollback to it): no agent artifact is current, and the artifacts
    /// of an earlier image are no rollback target. The floor stays.
    pub fn forget_image(&self) -> anyhow::Result<()> {
        let mut versions = self.get();
        if versions.current.is_none() && versions.history.is_empty() {
            return Ok(());
        }
        versions.current = None;
        versions.history.clear();
        self.store.pin(AGENT_SERVICE, Vec::new());
        self.state.set(AGENT_SERVICE, versions)
    }

    /// Keeps the agent's own artifacts (current and history) from being
    /// pruned; called at start.
    pub fn pin(&self) {
        self.store.pin(AGENT_SERVICE, self.get().pinned());
    }
}
