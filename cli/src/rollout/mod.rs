//! Fleet rollouts: `reloadctl push`, `reloadctl resume`.
//!
//! A rollout is planned (hosts, waves, the signed artifact verified
//! locally), journaled, fenced (a lease on every agent, taken in host order
//! so that of two concurrent pushes exactly one proceeds), staged (upload
//! only where missing; a host that cannot be staged stops the rollout
//! before any host changes), then run wave by wave: activate, then a health
//! gate. Failures are kept apart by cause; past the failure budget the
//! rollout halts, touches no further host, and (with auto-revert) rolls
//! back every host it changed, in parallel.
//!
//! Every state change is appended to the journal and fsync'd before the
//! rollout acts on it; `resume` rebuilds the state from the journal, takes
//! the leases with the next generation (fencing out the old process, if it
//! still runs), and continues without activating any host twice.
//!
//! Layout: [`hosts`] (the hosts file), [`plan`] (waves, budget),
//! [`project`] (`reloadctl.toml`), [`journal`] (the journal and its
//! records, which are also the `--output json` events).

pub mod hosts;
pub mod journal;
pub mod plan;
pub mod project;
pub mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use reload_artifact::verify::{check_content, hash_file};
use reload_artifact::version::parse_version;
use reload_artifact::{envelope_path_for, PublicKey, TrustedKeys};
use reload_proto::v1 as pb;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::client::upload;
use journal::{Cause, HostState, Journal, Outcome, Record};
pub use settings::{RolloutOverrides, RolloutSettings};

/// How long an agent's in-place upgrade may take, from the call to the new
/// image answering: the preflight (30 s at most), the longest drain of a
/// reload in progress, the drain of calls in flight and the exec.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a lease lasts without renewal; renewed every third of it.
const LEASE_TTL: Duration = Duration::from_secs(60);

pub struct PushArgs {
    /// Upgrade the agents themselves (`push --agent`).
    pub agent: bool,
    pub config: PathBuf,
    pub version: String,
    pub hosts_file: PathBuf,
    pub overrides: RolloutOverrides,
    pub json: bool,
    pub dry_run: bool,
    pub force_takeover: bool,
}

/// Everything fixed at plan time.
#[derive(Clone)]
struct Plan {
    service: String,
    version: String,
    sha256: String,
    size: u64,
    artifact: PathBuf,
    hosts: Vec<String>,
    waves: Vec<Vec<usize>>,
    settings: RolloutSettings,
    budget: usize,
}

impl Plan {
    /// An agent rollout: each host's agent upgrades itself in place
    /// (UpgradeAgent) instead of activating a service.
    fn agent(&self) -> bool {
        self.service == project::AGENT_SERVICE
    }
}

#[derive(Clone, Debug, Default)]
struct HostRecord {
    state: Option<HostState>,
    cause: Option<Cause>,
    message: String,
    /// This rollout activated it: a revert must roll it back.
    changed: bool,
}

struct Shared {
    rollout: String,
    journal: Mutex<Journal>,
    hosts: Mutex<Vec<HostRecord>>,
    human: bool,
    started: Instant,
}

impl Shared {
    fn record(&self, record: Record) -> anyhow::Result<()> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(record)
    }

    /// Journals a host state, then updates memory and the screen.
    fn host(
        &self,
        plan: &Plan,
        index: usize,
        state: HostState,
        cause: Option<Cause>,
        message: impl Into<String>,
    ) -> anyhow::Result<()> {
        let message = message.into();
        tracing::info!(rollout = %self.rollout, service = %plan.service, version = %plan.version, host = %plan.hosts[index], state = ?state, cause = ?cause, "{message}");
        self.record(Record::Host {
            host: plan.hosts[index].clone(),
            state,
            cause,
            message: message.clone(),
        })?;
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let record = &mut hosts[index];
        record.state = Some(state);
        record.cause = cause;
        record.message = message.clone();
        if state == HostState::Activated {
            record.changed = true;
        }
        let done = hosts
            .iter()
            .filter(|h| matches!(h.state, Some(HostState::Healthy | HostState::Skipped)))
            .count();
        drop(hosts);
        if self.human {
            let cause = cause
                .map(|c| format!(" ({})", cause_name(c)))
                .unwrap_or_default();
            let message = if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            };
            eprintln!(
                "[{:>6.1}s {done}/{} done] {:<22} {}{cause}{message}",
                self.started.elapsed().as_secs_f64(),
                plan.hosts.len(),
                plan.hosts[index],
                state_name(state)
            );
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<HostRecord> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn failures(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|h| h.state == Some(HostState::Failed))
            .count()
    }
}

fn state_name(state: HostState) -> &'static str {
    match state {
        HostState::Skipped => "skipped (already on the target version)",
        HostState::Staged => "staged",
        HostState::Activating => "activating",
        HostState::Activated => "activated, gating",
        HostState::Healthy => "healthy",
        HostState::Failed => "FAILED",
        HostState::Reverted => "reverted",
        HostState::RevertFailed => "REVERT FAILED",
    }
}

fn cause_name(cause: Cause) -> &'static str {
    match cause {
        Cause::Unreachable => "unreachable",
        Cause::Rejected => "rejected",
        Cause::ReloadFailed => "reload failed",
        Cause::Unhealthy => "unhealthy after reload",
    }
}

/// Transport trouble means the agent could not be reached; anything the
/// agent said itself is a refusal.
fn cause_of(status: &Status) -> Cause {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Cause::Unreachable
        }
        _ => Cause::Rejected,
    }
}

fn channel(host: &str) -> anyhow::Result<Channel> {
    Ok(crate::client::endpoint(host)?.connect_lazy())
}

fn random_id() -> String {
    use rand_core::RngCore;
    format!("{:016x}", rand_core::OsRng.next_u64())
}

