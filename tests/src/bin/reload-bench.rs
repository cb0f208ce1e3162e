//! `make bench`: measurements against a baseline taken in the same run, so
//! the figures are ratios that survive a shared, noisy machine.
//!
//! Scenario today: upload-and-verify of a 256 MiB signed artifact over
//! loopback (`reloadctl upload` into a real `reload-agent`, ending with the
//! file fsync'd under its final name), beside `openssl dgst -sha256` of the
//! same file. Hashing is the physical floor of verification, so the ratio
//! says how close the whole path (gRPC, streaming, hash, write, fsync)
//! comes to it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reload_artifact::SigningKey;
use reload_tests::{bin_path, pseudo_random_bytes, reloadctl_ok, Agent};

const ARTIFACT_MIB: usize = 256;
const ROUNDS: usize = 5;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn mib_per_s(d: Duration) -> f64 {
    ARTIFACT_MIB as f64 / d.as_secs_f64()
}

fn time_openssl(file: &Path) -> Duration {
    let start = Instant::now();
    let output = Command::new("openssl")
        .args(["dgst", "-sha256"])
        .arg(file)
        .output()
        .expect("openssl is needed for the baseline: apt-get install openssl");
    assert!(output.status.success(), "openssl dgst failed");
    start.elapsed()
}

fn main() {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path();
    let key = Arc::new(SigningKey::generate());
    std::fs::write(dir.join("release.key"), key.to_pem()).unwrap();
    let file = dir.join("artifact");
    std::fs::write(&file, pseudo_random_bytes(ARTIFACT_MIB * 1024 * 1024, 42)).unwrap();
    reloadctl_ok(
        dir,
        &[
            "sign",
            "--key",
            "release.key",
            "--service",
            "bench",
            "--version",
            "1.0",
            "artifact",
        ],
    );
    println!("reloadctl: {}", bin_path("reloadctl").display());

    let mut upload = Vec::new();
    let mut openssl = Vec::new();
    let mut in_process = Vec::new();
    for round in 0..ROUNDS {
        // A fresh agent and store each round: every upload is a real one.
        let agent_dir = dir.join(format!("agent-{round}"));
        std::fs::create_dir(&agent_dir).unwrap();
        let agent = Agent::start(&agent_dir, key.clone(), "");
        // Interleave the two so drift on the machine hits both alike.
        openssl.push(time_openssl(&file));
        let start = Instant::now();
        reload_artifact::verify::hash_file(&file).unwrap();
        in_process.push(start.elapsed());
        let start = Instant::now();
        let out = reloadctl_ok(dir, &["upload", "--host", &agent.host(), "artifact"]);
        upload.push(start.elapsed());
        assert!(out.contains("bytes sent"), "{out}");
        drop(agent);
        std::fs::remove_dir_all(&agent_dir).unwrap();
    }
    let (upload, openssl, in_process) = (median(upload), median(openssl), median(in_process));
    println!();
    println!("| scenario ({ARTIFACT_MIB} MiB, median of {ROUNDS}) | time | MiB/s |");
    println!("|---|---:|---:|");
    println!(
        "| openssl dgst -sha256 (baseline) | {:.3} s | {:.0} |",
        openssl.as_secs_f64(),
        mib_per_s(openssl)
    );
    println!(
        "| sha2 crate on the same file, in process (the agent's hasher) | {:.3} s | {:.0} |",
        in_process.as_secs_f64(),
        mib_per_s(in_process)
    );
    println!(
        "| reloadctl upload -> agent verified + fsync'd | {:.3} s | {:.0} |",
        upload.as_secs_f64(),
        mib_per_s(upload)
    );
    println!();
    let ratio = openssl.as_secs_f64() / upload.as_secs_f64();
    println!(
        "upload-and-verify speed / openssl sha256 speed = {ratio:.2} (goal >= 0.70: {})",
        if ratio >= 0.7 { "met" } else { "MISSED" }
    );
}
