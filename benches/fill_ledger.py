#!/usr/bin/env python3
"""Pre-fills a development ledger with N signed certificate rows (with their request keys), for
the "cost per certificate does not grow with the ledger" run of docs/benchmarks.md:

    target/release/dccsign dev-init --state-dir /tmp/big
    python3 benches/fill_ledger.py --state-dir /tmp/big --rows 10000000
    python3 benches/load_sweep.py --state-dir /tmp/big --name ledger-10m --modes stream \\
        --levels 64 --no-open-loop

Rows look like the daemon's: random 16-byte UVCI / country-UVCI / signature hashes, the kids
of the state directory's DSCs, the load generator's type mix, one request key per certificate
(on the certificate row from schema version 6, in the `requests` table before). From schema
version 7 the UVCI hashes also go to `uci_index` (as the daemon's merges leave them: every row
indexed, the mark `uci_indexed_through` at the last one); before, the `UNIQUE` index on
`certificates` holds them. The schema is created by
the daemon's own migrations (a short `serve` run) so the file is exactly what it would write.
Bulk loading uses one transaction per 200 000 rows without fsync; the daemon afterwards runs
with its normal durable settings.
"""

import argparse
import os
import re
import sqlite3
import subprocess
import sys
import time


def ensure_schema(binary, state_dir):
    path = os.path.join(state_dir, "ledger.sqlite")
    if os.path.exists(path):
        return path
    proc = subprocess.Popen([binary, "serve", "--state-dir", state_dir, "--listen",
                             "127.0.0.1:0", "--metrics-listen", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "serving gRPC" in line:
            break
    proc.terminate()
    proc.wait()
    if not os.path.exists(path):
        sys.exit("the daemon did not create " + path)
    return path


def dsc_kids(state_dir):
    """kid = first 8 bytes of SHA-256 over each DSC certificate's DER."""
    import base64
    import hashlib
    kids = []
    pki = os.path.join(state_dir, "pki")
    for name in sorted(os.listdir(pki)):
        if name.startswith("dsc-") and name.endswith(".pem"):
            pem = open(os.path.join(pki, name)).read()
            b64 = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END", pem, re.S).group(1)
            kids.append(hashlib.sha256(base64.b64decode(b64)).digest()[:8])
    return kids or [b"\0" * 8]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", required=True)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--bin", default="target/release/dccsign")
    args = p.parse_args()
    path = ensure_schema(os.path.abspath(args.bin), args.state_dir)
    kids = dsc_kids(args.state_dir)
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    (start_id,) = db.execute("SELECT coalesce(max(id), 0) FROM certificates").fetchone()
    types = ["vaccination"] * 12 + ["test"] * 7 + ["recovery"]
    client = "spiffe://dccsign.dev/issuer-all"
    columns = {row[1] for row in db.execute("PRAGMA table_info(certificates)")}
    on_row = "request_id" in columns
    now = int(time.time())
    chunk = 200_000
    t0 = time.time()
    done = 0
    while done < args.rows:
        n = min(chunk, args.rows - done)
        certs, reqs = [], []
        rnd = os.urandom(112 * n)
        for i in range(n):
            rid = start_id + done + i + 1
            iat = now - 86400 * 30 + (done + i) % (86400 * 30)
            t = types[(done + i) % 20]
            exp = iat + (72 * 3600 if t == "test" else 365 * 86400)
            r = rnd[112 * i:112 * i + 112]
            req = (f"fill-{rid}", r[0:16] * 2)
            certs.append((rid, r[0:16], r[16:32], t, kids[(done + i) % len(kids)], iat, exp,
                          r[32:48], iat, iat, client, r[48:112]) + (req if on_row else ()))
            reqs.append((client, req[0], req[1], rid, iat))
        with db:
            db.executemany(
                "INSERT INTO certificates (id, uci_hash, country_uci_hash, cert_type, kid, iat, "
                "exp, state, signature_hash, reserved_at, signed_at, issuer, signature"
                + (", request_id, request_hash) " if on_row else ") ")
                + "VALUES (?, ?, ?, ?, ?, ?, ?, 'signed', ?, ?, ?, ?, ?"
                + (", ?, ?)" if on_row else ")"), certs)
            if not on_row:
                db.executemany(
                    "INSERT INTO requests (client, request_id, request_hash, certificate_id, "
                    "created_at) VALUES (?, ?, ?, ?, ?)", reqs)
        done += n
        rate = done / (time.time() - t0)
        print(f"\r{done:,} rows ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
    if db.execute("SELECT 1 FROM sqlite_schema WHERE name = 'uci_index'").fetchone():
        with db:
            db.execute("INSERT INTO uci_index (uci_hash, certificate_id) SELECT uci_hash, id "
                       "FROM certificates WHERE id > ? ORDER BY uci_hash "
                       "ON CONFLICT (uci_hash) DO NOTHING", (start_id,))
            db.execute("UPDATE counters SET value = (SELECT max(id) FROM certificates) "
                       "WHERE name = 'uci_indexed_through'")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (total,) = db.execute("SELECT count(*) FROM certificates").fetchone()
    db.close()
    print(f"\n{path}: {total:,} certificate rows, {os.path.getsize(path) / 2**20:,.0f} MiB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
