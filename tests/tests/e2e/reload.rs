//! End-to-end: socket-preserving reloads of real services under real load.
//!
//! Every test runs a real `reload-agent` supervising `reload-demo-server`
//! (or a Python server) on a listener the agent bound, drives it over gRPC,
//! and counts requests with `reload_tests::load`, a client that never
//! retries: any refused, reset or unanswered request is a failure.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::load::{ConnectionMode, LoadConfig, LoadRun};
use reload_tests::*;

const RELOADS: usize = 20;
const CONNECTIONS: usize = 50;

struct Fixture {
    agent: Agent,
    service_addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// An agent with one service `web` (demo server args, notify readiness,
/// http health on /healthz) on a fresh port.
fn fixture(extra_service_toml: &str) -> Fixture {
    fixture_from(web_service_toml, extra_service_toml)
}

/// Like [`fixture`], with the service's config made by `service_toml`.
fn fixture_from(service_toml: impl Fn(SocketAddr) -> String, extra_service_toml: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let service_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = format!("{}{extra_service_toml}\n", service_toml(service_addr));
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    Fixture {
        agent,
        service_addr,
        dir,
    }
}

impl Fixture {
    /// Uploads `bytes` signed as `web` at `version`; returns the sha256.
    async fn stage(&self, bytes: &[u8], version: &str) -> String {
        self.agent.stage("web", version, bytes).await
    }

    async fn stage_demo(&self, version: &str) -> String {
        self.stage(&Agent::demo_server_bytes(version), version)
            .await
    }

    /// A shell script that runs the demo server with extra flags: how the
    /// tests make a version that misbehaves.
    async fn stage_script(&self, version: &str, flags: &str) -> String {
        let script = format!(
            "#!/bin/sh\nexec '{}' {flags} \"$@\"\n",
            bin_path("reload-demo-server").display()
        );
        self.stage(script.as_bytes(), version).await
    }

    // These tests go back and forth between versions the agent ran: the
    // downgrade floor is tested in security.rs.
    async fn activate(&self, sha256: &str) -> pb::ReloadResult {
        self.agent
            .activate("web", sha256, Downgrade::Allowed)
            .await
            .unwrap_or_else(|s| panic!("Activate failed: {s:?}\n{}", self.agent.log_text()))
    }

    async fn activate_ok(&self, sha256: &str) -> pb::ReloadResult {
        self.agent
            .activate_ok("web", sha256, Downgrade::Allowed)
            .await
    }

    async fn status(&self) -> pb::ServiceStatus {
        self.agent.status("web").await
    }

