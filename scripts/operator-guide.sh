#!/usr/bin/env bash
# Runs docs/operator-guide.md top to bottom, section by section, on
# loopback agents (two hosts, 127.0.17.101 and .102, plus .103 for the
# gunicorn service), with the guide's own commands and config. What
# differs, and why:
# - section 2's install and every systemctl/journalctl step: there is no
#   systemd here; the agent is started in the background instead, and
#   `systemctl reload` is the SIGHUP it sends;
# - host names (web-1.example.net) are loopback addresses, and the agents
#   set stop_services_on_exit so that nothing outlives the script;
# - the preflight trap of section 4 runs with a 3 s timeout, not 10 s.
# Each step checks what the guide says it does. At the end every
# `reloadctl` subcommand the guide's command blocks use must have run here,
# so a command added to the guide without being run fails this script.
# Exits non-zero on the first step that does not behave as written.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
guide="$root/docs/operator-guide.md"
port="${GUIDE_PORT:-17800}"
ip1=127.0.17.101
ip2=127.0.17.102
ip3=127.0.17.103
work="$(mktemp -d "${TMPDIR:-/tmp}/reload-guide.XXXXXX")"
agent_pids=()
cleanup() {
    # SIGTERM: each agent drains its services (stop_services_on_exit).
    for pid in "${agent_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${agent_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "operator-guide.sh: $*" >&2; exit 1; }
# expect TEXT NEEDLE...: every needle is in the text.
expect() {
    local text="$1"; shift
    for needle in "$@"; do
        [[ "$text" == *"$needle"* ]] || fail "expected \"$needle\" in:
$text"
    done
}

cargo build --workspace --bins --manifest-path "$root/Cargo.toml"
bin="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
# Every subcommand run is written down for the coverage check at the end.
reloadctl() {
    local arg skip=0
    for arg in "$@"; do
        if [ "$skip" = 1 ]; then skip=0; continue; fi
        case "$arg" in
            --config|--tls-ca|--tls-cert|--tls-key) skip=1 ;;
            -*) ;;
            *) echo "$arg" >> "$work/used"; break ;;
        esac
    done
    "$bin/reloadctl" "$@"
}
# run_code CMD...: runs it, prints its output, and sets $out and $code.
run_code() {
    set +e
    out="$("$@" 2>&1)"
    code=$?
    set -e
    printf '%s\n' "$out"
}
cd "$work"
mkdir deploy
cd deploy

section "2. Build and install the agent (built above; installing is a systemd step)"

section "3. Keys and certificates"
reloadctl keygen --out release
run_code reloadctl certs --out certs --agent-name "$ip1" --agent-name "$ip2" --agent-name "$ip3" \
    --client deployer --client monitor
expect "$out" 'deploy = ["deployer"], read = ["monitor"]'

section "4. Configure the agent"
# One folder per host, as /etc/reload on each: the keys and certificates
# copied next to agent.toml, the guide's config with loopback addresses.
start_agent() {
    local ip="$1" services="$2" dir="$work/host-$1"
    mkdir -p "$dir"
    cp release.pub certs/ca.pem certs/agent.pem certs/agent.key "$dir/"
    cat > "$dir/agent.toml" <<TOML
[agent]
listen = ["$ip:$port"]
health_listen = "$ip:$((port + 1))"
trusted_keys = ["release.pub"]
store_dir = "store"
state_dir = "state"
stop_services_on_exit = true

[tls]
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"

[rights]
deploy = ["deployer"]
read = ["monitor"]
$services
TOML
    "$bin/reload-agent" --config "$dir/agent.toml" --check
    "$bin/reload-agent" --config "$dir/agent.toml" 2> "$dir/agent.log" &
    agent_pids+=("$!")
    echo "$!" > "$dir/pid"
}
web_service() {
    cat <<TOML
[[service]]
name = "web"
args = ["--listen-name", "http"]
[[service.listener]]
name = "http"
tcp = "$1:18080"
[service.health]
kind = "http"
path = "/healthz"
private = true
[service.preflight]
timeout = "3s"
TOML
}
start_agent "$ip1" "$(web_service "$ip1")"
start_agent "$ip2" "$(web_service "$ip2")"
tls_as_monitor=(--tls-ca certs/ca.pem --tls-cert certs/monitor.pem --tls-key certs/monitor.key)
for ip in "$ip1" "$ip2"; do
    for _ in $(seq 100); do
        reloadctl "${tls_as_monitor[@]}" status --host "$ip:$port" >/dev/null 2>&1 && break
        sleep 0.1
    done
