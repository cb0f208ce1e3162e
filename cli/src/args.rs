//! The command line as clap sees it: every subcommand, flag and help text
//! of `reloadctl`. `main.rs` dispatches on [`Command`]; the `push` settings
//! flags are [`crate::rollout::RolloutOverrides`], declared with the
//! settings they override.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::rollout;

/// `push` settings; unset ones come from the project file.
#[derive(clap::Args)]
pub struct RolloutFlags {
    #[command(flatten)]
    pub overrides: rollout::RolloutOverrides,
    /// Take the leases even from another rollout (written to the agents' logs).
    #[arg(long)]
    pub force_takeover: bool,
    /// `text` for people (stderr), `json` (one event per line, stdout) for pipelines.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// Which agents a command acts on: one `--host`, or the hosts of a file,
/// optionally narrowed by `--limit`.
#[derive(clap::Args, Clone, Debug)]
pub struct HostsArgs {
    /// One agent, host[:port] (default port 7700); or give a hosts file.
    #[arg(
        long,
        required_unless_present = "hosts_file",
        conflicts_with = "hosts_file"
    )]
    pub host: Option<String>,
    /// One host[:port] a line, `#` comments: every host of it, in parallel
    /// (unreachable ones are reported, not fatal).
    pub hosts_file: Option<PathBuf>,
    /// Only these hosts of the file: a comma-separated list of hosts
    /// (without a port: any port of that host) or globs with `*` and `?`,
    /// e.g. --limit 'web-1,web-2' or --limit 'web-*'. Each entry must match.
    #[arg(long, requires = "hosts_file", value_name = "HOSTS")]
    pub limit: Option<String>,
}

#[derive(Parser)]
#[command(version, about = "Sign artifacts and roll them out to reload agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Project file: the service, its releases, trusted keys, rollout
    /// defaults and the [tls] every command uses to reach the agents (paths
    /// in it are relative to its folder). Default: reloadctl.toml in the
    /// current folder, if there is one.
    #[arg(long, global = true, env = "RELOADCTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// CA that signed the agents' certificates (mutual TLS).
    #[arg(long, global = true, env = "RELOADCTL_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate: its identity for the agents' [rights].
    #[arg(long, global = true, env = "RELOADCTL_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "RELOADCTL_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Name the agents' certificates carry, when not the dialled host.
    #[arg(long, global = true, env = "RELOADCTL_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Talk plaintext to non-loopback agents (agents with `insecure = true`).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Diagnostic log lines on stderr (filter with RUST_LOG, default warn);
    /// they never mix with --output json on stdout.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

