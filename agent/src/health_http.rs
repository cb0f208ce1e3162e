//! The agent's plain HTTP endpoint: `/healthz` (JSON: every service's
//! version, pid, state, health and consecutive healthy checks) and
//! `/healthz/<service>` (200 only when that service is healthy, 503
//! otherwise, 404 for an unknown name), for load balancers and the CLI's
//! health gate.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use reload_proto::v1 as pb;
use tokio::net::TcpListener;

use crate::supervisor::Supervisor;

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

fn route(supervisor: &Supervisor, path: &str) -> Response<Full<Bytes>> {
    if path == "/healthz" {
        let services: Vec<_> = supervisor
            .services()
            .map(|s| status_json(&s.status()))
            .collect();
        return respond(StatusCode::OK, serde_json::json!({ "services": services }));
    }
    if let Some(name) = path.strip_prefix("/healthz/") {
        return match supervisor.service(name) {
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
                serde_json::json!({ "error": err.message() }),
            ),
        };
    }
    respond(
        StatusCode::NOT_FOUND,
        serde_json::json!({ "error": "try /healthz or /healthz/<service>" }),
    )
}

pub async fn serve(listener: TcpListener, supervisor: Arc<Supervisor>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = route(&supervisor, request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
