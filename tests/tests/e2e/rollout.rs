//! End-to-end: fleet rollouts with `reloadctl push` against real agents,
//! each simulated host on its own 127.0.x.y address.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::load::{ConnectionMode, LoadConfig, LoadRun};
use reload_tests::*;

struct Host {
    agent: Agent,
    service_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

struct Fleet {
    hosts: Vec<Host>,
    project: tempfile::TempDir,
    key: Arc<SigningKey>,
}

/// `count` hosts on 127.0.`net`.1, .2, ...; `extra_env(i)` is added to
/// host i's service environment (a host-specific config).
fn fleet(net: u8, count: usize, extra_env: impl Fn(usize) -> String) -> Fleet {
    let key = Arc::new(SigningKey::generate());
    let project = tempfile::tempdir().unwrap();
    let p = project.path();
    std::fs::write(p.join("release.key"), key.to_pem()).unwrap();
    std::fs::write(p.join("release.pub"), key.public().to_pem()).unwrap();
    std::fs::write(
        p.join("reloadctl.toml"),
        "service = \"demo\"\nartifact = \"releases/demo-{version}\"\nagent_artifact = \"releases/reload-agent-{version}\"\ntrusted_keys = [\"release.pub\"]\n\
         [rollout]\nhealthy_checks = 2\nmin_healthy_time = \"300ms\"\nhealthy_deadline = \"5s\"\nprogress_deadline = \"5m\"\n",
    )
    .unwrap();
    std::fs::create_dir(p.join("releases")).unwrap();
    let mut hosts = Vec::new();
    let mut hosts_file = String::from("# test fleet\n");
    for i in 0..count {
        let ip: IpAddr = format!("127.0.{net}.{}", i + 1).parse().unwrap();
        let port = free_port_on(ip);
        let service_addr = SocketAddr::new(ip, port);
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[[service]]\nname = \"demo\"\nargs = [\"--listen-name\", \"http\"]\nenv = {{ {} }}\n\
             [[service.listener]]\nname = \"http\"\ntcp = \"{service_addr}\"\n\
             [service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\nprivate = true\n\
             [service.probation]\nhealthy_for = \"500ms\"\n\
             [service.drain]\ntimeout = \"5s\"\n",
            extra_env(i)
        );
        let agent = Agent::start_at(ip, dir.path(), key.clone(), &config);
        hosts_file.push_str(&format!("{}\n", agent.host()));
        hosts.push(Host {
            agent,
            service_addr,
            _dir: dir,
        });
    }
    std::fs::write(p.join("hosts.txt"), hosts_file).unwrap();
    Fleet {
        hosts,
        project,
        key,
    }
}

impl Fleet {
    fn dir(&self) -> &Path {
        self.project.path()
    }

