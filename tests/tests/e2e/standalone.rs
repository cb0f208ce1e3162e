//! End-to-end: the demo server upgrading itself without an agent
//! (`--self-upgrade`): SIGHUP starts the binary now at its path with the
//! same socket, waits for READY, then the old process drains and exits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reload_tests::load::{ConnectionMode, LoadConfig, LoadRun};
use reload_tests::*;

struct Standalone {
    dir: tempfile::TempDir,
    exe: PathBuf,
    addr: SocketAddr,
    first: Child,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        // Whoever serves now, and the first process.
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
    }
}

/// Starts the demo server with `--self-upgrade` from a copy of its binary
/// in a fresh folder (the path a new build is renamed to), logging to
/// `demo.log` there; waits for its pid file.
async fn start(upstream_notify: Option<&Path>) -> Standalone {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("demo");
    std::fs::copy(bin_path("reload-demo-server"), &exe).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(&exe);
    command
        .args([
            "--bind",
            &addr.to_string(),
            "--self-upgrade",
            "--pid-file",
            "pid",
            "--drain-timeout",
            "5s",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("demo.log")).unwrap());
    if let Some(socket) = upstream_notify {
        command.env("NOTIFY_SOCKET", socket);
    }
    let first = command.spawn().unwrap();
    let s = Standalone {
        dir,
        exe,
        addr,
        first,
    };
    eventually(
        "the demo server to write its pid file",
        Duration::from_secs(20),
        async || s.pid(),
        Option::is_some,
    )
    .await;
    s
}

impl Standalone {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// What the demo server processes logged (they share one stderr).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("demo.log")).unwrap_or_default()
    }

    /// SIGHUP to the serving process; waits for the pid file to name a new
    /// process and the old one to be gone. Returns the new pid.
    async fn upgrade(&self) -> u32 {
        let old = self.pid().unwrap();
        sighup(old);
        eventually(
            "the pid file to name a new process",
            Duration::from_secs(20),
            async || self.pid(),
            |pid| *pid != Some(old),
        )
        .await;
        wait_for("the old process to exit", Duration::from_secs(20), || {
            process_gone(old)
        })
        .await;
        self.pid().unwrap()
    }

    fn load(&self) -> LoadRun {
        LoadRun::start(LoadConfig {
            addr: self.addr,
            path: "/".into(),
            connections: 50,
            mode: ConnectionMode::KeepAlive,
            request_timeout: Duration::from_secs(10),
        })
    }

    /// Replaces the file at the executable's path atomically.
    fn replace_exe(&self, bytes: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let next = self.dir.path().join("demo.next");
        std::fs::write(&next, bytes).unwrap();
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&next, &self.exe).unwrap();
    }
}

