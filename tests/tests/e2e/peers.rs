//! Peer fetch: agents take a release from agents that hold it
//! (FetchArtifact `peers`, ReadArtifact over mutual TLS), so a push sends
//! it out of the deployer's machine once; a peer whose bytes are not the
//! signed file is refused and the next one asked.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// Three agents on 127.0.61.1-3 with mutual TLS from `reloadctl certs`:
/// `deployer` deploys; the agents' own certificate ("reload-agent") may
/// only read stored artifacts (the fetch right), and each fetches from its
/// peers with it.
struct Fleet {
    dir: tempfile::TempDir,
    agents: Vec<Agent>,
}

impl Fleet {
    fn start() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ips: Vec<IpAddr> = (1..=3)
            .map(|i| format!("127.0.61.{i}").parse().unwrap())
            .collect();
        let mut args = vec![
            "certs", "--out", "certs", "--client", "deployer", "--client", "stranger",
        ];
        let names: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        for name in &names {
            args.extend(["--agent-name", name.as_str()]);
        }
        reloadctl_ok(d, &args);
        let key = Arc::new(SigningKey::generate());
        let agents = ips
            .iter()
            .map(|ip| {
                let agent_dir = tempfile::Builder::new()
                    .prefix("peer-agent-")
                    .tempdir_in(d)
                    .unwrap()
                    .keep();
                std::fs::write(agent_dir.join("trusted.pub"), key.public().to_pem()).unwrap();
                std::fs::write(
                    agent_dir.join("agent.toml"),
                    format!(
                        "[agent]\nlisten = [\"{ip}:0\"]\nhealth_listen = \"{ip}:0\"\ntrusted_keys = [\"trusted.pub\"]\nstore_dir = \"store\"\n\
                         [tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/agent.pem\"\nkey = \"../certs/agent.key\"\n\
                         [rights]\ndeploy = [\"deployer\"]\nfetch = [\"reload-agent\"]\n\
                         [fetch]\npeers = true\n"
                    ),
                )
                .unwrap();
                Agent::start_with_config(&agent_dir, key.clone())
            })
            .collect();
        Fleet { dir, agents }
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The deployer's ArtifactService client for agent `i`.
    async fn artifacts(
        &self,
        i: usize,
    ) -> pb::artifact_service_client::ArtifactServiceClient<Channel> {
        pb::artifact_service_client::ArtifactServiceClient::new(
            tls_channel(&self.certs(), &self.agents[i], "deployer").await,
        )
    }

