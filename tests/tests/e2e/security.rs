//! End-to-end: mutual TLS, rights by client identity, and the audit log.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::*;

struct TlsAgent {
    agent: Agent,
    dir: tempfile::TempDir,
}

/// An agent with mutual TLS from `reloadctl certs`: `deployer` may deploy,
/// `monitor` may only read; one service `web`.
fn tls_agent() -> TlsAgent {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reloadctl_ok(
        d,
        &[
            "certs",
            "--out",
            "certs",
            "--agent-name",
            "127.0.0.1",
            "--client",
            "deployer",
            "--client",
            "monitor",
            "--client",
            "stranger",
        ],
    );
    reloadctl_ok(d, &["keygen", "--out", "release"]);
    let port = free_port();
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "[agent]\nlisten = [\"127.0.0.1:0\"]\nhealth_listen = \"127.0.0.1:0\"\ntrusted_keys = [\"release.pub\"]\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n\
             [rights]\ndeploy = [\"deployer\"]\nread = [\"monitor\"]\n\
             [[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n\
             [[service.listener]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(d.join("web"), Agent::demo_server_bytes("1.0.0")).unwrap();
    reloadctl_ok(
        d,
        &[
            "sign",
            "--key",
            "release.key",
            "--service",
            "web",
            "--version",
            "1.0.0",
            "web",
        ],
    );
    let key = Arc::new(SigningKey::load(&d.join("release.key")).unwrap());
    let agent = Agent::start_with_config(d, key);
    TlsAgent { agent, dir }
}