fn holder_name(plan: &Plan, rollout: &str) -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!(
        "reloadctl push {} {} by {user}@{machine} pid {} (rollout {rollout})",
        plan.service,
        plan.version,
        std::process::id()
    )
}

/// Reads and checks the release locally: the signature by a trusted key,
/// the service and version, and the file's bytes.
fn resolve_release(
    project: &project::Project,
    service: &str,
    version: &str,
) -> anyhow::Result<(PathBuf, reload_artifact::Manifest)> {
    let normalized = parse_version(version).map_err(|e| anyhow!(e))?.to_string();
    let artifact = project.artifact_path(service, version, &normalized)?;
    let keys = project.trusted_key_paths();
    if keys.is_empty() {
        bail!("the project file lists no trusted_keys: add the public key(s) releases are signed with, so a release is checked before any agent is contacted");
    }
    let keys = keys
        .iter()
        .map(|p| PublicKey::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let envelope_path = envelope_path_for(&artifact);
    let envelope = std::fs::read(&envelope_path).with_context(|| {
        format!(
            "cannot read {}; sign the release with `reloadctl sign`",
            envelope_path.display()
        )
    })?;
    let verified = TrustedKeys::new(keys, Duration::ZERO)
        .verify_envelope(&envelope, SystemTime::now())
        .with_context(|| format!("{} failed verification", envelope_path.display()))?;
    let manifest = verified.manifest;
    if manifest.service != service || manifest.version != normalized {
        bail!(
            "{} is signed as {} {}, not {service} {normalized}",
            artifact.display(),
            manifest.service,
            manifest.version,
        );
    }
    let (sha256, size) =
        hash_file(&artifact).with_context(|| format!("cannot read {}", artifact.display()))?;
    check_content(&manifest, &sha256, size)
        .with_context(|| format!("{} does not match its envelope", artifact.display()))?;
    Ok((artifact, manifest))
}

/// A usage or config error: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for UsageError {}

pub async fn push(args: PushArgs) -> anyhow::Result<u8> {
    let usage = |e: anyhow::Error| anyhow::Error::new(UsageError(e));
    let project = project::Project::load(&args.config).map_err(usage)?;
    project.configure_transport()?;
    let hosts = hosts::read_hosts(&args.hosts_file).map_err(usage)?;
    let settings = project.rollout.with(&args.overrides);
    let waves = plan::parse_waves(&settings.waves).map_err(usage)?;
    let budget = plan::failure_budget(&settings.max_failures, hosts.len()).map_err(usage)?;
    let service = if args.agent {
        project::AGENT_SERVICE.to_string()
    } else {
        project.service.clone()
    };
    let (artifact, manifest) = resolve_release(&project, &service, &args.version)?;
    let plan = Plan {
        service,
        version: manifest.version.clone(),
        sha256: manifest.sha256.clone(),
        size: manifest.size,
        artifact,
        waves: plan::plan_waves(hosts.len(), settings.canary, &waves),
        hosts,
        settings,
        budget,
    };
    if args.dry_run {
        print_plan(&plan);
        return Ok(0);
    }
    let rollout = random_id();
    let mut journal = Journal::create(&project.base, &rollout, args.json)?;
    journal.append(Record::Plan {
        service: plan.service.clone(),
        version: plan.version.clone(),
        sha256: plan.sha256.clone(),
        size: plan.size,
        artifact: std::fs::canonicalize(&plan.artifact)?,
        hosts: plan.hosts.clone(),
        waves: plan.waves.clone(),
        settings: Box::new(plan.settings.clone()),
    })?;
    if !args.json {
        eprintln!(
            "rollout {rollout}: {} {} to {} hosts in {} waves (journal {})",
            plan.service,
            plan.version,
            plan.hosts.len(),
            plan.waves.len(),
            journal.path.display()
        );
    }
    let hosts = vec![HostRecord::default(); plan.hosts.len()];
    run(
        plan,
        rollout,
        1,
        journal,
        hosts,
        !args.json,
        args.force_takeover,
        true,
    )
    .await
}

fn print_plan(plan: &Plan) {
    println!(
        "plan: {} {} (sha256 {}, {} bytes) to {} hosts",
        plan.service,
        plan.version,
        plan.sha256,
        plan.size,
        plan.hosts.len()
    );
    for (i, wave) in plan.waves.iter().enumerate() {
        let name = if i == 0 && plan.settings.canary > 0 {
            "canary".to_string()
        } else {
            format!("wave {}", i + 1)
        };
        let hosts: Vec<&str> = wave.iter().map(|&h| plan.hosts[h].as_str()).collect();
        println!("  {name}: {}", hosts.join(" "));
    }
    let s = &plan.settings;
    println!(
        "  gate: {} consecutive healthy checks over at least {} within {}; at most {} failed host(s); auto-revert {}; max {} hosts at once",
        s.healthy_checks,
        humantime::format_duration(s.min_healthy_time),
        humantime::format_duration(s.healthy_deadline),
        plan.budget,
        if s.auto_revert { "on" } else { "off" },
        s.max_parallel
    );
    println!("dry run: nothing was changed");
}

/// A rollout is over once it finished with anything but a pause.
fn finished(lines: &[journal::Line]) -> bool {
    lines.iter().any(
        |l| matches!(l.record, Record::Finished { outcome, .. } if outcome != Outcome::Aborted),
    )
}

/// Finds the journal to resume: the one named, or the newest unfinished.
fn find_journal(base: &Path, id: Option<&str>) -> anyhow::Result<PathBuf> {
    let folder = Journal::folder(base);
    if let Some(id) = id {
        let path = folder.join(format!("{id}.jsonl"));
        if !path.exists() {
            bail!("no rollout {id} in {}", folder.display());
        }
        return Ok(path);
    }
    let mut unfinished = Vec::new();
    for entry in std::fs::read_dir(&folder)
        .with_context(|| format!("no rollouts in {}", folder.display()))?
    {
        let path = entry?.path();
        let lines = journal::read_lines(&path)?;
        if !finished(&lines) {
            let modified = std::fs::metadata(&path)?.modified()?;
            unfinished.push((modified, path));
        }
    }
    unfinished.sort();
    unfinished.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow!(
            "every rollout in {} has finished; nothing to resume",
            folder.display()
        )
    })
}

