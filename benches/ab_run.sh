#!/usr/bin/env bash
# One stream 2x64 run of 15 s (with --raw-hsm) against a fresh development state directory, for
# A/B comparisons of two builds (MODE=unary for unary calls; CONN and CONC for other widths, the
# per-client limit raised to match; STATE=dir to run on an existing state directory, e.g. one
# filled by fill_ledger.py, which is kept): run it alternately with each binary, e.g.
#   for i in 1 2 3; do bash benches/ab_run.sh /tmp/old/dccsign; bash benches/ab_run.sh target/release/dccsign; done
# Prints the rate, the daemon/raw ratio and the CPU per certificate of each daemon thread
# (benches/thread_cpu.py). RAW=0 leaves out the raw SoftHSM measurement (then the machine's
# figures are the run's alone); SECS sets the duration (15 s); WAIT=s waits that long after the
# daemon is up (e.g. for the ledger writer's UVCI hash filter: ~3 s at 10 million rows).
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
sleep "${WAIT:-0}"
sync
raw="--raw-hsm"
[ "${RAW:-1}" = 0 ] && raw=""
here=$(dirname "$0")
python3 "$here/thread_cpu.py" snap "$pid" > "$dir/cpu-before.json"
"$bin" load --state-dir "$dir" --addr "$addr" --mode "${MODE:-stream}" --connections "$conn" \
    --concurrency "$conc" --duration "${SECS:-15}" --verify-every 50 $raw > "$dir/load.out" 2>&1
python3 "$here/thread_cpu.py" snap "$pid" > "$dir/cpu-after.json"
grep -E "certificates in|daemon/raw|p99" "$dir/load.out"
certs=$(sed -n 's/.*: \([0-9]*\) certificates in .*/\1/p' "$dir/load.out")
python3 "$here/thread_cpu.py" diff "$dir/cpu-before.json" "$dir/cpu-after.json" "$certs"
