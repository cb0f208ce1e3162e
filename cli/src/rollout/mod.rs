//! Fleet rollouts: `reloadctl push`, `reloadctl resume`, and
//! `reloadctl rollouts [show ID]` to read them back.
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
//! Layout:
//! - this file: the entry points, from files to a running engine (load the
//!   project and hosts, verify the release, plan, create or reopen the
//!   journal);
//! - [`settings`]: the ten rollout knobs, once, and the flags over them;
//! - [`plan`]: the plan, waves and failure budget; [`hosts`]: the hosts
//!   file; [`project`]: `reloadctl.toml`;
//! - [`journal`]: the journal and its records (also the `--output json`
//!   events);
//! - [`engine`]: every decision (fencing order, staging, waves, budget,
//!   halt, revert, resume), over the [`fleet::Fleet`] trait, with the
//!   [`gate::HealthGate`];
//! - [`grpc_fleet`] and [`agent_upgrade`]: the fleet over tonic;
//! - [`output`]: what people see;
//! - [`dry_run`]: `push --dry-run`, every host asked with the read right;
//! - [`history`]: `reloadctl rollouts`, the journals read back (without
//!   their locks) as a list and one rollout's story.

mod agent_upgrade;
mod causes;
pub mod dry_run;
pub mod engine;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod fake_fleet;
pub mod fleet;
pub mod gate;
pub mod grpc_fleet;
pub mod history;
pub mod hosts;
pub mod journal;
pub mod output;
mod peer_tree;
pub mod plan;
pub mod project;
mod ranked_slots;
pub mod settings;
mod small_calls;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use reload_artifact::verify::{check_content, hash_file};
use reload_artifact::version::parse_version;
use reload_artifact::{envelope_path_for, PublicKey, TrustedKeys};

use engine::{HostRecord, RolloutEngine, RunStart};
use fleet::Lease;
use grpc_fleet::{GrpcFleet, Target};
use journal::{Journal, Outcome, Record};
use plan::RolloutPlan;
pub use settings::RolloutOverrides;

