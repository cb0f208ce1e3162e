//! Helpers for the end-to-end tests: run the real `reload-agent` and
//! `reloadctl` binaries as real processes, talk real gRPC to them, and look
//! at the real files they leave.
//!
//! The binaries are found beside the test executable (`target/<profile>/`),
//! so build them first: `make test` does (`cargo build --workspace --bins`,
//! then `cargo nextest run --workspace`). A missing binary fails the test
//! with that instruction rather than skipping anything.
//!
//! Every helper that starts a process kills it on drop and, when a test
//! fails, prints what the process logged. Nothing waits by sleeping a
//! guessed time: [`eventually`] polls an observable condition up to a
//! deadline and, on timeout, says what it waited for and what it last saw.
//!
//! Layout:
//! - this file: the binaries ([`bin_path`], [`reloadctl`]), artifacts
//!   and manifests, the usual service config, and small probes of
//!   processes, ports, files and HTTP.
//! - [`agent`]: a running `reload-agent` and the gRPC calls made to it
//!   (upload, [`Agent::activate`], status).
//! - [`wait`]: [`eventually`], [`wait_for`], [`settled`].
//! - [`load`]: a load client that never retries and counts every failure.
//! - [`h2`]: the same for HTTP/2 (and a channel tonic clients run on),
//!   following GOAWAY as RFC 9113 asks.
//! - [`h2load`]: nghttp2's `h2load` run back to back through reloads, and
//!   its totals added up.
//! - [`hostile`]: clients that hold connections without speaking (from
//!   chosen 127.x source addresses), and what tells they were closed.

pub mod agent;
pub mod h2;
pub mod h2load;
pub mod hostile;
pub mod load;
pub mod wait;

pub use agent::{upload, upload_messages, Agent, Downgrade};
pub use wait::{eventually, settled, wait_for};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use reload_artifact::Manifest;
use sha2::{Digest, Sha256};

/// Path of a workspace binary built for the same profile as this test.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Tests run from target/<profile>/deps/, the bench binary from
    // target/<profile>/.
    let mut profile_dir = exe.parent().expect("executable has a folder");
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().expect("deps has a parent");
    }
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (`make test` does it)",
        path.display()
    );
    path
}

/// Runs `reloadctl` with `args` in `dir` and returns its output; does not
/// judge the exit status.
pub fn reloadctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin_path("reloadctl"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running reloadctl")
}

/// Runs `reloadctl` and fails the test, printing everything, unless it
/// succeeds. Returns stdout.
/// The summary (`finished` event) of a `reloadctl push --output json`
/// that succeeded; otherwise the test fails with all it printed.
pub fn push_finished(output: &Output) -> serde_json::Value {
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "finished")
        .unwrap_or_else(|| panic!("no finished event: {said}"))
}

pub fn reloadctl_ok(dir: &Path, args: &[&str]) -> String {
    let output = reloadctl(dir, args);
    assert!(
        output.status.success(),
        "reloadctl {args:?} in {} failed with {}\nstdout:\n{}\nstderr:\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Deterministic, incompressible-looking bytes (xorshift64*), fast enough
/// for 50 MiB files without a random crate.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // Spread the seed so that neighbouring seeds give unrelated streams.
    let mut state = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A manifest for `bytes`, valid for an hour from now.
pub fn manifest_for(service: &str, version: &str, bytes: &[u8]) -> Manifest {
    Manifest::new(
        service,
        version,
        &sha256_hex(bytes),
        bytes.len() as u64,
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .expect("valid manifest")
}

/// The agent config of the tests' usual service: `web`, the demo server on
/// a listener named `http` at `service_addr`, notify readiness, an HTTP
/// health probe on /healthz every 200 ms on each process's private port, a
/// short probation (300 ms, so the tests stay quick), an 8 s drain.
pub fn web_service_toml(service_addr: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "web"
args = ["--listen-name", "http", "--drain-timeout", "5s"]
[[service.listener]]
name = "http"
tcp = "{service_addr}"
[service.health]
kind = "http"
path = "/healthz"
interval = "200ms"
private = true
[service.probation]
healthy_for = "300ms"
interval = "100ms"
[service.drain]
timeout = "8s"
"#
    )
}

/// Every file under `dir` with its size and sha256: two equal snapshots mean
/// nothing was added, removed or changed.
pub fn snapshot(dir: &Path) -> BTreeMap<String, (u64, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let name = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(name, (bytes.len() as u64, sha256_hex(&bytes)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The names of the entries in `dir`, sorted (e.g. an upload's temp files).
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("listing {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A free TCP port on `ip`, for a listener the test's process is about to
/// configure (the agent binds it right after).
pub fn free_port_on(ip: std::net::IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    free_port_on([127, 0, 0, 1].into())
}

/// A child process that is killed and reaped when dropped, so that a test
/// that fails half-way leaves nothing running.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The process has exited: gone, or a zombie waiting for its reaper.
pub fn process_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        // The state follows the parenthesised command name, which may hold
        // spaces.
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                == Some("Z")
        })
        .unwrap_or(true)
}

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn send_signal(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// One HTTP/1.1 answer: status code, the `x-pid` header (0 if none), body.
pub struct HttpReply {
    pub code: u16,
    pub pid: u32,
    pub body: String,
}

/// One GET on a fresh connection with `Connection: close`; no retry.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let pid = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-pid:")
                .map(|p| p.trim().to_string())
        })
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Ok(HttpReply {
        code,
        pid,
        body: body.to_string(),
    })
}
