//! The SQLite ledger (embedded default). WAL journal with `synchronous=FULL`: a commit has
//! reached the disk when `COMMIT` returns.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use super::checkpoint::{self, Checkpointer, Poker};
use super::uci::{self, find_sql, UciIndex};
use super::{
    CertificateRecord, Interrupted, Ledger, LedgerCounts, LedgerError, LedgerWrite, RecordedSince,
    RequestKey, Reservation, ReservationId, StoredRequest, WriteReply, WriteResult,
};
use crate::dcc::CertType;
use crate::revocation::hash::RevocationHash;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE certificates (
    id               INTEGER PRIMARY KEY,
    uci_hash         BLOB    NOT NULL UNIQUE CHECK (length(uci_hash) = 16),
    country_uci_hash BLOB    NOT NULL CHECK (length(country_uci_hash) = 16),
    cert_type        TEXT    NOT NULL CHECK (cert_type IN ('test', 'vaccination', 'recovery')),
    kid              BLOB    NOT NULL CHECK (length(kid) = 8),
    iat              INTEGER NOT NULL,
    exp              INTEGER NOT NULL CHECK (exp > iat),
    state            TEXT    NOT NULL CHECK (state IN ('reserved', 'signed')),
    signature_hash   BLOB    CHECK (signature_hash IS NULL OR length(signature_hash) = 16),
    reserved_at      INTEGER NOT NULL,
    signed_at        INTEGER,
    CHECK ((state = 'signed') = (signature_hash IS NOT NULL))
);
CREATE INDEX certificates_kid_exp ON certificates (kid, exp);
CREATE INDEX certificates_signature_hash ON certificates (signature_hash);
"#,
    r#"
CREATE TABLE requests (
    client         TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    request_hash   BLOB    NOT NULL CHECK (length(request_hash) = 32),
    certificate_id INTEGER NOT NULL REFERENCES certificates (id) ON DELETE CASCADE,
    signature      BLOB    CHECK (signature IS NULL OR length(signature) = 64),
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (client, request_id)
);
CREATE INDEX requests_certificate ON requests (certificate_id);
"#,
    // Nothing looks certificates up by signature hash (revocation starts from the UVCI), and
    // the index cost one random B-tree page per signature on the writer's critical path
    // (stream 2x64: 5 200 -> 5 650 certificates/s).
    r#"
DROP INDEX certificates_signature_hash;
"#,
    // Revocation (docs/revocation.md): who issued each certificate, which one it replaces, the
    // revocation rows, the immutable gateway batches and the outbox that delivers them. No new
    // index on the hot insert path: the purge walks certificates_kid_exp kid by kid, and the
    // rare bulk revocation by issuer scans (the partial index on `replaces` holds only
    // replacements).
    r#"
ALTER TABLE certificates ADD COLUMN issuer TEXT;
ALTER TABLE certificates ADD COLUMN replaces INTEGER;
CREATE UNIQUE INDEX certificates_replaces ON certificates (replaces) WHERE replaces IS NOT NULL;
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('revocation_version', 0), ('events_version', 0);
CREATE TABLE revocations (
    certificate_id  INTEGER PRIMARY KEY REFERENCES certificates (id) ON DELETE CASCADE,
    reason          TEXT    NOT NULL CHECK (reason IN ('wrong-patient', 'serious-error', 'fraud', 'suspended', 'replaced')),
    revoked_by      TEXT    NOT NULL,
    revoked_at      INTEGER NOT NULL,
    until           INTEGER CHECK (until IS NULL OR reason = 'suspended'),
    added_version   INTEGER NOT NULL,
    lifted_by       TEXT,
    lifted_at       INTEGER,
    removed_version INTEGER,
    CHECK ((lifted_at IS NULL) = (removed_version IS NULL))
);
CREATE INDEX revocations_added ON revocations (added_version);
CREATE INDEX revocations_removed ON revocations (removed_version) WHERE removed_version IS NOT NULL;
CREATE TABLE batches (
    id          INTEGER PRIMARY KEY,
    kid         BLOB    NOT NULL CHECK (length(kid) = 8),
    hash_type   TEXT    NOT NULL CHECK (hash_type IN ('SIGNATURE', 'UCI', 'COUNTRYCODEUCI')),
    expires     INTEGER NOT NULL,
    entries     INTEGER NOT NULL CHECK (entries BETWEEN 1 AND 1000),
    json        BLOB    NOT NULL,
    cms         TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('active', 'deleted')),
    gateway_id  TEXT
);
CREATE TABLE batch_entries (
    certificate_id INTEGER NOT NULL REFERENCES certificates (id) ON DELETE CASCADE,
    hash_type      TEXT    NOT NULL,
    batch_id       INTEGER NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    PRIMARY KEY (certificate_id, hash_type)
);
CREATE INDEX batch_entries_batch ON batch_entries (batch_id);
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('upload', 'delete', 'event')),
    target          TEXT    NOT NULL,
    batch_id        INTEGER REFERENCES batches (id) ON DELETE CASCADE,
    body            BLOB,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    purge_after     INTEGER NOT NULL
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
"#,
    // The signature moves to the certificate row, written by the completion's one UPDATE: the
    // second UPDATE (requests by certificate_id, an index search and a random page) was a
    // fifth of the writer's work per certificate. Rows completed before keep theirs in
    // `requests.signature`.
    r#"
ALTER TABLE certificates ADD COLUMN signature BLOB CHECK (signature IS NULL OR length(signature) = 64);
"#,
    // The caller's request key moves to the certificate row, unique per issuer (the client the
    // request came from): one B-tree per certificate instead of three (the `requests` rows, its
    // key and `requests_certificate`), ~7 of the ~33 pages a commit of 15 certificates wrote.
    // Nothing is copied: request keys recorded before stay in `requests`, which gets no new
    // rows; the writer refuses a key found there (`LEGACY_REQUEST`) and `find_request` looks
    // there second. The upgrade copies nothing; it reads the table once to build the (empty)
    // index.
    r#"
ALTER TABLE certificates ADD COLUMN request_id TEXT;
ALTER TABLE certificates ADD COLUMN request_hash BLOB
    CHECK (request_hash IS NULL OR length(request_hash) = 32)
    CHECK ((request_hash IS NULL) = (request_id IS NULL));
CREATE UNIQUE INDEX certificates_request ON certificates (issuer, request_id)
    WHERE request_id IS NOT NULL;
"#,
    // The UVCI hashes move out of the `UNIQUE` index of `certificates` (a random leaf per
    // certificate) into `uci_index`, merged in hash order by the writer (`uci.rs`). SQLite
    // cannot drop a column's `UNIQUE`: the table is copied without it (foreign keys are off
    // while migrations run; `migrate` checks them after): 220 s for 18.9 million rows on the
    // development VM, and the file grows by the copy (its pages are reused by new rows).
    r#"