done

curl_tls=(--silent --show-error --cacert certs/ca.pem --cert certs/monitor.pem --key certs/monitor.key)
run_code curl "${curl_tls[@]}" "https://$ip1:$((port + 1))/healthz"
expect "$out" '"web"'
# Plain curl at the TLS port fails, as the guide says.
run_code curl --silent --show-error "http://$ip1:$((port + 1))/healthz"
[ "$code" != 0 ] || fail "plain HTTP to the health port should fail"

section "5. A first rollout"
run_code reloadctl init --service web
# The guide's "$EDITOR reloadctl.toml": the hosts, [tls], and a shorter
# health gate than the 10 s default so that this script runs in minutes.
sed -i 's/^min_healthy_time = .*/min_healthy_time = "2s"/' reloadctl.toml
cat > hosts.txt <<HOSTS
# the fleet
$ip1:$port
$ip2:$port
HOSTS
cat >> reloadctl.toml <<'TOML'

[tls]                                 # in reloadctl.toml; paths relative to it
ca = "certs/ca.pem"
cert = "certs/deployer.pem"
key = "certs/deployer.key"
TOML
for version in 1.4 1.5; do
    cp "$bin/reload-demo-server" "releases/web-$version"
    printf '\nrelease %s\n' "$version" >> "releases/web-$version"
    reloadctl sign --key release.key --service web --version "$version" "releases/web-$version"
done
run_code reloadctl push --version 1.4 --dry-run hosts.txt
[ "$code" = 0 ] || fail "the dry run should say the push can start (exit $code)"
expect "$out" "the push can start" "release not staged"
reloadctl push --version 1.4 hosts.txt
run_code reloadctl status hosts.txt
expect "$out" "$ip1:$port" "$ip2:$port" "1.4.0"
# --limit: one host of the file.
reloadctl push --version 1.5 --limit "$ip1" hosts.txt
run_code reloadctl status hosts.txt --output json
expect "$out" "\"host\":\"$ip1:$port\"" '"version":"1.5.0"' '"version":"1.4.0"'
# Another folder, the project file named: its [tls] paths still resolve.
(cd "$work" && reloadctl --config deploy/reloadctl.toml status deploy/hosts.txt --limit "$ip2" >/dev/null)

section "4. (continued) gunicorn, end to end"
command -v gunicorn >/dev/null || fail "this section runs gunicorn: apt-get install gunicorn (.ci/run does)"
app_service() {
    cat <<TOML
[[service]]
name = "app"
args = ["--workers", "2", "--graceful-timeout", "5"]
[[service.listener]]
name = "http"
tcp = "$ip3:18081"
[service.health]
kind = "http"
path = "/healthz"
private = true
[service.probation]
healthy_for = "10s"
healthy_checks = 3
[service.drain]
signal = "SIGTERM"                 # gunicorn's graceful stop
TOML
}
start_agent "$ip3" "$(app_service)"
for _ in $(seq 100); do
    reloadctl "${tls_as_monitor[@]}" status --host "$ip3:$port" >/dev/null 2>&1 && break
    sleep 0.1
done
mkdir -p app/releases
release_app() {  # release_app VERSION PYTHON-SOURCE
    cat > "app/releases/app-$1" <<EOF
#!/bin/sh
[ "\$1" = --version ] && { echo "app $1"; exit 0; }   # the preflight
dir=\$(mktemp -d)
cat > "\$dir/app.py" <<'PY'
$2
PY
exec gunicorn --chdir "\$dir" "\$@" app:app
EOF
    reloadctl sign --key release.key --service app --version "$1" --os any --arch any "app/releases/app-$1"
}
release_app 1.0 "def app(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'app 1.0\\n']"
release_app 2.0 "import no_such_module"
cat > app/reloadctl.toml <<'TOML'
service = "app"
artifact = "releases/app-{version}"
trusted_keys = ["../release.pub"]
[tls]
ca = "../certs/ca.pem"
cert = "../certs/deployer.pem"
key = "../certs/deployer.key"
TOML
echo "$ip3:$port" > app/hosts.txt
reloadctl --config app/reloadctl.toml push --version 1.0 app/hosts.txt
run_code curl --silent --show-error "http://$ip3:18081/"
expect "$out" "app 1.0"
run_code reloadctl --config app/reloadctl.toml push --version 2.0 app/hosts.txt
[ "$code" = 3 ] || fail "a gunicorn release whose app fails to import should halt the push (exit 3), got $code"
expect "$out" "reload failed" "no host was changed"
run_code curl --silent --show-error "http://$ip3:18081/"
expect "$out" "app 1.0"

