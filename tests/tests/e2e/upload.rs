//! End-to-end: a real `reload-agent` process, real gRPC uploads, and the
//! bytes it leaves on disk. Every bad input must return its status code and
//! leave the store exactly as it was.

use std::sync::Arc;
use std::time::Duration;

use reload_artifact::dsse::Envelope;
use reload_artifact::{Manifest, SigningKey, PAYLOAD_TYPE};
use reload_proto::v1 as pb;
use reload_proto::v1::upload_artifact_request::Part;
use reload_tests::*;
use tonic::Code;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

struct Fixture {
    agent: Agent,
    _dir: tempfile::TempDir,
}

fn fixture(extra_toml: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), extra_toml);
    Fixture { agent, _dir: dir }
}

/// An agent that already holds one artifact, so "unchanged" is meaningful.
async fn fixture_with_existing() -> Fixture {
    let f = fixture("");
    let bytes = pseudo_random_bytes(300 * KIB, 1);
    let envelope = f.agent.sign("web", "1.0", &bytes);
    let mut client = f.agent.artifacts().await;
    upload(&mut client, upload_messages(envelope, &bytes, 64 * KIB))
        .await
        .unwrap();
    f
}

/// Sends `messages`, expects `code` with `needle` in the message, and checks
/// that no file under the store was added, removed or changed.
async fn assert_refused(
    f: &Fixture,
    messages: Vec<pb::UploadArtifactRequest>,
    code: Code,
    needle: &str,
) {
    let before = snapshot(&f.agent.store());
    let mut client = f.agent.artifacts().await;
    let err = upload(&mut client, messages)
        .await
        .expect_err("the upload must be refused");
    assert_eq!(err.code(), code, "wrong code for: {}", err.message());
    assert!(
        err.message().contains(needle),
        "message {:?} lacks {needle:?}",
        err.message()
    );
    assert_eq!(
        snapshot(&f.agent.store()),
        before,
        "the store changed after a refused upload"
    );
}

