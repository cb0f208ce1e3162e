//! End-to-end: `reloadctl` as a user runs it, against files and a real agent.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use reload_artifact::SigningKey;
use reload_tests::*;

fn stderr_of(dir: &Path, args: &[&str]) -> String {
    let output = reloadctl(dir, args);
    assert!(
        !output.status.success(),
        "reloadctl {args:?} should have failed"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The arguments of `reloadctl sign`: `file` signed with `key` as `service`
/// at `version`.
fn sign_args<'a>(key: &'a str, service: &'a str, version: &'a str, file: &'a str) -> [&'a str; 8] {
    [
        "sign",
        "--key",
        key,
        "--service",
        service,
        "--version",
        version,
        file,
    ]
}

/// openssl is part of the test toolchain (`.ci/run` installs it): a missing
/// one fails the test instead of skipping it.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed for this test: apt-get install openssl (.ci/run installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn keygen_sign_verify_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = reloadctl_ok(d, &["keygen", "--out", "release"]);
    assert!(out.contains("key id:"), "{out}");
    let mode = std::fs::metadata(d.join("release.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the private key must not be readable by others"
    );
    // keygen never overwrites a key by accident.
    assert!(stderr_of(d, &["keygen", "--out", "release"]).contains("--force"));

    std::fs::write(d.join("web"), pseudo_random_bytes(100_000, 1)).unwrap();
    reloadctl_ok(d, &sign_args("release.key", "web", "1.4", "web"));
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("web.dsse.json")).unwrap()).unwrap();
    assert_eq!(
        envelope["payloadType"],
        "application/vnd.reload.manifest.v1+json"
    );
    let out = reloadctl_ok(d, &["verify", "--pubkey", "release.pub", "web"]);
    assert!(out.starts_with("OK: web 1.4.0"), "{out}");

    reloadctl_ok(d, &["keygen", "--out", "other"]);
    let err = stderr_of(d, &["verify", "--pubkey", "other.pub", "web"]);
    assert!(err.contains("untrusted key"), "{err}");

    // One changed byte in the file.
    let mut bytes = std::fs::read(d.join("web")).unwrap();
    bytes[99] ^= 1;
    std::fs::write(d.join("web"), &bytes).unwrap();
    let err = stderr_of(d, &["verify", "--pubkey", "release.pub", "web"]);
    assert!(err.contains("does not match"), "{err}");

    // Swapped key files get a hint, not a parser error.
    let err = stderr_of(d, &sign_args("release.pub", "web", "1", "web"));
    assert!(err.contains("signing needs the private key"), "{err}");
    let err = stderr_of(d, &sign_args("release.key", "a/b", "1", "web"));
    assert!(err.contains("service name"), "{err}");
    let err = stderr_of(d, &sign_args("release.key", "web", "one", "web"));
    assert!(err.contains("not a semantic version"), "{err}");
}

#[tokio::test]
async fn openssl_ed25519_key_signs_and_the_agent_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "ossl.key"]);
    openssl(
        d,
        &["pkey", "-in", "ossl.key", "-pubout", "-out", "ossl.pub"],
    );
    std::fs::write(d.join("web"), pseudo_random_bytes(3_000_000, 2)).unwrap();
    reloadctl_ok(d, &sign_args("ossl.key", "web", "2.0", "web"));
    reloadctl_ok(d, &["verify", "--pubkey", "ossl.pub", "web"]);

    // The agent trusts the openssl-written public key file as it is.
    let agent_dir = d.join("agent");
    std::fs::create_dir(&agent_dir).unwrap();
    std::fs::copy(d.join("ossl.pub"), agent_dir.join("ossl.pub")).unwrap();
    std::fs::write(
        agent_dir.join("agent.toml"),
        "[agent]\ninsecure = true\nlisten = [\"127.0.0.1:0\"]\nhealth_listen = \"127.0.0.1:0\"\ntrusted_keys = [\"ossl.pub\"]\n",
    )
    .unwrap();
    let key = Arc::new(SigningKey::load(&d.join("ossl.key")).unwrap());
    let agent = Agent::start_with_config(&agent_dir, key);
    let host = agent.host();
    let out = reloadctl_ok(d, &["upload", "--host", &host, "web"]);
    assert!(
        out.contains("stored web 2.0.0") && out.contains("3000000 bytes sent"),
        "{out}"
    );
    let out = reloadctl_ok(d, &["upload", "--host", &host, "web"]);
    assert!(out.contains("nothing sent"), "{out}");
    let out = reloadctl_ok(d, &["artifacts", "--host", &host, "--output", "json"]);
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(line["version"], "2.0.0");
    assert_eq!(
        line["sha256"],
        sha256_hex(&std::fs::read(d.join("web")).unwrap())
    );
}