fn sighup(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.get(1) == Some(&pid.to_string().as_str()) && fields.first() != Some(&"Z") {
            children.push(child);
        }
    }
    children
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_self_upgrades_under_load_lose_no_request() {
    let upstream_dir = tempfile::tempdir().unwrap();
    let upstream_path = upstream_dir.path().join("notify.sock");
    let upstream = std::os::unix::net::UnixDatagram::bind(&upstream_path).unwrap();
    // Read as a supervisor does, all along: a datagram queue holds only a
    // few messages, and a full one blocks the sender.
    upstream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop_listening = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let (heard, stop) = (heard.clone(), stop_listening.clone());
        std::thread::spawn(move || {
            let mut buffer = [0u8; 512];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(n) = upstream.recv(&mut buffer) {
                    heard
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buffer[..n]).into_owned());
                }
            }
        })
    };
    let s = start(Some(&upstream_path)).await;
    let first = s.pid().unwrap();
    let run = s.load();
    let mut pids = vec![first];
    for i in 0..20 {
        if i == 10 {
            // A new build renamed into place is what the next upgrade runs.
            let mut next = std::fs::read(bin_path("reload-demo-server")).unwrap();
            next.extend_from_slice(b"\nnext build\n");
            s.replace_exe(&next);
        }
        pids.push(s.upgrade().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = run.stop().await;
    println!("20 self-upgrades: {}", report.summary());
    assert_eq!(
        report.failures,
        0,
        "{}\n{:#?}",
        report.summary(),
        report.failure_samples
    );
    assert_eq!(report.non_200, 0);
    assert!(
        report.pids.len() > 10,
        "the serving pid did not change: {:?}",
        report.pids
    );
    // The last process runs the renamed file.
    let running = std::fs::read(format!("/proc/{}/exe", pids[20])).unwrap();
    assert!(
        running.ends_with(b"\nnext build\n"),
        "the new file at the path was not the one started"
    );
    // The supervisor above heard READY=1 at start, then each new main pid.
    stop_listening.store(true, std::sync::atomic::Ordering::SeqCst);
    listener.join().unwrap();
    let messages = heard.lock().unwrap().clone();
    let mainpids: Vec<String> = messages
        .iter()
        .filter_map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MAINPID=").map(str::to_string))
        })
        .collect();
    let expected: Vec<String> = pids[1..].iter().map(|p| p.to_string()).collect();
    assert_eq!(mainpids, expected, "{messages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_build_that_exits_before_ready_leaves_the_old_one_serving() {
    let s = start(None).await;
    let pid = s.pid().unwrap();
    let good = std::fs::read(&s.exe).unwrap();
    let run = s.load();
    let script = format!(
        "#!/bin/sh\nexec '{}' --exit-before-ready 3 \"$@\"\n",
        bin_path("reload-demo-server").display()
    );
    s.replace_exe(script.as_bytes());
    sighup(pid);
    // The failed child is started, exits, and is reaped; the parent says
    // so and serves on.
    eventually(
        "the serving process to report the failed self-upgrade",
        Duration::from_secs(20),
        async || s.log(),
        |log| log.contains("self-upgrade failed"),
    )
    .await;
    wait_for(
        "the failed child to be reaped",
        Duration::from_secs(10),
        || children_of(pid).is_empty(),
    )
    .await;
    assert_eq!(s.pid(), Some(pid));
    let report = run.stop().await;
    assert_eq!(report.failures, 0, "{}", report.summary());
    assert_eq!(report.pids.iter().copied().collect::<Vec<_>>(), vec![pid]);
    // A good build upgrades as usual afterwards.
    s.replace_exe(&good);
    assert_ne!(s.upgrade().await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_storm_upgrades_one_at_a_time_without_leaking() {
    let s = start(None).await;
    // The baseline is a process our own spawn started: the first one also
    // holds what the test runner leaked into it, which the spawn (rightly)
    // does not pass on.
    let before = s.upgrade().await;
    let fds_before = fd_count(before);
    for _ in 0..10 {
        if let Some(pid) = s.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }
    // Settled: the pid file stays put for a while and its process serves.
    settled(
        "the pid file after the SIGHUP storm",
        Duration::from_secs(60),
        Duration::from_secs(2),
        async || s.pid(),
    )
    .await;
    let after = s.pid().unwrap();
    assert_ne!(after, before, "no upgrade happened");
    // Exactly one process runs our binary, with no children, and the same
    // number of open fds as the first upgraded one had.
    let running: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| !process_gone(*pid))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p == s.exe)
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(running, vec![after], "processes of this binary left behind");
    assert!(children_of(after).is_empty());
    assert_eq!(
        fd_count(after),
        fds_before,
        "open fds differ from the first upgraded process"
    );
    let (code, _) = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        (text.get(9..12).unwrap_or("").to_string(), text)
    };
    assert_eq!(code, "200");
}

