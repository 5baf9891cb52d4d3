#!/usr/bin/env python3
"""Runs the daemon benchmark matrix with `dccsign load` and draws the plots of docs/benchmarks.md.

    cargo build --release
    python3 benches/load_sweep.py --out docs/benchmarks            # sweep + plots (~5 min)
    python3 benches/load_sweep.py --plot-only --out docs/benchmarks  # redraw from sweep.json

One release daemon on a development state directory (created with `dev-init` unless
--state-dir names an existing one, e.g. a ledger pre-filled by fill_ledger.py), then for each mode
(unary, stream) and each number of requests in flight per connection, a closed-loop run over 2
connections, then the highest level over 3, 4, 8 and 16 connections (--wide; the sweep raises the
daemon's per-client limit `max_in_flight_per_client` in the state directory's dccsign.toml when
the widest run needs more than it allows, and says so); the last run also
measures the raw SoftHSM rate (--raw-hsm, same thread count as the daemon's pool). The client
names the certificates (unique UVCIs in the payloads); one more stream run at the highest level
has the daemon derive them in the token instead (--uvci daemon). Then, per mode, two open-loop
runs at half of that mode's best closed-loop rate: messages evenly spaced, then Poisson
arrivals. Results go to OUT/sweep.json; OUT/throughput.svg and OUT/latency.svg are drawn from
it (standard library only). A markdown table is printed for docs/benchmarks.md.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Requests in flight per connection allowed to the open-loop runs (room for queueing; the rate,
# not this number, sets the load).
OPEN_LOOP_IN_FLIGHT = 128


def start_daemon(binary, state_dir):
    out = open(os.path.join(state_dir, "sweep-serve.out"), "w+")
    err = open(os.path.join(state_dir, "sweep-serve.err"), "w")
    proc = subprocess.Popen(
        [binary, "serve", "--state-dir", state_dir, "--listen", "127.0.0.1:0",
         "--metrics-listen", "none"], stdout=out, stderr=err)
    for _ in range(600):
        out.seek(0)
        m = re.search(r"serving gRPC over mutual TLS on ([0-9.:]+)", out.read())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            sys.exit("the daemon stopped: see " + err.name)
        time.sleep(0.1)
    proc.kill()
    sys.exit("the daemon did not start")


def load(binary, state_dir, addr, mode, connections, concurrency, duration, rate=None,
         raw=False, uvci="client", arrivals="even"):
    cmd = [binary, "load", "--state-dir", state_dir, "--addr", addr, "--mode", mode,
           "--connections", str(connections), "--concurrency", str(concurrency),
           "--duration", str(duration), "--uvci", uvci, "--json"]
    if rate:
        cmd += ["--rate", str(rate), "--arrivals", arrivals]
    if raw:
        cmd.append("--raw-hsm")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if not r.stdout.strip():
        sys.exit("load failed: " + r.stderr[-2000:])
    res = json.loads(r.stdout)
    label = f"{mode} {connections}x{concurrency}" + \
        (f" @{rate:.0f}/s {arrivals}" if rate else "") + \
        ("" if uvci == "client" else f" ({uvci} UVCI)")
    print(f"{label:28s} {res['certificates_per_second']:8.0f}/s  p99 "
          f"{res['latency_ms']['p99']:.1f} ms  errors {res['errors']}", file=sys.stderr)
    return res


def sweep(args):
    binary = os.path.abspath(args.bin)
    state = args.state_dir or tempfile.mkdtemp(prefix="dccsign-sweep-")
    if not os.path.exists(os.path.join(state, "dccsign.toml")):
        subprocess.run([binary, "dev-init", "--state-dir", state], check=True,
                       stdout=subprocess.DEVNULL)
    levels = [int(x) for x in args.levels.split(",")]
    wide = [int(x) for x in args.wide.split(",") if x]
    modes = args.modes.split(",")
    # The most requests in flight of any run: the widest closed-loop run, or an open-loop one.
    needed = max([args.connections] + wide) * levels[-1]
    if not args.no_open_loop:
        needed = max(needed, args.connections * OPEN_LOOP_IN_FLIGHT)
    allow_in_flight(state, needed)
    proc, addr = start_daemon(binary, state)
    runs = []
    try:
        for mode in modes:
            # Per-connection levels on --connections, then the top level on more connections.
            plan = [(args.connections, k) for k in levels] + [(c, levels[-1]) for c in wide]
            for i, (c, k) in enumerate(plan):
                last = mode == modes[-1] and i == len(plan) - 1
                runs.append(load(binary, state, addr, mode, c, k, args.duration, raw=last))
        # The same stream run with UVCIs derived in the token (one HMAC more per certificate).
        if "stream" in modes:
            runs.append(load(binary, state, addr, "stream", args.connections, levels[-1],
                             args.duration, uvci="daemon"))
        if not args.no_open_loop:
            # Per mode, open loop at half of its best closed-loop rate: messages evenly spaced,
            # then with Poisson arrivals (the gaps of many independent clients).
            for mode in modes:
                best = max(r["certificates_per_second"] for r in runs
                           if r["mode"] == mode and uvci_of(r) == "client")
                for arrivals in ("even", "poisson"):
                    runs.append(load(binary, state, addr, mode, args.connections,
                                     OPEN_LOOP_IN_FLIGHT, args.duration, rate=round(best / 2),
                                     arrivals=arrivals))
    finally:
        proc.terminate()
        proc.wait()
    raw = next(r["raw_hsm"] for r in runs if r.get("raw_hsm"))
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "raw_hsm": raw,
            "state_dir_reused": bool(args.state_dir), "runs": runs}


def allow_in_flight(state, needed):
    """Raises `max_in_flight_per_client` in STATE/dccsign.toml to NEEDED if it is lower, so that
    the widest run is not refused (`2-60-5005`), and says so on stderr."""
    path = os.path.join(state, "dccsign.toml")
    text = open(path).read()
    m = re.search(r"(?m)^max_in_flight_per_client\s*=\s*(\d+)\s*$", text)
    current = int(m.group(1)) if m else 256
    if current >= needed:
        return
    line = f"max_in_flight_per_client = {needed}"
    if m:
        text = text[:m.start()] + line + text[m.end():]
    else:
        text = re.sub(r"(?m)^\[server\]\s*$", "[server]\n" + line, text, count=1)
    with open(path, "w") as f:
        f.write(text)
    print(f"the sweep raised max_in_flight_per_client from {current} to {needed} in {path}",
          file=sys.stderr)


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} vCPU {cpu}"


def uvci_of(run):
    """Who named the run's certificates (runs recorded before the option existed: the daemon)."""
    return run.get("uvci", "daemon")


