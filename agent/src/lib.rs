//! `reload-agent`: the per-host daemon that accepts signed artifacts over
//! gRPC, verifies them and keeps them in a content-addressed store.
//!
//! Layout:
//! - [`config`]: the TOML config, checked and resolved (`--check` stops here).
//! - [`store`]: the artifact store; the only code that writes under
//!   `store_dir`, and the only place that decides when a file becomes
//!   visible under its final name.
//! - [`api`]: the `reload.v1` gRPC handlers and the mapping of errors to
//!   status codes.
//! - [`supervisor`]: services: start, socket-preserving reload, drain,
//!   restart with backoff; `listeners` binds their sockets once,
//!   `reload_server::spawn` starts a process with them, [`state`]
//!   persists current/previous versions, [`probe`] and `health_http` report
//!   health, [`events`] fans out every state change.
//! - [`serve`]: binds nothing itself; it takes already-bound listeners so the
//!   tests, a systemd socket and a future in-place re-exec share one path.
//!
//! Verification rules live in the `reload-artifact` crate, shared with
//! `reloadctl verify`. The wire types live in `reload-proto`.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod config;
pub mod events;
mod health_http;
pub mod lease;
mod listeners;
pub mod metrics;
pub mod probe;
pub mod state;
pub mod store;
pub mod supervisor;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use reload_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::AgentApi;
use crate::config::AgentConfig;
use crate::store::ArtifactStore;

/// Room for the envelope and protobuf framing above the chunk limit, so an
/// oversized chunk reaches our own check (RESOURCE_EXHAUSTED with a clear
/// message) instead of tonic's generic decode limit.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// HTTP/2 flow-control window for each stream and connection: a few chunks
/// in flight per upload.
const UPLOAD_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// Larger HTTP/2 frames: fewer frame headers and wake-ups per chunk.
const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// A folder others may write to could have its artifacts or state swapped
/// under the agent: refuse to start on one.
fn refuse_world_writable(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 {
            anyhow::bail!(
                "{} is writable by everyone (mode {:o}); run chmod 700 on it",
                dir.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

/// Binds every configured gRPC address. Kept apart from [`serve`] so the
/// caller can report bind errors before anything else starts.
pub async fn bind(config: &AgentConfig) -> anyhow::Result<Vec<TcpListener>> {
    // Under systemd socket activation (reload-agent.socket), the gRPC port
    // arrives as a listener named "grpc" and replaces [agent] listen.
    let mut inherited = reload_server::Listeners::from_env().context("reading LISTEN_FDS")?;
    if inherited.names().iter().any(|n| n == "grpc") {
        let listener = inherited
            .tcp("grpc", config.listen[0])
            .context("taking the systemd socket named grpc")?;
        tracing::info!("using the gRPC socket passed by systemd");
        return Ok(vec![listener]);
    }
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ([agent] listen)"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Opens the store and serves the gRPC API on `listeners` until `shutdown`
/// completes; in-flight calls then get a short grace period.
pub async fn serve(
    config: AgentConfig,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for dir in [&config.store_dir, &config.state_dir] {
        refuse_world_writable(dir)?;
    }
    let store_dir = config.store_dir.clone();
    let keep_versions = config.keep_versions;
    let store = tokio::task::spawn_blocking(move || ArtifactStore::open(&store_dir, keep_versions))
        .await?
        .with_context(|| {
            format!(
                "cannot open the artifact store {}",
                config.store_dir.display()
            )
        })?;
    let store = Arc::new(store);
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create the state folder {}",
            config.state_dir.display()
        )
    })?;
    let metrics = Arc::new(metrics::Metrics::default());
    let supervisor = Arc::new(supervisor::Supervisor::new(
        &config.services,
        &config.state_dir,
        store.clone(),
        config.trusted_keys.clone(),
        Arc::new(events::EventBus::default()),
        metrics.clone(),
    )?);
    let health_listener = match config.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} ([agent] health_listen)"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving HTTP /healthz");
            Some(listener)
        }
        None => None,
    };
    let max_message = config.limits.max_chunk_bytes as usize + MESSAGE_OVERHEAD_BYTES;
    let leases = Arc::new(lease::Leases::open(&config.state_dir)?);
    let audit = audit::AuditLog::open(&config.audit_path, config.audit_max_bytes)?;
    let tls = config.tls.clone();
    let api = AgentApi::new(config, store, supervisor.clone(), leases.clone(), audit);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    supervisor.start_monitors();
    probe::start_probes(&supervisor, health_reporter.clone());
    if let Some(listener) = health_listener {
        let acceptor = tls.as_ref().map(health_http::tls_acceptor).transpose()?;
        tokio::spawn(health_http::serve(
            listener,
            supervisor.clone(),
            leases,
            acceptor,
        ));
    }
    health_reporter
        .set_serving::<pb::artifact_service_server::ArtifactServiceServer<AgentApi>>()
        .await;
    health_reporter
        .set_serving::<pb::agent_service_server::AgentServiceServer<AgentApi>>()
        .await;
    health_reporter
        .set_serving::<pb::service_control_server::ServiceControlServer<AgentApi>>()
        .await;
    health_reporter
        .set_serving::<pb::lease_service_server::LeaseServiceServer<AgentApi>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Several listeners feed one server through a channel of accepted
    // connections.
    let (connections, incoming) = tokio::sync::mpsc::channel(64);
    for listener in listeners {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving gRPC");
        let connections = connections.clone();
        tokio::spawn(async move {
            loop {
                let accepted = listener.accept().await.map(|(stream, _)| stream);
                if let Err(err) = &accepted {
                    tracing::warn!(%addr, error = %err, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                if connections.send(accepted).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(connections);
    // systemd Type=notify: serving from here on (no-op without NOTIFY_SOCKET).
    let _ = reload_server::notify::ready();
    let _ = reload_server::notify::status("serving");

    let mut server = tonic::transport::Server::builder();
    match tls {
        Some(tls) => {
            let config = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(tls.cert, tls.key))
                // Mutual TLS: a client without a certificate from this CA
                // does not get past the handshake.
                .client_ca_root(tonic::transport::Certificate::from_pem(tls.ca));
            server = server.tls_config(config).context("the [tls] certificate or key is not valid PEM")?;
        }
        None => tracing::warn!("insecure = true: plaintext gRPC without client authentication; anyone on this machine can deploy. Configure [tls] for anything but development"),
    }
    server
        // HTTP/2's default 64 KiB windows cap an upload at a few dozen MiB/s
        // even on loopback; artifacts are large, so let the window grow.
        .initial_stream_window_size(Some(UPLOAD_WINDOW_BYTES))
        .initial_connection_window_size(Some(UPLOAD_WINDOW_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::artifact_service_server::ArtifactServiceServer::new(api.clone())
                .max_decoding_message_size(max_message),
        )
        .add_service(pb::agent_service_server::AgentServiceServer::new(
            api.clone(),
        ))
        .add_service(pb::service_control_server::ServiceControlServer::new(
            api.clone(),
        ))
        .add_service(pb::lease_service_server::LeaseServiceServer::new(api))
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
        .await
        .context("gRPC server failed")?;
    tracing::info!("stopping every service");
    let _ = reload_server::notify::stopping();
    supervisor.stop_all().await;
    Ok(())
}
