#!/usr/bin/env python3
"""CPU per kind of process in the steady and the reload phase of each row
of `reload-bench close-spread`, from `perf script -F comm,pid,tid,time`.

Usage: profile-reloads-summary.py HZ BENCH_STDERR SAMPLES

The rows' phases come from the "phases (...)" lines reload-bench prints
(CLOCK_MONOTONIC seconds, as perf stamps with --clockid=monotonic). A
process is told apart by what it is called in its samples:
- the load client: the bench itself (`reload-bench`);
- the agent: a process whose samples say `reload-agent` and never `exe`;
- a server: a sealed image (`memfd:*`) that lived 100 ms or more;
- a preflight: a sealed image that ended sooner (`--version` and out);
- a shim: the agent binary started again through /proc/self/exe (`exe`);
- idle: pid 0.
"""

import collections
import re
import sys

RELOADS = 20


def main():
    hz = float(sys.argv[1])
    phases = []
    for line in open(sys.argv[2]):
        if "phases (" not in line:
            continue
        spans = re.findall(r"([\d.]+) to ([\d.]+)", line)
        phases.append([(float(a), float(b)) for a, b in spans])
    samples = []
    for line in open(sys.argv[3]):
        m = re.match(r"\s*(.*?)\s+(\d+)/(\d+)\s+([\d.]+):", line)
        if m:
            samples.append((float(m.group(4)), m.group(1), int(m.group(2))))
    samples.sort()

    names = collections.defaultdict(set)
    first, last = {}, {}
    for t, comm, pid in samples:
        names[pid].add(comm)
        first.setdefault(pid, t)
        last[pid] = t

    def role(pid):
        comms = names[pid]
        # In this order: a process's first samples can fall between its
        # parent's fork and its own exec, under the parent's name (a server
        # as `exe`, a shim as `reload-agent`, the agent as `reload-bench`).
        if pid == 0:
            return "idle"
        if any(c.startswith("memfd:") for c in comms):
            return "server" if last[pid] - first[pid] >= 0.1 else "preflight"
        if "exe" in comms:
            return "shim"
        if "reload-agent" in comms:
            return "agent"
        if "reload-bench" in comms:
            return "load client"
        return "other"

    print(f"\nCPU by kind of process, ms of CPU per second of each phase ({hz:.0f} Hz samples);")
    print(f"the last column is the reload phase's excess over steady, per reload ({RELOADS} reloads)\n")
    for n, ((steady_from, steady_to), (reload_from, reload_to)) in enumerate(phases):
        steady, during = collections.Counter(), collections.Counter()
        for t, _, pid in samples:
            if steady_from <= t <= steady_to:
                steady[role(pid)] += 1
            elif reload_from <= t <= reload_to:
                during[role(pid)] += 1
        steady_s, during_s = steady_to - steady_from, reload_to - reload_from
        print(f"row {n + 1}: steady {steady_s:.1f} s, reloads {during_s:.1f} s")
        print("  | process | steady ms/s | reloads ms/s | excess ms per reload |")
        print("  |---|---:|---:|---:|")
        kinds = sorted(set(steady) | set(during), key=lambda k: -during[k])
        for kind in kinds:
            a = steady[kind] / hz * 1000 / steady_s
            b = during[kind] / hz * 1000 / during_s
            excess = (b - a) * during_s / RELOADS
            print(f"  | {kind} | {a:.0f} | {b:.0f} | {excess:+.2f} |")
        print()


if __name__ == "__main__":
    main()
