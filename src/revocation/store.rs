//! Revocation rows, gateway batches and the outbox, in the ledger database next to the
//! certificate rows they refer to (`docs/revocation.md`).
//!
//! Invariants:
//! - one revocation row per certificate; revoking twice changes nothing; a lifted revocation
//!   keeps its row (with `removed_version`) so verifier deltas can say "removed";
//! - every change takes the next value of one counter (`revocation_version`), so list versions
//!   only grow, also across purges;
//! - a batch's entries are fixed when it is signed; an entry is in at most one active batch
//!   per hash type; withdrawing a batch (a lift) releases its other entries for re-batching;
//! - an outbox row that is `delivered` is never sent again.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::json;

use super::batch::{HashType, PlannedBatch, Revoked};
use super::hash::{to_base64, RevocationHash};
use super::list::ListEntry;
use super::rfc3339;

/// Why a certificate is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// Issued for the wrong person.
    WrongPatient,
    /// The content is seriously wrong.
    SeriousError,
    /// Obtained by fraud.
    Fraud,
    /// Suspended, possibly until a given time.
    Suspended,
    /// Replaced by a corrected certificate.
    Replaced,
}

impl Reason {
    /// The name used in the API, the CLI and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WrongPatient => "wrong-patient",
            Reason::SeriousError => "serious-error",
            Reason::Fraud => "fraud",
            Reason::Suspended => "suspended",
            Reason::Replaced => "replaced",
        }
    }
}

impl std::str::FromStr for Reason {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "wrong-patient" => Reason::WrongPatient,
            "serious-error" => Reason::SeriousError,
            "fraud" => Reason::Fraud,
            "suspended" => Reason::Suspended,
            "replaced" => Reason::Replaced,
            _ => {
                return Err(StoreError::Invalid {
                    field: "reason",
                    message: "must be wrong-patient, serious-error, fraud or suspended".into(),
                })
            }
        })
    }
}

/// Errors of the revocation store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No certificate with this UVCI (or row id) is in the ledger.
    #[error("no certificate with this UVCI is in the ledger")]
    NotFound,
    /// The certificate was reserved but never signed: there is nothing to revoke.
    #[error("the certificate was never signed")]
    NotSigned,
    /// A lift of a certificate that is not revoked.
    #[error("the certificate is not revoked")]
    NotRevoked,
    /// A parameter is missing or malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The parameter.
        field: &'static str,
        /// The rule it breaks.
        message: String,
    },
    /// The database failed.
    #[error("ledger database: {0}")]
    Database(String),
}

impl StoreError {
    /// The stable code (docs/error-codes.md).
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Invalid { .. } => "2-60-8001",
            StoreError::NotFound => "2-60-8002",
            StoreError::NotSigned => "2-60-8005",
            StoreError::NotRevoked => "2-60-8006",
            StoreError::Database(_) => "2-60-8090",
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// A certificate row with its revocation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Ledger row id.
    pub id: i64,
    /// kid of the DSC that signed it.
    pub kid: [u8; 8],
    /// Certificate type.
    pub cert_type: String,
    /// Issued-at (Unix seconds).
    pub iat: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
    /// The client that asked for it (`None`: offline issuance; only officers may revoke it).
    pub issuer: Option<String>,
    /// `reserved` or `signed`.
    pub state: String,
    /// The revocation, if any (also a lifted one).
    pub revocation: Option<RevocationInfo>,
    /// Row id of the certificate that replaced this one.
    pub replaced_by: Option<i64>,
}

/// A revocation row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationInfo {
    /// Reason (`wrong-patient`, `serious-error`, `fraud`, `suspended`, `replaced`).
    pub reason: String,
    /// Who revoked it.
    pub revoked_by: String,
    /// When (Unix seconds).
    pub revoked_at: i64,
    /// End of a suspension.
    pub until: Option<i64>,
    /// List version that added it.
    pub added_version: i64,
    /// When it was lifted, if it was.
    pub lifted_at: Option<i64>,
}

impl RevocationInfo {
    /// Whether the revocation is in force (not lifted).
    pub fn active(&self) -> bool {
        self.lifted_at.is_none()
    }
}

/// Result of a revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The list version of the revocation.
    pub version: i64,
    /// It was already revoked (nothing changed).
    pub already: bool,
}

/// Which certificates a bulk revocation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkSelector {
    /// Every certificate a DSC signed.
    Kid([u8; 8]),
    /// Every certificate a client asked for with `from <= iat < to`.
    Issuer {
        /// Client identity.
        issuer: String,
        /// Start (Unix seconds, inclusive).
        from: i64,
        /// End (Unix seconds, exclusive).
        to: i64,
    },
}

