//! End-to-end: under systemd, the agent gives every service listener to
//! the service manager's fd store (`FDSTORE=1`), so an agent *crash* does
//! not close them: a client that connects while no agent runs waits in the
//! backlog and is answered once the restarted agent, handed the stored
//! sockets back, has started the service again.
//!
//! The test plays systemd: it owns the NOTIFY_SOCKET, keeps the fds the
//! agent sends with SCM_RIGHTS, and passes them back by socket activation
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`) to the next agent.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::*;

/// One datagram from the agent, with any fds it carried.
fn receive(socket: &UnixDatagram, deadline: Instant) -> Option<(String, Vec<OwnedFd>)> {
    let left = deadline.checked_duration_since(Instant::now())?;
    socket.set_read_timeout(Some(left)).unwrap();
    let mut buffer = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .ok()?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these fds in this process
            // for this message; nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let len = message.bytes;
    Some((String::from_utf8_lossy(&buffer[..len]).into_owned(), fds))
}

/// Reads notifications until one stores `name`; returns its fd.
fn stored_fd(socket: &UnixDatagram, name: &str) -> OwnedFd {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some((message, mut fds)) = receive(socket, deadline) {
        if message.lines().any(|l| l == "FDSTORE=1")
            && message.lines().any(|l| l == format!("FDNAME={name}"))
        {
            assert_eq!(fds.len(), 1, "{message}");
            return fds.pop().unwrap();
        }
        seen.push(message);
    }
    panic!("no FDSTORE=1 for {name} within 20s; got {seen:?}");
}

fn local_addr(fd: &OwnedFd) -> SocketAddr {
    let addr: SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd()).unwrap();
    let v4 = addr.as_sockaddr_in().expect("an IPv4 listener");
    SocketAddr::from((v4.ip(), v4.port()))
}

/// How many connections wait in the accept queue of the TCP listener at
/// `addr` (from /proc/net/tcp, where a listening socket's `rx_queue` is its
/// accept queue); `None` if nothing listens there.
fn accept_queue(addr: SocketAddr) -> Option<u32> {
    let SocketAddr::V4(addr) = addr else {
        panic!("an IPv4 listener");
    };
    // The address as the kernel prints it: the IPv4 address as a native
    // endian word, then the port.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(addr.ip().octets()),
        addr.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl, local_address, rem_address, st (0A: LISTEN), tx_queue:rx_queue
        if fields.get(1) != Some(&local.as_str()) || fields.get(3) != Some(&"0A") {
            return None;
        }
        let (_, rx_queue) = fields.get(4)?.split_once(':')?;
        u32::from_str_radix(rx_queue, 16).ok()
    })
}

fn agent_command(dir: &Path, notify: &Path, stored: &[(String, OwnedFd)]) -> Command {
    let args: Vec<String> = Agent::ARGS.iter().map(|a| a.to_string()).collect();
    let program = bin_path("reload-agent");
    let env = vec![
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_default(),
        ),
        ("RUST_LOG".to_string(), "info".to_string()),
        ("NOTIFY_SOCKET".to_string(), notify.display().to_string()),
    ];
    // What systemd does on a restart: the stored fds at 3.. with
    // LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID.
    reload_server::spawn::command(reload_server::spawn::SpawnSpec {
        program: &program,
        args: &args,
        env,
        working_dir: dir,
        sockets: stored
            .iter()
            .map(|(name, fd)| (name.clone(), fd.as_fd()))
            .collect(),
        die_with_parent: false,
        own_process_group: false,
        image: None,
    })
    .unwrap()
}

/// A client of `addr` while nothing serves it: queued, not refused (the
/// kernel completes the handshake and keeps the connection in the
/// listener's accept queue until someone accepts). Its request, still
/// waiting for an answer.
async fn a_client_queued_in_the_backlog(
    addr: SocketAddr,
) -> tokio::task::JoinHandle<std::io::Result<HttpReply>> {
    let waiting = tokio::spawn(http_get(addr, "/"));
    eventually(
        "the client's connection to wait in the listener's accept queue",
        Duration::from_secs(20),
        async || {
            assert!(
                !waiting.is_finished(),
                "the client was refused or reset instead of queued"
            );
            accept_queue(addr)
        },
        |queued| *queued == Some(1),
    )
    .await;
    assert!(
        !waiting.is_finished(),
        "the client was refused or reset instead of queued"
    );
    waiting
}

/// Writes agent.toml (and the key) for one service `web` listening at
/// `service_addr`: [`Agent::start`] does, and that first agent is stopped
/// at once, to be replaced by one that runs under our "systemd".
fn write_agent_config(dir: &Path, key: Arc<SigningKey>, service_addr: SocketAddr) {
    let config = format!(
        "[[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n\
         [[service.listener]]\nname = \"http\"\ntcp = \"{service_addr}\"\n"
    );
    Agent::start(dir, key, &config).kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_in_the_fd_store_survive_an_agent_crash_and_queued_clients_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(SigningKey::generate());
    let service_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    write_agent_config(dir.path(), key.clone(), service_addr);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();

    let mut first = Agent::start_command(
        dir.path(),
        key.clone(),
        agent_command(dir.path(), &notify_path, &[]),
    );
    let name = "reload-svc/web/http";
    let stored = stored_fd(&notify, name);
    assert_eq!(
        local_addr(&stored),
        service_addr,
        "the stored fd is the service's listener"
    );
    let sha = first
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    first.activate_ok("web", &sha, Downgrade::NotAllowed).await;
    let old_pid = first.status("web").await.pid;
    assert_eq!(http_get(service_addr, "/").await.unwrap().code, 200);

    // The worst crash: the agent is gone, and so are its service and the
    // service's shim (kill -9 of them all). Only "systemd" holds the
    // listening socket now.
    first.kill();
    first.kill_services();
    wait_for(
        "the service to be gone with its agent",
        Duration::from_secs(15),
        || process_gone(old_pid),
    )
    .await;
    let waiting = a_client_queued_in_the_backlog(service_addr).await;

    let second = Agent::start_command(
        dir.path(),
        key,
        agent_command(dir.path(), &notify_path, &[(name.to_string(), stored)]),
    );
    let reply = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the queued client was answered")
        .unwrap()
        .expect("the queued client's request succeeded");
    assert_eq!(reply.code, 200);
    assert_ne!(reply.pid, old_pid, "a new service process answered");
    assert!(
        second
            .log_text()
            .contains("listener keeps the socket it was given"),
        "{}",
        second.log_text()
    );
    // And it is stored again for the next crash.
    drop(stored_fd(&notify, name));

    an_upgrade_says_reloading_then_ready(&second, &notify).await;
}

/// An in-place upgrade keeps talking to systemd from the same pid:
/// RELOADING=1 before the exec, READY=1 from the new image.
async fn an_upgrade_says_reloading_then_ready(agent: &Agent, notify: &UnixDatagram) {
    let mut release = std::fs::read(bin_path("reload-agent")).unwrap();
    release.extend_from_slice(b"\nreload-test-agent 2.0.0\n");
    let release = agent.stage("reload-agent", "2.0.0", &release).await;
    // What the second agent said at start (READY=1, STATUS=) is old news.
    while receive(notify, Instant::now() + Duration::from_millis(300)).is_some() {}
    let mut client = pb::agent_service_client::AgentServiceClient::new(agent.channel().await);
    client
        .upgrade_agent(pb::UpgradeAgentRequest {
            sha256: release.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some((message, _)) = receive(notify, deadline) {
        seen.push(message.clone());
        if message.lines().any(|l| l == "READY=1") {
            break;
        }
    }
    let reloading = seen
        .iter()
        .position(|m| m.lines().any(|l| l == "RELOADING=1"));
    let ready = seen.iter().position(|m| m.lines().any(|l| l == "READY=1"));
    assert!(
        matches!((reloading, ready), (Some(r), Some(d)) if r < d),
        "expected RELOADING=1 then READY=1, got {seen:?}"
    );
    assert!(
        seen.iter().any(|m| m.contains("MONOTONIC_USEC=")),
        "{seen:?}"
    );
    // ... and it is the new image that said READY=1, not a fallback.
    let info = pb::agent_service_client::AgentServiceClient::new(agent.channel().await)
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.executable_sha256, release);
    assert_eq!(
        info.last_upgrade.unwrap().outcome,
        pb::AgentUpgradeOutcome::Succeeded as i32
    );
}
