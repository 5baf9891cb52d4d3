#!/usr/bin/env python3
"""CPU per certificate of each of the daemon's threads, from /proc (no perf needed).

    python3 benches/thread_cpu.py snap PID > before.json
    ... run the load ...
    python3 benches/thread_cpu.py snap PID > after.json
    python3 benches/thread_cpu.py diff before.json after.json CERTIFICATES

`snap` records every thread's utime + stime (threads grouped by name without their number:
tokio-rt-worker, hsm-worker, ledger-writer, ledger-checkpoi[nt]), how long the threads were
runnable but waited for a CPU and how many times they were put on one (/proc/PID/task/TID/
schedstat: the scheduler's run delay, which shows as latency), the daemon's peak resident
memory (VmHWM), the process's write system calls and bytes written to disk (/proc/PID/io), and
the machine's busy and stolen time (/proc/stat). `diff` prints them per certificate. The machine's figures include everything
that ran meanwhile (the load generator, and its raw SoftHSM measurement when --raw-hsm is on).
"""
import json
import os
import re
import sys


def snap(pid):
    tick = os.sysconf("SC_CLK_TCK")
    threads, delay, runs = {}, {}, {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            sched = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        group = re.sub(r"[-_ ]?\d+$", "", name)
        threads[group] = threads.get(group, 0) + (int(fields[11]) + int(fields[12])) / tick
        delay[group] = delay.get(group, 0) + int(sched[1]) / 1e9
        runs[group] = runs.get(group, 0) + int(sched[2])
    io = dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().splitlines())
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    peak_kib = int(status["VmHWM"].split()[0])
    cpu = open("/proc/stat").readline().split()
    busy = sum(int(x) for x in cpu[1:4] + cpu[6:8]) / tick
    return {"threads": threads, "delay": delay, "runs": runs, "peak_kib": peak_kib,
            "syscw": int(io["syscw"]), "write_bytes": int(io["write_bytes"]),
            "busy": busy, "steal": int(cpu[8]) / tick}


def diff(a, b, n):
    us = lambda seconds: seconds / n * 1e6
    total = 0.0
    for group in sorted(b["threads"]):
        d = b["threads"][group] - a["threads"].get(group, 0)
        total += d
        if d > 0.005:
            waited = b["delay"][group] - a["delay"].get(group, 0)
            runs = b["runs"][group] - a["runs"].get(group, 0)
            print(f"  {group:<20} {us(d):7.1f} µs per certificate; waited for a CPU "
                  f"{us(waited):6.1f} µs per certificate, {waited / max(runs, 1) * 1e6:6.1f} µs "
                  f"per run ({runs / n:.2f} runs per certificate)")
    print(f"  {'daemon (all threads)':<20} {us(total):7.1f} µs per certificate")
    print(f"  write system calls {(b['syscw'] - a['syscw']) / n:.2f}, disk writes "
          f"{(b['write_bytes'] - a['write_bytes']) / n / 1024:.1f} KiB per certificate")
    if "peak_kib" in b:
        print(f"  daemon peak resident memory {b['peak_kib'] / 1024:.1f} MiB")
    print(f"  machine: busy {us(b['busy'] - a['busy']):.1f} µs, stolen "
          f"{us(b['steal'] - a['steal']):.1f} µs per certificate")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "snap":
        print(json.dumps(snap(sys.argv[2])))
    elif len(sys.argv) == 5 and sys.argv[1] == "diff":
        diff(json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), int(sys.argv[4]))
    else:
        sys.exit(__doc__)
