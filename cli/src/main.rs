//! `reloadctl`: the operator's and the pipeline's command line.
//!
//! Local subcommands (`keygen`, `sign`, `verify`) touch files only; the
//! others talk to agents over gRPC. Signing and verification rules come from
//! `reload-artifact`, the same code the agent runs, so "verify passes here"
//! means "the agent will accept it" for the same trusted keys.
//!
//! Layout: [`args`] (the clap definitions), [`client`] (connections,
//! uploads), [`reload`] (one-host and fleet activate, rollback, status),
//! [`rollout`] (`push`, `resume` and `rollouts`), [`init`] and [`certs`]
//! (starter files).
//! This file dispatches and holds the small local commands.
// Denied, not forbidden: `one_malloc_arena` is the one allowed call.
#![deny(unsafe_code)]

mod args;
mod certs;
mod client;
mod config;
mod init;
mod reload;
mod rollout;

use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use args::{Cli, Command};
use clap::Parser;
use reload_artifact::verify::{check_content, hash_file};
use reload_artifact::{envelope_path_for, Envelope, Manifest, PublicKey, SigningKey, TrustedKeys};
use reload_proto::v1 as pb;

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_file_limit();
    one_malloc_arena();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("reloadctl: {err:#}");
            if err.downcast_ref::<rollout::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A push keeps a connection (and, in its health gate, a stream) per
/// host: a thousand hosts need more descriptors than the common soft limit
/// of 1024. The soft limit goes up to the hard one, as the Go runtime
/// does for every program; failing that, the push reports the hosts it
/// could not reach.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// One glibc malloc arena instead of one per thread that ever contended
/// (up to 8 per core). A push's memory is a few tens of KiB per host
/// (an HTTP/2 connection's buffers, a stream in the gate), freed and
/// allocated again from whichever runtime thread runs the host's task;
/// with an arena per thread those frees cannot serve another thread's
/// allocations. Measured at 300 hosts: 26.5 MiB peak instead of 31.7
/// (BENCHMARKS.md §4b). The CLI spends its time waiting on hosts, so the
/// one arena's lock is not contended.
#[allow(unsafe_code)]
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before the runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    init_logging(&cli.log_format);
    let config = config::ConfigPath::new(cli.config.clone());
    if cli.command.talks_to_agents() {
        // One loader for every command that reaches agents: flags, then
        // RELOADCTL_TLS_*, then the project file's [tls].
        let file = config
            .load_optional()
            .map_err(|e| anyhow::Error::new(rollout::UsageError(e)))?;
        let flags = client::TlsSettings {
            ca: cli.tls_ca.clone(),
            cert: cli.tls_cert.clone(),
            key: cli.tls_key.clone(),
            server_name: cli.tls_server_name.clone(),
        };
        let tls = config::connection_settings(flags, file.as_ref());
        client::configure_transport(&tls, cli.insecure)
            .map_err(|e| anyhow::Error::new(rollout::UsageError(e)))?;
    }
    let project_file = config.path.clone();
    match cli.command {
        Command::Push {
            version,
            hosts_file,
            limit,
            rollout: flags,
            dry_run,
            agent,
            allow_downgrade,
        } => runtime()?.block_on(rollout::push(rollout::PushArgs {
            allow_downgrade,
            agent,
            config: project_file,
            version,
            hosts_file,
            limit,
            overrides: flags.overrides,
            json: flags.output == "json",
            dry_run,
            force_takeover: flags.force_takeover,
        })),
        Command::Resume {
            id,
            output,
            force_takeover,
        } => runtime()?.block_on(rollout::resume(
            &project_file,
            id.as_deref(),
            output == "json",
            force_takeover,
        )),
        Command::Rollouts { show, output } => match show {
            None => rollout::history::list(&project_file, output == "json"),
            Some(args::RolloutsCommand::Show { id }) => {
                rollout::history::show(&project_file, &id, output == "json")
            }
        },
        other => run_simple(other).map(|()| 0),
    }
}

