//! End-to-end, randomized: rollouts racing each other on five agents while
//! agents are partitioned (SIGSTOP/SIGCONT), killed and restarted, and CLIs
//! are killed, under load. The operations (pushes, forced takeovers,
//! resumes of unfinished rollouts) and the faults are drawn from a seeded
//! generator; the seed is printed first and with every failed check
//! (`RELOAD_FAULT_SEED=N` replays a run's choices; the timing of real
//! processes still varies).
//!
//! After every round (and once more at the end) the checks are:
//! - **fencing**: in each agent's log, every change committed under a
//!   fencing token carries the highest token the agent had granted until
//!   then (grants and commits are logged under the same lock, so the log
//!   orders them as they happened): no host was changed by a call whose
//!   token was below one it had already seen;
//! - **versions**: every host runs one of the versions the rollouts asked
//!   for, and, from the agents' audit logs, no activation went below the
//!   downgrade floor without an explicit downgrade (`--allow-downgrade` or
//!   a revert);
//! - **journals and agents agree**: every unfinished rollout is resumed;
//!   a refusal (superseded) changes no host, a resume that finishes leaves
//!   every host on its version; finally a forced push of the newest version
//!   finishes on every host, and every rollout left unfinished is then
//!   refused as superseded;
//! - **nothing lost**: keep-alive load on every host never fails.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reload_artifact::SigningKey;
use reload_tests::load::{ConnectionMode, LoadConfig, LoadRun};
use reload_tests::*;

const NET: u8 = 51;
const HOSTS: usize = 5;
const VERSIONS: [&str; 5] = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"];
/// Rounds run while the time budget lasts (CI stays bounded).
const ROUNDS: usize = 10;
const TIME_BUDGET: Duration = Duration::from_secs(150);
/// The longest a CLI may run; longer is a hang, and fails the test.
const CLI_BOUND: Duration = Duration::from_secs(120);

/// SplitMix64: a few lines instead of a dependency, and a replayable seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Host {
    ip: IpAddr,
    dir: tempfile::TempDir,
    service_addr: SocketAddr,
    agent: Agent,
    /// Killed agents, kept for their logs (and so dropping one does not
    /// end the services the next agent adopted).
    retired: Vec<Agent>,
    down: bool,
    stopped: bool,
}

impl Host {
    fn endpoint(&self) -> String {
        format!("{}:7700", self.ip)
    }

    /// The agent's whole log, across restarts, in order.
    fn log(&self) -> String {
        let mut text = String::new();
        for agent in self.retired.iter().chain(std::iter::once(&self.agent)) {
            text.push_str(&agent.log_text());
            text.push('\n');
        }
        text
    }
}

/// One `reloadctl` run in flight.
struct Cli {
    what: String,
    child: Child,
    output: PathBuf,
    killed: bool,
}

struct Chaos {
    seed: u64,
    rng: Rng,
    key: Arc<SigningKey>,
    project: tempfile::TempDir,
    hosts: Vec<Host>,
    /// Counts for the summary line.
    operations: BTreeMap<&'static str, usize>,
    faults: BTreeMap<&'static str, usize>,
    cli_runs: usize,
}

fn agent_toml(ip: IpAddr, service_addr: SocketAddr) -> String {
    format!(
        "[agent]\ninsecure = true\nlisten = [\"{ip}:7700\"]\nhealth_listen = \"{ip}:0\"\ntrusted_keys = [\"trusted.pub\"]\nstore_dir = \"store\"\n\
         [[service]]\nname = \"demo\"\nargs = [\"--listen-name\", \"http\"]\n\
         [[service.listener]]\nname = \"http\"\ntcp = \"{service_addr}\"\n\
         [service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\nprivate = true\n\
         [service.probation]\nhealthy_for = \"300ms\"\n\
         [service.drain]\ntimeout = \"5s\"\n"
    )
}

fn version_number(version: &str) -> (u64, u64, u64) {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn json_lines(text: &str) -> impl Iterator<Item = serde_json::Value> + '_ {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
}