CREATE TABLE certificates_v7 (
    id               INTEGER PRIMARY KEY,
    uci_hash         BLOB    NOT NULL CHECK (length(uci_hash) = 16),
    country_uci_hash BLOB    NOT NULL CHECK (length(country_uci_hash) = 16),
    cert_type        TEXT    NOT NULL CHECK (cert_type IN ('test', 'vaccination', 'recovery')),
    kid              BLOB    NOT NULL CHECK (length(kid) = 8),
    iat              INTEGER NOT NULL,
    exp              INTEGER NOT NULL CHECK (exp > iat),
    state            TEXT    NOT NULL CHECK (state IN ('reserved', 'signed')),
    signature_hash   BLOB    CHECK (signature_hash IS NULL OR length(signature_hash) = 16),
    reserved_at      INTEGER NOT NULL,
    signed_at        INTEGER,
    issuer           TEXT,
    replaces         INTEGER,
    signature        BLOB    CHECK (signature IS NULL OR length(signature) = 64),
    request_id       TEXT,
    request_hash     BLOB    CHECK (request_hash IS NULL OR length(request_hash) = 32),
    CHECK ((state = 'signed') = (signature_hash IS NOT NULL)),
    CHECK ((request_hash IS NULL) = (request_id IS NULL))
);
INSERT INTO certificates_v7 (id, uci_hash, country_uci_hash, cert_type, kid, iat, exp, state,
    signature_hash, reserved_at, signed_at, issuer, replaces, signature, request_id, request_hash)
SELECT id, uci_hash, country_uci_hash, cert_type, kid, iat, exp, state,
    signature_hash, reserved_at, signed_at, issuer, replaces, signature, request_id, request_hash
FROM certificates;
DROP TABLE certificates;
ALTER TABLE certificates_v7 RENAME TO certificates;
CREATE INDEX certificates_kid_exp ON certificates (kid, exp);
CREATE UNIQUE INDEX certificates_replaces ON certificates (replaces) WHERE replaces IS NOT NULL;
CREATE UNIQUE INDEX certificates_request ON certificates (issuer, request_id)
    WHERE request_id IS NOT NULL;
CREATE TABLE uci_index (
    uci_hash       BLOB    PRIMARY KEY,
    certificate_id INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO uci_index (uci_hash, certificate_id)
SELECT uci_hash, id FROM certificates ORDER BY uci_hash;
INSERT INTO counters (name, value)
SELECT 'uci_indexed_through', coalesce(max(id), 0) FROM certificates;
CREATE TRIGGER certificates_uci_index_delete AFTER DELETE ON certificates
BEGIN
    DELETE FROM uci_index WHERE uci_hash = OLD.uci_hash AND certificate_id = OLD.id;
END;
"#,
];

/// Whether a request key is in the `requests` table of schema versions 2–5.
const LEGACY_REQUEST: &str = "SELECT 1 FROM requests WHERE client = ?1 AND request_id = ?2";

/// Whether `requests` (schema versions 2–5) holds any row. It gets no new rows, so an answer of
/// `false` stays correct for the life of the file.
fn has_legacy_requests(c: &Connection) -> Result<bool, rusqlite::Error> {
    c.query_row("SELECT EXISTS (SELECT 1 FROM requests)", [], |r| r.get(0))
}

/// Page cache of the ledger writer's connection, in KiB (8 MiB).
///
/// Large enough for the interior pages of `uci_index` (once the unique UVCI-hash index of
/// `certificates`), which every new certificate walks (at 10 million rows ~2.5 MB; SQLite's
/// default 2 MiB was too small: 4 178 -> 4 757 certificates/s in the third session's
/// 10-million-row run with 64 MiB). Not larger, because
/// the leaves are hit at random and miss any affordable cache anyway, and because a bigger cache
/// costs CPU on every commit while the file is under 1 GiB: SQLite's B-tree balancing renumbers
/// pages through the lock-byte page at 1 GiB, and the commit after it then walks the whole page
/// cache (`pcache1TruncateUnsafe`: 24 % of the writer's CPU at ~1.5 million rows with 64 MiB,
/// 9 % with 8 MiB). Measured in docs/benchmarks.md ("Tenth session").
const WRITER_CACHE_KIB: i64 = 8 * 1024;

/// A ledger in one SQLite file.
pub struct SqliteLedger {
    /// Reads (and migrations). WAL lets them run beside the writer.
    conn: Mutex<Connection>,
    /// Writes go to one writer thread, which commits them in groups.
    writer: Option<crossbeam_channel::Sender<WriteOp>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    /// Copies the WAL into the database file beside the writer; stops after the writer (which
    /// holds its `Poker`).
    checkpointer: Option<Checkpointer>,
}

/// A write and where its result goes.
struct WriteOp {
    kind: LedgerWrite,
    reply: WriteReply,
}

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 512;

/// Takes the ledger's writer lock: an exclusive `flock` on `<ledger>.writer-lock`, released when
/// the file closes (also when the process dies). One writer per ledger file is what keeps UVCI
/// hashes unique: the writer holds the recent ones in memory (`uci.rs`), so a second writer
/// would not see them.
fn writer_lock(path: &Path) -> Result<std::fs::File, LedgerError> {
    let mut p = path.as_os_str().to_owned();
    p.push(".writer-lock");
    let cannot = |e: &dyn std::fmt::Display| {
        LedgerError::Database(format!("cannot lock {}: {e}", Path::new(&p).display()))
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| cannot(&e))?;
    // A writer that is closing (its last handle dropped, its queue draining) releases the lock
    // within moments: wait for that, not for a writer that runs on.
    let deadline = std::time::Instant::now() + WRITER_LOCK_WAIT;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Database(format!(
                    "{} is in use by another dccsign process (a ledger has one writer: stop \
                     the daemon, or issue through it)",
                    path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(cannot(&e)),
        }
    }
}

/// How long [`writer_lock`] waits for another writer of the file to close.
const WRITER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_conn(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// The writer thread: takes every write waiting, applies the group in one transaction, commits
/// once — one `fsync` for the group — and only then answers.
///
/// A group is first applied without savepoints (each one costs two more statements and a copy
/// of every page it touches). If any write fails, the whole transaction is rolled back and the
/// group applied again with one savepoint per write, so that a failing write rolls back alone
/// and the others still commit. Nothing is answered before the commit, so the first attempt
/// leaves no trace.
///
/// The writer never checkpoints on its own threshold (`wal_autocheckpoint = 0`): it pokes the
/// checkpoint thread every ~1 000 writes (see [`checkpoint::Due`]), and after that
/// thread's checkpoint copies the few commits made meanwhile, so that its next transaction
/// starts the WAL over (see `checkpoint.rs`).
fn writer(
    conn: Connection,
    legacy: bool,
    mut uci: UciIndex,
    rx: crossbeam_channel::Receiver<WriteOp>,
    checkpoints: Poker,
) {
    let mut due = checkpoint::Due::default();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        metrics::histogram!("dccsign_ledger_group_size").record(group.len() as f64);
        let started = std::time::Instant::now();
        let results = apply_group(&conn, legacy, &mut uci, &group).and_then(|results| {
            merge_slice(&conn, &mut uci, group.len());
            conn.execute_batch("COMMIT").map(|_| results).map_err(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                LedgerError::Database(format!("commit failed: {e}"))
            })
        });
        match &results {
            Ok(_) => uci.committed(),
            Err(_) => uci.aborted(),
        }
        match results {
            Ok(results) => {
                metrics::histogram!("dccsign_ledger_group_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                let writes = group.len();
                for (op, r) in group.into_iter().zip(results) {
                    (op.reply)(r);
                }
                if due.committed(writes) {
                    checkpoints.poke();
                }
                if checkpoints.finished() {
                    // On every request's path: see `dccsign_ledger_catch_up_seconds`.
                    let started = std::time::Instant::now();
                    match checkpoint::passive(&conn) {
                        Ok(_) => metrics::histogram!("dccsign_ledger_catch_up_seconds")
                            .record(started.elapsed().as_secs_f64()),
                        Err(e) => {
                            tracing::warn!(error = %e, "ledger writer's catch-up checkpoint failed")
                        }
                    }
                }
            }
            Err(e) => {
                let msg = match e {
                    LedgerError::Database(m) => m,
                    other => other.to_string(),
                };
                for op in group {
                    (op.reply)(Err(LedgerError::Database(msg.clone())));
                }
            }
        }
    }
}