fn modified(path: &std::path::Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn sign_manifest(key: &SigningKey, manifest: &Manifest) -> Vec<u8> {
    Envelope::sign_manifest(manifest, &[key]).to_json()
}

/// The bytes on disk are the bytes sent, under their sha256, not writable,
/// and no temp file is left.
fn assert_stored_read_only(agent: &Agent, sha: &str) {
    let path = agent.store().join("sha256").join(sha);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(sha256_hex(&on_disk), sha);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o500
    );
    assert_eq!(
        std::fs::read_dir(agent.store().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn fifty_mib_artifact_is_stored_verified_and_not_uploaded_twice() {
    let f = fixture("");
    let bytes = pseudo_random_bytes(50 * MIB, 7);
    let sha = sha256_hex(&bytes);
    let envelope = f.agent.sign("web", "1.4", &bytes);
    let mut client = f.agent.artifacts().await;

    let stat = client
        .stat_artifact(pb::StatArtifactRequest {
            sha256: sha.clone(),
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stat.present);

    let stored = upload(
        &mut client,
        upload_messages(envelope.clone(), &bytes, 256 * KIB),
    )
    .await
    .unwrap();
    assert!(!stored.already_present);
    assert_eq!(stored.bytes_received, bytes.len() as u64);
    let manifest = stored.artifact.unwrap().manifest.unwrap();
    assert_eq!(
        (manifest.service.as_str(), manifest.version.as_str()),
        ("web", "1.4.0")
    );

    assert_stored_read_only(&f.agent, &sha);

    let stat = client
        .stat_artifact(pb::StatArtifactRequest {
            sha256: sha.clone(),
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stat.present);
    assert_eq!(
        stat.artifact.unwrap().manifest.unwrap().size,
        bytes.len() as u64
    );

    // A second upload of the same artifact is answered before any chunk.
    let again = upload(&mut client, upload_messages(envelope, &bytes, 256 * KIB))
        .await
        .unwrap();
    assert!(again.already_present);
    assert_eq!(again.bytes_received, 0);

    let listed = client
        .list_artifacts(pb::ListArtifactsRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.artifacts.len(), 1);

    // Re-verification of the stored file passes.
    let validated = client
        .validate_artifact(pb::ValidateArtifactRequest {
            target: Some(pb::validate_artifact_request::Target::Sha256(sha)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        validated.artifact.unwrap().key_ids,
        vec![f.agent.key.id().to_string()]
    );
}

#[tokio::test]
async fn tampered_byte_is_data_loss() {
    let f = fixture_with_existing().await;
    let mut bytes = pseudo_random_bytes(500 * KIB, 2);
    let envelope = f.agent.sign("web", "1.1", &bytes);
    bytes[123_456] ^= 0x01;
    assert_refused(
        &f,
        upload_messages(envelope, &bytes, 64 * KIB),
        Code::DataLoss,
        "sha256",
    )
    .await;
}

#[tokio::test]
async fn truncated_stream_is_data_loss() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(500 * KIB, 3);
    let envelope = f.agent.sign("web", "1.1", &bytes);
    let messages = upload_messages(envelope, &bytes[..200 * KIB], 64 * KIB);
    assert_refused(&f, messages, Code::DataLoss, "truncated").await;
}

#[tokio::test]
async fn more_bytes_than_the_manifest_is_stopped_while_streaming() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(256 * KIB, 4);
    let envelope = f.agent.sign("web", "1.1", &bytes);
    let before = snapshot(&f.agent.store());
    let mut client = f.agent.artifacts().await;
    // The stream stays open after the excess chunk: the agent must answer
    // while the client is still sending, not at the end of the stream.
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    for message in upload_messages(envelope, &bytes, 64 * KIB) {
        sender.send(message).await.unwrap();
    }
    sender
        .send(pb::UploadArtifactRequest {
            part: Some(Part::Chunk(vec![0u8; 1024].into())),
        })
        .await
        .unwrap();
    let call = client.upload_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let err = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the agent must stop the upload without waiting for the stream to end")
        .unwrap_err();
    drop(sender);
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("more than the"), "{}", err.message());
    assert_eq!(snapshot(&f.agent.store()), before);
}

#[tokio::test]
async fn untrusted_key_is_permission_denied() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 5);
    let stranger = SigningKey::generate();
    let envelope = sign_manifest(&stranger, &manifest_for("web", "1.1", &bytes));
    assert_refused(
        &f,
        upload_messages(envelope, &bytes, 64 * KIB),
        Code::PermissionDenied,
        "untrusted",
    )
    .await;
}

#[tokio::test]
async fn missing_signature_is_permission_denied() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 6);
    let mut envelope =
        Envelope::sign_manifest(&manifest_for("web", "1.1", &bytes), &[&f.agent.key]);
    envelope.signatures.clear();
    let messages = upload_messages(envelope.to_json(), &bytes, 64 * KIB);
    assert_refused(&f, messages, Code::PermissionDenied, "no signature").await;
}

#[tokio::test]
async fn signature_over_a_different_payload_is_permission_denied() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 7);
    let other = pseudo_random_bytes(10 * KIB, 8);
    // A genuine signature of another artifact's manifest, with this
    // artifact's manifest put in as payload.
    let mut envelope =
        Envelope::sign_manifest(&manifest_for("web", "1.1", &other), &[&f.agent.key]);
    let ours = Envelope::sign_manifest(
        &manifest_for("web", "1.1", &bytes),
        &[&SigningKey::generate()],
    );
    envelope.payload = ours.payload;
    let messages = upload_messages(envelope.to_json(), &bytes, 64 * KIB);
    assert_refused(
        &f,
        messages,
        Code::PermissionDenied,
        "does not match the payload",
    )
    .await;
}

