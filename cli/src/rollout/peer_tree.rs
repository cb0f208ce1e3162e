//! Who stages from whom when a push has `peer_fetch` on.
//!
//! The release leaves this machine once: the first host to stage is the
//! seed (the CLI uploads to it, or it fetches from `artifact_url`); every
//! other host is told to fetch from hosts that already hold it
//! (FetchArtifact with `peers`). Each holder serves at most `degree` hosts
//! at once, so the hosts holding the release grow as a tree of that degree
//! and no agent's disk or link carries the whole fleet. A host that cannot
//! be served (no holder has a free place yet) waits for one.
//!
//! The tree is only a schedule: the receiving agent verifies every byte
//! against the signed manifest, and a host whose peers fail falls back to
//! an upload (see `GrpcFleet::upload_release`).

use std::sync::{Arc, Mutex};

/// Fallback peers named after the one a host is assigned: if it cannot
/// deliver, the agent asks these before giving up.
const FALLBACK_PEERS: usize = 2;

pub struct PeerTree {
    degree: usize,
    state: Mutex<TreeState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct TreeState {
    /// Hosts holding the release, with how many hosts each serves now.
    holders: Vec<(String, usize)>,
    /// A seed is staging: the others wait for it.
    seeding: bool,
}

/// What a host does to stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Stage the way a push without peers does (upload or repository).
    Seed,
    /// Fetch from these hosts, in order (the first is the one it counts
    /// against).
    Fetch(Vec<String>),
}

/// A host's turn; dropping it frees its place (the seed's role, or a place
/// under its peer) and wakes the hosts waiting.
pub struct Ticket {
    tree: Arc<PeerTree>,
    pub turn: Turn,
}

impl PeerTree {
    pub fn new(degree: usize) -> Arc<PeerTree> {
        Arc::new(PeerTree {
            degree: degree.max(1),
            state: Mutex::new(TreeState::default()),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TreeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `host` holds the release (it staged, or already ran it): it may
    /// serve others from now on.
    pub fn holds(&self, host: &str) {
        let mut state = self.lock();
        if !state.holders.iter().any(|(h, _)| h == host) {
            state.holders.push((host.to_string(), 0));
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Waits until `host` may stage, and says how.
    pub async fn turn(self: &Arc<Self>, host: &str) -> Ticket {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the look, so a change between the look and
            // the wait is not missed.
            notified.as_mut().enable();
            if let Some(turn) = self.try_turn(host) {
                return Ticket {
                    tree: self.clone(),
                    turn,
                };
            }
            notified.await;
        }
    }

    fn try_turn(&self, host: &str) -> Option<Turn> {
        let mut state = self.lock();
        if state.holders.iter().any(|(h, _)| h == host) {
            // It holds the release already: staging will say so at once.
            return Some(Turn::Seed);
        }
        if state.holders.is_empty() {
            if state.seeding {
                return None;
            }
            state.seeding = true;
            return Some(Turn::Seed);
        }
        // Least busy first; among equals, the oldest holder (closest to
        // the seed, most likely to still be there).
        let mut order: Vec<usize> = (0..state.holders.len()).collect();
        order.sort_by_key(|&i| state.holders[i].1);
        let primary = order[0];
        if state.holders[primary].1 >= self.degree {
            return None;
        }
        state.holders[primary].1 += 1;
        let peers = order
            .iter()
            .take(1 + FALLBACK_PEERS)
            .map(|&i| state.holders[i].0.clone())
            .collect();
        Some(Turn::Fetch(peers))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.tree.lock();
        match &self.turn {
            Turn::Seed => state.seeding = false,
            Turn::Fetch(peers) => {
                if let Some(entry) = state.holders.iter_mut().find(|(h, _)| h == &peers[0]) {
                    entry.1 = entry.1.saturating_sub(1);
                }
            }
        }
        drop(state);
        self.tree.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_seed_then_each_holder_serves_at_most_degree_hosts() {
        let tree = PeerTree::new(2);
        let seed = tree.turn("a").await;
        assert_eq!(seed.turn, Turn::Seed);
        // While the seed stages, nobody else may start.
        let waiting = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("b").await.turn.clone() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a second host started before the seed held the release"
        );
        tree.holds("a");
        drop(seed);
        assert_eq!(waiting.await.unwrap(), Turn::Fetch(vec!["a".into()]));
        // "b"'s ticket was dropped with the task: "a" serves nobody now.
        let b = tree.turn("b").await;
        let c = tree.turn("c").await;
        assert_eq!(c.turn, Turn::Fetch(vec!["a".into()]));
        let blocked = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("d").await.turn.clone() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !blocked.is_finished(),
            "a holder served more than the degree"
        );
        tree.holds("b");
        drop(b);
        // "b" holds it and serves nobody: the least busy, "a" second.
        assert_eq!(
            blocked.await.unwrap(),
            Turn::Fetch(vec!["b".into(), "a".into()])
        );
        drop(c);
    }

    #[tokio::test]
    async fn a_failed_seed_hands_the_seed_role_to_a_waiting_host() {
        let tree = PeerTree::new(3);
        let seed = tree.turn("a").await;
        let next = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("b").await.turn.clone() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(seed);
        assert_eq!(next.await.unwrap(), Turn::Seed);
    }
}