pub async fn resume(
    config: &Path,
    id: Option<&str>,
    json: bool,
    force_takeover: bool,
) -> anyhow::Result<u8> {
    let project = project::Project::load(config).map_err(|e| anyhow::Error::new(UsageError(e)))?;
    project.configure_transport()?;
    let path = find_journal(&project.base, id)?;
    let (journal, lines) = Journal::reopen(&path, json)?;
    let rollout = lines[0].rollout.clone();
    let Some(Record::Plan {
        service,
        version,
        sha256,
        size,
        artifact,
        hosts,
        waves,
        settings,
    }) = lines.first().map(|l| l.record.clone())
    else {
        bail!("journal {} does not start with a plan", path.display());
    };
    if finished(&lines) {
        bail!("rollout {rollout} has finished already");
    }
    let generation = lines
        .iter()
        .filter_map(|l| match l.record {
            Record::Leased { generation } => Some(generation),
            _ => None,
        })
        .max()
        .unwrap_or(0)
        + 1;
    let (file_sha, file_size) = hash_file(&artifact).with_context(|| {
        format!(
            "the release {} is gone; it is needed to resume",
            artifact.display()
        )
    })?;
    if file_sha != sha256 || file_size != size {
        bail!(
            "{} changed since the rollout started; cannot resume with other bytes",
            artifact.display()
        );
    }
    let budget = plan::failure_budget(&settings.max_failures, hosts.len())?;
    let plan = Plan {
        service,
        version,
        sha256,
        size,
        artifact,
        hosts,
        waves,
        settings: *settings,
        budget,
    };
    let mut records = vec![HostRecord::default(); plan.hosts.len()];
    for line in &lines {
        if let Record::Host {
            host,
            state,
            cause,
            message,
        } = &line.record
        {
            if let Some(i) = plan.hosts.iter().position(|h| h == host) {
                records[i].state = Some(*state);
                records[i].cause = *cause;
                records[i].message = message.clone();
                records[i].changed |= *state == HostState::Activated;
            }
        }
    }
    // A failed host stays failed; a halted rollout is not resumed into
    // more changes.
    if lines
        .iter()
        .any(|l| matches!(l.record, Record::Halted { .. }))
    {
        bail!("rollout {rollout} halted; it is not resumed (start a new push, or `reloadctl rollback`)");
    }
    if !json {
        eprintln!(
            "resuming rollout {rollout} (generation {generation}) from {}",
            path.display()
        );
    }
    run(
        plan,
        rollout,
        generation,
        journal,
        records,
        !json,
        force_takeover,
        false,
    )
    .await
}

/// Leases on every host, in host order (see the module docs).
async fn acquire_leases(
    plan: &Plan,
    shared: &Shared,
    channels: &[Channel],
    lease: &pb::LeaseRef,
    holder: &str,
    force: bool,
) -> Result<(), String> {
    let mut order: Vec<usize> = (0..plan.hosts.len()).collect();
    order.sort_by(|a, b| plan.hosts[*a].cmp(&plan.hosts[*b]));
    let mut taken = Vec::new();
    for i in order {
        let mut client = pb::lease_service_client::LeaseServiceClient::new(channels[i].clone());
        let request = pb::AcquireLeaseRequest {
            r#ref: Some(lease.clone()),
            holder: holder.to_string(),
            ttl: Some(LEASE_TTL.try_into().expect("small duration")),
            force_takeover: force,
        };
        match tokio::time::timeout(Duration::from_secs(10), client.acquire_lease(request)).await {
            Ok(Ok(response)) => {
                if let Some(displaced) = response.into_inner().displaced {
                    if shared.human {
                        eprintln!(
                            "{}: took the lease over from {:?}",
                            plan.hosts[i], displaced.holder
                        );
                    }
                }
                taken.push(i);
            }
            failure => {
                let reason = match failure {
                    Ok(Err(status)) if status.code() == Code::Aborted => {
                        format!("{}: {}", plan.hosts[i], status.message())
                    }
                    Ok(Err(status)) => format!(
                        "{}: cannot take the lease ({:?}): {}",
                        plan.hosts[i],
                        status.code(),
                        status.message()
                    ),
                    _ => format!("{}: unreachable (no answer within 10s)", plan.hosts[i]),
                };
                release_leases(channels, &taken, lease).await;
                return Err(reason);
            }
        }
    }
    Ok(())
}

async fn release_leases(channels: &[Channel], hosts: &[usize], lease: &pb::LeaseRef) {
    let mut releases = tokio::task::JoinSet::new();
    for &i in hosts {
        let mut client = pb::lease_service_client::LeaseServiceClient::new(channels[i].clone());
        let request = pb::ReleaseLeaseRequest {
            r#ref: Some(lease.clone()),
        };
        releases.spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), client.release_lease(request)).await;
        });
    }
    while releases.join_next().await.is_some() {}
}

/// Stages one host: skip if it already runs the target, else upload if
/// missing. Returns Ok(true) when skipped.
async fn stage(
    plan: &Plan,
    channel: Channel,
    host: &str,
    bytes_sent: &Mutex<u64>,
) -> Result<bool, (Cause, String)> {
    if plan.agent() {
        if agent_info(channel.clone()).await?.executable_sha256 == plan.sha256 {
            return Ok(true);
        }
        return upload_release(plan, channel, host, bytes_sent).await;
    }
    let mut control = pb::service_control_client::ServiceControlClient::new(channel.clone());
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        control.get_status(pb::GetStatusRequest {
            service: plan.service.clone(),
        }),
    )
    .await
    .map_err(|_| (Cause::Unreachable, "no answer within 10s".to_string()))?
    .map_err(|s| (cause_of(&s), format!("status: {}", s.message())))?
    .into_inner();
    let running_target = status.services.first().is_some_and(|s| {
        s.current_sha256 == plan.sha256 && s.state == pb::ServiceState::Running as i32
    });
    if running_target {
        return Ok(true);
    }
    upload_release(plan, channel, host, bytes_sent).await
}

