//! The SQLite ledger (embedded default). WAL journal with `synchronous=FULL`: a commit has
//! reached the disk when `COMMIT` returns.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use super::{CertificateRecord, Ledger, LedgerCounts, LedgerError, Reservation, ReservationId};
use crate::dcc::CertType;
use crate::revocation::hash::RevocationHash;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

/// A ledger in one SQLite file.
pub struct SqliteLedger {
    conn: Mutex<Connection>,
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

impl SqliteLedger {
    /// Opens (creating if needed) the database and applies migrations.
    pub fn open(path: &Path) -> Result<SqliteLedger, LedgerError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let ledger = SqliteLedger {
            conn: Mutex::new(conn),
        };
        ledger.migrate()?;
        Ok(ledger)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> Result<CertificateRecord, rusqlite::Error> {
    let t: String = r.get("cert_type")?;
    let kid: Vec<u8> = r.get("kid")?;
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
            kid: kid.try_into().map_err(|_| {
                rusqlite::Error::InvalidColumnType(0, "kid".into(), rusqlite::types::Type::Blob)
            })?,
            iat: r.get("iat")?,
            exp: r.get("exp")?,
        },
        signature_hash: sig.map(hash16).transpose()?,
        state: r.get("state")?,
    })
}

impl Ledger for SqliteLedger {
    fn reserve(&self, r: &Reservation) -> Result<ReservationId, LedgerError> {
        let conn = self.conn();
        let res = conn.execute(
            "INSERT INTO certificates (uci_hash, country_uci_hash, cert_type, kid, iat, exp, state, reserved_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'reserved', ?7)",
            params![
                &r.uci_hash[..],
                &r.country_uci_hash[..],
                r.cert_type.as_str(),
                &r.kid[..],
                r.iat,
                r.exp,
                now()
            ],
        );
        match res {
            Ok(_) => Ok(ReservationId(conn.last_insert_rowid())),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                let state: Option<String> = conn
                    .query_row(
                        "SELECT state FROM certificates WHERE uci_hash = ?1",
                        params![&r.uci_hash[..]],
                        |row| row.get(0),
                    )
                    .optional()?;
                match state {
                    Some(state) => Err(LedgerError::DuplicateUvci { state }),
                    None => Err(LedgerError::Database(
                        "constraint violation on insert".into(),
                    )),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    fn complete(
        &self,
        id: ReservationId,
        signature_hash: &RevocationHash,
    ) -> Result<(), LedgerError> {
        let n = self.conn().execute(
            "UPDATE certificates SET state = 'signed', signature_hash = ?2, signed_at = ?3
             WHERE id = ?1 AND state = 'reserved'",
            params![id.0, &signature_hash[..], now()],
        )?;
        if n == 1 {
            Ok(())
        } else {
            Err(LedgerError::NotReserved(id.0))
        }
    }

    fn release(&self, id: ReservationId) -> Result<(), LedgerError> {
        let n = self.conn().execute(
            "DELETE FROM certificates WHERE id = ?1 AND state = 'reserved'",
            params![id.0],
        )?;
        if n == 1 {
            Ok(())
        } else {
            Err(LedgerError::NotReserved(id.0))
        }
    }

    fn find_by_uci_hash(
        &self,
        h: &RevocationHash,
    ) -> Result<Option<CertificateRecord>, LedgerError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM certificates WHERE uci_hash = ?1",
                params![&h[..]],
                row_to_record,
            )
            .optional()?)
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
        }
    }

    #[test]
    fn reserve_complete_duplicate_release() {
        let dir = tempfile::tempdir().unwrap();
        let l = SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap();
        let id = l.reserve(&res(1)).unwrap();
        match l.reserve(&res(1)) {
            Err(LedgerError::DuplicateUvci { state }) => assert_eq!(state, "reserved"),
            other => panic!("expected duplicate, got {other:?}"),
        }
        l.complete(id, &[9; 16]).unwrap();
        assert!(matches!(
            l.complete(id, &[9; 16]),
            Err(LedgerError::NotReserved(_))
        ));
        match l.reserve(&res(1)) {
            Err(LedgerError::DuplicateUvci { state }) => assert_eq!(state, "signed"),
            other => panic!("expected duplicate, got {other:?}"),
        }
        let rec = l.find_by_uci_hash(&[1; 16]).unwrap().unwrap();
        assert_eq!(rec.signature_hash, Some([9; 16]));
        assert_eq!(rec.state, "signed");
        // A signed row cannot be released.
        assert!(l.release(id).is_err());
        let id2 = l.reserve(&res(2)).unwrap();
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

    #[test]
    fn survives_reopen_and_rejects_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        {
            let l = SqliteLedger::open(&p).unwrap();
            let id = l.reserve(&res(3)).unwrap();
            l.complete(id, &[1; 16]).unwrap();
        }
        let l = SqliteLedger::open(&p).unwrap();
        assert!(l.find_by_uci_hash(&[3; 16]).unwrap().is_some());
        let mut bad = res(4);
        bad.exp = bad.iat; // exp must be after iat
        assert!(matches!(l.reserve(&bad), Err(LedgerError::Database(_))));
    }
}