impl Chaos {
    fn new() -> Chaos {
        let seed = std::env::var("RELOAD_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("rollout fault test: seed {seed} (replay with RELOAD_FAULT_SEED={seed})");
        let key = Arc::new(SigningKey::generate());
        let project = tempfile::tempdir().unwrap();
        let p = project.path();
        std::fs::write(p.join("release.key"), key.to_pem()).unwrap();
        std::fs::write(p.join("release.pub"), key.public().to_pem()).unwrap();
        std::fs::write(
            p.join("reloadctl.toml"),
            "service = \"demo\"\nartifact = \"releases/demo-{version}\"\ntrusted_keys = [\"release.pub\"]\n\
             [rollout]\nhealthy_checks = 1\nmin_healthy_time = \"0s\"\nhealthy_deadline = \"5s\"\nprogress_deadline = \"60s\"\n",
        )
        .unwrap();
        std::fs::create_dir(p.join("releases")).unwrap();
        for version in VERSIONS {
            let name = format!("releases/demo-{version}");
            std::fs::write(p.join(&name), Agent::demo_server_bytes(version)).unwrap();
            reloadctl_ok(
                p,
                &[
                    "sign",
                    "--key",
                    "release.key",
                    "--service",
                    "demo",
                    "--version",
                    version,
                    "--os",
                    "any",
                    "--arch",
                    "any",
                    &name,
                ],
            );
        }
        let mut hosts = Vec::new();
        let mut hosts_file = String::new();
        for i in 0..HOSTS {
            let ip: IpAddr = format!("127.0.{NET}.{}", i + 1).parse().unwrap();
            let service_addr = SocketAddr::new(ip, free_port_on(ip));
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("trusted.pub"), key.public().to_pem()).unwrap();
            std::fs::write(dir.path().join("agent.toml"), agent_toml(ip, service_addr)).unwrap();
            let agent = Agent::start_with_config(dir.path(), key.clone());
            hosts_file.push_str(&format!("{ip}:7700\n"));
            hosts.push(Host {
                ip,
                dir,
                service_addr,
                agent,
                retired: Vec::new(),
                down: false,
                stopped: false,
            });
        }
        std::fs::write(p.join("hosts.txt"), hosts_file).unwrap();
        Chaos {
            rng: Rng(seed),
            seed,
            key,
            project,
            hosts,
            operations: BTreeMap::new(),
            faults: BTreeMap::new(),
            cli_runs: 0,
        }
    }

    fn dir(&self) -> &Path {
        self.project.path()
    }

    fn fail(&self, what: String) -> ! {
        for host in &self.hosts {
            eprintln!("---- agent {} ----\n{}", host.endpoint(), host.log());
        }
        panic!(
            "seed {} (replay with RELOAD_FAULT_SEED={}): {what}",
            self.seed, self.seed
        );
    }

    fn spawn_cli(&mut self, what: &str, args: &[&str]) -> Cli {
        self.cli_runs += 1;
        let output = self.dir().join(format!("cli-{}.out", self.cli_runs));
        let file = std::fs::File::create(&output).unwrap();
        let child = Command::new(bin_path("reloadctl"))
            .args(args)
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Cli {
            what: format!("{what}: reloadctl {}", args.join(" ")),
            child,
            output,
            killed: false,
        }
    }

    /// The rollouts no process runs that have not finished: what resume
    /// would pick up.
    fn unfinished(&self) -> Vec<String> {
        let listed = reloadctl(self.dir(), &["rollouts", "--output", "json"]);
        json_lines(&String::from_utf8_lossy(&listed.stdout))
            .filter(|r| {
                matches!(
                    r["state"].as_str(),
                    Some("paused" | "interrupted-unfinished")
                )
            })
            .filter_map(|r| r["id"].as_str().map(str::to_string))
            .collect()
    }

    /// The version a rollout's journal planned; `None` for a journal its
    /// push left empty (killed before it wrote the plan).
    fn planned_version(&self, id: &str) -> Option<String> {
        let journal = self.dir().join(format!(".reloadctl/rollouts/{id}.jsonl"));
        let text = std::fs::read_to_string(&journal).unwrap();
        let plan: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
        plan["version"].as_str().map(str::to_string)
    }

