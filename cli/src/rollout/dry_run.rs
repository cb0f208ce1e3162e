//! `reloadctl push --dry-run`: the plan, and what each host says about it.
//!
//! A plan alone is no check: a host that is down, a name mistyped in the
//! hosts file, a lease held by someone else or a version below a host's
//! downgrade floor all looked like a clean plan. So the dry run asks every
//! host, at once and with the read right only (GetStatus or GetAgentInfo,
//! StatArtifact, GetLease; nothing is taken or changed): is it reachable,
//! what it runs now, whether it holds the release already, who holds its
//! lease, and whether the agent would refuse the version as a downgrade.
//! It exits 1 when the real push would stop at some host before any change
//! (see [`HostCheck::problems`]), 0 when it could start. The deploy right
//! itself cannot be checked without using it.

use std::time::Duration;

use reload_artifact::version::parse_version;
use reload_proto::v1 as pb;
use serde::Serialize;
use tonic::Code;

use super::plan::RolloutPlan;

/// Each call of the dry run waits at most this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What one host said.
#[derive(Debug, Default, Serialize)]
pub struct HostCheck {
    pub host: String,
    pub reachable: bool,
    /// The version it runs now ("" if none).
    pub current_version: String,
    /// It holds the release already (the push uploads nothing there).
    pub staged: bool,
    /// It runs the release already (the push skips it).
    pub already_on_version: bool,
    /// Who holds its rollout lease now, if anyone.
    pub lease_holder: Option<String>,
    /// The highest version it ever activated ("" if none).
    pub downgrade_floor: String,
    /// The version is below the floor and the agent would refuse it.
    pub downgrade_refused: bool,
    /// Why the real push would stop at this host before changing anything
    /// (or, for a refused downgrade, at its activation); empty if none.
    pub problems: Vec<String>,
}

/// Asks every host (in parallel) and returns their answers in plan order.
pub async fn check_hosts(plan: &RolloutPlan, force_takeover: bool) -> Vec<HostCheck> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, host) in plan.hosts.iter().enumerate() {
        let (host, target) = (host.clone(), Target::of(plan));
        tasks.spawn(async move { (i, check_host(host, target, force_takeover).await) });
    }
    let mut checks: Vec<Option<HostCheck>> = (0..plan.hosts.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, check) = done.expect("a host check does not panic");
        checks[i] = Some(check);
    }
    checks
        .into_iter()
        .map(|c| c.expect("every host checked"))
        .collect()
}

#[derive(Clone)]
struct Target {
    service: String,
    version: String,
    sha256: String,
    allow_downgrade: bool,
    agent: bool,
}

impl Target {
    fn of(plan: &RolloutPlan) -> Target {
        Target {
            service: plan.service.clone(),
            version: plan.version.clone(),
            sha256: plan.sha256.clone(),
            allow_downgrade: plan.allow_downgrade,
            agent: plan.service == super::project::AGENT_SERVICE,
        }
    }
}

/// A call bounded by [`CALL_TIMEOUT`], its failure in words.
async fn ask<T>(
    host: &str,
    doing: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, (Option<Code>, String)> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err((
            (!crate::client::is_transport_failure(&status)).then_some(status.code()),
            format!("{:#}", crate::client::describe_status(host, doing, &status)),
        )),
        Err(_) => Err((
            None,
            format!("no answer from {host} within {}s", CALL_TIMEOUT.as_secs()),
        )),
    }
}

