//! The agent's TOML config: what it listens on, which keys it trusts, where
//! it stores artifacts and the limits that keep a client from exhausting it.
//!
//! Relative paths are resolved against the config file's own folder, so a
//! config and its keys can be moved together. Every setting but the trusted
//! keys has a default that works on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytesize::ByteSize;
use reload_artifact::{PublicKey, TrustedKeys};
use serde::Deserialize;

mod service;
use service::{check_service, ServiceSection};
pub use service::{
    DrainPlan, HealthProbe, ListenerConfig, ListenerKind, Probation, Readiness, ServiceConfig,
    PROBE_LISTENER,
};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default, rename = "service")]
    services: Vec<ServiceSection>,
    tls: Option<TlsSection>,
    #[serde(default)]
    rights: RightsSection,
    #[serde(default)]
    audit: AuditSection,
    #[serde(default)]
    fetch: FetchSection,
}

/// `[fetch]`: where FetchArtifact may fetch from. Off until configured: a
/// deploy identity must not be able to make the agent open any URL of its
/// network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FetchSection {
    /// URL prefixes (`https://artifacts.example.com/releases/`); a fetch's
    /// URL must start with one.
    allow: Vec<String>,
    /// PEM CA certificates an https repository's certificate must chain to,
    /// instead of the host's own trusted roots.
    ca: Option<PathBuf>,
    /// FetchArtifact may name peer agents to fetch from (ReadArtifact over
    /// mutual TLS, with this agent's `[tls]` certificate as its client
    /// identity, peers checked against `[tls] ca`).
    peers: bool,
    /// A client certificate for peer fetches other than `[tls] cert` (a
    /// PKI whose agent certificates are for servers only).
    peer_cert: Option<PathBuf>,
    /// Its key (mode 0600).
    peer_key: Option<PathBuf>,
}

/// The checked `[fetch]` settings.
#[derive(Debug, Clone, Default)]
pub struct FetchConfig {
    pub allow: Vec<String>,
    /// PEM bytes of `[fetch] ca`, read at start.
    pub ca: Option<Vec<u8>>,
    /// `[fetch] peers = true`: how this agent calls its peers.
    pub peers: Option<PeerFetch>,
}

/// How FetchArtifact reaches peer agents: with mutual TLS when the agent
/// has `[tls]`, or in plaintext to loopback addresses only when it runs
/// `insecure` (as its own API does).
#[derive(Debug, Clone)]
pub struct PeerFetch {
    /// The CA peers' certificates chain to, and this agent's client
    /// certificate and key; `None` for an insecure agent.
    pub tls: Option<TlsFiles>,
}

/// Mutual TLS for the gRPC API: clients must present a certificate that
/// chains to `ca`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Client identities (certificate common name, or a DNS/URI name in its
/// subject alternative names) and what they may do.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RightsSection {
    /// Upload, activate, roll back, take leases (and everything `read` may).
    pub deploy: Vec<String>,
    /// Status, lists, health, events.
    pub read: Vec<String>,
    /// ReadArtifact only: peer agents fetching a release from this one.
    pub fetch: Vec<String>,
}

