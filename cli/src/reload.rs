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

use crate::args::HostsArgs;
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
    allow_downgrade: bool,
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
            allow_downgrade,
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
    eprintln!("rolling back {service} on {host} to its previous version (allow_downgrade: it is a version this agent ran before)");
    let response = control
        .rollback(pb::RollbackRequest {
            service: service.to_string(),
            allow_downgrade: true,
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

/// The hosts a command acts on: `--host`, or the hosts file narrowed by
/// `--limit`. Mistakes in either are usage errors (exit code 2).
fn hosts_of(args: HostsArgs) -> anyhow::Result<Vec<String>> {
    let usage = |e: anyhow::Error| anyhow::Error::new(crate::rollout::UsageError(e));
    match (args.host, args.hosts_file) {
        (Some(host), None) => Ok(vec![host]),
        (None, Some(file)) => {
            let hosts = crate::rollout::hosts::read_hosts(&file).map_err(usage)?;
            match args.limit {
                Some(limit) => {
                    crate::rollout::hosts::limit(hosts, &limit, &file.display().to_string())
                        .map_err(usage)
                }
                None => Ok(hosts),
            }
        }
        (Some(_), Some(_)) => bail!("give either --host or a hosts file, not both"),
        (None, None) => bail!("give --host HOST or a hosts file"),
    }
}

/// Rolls back one host, or every host of a file in parallel.
pub async fn rollback_fleet(hosts: HostsArgs, service: &str) -> anyhow::Result<()> {
    let hosts = hosts_of(hosts)?;
    if hosts.len() == 1 {
        return rollback(&hosts[0], service).await;
    }
    let service = service.to_string();
    on_each_host(hosts, "rolled back", move |host| {
        let service = service.clone();
        async move {
            let channel = connect(&host).await?;
            let mut control = pb::service_control_client::ServiceControlClient::new(channel);
            let response = control
                .rollback(pb::RollbackRequest {
                    service: service.clone(),
                    allow_downgrade: true,
                    ..Default::default()
                })
                .await
                .map_err(|s| describe_status(&host, "roll back", &s))?
                .into_inner();
            report(
                &host,
                &service,
                &response.result.context("the agent sent no result")?,
            )
        }
    })
    .await
}

/// `reloadctl stop`: stops a service on one host or every host of a file
/// (in parallel). It stays stopped, across agent restarts too, until the
/// next activation; its listening sockets stay open.
pub async fn stop_fleet(hosts: HostsArgs, service: &str) -> anyhow::Result<()> {
    let hosts = hosts_of(hosts)?;
    let service = service.to_string();
    on_each_host(hosts, "stopped", move |host| {
        let service = service.clone();
        async move {
            let channel = connect(&host).await?;
            let mut control = pb::service_control_client::ServiceControlClient::new(channel);
            let response = control
                .stop_service(pb::StopServiceRequest {
                    service: service.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| describe_status(&host, "stop", &s))?
                .into_inner();
            match response.stopped_pid {
                0 => println!("{host}: {service} was not running; it stays stopped until the next activation"),
                pid => println!(
                    "{host}: {service} stopped (pid {pid} {}); it stays stopped until the next activation (reloadctl activate or rollback)",
                    response.outcome
                ),
            }
            Ok(())
        }
    })
    .await
}

/// Runs `action` for every host at once; each failure is printed with its
/// host, and any fails the whole ("N host(s) were not {done}").
async fn on_each_host<F, Fut>(hosts: Vec<String>, done: &str, action: F) -> anyhow::Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for host in hosts {
        let work = action(host.clone());
        tasks.spawn(async move { (host, work.await) });
    }
    let mut failed = 0;
    while let Some(finished) = tasks.join_next().await {
        let (host, result) = finished?;
        if let Err(err) = result {
            failed += 1;
            eprintln!("{host}: {err:#}");
        }
    }
    if failed > 0 {
        bail!("{failed} host(s) were not {done}");
    }
    Ok(())
}

/// Status of one host or a fleet; unreachable hosts are shown, not fatal.
/// Connects to every host at once and asks each `ask`; the answers in host
/// order (an unreachable host is an error in its place, not for all).
async fn ask_each_host<T, F, Fut>(
    hosts: &[String],
    ask: F,
) -> anyhow::Result<Vec<anyhow::Result<T>>>
where
    T: Send + 'static,
    F: Fn(String, Channel) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for (i, host) in hosts.iter().enumerate() {
        let (host, ask) = (host.clone(), ask.clone());
        tasks.spawn(async move {
            let result = match connect(&host).await {
                Ok(channel) => ask(host, channel).await,
                Err(err) => Err(err),
            };
            (i, result)
        });
    }
    let mut rows: Vec<Option<anyhow::Result<T>>> = (0..hosts.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, result) = done?;
        rows[i] = Some(result);
    }
    Ok(rows
        .into_iter()
        .map(|row| row.expect("every host answered or failed"))
        .collect())
}