async fn check_host(host: String, target: Target, force_takeover: bool) -> HostCheck {
    let mut check = HostCheck {
        host: host.clone(),
        ..Default::default()
    };
    let channel = match tokio::time::timeout(CALL_TIMEOUT, crate::client::connect(&host)).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(err)) => {
            check.problems.push(format!("unreachable: {err:#}"));
            return check;
        }
        Err(_) => {
            check.problems.push(format!(
                "unreachable: no connection within {}s",
                CALL_TIMEOUT.as_secs()
            ));
            return check;
        }
    };
    // What it runs, and its floor.
    let (current_sha, floor) = if target.agent {
        let mut agent = pb::agent_service_client::AgentServiceClient::new(channel.clone());
        match ask(
            &host,
            "report its version",
            agent.get_agent_info(pb::GetAgentInfoRequest {}),
        )
        .await
        {
            Ok(info) => {
                check.current_version = if info.artifact_version.is_empty() {
                    info.agent_version.clone()
                } else {
                    info.artifact_version.clone()
                };
                // The agent's own floor is not reported; its UpgradeAgent
                // checks it.
                (info.executable_sha256, String::new())
            }
            Err((code, message)) => return unanswered(check, code, message),
        }
    } else {
        let mut control = pb::service_control_client::ServiceControlClient::new(channel.clone());
        let request = pb::GetStatusRequest {
            service: target.service.clone(),
        };
        match ask(&host, "report status", control.get_status(request)).await {
            Ok(status) => match status.services.into_iter().next() {
                Some(s) => {
                    check.current_version = s.current_version;
                    (s.current_sha256, s.downgrade_floor)
                }
                None => (String::new(), String::new()),
            },
            Err((Some(Code::NotFound), _)) => {
                check.reachable = true;
                check.problems.push(format!(
                    "the agent has no service {:?}: add a [[service]] of that name to its config",
                    target.service
                ));
                return check;
            }
            Err((code, message)) => return unanswered(check, code, message),
        }
    };
    check.reachable = true;
    check.already_on_version = current_sha == target.sha256;
    check.downgrade_floor = floor;

    let mut artifacts = pb::artifact_service_client::ArtifactServiceClient::new(channel.clone());
    let stat = pb::StatArtifactRequest {
        sha256: target.sha256.clone(),
        service: target.service.clone(),
    };
    match ask(&host, "look up the release", artifacts.stat_artifact(stat)).await {
        Ok(stat) => check.staged = stat.present || check.already_on_version,
        Err((_, message)) => check.problems.push(message),
    }

    let mut leases = pb::lease_service_client::LeaseServiceClient::new(channel);
    match ask(
        &host,
        "report its lease",
        leases.get_lease(pb::GetLeaseRequest {}),
    )
    .await
    {
        Ok(lease) => {
            check.lease_holder = lease.lease.map(|l| l.holder);
            if let (Some(holder), false) = (&check.lease_holder, force_takeover) {
                check.problems.push(format!(
                    "its lease is held by {holder:?}: the push would not start (wait for that rollout, or --force-takeover)"
                ));
            }
        }
        Err((_, message)) => check.problems.push(message),
    }

    if !check.already_on_version {
        if let (Ok(floor), Ok(version)) = (
            parse_version(&check.downgrade_floor),
            parse_version(&target.version),
        ) {
            if version < floor && !target.allow_downgrade {
                check.downgrade_refused = true;
                check.problems.push(format!(
                    "{} {} is below {floor}, the highest version this host activated: the agent would refuse it; pass --allow-downgrade (for a version the host ran before, or one signed with --allow-downgrade)",
                    target.service, target.version
                ));
            }
        }
    }
    check
}

/// A host that answered the connection but not the first question: a
/// missing right or transport trouble (a TLS/plaintext mismatch is named).
fn unanswered(mut check: HostCheck, code: Option<Code>, message: String) -> HostCheck {
    check.reachable = code.is_some();
    if code.is_none() {
        check.problems.push(format!("unreachable: {message}"));
    } else {
        check.problems.push(message);
    }
    check
}

/// One line per host for people.
pub fn describe(check: &HostCheck, target_version: &str) -> String {
    if !check.reachable {
        return check.problems.join("; ");
    }
    let mut parts = vec![if check.current_version.is_empty() {
        "runs nothing yet".to_string()
    } else if check.already_on_version {
        format!("runs {target_version} already (skipped)")
    } else {
        format!("runs {}", check.current_version)
    }];
    if !check.already_on_version {
        parts.push(if check.staged {
            "release staged".into()
        } else {
            "release not staged (uploaded first)".into()
        });
    }
    if check.lease_holder.is_none() {
        parts.push("no lease held".into());
    }
    parts.extend(check.problems.iter().cloned());
    parts.join("; ")
}

/// The dry run: asks every host, prints the plan and the answers (text, or
/// one JSON object a line: each host, then the plan with `can_start`), and
/// returns the exit code: 0 if the push could start, 1 if not.
pub async fn run(plan: &RolloutPlan, json: bool, force_takeover: bool) -> anyhow::Result<u8> {
    let checks = check_hosts(plan, force_takeover).await;
    let blocked: Vec<&HostCheck> = checks.iter().filter(|c| !c.problems.is_empty()).collect();
    let can_start = blocked.is_empty();
    if json {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for check in &checks {
            let mut line = serde_json::to_value(check)?;
            line["event"] = "dry_run_host".into();
            writeln!(out, "{line}")?;
        }
        let line = serde_json::json!({
            "event": "dry_run_plan",
            "service": plan.service,
            "version": plan.version,
            "sha256": plan.sha256,
            "size": plan.size,
            "hosts": plan.hosts,
            "waves": plan.waves,
            "settings": plan.settings,
            "budget": plan.budget,
            "allow_downgrade": plan.allow_downgrade,
            "can_start": can_start,
            "hosts_with_problems": blocked.iter().map(|c| &c.host).collect::<Vec<_>>(),
        });
        writeln!(out, "{line}")?;
    } else {
        super::output::print_plan(plan);
        println!("hosts (asked with the read right; nothing was taken or changed):");
        for check in &checks {
            println!("  {:<22} {}", check.host, describe(check, &plan.version));
        }
        if can_start {
            println!("dry run: nothing was changed; the push can start");
        } else {
            println!(
                "dry run: nothing was changed; the push would not get past {} host(s): {}",
                blocked.len(),
                blocked
                    .iter()
                    .map(|c| c.host.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(if can_start { 0 } else { 1 })
}
