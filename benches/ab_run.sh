#!/usr/bin/env bash
# One stream 2x64 run of 15 s (with --raw-hsm) against a fresh development state directory, for
# A/B comparisons of two builds (MODE=unary for unary calls; CONN and CONC for other widths, the
# per-client limit raised to match; STATE=dir to run on an existing state directory, e.g. one
# filled by fill_ledger.py, which is kept): run it alternately with each binary, e.g.
#   for i in 1 2 3; do bash benches/ab_run.sh /tmp/old/dccsign; bash benches/ab_run.sh target/release/dccsign; done
# Prints the rate and the daemon/raw ratio.
set -euo pipefail
bin=$1
conn=${CONN:-2}
conc=${CONC:-64}
if [ -n "${STATE:-}" ]; then
    dir=$STATE
    cleanup=""
else
    dir=$(mktemp -d)
    cleanup="rm -rf $dir"
fi
"$bin" dev-init --state-dir "$dir" > /dev/null
if [ $((conn * conc)) -gt 256 ]; then
    sed -i "s/^max_in_flight_per_client = .*/max_in_flight_per_client = $((conn * conc))/" "$dir/dccsign.toml"
fi
"$bin" serve --state-dir "$dir" --listen 127.0.0.1:0 --metrics-listen none > "$dir/serve.out" 2> "$dir/serve.err" &
pid=$!
trap 'kill "$pid" 2> /dev/null || true; wait "$pid" 2> /dev/null || true; $cleanup' EXIT
addr=""
for _ in $(seq 1 300); do
    addr=$(sed -n 's/^dccsign: serving gRPC over mutual TLS on \([0-9.:]*\).*/\1/p' "$dir/serve.out")
    [ -n "$addr" ] && break
    sleep 0.1
done
sync
"$bin" load --state-dir "$dir" --addr "$addr" --mode "${MODE:-stream}" --connections "$conn" --concurrency "$conc" --duration 15 --verify-every 50 --raw-hsm 2>&1 | grep -E "certificates in|daemon/raw|p99"
