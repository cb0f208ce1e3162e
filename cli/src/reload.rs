//! `activate`, `rollback`, `status`: one service on one agent.
//!
//! Activate and rollback watch the agent's event stream while the call runs,
//! so the person sees each step (verifying, preflight, spawning, ready,
//! draining) as it happens, and the exit code says whether the new version
//! serves.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use reload_artifact::version::parse_version;
use reload_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::client::{connect, describe_status};

/// The stored artifact of `service` at `version`, if the agent holds it.
async fn find_artifact(
    host: &str,
    channel: Channel,
    service: &str,
    version: &str,
) -> anyhow::Result<Option<String>> {
    let mut artifacts = pb::artifact_service_client::ArtifactServiceClient::new(channel);
    let list = artifacts
        .list_artifacts(pb::ListArtifactsRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| describe_status(host, "list artifacts", &s))?
        .into_inner();
    Ok(list
        .artifacts
        .into_iter()
        .filter_map(|a| a.manifest)
        .find(|m| m.version == version)
        .map(|m| m.sha256))
}

/// Subscribes to the agent's events for `service` and prints them on stderr
/// until the returned task is aborted. Returns once the subscription is in
/// place, so no event of a call made afterwards is missed.
async fn print_events(channel: Channel, service: String) -> tokio::task::JoinHandle<()> {
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let subscription = control
        .watch_events(pb::WatchEventsRequest { service })
        .await;
    tokio::spawn(async move {
        let Ok(response) = subscription else {
            return;
        };
        let mut events = response.into_inner();
        while let Some(Ok(event)) = events.next().await {
            let kind = pb::EventKind::try_from(event.kind).unwrap_or_default();
            let kind = kind
                .as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_lowercase();
            eprintln!("  {kind:<10} {}", event.message);
        }
    })
}

fn report(host: &str, service: &str, result: &pb::ReloadResult) -> anyhow::Result<()> {
    let outcome = pb::ReloadOutcome::try_from(result.outcome).unwrap_or_default();
    if outcome == pb::ReloadOutcome::Succeeded {
        println!(
            "{host}: {service} {} -> {} (pid {} -> {})",
            if result.from_version.is_empty() {
                "(none)"
            } else {
                &result.from_version
            },
            result.to_version,
            result.old_pid,
            result.new_pid
        );
        Ok(())
    } else {
        bail!(
            "{host}: {service} stayed on {} ({}): {}",
            if result.from_version.is_empty() {
                "(none)"
            } else {
                &result.from_version
            },
            outcome
                .as_str_name()
                .trim_start_matches("RELOAD_OUTCOME_")
                .to_lowercase(),
            result.reason
        )
    }
}

pub async fn activate(
    host: &str,
    service: &str,
    version: &str,
    artifact: Option<&Path>,
) -> anyhow::Result<()> {
    let version = parse_version(version).map_err(|e| anyhow!(e))?.to_string();
    let channel = connect(host).await?;
    let sha256 = match find_artifact(host, channel.clone(), service, &version).await? {
        Some(sha256) => sha256,
        None => {
            let file = artifact.ok_or_else(|| {
                anyhow!("agent {host} holds no {service} {version}; pass --artifact FILE (signed with reloadctl sign) to upload it")
            })?;
            eprintln!("uploading {} to {host}", file.display());
            crate::upload(host, None, file).await?;
            find_artifact(host, channel.clone(), service, &version)
                .await?
                .ok_or_else(|| {
                    anyhow!(
                        "{} is not signed as {service} {version}; check `reloadctl verify` on it",
                        file.display()
                    )
                })?
        }
    };
    eprintln!("activating {service} {version} on {host}");
    let watcher = print_events(channel.clone(), service.to_string()).await;
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let response = control
        .activate(pb::ActivateRequest {
            service: service.to_string(),
            sha256,
            ..Default::default()
        })
        .await;
    // Let the last events of the call reach the screen.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    watcher.abort();
    let response = response
        .map_err(|s| describe_status(host, "activate", &s))?
        .into_inner();
    report(
        host,
        service,
        &response.result.context("the agent sent no result")?,
    )
}

pub async fn rollback(host: &str, service: &str) -> anyhow::Result<()> {
    let channel = connect(host).await?;
    let watcher = print_events(channel.clone(), service.to_string()).await;
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let response = control
        .rollback(pb::RollbackRequest {
            service: service.to_string(),
            ..Default::default()
        })
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    watcher.abort();
    let response = response
        .map_err(|s| describe_status(host, "roll back", &s))?
        .into_inner();
    report(
        host,
        service,
        &response.result.context("the agent sent no result")?,
    )
}

fn short(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

pub async fn status(host: &str, service: &str, output: &str) -> anyhow::Result<()> {
    let channel = connect(host).await?;
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let services = control
        .get_status(pb::GetStatusRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| describe_status(host, "report status", &s))?
        .into_inner()
        .services;
    let mut out = std::io::stdout().lock();
    for s in &services {
        let state = short(
            pb::ServiceState::try_from(s.state)
                .unwrap_or_default()
                .as_str_name(),
            "SERVICE_STATE_",
        );
        let health = short(
            pb::HealthState::try_from(s.health)
                .unwrap_or_default()
                .as_str_name(),
            "HEALTH_STATE_",
        );
        let last = s.last_reload.as_ref().map(|r| {
            let outcome = short(
                pb::ReloadOutcome::try_from(r.outcome)
                    .unwrap_or_default()
                    .as_str_name(),
                "RELOAD_OUTCOME_",
            );
            (outcome, r.reason.clone(), r.to_version.clone())
        });
        if output == "json" {
            let line = serde_json::json!({
                "service": s.name, "state": state, "health": health,
                "consecutive_healthy": s.consecutive_healthy,
                "version": s.current_version, "sha256": s.current_sha256,
                "previous_version": s.previous_version, "pid": s.pid, "restarts": s.restarts,
                "last_reload": last.as_ref().map(|(outcome, reason, to)| serde_json::json!({"outcome": outcome, "reason": reason, "to_version": to})),
            });
            writeln!(out, "{line}")?;
        }
    }
    if output == "json" {
        return Ok(());
    }
    writeln!(
        out,
        "{:<16} {:<10} {:<10} {:<12} {:>8} {:<12} {:>8}  LAST RELOAD",
        "SERVICE", "STATE", "HEALTH", "VERSION", "PID", "PREVIOUS", "RESTARTS"
    )?;
    for s in &services {
        let state = short(
            pb::ServiceState::try_from(s.state)
                .unwrap_or_default()
                .as_str_name(),
            "SERVICE_STATE_",
        );
        let health = short(
            pb::HealthState::try_from(s.health)
                .unwrap_or_default()
                .as_str_name(),
            "HEALTH_STATE_",
        );
        let last = s
            .last_reload
            .as_ref()
            .map(|r| {
                let outcome = short(
                    pb::ReloadOutcome::try_from(r.outcome)
                        .unwrap_or_default()
                        .as_str_name(),
                    "RELOAD_OUTCOME_",
                );
                if r.reason.is_empty() {
                    format!("{outcome} -> {}", r.to_version)
                } else {
                    format!("{outcome} -> {}: {}", r.to_version, r.reason)
                }
            })
            .unwrap_or_else(|| "-".into());
        let dash = |v: &str| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.to_string()
            }
        };
        writeln!(
            out,
            "{:<16} {:<10} {:<10} {:<12} {:>8} {:<12} {:>8}  {}",
            s.name,
            state,
            health,
            dash(&s.current_version),
            s.pid,
            dash(&s.previous_version),
            s.restarts,
            last
        )?;
    }
    Ok(())
}
