#!/usr/bin/env bash
# The quick-start demo: two agents on loopback (127.0.0.2 and 127.0.0.3, as
# if they were two hosts), a fresh signing key, two signed releases of the
# demo server, activated host by host while clients that never retry keep
# both busy (0 failed requests), a rollback, and a tampered artifact that
# the agent refuses. Everything lives in a temp folder and every process is stopped on
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

step "building (cargo build --workspace --bins)"
cargo build --quiet --workspace --bins --manifest-path "$root/Cargo.toml"
bin="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
reloadctl="$bin/reloadctl"
cd "$work"

step "reloadctl keygen --out release"
"$reloadctl" keygen --out release

step "two releases of the demo server, signed: reloadctl sign --key release.key --service demo --version 1.4 demo-1.4"
# Same program, a different trailer: two artifacts with their own sha256.
for version in 1.4 1.5; do
    cp "$bin/reload-demo-server" "demo-$version"
    printf '\nrelease %s\n' "$version" >> "demo-$version"
    "$reloadctl" sign --key release.key --service demo --version "$version" "demo-$version"
done
"$reloadctl" verify --pubkey release.pub demo-1.5

hosts=("127.0.0.2:$port" "127.0.0.3:$port")
for host in "${hosts[@]}"; do
    ip="${host%%:*}"
    dir="agent-$ip"
    mkdir -p "$dir"
    cp release.pub "$dir/"
    cat > "$dir/agent.toml" <<TOML
[agent]
listen = ["$host"]
health_listen = "$ip:$((port + 1))"
trusted_keys = ["release.pub"]

[[service]]
name = "demo"
args = ["--listen-name", "http"]
[[service.listener]]
name = "http"
tcp = "$ip:$((port + 80))"
[service.health]
kind = "http"
path = "/healthz"
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

for host in "${hosts[@]}"; do
    step "reloadctl activate --host $host --service demo --version 1.4 --artifact demo-1.4"
    "$reloadctl" activate --host "$host" --service demo --version 1.4 --artifact demo-1.4
done

step "clients that never retry hit both hosts while each is reloaded to 1.5"
python3 - "$port" > load.txt <<'PY' &
import http.client, sys, time
port = int(sys.argv[1]) + 80
ok = failed = 0
versions = set()
deadline = time.time() + 60
while time.time() < deadline:
    for ip in ("127.0.0.2", "127.0.0.3"):
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
sleep 0.5
for host in "${hosts[@]}"; do
    "$reloadctl" activate --host "$host" --service demo --version 1.5 --artifact demo-1.5
done
sleep 0.5
touch stop-load
wait "$load" || { cat load.txt; echo "demo failed: requests failed during the reloads" >&2; exit 1; }
cat load.txt

step "reloadctl rollback --host ${hosts[1]} --service demo"
"$reloadctl" rollback --host "${hosts[1]}" --service demo

step "a file changed after signing is refused by the agent, and nothing is stored"
cp demo-1.5 tampered && printf "release 1.6" >> tampered
"$reloadctl" sign --key release.key --service demo --version 1.6 tampered > /dev/null
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

for host in "${hosts[@]}"; do
    step "reloadctl status --host $host"
    "$reloadctl" status --host "$host"
done
"$reloadctl" status --host "${hosts[0]}" --output json | grep -q '"version":"1.5.0"'
"$reloadctl" status --host "${hosts[1]}" --output json | grep -q '"version":"1.4.0"'

step "demo passed"