#[derive(Subcommand)]
pub enum Command {
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
    #[command(
        after_help = "Example:\n  reloadctl rollback --host 127.0.0.1:7700 --service web\n  reloadctl rollback hosts.txt --limit 'web-*' --service web"
    )]
    Rollback {
        #[command(flatten)]
        hosts: HostsArgs,
        #[arg(long)]
        service: String,
    },
    /// Stop a service: drain its process and keep it stopped (across agent
    /// restarts too) until the next activate or rollback. Stopping the
    /// agent does not stop its services; this does.
    #[command(after_help = "Example:\n  reloadctl stop --host 127.0.0.1:7700 --service web")]
    Stop {
        #[command(flatten)]
        hosts: HostsArgs,
        #[arg(long)]
        service: String,
    },
    /// Show a service's recent output (stdout and stderr of its processes),
    /// as the agent kept it, across agent restarts too; --follow for new
    /// lines as they come.
    #[command(
        after_help = "Example:\n  reloadctl logs --host 127.0.0.1:7700 --service web\n  reloadctl logs --host 127.0.0.1:7700 --service web --lines 20 --follow\n\nNeeds the read right; the agent audits who read a service's output."
    )]
    Logs {
        /// Agent address, host[:port] (default port 7700).
        #[arg(long)]
        host: String,
        #[arg(long)]
        service: String,
        /// How many of the most recent lines; 0 for all the agent kept.
        #[arg(long, default_value_t = 100)]
        lines: u32,
        /// Then print new lines as they come, until Ctrl-C.
        #[arg(long, short = 'f')]
        follow: bool,
        /// `text` for people, `json` (one object a line) for scripts.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Show every service of an agent: state, health, version, pid.
    #[command(
        after_help = "Example:\n  reloadctl status --host 127.0.0.1:7700\n  reloadctl status hosts.txt --limit 'web-1,web-2'"
    )]
    Status {
        #[command(flatten)]
        hosts: HostsArgs,
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
        after_help = "Example:\n  reloadctl push --version 1.4 hosts.txt\n  reloadctl push --version 1.4 --canary 1 --waves 1,25%,100% --max-failures 10% hosts.txt\n  reloadctl push --agent --version 0.2 hosts.txt   # upgrade the agents themselves\n  reloadctl push --version 1.4 --limit 'web-1,web-2' hosts.txt   # only those hosts\n\nThe service, the release files and the trusted keys come from reloadctl.toml\n(--config to point elsewhere). Exit codes: 0 done; 1 not started (lease held\nby another rollout, a host could not be staged before the first wave, other errors); 2 usage or\nconfig error; 3 halted, and every host it changed was reverted (the summary\nlists reverted, left and never-changed hosts); 4 halted, not (fully)\nreverted; 5 paused by Ctrl-C (continue with `reloadctl resume`); 6\nsuperseded: a later rollout took a host over, this one stopped and reverted\nnothing."
    )]
    Push {
        /// Version to roll out; `1.4` means `1.4.0`.
        #[arg(long)]
        version: String,
        /// One host[:port] a line; `#` comments.
        hosts_file: PathBuf,
        /// Only these hosts of the file: a comma-separated list of hosts
        /// (without a port: any port of that host) or globs with `*` and
        /// `?`, e.g. --limit 'web-1,web-2' or --limit 'web-*'. Each entry
        /// must match a host. The rollout (waves, budget, journal) is over
        /// these hosts only.
        #[arg(long, value_name = "HOSTS")]
        limit: Option<String>,
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
        /// Allow VERSION to be below the highest version a host ever ran
        /// (its downgrade floor). Journaled, and written to every agent's
        /// audit log. The agent still requires a version it ran before or
        /// one signed with downgrade permission.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Continue a rollout that was paused (Ctrl-C) or whose CLI died.
    #[command(
        after_help = "Example:\n  reloadctl resume            # the newest unfinished rollout\n  reloadctl resume 3f2a9c...  # a given one\n\nA rollout superseded meanwhile (a host granted a later rollout a higher\nfencing token, or a host it finished runs something else now) is refused\nbefore anything changes, with exit code 6. Other exit codes as for push."
    )]
    Resume {
        /// Rollout id (default: the newest unfinished one).
        id: Option<String>,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// Take the leases even from another rollout.
        #[arg(long)]
        force_takeover: bool,
    },
    /// List this project's rollouts, newest first, or show one (`show ID`):
    /// past, paused, interrupted and running ones, read from their journals.
    #[command(
        after_help = "Example:\n  reloadctl rollouts                   # ID, service, version, state, hosts done, started, by whom\n  reloadctl rollouts show 3f2a9c...    # the plan, each run, each host, the outcome\n  reloadctl rollouts --output json     # one object a line\n\nStates: running (a live reloadctl holds it), paused (Ctrl-C), done,\nhalted-reverted, halted-partial, not-started, interrupted-unfinished (its\nprocess ended without finishing). Paused and interrupted rollouts that did\nnot halt continue with `reloadctl resume ID`. Reading never takes a journal's lock, so a\nrunning rollout is shown as it goes. Exit codes: 0; 1 a journal could not\nbe read (the others are listed); 2 usage or config error, or no such ID."
    )]
    Rollouts {
        #[command(subcommand)]
        show: Option<RolloutsCommand>,
        /// `text` for people, `json` (one object a line) for scripts.
        #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Write a commented reloadctl.toml and a hosts.txt to start from.
    #[command(
        after_help = "Example:\n  reloadctl init --service web\n  reloadctl init --dir deploy/web --service web --force\n  reloadctl init --service web --recipe gunicorn-sync"
    )]
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value = "demo")]
        service: String,
        /// Also write SERVICE.service.toml: the agent's [[service]] section
        /// for this program, tested as docs/recipes/README.md shows.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::init::RECIPES.iter().map(|(name, _)| *name)))]
        recipe: Option<String>,
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

/// `reloadctl rollouts` subcommands.
#[derive(Subcommand)]
pub enum RolloutsCommand {
    /// One rollout: its plan, each run (generation, holder, time), each
    /// host's final state with its cause, halts and pauses, the outcome.
    #[command(
        after_help = "Example:\n  reloadctl rollouts show 3f2a9c0d1e2b4a5f\n  reloadctl rollouts show 3f2a9c0d1e2b4a5f --output json"
    )]
    Show {
        /// Rollout id, as `reloadctl rollouts` lists it.
        id: String,
    },
}

impl Command {
    /// Commands that connect to agents: they read the connection settings
    /// (flags, environment, the project file's [tls]) before they run.
    pub fn talks_to_agents(&self) -> bool {
        match self {
            Command::Keygen { .. }
            | Command::Sign { .. }
            | Command::Verify { .. }
            | Command::Rollouts { .. }
            | Command::Init { .. }
            | Command::Completions { .. }
            | Command::Certs { .. } => false,
            Command::Upload { .. }
            | Command::Activate { .. }
            | Command::Rollback { .. }
            | Command::Stop { .. }
            | Command::Status { .. }
            | Command::Push { .. }
            | Command::Resume { .. }
            | Command::Artifacts { .. }
            | Command::Logs { .. } => true,
        }
    }
}