impl BulkSelector {
    /// From the parameters of a `revocation.bulk` operation (`kid` in hex, or `issuer`, `from`,
    /// `to`).
    pub fn from_params(p: &serde_json::Value) -> Result<BulkSelector, String> {
        if let Some(kid) = p["kid"].as_str() {
            let kid: [u8; 8] = hex::decode(kid)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or("kid: must be 16 hex digits")?;
            return Ok(BulkSelector::Kid(kid));
        }
        match (p["issuer"].as_str(), p["from"].as_i64(), p["to"].as_i64()) {
            (Some(issuer), Some(from), Some(to)) => Ok(BulkSelector::Issuer {
                issuer: issuer.to_string(),
                from,
                to,
            }),
            _ => Err("selector: kid, or issuer with from and to, is required".into()),
        }
    }
}

/// A stored batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// Local batch id.
    pub id: i64,
    /// kid of the DSC.
    pub kid: [u8; 8],
    /// `SIGNATURE`, `UCI` or `COUNTRYCODEUCI`.
    pub hash_type: String,
    /// `expires` (Unix seconds, a UTC midnight).
    pub expires: i64,
    /// Number of entries.
    pub entries: i64,
    /// The batch JSON.
    pub json: Vec<u8>,
    /// Base64 CMS SignedData over the JSON.
    pub cms: String,
    /// `active` or `deleted`.
    pub state: String,
    /// The gateway's batch id once uploaded.
    pub gateway_id: Option<String>,
    /// State of its upload in the outbox.
    pub upload_state: Option<String>,
}

/// An outbox row due for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Row id.
    pub id: i64,
    /// `upload`, `delete` or `event`.
    pub kind: String,
    /// `gateway` or a subscriber's name.
    pub target: String,
    /// The batch of an upload or deletion.
    pub batch_id: Option<i64>,
    /// The body (CMS base64 of an upload, JSON of an event; a deletion's CMS is built when sent,
    /// from the gateway id).
    pub body: Option<Vec<u8>>,
    /// Deliveries tried so far.
    pub attempts: u32,
    /// The batch's gateway id (deletions).
    pub gateway_id: Option<String>,
}

/// Outbox counts by kind and state, and the latest final failures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStatus {
    /// `(kind, target, state, count)`.
    pub counts: Vec<(String, String, String, i64)>,
    /// `(row id, kind, target, attempts, last error)` of failed rows, newest first (at most 20).
    pub failures: Vec<(i64, String, String, i64, String)>,
    /// `(row id, kind, target, attempts, next attempt, last error)` of pending rows that failed
    /// at least once.
    pub retrying: Vec<(i64, String, String, i64, i64, String)>,
}

/// Rows removed by a purge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Certificate rows (with their requests, revocations and batch memberships).
    pub certificates: u64,
    /// Batches.
    pub batches: u64,
    /// Outbox rows.
    pub outbox: u64,
}

/// Revocation state in the ledger database. Queries start from the (small) revocation table
/// (`CROSS JOIN` fixes that order in SQLite), never from the certificates of a kid.
pub struct RevocationStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for RevocationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationStore").finish_non_exhaustive()
    }
}

/// Takes the next list version.
fn next_version(c: &Connection) -> Result<i64, rusqlite::Error> {
    c.prepare_cached(
        "UPDATE counters SET value = value + 1 WHERE name = 'revocation_version' RETURNING value",
    )?
    .query_row([], |r| r.get(0))
}

/// Revokes certificate row `id` inside the caller's transaction (also used by the ledger writer
/// when a replacement completes). Returns the new version, or `None` when it was already
/// revoked. A lifted revocation is revoked again under a new version.
pub fn insert_revocation(
    c: &Connection,
    id: i64,
    reason: &str,
    by: &str,
    now: i64,
    until: Option<i64>,
) -> Result<Option<i64>, rusqlite::Error> {
    let existing: Option<bool> = c
        .prepare_cached("SELECT lifted_at IS NULL FROM revocations WHERE certificate_id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    if existing == Some(true) {
        return Ok(None);
    }
    let version = next_version(c)?;
    c.prepare_cached(
        "INSERT INTO revocations (certificate_id, reason, revoked_by, revoked_at, until, added_version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (certificate_id) DO UPDATE SET reason = ?2, revoked_by = ?3, revoked_at = ?4,
             until = ?5, added_version = ?6, lifted_by = NULL, lifted_at = NULL, removed_version = NULL",
    )?
    .execute(params![id, reason, by, now, until, version])?;
    Ok(Some(version))
}

