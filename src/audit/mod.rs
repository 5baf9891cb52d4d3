//! The audit log of key operations, revocations and ledger repairs: append-only and hash-chained.
//!
//! Each entry holds the SHA-256 of the previous entry, the time, the officer, the operation, its
//! exact parameters, the approvals and the result; its own hash covers all of them. Entries are
//! appended in the same SQLite transaction as the state change they describe, so an operation
//! whose entry cannot be written has no effect (fail closed).
//!
//! Checkpoints record the entry count and the head hash, signed by an audit key that never
//! leaves the HSM ([`CheckpointSigner`]). [`verify`] finds a modified, removed or reordered entry
//! (the chain breaks there) and a truncation before the last checkpoint (the count or head no
//! longer matches a signed checkpoint), and names the first bad entry.
//!
//! The newest checkpoint is also kept in the token, as an [`Anchor`]: the database alone cannot
//! show that its newest checkpoints were deleted (with the entries after the newest one left,
//! which could then be rewritten). [`check_anchor`] finds the anchored checkpoint gone or
//! changed.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The database failed; the operation that needed the entry must fail too.
    #[error("audit log: {0}")]
    Database(String),
    /// A checkpoint could not be signed.
    #[error("audit checkpoint: {0}")]
    Sign(String),
}

impl From<rusqlite::Error> for AuditError {
    fn from(e: rusqlite::Error) -> Self {
        AuditError::Database(e.to_string())
    }
}

/// Schema of the audit tables (part of the control database's migrations).
pub const SCHEMA: &str = r#"
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    prev_hash  BLOB    NOT NULL CHECK (length(prev_hash) = 32),
    time       INTEGER NOT NULL,
    officer    TEXT    NOT NULL,
    operation  TEXT    NOT NULL,
    parameters TEXT    NOT NULL,
    approvals  TEXT    NOT NULL,
    result     TEXT    NOT NULL,
    hash       BLOB    NOT NULL CHECK (length(hash) = 32)
);
CREATE TABLE audit_checkpoints (
    id         INTEGER PRIMARY KEY,
    count      INTEGER NOT NULL,
    head_hash  BLOB    NOT NULL CHECK (length(head_hash) = 32),
    time       INTEGER NOT NULL,
    signed     TEXT    NOT NULL,
    signature  BLOB    NOT NULL
);
"#;

/// One audit entry as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position, from 1, without gaps.
    pub seq: i64,
    /// Hash of the previous entry (32 zero bytes for the first).
    pub prev_hash: [u8; 32],
    /// Unix seconds.
    pub time: i64,
    /// Identity of the officer (from the mTLS client certificate), or `system`.
    pub officer: String,
    /// Operation name, e.g. `keys.generate`.
    pub operation: String,
    /// Exact parameters (JSON).
    pub parameters: Value,
    /// Officers who approved (JSON array of identities).
    pub approvals: Vec<String>,
    /// Outcome: `ok`, `pending OP-ID`, or `refused: …`.
    pub result: String,
    /// SHA-256 over all the fields above.
    pub hash: [u8; 32],
}

/// What an entry records; `append` adds position, time, chaining and hash.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// Who acted.
    pub officer: &'a str,
    /// Operation name.
    pub operation: &'a str,
    /// Exact parameters.
    pub parameters: Value,
    /// Approving officers.
    pub approvals: &'a [String],
    /// Outcome.
    pub result: &'a str,
}

fn put(h: &mut Sha256, field: &[u8]) {
    h.update((field.len() as u64).to_be_bytes());
    h.update(field);
}

/// The hash of an entry: SHA-256 over its length-prefixed fields (so no two different entries
/// share an encoding).
#[allow(clippy::too_many_arguments)]
fn entry_hash(
    seq: i64,
    prev: &[u8; 32],
    time: i64,
    officer: &str,
    operation: &str,
    parameters: &str,
    approvals: &str,
    result: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"dccsign-audit-v1");
    put(&mut h, &seq.to_be_bytes());
    put(&mut h, prev);
    put(&mut h, &time.to_be_bytes());
    put(&mut h, officer.as_bytes());
    put(&mut h, operation.as_bytes());
    put(&mut h, parameters.as_bytes());
    put(&mut h, approvals.as_bytes());
    put(&mut h, result.as_bytes());
    h.finalize().into()
}

