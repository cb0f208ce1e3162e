//! `reload-server`: what a program managed by the reload agent links to.
//!
//! The agent swaps a running service to a new binary without closing its
//! listening sockets: it owns them, hands the same sockets to the new process,
//! waits for the new process to say it is ready, then asks the old one to
//! drain. This crate is the program's half of that contract, so a Rust
//! service needs one or two calls to take part:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use reload_server::{http, notify, Listeners};
//! # let svc = hyper::service::service_fn(|_req| async {
//! #     Ok::<_, std::convert::Infallible>(hyper::Response::new(
//! #         http_body_util::Full::new(bytes::Bytes::from_static(b"hi")),
//! #     ))
//! # });
//! // Ideally called first thing in `main`, before threads exist (it edits the environment).
//! let mut listeners = Listeners::from_env()?;
//! let tcp = listeners.tcp("http", "127.0.0.1:8080".parse()?)?;
//! // Install the signal handlers *before* announcing readiness: the agent may
//! // send the drain signal the moment it sees READY=1.
//! let shutdown = http::shutdown_signal()?;
//! notify::ready()?;
//! http::serve_http(tcp, svc, shutdown, http::DrainConfig::default()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # The protocol
//!
//! Everything here speaks systemd's protocols, so the same binary runs under
//! the agent, under systemd, or alone:
//!
//! - **Sockets** arrive by socket activation: fds 3, 4, … with
//!   `LISTEN_FDS=<count>`, `LISTEN_FDNAMES=<name>:<name>…` and
//!   `LISTEN_PID=<our pid>`. When nothing was passed, each listener falls back
//!   to binding its own address ("run alone" mode).
//! - **Readiness** is a `READY=1` datagram to the Unix socket named by
//!   `NOTIFY_SOCKET` (sd_notify); `STOPPING=1` when the drain starts.
//! - **Draining** starts on a signal (SIGTERM, SIGINT or SIGQUIT). The listening
//!   socket is closed at once (the kernel queue lives on in the agent and the
//!   new process), and each open keep-alive connection gets `Connection: close`
//!   on its next response (HTTP/1.1) or the two-step GOAWAY (HTTP/2) instead
//!   of being cut while the client may be sending.
//!   Closing an idle keep-alive connection instead races the client's next
//!   request on it: that race is how nginx loses about one request per
//!   keep-alive connection per reload to a client that does not retry.
//!
//! # Layout
//!
//! - [`listeners`]: inherited sockets by name (the only module with `unsafe`:
//!   turning a raw fd number into an owned socket).
//! - [`notify`]: sd_notify readiness messages.
//! - [`http`]: HTTP/1.1 and HTTP/2 serving on hyper (clear text with the
//!   protocol detected, or TLS by ALPN) with the drain semantics above:
//!   closes spread over a window, `Connection: close` for HTTP/1.1, the
//!   two-step GOAWAY for HTTP/2; and the signal helper that starts the
//!   drain.
//! - `grpc` (feature `grpc`): a tonic service served with that drain.
//! - [`spawn`]: starting a process with sockets by the same protocol (the
//!   agent's handoff and the standalone self-upgrade both use it), and
//!   pidfds for children that must survive their parent's re-exec.
//! - [`inherit`]: taking fds an earlier image of this process passed across
//!   execve (the agent's in-place self-upgrade).
//! - [`upgrade`]: standalone self-upgrade for programs that run without an
//!   agent: on SIGHUP, start the binary now at our path with our sockets,
//!   wait for its READY, then drain.
//!
//! The demo binary `reload-demo-server` (in `src/bin`) is the program the
//! end-to-end tests roll out, and a short example of using all three.

// Unsafe code is denied everywhere and allowed only in the modules that
// must touch raw file descriptors: taking inherited ones (listeners,
// inherit) and handing them to a new process between fork and exec (spawn).
#![deny(unsafe_code)]

#[cfg(feature = "grpc")]
pub mod grpc;
pub mod http;
#[allow(unsafe_code)]
pub mod inherit;
#[allow(unsafe_code)]
pub mod listeners;
pub mod notify;
#[allow(unsafe_code)]
pub mod spawn;
pub mod upgrade;

pub use http::{serve_http, shutdown_signal, DrainConfig};
pub use listeners::{ListenError, Listeners};