#[tokio::test]
async fn malformed_envelope_is_invalid_argument() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 9);
    let messages = upload_messages(b"{\"payloadType\": ".to_vec(), &bytes, 64 * KIB);
    assert_refused(&f, messages, Code::InvalidArgument, "not valid DSSE JSON").await;
}

#[tokio::test]
async fn non_json_payload_is_invalid_argument() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 10);
    let envelope =
        Envelope::sign_payload(PAYLOAD_TYPE, b"service=web version=1.1", &[&f.agent.key]);
    let messages = upload_messages(envelope.to_json(), &bytes, 64 * KIB);
    assert_refused(
        &f,
        messages,
        Code::InvalidArgument,
        "payload is not a manifest",
    )
    .await;
}

#[tokio::test]
async fn wrong_payload_type_is_invalid_argument() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 11);
    let manifest = serde_json::to_vec(&manifest_for("web", "1.1", &bytes)).unwrap();
    let envelope =
        Envelope::sign_payload("application/vnd.in-toto+json", &manifest, &[&f.agent.key]);
    let messages = upload_messages(envelope.to_json(), &bytes, 64 * KIB);
    assert_refused(&f, messages, Code::InvalidArgument, "payloadType").await;
}

#[tokio::test]
async fn expired_manifest_is_failed_precondition() {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 12);
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    let manifest = Manifest::new(
        "web",
        "1.1",
        &sha256_hex(&bytes),
        bytes.len() as u64,
        two_hours_ago,
        Duration::from_secs(3600),
    )
    .unwrap();
    let envelope = sign_manifest(&f.agent.key, &manifest);
    assert_refused(
        &f,
        upload_messages(envelope, &bytes, 64 * KIB),
        Code::FailedPrecondition,
        "expired",
    )
    .await;
}

async fn assert_service_name_refused(name: &str) {
    let f = fixture_with_existing().await;
    let bytes = pseudo_random_bytes(10 * KIB, 13);
    let mut manifest = manifest_for("web", "1.1", &bytes);
    manifest.service = name.to_string();
    let envelope = sign_manifest(&f.agent.key, &manifest);
    assert_refused(
        &f,
        upload_messages(envelope, &bytes, 64 * KIB),
        Code::InvalidArgument,
        "service name",
    )
    .await;
}

#[tokio::test]
async fn service_name_with_slash_is_invalid_argument() {
    assert_service_name_refused("web/../../etc").await;
}

#[tokio::test]
async fn service_name_dot_dot_is_invalid_argument() {
    assert_service_name_refused("..").await;
}

#[tokio::test]
async fn service_name_with_nul_is_invalid_argument() {
    assert_service_name_refused("web\0x").await;
}

#[tokio::test]
async fn chunk_above_the_limit_is_resource_exhausted() {
    let f = fixture("[limits]\nmax_chunk_size = \"64 KiB\"\n");
    let bytes = pseudo_random_bytes(200 * KIB, 14);
    let envelope = f.agent.sign("web", "1.1", &bytes);
    let messages = upload_messages(envelope, &bytes, 64 * KIB + 1);
    assert_refused(&f, messages, Code::ResourceExhausted, "max_chunk_size").await;
}

#[tokio::test]
async fn artifact_above_the_size_limit_is_refused_before_any_byte() {
    let f = fixture("[limits]\nmax_artifact_size = \"1 MiB\"\n");
    let bytes = pseudo_random_bytes(MIB + 1, 15);
    let envelope = f.agent.sign("web", "1.1", &bytes);
    // Only the envelope is sent: the refusal cannot depend on the bytes.
    let messages = upload_messages(envelope, &[], 64 * KIB);
    assert_refused(&f, messages, Code::ResourceExhausted, "max_artifact_size").await;
}

