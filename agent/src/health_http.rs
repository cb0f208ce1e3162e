//! The agent's plain HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (JSON: every service's
//! version, pid, state, health and consecutive healthy checks) and
//! `/healthz/<service>` (200 only when that service is healthy, 503
//! otherwise, 404 for an unknown name), for load balancers and monitoring.
//! With [tls] configured it speaks HTTPS and requires a client certificate
//! from the agent's CA with the read right, like the gRPC API; only the
//! services an operator lists in `[agent] anonymous_health` answer
//! `/healthz/<service>` to a client without one (a load balancer's check),
//! and to those with the verdict alone: no version, hash or pid, which
//! would tell a stranger what to attack. Its connections are held to the
//! same caps and handshake timeout as the gRPC port's (see
//! [`crate::connections`]), each port with a budget of its own, and closed
//! after 10 s without a request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use reload_proto::v1 as pb;
use tokio::net::{TcpListener, TcpStream};

use crate::connections::{Admission, CloseReason, ConnectionBudget};

use crate::lease::Leases;
use crate::metrics::Metrics;
use crate::services::Services;

/// What the endpoint reads.
#[derive(Clone)]
pub struct HealthSources {
    pub services: Arc<Services>,
    pub leases: Arc<Leases>,
    pub metrics: Arc<Metrics>,
    /// Who may read, with TLS: a certificate from the CA is not enough.
    pub rights: crate::config::RightsSection,
    /// `[agent] anonymous_health`: the services whose `/healthz/<service>`
    /// a client without a certificate may read.
    pub anonymous_health: Arc<Vec<String>>,
}

fn status_json(status: &pb::ServiceStatus) -> serde_json::Value {
    let state = pb::ServiceState::try_from(status.state).unwrap_or_default();
    let health = pb::HealthState::try_from(status.health).unwrap_or_default();
    serde_json::json!({
        "service": status.name,
        "version": status.current_version,
        "sha256": status.current_sha256,
        "pid": status.pid,
        "state": state.as_str_name().trim_start_matches("SERVICE_STATE_").to_lowercase(),
        "health": health.as_str_name().trim_start_matches("HEALTH_STATE_").to_lowercase(),
        "healthy": health == pb::HealthState::Healthy,
        "consecutive_healthy": status.consecutive_healthy,
        "restarts": status.restarts,
    })
}

fn respond(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts")
}

/// What a client without a certificate gets: the verdict on a service
/// listed in `[agent] anonymous_health`, 403 for anything else.
fn route_anonymous(sources: &HealthSources, path: &str) -> Response<Full<Bytes>> {
    let listed = path
        .strip_prefix("/healthz/")
        .filter(|name| sources.anonymous_health.iter().any(|listed| listed == name));
    let Some(name) = listed else {
        return respond(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": format!(
                "{path} needs a client certificate from the agent's CA with the read right; without one, only /healthz/<service> of the services in [agent] anonymous_health ({}) may be read",
                if sources.anonymous_health.is_empty() { "none".to_string() } else { sources.anonymous_health.join(", ") }
            ) }),
        );
    };
    match sources.services.service(name) {
        Ok(service) => {
            let healthy = service.status().health == pb::HealthState::Healthy as i32;
            let code = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(
                code,
                serde_json::json!({ "service": name, "healthy": healthy }),
            )
        }
        Err(err) => respond(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": err.to_string() }),
        ),
    }
}