/// Uploads the release unless the host has it; Ok(false): staged.
async fn upload_release(
    plan: &Plan,
    channel: Channel,
    host: &str,
    bytes_sent: &Mutex<u64>,
) -> Result<bool, (Cause, String)> {
    let envelope = std::fs::read(envelope_path_for(&plan.artifact))
        .map_err(|e| (Cause::Rejected, e.to_string()))?;
    let outcome = upload(host, channel, &plan.artifact, envelope, &plan.sha256, false)
        .await
        .map_err(|e| {
            let text = format!("{e:#}");
            let cause = if text.contains("cannot reach") || text.contains("Unavailable") {
                Cause::Unreachable
            } else {
                Cause::Rejected
            };
            (cause, text)
        })?;
    *bytes_sent.lock().unwrap_or_else(|p| p.into_inner()) += outcome.bytes_sent;
    Ok(false)
}

/// One health-gate poll.
enum Probe {
    Healthy,
    /// Not (yet) healthy: what was seen.
    NotYet(String),
    /// Over: the process the gate is about is gone, or the agent refused.
    Fatal(Cause, String),
    NoAnswer,
}

/// A service rollout's poll: the new process `pid` is current, running
/// and healthy.
async fn probe_service(plan: &Plan, channel: Channel, pid: u32) -> Probe {
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        control.get_status(pb::GetStatusRequest {
            service: plan.service.clone(),
        }),
    )
    .await;
    match answer {
        Ok(Ok(response)) => {
            let status = response
                .into_inner()
                .services
                .into_iter()
                .next()
                .unwrap_or_default();
            let health = pb::HealthState::try_from(status.health).unwrap_or_default();
            let state = pb::ServiceState::try_from(status.state).unwrap_or_default();
            if status.pid != pid {
                return Probe::Fatal(
                    Cause::Unhealthy,
                    format!(
                        "the new process (pid {pid}) is gone: now pid {} in state {}",
                        status.pid,
                        state.as_str_name()
                    ),
                );
            }
            if state == pb::ServiceState::Running && health == pb::HealthState::Healthy {
                Probe::Healthy
            } else {
                Probe::NotYet(format!("{} {}", state.as_str_name(), health.as_str_name()))
            }
        }
        Ok(Err(s)) if cause_of(&s) == Cause::Rejected => {
            Probe::Fatal(Cause::Rejected, s.message().to_string())
        }
        _ => Probe::NoAnswer,
    }
}

/// An agent rollout's poll: the agent (still pid `pid`) runs the release,
/// and every service it runs is running and healthy.
async fn probe_agent(plan: &Plan, channel: Channel, pid: u32) -> Probe {
    let info = match agent_info(channel.clone()).await {
        Ok(info) => info,
        Err((Cause::Rejected, message)) => return Probe::Fatal(Cause::Rejected, message),
        Err(_) => return Probe::NoAnswer,
    };
    if info.pid != pid {
        return Probe::Fatal(
            Cause::Unhealthy,
            format!("the agent restarted (pid {pid} is now {})", info.pid),
        );
    }
    if info.executable_sha256 != plan.sha256 {
        return Probe::Fatal(
            Cause::Unhealthy,
            format!(
                "the agent no longer runs {} (its executable is {})",
                plan.version, info.executable_sha256
            ),
        );
    }
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let status = match tokio::time::timeout(
        Duration::from_secs(5),
        control.get_status(pb::GetStatusRequest {
            service: String::new(),
        }),
    )
    .await
    {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(s)) if cause_of(&s) == Cause::Rejected => {
            return Probe::Fatal(Cause::Rejected, s.message().to_string())
        }
        _ => return Probe::NoAnswer,
    };
    let unwell: Vec<String> = status
        .services
        .iter()
        .filter(|s| !s.current_version.is_empty())
        .filter(|s| {
            s.state != pb::ServiceState::Running as i32
                || s.health != pb::HealthState::Healthy as i32
        })
        .map(|s| {
            format!(
                "{} {} {}",
                s.name,
                pb::ServiceState::try_from(s.state)
                    .unwrap_or_default()
                    .as_str_name(),
                pb::HealthState::try_from(s.health)
                    .unwrap_or_default()
                    .as_str_name()
            )
        })
        .collect();
    if unwell.is_empty() {
        Probe::Healthy
    } else {
        Probe::NotYet(unwell.join(", "))
    }
}

