//! End-to-end: fencing between rollouts. A rollout's lease is checked again
//! at the commit point, under the lock that commits the change, so a call
//! that waited (for a drain in progress) while its lease was taken over
//! does not act afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::prost_types;
use reload_proto::v1 as pb;
use reload_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn lease(rollout: &str) -> pb::LeaseRef {
    pb::LeaseRef {
        rollout_id: rollout.into(),
        generation: 1,
    }
}

async fn acquire(agent: &Agent, rollout: &str, force_takeover: bool) {
    pb::lease_service_client::LeaseServiceClient::new(agent.channel().await)
        .acquire_lease(pb::AcquireLeaseRequest {
            r#ref: Some(lease(rollout)),
            holder: format!("{rollout} (test)"),
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            force_takeover,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_that_waited_while_its_lease_was_taken_over_does_not_act() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The old process keeps an idle keep-alive connection for 6 s while it
    // drains: the reload lock is held that long.
    let config = web_service_toml(addr).replace(
        "\"--drain-timeout\", \"5s\"",
        "\"--drain-timeout\", \"6s\", \"--idle-grace\", \"6s\"",
    );
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    let demo = |v: &str| Agent::demo_server_bytes(v);
    let (v1, v2, v3) = (
        agent.stage("web", "1.0.0", &demo("1.0.0")).await,
        agent.stage("web", "2.0.0", &demo("2.0.0")).await,
        agent.stage("web", "3.0.0", &demo("3.0.0")).await,
    );
    acquire(&agent, "rollout-a", false).await;
    let channel = agent.channel().await;
    let activate = |sha: String| {
        let channel = channel.clone();
        async move {
            pb::service_control_client::ServiceControlClient::new(channel)
                .activate(pb::ActivateRequest {
                    service: "web".into(),
                    sha256: sha,
                    lease: Some(lease("rollout-a")),
                    allow_downgrade: false,
                })
                .await
        }
    };
    activate(v1).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    assert!(idle.read(&mut buffer).await.unwrap() > 0);
    // 2.0.0 replaces it; 1.0.0 drains for 6 s, holding the lock.
    let result = activate(v2).await.unwrap().into_inner().result.unwrap();
    assert_eq!(
        result.outcome,
        pb::ReloadOutcome::Succeeded as i32,
        "{result:?}"
    );
    // rollout-a's next call passes the lease check and waits for the
    // lock...
    let called = std::time::Instant::now();
    let waiting = tokio::spawn(activate(v3));
    // ...and 300 ms into that wait (a fault injected, not a wait for a
    // condition) another rollout takes the lease over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    acquire(&agent, "rollout-b", true).await;
    let refused = waiting.await.unwrap().unwrap_err();
    // Refused after the wait, by the check under the lock (the check on
    // entry passed: the lease was still rollout-a's then).
    assert!(
        called.elapsed() >= Duration::from_secs(3),
        "refused after {:?}, not after the drain",
        called.elapsed()
    );
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("rollout-b"),
        "the refusal names the holder: {refused:?}"
    );
    let status = agent.status("web").await;
    assert_eq!(status.current_version, "2.0.0");
    assert!(
        !agent.log_text().contains("spawning 3.0.0"),
        "3.0.0 was never started:\n{}",
        agent.log_text()
    );
    drop(idle);
}
