//! End-to-end: what operators and pipelines read off an agent: Prometheus
//! metrics, and gRPC reflection without the `.proto` files.

use std::sync::Arc;

use reload_artifact::{Envelope, SigningKey};
use reload_tests::*;

/// The value of the sample `name` whose labels include every `labels` pair.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name} is not a single value: {other:?}"),
    }
}

/// Two uploads stored (a good and a bad version of `web`), one refused
/// (an untrusted key) and one already present; then a reload that
/// succeeds and one that fails (exits before ready).
async fn make_what_the_metrics_count(agent: &Agent) {
    let good = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    let script = format!(
        "#!/bin/sh\nexec '{}' --exit-before-ready 3 \"$@\"\n",
        bin_path("reload-demo-server").display()
    );
    let bad = agent.stage("web", "2.0.0", script.as_bytes()).await;
    // One refused upload (untrusted key) and one already present.
    let bytes = pseudo_random_bytes(1000, 9);
    let stranger = Envelope::sign_manifest(
        &manifest_for("web", "3.0", &bytes),
        &[&SigningKey::generate()],
    )
    .to_json();
    let mut client = agent.artifacts().await;
    upload(&mut client, upload_messages(stranger, &bytes, 1024))
        .await
        .unwrap_err();
    agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;

    // Activate answers both (the second reload fails: it is counted).
    for sha in [&good, &bad] {
        agent
            .activate("web", sha, Downgrade::NotAllowed)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_reloads_uploads_and_refusals_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "[[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n[[service.listener]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    );
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    make_what_the_metrics_count(&agent).await;

    let reply = http_get(agent.health_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    assert_eq!(reply.code, 200);
    assert_the_counts(&reply.body);
}

/// The counts [`make_what_the_metrics_count`] made, in the `/metrics`
/// text: exactly.
fn assert_the_counts(text: &str) {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the text format parses");
    let web = ("service", "web");
    assert_eq!(
        value(
            &scrape,
            "reload_reloads_total",
            &[web, ("result", "succeeded")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &scrape,
            "reload_reloads_total",
            &[web, ("result", "exited_before_ready")]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "reload_uploads_total", &[("result", "stored")]),
        2.0
    );
    assert_eq!(
        value(&scrape, "reload_uploads_total", &[("result", "refused")]),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "reload_uploads_total",
            &[("result", "already_present")]
        ),
        1.0
    );
    assert!(
        value(
            &scrape,
            "reload_upload_bytes_total",
            &[("result", "stored")]
        ) > 1_000_000.0
    );
    assert_eq!(
        value(
            &scrape,
            "reload_verification_failures_total",
            &[("reason", "untrusted_key")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "reload_service_up", &[web]), 1.0);
    assert_eq!(
        value(
            &scrape,
            "reload_service_build_info",
            &[web, ("version", "1.0.0")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "reload_agent_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // One process became ready (the second never did).
    let ready_count = text
        .lines()
        .find(|l| {
            l.starts_with("reload_handoff_duration_seconds_count")
                && l.contains("phase=\"start_to_ready\"")
        })
        .unwrap_or_else(|| panic!("no start_to_ready histogram\n{text}"));
    assert!(ready_count.ends_with(" 1"), "{ready_count}");
}

#[tokio::test]
async fn reflection_describes_reload_v1_without_the_proto_files() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), "");
    let mut reflection = ServerReflectionClient::new(agent.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "reload.v1.ServiceControl".into(),
        )),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected answer {response:?}");
    };
    use prost::Message;
    let descriptors: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .collect();
    let file = descriptors
        .iter()
        .find(|f| f.name() == "reload/v1/services.proto")
        .expect("services.proto");
    let service = file
        .service
        .iter()
        .find(|s| s.name() == "ServiceControl")
        .unwrap();
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        vec![
            "Activate",
            "Rollback",
            "StopService",
            "GetStatus",
            "WatchEvents",
            "ReadLogs"
        ]
    );
    let activate = file
        .message_type
        .iter()
        .find(|m| m.name() == "ActivateRequest")
        .unwrap();
    let fields: Vec<&str> = activate.field.iter().map(|f| f.name()).collect();
    assert_eq!(
        fields,
        vec!["service", "sha256", "lease", "allow_downgrade"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_deploys_through_the_grpc_api() {
    // grpcio and grpcio-tools are part of the test toolchain (.ci/run
    // installs them with pip); missing ones fail this test, loudly.
    let check = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .expect("python3 is needed");
    assert!(
        check.status.success(),
        "the Python example needs grpcio and grpcio-tools: pip install grpcio grpcio-tools (.ci/run does)\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "[[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n[[service.listener]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n\
         [service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\n"
    );
    let key = Arc::new(SigningKey::generate());
    let agent = Agent::start(dir.path(), key.clone(), &config);
    let artifact = dir.path().join("web");
    std::fs::write(&artifact, Agent::demo_server_bytes("4.2.0")).unwrap();
    std::fs::write(dir.path().join("release.key"), key.to_pem()).unwrap();
    reloadctl_ok(
        dir.path(),
        &[
            "sign",
            "--key",
            "release.key",
            "--service",
            "web",
            "--version",
            "4.2",
            "web",
        ],
    );
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/deploy.py");
    let output = tokio::process::Command::new("python3")
        .arg(&example)
        .args(["--host", &agent.host(), "--service", "web", "--artifact"])
        .arg(&artifact)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("is healthy, version 4.2.0"), "{stdout}");
    // It really is serving: the service answers as 4.2.0.
    assert_eq!(agent.status("web").await.current_version, "4.2.0");
}
