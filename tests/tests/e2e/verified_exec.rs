//! End-to-end: only verified bytes ever run. A writer with access to the
//! store swaps the stored files all the time (a wrapper renamed over them
//! and renamed back; the file overwritten in place and restored) while the
//! agent activates and restarts its service. The wrapper would leave a
//! marker file if it ever ran; it never may: every activation either runs
//! the verified bytes or is refused, and crash restarts run the verified
//! image the agent holds, whatever the store's files say.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::*;

/// The file under attack.
pub(super) type Target = Arc<std::sync::Mutex<Option<PathBuf>>>;

/// Swaps the file `target` names, over and over until `stop`, with short
/// random pauses, so that about half of the time the path holds the
/// wrapper: the original renamed aside and `wrapper` renamed in its place,
/// then the original renamed back; and the file's first bytes overwritten
/// in place with `wrapper` (same inode: a `#!` line runs the wrapper, the
/// rest is never read), then restored. Counts the swaps in `swaps`.
pub(super) fn attack(
    target: Target,
    wrapper: Vec<u8>,
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::{Read, Seek, SeekFrom, Write};
        use std::os::unix::fs::PermissionsExt;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut pause = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::thread::sleep(Duration::from_micros(rng % 2000));
        };
        while !stop.load(Ordering::SeqCst) {
            let Some(path) = target.lock().unwrap().clone() else {
                pause();
                continue;
            };
            let (aside, staged) = (path.with_extension("aside"), path.with_extension("swap"));
            // Errors are ignored, as an attacker would: the agent may prune
            // or re-check files under our feet (an upgraded agent scans its
            // store at start).
            let _ = std::fs::write(&staged, &wrapper);
            // Executable, as the stored file is: exec by path would run it.
            let _ = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o500));
            if std::fs::rename(&path, &aside).is_ok() {
                let _ = std::fs::rename(&staged, &path);
                pause();
                let _ = std::fs::rename(&aside, &path);
            }
            pause();
            // In place. Fails while the file is executed (ETXTBSY), as it
            // would be by an agent that runs store paths.
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            {
                let len = file.metadata().unwrap().len();
                let mut head = vec![0u8; wrapper.len()];
                let got = file.read(&mut head).unwrap_or(0);
                head.truncate(got);
                if file.seek(SeekFrom::Start(0)).is_ok() && file.write_all(&wrapper).is_ok() {
                    pause();
                    let _ = file.seek(SeekFrom::Start(0));
                    let _ = file.write_all(&head);
                    let _ = file.set_len(len);
                }
            }
            swaps.fetch_add(2, Ordering::Relaxed);
            pause();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_store_files_never_run_through_activations_and_crash_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = Agent::start(
        dir.path(),
        Arc::new(SigningKey::generate()),
        // Room for every release (the store keeps 5 by default).
        // Five quick crashes are not a crash loop here: each is restarted.
        &format!("keep_versions = 25\n{}", web_service_toml(addr)).replace(
            "[service.probation]\n",
            "[service.probation]\ncrash_window = \"0s\"\n",
        ),
    );
    let demo = bin_path("reload-demo-server");
    let marker = dir.path().join("the-wrapper-ran");
    // Small script releases (each its own bytes), so that every activation
    // is of an artifact the agent has not verified yet.
    let release = |i: usize| {
        format!(
            "#!/bin/sh\n# release 1.{i}.0\nexec '{}' \"$@\"\n",
            demo.display()
        )
        .into_bytes()
    };
    let wrapper = format!(
        "#!/bin/sh\ntouch '{}'\nexec '{}' \"$@\"\n",
        marker.display(),
        demo.display()
    )
    .into_bytes();
    let mut shas = Vec::new();
    for i in 0..20 {
        shas.push(agent.stage("web", &format!("1.{i}.0"), &release(i)).await);
    }
    let object = |i: usize| Some(agent.store().join("sha256").join(&shas[i]));
    let target: Target = Default::default();
    let (stop, swaps) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let attacker = attack(target.clone(), wrapper, stop.clone(), swaps.clone());

    let (mut ran, mut refused) = (0, 0);
    for (i, sha) in shas.iter().enumerate() {
        // The release being activated is the one under attack.
        *target.lock().unwrap() = object(i);
        // Refused before it started (the file was renamed aside at that
        // instant, so the store does not hold it): a refusal too.
        let result = match agent.activate("web", sha, Downgrade::NotAllowed).await {
            Ok(result) => result,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
                refused += 1;
                assert!(!marker.exists(), "the swapped bytes ran (activation {i})");
                continue;
            }
        };
        let outcome = pb::ReloadOutcome::try_from(result.outcome).unwrap();
        match outcome {
            pb::ReloadOutcome::Succeeded => {
                ran += 1;
                let status = agent.status("web").await;
                assert_eq!(status.current_sha256, *sha);
                assert_eq!(status.current_version, format!("1.{i}.0"));
                let reply = http_get(addr, "/").await.unwrap();
                assert_eq!((reply.code, reply.pid), (200, status.pid));
            }
            // The copy saw other bytes (or none: the path was empty for
            // an instant): refused, nothing started.
            pb::ReloadOutcome::VerificationFailed => refused += 1,
            other => panic!(
                "activation {i} ended {other:?}: {result:?} (the wrapper ran: {})",
                marker.exists()
            ),
        }
        assert!(
            !marker.exists(),
            "the swapped bytes ran (activation {i}, {outcome:?})"
        );
    }
    // Crash restarts run the image verified at activation, not the file
    // (which is under attack).
    let current = agent.status("web").await.current_sha256;
    *target.lock().unwrap() = object(shas.iter().position(|s| *s == current).unwrap());
    for crash in 0..5 {
        let before = agent.status("web").await;
        assert!(before.pid != 0, "{before:?}");
        send_signal(before.pid, Signal::SIGKILL);
        let after = eventually(
            "the killed service to be restarted",
            Duration::from_secs(20),
            async || agent.status("web").await,
            |s| s.pid != 0 && s.pid != before.pid && s.state == pb::ServiceState::Running as i32,
        )
        .await;
        assert_eq!(after.current_sha256, before.current_sha256);
        let reply = http_get(addr, "/").await.unwrap();
        assert_eq!((reply.code, reply.pid), (200, after.pid), "crash {crash}");
        assert!(
            !marker.exists(),
            "the swapped bytes ran (crash restart {crash})"
        );
    }
    stop.store(true, Ordering::SeqCst);
    attacker.join().unwrap();
    eprintln!(
        "{} swaps of the stored files: {ran} activations ran the verified bytes, {refused} were refused, 5 crash restarts, the wrapper never ran",
        swaps.load(Ordering::Relaxed)
    );
    assert!(ran > 0, "no activation got through: the test shows nothing");
}