/// Polls the agent until the host passes the gate (the new service process
/// `pid`, or for an agent rollout the agent on `pid` and all its services):
/// N consecutive healthy results spanning min-healthy-time, a failure
/// resetting both, within the healthy deadline.
async fn gate(plan: &Plan, channel: Channel, pid: u32) -> Result<(), (Cause, String)> {
    let s = &plan.settings;
    let poll = (s.min_healthy_time / s.healthy_checks)
        .clamp(Duration::from_millis(100), Duration::from_secs(2));
    let deadline = Instant::now() + s.healthy_deadline;
    let (mut streak, mut since) = (0u32, None::<Instant>);
    let mut last = String::from("no answer yet");
    let mut unreachable = 0;
    loop {
        let probe = if plan.agent() {
            probe_agent(plan, channel.clone(), pid).await
        } else {
            probe_service(plan, channel.clone(), pid).await
        };
        let healthy = match probe {
            Probe::Healthy => {
                unreachable = 0;
                true
            }
            Probe::NotYet(seen) => {
                unreachable = 0;
                last = seen;
                false
            }
            Probe::Fatal(cause, message) => return Err((cause, message)),
            Probe::NoAnswer => {
                unreachable += 1;
                if unreachable >= 3 {
                    return Err((
                        Cause::Unreachable,
                        "the agent stopped answering during the health gate".into(),
                    ));
                }
                false
            }
        };
        let mut wait = poll;
        if healthy {
            streak += 1;
            let first = *since.get_or_insert_with(Instant::now);
            if streak >= s.healthy_checks && first.elapsed() >= s.min_healthy_time {
                return Ok(());
            }
            // Enough checks already: the next one is due when the window
            // closes, not a whole poll interval later.
            if streak >= s.healthy_checks {
                wait = poll.min(s.min_healthy_time.saturating_sub(first.elapsed()));
            }
        } else {
            streak = 0;
            since = None;
        }
        if Instant::now() >= deadline {
            return Err((
                Cause::Unhealthy,
                format!(
                    "not healthy within {} (last: {last})",
                    humantime::format_duration(s.healthy_deadline)
                ),
            ));
        }
        tokio::time::sleep(wait).await;
    }
}

/// GetAgentInfo, bounded.
async fn agent_info(channel: Channel) -> Result<pb::GetAgentInfoResponse, (Cause, String)> {
    let mut agent = pb::agent_service_client::AgentServiceClient::new(channel);
    tokio::time::timeout(
        Duration::from_secs(10),
        agent.get_agent_info(pb::GetAgentInfoRequest {}),
    )
    .await
    .map_err(|_| (Cause::Unreachable, "no answer within 10s".to_string()))?
    .map(|r| r.into_inner())
    .map_err(|s| (cause_of(&s), format!("agent info: {}", s.message())))
}

/// Asks the agent to upgrade itself in place (to `sha256`, or with `None`
/// back to the agent it ran before), then waits for the new image to
/// answer and say how it went. Returns the agent's pid and what it runs.
///
/// The agent carries an accepted upgrade through even if this call is cut
/// (a slow preflight, a network blip), and may be busy with another
/// re-exec (a SIGHUP config reload, or this CLI's own call from before it
/// was resumed). So: a refusal ends it; "already in progress" and a cut
/// call wait for the agent to be idle, then look at what it runs and ask
/// again only if the change did not happen.
async fn upgrade_agent(
    channel: Channel,
    sha256: Option<&str>,
    lease: pb::LeaseRef,
) -> Result<(u32, String), (Cause, String)> {
    let deadline = Instant::now() + UPGRADE_TIMEOUT;
    let before = agent_info(channel.clone()).await?;
    let done = |info: &pb::GetAgentInfoResponse| match sha256 {
        Some(sha) => info.executable_sha256 == sha,
        None => info.executable_sha256 != before.executable_sha256,
    };
    if sha256.is_some() && done(&before) {
        return Ok((before.pid, running(&before)));
    }
    loop {
        let mut agent = pb::agent_service_client::AgentServiceClient::new(channel.clone());
        let request = pb::UpgradeAgentRequest {
            sha256: sha256.unwrap_or_default().to_string(),
            lease: Some(lease.clone()),
            allow_downgrade: false,
            rollback: sha256.is_none(),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::time::timeout(left, agent.upgrade_agent(request)).await;
        let refusal = match answer {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => match status.code() {
                Code::Aborted if status.message().contains("already in progress") => None,
                Code::AlreadyExists => None,
                Code::Aborted | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument => {
                    Some((Cause::Rejected, status.message().to_string()))
                }
                Code::FailedPrecondition => {
                    Some((Cause::ReloadFailed, status.message().to_string()))
                }
                // Transport trouble: the call may or may not have landed.
                _ => None,
            },
            Err(_) => None,
        };
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        // Accepted, busy, or unknown: wait until no re-exec is under way,
        // then see what runs.
        let info = wait_until_idle(&channel, &before, deadline).await?;
        if done(&info) {
            return Ok((info.pid, running(&info)));
        }
        let fresh = info.started != before.started;
        if let Some(last) = info.last_upgrade.as_ref().filter(|_| fresh) {
            let ours = !last.config_reload
                && last.from_sha256 == before.executable_sha256
                && sha256.is_none_or(|sha| last.to_sha256 == sha);
            if ours && last.outcome == pb::AgentUpgradeOutcome::FellBack as i32 {
                return Err((
                    Cause::ReloadFailed,
                    format!(
                        "the new agent image did not start, the previous one runs again: {}",
                        last.reason
                    ),
                ));
            }
        }
        if Instant::now() >= deadline {
            return Err((
                Cause::Unreachable,
                format!(
                    "the agent did not complete its upgrade within {}",
                    humantime::format_duration(UPGRADE_TIMEOUT)
                ),
            ));
        }
        // Not done and not failed (the call never landed, or another
        // re-exec was in the way): ask again.
    }
}

/// What an agent runs, for people: its release, or the installed build.
fn running(info: &pb::GetAgentInfoResponse) -> String {
    if info.artifact_version.is_empty() {
        format!("{} (installed)", info.agent_version)
    } else {
        info.artifact_version.clone()
    }
}

/// Polls GetAgentInfo until the agent answers with no re-exec under way
/// (the old image answers until it execs, the new one once it serves).
async fn wait_until_idle(
    channel: &Channel,
    before: &pb::GetAgentInfoResponse,
    deadline: Instant,
) -> Result<pb::GetAgentInfoResponse, (Cause, String)> {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(info) = agent_info(channel.clone()).await {
            if info.pid != before.pid {
                return Err((
                    Cause::ReloadFailed,
                    format!(
                        "the agent restarted during its upgrade (pid {} is now {})",
                        before.pid, info.pid
                    ),
                ));
            }
            if !info.upgrade_in_progress {
                return Ok(info);
            }
        }
        if Instant::now() >= deadline {
            return Err((
                Cause::Unreachable,
                format!(
                    "the agent did not come back from its upgrade within {}",
                    humantime::format_duration(UPGRADE_TIMEOUT)
                ),
            ));
        }
    }
}

