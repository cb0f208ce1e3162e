//! `reloadctl`: the operator's and the pipeline's command line.
//!
//! Subcommands today: `keygen`, `sign`, `verify` (local files only, no
//! network), and `upload`, `artifacts` (talk to one agent over gRPC).
//! Signing and verification rules come from `reload-artifact`, the same code
//! the agent runs, so "verify passes here" means "the agent will accept it"
//! for the same trusted keys. Network code lives in [`client`].
#![forbid(unsafe_code)]

mod certs;
mod client;
mod init;
mod reload;
mod rollout;

use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use reload_artifact::verify::{check_content, hash_file};
use reload_artifact::{envelope_path_for, Envelope, Manifest, PublicKey, SigningKey, TrustedKeys};
use reload_proto::v1 as pb;

/// `push` settings; unset ones come from the project file.
#[derive(clap::Args)]
struct RolloutFlags {
    /// Project file with the service, releases and trusted keys.
    #[arg(long, default_value = rollout::project::DEFAULT_FILE)]
    config: PathBuf,
    #[command(flatten)]
    overrides: rollout::RolloutOverrides,
    /// Take the leases even from another rollout (written to the agents' logs).
    #[arg(long)]
    force_takeover: bool,
    /// `text` for people (stderr), `json` (one event per line, stdout) for pipelines.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Parser)]
#[command(version, about = "Sign artifacts and roll them out to reload agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CA that signed the agents' certificates (mutual TLS).
    #[arg(long, global = true, env = "RELOADCTL_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate: its identity for the agents' [rights].
    #[arg(long, global = true, env = "RELOADCTL_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "RELOADCTL_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Name the agents' certificates carry, when not the dialled host.
    #[arg(long, global = true, env = "RELOADCTL_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Talk plaintext to non-loopback agents (agents with `insecure = true`).
    #[arg(long, global = true)]
    insecure: bool,
    /// Diagnostic log lines on stderr (filter with RUST_LOG, default warn);
    /// they never mix with --output json on stdout.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Subcommand)]
enum Command {
    /// Make an Ed25519 signing key: PREFIX.key (private, 0600) and PREFIX.pub.
    #[command(
        after_help = "Example:\n  reloadctl keygen --out release\n  # writes release.key and release.pub; put release.pub in the agents' trusted_keys"
    )]
    Keygen {
        /// Path prefix of the two files.
        #[arg(long, default_value = "release")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Sign FILE for SERVICE at VERSION; writes FILE.dsse.json beside it.
    #[command(
        after_help = "Example:\n  reloadctl sign --key release.key --service web --version 1.4 ./web\n  # writes ./web.dsse.json"
    )]
    Sign {
        /// Private key (PKCS#8 PEM, from `reloadctl keygen` or `openssl
        /// genpkey -algorithm ed25519`); repeat to sign with several (key
        /// rotation, k-of-n thresholds).
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        service: String,
        /// Semantic version; `1.4` means `1.4.0`.
        #[arg(long)]
        version: String,
        /// How long agents accept the signature.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        expires_in: Duration,
        /// Target OS (default: this machine's; `any` for scripts).
        #[arg(long, default_value = std::env::consts::OS)]
        os: String,
        /// Target CPU architecture (default: this machine's; `any` for scripts).
        #[arg(long, default_value = std::env::consts::ARCH)]
        arch: String,
        /// Permit agents to activate this build below their downgrade floor
        /// (when the call also asks for it).
        #[arg(long)]
        allow_downgrade: bool,
        file: PathBuf,
    },
    /// Check FILE against FILE.dsse.json and the given public keys.
    #[command(after_help = "Example:\n  reloadctl verify --pubkey release.pub ./web")]
    Verify {
        /// Trusted public key (SPKI PEM); repeat for several.
        #[arg(long = "pubkey", value_name = "PUB", required = true)]
        pubkeys: Vec<PathBuf>,
        /// Envelope to check (default: FILE.dsse.json).
        #[arg(long)]
        envelope: Option<PathBuf>,
        file: PathBuf,
    },
    /// Send FILE and its signature to an agent, unless it already has it.
    #[command(after_help = "Example:\n  reloadctl upload --host 127.0.0.1:7700 ./web")]
    Upload {
        /// Agent address, host[:port] (default port 7700).
        #[arg(long)]
        host: String,
        /// Envelope to send (default: FILE.dsse.json).
        #[arg(long)]
        envelope: Option<PathBuf>,
        file: PathBuf,
    },
    /// Replace a service's running process with VERSION, keeping its sockets.
    #[command(
        after_help = "Example:\n  reloadctl activate --host 127.0.0.1:7700 --service web --version 1.4 --artifact ./web\n  # uploads ./web if the agent lacks it, then activates it, showing each step"
    )]
    Activate {
        #[arg(long)]
        host: String,
        #[arg(long)]
        service: String,
        /// Version to activate; `1.4` means `1.4.0`.
        #[arg(long)]
        version: String,
        /// The signed file (with FILE.dsse.json beside it), uploaded if the
        /// agent does not hold VERSION yet.
        #[arg(long, value_name = "FILE")]
        artifact: Option<PathBuf>,
        /// Allow VERSION below the highest version the agent activated; it
        /// must then be one it ran before or one signed --allow-downgrade.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Activate the version a service ran before the current one.
    #[command(after_help = "Example:\n  reloadctl rollback --host 127.0.0.1:7700 --service web")]
    Rollback {
        /// One agent; or give a hosts file to roll back every host of it.
        #[arg(long, required_unless_present = "hosts_file")]
        host: Option<String>,
        #[arg(long)]
        service: String,
        /// Roll back every host of this file, in parallel.
        hosts_file: Option<PathBuf>,
    },
    /// Show every service of an agent: state, health, version, pid.
    #[command(after_help = "Example:\n  reloadctl status --host 127.0.0.1:7700")]
    Status {
        /// One agent; or give a hosts file for the whole fleet.
        #[arg(long, required_unless_present = "hosts_file")]
        host: Option<String>,
        /// Every host of this file (unreachable ones are shown, not fatal).
        hosts_file: Option<PathBuf>,
        /// Only this service.
        #[arg(long, default_value = "")]
        service: String,
        /// The agents themselves instead of their services: pid, the
        /// release each runs, and its last in-place upgrade.
        #[arg(long, conflicts_with = "service")]
        agents: bool,
        /// `table` for people, `json` (one object a line) for scripts.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Roll VERSION out to every host of HOSTS_FILE: staged, fenced, in
    /// waves, health-gated, halted and reverted on failure, resumable.
    #[command(
        after_help = "Example:\n  reloadctl push --version 1.4 hosts.txt\n  reloadctl push --version 1.4 --canary 1 --waves 1,25%,100% --max-failures 10% hosts.txt\n  reloadctl push --agent --version 0.2 hosts.txt   # upgrade the agents themselves\n\nThe service, the release files and the trusted keys come from reloadctl.toml\n(--config to point elsewhere). Exit codes: 0 done; 1 not started (lease held\nby another rollout, a host could not be staged, other errors); 2 usage or\nconfig error; 3 halted and reverted; 4 halted, not (fully) reverted; 5\npaused by Ctrl-C (continue with `reloadctl resume`)."
    )]
    Push {
        /// Version to roll out; `1.4` means `1.4.0`.
        #[arg(long)]
        version: String,
        /// One host[:port] a line; `#` comments.
        hosts_file: PathBuf,
        #[command(flatten)]
        rollout: RolloutFlags,
        /// Print the plan (waves, gate, budget) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Upgrade the agents themselves (in place: same pid, services
        /// untouched) to the agent release VERSION (`agent_artifact` in
        /// reloadctl.toml), gated on every service staying healthy.
        #[arg(long)]
        agent: bool,
    },
    /// Continue a rollout that was paused (Ctrl-C) or whose CLI died.
    #[command(
        after_help = "Example:\n  reloadctl resume            # the newest unfinished rollout\n  reloadctl resume 3f2a9c...  # a given one"
    )]
    Resume {
        /// Rollout id (default: the newest unfinished one).
        id: Option<String>,
        #[arg(long, default_value = rollout::project::DEFAULT_FILE)]
        config: PathBuf,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// Take the leases even from another rollout.
        #[arg(long)]
        force_takeover: bool,
    },
    /// Write a commented reloadctl.toml and a hosts.txt to start from.
    #[command(
        after_help = "Example:\n  reloadctl init --service web\n  reloadctl init --dir deploy/web --service web --force"
    )]
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value = "demo")]
        service: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  reloadctl completions bash > /etc/bash_completion.d/reloadctl\n  reloadctl completions zsh > ~/.zfunc/_reloadctl"
    )]
    Completions { shell: clap_complete::Shell },
    /// Make a development CA, an agent certificate and client certificates
    /// for mutual TLS.
    #[command(
        after_help = "Example:\n  reloadctl certs --out certs --agent-name 127.0.0.1 --agent-name localhost --client deployer --client monitor"
    )]
    Certs {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// DNS name or IP address the agent certificate is valid for; repeat.
        #[arg(long = "agent-name", required = true)]
        agent_names: Vec<String>,
        /// Client identity (the certificate's name); repeat.
        #[arg(long = "client", required = true)]
        clients: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// List the artifacts an agent holds, newest first.
    #[command(after_help = "Example:\n  reloadctl artifacts --host 127.0.0.1:7700 --service web")]
    Artifacts {
        #[arg(long)]
        host: String,
        /// Only this service.
        #[arg(long, default_value = "")]
        service: String,
        /// `table` for people, `json` (one object a line) for scripts.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let tls = client::TlsSettings {
        ca: cli.tls_ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
        server_name: cli.tls_server_name,
    };
    // Flags and environment first; push and resume fall back to the
    // project file's [tls].
    if tls.is_set() || cli.insecure {
        client::configure_transport(&tls, cli.insecure)?;
    }
    match cli.command {
        Command::Push {
            version,
            hosts_file,
            rollout: flags,
            dry_run,
            agent,
        } => runtime()?.block_on(rollout::push(rollout::PushArgs {
            agent,
            config: flags.config,
            version,
            hosts_file,
            overrides: flags.overrides,
            json: flags.output == "json",
            dry_run,
            force_takeover: flags.force_takeover,
        })),
        Command::Resume {
            id,
            config,
            output,
            force_takeover,
        } => runtime()?.block_on(rollout::resume(
            &config,
            id.as_deref(),
            output == "json",
            force_takeover,
        )),
        other => run_simple(other).map(|()| 0),
    }
}

fn run_simple(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Push { .. } | Command::Resume { .. } => unreachable!("handled in run"),
        Command::Init {
            dir,
            service,
            force,
        } => init::init(&dir, &service, force),
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
        Command::Rollback {
            host,
            service,
            hosts_file,
        } => runtime()?.block_on(reload::rollback_fleet(host, hosts_file, &service)),
        Command::Status {
            host,
            hosts_file,
            agents: true,
            output,
            ..
        } => runtime()?.block_on(reload::status_agents(host, hosts_file, &output)),
        Command::Status {
            host,
            hosts_file,
            service,
            output,
            agents: false,
        } => runtime()?.block_on(reload::status_fleet(host, hosts_file, &service, &output)),
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