fn route(sources: &HealthSources, path: &str) -> Response<Full<Bytes>> {
    let services = &sources.services;
    if path == "/metrics" {
        let statuses: Vec<_> = services.services().map(|s| s.status()).collect();
        let text = sources
            .metrics
            .render(&statuses, sources.leases.get().lease.as_ref());
        return Response::builder()
            .status(StatusCode::OK)
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(text)))
            .expect("static response parts");
    }
    if path == "/healthz" {
        let services: Vec<_> = services
            .services()
            .map(|s| status_json(&s.status()))
            .collect();
        return respond(StatusCode::OK, serde_json::json!({ "services": services }));
    }
    if let Some(name) = path.strip_prefix("/healthz/") {
        return match services.service(name) {
            Ok(service) => {
                let status = service.status();
                let healthy = status.health == pb::HealthState::Healthy as i32;
                let code = if healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                respond(code, status_json(&status))
            }
            Err(err) => respond(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": err.to_string() }),
            ),
        };
    }
    respond(
        StatusCode::NOT_FOUND,
        serde_json::json!({ "error": "try /healthz or /healthz/<service>" }),
    )
}

/// What one client of the endpoint may read.
enum Reader {
    /// Everything: plaintext on loopback, or a certificate with the read
    /// right.
    Allowed,
    /// No certificate: see [`route_anonymous`].
    Anonymous,
    /// A certificate without the read right: 403 with this reason.
    Refused(String),
}

/// How long a health connection may wait between requests, the first
/// included, before the agent closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the endpoint on `listener` (with mutual TLS when `tls` is given:
/// any client certificate from the CA may read health; load balancers get
/// one from the same CA). Each connection takes a slot in `budget` first,
/// and must finish its TLS handshake within `handshake_timeout`.
pub async fn serve(
    listener: TcpListener,
    sources: HealthSources,
    tls: Option<tokio_rustls::TlsAcceptor>,
    budget: Arc<ConnectionBudget>,
    handshake_timeout: Duration,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Over a cap: the stream is dropped here, closed at once.
        let Some(admission) = budget.admit(peer) else {
            continue;
        };
        let (sources, tls) = (sources.clone(), tls.clone());
        tokio::spawn(serve_connection(
            stream,
            peer,
            admission,
            sources,
            tls,
            handshake_timeout,
        ));
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    mut admission: Admission,
    sources: HealthSources,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
) {
    // What this client may read, decided once its certificate is known.
    let service = |sources: HealthSources, reader: Reader| {
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let response = match &reader {
                Reader::Refused(why) => {
                    respond(StatusCode::FORBIDDEN, serde_json::json!({ "error": why }))
                }
                Reader::Anonymous => route_anonymous(&sources, request.uri().path()),
                Reader::Allowed => route(&sources, request.uri().path()),
            };
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT);
    let served = match tls {
        Some(acceptor) => {
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)) => accepted,
                () = admission.evicted() => {
                    tracing::debug!(%peer, "health endpoint: TLS handshake cut short, the port is full");
                    admission.closing(CloseReason::Evicted);
                    return;
                }
            };
            match accepted {
                Ok(Ok(stream)) => {
                    admission.established();
                    let names = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .map(|leaf| crate::api::certificate_names(leaf.as_ref()));
                    // No certificate at all: the acceptor only lets that
                    // through with `[agent] anonymous_health` set.
                    let reader = match names {
                        None => Reader::Anonymous,
                        Some(names) if sources.rights.may_read(&names) => Reader::Allowed,
                        Some(names) => Reader::Refused(format!(
                            "the certificate names {names:?} lack the read right needed for the health endpoint and /metrics; the agent config's [rights] read or deploy grants it"
                        )),
                    };
                    http.serve_connection(TokioIo::new(stream), service(sources, reader))
                        .await
                }
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "health endpoint: TLS handshake refused");
                    admission.closing(CloseReason::HandshakeFailed);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "health endpoint: TLS handshake timed out");
                    admission.closing(CloseReason::HandshakeTimeout);
                    return;
                }
            }
        }
        None => {
            // Plaintext is loopback-only by config (as for gRPC).
            admission.established();
            http.serve_connection(TokioIo::new(stream), service(sources, Reader::Allowed))
                .await
        }
    };
    if served.is_err_and(|err| err.is_timeout()) {
        admission.closing(CloseReason::Idle);
    }
}
