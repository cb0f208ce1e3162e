#!/usr/bin/env bash
# Where the CPU goes during reloads: runs `reload-bench close-spread` under
# `perf record -a` (stamped with CLOCK_MONOTONIC, the clock of the phase
# lines reload-bench prints), then, for every row, the CPU each kind of
# process used in the steady phase and in the reload phase
# (scripts/profile-reloads-summary.py). BENCHMARKS.md 3b quotes it.
#
# Needs perf (Debian: linux-perf) and a release build:
#   cargo build --release --workspace --bins && scripts/profile-reloads.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/profile-reloads}
bench=./target/release/reload-bench
command -v perf >/dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 1; }
[ -x "$bench" ] || { echo "$bench is missing: cargo build --release --workspace --bins" >&2; exit 1; }
mkdir -p "$out"
# 2000 samples a second per CPU: one sample is 0.5 ms of CPU.
perf record -a --clockid=monotonic -F 2000 -o "$out/perf.data" -- \
    "$bench" close-spread >"$out/bench.txt" 2>"$out/bench.err"
perf script -i "$out/perf.data" -F comm,pid,tid,time >"$out/samples.txt" 2>/dev/null
cat "$out/bench.txt"
grep "reused connections only" "$out/bench.err" || true
python3 scripts/profile-reloads-summary.py 2000 "$out/bench.err" "$out/samples.txt"