fn run_simple(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Push { .. } | Command::Resume { .. } | Command::Rollouts { .. } => {
            unreachable!("handled in run")
        }
        Command::Init {
            dir,
            service,
            recipe,
            force,
        } => init::init(&dir, &service, recipe.as_deref(), force),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "reloadctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Certs {
            out,
            agent_names,
            clients,
            force,
        } => certs::make_certs(&out, &agent_names, &clients, force),
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Sign {
            keys,
            service,
            version,
            expires_in,
            os,
            arch,
            allow_downgrade,
            file,
        } => sign(
            &keys,
            &service,
            &version,
            expires_in,
            &os,
            &arch,
            allow_downgrade,
            &file,
        ),
        Command::Verify {
            pubkeys,
            envelope,
            file,
        } => verify(&pubkeys, envelope.as_deref(), &file),
        Command::Upload {
            host,
            envelope,
            file,
        } => runtime()?.block_on(upload(&host, envelope.as_deref(), &file)),
        Command::Artifacts {
            host,
            service,
            output,
        } => runtime()?.block_on(artifacts(&host, &service, &output)),
        Command::Activate {
            host,
            service,
            version,
            artifact,
            allow_downgrade,
        } => runtime()?.block_on(reload::activate(
            &host,
            &service,
            &version,
            artifact.as_deref(),
            allow_downgrade,
        )),
        Command::Logs {
            host,
            service,
            lines,
            follow,
            output,
        } => runtime()?.block_on(reload::logs(&host, &service, lines, follow, &output)),
        Command::Rollback { hosts, service } => {
            runtime()?.block_on(reload::rollback_fleet(hosts, &service))
        }
        Command::Stop { hosts, service } => {
            runtime()?.block_on(reload::stop_fleet(hosts, &service))
        }
        Command::Status {
            hosts,
            agents: true,
            output,
            ..
        } => runtime()?.block_on(reload::status_agents(hosts, &output)),
        Command::Status {
            hosts,
            service,
            output,
            agents: false,
        } => runtime()?.block_on(reload::status_fleet(hosts, &service, &output)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Writes `bytes` to `path` through a temp file and a rename, so a reader
/// never sees half a file. `mode` applies from creation on.
pub(crate) fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    replace: bool,
) -> anyhow::Result<()> {
    if !replace && path.exists() {
        bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    let private = with_suffix(out, ".key");
    let public = with_suffix(out, ".pub");
    if !force {
        for path in [&private, &public] {
            if path.exists() {
                bail!(
                    "{} already exists; pass --force to replace it",
                    path.display()
                );
            }
        }
    }
    let key = SigningKey::generate();
    write_atomically(&private, key.to_pem().as_bytes(), 0o600, force)?;
    write_atomically(&public, key.public().to_pem().as_bytes(), 0o644, force)?;
    println!("private key: {} (keep it secret)", private.display());
    println!(
        "public key:  {} (list it in the agents' trusted_keys)",
        public.display()
    );
    println!("key id:      {}", key.id());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn sign(
    keys: &[PathBuf],
    service: &str,
    version: &str,
    expires_in: Duration,
    os: &str,
    arch: &str,
    allow_downgrade: bool,
    file: &Path,
) -> anyhow::Result<()> {
    let keys = keys
        .iter()
        .map(|k| SigningKey::load(k))
        .collect::<Result<Vec<_>, _>>()?;
    let (sha256, size) =
        hash_file(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut manifest = Manifest::new(
        service,
        version,
        &sha256,
        size,
        SystemTime::now(),
        expires_in,
    )?;
    manifest.os = os.to_string();
    manifest.arch = arch.to_string();
    manifest.allow_downgrade = allow_downgrade;
    manifest.validate()?;
    let envelope = Envelope::sign_manifest(&manifest, &keys.iter().collect::<Vec<_>>());
    let out = envelope_path_for(file);
    write_atomically(&out, &envelope.to_json(), 0o644, true)?;
    println!(
        "signed {} {} ({} bytes, sha256 {}) with key(s) {}",
        manifest.service,
        manifest.version,
        size,
        sha256,
        keys.iter().map(|k| k.id()).collect::<Vec<_>>().join(", ")
    );
    println!("envelope: {} (expires {})", out.display(), manifest.expires);
    Ok(())
}

fn read_envelope(envelope: Option<&Path>, file: &Path) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let path = envelope
        .map(Path::to_path_buf)
        .unwrap_or_else(|| envelope_path_for(file));
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read the envelope {}; sign the file first with `reloadctl sign`",
            path.display()
        )
    })?;
    Ok((path, bytes))
}

