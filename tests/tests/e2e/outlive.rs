//! End-to-end: services outlive their agent. Each service process runs under
//! a shim (`reload-agent --shim`), so a crash, kill or restart of the agent
//! costs no request; the next agent adopts what runs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::load::{ConnectionMode, LoadConfig, LoadReport, LoadRun};
use reload_tests::*;

/// The gap between an agent's end and its restart: what systemd's
/// `Restart=` with `RestartSec=100ms` does. A deliberate fault-injection
/// gap, not a synchronisation.
const RESTART_GAP: Duration = Duration::from_millis(100);

/// A demo service named `name` on `addr`, with `extra` appended.
fn demo_service_toml(name: &str, addr: SocketAddr, extra: &str) -> String {
    web_service_toml(addr).replace("name = \"web\"", &format!("name = \"{name}\"")) + extra
}

fn load(addr: SocketAddr, mode: ConnectionMode) -> LoadRun {
    LoadRun::start(LoadConfig {
        addr,
        path: "/".into(),
        connections: 10,
        mode,
        request_timeout: Duration::from_secs(10),
    })
}

/// Restarts the agent of `dir` after [`RESTART_GAP`], as a service manager
/// would, and waits until it reports `services` running with `pids`.
async fn restart(agent: &mut Agent, dir: &Path, services: &[(&str, u32)]) {
    tokio::time::sleep(RESTART_GAP).await;
    *agent = Agent::start_with_config(dir, agent.key.clone());
    for (service, pid) in services {
        let status = eventually(
            format!("the restarted agent to report {service} running"),
            Duration::from_secs(20),
            async || agent.status(service).await,
            |s| s.state == pb::ServiceState::Running as i32,
        )
        .await;
        assert_eq!(
            status.pid,
            *pid,
            "{service} adopted, not restarted\n{}",
            agent.log_text()
        );
    }
}

/// An agent in `dir` running the demo server as service `web` (1.0.0,
/// `sha`) on `addr`.
async fn web_running(dir: &Path) -> (Agent, SocketAddr, String) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = Agent::start(
        dir,
        Arc::new(SigningKey::generate()),
        &web_service_toml(addr),
    );
    let sha = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    agent.activate_ok("web", &sha, Downgrade::NotAllowed).await;
    (agent, addr, sha)
}

