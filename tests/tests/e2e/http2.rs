//! End-to-end: HTTP/2 and gRPC services reloaded by the agent under load.
//!
//! An HTTP/2 client keeps one connection for many streams, so what a
//! reload must get right is the drain of that connection: the two-step
//! GOAWAY and the streams in flight finished. The load here comes from
//! `reload_tests::h2`, a client that never sends a request twice and counts
//! every stream that was sent and not fully answered (see its docs for why
//! neither a long `h2load` run nor tonic's `Channel` can judge a reload);
//! `h2load` itself runs back to back, in runs short enough to judge
//! (`reload_tests::h2load`). Addresses
//! are on 127.0.18.x, away from the other areas' tests.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_example_greeter::v1::greeter_client::GreeterClient;
use reload_example_greeter::v1::{CountRequest, HelloRequest};
use reload_tests::h2::{H2Channel, H2LoadConfig, H2LoadRun};
use reload_tests::h2load::H2loadLoop;
use reload_tests::*;

const RELOADS: usize = 10;

/// An agent on `ip` with one service on a fresh port there.
fn agent_with(
    ip: &str,
    service_toml: impl Fn(SocketAddr) -> String,
) -> (Agent, SocketAddr, tempfile::TempDir) {
    let ip: IpAddr = ip.parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = SocketAddr::new(ip, free_port_on(ip));
    let agent = Agent::start_at(
        ip,
        dir.path(),
        Arc::new(SigningKey::generate()),
        &service_toml(addr),
    );
    (agent, addr, dir)
}

/// `h2load` itself, with prior knowledge (h2c): runs of 20 connections
/// with 10 streams each, back to back against the demo server under the
/// agent through 10 reloads (`reload_tests::h2load` says why each run has
/// as many requests as streams). Every run gets all 200 streams answered,
/// 0 failed, 0 errored, 0 timed out; each reload's drain came while runs
/// were under way, and replaced processes had h2load's connections open
/// when their drain began (their own log line says how many). (Before the
/// demo server spoke HTTP/2, 0 of 200 were answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_through_ten_reloads_gets_every_stream_answered() {
    let (agent, addr, _dir) = agent_with("127.0.18.1", web_service_toml);
    let v1 = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    let v2 = agent
        .stage("web", "2.0.0", &Agent::demo_server_bytes("2.0.0"))
        .await;
    agent.activate_ok("web", &v1, Downgrade::Allowed).await;
    let load = H2loadLoop::start(addr, 20, 10);
    load.wait_for_runs(3).await;
    let mut drains_began = Vec::new();
    let mut pids = vec![agent.status("web").await.pid];
    for i in 0..RELOADS {
        let target = if i % 2 == 0 { &v2 } else { &v1 };
        let result = agent.activate_ok("web", target, Downgrade::Allowed).await;
        // The agent tells the old process to drain before it answers.
        drains_began.push(std::time::Instant::now());
        pids.push(result.new_pid);
        load.wait_for_runs(3).await;
    }
    let report = load.stop();
    println!(
        "h2load -c 20 -m 10 -n 200, back to back, {RELOADS} reloads: {}",
        report.summary()
    );
    report.assert_all_succeeded();
    for (i, moment) in drains_began.iter().enumerate() {
        assert!(
            report.runs_during(*moment, *moment) > 0,
            "no h2load run was under way when reload {i} answered: {}",
            report.summary()
        );
    }
    for old in &pids[..RELOADS] {
        wait_for(
            format!("the replaced process {old} to finish its drain"),
            Duration::from_secs(20),
            || process_gone(*old),
        )
        .await;
    }
    // The replaced processes say, in the output the agent keeps, how many
    // connections they had when their drain began: h2load's were among
    // them, so the runs above crossed real drains.
    let mut lines = agent
        .control()
        .await
        .read_logs(reload_proto::v1::ReadLogsRequest {
            service: "web".into(),
            lines: 0,
            follow: false,
        })
        .await
        .expect("ReadLogs")
        .into_inner();
    let mut drains_with_connections = 0;
    while let Some(line) = lines.message().await.expect("a log line") {
        if line.line.contains("draining open_connections=")
            && !line.line.contains("open_connections=0 ")
        {
            drains_with_connections += 1;
        }
    }
    println!("{drains_with_connections} of the {RELOADS} drains had connections open");
    assert!(
        drains_with_connections > 0,
        "no replaced process had a connection open when its drain began"
    );
}