/// Appends an entry inside the caller's transaction (commit it with the operation's effect).
pub fn append(tx: &Transaction<'_>, r: &Record<'_>, now: i64) -> Result<Entry, AuditError> {
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let (seq, prev_hash) = match last {
        Some((s, h)) => (
            s + 1,
            h.try_into()
                .map_err(|_| AuditError::Database("stored hash is not 32 bytes".into()))?,
        ),
        None => (1, [0u8; 32]),
    };
    let parameters = r.parameters.to_string();
    let approvals = serde_json::to_string(r.approvals).unwrap_or_else(|_| "[]".into());
    let hash = entry_hash(
        seq,
        &prev_hash,
        now,
        r.officer,
        r.operation,
        &parameters,
        &approvals,
        r.result,
    );
    tx.execute(
        "INSERT INTO audit (seq, prev_hash, time, officer, operation, parameters, approvals, result, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![seq, &prev_hash[..], now, r.officer, r.operation, parameters, approvals, r.result, &hash[..]],
    )?;
    Ok(Entry {
        seq,
        prev_hash,
        time: now,
        officer: r.officer.to_string(),
        operation: r.operation.to_string(),
        parameters: r.parameters.clone(),
        approvals: r.approvals.to_vec(),
        result: r.result.to_string(),
        hash,
    })
}

/// Signs checkpoints with a key that never leaves the HSM, and checks them.
pub trait CheckpointSigner: Send + Sync {
    /// ECDSA P-256 signature (raw `r||s`) over SHA-256 of `message`.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], AuditError>;
}

/// The bytes a checkpoint signs.
fn checkpoint_message(count: i64, head: &[u8; 32], time: i64, extra: &str) -> Vec<u8> {
    let mut m = b"dccsign-audit-checkpoint-v1".to_vec();
    m.extend_from_slice(&count.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&time.to_be_bytes());
    m.extend_from_slice(extra.as_bytes());
    m
}

/// A checkpoint as the token keeps it: which one, and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The checkpoint's row id.
    pub id: i64,
    /// The entries it covers.
    pub count: i64,
    /// The hash of entry `count` (zeros for an empty log).
    pub head: [u8; 32],
}

/// The first bytes of an [`Anchor`]'s encoding.
const ANCHOR_MAGIC: &[u8] = b"dccsign-audit-anchor-v1";

impl Anchor {
    /// The bytes stored in the token.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = ANCHOR_MAGIC.to_vec();
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&self.count.to_be_bytes());
        b.extend_from_slice(&self.head);
        b
    }

    /// Reads [`Anchor::to_bytes`]'s encoding.
    pub fn from_bytes(b: &[u8]) -> Option<Anchor> {
        let rest = b.strip_prefix(ANCHOR_MAGIC)?;
        if rest.len() != 48 {
            return None;
        }
        Some(Anchor {
            id: i64::from_be_bytes(rest[..8].try_into().ok()?),
            count: i64::from_be_bytes(rest[8..16].try_into().ok()?),
            head: rest[16..].try_into().ok()?,
        })
    }
}