fn verify(pubkeys: &[PathBuf], envelope: Option<&Path>, file: &Path) -> anyhow::Result<()> {
    let keys = pubkeys
        .iter()
        .map(|p| PublicKey::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let trusted = TrustedKeys::new(keys, Duration::ZERO);
    let (envelope_path, bytes) = read_envelope(envelope, file)?;
    let verified = trusted
        .verify_envelope(&bytes, SystemTime::now())
        .with_context(|| format!("{} failed verification", envelope_path.display()))?;
    let (sha256, size) =
        hash_file(file).with_context(|| format!("cannot read {}", file.display()))?;
    check_content(&verified.manifest, &sha256, size).with_context(|| {
        format!(
            "{} does not match {}",
            file.display(),
            envelope_path.display()
        )
    })?;
    let m = &verified.manifest;
    println!(
        "OK: {} {} for {}/{}, {} bytes, sha256 {}, signed by {}, expires {}",
        m.service,
        m.version,
        m.os,
        m.arch,
        m.size,
        m.sha256,
        verified.key_ids.join(", "),
        m.expires
    );
    Ok(())
}

pub(crate) async fn upload(host: &str, envelope: Option<&Path>, file: &Path) -> anyhow::Result<()> {
    let (envelope_path, bytes) = read_envelope(envelope, file)?;
    // The sha256 to look up comes from the envelope: hashing a large file
    // here would double the work, and the agent hashes what it receives and
    // refuses a file that does not match (DATA_LOSS).
    let manifest = serde_json::from_slice::<Envelope>(&bytes)
        .map_err(|err| err.to_string())
        .and_then(|envelope| envelope.unverified_manifest())
        .map_err(|err| {
            anyhow::anyhow!(
                "{} is not a reload envelope: {err}",
                envelope_path.display()
            )
        })?;
    // A size check is free and catches a file replaced or appended to after
    // signing before anything is sent.
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    if size != manifest.size {
        bail!(
            "{} is {size} bytes but {} says {}: the file changed after signing; sign it again",
            file.display(),
            envelope_path.display(),
            manifest.size
        );
    }
    let sha256 = manifest.sha256;
    let channel = client::connect(host).await?;
    let show_progress = std::io::stderr().is_terminal();
    let outcome = client::upload(host, channel, file, bytes, &sha256, show_progress).await?;
    let m = outcome.info.manifest.unwrap_or_default();
    if outcome.already_present {
        println!(
            "{host}: already has {} {} (sha256 {}); nothing sent",
            m.service, m.version, m.sha256
        );
    } else {
        println!(
            "{host}: stored {} {} (sha256 {}), {} bytes sent",
            m.service, m.version, m.sha256, outcome.bytes_sent
        );
    }
    Ok(())
}

pub(crate) fn format_timestamp(ts: Option<&reload_proto::prost_types::Timestamp>) -> String {
    ts.and_then(|t| SystemTime::try_from(*t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

async fn artifacts(host: &str, service: &str, output: &str) -> anyhow::Result<()> {
    let channel = client::connect(host).await?;
    let mut agent = pb::artifact_service_client::ArtifactServiceClient::new(channel);
    let list = agent
        .list_artifacts(pb::ListArtifactsRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| client::describe_status(host, "list artifacts", &s))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if output == "json" {
        for info in &list.artifacts {
            let m = info.manifest.clone().unwrap_or_default();
            let line = serde_json::json!({
                "service": m.service, "version": m.version, "sha256": m.sha256,
                "size": m.size, "os": m.os, "arch": m.arch,
                "expires": format_timestamp(m.expires.as_ref()),
                "stored_at": format_timestamp(info.stored_at.as_ref()),
                "key_ids": info.key_ids,
            });
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<14} {:>12}  {:<20}  {:<20}  SHA256",
        "SERVICE", "VERSION", "SIZE", "STORED", "EXPIRES"
    )?;
    for info in &list.artifacts {
        let m = info.manifest.clone().unwrap_or_default();
        writeln!(
            out,
            "{:<20} {:<14} {:>12}  {:<20}  {:<20}  {}",
            m.service,
            m.version,
            m.size,
            format_timestamp(info.stored_at.as_ref()),
            format_timestamp(m.expires.as_ref()),
            m.sha256
        )?;
    }
    if list.artifacts.is_empty() {
        writeln!(
            out,
            "(no artifacts{})",
            if service.is_empty() {
                String::new()
            } else {
                format!(" of {service}")
            }
        )?;
    }
    Ok(())
}
