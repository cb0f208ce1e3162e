//! End-to-end: the recipes of `docs/recipes/` (the service sections that
//! `reloadctl init --recipe NAME` writes, read here from `cli/recipes/`),
//! each with the real program it is for, unchanged: gunicorn (sync and
//! gthread workers), uvicorn, Node's `http`, Go's `net/http`, nginx and
//! HAProxy.
//!
//! Each test runs the program under a real agent with the recipe's config
//! as written (only the listen address is the test's), reloads it 10 times
//! while two clients that never retry load it at once (20 keep-alive
//! connections, and 4 workers opening a new connection per request), and
//! checks the failed requests of each against the bound the recipe
//! documents: 0 where the recipe's drain loses nothing. Then a release
//! whose app fails at start must leave the old process serving.
//!
//! The programs are Debian's packages (`.ci/run` installs them); a missing
//! one fails its test, naming the package.
//!
//! Every test prints a `recipe <name>:` line with the figures that
//! `docs/recipes/README.md` tabulates (`cargo nextest run --workspace
//! --no-capture -E 'test(/recipes::/)'` shows them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reload_artifact::SigningKey;
use reload_proto::v1 as pb;
use reload_tests::load::{ConnectionMode, LoadConfig, LoadReport, LoadRun};
use reload_tests::*;

const RELOADS: usize = 10;
/// As in the issue's measurements (wrk with 20 connections).
const KEEP_ALIVE_CONNECTIONS: usize = 20;
const NEW_CONNECTION_WORKERS: usize = 4;

/// The address every recipe listens on as written; the tests put their own.
const RECIPE_ADDRESS: &str = "0.0.0.0:8080";

/// Most failed requests a recipe may lose over the 10 reloads, per client.
#[derive(Clone, Copy, Debug)]
struct Bound {
    keep_alive: u64,
    new_connection: u64,
}

const LOSSLESS: Bound = Bound {
    keep_alive: 0,
    new_connection: 0,
};

/// A release of the program: good (`Release::Good`) or one whose app fails
/// at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    Good,
    FailsAtStart,
}

/// The service section `reloadctl init --recipe name` writes.
fn recipe_toml(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cli/recipes")
        .join(format!("{name}.toml"));
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// A program the test runs, found on PATH; fails the test naming the
/// Debian package otherwise.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("this test runs {name}: apt-get install {package} (.ci/run does)")
        })
}

/// Debian's python3 (the one its gunicorn and uvicorn packages are for,
/// whatever python3 comes first on PATH).
fn debian_python() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import uvicorn"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test runs uvicorn with /usr/bin/python3: apt-get install python3-uvicorn (.ci/run does)"
    );
    python
}

/// The figures of one recipe over the reloads.
struct Measured {
    keep_alive: LoadReport,
    new_connection: LoadReport,
}