/// Waits while the agent is still busy with a reload it was given before
/// this CLI died, then tells whether the target version is current, and on
/// which pid.
async fn settle(plan: &Plan, channel: Channel) -> Result<Option<u32>, (Cause, String)> {
    if plan.agent() {
        // An upgrade this CLI asked for before it died may still be under
        // way (preflight, drain, exec): wait for it to end.
        let deadline = Instant::now() + UPGRADE_TIMEOUT;
        loop {
            match agent_info(channel.clone()).await {
                Ok(info) if !info.upgrade_in_progress || Instant::now() >= deadline => {
                    return Ok((info.executable_sha256 == plan.sha256).then_some(info.pid));
                }
                Err(err) if Instant::now() >= deadline => return Err(err),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let mut control = pb::service_control_client::ServiceControlClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = control
            .get_status(pb::GetStatusRequest {
                service: plan.service.clone(),
            })
            .await
            .map_err(|s| (cause_of(&s), s.message().to_string()))?
            .into_inner()
            .services
            .into_iter()
            .next()
            .unwrap_or_default();
        let reloading = matches!(
            pb::ServiceState::try_from(status.state),
            Ok(pb::ServiceState::Reloading | pb::ServiceState::Starting)
        );
        if !reloading || Instant::now() >= deadline {
            return Ok((status.current_sha256 == plan.sha256).then_some(status.pid));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One host through its step: activate (unless already done) and gate.
async fn roll_host(
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    channel: Channel,
    index: usize,
    lease: pb::LeaseRef,
) -> anyhow::Result<()> {
    let previous = shared.snapshot()[index].state;
    let fail = |cause: Cause, message: String| {
        shared.host(&plan, index, HostState::Failed, Some(cause), message)
    };
    // After a crash, the agent may have finished what the journal only
    // shows as started: never activate a host twice.
    let mut pid = None;
    if matches!(previous, Some(HostState::Activating | HostState::Activated)) {
        match settle(&plan, channel.clone()).await {
            Ok(Some(current)) => {
                if previous == Some(HostState::Activating) {
                    shared.host(
                        &plan,
                        index,
                        HostState::Activated,
                        None,
                        "found activated when resuming",
                    )?;
                }
                pid = Some(current);
            }
            Ok(None) => {}
            Err((cause, message)) => return fail(cause, message),
        }
    }
    let pid = match pid {
        Some(pid) => pid,
        None if plan.agent() => {
            shared.host(&plan, index, HostState::Activating, None, "")?;
            match upgrade_agent(channel.clone(), Some(&plan.sha256), lease).await {
                Ok((pid, version)) => {
                    shared.host(
                        &plan,
                        index,
                        HostState::Activated,
                        None,
                        format!("agent pid {pid} re-executed into {version}"),
                    )?;
                    pid
                }
                Err((cause, message)) => return fail(cause, message),
            }
        }
        None => {
            shared.host(&plan, index, HostState::Activating, None, "")?;
            let mut control =
                pb::service_control_client::ServiceControlClient::new(channel.clone());
            let request = pb::ActivateRequest {
                service: plan.service.clone(),
                sha256: plan.sha256.clone(),
                lease: Some(lease),
                allow_downgrade: false,
            };
            let response =
                match tokio::time::timeout(Duration::from_secs(300), control.activate(request))
                    .await
                {
                    Ok(Ok(response)) => response.into_inner(),
                    Ok(Err(status)) => {
                        return fail(cause_of(&status), status.message().to_string())
                    }
                    Err(_) => {
                        return fail(
                            Cause::Unreachable,
                            "Activate did not answer within 300s".into(),
                        )
                    }
                };
            let result = response.result.unwrap_or_default();
            if result.outcome != pb::ReloadOutcome::Succeeded as i32 {
                return fail(Cause::ReloadFailed, result.reason);
            }
            shared.host(
                &plan,
                index,
                HostState::Activated,
                None,
                format!("pid {} -> {}", result.old_pid, result.new_pid),
            )?;
            result.new_pid
        }
    };
    match gate(&plan, channel, pid).await {
        Ok(()) => shared.host(&plan, index, HostState::Healthy, None, ""),
        Err((cause, message)) => fail(cause, message),
    }
}

async fn revert(
    plan: &Arc<Plan>,
    shared: &Arc<Shared>,
    channels: &[Channel],
    lease: &pb::LeaseRef,
) -> anyhow::Result<bool> {
    let changed: Vec<usize> = shared
        .snapshot()
        .iter()
        .enumerate()
        .filter(|(_, h)| h.changed && h.state != Some(HostState::Reverted))
        .map(|(i, _)| i)
        .collect();
    if shared.human && !changed.is_empty() {
        eprintln!(
            "reverting {} host(s) this rollout changed, in parallel",
            changed.len()
        );
    }
    let mut reverts = tokio::task::JoinSet::new();
    for i in changed {
        let (plan, shared, channel, lease) = (
            plan.clone(),
            shared.clone(),
            channels[i].clone(),
            lease.clone(),
        );
        reverts.spawn(async move {
            if plan.agent() {
                let (state, message) = match upgrade_agent(channel, None, lease).await {
                    Ok((_, version)) => (HostState::Reverted, format!("agent back on {version}")),
                    Err((_, message)) => (HostState::RevertFailed, message),
                };
                let cause = shared.snapshot()[i].cause;
                return shared.host(&plan, i, state, cause, message);
            }
            let mut control = pb::service_control_client::ServiceControlClient::new(channel);
            // Back to what it ran before this rollout: below the floor the
            // new version set, and known to the agent.
            let request = pb::RollbackRequest {
                service: plan.service.clone(),
                lease: Some(lease),
                allow_downgrade: true,
            };
            let (state, message) =
                match tokio::time::timeout(Duration::from_secs(300), control.rollback(request))
                    .await
                {
                    Ok(Ok(response)) => {
                        let result = response.into_inner().result.unwrap_or_default();
                        if result.outcome == pb::ReloadOutcome::Succeeded as i32 {
                            (
                                HostState::Reverted,
                                format!("back on {}", result.to_version),
                            )
                        } else {
                            (HostState::RevertFailed, result.reason)
                        }
                    }
                    Ok(Err(status)) => (HostState::RevertFailed, status.message().to_string()),
                    Err(_) => (
                        HostState::RevertFailed,
                        "Rollback did not answer within 300s".into(),
                    ),
                };
            let cause = shared.snapshot()[i].cause;
            shared.host(&plan, i, state, cause, message)
        });
    }
    let mut all_ok = true;
    while let Some(done) = reverts.join_next().await {
        done??;
    }
    for h in shared.snapshot() {
        all_ok &= h.state != Some(HostState::RevertFailed);
    }
    Ok(all_ok)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    plan: Plan,
    rollout: String,
    generation: u64,
    journal: Journal,
    records: Vec<HostRecord>,
    human: bool,
    force_takeover: bool,
    fresh: bool,
) -> anyhow::Result<u8> {
    let plan = Arc::new(plan);
    let shared = Arc::new(Shared {
        rollout: rollout.clone(),
        journal: Mutex::new(journal),
        hosts: Mutex::new(records),
        human,
        started: Instant::now(),
    });
    let channels = plan
        .hosts
        .iter()
        .map(|h| channel(h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let lease = pb::LeaseRef {
        rollout_id: rollout.clone(),
        generation,
    };
    let bytes_sent = Mutex::new(0u64);

    let finish = |outcome: Outcome, bytes: u64| -> anyhow::Result<u8> {
        let hosts = shared.snapshot();
        let count = |f: &dyn Fn(&HostRecord) -> bool| hosts.iter().filter(|h| f(h)).count();
        shared.record(Record::Finished {
            outcome,
            hosts: hosts.len(),
            healthy: count(&|h| h.state == Some(HostState::Healthy)),
            skipped: count(&|h| h.state == Some(HostState::Skipped)),
            failed: count(&|h| h.cause.is_some()),
            reverted: count(&|h| h.state == Some(HostState::Reverted)),
            bytes_sent: bytes,
            elapsed_seconds: shared.started.elapsed().as_secs_f64(),
        })?;
        if human {
            print_summary(&plan, &hosts, outcome, shared.started.elapsed());
        }
        Ok(outcome.exit_code())
    };

    // Fence first: nothing is staged or changed without every lease.
    let holder = holder_name(&plan, &rollout);
    if let Err(reason) =
        acquire_leases(&plan, &shared, &channels, &lease, &holder, force_takeover).await
    {
        shared.record(Record::Halted {
            reason: reason.clone(),
        })?;
        eprintln!("reloadctl: rollout not started: {reason}");
        return finish(Outcome::NotStarted, 0);
    }
    shared.record(Record::Leased { generation })?;
    let all: Vec<usize> = (0..plan.hosts.len()).collect();
    let renewer = {
        let (channels, lease) = (channels.clone(), lease.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_TTL / 3).await;
                for channel in &channels {
                    let mut client =
                        pb::lease_service_client::LeaseServiceClient::new(channel.clone());
                    let request = pb::RenewLeaseRequest {
                        r#ref: Some(lease.clone()),
                        ttl: Some(LEASE_TTL.try_into().expect("small")),
                    };
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), client.renew_lease(request))
                            .await;
                }
            }
        })
    };
    let result = run_fenced(&plan, &shared, &channels, &lease, &bytes_sent, fresh).await;
    renewer.abort();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(err) => {
            release_leases(&channels, &all, &lease).await;
            return Err(err);
        }
    };
    release_leases(&channels, &all, &lease).await;
    let bytes = *bytes_sent.lock().unwrap_or_else(|p| p.into_inner());
    finish(outcome, bytes)
}

async fn run_fenced(
    plan: &Arc<Plan>,
    shared: &Arc<Shared>,
    channels: &[Channel],
    lease: &pb::LeaseRef,
    bytes_sent: &Mutex<u64>,
    fresh: bool,
) -> anyhow::Result<Outcome> {
    // Stage every host that still needs it, in parallel (bounded).
    let todo: Vec<usize> = shared
        .snapshot()
        .iter()
        .enumerate()
        .filter(|(_, h)| matches!(h.state, None | Some(HostState::Staged)))
        .map(|(i, _)| i)
        .collect();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(plan.settings.max_parallel));
    let bytes = Arc::new(Mutex::new(0u64));
    let mut staging = tokio::task::JoinSet::new();
    for i in todo {
        let (plan, channel, semaphore, bytes) = (
            plan.clone(),
            channels[i].clone(),
            semaphore.clone(),
            bytes.clone(),
        );
        staging.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            (i, stage(&plan, channel, &plan.hosts[i], &bytes).await)
        });
    }
    let mut unstaged = Vec::new();
    while let Some(done) = staging.join_next().await {
        let (i, result) = done?;
        match result {
            Ok(true) => shared.host(plan, i, HostState::Skipped, None, "")?,
            Ok(false) => shared.host(plan, i, HostState::Staged, None, "")?,
            Err((cause, message)) => unstaged.push((i, cause, message)),
        }
    }
    *bytes_sent.lock().unwrap_or_else(|p| p.into_inner()) +=
        *bytes.lock().unwrap_or_else(|p| p.into_inner());
    if !unstaged.is_empty() {
        unstaged.sort_by_key(|(i, _, _)| *i);
        for (i, cause, message) in &unstaged {
            shared.host(plan, *i, HostState::Failed, Some(*cause), message.clone())?;
        }
        if fresh {
            let reason = format!(
                "{} host(s) could not be staged; no host was changed",
                unstaged.len()
            );
            shared.record(Record::Halted {
                reason: reason.clone(),
            })?;
            eprintln!("reloadctl: rollout not started: {reason}");
            return Ok(Outcome::NotStarted);
        }
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    let watcher = {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
                eprintln!("\ninterrupted: finishing the hosts in flight, then pausing (resume with `reloadctl resume`)");
            }
        })
    };
    let deadline = Instant::now() + plan.settings.progress_deadline;
    let mut halt: Option<String> = None;
    'waves: for (w, wave) in plan.waves.iter().enumerate() {
        let pending: Vec<usize> = wave
            .iter()
            .copied()
            .filter(|&i| {
                !matches!(
                    shared.snapshot()[i].state,
                    Some(
                        HostState::Healthy
                            | HostState::Skipped
                            | HostState::Failed
                            | HostState::Reverted
                    )
                )
            })
            .collect();
        if pending.is_empty() {
            continue;
        }
        if w > 0 && !plan.settings.pause_between_waves.is_zero() {
            tokio::time::sleep(plan.settings.pause_between_waves).await;
        }
        shared.record(Record::Wave {
            index: w + 1,
            of: plan.waves.len(),
            hosts: pending.iter().map(|&i| plan.hosts[i].clone()).collect(),
        })?;
        if shared.human {
            eprintln!(
                "wave {}/{}: {} host(s)",
                w + 1,
                plan.waves.len(),
                pending.len()
            );
        }
        let semaphore = Arc::new(tokio::sync::Semaphore::new(plan.settings.max_parallel));
        let mut running = tokio::task::JoinSet::new();
        let stop = Arc::new(AtomicBool::new(false));
        for i in pending {
            let permit = semaphore.clone().acquire_owned().await?;
            if stop.load(Ordering::SeqCst) || interrupted.load(Ordering::SeqCst) {
                break;
            }
            let (plan, shared2, channel, lease, stop, budget) = (
                plan.clone(),
                shared.clone(),
                channels[i].clone(),
                lease.clone(),
                stop.clone(),
                plan.budget,
            );
            running.spawn(async move {
                let _permit = permit;
                let result = roll_host(plan, shared2.clone(), channel, i, lease).await;
                if shared2.failures() > budget {
                    stop.store(true, Ordering::SeqCst);
                }
                result
            });
            // Let tasks that finished free their permits before deciding.
            while let Some(done) = running.try_join_next() {
                done??;
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let drained = tokio::time::timeout(remaining, async {
            while let Some(done) = running.join_next().await {
                done??;
            }
            anyhow::Ok(())
        })
        .await;
        match drained {
            Ok(result) => result?,
            Err(_) => {
                running.abort_all();
                halt = Some(format!(
                    "the progress deadline of {} passed",
                    humantime::format_duration(plan.settings.progress_deadline)
                ));
                break 'waves;
            }
        }
        let failures = shared.failures();
        if failures > plan.budget {
            halt = Some(format!(
                "{failures} host(s) failed, above the budget of {} (--max-failures {})",
                plan.budget, plan.settings.max_failures
            ));
            break;
        }
        if interrupted.load(Ordering::SeqCst) {
            watcher.abort();
            shared.record(Record::Paused {
                reason: "interrupted (Ctrl-C)".into(),
            })?;
            return Ok(Outcome::Aborted);
        }
        if Instant::now() >= deadline {
            halt = Some(format!(
                "the progress deadline of {} passed",
                humantime::format_duration(plan.settings.progress_deadline)
            ));
            break;
        }
    }
    watcher.abort();
    let Some(reason) = halt else {
        return Ok(Outcome::Done);
    };
    shared.record(Record::Halted {
        reason: reason.clone(),
    })?;
    if shared.human {
        eprintln!("halted: {reason}; no further host is touched");
    }
    if !plan.settings.auto_revert {
        return Ok(Outcome::HaltedPartial);
    }
    let reverted = revert(plan, shared, channels, lease).await?;
    Ok(if reverted {
        Outcome::HaltedReverted
    } else {
        Outcome::HaltedPartial
    })
}