/// A status row for a host that did not answer.
fn print_unreachable(
    out: &mut impl Write,
    host: &str,
    err: &anyhow::Error,
    output: &str,
) -> std::io::Result<()> {
    if output == "json" {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "host": host, "error": format!("{err:#}") })
        )
    } else {
        writeln!(out, "{host:<22} unreachable: {err:#}")
    }
}

/// `status --agents`: one line per agent.
pub async fn status_agents(hosts: HostsArgs, output: &str) -> anyhow::Result<()> {
    let hosts = hosts_of(hosts)?;
    let rows = ask_each_host(&hosts, |host, channel| async move {
        let mut agent = pb::agent_service_client::AgentServiceClient::new(channel);
        Ok(agent
            .get_agent_info(pb::GetAgentInfoRequest {})
            .await
            .map_err(|s| describe_status(&host, "report its version", &s))?
            .into_inner())
    })
    .await?;
    let mut out = std::io::stdout().lock();
    if output != "json" {
        writeln!(
            out,
            "{:<22} {:>8} {:<20} {:<14} {:<20}  LAST UPGRADE",
            "HOST", "PID", "RUNS", "EXECUTABLE", "SINCE"
        )?;
    }
    let mut unreachable = 0;
    for (host, row) in hosts.iter().zip(rows) {
        let info = match row {
            Ok(info) => info,
            Err(err) => {
                unreachable += 1;
                print_unreachable(&mut out, host, &err, output)?;
                continue;
            }
        };
        // What it runs: a signed agent release, or the installed build.
        let runs = if info.artifact_version.is_empty() {
            format!("{} (installed)", info.agent_version)
        } else {
            info.artifact_version.clone()
        };
        let since = crate::format_timestamp(info.started.as_ref());
        let last = info.last_upgrade.as_ref().map(|u| {
            let outcome = short(
                pb::AgentUpgradeOutcome::try_from(u.outcome)
                    .unwrap_or_default()
                    .as_str_name(),
                "AGENT_UPGRADE_OUTCOME_",
            );
            (
                outcome,
                u.from_version.clone(),
                u.to_version.clone(),
                u.reason.clone(),
            )
        });
        if output == "json" {
            let line = serde_json::json!({
                "host": host, "pid": info.pid, "runs": runs,
                "agent_version": info.agent_version, "artifact_version": info.artifact_version,
                "executable_sha256": info.executable_sha256, "since": since,
                "last_upgrade": last.as_ref().map(|(outcome, from, to, reason)| serde_json::json!({
                    "outcome": outcome, "from_version": from, "to_version": to, "reason": reason,
                })),
            });
            writeln!(out, "{line}")?;
            continue;
        }
        let last = last
            .map(|(outcome, from, to, reason)| {
                if reason.is_empty() {
                    format!("{outcome} {from} -> {to}")
                } else {
                    format!("{outcome} {from} -> {to}: {reason}")
                }
            })
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{host:<22} {:>8} {runs:<20} {:<14} {since:<20}  {last}",
            info.pid,
            info.executable_sha256
                .get(..12)
                .unwrap_or(&info.executable_sha256),
        )?;
    }
    if unreachable == hosts.len() {
        bail!("no host answered");
    }
    Ok(())
}

