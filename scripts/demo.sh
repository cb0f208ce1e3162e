#!/usr/bin/env bash
# The quick-start demo: three agents on loopback (127.0.0.2-4, as if they
# were three hosts) with mutual TLS, a fresh signing key, signed releases of the demo
# server, a first deploy with `reloadctl push`, h2load's HTTP/2 against it, a rollout to 1.5 while
# clients that never retry (HTTP/1.1, and h2load in short runs back to
# back) keep every host busy (0 failed requests, 0 failed streams), a
# never-healthy 1.6 whose canary halts and reverts the rollout, a fleet
# rollback, the agents upgrading themselves in place under load (same pids,
# services untouched), and a tampered artifact that the agent refuses. Everything lives in a temp folder and every process is stopped on
# exit. Exits non-zero if any step does not behave as shown.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
port="${DEMO_PORT:-17700}"
work="$(mktemp -d "${TMPDIR:-/tmp}/reload-demo.XXXXXX")"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Cargo's own progress is shown: on a fresh machine the first build takes
# minutes, and a bare "building" line for that long looks like a hang.
step "building (cargo build --workspace --bins; minutes on a fresh machine)"
cargo build --workspace --bins --manifest-path "$root/Cargo.toml"
bin="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
reloadctl="$bin/reloadctl"
cd "$work"

step "reloadctl keygen --out release"
"$reloadctl" keygen --out release

step "reloadctl certs: a development CA, one agent certificate, client identity \"demo\" (mutual TLS)"
"$reloadctl" certs --out certs --agent-name 127.0.0.2 --agent-name 127.0.0.3 --agent-name 127.0.0.4 --client demo
# Every reloadctl command below talks mutual TLS to the agents.
export RELOADCTL_TLS_CA="$work/certs/ca.pem"
export RELOADCTL_TLS_CERT="$work/certs/demo.pem"
export RELOADCTL_TLS_KEY="$work/certs/demo.key"

step "two releases of the demo server, signed: reloadctl sign --key release.key --service demo --version 1.4 releases/demo-1.4"
mkdir releases
# Same program, a different trailer: two artifacts with their own sha256.
for version in 1.4 1.5; do
    cp "$bin/reload-demo-server" "releases/demo-$version"
    printf '\nrelease %s\n' "$version" >> "releases/demo-$version"
    "$reloadctl" sign --key release.key --service demo --version "$version" "releases/demo-$version"
done
# 1.6 starts and says it is ready, but its health check always fails.
printf '#!/bin/sh\nexec "%s" --unhealthy "$@"\n' "$bin/reload-demo-server" > releases/demo-1.6
"$reloadctl" sign --key release.key --service demo --version 1.6 --os any --arch any releases/demo-1.6 > /dev/null

# An agent release: the same agent build, another trailer (another sha256),
# signed for the service name agent releases use.
cp "$bin/reload-agent" releases/reload-agent-0.2.0
printf '\nagent release 0.2.0\n' >> releases/reload-agent-0.2.0
"$reloadctl" sign --key release.key --service reload-agent --version 0.2.0 releases/reload-agent-0.2.0 > /dev/null

cat > reloadctl.toml <<TOML
service = "demo"
artifact = "releases/demo-{version}"
agent_artifact = "releases/reload-agent-{version}"
trusted_keys = ["release.pub"]
[tls]
ca = "certs/ca.pem"
cert = "certs/demo.pem"
key = "certs/demo.key"
[rollout]
canary = 1
waves = "1,50%,100%"
healthy_checks = 3
min_healthy_time = "1s"
healthy_deadline = "5s"
TOML

hosts=("127.0.0.2:$port" "127.0.0.3:$port" "127.0.0.4:$port")
: > hosts.txt
for host in "${hosts[@]}"; do
    ip="${host%%:*}"
    echo "$host" >> hosts.txt
    dir="agent-$ip"
    mkdir -p "$dir"
    cp release.pub "$dir/"
    cat > "$dir/agent.toml" <<TOML