impl RightsSection {
    /// A client certificate carrying one of `names` may read (status,
    /// health, metrics): it has the read or the deploy right.
    pub fn may_read(&self, names: &[String]) -> bool {
        names
            .iter()
            .any(|n| self.read.contains(n) || self.deploy.contains(n))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AuditSection {
    /// JSON lines, one per mutating call; default `<state_dir>/audit.log`.
    path: Option<PathBuf>,
    /// Rotated to `.1` past this size.
    max_size: ByteSize,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            path: None,
            max_size: ByteSize::mib(64),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AgentSection {
    /// gRPC addresses.
    listen: Vec<SocketAddr>,
    store_dir: PathBuf,
    /// SPKI PEM files of the keys whose signatures are accepted.
    trusted_keys: Vec<PathBuf>,
    keep_versions: usize,
    /// Key ids (see `reloadctl keygen`) whose signatures never count.
    revoked_keys: Vec<String>,
    /// Per service, how many distinct trusted keys must sign (default 1).
    signature_thresholds: std::collections::BTreeMap<String, usize>,
    /// How far a signer's clock may be ahead before a manifest counts as
    /// expired here.
    #[serde(with = "humantime_serde")]
    clock_skew: Duration,
    /// Persisted versions and per-spawn notify sockets.
    state_dir: PathBuf,
    /// HTTP address of `/healthz` for load balancers and the CLI.
    health_listen: Option<SocketAddr>,
    /// Services whose `/healthz/<service>` a client without a certificate
    /// may read (load balancers that cannot present one); empty by
    /// default: with [tls], every request needs a certificate.
    anonymous_health: Vec<String>,
    /// Plaintext gRPC without client authentication: only on loopback,
    /// for development, and said loudly at start.
    insecure: bool,
    /// Stop every service when the agent stops (SIGTERM, `systemctl
    /// stop`). Off by default: the agent is a control plane, and services
    /// run on under their shims while it is down or restarting; stopping a
    /// service is an explicit act (`reloadctl stop`).
    stop_services_on_exit: bool,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7700))],
            store_dir: PathBuf::from("store"),
            state_dir: PathBuf::from("state"),
            health_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7701))),
            anonymous_health: Vec::new(),
            insecure: false,
            stop_services_on_exit: false,
            trusted_keys: Vec::new(),
            keep_versions: 3,
            revoked_keys: Vec::new(),
            signature_thresholds: Default::default(),
            clock_skew: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    max_artifact_size: ByteSize,
    max_chunk_size: ByteSize,
    max_concurrent_uploads: usize,
    /// An upload that sends nothing for this long is cut off.
    #[serde(with = "humantime_serde")]
    upload_idle_timeout: Duration,
    /// An upload that takes longer than this in all is cut off.
    #[serde(with = "humantime_serde")]
    upload_max_duration: Duration,
    /// An upload is refused unless this much stays free on the store's disk
    /// after it.
    min_free_space: ByteSize,
    /// Calls per second per client identity (a token bucket of twice this).
    requests_per_second: u32,
    /// From accept to a finished TLS handshake and, on the gRPC port, the
    /// HTTP/2 preface: a connection that takes longer is closed.
    #[serde(with = "humantime_serde")]
    handshake_timeout: Duration,
    /// A gRPC connection with no call open for this long is closed.
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    /// ReadArtifact streams served to peer agents at once.
    max_concurrent_peer_reads: usize,
    /// Open connections per client address (IPv6: per /64), on each port.
    max_connections_per_peer: usize,
    /// Open connections in all, on each port.
    max_connections: usize,
    /// The agent pings a gRPC client this often when the connection is quiet...
    #[serde(with = "humantime_serde")]
    keepalive_interval: Duration,
    /// ...and closes the connection if the answer takes longer than this.
    #[serde(with = "humantime_serde")]
    keepalive_timeout: Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_artifact_size: ByteSize::gib(1),
            max_chunk_size: ByteSize::mib(1),
            max_concurrent_uploads: 4,
            upload_idle_timeout: Duration::from_secs(30),
            upload_max_duration: Duration::from_secs(30 * 60),
            min_free_space: ByteSize::mib(64),
            requests_per_second: 100,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5 * 60),
            max_concurrent_peer_reads: 8,
            max_connections_per_peer: 64,
            max_connections: 4096,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// A private key readable or writable by others is refused: whoever can
/// read it can impersonate the agent.
fn refuse_exposed_secret(path: &Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("{what}: cannot read {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{what} {} is accessible by group or others (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        );
    }
    Ok(())
}

/// TLS material, read at load time.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles { .. }")
    }
}

/// The checked, resolved config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// None only with `insecure = true` (loopback only).
    pub tls: Option<TlsFiles>,
    pub rights: RightsSection,
    pub audit_path: PathBuf,
    pub audit_max_bytes: u64,
    pub listen: Vec<SocketAddr>,
    pub store_dir: PathBuf,
    pub state_dir: PathBuf,
    pub health_listen: Option<SocketAddr>,
    /// See `[agent] anonymous_health`; checked to name configured services.
    pub anonymous_health: Vec<String>,
    pub services: Vec<ServiceConfig>,
    pub trusted_keys: TrustedKeys,
    pub keep_versions: usize,
    /// See `[agent] stop_services_on_exit`.
    pub stop_services_on_exit: bool,
    pub limits: Limits,
    /// `[fetch]`: FetchArtifact's allowed repositories.
    pub fetch: FetchConfig,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_artifact_bytes: u64,
    pub max_chunk_bytes: u64,
    pub max_concurrent_uploads: usize,
    pub max_concurrent_peer_reads: usize,
    pub upload_idle_timeout: Duration,
    pub upload_max_duration: Duration,
    pub min_free_bytes: u64,
    pub requests_per_second: u32,
    pub connections: ConnectionLimits,
}

