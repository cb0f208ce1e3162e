//! Serving: the gRPC server and the background tasks (probes, monitors,
//! `/healthz`, SIGHUP), until a stop signal (every service is stopped) or
//! an accepted upgrade (the handover for the next image is built, services
//! untouched).

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use reload_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;

use super::prepare::{ControlListeners, NextImage, Prepared};
use super::Exit;
use crate::api::AgentApi;
use crate::audit::{AuditEntry, AuditLog};
use crate::config::ConnectionLimits;
use crate::connections::grpc::{CountCalls, GrpcPort, Handshake, MutualTls, Plaintext};
use crate::connections::ConnectionBudget;
use crate::handover::{FdsToPass, Handover};
use crate::health_http::HealthSources;
use crate::selfupgrade::{Accepted, SelfUpgrade, UpgradeExec, AGENT_SERVICE, DRAIN_CALLS_TIMEOUT};
use crate::signals::{self, AgentSignals, StopRequest, StopSignals};

/// HTTP/2 flow-control window for each stream and connection: a few chunks
/// in flight per upload. HTTP/2's default 64 KiB windows cap an upload at a
/// few dozen MiB/s even on loopback.
const UPLOAD_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// Larger HTTP/2 frames: fewer frame headers and wake-ups per chunk.
const MAX_FRAME_BYTES: u32 = 1024 * 1024;