/// Runs recipe `name` under an agent on `ip` with releases made by
/// `release`, reloads it [`RELOADS`] times under both clients, checks the
/// failures against `bound`, then checks that a release failing at start
/// leaves the old process serving.
async fn reload_recipe(
    name: &str,
    ip: [u8; 4],
    mut release: impl FnMut(&Path, SocketAddr, &str, Release) -> Vec<u8>,
    bound: Bound,
) -> Measured {
    let dir = tempfile::tempdir().unwrap();
    let ip = std::net::IpAddr::from(ip);
    let addr = SocketAddr::new(ip, free_port_on(ip));
    let recipe = recipe_toml(name);
    assert_eq!(
        recipe.matches(RECIPE_ADDRESS).count(),
        1,
        "recipe {name} listens on {RECIPE_ADDRESS} once"
    );
    let config = recipe.replace(RECIPE_ADDRESS, &addr.to_string());
    let agent = Agent::start_at(ip, dir.path(), Arc::new(SigningKey::generate()), &config);
    let mut stage = async |version: &str, kind: Release| {
        let bytes = release(dir.path(), addr, version, kind);
        agent.stage("web", version, &bytes).await
    };
    let v1 = stage("1.0.0", Release::Good).await;
    let v2 = stage("2.0.0", Release::Good).await;
    let broken = stage("3.0.0", Release::FailsAtStart).await;
    agent.activate_ok("web", &v1, Downgrade::Allowed).await;

    let load = |connections, mode| {
        LoadRun::start(LoadConfig {
            addr,
            path: "/".into(),
            connections,
            mode,
            request_timeout: Duration::from_secs(10),
        })
    };
    let keep_alive = load(KEEP_ALIVE_CONNECTIONS, ConnectionMode::KeepAlive);
    let new_connection = load(
        NEW_CONNECTION_WORKERS,
        ConnectionMode::NewConnectionPerRequest,
    );
    keep_alive.wait_for_requests(200).await;
    new_connection.wait_for_requests(50).await;
    let mut pid = agent.status("web").await.pid;
    let mut old_pid = 0;
    for i in 0..RELOADS {
        let target = if i % 2 == 0 { &v2 } else { &v1 };
        let result = agent.activate_ok("web", target, Downgrade::Allowed).await;
        assert_eq!(result.old_pid, pid, "each reload replaces the last process");
        (old_pid, pid) = (result.old_pid, result.new_pid);
        // Traffic reaches each new process before the next reload.
        keep_alive.wait_for_requests(200).await;
        new_connection.wait_for_requests(50).await;
    }
    // The last drain ends under load too.
    wait_for(
        "the last old process to finish draining",
        Duration::from_secs(40),
        || process_gone(old_pid),
    )
    .await;
    let last = agent.status("web").await;
    keep_alive.wait_for_requests(200).await;
    new_connection.wait_for_requests(50).await;
    let measured = Measured {
        keep_alive: keep_alive.stop().await,
        new_connection: new_connection.stop().await,
    };
    println!(
        "recipe {name}: {RELOADS} reloads: keep-alive failed {} of {} (bound {}); new-connection failed {} of {} (bound {})\n  keep-alive: {}\n  new connection: {}",
        measured.keep_alive.failures,
        measured.keep_alive.requests + measured.keep_alive.failures,
        bound.keep_alive,
        measured.new_connection.failures,
        measured.new_connection.requests + measured.new_connection.failures,
        bound.new_connection,
        measured.keep_alive.summary(),
        measured.new_connection.summary(),
    );
    for (mode, report, bound) in [
        ("keep-alive", &measured.keep_alive, bound.keep_alive),
        (
            "new-connection",
            &measured.new_connection,
            bound.new_connection,
        ),
    ] {
        assert!(
            report.failures <= bound,
            "recipe {name}, {mode}: {} failed, the recipe documents at most {bound}\n{}\nfirst failures: {:#?}",
            report.failures,
            report.summary(),
            report.failure_samples
        );
        assert_eq!(
            report.non_200,
            0,
            "recipe {name}, {mode}: {}",
            report.summary()
        );
        // Both versions answered: the reloads really moved the traffic.
        assert!(
            report.by_version.contains_key("1.0.0") && report.by_version.contains_key("2.0.0"),
            "recipe {name}, {mode}: answers by version {:?}",
            report.by_version
        );
    }

    // A release whose app fails at start: refused or reverted, and the
    // process that served goes on serving.
    let result = agent
        .activate("web", &broken, Downgrade::Allowed)
        .await
        .unwrap_or_else(|s| panic!("Activate failed: {s:?}\n{}", agent.log_text()));
    assert_ne!(
        result.outcome,
        pb::ReloadOutcome::Succeeded as i32,
        "recipe {name}: a release that fails at start was accepted: {result:?}"
    );
    println!("recipe {name}: the broken release: {}", result.reason);
    let status = agent.status("web").await;
    assert_eq!(
        (status.pid, status.current_version.as_str()),
        (last.pid, last.current_version.as_str()),
        "recipe {name}: the serving process stays"
    );
    let reply = http_get(addr, "/").await.expect("the old process answers");
    assert_eq!(reply.code, 200, "{}", reply.body);
    measured
}

