//! `[[service]]`: one managed program as written in the config, and as
//! checked and resolved ([`ServiceConfig`]): its listeners, readiness,
//! health probe, preflight, drain and restart settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The name of the per-process private health listener.
pub const PROBE_LISTENER: &str = "probe";

/// One `[[service]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    name: String,
    #[serde(default, rename = "listener")]
    listeners: Vec<ListenerConfig>,
    /// Arguments given to the artifact (argv[1..]).
    #[serde(default)]
    args: Vec<String>,
    /// Environment of the service, on top of PATH (nothing else of the
    /// agent's environment is passed on).
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
    #[serde(default)]
    readiness: ReadinessConfig,
    #[serde(default)]
    health: HealthConfig,
    #[serde(default)]
    preflight: PreflightConfig,
    #[serde(default)]
    drain: DrainConfig,
    #[serde(default)]
    restart: RestartConfig,
    #[serde(default)]
    probation: ProbationConfig,
}

/// `[service.probation]`: after READY, the new process must stay alive and
/// pass its health check for `healthy_for` (and `healthy_checks` checks in
/// a row) before the activation counts; the old process serves beside it
/// until then, and is what stays if the new one fails. `healthy_for = "0s"`
/// turns it off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProbationConfig {
    #[serde(with = "humantime_serde")]
    healthy_for: Duration,
    healthy_checks: u32,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    /// After probation: this many crashes within `crash_window` revert the
    /// release to the previous one (0: never; a crash now and then is
    /// just restarted).
    crash_loop: u32,
    #[serde(with = "humantime_serde")]
    crash_window: Duration,
}

impl Default for ProbationConfig {
    fn default() -> Self {
        ProbationConfig {
            healthy_for: Duration::from_secs(2),
            healthy_checks: 2,
            interval: Duration::from_millis(200),
            crash_loop: 3,
            crash_window: Duration::from_secs(60),
        }
    }
}

/// The checked probation settings (see `[service.probation]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probation {
    pub healthy_for: Duration,
    pub healthy_checks: u32,
    pub interval: Duration,
    /// Crashes within `crash_window` that revert to the previous release.
    pub crash_loop: u32,
    pub crash_window: Duration,
}

/// A socket the agent binds once and hands to every process of a service,
/// as fd 3, 4, ... in this order (systemd's LISTEN_FDS protocol).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Passed in LISTEN_FDNAMES; the program takes its sockets by name.
    pub name: String,
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub udp: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    Unix,
}

impl ListenerConfig {
    pub fn kind(&self) -> ListenerKind {
        match (self.tcp, &self.unix, self.udp) {
            (Some(addr), _, _) => ListenerKind::Tcp(addr),
            (_, _, Some(addr)) => ListenerKind::Udp(addr),
            _ => ListenerKind::Unix,
        }
    }
}

/// How the agent learns that a new process is ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// `READY=1` on the per-spawn NOTIFY_SOCKET (systemd's protocol): exact,
    /// and the only kind that cannot be answered by the *old* process.
    Notify,
    /// GET `path` on `address` answers 200. The address should be the new
    /// process's own (an admin port): a shared listener may be answered by
    /// the old process.
    Http { address: SocketAddr, path: String },
    /// A TCP connect to `address` succeeds (same caveat as http).
    Tcp { address: SocketAddr },
    /// Ready after a fixed delay, for programs that can do nothing else.
    Delay { delay: Duration },
}

/// `[service.readiness]` as written: `kind` picks which other keys apply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReadinessConfig {
    kind: String,
    address: Option<SocketAddr>,
    path: Option<String>,
    #[serde(with = "humantime_serde")]
    delay: Option<Duration>,
    /// A new process not ready by then is killed; the old one keeps serving.
    #[serde(with = "humantime_serde")]
    timeout: Duration,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            kind: "notify".into(),
            address: None,
            path: None,
            delay: None,
            timeout: Duration::from_secs(30),
        }
    }
}

impl ReadinessConfig {
    fn probe(&self, service: &str) -> anyhow::Result<Readiness> {
        let need = |what: &str| {
            anyhow::anyhow!(
                "service {service:?}: [service.readiness] kind = {:?} needs {what}",
                self.kind
            )
        };
        Ok(match self.kind.as_str() {
            "notify" => Readiness::Notify,
            "http" => Readiness::Http {
                address: self.address.ok_or_else(|| need("address = \"HOST:PORT\""))?,
                path: self.path.clone().unwrap_or_else(|| "/".into()),
            },
            "tcp" => Readiness::Tcp {
                address: self.address.ok_or_else(|| need("address = \"HOST:PORT\""))?,
            },
            "delay" => Readiness::Delay {
                delay: self.delay.ok_or_else(|| need("delay = \"2s\""))?,
            },
            other => bail!("service {service:?}: [service.readiness] kind {other:?} is not one of notify, http, tcp, delay"),
        })
    }
}