[agent]
listen = ["$host"]
health_listen = "$ip:$((port + 1))"
trusted_keys = ["release.pub"]
# Services outlive their agent by default (a crashed or restarted agent
# must not take them down); the demo's agents end theirs when the demo
# ends, so a second run finds its ports free.
stop_services_on_exit = true

[tls]
ca = "../certs/ca.pem"
cert = "../certs/agent.pem"
key = "../certs/agent.key"

[rights]
deploy = ["demo"]

[[service]]
name = "demo"
args = ["--listen-name", "http"]
[[service.listener]]
name = "http"
tcp = "$ip:$((port + 80))"
[service.health]
kind = "http"
path = "/healthz"
interval = "200ms"
private = true       # each process is checked on a port of its own
TOML
    step "starting reload-agent on $host (service demo on $ip:$((port + 80)))"
    "$bin/reload-agent" --config "$dir/agent.toml" --check
    "$bin/reload-agent" --config "$dir/agent.toml" 2> "$dir/agent.log" &
    pids+=("$!")
done
for host in "${hosts[@]}"; do
    for _ in $(seq 100); do
        "$reloadctl" status --host "$host" >/dev/null 2>&1 && break
        sleep 0.1
    done
done

step "reloadctl push --version 1.4 hosts.txt   (first deploy)"
"$reloadctl" push --version 1.4 hosts.txt

# The demo server speaks HTTP/1.1 and HTTP/2 on the same port (told apart
# by the first bytes), so h2load's prior-knowledge h2c works against it.
step "h2load -c 20 -m 10 -n 2000 http://127.0.0.2:$((port + 80))/   (HTTP/2, 20 connections x 10 streams)"
command -v h2load >/dev/null || { echo "h2load is missing: apt-get install nghttp2-client" >&2; exit 1; }
h2load -c 20 -m 10 -n 2000 "http://127.0.0.2:$((port + 80))/" > h2load.txt
grep -E "^(Application protocol|requests:)" h2load.txt
grep -q "2000 succeeded, 0 failed, 0 errored, 0 timeout" h2load.txt || { cat h2load.txt; echo "demo failed: h2load" >&2; exit 1; }

# Clients that never retry, on every host, until stop_load; it fails the
# demo if a single request failed.
start_load() {
    rm -f stop-load
    python3 - "$port" > load.txt <<'PY' &
import http.client, sys, time
port = int(sys.argv[1]) + 80
ok = failed = 0
versions = set()
deadline = time.time() + 120
while time.time() < deadline:
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        try:
            conn = http.client.HTTPConnection(ip, port, timeout=5)
            conn.request("GET", "/version")
            response = conn.getresponse()
            response.read()
            versions.add(response.getheader("x-version"))
            ok += response.status == 200
            failed += response.status != 200
            conn.close()
        except Exception:
            failed += 1
    try:
        open("stop-load").close()
        break
    except FileNotFoundError:
        pass
print(f"{ok} requests answered, {failed} failed, versions seen: {sorted(versions)}")
sys.exit(1 if failed else 0)
PY
    load=$!
    # And HTTP/2: h2load in short runs back to back over the three hosts
    # (an h2load client never reconnects after a GOAWAY, so each run has
    # as many requests as streams, all in flight at once: see README).
    h2load_loop > h2load-loop.txt &
    h2load_pid=$!
    pids+=("$load" "$h2load_pid")
    sleep 0.5
}
h2load_loop() {
    # At most 120 s, as the HTTP/1.1 clients: a demo that fails half-way
    # must not leave it running.
    local runs=0 bad=0 ip out deadline=$((SECONDS + 120))
    while [ ! -e stop-load ] && [ "$SECONDS" -lt "$deadline" ]; do
        for ip in 127.0.0.2 127.0.0.3 127.0.0.4; do
            out="$(h2load -c 20 -m 10 -n 200 -N 10s "http://$ip:$((port + 80))/" 2>&1 || true)"
            runs=$((runs + 1))
            if ! grep -q "^requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored, 0 timeout" <<<"$out"; then
                bad=$((bad + 1))
                printf '%s\n' "$out" >> h2load-failures.txt
            fi
        done
    done
    echo "h2load: $runs runs of 20 connections x 10 streams, $bad with a stream not answered"
    [ "$bad" = 0 ]
}
stop_load() {
    touch stop-load
    wait "$load" || { cat load.txt; echo "demo failed: requests failed" >&2; exit 1; }
    cat load.txt
    wait "$h2load_pid" || { cat h2load-loop.txt; head -40 h2load-failures.txt; echo "demo failed: HTTP/2 streams failed" >&2; exit 1; }
    cat h2load-loop.txt
}

