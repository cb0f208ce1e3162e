//! Serving a tonic gRPC service on an inherited listener, with the drain of
//! [`crate::http`] (feature `grpc`).
//!
//! gRPC is HTTP/2, one long-lived connection per client channel with many
//! calls on it, so the drain that matters is HTTP/2's: each connection gets
//! the two-step GOAWAY at its moment in the close-spread window, the calls
//! in flight (a server-streaming call included) run to their end, and the
//! client opens a new connection, to the new process, for its next call.
//!
//! Why not tonic's own `Server::serve_with_incoming_shutdown`: it also
//! sends the two-step GOAWAY (through hyper), but to every connection at
//! the same instant, and it waits for the last call without a bound, so a
//! stream that never ends keeps the old process alive until the agent's
//! kill. Here the closes are spread and the drain ends at
//! [`DrainConfig::drain_timeout`].
//!
//! ```no_run
//! # async fn run(svc: tonic::service::Routes) -> anyhow::Result<()> {
//! use reload_server::{grpc, http, notify, Listeners};
//! let mut listeners = Listeners::from_env()?;
//! let tcp = listeners.tcp("grpc", "127.0.0.1:50051".parse()?)?;
//! let shutdown = http::shutdown_signal()?;
//! notify::ready()?;
//! // `svc` is `Routes::new(MyServiceServer::new(my_service))`.
//! grpc::serve_grpc(tcp, svc, shutdown, http::DrainConfig::default()).await?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

use std::future::Future;
use std::io;

use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::http::{serve_http, DrainConfig};

/// Serves `routes` (one or more tonic services) on `listener` until
/// `shutdown` completes, then drains as [`serve_http`] does. Clients speak
/// HTTP/2 with prior knowledge, as gRPC clients do without TLS.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
    config: DrainConfig,
) -> io::Result<()> {
    // `prepare` settles the router once, not on each connection's clone.
    let service = TowerToHyperService::new(routes.prepare());
    serve_http(listener, service, shutdown, config).await
}