impl Prepared {
    pub(super) async fn run(self, signals: AgentSignals) -> anyhow::Result<Exit> {
        let Prepared {
            api,
            services,
            leases,
            metrics,
            selfupgrade,
            audit,
            listeners,
            next_image,
            launcher,
            stop_services_on_exit,
        } = self;
        let AgentSignals {
            stop: stop_signals,
            hup: mut hangup,
        } = signals;
        // Committed: let the signals in on the main thread (see
        // crate::signals). What came while this image started up, across
        // an exec too, is delivered now; had the start-up failed, it would
        // have stayed pending for the image that falls back.
        launcher.run(signals::unblock).await;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        services.start_monitors();
        // Everything that may fork on a runtime thread (exec health
        // probes) runs in `background`, which is ended, and waited for,
        // before an exec clears close-on-exec on the fds it passes.
        let mut background = JoinSet::new();
        crate::services::start_probes(
            services.services(),
            services.events(),
            health_reporter.clone(),
            &mut background,
        );
        // Stops accepting (gRPC and /healthz) when an upgrade is accepted:
        // new connections wait in the backlog for the next image.
        let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
        let ControlListeners {
            grpc,
            grpc_fds,
            grpc_tls,
            health,
            health_fd,
            connections,
            max_message,
            rights,
            anonymous_health,
        } = listeners;
        if let Some((listener, acceptor)) = health {
            let mut accepting = accepting.clone();
            let budget = ConnectionBudget::new("health", &connections, metrics.clone());
            let sources = HealthSources {
                services: services.clone(),
                leases,
                metrics: metrics.clone(),
                rights,
                anonymous_health: Arc::new(anonymous_health),
            };
            let serving = crate::health_http::serve(
                listener,
                sources,
                acceptor,
                budget,
                connections.handshake_timeout,
            );
            background.spawn(async move {
                tokio::select! {
                    _ = serving => {}
                    _ = accepting.wait_for(|stop| *stop) => {}
                }
            });
        }
        // SIGHUP (systemctl reload): read the config again by re-executing
        // the same image in place; services are untouched.
        background.spawn(async move {
            while hangup.recv().await.is_some() {
                reload_config_on_signal(&selfupgrade, &audit).await;
            }
        });
        for status in [
            "reload.v1.ArtifactService",
            "reload.v1.AgentService",
            "reload.v1.ServiceControl",
            "reload.v1.LeaseService",
        ] {
            health_reporter
                .set_service_status(status, tonic_health::ServingStatus::Serving)
                .await;
        }
        // The server stops on SIGTERM/SIGINT or on an accepted upgrade; on
        // an upgrade the stop signals come back to be watched to the exec.
        let NextImage {
            accepted,
            installed_exe,
            agent_args,
            stop_at_once,
        } = next_image;
        let (upgrade_tx, upgrade_rx) = tokio::sync::oneshot::channel::<(Accepted, StopSignals)>();
        let stop = {
            let events = services.events().clone();
            let mut stop_signals = stop_signals;
            async move {
                if stop_at_once {
                    tracing::info!("a stop was asked for during the in-place upgrade");
                    return;
                }
                tokio::select! {
                    _ = stop_signals.recv() => {}
                    accepted = accepted => {
                        if let Ok(accepted) = accepted {
                            let _ = stop_accepting.send(true);
                            // Watch streams never end by themselves.
                            events.close();
                            let _ = upgrade_tx.send((accepted, stop_signals));
                        }
                    }
                }
            }
        };
        let budget = ConnectionBudget::new("grpc", &connections, metrics.clone());
        let server = GrpcServer {
            listeners: grpc,
            server: grpc_server(&connections),
            routes: grpc_routes(api, health_service, max_message)?,
        };
        let mut serving = match grpc_tls {
            Some(acceptor) => {
                let port = GrpcPort::new(MutualTls(acceptor), budget, &connections);
                server.serve(port, &accepting, &mut background, stop)?
            }
            None => {
                tracing::warn!("insecure = true: plaintext gRPC without client authentication; anyone on this machine can deploy. Configure [tls] for anything but development");
                let port = GrpcPort::new(Plaintext, budget, &connections);
                server.serve(port, &accepting, &mut background, stop)?
            }
        };

        // systemd Type=notify: serving from here on (no-op without
        // NOTIFY_SOCKET). After an upgrade this tells systemd the same pid
        // is ready again.
        let _ = reload_server::notify::ready();
        let _ = reload_server::notify::status("serving");

        let mut upgrade_rx = upgrade_rx;
        let stop_request = StopRequest::default();
        let accepted = tokio::select! {
            served = &mut serving => {
                served.context("gRPC server failed")?;
                upgrade_rx.try_recv().ok().map(|(accepted, _)| accepted)
            }
            accepted = &mut upgrade_rx => match accepted {
                Ok((accepted, mut stop_signals)) => {
                    // From now on SIGTERM, SIGINT and SIGHUP stay pending
                    // (blocked on every thread, see crate::signals) and
                    // reach the next image's handlers.
                    launcher.run(signals::block).await;
                    // Calls in flight (the UpgradeAgent answer among them)
                    // get a bounded time to finish; the exec cuts the rest.
                    // A stop asked for meanwhile wins over the upgrade.
                    let stopped = tokio::select! {
                        drained = tokio::time::timeout(DRAIN_CALLS_TIMEOUT, &mut serving) => {
                            if drained.is_err() {
                                tracing::warn!("calls still in flight after {}; the exec ends them", humantime::format_duration(DRAIN_CALLS_TIMEOUT));
                            }
                            false
                        }
                        _ = stop_signals.recv() => true,
                    };
                    if stopped {
                        None
                    } else {
                        // From here to the exec, a stop is passed on.
                        let stop_request = stop_request.clone();
                        tokio::spawn(async move {
                            stop_signals.recv().await;
                            stop_request.set();
                        });
                        Some(accepted)
                    }
                }
                Err(_) => None,
            }
        };
        // Aborted and waited for: no task is half-way through a fork when
        // close-on-exec is cleared for the exec.
        background.shutdown().await;
        let Some(accepted) = accepted else {
            let _ = reload_server::notify::stopping();
            if stop_services_on_exit {
                tracing::info!("stopping every service (stop_services_on_exit)");
                services.stop_all().await;
            } else {
                // The agent is a control plane: its services run on under
                // their shims, and the next agent adopts them.
                tracing::info!(
                    running = services.running().len(),
                    "the agent stops; its services go on running under their shims"
                );
            }
            return Ok(Exit::Stopped);
        };
        // A signal taken just before the block above reaches its stream
        // through the runtime's driver: give it a moment to be counted.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut fds = FdsToPass::default();
        let previous_exe: std::os::fd::OwnedFd = crate::handover::open_own_exe()
            .context("cannot open /proc/self/exe")?
            .into();
        let description = Handover {
            protocol: crate::handover::PROTOCOL,
            args: agent_args,
            previous_exe_fd: fds.pass(previous_exe.as_fd())?,
            installed_exe_fd: fds.pass(installed_exe.as_fd())?,
            grpc_fds: grpc_fds
                .iter()
                .map(|fd| fds.pass(fd.as_fd()))
                .collect::<std::io::Result<_>>()?,
            health_fd: health_fd
                .as_ref()
                .map(|fd| fds.pass(fd.as_fd()))
                .transpose()?,
            services: services.handover(&mut fds)?,
            upgrade: accepted.record,
            pending_stop: false,
        };
        Ok(Exit::Upgrade(Box::new(UpgradeExec {
            target: accepted.target,
            previous_exe,
            description,
            fds,
            guards: accepted.guards,
            stop_request,
        })))
    }
}