/// 20 connections with 10 streams in flight each, against the demo server
/// under the agent, over 10 reloads: no stream fails, and the connections
/// really were drained (each reload replaced them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_lose_no_http2_stream() {
    let (agent, addr, _dir) = agent_with("127.0.18.2", web_service_toml);
    let v1 = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    let v2 = agent
        .stage("web", "2.0.0", &Agent::demo_server_bytes("2.0.0"))
        .await;
    agent.activate_ok("web", &v1, Downgrade::Allowed).await;
    let run = H2LoadRun::start(H2LoadConfig {
        addr,
        path: "/".into(),
        connections: 20,
        streams: 10,
        request_timeout: Duration::from_secs(10),
    });
    run.wait_for_requests(500).await;
    let mut pids = vec![agent.status("web").await.pid];
    for i in 0..RELOADS {
        let target = if i % 2 == 0 { &v2 } else { &v1 };
        let result = agent.activate_ok("web", target, Downgrade::Allowed).await;
        pids.push(result.new_pid);
        run.wait_for_requests(200).await;
    }
    let connections = run.connection_summary();
    let opened = run.totals.connections.load(Ordering::Relaxed);
    let report = run.stop().await;
    println!(
        "HTTP/2, 20 connections x 10 streams, {RELOADS} reloads: {}; {connections}",
        report.summary()
    );
    report.assert_no_failures();
    let expected: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
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
    // Every reload drained the 20 connections: they were replaced.
    assert!(opened >= 20 * (RELOADS as u64 / 2), "{connections}");
}

/// The greeter example under the agent.
fn greeter_toml(addr: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "greeter"
args = ["--listen-name", "grpc", "--drain-timeout", "5s"]
[[service.listener]]
name = "grpc"
tcp = "{addr}"
[service.probation]
healthy_for = "300ms"
interval = "100ms"
[service.drain]
timeout = "8s"
"#
    )
}

/// The greeter binary with a trailer naming `version`.
fn greeter_bytes(version: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(bin_path("reload-greeter")).unwrap();
    bytes.extend_from_slice(format!("\nreload-test-version {version}\n").as_bytes());
    bytes
}