/// Merges a slice of the recent UVCI hashes into `uci_index` in the group's transaction, under
/// a savepoint: a failure is logged and leaves the group's writes alone (the merge goes on with
/// a later group). Without a merge under way, nothing (not even the savepoint).
fn merge_slice(c: &Connection, uci: &mut UciIndex, group: usize) {
    if !uci.merging() {
        return;
    }
    let r = run(c, "SAVEPOINT m").and_then(|_| {
        let r = uci.merge_slice(c, group);
        if r.is_err() {
            run(c, "ROLLBACK TO m")?;
        }
        run(c, "RELEASE m")?;
        r
    });
    if let Err(e) = r {
        uci.slice_failed();
        tracing::warn!(error = %e, "merging recent UVCI hashes into uci_index failed");
    }
}

/// Opens a transaction and applies the group, leaving the transaction open for the commit:
/// first every write straight; if one fails, again from a fresh transaction with a savepoint
/// per write. Fails only when no transaction could be opened. `legacy`: whether request keys
/// must also be looked for in the `requests` table of schema versions 2–5.
fn apply_group(
    c: &Connection,
    legacy: bool,
    uci: &mut UciIndex,
    group: &[WriteOp],
) -> Result<Vec<WriteResult>, LedgerError> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    let mut results = Vec::with_capacity(group.len());
    for op in group {
        match apply(c, legacy, uci, &op.kind) {
            Ok(r) => results.push(Ok(r)),
            Err(_) => break,
        }
    }
    if results.len() == group.len() {
        return Ok(results);
    }
    metrics::counter!("dccsign_ledger_group_retries_total").increment(1);
    // Some errors (I/O, disk full) end the transaction themselves; the rollback may then fail.
    let _ = c.execute_batch("ROLLBACK");
    uci.aborted();
    c.execute_batch("BEGIN IMMEDIATE")?;
    Ok(group
        .iter()
        .map(|op| {
            let mark = uci.mark();
            run(c, "SAVEPOINT w")
                .map_err(LedgerError::from)
                .and_then(|_| {
                    let r = apply(c, legacy, uci, &op.kind);
                    if r.is_err() {
                        uci.rollback_to(mark);
                        run(c, "ROLLBACK TO w")?;
                    }
                    run(c, "RELEASE w")?;
                    r
                })
        })
        .collect())
}

/// Runs a parameterless statement through the connection's statement cache (the writer runs
/// the same few statements thousands of times a second; parsing them each time showed in the
/// profile).
fn run(c: &Connection, sql: &str) -> Result<usize, rusqlite::Error> {
    exec(c, sql, [])
}

/// Runs a statement with parameters through the statement cache.
fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<usize, rusqlite::Error> {
    c.prepare_cached(sql)?.execute(p)
}

fn apply(c: &Connection, legacy: bool, uci: &mut UciIndex, kind: &LedgerWrite) -> WriteResult {
    match kind {
        LedgerWrite::Reserve(r, q) => write_reserve(c, legacy, uci, r, q.as_ref()).map(Some),
        LedgerWrite::Complete(id, h, sig) => write_complete(c, *id, h, sig).map(|_| None),
        LedgerWrite::Release(id) => write_release(c, uci, *id).map(|_| None),
    }
}

/// Inserts the reservation with the caller's request key on the same row. A request key already
/// recorded (on a row, or in the `requests` table of an older schema) is `DuplicateRequest`,
/// also when the UVCI is the same (a retry racing its first attempt is "in progress", not a
/// reused UVCI: the retry will then replay).
fn write_reserve(
    c: &Connection,
    legacy: bool,
    uci: &mut UciIndex,
    r: &Reservation,
    request: Option<&RequestKey>,
) -> Result<ReservationId, LedgerError> {
    if let Some(old) = r.replaces {
        check_replaceable(c, old)?;
    }
    if let Some(q) = request.filter(|_| legacy) {
        if c.prepare_cached(LEGACY_REQUEST)?
            .exists(params![q.client, q.request_id])?
        {
            return Err(LedgerError::DuplicateRequest);
        }
    }
    let request_known = |q: &RequestKey| -> Result<bool, rusqlite::Error> {
        c.prepare_cached("SELECT 1 FROM certificates WHERE issuer = ?1 AND request_id = ?2")?
            .exists(params![q.client, q.request_id])
    };
    if let Some((_, state)) = uci.find(c, &r.uci_hash)? {
        if request.map(request_known).transpose()? == Some(true) {
            return Err(LedgerError::DuplicateRequest);
        }
        return Err(LedgerError::DuplicateUvci { state });
    }
    // The id: above every id this writer saw (see `uci.rs`).
    let res = exec(
        c,
        "INSERT INTO certificates (id, uci_hash, country_uci_hash, cert_type, kid, iat, exp, state, reserved_at, issuer, replaces, request_id, request_hash)
         VALUES (?12, ?1, ?2, ?3, ?4, ?5, ?6, 'reserved', ?7, ?8, ?9, ?10, ?11)",
        params![
            &r.uci_hash[..],
            &r.country_uci_hash[..],
            r.cert_type.as_str(),
            &r.kid[..],
            r.iat,
            r.exp,
            now(),
            request.map(|q| q.client.as_str()),
            r.replaces,
            request.map(|q| q.request_id.as_str()),
            request.map(|q| &q.request_hash[..]),
            uci.next_id(),
        ],
    );
    match res {
        Ok(_) => {
            let id = c.last_insert_rowid();
            uci.added(r.uci_hash, id);
            Ok(ReservationId(id))
        }
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            if request.map(request_known).transpose()? == Some(true) {
                return Err(LedgerError::DuplicateRequest);
            }
            match r.replaces {
                Some(_) => Err(LedgerError::NotReplaceable(
                    "a replacement of it is already recorded".into(),
                )),
                None => Err(LedgerError::Database(
                    "constraint violation on insert".into(),
                )),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// A certificate may be replaced when it is signed, not revoked and not replaced yet.
fn check_replaceable(c: &Connection, old: i64) -> Result<(), LedgerError> {
    let row: Option<(String, bool, bool)> = c
        .prepare_cached(
            "SELECT c.state,
                    EXISTS (SELECT 1 FROM revocations r WHERE r.certificate_id = c.id AND r.lifted_at IS NULL),
                    EXISTS (SELECT 1 FROM certificates n WHERE n.replaces = c.id)
             FROM certificates c WHERE c.id = ?1",
        )?
        .query_row(params![old], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    match row {
        None => Err(LedgerError::NotReplaceable(
            "it is not in the ledger".into(),
        )),
        Some((state, _, _)) if state != "signed" => {
            Err(LedgerError::NotReplaceable("it was never signed".into()))
        }
        Some((_, true, _)) => Err(LedgerError::NotReplaceable("it is revoked".into())),
        Some((_, _, true)) => Err(LedgerError::NotReplaceable("it is already replaced".into())),
        Some(_) => Ok(()),
    }
}

fn write_complete(
    c: &Connection,
    id: ReservationId,
    h: &RevocationHash,
    signature: &[u8; 64],
) -> Result<(), LedgerError> {
    let t = now();
    let done: Option<(Option<i64>, Option<String>)> = c
        .prepare_cached(
            "UPDATE certificates SET state = 'signed', signature_hash = ?2, signed_at = ?3, signature = ?4
             WHERE id = ?1 AND state = 'reserved' RETURNING replaces, issuer",
        )?
        .query_row(params![id.0, &h[..], t, &signature[..]], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((replaces, issuer)) = done else {
        return Err(LedgerError::NotReserved(id.0));
    };
    if let Some(old) = replaces {
        // The replaced certificate is revoked in the transaction that makes its replacement
        // exist. Revoked meanwhile for another reason: that revocation stands.
        let by = issuer.unwrap_or_else(|| "replace".into());
        if crate::revocation::store::insert_revocation(c, old, "replaced", &by, t, None)?.is_none()
        {
            tracing::info!(
                certificate = old,
                "replaced certificate was already revoked"
            );
        }
    }
    Ok(())
}

fn write_release(c: &Connection, uci: &mut UciIndex, id: ReservationId) -> Result<(), LedgerError> {
    let h: Option<Vec<u8>> = c
        .prepare_cached(
            "DELETE FROM certificates WHERE id = ?1 AND state = 'reserved' RETURNING uci_hash",
        )?
        .query_row(params![id.0], |r| r.get(0))
        .optional()?;
    match h.map(hash16).transpose()? {
        Some(h) => {
            uci.removed(h, id.0);
            Ok(())
        }
        None => Err(LedgerError::NotReserved(id.0)),
    }
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        self.writer.take();
        let Some(t) = self.writer_thread.take() else {
            return;
        };
        if t.thread().id() == std::thread::current().id() {
            // A reply running on the writer thread held the last handle (the issuance chain's
            // replies own handles). The writer cannot wait for itself, nor for the
            // checkpointer, which stops after the writer: both end on their own once the
            // queue is empty and closed.
            if let Some(c) = self.checkpointer.take() {
                c.detach();
            }
            return;
        }
        let _ = t.join();
        self.checkpointer.take();
    }
}

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLedger").finish_non_exhaustive()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn hash16(v: Vec<u8>) -> Result<RevocationHash, rusqlite::Error> {
    v.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob)
    })
}

