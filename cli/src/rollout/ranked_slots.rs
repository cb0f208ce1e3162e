//! [`RankedSlots`]: a semaphore that serves the lowest rank waiting, not
//! the first to ask.
//!
//! A push starts every host's staging at once, in wave order, but a
//! thousand tasks spawned in one go are first polled in whatever order the
//! runtime's queues give (the newest first, on a worker's LIFO slot and
//! local queue; the oldest from the global queue later), so a fair
//! semaphore would serve them in that order and the next wave's hosts
//! would wait behind later waves'. Ranking the waiters puts the order back
//! where the engine decided it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

pub struct RankedSlots {
    state: Mutex<SlotsState>,
}

struct SlotsState {
    free: usize,
    /// Waiting by (rank, arrival), so equal ranks keep their order.
    waiting: BTreeMap<(u64, u64), oneshot::Sender<()>>,
    arrivals: u64,
}

/// A slot held; dropping it hands it to the lowest rank waiting.
pub struct Slot {
    slots: Arc<RankedSlots>,
}

impl RankedSlots {
    pub fn new(slots: usize) -> Arc<RankedSlots> {
        Arc::new(RankedSlots {
            state: Mutex::new(SlotsState {
                free: slots.max(1),
                waiting: BTreeMap::new(),
                arrivals: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot; among those waiting, the lowest `rank` gets the
    /// next one.
    pub async fn acquire(self: &Arc<Self>, rank: u64) -> Slot {
        let granted = {
            let mut state = self.lock();
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                return Slot {
                    slots: self.clone(),
                };
            }
            state.arrivals += 1;
            let key = (rank, state.arrivals);
            let (sender, receiver) = oneshot::channel();
            state.waiting.insert(key, sender);
            Self::hand_out(&mut state);
            receiver
        };
        // The sender stays in the map until a slot is sent, and the map
        // lives as long as `self`, which we hold.
        granted
            .await
            .expect("a waiting slot's sender is kept until it is granted");
        Slot {
            slots: self.clone(),
        }
    }

    fn hand_out(state: &mut SlotsState) {
        while state.free > 0 {
            let Some((_, sender)) = state.waiting.pop_first() else {
                return;
            };
            state.free -= 1;
            if sender.send(()).is_err() {
                // That waiter was cancelled: the slot goes to the next.
                state.free += 1;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.free += 1;
        RankedSlots::hand_out(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_lowest_rank_waiting_gets_the_next_slot_whatever_the_order_of_asking() {
        let slots = RankedSlots::new(1);
        let held = slots.acquire(0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        // Asked in the order 30, 10, 20; a cancelled 5 must not keep a slot.
        for rank in [30u64, 10, 20, 5] {
            let (slots, order) = (slots.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _slot = slots.acquire(rank).await;
                order.lock().unwrap().push(rank);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        waiters.pop().unwrap().abort();
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![10, 20, 30]);
        // The slot came back, the cancelled waiter's included.
        tokio::time::timeout(Duration::from_secs(1), slots.acquire(0))
            .await
            .expect("a slot was lost");
    }
}
