//! End-to-end: what an operator types against a fleet, from the project
//! folder or any other: `reloadctl.toml` read by every command that talks
//! to agents, hosts-file mistakes named by line.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_tests::*;

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// An agent on `ip` with mutual TLS (`deployer` deploys, `monitor` reads)
/// and one service `web`, in `d`, with `web-1.0` and `web-1.1` signed
/// there; `certs/` holds the CA and the client certificates.
fn tls_agent_at(d: &Path, ip: &str) -> Agent {
    reloadctl_ok(
        d,
        &[
            "certs",
            "--out",
            "certs",
            "--agent-name",
            ip,
            "--client",
            "deployer",
            "--client",
            "monitor",
        ],
    );
    reloadctl_ok(d, &["keygen", "--out", "release"]);
    let service_addr =
        std::net::SocketAddr::new(ip.parse().unwrap(), free_port_on(ip.parse().unwrap()));
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "[agent]\nlisten = [\"{ip}:0\"]\nhealth_listen = \"{ip}:0\"\ntrusted_keys = [\"release.pub\"]\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n\
             [rights]\ndeploy = [\"deployer\"]\nread = [\"monitor\"]\n{}",
            web_service_toml(service_addr)
        ),
    )
    .unwrap();
    for version in ["1.0", "1.1"] {
        let file = format!("web-{version}");
        std::fs::write(d.join(&file), Agent::demo_server_bytes(version)).unwrap();
        reloadctl_ok(
            d,
            &[
                "sign",
                "--key",
                "release.key",
                "--service",
                "web",
                "--version",
                version,
                &file,
            ],
        );
    }
    let key = Arc::new(SigningKey::load(&d.join("release.key")).unwrap());
    Agent::start_with_config(d, key)
}