/// What `systemctl stop` (or the first half of `systemctl restart`) sends:
/// SIGTERM; the agent exits 0 and leaves its services running.
async fn terminate(agent: &mut Agent) {
    send_signal(agent.pid(), Signal::SIGTERM);
    let status = eventually(
        "the agent to exit on SIGTERM",
        Duration::from_secs(20),
        async || agent.try_wait(),
        Option::is_some,
    )
    .await
    .expect("checked");
    assert_eq!(status.code(), Some(0), "{}", agent.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_lose_no_request_while_their_agent_is_killed_terminated_and_killed_again() {
    let dir = tempfile::tempdir().unwrap();
    let (web_addr, api_addr): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let config = demo_service_toml("web", web_addr, "") + &demo_service_toml("api", api_addr, "");
    let mut agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    let demo = Agent::demo_server_bytes("1.0.0");
    for service in ["web", "api"] {
        let sha = agent.stage(service, "1.0.0", &demo).await;
        agent
            .activate_ok(service, &sha, Downgrade::NotAllowed)
            .await;
    }
    let pids = [
        ("web", agent.status("web").await.pid),
        ("api", agent.status("api").await.pid),
    ];
    // A keep-alive client on one service, a connection per request on the
    // other: neither retries, so any drop is counted.
    let keep_alive = load(web_addr, ConnectionMode::KeepAlive);
    let per_request = load(api_addr, ConnectionMode::NewConnectionPerRequest);
    for fault in [Signal::SIGKILL, Signal::SIGTERM, Signal::SIGKILL] {
        keep_alive.wait_for_requests(200).await;
        per_request.wait_for_requests(200).await;
        match fault {
            Signal::SIGTERM => terminate(&mut agent).await,
            _ => agent.kill(),
        }
        // While no agent runs, both go on serving.
        keep_alive.wait_for_requests(200).await;
        per_request.wait_for_requests(200).await;
        restart(&mut agent, dir.path(), &pids).await;
    }
    // Still reloadable: a full handoff under load after the third restart.
    let v2 = agent
        .stage("web", "2.0.0", &Agent::demo_server_bytes("2.0.0"))
        .await;
    let reload = agent.activate_ok("web", &v2, Downgrade::NotAllowed).await;
    assert_eq!(reload.old_pid, pids[0].1);
    keep_alive.wait_for_requests(200).await;
    let (web, api): (LoadReport, LoadReport) = (keep_alive.stop().await, per_request.stop().await);
    println!("web (keep-alive): {}", web.summary());
    println!("api (connection per request): {}", api.summary());
    web.assert_no_failures();
    api.assert_no_failures();
    assert!(web.pids.contains(&reload.new_pid), "the new release served");
    assert_eq!(
        api.pids.iter().copied().collect::<Vec<_>>(),
        vec![pids[1].1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_exits_while_no_agent_runs_is_restarted_and_its_exit_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, addr, _) = web_running(dir.path()).await;
    let old = agent.status("web").await.pid;
    agent.kill();
    send_signal(old, Signal::SIGKILL);
    wait_for("the service to die", Duration::from_secs(10), || {
        process_gone(old)
    })
    .await;
    tokio::time::sleep(RESTART_GAP).await;
    agent = Agent::start_with_config(dir.path(), agent.key.clone());
    let status = eventually(
        "the new agent to restart the service",
        Duration::from_secs(20),
        async || agent.status("web").await,
        |s| s.state == pb::ServiceState::Running as i32,
    )
    .await;
    assert_ne!(status.pid, old);
    assert_eq!(status.restarts, 1);
    let log = agent.log_text();
    assert!(
        log.contains(&format!(
            "pid {old} killed by SIGKILL while no agent was running"
        )),
        "the exit status is reported:\n{log}"
    );
    assert_eq!(http_get(addr, "/").await.unwrap().pid, status.pid);
}

/// A service that writes 300 MiB without a newline, then one line: the
/// agent's memory stays bounded, the service never blocks on its output
/// (not even while no agent runs), and its output reaches the next agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_without_newlines_is_bounded_and_never_blocks_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let progress = dir.path().join("progress");
    let script = format!(
        r#"#!/usr/bin/env python3
import sys, time
if sys.argv[1:] == ["--version"]:
    print("writer 1.0"); sys.exit(0)
chunk = b"x" * (1 << 20)
longest = 0.0
for mib in range(1, 301):
    start = time.monotonic()
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    longest = max(longest, time.monotonic() - start)
    with open("{progress}", "w") as f:
        f.write(str(mib))
    # Slow enough that the agent is killed and restarted mid-stream.
    time.sleep(0.01)
sys.stdout.buffer.write(("\nwrote 300 MiB; longest write %.3f s\n" % longest).encode())
sys.stdout.buffer.flush()
time.sleep(3600)
"#,
        progress = progress.display()
    );
    let config =
        "[[service]]\nname = \"writer\"\n[service.readiness]\nkind = \"delay\"\ndelay = \"50ms\"\n";
    let mut agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), config);
    let sha = agent.stage("writer", "1.0.0", script.as_bytes()).await;
    agent
        .activate_ok("writer", &sha, Downgrade::NotAllowed)
        .await;
    let written = || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let mut largest_rss = 0;
    let up = eventually(
        "the service to write 100 MiB while the agent reads it",
        Duration::from_secs(120),
        async || {
            largest_rss = largest_rss.max(rss_kib(agent.pid()));
            written()
        },
        |mib| *mib >= 100,
    )
    .await;
    agent.kill();
    // No agent: the service goes on writing (the shim reads it).
    eventually(
        "the service to write 50 MiB more while no agent runs",
        Duration::from_secs(60),
        async || written(),
        |mib| *mib >= up + 50,
    )
    .await;
    agent = Agent::start_with_config(dir.path(), agent.key.clone());
    let line = eventually(
        "the service's last line to reach the new agent's log",
        Duration::from_secs(120),
        async || {
            largest_rss = largest_rss.max(rss_kib(agent.pid()));
            let log = agent.log_text();
            log.find("wrote 300 MiB; longest write ")
                .map(|at| log[at..].lines().next().unwrap_or("").to_string())
        },
        Option::is_some,
    )
    .await
    .expect("checked");
    let longest: f64 = line
        .trim_start_matches("wrote 300 MiB; longest write ")
        .split(' ')
        .next()
        .and_then(|s| s.trim_end_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {line}"));
    println!("agent RSS at most {largest_rss} KiB; the service's longest write {longest} s");
    assert!(longest < 1.0, "a write blocked for {longest} s");
    assert!(
        largest_rss < 64 * 1024,
        "agent RSS reached {largest_rss} KiB"
    );
}

/// Resident memory of `pid` in KiB (0 if it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A release that becomes ready, forks a worker into its process group,
/// then crashes: the worker is gone before the restart, and the restart
/// delay grows to `max_backoff` over the crash loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_kills_the_workers_and_backs_off_to_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let workers = dir.path().join("workers");
    // A worker forked into the group, then the release itself: READY=1,
    // and an exit (status 3) 300 ms later.
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo crashy 1.0; exit 0; }}\n\
         sleep 1000 &\necho $! >> '{workers}'\n\
         exec '{demo}' \"$@\" --exit-after-ready 300ms\n",
        workers = workers.display(),
        demo = bin_path("reload-demo-server").display()
    );
    // Probation off: this is about crashes after an activation counted.
    let config = web_service_toml(addr).replace("healthy_for = \"300ms\"", "healthy_for = \"0s\"")
        + "[service.restart]\ninitial_backoff = \"100ms\"\nmax_backoff = \"800ms\"\n";
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    let sha = agent.stage("web", "1.0.0", script.as_bytes()).await;
    agent.activate_ok("web", &sha, Downgrade::NotAllowed).await;
    let delays = eventually(
        "six crashes of the release",
        Duration::from_secs(60),
        async || restart_delays(&agent.log_text()),
        |delays| delays.len() >= 6,
    )
    .await;
    assert_eq!(
        &delays[..6],
        &["100ms", "200ms", "400ms", "800ms", "800ms", "800ms"],
        "{}",
        agent.log_text()
    );
    // Every worker of a process that crashed is gone (the last one may
    // belong to the process running now).
    let pids: Vec<u32> = std::fs::read_to_string(&workers)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(pids.len() >= 6, "{pids:?}");
    for pid in &pids[..5] {
        assert!(
            process_gone(*pid),
            "worker {pid} outlived its crashed service"
        );
    }
}