    /// One random operation, started now.
    fn start_operation(&mut self) -> Cli {
        let unfinished = self.unfinished();
        let choice = self.rng.below(10);
        if choice < 3 && !unfinished.is_empty() {
            let id = unfinished[self.rng.below(unfinished.len() as u64) as usize].clone();
            let force = self.rng.chance(50);
            *self.operations.entry("resume").or_default() += 1;
            let mut args = vec!["resume", id.as_str(), "--output", "json"];
            if force {
                args.push("--force-takeover");
            }
            return self.spawn_cli("resume", &args);
        }
        let version = VERSIONS[self.rng.below(VERSIONS.len() as u64) as usize];
        let force = choice >= 7;
        let downgrade = self.rng.chance(40);
        *self
            .operations
            .entry(if force {
                "push --force-takeover"
            } else {
                "push"
            })
            .or_default() += 1;
        let mut args = vec![
            "push",
            "--version",
            version,
            "--canary",
            "1",
            "--waves",
            "100%",
            "--max-parallel",
            "5",
            "--output",
            "json",
        ];
        if force {
            args.push("--force-takeover");
        }
        if downgrade {
            args.push("--allow-downgrade");
        }
        args.push("hosts.txt");
        self.spawn_cli("push", &args)
    }

    fn stop_agent(&mut self, i: usize) {
        if !self.hosts[i].down && !self.hosts[i].stopped {
            send_signal(self.hosts[i].agent.pid(), Signal::SIGSTOP);
            self.hosts[i].stopped = true;
            *self.faults.entry("agent SIGSTOP (partition)").or_default() += 1;
        }
    }

    fn continue_agent(&mut self, i: usize) {
        if self.hosts[i].stopped {
            send_signal(self.hosts[i].agent.pid(), Signal::SIGCONT);
            self.hosts[i].stopped = false;
        }
    }

    fn kill_agent(&mut self, i: usize) {
        let host = &mut self.hosts[i];
        if host.down {
            return;
        }
        if host.stopped {
            send_signal(host.agent.pid(), Signal::SIGCONT);
            host.stopped = false;
        }
        host.agent.kill();
        host.down = true;
        *self.faults.entry("agent SIGKILL").or_default() += 1;
    }

    fn restart_agent(&mut self, i: usize) {
        let key = self.key.clone();
        let host = &mut self.hosts[i];
        if !host.down {
            return;
        }
        // Started before the old one is dropped: the services stay.
        let agent = Agent::start_with_config(host.dir.path(), key);
        let old = std::mem::replace(&mut host.agent, agent);
        host.retired.push(old);
        host.down = false;
    }

    fn heal(&mut self) {
        for i in 0..HOSTS {
            self.continue_agent(i);
            self.restart_agent(i);
        }
    }

    /// One round: 2-3 operations and 1-3 faults at random instants within
    /// a few seconds, then every CLI waited for and every agent healed.
    async fn round(&mut self) {
        #[derive(Debug)]
        enum Event {
            Operation,
            Stop(usize, Duration),
            Continue(usize),
            Kill(usize, Duration),
            Restart(usize),
            KillCli,
        }
        let mut events: Vec<(Duration, Event)> = Vec::new();
        for _ in 0..2 + self.rng.below(2) {
            events.push((self.rng.millis(0, 1500), Event::Operation));
        }
        for _ in 0..1 + self.rng.below(3) {
            let at = self.rng.millis(200, 4000);
            let host = self.rng.below(HOSTS as u64) as usize;
            events.push((
                at,
                match self.rng.below(3) {
                    0 => Event::Stop(host, self.rng.millis(300, 2500)),
                    1 => Event::Kill(host, self.rng.millis(300, 1500)),
                    _ => Event::KillCli,
                },
            ));
        }
        let start = Instant::now();
        let mut clis: Vec<Cli> = Vec::new();
        while !events.is_empty() {
            events.sort_by_key(|(at, _)| *at);
            let (at, event) = events.remove(0);
            tokio::time::sleep(at.saturating_sub(start.elapsed())).await;
            match event {
                Event::Operation => {
                    let cli = self.start_operation();
                    clis.push(cli);
                }
                Event::Stop(host, for_) => {
                    self.stop_agent(host);
                    events.push((at + for_, Event::Continue(host)));
                }
                Event::Continue(host) => self.continue_agent(host),
                Event::Kill(host, for_) => {
                    self.kill_agent(host);
                    events.push((at + for_, Event::Restart(host)));
                }
                Event::Restart(host) => self.restart_agent(host),
                Event::KillCli => {
                    let running: Vec<usize> = (0..clis.len())
                        .filter(|&c| matches!(clis[c].child.try_wait(), Ok(None)))
                        .collect();
                    if !running.is_empty() {
                        let c = running[self.rng.below(running.len() as u64) as usize];
                        send_signal(clis[c].child.id(), Signal::SIGKILL);
                        clis[c].killed = true;
                        *self.faults.entry("CLI SIGKILL").or_default() += 1;
                    }
                }
            }
        }
        self.heal();
        for mut cli in clis {
            let code = self.wait_cli(&mut cli).await;
            if !cli.killed && !matches!(code, Some(0 | 1 | 3 | 4 | 5 | 6)) {
                let output = std::fs::read_to_string(&cli.output).unwrap_or_default();
                self.fail(format!(
                    "{} exited with {code:?}, not a rollout outcome:\n{output}",
                    cli.what
                ));
            }
        }
    }

