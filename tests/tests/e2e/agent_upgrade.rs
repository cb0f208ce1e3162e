//! End-to-end: the agent upgrades itself in place (`UpgradeAgent`) while
//! its service serves under load.
//!
//! What is asserted is what an operator would check: no request fails, the
//! agent keeps its pid (and /proc/<pid>/exe now names the new artifact),
//! the service keeps its pid, the new image answers gRPC with the new
//! version and still supervises (reloads, reaps, restarts) the service it
//! adopted; a broken agent artifact leaves the old agent running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::load::{ConnectionMode, LoadConfig, LoadReport, LoadRun};
use reload_tests::*;
use tonic::transport::Channel;

struct Fixture {
    agent: Agent,
    service_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let service_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = web_service_toml(service_addr);
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    Fixture {
        agent,
        service_addr,
        _dir: dir,
    }
}

impl Fixture {
    /// `web` 1.0.0 activated and serving keep-alive load: its sha256, its
    /// pid and the load.
    async fn serving_under_load(&self) -> (String, u32, LoadRun) {
        let web = self
            .agent
            .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
            .await;
        self.agent
            .activate_ok("web", &web, Downgrade::Allowed)
            .await;
        let service_pid = service_status(&self.agent).await.pid;
        let run = load(self.service_addr, ConnectionMode::KeepAlive);
        run.wait_for_requests(200).await;
        (web, service_pid, run)
    }
}

/// The agent binary with a trailer naming `version`: the same program,
/// distinct bytes (and sha256), as a release build of another version would
/// be.
fn agent_bytes(version: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(bin_path("reload-agent")).unwrap();
    bytes.extend_from_slice(format!("\nreload-test-agent {version}\n").as_bytes());
    bytes
}

/// A fresh connection each time: an upgrade ends the old ones.
async fn channel(agent: &Agent) -> Option<Channel> {
    Channel::from_shared(format!("http://{}", agent.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()
}

async fn agent_info(agent: &Agent) -> Option<pb::GetAgentInfoResponse> {
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel(agent).await?);
    client
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

async fn upgrade(
    agent: &Agent,
    request: pb::UpgradeAgentRequest,
) -> Result<pb::UpgradeAgentResponse, tonic::Status> {
    let mut client = pb::agent_service_client::AgentServiceClient::new(
        channel(agent).await.expect("agent reachable"),
    );
    client.upgrade_agent(request).await.map(|r| r.into_inner())
}

/// UpgradeAgent to a stored agent artifact.
async fn upgrade_to(
    agent: &Agent,
    sha256: impl Into<String>,
) -> Result<pb::UpgradeAgentResponse, tonic::Status> {
    upgrade(
        agent,
        pb::UpgradeAgentRequest {
            sha256: sha256.into(),
            ..Default::default()
        },
    )
    .await
}

/// UpgradeAgent back to the agent that ran before.
async fn roll_back(agent: &Agent) -> Result<pb::UpgradeAgentResponse, tonic::Status> {
    upgrade(
        agent,
        pb::UpgradeAgentRequest {
            rollback: true,
            ..Default::default()
        },
    )
    .await
}

/// Polls GetAgentInfo until `last_upgrade` reports the upgrade to
/// `to_sha256`; returns that answer.
async fn wait_for_upgrade(agent: &Agent, to_sha256: &str) -> pb::GetAgentInfoResponse {
    eventually(
        format!("the agent to report the upgrade to {to_sha256}"),
        Duration::from_secs(30),
        async || agent_info(agent).await,
        |info| {
            info.as_ref()
                .and_then(|info| info.last_upgrade.as_ref())
                .is_some_and(|u| u.to_sha256 == to_sha256)
        },
    )
    .await
    .expect("an answer, since it met the condition")
}

async fn service_status(agent: &Agent) -> pb::ServiceStatus {
    let mut control = pb::service_control_client::ServiceControlClient::new(
        channel(agent).await.expect("agent reachable"),
    );
    control
        .get_status(pb::GetStatusRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .services
        .remove(0)
}

fn load(addr: SocketAddr, mode: ConnectionMode) -> LoadRun {
    LoadRun::start(LoadConfig {
        addr,
        path: "/".into(),
        connections: 25,
        mode,
        request_timeout: Duration::from_secs(10),
    })
}

/// Writes `config`, sends SIGHUP, and waits for the re-executed image
/// (another start time than `before`) to answer.
async fn reread(
    f: &Fixture,
    path: &std::path::Path,
    config: &str,
    before: &pb::GetAgentInfoResponse,
) -> pb::GetAgentInfoResponse {
    std::fs::write(path, config).unwrap();
    send_signal(f.agent.pid(), nix::sys::signal::Signal::SIGHUP);
    let info = eventually(
        "the config to be re-read (another start time)",
        Duration::from_secs(20),
        async || agent_info(&f.agent).await,
        |info| {
            info.as_ref()
                .is_some_and(|info| info.started != before.started && !info.upgrade_in_progress)
        },
    )
    .await
    .expect("an answer, since it met the condition");
    let last = info.last_upgrade.clone().unwrap();
    assert_eq!(
        last.outcome,
        pb::AgentUpgradeOutcome::Succeeded as i32,
        "{last:?}\n{}",
        f.agent.log_text()
    );
    info
}

/// What the agent holds open, by kind: listening TCP sockets, Unix and
/// UDP sockets, pidfds, pipes, other anonymous inodes and files by path.
/// TCP connections (calls, probes) come and go and are left out.
fn fd_inventory(pid: u32) -> std::collections::BTreeMap<String, usize> {
    // Socket inodes by what they are, from the agent's network namespace.
    let mut sockets = std::collections::BTreeMap::new();
    for (table, listen_state) in [
        ("tcp", Some("0A")),
        ("tcp6", Some("0A")),
        ("udp", None),
        ("udp6", None),
        ("unix", None),
    ] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (inode, kind) = match table {
                "unix" if fields.len() >= 7 => (fields[6], "unix socket"),
                "tcp" | "tcp6" if fields.len() >= 10 => {
                    if Some(fields[3]) != listen_state {
                        continue;
                    }
                    (fields[9], "listening tcp socket")
                }
                "udp" | "udp6" if fields.len() >= 10 => (fields[9], "udp socket"),
                _ => continue,
            };
            sockets.insert(format!("socket:[{inode}]"), kind);
        }
    }
    let mut inventory = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.display().to_string();
        if target.starts_with("/memfd:") {
            // The sealed images of verified artifacts: a cache the agent
            // rebuilds on demand (a new image starts without it), bounded
            // by the artifacts its services pin; not a leak.
            continue;
        }
        let kind = if target.starts_with("socket:") {
            match sockets.get(&target) {
                Some(kind) => kind.to_string(),
                None => continue,
            }
        } else if target.starts_with("pipe:") {
            "pipe".to_string()
        } else if target.starts_with("anon_inode:") {
            target
        } else {
            format!("file {target}")
        };
        *inventory.entry(kind).or_insert(0) += 1;
    }
    inventory
}

