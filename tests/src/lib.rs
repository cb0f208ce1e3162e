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
//! - this file: the binaries ([`bin_path`], [`reloadctl`]), a running
//!   agent ([`Agent`]), uploads, artifacts and small probes of processes,
//!   ports, files and HTTP.
//! - [`wait`]: [`eventually`], [`wait_for`], [`settled`].
//! - [`load`]: a load client that never retries and counts every failure.

pub mod load;
pub mod wait;

pub use wait::{eventually, settled, wait_for};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reload_artifact::{Envelope, Manifest, SigningKey};
use reload_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

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
/// health probe on /healthz every 200 ms, an 8 s drain.
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
[service.drain]
timeout = "8s"
"#
    )
}

/// A running `reload-agent` with its own folder, key and store.
pub struct Agent {
    pub dir: PathBuf,
    pub key: Arc<SigningKey>,
    pub addr: SocketAddr,
    /// Where `/healthz` is served, if the config enables it.
    pub health_addr: Option<SocketAddr>,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts an agent in `dir` trusting `key`; `extra_toml` is appended to
    /// the config (e.g. a `[limits]` table).
    pub fn start(dir: &Path, key: Arc<SigningKey>, extra_toml: &str) -> Agent {
        Agent::start_at("127.0.0.1".parse().unwrap(), dir, key, extra_toml)
    }

    /// Like [`Agent::start`], listening on `ip` (each simulated host has
    /// its own 127.0.0.x).
    pub fn start_at(
        ip: std::net::IpAddr,
        dir: &Path,
        key: Arc<SigningKey>,
        extra_toml: &str,
    ) -> Agent {
        std::fs::write(dir.join("trusted.pub"), key.public().to_pem()).unwrap();
        let config = format!(
            "[agent]\ninsecure = true\nlisten = [\"{ip}:0\"]\nhealth_listen = \"{ip}:0\"\ntrusted_keys = [\"trusted.pub\"]\nstore_dir = \"store\"\n{extra_toml}"
        );
        std::fs::write(dir.join("agent.toml"), config).unwrap();
        Agent::start_with_config(dir, key)
    }

    /// Starts (or restarts) an agent on the `agent.toml` already in `dir`.
    pub fn start_with_config(dir: &Path, key: Arc<SigningKey>) -> Agent {
        let mut command = Command::new(bin_path("reload-agent"));
        command
            .args(Agent::ARGS)
            .current_dir(dir)
            .env("RUST_LOG", "info");
        Agent::start_command(dir, key, command)
    }

    /// The arguments every test agent runs with.
    pub const ARGS: &'static [&'static str] = &["--config", "agent.toml", "--log-format", "json"];

    /// Starts an agent from a prepared command (its own environment or
    /// inherited sockets) in `dir`, and waits until it serves gRPC.
    pub fn start_command(dir: &Path, key: Arc<SigningKey>, mut command: Command) -> Agent {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning reload-agent");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    let message = event["fields"]["message"].as_str().unwrap_or_default();
                    if let Some(addr) = event["fields"]["addr"].as_str() {
                        let addr = addr.parse::<SocketAddr>().unwrap();
                        match message {
                            "serving gRPC" => {
                                let _ = addr_tx.send((true, addr));
                            }
                            "serving HTTP /healthz" => {
                                let _ = addr_tx.send((false, addr));
                            }
                            _ => {}
                        }
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut agent = Agent {
            dir: dir.to_path_buf(),
            key,
            addr: "0.0.0.0:0".parse().unwrap(),
            health_addr: None,
            child,
            log,
        };
        // The health endpoint (if any) is bound before gRPC serves.
        loop {
            match addr_rx.recv_timeout(Duration::from_secs(20)) {
                Ok((true, addr)) => {
                    agent.addr = addr;
                    break;
                }
                Ok((false, addr)) => agent.health_addr = Some(addr),
                Err(_) => panic!(
                    "reload-agent did not start serving within 20s (exit: {:?})\n{}",
                    agent.child.try_wait(),
                    agent.log_text()
                ),
            }
        }
        agent
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connecting to the agent: {err}\n{}", self.log_text()))
    }

    pub async fn artifacts(&self) -> pb::artifact_service_client::ArtifactServiceClient<Channel> {
        pb::artifact_service_client::ArtifactServiceClient::new(self.channel().await)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// Signs `bytes` with the trusted key.
    pub fn sign(&self, service: &str, version: &str, bytes: &[u8]) -> Vec<u8> {
        Envelope::sign_manifest(&manifest_for(service, version, bytes), &[&self.key]).to_json()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the agent process ended, if it has (reaps it).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Signs `bytes` as `service` at `version` (for any os/arch: scripts
    /// and binaries alike) and uploads them. Returns the sha256.
    pub async fn stage(&self, service: &str, version: &str, bytes: &[u8]) -> String {
        let mut manifest = manifest_for(service, version, bytes);
        manifest.os = "any".into();
        manifest.arch = "any".into();
        self.stage_manifest(manifest, bytes).await
    }

    /// Signs `manifest` (for `bytes`) and uploads. Returns the sha256.
    pub async fn stage_manifest(&self, manifest: Manifest, bytes: &[u8]) -> String {
        let (service, version) = (manifest.service.clone(), manifest.version.clone());
        let envelope = Envelope::sign_manifest(&manifest, &[&self.key]).to_json();
        let mut client = self.artifacts().await;
        upload(&mut client, upload_messages(envelope, bytes, 256 * 1024))
            .await
            .unwrap_or_else(|s| {
                panic!("uploading {service} {version}: {s:?}\n{}", self.log_text())
            });
        manifest.sha256
    }

    /// The demo server binary with a trailer naming `version`: the same
    /// program, distinct bytes, so each version is its own artifact.
    pub fn demo_server_bytes(version: &str) -> Vec<u8> {
        let mut bytes = std::fs::read(bin_path("reload-demo-server")).unwrap();
        bytes.extend_from_slice(format!("\nreload-test-version {version}\n").as_bytes());
        bytes
    }

    /// Stops the agent with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- reload-agent log ({}) ----\n{}",
                self.dir.display(),
                self.log_text()
            );
        }
    }
}

/// The messages of one upload: the envelope, then `bytes` in `chunk` sized
/// pieces.
pub fn upload_messages(
    envelope: Vec<u8>,
    bytes: &[u8],
    chunk: usize,
) -> Vec<pb::UploadArtifactRequest> {
    use pb::upload_artifact_request::Part;
    let mut messages = vec![pb::UploadArtifactRequest {
        part: Some(Part::Envelope(envelope)),
    }];
    messages.extend(bytes.chunks(chunk).map(|c| pb::UploadArtifactRequest {
        part: Some(Part::Chunk(bytes::Bytes::copy_from_slice(c))),
    }));
    messages
}

/// Sends a complete upload stream and returns the agent's answer.
pub async fn upload(
    client: &mut pb::artifact_service_client::ArtifactServiceClient<Channel>,
    messages: Vec<pb::UploadArtifactRequest>,
) -> Result<pb::UploadArtifactResponse, tonic::Status> {
    client
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
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