pub async fn status_fleet(hosts: HostsArgs, service: &str, output: &str) -> anyhow::Result<()> {
    let hosts = hosts_of(hosts)?;
    let service = service.to_string();
    let rows = ask_each_host(&hosts, move |host, channel| {
        let service = service.clone();
        async move {
            let mut control = pb::service_control_client::ServiceControlClient::new(channel);
            Ok(control
                .get_status(pb::GetStatusRequest { service })
                .await
                .map_err(|s| describe_status(&host, "report status", &s))?
                .into_inner()
                .services)
        }
    })
    .await?;
    let mut out = std::io::stdout().lock();
    if output != "json" {
        writeln!(
            out,
            "{:<22} {:<14} {:<10} {:<10} {:<12} {:>8} {:<12} {:>8} {:<20}  LAST RELOAD",
            "HOST", "SERVICE", "STATE", "HEALTH", "VERSION", "PID", "PREVIOUS", "RESTARTS", "SINCE"
        )?;
    }
    let mut unreachable = 0;
    for (host, row) in hosts.iter().zip(rows) {
        let services = match row {
            Ok(services) => services,
            Err(err) => {
                unreachable += 1;
                print_unreachable(&mut out, host, &err, output)?;
                continue;
            }
        };
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
            let since = crate::format_timestamp(s.state_since.as_ref());
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
                    "host": host, "service": s.name, "state": state, "health": health,
                    "consecutive_healthy": s.consecutive_healthy,
                    "version": s.current_version, "sha256": s.current_sha256,
                    "previous_version": s.previous_version, "pid": s.pid, "restarts": s.restarts,
                    "since": since,
                    "last_reload": last.as_ref().map(|(outcome, reason, to)| serde_json::json!({"outcome": outcome, "reason": reason, "to_version": to})),
                });
                writeln!(out, "{line}")?;
                continue;
            }
            let last = last
                .map(|(outcome, reason, to)| {
                    if reason.is_empty() {
                        format!("{outcome} -> {to}")
                    } else {
                        format!("{outcome} -> {to}: {reason}")
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
                "{host:<22} {:<14} {state:<10} {health:<10} {:<12} {:>8} {:<12} {:>8} {since:<20}  {last}",
                s.name,
                dash(&s.current_version),
                s.pid,
                dash(&s.previous_version),
                s.restarts
            )?;
        }
    }
    if unreachable == hosts.len() {
        bail!("no host answered");
    }
    Ok(())
}

/// `reloadctl logs`: a service's recent output as the agent kept it, then
/// (with `follow`) new lines until the stream or the process ends.
pub async fn logs(
    host: &str,
    service: &str,
    lines: u32,
    follow: bool,
    output: &str,
) -> anyhow::Result<()> {
    let channel = connect(host).await?;
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let mut stream = control
        .read_logs(pb::ReadLogsRequest {
            service: service.to_string(),
            lines,
            follow,
        })
        .await
        .map_err(|s| describe_status(host, "show its output", &s))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    loop {
        let line = match stream.message().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(status) => return Err(describe_status(host, "go on showing its output", &status)),
        };
        let time = crate::format_timestamp(line.time.as_ref());
        if output == "json" {
            let json = serde_json::json!({
                "time": time, "service": service, "version": line.version, "pid": line.pid,
                "stream": line.stream, "line": line.line,
            });
            writeln!(out, "{json}")?;
        } else {
            writeln!(
                out,
                "{time} {} pid {} {}: {}",
                line.version, line.pid, line.stream, line.line
            )?;
        }
        // Followed lines are seen as they come, not when a buffer fills.
        out.flush()?;
    }
    if follow {
        eprintln!("the agent at {host} ended the stream (it restarted or upgraded itself); run again to go on");
    }
    Ok(())
}