/// The agent's open fds (see [`fd_inventory`]) once they stop changing.
async fn settled_fds(pid: u32) -> std::collections::BTreeMap<String, usize> {
    settled(
        "the agent's open fds",
        Duration::from_secs(10),
        Duration::from_millis(100),
        async || fd_inventory(pid),
    )
    .await
}

/// Waits until the agent's open fds (see [`fd_inventory`]) are back to
/// `expected`.
async fn fds_back_to(pid: u32, expected: &std::collections::BTreeMap<String, usize>) {
    eventually(
        format!("the agent's open fds to be back to {expected:?}"),
        Duration::from_secs(10),
        async || fd_inventory(pid),
        |now| now == expected,
    )
    .await;
}

fn exe_of(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_upgrades_in_place_under_load_keeping_its_pid_and_its_service() {
    let f = fixture();
    let agent_pid = f.agent.pid();
    let installed_sha = sha256_hex(&std::fs::read(bin_path("reload-agent")).unwrap());
    let web_v1 = f
        .agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    let web_v2 = f
        .agent
        .stage("web", "2.0.0", &Agent::demo_server_bytes("2.0.0"))
        .await;
    f.agent
        .activate_ok("web", &web_v1, Downgrade::Allowed)
        .await;
    let service_pid = service_status(&f.agent).await.pid;
    let before = agent_info(&f.agent).await.unwrap();
    assert_eq!(before.executable_sha256, installed_sha);
    assert_eq!(before.artifact_version, "");
    assert!(before.last_upgrade.is_none());

    let fds_before = settled_fds(agent_pid).await;
    println!("agent's open fds before the upgrades: {fds_before:?}");
    let agent_v2 = f
        .agent
        .stage("reload-agent", "2.0.0", &agent_bytes("2.0.0"))
        .await;
    let agent_v3 = f
        .agent
        .stage("reload-agent", "3.0.0", &agent_bytes("3.0.0"))
        .await;

    let keep_alive = load(f.service_addr, ConnectionMode::KeepAlive);
    let per_request = load(f.service_addr, ConnectionMode::NewConnectionPerRequest);
    keep_alive.wait_for_requests(200).await;
    per_request.wait_for_requests(100).await;

    // 1. Installed binary -> agent 2.0.0, under load.
    upgrade_and_check_what_operators_see(&f.agent, &agent_v2, agent_pid).await;
    let status = service_status(&f.agent).await;
    assert_eq!(status.pid, service_pid, "the service was not restarted");
    assert_eq!(status.state, pb::ServiceState::Running as i32);
    keep_alive.wait_for_requests(200).await;
    per_request.wait_for_requests(100).await;

    // 2. The new image supervises what it adopted: a reload drains and
    // reaps the adopted process, and the process it starts survives the
    // next upgrade too (it was forked on the thread that execs).
    let second_service_pid = reload_the_adopted_process(&f.agent, &web_v2, service_pid).await;
    keep_alive.wait_for_requests(200).await;

    upgrade_to_3_and_check_monitoring(&f.agent, &agent_v3, agent_pid).await;
    assert_eq!(service_status(&f.agent).await.pid, second_service_pid);
    keep_alive.wait_for_requests(200).await;

    the_agents_floor_and_the_lease_fence_hold(&f.agent, &agent_v2).await;

    // 3. Rollback: to 2.0.0 (the history), then to the installed binary.
    roll_back_twice(&f.agent, &agent_v2, &installed_sha, agent_pid).await;
    assert_eq!(service_status(&f.agent).await.pid, second_service_pid);
    keep_alive.wait_for_requests(200).await;
    per_request.wait_for_requests(100).await;

    let keep_alive_report = keep_alive.stop().await;
    let per_request_report = per_request.stop().await;
    // Nothing leaked across four execs: no listener, pipe, pidfd or
    // executable fd left behind by an image.
    fds_back_to(agent_pid, &fds_before).await;
    assert_no_request_lost(
        &keep_alive_report,
        &per_request_report,
        [service_pid, second_service_pid].into(),
    );
    a_crash_is_restarted_by_the_image_that_adopted_it(&f.agent, second_service_pid).await;
}

/// The keep-alive and the connection-per-request load over four agent
/// upgrades: no request failed, and only `service_pids` answered.
fn assert_no_request_lost(
    keep_alive: &LoadReport,
    per_request: &LoadReport,
    service_pids: std::collections::BTreeSet<u32>,
) {
    println!("keep-alive, 4 agent upgrades: {}", keep_alive.summary());
    println!(
        "connection per request, 4 agent upgrades: {}",
        per_request.summary()
    );
    keep_alive.assert_no_failures();
    per_request.assert_no_failures();
    assert!(
        keep_alive.pids.is_subset(&service_pids) && per_request.pids.is_subset(&service_pids),
        "only the two service processes answered: {:?} {:?}",
        keep_alive.pids,
        per_request.pids
    );
}

/// Activates `web_v2`: the reload drains and reaps `service_pid`, a
/// process the agent adopted across an upgrade. Returns the new pid.
async fn reload_the_adopted_process(agent: &Agent, web_v2: &str, service_pid: u32) -> u32 {
    let reload = agent.activate_ok("web", web_v2, Downgrade::Allowed).await;
    assert_eq!(reload.old_pid, service_pid);
    wait_for(
        "the adopted process to be reaped",
        Duration::from_secs(15),
        || process_gone(service_pid),
    )
    .await;
    reload.new_pid
}

/// UpgradeAgent from the installed binary to `agent_v2` (2.0.0): the
/// answer, GetAgentInfo, /proc/<pid>/exe and `reloadctl status --agents`
/// all show the new image in the same process.
async fn upgrade_and_check_what_operators_see(agent: &Agent, agent_v2: &str, agent_pid: u32) {
    let answer = upgrade_to(agent, agent_v2.to_string())
        .await
        .unwrap_or_else(|s| panic!("UpgradeAgent: {s:?}\n{}", agent.log_text()));
    assert_eq!(answer.pid, agent_pid);
    assert_eq!(answer.new_version, "2.0.0");
    let info = wait_for_upgrade(agent, agent_v2).await;
    let last = info.last_upgrade.clone().unwrap();
    assert_eq!(
        last.outcome,
        pb::AgentUpgradeOutcome::Succeeded as i32,
        "{}\n{}",
        last.reason,
        agent.log_text()
    );
    assert_eq!(info.pid, agent_pid, "the agent kept its pid");
    assert_eq!(info.executable_sha256, agent_v2, "the new image runs");
    assert_eq!(info.artifact_version, "2.0.0");
    // The verified image, sealed in memory: never a path in the store
    // that a writer could have swapped between the check and the exec.
    assert!(
        exe_of(agent_pid)
            .to_string_lossy()
            .starts_with("/memfd:reload-agent-2.0.0"),
        "/proc/{agent_pid}/exe is {:?}, not the sealed verified image",
        exe_of(agent_pid)
    );
    // What an operator sees.
    let shown = reloadctl_ok(
        &agent.dir,
        &[
            "status",
            "--agents",
            "--host",
            &agent.host(),
            "--output",
            "json",
        ],
    );
    let shown: serde_json::Value = serde_json::from_str(shown.trim()).unwrap();
    assert_eq!(shown["runs"], "2.0.0", "{shown}");
    assert_eq!(shown["pid"], agent_pid, "{shown}");
    assert_eq!(shown["last_upgrade"]["outcome"], "succeeded", "{shown}");
}

/// UpgradeAgent to `agent_v3` (3.0.0), and what monitoring sees.
async fn upgrade_to_3_and_check_monitoring(agent: &Agent, agent_v3: &str, agent_pid: u32) {
    upgrade_to(agent, agent_v3.to_string()).await.unwrap();
    let info = wait_for_upgrade(agent, agent_v3).await;
    assert_eq!(
        info.last_upgrade.unwrap().outcome,
        pb::AgentUpgradeOutcome::Succeeded as i32
    );
    assert_eq!(
        (info.pid, info.artifact_version.as_str()),
        (agent_pid, "3.0.0")
    );
    // Monitoring sees the same.
    let metrics = http_get(agent.health_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    let line = format!(
        "reload_agent_image_info{{executable_sha256=\"{agent_v3}\",artifact_version=\"3.0.0\",last_upgrade=\"succeeded\"}} 1"
    );
    assert!(
        metrics.body.contains(&line),
        "{line} missing from\n{}",
        metrics.body
    );
}

/// The agent's own downgrade floor: 2.0.0 is below 3.0.0 and needs an
/// explicit request (a rollback makes one). Fenced like any change: while
/// a rollout holds the lease, a call without it is refused.
async fn the_agents_floor_and_the_lease_fence_hold(agent: &Agent, agent_v2: &str) {
    let below = upgrade_to(agent, agent_v2.to_string()).await.unwrap_err();
    assert_eq!(below.code(), tonic::Code::FailedPrecondition, "{below:?}");
    assert!(below.message().contains("below 3.0.0"), "{below:?}");
    let mut leases =
        pb::lease_service_client::LeaseServiceClient::new(channel(agent).await.unwrap());
    let asked = pb::LeaseRef {
        rollout_id: "test-rollout".into(),
        generation: 1,
        token: 0,
    };
    let lease = leases
        .acquire_lease(pb::AcquireLeaseRequest {
            r#ref: Some(asked),
            holder: "the test".into(),
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            force_takeover: false,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap()
        .r#ref
        .unwrap();
    let fenced = roll_back(agent).await.unwrap_err();
    assert_eq!(fenced.code(), tonic::Code::Aborted, "{fenced:?}");
    // Taken over: the first rollout's token is superseded, for the
    // agent's own upgrade as for a service.
    let newer = leases
        .acquire_lease(pb::AcquireLeaseRequest {
            r#ref: Some(pb::LeaseRef {
                rollout_id: "newer-rollout".into(),
                generation: 1,
                token: 0,
            }),
            holder: "the test, again".into(),
            ttl: None,
            force_takeover: true,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap()
        .r#ref
        .unwrap();
    let superseded = upgrade(
        agent,
        pb::UpgradeAgentRequest {
            rollback: true,
            lease: Some(lease),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(superseded.code(), tonic::Code::Aborted, "{superseded:?}");
    assert_eq!(
        superseded
            .metadata()
            .get(pb::FENCE_TRAILER)
            .map(|v| v.to_str().unwrap()),
        Some(pb::FENCE_SUPERSEDED),
        "{superseded:?}"
    );
    leases
        .release_lease(pb::ReleaseLeaseRequest { r#ref: Some(newer) })
        .await
        .unwrap();
}

/// Two rollbacks: to `agent_v2` (the history), then to the installed
/// binary (`installed_sha`), in the same process.
async fn roll_back_twice(agent: &Agent, agent_v2: &str, installed_sha: &str, agent_pid: u32) {
    roll_back(agent).await.unwrap();
    let info = wait_for_upgrade(agent, agent_v2).await;
    assert_eq!(
        (info.pid, info.artifact_version.as_str()),
        (agent_pid, "2.0.0")
    );
    roll_back(agent).await.unwrap();
    let info = wait_for_upgrade(agent, installed_sha).await;
    assert_eq!(info.pid, agent_pid);
    assert_eq!(info.executable_sha256, installed_sha);
    assert_eq!(info.artifact_version, "", "back on the installed binary");
}

/// A crash is still noticed and restarted by the image that adopted the
/// service (after the load: a SIGKILL resets the connections it held).
async fn a_crash_is_restarted_by_the_image_that_adopted_it(agent: &Agent, service_pid: u32) {
    send_signal(service_pid, nix::sys::signal::Signal::SIGKILL);
    let status = eventually(
        "the killed service to be restarted",
        Duration::from_secs(20),
        async || service_status(agent).await,
        |status| {
            status.pid != 0
                && status.pid != service_pid
                && status.state == pb::ServiceState::Running as i32
        },
    )
    .await;
    assert_eq!(status.restarts, 1, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_agent_artifact_leaves_the_old_agent_running() {
    let f = fixture();
    let agent_pid = f.agent.pid();
    let (web, service_pid, run) = f.serving_under_load().await;

    // Exits at start: the preflight (`--check`) catches it; nothing stops.
    let exits = f
        .agent
        .stage(
            "reload-agent",
            "9.0.0",
            b"#!/bin/sh\necho 'cannot start' >&2\nexit 3\n",
        )
        .await;
    let refused = upgrade_to(&f.agent, exits).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("preflight") && refused.message().contains("cannot start"),
        "{refused:?}"
    );

    // Passes the preflight, then the image that starts is not the verified
    // one (a wrapper): the start-up check fails and the previous image
    // comes back with the same services and sockets.
    let wrapper = format!(
        "#!/bin/sh\nexec '{}' \"$@\"\n",
        bin_path("reload-agent").display()
    );
    let wrapped = f
        .agent
        .stage("reload-agent", "9.1.0", wrapper.as_bytes())
        .await;
    upgrade_to(&f.agent, wrapped.clone())
        .await
        .unwrap_or_else(|s| panic!("UpgradeAgent: {s:?}\n{}", f.agent.log_text()));
    let info = wait_for_upgrade(&f.agent, &wrapped).await;
    let last = info.last_upgrade.unwrap();
    assert_eq!(
        last.outcome,
        pb::AgentUpgradeOutcome::FellBack as i32,
        "{last:?}"
    );
    assert!(last.reason.contains("not the verified"), "{last:?}");
    assert_eq!(info.pid, agent_pid);
    assert_eq!(
        info.executable_sha256,
        sha256_hex(&std::fs::read(bin_path("reload-agent")).unwrap()),
        "the previous image runs again"
    );
    assert_eq!(info.artifact_version, "");

    refusals_have_their_own_codes(&f.agent, &web).await;

    run.wait_for_requests(200).await;
    let report = run.stop().await;
    println!(
        "keep-alive, a refused and a fallen-back agent upgrade: {}",
        report.summary()
    );
    report.assert_no_failures();
    assert_eq!(
        report.pids,
        [service_pid].into(),
        "the service was never restarted"
    );
    assert_eq!(service_status(&f.agent).await.pid, service_pid);
}

/// A missing artifact, one that is not an agent (`web`'s), and a rollback
/// with nothing to roll back to get their own codes.
async fn refusals_have_their_own_codes(agent: &Agent, web: &str) {
    let not_found = upgrade_to(agent, "0".repeat(64)).await.unwrap_err();
    assert_eq!(not_found.code(), tonic::Code::NotFound, "{not_found:?}");
    let wrong_service = upgrade_to(agent, web.to_string()).await.unwrap_err();
    assert_eq!(wrong_service.code(), tonic::Code::FailedPrecondition);
    assert!(
        wrong_service.message().contains("not an agent artifact"),
        "{wrong_service:?}"
    );
    let nothing_to_roll_back = roll_back(agent).await.unwrap_err();
    assert_eq!(nothing_to_roll_back.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_rereads_the_config_in_place_and_a_broken_config_changes_nothing() {
    let f = fixture();
    let agent_pid = f.agent.pid();
    let (_, service_pid, run) = f.serving_under_load().await;
    let config_path = f.agent.dir.join("agent.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();

    // A service added to the config is there after SIGHUP; nothing else
    // moved.
    let api_port = free_port();
    let api_service = |listener: &str, port: u16| {
        format!(
            "\n[[service]]\nname = \"api\"\n[[service.listener]]\nname = \"{listener}\"\ntcp = \"127.0.0.1:{port}\"\n"
        )
    };
    let added = format!("{config}{}", api_service("http", api_port));
    std::fs::write(&config_path, &added).unwrap();
    send_signal(agent_pid, nix::sys::signal::Signal::SIGHUP);
    let info = eventually(
        "the config with the `api` service to be re-read",
        Duration::from_secs(20),
        async || agent_info(&f.agent).await,
        |info| {
            info.as_ref()
                .is_some_and(|info| info.services.contains(&"api".to_string()))
        },
    )
    .await
    .expect("an answer, since it met the condition");
    assert_eq!(info.pid, agent_pid);
    assert_eq!(
        info.last_upgrade.as_ref().unwrap().outcome,
        pb::AgentUpgradeOutcome::Succeeded as i32
    );
    assert_eq!(service_status(&f.agent).await.pid, service_pid);
    run.wait_for_requests(200).await;

    // A listener renamed at the same address keeps its socket (binding it
    // anew would collide with the one handed over)...
    let api_addr: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let renamed = format!("{config}{}", api_service("public", api_port));
    let info = reread(&f, &config_path, &renamed, &info).await;
    assert_eq!(info.pid, agent_pid);
    assert!(
        std::net::TcpStream::connect(api_addr).is_ok(),
        "the renamed listener's socket is still open"
    );
    // ... and one moved to another address is bound there, the old socket
    // closed.
    let moved_port = free_port();
    let moved = format!("{config}{}", api_service("public", moved_port));
    let info = reread(&f, &config_path, &moved, &info).await;
    assert_eq!(info.pid, agent_pid);
    assert!(std::net::TcpStream::connect(("127.0.0.1", moved_port)).is_ok());
    assert!(
        std::net::TcpStream::connect(api_addr).is_err(),
        "the old address still listens"
    );
    reread(&f, &config_path, &added, &info).await;
    assert_eq!(service_status(&f.agent).await.pid, service_pid);

    a_broken_config_changes_nothing(&f, &config_path, &added).await;

    run.wait_for_requests(200).await;
    let report = run.stop().await;
    println!("keep-alive, two SIGHUPs: {}", report.summary());
    report.assert_no_failures();
    assert_eq!(report.pids, [service_pid].into());
}

/// A config that does not load (`added` with a broken service appended,
/// then `added` written back): refused by the preflight, the agent runs on
/// as it was (same image, same services).
async fn a_broken_config_changes_nothing(f: &Fixture, config_path: &std::path::Path, added: &str) {
    let before = agent_info(&f.agent).await.unwrap();
    std::fs::write(config_path, format!("{added}\n[[service]]\nname = 3\n")).unwrap();
    send_signal(f.agent.pid(), nix::sys::signal::Signal::SIGHUP);
    let audit_path = f.agent.dir.join("state/audit.log");
    wait_for(
        "the refused reload in the audit log",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&audit_path)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("\"call\":\"ReloadConfig\"") && l.contains("FailedPrecondition")
                })
        },
    )
    .await;
    let after = agent_info(&f.agent).await.unwrap();
    assert_eq!(
        (after.pid, after.started),
        (before.pid, before.started),
        "the agent was not re-executed"
    );
    assert!(after.services.contains(&"api".to_string()));
    std::fs::write(config_path, added).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_racing_a_reload_waits_for_it_and_a_second_upgrade_is_refused() {
    let f = fixture();
    let agent_pid = f.agent.pid();
    let (_, first_pid, run) = f.serving_under_load().await;
    // Ready only after a second: the upgrade arrives while it starts.
    let script = format!(
        "#!/bin/sh\nexec '{}' --startup-delay 1s \"$@\"\n",
        bin_path("reload-demo-server").display()
    );
    let slow = f.agent.stage("web", "2.0.0", script.as_bytes()).await;
    let release = f
        .agent
        .stage("reload-agent", "2.0.0", &agent_bytes("2.0.0"))
        .await;

    // The reload, and meanwhile two upgrades at once: one goes ahead (after
    // the reload and its drain), the other is refused at once.
    let reload = f.agent.activate("web", &slow, Downgrade::NotAllowed);
    let upgrades = async {
        // The upgrades must arrive while the new process starts: wait until
        // the agent reports the reload under way.
        eventually(
            "the slow reload to be under way",
            Duration::from_secs(20),
            async || service_status(&f.agent).await,
            |status| status.state == pb::ServiceState::Reloading as i32,
        )
        .await;
        let request = || pb::UpgradeAgentRequest {
            sha256: release.clone(),
            ..Default::default()
        };
        tokio::join!(upgrade(&f.agent, request()), upgrade(&f.agent, request()))
    };
    let (reload, (a, b)) = tokio::join!(reload, upgrades);
    let (accepted, refused) = match (a, b) {
        (Ok(accepted), Err(refused)) | (Err(refused), Ok(accepted)) => (accepted, refused),
        other => panic!("expected one upgrade and one refusal, got {other:?}"),
    };
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("already in progress"),
        "{refused:?}"
    );
    assert_eq!(accepted.pid, agent_pid);
    // The reload was not cut short: it finished before the exec.
    let reload = reload.expect("the racing Activate answered");
    assert_eq!(
        reload.outcome,
        pb::ReloadOutcome::Succeeded as i32,
        "{}",
        reload.reason
    );
    let info = wait_for_upgrade(&f.agent, &release).await;
    assert_eq!(
        info.last_upgrade.unwrap().outcome,
        pb::AgentUpgradeOutcome::Succeeded as i32
    );
    assert_eq!(info.pid, agent_pid);
    let status = service_status(&f.agent).await;
    assert_eq!(
        (status.pid, status.current_sha256.as_str()),
        (reload.new_pid, slow.as_str())
    );
    assert!(
        process_gone(first_pid),
        "the old process drained before the exec"
    );
    run.wait_for_requests(200).await;
    let report = run.stop().await;
    println!(
        "keep-alive, an upgrade racing a reload: {}",
        report.summary()
    );
    report.assert_no_failures();
    assert_eq!(report.pids, [first_pid, reload.new_pid].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signals_during_an_upgrade_neither_kill_the_agent_nor_get_lost() {
    let mut f = fixture();
    let agent_pid = f.agent.pid();
    let (_, service_pid, run) = f.serving_under_load().await;
    let v2 = f
        .agent
        .stage("reload-agent", "2.0.0", &agent_bytes("2.0.0"))
        .await;
    let v3 = f
        .agent
        .stage("reload-agent", "3.0.0", &agent_bytes("3.0.0"))
        .await;

    // A SIGHUP storm across the exec: execve resets handlers to the
    // default action (terminate), so one landing before the new image's
    // handlers would kill the agent and, with it, the service.
    upgrade_to(&f.agent, v2.clone()).await.unwrap();
    let storm = tokio::spawn(async move {
        for _ in 0..40 {
            send_signal(agent_pid, nix::sys::signal::Signal::SIGHUP);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    storm.await.unwrap();
    // Every HUP either re-read the config or was refused while another
    // re-exec ran; none killed anything. Wait for the last to finish.
    let info = eventually(
        "the agent to settle on 2.0.0",
        Duration::from_secs(30),
        async || {
            let info = agent_info(&f.agent).await;
            assert!(
                f.agent.try_wait().is_none(),
                "the agent died during the upgrade\n{}",
                f.agent.log_text()
            );
            info
        },
        |info| {
            info.as_ref()
                .is_some_and(|info| !info.upgrade_in_progress && info.executable_sha256 == v2)
        },
    )
    .await
    .expect("an answer, since it met the condition");
    assert_eq!(info.pid, agent_pid);
    assert_eq!(service_status(&f.agent).await.pid, service_pid);
    run.wait_for_requests(200).await;
    let report = run.stop().await;
    println!(
        "keep-alive, an upgrade in a SIGHUP storm: {}",
        report.summary()
    );
    report.assert_no_failures();
    assert_eq!(report.pids, [service_pid].into());

    sigterm_right_after_an_upgrade_stops_the_agent_cleanly(&mut f.agent, &v3, service_pid).await;
}

/// SIGTERM right after an upgrade (to `v3`) is accepted: not lost across
/// the exec; the agent stops cleanly (exit 0), and its service goes on
/// running under its shim (the agent is a control plane; stopping services
/// is explicit). (A last SIGHUP of a storm may still be re-reading the
/// config: wait.)
async fn sigterm_right_after_an_upgrade_stops_the_agent_cleanly(
    agent: &mut Agent,
    v3: &str,
    service_pid: u32,
) {
    let answer = eventually(
        "UpgradeAgent to 3.0.0 not to be refused as `already in progress`",
        Duration::from_secs(30),
        async || upgrade_to(agent, v3.to_string()).await,
        |answer| !matches!(answer, Err(status) if status.code() == tonic::Code::Aborted),
    )
    .await;
    if let Err(status) = answer {
        panic!("UpgradeAgent: {status:?}\n{}", agent.log_text());
    }
    send_signal(agent.pid(), nix::sys::signal::Signal::SIGTERM);
    let status = eventually(
        "the agent to stop on SIGTERM during its upgrade",
        Duration::from_secs(30),
        async || agent.try_wait(),
        Option::is_some,
    )
    .await
    .expect("an exit status, since it met the condition");
    assert_eq!(
        status.code(),
        Some(0),
        "stopped cleanly, not killed: {status:?}\n{}",
        agent.log_text()
    );
    assert!(
        !process_gone(service_pid),
        "the service outlives its agent\n{}",
        agent.log_text()
    );
}

/// Only verified bytes become the agent: while a writer swaps the stored
/// agent artifact (see `verified_exec::attack`), each UpgradeAgent either
/// runs the verified image, sealed in memory (the agent's executable is
/// the memfd and hashes to the artifact), or is refused as damaged; the
/// wrapper, which would leave a marker, never runs. Three upgrades get
/// through (attempts are bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_agent_artifacts_never_become_the_agent() {
    use super::verified_exec::{attack, Target};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let f = fixture();
    let agent_pid = f.agent.pid();
    let marker = f._dir.path().join("the-wrapper-ran");
    let wrapper = format!(
        "#!/bin/sh\ntouch '{}'\nexec '{}' \"$@\"\n",
        marker.display(),
        bin_path("reload-agent").display()
    )
    .into_bytes();
    let target: Target = Default::default();
    let (stop, swaps) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let attacker = attack(target.clone(), wrapper, stop.clone(), swaps.clone());
    let (mut upgraded, mut refused) = (0, 0);
    for attempt in 0..12 {
        if upgraded == 3 {
            break;
        }
        let version = format!("{}.0.0", attempt + 2);
        let sha = f
            .agent
            .stage("reload-agent", &version, &agent_bytes(&version))
            .await;
        *target.lock().unwrap() = Some(f.agent.store().join("sha256").join(&sha));
        match upgrade_to(&f.agent, sha.clone()).await {
            Ok(_) => {
                let info = wait_for_upgrade(&f.agent, &sha).await;
                let last = info.last_upgrade.unwrap();
                assert_eq!(
                    last.outcome,
                    pb::AgentUpgradeOutcome::Succeeded as i32,
                    "{last:?}"
                );
                assert_eq!(
                    (info.pid, info.executable_sha256.as_str()),
                    (agent_pid, sha.as_str())
                );
                assert!(exe_of(agent_pid)
                    .to_string_lossy()
                    .starts_with(&format!("/memfd:reload-agent-{version}")));
                upgraded += 1;
            }
            // The copy saw other bytes, or the path was empty for an
            // instant: refused, the agent unchanged.
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::DataLoss | tonic::Code::NotFound | tonic::Code::Internal
                    ),
                    "{status:?}"
                );
                assert_eq!(agent_info(&f.agent).await.unwrap().pid, agent_pid);
                refused += 1;
            }
        }
        *target.lock().unwrap() = None;
        assert!(
            !marker.exists(),
            "the swapped bytes ran (attempt {attempt})"
        );
    }
    stop.store(true, Ordering::SeqCst);
    attacker.join().unwrap();
    eprintln!(
        "{} swaps: {upgraded} agent upgrades ran the verified image, {refused} were refused, the wrapper never ran",
        swaps.load(Ordering::Relaxed)
    );
    assert_eq!(upgraded, 3, "{refused} refused in 12 attempts");
}