#[tokio::test]
async fn client_that_disconnects_mid_upload_leaves_no_temp_file() {
    let f = fixture_with_existing().await;
    let before = snapshot(&f.agent.store());
    let bytes = pseudo_random_bytes(4 * MIB, 16);
    let envelope = f.agent.sign("web", "1.1", &bytes);
    let channel = f.agent.channel().await;
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let mut messages = upload_messages(envelope, &bytes, 64 * KIB).into_iter();
    for message in messages.by_ref().take(20) {
        sender.send(message).await.unwrap();
    }
    let call = tokio::spawn(async move {
        let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
        client
            .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    });
    let tmp = f.agent.store().join("tmp");
    eventually(
        "the upload's temp file to appear",
        Duration::from_secs(20),
        async || file_names(&tmp),
        |names| names.len() == 1,
    )
    .await;
    // Gone mid-stream: the connection is torn down, the stream never ends.
    call.abort();
    let _ = call.await;
    eventually(
        "the agent to remove the temp file",
        Duration::from_secs(20),
        async || file_names(&tmp),
        Vec::is_empty,
    )
    .await;
    assert_eq!(snapshot(&f.agent.store()), before);
    drop(sender);
}

#[tokio::test]
async fn first_message_must_be_the_envelope() {
    let f = fixture_with_existing().await;
    let messages = vec![pb::UploadArtifactRequest {
        part: Some(Part::Chunk(vec![1, 2, 3].into())),
    }];
    assert_refused(
        &f,
        messages,
        Code::InvalidArgument,
        "first UploadArtifact message",
    )
    .await;
}

#[tokio::test]
async fn concurrent_uploads_of_one_artifact_store_it_once() {
    let f = fixture("");
    let bytes = Arc::new(pseudo_random_bytes(8 * MIB, 17));
    let envelope = f.agent.sign("web", "2.0", &bytes);
    let mut calls = Vec::new();
    for _ in 0..4 {
        let channel = f.agent.channel().await;
        let (envelope, bytes) = (envelope.clone(), bytes.clone());
        calls.push(tokio::spawn(async move {
            let mut client = pb::artifact_service_client::ArtifactServiceClient::new(channel);
            upload(&mut client, upload_messages(envelope, &bytes, 256 * KIB)).await
        }));
    }
    let mut stored = 0;
    for call in calls {
        let response = call
            .await
            .unwrap()
            .expect("every concurrent upload succeeds");
        stored += usize::from(!response.already_present);
    }
    assert!(stored >= 1);
    let files = snapshot(&f.agent.store());
    let sha = sha256_hex(&bytes);
    assert_eq!(
        files.keys().cloned().collect::<Vec<_>>(),
        vec![
            format!("sha256/{sha}"),
            format!("sha256/{sha}.web.dsse.json")
        ]
    );
    assert_eq!(files[&format!("sha256/{sha}")].1, sha);
}