/// 20 gRPC clients, one long-lived channel each, making unary and
/// server-streaming calls without any retry, against the example greeter
/// under the agent over 10 reloads: no call fails, and a streaming call in
/// flight across a reload gets every message, all from the old process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_survive_ten_reloads() {
    let (agent, addr, _dir) = agent_with("127.0.18.3", greeter_toml);
    let v1 = agent
        .stage("greeter", "1.0.0", &greeter_bytes("1.0.0"))
        .await;
    let v2 = agent
        .stage("greeter", "2.0.0", &greeter_bytes("2.0.0"))
        .await;
    agent.activate_ok("greeter", &v1, Downgrade::Allowed).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for id in 0..20 {
        let (stop, answered) = (stop.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            let channel = H2Channel::new(addr);
            let mut client = channel.grpc(GreeterClient::new);
            let (mut calls, mut failures, mut samples) = (0u64, 0u64, Vec::new());
            let mut versions = std::collections::BTreeSet::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                // Every fifth call a short server stream, else unary.
                let outcome: Result<String, String> = if n.is_multiple_of(5) {
                    async {
                        let mut stream = client
                            .count_to(CountRequest {
                                count: 3,
                                interval_ms: 10,
                            })
                            .await
                            .map_err(|s| format!("CountTo: {s}"))?
                            .into_inner();
                        let mut got = Vec::new();
                        while let Some(reply) = stream
                            .message()
                            .await
                            .map_err(|s| format!("CountTo stream: {s}"))?
                        {
                            got.push(reply);
                        }
                        if got.len() != 3 {
                            return Err(format!("CountTo gave {} of 3 replies", got.len()));
                        }
                        Ok(got[0].version.clone())
                    }
                    .await
                } else {
                    client
                        .say_hello(HelloRequest {
                            name: format!("client {id}"),
                        })
                        .await
                        .map(|r| r.into_inner().version)
                        .map_err(|s| format!("SayHello: {s}"))
                };
                calls += 1;
                match outcome {
                    Ok(version) => {
                        versions.insert(version);
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failures += 1;
                        if samples.len() < 5 {
                            samples.push(e);
                        }
                    }
                }
            }
            let opened = channel.totals.connections.load(Ordering::Relaxed);
            let elsewhere = channel
                .totals
                .sent_elsewhere_after_goaway
                .load(Ordering::Relaxed);
            (calls, failures, samples, versions, opened, elsewhere)
        }));
    }

    // A long stream (30 replies over about 1.5 s) that is in flight when
    // the first reload drains its process.
    let long_channel = H2Channel::new(addr);
    let mut long_client = long_channel.grpc(GreeterClient::new);
    let mut long = long_client
        .count_to(CountRequest {
            count: 30,
            interval_ms: 50,
        })
        .await
        .expect("the long CountTo starts")
        .into_inner();
    let first = long.message().await.expect("first reply").expect("a reply");
    let old_pid = agent.status("greeter").await.pid;
    assert_eq!(first.pid, old_pid);

    let mut pids = vec![old_pid];
    for i in 0..RELOADS {
        let target = if i % 2 == 0 { &v2 } else { &v1 };
        let result = agent
            .activate_ok("greeter", target, Downgrade::Allowed)
            .await;
        pids.push(result.new_pid);
        // Calls reach the new process before the next reload.
        let before = answered.load(Ordering::Relaxed);
        eventually(
            "100 more answered calls",
            Duration::from_secs(30),
            async || answered.load(Ordering::Relaxed),
            |now| *now >= before + 100,
        )
        .await;
    }
    let mut long_replies = vec![first];
    while let Some(reply) = long.message().await.expect("the long stream is not cut") {
        long_replies.push(reply);
    }
    stop.store(true, Ordering::Release);
    let (mut calls, mut failures, mut samples, mut versions, mut opened, mut elsewhere) =
        (0, 0, Vec::new(), std::collections::BTreeSet::new(), 0, 0);
    for client in clients {
        let (c, f, s, v, o, e) = client.await.unwrap();
        calls += c;
        failures += f;
        samples.extend(s);
        versions.extend(v);
        opened += o;
        elsewhere += e;
    }
    println!(
        "gRPC, 20 clients, {RELOADS} reloads: {calls} calls, {failures} failed, versions {versions:?}, \
         {opened} connections opened, {elsewhere} calls opened on a new connection because the GOAWAY came first; \
         long stream: {} replies from pids {:?}",
        long_replies.len(),
        long_replies.iter().map(|r| r.pid).collect::<std::collections::BTreeSet<_>>()
    );
    assert_eq!(failures, 0, "failed calls: {samples:#?}");
    assert!(calls > 1000, "{calls} calls");
    assert_eq!(versions.len(), 2, "{versions:?}");
    // The stream in flight at the first reload finished on the old process.
    assert_eq!(
        long_replies.iter().map(|r| r.n).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    assert!(long_replies.iter().all(|r| r.pid == old_pid));
    assert!(pids[1..].iter().all(|p| *p != old_pid));
    // The channels followed the reloads to new connections.
    assert!(
        opened >= 20 * (RELOADS as u64 / 2),
        "{opened} connections opened"
    );
}