/// Whether the database still holds the anchored checkpoint as it was signed, and the entry it
/// ends at: `None` if so, else the problem. A cheap check (two rows), made before every
/// checkpoint and at start; [`verify`] checks everything else.
pub fn check_anchor(conn: &Connection, anchor: &Anchor) -> Result<Option<String>, AuditError> {
    let id = anchor.id;
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT count, head_hash FROM audit_checkpoints WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let newest: Option<i64> =
        conn.query_row("SELECT max(id) FROM audit_checkpoints", [], |r| r.get(0))?;
    let Some((count, head)) = row else {
        return Ok(Some(format!(
            "checkpoint {id}: missing — the token's anchor names it, the newest in the database is {} (checkpoints deleted, or the database replaced by an older copy)",
            newest.map_or("none".to_string(), |n| n.to_string())
        )));
    };
    if count != anchor.count || head != anchor.head {
        return Ok(Some(format!(
            "checkpoint {id}: differs from the token's anchor (it covered {} entries, the database says {count})",
            anchor.count
        )));
    }
    if anchor.count > 0 {
        let entry: Option<Vec<u8>> = conn
            .query_row(
                "SELECT hash FROM audit WHERE seq = ?1",
                [anchor.count],
                |r| r.get(0),
            )
            .optional()?;
        if entry.as_deref() != Some(&anchor.head[..]) {
            return Ok(Some(format!(
                "entry {}: missing or changed — checkpoint {id} in the token's anchor ends there",
                anchor.count
            )));
        }
    }
    Ok(None)
}