#[tokio::test]
async fn uploads_above_the_concurrency_limit_are_refused() {
    let f = fixture("[limits]\nmax_concurrent_uploads = 1\n");
    let bytes = pseudo_random_bytes(2 * MIB, 18);
    let envelope = f.agent.sign("web", "1.0", &bytes);
    // Hold one upload open.
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let mut messages = upload_messages(envelope.clone(), &bytes, 64 * KIB).into_iter();
    for message in messages.by_ref().take(3) {
        sender.send(message).await.unwrap();
    }
    let mut holder = f.agent.artifacts().await;
    let held = tokio::spawn(async move {
        holder
            .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    });
    let tmp = f.agent.store().join("tmp");
    eventually(
        "the first upload to start",
        Duration::from_secs(20),
        async || file_names(&tmp),
        |names| names.len() == 1,
    )
    .await;
    let mut client = f.agent.artifacts().await;
    let err = upload(&mut client, upload_messages(envelope, &bytes, 64 * KIB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("max_concurrent_uploads"));
    // The first upload still completes.
    for message in messages {
        sender.send(message).await.unwrap();
    }
    drop(sender);
    held.await.unwrap().expect("the held upload completes");
}

#[tokio::test]
async fn only_the_newest_versions_are_kept() {
    // Lines before any table header land in [agent].
    let f = fixture("keep_versions = 2\n");
    let mut client = f.agent.artifacts().await;
    let mut shas = Vec::new();
    for (i, version) in ["1.0", "1.1", "1.2"].iter().enumerate() {
        let bytes = pseudo_random_bytes(100 * KIB, 100 + i as u64);
        shas.push(sha256_hex(&bytes));
        let envelope = f.agent.sign("web", version, &bytes);
        upload(&mut client, upload_messages(envelope, &bytes, 64 * KIB))
            .await
            .unwrap();
        // stored_at is the envelope file's mtime, as coarse as the file
        // system's clock: wait until that clock has passed it, so that the
        // next upload is unambiguously newer.
        let envelope = f
            .agent
            .store()
            .join(format!("sha256/{}.web.dsse.json", shas[i]));
        let probe = f.agent.dir.join("mtime-probe");
        eventually(
            "the file system's clock to pass the stored envelope's mtime",
            Duration::from_secs(10),
            async || {
                std::fs::write(&probe, version).unwrap();
                (modified(&envelope), modified(&probe))
            },
            |(stored, now)| now > stored,
        )
        .await;
    }
    // Another service is counted on its own.
    let other = pseudo_random_bytes(10 * KIB, 200);
    upload(
        &mut client,
        upload_messages(f.agent.sign("api", "0.1", &other), &other, 64 * KIB),
    )
    .await
    .unwrap();
    let listed = client
        .list_artifacts(pb::ListArtifactsRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<_> = listed
        .artifacts
        .iter()
        .map(|a| a.manifest.clone().unwrap().version)
        .collect();
    assert_eq!(versions, vec!["1.2.0", "1.1.0"]);
    let objects = f.agent.store().join("sha256");
    assert!(
        !objects.join(&shas[0]).exists(),
        "the oldest version is still on disk: {:?} {shas:?}",
        snapshot(&f.agent.store())
    );
    assert!(!objects.join(format!("{}.web.dsse.json", shas[0])).exists());
    assert!(objects.join(&shas[2]).exists());
    assert!(objects.join(sha256_hex(&other)).exists());
}

#[tokio::test]
async fn restart_removes_leftovers_and_keeps_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(SigningKey::generate());
    let mut agent = Agent::start(dir.path(), key.clone(), "");
    let bytes = pseudo_random_bytes(100 * KIB, 19);
    let mut client = agent.artifacts().await;
    upload(
        &mut client,
        upload_messages(agent.sign("web", "1.0", &bytes), &bytes, 64 * KIB),
    )
    .await
    .unwrap();
    let kept = snapshot(&agent.store());
    agent.kill();
    // What a crash mid-upload or mid-commit leaves behind.
    std::fs::write(agent.store().join("tmp/partial.123.0"), b"half a file").unwrap();
    let orphan = format!("sha256/{}.dsse.json", "ab".repeat(32));
    std::fs::write(agent.store().join(&orphan), b"{}").unwrap();
    let agent = Agent::start_with_config(dir.path(), key);
    assert_eq!(snapshot(&agent.store()), kept);
    let mut client = agent.artifacts().await;
    let stat = client
        .stat_artifact(pb::StatArtifactRequest {
            sha256: sha256_hex(&bytes),
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stat.present);
}

#[tokio::test]
async fn stored_file_changed_on_disk_fails_validation() {
    let f = fixture("");
    let bytes = pseudo_random_bytes(100 * KIB, 20);
    let sha = sha256_hex(&bytes);
    let mut client = f.agent.artifacts().await;
    upload(
        &mut client,
        upload_messages(f.agent.sign("web", "1.0", &bytes), &bytes, 64 * KIB),
    )
    .await
    .unwrap();
    let path = f.agent.store().join("sha256").join(&sha);
    let mut changed = bytes.clone();
    changed[0] ^= 0xff;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, &changed).unwrap();
    let err = client
        .validate_artifact(pb::ValidateArtifactRequest {
            target: Some(pb::validate_artifact_request::Target::Sha256(sha)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(err.message().contains("damaged"), "{}", err.message());
}

#[tokio::test]
async fn validate_checks_an_envelope_without_bytes() {
    let f = fixture("");
    let bytes = pseudo_random_bytes(10 * KIB, 21);
    let mut client = f.agent.artifacts().await;
    let good = client
        .validate_artifact(pb::ValidateArtifactRequest {
            target: Some(pb::validate_artifact_request::Target::Envelope(
                f.agent.sign("web", "3.1", &bytes),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(good.artifact.unwrap().manifest.unwrap().version, "3.1.0");
    let stranger = sign_manifest(&SigningKey::generate(), &manifest_for("web", "3.1", &bytes));
    let err = client
        .validate_artifact(pb::ValidateArtifactRequest {
            target: Some(pb::validate_artifact_request::Target::Envelope(stranger)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        snapshot(&f.agent.store()).is_empty()
            || snapshot(&f.agent.store())
                .keys()
                .all(|k| !k.starts_with("sha256/"))
    );
}

#[tokio::test]
async fn health_reflection_and_agent_calls_answer() {
    let f = fixture("");
    let channel = f.agent.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "reload.v1.ArtifactService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "reload.v1.ArtifactService",
        "reload.v1.ServiceControl",
        "reload.v1.LeaseService",
        "reload.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut upgrade = pb::agent_service_client::AgentServiceClient::new(channel.clone());
    let err = upgrade
        .upgrade_agent(pb::UpgradeAgentRequest::default())
        .await
        .unwrap_err();
    // Every call is implemented; an upgrade with no target says what it
    // needs.
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sha256"), "{}", err.message());

    let mut agent = pb::agent_service_client::AgentServiceClient::new(channel);
    let info = agent
        .get_agent_info(pb::GetAgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.trusted_key_ids, vec![f.agent.key.id().to_string()]);
    assert_eq!(info.limits.unwrap().max_chunk_bytes, MIB as u64);
}

/// One damaged envelope file made every upload and ListArtifacts fail with
/// DATA_LOSS. It is moved to `store/quarantine/` (logged), and only its own
/// artifact is affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_envelope_is_quarantined_and_affects_only_its_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), "");
    let good = agent.stage("web", "1.0.0", b"good release").await;
    let damaged = agent.stage("web", "2.0.0", b"soon damaged").await;
    let envelope = agent
        .store()
        .join("sha256")
        .join(format!("{damaged}.web.dsse.json"));
    std::fs::write(&envelope, b"{ not an envelope").unwrap();
    let listed = agent
        .artifacts()
        .await
        .list_artifacts(pb::ListArtifactsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<String> = listed
        .artifacts
        .iter()
        .map(|a| a.manifest.as_ref().unwrap().sha256.clone())
        .collect();
    assert_eq!(listed, vec![good.clone()]);
    // Uploads go on.
    let third = agent.stage("web", "3.0.0", b"third release").await;
    assert!(agent.store().join("sha256").join(&third).exists());
    // Set aside where an operator can look, both halves.
    let quarantine = agent.store().join("quarantine");
    assert!(quarantine.join(format!("{damaged}.web.dsse.json")).exists());
    assert!(quarantine.join(&damaged).exists());
    assert!(!envelope.exists());
    assert!(agent.log_text().contains("moved to quarantine"));
    // Counted, for an alert.
    let metrics = http_get(agent.health_addr.unwrap(), "/metrics")
        .await
        .unwrap()
        .body;
    assert_eq!(
        reload_tests::hostile::metric(&metrics, "reload_store_quarantined_total", &[]),
        1.0,
        "{metrics}"
    );
}

/// Kills `service`'s process and waits until the agent restarted it on the
/// same artifact.
async fn crash_and_restart(agent: &Agent, service: &str) {
    let before = agent.status(service).await;
    send_signal(before.pid, nix::sys::signal::Signal::SIGKILL);
    eventually(
        format!("{service} to be restarted after a crash"),
        Duration::from_secs(20),
        async || agent.status(service).await,
        |s| {
            s.pid != 0
                && s.pid != before.pid
                && s.state == pb::ServiceState::Running as i32
                && s.current_sha256 == before.current_sha256
        },
    )
    .await;
}

/// The same bytes signed for two services: the second envelope replaced
/// the first, so the first service could not restart after its next crash
/// ("signed for service worker, not web"). Envelopes are kept per service;
/// a re-upload that would shorten an expiry keeps the stored one; a store
/// from before (one `<hex>.dsse.json`) is migrated at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_bytes_signed_for_two_services_keep_both_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let (web_addr, worker_addr): (std::net::SocketAddr, std::net::SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let config = format!(
        "{}{}",
        web_service_toml(web_addr),
        web_service_toml(worker_addr).replace("name = \"web\"", "name = \"worker\"")
    );
    let key = Arc::new(SigningKey::generate());
    let mut agent = Agent::start(dir.path(), key.clone(), &config);
    let bytes = Agent::demo_server_bytes("1.0.0");
    let sha = agent.stage("web", "1.0.0", &bytes).await;
    assert_eq!(agent.stage("worker", "1.0.0", &bytes).await, sha);
    for service in ["web", "worker"] {
        agent
            .activate_ok(service, &sha, Downgrade::NotAllowed)
            .await;
    }
    crash_and_restart(&agent, "web").await;
    crash_and_restart(&agent, "worker").await;
    let stat = |service: &str| pb::StatArtifactRequest {
        sha256: sha.clone(),
        service: service.into(),
    };
    let mut artifacts = agent.artifacts().await;
    for service in ["web", "worker"] {
        let found = artifacts
            .stat_artifact(stat(service))
            .await
            .unwrap()
            .into_inner();
        assert!(found.present, "{service}");
        assert_eq!(found.artifact.unwrap().manifest.unwrap().service, service);
    }
    assert!(
        !artifacts
            .stat_artifact(stat("other"))
            .await
            .unwrap()
            .into_inner()
            .present
    );
    // A re-upload for web with an earlier expiry keeps the stored envelope.
    let mut web_expiry = async || {
        artifacts
            .stat_artifact(stat("web"))
            .await
            .unwrap()
            .into_inner()
            .artifact
            .unwrap()
            .manifest
            .unwrap()
            .expires
    };
    let stored_expiry = web_expiry().await;
    let mut shorter = manifest_for("web", "1.0.0", &bytes);
    (shorter.os, shorter.arch) = ("any".into(), "any".into());
    // Well before the stored one (test manifests expire in an hour).
    shorter.expires =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(600))
            .to_string();
    let shorter_expiry = humantime::parse_rfc3339(&shorter.expires).unwrap();
    agent.stage_manifest(shorter, &bytes).await;
    let kept = web_expiry().await;
    assert_eq!(kept, stored_expiry);
    let kept = std::time::SystemTime::try_from(kept.unwrap()).unwrap();
    assert!(kept > shorter_expiry, "the longer expiry was kept");
    // A store from before: one envelope named `<hex>.dsse.json`.
    agent.kill();
    let objects = agent.store().join("sha256");
    std::fs::rename(
        objects.join(format!("{sha}.web.dsse.json")),
        objects.join(format!("{sha}.dsse.json")),
    )
    .unwrap();
    let restarted = Agent::start(dir.path(), key, &config);
    drop(std::mem::replace(&mut agent, restarted));
    assert!(objects.join(format!("{sha}.web.dsse.json")).exists());
    assert!(!objects.join(format!("{sha}.dsse.json")).exists());
    crash_and_restart(&agent, "web").await;
}