/// Withdraws a batch (inside the caller's transaction): it becomes `deleted`, its entries are
/// released for re-batching, a pending upload is cancelled and an uploaded one gets a deletion.
fn withdraw_batch(tx: &Connection, batch_id: i64, now: i64) -> Result<(), rusqlite::Error> {
    let row: Option<(Option<String>, i64)> = tx
        .query_row(
            "UPDATE batches SET state = 'deleted' WHERE id = ?1 AND state = 'active'
             RETURNING gateway_id, expires",
            params![batch_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((gateway_id, expires)) = row else {
        return Ok(());
    };
    tx.execute(
        "DELETE FROM batch_entries WHERE batch_id = ?1",
        params![batch_id],
    )?;
    tx.execute(
        "UPDATE outbox SET state = 'cancelled', last_error = 'withdrawn before upload'
         WHERE batch_id = ?1 AND kind = 'upload' AND state = 'pending'",
        params![batch_id],
    )?;
    if gateway_id.is_some() {
        enqueue_delete(tx, batch_id, expires, now)?;
    }
    Ok(())
}

fn enqueue_delete(c: &Connection, batch_id: i64, expires: i64, now: i64) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO outbox (kind, target, batch_id, state, next_attempt_at, created_at, purge_after)
         VALUES ('delete', 'gateway', ?1, 'pending', ?2, ?2, ?3)",
        params![batch_id, now, expires],
    )?;
    Ok(())
}

fn kid8(v: Vec<u8>) -> Result<[u8; 8], rusqlite::Error> {
    v.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "kid".into(), rusqlite::types::Type::Blob)
    })
}

fn hash16(v: Vec<u8>) -> Result<RevocationHash, rusqlite::Error> {
    v.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob)
    })
}

fn hash_column(t: HashType) -> &'static str {
    match t {
        HashType::Signature => "c.signature_hash",
        HashType::Uci => "c.uci_hash",
        HashType::CountryCodeUci => "c.country_uci_hash",
    }
}