#[tokio::test]
async fn the_demo_server_runs_under_systemd_socket_activate() {
    let Some(activate) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .iter()
    .find(|p| Path::new(p).exists()) else {
        // Loud, not silent: install the Debian package `systemd` to run it.
        panic!("systemd-socket-activate is missing: .ci/run installs the Debian package systemd for this test");
    };
    let port = free_port();
    let child = KillOnDrop(
        Command::new(activate)
            .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=http"])
            .arg(bin_path("reload-demo-server"))
            .args(["--bind", "127.0.0.1:1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // systemd-socket-activate binds first and starts the server on the first
    // connection; the server must serve on the socket it was given (its own
    // fallback address, port 1, would fail).
    let answer = eventually(
        "the demo server, started by the first connection, to answer 200",
        Duration::from_secs(20),
        async || -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            Ok(answer)
        },
        |answer| {
            answer
                .as_ref()
                .is_ok_and(|answer| answer.starts_with("HTTP/1.1 200"))
        },
    )
    .await
    .unwrap();
    drop(child);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The agent as a systemd service: READY=1 once gRPC serves, STOPPING=1
/// when it stops, and the gRPC port taken from socket activation.
#[tokio::test]
async fn the_agent_speaks_sd_notify_and_takes_its_grpc_socket_from_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reloadctl_ok(d, &["keygen", "--out", "release"]);
    std::fs::write(
        d.join("agent.toml"),
        "[agent]\ninsecure = true\nlisten = [\"127.0.0.1:1\"]\nhealth_listen = \"127.0.0.1:0\"\ntrusted_keys = [\"release.pub\"]\n",
    )
    .unwrap();
    let notify_path = d.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let activate = ["/usr/bin/systemd-socket-activate", "/bin/systemd-socket-activate"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("systemd-socket-activate is missing: .ci/run installs the Debian package systemd for this test");
    let port = free_port();
    // [agent] listen is port 1 (unusable): serving at all proves the agent
    // took the socket it was given.
    let mut agent = KillOnDrop(
        Command::new(activate)
            .args([
                "-l",
                &format!("127.0.0.1:{port}"),
                "--fdname=grpc",
                "-E",
                &format!("NOTIFY_SOCKET={}", notify_path.display()),
            ])
            .arg(bin_path("reload-agent"))
            .args(["--config", "agent.toml"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let host = format!("127.0.0.1:{port}");
    // The first connection starts the agent (once the activator listens).
    let out = eventually(
        "the agent, started by the first connection, to answer `reloadctl artifacts`",
        Duration::from_secs(20),
        async || reloadctl(d, &["artifacts", "--host", &host]),
        |out| out.status.success(),
    )
    .await;
    let mut buffer = [0u8; 256];
    let n = notify.recv(&mut buffer).expect("READY=1 from the agent");
    let ready = String::from_utf8_lossy(&buffer[..n]).into_owned();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut stopping = String::new();
    while let Ok(n) = notify.recv(&mut buffer) {
        stopping = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if stopping.contains("STOPPING=1") {
            break;
        }
    }
    let _ = agent.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
}

/// `h2load` itself against the standalone self-upgrade: runs of 20
/// connections with 10 streams each, back to back through 10 upgrades
/// (`reload_tests::h2load` says why each run has as many requests as
/// streams). Every stream of every run is answered, and the old processes
/// drained connections of those runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_through_ten_self_upgrades_gets_every_stream_answered() {
    use reload_tests::h2load::H2loadLoop;
    let s = start(None).await;
    let load = H2loadLoop::start(s.addr, 20, 10);
    load.wait_for_runs(3).await;
    let mut upgrades = Vec::new();
    for _ in 0..10 {
        let asked = std::time::Instant::now();
        // Returns once the old process drained and exited.
        s.upgrade().await;
        upgrades.push((asked, std::time::Instant::now()));
        load.wait_for_runs(3).await;
    }
    let report = load.stop();
    let log = s.log();
    let drains_with_connections = log
        .lines()
        .filter(|l| l.contains("draining open_connections=") && !l.contains("open_connections=0 "))
        .count();
    println!(
        "h2load -c 20 -m 10 -n 200, back to back, 10 self-upgrades: {}; \
         {drains_with_connections} of the drains had connections open",
        report.summary()
    );
    report.assert_all_succeeded();
    for (i, (asked, done)) in upgrades.iter().enumerate() {
        assert!(
            report.runs_during(*asked, *done) > 0,
            "no h2load run was under way during upgrade {i}: {}",
            report.summary()
        );
    }
    assert!(
        drains_with_connections > 0,
        "no old process had a connection open when it drained:\n{log}"
    );
}

/// The standalone self-upgrade drains HTTP/2 too: 20 connections with 10
/// streams in flight each, 10 upgrades, no stream fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_self_upgrades_lose_no_http2_stream() {
    use reload_tests::h2::{H2LoadConfig, H2LoadRun};
    let s = start(None).await;
    let run = H2LoadRun::start(H2LoadConfig {
        addr: s.addr,
        path: "/".into(),
        connections: 20,
        streams: 10,
        request_timeout: Duration::from_secs(10),
    });
    run.wait_for_requests(500).await;
    let mut pids = vec![s.pid().unwrap()];
    for _ in 0..10 {
        pids.push(s.upgrade().await);
        run.wait_for_requests(200).await;
    }
    let connections = run.connection_summary();
    let opened = run
        .totals
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    let report = run.stop().await;
    println!(
        "HTTP/2 over 10 self-upgrades: {}; {connections}",
        report.summary()
    );
    report.assert_no_failures();
    assert!(
        report.pids.len() > 5,
        "the serving pid did not change: {:?}",
        report.pids
    );
    assert!(
        report.pids.iter().all(|p| pids.contains(p)),
        "an unknown pid answered: {:?} vs {pids:?}",
        report.pids
    );
    assert!(opened >= 100, "{connections}");
}