/// What a connection to the gRPC or the health port may hold (see
/// `crate::connections`); every field is above zero.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_per_peer: usize,
    pub max_total: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agent config {}", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Absolute paths from here on: services get some of them
        // (NOTIFY_SOCKET) and may change their working directory.
        let base = std::fs::canonicalize(base)
            .with_context(|| format!("cannot resolve the folder of {}", path.display()))?;
        AgentConfig::parse(&text, &base)
            .with_context(|| format!("agent config {} is not valid", path.display()))
    }

    /// Parses config text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<AgentConfig> {
        let file: ConfigFile = toml::from_str(text)?;
        let agent = file.agent;
        let limits = file.limits;
        if agent.listen.is_empty() {
            bail!("[agent] listen is empty: give at least one address, e.g. listen = [\"127.0.0.1:7700\"]");
        }
        if agent.trusted_keys.is_empty() {
            bail!("[agent] trusted_keys is empty: the agent would refuse every artifact; list the public key files (from `reloadctl keygen`), e.g. trusted_keys = [\"release.pub\"]");
        }
        if agent.keep_versions == 0 {
            bail!("[agent] keep_versions must be at least 1");
        }
        let mut keys = Vec::new();
        for path in &agent.trusted_keys {
            let key = PublicKey::load(&base.join(path))
                .with_context(|| format!("[agent] trusted_keys entry {}", path.display()))?;
            keys.push(key);
        }
        for id in &agent.revoked_keys {
            if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("[agent] revoked_keys: {id:?} is not a key id (64 hex digits, as `reloadctl keygen` prints)");
            }
        }
        let usable = keys
            .iter()
            .filter(|k| !agent.revoked_keys.iter().any(|r| r == k.id()))
            .count();
        for (service, need) in &agent.signature_thresholds {
            if *need == 0 || *need > usable {
                bail!("[agent] signature_thresholds: {service} = {need} cannot be met by the {usable} trusted, unrevoked key(s)");
            }
        }
        let mut trusted_keys =
            TrustedKeys::new(keys, agent.clock_skew).with_revoked(agent.revoked_keys.clone());
        for (service, need) in &agent.signature_thresholds {
            trusted_keys = trusted_keys.with_threshold(service, *need);
        }
        let max_chunk_bytes = limits.max_chunk_size.as_u64();
        if !(1024..=16 * 1024 * 1024).contains(&max_chunk_bytes) {
            bail!(
                "[limits] max_chunk_size must be between 1 KiB and 16 MiB, not {}",
                limits.max_chunk_size
            );
        }
        if limits.max_concurrent_uploads == 0 || limits.max_concurrent_peer_reads == 0 {
            bail!(
                "[limits] max_concurrent_uploads and max_concurrent_peer_reads must be at least 1"
            );
        }
        if limits.upload_idle_timeout.is_zero() || limits.upload_max_duration.is_zero() {
            bail!("[limits] upload_idle_timeout and upload_max_duration must be above zero");
        }
        if limits.requests_per_second == 0 {
            bail!("[limits] requests_per_second must be at least 1");
        }
        for (name, value) in [
            ("handshake_timeout", limits.handshake_timeout),
            ("idle_timeout", limits.idle_timeout),
            ("keepalive_interval", limits.keepalive_interval),
            ("keepalive_timeout", limits.keepalive_timeout),
        ] {
            if value.is_zero() {
                bail!("[limits] {name} must be above zero");
            }
        }
        if limits.max_connections_per_peer == 0 || limits.max_connections == 0 {
            bail!("[limits] max_connections_per_peer and max_connections must be at least 1");
        }
        let mut services = Vec::new();
        for section in file.services {
            let service = check_service(section, base)?;
            if services
                .iter()
                .any(|s: &ServiceConfig| s.name == service.name)
            {
                bail!("two [[service]] entries are named {:?}", service.name);
            }
            services.push(service);
        }
        let tls = match (file.tls, agent.insecure) {
            (Some(_), true) => bail!("[tls] and insecure = true contradict each other: remove one"),
            (None, false) => bail!(
                "no [tls] section: the agent accepts only clients with a certificate from its CA. Add [tls] ca/cert/key (`reloadctl certs` makes a development set), or set insecure = true under [agent] for plaintext on loopback during development"
            ),
            (None, true) => {
                let exposed: Vec<String> = agent
                    .listen
                    .iter()
                    .chain(agent.health_listen.iter())
                    .filter(|a| !a.ip().is_loopback())
                    .map(|a| a.to_string())
                    .collect();
                if !exposed.is_empty() {
                    bail!("insecure = true is for loopback only, but the agent would listen on {}; configure [tls] to listen there", exposed.join(", "));
                }
                None
            }
            (Some(tls), false) => {
                let read = |path: &Path, what: &str| {
                    let full = base.join(path);
                    std::fs::read(&full).with_context(|| format!("[tls] {what}: cannot read {}", full.display()))
                };
                let key_path = base.join(&tls.key);
                refuse_exposed_secret(&key_path, "[tls] key")?;
                Some(TlsFiles {
                    ca: read(&tls.ca, "ca")?,
                    cert: read(&tls.cert, "cert")?,
                    key: read(&tls.key, "key")?,
                })
            }
        };
        let state_dir = base.join(&agent.state_dir);
        check_socket_paths_fit(&state_dir, &services)?;
        let fetch = check_fetch(file.fetch, base, tls.as_ref())?;
        for name in &agent.anonymous_health {
            if !services.iter().any(|service| &service.name == name) {
                bail!("[agent] anonymous_health names {name:?}, which is not a [[service]] here: list only configured services");
            }
        }
        if !agent.anonymous_health.is_empty() && agent.health_listen.is_none() {
            bail!("[agent] anonymous_health is set but health_listen is off: set health_listen, or remove anonymous_health");
        }
        Ok(AgentConfig {
            tls,
            rights: file.rights,
            audit_path: file
                .audit
                .path
                .map(|p| base.join(p))
                .unwrap_or_else(|| state_dir.join("audit.log")),
            audit_max_bytes: file.audit.max_size.as_u64().max(4096),
            listen: agent.listen,
            store_dir: base.join(agent.store_dir),
            state_dir,
            health_listen: agent.health_listen,
            anonymous_health: agent.anonymous_health,
            services,
            trusted_keys,
            keep_versions: agent.keep_versions,
            stop_services_on_exit: agent.stop_services_on_exit,
            limits: Limits {
                max_artifact_bytes: limits.max_artifact_size.as_u64(),
                max_chunk_bytes,
                max_concurrent_uploads: limits.max_concurrent_uploads,
                max_concurrent_peer_reads: limits.max_concurrent_peer_reads,
                upload_idle_timeout: limits.upload_idle_timeout,
                upload_max_duration: limits.upload_max_duration,
                min_free_bytes: limits.min_free_space.as_u64(),
                requests_per_second: limits.requests_per_second,
                connections: ConnectionLimits {
                    handshake_timeout: limits.handshake_timeout,
                    idle_timeout: limits.idle_timeout,
                    max_per_peer: limits.max_connections_per_peer,
                    max_total: limits.max_connections,
                    keepalive_interval: limits.keepalive_interval,
                    keepalive_timeout: limits.keepalive_timeout,
                },
            },
            fetch,
        })
    }
}