section "6. Reading a failed rollout"
# 1.6 says it is ready but is never healthy: probation reverts it on the
# canary, and the rollout halts having changed nothing.
printf '#!/bin/sh\nexec "%s" --unhealthy "$@"\n' "$bin/reload-demo-server" > releases/web-1.6
reloadctl sign --key release.key --service web --version 1.6 --os any --arch any releases/web-1.6
run_code reloadctl push --version 1.6 hosts.txt
[ "$code" = 3 ] || fail "expected exit code 3 for a release that is never healthy, got $code"
expect "$out" "halted" "nothing to revert"
# The preflight trap: a release that ignores --version and serves instead.
printf '#!/bin/sh\nexec sleep 600\n' > releases/web-1.7
reloadctl sign --key release.key --service web --version 1.7 --os any --arch any releases/web-1.7
run_code reloadctl push --version 1.7 hosts.txt
[ "$code" = 3 ] || fail "expected exit code 3 for a release that hangs in its preflight, got $code"
expect "$out" "preflight \`--version\` did not finish within 3s" "halted; no host was changed, nothing to revert"
run_code reloadctl rollouts
expect "$out" "halted-reverted" "done"
id="$(reloadctl rollouts --output json | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["id"])')"
run_code reloadctl rollouts show "$id"
expect "$out" "did not finish within 3s"
run_code reloadctl logs --host "$ip1:$port" --service web --lines 50
expect "$out" "serving on"
run_code curl "${curl_tls[@]}" "https://$ip1:$((port + 1))/metrics"
expect "$out" "reload_reloads_total"

section "7. Rollback"
run_code reloadctl rollback hosts.txt --service web
run_code reloadctl rollback --host "$ip1:$port" --service web
run_code reloadctl status hosts.txt --output json
expect "$out" '"version":"1.4.0"'

section "8. Upgrading the agents"
sed -i 's|^# *agent_artifact.*||' reloadctl.toml
echo 'agent_artifact = "releases/reload-agent-{version}"' | cat - reloadctl.toml > reloadctl.toml.new
mv reloadctl.toml.new reloadctl.toml
cp "$bin/reload-agent" releases/reload-agent-0.2.0
printf '\nagent release 0.2.0\n' >> releases/reload-agent-0.2.0
reloadctl sign --key release.key --service reload-agent --version 0.2.0 releases/reload-agent-0.2.0
reloadctl push --agent --version 0.2 hosts.txt
run_code reloadctl status --agents hosts.txt
expect "$out" "0.2.0"
run_code reloadctl stop --host "$ip2:$port" --service web
expect "$out" "stays stopped until the next activation"
reloadctl push --version 1.5 --limit "$ip2" hosts.txt

section "9. Rotating keys"
reloadctl keygen --out release-2027
for ip in "$ip1" "$ip2"; do
    dir="$work/host-$ip"
    cp release-2027.pub "$dir/"
    sed -i 's|^trusted_keys = \["release.pub"\]|trusted_keys = ["release.pub", "release-2027.pub"]|' "$dir/agent.toml"
    # `systemctl reload reload-agent` sends this.
    kill -HUP "$(cat "$dir/pid")"
done
cp "$bin/reload-demo-server" releases/web-1.8
printf '\nrelease 1.8\n' >> releases/web-1.8
reloadctl sign --key release.key --key release-2027.key --service web --version 1.8 releases/web-1.8
# The agents re-read their config in place: wait until each says so.
for ip in "$ip1" "$ip2"; do
    for _ in $(seq 100); do
        grep -q "config read again" "$work/host-$ip/agent.log" && break
        sleep 0.1
    done
    grep -q "config read again" "$work/host-$ip/agent.log" || fail "the agent on $ip did not re-read its config after SIGHUP"
done
reloadctl push --version 1.8 hosts.txt

section "every reloadctl subcommand the guide shows has run"
missing=()
for sub in $(grep -oE '^(\$ )?reloadctl( --config [^ ]+)? [a-z]+' "$guide" | awk '{print $NF}' | sort -u); do
    grep -qx "$sub" "$work/used" || missing+=("$sub")
done
[ "${#missing[@]}" = 0 ] || fail "the guide shows reloadctl ${missing[*]}, which this script never ran"
echo "ran: $(sort -u "$work/used" | tr '\n' ' ')"
echo "operator guide: every step behaved as written"