fn print_summary(plan: &Plan, hosts: &[HostRecord], outcome: Outcome, elapsed: Duration) {
    println!("{:<24} {:<14} {:<24} DETAIL", "HOST", "STATE", "CAUSE");
    for (host, record) in plan.hosts.iter().zip(hosts) {
        let state = record
            .state
            .map(|s| format!("{s:?}").to_lowercase())
            .unwrap_or_else(|| "untouched".into());
        let cause = record.cause.map(cause_name).unwrap_or("-");
        println!("{host:<24} {state:<14} {cause:<24} {}", record.message);
    }
    let mut by_cause: BTreeMap<Cause, usize> = BTreeMap::new();
    for cause in hosts.iter().filter_map(|h| h.cause) {
        *by_cause.entry(cause).or_default() += 1;
    }
    let causes: Vec<String> = by_cause
        .iter()
        .map(|(c, n)| format!("{n} {}", cause_name(*c)))
        .collect();
    println!(
        "{}: {} {} on {} hosts in {:.1}s{}",
        match outcome {
            Outcome::Done => "done",
            Outcome::HaltedReverted => "halted and reverted",
            Outcome::HaltedPartial => "halted, NOT fully reverted",
            Outcome::Aborted => "paused",
            Outcome::NotStarted => "not started",
        },
        plan.service,
        plan.version,
        plan.hosts.len(),
        elapsed.as_secs_f64(),
        if causes.is_empty() {
            String::new()
        } else {
            format!("; failures: {}", causes.join(", "))
        }
    );
}