/// The WSGI app of the gunicorn tests, written for each version under
/// `dir`; a release that fails at start cannot import it.
fn wsgi_app(dir: &Path, version: &str, kind: Release) -> PathBuf {
    let app_dir = dir.join(format!("app-{version}"));
    std::fs::create_dir_all(&app_dir).unwrap();
    let app = match kind {
        Release::Good => "import os\nVERSION = os.environ.get('RELOAD_SERVICE_VERSION', '')\n\n\
             def app(environ, start_response):\n    \
             start_response('200 OK', [('Content-Type', 'text/plain'), ('X-Version', VERSION)])\n    \
             return [b'ok\\n']\n"
            .to_string(),
        Release::FailsAtStart => "import no_such_module_in_this_release\n".to_string(),
    };
    std::fs::write(app_dir.join("app.py"), app).unwrap();
    app_dir
}

/// A gunicorn release: the launcher of the recipe, with `worker_args`.
fn gunicorn_release(dir: &Path, version: &str, kind: Release, worker_args: &str) -> Vec<u8> {
    let gunicorn = tool("gunicorn", "gunicorn");
    let app_dir = wsgi_app(dir, version, kind);
    format!(
        "#!/bin/sh\n# release {version}\n[ \"$1\" = --version ] && exec {gunicorn} --version\n\
         exec {gunicorn} --chdir {app_dir} {worker_args} --graceful-timeout 20 app:app\n",
        gunicorn = gunicorn.display(),
        app_dir = app_dir.display(),
    )
    .into_bytes()
}

/// Sync workers close the connection after every answer: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gunicorn_sync_loses_no_request() {
    reload_recipe(
        "gunicorn-sync",
        [127, 0, 20, 1],
        |dir, _, version, kind| gunicorn_release(dir, version, kind, "--workers 2"),
        LOSSLESS,
    )
    .await;
}

/// gthread workers close idle keep-alive connections without a
/// `Connection: close` answer when they stop: at most one failed request
/// per keep-alive connection per reload (the documented bound); new
/// connections lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gunicorn_gthread_loses_at_most_one_request_per_keep_alive_connection() {
    reload_recipe(
        "gunicorn-gthread",
        [127, 0, 20, 2],
        |dir, _, version, kind| {
            gunicorn_release(
                dir,
                version,
                kind,
                "--workers 2 --worker-class gthread --threads 4",
            )
        },
        Bound {
            keep_alive: (KEEP_ALIVE_CONNECTIONS * RELOADS) as u64,
            new_connection: 0,
        },
    )
    .await;
}

/// Node's `http` with the drain of examples/node/server.js.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_http_loses_no_request() {
    let node = tool("node", "nodejs");
    let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node/server.js");
    reload_recipe(
        "node",
        [127, 0, 20, 3],
        |_, _, version, kind| {
            let start = match kind {
                Release::Good => format!("exec {} {}", node.display(), server.display()),
                Release::FailsAtStart => format!(
                    "exec {} -e 'throw new Error(\"this release cannot start\")'",
                    node.display()
                ),
            };
            format!(
                "#!/bin/sh\n# release {version}\n[ \"$1\" = --version ] && exec {} --version\n{start}\n",
                node.display()
            )
            .into_bytes()
        },
        LOSSLESS,
    )
    .await;
}

/// Go's net/http with the drain of examples/go/server.go, built here with
/// the standard library only (offline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_net_http_loses_no_request() {
    let go = tool("go", "golang-go");
    let out = bin_path("reloadctl").parent().unwrap().join("recipes-go");
    let binary = out.join("reload-go-server");
    let build = std::process::Command::new(&go)
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/go"))
        .env("GOCACHE", out.join("cache"))
        .env("GOPATH", out.join("gopath"))
        .env("GOPROXY", "off")
        // A newer go must not fetch another toolchain either.
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .output()
        .expect("running go build");
    assert!(
        build.status.success(),
        "go build failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let program = std::fs::read(&binary).unwrap();
    reload_recipe(
        "go",
        [127, 0, 20, 4],
        |dir, _, version, kind| match kind {
            // The same program, distinct bytes: each version is its own
            // artifact.
            Release::Good => {
                let mut bytes = program.clone();
                bytes.extend_from_slice(format!("\nrelease {version}\n").as_bytes());
                bytes
            }
            // Started without its sockets, the program exits at once.
            Release::FailsAtStart => {
                let copy = dir.join("reload-go-server");
                std::fs::write(&copy, &program).unwrap();
                std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .unwrap();
                format!(
                    "#!/bin/sh\n# release {version}\n[ \"$1\" = --version ] && exit 0\nexec env -u LISTEN_FDS {}\n",
                    copy.display()
                )
                .into_bytes()
            }
        },
        LOSSLESS,
    )
    .await;
}