/// The restart delays the agent announced, in order.
fn restart_delays(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let at = line.find("exited unexpectedly")?;
            let rest = &line[at..];
            let delay = rest.split("restarting in ").nth(1)?.split(';').next()?;
            Some(delay.to_string())
        })
        .collect()
}

/// An fd the agent inherited from whatever started it (here: the test,
/// with close-on-exec cleared) reaches neither the shim nor the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_sees_no_fd_of_the_agents_launcher() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let marker = dir.path().join("launcher-secret");
    let file = std::fs::File::create(&marker).unwrap();
    let fd = file.as_raw_fd();
    // Inheritable, as a careless launcher would leave it.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let agent = Agent::start(
        dir.path(),
        Arc::new(SigningKey::generate()),
        &web_service_toml(addr),
    );
    let open_in = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        open_in(agent.pid())
            .iter()
            .any(|p| p == &marker.display().to_string()),
        "the test's setup: the agent inherited fd {fd}"
    );
    let sha = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    agent.activate_ok("web", &sha, Downgrade::NotAllowed).await;
    let service = agent.status("web").await.pid;
    let shims = agent.shim_pids();
    assert_eq!(shims.len(), 1);
    // Nor can another user reach the shims' sockets.
    let run = std::fs::metadata(dir.path().join("state/run")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&run.permissions()) & 0o777,
        0o700
    );
    for pid in [service, shims[0]] {
        let open = open_in(pid);
        assert!(
            !open.iter().any(|p| p == &marker.display().to_string()),
            "pid {pid} holds the launcher's fd: {open:?}"
        );
    }
    drop(file);
}

/// Stopping services is explicit: `reloadctl stop` drains the process,
/// leaves the socket open, is audited, and the service stays stopped
/// across an agent restart until the next activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloadctl_stop_stops_a_service_until_its_next_activation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, addr, sha) = web_running(dir.path()).await;
    let pid = agent.status("web").await.pid;
    let host = agent.addr.to_string();
    let out = reloadctl_ok(dir.path(), &["stop", "--host", &host, "--service", "web"]);
    assert!(
        out.contains(&format!("web stopped (pid {pid} drained")),
        "{out}"
    );
    assert!(process_gone(pid));
    let status = agent.status("web").await;
    assert_eq!(
        (status.state, status.pid),
        (pb::ServiceState::Stopped as i32, 0)
    );
    let audit = std::fs::read_to_string(dir.path().join("state/audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"call\":\"StopService\"") && l.contains("\"result\":\"ok\"")),
        "{audit}"
    );
    // The listening socket stays open: a client waits in the backlog.
    let queued = tokio::net::TcpStream::connect(addr).await;
    assert!(queued.is_ok(), "the socket was closed: {queued:?}");
    drop(queued);

    // Stopped stays stopped across an agent restart...
    agent.kill();
    agent = Agent::start_with_config(dir.path(), agent.key.clone());
    // (Well past the restart backoff, which would have started it.)
    let state = settled(
        "the service's state after the agent restart",
        Duration::from_secs(10),
        Duration::from_secs(1),
        async || agent.status("web").await.state,
    )
    .await;
    assert_eq!(state, pb::ServiceState::Stopped as i32);
    assert!(agent.shim_pids().is_empty(), "nothing was started");
    // ...until the next activation.
    agent.activate_ok("web", &sha, Downgrade::NotAllowed).await;
    let started = agent.status("web").await.pid;
    assert_eq!(http_get(addr, "/").await.unwrap().pid, started);
}