impl RevocationStore {
    /// Opens the ledger database (already created and migrated by
    /// [`crate::ledger::SqliteLedger::open`]).
    pub fn open(path: &Path) -> Result<RevocationStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version < 7 {
            return Err(StoreError::Database(format!(
                "ledger schema version {version} is older than this dccsign's (7); open it with the daemon first"
            )));
        }
        Ok(RevocationStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// The certificate with this UVCI hash and its revocation state.
    pub fn find(&self, uci_hash: &RevocationHash) -> Result<Option<CertificateInfo>, StoreError> {
        let conn = self.conn();
        let found = conn
            .prepare_cached(concat!(
                crate::ledger::find_sql!(),
                "SELECT c.id, c.kid, c.cert_type, c.iat, c.exp, c.issuer, c.state,
                        r.reason, r.revoked_by, r.revoked_at, r.until, r.added_version, r.lifted_at,
                        (SELECT n.id FROM certificates n WHERE n.replaces = c.id AND n.state = 'signed')
                 FROM certificates c LEFT JOIN revocations r ON r.certificate_id = c.id
                 WHERE c.id = (SELECT id FROM hit)"
            ))?
            .query_row(params![&uci_hash[..]], |r| {
                let reason: Option<String> = r.get(7)?;
                let revocation = match reason {
                    None => None,
                    Some(reason) => Some(RevocationInfo {
                        reason,
                        revoked_by: r.get(8)?,
                        revoked_at: r.get(9)?,
                        until: r.get(10)?,
                        added_version: r.get(11)?,
                        lifted_at: r.get(12)?,
                    }),
                };
                Ok(CertificateInfo {
                    id: r.get(0)?,
                    kid: kid8(r.get(1)?)?,
                    cert_type: r.get(2)?,
                    iat: r.get(3)?,
                    exp: r.get(4)?,
                    issuer: r.get(5)?,
                    state: r.get(6)?,
                    revocation,
                    replaced_by: r.get(13)?,
                })
            })
            .optional()?;
        Ok(found)
    }

    /// Revokes certificate row `id`; idempotent.
    pub fn revoke(
        &self,
        id: i64,
        reason: Reason,
        by: &str,
        until: Option<i64>,
        now: i64,
    ) -> Result<RevokeOutcome, StoreError> {
        if until.is_some() && reason != Reason::Suspended {
            return Err(StoreError::Invalid {
                field: "until",
                message: "only a suspension has an end".into(),
            });
        }
        if until.is_some_and(|u| u <= now) {
            return Err(StoreError::Invalid {
                field: "until",
                message: "must be in the future".into(),
            });
        }
        self.write(|tx| {
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM certificates WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?;
            match state.as_deref() {
                None => return Err(StoreError::NotFound),
                Some("signed") => {}
                Some(_) => return Err(StoreError::NotSigned),
            }
            match insert_revocation(tx, id, reason.as_str(), by, now, until)? {
                Some(version) => Ok(RevokeOutcome {
                    version,
                    already: false,
                }),
                None => {
                    let version = tx.query_row(
                        "SELECT added_version FROM revocations WHERE certificate_id = ?1",
                        params![id],
                        |r| r.get(0),
                    )?;
                    Ok(RevokeOutcome {
                        version,
                        already: true,
                    })
                }
            }
        })
    }

    /// Lifts the revocation of row `id` (a suspension that ends, or one entered by mistake): the
    /// batches holding it are withdrawn from the gateway and their other entries re-batched.
    /// Returns the new version.
    pub fn lift(&self, id: i64, by: &str, now: i64) -> Result<i64, StoreError> {
        self.write(|tx| lift_in(tx, id, by, now))
    }

    /// Lifts suspensions whose end has passed; returns how many.
    pub fn lift_ended_suspensions(&self, now: i64) -> Result<u64, StoreError> {
        self.write(|tx| {
            let ids: Vec<i64> = tx
                .prepare(
                    "SELECT certificate_id FROM revocations
                     WHERE reason = 'suspended' AND until IS NOT NULL AND until <= ?1 AND lifted_at IS NULL",
                )?
                .query_map(params![now], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in &ids {
                lift_in(tx, *id, "suspension-end", now)?;
            }
            Ok(ids.len() as u64)
        })
    }

    /// Revokes every signed, unrevoked certificate the selector covers; returns how many.
    pub fn bulk_revoke(
        &self,
        selector: &BulkSelector,
        reason: Reason,
        by: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        self.write(|tx| {
            let ids: Vec<i64> = match selector {
                BulkSelector::Kid(kid) => tx
                    .prepare(
                        "SELECT id FROM certificates WHERE kid = ?1 AND state = 'signed' AND exp > ?2",
                    )?
                    .query_map(params![&kid[..], now], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
                BulkSelector::Issuer { issuer, from, to } => tx
                    .prepare(
                        "SELECT id FROM certificates WHERE issuer = ?1 AND iat >= ?2 AND iat < ?3
                         AND state = 'signed' AND exp > ?4",
                    )?
                    .query_map(params![issuer, from, to, now], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            };
            let mut n = 0;
            for id in ids {
                if insert_revocation(tx, id, reason.as_str(), by, now, None)?.is_some() {
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// Revoked, unexpired certificates not yet in an active batch of this hash type, with the
    /// hash of that type. Ordered by row id.
    pub fn unbatched(&self, t: HashType, now: i64) -> Result<Vec<(i64, Revoked)>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT c.id, c.kid, c.exp, {} FROM revocations r CROSS JOIN certificates c ON c.id = r.certificate_id
             WHERE r.lifted_at IS NULL AND c.exp > ?1 AND c.state = 'signed'
               AND NOT EXISTS (SELECT 1 FROM batch_entries b WHERE b.certificate_id = c.id AND b.hash_type = ?2)
             ORDER BY c.id",
            hash_column(t)
        );
        let rows = conn
            .prepare(&sql)?
            .query_map(params![now, t.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    Revoked {
                        kid: kid8(r.get(1)?)?,
                        exp: r.get(2)?,
                        hash: hash16(r.get(3)?)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Stores a signed batch, its members and its upload in the outbox, in one transaction.
    /// Refuses (and stores nothing) when a member was batched or lifted meanwhile: the caller
    /// plans again.
    pub fn record_batch(
        &self,
        b: &PlannedBatch,
        members: &[i64],
        json: &[u8],
        cms: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        self.write(|tx| {
            let batch_id: i64 = tx.query_row(
                "INSERT INTO batches (kid, hash_type, expires, entries, json, cms, created_at, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active') RETURNING id",
                params![&b.kid[..], b.hash_type.as_str(), b.expires, b.hashes.len() as i64, json, cms, now],
                |r| r.get(0),
            )?;
            for id in members {
                let live: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM revocations WHERE certificate_id = ?1 AND lifted_at IS NULL)",
                    params![id],
                    |r| r.get(0),
                )?;
                if !live {
                    return Err(StoreError::Invalid {
                        field: "batch",
                        message: format!("certificate row {id} is no longer revoked"),
                    });
                }
                tx.execute(
                    "INSERT INTO batch_entries (certificate_id, hash_type, batch_id) VALUES (?1, ?2, ?3)",
                    params![id, b.hash_type.as_str(), batch_id],
                )
                .map_err(|e| StoreError::Invalid {
                    field: "batch",
                    message: format!("certificate row {id} is already batched: {e}"),
                })?;
            }
            tx.execute(
                "INSERT INTO outbox (kind, target, batch_id, body, state, next_attempt_at, created_at, purge_after)
                 VALUES ('upload', 'gateway', ?1, ?2, 'pending', ?3, ?3, ?4)",
                params![batch_id, cms.as_bytes(), now, b.expires],
            )?;
            Ok(batch_id)
        })
    }

    /// Batches, newest first; with `only_pending`, those whose upload has not succeeded yet.
    pub fn batches(&self, only_pending: bool) -> Result<Vec<BatchRow>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT b.id, b.kid, b.hash_type, b.expires, b.entries, b.json, b.cms, b.state, b.gateway_id,
                    (SELECT o.state FROM outbox o WHERE o.batch_id = b.id AND o.kind = 'upload' ORDER BY o.id DESC LIMIT 1) AS upload
             FROM batches b {} ORDER BY b.id DESC",
            if only_pending {
                "WHERE b.state = 'active' AND b.gateway_id IS NULL"
            } else {
                ""
            }
        );
        let rows = conn
            .prepare(&sql)?
            .query_map([], |r| {
                Ok(BatchRow {
                    id: r.get(0)?,
                    kid: kid8(r.get(1)?)?,
                    hash_type: r.get(2)?,
                    expires: r.get(3)?,
                    entries: r.get(4)?,
                    json: r.get(5)?,
                    cms: r.get(6)?,
                    state: r.get(7)?,
                    gateway_id: r.get(8)?,
                    upload_state: r.get(9)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Outbox rows due at `now` (oldest first), at most `limit`.
    pub fn due(&self, now: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.conn();
        let rows = conn
            .prepare_cached(
                "SELECT o.id, o.kind, o.target, o.batch_id, o.body, o.attempts, b.gateway_id
                 FROM outbox o LEFT JOIN batches b ON b.id = o.batch_id
                 WHERE o.state = 'pending' AND o.next_attempt_at <= ?1
                 ORDER BY o.next_attempt_at, o.id LIMIT ?2",
            )?
            .query_map(params![now, limit as i64], |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    target: r.get(2)?,
                    batch_id: r.get(3)?,
                    body: r.get(4)?,
                    attempts: r.get(5)?,
                    gateway_id: r.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Records a successful delivery (and an upload's gateway batch id). An upload whose batch
    /// was withdrawn while it was in flight gets its deletion queued at once.
    pub fn delivered(&self, id: i64, gateway_id: Option<&str>, now: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            let row: Option<(String, Option<i64>)> = tx
                .query_row(
                    "UPDATE outbox SET state = 'delivered', delivered_at = ?2, attempts = attempts + 1,
                         last_error = NULL
                     WHERE id = ?1 AND state IN ('pending', 'cancelled') RETURNING kind, batch_id",
                    params![id, now],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((kind, batch_id)) = row else {
                return Err(StoreError::Invalid {
                    field: "outbox",
                    message: format!("row {id} is not pending"),
                });
            };
            if let (Some(batch), "upload") = (batch_id, kind.as_str()) {
                let (state, expires): (String, i64) = tx.query_row(
                    "UPDATE batches SET gateway_id = ?2 WHERE id = ?1 RETURNING state, expires",
                    params![batch, gateway_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                if state == "deleted" {
                    enqueue_delete(tx, batch, expires, now)?;
                }
            }
            Ok(())
        })
    }

    /// Records a failed attempt: another try at `next_at`, or (`None`) a final failure.
    pub fn failed(&self, id: i64, error: &str, next_at: Option<i64>) -> Result<(), StoreError> {
        self.write(|tx| {
            match next_at {
                Some(at) => tx.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3
                     WHERE id = ?1 AND state = 'pending'",
                    params![id, error, at],
                )?,
                None => tx.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, state = 'failed'
                     WHERE id = ?1 AND state = 'pending'",
                    params![id, error],
                )?,
            };
            Ok(())
        })
    }

    /// Queues one event per subscriber for every revocation change since the last call, and
    /// moves the event mark to the current version, in one transaction. Returns how many rows.
    pub fn enqueue_events(&self, subscribers: &[String], now: i64) -> Result<u64, StoreError> {
        self.write(|tx| {
            let mark: i64 = tx.query_row(
                "SELECT value FROM counters WHERE name = 'events_version'",
                [],
                |r| r.get(0),
            )?;
            let current: i64 = tx.query_row(
                "SELECT value FROM counters WHERE name = 'revocation_version'",
                [],
                |r| r.get(0),
            )?;
            if current == mark {
                return Ok(0);
            }
            let mut events = Vec::new();
            {
                let mut stmt = tx.prepare(
                    "SELECT r.reason, r.revoked_at, r.until, r.added_version, r.lifted_at, r.removed_version,
                            c.kid, c.signature_hash, c.uci_hash, c.exp
                     FROM revocations r CROSS JOIN certificates c ON c.id = r.certificate_id
                     WHERE r.added_version > ?1 OR r.removed_version > ?1",
                )?;
                let rows = stmt.query_map(params![mark], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        kid8(r.get(6)?)?,
                        hash16(r.get(7)?)?,
                        hash16(r.get(8)?)?,
                        r.get::<_, i64>(9)?,
                    ))
                })?;
                for row in rows {
                    let (reason, at, until, added, lifted_at, removed, kid, sig, uci, exp) = row?;
                    let base = |event: &str, version: i64, at: i64| {
                        json!({
                            "event": event,
                            "version": version,
                            "kid": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, kid),
                            "signatureHash": to_base64(&sig),
                            "uciHash": to_base64(&uci),
                            "reason": reason,
                            "at": rfc3339(at),
                            "until": until.map(rfc3339),
                        })
                    };
                    if added > mark {
                        events.push((added, base("revoked", added, at), exp));
                    }
                    if let (Some(removed), Some(lifted_at)) = (removed, lifted_at) {
                        if removed > mark {
                            events.push((removed, base("lifted", removed, lifted_at), exp));
                        }
                    }
                }
            }
            events.sort_by_key(|e| e.0);
            let mut n = 0;
            for (_, event, exp) in &events {
                let body = serde_json::to_vec(event).map_err(|e| StoreError::Database(e.to_string()))?;
                for s in subscribers {
                    tx.execute(
                        "INSERT INTO outbox (kind, target, body, state, next_attempt_at, created_at, purge_after)
                         VALUES ('event', ?1, ?2, 'pending', ?3, ?3, ?4)",
                        params![s, body, now, exp],
                    )?;
                    n += 1;
                }
            }
            tx.execute(
                "UPDATE counters SET value = ?1 WHERE name = 'events_version'",
                params![current],
            )?;
            Ok(n)
        })
    }

    /// The verifier-list entries of one kid: every revocation (also lifted ones, as removed)
    /// of a certificate it signed that is still in the ledger.
    pub fn list_entries(&self, kid: &[u8; 8]) -> Result<Vec<ListEntry>, StoreError> {
        let conn = self.conn();
        let rows = conn
            .prepare_cached(
                "SELECT c.signature_hash, r.added_version, r.removed_version
                 FROM revocations r CROSS JOIN certificates c ON c.id = r.certificate_id
                 WHERE c.kid = ?1 AND c.state = 'signed'",
            )?
            .query_map(params![&kid[..]], |r| {
                Ok(ListEntry {
                    hash: hash16(r.get(0)?)?,
                    added: r.get::<_, i64>(1)? as u64,
                    removed: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// The current list version (the counter every change takes its version from).
    pub fn version(&self) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "SELECT value FROM counters WHERE name = 'revocation_version'",
            [],
            |r| r.get(0),
        )?)
    }

    /// Outbox counts and failures.
    pub fn status(&self) -> Result<OutboxStatus, StoreError> {
        let conn = self.conn();
        let counts = conn
            .prepare("SELECT kind, target, state, count(*) FROM outbox GROUP BY kind, target, state ORDER BY 1, 2, 3")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        let failures = conn
            .prepare(
                "SELECT id, kind, target, attempts, coalesce(last_error, '') FROM outbox
                 WHERE state = 'failed' ORDER BY id DESC LIMIT 20",
            )?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let retrying = conn
            .prepare(
                "SELECT id, kind, target, attempts, next_attempt_at, coalesce(last_error, '') FROM outbox
                 WHERE state = 'pending' AND attempts > 0 ORDER BY next_attempt_at LIMIT 20",
            )?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?
            .collect::<Result<_, _>>()?;
        Ok(OutboxStatus {
            counts,
            failures,
            retrying,
        })
    }

    /// Deletes everything about certificates whose expiry is older than `grace_seconds` at
    /// `now`: certificate rows (with their requests, revocations and batch memberships),
    /// batches that expired as long ago and outbox rows about them. Works in chunks, each its
    /// own transaction, so issuing is never blocked for long.
    pub fn purge(&self, now: i64, grace_seconds: i64) -> Result<PurgeReport, StoreError> {
        let cutoff = now - grace_seconds;
        let mut report = PurgeReport {
            outbox: self.write(|tx| {
                Ok(
                    tx.execute("DELETE FROM outbox WHERE purge_after < ?1", params![cutoff])?
                        as u64,
                )
            })?,
            batches: self.write(|tx| {
                Ok(tx.execute("DELETE FROM batches WHERE expires < ?1", params![cutoff])? as u64)
            })?,
            certificates: 0,
        };
        // The kids, by a loose index scan of certificates_kid_exp (one seek per kid, not a
        // scan of the table); then per kid the expired rows, again through that index.
        let kids: Vec<Vec<u8>> = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(
                "WITH RECURSIVE k(kid) AS (
                     SELECT min(kid) FROM certificates
                     UNION ALL
                     SELECT (SELECT min(kid) FROM certificates WHERE kid > k.kid) FROM k
                     WHERE k.kid IS NOT NULL)
                 SELECT kid FROM k WHERE kid IS NOT NULL",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for kid in kids {
            loop {
                let n = self.write(|tx| {
                    Ok(tx.execute(
                        "DELETE FROM certificates WHERE id IN
                             (SELECT id FROM certificates WHERE kid = ?1 AND exp < ?2 LIMIT 5000)",
                        params![kid, cutoff],
                    )? as u64)
                })?;
                report.certificates += n;
                if n == 0 {
                    break;
                }
            }
        }
        Ok(report)
    }
}

fn lift_in(tx: &Connection, id: i64, by: &str, now: i64) -> Result<i64, StoreError> {
    let version = next_version(tx)?;
    let n = tx.execute(
        "UPDATE revocations SET lifted_by = ?2, lifted_at = ?3, removed_version = ?4
         WHERE certificate_id = ?1 AND lifted_at IS NULL",
        params![id, by, now, version],
    )?;
    if n == 0 {
        return Err(StoreError::NotRevoked);
    }
    let batches: Vec<i64> = tx
        .prepare("SELECT DISTINCT batch_id FROM batch_entries WHERE certificate_id = ?1")?
        .query_map(params![id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for b in batches {
        withdraw_batch(tx, b, now)?;
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcc::CertType;
    use crate::ledger::{Ledger, Reservation, SqliteLedger};

    /// A ledger with `n` signed certificates of kid [1;8] (the first half) and [2;8]; returns
    /// the store and the row ids.
    fn setup(n: u8, exp: i64) -> (tempfile::TempDir, SqliteLedger, RevocationStore, Vec<i64>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let ledger = SqliteLedger::open(&path).unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let r = Reservation {
                uci_hash: [i; 16],
                country_uci_hash: [i ^ 0x55; 16],
                cert_type: CertType::Test,
                kid: if i < n / 2 { [1; 8] } else { [2; 8] },
                iat: 1_000,
                exp,
                replaces: None,
            };
            let id = ledger.reserve(&r, None).unwrap();
            ledger.complete(id, &[i ^ 0xaa; 16], &[0; 64]).unwrap();
            ids.push(id.0);
        }
        let store = RevocationStore::open(&path).unwrap();
        (dir, ledger, store, ids)
    }

    #[test]
    fn revoking_twice_changes_nothing_and_versions_only_grow() {
        let (_d, _l, s, ids) = setup(4, 10_000_000_000);
        let a = s.revoke(ids[0], Reason::Fraud, "x", None, 100).unwrap();
        assert_eq!((a.version, a.already), (1, false));
        let b = s
            .revoke(ids[0], Reason::WrongPatient, "y", None, 101)
            .unwrap();
        assert_eq!((b.version, b.already), (1, true));
        assert!(matches!(
            s.revoke(999, Reason::Fraud, "x", None, 1),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            s.revoke(ids[1], Reason::Fraud, "x", Some(200), 100),
            Err(StoreError::Invalid { field: "until", .. })
        ));
        let lifted = s.lift(ids[0], "officer", 102).unwrap();
        assert_eq!(lifted, 2);
        assert!(matches!(
            s.lift(ids[0], "officer", 103),
            Err(StoreError::NotRevoked)
        ));
        // Revoked again after a lift: a new version, listed as present.
        let c = s.revoke(ids[0], Reason::Fraud, "x", None, 104).unwrap();
        assert_eq!((c.version, c.already), (3, false));
        let entries = s.list_entries(&[1; 8]).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].added, entries[0].removed), (3, None));
        assert_eq!(s.version().unwrap(), 3);
    }

    #[test]
    fn suspensions_end_on_time() {
        let (_d, _l, s, ids) = setup(2, 10_000_000_000);
        s.revoke(ids[0], Reason::Suspended, "x", Some(500), 100)
            .unwrap();
        assert_eq!(s.lift_ended_suspensions(499).unwrap(), 0);
        assert_eq!(s.lift_ended_suspensions(500).unwrap(), 1);
        let e = s.list_entries(&[1; 8]).unwrap();
        assert_eq!(e[0].removed, Some(2));
    }

    #[test]
    fn lifting_withdraws_the_batch_and_frees_the_others_for_rebatching() {
        let exp = 10_000_000_000;
        let (_d, _l, s, ids) = setup(4, exp);
        for id in &ids[..2] {
            s.revoke(*id, Reason::Fraud, "x", None, 100).unwrap();
        }
        let pending = s.unbatched(HashType::Signature, 100).unwrap();
        assert_eq!(pending.len(), 2);
        let entries: Vec<Revoked> = pending.iter().map(|(_, r)| r.clone()).collect();
        let planned = super::super::batch::plan(&entries, HashType::Signature);
        assert_eq!(planned.len(), 1);
        let members: Vec<i64> = pending.iter().map(|(id, _)| *id).collect();
        let batch = s
            .record_batch(&planned[0], &members, b"{}", "cms", 100)
            .unwrap();
        assert!(s.unbatched(HashType::Signature, 100).unwrap().is_empty());
        // Recording the same members again is refused and stores nothing.
        assert!(s
            .record_batch(&planned[0], &members, b"{}", "cms", 100)
            .is_err());
        assert_eq!(s.batches(false).unwrap().len(), 1);
        // Upload delivered: the gateway id is kept; the row is not due any more.
        let due = s.due(100, 10).unwrap();
        assert_eq!(due.len(), 1);
        s.delivered(due[0].id, Some("gw-1"), 101).unwrap();
        assert!(s.due(10_000, 10).unwrap().is_empty());
        assert!(
            s.delivered(due[0].id, Some("gw-1"), 101).is_err(),
            "delivered once only"
        );
        // Lift one: the batch is withdrawn (a deletion queued), the other entry is free again.
        s.lift(ids[0], "officer", 102).unwrap();
        let b = &s.batches(false).unwrap()[0];
        assert_eq!((b.id, b.state.as_str()), (batch, "deleted"));
        let due = s.due(102, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].kind.as_str(), due[0].gateway_id.as_deref()),
            ("delete", Some("gw-1"))
        );
        let again = s.unbatched(HashType::Signature, 102).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, ids[1]);
    }

    #[test]
    fn a_batch_withdrawn_before_upload_is_cancelled_not_deleted() {
        let (_d, _l, s, ids) = setup(2, 10_000_000_000);
        s.revoke(ids[0], Reason::Fraud, "x", None, 100).unwrap();
        let pending = s.unbatched(HashType::Signature, 100).unwrap();
        let planned = super::super::batch::plan(&[pending[0].1.clone()], HashType::Signature);
        s.record_batch(&planned[0], &[pending[0].0], b"{}", "cms", 100)
            .unwrap();
        s.lift(ids[0], "officer", 101).unwrap();
        assert!(s.due(200, 10).unwrap().is_empty(), "nothing to send");
        let st = s.status().unwrap();
        assert!(st
            .counts
            .iter()
            .any(|c| c.1 == "gateway" && c.2 == "cancelled"));
    }

    #[test]
    fn failures_retry_then_stop() {
        let (_d, _l, s, ids) = setup(2, 10_000_000_000);
        s.revoke(ids[0], Reason::Fraud, "x", None, 100).unwrap();
        assert_eq!(s.enqueue_events(&["a".into(), "b".into()], 100).unwrap(), 2);
        assert_eq!(
            s.enqueue_events(&["a".into(), "b".into()], 100).unwrap(),
            0,
            "once"
        );
        let due = s.due(100, 10).unwrap();
        s.failed(due[0].id, "http-503", Some(160)).unwrap();
        s.failed(due[1].id, "http-400", None).unwrap();
        assert!(s.due(159, 10).unwrap().is_empty());
        assert_eq!(s.due(160, 10).unwrap().len(), 1);
        let st = s.status().unwrap();
        assert_eq!(st.failures.len(), 1);
        assert_eq!(st.retrying.len(), 1);
    }

    #[test]
    fn purge_keeps_versions_growing() {
        let (_d, _l, s, ids) = setup(2, 5_000);
        s.revoke(ids[0], Reason::Fraud, "x", None, 100).unwrap();
        let r = s.purge(5_000 + 7 * 86_400 + 1, 7 * 86_400).unwrap();
        assert_eq!(r.certificates, 2);
        assert_eq!(s.version().unwrap(), 1);
        assert!(s.list_entries(&[1; 8]).unwrap().is_empty());
    }
}
