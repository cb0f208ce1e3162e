//! A running `reload-agent` ([`Agent`]): started in its own folder with its
//! own key and store, killed on drop (printing its log if the test failed),
//! and the gRPC calls the tests make to it: uploads ([`Agent::stage`],
//! [`upload`]), [`Agent::activate`] and [`Agent::status`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reload_artifact::{Envelope, Manifest, SigningKey};
use reload_proto::v1 as pb;
use tonic::transport::Channel;

use crate::{bin_path, manifest_for};

/// Whether an Activate may go below the service's downgrade floor (its
/// `allow_downgrade`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downgrade {
    /// The floor holds: Activate's default.
    NotAllowed,
    /// Asked for explicitly: a version this agent ran before, or one whose
    /// signer allowed it, may come back.
    Allowed,
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
        AGENTS_PER_DIR
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.to_path_buf());
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

    /// A channel whose connection comes from the loopback address `source`
    /// (the agent counts connections and requests per peer address).
    pub async fn channel_from(&self, source: std::net::IpAddr) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .local_address(Some(source))
            .connect()
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "connecting to the agent from {source}: {err}\n{}",
                    self.log_text()
                )
            })
    }

    pub async fn artifacts(&self) -> pb::artifact_service_client::ArtifactServiceClient<Channel> {
        pb::artifact_service_client::ArtifactServiceClient::new(self.channel().await)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    pub async fn control(&self) -> pb::service_control_client::ServiceControlClient<Channel> {
        pb::service_control_client::ServiceControlClient::new(self.channel().await)
    }

    /// Calls Activate for `service` with the stored artifact `sha256`:
    /// the reload's result (which may be a failed reload), or the agent's
    /// refusal of the call.
    pub async fn activate(
        &self,
        service: &str,
        sha256: &str,
        downgrade: Downgrade,
    ) -> Result<pb::ReloadResult, tonic::Status> {
        let response = self
            .control()
            .await
            .activate(pb::ActivateRequest {
                service: service.into(),
                sha256: sha256.into(),
                allow_downgrade: downgrade == Downgrade::Allowed,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(response.result.unwrap_or_else(|| {
            panic!(
                "Activate of {service} {sha256} answered without a result\n{}",
                self.log_text()
            )
        }))
    }

    /// Like [`Agent::activate`], and fails the test, with the reason and the
    /// agent's log, unless the reload succeeded.
    pub async fn activate_ok(
        &self,
        service: &str,
        sha256: &str,
        downgrade: Downgrade,
    ) -> pb::ReloadResult {
        let result = self
            .activate(service, sha256, downgrade)
            .await
            .unwrap_or_else(|s| panic!("Activate failed: {s:?}\n{}", self.log_text()));
        assert_eq!(
            result.outcome,
            pb::ReloadOutcome::Succeeded as i32,
            "reload of {service} to {sha256} failed: {}\n{}",
            result.reason,
            self.log_text()
        );
        result
    }

    /// GetStatus of one service.
    pub async fn status(&self, service: &str) -> pb::ServiceStatus {
        self.control()
            .await
            .get_status(pb::GetStatusRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("GetStatus of {service}: {s:?}\n{}", self.log_text()))
            .into_inner()
            .services
            .remove(0)
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
        Agent::program_bytes("reload-demo-server", version)
    }

    /// One of this workspace's binaries with a version trailer, so each
    /// version is a different artifact.
    pub fn program_bytes(program: &str, version: &str) -> Vec<u8> {
        let mut bytes = std::fs::read(bin_path(program)).unwrap();
        bytes.extend_from_slice(format!("\nreload-test-version {version}\n").as_bytes());
        bytes
    }

    /// Stops the agent with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// The shims this agent's services run under (the agent binary started
    /// as `--shim` with a spec naming this agent's folder). They outlive
    /// the agent by design, so a test ends them itself.
    pub fn shim_pids(&self) -> Vec<u32> {
        // The whole folder, as the agent resolved it: a shim's spec names
        // paths under it. (The folder's name alone matched other tests'
        // shims whenever two tests named their folders alike, and ended
        // their services under them.)
        let folder = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let marker = format!("{}/", folder.display());
        processes()
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                cmdline.split(|b| *b == 0).nth(1) == Some(b"--shim".as_slice())
                    && String::from_utf8_lossy(&environ).contains(&marker)
            })
            .collect()
    }

    /// Ends every service process of this agent and its shim, whether the
    /// agent runs or not.
    pub fn kill_services(&self) {
        use nix::sys::signal::{kill, killpg, Signal};
        use nix::unistd::Pid;
        let shims = self.shim_pids();
        for pid in processes() {
            if shims.contains(&parent_of(pid)) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        for shim in shims {
            let _ = kill(Pid::from_raw(shim as i32), Signal::SIGKILL);
        }
    }
}

/// Every pid on the machine.
pub fn processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The parent of `pid` (0 if it is gone).
pub fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Agents alive per folder: services outlive an agent by design, so they
/// are ended when the last agent of their folder goes (a test that
/// restarts an agent replaces the value, and the restarted agent adopts
/// them).
static AGENTS_PER_DIR: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let last = {
            let mut live = AGENTS_PER_DIR.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = live.iter().position(|d| *d == self.dir) {
                live.remove(i);
            }
            !live.contains(&self.dir)
        };
        if last {
            self.kill_services();
        }
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