/// The ASGI app of the uvicorn test, with the recipe's few lines: READY=1
/// from its lifespan startup (uvicorn says nothing), and `Connection:
/// close` on every answer once the agent's pre-drain signal (SIGUSR1)
/// came, so keep-alive clients leave before uvicorn's SIGTERM closes what
/// is idle.
const ASGI_APP: &str = r#"import os, signal, socket

VERSION = os.environ.get("RELOAD_SERVICE_VERSION", "").encode()
draining = False


def start_draining(signum, frame):
    global draining
    draining = True


signal.signal(signal.SIGUSR1, start_draining)


def notify(state):
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), "\0" + path[1:] if path[0] == "@" else path)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                notify("READY=1")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await receive()
    headers = [(b"content-type", b"text/plain"), (b"x-version", VERSION)]
    if draining:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok\n"})
"#;

/// uvicorn with the agent's pre-drain signal: keep-alive loses nothing;
/// at SIGTERM uvicorn closes connections it accepted and has not read yet,
/// at most one per connecting client per reload (the documented bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uvicorn_with_a_pre_drain_loses_no_keep_alive_request() {
    let python = debian_python();
    reload_recipe(
        "uvicorn",
        [127, 0, 20, 5],
        |dir, _, version, kind| {
            let app_dir = dir.join(format!("app-{version}"));
            std::fs::create_dir_all(&app_dir).unwrap();
            let app = match kind {
                Release::Good => ASGI_APP,
                Release::FailsAtStart => "import no_such_module_in_this_release\n",
            };
            std::fs::write(app_dir.join("app.py"), app).unwrap();
            format!(
                "#!/bin/sh\n# release {version}\n[ \"$1\" = --version ] && exec {python} -m uvicorn --version\n\
                 exec {python} -m uvicorn --fd 3 --no-access-log --app-dir {app_dir} app:app\n",
                python = python.display(),
                app_dir = app_dir.display(),
            )
            .into_bytes()
        },
        Bound {
            keep_alive: 0,
            new_connection: (NEW_CONNECTION_WORKERS * RELOADS) as u64,
        },
    )
    .await;
}

/// nginx closes idle keep-alive connections when it stops gracefully:
/// the documented bound. A config error is caught before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_loses_at_most_one_request_per_keep_alive_connection() {
    let nginx = tool("nginx", "nginx");
    reload_recipe(
        "nginx",
        [127, 0, 20, 6],
        |dir, listen, version, kind| {
            let prefix = dir.join(format!("nginx-{version}"));
            std::fs::create_dir_all(&prefix).unwrap();
            let broken = if kind == Release::FailsAtStart {
                "no_such_directive on;"
            } else {
                ""
            };
            let config = format!(
                "worker_processes 2;\npid {prefix}/nginx.pid;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  default_type text/plain;\n  {broken}\n\
                 client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n\
                 fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n\
                 server {{\n    listen {listen};\n    location / {{ add_header X-Version {version} always; return 200 \"ok\\n\"; }}\n  }}\n}}\n",
                prefix = prefix.display()
            );
            let conf = prefix.join("nginx.conf");
            std::fs::write(&conf, config).unwrap();
            format!(
                "#!/bin/sh\n# release {version}\n[ \"$1\" = --version ] && exec {nginx} -t -e stderr -c {conf}\n\
                 NGINX=\"3;\" exec {nginx} -e stderr -c {conf} -g 'daemon off;'\n",
                nginx = nginx.display(),
                conf = conf.display()
            )
            .into_bytes()
        },
        Bound {
            keep_alive: (KEEP_ALIVE_CONNECTIONS * RELOADS) as u64,
            new_connection: 0,
        },
    )
    .await;
}