fn as_client(dir: &Path, client: &str, args: &[&str]) -> std::process::Output {
    let cert = format!("certs/{client}.pem");
    let key = format!("certs/{client}.key");
    let mut all = vec![
        "--tls-ca",
        "certs/ca.pem",
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
    ];
    all.extend_from_slice(args);
    reloadctl(dir, &all)
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn mutual_tls_and_rights_decide_who_may_deploy_and_every_call_is_audited() {
    let t = tls_agent();
    let d = t.dir.path();
    let host = t.agent.host();

    // The deploy identity uploads and activates over mutual TLS.
    let out = as_client(
        d,
        "deployer",
        &[
            "activate",
            "--host",
            &host,
            "--service",
            "web",
            "--version",
            "1.0.0",
            "--artifact",
            "web",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    // A read identity reads, and is refused a deploy call, by name.
    let out = as_client(d, "monitor", &["status", "--host", &host]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1.0.0"), "{}", text(&out));
    let out = as_client(
        d,
        "monitor",
        &["rollback", "--host", &host, "--service", "web"],
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("PermissionDenied")
            && said.contains("\"monitor\"")
            && said.contains("deploy right"),
        "{said}"
    );

    // A certificate from the CA but named in no right can do nothing.
    let out = as_client(d, "stranger", &["status", "--host", &host]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("lacks the read right"),
        "{}",
        text(&out)
    );

    // No client certificate, or plaintext: refused before any handler runs.
    let out = reloadctl(d, &["--tls-ca", "certs/ca.pem", "status", "--host", &host]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = reloadctl(d, &["status", "--host", &host]);
    assert!(
        !out.status.success(),
        "plaintext must not reach a TLS agent: {}",
        text(&out)
    );

    a_client_of_another_ca_is_refused(d, &host);

    // The health endpoint speaks mutual TLS too.
    let health = t.agent.health_addr.expect("health endpoint").to_string();
    assert_eq!(health_probe(d, &health, true), "200 web");
    let without = health_probe(d, &health, false);
    assert!(without.starts_with("refused"), "{without}");

    assert_every_call_audited(d);
}

/// A client certificate from another CA is refused at the handshake.
fn a_client_of_another_ca_is_refused(d: &Path, host: &str) {
    let other = d.join("other");
    std::fs::create_dir(&other).unwrap();
    reloadctl_ok(
        &other,
        &[
            "certs",
            "--out",
            ".",
            "--agent-name",
            "127.0.0.1",
            "--client",
            "deployer",
        ],
    );
    let out = reloadctl(
        d,
        &[
            "--tls-ca",
            "certs/ca.pem",
            "--tls-cert",
            "other/deployer.pem",
            "--tls-key",
            "other/deployer.key",
            "status",
            "--host",
            host,
        ],
    );
    assert!(
        !out.status.success(),
        "a foreign CA's client must be refused: {}",
        text(&out)
    );
}

/// `https://<health>/healthz` from Python, with the `monitor` client
/// certificate or without one: "<status> <first service>", or "refused
/// <error>".
fn health_probe(d: &Path, health: &str, with_cert: bool) -> String {
    let script = r#"
import json, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile="certs/ca.pem")
if sys.argv[2] == "cert":
    ctx.load_cert_chain("certs/monitor.pem", "certs/monitor.key")
try:
    with urllib.request.urlopen(f"https://{sys.argv[1]}/healthz", context=ctx, timeout=10) as r:
        print(r.status, json.load(r)["services"][0]["service"])
except Exception as e:
    print("refused", type(e).__name__)
"#;
    let output = Command::new("python3")
        .args([
            "-c",
            script,
            health,
            if with_cert { "cert" } else { "none" },
        ])
        .current_dir(d)
        .output()
        .expect("python3 is part of the test toolchain");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The audit log has the accepted and the refused mutating calls, with
/// who made them, and only its owner may read it.
fn assert_every_call_audited(d: &Path) {
    let audit = std::fs::read_to_string(d.join("state/audit.log")).unwrap();
    let entries: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |identity: &str, call: &str| {
        entries
            .iter()
            .find(|e| e["identity"] == identity && e["call"] == call)
    };
    let upload = find("deployer", "UploadArtifact").expect("upload audited");
    assert_eq!(
        (
            upload["service"].as_str(),
            upload["version"].as_str(),
            upload["result"].as_str()
        ),
        (Some("web"), Some("1.0.0"), Some("ok"))
    );
    assert_eq!(find("deployer", "Activate").unwrap()["result"], "ok");
    let refused = find("monitor", "Rollback").expect("refused rollback audited");
    assert!(
        refused["result"]
            .as_str()
            .unwrap()
            .starts_with("PermissionDenied"),
        "{refused}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("state/audit.log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the audit log is private");
}

#[test]
fn an_agent_without_tls_or_explicit_insecure_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reloadctl_ok(d, &["keygen", "--out", "release"]);
    std::fs::write(
        d.join("agent.toml"),
        "[agent]\ntrusted_keys = [\"release.pub\"]\n",
    )
    .unwrap();
    let output = Command::new(bin_path("reload-agent"))
        .args(["--config", "agent.toml", "--check"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no [tls] section"));
    std::fs::write(
        d.join("agent.toml"),
        "[agent]\ninsecure = true\nlisten = [\"0.0.0.0:7799\"]\ntrusted_keys = [\"release.pub\"]\n",
    )
    .unwrap();
    let output = Command::new(bin_path("reload-agent"))
        .args(["--config", "agent.toml", "--check"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("loopback only"));
}

/// The loopback-only rule of `insecure = true` held for `[agent] listen`
/// but not for a gRPC socket systemd passed (reload-agent.socket): one on
/// 0.0.0.0 served plaintext AcquireLease to anyone. Now the agent refuses
/// to start with it, and says what to change.
#[test]
fn an_insecure_agent_refuses_a_grpc_socket_from_systemd_that_is_not_loopback() {
    use std::os::fd::{AsFd, OwnedFd};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reloadctl_ok(d, &["keygen", "--out", "release"]);
    std::fs::write(
        d.join("agent.toml"),
        "[agent]\ninsecure = true\ntrusted_keys = [\"release.pub\"]\n",
    )
    .unwrap();
    let run = |bind: &str| {
        let socket = OwnedFd::from(std::net::TcpListener::bind(bind).unwrap());
        let args: Vec<String> = Agent::ARGS.iter().map(|a| a.to_string()).collect();
        let mut command = reload_server::spawn::command(reload_server::spawn::SpawnSpec {
            program: &bin_path("reload-agent"),
            args: &args,
            env: vec![("RUST_LOG".into(), "info".into())],
            working_dir: d,
            sockets: vec![("grpc".to_string(), socket.as_fd())],
            die_with_parent: false,
            own_process_group: false,
            image: None,
        })
        .unwrap();
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        // A refusal ends the agent at once; an accepted socket serves.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                return Some((status, stderr));
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let (status, stderr) = run("0.0.0.0:0").expect("the agent refuses to start");
    assert!(!status.success());
    assert!(
        stderr.contains("insecure = true is for loopback only")
            && stderr.contains("systemd passed a gRPC socket on 0.0.0.0"),
        "{stderr}"
    );
    // On loopback, the same agent serves (it is still running when killed).
    assert!(
        run("127.0.0.1:0").is_none(),
        "the agent refused a loopback socket"
    );
}

/// A manifest's expiry blocked crash restarts of a version admitted long
/// before: a healthy service became an outage at its first crash after
/// the expiry. Expiry is an admission rule: an expired release is not
/// activated, but one already admitted restarts after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_release_restarts_after_its_manifest_expired_but_is_not_activated_again() {
    let dir = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // No clock-skew allowance, so the manifests expire within the test.
    let agent = Agent::start(
        dir.path(),
        Arc::new(SigningKey::generate()),
        &format!("clock_skew = \"0s\"\n{}", web_service_toml(addr)),
    );
    let expiring = |version: &str| {
        let bytes = Agent::demo_server_bytes(version);
        let mut manifest = manifest_for("web", version, &bytes);
        (manifest.os, manifest.arch) = ("any".into(), "any".into());
        manifest.expires = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + std::time::Duration::from_secs(4),
        )
        .to_string();
        (manifest, bytes)
    };
    let (m1, b1) = expiring("1.0.0");
    let (m2, b2) = expiring("2.0.0");
    let v1 = agent.stage_manifest(m1, &b1).await;
    let v2 = agent.stage_manifest(m2, &b2).await;
    agent.activate_ok("web", &v1, Downgrade::NotAllowed).await;
    let serving = agent.status("web").await.pid;
    // Both manifests expire (plus the agent's clock-skew allowance).
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    send_signal(serving, nix::sys::signal::Signal::SIGKILL);
    let restarted = eventually(
        "the admitted, now expired, release to be restarted",
        std::time::Duration::from_secs(20),
        async || agent.status("web").await,
        |s| s.pid != 0 && s.pid != serving && s.state == pb::ServiceState::Running as i32,
    )
    .await;
    assert_eq!(restarted.current_sha256, v1);
    let reply = http_get(addr, "/").await.unwrap();
    assert_eq!((reply.code, reply.pid), (200, restarted.pid));
    // A new activation of an expired release is still refused.
    let refused = agent.activate("web", &v2, Downgrade::NotAllowed).await;
    let text = format!("{refused:?}");
    assert!(text.contains("expired"), "{text}");
    assert_eq!(agent.status("web").await.current_sha256, v1);
}

/// Exec health probes ran with the agent's whole environment (credentials,
/// LISTEN_FDS, NOTIFY_SOCKET...). They get the service's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_health_probes_do_not_see_the_agents_environment() {
    let dir = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let key = Arc::new(SigningKey::generate());
    std::fs::write(dir.path().join("trusted.pub"), key.public().to_pem()).unwrap();
    // Healthy only if the agent's secret is not in the probe's environment
    // and the service's own variable is.
    let probe = r#"test -z \"$AGENT_SECRET\" && test \"$GREETING\" = hi"#;
    let service = web_service_toml(addr)
        .replace("args = [", "env = { GREETING = \"hi\" }\nargs = [")
        .replace(
            "kind = \"http\"\npath = \"/healthz\"",
            &format!("kind = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"{probe}\"]"),
        )
        .replace("private = true\n", "");
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "[agent]\ninsecure = true\nlisten = [\"127.0.0.1:0\"]\nhealth_listen = \"127.0.0.1:0\"\ntrusted_keys = [\"trusted.pub\"]\nstore_dir = \"store\"\n{service}"
        ),
    )
    .unwrap();
    let mut command = Command::new(bin_path("reload-agent"));
    command
        .args(Agent::ARGS)
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .env("AGENT_SECRET", "s3cret");
    let agent = Agent::start_command(dir.path(), key, command);
    let v1 = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    agent.activate_ok("web", &v1, Downgrade::NotAllowed).await;
    let status = eventually(
        "the exec probe to pass",
        std::time::Duration::from_secs(10),
        async || agent.status("web").await,
        |s| s.health == pb::HealthState::Healthy as i32,
    )
    .await;
    assert_eq!(status.current_version, "1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_downgrade_floor_holds_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // keep_versions above the 4 uploads: pruning is not under test here.
    let config = format!(
        "keep_versions = 10\n[[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n[[service.listener]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    );
    let key = Arc::new(SigningKey::generate());
    let mut agent = Agent::start(dir.path(), key.clone(), &config);
    let v1 = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    let v2 = agent
        .stage("web", "2.0.0", &Agent::demo_server_bytes("2.0.0"))
        .await;
    let v15 = agent
        .stage("web", "1.5.0", &Agent::demo_server_bytes("1.5.0"))
        .await;
    let bytes16 = Agent::demo_server_bytes("1.6.0");
    let mut signed_for_downgrade = manifest_for("web", "1.6.0", &bytes16);
    signed_for_downgrade.allow_downgrade = true;
    let v16 = agent.stage_manifest(signed_for_downgrade, &bytes16).await;

    activate(&agent, &v1, Downgrade::NotAllowed).await.unwrap();
    activate(&agent, &v2, Downgrade::NotAllowed).await.unwrap();
    refused(
        activate(&agent, &v15, Downgrade::NotAllowed).await,
        "must be asked for explicitly",
    );
    refused(
        activate(&agent, &v15, Downgrade::Allowed).await,
        "never activated here",
    );
    // A version this agent ran before may come back when asked for.
    assert_eq!(
        activate(&agent, &v1, Downgrade::Allowed).await.unwrap(),
        "1.0.0"
    );
    // So may a build whose signer allowed it.
    assert_eq!(
        activate(&agent, &v16, Downgrade::Allowed).await.unwrap(),
        "1.6.0"
    );
    let err = agent
        .control()
        .await
        .rollback(pb::RollbackRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );

    assert_downgrades_audited(dir.path(), &v15, &v16);

    // The floor is persisted: a restarted agent still refuses.
    agent.kill();
    let agent = Agent::start_with_config(dir.path(), key);
    refused(
        activate(&agent, &v15, Downgrade::Allowed).await,
        "below 2.0.0",
    );
}

/// Activate of `web`: the version it went to if the reload succeeded (it
/// must, if the call is not refused).
async fn activate(agent: &Agent, sha: &str, downgrade: Downgrade) -> Result<String, tonic::Status> {
    let result = agent.activate("web", sha, downgrade).await?;
    assert_eq!(
        result.outcome,
        pb::ReloadOutcome::Succeeded as i32,
        "{}",
        result.reason
    );
    Ok(result.to_version)
}

/// Activate was refused, saying `needle`, below the downgrade floor.
fn refused(result: Result<String, tonic::Status>, needle: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(status.message().contains(needle), "{}", status.message());
}

/// The audit log has the refused (two, of `v15`) and the allowed (one, of
/// `v16`) downgrades.
fn assert_downgrades_audited(dir: &Path, v15: &str, v16: &str) {
    let audit = std::fs::read_to_string(dir.join("state/audit.log")).unwrap();
    let activations: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["call"] == "Activate")
        .collect();
    let result_of = |sha: &str| -> Vec<String> {
        activations
            .iter()
            .filter(|e| e["sha256"] == sha)
            .map(|e| e["result"].as_str().unwrap().to_string())
            .collect()
    };
    let v15_results = result_of(v15);
    assert_eq!(v15_results.len(), 2);
    assert!(
        v15_results
            .iter()
            .all(|r| r.starts_with("FailedPrecondition")),
        "{v15_results:?}"
    );
    assert_eq!(result_of(v16), vec!["ok".to_string()]);
}

mod limits_and_keys {
    use super::*;
    use reload_artifact::Envelope;
    use reload_proto::v1 as pb;
    use tonic::Code;

    /// An insecure (loopback) agent trusting keys `a` and `b`, with `extra`
    /// appended to [agent] and a [limits] table.
    fn agent_with(
        dir: &Path,
        a: &Arc<SigningKey>,
        b: &SigningKey,
        agent_extra: &str,
        limits: &str,
    ) -> Agent {
        std::fs::write(dir.join("a.pub"), a.public().to_pem()).unwrap();
        std::fs::write(dir.join("b.pub"), b.public().to_pem()).unwrap();
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "[agent]\ninsecure = true\nlisten = [\"127.0.0.1:0\"]\nhealth_listen = \"127.0.0.1:0\"\n\
                 trusted_keys = [\"a.pub\", \"b.pub\"]\n{agent_extra}\n[limits]\n{limits}\n"
            ),
        )
        .unwrap();
        Agent::start_with_config(dir, a.clone())
    }

    async fn send(
        agent: &Agent,
        envelope: Vec<u8>,
        bytes: &[u8],
    ) -> Result<pb::UploadArtifactResponse, tonic::Status> {
        let mut client = agent.artifacts().await;
        upload(&mut client, upload_messages(envelope, bytes, 64 * 1024)).await
    }

    #[tokio::test]
    async fn revoked_keys_and_signature_thresholds_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Arc::new(SigningKey::generate()), SigningKey::generate());
        // `a` revoked; `web` needs two signatures (b plus another trusted key).
        let c = SigningKey::generate();
        std::fs::write(dir.path().join("c.pub"), c.public().to_pem()).unwrap();
        let agent = {
            std::fs::write(dir.path().join("a.pub"), a.public().to_pem()).unwrap();
            std::fs::write(dir.path().join("b.pub"), b.public().to_pem()).unwrap();
            std::fs::write(
                dir.path().join("agent.toml"),
                format!(
                    "[agent]\ninsecure = true\nlisten = [\"127.0.0.1:0\"]\nhealth_listen = \"127.0.0.1:0\"\n\
                     trusted_keys = [\"a.pub\", \"b.pub\", \"c.pub\"]\nrevoked_keys = [\"{}\"]\n\
                     [agent.signature_thresholds]\nweb = 2\n",
                    a.id()
                ),
            )
            .unwrap();
            Agent::start_with_config(dir.path(), a.clone())
        };
        let bytes = pseudo_random_bytes(10_000, 1);
        let manifest = manifest_for("web", "1.0", &bytes);
        let before = snapshot(&agent.store());
        let err = send(
            &agent,
            Envelope::sign_manifest(&manifest, &[&a]).to_json(),
            &bytes,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("revoked"), "{}", err.message());
        let err = send(
            &agent,
            Envelope::sign_manifest(&manifest, &[&a, &b]).to_json(),
            &bytes,
        )
        .await
        .unwrap_err();
        assert!(
            err.message()
                .contains("needs signatures by 2 distinct trusted keys, found 1"),
            "{}",
            err.message()
        );
        assert_eq!(snapshot(&agent.store()), before);
        // Rotation: signed with the new keys, accepted.
        send(
            &agent,
            Envelope::sign_manifest(&manifest, &[&b, &c]).to_json(),
            &bytes,
        )
        .await
        .unwrap();
        // Another service keeps the default of one signature.
        let api = manifest_for("api", "1.0", &bytes);
        send(
            &agent,
            Envelope::sign_manifest(&api, &[&c]).to_json(),
            &bytes,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_upload_that_would_fill_the_disk_is_refused_before_any_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Arc::new(SigningKey::generate()), SigningKey::generate());
        let agent = agent_with(dir.path(), &a, &b, "", "min_free_space = \"1 PiB\"");
        let bytes = pseudo_random_bytes(10_000, 2);
        let before = snapshot(&agent.store());
        let err = send(&agent, agent.sign("web", "1.0", &bytes), &bytes)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message().contains("must stay free"),
            "{}",
            err.message()
        );
        assert_eq!(snapshot(&agent.store()), before);
    }

    #[tokio::test]
    async fn a_slow_upload_is_cut_off_at_its_total_duration() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Arc::new(SigningKey::generate()), SigningKey::generate());
        let agent = agent_with(
            dir.path(),
            &a,
            &b,
            "",
            "upload_max_duration = \"1s\"\nupload_idle_timeout = \"10s\"",
        );
        let bytes = pseudo_random_bytes(64 * 1024, 3);
        let before = snapshot(&agent.store());
        let envelope = agent.sign("web", "1.0", &bytes);
        // One small chunk every 300 ms: never idle, always too slow.
        let stream = async_stream_of(envelope, bytes);
        let mut client = agent.artifacts().await;
        let err = client.upload_artifact(stream).await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
        assert!(
            err.message().contains("upload_max_duration"),
            "{}",
            err.message()
        );
        eventually(
            "the temp file to go",
            std::time::Duration::from_secs(10),
            async || file_names(&agent.store().join("tmp")),
            Vec::is_empty,
        )
        .await;
        assert_eq!(snapshot(&agent.store()), before);
    }

    fn async_stream_of(
        envelope: Vec<u8>,
        bytes: Vec<u8>,
    ) -> tokio_stream::wrappers::ReceiverStream<pb::UploadArtifactRequest> {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for message in upload_messages(envelope, &bytes, 1024) {
                if sender.send(message).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(receiver)
    }

    #[tokio::test]
    async fn a_client_trickling_bytes_is_cut_off_by_the_idle_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Arc::new(SigningKey::generate()), SigningKey::generate());
        let agent = agent_with(dir.path(), &a, &b, "", "upload_idle_timeout = \"1s\"");
        let bytes = pseudo_random_bytes(100, 4);
        let before = snapshot(&agent.store());
        let envelope = agent.sign("web", "1.0", &bytes);
        // The envelope, then one byte every 1.5 s: slower than the idle
        // timeout allows.
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let trickle = tokio::spawn(async move {
            for message in upload_messages(envelope, &bytes, 1) {
                if sender.send(message).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            }
        });
        let mut client = agent.artifacts().await;
        let err = client
            .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .unwrap_err();
        trickle.abort();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
        assert!(
            err.message().contains("upload_idle_timeout"),
            "{}",
            err.message()
        );
        eventually(
            "the temp file to go",
            std::time::Duration::from_secs(10),
            async || file_names(&agent.store().join("tmp")),
            Vec::is_empty,
        )
        .await;
        assert_eq!(snapshot(&agent.store()), before);
    }

    #[tokio::test]
    async fn a_caller_over_its_request_rate_is_slowed_down() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Arc::new(SigningKey::generate()), SigningKey::generate());
        let agent = agent_with(dir.path(), &a, &b, "", "requests_per_second = 2");
        let mut client = agent.artifacts().await;
        let mut refused = 0;
        for _ in 0..20 {
            match client
                .list_artifacts(pb::ListArtifactsRequest::default())
                .await
            {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted);
                    assert!(status.message().contains("requests_per_second"));
                    refused += 1;
                }
            }
        }
        // A burst of twice the rate passes; the rest of 20 quick calls not.
        assert!(refused >= 10, "only {refused} of 20 calls were refused");
    }

    #[test]
    fn a_world_writable_store_is_refused_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate();
        std::fs::write(dir.path().join("a.pub"), key.public().to_pem()).unwrap();
        std::fs::create_dir(dir.path().join("store")).unwrap();
        std::fs::set_permissions(
            dir.path().join("store"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("agent.toml"),
            "[agent]\ninsecure = true\nlisten = [\"127.0.0.1:0\"]\nhealth_listen = \"127.0.0.1:0\"\ntrusted_keys = [\"a.pub\"]\n",
        )
        .unwrap();
        let output = Command::new(bin_path("reload-agent"))
            .args(["--config", "agent.toml"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("writable by everyone"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Error texts sent to clients carried the agent's absolute paths (how the
/// host is laid out). Clients get the folders by role (`<store>`); the
/// agent's log keeps the full path for the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_facing_errors_name_the_store_by_role_not_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), "");
    let sha = agent.stage("web", "1.0.0", b"a release").await;
    // The file becomes a folder (root reads anything, so no chmod):
    // re-verifying it fails reading it, an I/O error that names the path.
    let object = agent.store().join("sha256").join(&sha);
    std::fs::remove_file(&object).unwrap();
    std::fs::create_dir(&object).unwrap();
    let err = agent
        .artifacts()
        .await
        .validate_artifact(pb::ValidateArtifactRequest {
            target: Some(pb::validate_artifact_request::Target::Sha256(sha.clone())),
        })
        .await
        .unwrap_err();
    let message = err.message();
    let home = dir.path().display().to_string();
    assert!(!message.contains(&home), "{message}");
    assert!(
        message.contains(&format!("<store>/sha256/{sha}")),
        "{message}"
    );
    // The operator's log has where.
    let store = std::fs::canonicalize(agent.store()).unwrap();
    assert!(
        agent
            .log_text()
            .contains(&format!("{}/sha256/{sha}", store.display()))
            || agent
                .log_text()
                .contains(&format!("{}/sha256/{sha}", agent.store().display())),
        "{}",
        agent.log_text()
    );
}
