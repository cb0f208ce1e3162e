#!/usr/bin/env bash
# The quick-start demo: two agents on loopback (127.0.0.2 and 127.0.0.3, as
# if they were two hosts), a fresh signing key, a signed artifact uploaded to
# both, a re-upload that sends nothing, and a tampered artifact that both
# refuse. Everything lives in a temp folder and every process is stopped on
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

step "signing a demo artifact: reloadctl sign --key release.key --service demo --version 1.4 demo-app"
cp "$reloadctl" demo-app
"$reloadctl" sign --key release.key --service demo --version 1.4 demo-app
"$reloadctl" verify --pubkey release.pub demo-app

hosts=("127.0.0.2:$port" "127.0.0.3:$port")
for host in "${hosts[@]}"; do
    dir="agent-${host%%:*}"
    mkdir -p "$dir"
    cp release.pub "$dir/"
    cat > "$dir/agent.toml" <<TOML
[agent]
listen = ["$host"]
health_listen = "${host%%:*}:$((port + 1))"
trusted_keys = ["release.pub"]
store_dir = "store"
TOML
    step "starting reload-agent on $host"
    "$bin/reload-agent" --config "$dir/agent.toml" --check
    "$bin/reload-agent" --config "$dir/agent.toml" 2> "$dir/agent.log" &
    pids+=("$!")
done
for host in "${hosts[@]}"; do
    for _ in $(seq 100); do
        "$reloadctl" artifacts --host "$host" >/dev/null 2>&1 && break
        sleep 0.1
    done
done

for host in "${hosts[@]}"; do
    step "reloadctl upload --host $host demo-app"
    "$reloadctl" upload --host "$host" demo-app
done

step "uploading again: the agents already hold it, nothing is sent"
for host in "${hosts[@]}"; do
    "$reloadctl" upload --host "$host" demo-app | tee out.txt
    grep -q "nothing sent" out.txt
done

step "a file changed after signing is refused by the agent, and nothing is stored"
cp demo-app tampered && printf "release 1.5" >> tampered
"$reloadctl" sign --key release.key --service demo --version 1.5 tampered > /dev/null
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
    step "reloadctl artifacts --host $host"
    "$reloadctl" artifacts --host "$host" | tee out.txt
    [ "$(grep -c '^demo ' out.txt)" = 1 ]
done

step "demo passed"