/// The gRPC server, running until `stop`.
type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// The gRPC server, not yet serving: its listeners, HTTP/2 settings and
/// routes.
struct GrpcServer {
    listeners: Vec<TcpListener>,
    server: tonic::transport::Server,
    routes: tonic::service::Routes,
}

impl GrpcServer {
    /// Serves on every listener until `stop`: each listener's accept loop
    /// (in `background`, ended when `accepting` says stop) runs the
    /// handshakes through `port` and feeds the connections that finished
    /// one to the server through a channel. Bound listeners are logged
    /// here, as tests and operators look for "serving gRPC".
    fn serve<H: Handshake>(
        self,
        port: Arc<GrpcPort<H>>,
        accepting: &tokio::sync::watch::Receiver<bool>,
        background: &mut JoinSet<()>,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Serving> {
        let (established, incoming) = tokio::sync::mpsc::channel(64);
        for listener in self.listeners {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "serving gRPC");
            let mut accepting = accepting.clone();
            let stop_accepting = async move {
                let _ = accepting.wait_for(|stop| *stop).await;
            };
            background.spawn(
                port.clone()
                    .accept(listener, established.clone(), stop_accepting),
            );
        }
        let incoming = ReceiverStream::new(incoming).map(Ok::<_, Infallible>);
        let service =
            CountCalls::<_, <H::Stream as Connected>::ConnectInfo>::new(self.routes.prepare());
        Ok(Box::pin(
            self.server
                .serve_with_incoming_shutdown(service, incoming, stop),
        ))
    }
}

/// The HTTP/2 settings of the gRPC server.
fn grpc_server(limits: &ConnectionLimits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(UPLOAD_WINDOW_BYTES))
        .initial_connection_window_size(Some(UPLOAD_WINDOW_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        // A peer that vanished (host gone, cable pulled) never closes its
        // end, and a watch stream would hold its connection for ever: a
        // quiet connection is pinged, and closed when no answer comes.
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
}

/// Every service of the API, health and reflection.
fn grpc_routes(
    api: AgentApi,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    max_message: usize,
) -> anyhow::Result<tonic::service::Routes> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(tonic::service::Routes::new(health_service)
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
        .add_service(pb::lease_service_server::LeaseServiceServer::new(api)))
}

/// SIGHUP's handler: [`SelfUpgrade::reload_config`], logged and audited.
async fn reload_config_on_signal(selfupgrade: &SelfUpgrade, audit: &AuditLog) {
    tracing::info!("SIGHUP: re-executing in place to read the config again");
    let result = selfupgrade.reload_config().await;
    if let Err(err) = &result {
        tracing::error!(error = %err, "the config was not reloaded; the agent runs on with the config it has");
        let _ = reload_server::notify::status(&format!("config not reloaded: {err}"));
    }
    let version = result
        .as_ref()
        .map(|r| r.new_version.clone())
        .unwrap_or_default();
    // As the API audits a refused call: the code's name, then the message.
    let result = match result {
        Ok(_) => "ok".to_string(),
        Err(err) => crate::api::audit_refusal(err),
    };
    audit.record(AuditEntry {
        identity: "SIGHUP",
        call: "ReloadConfig",
        service: AGENT_SERVICE,
        version: &version,
        sha256: &selfupgrade.image().executable_sha256,
        result,
        detail: "",
    });
}
