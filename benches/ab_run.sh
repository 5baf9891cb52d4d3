#!/usr/bin/env bash
# One stream 2x64 run of 15 s (with --raw-hsm) against a fresh development state directory, for
# A/B comparisons of two builds (MODE=unary for unary calls): run it alternately with each binary, e.g.
#   for i in 1 2 3; do bash benches/ab_run.sh /tmp/old/dccsign; bash benches/ab_run.sh target/release/dccsign; done
# Prints the rate and the daemon/raw ratio.
set -euo pipefail
bin=$1
dir=$(mktemp -d)
"$bin" dev-init --state-dir "$dir" > /dev/null
"$bin" serve --state-dir "$dir" --listen 127.0.0.1:0 --metrics-listen none > "$dir/serve.out" 2> "$dir/serve.err" &
pid=$!
trap 'kill "$pid" 2> /dev/null || true; wait "$pid" 2> /dev/null || true; rm -rf "$dir"' EXIT
addr=""
for _ in $(seq 1 300); do
    addr=$(sed -n 's/^dccsign: serving gRPC over mutual TLS on \([0-9.:]*\).*/\1/p' "$dir/serve.out")
    [ -n "$addr" ] && break
    sleep 0.1
done
sync
"$bin" load --state-dir "$dir" --addr "$addr" --mode "${MODE:-stream}" --connections 2 --concurrency 64 --duration 15 --verify-every 50 --raw-hsm 2>&1 | grep -E "certificates in|daemon/raw|p99"
