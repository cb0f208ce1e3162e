//! FetchArtifact: the agent takes a release's bytes from an HTTP artifact
//! repository (Debian's nginx here, as operators run it) instead of from
//! the caller, verifies them exactly as an upload's, and resumes a fetch
//! cut short with a Range request.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// nginx serving `root` on 127.0.0.1, logging each request's status and
/// Range header to `access.log` beside its config. Killed on drop.
struct Repository {
    nginx: Child,
    port: u16,
    dir: PathBuf,
}

impl Repository {
    fn start(dir: &Path) -> Repository {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect(
                "nginx is not installed: .ci/run installs Debian's nginx package for these tests",
            );
        let root = dir.join("www");
        std::fs::create_dir_all(&root).unwrap();
        let port = free_port();
        // Master and workers as the test's user (root in CI): the files are
        // in a private temp folder.
        let conf = format!(
            "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  log_format range '$status $http_range';\n  access_log {d}/access.log range;\n\
               client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n\
               uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
               server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            d = dir.display(),
            root = root.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut command = Command::new(nginx);
        command
            .args([
                "-c",
                &dir.join("nginx.conf").display().to_string(),
                "-p",
                &dir.display().to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // A group of its own, so its worker goes with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("starting nginx");
        let repository = Repository {
            nginx: child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not listen on {port}: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        repository
    }

    fn prefix(&self) -> String {
        format!("http://127.0.0.1:{}/releases/", self.port)
    }

    /// Publishes `bytes` as `releases/<name>`; its URL.
    fn publish(&self, name: &str, bytes: &[u8]) -> String {
        let folder = self.dir.join("www/releases");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(name), bytes).unwrap();
        format!("{}{name}", self.prefix())
    }

    /// Each request's "<status> <Range header>", in order.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Repository {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.nginx.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.nginx.wait();
    }
}

/// A folder for an agent inside the test's `dir`, with a name no other
/// test's agent has: the test helpers find an agent's shims (to end them)
/// by its folder's name.
fn agent_dir(dir: &tempfile::TempDir) -> PathBuf {
    tempfile::Builder::new()
        .prefix("fetch-agent-")
        .tempdir_in(dir.path())
        .unwrap()
        .keep()
}

fn agent_allowing(dir: &Path, key: Arc<SigningKey>, prefixes: &[String], limits: &str) -> Agent {
    let allow: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
    std::fs::create_dir_all(dir).unwrap();
    Agent::start(
        dir,
        key,
        &format!(
            "{}\n[limits]\n{limits}\n[fetch]\nallow = [{}]\n",
            web_service_toml(([127, 0, 0, 1], free_port()).into()),
            allow.join(", ")
        ),
    )
}

async fn fetch(
    agent: &Agent,
    envelope: Vec<u8>,
    url: &str,
) -> Result<pb::UploadArtifactResponse, tonic::Status> {
    agent
        .artifacts()
        .await
        .fetch_artifact(pb::FetchArtifactRequest {
            envelope,
            url: url.to_string(),
            peers: Vec::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The store's temp folder holds nothing (no partial file left behind).
fn temp_files(agent: &Agent) -> Vec<String> {
    file_names(&agent.store().join("tmp"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fetches_a_signed_release_from_nginx_and_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start(&dir.path().join("repository"));
    let key = Arc::new(SigningKey::generate());
    let agent = agent_allowing(&agent_dir(&dir), key, &[repository.prefix()], "");
    let bytes = Agent::demo_server_bytes("1.5.0");
    let url = repository.publish("web-1.5.0", &bytes);
    let envelope = agent.sign("web", "1.5.0", &bytes);

    let fetched = fetch(&agent, envelope.clone(), &url).await.unwrap();
    assert!(!fetched.already_present);
    assert_eq!(fetched.bytes_received, bytes.len() as u64);
    let sha = sha256_hex(&bytes);
    assert_eq!(
        std::fs::read(agent.store().join("sha256").join(&sha)).unwrap(),
        bytes
    );
    assert!(temp_files(&agent).is_empty(), "{:?}", temp_files(&agent));
    // It runs like an uploaded release.
    agent.activate_ok("web", &sha, Downgrade::NotAllowed).await;
    let status = agent.status("web").await;
    assert_eq!(
        (
            status.current_version.as_str(),
            status.current_sha256.as_str()
        ),
        ("1.5.0", sha.as_str())
    );
    // A second fetch asks the repository nothing.
    let again = fetch(&agent, envelope, &url).await.unwrap();
    assert!(again.already_present);
    assert_eq!(repository.requests(), vec!["200 -".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_file_on_the_repository_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start(&dir.path().join("repository"));
    let key = Arc::new(SigningKey::generate());
    let agent = agent_allowing(&agent_dir(&dir), key, &[repository.prefix()], "");
    let bytes = pseudo_random_bytes(3 << 20, 19);
    let envelope = agent.sign("web", "1.5.0", &bytes);

    // Same size, one byte changed: refused at the end, the bytes discarded.
    let mut tampered = bytes.clone();
    tampered[1 << 20] ^= 1;
    let url = repository.publish("web-1.5.0", &tampered);
    let err = fetch(&agent, envelope.clone(), &url).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    // Longer than signed: stopped while streaming.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"appended");
    let url = repository.publish("web-1.5.0-longer", &longer);
    let err = fetch(&agent, envelope.clone(), &url).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let sha = sha256_hex(&bytes);
    assert!(!agent.store().join("sha256").join(&sha).exists());
    assert!(temp_files(&agent).is_empty(), "{:?}", temp_files(&agent));
    // Missing: the repository's answer, named.
    let err = fetch(
        &agent,
        envelope.clone(),
        &format!("{}web-9.9.9", repository.prefix()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("404"), "{err:?}");
    // The right file then goes through.
    let url = repository.publish("web-1.5.0-good", &bytes);
    fetch(&agent, envelope, &url).await.unwrap();
    assert_eq!(
        std::fs::read(agent.store().join("sha256").join(&sha)).unwrap(),
        bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetching_is_off_until_configured_and_limited_to_the_allowed_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(SigningKey::generate());
    let agent = Agent::start(dir.path(), key, "");
    let envelope = agent.sign("web", "1.5.0", b"bytes");
    let err = fetch(&agent, envelope.clone(), "http://127.0.0.1:9/web")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("[fetch] allow"), "{err:?}");
    drop(agent);

    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(SigningKey::generate());
    let agent = agent_allowing(
        dir.path(),
        key,
        &["http://127.0.0.1:9/releases/".into()],
        "",
    );
    let envelope = agent.sign("web", "1.5.0", b"bytes");
    for url in [
        "http://127.0.0.1:9/other/web",
        "http://127.0.0.1:99/releases/web",
    ] {
        let err = fetch(&agent, envelope.clone(), url).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{url}: {err:?}");
    }
}

/// A repository that sends the first `sent` bytes of `bytes` (announcing
/// one byte more than there are) and then nothing, keeping the connection
/// open.
async fn stalling_repository(bytes: Vec<u8>, sent: usize) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut request = [0u8; 2048];
            let _ = stream.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                bytes.len() + 1
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&bytes[..sent]).await;
            held.push(stream);
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_fetch_times_out_keeps_its_bytes_and_the_next_fetch_resumes_with_a_range() {
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start(&dir.path().join("repository"));
    let bytes = pseudo_random_bytes(4 << 20, 7);
    let sent = (3 << 20) / 2;
    let (stall_port, stalling) = stalling_repository(bytes.clone(), sent).await;
    let stall_prefix = format!("http://127.0.0.1:{stall_port}/releases/");
    let key = Arc::new(SigningKey::generate());
    let agent = agent_allowing(
        &agent_dir(&dir),
        key,
        &[repository.prefix(), stall_prefix.clone()],
        "upload_idle_timeout = \"1s\"",
    );
    let envelope = agent.sign("web", "1.5.0", &bytes);
    let sha = sha256_hex(&bytes);

    let err = fetch(
        &agent,
        envelope.clone(),
        &format!("{stall_prefix}web-1.5.0"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("fetch again to resume"), "{err:?}");
    assert!(!agent.store().join("sha256").join(&sha).exists());
    // What came is kept (not under the final name), for the next fetch.
    let partial = agent.store().join("tmp").join(format!("fetch-{sha}.part"));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), sent as u64);
    stalling.abort();

    // The next fetch (here from another mirror of the same file) asks only
    // for the rest, and the whole file is verified.
    let url = repository.publish("web-1.5.0", &bytes);
    let resumed = fetch(&agent, envelope, &url).await.unwrap();
    assert_eq!(resumed.bytes_received, (bytes.len() - sent) as u64);
    assert_eq!(repository.requests(), vec![format!("206 bytes={sent}-")]);
    assert_eq!(
        std::fs::read(agent.store().join("sha256").join(&sha)).unwrap(),
        bytes
    );
    assert!(temp_files(&agent).is_empty(), "{:?}", temp_files(&agent));
}

/// `reloadctl push` with `artifact_url` in the project file: every agent
/// fetches the release from the repository itself, and the CLI sends each
/// only the envelope (the "CLI egress / artifact size" at most 2;
/// here it is a few kilobytes against the release's megabytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_artifact_url_has_every_agent_fetch_and_the_cli_sends_only_envelopes() {
    const HOSTS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let repository = Repository::start(&dir.path().join("repository"));
    let key = Arc::new(SigningKey::generate());
    let project = dir.path().join("project");
    std::fs::create_dir_all(project.join("releases")).unwrap();
    std::fs::write(project.join("release.key"), key.to_pem()).unwrap();
    std::fs::write(project.join("release.pub"), key.public().to_pem()).unwrap();
    std::fs::write(
        project.join("reloadctl.toml"),
        format!(
            "service = \"web\"\nartifact = \"releases/web-{{version}}\"\nartifact_url = \"{}web-{{version}}\"\n\
             trusted_keys = [\"release.pub\"]\n\
             [rollout]\ncanary = 1\nhealthy_checks = 2\nmin_healthy_time = \"300ms\"\nhealthy_deadline = \"10s\"\n",
            repository.prefix()
        ),
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
    repository.publish("web-1.5.0", &bytes);

    let mut agents = Vec::new();
    let mut hosts = String::new();
    for i in 0..HOSTS {
        let ip: std::net::IpAddr = format!("127.0.19.{}", i + 1).parse().unwrap();
        let agent_dir = agent_dir(&dir);
        let agent = Agent::start_at(
            ip,
            &agent_dir,
            key.clone(),
            &format!(
                "{}\n[fetch]\nallow = [{:?}]\n",
                web_service_toml((ip, free_port_on(ip)).into()),
                repository.prefix()
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
    let sent = finished["bytes_sent"].as_u64().unwrap();
    let egress = sent as f64 / bytes.len() as f64;
    println!(
        "CLI egress: {sent} bytes for a {}-byte release on {HOSTS} hosts = {egress:.5} × the artifact",
        bytes.len()
    );
    assert!(sent > 0 && egress <= 2.0, "{finished}");
    assert!(sent < 64 * 1024, "more than envelopes went out: {finished}");
    // Each agent fetched the whole file once, and runs it.
    assert_eq!(repository.requests(), vec!["200 -".to_string(); HOSTS]);
    for agent in &agents {
        let status = agent.status("web").await;
        assert_eq!(status.current_version, "1.5.0", "{}", agent.host());
        assert_eq!(status.current_sha256, sha256_hex(&bytes));
    }
}

/// A fetch cut off after the file's last byte (the repository promised one
/// more) keeps every byte; the next fetch asks the repository nothing (it
/// is gone here) and the hash decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_cut_off_after_its_last_byte_completes_without_asking_again() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = pseudo_random_bytes(1 << 20, 11);
    let (port, stalling) = stalling_repository(bytes.clone(), bytes.len()).await;
    let prefix = format!("http://127.0.0.1:{port}/releases/");
    let key = Arc::new(SigningKey::generate());
    let agent = agent_allowing(
        &agent_dir(&dir),
        key,
        std::slice::from_ref(&prefix),
        "upload_idle_timeout = \"1s\"",
    );
    let envelope = agent.sign("web", "1.5.0", &bytes);
    let url = format!("{prefix}web-1.5.0");
    let err = fetch(&agent, envelope.clone(), &url).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    stalling.abort();
    let _ = stalling.await;
    let done = fetch(&agent, envelope, &url).await.unwrap();
    assert_eq!(done.bytes_received, 0);
    let sha = sha256_hex(&bytes);
    assert_eq!(
        std::fs::read(agent.store().join("sha256").join(&sha)).unwrap(),
        bytes
    );
    assert!(temp_files(&agent).is_empty(), "{:?}", temp_files(&agent));
}