/// `reloadctl push`, as parsed.
pub struct PushArgs {
    /// Upgrade the agents themselves (`push --agent`).
    pub agent: bool,
    pub config: PathBuf,
    pub version: String,
    pub hosts_file: PathBuf,
    /// `--limit`: only these hosts of the file.
    pub limit: Option<String>,
    pub overrides: RolloutOverrides,
    pub json: bool,
    pub dry_run: bool,
    pub force_takeover: bool,
    /// Go below the agents' downgrade floor (asked explicitly; journaled
    /// and audited).
    pub allow_downgrade: bool,
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

/// `reloadctl push`: plan, journal, then run the rollout. Returns the exit
/// code (see `reloadctl push --help`).
pub async fn push(args: PushArgs) -> anyhow::Result<u8> {
    let usage = |e: anyhow::Error| anyhow::Error::new(UsageError(e));
    let project = project::Project::load(&args.config).map_err(usage)?;
    let mut hosts = hosts::read_hosts(&args.hosts_file).map_err(usage)?;
    if let Some(limit) = &args.limit {
        hosts =
            hosts::limit(hosts, limit, &args.hosts_file.display().to_string()).map_err(usage)?;
    }
    let settings = project.rollout.with(&args.overrides);
    let waves = plan::parse_waves(&settings.waves).map_err(usage)?;
    let budget = plan::failure_budget(&settings.max_failures, hosts.len()).map_err(usage)?;
    let service = if args.agent {
        project::AGENT_SERVICE.to_string()
    } else {
        project.service.clone()
    };
    let (artifact, manifest) = resolve_release(&project, &service, &args.version)?;
    // Agent releases are uploaded: `artifact_url` names the service's.
    let fetch_url = match &project.artifact_url {
        Some(template) if !args.agent => Some(template.replace("{version}", &manifest.version)),
        _ => None,
    };
    let plan = RolloutPlan {
        service,
        version: manifest.version.clone(),
        sha256: manifest.sha256.clone(),
        size: manifest.size,
        artifact,
        waves: plan::plan_waves(hosts.len(), settings.canary, &waves),
        hosts,
        settings,
        budget,
        allow_downgrade: args.allow_downgrade,
        fetch_url,
    };
    if args.dry_run {
        return dry_run::run(&plan, args.json, args.force_takeover).await;
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
        allow_downgrade: plan.allow_downgrade,
        fetch_url: plan.fetch_url.clone(),
    })?;
    if !args.json {
        output::print_start(&rollout, &plan, &journal.path);
    }
    let hosts = vec![HostRecord::default(); plan.hosts.len()];
    run(
        plan,
        journal,
        hosts,
        Lease {
            rollout,
            generation: 1,
            token: 0,
        },
        !args.json,
        args.force_takeover,
        None,
    )
    .await
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
        // Journals only (beside them: their run locks).
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let lines = journal::read_lines(&path)?;
        // An empty journal: its push died before the plan; nothing to go on.
        if !lines.is_empty() && !finished(&lines) {
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

/// `reloadctl resume`: the rollout `id` (or the newest unfinished one)
/// from its journal, under the next lease generation.
pub async fn resume(
    config: &Path,
    id: Option<&str>,
    json: bool,
    force_takeover: bool,
) -> anyhow::Result<u8> {
    let project = project::Project::load(config).map_err(|e| anyhow::Error::new(UsageError(e)))?;
    let path = find_journal(&project.base, id)?;
    let (journal, lines) = Journal::reopen(&path, json)?;
    let Some(first) = lines.first() else {
        bail!(
            "journal {} is empty: the push that made it ended before it wrote its plan, so it changed nothing and there is nothing to resume (remove the file)",
            path.display()
        );
    };
    let rollout = first.rollout.clone();
    let Some(Record::Plan {
        service,
        version,
        sha256,
        size,
        artifact,
        hosts,
        waves,
        settings,
        allow_downgrade,
        fetch_url,
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
            Record::Leased { generation, .. } => Some(generation),
            _ => None,
        })
        .max()
        .unwrap_or(0)
        + 1;
    // The tokens the last run was granted: a host that granted a higher
    // one to another rollout since has been taken over.
    let tokens = lines
        .iter()
        .rev()
        .find_map(|l| match &l.record {
            Record::Leased { tokens, .. } => Some(tokens.clone()),
            _ => None,
        })
        .unwrap_or_default();
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
    let plan = RolloutPlan {
        service,
        version,
        sha256,
        size,
        artifact,
        hosts,
        waves,
        settings: *settings,
        budget,
        allow_downgrade,
        fetch_url,
    };
    let records = HostRecord::from_journal(&plan.hosts, &lines);
    // A failed host stays failed; a halted rollout is not resumed into
    // more changes.
    if lines
        .iter()
        .any(|l| matches!(l.record, Record::Halted { .. }))
    {
        bail!("rollout {rollout} halted; it is not resumed (start a new push, or `reloadctl rollback`)");
    }
    if !json {
        output::print_resume(&rollout, generation, &path);
    }
    run(
        plan,
        journal,
        records,
        Lease {
            rollout,
            generation,
            token: 0,
        },
        !json,
        force_takeover,
        Some(tokens),
    )
    .await
}

/// Runs a planned rollout on the real fleet: from the leases to the
/// summary. Returns the exit code of its outcome.
async fn run(
    plan: RolloutPlan,
    journal: Journal,
    hosts: Vec<HostRecord>,
    lease: Lease,
    human: bool,
    force_takeover: bool,
    resumed_tokens: Option<std::collections::BTreeMap<String, u64>>,
) -> anyhow::Result<u8> {
    let live = output::LiveView::new(human);
    let report = output::Reporter::new(live.clone());
    let fleet = GrpcFleet::new(
        Target {
            service: plan.service.clone(),
            version: plan.version.clone(),
            sha256: plan.sha256.clone(),
            artifact: plan.artifact.clone(),
            allow_downgrade: plan.allow_downgrade,
            fetch_url: plan.fetch_url.clone(),
            // Agent releases are uploaded, as with artifact_url.
            peer_fetch: if plan.service == project::AGENT_SERVICE {
                0
            } else {
                plan.settings.peer_fetch
            },
        },
        &plan.hosts,
        live.clone(),
    )?;
    let holder = holder_name(&plan, &lease.rollout);
    let mut start = RunStart::new(lease, holder, force_takeover, resumed_tokens.is_none());
    start.resumed_tokens = resumed_tokens;
    let engine = RolloutEngine::new(plan, fleet, journal, hosts, start, report);
    // Registered only once the engine polls it (after staging): until
    // then Ctrl-C simply ends the process, nothing having changed. After
    // the first, each further Ctrl-C says what the pause still waits for
    // (a host in its health gate may take a while) instead of nothing.
    let ctrl_c = async move {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                live.print_waiting();
            }
        });
    };
    Ok(engine.run(ctrl_c).await?.exit_code())
}

fn random_id() -> String {
    use rand_core::RngCore;
    format!("{:016x}", rand_core::OsRng.next_u64())
}

fn holder_name(plan: &RolloutPlan, rollout: &str) -> String {
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
        .collect::<Result<Vec<_>, _>>()
        .context("a trusted_keys entry of the project file (paths are relative to its folder)")?;
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
