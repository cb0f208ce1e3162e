//! Connection hygiene on the agent's own ports (gRPC and the health
//! endpoint): what a client may hold before it has proved anything, and for
//! how long.
//!
//! Why this exists: every connection costs the agent a file descriptor, and
//! the agent shares its open-file limit with what it must never be denied
//! (restarting a crashed service, writing the store). Before this module a
//! client could open TCP connections to the gRPC port and never start TLS:
//! tonic waited for each handshake forever, 1,100 such connections took every
//! descriptor of an agent at 1,024, `reloadctl status` could not connect and
//! a crashed service could not restart ("Too many open files"). So, on both
//! ports:
//!
//! - a connection must finish its handshake (TLS and, on gRPC, the HTTP/2
//!   preface) within `[limits] handshake_timeout` of being accepted;
//! - a peer (an IP address; an IPv6 /64) holds at most
//!   `max_connections_per_peer`, and a port at most `max_connections`
//!   (lowered at start to what the open-file limit allows): a connection
//!   over the per-peer cap is closed at once; over the total cap, the oldest
//!   connection still in its handshake is closed to make room, and only if
//!   there is none is the new one refused. An unauthenticated flood from
//!   many addresses therefore cannot lock out a client that completes its
//!   handshake (see [`budget`]);
//! - a gRPC connection with no call open is closed after `idle_timeout`,
//!   and HTTP/2 keep-alive pings find peers that vanished (see [`grpc`]).
//!
//! Every closure is counted in `reload_connections_closed_total{port,
//! reason}`; refusals and evictions are also logged as warnings, at most
//! one per reason and port every 10 s.
//!
//! Layout: [`budget`] (the caps and the per-connection [`Admission`]),
//! [`grpc`] (the gRPC port from accept to the stream tonic serves), [`tls`]
//! (the rustls config both ports use). `health_http` uses the budget and
//! the TLS config for the health port.

mod budget;
pub mod grpc;
pub mod tls;

pub use budget::{Admission, CloseReason, ConnectionBudget};

use crate::config::ConnectionLimits;

/// Descriptors left for everything but the two ports' connections: service
/// listeners and their fd-store copies, shim sockets, pidfds and output
/// pipes, notify sockets, store uploads, the state and audit files.
const RESERVED_FDS: u64 = 256;

/// `limits`, with `max_total` lowered (and a warning) when `ports` ports at
/// that many connections each would not fit in the process's open-file
/// limit next to [`RESERVED_FDS`]. A cap above the limit would protect
/// nothing: accept would fail with EMFILE first, and so would everything
/// else the agent opens.
pub fn fit_to_open_files(mut limits: ConnectionLimits, ports: usize) -> ConnectionLimits {
    use nix::sys::resource::{getrlimit, Resource};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return limits;
    };
    let per_port = soft.saturating_sub(RESERVED_FDS) / ports.max(1) as u64;
    let per_port = usize::try_from(per_port).unwrap_or(usize::MAX).max(1);
    if limits.max_total > per_port {
        tracing::warn!(
            max_connections = limits.max_total,
            open_file_limit = soft,
            per_port,
            "[limits] max_connections does not fit in the agent's open-file limit (RLIMIT_NOFILE {soft}, {RESERVED_FDS} kept for services and the store, shared by {ports} port(s)): each port takes at most {per_port} connections. Raise LimitNOFILE= (the shipped unit sets 65536) or lower max_connections"
        );
        limits.max_total = per_port;
    }
    limits
}