step "reloadctl push --version 1.5 hosts.txt   (while clients that never retry, HTTP/1.1 and h2load's HTTP/2, keep every host busy)"
start_load
"$reloadctl" push --version 1.5 hosts.txt
stop_load

step "reloadctl push --version 1.6 hosts.txt   (never healthy: the canary's agent reverts it during probation, the rollout halts)"
code=0
"$reloadctl" push --version 1.6 hosts.txt || code=$?
if [ "$code" != 3 ]; then
    echo "demo failed: expected exit code 3 (halted and reverted), got $code" >&2
    exit 1
fi
echo "exit code $code: halted and reverted"

step "reloadctl rollback hosts.txt --service demo   (the whole fleet back to 1.4)"
"$reloadctl" rollback hosts.txt --service demo

step "reloadctl push --agent --version 0.2 hosts.txt   (the agents upgrade themselves in place, under load)"
"$reloadctl" status hosts.txt --output json | python3 -c 'import json,sys; print(" ".join(str(json.loads(l)["pid"]) for l in sys.stdin))' > service-pids.before
"$reloadctl" status --agents hosts.txt
"$reloadctl" status --agents hosts.txt --output json | python3 -c 'import json,sys; print(" ".join(str(json.loads(l)["pid"]) for l in sys.stdin))' > agent-pids.before
start_load
"$reloadctl" push --agent --version 0.2 hosts.txt
stop_load
"$reloadctl" status --agents hosts.txt
"$reloadctl" status hosts.txt --output json | python3 -c 'import json,sys; print(" ".join(str(json.loads(l)["pid"]) for l in sys.stdin))' > service-pids.after
"$reloadctl" status --agents hosts.txt --output json | python3 -c 'import json,sys; print(" ".join(str(json.loads(l)["pid"]) for l in sys.stdin))' > agent-pids.after
cmp -s agent-pids.before agent-pids.after || { echo "demo failed: an agent changed pid" >&2; exit 1; }
cmp -s service-pids.before service-pids.after || { echo "demo failed: a service was restarted" >&2; exit 1; }
[ "$("$reloadctl" status --agents hosts.txt --output json | grep -c '"runs":"0.2.0"')" = 3 ]
echo "agent pids $(cat agent-pids.after) and service pids $(cat service-pids.after) unchanged; every agent runs 0.2.0"

step "a file changed after signing is refused by the agent, and nothing is stored"
cp releases/demo-1.5 tampered && printf "release 1.7" >> tampered
"$reloadctl" sign --key release.key --service demo --version 1.7 tampered > /dev/null
# Flip one byte in the middle, keeping the size.
python3 - <<'PY'
with open("tampered", "r+b") as f:
    f.seek(1000)
    b = f.read(1)
    f.seek(1000)
    f.write(bytes([b[0] ^ 1]))
PY
if "$reloadctl" upload --host "${hosts[0]}" tampered 2> err.txt; then
    echo "demo failed: the agent accepted a tampered artifact" >&2
    exit 1
fi
cat err.txt
grep -q DataLoss err.txt

step "reloadctl status hosts.txt"
"$reloadctl" status hosts.txt
[ "$("$reloadctl" status hosts.txt --output json | grep -c '"version":"1.4.0"')" = 3 ]

step "every mutating call is in each agent's audit log"
tail -n 3 agent-127.0.0.3/state/audit.log

step "demo passed"