    async fn fetch(
        &self,
        i: usize,
        envelope: &[u8],
        peers: &[usize],
    ) -> Result<pb::UploadArtifactResponse, tonic::Status> {
        self.artifacts(i)
            .await
            .fetch_artifact(pb::FetchArtifactRequest {
                envelope: envelope.to_vec(),
                url: String::new(),
                peers: peers.iter().map(|&p| self.agents[p].host()).collect(),
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

async fn tls_channel(certs: &Path, agent: &Agent, client: &str) -> Channel {
    let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{client}.pem")),
            read(&format!("{client}.key")),
        ))
        .domain_name(agent.addr.ip().to_string());
    Endpoint::from_shared(format!("https://{}", agent.host()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn stored_file(agent: &Agent, sha: &str) -> PathBuf {
    agent.store().join("sha256").join(sha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_lies_is_refused_and_the_release_is_fetched_elsewhere() {
    let fleet = Fleet::start();
    let bytes = pseudo_random_bytes(3 << 20, 61);
    let sha = sha256_hex(&bytes);
    let envelope = fleet.agents[0].sign("web", "1.5.0", &bytes);
    for i in [0, 1] {
        upload(
            &mut fleet.artifacts(i).await,
            upload_messages(envelope.clone(), &bytes, 256 * 1024),
        )
        .await
        .unwrap();
    }
    // Agent 0 now lies: one byte of its stored copy changed, same size
    // (a damaged disk, or a compromised peer).
    let lying = stored_file(&fleet.agents[0], &sha);
    let mut damaged = std::fs::read(&lying).unwrap();
    damaged[1 << 20] ^= 0x55;
    std::fs::write(&lying, &damaged).unwrap();

    // Only the liar: refused, nothing stored, no partial file left.
    let err = fleet.fetch(2, &envelope, &[0]).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(
        err.message().contains("not the signed file"),
        "{}",
        err.message()
    );
    assert!(!stored_file(&fleet.agents[2], &sha).exists());
    assert_eq!(
        file_names(&fleet.agents[2].store().join("tmp")),
        Vec::<String>::new()
    );

    // The liar first, then an honest peer: the liar's bytes are discarded
    // and the file comes from the other one.
    let fetched = fleet.fetch(2, &envelope, &[0, 1]).await.unwrap();
    assert_eq!(fetched.source, format!("peer {}", fleet.agents[1].host()));
    assert_eq!(
        fetched.skipped_sources.len(),
        1,
        "{:?}",
        fetched.skipped_sources
    );
    let skipped = &fetched.skipped_sources[0];
    assert!(
        skipped.starts_with(&format!("peer {}", fleet.agents[0].host()))
            && skipped.contains("not the signed file"),
        "{skipped}"
    );
    assert_eq!(fetched.bytes_received, bytes.len() as u64);
    assert_eq!(
        std::fs::read(stored_file(&fleet.agents[2], &sha)).unwrap(),
        bytes
    );
    assert_eq!(
        file_names(&fleet.agents[2].store().join("tmp")),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_reads_need_the_fetch_right_and_peers_that_lack_the_file_are_skipped() {
    let fleet = Fleet::start();
    let bytes = pseudo_random_bytes(1 << 20, 62);
    let envelope = fleet.agents[0].sign("web", "1.5.0", &bytes);
    upload(
        &mut fleet.artifacts(1).await,
        upload_messages(envelope.clone(), &bytes, 256 * 1024),
    )
    .await
    .unwrap();
    // Agent 0 does not hold it: NOT_FOUND, skipped; agent 1 delivers.
    let fetched = fleet.fetch(2, &envelope, &[0, 1]).await.unwrap();
    assert_eq!(fetched.source, format!("peer {}", fleet.agents[1].host()));
    assert!(
        fetched.skipped_sources[0].contains("does not hold"),
        "{:?}",
        fetched.skipped_sources
    );
    // The deployer may read stored bytes; a client with neither the fetch
    // nor the deploy right may not.
    let sha = sha256_hex(&bytes);
    let mut as_deployer = fleet.artifacts(1).await;
    let mut stream = as_deployer
        .read_artifact(pb::ReadArtifactRequest {
            sha256: sha.clone(),
            offset: (1 << 20) - 10,
        })
        .await
        .unwrap()
        .into_inner();
    let mut tail = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        tail.extend_from_slice(&message.chunk);
    }
    assert_eq!(tail, bytes[(1 << 20) - 10..]);
    // "stranger" has a certificate from the fleet's CA and no right.
    let channel = tls_channel(&fleet.certs(), &fleet.agents[1], "stranger").await;
    let err = pb::artifact_service_client::ArtifactServiceClient::new(channel)
        .read_artifact(pb::ReadArtifactRequest {
            sha256: sha,
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("fetch right"), "{}", err.message());
}

/// `reloadctl push` with `peer_fetch`: the CLI sends the release to one
/// host and the others fetch it from hosts that hold it, so the CLI's
/// egress is about one artifact (the issue asks at most 2), not one per
/// host; every host runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_peer_fetch_sends_the_release_out_once() {
    const HOSTS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(SigningKey::generate());
    let project = dir.path().join("project");
    std::fs::create_dir_all(project.join("releases")).unwrap();
    std::fs::write(project.join("release.key"), key.to_pem()).unwrap();
    std::fs::write(project.join("release.pub"), key.public().to_pem()).unwrap();
    std::fs::write(
        project.join("reloadctl.toml"),
        "service = \"web\"\nartifact = \"releases/web-{version}\"\ntrusted_keys = [\"release.pub\"]\n\
         [rollout]\ncanary = 1\nhealthy_checks = 2\nmin_healthy_time = \"300ms\"\nhealthy_deadline = \"10s\"\npeer_fetch = 2\nmax_parallel = 5\n",
    )
    .unwrap();
    let bytes = Agent::demo_server_bytes("1.5.0");
    std::fs::write(project.join("releases/web-1.5.0"), &bytes).unwrap();
    reloadctl_ok(
        &project,
        &[
            "sign",
            "--key",
            "release.key",
            "--service",
            "web",
            "--version",
            "1.5",
            "releases/web-1.5.0",
        ],
    );
    let mut agents = Vec::new();
    let mut hosts = String::new();
    for i in 0..HOSTS {
        let ip: IpAddr = format!("127.0.62.{}", i + 1).parse().unwrap();
        let agent_dir = tempfile::Builder::new()
            .prefix("peer-push-agent-")
            .tempdir_in(dir.path())
            .unwrap()
            .keep();
        let agent = Agent::start_at(
            ip,
            &agent_dir,
            key.clone(),
            &format!(
                "{}\n[fetch]\npeers = true\n",
                web_service_toml((ip, free_port_on(ip)).into())
            ),
        );
        hosts.push_str(&format!("{}\n", agent.host()));
        agents.push(agent);
    }
    std::fs::write(project.join("hosts.txt"), hosts).unwrap();

    let output = reloadctl(
        &project,
        &["push", "--version", "1.5", "--output", "json", "hosts.txt"],
    );
    let finished = push_finished(&output);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!said.contains("peer fetch failed"), "{said}");
    let sent = finished["bytes_sent"].as_u64().unwrap();
    let egress = sent as f64 / bytes.len() as f64;
    println!(
        "CLI egress: {sent} bytes for a {}-byte release on {HOSTS} hosts = {egress:.3} × the artifact",
        bytes.len()
    );
    assert!((1.0..=1.01).contains(&egress), "{finished}");
    // Every host but the seed was served by a peer: each read is in the
    // log of the agent that served it.
    let served: usize = agents
        .iter()
        .map(|a| {
            a.log_text()
                .matches("serving a stored artifact to a peer")
                .count()
        })
        .sum();
    assert!(
        served >= HOSTS - 1,
        "{served} peer reads for {} hosts",
        HOSTS - 1
    );
    for agent in &agents {
        let status = agent.status("web").await;
        assert_eq!(status.current_version, "1.5.0", "{}", agent.host());
        assert_eq!(status.current_sha256, sha256_hex(&bytes));
    }
}
