//! The agent's event stream: every state change, numbered, fanned out to
//! every `WatchEvents` caller. A slow watcher that falls behind by more than
//! the buffer is told so and dropped; it never slows the agent down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use reload_proto::v1 as pb;
use tokio::sync::broadcast;

/// Events a watcher may lag behind before it is cut off.
const EVENT_BUFFER: usize = 1024;

pub struct EventBus {
    sender: broadcast::Sender<pb::Event>,
    sequence: AtomicU64,
    /// Set when the agent re-executes itself: watch streams end, so the
    /// drain of calls in flight does not wait on streams that never end.
    closing: tokio::sync::watch::Sender<bool>,
}

/// The parts of an event that vary; the bus adds sequence and time.
#[derive(Default)]
pub struct EventFields<'a> {
    pub service: &'a str,
    pub version: &'a str,
    pub sha256: &'a str,
    pub pid: u32,
    pub message: String,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            sender: broadcast::channel(EVENT_BUFFER).0,
            sequence: AtomicU64::new(0),
            closing: tokio::sync::watch::channel(false).0,
        }
    }
}

impl EventBus {
    pub fn emit(&self, kind: pb::EventKind, fields: EventFields<'_>) {
        let event = pb::Event {
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            time: Some(SystemTime::now().into()),
            kind: kind as i32,
            service: fields.service.to_string(),
            version: fields.version.to_string(),
            sha256: fields.sha256.to_string(),
            pid: fields.pid,
            rollout_id: String::new(),
            message: fields.message,
        };
        tracing::info!(
            event = kind.as_str_name(),
            service = %event.service,
            version = %event.version,
            pid = event.pid,
            "{}",
            event.message
        );
        // No receivers is fine: nobody is watching.
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.sender.subscribe()
    }

    /// Ends every watch stream (see `closing`).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }
}