    async fn wait_cli(&self, cli: &mut Cli) -> Option<i32> {
        let deadline = Instant::now() + CLI_BOUND;
        loop {
            if let Some(status) = cli.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = cli.child.kill();
                let output = std::fs::read_to_string(&cli.output).unwrap_or_default();
                self.fail(format!(
                    "{} did not end within {CLI_BOUND:?}:\n{output}",
                    cli.what
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn versions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for host in &self.hosts {
            out.push(host.agent.status("demo").await.current_version);
        }
        out
    }

    /// The fencing and downgrade-floor checks of the module docs, on every
    /// agent's log and audit log. Returns how many fenced commits were
    /// checked.
    async fn check_fence_and_floor(&self) -> usize {
        let mut commits = 0;
        for host in &self.hosts {
            let mut highest_granted = 0u64;
            for line in json_lines(&host.log()) {
                let fields = &line["fields"];
                let token = fields["token"].as_u64().unwrap_or(0);
                match fields["message"].as_str() {
                    Some("fencing token granted") => {
                        if token <= highest_granted {
                            self.fail(format!(
                                "{}: token {token} granted after {highest_granted}",
                                host.endpoint()
                            ));
                        }
                        highest_granted = token;
                    }
                    Some(
                        "committing under fencing token"
                        | "stop committed under fencing token"
                        | "agent upgrade committed under fencing token",
                    ) if token > 0 => {
                        commits += 1;
                        if token != highest_granted {
                            self.fail(format!(
                                "{}: a change was committed under token {token} after token {highest_granted} had been granted: {line}",
                                host.endpoint()
                            ));
                        }
                    }
                    _ => {}
                }
            }
            let audit = std::fs::read_to_string(host.dir.path().join("state/audit.log"))
                .unwrap_or_default();
            let mut floor = (0, 0, 0);
            for entry in json_lines(&audit) {
                if entry["result"] != "ok" {
                    continue;
                }
                let call = entry["call"].as_str().unwrap_or_default();
                let version = entry["version"].as_str().unwrap_or_default();
                if call != "Activate" && call != "Rollback" {
                    continue;
                }
                let explicit = entry["detail"] == "allow_downgrade" || call == "Rollback";
                if !explicit && version_number(version) < floor {
                    self.fail(format!(
                        "{}: {version} was activated below the floor {floor:?} without an explicit downgrade: {entry}",
                        host.endpoint()
                    ));
                }
                floor = floor.max(version_number(version));
            }
        }
        for (host, version) in self.hosts.iter().zip(self.versions().await) {
            if !VERSIONS.contains(&version.as_str()) {
                self.fail(format!(
                    "{} runs {version:?}, which no rollout asked for",
                    host.endpoint()
                ));
            }
        }
        commits
    }

    /// Resumes every unfinished rollout, one at a time: a refusal changes
    /// nothing, a finished resume leaves every host on its version.
    async fn reconcile(&mut self) {
        for id in self.unfinished() {
            let before = self.versions().await;
            let version = self.planned_version(&id);
            *self.operations.entry("resume (check)").or_default() += 1;
            let mut cli = self.spawn_cli(
                "reconcile",
                &["resume", &id, "--force-takeover", "--output", "json"],
            );
            let code = self.wait_cli(&mut cli).await;
            let output = std::fs::read_to_string(&cli.output).unwrap_or_default();
            let after = self.versions().await;
            let Some(version) = version else {
                // Nothing was planned, so nothing may change.
                if code == Some(0) || before != after {
                    self.fail(format!(
                        "the resume of the empty journal {id} ended {code:?}, hosts {before:?} -> {after:?}\n{output}"
                    ));
                }
                continue;
            };
            match code {
                Some(6) if before != after => self.fail(format!(
                    "the refused resume of {id} changed hosts: {before:?} -> {after:?}\n{output}"
                )),
                Some(0) if after.iter().any(|v| *v != version) => self.fail(format!(
                    "the resume of {id} finished but the hosts run {after:?}, not {version}\n{output}"
                )),
                Some(0 | 3 | 4 | 6) => {}
                Some(1) if output.contains("it is not resumed") => {}
                other => self.fail(format!(
                    "the resume of {id} ended with {other:?}:\n{output}"
                )),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_rollouts_under_partitions_and_kills_never_act_on_a_superseded_token() {
    let mut chaos = Chaos::new();
    // Every host on the first version, then load on every host.
    let first = reloadctl(
        chaos.dir(),
        &[
            "push",
            "--version",
            VERSIONS[0],
            "--canary",
            "0",
            "--waves",
            "100%",
            "--max-parallel",
            "5",
            "hosts.txt",
        ],
    );
    assert!(first.status.success(), "{first:?}");
    let loads: Vec<LoadRun> = chaos
        .hosts
        .iter()
        .map(|h| {
            LoadRun::start(LoadConfig {
                addr: h.service_addr,
                path: "/".into(),
                connections: 2,
                mode: ConnectionMode::KeepAlive,
                request_timeout: Duration::from_secs(10),
            })
        })
        .collect();
    let started = Instant::now();
    let mut rounds = 0;
    let mut commits = 0;
    while rounds < ROUNDS && started.elapsed() < TIME_BUDGET {
        chaos.round().await;
        commits = chaos.check_fence_and_floor().await;
        chaos.reconcile().await;
        commits = commits.max(chaos.check_fence_and_floor().await);
        rounds += 1;
    }
    // The end: a forced push of the newest version finishes everywhere,
    // and no rollout left unfinished can act any more.
    let newest = VERSIONS[VERSIONS.len() - 1];
    let last = reloadctl(
        chaos.dir(),
        &[
            "push",
            "--version",
            newest,
            "--canary",
            "0",
            "--waves",
            "100%",
            "--max-parallel",
            "5",
            "--force-takeover",
            "hosts.txt",
        ],
    );
    if !last.status.success() {
        chaos.fail(format!("the final forced push failed: {last:?}"));
    }
    if chaos.versions().await != vec![newest; HOSTS] {
        chaos.fail(format!(
            "after the final push the hosts run {:?}",
            chaos.versions().await
        ));
    }
    for id in chaos.unfinished() {
        let refused = reloadctl(chaos.dir(), &["resume", &id, "--force-takeover"]);
        if refused.status.code() != Some(6) && !refused.status.success() {
            // Halted rollouts are not resumed at all: also fine.
            if !String::from_utf8_lossy(&refused.stderr).contains("it is not resumed") {
                chaos.fail(format!(
                    "the resume of {id} after the final push: {refused:?}"
                ));
            }
        }
        if chaos.versions().await != vec![newest; HOSTS] {
            chaos.fail(format!("the resume of {id} changed a host"));
        }
    }
    commits = commits.max(chaos.check_fence_and_floor().await);
    let mut requests = 0;
    let mut failures = Vec::new();
    for (host, load) in chaos.hosts.iter().zip(loads) {
        let report = load.stop().await;
        requests += report.requests;
        if report.failures > 0 {
            failures.push(format!("{}: {}", host.endpoint(), report.summary()));
        }
    }
    eprintln!(
        "rollout fault test: seed {}, {rounds} rounds, {} CLI runs {:?}, faults {:?}, {commits} fenced commits checked, {requests} requests",
        chaos.seed, chaos.cli_runs, chaos.operations, chaos.faults
    );
    if !failures.is_empty() {
        chaos.fail(format!("requests failed under the faults: {failures:?}"));
    }
    assert!(commits > 0 && rounds > 0);
}
