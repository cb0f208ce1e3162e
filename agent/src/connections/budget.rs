//! The caps on one port: connections per peer and in all, and which
//! connection goes when the port is full.
//!
//! Every accepted connection asks [`ConnectionBudget::admit`] first and
//! holds the [`Admission`] it gets for its whole life (dropping it gives the
//! slot back). Over the per-peer cap the new connection is closed at once.
//! Over the total cap the budget closes the *oldest connection still in its
//! handshake* instead, and admits the new one; only when every connection
//! has finished its handshake is the new one refused. The reason: a
//! connection in its handshake has proved nothing (with mutual TLS, it has
//! shown no client certificate yet), so a flood of them from many addresses
//! must not be able to keep out a client that can finish one. A legitimate
//! handshake takes milliseconds; to evict it, a flood would have to cycle
//! through the whole port's cap in that time.
//!
//! An evicted connection is closed by its own task, so the count may pass
//! the cap by the evictions not yet carried out, for as long as those tasks
//! take to run.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::ConnectionLimits;
use crate::metrics::{Port, PortReason, SharedMetrics};

/// Refusals and evictions are logged at most this often per port and
/// reason: a flood must not turn into a flood of log lines.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why the agent closed a connection; the `reason` label of
/// `reload_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Refused at accept: the peer already held `max_connections_per_peer`.
    PerPeerLimit,
    /// Refused at accept: the port held `max_connections`, all past their
    /// handshake.
    TotalLimit,
    /// Still in its handshake when the port was full and another connection
    /// came.
    Evicted,
    /// No finished handshake within `handshake_timeout`.
    HandshakeTimeout,
    /// The handshake failed: no or a foreign client certificate, not TLS,
    /// not HTTP/2.
    HandshakeFailed,
    /// Nothing asked for within the idle timeout.
    Idle,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PerPeerLimit => "per_peer_limit",
            CloseReason::TotalLimit => "total_limit",
            CloseReason::Evicted => "evicted",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::Idle => "idle",
        }
    }
}

/// The connections open on one port.
pub struct ConnectionBudget {
    /// `grpc` or `health`, for metrics and logs.
    port: &'static str,
    max_per_peer: usize,
    max_total: usize,
    metrics: SharedMetrics,
    ledger: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    per_peer: HashMap<IpAddr, usize>,
    total: usize,
    next_id: u64,
    /// Connections still in their handshake, oldest first (ids grow), with
    /// the sender that tells each to close.
    handshaking: BTreeMap<u64, oneshot::Sender<()>>,
    warnings: HashMap<CloseReason, Throttle>,
}