/// `[fetch]` checked: each prefix an http(s) URL with a host and a path
/// (so `https://a.example` cannot be passed by `https://a.example.evil`),
/// the CA file read now.
fn check_fetch(
    fetch: FetchSection,
    base: &Path,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<FetchConfig> {
    for prefix in &fetch.allow {
        let rest = prefix
            .strip_prefix("https://")
            .or_else(|| prefix.strip_prefix("http://"));
        let ok = rest.is_some_and(|rest| rest.find('/').is_some_and(|slash| slash > 0));
        if !ok {
            bail!("[fetch] allow: {prefix:?} is not an http:// or https:// URL prefix ending its host with a slash (e.g. \"https://artifacts.example.com/\")");
        }
    }
    let ca = match fetch.ca {
        Some(path) => {
            let path = base.join(path);
            Some(
                std::fs::read(&path)
                    .with_context(|| format!("[fetch] ca: cannot read {}", path.display()))?,
            )
        }
        None => None,
    };
    let peers = match (fetch.peers, fetch.peer_cert, fetch.peer_key) {
        (false, None, None) => None,
        (false, _, _) => {
            bail!("[fetch] peer_cert and peer_key are set but peers is not: set peers = true, or remove them")
        }
        (true, Some(cert), Some(key)) => {
            let Some(tls) = tls else {
                bail!("[fetch] peer_cert is for an agent with [tls]; an insecure agent fetches from loopback peers in plaintext: remove peer_cert and peer_key");
            };
            let (cert, key) = (base.join(cert), base.join(key));
            refuse_exposed_secret(&key, "[fetch] peer_key")?;
            let read = |path: &Path, what: &str| {
                std::fs::read(path)
                    .with_context(|| format!("[fetch] {what}: cannot read {}", path.display()))
            };
            Some(PeerFetch {
                tls: Some(TlsFiles {
                    ca: tls.ca.clone(),
                    cert: read(&cert, "peer_cert")?,
                    key: read(&key, "peer_key")?,
                }),
            })
        }
        (true, None, None) => Some(PeerFetch { tls: tls.cloned() }),
        (true, _, _) => bail!("[fetch] peer_cert and peer_key go together: set both, or neither to use [tls] cert and key"),
    };
    Ok(FetchConfig {
        allow: fetch.allow,
        ca,
        peers,
    })
}

/// The longest Unix socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Every service gets Unix sockets under `<state_dir>/run` named after it
/// (`<service>-<start ms>-<spawn n>.notify`, and `.shim`): a name that
/// makes them too long would pass every other check and then never start.
/// Refused here, with what to change.
fn check_socket_paths_fit(state_dir: &Path, services: &[ServiceConfig]) -> anyhow::Result<()> {
    let absolute = if state_dir.is_absolute() {
        state_dir.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(state_dir)
    };
    let run_dir = absolute.join("run");
    // "-" + 13 digits of milliseconds + "-" + up to 10 digits + ".notify".
    const SUFFIX: usize = 1 + 13 + 1 + 10 + ".notify".len();
    for service in services {
        let length = run_dir.as_os_str().len() + 1 + service.name.len() + SUFFIX;
        if length > MAX_SOCKET_PATH {
            bail!(
                "[[service]] {:?}: its sockets under {} would be up to {length} bytes long, above the {MAX_SOCKET_PATH} a Unix socket path may have; shorten the service name (by {} characters) or set [agent] state_dir to a shorter path",
                service.name,
                run_dir.display(),
                length - MAX_SOCKET_PATH
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(dir: &Path) {
        let key = reload_artifact::SigningKey::generate();
        std::fs::write(dir.join("release.pub"), key.public().to_pem()).unwrap();
    }

    /// A name that makes the service's Unix socket paths too long passed
    /// `--check` and then could never start with notify readiness.
    #[test]
    fn a_service_name_whose_sockets_would_not_fit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let config = |name: &str| {
            format!(
                "[agent]\ninsecure = true\ntrusted_keys = [\"release.pub\"]\nstate_dir = \"{}\"\n[[service]]\nname = \"{name}\"\n",
                "s".repeat(20)
            )
        };
        let fits = "w".repeat(10);
        AgentConfig::parse(&config(&fits), dir.path()).unwrap();
        let long = "w".repeat(64);
        let err = AgentConfig::parse(&config(&long), dir.path()).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("shorten the service name") && text.contains(&long),
            "{text}"
        );
    }

    #[test]
    fn minimal_config_gets_loopback_defaults() {
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let config = AgentConfig::parse(
            "[agent]\ninsecure = true\ntrusted_keys = [\"release.pub\"]\n",
            dir.path(),
        )
        .unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:7700".parse().unwrap()]);
        assert_eq!(config.store_dir, dir.path().join("store"));
        assert_eq!(config.limits.max_chunk_bytes, 1024 * 1024);
        let connections = &config.limits.connections;
        assert_eq!(connections.handshake_timeout, Duration::from_secs(5));
        assert_eq!(
            (connections.max_per_peer, connections.max_total),
            (64, 4096)
        );
        assert_eq!(config.trusted_keys.ids().len(), 1);
    }

    #[test]
    fn services_parse_with_defaults_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let text = r#"
[agent]
insecure = true
trusted_keys = ["release.pub"]

[[service]]
name = "web"
args = ["--listen-name", "http"]
env = { GREETING = "hi" }
[[service.listener]]
name = "http"
tcp = "127.0.0.1:8080"
[[service.listener]]
name = "admin"
unix = "admin.sock"
[service.health]
kind = "http"
path = "/healthz"
[service.drain]
signal = "SIGQUIT"
timeout = "5s"
"#;
        let config = AgentConfig::parse(text, dir.path()).unwrap();
        let web = &config.services[0];
        assert_eq!(web.readiness, Readiness::Notify);
        assert_eq!(web.preflight_args, vec!["--version".to_string()]);
        assert_eq!(web.drain.signal, nix::sys::signal::Signal::SIGQUIT);
        assert_eq!(web.drain.pre, None);
        assert_eq!(
            web.tcp_address(None),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            web.listeners[1].unix.as_deref(),
            Some(dir.path().join("admin.sock").as_path())
        );

        let bad = text.replace("SIGQUIT", "SIGNOPE");
        let err = AgentConfig::parse(&bad, dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("SIGNOPE"), "{err:#}");
        let bad = text.replace("tcp = \"127.0.0.1:8080\"", "");
        let err = AgentConfig::parse(&bad, dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("exactly one of"), "{err:#}");
        let bad = text.replace("name = \"web\"", "name = \"reload-agent\"");
        let err = AgentConfig::parse(&bad, dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("reserved"), "{err:#}");
    }

    #[test]
    fn plaintext_is_loopback_only_and_explicit() {
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let err = AgentConfig::parse("[agent]\ntrusted_keys = [\"release.pub\"]\n", dir.path())
            .unwrap_err();
        assert!(format!("{err:#}").contains("no [tls] section"), "{err:#}");
        let err = AgentConfig::parse(
            "[agent]\ninsecure = true\nlisten = [\"0.0.0.0:7700\"]\ntrusted_keys = [\"release.pub\"]\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("loopback only"), "{err:#}");
        // A TLS key readable by others is refused.
        for (name, text) in [("ca.pem", "x"), ("agent.pem", "x"), ("agent.key", "x")] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("agent.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let tls = "[agent]\ntrusted_keys = [\"release.pub\"]\n[tls]\nca = \"ca.pem\"\ncert = \"agent.pem\"\nkey = \"agent.key\"\n";
        let err = AgentConfig::parse(tls, dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
        std::fs::set_permissions(
            dir.path().join("agent.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(AgentConfig::parse(tls, dir.path()).unwrap().tls.is_some());
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let err = AgentConfig::parse("[agent]\n", dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("trusted_keys is empty"),
            "{err:#}"
        );
        let err = AgentConfig::parse("[agent]\nlisen = []\n", dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
        let err = AgentConfig::parse(
            "[agent]\ninsecure = true\ntrusted_keys = [\"missing.pub\"]\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("missing.pub"), "{err:#}");
        let err = AgentConfig::parse(
            "[agent]\ninsecure = true\ntrusted_keys = [\"release.pub\"]\n[limits]\nmax_chunk_size = \"64 MiB\"\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("max_chunk_size"), "{err:#}");
        let err = AgentConfig::parse(
            "[agent]\ninsecure = true\ntrusted_keys = [\"release.pub\"]\n[limits]\nhandshake_timeout = \"0s\"\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("handshake_timeout"), "{err:#}");
    }

    #[test]
    fn a_pre_drain_signal_comes_with_its_wait() {
        use nix::sys::signal::Signal;
        let dir = tempfile::tempdir().unwrap();
        with_key(dir.path());
        let config = |drain: &str| {
            AgentConfig::parse(
                &format!("[agent]\ninsecure = true\ntrusted_keys = [\"release.pub\"]\n[[service]]\nname = \"web\"\n[service.drain]\n{drain}"),
                dir.path(),
            )
        };
        let web = config("pre_signal = \"SIGUSR1\"\npre_wait = \"1s\"\ntimeout = \"10s\"\n")
            .unwrap()
            .services
            .remove(0);
        assert_eq!(
            web.drain,
            DrainPlan {
                pre: Some((Signal::SIGUSR1, Duration::from_secs(1))),
                signal: Signal::SIGTERM,
                timeout: Duration::from_secs(10),
            }
        );
        assert_eq!(web.drain.bound(), Duration::from_secs(11));
        assert_eq!(web.drain.describe(), "SIGUSR1, 1s later SIGTERM");
        for (drain, named) in [
            ("pre_signal = \"SIGUSR1\"\n", "pre_wait"),
            ("pre_wait = \"1s\"\n", "pre_signal"),
            ("pre_signal = \"USR9\"\npre_wait = \"1s\"\n", "USR9"),
        ] {
            let err = config(drain).unwrap_err();
            assert!(format!("{err:#}").contains(named), "{drain}: {err:#}");
        }
    }
}