    /// A release: the demo server (with `flags`, through a script, if any),
    /// signed as demo `version`.
    fn release(&self, version: &str, flags: &str) {
        let path = self.dir().join(format!("releases/demo-{version}"));
        if flags.is_empty() {
            std::fs::write(&path, Agent::demo_server_bytes(version)).unwrap();
        } else {
            let script = format!(
                "#!/bin/sh\nexec '{}' {flags} \"$@\"\n",
                bin_path("reload-demo-server").display()
            );
            std::fs::write(&path, script).unwrap();
        }
        let name = format!("releases/demo-{version}");
        reloadctl_ok(
            self.dir(),
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

    /// An agent release: `bytes` signed as reload-agent `version`.
    fn agent_release(&self, version: &str, bytes: &[u8]) -> String {
        let name = format!("releases/reload-agent-{version}");
        std::fs::write(self.dir().join(&name), bytes).unwrap();
        reloadctl_ok(
            self.dir(),
            &[
                "sign",
                "--key",
                "release.key",
                "--service",
                "reload-agent",
                "--version",
                version,
                "--os",
                "any",
                "--arch",
                "any",
                &name,
            ],
        );
        sha256_hex(bytes)
    }

    async fn agent_info(&self, i: usize) -> pb::GetAgentInfoResponse {
        let mut agent =
            pb::agent_service_client::AgentServiceClient::new(self.hosts[i].agent.channel().await);
        agent
            .get_agent_info(pb::GetAgentInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    fn push(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["push"];
        all.extend_from_slice(args);
        all.push("hosts.txt");
        reloadctl(self.dir(), &all)
    }

    async fn status(&self, i: usize) -> pb::ServiceStatus {
        self.hosts[i].agent.status("demo").await
    }

    async fn versions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..self.hosts.len() {
            out.push(self.status(i).await.current_version);
        }
        out
    }

    /// Every host on `version` already (the starting point of a test).
    fn push_ok(&self, version: &str) {
        let output = self.push(&[
            "--version",
            version,
            "--canary",
            "0",
            "--waves",
            "100%",
            "--max-parallel",
            "8",
        ]);
        assert_ok(&output);
        // Each host's probation is shown while the push waits for it.
        let progress = String::from_utf8_lossy(&output.stderr);
        assert!(
            progress.contains(&format!("probation of {}", version_of(version)))
                && progress.contains("passed"),
            "{progress}"
        );
    }

    /// How many times an agent made `version` ready (from its own log).
    fn activations(&self, i: usize, version: &str) -> usize {
        self.hosts[i]
            .agent
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| {
                e["fields"]["event"] == "EVENT_KIND_READY" && e["fields"]["version"] == version
            })
            .count()
    }
}

fn assert_ok(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn json_events(output: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_hosts_roll_out_in_waves_with_zero_failed_requests() {
    let f = fleet(41, 8, |_| String::new());
    f.release("1.0.0", "");
    f.release("2.0.0", "");
    f.push_ok("1.0.0");
    let loads = load_every_host(&f);
    let output = f.push(&[
        "--version",
        "2.0",
        "--canary",
        "1",
        "--waves",
        "1,10%,50%,100%",
        "--output",
        "json",
    ]);
    assert_ok(&output);
    let mut total = 0;
    for load in loads {
        let report = load.stop().await;
        println!("{}", report.summary());
        assert_eq!(
            report.failures,
            0,
            "{}\n{:#?}",
            report.summary(),
            report.failure_samples
        );
        assert_eq!(report.non_200, 0);
        assert!(
            report.by_version.contains_key("2.0.0"),
            "{}",
            report.summary()
        );
        total += report.requests;
    }
    assert!(total > 1000, "too little load to mean anything: {total}");
    assert_eq!(f.versions().await, vec!["2.0.0"; 8]);
    // The JSON stream: every line parses, waves came in order, the last
    // line is the summary.
    let events = json_events(&output);
    let waves: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "wave")
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(waves, vec![1, 2, 3]);
    let last = events.last().unwrap();
    assert_eq!(last["event"], "finished");
    assert_eq!(last["outcome"], "done");
    assert_eq!(last["healthy"], 8);
    // Each host was activated exactly once.
    for i in 0..8 {
        assert_eq!(f.activations(i, "2.0.0"), 1, "host {i}");
    }
    // A second push of the same version skips every host and sends nothing.
    let again = f.push(&["--version", "2.0.0", "--output", "json"]);
    assert_ok(&again);
    let last = json_events(&again).pop().unwrap();
    assert_eq!(
        (last["skipped"].as_u64(), last["bytes_sent"].as_u64()),
        (Some(8), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_healthy_canary_halts_the_rollout_and_is_reverted() {
    let f = fleet(42, 4, |_| String::new());
    f.release("1.0.0", "");
    f.release("2.0.0", "--unhealthy");
    f.push_ok("1.0.0");
    let mut before = Vec::new();
    for i in [0, 1, 2, 3] {
        before.push(f.status(i).await.pid);
    }
    // Clients of the canary host that never retry, keep-alive and not.
    let mut runs = Vec::new();
    for mode in [
        ConnectionMode::KeepAlive,
        ConnectionMode::NewConnectionPerRequest,
    ] {
        runs.push(LoadRun::start(LoadConfig {
            addr: f.hosts[0].service_addr,
            path: "/".into(),
            connections: 10,
            mode,
            request_timeout: Duration::from_secs(10),
        }));
    }
    let output = f.push(&[
        "--version",
        "2.0.0",
        "--canary",
        "1",
        "--healthy-deadline",
        "2s",
    ]);
    assert_eq!(
        output.status.code(),
        Some(3),
        "halted is exit 3\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The canary's agent reverted it itself, during probation: the new
    // process never replaced the old one.
    assert!(stdout.contains("reload failed"), "{stdout}");
    assert!(stdout.contains("during probation"), "{stdout}");
    for run in runs {
        let report = run.stop().await;
        println!("canary host: {}", report.summary());
        report.assert_no_failures();
    }
    assert_eq!(f.versions().await, vec!["1.0.0"; 4]);
    let canary = f.status(0).await;
    let last = canary.last_reload.unwrap();
    assert_eq!(
        (last.to_version.as_str(), last.outcome),
        ("2.0.0", pb::ReloadOutcome::Reverted as i32)
    );
    assert_eq!(canary.pid, before[0], "the canary's old process served on");
    for i in [1, 2, 3] {
        let status = f.status(i).await;
        assert_eq!(status.pid, before[i], "host {i} was touched");
        assert_eq!(f.activations(i, "2.0.0"), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_absorbs_one_host_failure_and_halts_at_the_second() {
    // Hosts 2 and 4 refuse 2.0.0 through their own config.
    let f = fleet(43, 5, |i| {
        if i == 2 || i == 4 {
            "DEMO_FAIL_VERSIONS = \"2.0.0\"".into()
        } else {
            String::new()
        }
    });
    f.release("1.0.0", "");
    f.release("2.0.0", "");
    f.push_ok("1.0.0");
    let output = f.push(&[
        "--version",
        "2.0.0",
        "--canary",
        "1",
        "--waves",
        "100%",
        "--max-parallel",
        "1",
        "--max-failures",
        "1",
        "--output",
        "json",
    ]);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events = json_events(&output);
    let failed: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "host" && e["state"] == "failed")
        .map(|e| e["cause"].as_str().unwrap())
        .collect();
    assert_eq!(failed, vec!["reload_failed", "reload_failed"]);
    // The rollout went on past host 2 (host 3 was changed) and stopped at
    // host 4; every host it changed is back on 1.0.0.
    assert_eq!(
        f.activations(3, "2.0.0"),
        1,
        "the rollout must go on past the first failure"
    );
    assert_eq!(f.versions().await, vec!["1.0.0"; 5]);
    let reverted: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "host" && e["state"] == "reverted")
        .map(|e| e["host"].as_str().unwrap())
        .collect();
    assert_eq!(reverted.len(), 3, "{reverted:?}");
    assert_eq!(events.last().unwrap()["outcome"], "halted_reverted");
}

/// Runs `reloadctl push ... --output json hosts.txt` in `dir` as a child
/// and hands each event (with the events before it and the CLI's pid) to
/// `on_event` as it arrives, until the end of its output. Returns the child
/// (to wait on) and the events.
fn push_watching(
    dir: &Path,
    args: &[&str],
    mut on_event: impl FnMut(&serde_json::Value, &[serde_json::Value], u32),
) -> (std::process::Child, Vec<serde_json::Value>) {
    use std::io::BufRead;
    let mut all = vec!["push"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json", "hosts.txt"]);
    let mut child = Command::new(bin_path("reloadctl"))
        .args(&all)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut events = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        on_event(&event, &events, child.id());
        events.push(event);
    }
    (child, events)
}

/// `reloadctl push VERSION` (canary 1, one host at a time) with Ctrl-C
/// while the canary is being gated: the CLI pauses (exit 5). Its events.
fn push_paused_at_the_canary(dir: &Path, version: &str) -> Vec<serde_json::Value> {
    let mut sent = false;
    let (mut child, events) = push_watching(
        dir,
        &[
            "--version",
            version,
            "--canary",
            "1",
            "--waves",
            "100%",
            "--max-parallel",
            "1",
        ],
        |event, _, cli| {
            if !sent && event["event"] == "host" && event["state"] == "activated" {
                send_signal(cli, nix::sys::signal::Signal::SIGINT);
                sent = true;
            }
        },
    );
    assert_eq!(child.wait().unwrap().code(), Some(5), "{events:#?}");
    events
}

fn sigkill(pid: u32) {
    send_signal(pid, nix::sys::signal::Signal::SIGKILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_rollout_is_unreachable_and_counts_against_the_budget() {
    let f = fleet(44, 3, |_| String::new());
    f.release("1.0.0", "");
    f.release("2.0.0", "");
    f.push_ok("1.0.0");
    let victim = f.hosts[2].agent.host();
    let victim_pid = f.hosts[2].agent.pid();
    let dir: PathBuf = f.dir().to_path_buf();
    // Kill the last host's agent once the canary is healthy, while the
    // rollout waits between waves.
    let (mut child, events) = push_watching(
        &dir,
        &[
            "--version",
            "2.0.0",
            "--canary",
            "1",
            "--waves",
            "100%",
            "--max-parallel",
            "1",
            "--pause-between-waves",
            "1s",
        ],
        |event, _, _| {
            if event["event"] == "host" && event["state"] == "healthy" {
                sigkill(victim_pid);
            }
        },
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{events:#?}");
    let failed: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["event"] == "host" && e["state"] == "failed")
        .map(|e| (e["host"].as_str().unwrap(), e["cause"].as_str().unwrap()))
        .collect();
    assert_eq!(
        failed,
        vec![(victim.as_str(), "unreachable")],
        "{events:#?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last["outcome"].as_str(), last["failed"].as_u64()),
        (Some("halted_reverted"), Some(1))
    );
    // The hosts that answered are back on 1.0.0.
    assert_eq!(f.status(0).await.current_version, "1.0.0");
    assert_eq!(f.status(1).await.current_version, "1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_killed_mid_wave_is_resumed_without_activating_any_host_twice() {
    let f = fleet(45, 4, |_| String::new());
    f.release("1.0.0", "");
    f.release("2.0.0", "");
    f.push_ok("1.0.0");
    let dir: PathBuf = f.dir().to_path_buf();
    // A long health gate, so the CLI dies while the second wave is gating.
    let mut killed = false;
    let (mut child, events) = push_watching(
        &dir,
        &[
            "--version",
            "2.0.0",
            "--canary",
            "1",
            "--waves",
            "100%",
            "--max-parallel",
            "2",
            "--min-healthy-time",
            "1500ms",
        ],
        |event, before, cli| {
            let in_second_wave = before
                .iter()
                .any(|e| e["event"] == "wave" && e["index"] == 2);
            if !killed
                && in_second_wave
                && event["event"] == "host"
                && event["state"] == "activated"
            {
                sigkill(cli);
                killed = true;
            }
        },
    );
    let status = child.wait().unwrap();
    assert!(
        killed,
        "the CLI finished before it could be killed: {events:#?}"
    );
    assert_eq!(status.code(), None, "killed by a signal");
    assert!(!events.iter().any(|e| e["event"] == "finished"));

    let output = reloadctl(&dir, &["resume", "--output", "json"]);
    assert_ok(&output);
    let last = json_events(&output).pop().unwrap();
    assert_eq!(last["outcome"], "done");
    assert_eq!(f.versions().await, vec!["2.0.0"; 4]);
    for i in 0..4 {
        assert_eq!(
            f.activations(i, "2.0.0"),
            1,
            "host {i} activated {} times",
            f.activations(i, "2.0.0")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_pushes_started_at_once_one_proceeds_and_the_other_names_the_holder() {
    let f = fleet(46, 3, |_| String::new());
    f.release("1.0.0", "");
    f.release("2.0.0", "");
    f.push_ok("1.0.0");
    let spawn = |version: &str| {
        Command::new(bin_path("reloadctl"))
            .args([
                "push",
                "--version",
                version,
                "--min-healthy-time",
                "1s",
                "hosts.txt",
            ])
            .current_dir(f.dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("2.0.0"), spawn("2.0.0"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (winner, loser) = if a.status.success() { (a, b) } else { (b, a) };
    assert_ok(&winner);
    assert_eq!(
        loser.status.code(),
        Some(1),
        "the loser fails fast with exit 1"
    );
    let err = String::from_utf8_lossy(&loser.stderr);
    assert!(
        err.contains("leased to another rollout") && err.contains("reloadctl push demo 2.0.0 by"),
        "{err}"
    );
    assert_eq!(f.versions().await, vec!["2.0.0"; 3]);
    for i in 0..3 {
        assert_eq!(f.activations(i, "2.0.0"), 1);
    }
}

#[test]
fn bad_hosts_files_and_configs_are_usage_errors() {
    let f = fleet(47, 1, |_| String::new());
    f.release("1.0.0", "");
    std::fs::write(
        f.dir().join("bad-hosts.txt"),
        "127.0.47.1:7700
not a host
",
    )
    .unwrap();
    let output = reloadctl(f.dir(), &["push", "--version", "1.0.0", "bad-hosts.txt"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 2"));
    let output = reloadctl(f.dir(), &["push", "--version", "9.9", "hosts.txt"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no release 9.9.0"));
    let output = reloadctl(
        f.dir(),
        &["push", "--version", "1.0.0", "--dry-run", "hosts.txt"],
    );
    assert_ok(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing was changed"));
    // A journal a killed push left empty (before its plan): resume says
    // so instead of crashing.
    let rollouts = f.dir().join(".reloadctl/rollouts");
    std::fs::create_dir_all(&rollouts).unwrap();
    std::fs::write(rollouts.join("0123456789abcdef.jsonl"), b"").unwrap();
    let output = reloadctl(f.dir(), &["resume", "0123456789abcdef"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is empty"),
        "{output:?}"
    );
    let _ = &f.key;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_pauses_after_the_hosts_in_flight_and_resume_finishes() {
    let f = fleet(48, 3, |_| String::new());
    f.release("1.0.0", "");
    f.release("2.0.0", "");
    f.push_ok("1.0.0");
    let dir: PathBuf = f.dir().to_path_buf();
    let events = push_paused_at_the_canary(&dir, "2.0.0");
    // The host in flight finished its step; nothing after it started.
    assert!(events.iter().any(|e| e["event"] == "paused"));
    assert_eq!(events.last().unwrap()["outcome"], "aborted");
    assert_eq!(f.versions().await, vec!["2.0.0", "1.0.0", "1.0.0"]);
    let output = reloadctl(&dir, &["resume"]);
    assert_ok(&output);
    assert_eq!(f.versions().await, vec!["2.0.0"; 3]);
    for i in 0..3 {
        assert_eq!(f.activations(i, "2.0.0"), 1);
    }
}

/// The agent binary with a trailer: distinct bytes, the same program.
fn agent_bytes(version: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(bin_path("reload-agent")).unwrap();
    bytes.extend_from_slice(format!("\nreload-test-agent {version}\n").as_bytes());
    bytes
}

/// Keep-alive load on every host's service.
fn load_every_host(f: &Fleet) -> Vec<LoadRun> {
    f.hosts
        .iter()
        .map(|h| {
            LoadRun::start(LoadConfig {
                addr: h.service_addr,
                path: "/".into(),
                connections: 6,
                mode: ConnectionMode::KeepAlive,
                request_timeout: Duration::from_secs(10),
            })
        })
        .collect()
}

/// Every host's agent runs `sha256`, still with the pid in `agent_pids`,
/// and its service still has the pid in `service_pids` (not restarted).
async fn assert_every_agent_runs(
    f: &Fleet,
    sha256: &str,
    agent_pids: &[u32],
    service_pids: &[u32],
) {
    for i in 0..f.hosts.len() {
        let info = f.agent_info(i).await;
        assert_eq!(
            (info.pid, info.executable_sha256.as_str()),
            (agent_pids[i], sha256),
            "host {i} does not run agent {sha256} in place"
        );
        assert_eq!(
            f.status(i).await.pid,
            service_pids[i],
            "host {i}: the service was restarted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_agent_upgrades_every_agent_in_place_and_a_bad_agent_release_is_stopped_and_reverted()
{
    let f = fleet(47, 3, |_| String::new());
    f.release("1.0.0", "");
    f.push_ok("1.0.0");
    let mut agent_pids = Vec::new();
    let mut service_pids = Vec::new();
    for i in 0..3 {
        agent_pids.push(f.hosts[i].agent.pid());
        service_pids.push(f.status(i).await.pid);
    }
    let good = f.agent_release("2.0.0", &agent_bytes("2.0.0"));
    let loads = load_every_host(&f);
    let output = f.push(&[
        "--agent",
        "--version",
        "2.0",
        "--canary",
        "1",
        "--waves",
        "1,100%",
    ]);
    assert_ok(&output);
    for load in loads {
        let report = load.stop().await;
        println!("agent rollout: {}", report.summary());
        assert_eq!(
            report.failures,
            0,
            "{}\n{:#?}",
            report.summary(),
            report.failure_samples
        );
        assert_eq!(report.non_200, 0);
        assert!(report.requests > 0);
    }
    assert_every_agent_runs(&f, &good, &agent_pids, &service_pids).await;
    for i in 0..3 {
        assert_eq!(f.agent_info(i).await.artifact_version, "2.0.0", "host {i}");
    }
    // Again: every host already runs it, nothing is sent.
    let again = f.push(&["--agent", "--version", "2.0.0", "--output", "json"]);
    assert_ok(&again);
    let last = json_events(&again).pop().unwrap();
    assert_eq!(
        (last["skipped"].as_u64(), last["bytes_sent"].as_u64()),
        (Some(3), Some(0))
    );

    a_release_that_is_not_the_agent_stops_at_the_canary(&f);
    an_unhealthy_canary_is_rolled_back(&f, &good, service_pids[0]).await;
    assert_every_agent_runs(&f, &good, &agent_pids, &service_pids).await;
}

/// A release whose image is not the agent it claims (a wrapper): the
/// canary's agent falls back by itself, the rollout stops there.
fn a_release_that_is_not_the_agent_stops_at_the_canary(f: &Fleet) {
    let wrapper = format!(
        "#!/bin/sh\nexec '{}' \"$@\"\n",
        bin_path("reload-agent").display()
    );
    f.agent_release("3.0.0", wrapper.as_bytes());
    let output = f.push(&["--agent", "--version", "3.0.0", "--canary", "1"]);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stderr.contains("previous one runs again"), "{stderr}");
}

/// A release that starts fine but whose host is not healthy after it (the
/// canary's service, `unwell_pid`, is stopped meanwhile): the gate fails
/// and the canary's agent is rolled back to `good`.
async fn an_unhealthy_canary_is_rolled_back(f: &Fleet, good: &str, unwell_pid: u32) {
    f.agent_release("4.0.0", &agent_bytes("4.0.0"));
    send_signal(unwell_pid, nix::sys::signal::Signal::SIGSTOP);
    let output = f.push(&[
        "--agent",
        "--version",
        "4.0.0",
        "--canary",
        "1",
        "--healthy-deadline",
        "2s",
        "--output",
        "json",
    ]);
    send_signal(unwell_pid, nix::sys::signal::Signal::SIGCONT);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    // The canary really was upgraded, then really rolled back.
    let canary = f.hosts[0].agent.host();
    let states: Vec<String> = json_events(&output)
        .iter()
        .filter(|e| e["event"] == "host" && e["host"] == canary.as_str())
        .map(|e| e["state"].as_str().unwrap_or_default().to_string())
        .collect();
    let activated = states.iter().position(|s| s == "activated");
    let reverted = states.iter().position(|s| s == "reverted");
    assert!(
        matches!((activated, reverted), (Some(a), Some(r)) if a < r),
        "canary states: {states:?}"
    );
    let last = f.agent_info(0).await.last_upgrade.unwrap();
    assert_eq!(
        (last.from_version.as_str(), last.to_sha256.as_str()),
        ("4.0.0", good),
        "the canary's last upgrade is the rollback: {last:?}"
    );
}

/// `1.4` as the agents report it: `1.4.0`.
fn version_of(typed: &str) -> String {
    match typed.matches('.').count() {
        1 => format!("{typed}.0"),
        _ => typed.to_string(),
    }
}

/// The fencing issue's sequence: push 1.5, Ctrl-C after the canary
/// (paused), push 1.6 to every host, then `reloadctl resume`. The agents
/// granted 1.6's rollout higher fencing tokens, so the resume is refused
/// as superseded (exit 6) before it takes a lease, and every host stays on
/// 1.6. Then a push of the older 1.0 is refused by the downgrade floor and
/// the summary says nothing was changed; `--allow-downgrade` does it, and
/// it is journaled and in every agent's audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_superseded_by_a_newer_push_is_not_resumed_and_downgrades_are_explicit() {
    let f = fleet(49, 3, |_| String::new());
    for version in ["1.0.0", "1.5.0", "1.6.0"] {
        f.release(version, "");
    }
    f.push_ok("1.0.0");
    let dir: PathBuf = f.dir().to_path_buf();
    let events = push_paused_at_the_canary(&dir, "1.5.0");
    let paused = events[0]["rollout"].as_str().unwrap().to_string();
    assert_eq!(f.versions().await, vec!["1.5.0", "1.0.0", "1.0.0"]);
    f.push_ok("1.6.0");
    let output = reloadctl(&dir, &["resume", &paused]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(6), "{text}");
    assert!(
        text.contains("was superseded, so it is not resumed and nothing was changed"),
        "{text}"
    );
    assert_eq!(f.versions().await, vec!["1.6.0"; 3]);
    for i in 0..3 {
        assert_eq!(f.activations(i, "1.5.0"), usize::from(i == 0), "host {i}");
    }
    // Listed as superseded, and not picked up by a plain `resume`.
    let listed = reloadctl(&dir, &["rollouts"]);
    assert_ok(&listed);
    let listing = String::from_utf8_lossy(&listed.stdout);
    let row = listing
        .lines()
        .find(|l| l.contains(&paused))
        .unwrap_or_else(|| panic!("{paused} not listed:\n{listing}"));
    assert!(row.contains("superseded"), "{row}");
    let again = reloadctl(&dir, &["resume"]);
    assert_ne!(again.status.code(), Some(0));
    assert_eq!(f.versions().await, vec!["1.6.0"; 3]);

    // Below the floor: refused at the canary, and said so truthfully.
    let refused = f.push(&["--version", "1.0.0"]);
    let summary = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(3), "{summary}");
    assert!(
        summary.contains("halted; no host was changed, nothing to revert"),
        "{summary}"
    );
    assert!(summary.contains("reverted: none"), "{summary}");
    assert_eq!(f.versions().await, vec!["1.6.0"; 3]);
    let output = f.push(&[
        "--version",
        "1.0.0",
        "--allow-downgrade",
        "--canary",
        "0",
        "--waves",
        "100%",
        "--output",
        "json",
    ]);
    assert_ok(&output);
    assert_eq!(json_events(&output)[0]["allow_downgrade"], true);
    assert_eq!(f.versions().await, vec!["1.0.0"; 3]);
    for host in &f.hosts {
        let audit = std::fs::read_to_string(host.agent.dir.join("state/audit.log")).unwrap();
        assert!(
            audit.lines().any(|l| l.contains("\"call\":\"Activate\"")
                && l.contains("\"detail\":\"allow_downgrade\"")
                && l.contains("\"version\":\"1.0.0\"")
                && l.contains("\"result\":\"ok\"")),
            "the downgrade is audited:\n{audit}"
        );
    }
}

/// The fencing issue's last case, for real: the progress deadline passes
/// while the canary is still activating (its new release takes 3 s to be
/// ready), so no result comes back. The halt asks the host, waits for the
/// activation it still runs, finds it on the new version and reverts it:
/// the summary says so, and seconds later the host still runs the old
/// version (before, it was reported reverted and then ran the new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_deadline_mid_activation_reverts_that_host_too() {
    let f = fleet(50, 2, |_| String::new());
    f.release("1.0.0", "");
    f.release("2.0.0", "--startup-delay 3s");
    f.push_ok("1.0.0");
    let output = f.push(&[
        "--version",
        "2.0.0",
        "--canary",
        "1",
        "--progress-deadline",
        "1s",
    ]);
    let summary = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(3),
        "{summary}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let canary = f.hosts[0].agent.host();
    let other = f.hosts[1].agent.host();
    assert!(
        summary.contains(&format!(
            "reverted: {canary}; left on 2.0.0: none; never changed: {other}"
        )),
        "{summary}"
    );
    assert_eq!(f.activations(0, "2.0.0"), 1, "the canary did take 2.0.0");
    // And it stays reverted.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(f.versions().await, vec!["1.0.0", "1.0.0"]);
    assert_eq!(f.activations(1, "2.0.0"), 0);
}