#[test]
fn rsa_keys_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
    );
    openssl(d, &["pkey", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"]);
    std::fs::write(d.join("web"), b"#!/bin/sh\n").unwrap();
    let err = stderr_of(d, &sign_args("rsa.key", "web", "1", "web"));
    assert!(
        err.contains("RSA key") && err.contains("only Ed25519"),
        "{err}"
    );
    assert!(
        !d.join("web.dsse.json").exists(),
        "a failed sign must not write an envelope"
    );

    // The agent's --check names the key file and the algorithm.
    std::fs::write(
        d.join("agent.toml"),
        "[agent]\ntrusted_keys = [\"rsa.pub\"]\n",
    )
    .unwrap();
    let output = Command::new(bin_path("reload-agent"))
        .args(["--config", "agent.toml", "--check"])
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(err.contains("rsa.pub") && err.contains("RSA"), "{err}");
}

#[test]
fn upload_to_an_unreachable_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reloadctl_ok(d, &["keygen", "--out", "k"]);
    std::fs::write(d.join("web"), b"x").unwrap();
    reloadctl_ok(d, &sign_args("k.key", "web", "1", "web"));
    // Port 1 on loopback: nothing listens there.
    let err = stderr_of(d, &["upload", "--host", "127.0.0.1:1", "web"]);
    assert!(
        err.contains("cannot reach the agent at 127.0.0.1:1"),
        "{err}"
    );
}

/// A project in `d` (a release key, `web-1.4` and `web-1.5` signed) and an
/// agent there trusting the key, with one service `web`.
fn project_with_an_agent(d: &Path) -> Agent {
    reloadctl_ok(d, &["keygen", "--out", "release"]);
    let port = free_port();
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "[agent]\ninsecure = true\nlisten = [\"127.0.0.1:0\"]\nhealth_listen = \"127.0.0.1:0\"\ntrusted_keys = [\"release.pub\"]\n\
             [[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n\
             [[service.listener]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    for version in ["1.4", "1.5"] {
        std::fs::write(
            d.join(format!("web-{version}")),
            Agent::demo_server_bytes(version),
        )
        .unwrap();
        reloadctl_ok(
            d,
            &sign_args("release.key", "web", version, &format!("web-{version}")),
        );
    }
    let key = Arc::new(SigningKey::load(&d.join("release.key")).unwrap());
    Agent::start_with_config(d, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_rollback_and_status_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = project_with_an_agent(d);
    let host = agent.host();

    // Not uploaded and no --artifact: the error says what to pass.
    let err = stderr_of(
        d,
        &[
            "activate",
            "--host",
            &host,
            "--service",
            "web",
            "--version",
            "1.4",
        ],
    );
    assert!(err.contains("--artifact"), "{err}");
    let output = reloadctl(
        d,
        &[
            "activate",
            "--host",
            &host,
            "--service",
            "web",
            "--version",
            "1.4",
            "--artifact",
            "web-1.4",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let steps = String::from_utf8_lossy(&output.stderr);
    // Probation (on by default) shows its progress while activate waits.
    for step in [
        "verifying",
        "spawning",
        "ready",
        "probation",
        "check 2/2 passed",
        "done",
    ] {
        assert!(steps.contains(step), "step {step} not shown:\n{steps}");
    }
    reloadctl_ok(
        d,
        &[
            "activate",
            "--host",
            &host,
            "--service",
            "web",
            "--version",
            "1.5",
            "--artifact",
            "web-1.5",
        ],
    );
    let status = reloadctl_ok(d, &["status", "--host", &host, "--output", "json"]);
    let line: serde_json::Value = serde_json::from_str(status.lines().next().unwrap()).unwrap();
    assert_eq!(
        (line["version"].as_str(), line["previous_version"].as_str()),
        (Some("1.5.0"), Some("1.4.0"))
    );
    let out = reloadctl_ok(d, &["rollback", "--host", &host, "--service", "web"]);
    assert!(out.contains("1.5.0 -> 1.4.0"), "{out}");
    let table = reloadctl_ok(d, &["status", "--host", &host]);
    let row = table.lines().nth(1).unwrap();
    assert!(row.starts_with(&host) && row.contains(" web "), "{table}");
    assert!(table.contains("1.4.0"), "{table}");
}

#[test]
fn every_subcommand_help_has_an_example_and_init_and_completions_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let subcommands = [
        "keygen",
        "sign",
        "verify",
        "upload",
        "activate",
        "rollback",
        "status",
        "push",
        "resume",
        "artifacts",
        "logs",
        "certs",
        "init",
        "completions",
    ];
    for sub in subcommands {
        let help = reloadctl_ok(d, &[sub, "--help"]);
        assert!(
            help.contains("Example:"),
            "`reloadctl {sub} --help` has no example:\n{help}"
        );
    }
    reloadctl_ok(d, &["init", "--service", "web"]);
    let project = std::fs::read_to_string(d.join("reloadctl.toml")).unwrap();
    assert!(
        project.contains("service = \"web\"") && project.contains("# "),
        "{project}"
    );
    assert!(d.join("hosts.txt").exists() && d.join("releases").is_dir());
    // The written files are what push reads: a dry run plans over them once
    // a release is signed (and, no agent running there, says the push
    // could not start).
    reloadctl_ok(d, &["keygen", "--out", "release"]);
    std::fs::write(d.join("releases/web-1.0"), b"#!/bin/sh\n").unwrap();
    reloadctl_ok(
        d,
        &sign_args("release.key", "web", "1.0", "releases/web-1.0"),
    );
    let output = reloadctl(d, &["push", "--version", "1.0", "--dry-run", "hosts.txt"]);
    let plan = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{plan}");
    assert!(
        plan.contains("to 3 hosts") && plan.contains("unreachable"),
        "{plan}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let script = reloadctl_ok(d, &["completions", shell]);
        assert!(
            script.contains("reloadctl") && script.contains("push"),
            "{shell}"
        );
    }
}
