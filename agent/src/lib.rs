//! `reload-agent`: the per-host daemon that accepts signed artifacts over
//! gRPC, verifies them, keeps them in a content-addressed store, and runs
//! the services they belong to, reloading them without closing a socket.
//!
//! Layout:
//! - [`boot`]: start-up as named steps (bind, prepare, run) and the serve
//!   loop; `main.rs` reads the environment before any thread starts.
//! - [`config`]: the TOML config, checked and resolved (`--check` stops here).
//! - [`api`]: the `reload.v1` gRPC handlers (translate and authorize only)
//!   and the one conversion of errors to status codes.
//! - [`store`]: the artifact store, the only code that writes under
//!   `store_dir`, and [`store::ArtifactVerifier`], the one set of checks
//!   every use of an artifact goes through.
//! - [`services`]: the services: the registry, the handoff (verify ->
//!   preflight -> spawn -> ready -> commit -> drain), crash restarts,
//!   sockets, readiness and health probes.
//! - [`selfupgrade`]: `UpgradeAgent` and SIGHUP, the in-place re-exec that
//!   keeps the pid, the sockets and the running services; [`handover`] is
//!   what crosses that exec, [`main_thread`] why forks and the exec happen on
//!   the main thread, [`signals`] how no signal is lost across it.
//! - [`shim`]: `reload-agent --shim`, the small parent of each service
//!   process that keeps it, its sockets, output and exit status alive
//!   while no agent runs.
//! - [`connections`]: what a client may hold on the agent's own ports
//!   (handshake deadline, caps per peer and in all, idle connections).
//! - [`lease`]: rollout leases, the fencing between rollouts.
//! - [`state`]: current/previous versions persisted across restarts.
//! - [`audit`], [`events`], [`metrics`], `health_http`: what the agent
//!   reports (an audit line per mutating call, the event stream, Prometheus
//!   text and `/healthz`).
//!
//! Verification rules live in the `reload-artifact` crate, shared with
//! `reloadctl verify`. The wire types live in `reload-proto`.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod boot;
pub mod config;
pub mod connections;
pub mod events;
pub mod fetch;
pub mod handover;
mod health_http;
pub mod lease;
pub mod main_thread;
pub mod metrics;
pub mod peers;
pub mod redact;
pub mod selfupgrade;
pub mod services;
pub mod shim;
pub mod signals;
pub mod state;
pub mod store;