fn kid8(v: Vec<u8>) -> Result<[u8; 8], rusqlite::Error> {
    v.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "kid".into(), rusqlite::types::Type::Blob)
    })
}

impl SqliteLedger {
    /// Opens (creating if needed) the database and applies migrations.
    pub fn open(path: &Path) -> Result<SqliteLedger, LedgerError> {
        Self::open_with(path, uci::RECENT_LIMIT)
    }

    /// [`SqliteLedger::open`] with another number of recent UVCI hashes that starts a merge
    /// into `uci_index` (tests use a small one to see merges happen).
    pub(crate) fn open_with(
        path: &Path,
        uci_recent_limit: usize,
    ) -> Result<SqliteLedger, LedgerError> {
        let lock = writer_lock(path)?;
        let mut ledger = SqliteLedger {
            conn: Mutex::new(open_conn(path)?),
            writer: None,
            writer_thread: None,
            checkpointer: None,
        };
        ledger.migrate()?;
        let write_conn = open_conn(path)?;
        // The writer's page cache: WRITER_CACHE_KIB, not SQLite's 2 MiB default and not more.
        write_conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        write_conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let legacy = has_legacy_requests(&write_conn)?;
        let uci = UciIndex::load(&write_conn, uci_recent_limit, Some(open_conn(path)?))?;
        let (checkpointer, poker) = Checkpointer::start(open_conn(path)?).map_err(|e| {
            LedgerError::Database(format!("cannot start the ledger checkpointer: {e}"))
        })?;
        // Unbounded, so that `submit` never blocks: the HSM workers submit completions from
        // their replies, and a writer that ever waited for them (dropping the last handle of a
        // replaced signing pool joins its workers) must not find them waiting for room here.
        // What bounds the queue is upstream: the daemon's in-flight limits per client and the
        // HSM queue's room, which an issuance takes before it reserves.
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                // Held for as long as the writer runs (it may outlive the handles).
                let _lock = lock;
                writer(write_conn, legacy, uci, rx, poker)
            })
            .map_err(|e| LedgerError::Database(format!("cannot start the ledger writer: {e}")))?;
        ledger.writer = Some(tx);
        ledger.writer_thread = Some(handle);
        ledger.checkpointer = Some(checkpointer);
        Ok(ledger)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every interrupted reservation (rows still `reserved`), oldest first. Reads the whole
    /// table (no index on the state): seconds at 10 million rows. While this handle is open no
    /// other process writes the ledger (the writer lock), so a `reserved` row it did not make
    /// itself belongs to a process that stopped.
    pub fn interrupted(&self) -> Result<Vec<Interrupted>, LedgerError> {
        self.interrupted_where("")
    }

    /// The interrupted reservations among the recent rows (those not yet merged into
    /// `uci_index`, at most ~200 000): where the rows of a process that stopped mid-issuance
    /// are, cheap enough to check at every start. A reservation kept after a failed completion
    /// may have been merged since; [`SqliteLedger::interrupted`] finds those too.
    pub fn interrupted_recent(&self) -> Result<Vec<Interrupted>, LedgerError> {
        self.interrupted_where(
            "AND id > (SELECT value FROM counters WHERE name = 'uci_indexed_through')",
        )
    }

    fn interrupted_where(&self, and: &str) -> Result<Vec<Interrupted>, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, cert_type, kid, reserved_at, issuer, request_id FROM certificates
             WHERE state = 'reserved' {and} ORDER BY id"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok(Interrupted {
                id: r.get(0)?,
                cert_type: r.get(1)?,
                kid: kid8(r.get(2)?)?,
                reserved_at: r.get(3)?,
                issuer: r.get(4)?,
                request_id: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn migrate(&self) -> Result<(), LedgerError> {
        let mut conn = self.conn();
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > MIGRATIONS.len() {
            return Err(LedgerError::Database(format!(
                "database schema version {version} is newer than this dccsign ({})",
                MIGRATIONS.len()
            )));
        }
        if version == MIGRATIONS.len() {
            return Ok(());
        }
        // A new file gets every migration silently; an existing one is being upgraded.
        let upgrading = version > 0;
        // Migration 7 copies `certificates` and drops the original, which with foreign keys on
        // would delete every row that references it. Off for the migrations (a no-op inside a
        // transaction, so here), checked after them.
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            // An upgrade of an existing ledger may take a while (migration 6 reads the whole
            // certificates table once: ~80 s for 10 million rows from a cold disk). Said at
            // `warn`, the daemon's default log level, so that a long start is not a surprise.
            let started = std::time::Instant::now();
            if upgrading {
                tracing::warn!(
                    migration = i + 1,
                    "upgrading the ledger schema: one transaction that may read the whole \
                     ledger; if interrupted, it is rolled back and runs again at the next start"
                );
            }
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
            if upgrading {
                tracing::warn!(
                    migration = i + 1,
                    seconds = started.elapsed().as_secs_f64(),
                    "ledger schema upgraded"
                );
            }
        }
        let broken: i64 =
            conn.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        if broken > 0 {
            return Err(LedgerError::Database(format!(
                "{broken} rows reference missing rows after the schema upgrade"
            )));
        }
        Ok(())
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> Result<CertificateRecord, rusqlite::Error> {
    let t: String = r.get("cert_type")?;
    let sig: Option<Vec<u8>> = r.get("signature_hash")?;
    Ok(CertificateRecord {
        id: r.get("id")?,
        reservation: Reservation {
            uci_hash: hash16(r.get("uci_hash")?)?,
            country_uci_hash: hash16(r.get("country_uci_hash")?)?,
            cert_type: t.parse::<CertType>().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
            kid: kid8(r.get("kid")?)?,
            iat: r.get("iat")?,
            exp: r.get("exp")?,
            replaces: r.get("replaces")?,
        },
        signature_hash: sig.map(hash16).transpose()?,
        state: r.get("state")?,
        issuer: r.get("issuer")?,
    })
}

