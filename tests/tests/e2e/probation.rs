//! End-to-end: a bad release never replaces a good one. After READY a new
//! process is on probation beside the old one (both accept from the same
//! socket); a release that exits, or fails its health check on its private
//! port, is killed and the old process, which never stopped, goes on: the
//! activation ends REVERTED, with no other call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::load::{ConnectionMode, LoadConfig, LoadRun};
use reload_tests::*;

/// Clients that never retry, keep-alive and a connection per request.
fn clients(addr: SocketAddr) -> Vec<LoadRun> {
    [
        ConnectionMode::KeepAlive,
        ConnectionMode::NewConnectionPerRequest,
    ]
    .into_iter()
    .map(|mode| {
        LoadRun::start(LoadConfig {
            addr,
            path: "/".into(),
            connections: 10,
            mode,
            request_timeout: Duration::from_secs(10),
        })
    })
    .collect()
}

async fn no_failures(runs: Vec<LoadRun>) {
    for run in runs {
        let report = run.stop().await;
        println!("{}", report.summary());
        report.assert_no_failures();
    }
}

/// Activates `bad` over a good 1.0.0 under load with one call; returns the
/// result after checking that the good process served all along.
/// `config` makes the agent's config from the service's address.
async fn activate_bad_release(
    config: impl Fn(SocketAddr) -> String,
    bad: &[u8],
) -> (pb::ReloadResult, String) {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = config(addr);
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    let good = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    agent.activate_ok("web", &good, Downgrade::NotAllowed).await;
    let serving = agent.status("web").await.pid;
    let runs = clients(addr);
    for run in &runs {
        run.wait_for_requests(100).await;
    }
    let mut events = agent
        .control()
        .await
        .watch_events(pb::WatchEventsRequest {
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sha = agent.stage("web", "3.0.0", bad).await;
    let result = agent
        .activate("web", &sha, Downgrade::NotAllowed)
        .await
        .unwrap();
    for run in &runs {
        run.wait_for_requests(100).await;
    }
    no_failures(runs).await;
    assert_eq!(
        result.outcome,
        pb::ReloadOutcome::Reverted as i32,
        "{result:?}\n{}",
        agent.log_text()
    );
    // The event stream says so too, with the reason.
    let failed = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        if event.kind == pb::EventKind::Failed as i32 {
            break event.message;
        }
    };
    assert!(failed.contains("REVERTED"), "{failed}");
    // The previous version runs, healthy, in the process that never stopped.
    let status = eventually(
        "the previous version to be reported healthy",
        Duration::from_secs(10),
        async || agent.status("web").await,
        |s| s.health == pb::HealthState::Healthy as i32,
    )
    .await;
    assert_eq!(
        (status.pid, status.current_version.as_str()),
        (serving, "1.0.0")
    );
    assert_eq!(status.state, pb::ServiceState::Running as i32);
    // The floor was not raised by a release that never passed probation.
    let again = agent
        .stage("web", "2.0.0", &Agent::demo_server_bytes("2.0.0"))
        .await;
    agent
        .activate_ok("web", &again, Downgrade::NotAllowed)
        .await;
    let audit = std::fs::read_to_string(dir.path().join("state/audit.log")).unwrap();
    assert!(
        audit.contains("REVERTED"),
        "the audit log records the revert:\n{audit}"
    );
    (result, agent.log_text())
}

/// A shell script release that runs the demo server with `flags`.
fn demo_with(flags: &str) -> Vec<u8> {
    format!(
        "#!/bin/sh\nexec '{}' \"$@\" {flags}\n",
        bin_path("reload-demo-server").display()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_says_ready_and_exits_is_reverted_by_the_agent() {
    // Every default: notify readiness, no health check (so alive is
    // healthy), the default probation (2 s).
    let config = |addr: SocketAddr| {
        format!(
            "[[service]]\nname = \"web\"\nargs = [\"--listen-name\", \"http\"]\n\
             [[service.listener]]\nname = \"http\"\ntcp = \"{addr}\"\n"
        )
    };
    let (result, _) = activate_bad_release(config, &demo_with("--exit-after-ready 1500ms")).await;
    assert!(
        result.reason.contains("during probation") && result.reason.contains("exit status 3"),
        "{}",
        result.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_serves_but_fails_its_health_check_is_reverted() {
    let (result, _) = activate_bad_release(web_service_toml, &demo_with("--unhealthy")).await;
    assert!(
        result
            .reason
            .contains("failed its health check during probation")
            && result.reason.contains("private port"),
        "{}",
        result.reason
    );
}

/// A gunicorn release whose app cannot even be imported. gunicorn's master
/// says READY=1 before any worker has loaded the app, then exits ("Worker
/// failed to boot"): with the default readiness, probation (as the guide's
/// gunicorn recipe sets it) catches it and the good release never stops
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gunicorn_release_whose_app_fails_to_import_is_reverted() {
    let gunicorn = ["/usr/bin/gunicorn", "/usr/local/bin/gunicorn"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("this test runs gunicorn: apt-get install gunicorn (.ci/run does)")
        });
    // One artifact per release: a script that writes its app and runs
    // gunicorn on the sockets the agent passes (LISTEN_FDS).
    let release = |version: &str, app: &str| -> Vec<u8> {
        format!(
            "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo app {version}; exit 0; }}\n\
             dir=$(mktemp -d)\ncat > \"$dir/app.py\" <<'PY'\n{app}\nPY\n\
             exec {gunicorn} --chdir \"$dir\" --workers 2 --graceful-timeout 5 app:app\n"
        )
        .into_bytes()
    };
    let good = release(
        "1.0.0",
        "def app(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'ok']",
    );
    let broken = release("3.0.0", "import no_such_module_in_this_release");
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The default readiness (notify); probation as the operator guide's
    // gunicorn recipe sets it: the 2 s default catches this on an idle
    // machine, but a loaded one (CI, two cores) can take longer for
    // gunicorn to give up on its workers. gunicorn drains on TERM.
    let config = format!(
        "[[service]]\nname = \"app\"\n[[service.listener]]\nname = \"http\"\ntcp = \"{addr}\"\n[service.probation]\nhealthy_for = \"10s\"\n"
    );
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    let v1 = agent.stage("app", "1.0.0", &good).await;
    agent.activate_ok("app", &v1, Downgrade::NotAllowed).await;
    let serving = agent.status("app").await.pid;
    let runs = clients(addr);
    for run in &runs {
        run.wait_for_requests(50).await;
    }
    let v3 = agent.stage("app", "3.0.0", &broken).await;
    let result = agent
        .activate("app", &v3, Downgrade::NotAllowed)
        .await
        .unwrap();
    for run in &runs {
        run.wait_for_requests(50).await;
    }
    no_failures(runs).await;
    assert_eq!(
        result.outcome,
        pb::ReloadOutcome::Reverted as i32,
        "{result:?}\n{}",
        agent.log_text()
    );
    let status = agent.status("app").await;
    assert_eq!(
        (status.pid, status.current_version.as_str()),
        (serving, "1.0.0")
    );
}

/// After probation: a release that crash-loops is reverted to the previous
/// one by the agent itself; one that crashes once is just restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_crash_loops_after_probation_is_reverted_and_a_single_crash_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = web_service_toml(addr)
        + "[service.restart]\ninitial_backoff = \"100ms\"\nmax_backoff = \"400ms\"\n";
    let config = config.replace(
        "interval = \"100ms\"\n",
        "interval = \"100ms\"\ncrash_loop = 3\ncrash_window = \"30s\"\n",
    );
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), &config);
    let good = agent
        .stage("web", "1.0.0", &Agent::demo_server_bytes("1.0.0"))
        .await;
    agent.activate_ok("web", &good, Downgrade::NotAllowed).await;
    // Once: killed, restarted on the same release.
    let first = agent.status("web").await.pid;
    send_signal(first, nix::sys::signal::Signal::SIGKILL);
    let restarted = eventually(
        "the killed process to be restarted",
        Duration::from_secs(20),
        async || agent.status("web").await,
        |s| s.state == pb::ServiceState::Running as i32 && s.pid != first && s.pid != 0,
    )
    .await;
    assert_eq!(
        restarted.current_version, "1.0.0",
        "restarted, not reverted"
    );

    // 2.0.0 passes its probation (300 ms), then crashes every second.
    let crashing = agent
        .stage("web", "2.0.0", &demo_with("--crash-after 1s"))
        .await;
    let result = agent
        .activate_ok("web", &crashing, Downgrade::NotAllowed)
        .await;
    assert_eq!(result.to_version, "2.0.0");
    let reverted = eventually(
        "the crash-looping release to be reverted to 1.0.0",
        Duration::from_secs(60),
        async || agent.status("web").await,
        |s| s.current_version == "1.0.0" && s.state == pb::ServiceState::Running as i32,
    )
    .await;
    assert_eq!(http_get(addr, "/").await.unwrap().pid, reverted.pid);
    let log = agent.log_text();
    assert!(
        log.contains("a crash loop; reverting to 1.0.0"),
        "the event says why:\n{log}"
    );
}