#[test]
fn every_command_reads_tls_from_the_project_file_relative_to_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = tls_agent_at(d, "127.0.17.1");
    let host = agent.host();
    // A project file with nothing but [tls], its paths relative to its own
    // folder, not to where reloadctl runs.
    let proj = d.join("proj");
    std::fs::create_dir(&proj).unwrap();
    std::fs::write(
        proj.join("reloadctl.toml"),
        "[tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/deployer.pem\"\nkey = \"../certs/deployer.key\"\n",
    )
    .unwrap();
    std::fs::write(proj.join("hosts.txt"), format!("{host}\n")).unwrap();
    for version in ["1.0", "1.1"] {
        let artifact = format!("../web-{version}");
        reloadctl_ok(
            &proj,
            &[
                "activate",
                "--host",
                &host,
                "--service",
                "web",
                "--version",
                version,
                "--artifact",
                &artifact,
            ],
        );
    }
    let status = reloadctl_ok(&proj, &["status", "hosts.txt"]);
    assert!(status.contains("1.1.0"), "{status}");
    // From another folder, the file named by --config (paths still
    // relative to the file).
    let out = reloadctl_ok(
        d,
        &[
            "--config",
            "proj/reloadctl.toml",
            "rollback",
            "proj/hosts.txt",
            "--service",
            "web",
        ],
    );
    assert!(out.contains("1.1.0 -> 1.0.0"), "{out}");
    let status = reloadctl_ok(
        d,
        &[
            "status",
            "proj/hosts.txt",
            "--output",
            "json",
            "--config",
            "proj/reloadctl.toml",
        ],
    );
    assert!(status.contains("\"version\":\"1.0.0\""), "{status}");

    // No [tls] anywhere: the mismatch is named, and it is no refusal.
    let out = reloadctl(d, &["status", "--host", &host]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "{host} speaks TLS, this client sent plaintext: set [tls] in reloadctl.toml or --tls-"
        )),
        "{said}"
    );
    assert!(!said.contains("refused"), "{said}");
    let out = reloadctl(d, &["rollback", "--host", &host, "--service", "web"]);
    assert!(
        text(&out).contains("speaks TLS") && !text(&out).contains("refused"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_hosts_file_typo_and_a_missing_trusted_key_are_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("hosts.txt"), "# fleet\n\n127.0.17.9.7700\n").unwrap();
    for command in [
        &["status", "hosts.txt"][..],
        &["rollback", "hosts.txt", "--service", "web"],
    ] {
        let out = reloadctl(d, command);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains(
                "line 3 of hosts.txt: `127.0.17.9.7700` is not host[:port]: not an IPv4 address (did you mean 127.0.17.9:7700?)"
            ),
            "{}",
            text(&out)
        );
    }

    reloadctl_ok(d, &["keygen", "--out", "release"]);
    std::fs::write(d.join("web-1.0"), b"#!/bin/sh\n").unwrap();
    reloadctl_ok(
        d,
        &[
            "sign",
            "--key",
            "release.key",
            "--service",
            "web",
            "--version",
            "1.0",
            "web-1.0",
        ],
    );
    std::fs::write(
        d.join("reloadctl.toml"),
        "service = \"web\"\nartifact = \"web-{version}\"\ntrusted_keys = [\"missing.pub\"]\n",
    )
    .unwrap();
    std::fs::write(d.join("hosts.txt"), "127.0.17.9\n").unwrap();
    let out = reloadctl(d, &["push", "--version", "1.0", "--dry-run", "hosts.txt"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert_eq!(said.matches("missing.pub").count(), 1, "{said}");
    assert_eq!(
        said.matches("No such file or directory").count(),
        1,
        "{said}"
    );
}

/// Plaintext agents on 127.0.17.`first`, `first+1`, ... each with service
/// `web`, and a project in `project` (`reloadctl.toml`, `hosts.txt`,
/// `releases/web-1.0` and `web-1.1` signed).
struct Fleet {
    agents: Vec<Agent>,
    project: tempfile::TempDir,
    _dirs: Vec<tempfile::TempDir>,
}

fn fleet(first: u8, count: u8) -> Fleet {
    let key = Arc::new(SigningKey::generate());
    let project = tempfile::tempdir().unwrap();
    let p = project.path();
    std::fs::write(p.join("release.key"), key.to_pem()).unwrap();
    std::fs::write(p.join("release.pub"), key.public().to_pem()).unwrap();
    std::fs::write(
        p.join("reloadctl.toml"),
        "service = \"web\"\nartifact = \"releases/web-{version}\"\nagent_artifact = \"releases/reload-agent-{version}\"\ntrusted_keys = [\"release.pub\"]\n\
         [rollout]\ncanary = 0\nwaves = \"100%\"\nhealthy_checks = 1\nmin_healthy_time = \"0s\"\nhealthy_deadline = \"10s\"\n",
    )
    .unwrap();
    std::fs::create_dir(p.join("releases")).unwrap();
    for version in ["1.0", "1.1"] {
        let file = format!("releases/web-{version}");
        std::fs::write(p.join(&file), Agent::demo_server_bytes(version)).unwrap();
        reloadctl_ok(
            p,
            &[
                "sign",
                "--key",
                "release.key",
                "--service",
                "web",
                "--version",
                version,
                &file,
            ],
        );
    }
    let (mut agents, mut dirs, mut hosts) = (Vec::new(), Vec::new(), String::new());
    for i in 0..count {
        let ip: std::net::IpAddr = format!("127.0.17.{}", first + i).parse().unwrap();
        let service_addr = std::net::SocketAddr::new(ip, free_port_on(ip));
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start_at(ip, dir.path(), key.clone(), &web_service_toml(service_addr));
        hosts.push_str(&format!("{}\n", agent.host()));
        agents.push(agent);
        dirs.push(dir);
    }
    std::fs::write(p.join("hosts.txt"), hosts).unwrap();
    Fleet {
        agents,
        project,
        _dirs: dirs,
    }
}

impl Fleet {
    fn dir(&self) -> &Path {
        self.project.path()
    }

    async fn versions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for agent in &self.agents {
            out.push(agent.status("web").await.current_version);
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_narrows_push_status_and_rollback_to_the_hosts_it_names() {
    let f = fleet(11, 3);
    let d = f.dir();
    let hosts: Vec<String> = f.agents.iter().map(Agent::host).collect();
    let push = |version: &str, limit: &str| {
        reloadctl_ok(
            d,
            &["push", "--version", version, "--limit", limit, "hosts.txt"],
        )
    };
    // A list (host without port: any port of it), then a glob.
    push("1.0", "127.0.17.11,127.0.17.12");
    assert_eq!(f.versions().await, ["1.0.0", "1.0.0", ""]);
    push("1.1", "*.11:*");
    push("1.1", "*.12");
    assert_eq!(f.versions().await, ["1.1.0", "1.1.0", ""]);

    let status = reloadctl_ok(
        d,
        &[
            "status",
            "hosts.txt",
            "--limit",
            &hosts[2],
            "--output",
            "json",
        ],
    );
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(status.contains(&hosts[2]), "{status}");

    let out = reloadctl_ok(
        d,
        &[
            "rollback",
            "hosts.txt",
            "--limit",
            "127.0.17.12",
            "--service",
            "web",
        ],
    );
    assert!(out.contains("1.1.0 -> 1.0.0"), "{out}");
    assert_eq!(f.versions().await, ["1.1.0", "1.0.0", ""]);

    // An entry that matches nothing stops the command before any host.
    let out = reloadctl(
        d,
        &[
            "push",
            "--version",
            "1.0",
            "--limit",
            "127.0.17.19",
            "hosts.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("--limit \"127.0.17.19\" matches no host of hosts.txt"),
        "{}",
        text(&out)
    );
    assert_eq!(f.versions().await, ["1.1.0", "1.0.0", ""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_found_by_its_signed_version_however_it_is_typed() {
    let f = fleet(21, 1);
    let d = f.dir();
    // Files named as the version was typed at signing: web-1.0, web-1.1.
    reloadctl_ok(d, &["push", "--version", "1.0.0", "hosts.txt"]);
    assert_eq!(f.versions().await, ["1.0.0"]);
    reloadctl_ok(d, &["push", "--version", "v1.1", "hosts.txt"]);
    assert_eq!(f.versions().await, ["1.1.0"]);

    // A file under one spelling signed as another version is passed over,
    // and every path tried is named once.
    std::fs::copy(d.join("releases/web-1.0"), d.join("releases/web-v1.2")).unwrap();
    std::fs::copy(
        d.join("releases/web-1.0.dsse.json"),
        d.join("releases/web-v1.2.dsse.json"),
    )
    .unwrap();
    let out = reloadctl(d, &["push", "--version", "1.2.0", "hosts.txt"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let tried: Vec<&str> = said
        .split_once("tried ")
        .and_then(|(_, rest)| rest.split_once(" ("))
        .map(|(list, _)| list.split(", ").collect())
        .unwrap_or_default();
    let names: Vec<&str> = tried
        .iter()
        .map(|p| p.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["web-1.2.0", "web-1.2", "web-v1.2.0", "web-v1.2"],
        "{said}"
    );
    assert!(said.contains("web-v1.2 is signed as web 1.0.0"), "{said}");
    assert_eq!(f.versions().await, ["1.1.0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_asks_every_host_and_fails_when_the_push_could_not_start() {
    use reload_proto::v1 as pb;
    let f = fleet(31, 2);
    let d = f.dir();
    let hosts: Vec<String> = f.agents.iter().map(Agent::host).collect();
    reloadctl_ok(
        d,
        &[
            "push",
            "--version",
            "1.1",
            "--limit",
            &hosts[0],
            "hosts.txt",
        ],
    );
    // Another rollout holds the second host's lease.
    let mut leases = pb::lease_service_client::LeaseServiceClient::new(f.agents[1].channel().await);
    leases
        .acquire_lease(pb::AcquireLeaseRequest {
            r#ref: Some(pb::LeaseRef {
                rollout_id: "other".into(),
                generation: 1,
                token: 0,
            }),
            holder: "alice@ci".into(),
            ttl: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
            force_takeover: false,
        })
        .await
        .unwrap();
    // And a third host where nothing listens.
    let down = format!(
        "127.0.17.39:{}",
        free_port_on("127.0.17.39".parse().unwrap())
    );
    std::fs::write(
        d.join("hosts.txt"),
        format!("{}\n{}\n{down}\n", hosts[0], hosts[1]),
    )
    .unwrap();

    let out = reloadctl(d, &["push", "--version", "1.0", "--dry-run", "hosts.txt"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    let line_of = |host: &str| {
        said.lines()
            .find(|l| l.trim_start().starts_with(host))
            .unwrap_or_else(|| panic!("no line for {host}: {said}"))
            .to_string()
    };
    let first = line_of(&hosts[0]);
    assert!(
        first.contains("runs 1.1.0")
            && first.contains("is below 1.1.0")
            && first.contains("--allow-downgrade"),
        "{first}"
    );
    let second = line_of(&hosts[1]);
    assert!(second.contains("lease is held by \"alice@ci\""), "{second}");
    assert!(second.contains("release not staged"), "{second}");
    assert!(line_of(&down).contains("unreachable"), "{said}");
    assert!(
        said.contains("the push would not get past 3 host(s)"),
        "{said}"
    );

    // The same as JSON lines, and nothing else on stdout.
    let out = reloadctl(
        d,
        &[
            "push",
            "--version",
            "1.0",
            "--dry-run",
            "--output",
            "json",
            "hosts.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0]["current_version"], "1.1.0");
    assert_eq!(lines[0]["downgrade_refused"], true);
    assert_eq!(lines[1]["lease_holder"], "alice@ci");
    assert_eq!(lines[1]["staged"], false);
    assert_eq!(lines[2]["reachable"], false);
    assert_eq!(
        (lines[3]["event"].as_str(), lines[3]["can_start"].as_bool()),
        (Some("dry_run_plan"), Some(false))
    );

    // Where the push could start, the dry run says so and exits 0.
    let out = reloadctl_ok(
        d,
        &[
            "push",
            "--version",
            "1.1",
            "--dry-run",
            "--limit",
            &hosts[0],
            "hosts.txt",
        ],
    );
    assert!(
        out.contains("runs 1.1.0 already") && out.contains("the push can start"),
        "{out}"
    );
    // A typo in the hosts file stops it before any host is asked.
    std::fs::write(d.join("hosts.txt"), "127.0.17.31.7700\n").unwrap();
    let out = reloadctl(
        d,
        &[
            "push",
            "--version",
            "1.1",
            "--dry-run",
            "--output",
            "json",
            "hosts.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("line 1 of hosts.txt: `127.0.17.31.7700` is not host[:port]"),
        "{}",
        text(&out)
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_health_gate_waits_progress_shows_and_a_second_ctrl_c_says_what_it_waits_for() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::sync::Mutex;
    let f = fleet(41, 1);
    let host = f.agents[0].host();
    // A gate that takes 30 s on a healthy host: the push waits there.
    let mut child = KillOnDrop(
        Command::new(bin_path("reloadctl"))
            .args([
                "push",
                "--version",
                "1.0",
                "--healthy-checks",
                "2",
                "--min-healthy-time",
                "30s",
                "--healthy-deadline",
                "60s",
                "hosts.txt",
            ])
            .current_dir(f.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    let said = || stderr.lock().unwrap().clone();
    // Not a terminal: plain lines, the gate's progress among them.
    eventually(
        "the health gate's progress",
        Duration::from_secs(30),
        async || said(),
        |s| {
            s.contains(&host)
                && s.contains("health gate: healthy")
                && s.contains("min-healthy-time to go")
        },
    )
    .await;
    send_signal(child.id(), nix::sys::signal::Signal::SIGINT);
    eventually(
        "the first Ctrl-C noticed",
        Duration::from_secs(10),
        async || said(),
        |s| s.contains("interrupted: finishing the hosts in flight"),
    )
    .await;
    send_signal(child.id(), nix::sys::signal::Signal::SIGINT);
    let told = eventually(
        "the second Ctrl-C answered",
        Duration::from_secs(10),
        async || said(),
        |s| s.contains("still waiting for 1 host(s) in flight before pausing"),
    )
    .await;
    let line = told
        .lines()
        .find(|l| l.contains("still waiting for"))
        .unwrap();
    assert!(
        line.contains(&host) && line.contains("health gate"),
        "{line}"
    );
    // The rollout still pauses once the gate is through, not before.
    assert!(child.try_wait().unwrap().is_none(), "{told}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_show_a_services_output_after_an_agent_restart_and_follow_new_lines() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut f = fleet(51, 1);
    let d = f.dir().to_path_buf();
    let host = f.agents[0].host();
    reloadctl_ok(&d, &["push", "--version", "1.0", "hosts.txt"]);
    let pid = f.agents[0].status("web").await.pid;
    let logs = |extra: &[&str]| {
        let mut args = vec!["logs", "--host", host.as_str(), "--service", "web"];
        args.extend_from_slice(extra);
        reloadctl_ok(&d, &args)
    };
    // The demo server says where it serves, on stderr, when it starts.
    let serving = format!("1.0.0 pid {pid} stderr:");
    eventually(
        "the service's first lines",
        Duration::from_secs(10),
        async || logs(&[]),
        |out| {
            out.lines()
                .any(|l| l.contains(&serving) && l.contains("serving on"))
        },
    )
    .await;
    assert_eq!(logs(&["--lines", "1"]).lines().count(), 1);

    // The agent is killed and started again: what it kept is still there.
    let dir = f.agents[0].dir.clone();
    let key = f.agents[0].key.clone();
    f.agents[0].kill();
    let restarted = Agent::start_with_config(&dir, key);
    let host = restarted.host();
    let out = reloadctl_ok(
        &d,
        &[
            "logs",
            "--host",
            &host,
            "--service",
            "web",
            "--output",
            "json",
        ],
    );
    let kept: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        kept.iter()
            .any(|l| l["pid"] == pid && l["line"].as_str().unwrap().contains("serving on")),
        "{out}"
    );
    drop(std::mem::replace(&mut f.agents[0], restarted));

    // --follow prints what comes next: the lines of a reload to 1.1.
    std::fs::write(d.join("hosts.txt"), format!("{host}\n")).unwrap();
    let mut follower = KillOnDrop(
        Command::new(bin_path("reloadctl"))
            .args([
                "logs",
                "--host",
                &host,
                "--service",
                "web",
                "--lines",
                "1",
                "--follow",
            ])
            .current_dir(&d)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut pipe = follower.stdout.take().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    reloadctl_ok(&d, &["push", "--version", "1.1", "hosts.txt"]);
    eventually(
        "the followed lines of 1.1",
        Duration::from_secs(10),
        async || seen.lock().unwrap().clone(),
        |s| {
            s.lines()
                .any(|l| l.contains(" 1.1.0 pid ") && l.contains("serving on"))
        },
    )
    .await;

    // Reading is audited, and an unknown service is named.
    let audit = std::fs::read_to_string(dir.join("state/audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"ReadLogs\"") && l.contains("follow")),
        "{audit}"
    );
    let out = reloadctl(&d, &["logs", "--host", &host, "--service", "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("NotFound") && text(&out).contains("nope"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_an_agent_release_identical_to_the_installed_binary_says_what_runs() {
    let f = fleet(61, 1);
    let d = f.dir();
    // The agent release is the very binary the agent runs, signed as 0.2.0.
    std::fs::copy(
        bin_path("reload-agent"),
        d.join("releases/reload-agent-0.2.0"),
    )
    .unwrap();
    reloadctl_ok(
        d,
        &[
            "sign",
            "--key",
            "release.key",
            "--service",
            "reload-agent",
            "--version",
            "0.2.0",
            "releases/reload-agent-0.2.0",
        ],
    );
    let out = reloadctl_ok(d, &["push", "--agent", "--version", "0.2", "hosts.txt"]);
    let installed = format!("{} (installed)", env!("CARGO_PKG_VERSION"));
    assert!(
        out.contains("done, nothing changed: reload-agent 0.2.0")
            && out.contains("not upgraded, already running these exact bytes and still reporting another version")
            && out.contains(&installed),
        "{out}"
    );
    assert!(!out.contains("done: reload-agent 0.2.0"), "{out}");
    // And that is what status says.
    let status = reloadctl_ok(d, &["status", "--agents", "hosts.txt"]);
    assert!(status.contains(&installed), "{status}");
}