impl Ledger for SqliteLedger {
    fn submit(&self, kind: LedgerWrite, reply: WriteReply) {
        let Some(tx) = self.writer.as_ref() else {
            return reply(Err(LedgerError::Database("ledger closed".into())));
        };
        if let Err(e) = tx.send(WriteOp { kind, reply }) {
            (e.into_inner().reply)(Err(LedgerError::Database("ledger writer stopped".into())));
        }
    }

    fn find_request(
        &self,
        client: &str,
        request_id: &str,
    ) -> Result<Option<StoredRequest>, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT c.*, c.request_hash AS q_hash, c.signature AS q_sig
             FROM certificates c WHERE c.issuer = ?1 AND c.request_id = ?2
             UNION ALL
             SELECT c.*, q.request_hash, coalesce(c.signature, q.signature)
             FROM requests q JOIN certificates c ON c.id = q.certificate_id
             WHERE q.client = ?1 AND q.request_id = ?2",
        )?;
        let found = stmt
            .query_row(params![client, request_id], |row| {
                let hash: Vec<u8> = row.get("q_hash")?;
                let sig: Option<Vec<u8>> = row.get("q_sig")?;
                let bad = || {
                    rusqlite::Error::InvalidColumnType(
                        0,
                        "requests".into(),
                        rusqlite::types::Type::Blob,
                    )
                };
                Ok(StoredRequest {
                    request_hash: hash.try_into().map_err(|_| bad())?,
                    record: row_to_record(row)?,
                    signature: sig.map(|s| s.try_into().map_err(|_| bad())).transpose()?,
                })
            })
            .optional()?;
        Ok(found)
    }

    fn find_by_uci_hash(
        &self,
        h: &RevocationHash,
    ) -> Result<Option<CertificateRecord>, LedgerError> {
        let conn = self.conn();
        let found = conn
            .prepare_cached(concat!(
                find_sql!(),
                "SELECT * FROM certificates WHERE id = (SELECT id FROM hit)"
            ))?
            .query_row(params![&h[..]], row_to_record)
            .optional()?;
        Ok(found)
    }

    fn counts(&self) -> Result<LedgerCounts, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT state, count(*) FROM certificates GROUP BY state")?;
        let mut counts = LedgerCounts::default();
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            match state.as_str() {
                "reserved" => counts.reserved = n as u64,
                "signed" => counts.signed = n as u64,
                _ => {}
            }
        }
        Ok(counts)
    }

    fn last_expiry(&self, kid: &[u8; 8]) -> Result<Option<i64>, LedgerError> {
        // certificates_kid_exp makes this one index lookup.
        let conn = self.conn();
        let exp: Option<i64> = conn
            .prepare_cached("SELECT max(exp) FROM certificates WHERE kid = ?1")?
            .query_row(params![&kid[..]], |r| r.get(0))?;
        Ok(exp)
    }

    fn recorded_since(&self, after_id: i64) -> Result<RecordedSince, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT kid, count(*), max(id) FROM certificates WHERE id > ?1 GROUP BY kid",
        )?;
        let mut last = after_id;
        let mut per_kid = Vec::new();
        let rows = stmt.query_map(params![after_id], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (kid, n, max) = row?;
            last = last.max(max);
            if let Ok(kid) = kid.try_into() {
                per_kid.push((kid, n as u64));
            }
        }
        Ok((last, per_kid))
    }

    fn check_writable(&self) -> Result<(), LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.rollback()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(n: u8) -> Reservation {
        Reservation {
            uci_hash: [n; 16],
            country_uci_hash: [n ^ 0xff; 16],
            cert_type: CertType::Test,
            kid: [7; 8],
            iat: 1_000,
            exp: 2_000,
            replaces: None,
        }
    }

    #[test]
    fn reserve_complete_duplicate_release() {
        let dir = tempfile::tempdir().unwrap();
        let l = SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap();
        let id = l.reserve(&res(1), None).unwrap();
        match l.reserve(&res(1), None) {
            Err(LedgerError::DuplicateUvci { state }) => assert_eq!(state, "reserved"),
            other => panic!("expected duplicate, got {other:?}"),
        }
        l.complete(id, &[9; 16], &[0; 64]).unwrap();
        assert!(matches!(
            l.complete(id, &[9; 16], &[0; 64]),
            Err(LedgerError::NotReserved(_))
        ));
        match l.reserve(&res(1), None) {
            Err(LedgerError::DuplicateUvci { state }) => assert_eq!(state, "signed"),
            other => panic!("expected duplicate, got {other:?}"),
        }
        let rec = l.find_by_uci_hash(&[1; 16]).unwrap().unwrap();
        assert_eq!(rec.signature_hash, Some([9; 16]));
        assert_eq!(rec.state, "signed");
        // A signed row cannot be released.
        assert!(l.release(id).is_err());
        let id2 = l.reserve(&res(2), None).unwrap();
        l.release(id2).unwrap();
        assert!(l.find_by_uci_hash(&[2; 16]).unwrap().is_none());
        assert_eq!(
            l.counts().unwrap(),
            LedgerCounts {
                reserved: 0,
                signed: 1
            }
        );
        l.check_writable().unwrap();
    }

    /// The writer turns SQLite's automatic checkpoint off; the checkpoint thread and the
    /// writer's catch-up must still copy the WAL back and let it start over. Every commit
    /// writes at least one frame of a page, so a WAL that never started over would be longer
    /// than one page per commit. The commits here hold one write each, so the commit count
    /// triggers the checkpoints. (The bound is that, not tighter: on a busy machine the
    /// checkpoint thread may lag the commits for a while, and the WAL then grows further before
    /// it starts over; with checkpoints every 32 commits it reached 0.66–0.8 MB in 2 of 15
    /// runs with two CPU hogs beside the tests, against a bound 4 times that.)
    #[test]
    fn checkpoints_keep_the_wal_from_growing_with_the_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let l = SqliteLedger::open(&path).unwrap();
        let commits: u32 = 20 * checkpoint::COMMITS_PER_CHECKPOINT;
        for i in 0..commits {
            let mut r = res(0);
            r.uci_hash[..4].copy_from_slice(&i.to_be_bytes());
            r.country_uci_hash[..4].copy_from_slice(&i.to_be_bytes());
            l.reserve(&r, None).unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("l.sqlite-wal"))
            .unwrap()
            .len();
        let page = 4096 + 24;
        assert!(
            wal < u64::from(commits) * page,
            "WAL of {wal} bytes after {commits} commits"
        );
        // Everything committed is there, through the reader and after reopening.
        let counts = LedgerCounts {
            reserved: commits.into(),
            signed: 0,
        };
        assert_eq!(l.counts().unwrap(), counts);
        drop(l);
        let l = SqliteLedger::open(&path).unwrap();
        assert_eq!(l.counts().unwrap(), counts);
    }

    /// A reply on the writer thread may drop the last handle of the ledger (the issuance
    /// chain's replies own handles): the ledger then closes without waiting for its own thread.
    #[test]
    fn the_last_handle_dropped_by_a_reply_on_the_writer_thread_closes_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::sync::Arc::new(SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap());
        // Hold the writer in a reply until the test has let go of its own handle.
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        l.submit(
            LedgerWrite::Reserve(res(1), None),
            Box::new(move |r| {
                r.unwrap();
                go_rx.recv().unwrap();
            }),
        );
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let last = l.clone();
        l.submit(
            LedgerWrite::Reserve(res(2), None),
            Box::new(move |r| {
                drop(last);
                done_tx.send(r.map(|_| ())).unwrap();
            }),
        );
        drop(l);
        go_tx.send(()).unwrap();
        let r = done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the reply that dropped the last handle did not finish");
        assert!(r.is_ok(), "{r:?}");
        // The rows are there for the next opener.
        let l = SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap();
        assert_eq!(l.counts().unwrap().reserved, 2);
    }

    #[test]
    fn requests_are_recorded_with_their_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let l = SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap();
        let key = RequestKey {
            client: "c".into(),
            request_id: "r-1".into(),
            request_hash: [5; 32],
        };
        let id = l.reserve(&res(10), Some(&key)).unwrap();
        let q = l.find_request("c", "r-1").unwrap().unwrap();
        assert_eq!(
            (q.request_hash, q.signature, q.record.state.as_str()),
            ([5; 32], None, "reserved")
        );
        // The same request id again (another UVCI) is refused, and nothing of it stays.
        assert!(matches!(
            l.reserve(&res(11), Some(&key)),
            Err(LedgerError::DuplicateRequest)
        ));
        assert!(l.find_by_uci_hash(&[11; 16]).unwrap().is_none());
        l.complete(id, &[3; 16], &[4; 64]).unwrap();
        let q = l.find_request("c", "r-1").unwrap().unwrap();
        assert_eq!(q.signature, Some([4; 64]));
        assert_eq!(q.record.signature_hash, Some([3; 16]));
        // The same request again with the same UVCI (a retry racing the first attempt) is a
        // duplicate request, not a reused UVCI.
        assert!(matches!(
            l.reserve(&res(10), Some(&key)),
            Err(LedgerError::DuplicateRequest)
        ));
        // Other clients have their own request ids.
        assert!(l.find_request("d", "r-1").unwrap().is_none());
        // Releasing a reservation removes its request row too.
        let k2 = RequestKey {
            request_id: "r-2".into(),
            ..key
        };
        let id2 = l.reserve(&res(12), Some(&k2)).unwrap();
        l.release(id2).unwrap();
        assert!(l.find_request("c", "r-2").unwrap().is_none());
    }

    /// A ledger of schema version 5 keeps its request keys in `requests`. After the upgrade
    /// they are still found, still refuse a second reservation, and go with their certificate;
    /// new keys go on the certificate row.
    #[test]
    fn request_keys_recorded_before_schema_6_still_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        {
            let c = Connection::open(&p).unwrap();
            for sql in &MIGRATIONS[..5] {
                c.execute_batch(sql).unwrap();
            }
            c.execute_batch(
                "PRAGMA user_version = 5;
                 INSERT INTO certificates (id, uci_hash, country_uci_hash, cert_type, kid, iat, exp,
                     state, signature_hash, reserved_at, signed_at, issuer, signature)
                 VALUES (1, zeroblob(16), zeroblob(16), 'test', zeroblob(8), 1, 2, 'signed',
                     zeroblob(16), 1, 1, 'c', NULL),
                        (2, randomblob(16), randomblob(16), 'test', zeroblob(8), 1, 2, 'reserved',
                     NULL, 1, NULL, 'c', NULL);
                 INSERT INTO requests (client, request_id, request_hash, certificate_id, signature,
                     created_at)
                 VALUES ('c', 'old', zeroblob(32), 1, randomblob(64), 1),
                        ('c', 'old-2', zeroblob(32), 2, NULL, 1);",
            )
            .unwrap();
        }
        let l = SqliteLedger::open(&p).unwrap();
        let key = |id: &str| RequestKey {
            client: "c".into(),
            request_id: id.into(),
            request_hash: [5; 32],
        };
        let old = l.find_request("c", "old").unwrap().unwrap();
        assert_eq!(old.record.id, 1);
        assert_eq!(old.request_hash, [0; 32]);
        assert!(old.signature.is_some());
        assert!(matches!(
            l.reserve(&res(20), Some(&key("old"))),
            Err(LedgerError::DuplicateRequest)
        ));
        assert!(l.find_by_uci_hash(&[20; 16]).unwrap().is_none());
        // Another client's "old" and a new id of this client are free; the new key is on the row.
        let id = l.reserve(&res(21), Some(&key("new"))).unwrap();
        assert!(l
            .reserve(
                &res(22),
                Some(&RequestKey {
                    client: "d".into(),
                    ..key("old")
                })
            )
            .is_ok());
        let conn = open_conn(&p).unwrap();
        let on_row: (String, String, Vec<u8>) = conn
            .query_row(
                "SELECT issuer, request_id, request_hash FROM certificates WHERE id = ?1",
                [id.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(on_row, ("c".into(), "new".into(), vec![5; 32]));
        let legacy_rows: i64 = conn
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(legacy_rows, 2);
        // Releasing an old reservation takes its old request key with it.
        l.release(ReservationId(2)).unwrap();
        assert!(l.find_request("c", "old-2").unwrap().is_none());
        assert!(l.reserve(&res(23), Some(&key("old-2"))).is_ok());
        // A row's request id and hash come together.
        assert!(conn
            .execute(
                "UPDATE certificates SET request_hash = NULL WHERE id = ?1",
                [id.0]
            )
            .is_err());
    }

    #[test]
    fn concurrent_writes_commit_in_groups_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::sync::Arc::new(SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap());
        // 64 threads reserve and complete at once; two of them use the same UVCI hash.
        let handles: Vec<_> = (0..64u8)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let n = if i == 63 { 62 } else { i };
                    let id = l.reserve(&res(n), None)?;
                    l.complete(id, &[i; 16], &[i; 64])
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
        assert_eq!(failed.len(), 1, "{results:?}");
        assert!(matches!(failed[0], Err(LedgerError::DuplicateUvci { .. })));
        assert_eq!(
            l.counts().unwrap(),
            LedgerCounts {
                reserved: 0,
                signed: 63
            }
        );
    }

    /// Writes whose replies go nowhere (the test reads `apply_group`'s results).
    fn unanswered(writes: impl IntoIterator<Item = LedgerWrite>) -> Vec<WriteOp> {
        writes
            .into_iter()
            .map(|kind| WriteOp {
                kind,
                reply: Box::new(|_| {}),
            })
            .collect()
    }

    /// One group with failing writes in it (a reused UVCI, a reused request id whose
    /// certificate row must not stay, a completion of nothing): the group is applied again with
    /// savepoints, each failing write fails alone with its own error, and every other write of
    /// the group commits.
    #[test]
    fn a_group_with_failing_writes_commits_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let l = SqliteLedger::open(&path).unwrap();
        let first = l.reserve(&res(1), None).unwrap();
        let key = |id: &str| RequestKey {
            client: "c".into(),
            request_id: id.into(),
            request_hash: [5; 32],
        };
        let conn = open_conn(&path).unwrap();
        let ops = [
            LedgerWrite::Reserve(res(2), Some(key("a"))),
            LedgerWrite::Reserve(res(1), None),
            LedgerWrite::Reserve(res(3), Some(key("a"))),
            LedgerWrite::Complete(first, [8; 16], [8; 64]),
            LedgerWrite::Complete(ReservationId(999), [9; 16], [9; 64]),
            LedgerWrite::Reserve(res(4), None),
        ];
        let group = unanswered(ops);
        let mut uci = UciIndex::load(&conn, uci::RECENT_LIMIT, None).unwrap();
        let results = apply_group(&conn, false, &mut uci, &group).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        uci.committed();
        // The hash reserved before the group (through the ledger) and the group's two.
        assert_eq!(uci.recent_len(), 3);
        assert!(matches!(results[0], Ok(Some(_))), "{results:?}");
        assert!(
            matches!(&results[1], Err(LedgerError::DuplicateUvci { state }) if state == "reserved"),
            "{results:?}"
        );
        assert!(
            matches!(results[2], Err(LedgerError::DuplicateRequest)),
            "{results:?}"
        );
        assert!(matches!(results[3], Ok(None)), "{results:?}");
        assert!(
            matches!(results[4], Err(LedgerError::NotReserved(999))),
            "{results:?}"
        );
        assert!(matches!(results[5], Ok(Some(_))), "{results:?}");
        // The refused request's certificate row did not stay; the others are there.
        assert!(l.find_by_uci_hash(&[3; 16]).unwrap().is_none());
        assert_eq!(
            l.find_by_uci_hash(&[1; 16]).unwrap().unwrap().state,
            "signed"
        );
        assert_eq!(
            l.find_request("c", "a")
                .unwrap()
                .unwrap()
                .record
                .reservation
                .uci_hash,
            [2; 16]
        );
        assert_eq!(
            l.counts().unwrap(),
            LedgerCounts {
                reserved: 2,
                signed: 1
            }
        );
        // A group without failures commits on the first pass.
        let ok = unanswered([LedgerWrite::Reserve(res(5), None)]);
        let results = apply_group(&conn, false, &mut uci, &ok).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        assert!(matches!(results[0], Ok(Some(_))));
        assert!(l.find_by_uci_hash(&[5; 16]).unwrap().is_some());
    }

    /// A reservation whose UVCI hash is `n` (big-endian in the first bytes).
    fn res_n(n: u32) -> Reservation {
        let mut r = res(0);
        r.uci_hash[..4].copy_from_slice(&n.to_be_bytes());
        r.country_uci_hash[..4].copy_from_slice(&n.to_be_bytes());
        r
    }

    /// Reservations left `reserved` are listed after a reopen (as after a crash), with who asked
    /// and when, also once merged into `uci_index`; releasing one frees its UVCI and request id.
    #[test]
    fn interrupted_reservations_are_listed_and_can_be_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let key = |id: &str| RequestKey {
            client: "spiffe://x/front".into(),
            request_id: id.into(),
            request_hash: [3; 32],
        };
        {
            let l = SqliteLedger::open_with(&path, 4).unwrap();
            let done = l.reserve(&res_n(1), None).unwrap();
            l.complete(done, &[9; 16], &[0; 64]).unwrap();
            l.reserve(&res_n(2), Some(&key("order-2"))).unwrap();
            l.reserve(&res_n(3), None).unwrap();
            // Dropped without completing 2 and 3, as a process that stops.
        }
        let l = SqliteLedger::open_with(&path, 4).unwrap();
        let found = l.interrupted().unwrap();
        assert_eq!(found.iter().map(|i| i.id).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(found[0].issuer.as_deref(), Some("spiffe://x/front"));
        assert_eq!(found[0].request_id.as_deref(), Some("order-2"));
        assert_eq!(found[0].kid, [7; 8]);
        assert_eq!(found[0].cert_type, "test");
        assert!(found[0].reserved_at > 0);
        assert_eq!(found[1].request_id, None);
        assert_eq!(l.interrupted_recent().unwrap(), found);
        // Merges (four recent hashes start one) move both rows into uci_index: the full list
        // still has them.
        for n in 10..40 {
            let id = l.reserve(&res_n(n), None).unwrap();
            l.complete(id, &[9; 16], &[0; 64]).unwrap();
        }
        assert!(uci_state(&l.conn()).0 >= 3, "no merge went past the rows");
        assert_eq!(l.interrupted().unwrap(), found);
        // Blocked until released; then free again.
        assert!(matches!(
            l.reserve(&res_n(2), Some(&key("order-2"))),
            Err(LedgerError::DuplicateRequest)
        ));
        l.release(ReservationId(2)).unwrap();
        assert_eq!(l.interrupted().unwrap(), found[1..].to_vec());
        l.reserve(&res_n(2), Some(&key("order-2"))).unwrap();
    }

    /// `(mark, entries of uci_index, rows at or below the mark missing from uci_index, entries
    /// of uci_index whose row is gone)`: the last two must be 0 (`uci.rs`).
    fn uci_state(c: &Connection) -> (i64, i64, i64, i64) {
        c.query_row(
            "SELECT (SELECT value FROM counters WHERE name = 'uci_indexed_through'),
                    (SELECT count(*) FROM uci_index),
                    (SELECT count(*) FROM certificates c
                     WHERE c.id <= (SELECT value FROM counters WHERE name = 'uci_indexed_through')
                       AND NOT EXISTS (SELECT 1 FROM uci_index u
                                       WHERE u.uci_hash = c.uci_hash AND u.certificate_id = c.id)),
                    (SELECT count(*) FROM uci_index u
                     WHERE NOT EXISTS (SELECT 1 FROM certificates c WHERE c.id = u.certificate_id))",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    }

    /// Every hash in `live` is refused again (with its row's state) and found by the reader;
    /// every hash in `gone` is not found.
    fn check_hashes(l: &SqliteLedger, live: &[(u32, &str)], gone: &[u32]) {
        for &(n, state) in live {
            match l.reserve(&res_n(n), None) {
                Err(LedgerError::DuplicateUvci { state: s }) => assert_eq!(s, state, "hash {n}"),
                other => panic!("hash {n}: expected a duplicate, got {other:?}"),
            }
            let found = l.find_by_uci_hash(&res_n(n).uci_hash).unwrap();
            assert_eq!(found.map(|f| f.state), Some(state.to_string()), "hash {n}");
        }
        for &n in gone {
            assert!(
                l.find_by_uci_hash(&res_n(n).uci_hash).unwrap().is_none(),
                "hash {n}"
            );
        }
    }

    /// With a small limit, the recent hashes are merged into `uci_index` several times over,
    /// in slices across commits; a reopen in the middle of a merge (as after a crash) loses no
    /// hash. Throughout, every hash is refused a second time and found, released and purged
    /// hashes are free again, and the index matches the rows.
    #[test]
    fn uvci_hashes_stay_unique_through_merges_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let conn = open_conn(&path).unwrap();
        let limit = 150;
        let mut l = SqliteLedger::open_with(&path, limit).unwrap();
        let mut live: Vec<(u32, &str)> = Vec::new();
        let mut gone = Vec::new();
        // Reserve hashes 0.. in a scrambled order; complete two of three, release every
        // seventh.
        let mut next = 0u32;
        let mut reserve =
            |l: &SqliteLedger, count: u32, live: &mut Vec<(u32, &str)>, gone: &mut Vec<u32>| {
                for _ in 0..count {
                    let n = next.wrapping_mul(2_654_435_761) >> 8;
                    next += 1;
                    let id = l.reserve(&res_n(n), None).unwrap();
                    if n.is_multiple_of(7) {
                        l.release(id).unwrap();
                        gone.push(n);
                    } else if !n.is_multiple_of(3) {
                        l.complete(id, &[1; 16], &[2; 64]).unwrap();
                        live.push((n, "signed"));
                    } else {
                        live.push((n, "reserved"));
                    }
                }
            };
        // Up to the first slice of the first merge (which starts at 150 recent hashes): a
        // slice is shorter than the merge, so the merge is then under way, with some hashes in
        // the index and the mark not moved yet.
        for _ in 0..300 {
            reserve(&l, 1, &mut live, &mut gone);
            if uci_state(&conn).1 > 0 {
                break;
            }
        }
        let (mark, indexed, missing, orphans) = uci_state(&conn);
        assert_eq!((mark, missing, orphans), (0, 0, 0));
        assert!(
            indexed > 0 && indexed < 150,
            "{indexed} hashes in uci_index"
        );
        check_hashes(&l, &live, &gone);
        // Reopen in the middle of the merge.
        drop(l);
        l = SqliteLedger::open_with(&path, limit).unwrap();
        check_hashes(&l, &live, &gone);
        reserve(&l, 600, &mut live, &mut gone);
        let (mark, indexed, missing, orphans) = uci_state(&conn);
        assert_eq!((missing, orphans), (0, 0));
        assert!(
            mark > 400 && indexed > 400,
            "mark {mark}, {indexed} hashes in uci_index"
        );
        check_hashes(&l, &live, &gone);
        // Released hashes can be reserved again.
        for &n in &gone[..3] {
            l.reserve(&res_n(n), None).unwrap();
        }
        // Rows deleted by another connection (the purge): one merged long ago, one recent
        // (still in the writer's memory). Their hashes are free again and leave no index entry.
        let (old, recent) = (live[0].0, live.last().unwrap().0);
        for n in [old, recent] {
            conn.execute(
                "DELETE FROM certificates WHERE uci_hash = ?1",
                [&res_n(n).uci_hash[..]],
            )
            .unwrap();
        }
        assert_eq!(uci_state(&conn).3, 0);
        l.reserve(&res_n(old), None).unwrap();
        l.reserve(&res_n(recent), None).unwrap();
        drop(l);
        let l = SqliteLedger::open_with(&path, limit).unwrap();
        let (_, _, missing, orphans) = uci_state(&conn);
        assert_eq!((missing, orphans), (0, 0));
        live[0].1 = "reserved";
        live.last_mut().unwrap().1 = "reserved";
        check_hashes(&l, &live, &gone[3..]);
    }

    /// A ledger of schema version 6 (the UVCI hash `UNIQUE` on `certificates`) is upgraded:
    /// the table is copied without it, every hash goes to `uci_index`, and the rows that
    /// reference certificates (a revocation) stay.
    #[test]
    fn schema_6_ledgers_move_their_uvci_hashes_to_uci_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        {
            let c = Connection::open(&p).unwrap();
            c.pragma_update(None, "foreign_keys", "ON").unwrap();
            for sql in &MIGRATIONS[..6] {
                c.execute_batch(sql).unwrap();
            }
            c.execute_batch(
                "PRAGMA user_version = 6;
                 INSERT INTO certificates (id, uci_hash, country_uci_hash, cert_type, kid, iat, exp,
                     state, signature_hash, reserved_at, signed_at, issuer, signature, request_id,
                     request_hash)
                 VALUES (1, zeroblob(16), zeroblob(16), 'test', zeroblob(8), 1, 2, 'signed',
                     zeroblob(16), 1, 1, 'c', randomblob(64), 'q-1', zeroblob(32)),
                        (5, randomblob(16), randomblob(16), 'test', zeroblob(8), 1, 2, 'reserved',
                     NULL, 1, NULL, 'c', NULL, NULL, NULL);
                 INSERT INTO revocations (certificate_id, reason, revoked_by, revoked_at,
                     added_version)
                 VALUES (1, 'fraud', 'test', 1, 1);",
            )
            .unwrap();
        }
        let l = SqliteLedger::open(&p).unwrap();
        let conn = open_conn(&p).unwrap();
        assert_eq!(uci_state(&conn), (5, 2, 0, 0));
        let revocations: i64 = conn
            .query_row("SELECT count(*) FROM revocations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(revocations, 1);
        let uniques: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE 'sqlite_autoindex_certificates%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(uniques, 0);
        match l.reserve(&res(0), None) {
            Err(LedgerError::DuplicateUvci { state }) => assert_eq!(state, "signed"),
            other => panic!("expected a duplicate, got {other:?}"),
        }
        assert_eq!(l.find_by_uci_hash(&[0; 16]).unwrap().unwrap().id, 1);
        assert!(l.find_request("c", "q-1").unwrap().is_some());
        // New rows continue after the old ones.
        assert_eq!(l.reserve(&res(9), None).unwrap(), ReservationId(6));
    }

    /// A second writer on the same file is refused while the first is open, and welcome after.
    #[test]
    fn a_ledger_has_one_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        let l = SqliteLedger::open(&p).unwrap();
        match SqliteLedger::open(&p) {
            Err(LedgerError::Database(m)) => assert!(m.contains("in use by another"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        drop(l);
        SqliteLedger::open(&p).unwrap();
    }

    #[test]
    fn survives_reopen_and_rejects_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        {
            let l = SqliteLedger::open(&p).unwrap();
            let id = l.reserve(&res(3), None).unwrap();
            l.complete(id, &[1; 16], &[0; 64]).unwrap();
        }
        let l = SqliteLedger::open(&p).unwrap();
        assert!(l.find_by_uci_hash(&[3; 16]).unwrap().is_some());
        let mut bad = res(4);
        bad.exp = bad.iat; // exp must be after iat
        assert!(matches!(
            l.reserve(&bad, None),
            Err(LedgerError::Database(_))
        ));
    }
}
