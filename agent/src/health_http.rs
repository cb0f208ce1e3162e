//! The agent's plain HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (JSON: every service's
//! version, pid, state, health and consecutive healthy checks) and
//! `/healthz/<service>` (200 only when that service is healthy, 503
//! otherwise, 404 for an unknown name), for load balancers and monitoring.
//! With [tls] configured it speaks HTTPS and requires a client certificate
//! from the agent's CA, like the gRPC API.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use reload_proto::v1 as pb;
use tokio::net::TcpListener;

use crate::lease::Leases;
use crate::metrics::Metrics;
use crate::services::Services;

/// What the endpoint reads.
#[derive(Clone)]
pub struct HealthSources {
    pub services: Arc<Services>,
    pub leases: Arc<Leases>,
    pub metrics: Arc<Metrics>,
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

/// Mutual TLS for the health endpoint, with the agent's [tls] files: any
/// client certificate from the CA may read health (load balancers get one
/// from the same CA; rights are not checked for this read-only endpoint).
pub fn tls_acceptor(tls: &crate::config::TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&tls.cert)
        .collect::<Result<Vec<_>, _>>()
        .context("[tls] cert is not PEM certificates")?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key).context("[tls] key is not a PEM private key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.ca) {
        roots.add(ca.context("[tls] ca is not PEM certificates")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("[tls] ca cannot verify client certificates")?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("[tls] cert and key do not match")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

pub async fn serve(
    listener: TcpListener,
    sources: HealthSources,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (sources, tls) = (sources.clone(), tls.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = route(&sources, request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "health endpoint: TLS handshake refused")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "health endpoint: TLS handshake timed out")
                        }
                    }
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        });
    }
}
