//! The end-to-end tests, built as one test binary (as ripgrep's
//! `tests/tests.rs` is): one link instead of one per area, and one place to
//! see every area. Each module is one area; a test's name is
//! `<area>::<what it shows>`, e.g. `reload::twenty_reloads_lose_no_request_on_keep_alive_connections`.
//!
//! Every test runs the real binaries (`reload-agent`, `reloadctl`,
//! `reload-demo-server`) as real processes through the helpers in
//! `reload_tests` (`tests/src/`): build them first with
//! `cargo build --workspace --bins` (`make test` does), then
//! `cargo nextest run -p reload-tests`. A tool a test needs (openssl,
//! systemd-socket-activate, python3 with grpcio, and the recipes' gunicorn,
//! uvicorn, node, go, nginx and haproxy) that is missing fails that test,
//! saying what to install; nothing is skipped silently.
//!
//! Layout:
//! - [`upload`]: uploads, verification and the artifact store on disk.
//! - [`fetch`]: agents fetching releases from an HTTP artifact repository (nginx).
//! - [`peers`]: agents fetching releases from each other (peer fetch).
//! - [`reload`]: socket-preserving reloads of a service under load.
//! - [`http2`]: HTTP/2 and gRPC services reloaded under load (h2load, the
//!   greeter example).
//! - [`rollout`]: `reloadctl push` across a fleet of agents.
//! - [`rollout_faults`]: racing rollouts under partitions and kills (randomized, seeded).
//! - [`agent_upgrade`]: the agent upgrading itself in place.
//! - [`fd_store`]: listeners kept in systemd's fd store across an agent crash.
//! - [`fencing`]: fencing tokens, checked where the change is committed.
//! - [`outlive`]: services that outlive their agent (crash, kill, restart).
//! - [`probation`]: a bad release is reverted by the agent, never replacing a good one.
//! - [`recipes`]: gunicorn, uvicorn, Node, Go, nginx and HAProxy under the agent, as docs/recipes/ configures them.
//! - [`standalone`]: the demo server upgrading itself, and under systemd.
//! - [`security`]: mutual TLS, rights, the audit log, limits and keys.
//! - [`operability`]: metrics, gRPC reflection, the Python example.
//! - [`cli`]: `reloadctl` as a user runs it.
//! - [`cli_project`]: `reloadctl` against a fleet: the project file, hosts files, `--limit`, dry runs, progress, logs.
//! - [`verified_exec`]: only verified bytes run, whatever a writer does to the store.

mod agent_upgrade;
mod cli;
mod cli_project;
mod fd_store;
mod fencing;
mod fetch;
mod http2;
mod operability;
mod outlive;
mod peers;
mod probation;
mod recipes;
mod reload;
mod rollout;
mod rollout_faults;
mod security;
mod standalone;
mod upload;
mod verified_exec;