/// Steady-state health, reported on gRPC and `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthProbe {
    /// No probe: a running process counts as healthy.
    None,
    /// GET `path` on the listener named `listener` (default: the first TCP
    /// listener) answers 2xx.
    Http {
        path: String,
        listener: Option<String>,
    },
    /// A TCP connect to the named listener succeeds within the timeout.
    /// Weak: the agent holds the socket, so the kernel accepts a connect
    /// even while no process serves; prefer http or exec.
    Tcp { listener: Option<String> },
    /// The command exits 0.
    Exec { command: Vec<String> },
}

/// `[service.health]` as written: `kind` picks which other keys apply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HealthConfig {
    kind: String,
    path: Option<String>,
    listener: Option<String>,
    command: Option<Vec<String>>,
    /// Probe each process on a private loopback port of its own (passed as
    /// the listener named `probe`) instead of the shared listener, which
    /// any process of the service may answer.
    private: bool,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: "none".into(),
            path: None,
            listener: None,
            command: None,
            private: false,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }
}

impl HealthConfig {
    fn probe(&self, service: &str) -> anyhow::Result<HealthProbe> {
        Ok(match self.kind.as_str() {
            "none" => HealthProbe::None,
            "http" => HealthProbe::Http {
                path: self.path.clone().unwrap_or_else(|| "/".into()),
                listener: self.listener.clone(),
            },
            "tcp" => HealthProbe::Tcp {
                listener: self.listener.clone(),
            },
            "exec" => match &self.command {
                Some(command) if !command.is_empty() => HealthProbe::Exec {
                    command: command.clone(),
                },
                _ => bail!("service {service:?}: [service.health] kind = \"exec\" needs command = [\"program\", ...]"),
            },
            other => bail!("service {service:?}: [service.health] kind {other:?} is not one of none, http, tcp, exec"),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PreflightConfig {
    /// Run the new binary with these arguments before activation; it must
    /// exit 0. Empty: no preflight.
    args: Vec<String>,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
}

impl Default for PreflightConfig {
    fn default() -> Self {
        PreflightConfig {
            args: vec!["--version".into()],
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DrainConfig {
    /// SIGTERM by default; SIGQUIT for nginx-like programs.
    signal: String,
    /// After this the old process group gets SIGKILL.
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    /// A first signal, `pre_wait` before `signal`: for programs that can
    /// be told to stop keep-alive (answer `Connection: close`) apart from
    /// being told to stop, so that their clients move to the new process
    /// before the drain closes idle connections under them.
    pre_signal: Option<String>,
    #[serde(with = "humantime_serde")]
    pre_wait: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            signal: "SIGTERM".into(),
            timeout: Duration::from_secs(30),
            pre_signal: None,
            pre_wait: Duration::ZERO,
        }
    }
}

/// How a process is drained (`[service.drain]`): the optional first
/// signal and its wait, then the drain signal and its timeout, then
/// SIGKILL of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    pub pre: Option<(nix::sys::signal::Signal, Duration)>,
    pub signal: nix::sys::signal::Signal,
    pub timeout: Duration,
}

impl DrainPlan {
    /// The longest a drain can take before the SIGKILL.
    pub fn bound(&self) -> Duration {
        self.pre.map(|(_, wait)| wait).unwrap_or_default() + self.timeout
    }

    /// What the drain does, for people: "SIGUSR1, 1s later SIGTERM".
    pub fn describe(&self) -> String {
        match self.pre {
            Some((pre, wait)) => format!(
                "{pre}, {} later {}",
                humantime::format_duration(wait),
                self.signal
            ),
            None => self.signal.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RestartConfig {
    #[serde(with = "humantime_serde")]
    initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    max_backoff: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// A checked service declaration.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub listeners: Vec<ListenerConfig>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub readiness: Readiness,
    pub ready_timeout: Duration,
    pub health: HealthProbe,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    /// Health (and probation) probes go to each process's private `probe`
    /// listener, never to the shared one.
    pub health_private: bool,
    pub probation: Probation,
    pub preflight_args: Vec<String>,
    pub preflight_timeout: Duration,
    pub drain: DrainPlan,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl ServiceConfig {
    /// The address a health probe should use for `listener` (or the first
    /// TCP listener).
    pub fn tcp_address(&self, listener: Option<&str>) -> Option<SocketAddr> {
        ServiceConfig::tcp_address_of(&self.listeners, listener)
    }
}

pub(super) fn check_service(section: ServiceSection, base: &Path) -> anyhow::Result<ServiceConfig> {
    let name = section.name;
    reload_artifact::manifest::validate_service_name(&name)
        .with_context(|| "[[service]] name".to_string())?;
    if name == crate::handover::AGENT_SERVICE {
        anyhow::bail!(
            "[[service]] name {name:?} is reserved for the agent's own releases (UpgradeAgent); name the service otherwise"
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for listener in &section.listeners {
        let kinds = [
            listener.tcp.is_some(),
            listener.unix.is_some(),
            listener.udp.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            bail!("service {name:?} listener {:?}: give exactly one of tcp = \"ADDR\", unix = \"PATH\", udp = \"ADDR\"", listener.name);
        }
        if listener.name.is_empty() || listener.name.contains(':') {
            bail!("service {name:?}: listener name {:?} must be non-empty and contain no ':' (LISTEN_FDNAMES separates names with ':')", listener.name);
        }
        if !seen.insert(listener.name.clone()) {
            bail!(
                "service {name:?}: two listeners are named {:?}",
                listener.name
            );
        }
    }
    let readiness = section.readiness.probe(&name)?;
    let health = section.health.probe(&name)?;
    if section.listeners.iter().any(|l| l.name == PROBE_LISTENER) {
        bail!("service {name:?}: the listener name {PROBE_LISTENER:?} is reserved for the private health port ([service.health] private = true); name the listener otherwise");
    }
    if section.health.private
        && !matches!(health, HealthProbe::Http { .. } | HealthProbe::Tcp { .. })
    {
        bail!("service {name:?}: [service.health] private = true needs kind = \"http\" or \"tcp\"");
    }
    if section.probation.healthy_checks == 0 || section.probation.interval.is_zero() {
        bail!("service {name:?}: [service.probation] healthy_checks and interval must be above zero (healthy_for = \"0s\" turns probation off)");
    }
    if let (false, HealthProbe::Http { listener, .. } | HealthProbe::Tcp { listener }) =
        (section.health.private, &health)
    {
        let probe = ServiceConfig::tcp_address_of(&section.listeners, listener.as_deref());
        if probe.is_none() {
            bail!(
                "service {name:?}: the health probe needs a TCP listener{}",
                listener
                    .as_deref()
                    .map(|l| format!(" named {l:?}"))
                    .unwrap_or_default()
            );
        }
    }
    let signal_named = |signal: &str| -> anyhow::Result<nix::sys::signal::Signal> {
        signal.parse().map_err(|_| {
            anyhow::anyhow!(
                "service {name:?}: drain signal {signal:?} is not a signal name such as SIGTERM or SIGQUIT"
            )
        })
    };
    let drain_signal = signal_named(&section.drain.signal)?;
    if section.readiness.timeout.is_zero() || section.drain.timeout.is_zero() {
        bail!("service {name:?}: readiness and drain timeouts must be above zero");
    }
    let pre_drain = match (&section.drain.pre_signal, section.drain.pre_wait.is_zero()) {
        (Some(pre), false) => Some((signal_named(pre)?, section.drain.pre_wait)),
        (Some(_), true) => bail!(
            "service {name:?}: [service.drain] pre_signal needs pre_wait = \"1s\" (how long before the drain signal)"
        ),
        (None, false) => bail!(
            "service {name:?}: [service.drain] pre_wait needs pre_signal = \"SIGUSR1\" (the signal it waits after)"
        ),
        (None, true) => None,
    };
    Ok(ServiceConfig {
        listeners: section
            .listeners
            .into_iter()
            .map(|mut l| {
                l.unix = l.unix.map(|p| base.join(p));
                l
            })
            .collect(),
        args: section.args,
        env: section.env.into_iter().collect(),
        working_dir: base.join(section.working_dir.unwrap_or_else(|| PathBuf::from("."))),
        readiness,
        ready_timeout: section.readiness.timeout,
        health,
        health_interval: section.health.interval,
        health_private: section.health.private,
        probation: Probation {
            healthy_for: section.probation.healthy_for,
            healthy_checks: section.probation.healthy_checks,
            interval: section.probation.interval,
            crash_loop: section.probation.crash_loop,
            crash_window: section.probation.crash_window,
        },
        health_timeout: section.health.timeout,
        preflight_args: section.preflight.args,
        preflight_timeout: section.preflight.timeout,
        drain: DrainPlan {
            pre: pre_drain,
            signal: drain_signal,
            timeout: section.drain.timeout,
        },
        initial_backoff: section.restart.initial_backoff,
        max_backoff: section
            .restart
            .max_backoff
            .max(section.restart.initial_backoff),
        name,
    })
}

impl ServiceConfig {
    fn tcp_address_of(listeners: &[ListenerConfig], listener: Option<&str>) -> Option<SocketAddr> {
        listeners
            .iter()
            .filter(|l| listener.is_none_or(|name| name == l.name))
            .find_map(|l| l.tcp)
    }
}