def cpu(run):
    m = run.get("machine")
    return f"{m['busy_cpus']:.2f} / {m['stolen_cpus']:.2f}" if m else "—"


def table(data):
    raw = data["raw_hsm"]["signatures_per_second"]
    rows = ["| mode | UVCI by | connections × in flight | target rate | certificates/s "
            "| daemon/raw | p50 ms | p90 ms | p99 ms | p99.9 ms | daemon RSS | CPUs busy / stolen |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        lat = r["latency_ms"]
        rss = f"{r['daemon_rss_mib']:.1f} MiB" if r.get("daemon_rss_mib") else "—"
        target = "closed loop"
        if r.get("target_rate"):
            target = f"{r['target_rate']:.0f}/s open loop, {r.get('arrivals') or 'even'}"
        rows.append(
            f"| {r['mode']} | {uvci_of(r)} | {r['connections']} × {r['concurrency']} "
            f"| {target} | "
            f"{r['certificates_per_second']:,.0f} | {r['certificates_per_second'] / raw:.3f} | "
            f"{lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} | {lat['p999']:.1f} | {rss} | "
            f"{cpu(r)} |"
            .replace(",", " "))
    return "\n".join(rows)


# --- plots: plain SVG ---------------------------------------------------------------------

W, H, L, R, T, B = 640, 400, 70, 170, 40, 50
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def nice_step(raw):
    import math
    e = 10 ** math.floor(math.log10(raw))
    return next(m * e for m in (1, 2, 5, 10) if m * e >= raw)


def svg(title, xlabel, ylabel, series, hlines=(), xlog=False, xticks=None):
    import math
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts] + [y for _, y in hlines]
    fx = (lambda v: math.log2(v)) if xlog else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    step = nice_step(max(ys) / 5)
    y1 = step * math.ceil(max(ys) * 1.05 / step)
    px = lambda v: L + (fx(v) - x0) / ((x1 - x0) or 1) * (W - L - R)
    py = lambda v: H - B - v / y1 * (H - T - B)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 16 {(T + H - B) / 2})">{ylabel}</text>']
    for i in range(round(y1 / step) + 1):
        v = step * i
        out.append(f'<line x1="{L - 4}" y1="{py(v):.1f}" x2="{W - R}" y2="{py(v):.1f}" '
                   f'stroke="#ddd"/><text x="{L - 6}" y="{py(v) + 4:.1f}" '
                   f'text-anchor="end">{v:,.0f}</text>'.replace(",", " "))
    for v in xticks or sorted(set(xs)):
        out.append(f'<text x="{px(v):.1f}" y="{H - B + 16}" text-anchor="middle">{v:g}</text>')
    for i, (label, y) in enumerate(hlines):
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" '
                   f'stroke="#888" stroke-dasharray="6 4"/>'
                   f'<text x="{W - R + 6}" y="{py(y) + 4:.1f}" fill="#555">{label}</text>')
    for i, (label, pts) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
        ly = T + 20 + 18 * (i + len(hlines))
        out.append(f'<rect x="{W - R + 6}" y="{ly - 9}" width="12" height="3" fill="{c}"/>'
                   f'<text x="{W - R + 22}" y="{ly - 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plot(data, out):
    raw = data["raw_hsm"]["signatures_per_second"]
    closed = [r for r in data["runs"] if not r.get("target_rate")]
    # The sweep's own UVCI source; the extra run with the other one is not a point of the curve.
    main = uvci_of(closed[0]) if closed else "client"
    closed = [r for r in closed if uvci_of(r) == main]
    series = []
    for mode in sorted({r["mode"] for r in closed}):
        pts = sorted((r["connections"] * r["concurrency"], r["certificates_per_second"])
                     for r in closed if r["mode"] == mode)
        series.append((f"{mode}", pts))
    with open(os.path.join(out, "throughput.svg"), "w") as f:
        f.write(svg("Certificates/s against requests in flight",
                    "requests in flight (connections × per connection)",
                    "certificates per second", series,
                    hlines=[(f"raw HSM {raw:,.0f}/s".replace(",", " "), raw),
                            ("70 % of raw", 0.7 * raw)], xlog=True))
    # Per mode its fastest closed-loop run (saturation), then the open-loop runs.
    picks = [max((r for r in closed if r["mode"] == m), key=lambda r: r["certificates_per_second"])
             for m in ("stream", "unary") if any(r["mode"] == m for r in closed)] + \
            [r for r in data["runs"] if r.get("target_rate")]
    series = []
    for r in picks:
        label = f"{r['mode']} {r['connections']}x{r['concurrency']}"
        if r.get("target_rate"):
            label = f"{r['mode']} {r.get('arrivals') or 'even'} {r['target_rate']:.0f}/s"
        series.append((label, [(q * 100, ms) for q, ms in r["latency_ms"]["cdf"] if q < 1.0]))
    with open(os.path.join(out, "latency.svg"), "w") as f:
        f.write(svg("Latency distribution (quantiles)", "quantile (%)", "latency (ms)", series,
                    xticks=[1, 10, 30, 50, 70, 90, 99]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", default="target/release/dccsign")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--state-dir", help="reuse this development state directory")
    p.add_argument("--modes", default="unary,stream")
    p.add_argument("--levels", default="1,4,16,64", help="requests in flight per connection")
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--wide", default="3,4,8,16",
                   help="more connections at the top level (4 x 64 = 256 is the default "
                        "per-client limit; the sweep raises it for wider runs); empty for none")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--no-open-loop", action="store_true")
    p.add_argument("--name", default="sweep", help="result file name (NAME.json)")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.name + ".json")
    if args.plot_only:
        data = json.load(open(path))
    else:
        data = sweep(args)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    if args.name == "sweep":
        plot(data, args.out)
    print(f"Machine: {data['machine']}; raw SoftHSM {data['raw_hsm']['signatures_per_second']:.0f}"
          f" signatures/s with {data['raw_hsm']['threads']} threads; {data['date']}\n")
    print(table(data))


if __name__ == "__main__":
    main()