    fn load(&self, mode: ConnectionMode) -> LoadRun {
        LoadRun::start(LoadConfig {
            addr: self.service_addr,
            path: "/".into(),
            connections: CONNECTIONS,
            mode,
            request_timeout: Duration::from_secs(10),
        })
    }
}

async fn reload_twenty_times_under_load(mode: ConnectionMode) {
    reload_program_twenty_times_under_load("reload-demo-server", mode).await;
}

async fn reload_program_twenty_times_under_load(program: &str, mode: ConnectionMode) {
    let f = fixture("");
    let v1 = f
        .stage(&Agent::program_bytes(program, "1.0.0"), "1.0.0")
        .await;
    let v2 = f
        .stage(&Agent::program_bytes(program, "2.0.0"), "2.0.0")
        .await;
    f.activate_ok(&v1).await;
    let first_pid = f.status().await.pid;

    let run = f.load(mode);
    run.wait_for_requests(200).await;
    let mut pids = vec![first_pid];
    for i in 0..RELOADS {
        let target = if i % 2 == 0 { &v2 } else { &v1 };
        let result = f.activate_ok(target).await;
        assert_eq!(result.old_pid, *pids.last().unwrap());
        pids.push(result.new_pid);
        // Keep a steady rhythm: traffic reaches each new process before the
        // next reload.
        run.wait_for_requests(100).await;
    }
    let report = run.stop().await;
    println!("{mode:?}, {RELOADS} reloads: {}", report.summary());
    report.assert_no_failures();
    assert_eq!(
        report.by_version.keys().cloned().collect::<Vec<_>>(),
        vec!["1.0.0".to_string(), "2.0.0".to_string()],
        "{}",
        report.summary()
    );
    // Every process that was current answered, and only those did.
    let expected: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
    assert_eq!(
        expected.len(),
        RELOADS + 1,
        "each reload starts a new process"
    );
    assert!(
        report.pids.is_subset(&expected),
        "an unknown pid answered: {:?}",
        report.pids
    );
    assert!(
        report.pids.len() > RELOADS / 2,
        "the serving pid did not change: {:?}",
        report.pids
    );
    let status = f.status().await;
    assert_eq!(status.pid, *pids.last().unwrap());
    // Reload i goes to v2 when i is even: after an even count, v1 is current.
    let expected_final = if RELOADS.is_multiple_of(2) {
        "1.0.0"
    } else {
        "2.0.0"
    };
    assert_eq!(status.current_version, expected_final);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_lose_no_request_on_keep_alive_connections() {
    reload_twenty_times_under_load(ConnectionMode::KeepAlive).await;
}

/// The program `reload-bench rollout-scale` rolls out to 1,000 hosts is
/// a correct participant too: it drains keep-alive connections with
/// `Connection: close` rather than cutting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_server_of_the_scale_benchmark_loses_no_request_over_twenty_reloads() {
    reload_program_twenty_times_under_load("reload-small-server", ConnectionMode::KeepAlive).await;
}

/// A new serving process is probed as soon as it serves, not an interval
/// later: a rollout's health gate waits for the agent's verdict. The probe
/// interval here is an hour, so only that immediate probe can report it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_is_probed_at_once_not_a_probe_interval_later() {
    let fx = fixture_from(
        |addr| {
            format!(
                "[[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n\
                 [[service.listener]]\nname = \"http\"\ntcp = \"{addr}\"\n\
                 [service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"1h\"\n\
                 [service.probation]\nhealthy_for = \"0s\"\n"
            )
        },
        "",
    );
    for version in ["1.0.0", "2.0.0"] {
        let sha = fx.stage_demo(version).await;
        let result = fx.activate_ok(&sha).await;
        let status = eventually(
            format!("{version} to be reported healthy, an hour before its next probe"),
            Duration::from_secs(10),
            async || fx.agent.status("web").await,
            |s| s.health == pb::HealthState::Healthy as i32 && s.current_version == version,
        )
        .await;
        assert_eq!(status.pid, result.new_pid, "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_lose_no_request_with_a_connection_per_request() {
    reload_twenty_times_under_load(ConnectionMode::NewConnectionPerRequest).await;
}

/// A bad new version under load: the old process keeps serving with the
/// same pid, the reason is clear, and no request is lost.
async fn failed_reload_keeps_the_old_process(
    flags: &str,
    extra_service_toml: &str,
    outcome: pb::ReloadOutcome,
    reason: &str,
) {
    let f = fixture(extra_service_toml);
    let v1 = f.stage_demo("1.0.0").await;
    let bad = f.stage_script("2.0.0", flags).await;
    f.activate_ok(&v1).await;
    let before = f.status().await;

    let run = f.load(ConnectionMode::KeepAlive);
    run.wait_for_requests(200).await;
    let result = f.activate(&bad).await;
    run.wait_for_requests(200).await;
    let report = run.stop().await;

    assert_eq!(result.outcome, outcome as i32, "{result:?}");
    assert!(
        result.reason.contains(reason),
        "reason {:?} lacks {reason:?}",
        result.reason
    );
    let after = f.status().await;
    assert_eq!(after.pid, before.pid, "the old process must still serve");
    assert_eq!(after.current_version, "1.0.0");
    assert_eq!(after.state, pb::ServiceState::Running as i32);
    report.assert_no_failures();
    assert_eq!(
        report.pids.iter().copied().collect::<Vec<_>>(),
        vec![before.pid],
        "{}",
        report.summary()
    );
    // The failed process and its group are gone.
    if result.new_pid != 0 {
        assert!(
            !Path::new(&format!("/proc/{}", result.new_pid)).exists()
                || process_gone(result.new_pid)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_version_that_exits_before_ready_leaves_the_old_serving() {
    failed_reload_keeps_the_old_process(
        "--exit-before-ready 3",
        "",
        pb::ReloadOutcome::ExitedBeforeReady,
        "exit status 3",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_version_that_never_becomes_ready_is_killed_after_the_timeout() {
    failed_reload_keeps_the_old_process(
        "--never-ready",
        "[service.readiness]\ntimeout = \"2s\"\n",
        pb::ReloadOutcome::ReadyTimeout,
        "not ready within 2s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_version_that_fails_preflight_is_never_started() {
    failed_reload_keeps_the_old_process(
        "--fail-preflight",
        "",
        pb::ReloadOutcome::PreflightFailed,
        "preflight `--version` exit status 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_takes_over_the_same_socket() {
    // The fixture serves one socket only: no private health port.
    let f = fixture_from(
        |addr| web_service_toml(addr).replace("private = true\n", ""),
        "",
    );
    let script =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/python_server.py"))
            .unwrap();
    let v1 = f.stage_demo("1.0.0").await;
    let mut py = script.clone();
    py.extend_from_slice(b"# 2.0.0\n");
    let py2 = f.stage(&py, "2.0.0").await;
    py.extend_from_slice(b"# 3.0.0\n");
    let py3 = f.stage(&py, "3.0.0").await;
    f.activate_ok(&v1).await;

    let run = f.load(ConnectionMode::NewConnectionPerRequest);
    run.wait_for_requests(100).await;
    // Rust to Python, then Python to Python, on the same socket.
    f.activate_ok(&py2).await;
    run.wait_for_requests(100).await;
    f.activate_ok(&py3).await;
    run.wait_for_requests(100).await;
    let report = run.stop().await;
    println!("python takeover: {}", report.summary());
    report.assert_no_failures();
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        assert!(
            report.by_version.contains_key(version),
            "{version} never answered: {}",
            report.summary()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_is_restarted_and_clients_wait_instead_of_being_refused() {
    // A slow start makes the gap measurable: clients that connect during it
    // must be served by the restarted process, not refused.
    let f = fixture("[service.restart]\ninitial_backoff = \"200ms\"\n");
    let slow = f.stage_script("1.0.0", "--startup-delay 300ms").await;
    f.activate_ok(&slow).await;
    let before = f.status().await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Connect while nothing serves: the agent's socket queues the clients.
    let clients: Vec<_> = (0..10)
        .map(|_| tokio::spawn(http_get(f.service_addr, "/")))
        .collect();
    let mut served_by = std::collections::BTreeSet::new();
    for client in clients {
        let reply = client
            .await
            .unwrap()
            .expect("a client connecting during the restart must be served");
        assert_eq!(reply.code, 200);
        served_by.insert(reply.pid);
    }
    let after = f.status().await;
    assert_ne!(after.pid, before.pid);
    assert_eq!(after.restarts, 1);
    assert_eq!(served_by, [after.pid].into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_process_that_kept_serving() {
    let mut f = fixture("");
    let v1 = f.stage_demo("1.0.0").await;
    let v2 = f.stage_demo("2.0.0").await;
    f.activate_ok(&v1).await;
    f.activate_ok(&v2).await;
    let serving = f.status().await.pid;
    f.agent.kill();
    // The service does not depend on its agent: it runs under its shim and
    // keeps serving while no agent runs.
    let reply = http_get(f.service_addr, "/").await.unwrap();
    assert_eq!((reply.code, reply.pid), (200, serving));
    let key = f.agent.key.clone();
    f.agent = Agent::start_with_config(f.dir.path(), key);
    let status = eventually(
        "the restarted agent to report the service running",
        Duration::from_secs(20),
        async || f.status().await,
        |status| status.state == pb::ServiceState::Running as i32,
    )
    .await;
    assert_eq!(status.current_version, "2.0.0");
    assert_eq!(status.previous_version, "1.0.0");
    assert_eq!(status.pid, serving, "adopted, not restarted");
    assert_eq!(status.restarts, 0);
    let reply = http_get(f.service_addr, "/").await.unwrap();
    assert_eq!((reply.code, reply.pid), (200, serving));
    // And the adopted service reloads as any other.
    f.activate_ok(&v1).await;
    wait_for(
        "the adopted process to be drained",
        Duration::from_secs(20),
        || process_gone(serving),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_returns_to_the_previous_version_and_health_is_reported() {
    let f = fixture("");
    let v1 = f.stage_demo("1.0.0").await;
    let v2 = f.stage_demo("2.0.0").await;
    let mut control = f.agent.control().await;
    let err = control
        .rollback(pb::RollbackRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    f.activate_ok(&v1).await;
    f.activate_ok(&v2).await;
    let result = control
        .rollback(pb::RollbackRequest {
            service: "web".into(),
            allow_downgrade: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(
        result.outcome,
        pb::ReloadOutcome::Succeeded as i32,
        "{}",
        result.reason
    );
    assert_eq!(
        (result.from_version.as_str(), result.to_version.as_str()),
        ("2.0.0", "1.0.0")
    );
    let status = f.status().await;
    assert_eq!(
        (
            status.current_version.as_str(),
            status.previous_version.as_str()
        ),
        // A rollback pops the history: 2.0.0 is not "previous" now.
        ("1.0.0", "")
    );

    // /healthz/web turns 200 once the probe has seen the service healthy.
    let health = f.agent.health_addr.expect("health endpoint");
    wait_for_health(health, "/healthz/web", 200).await;
    let reply = http_get(health, "/healthz").await.unwrap();
    let (code, body) = (reply.code, reply.body);
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["services"][0]["version"], "1.0.0");
    assert_eq!(json["services"][0]["pid"], status.pid);
    assert_eq!(http_get(health, "/healthz/nope").await.unwrap().code, 404);
}

async fn wait_for_health(addr: SocketAddr, path: &str, code: u16) {
    eventually(
        format!("{path} to answer {code}"),
        Duration::from_secs(20),
        async || http_get(addr, path).await.map(|reply| reply.code),
        |answer| matches!(answer, Ok(answered) if *answered == code),
    )
    .await
    .expect("an answer, since it met the condition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_every_step_and_grpc_health_follows_the_probe() {
    let f = fixture("");
    let v1 = f.stage_demo("1.0.0").await;
    let v2 = f.stage_demo("2.0.0").await;
    f.activate_ok(&v1).await;
    let mut events = f
        .agent
        .control()
        .await
        .watch_events(pb::WatchEventsRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let result = f.activate_ok(&v2).await;
    let mut kinds = Vec::new();
    while !kinds.contains(&pb::EventKind::Done) {
        let event = tokio::time::timeout(Duration::from_secs(20), events.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        assert_eq!(event.service, "web");
        let kind = pb::EventKind::try_from(event.kind).unwrap();
        if kind == pb::EventKind::Ready {
            assert_eq!(event.pid, result.new_pid);
        }
        // Probation reports its progress: one kind in the sequence.
        if kind != pb::EventKind::HealthChanged && kinds.last() != Some(&kind) {
            kinds.push(kind);
        }
    }
    use pb::EventKind::*;
    assert_eq!(
        kinds,
        vec![Verifying, Preflight, Spawning, Ready, Probation, Draining, Done]
    );

    // A watch of an unknown service is refused, not silent.
    let err = f
        .agent
        .control()
        .await
        .watch_events(pb::WatchEventsRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let mut health = tonic_health::pb::health_client::HealthClient::new(f.agent.channel().await);
    eventually(
        "the gRPC health of web to be SERVING",
        Duration::from_secs(20),
        async || {
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "web".into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .ok()
        },
        |status| {
            *status == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_unix_and_udp_listeners_are_all_handed_over_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unix_path = dir.path().join("admin.sock");
    let config = format!(
        "[[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n\
         [[service.listener]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n\
         [[service.listener]]\nname = \"admin\"\nunix = \"{}\"\n\
         [[service.listener]]\nname = \"metrics\"\nudp = \"127.0.0.1:{udp_port}\"\n",
        unix_path.display()
    );
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    let v1 = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    let result = agent.activate_ok("web", &v1, Downgrade::NotAllowed).await;
    let pid = result.new_pid;
    // The environment the service got, and what its fds 3-5 are.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    assert!(environ.contains(&"LISTEN_FDS=3".to_string()), "{environ:?}");
    assert!(
        environ.contains(&"LISTEN_FDNAMES=http:admin:metrics".to_string()),
        "{environ:?}"
    );
    assert!(
        environ.contains(&format!("LISTEN_PID={pid}")),
        "{environ:?}"
    );
    let inode = |fd: u32| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .unwrap()
            .display()
            .to_string()
    };
    for fd in [3, 4, 5] {
        assert!(inode(fd).starts_with("socket:"), "fd {fd} is {}", inode(fd));
    }
    // The same sockets as the agent's: the inodes match the agent's fds.
    let agent_sockets: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    for fd in [3, 4, 5] {
        assert!(
            agent_sockets.contains(&inode(fd)),
            "fd {fd} is not one of the agent's sockets"
        );
    }
    // The Unix socket path exists and accepts (the kernel queues it).
    assert!(std::os::unix::net::UnixStream::connect(&unix_path).is_ok());
    // The serving socket works through the handed-over TCP listener.
    let reply = http_get(SocketAddr::new([127, 0, 0, 1].into(), port), "/")
        .await
        .unwrap();
    assert_eq!((reply.code, reply.pid), (200, pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_mid_reload_does_not_cancel_it() {
    let f = fixture("");
    let v1 = f.stage_demo("1.0.0").await;
    f.activate_ok(&v1).await;
    let old_pid = f.status().await.pid;
    // Ready only after 1.5 s: the caller gives up long before.
    let slow = f.stage_script("2.0.0", "--startup-delay 1500ms").await;
    let gave_up = tokio::time::timeout(Duration::from_millis(300), f.activate(&slow)).await;
    assert!(
        gave_up.is_err(),
        "the reload finished before the caller left"
    );
    // The agent finishes it: the new process serves, the old one drained,
    // and the state is not left at RELOADING.
    let status = eventually(
        "the abandoned reload to finish",
        Duration::from_secs(20),
        async || f.status().await,
        |status| status.state == pb::ServiceState::Running as i32 && status.current_sha256 == slow,
    )
    .await;
    assert_ne!(status.pid, old_pid);
    wait_for("the old process to drain", Duration::from_secs(15), || {
        process_gone(old_pid)
    })
    .await;
    let reply = http_get(f.service_addr, "/").await.unwrap();
    assert_eq!((reply.code, reply.pid), (200, status.pid));
    let audit = std::fs::read_to_string(f.dir.path().join("state/audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"call\":\"Activate\"") && l.contains(&slow)),
        "the abandoned Activate is audited: {audit}"
    );
}

/// The size limit is a rule of the one artifact verifier, not of the upload
/// path alone: a release admitted under a larger `max_artifact_size` is
/// refused at activation once the agent's limit is below its size, and the
/// serving process goes on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_enforces_the_size_limit_too() {
    let mut f = fixture("");
    // Two scripts that run the demo server: v1 small, v2 padded to 8 KiB.
    let v1 = f.stage_script("1.0.0", "").await;
    let padded = format!(
        "#!/bin/sh\n#{}\nexec '{}' \"$@\"\n",
        "x".repeat(8 * 1024),
        bin_path("reload-demo-server").display()
    );
    let v2 = f.stage(padded.as_bytes(), "2.0.0").await;
    f.activate_ok(&v1).await;
    // The same agent again, with a limit between the two sizes.
    f.agent.kill();
    let config = std::fs::read_to_string(f.dir.path().join("agent.toml")).unwrap();
    std::fs::write(
        f.dir.path().join("agent.toml"),
        format!("{config}\n[limits]\nmax_artifact_size = \"4 KiB\"\n"),
    )
    .unwrap();
    let key = f.agent.key.clone();
    f.agent = Agent::start_with_config(f.dir.path(), key);
    let serving = eventually(
        "v1 (under the limit) to run again",
        Duration::from_secs(20),
        async || f.status().await,
        |status| status.state == pb::ServiceState::Running as i32,
    )
    .await;
    assert_eq!(serving.current_version, "1.0.0");

    let result = f.activate(&v2).await;
    assert_eq!(
        result.outcome,
        pb::ReloadOutcome::VerificationFailed as i32,
        "{result:?}"
    );
    assert!(
        result.reason.contains("max_artifact_size"),
        "the reason names the limit: {}",
        result.reason
    );
    let after = f.status().await;
    assert_eq!(
        (after.pid, after.current_version.as_str()),
        (serving.pid, "1.0.0")
    );
    let reply = http_get(f.service_addr, "/").await.unwrap();
    assert_eq!((reply.code, reply.pid), (200, serving.pid));
}