/// Writes a signed checkpoint of the current head; `extra` is JSON recorded with it (e.g. the
/// certificates signed per DSC since the previous checkpoint). Returns its [`Anchor`].
pub fn checkpoint(
    conn: &Connection,
    signer: &dyn CheckpointSigner,
    extra: &Value,
    now: i64,
) -> Result<Anchor, AuditError> {
    let (count, head): (i64, Option<Vec<u8>>) = conn.query_row(
        "SELECT count(*), (SELECT hash FROM audit ORDER BY seq DESC LIMIT 1) FROM audit",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let head: [u8; 32] = head
        .unwrap_or_else(|| vec![0; 32])
        .try_into()
        .map_err(|_| AuditError::Database("stored hash is not 32 bytes".into()))?;
    let extra = extra.to_string();
    let sig = signer.sign(&checkpoint_message(count, &head, now, &extra))?;
    conn.execute(
        "INSERT INTO audit_checkpoints (count, head_hash, time, signed, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![count, &head[..], now, extra, &sig[..]],
    )?;
    Ok(Anchor {
        id: conn.last_insert_rowid(),
        count,
        head,
    })
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Entries read.
    pub entries: i64,
    /// Checkpoints whose signature verified.
    pub checkpoints: usize,
    /// The first problem, naming the entry (or checkpoint); `None` when all is well.
    pub problem: Option<String>,
}

/// Checks the whole chain and every checkpoint (signature with `key`, count and head hash).
/// Checkpoints cannot be trusted without the audit key: without one, any checkpoint is a
/// problem.
pub fn verify(
    conn: &Connection,
    key: Option<&p256::PublicKey>,
) -> Result<Verification, AuditError> {
    use p256::ecdsa::signature::Verifier;
    let mut stmt = conn.prepare(
        "SELECT seq, prev_hash, time, officer, operation, parameters, approvals, result, hash
         FROM audit ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut expected_seq = 1i64;
    let mut prev = [0u8; 32];
    let mut heads: Vec<[u8; 32]> = Vec::new();
    let mut problem: Option<String> = None;
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let stored_prev: Vec<u8> = r.get(1)?;
        let hash: Vec<u8> = r.get(8)?;
        let computed = entry_hash(
            seq,
            &prev,
            r.get(2)?,
            &r.get::<_, String>(3)?,
            &r.get::<_, String>(4)?,
            &r.get::<_, String>(5)?,
            &r.get::<_, String>(6)?,
            &r.get::<_, String>(7)?,
        );
        let bad = if seq != expected_seq {
            Some(format!(
                "entry {expected_seq}: missing or out of order (found entry {seq} in its place)"
            ))
        } else if stored_prev != prev {
            Some(format!(
                "entry {seq}: does not chain to entry {} (removed, reordered or modified)",
                seq - 1
            ))
        } else if hash != computed {
            Some(format!(
                "entry {seq}: contents do not match its hash (modified)"
            ))
        } else {
            None
        };
        if let Some(b) = bad {
            problem = Some(b);
            break;
        }
        prev = computed;
        heads.push(computed);
        expected_seq += 1;
    }
    let entries = heads.len() as i64;
    let vk = key.map(p256::ecdsa::VerifyingKey::from);
    let mut checkpoints = 0;
    let mut stmt = conn.prepare(
        "SELECT id, count, head_hash, time, signed, signature FROM audit_checkpoints ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (id, count): (i64, i64) = (r.get(0)?, r.get(1)?);
        let head: Vec<u8> = r.get(2)?;
        let head: [u8; 32] = head.try_into().unwrap_or([0xff; 32]);
        let sig: Vec<u8> = r.get(5)?;
        let msg = checkpoint_message(count, &head, r.get(3)?, &r.get::<_, String>(4)?);
        let Some(vk) = vk.as_ref() else {
            problem.get_or_insert(format!(
                "checkpoint {id}: no audit key configured to check its signature"
            ));
            break;
        };
        let sig_ok = p256::ecdsa::Signature::from_slice(&sig)
            .map(|s| vk.verify(&msg, &s).is_ok())
            .unwrap_or(false);
        if !sig_ok {
            problem.get_or_insert(format!("checkpoint {id}: bad signature"));
            break;
        }
        checkpoints += 1;
        if problem.is_some() {
            continue;
        }
        if count > entries {
            problem = Some(format!(
                "entry {}: missing — checkpoint {id} covers {count} entries, the log has {entries} (truncated)",
                entries + 1
            ));
        } else if count > 0 && heads[(count - 1) as usize] != head {
            problem = Some(format!(
                "entry {count}: differs from the head signed by checkpoint {id}"
            ));
        }
    }
    Ok(Verification {
        entries,
        checkpoints,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;

    struct SoftSigner(p256::ecdsa::SigningKey);
    impl CheckpointSigner for SoftSigner {
        fn sign(&self, m: &[u8]) -> Result<[u8; 64], AuditError> {
            let s: p256::ecdsa::Signature = self.0.sign(m);
            Ok(s.to_bytes().into())
        }
    }

    fn log(n: usize) -> (Connection, SoftSigner) {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        for i in 0..n {
            let tx = c.transaction().unwrap();
            let approvals = vec!["spiffe://x/officer-2".to_string()];
            append(
                &tx,
                &Record {
                    officer: "spiffe://x/officer-1",
                    operation: "keys.generate",
                    parameters: serde_json::json!({"label": format!("k{i}")}),
                    approvals: &approvals,
                    result: "ok",
                },
                1_000 + i as i64,
            )
            .unwrap();
            tx.commit().unwrap();
        }
        // A test-only software key stands in for the HSM's audit key in these unit tests.
        let signer = SoftSigner(p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap());
        (c, signer)
    }

    fn key(s: &SoftSigner) -> p256::PublicKey {
        (*s.0.verifying_key()).into()
    }

    #[test]
    fn an_intact_log_verifies() {
        let (c, s) = log(5);
        checkpoint(&c, &s, &serde_json::json!({}), 2_000).unwrap();
        let v = verify(&c, Some(&key(&s))).unwrap();
        assert_eq!((v.entries, v.checkpoints, v.problem), (5, 1, None));
    }

    #[test]
    fn every_kind_of_tampering_names_the_first_bad_entry() {
        let cases: [(&str, &str); 6] = [
            ("UPDATE audit SET officer = 'mallory' WHERE seq = 3", "entry 3:"),
            ("UPDATE audit SET parameters = '{\"label\":\"kX\"}' WHERE seq = 2", "entry 2:"),
            ("UPDATE audit SET time = time + 1 WHERE seq = 4", "entry 4:"),
            ("DELETE FROM audit WHERE seq = 3", "entry 3:"),
            // Reorder: swap the contents of entries 2 and 3.
            ("UPDATE audit SET seq = -seq WHERE seq IN (2, 3); UPDATE audit SET seq = 5 - seq WHERE seq < 0", "entry 2:"),
            // Truncate after a checkpoint covering all 5.
            ("DELETE FROM audit WHERE seq = 5", "entry 5:"),
        ];
        for (sql, want) in cases {
            let (c, s) = log(5);
            checkpoint(&c, &s, &serde_json::json!({}), 2_000).unwrap();
            c.execute_batch(sql).unwrap();
            let v = verify(&c, Some(&key(&s))).unwrap();
            let p = v.problem.unwrap_or_default();
            assert!(p.starts_with(want), "{sql}: {p}");
        }
    }

    #[test]
    fn a_forged_checkpoint_is_refused() {
        let (c, s) = log(2);
        checkpoint(&c, &s, &serde_json::json!({"signed": {"aa": 3}}), 2_000).unwrap();
        c.execute_batch("UPDATE audit_checkpoints SET signed = '{\"signed\":{\"aa\":4}}'")
            .unwrap();
        let v = verify(&c, Some(&key(&s))).unwrap();
        assert_eq!(v.problem.as_deref(), Some("checkpoint 1: bad signature"));
        // Another key's checkpoints do not verify either.
        let (c, s) = log(2);
        checkpoint(&c, &s, &serde_json::json!({}), 2_000).unwrap();
        let other = SoftSigner(p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap());
        assert!(verify(&c, Some(&key(&other))).unwrap().problem.is_some());
    }

    /// The token's anchor finds what the database alone cannot: its newest checkpoints
    /// deleted (with the entries after the newest remaining one), or an older copy of it.
    #[test]
    fn the_anchor_finds_deleted_checkpoints() {
        let (c, s) = log(3);
        let first = checkpoint(&c, &s, &serde_json::json!({}), 2_000).unwrap();
        assert_eq!(Anchor::from_bytes(&first.to_bytes()), Some(first));
        assert_eq!(Anchor::from_bytes(b"something else"), None);
        let tx = c.unchecked_transaction().unwrap();
        let r = Record {
            officer: "spiffe://x/officer-1",
            operation: "keys.destroy",
            parameters: serde_json::json!({"label": "k0"}),
            approvals: &[],
            result: "ok",
        };
        append(&tx, &r, 3_000).unwrap();
        tx.commit().unwrap();
        let second = checkpoint(&c, &s, &serde_json::json!({}), 3_001).unwrap();
        assert_eq!((second.id, second.count), (2, 4));
        assert_eq!(check_anchor(&c, &second).unwrap(), None);
        // An older anchor is fine while its checkpoint is there.
        assert_eq!(check_anchor(&c, &first).unwrap(), None);
        // Delete the newest checkpoint and the entry after the one before: the chain and the
        // remaining checkpoint still verify, the anchor does not.
        c.execute_batch(
            "DELETE FROM audit_checkpoints WHERE id = 2; DELETE FROM audit WHERE seq = 4",
        )
        .unwrap();
        assert_eq!(verify(&c, Some(&key(&s))).unwrap().problem, None);
        let p = check_anchor(&c, &second).unwrap().unwrap();
        assert!(p.starts_with("checkpoint 2: missing"), "{p}");
        // A checkpoint rewritten under the anchored id, or the entry it ends at changed.
        let (c, s) = log(3);
        let a = checkpoint(&c, &s, &serde_json::json!({}), 2_000).unwrap();
        c.execute_batch("UPDATE audit_checkpoints SET count = 2")
            .unwrap();
        assert!(check_anchor(&c, &a).unwrap().unwrap().contains("differs"));
        let (c, s) = log(3);
        let a = checkpoint(&c, &s, &serde_json::json!({}), 2_000).unwrap();
        c.execute_batch("UPDATE audit SET hash = zeroblob(32) WHERE seq = 3")
            .unwrap();
        assert!(check_anchor(&c, &a)
            .unwrap()
            .unwrap()
            .starts_with("entry 3:"));
    }
}