/// HAProxy with `option idle-close-on-response`: a soft stop waits for
/// each idle connection's next request and answers it with
/// `Connection: close`. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_loses_no_request() {
    let haproxy = tool("haproxy", "haproxy");
    reload_recipe(
        "haproxy",
        [127, 0, 20, 7],
        |dir, _, version, kind| {
            let broken = if kind == Release::FailsAtStart {
                "    no-such-keyword\n"
            } else {
                ""
            };
            let config = format!(
                "global\n    hard-stop-after 25s\n\
                 defaults\n    mode http\n    timeout client 30s\n    timeout http-keep-alive 30s\n    option idle-close-on-response\n{broken}\
                 frontend web\n    bind fd@3\n    bind fd@4\n    \
                 http-request return status 200 content-type text/plain string \"ok\" hdr X-Version \"{version}\"\n"
            );
            let cfg = dir.join(format!("haproxy-{version}.cfg"));
            std::fs::write(&cfg, config).unwrap();
            format!(
                "#!/bin/sh\n# release {version}\n[ \"$1\" = --version ] && exec {haproxy} -v\n\
                 exec {haproxy} -Ws -f {cfg}\n",
                haproxy = haproxy.display(),
                cfg = cfg.display()
            )
            .into_bytes()
        },
        LOSSLESS,
    )
    .await;
}

/// `[service.drain] pre_signal`/`pre_wait`, which the uvicorn recipe uses:
/// the old process gets the first signal, then, `pre_wait` later, the
/// drain signal; one that exits on the first signal is not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pre_drain_signal_comes_a_pre_wait_before_the_drain_signal() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("signals.log");
    let config = "[[service]]\nname = \"web\"\n\
         [service.readiness]\nkind = \"delay\"\ndelay = \"100ms\"\n\
         [service.probation]\nhealthy_for = \"0s\"\n\
         [service.drain]\npre_signal = \"SIGUSR1\"\npre_wait = \"1s\"\nsignal = \"SIGTERM\"\ntimeout = \"10s\"\n";
    let agent = Agent::start(dir.path(), Arc::new(SigningKey::generate()), config);
    // A shell that writes down each signal with the time; `traps = false`
    // makes one that SIGUSR1 kills (no handler).
    let release = |version: &str, traps: bool| {
        let traps = if traps {
            format!(
                "trap 'echo \"$$ SIGUSR1 $(date +%s%N)\" >> {log}' USR1\n\
                 trap 'echo \"$$ SIGTERM $(date +%s%N)\" >> {log}; exit 0' TERM\n",
                log = log.display()
            )
        } else {
            String::new()
        };
        format!(
            "#!/bin/sh\n# release {version}\n[ \"$1\" = --version ] && exit 0\n{traps}while :; do sleep 0.1; done\n"
        )
        .into_bytes()
    };
    let v1 = agent.stage("web", "1.0.0", &release("1.0.0", true)).await;
    let v2 = agent.stage("web", "2.0.0", &release("2.0.0", true)).await;
    let v3 = agent.stage("web", "3.0.0", &release("3.0.0", false)).await;
    agent.activate_ok("web", &v1, Downgrade::Allowed).await;
    let old = agent
        .activate_ok("web", &v2, Downgrade::Allowed)
        .await
        .old_pid;
    wait_for("the old process to drain", Duration::from_secs(20), || {
        process_gone(old)
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let times: Vec<(String, u128)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == old.to_string())
                .then(|| Some((fields.next()?.to_string(), fields.next()?.parse().ok()?)))?
        })
        .collect();
    assert_eq!(
        times.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["SIGUSR1", "SIGTERM"],
        "{text}"
    );
    let waited = Duration::from_nanos((times[1].1 - times[0].1) as u64);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "SIGTERM came {waited:?} after SIGUSR1 (pre_wait = 1s)"
    );

    // 3.0.0 dies on SIGUSR1: its drain ends there.
    agent.activate_ok("web", &v3, Downgrade::Allowed).await;
    let old = agent
        .activate_ok("web", &v1, Downgrade::Allowed)
        .await
        .old_pid;
    eventually(
        "the drain of the process SIGUSR1 ended to be reported",
        Duration::from_secs(20),
        async || agent.log_text(),
        |log| {
            log.contains(&format!(
                "old pid {old} exited on SIGUSR1 (killed by SIGUSR1)"
            ))
        },
    )
    .await;
}
