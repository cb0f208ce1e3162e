//! End-to-end: fencing between rollouts, one test per hole the fencing
//! tokens close (the CLI's lease renewal has its engine tests):
//! - a displaced rollout cannot act again once its successor released or
//!   lost the lease (its token is below the highest granted);
//! - a lease is checked again at the commit point, under the lock that
//!   commits the change, so a call that waited (for a drain in progress)
//!   while its lease was taken over does not act afterwards;
//! - one generation of a rollout is granted once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::prost_types;
use reload_proto::v1 as pb;
use reload_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn try_acquire(
    agent: &Agent,
    rollout: &str,
    generation: u64,
    force_takeover: bool,
) -> Result<pb::LeaseRef, tonic::Status> {
    pb::lease_service_client::LeaseServiceClient::new(agent.channel().await)
        .acquire_lease(pb::AcquireLeaseRequest {
            r#ref: Some(pb::LeaseRef {
                rollout_id: rollout.into(),
                generation,
                token: 0,
            }),
            holder: format!("{rollout} (test)"),
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            force_takeover,
        })
        .await
        .map(|granted| granted.into_inner().lease.unwrap().r#ref.unwrap())
}

/// Takes the lease; the granted ref, with its fencing token.
async fn acquire(agent: &Agent, rollout: &str, force_takeover: bool) -> pb::LeaseRef {
    try_acquire(agent, rollout, 1, force_takeover)
        .await
        .unwrap()
}

async fn activate_under(
    agent: &Agent,
    sha256: &str,
    lease: &pb::LeaseRef,
) -> Result<pb::ReloadResult, tonic::Status> {
    agent
        .control()
        .await
        .activate(pb::ActivateRequest {
            service: "web".into(),
            sha256: sha256.into(),
            lease: Some(lease.clone()),
            allow_downgrade: false,
        })
        .await
        .map(|r| r.into_inner().result.unwrap())
}

fn is_superseded(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Aborted
        && status
            .metadata()
            .get(pb::FENCE_TRAILER)
            .is_some_and(|v| v == pb::FENCE_SUPERSEDED)
}

/// Hole (a): `check_mutation` let any lease ref pass when no lease was
/// held, so a rollout displaced by a forced takeover acted again as soon
/// as the rollout that displaced it released its lease. Its fencing token
/// is below the one granted since: refused, as superseded, for good (and
/// after an agent restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_displaced_rollout_cannot_act_after_its_successor_released_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let key = Arc::new(SigningKey::generate());
    let mut agent = Agent::start(dir.path(), key.clone(), &web_service_toml(addr));
    let demo = |v: &str| Agent::demo_server_bytes(v);
    let (v1, v2) = (
        agent.stage("web", "1.0.0", &demo("1.0.0")).await,
        agent.stage("web", "2.0.0", &demo("2.0.0")).await,
    );
    let old = acquire(&agent, "old-rollout", false).await;
    assert_eq!(
        activate_under(&agent, &v1, &old).await.unwrap().outcome,
        pb::ReloadOutcome::Succeeded as i32
    );
    let new = acquire(&agent, "new-rollout", true).await;
    assert!(new.token > old.token, "{old:?} then {new:?}");
    pb::lease_service_client::LeaseServiceClient::new(agent.channel().await)
        .release_lease(pb::ReleaseLeaseRequest {
            r#ref: Some(new.clone()),
        })
        .await
        .unwrap();
    let refused = activate_under(&agent, &v2, &old).await.unwrap_err();
    assert!(is_superseded(&refused), "{refused:?}");
    assert!(
        refused.message().contains("new-rollout"),
        "names who superseded it: {refused:?}"
    );
    // Remembered across an agent restart.
    agent.kill();
    let agent = Agent::start(dir.path(), key, &web_service_toml(addr));
    let refused = activate_under(&agent, &v2, &old).await.unwrap_err();
    assert!(is_superseded(&refused), "{refused:?}");
    let status = agent.status("web").await;
    assert_eq!(status.current_version, "1.0.0", "{status:?}");
    let lease = pb::lease_service_client::LeaseServiceClient::new(agent.channel().await)
        .get_lease(pb::GetLeaseRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.highest_token, new.token);
    assert_eq!(lease.highest_ref.unwrap().rollout_id, "new-rollout");
}

/// Hole (d): one generation of a rollout was granted twice (two resumes of
/// one journal both held generation 2, each fencing nothing). The second
/// grant of a generation is refused, even forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_of_a_rollout_is_granted_once() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = Agent::start(
        dir.path(),
        Arc::new(SigningKey::generate()),
        &web_service_toml(addr),
    );
    let first = try_acquire(&agent, "r", 2, false).await.unwrap();
    for force in [false, true] {
        let second = try_acquire(&agent, "r", 2, force).await.unwrap_err();
        assert_eq!(second.code(), tonic::Code::Aborted, "{second:?}");
        assert!(second.message().contains("granted already"), "{second:?}");
    }
    // The next generation takes over, and the first is superseded.
    let third = try_acquire(&agent, "r", 3, false).await.unwrap();
    assert!(third.token > first.token);
    let v1 = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    assert!(is_superseded(
        &activate_under(&agent, &v1, &first).await.unwrap_err()
    ));
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
    let lease_a = acquire(&agent, "rollout-a", false).await;
    let channel = agent.channel().await;
    let activate = |sha: String| {
        let channel = channel.clone();
        let lease_a = lease_a.clone();
        async move {
            pb::service_control_client::ServiceControlClient::new(channel)
                .activate(pb::ActivateRequest {
                    service: "web".into(),
                    sha256: sha,
                    lease: Some(lease_a),
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
    assert!(is_superseded(&refused), "{refused:?}");
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
