//! Who stages from whom when a push has `peer_fetch` on.
//!
//! The release leaves this machine once: the first host to stage is the
//! seed (the CLI uploads to it, or it fetches from `artifact_url`); every
//! other host is told to fetch from hosts that already hold it
//! (FetchArtifact with `peers`). Each holder serves at most `degree` hosts
//! at once, so the hosts holding the release grow as a tree of that degree
//! and no agent's disk or link carries the whole fleet. A host that cannot
//! be served (no holder has a free place yet) waits for one; the hosts of
//! earlier waves are served first.
//!
//! The tree is only a schedule: the receiving agent verifies every byte
//! against the signed manifest, and a host whose peers fail falls back to
//! an upload (see `GrpcFleet::upload_release`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Fallback peers named after the one a host is assigned: if it cannot
/// deliver, the agent asks these before giving up.
const FALLBACK_PEERS: usize = 2;

pub struct PeerTree {
    degree: usize,
    state: Mutex<TreeState>,
}

#[derive(Default)]
struct TreeState {
    /// Hosts holding the release, with how many hosts each serves now.
    holders: Vec<(String, usize)>,
    /// A seed is staging: the others wait for it.
    seeding: bool,
    /// Hosts waiting for a place, by rank then arrival: the engine stages
    /// in wave order and the rank is a host's place in it, so the hosts
    /// needed first get peers first.
    queue: BTreeMap<(u64, u64), (String, oneshot::Sender<Turn>)>,
    /// Arrivals so far, to order hosts of the same rank.
    arrivals: u64,
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
/// under its peer) for the next host in line.
pub struct Ticket {
    tree: Arc<PeerTree>,
    pub turn: Turn,
}

impl PeerTree {
    pub fn new(degree: usize) -> Arc<PeerTree> {
        Arc::new(PeerTree {
            degree: degree.max(1),
            state: Mutex::new(TreeState::default()),
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
        self.hand_out(&mut state);
    }

    /// Waits until `host` may stage, and says how. Waiting hosts are
    /// served lowest `rank` first (the order the rollout needs them in),
    /// then in the order they asked.
    pub async fn turn(self: &Arc<Self>, host: &str, rank: u64) -> Ticket {
        let waiting = {
            let mut state = self.lock();
            state.arrivals += 1;
            let key = (rank, state.arrivals);
            let first_in_line = state.queue.keys().next().is_none_or(|first| key < *first);
            if first_in_line {
                if let Some(turn) = self.try_turn(&mut state, host) {
                    return Ticket {
                        tree: self.clone(),
                        turn,
                    };
                }
            }
            let (sender, receiver) = oneshot::channel();
            state.queue.insert(key, (host.to_string(), sender));
            receiver
        };
        // The sender lives in the queue until a turn is sent: this cannot
        // fail while the tree lives, and the caller holds it.
        let turn = waiting
            .await
            .expect("the peer tree keeps every waiting host's sender");
        Ticket {
            tree: self.clone(),
            turn,
        }
    }

    /// Gives the hosts at the head of the queue their turns while places
    /// are free.
    fn hand_out(&self, state: &mut TreeState) {
        while let Some((_, (host, _))) = state.queue.first_key_value() {
            let host = host.clone();
            let Some(turn) = self.try_turn(state, &host) else {
                return;
            };
            let (_, (_, sender)) = state.queue.pop_first().expect("looked at above");
            if let Err(turn) = sender.send(turn) {
                // That host stopped waiting (its staging was cancelled):
                // the place goes to the next one.
                Self::give_back(state, &turn);
            }
        }
    }

    fn give_back(state: &mut TreeState, turn: &Turn) {
        match turn {
            Turn::Seed => state.seeding = false,
            Turn::Fetch(peers) => {
                if let Some(entry) = state.holders.iter_mut().find(|(h, _)| h == &peers[0]) {
                    entry.1 = entry.1.saturating_sub(1);
                }
            }
        }
    }

    fn try_turn(&self, state: &mut TreeState, host: &str) -> Option<Turn> {
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
        PeerTree::give_back(&mut state, &self.turn);
        self.tree.hand_out(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_seed_then_each_holder_serves_at_most_degree_hosts() {
        let tree = PeerTree::new(2);
        let seed = tree.turn("a", 0).await;
        assert_eq!(seed.turn, Turn::Seed);
        // While the seed stages, nobody else may start.
        let waiting = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("b", 1).await.turn.clone() }
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
        let b = tree.turn("b", 1).await;
        let c = tree.turn("c", 2).await;
        assert_eq!(c.turn, Turn::Fetch(vec!["a".into()]));
        let blocked = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("d", 3).await.turn.clone() }
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
    async fn hosts_get_turns_in_the_order_they_asked_and_a_cancelled_one_passes_its_place_on() {
        let tree = PeerTree::new(1);
        let seed = tree.turn("a", 0).await;
        let mut waiting = Vec::new();
        for host in ["b", "c", "d"] {
            let tree = tree.clone();
            waiting.push(tokio::spawn(async move { tree.turn(host, 1).await }));
            // So they queue in this order.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = waiting.pop().unwrap();
        let c = waiting.pop().unwrap();
        let b = waiting.pop().unwrap();
        // "c" stops waiting: its staging was cancelled.
        c.abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        tree.holds("a");
        drop(seed);
        // "a" serves one host at a time: "b", first in line.
        let b = b.await.unwrap();
        assert_eq!(b.turn, Turn::Fetch(vec!["a".into()]));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!d.is_finished(), "a holder served more than the degree");
        // "b" is done: its place skips the cancelled "c" and goes to "d".
        drop(b);
        assert_eq!(d.await.unwrap().turn, Turn::Fetch(vec!["a".into()]));
    }

    #[tokio::test]
    async fn a_host_the_rollout_needs_sooner_goes_ahead_of_one_that_asked_first() {
        let tree = PeerTree::new(1);
        let seed = tree.turn("a", 0).await;
        let later_wave = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("z", 900).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let next_wave = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("b", 1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tree.holds("a");
        drop(seed);
        let b = next_wave.await.unwrap();
        assert_eq!(b.turn, Turn::Fetch(vec!["a".into()]));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !later_wave.is_finished(),
            "the later wave's host went first"
        );
        drop(b);
        assert_eq!(
            later_wave.await.unwrap().turn,
            Turn::Fetch(vec!["a".into()])
        );
    }

    #[tokio::test]
    async fn a_failed_seed_hands_the_seed_role_to_a_waiting_host() {
        let tree = PeerTree::new(3);
        let seed = tree.turn("a", 0).await;
        let next = tokio::spawn({
            let tree = tree.clone();
            async move { tree.turn("b", 1).await.turn.clone() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(seed);
        assert_eq!(next.await.unwrap(), Turn::Seed);
    }
}