/// When a warning of one kind was last logged, and how many were not
/// logged since.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Whether to log now; if so, how many went unlogged before this one.
    fn let_through(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Who counts as one peer: an IPv4 address, or an IPv6 /64 (the least a
/// host is given; one machine can use any address in it).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

impl ConnectionBudget {
    pub fn new(
        port: &'static str,
        limits: &ConnectionLimits,
        metrics: SharedMetrics,
    ) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            port,
            max_per_peer: limits.max_per_peer,
            max_total: limits.max_total,
            metrics,
            ledger: Mutex::default(),
        })
    }

    /// Takes a slot for a connection from `peer`, still in its handshake;
    /// `None` when it must be closed at once (counted and logged here).
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Admission> {
        let key = peer_key(peer.ip());
        let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let held = ledger.per_peer.get(&key).copied().unwrap_or(0);
        if held >= self.max_per_peer {
            let unlogged = ledger
                .warnings
                .entry(CloseReason::PerPeerLimit)
                .or_default()
                .let_through();
            drop(ledger);
            self.count(CloseReason::PerPeerLimit);
            if let Some(unlogged) = unlogged {
                tracing::warn!(
                    port = self.port,
                    %peer,
                    unlogged,
                    "connection from {peer} closed at once: that address already holds {} connections to the {} port ([limits] max_connections_per_peer); {unlogged} more closed for this reason since the last warning",
                    self.max_per_peer,
                    self.port
                );
            }
            return None;
        }
        if ledger.total >= self.max_total {
            let Some((_, evict)) = ledger.handshaking.pop_first() else {
                let unlogged = ledger
                    .warnings
                    .entry(CloseReason::TotalLimit)
                    .or_default()
                    .let_through();
                drop(ledger);
                self.count(CloseReason::TotalLimit);
                if let Some(unlogged) = unlogged {
                    tracing::warn!(
                        port = self.port,
                        %peer,
                        unlogged,
                        "connection from {peer} closed at once: the {} port holds {} connections, every one past its handshake ([limits] max_connections); {unlogged} more closed for this reason since the last warning",
                        self.port,
                        self.max_total
                    );
                }
                return None;
            };
            // The evicted connection's task closes it and counts it.
            let _ = evict.send(());
            if let Some(unlogged) = ledger
                .warnings
                .entry(CloseReason::Evicted)
                .or_default()
                .let_through()
            {
                tracing::warn!(
                    port = self.port,
                    %peer,
                    unlogged,
                    "the {} port is full ({} connections, [limits] max_connections): closed the oldest connection still in its handshake to take one from {peer}; {unlogged} more since the last warning",
                    self.port,
                    self.max_total
                );
            }
        }
        let id = ledger.next_id;
        ledger.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        ledger.handshaking.insert(id, evict);
        *ledger.per_peer.entry(key).or_insert(0) += 1;
        ledger.total += 1;
        drop(ledger);
        self.add_open(1);
        Some(Admission {
            budget: self.clone(),
            peer: key,
            id,
            evicted: Some(evicted),
        })
    }

    fn count(&self, reason: CloseReason) {
        self.metrics
            .connections_closed
            .get_or_create(&PortReason {
                port: self.port.into(),
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// `reload_connections_open{port}` moved by `delta`.
    fn add_open(&self, delta: i64) {
        self.metrics
            .connections_open
            .get_or_create(&Port {
                port: self.port.into(),
            })
            .inc_by(delta);
    }
}

/// One connection's slot in its port's [`ConnectionBudget`], given back on
/// drop.
pub struct Admission {
    budget: Arc<ConnectionBudget>,
    peer: IpAddr,
    id: u64,
    /// Fires when the budget evicts this connection; `None` once its
    /// handshake is done (it can no longer be evicted).
    evicted: Option<oneshot::Receiver<()>>,
}

impl Admission {
    /// Completes when the budget closes this connection to make room for
    /// another; never once [`Admission::established`] was called.
    pub async fn evicted(&mut self) {
        if let Some(evicted) = &mut self.evicted {
            let outcome = evicted.await;
            // A finished receiver must not be polled again.
            self.evicted = None;
            if outcome.is_ok() {
                return;
            }
        }
        // Established, or the budget's sender went without a word: this
        // connection is never evicted.
        std::future::pending().await
    }

    /// The handshake is done: this connection is no longer evicted to make
    /// room.
    pub fn established(&mut self) {
        self.evicted = None;
        let mut ledger = self.budget.ledger.lock().unwrap_or_else(|p| p.into_inner());
        ledger.handshaking.remove(&self.id);
    }

    /// Counts why the agent closes this connection.
    pub fn closing(&self, reason: CloseReason) {
        self.budget.count(reason);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut ledger = self.budget.ledger.lock().unwrap_or_else(|p| p.into_inner());
        ledger.handshaking.remove(&self.id);
        ledger.total -= 1;
        if let Some(held) = ledger.per_peer.get_mut(&self.peer) {
            *held -= 1;
            if *held == 0 {
                ledger.per_peer.remove(&self.peer);
            }
        }
        drop(ledger);
        self.budget.add_open(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_per_peer: usize, max_total: usize) -> Arc<ConnectionBudget> {
        let limits = ConnectionLimits {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_per_peer,
            max_total,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        };
        ConnectionBudget::new("grpc", &limits, Arc::default())
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_peer_over_its_cap_is_refused_and_others_are_not() {
        let budget = budget(2, 100);
        let held: Vec<_> = (0..2)
            .map(|port| budget.admit(addr(&format!("10.0.0.1:{}", 1000 + port))))
            .collect();
        assert!(held.iter().all(Option::is_some));
        assert!(budget.admit(addr("10.0.0.1:2000")).is_none());
        assert!(budget.admit(addr("10.0.0.2:2000")).is_some());
        // A slot given back can be taken again.
        drop(held);
        assert!(budget.admit(addr("10.0.0.1:2001")).is_some());
    }

    #[test]
    fn ipv6_peers_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let budget = budget(1, 100);
        let _first = budget.admit(addr("[2001:db8:1:2::1]:1")).unwrap();
        assert!(budget.admit(addr("[2001:db8:1:2::ffff]:1")).is_none());
        assert!(budget.admit(addr("[2001:db8:1:3::1]:1")).is_some());
        let _v4 = budget.admit(addr("10.0.0.9:1")).unwrap();
        assert!(budget.admit(addr("[::ffff:10.0.0.9]:2")).is_none());
    }

    #[tokio::test]
    async fn a_full_port_evicts_its_oldest_handshake_then_refuses() {
        let budget = budget(10, 2);
        let mut oldest = budget.admit(addr("10.0.0.1:1")).unwrap();
        let mut second = budget.admit(addr("10.0.0.2:1")).unwrap();
        // Full: the oldest handshake goes, the newcomer is admitted.
        let third = budget.admit(addr("10.0.0.3:1")).unwrap();
        tokio::time::timeout(Duration::from_secs(1), oldest.evicted())
            .await
            .expect("the oldest handshake is evicted");
        drop(oldest);
        // Established connections are never evicted: with none in its
        // handshake left, a newcomer is refused.
        second.established();
        let mut third = third;
        third.established();
        assert!(budget.admit(addr("10.0.0.4:1")).is_none());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second.evicted())
                .await
                .is_err(),
            "an established connection must not be evicted"
        );
    }
}
