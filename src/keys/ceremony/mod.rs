//! Key ceremonies for security officers: managed keys in the HSM, their states, pending
//! two-person operations and the audit log, all in one SQLite "control" database.
//!
//! Every operation writes its audit entry in the same transaction as its effect on the
//! database; an HSM effect (a generated key) is undone when that transaction fails, so an
//! operation without its audit entry has no effect (fail closed). Refusals are audited too.

mod generate;
mod import;
mod lifecycle;
mod settings;
mod trust;

pub use settings::{Csca, KeySettings};
pub use trust::AUDIT_ANCHOR_LABEL;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{json, Value};

use super::dsc::SignerSwitch;
use super::state::KeyState;
use crate::audit::{self, Record};
use crate::dcc::CertType;
use crate::hsm::{HsmError, KeyHandle, Token};
use crate::ledger::Ledger;

/// Why a key operation was refused or failed. Each variant has a stable code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyOpError {
    /// A parameter is missing or malformed (`2-60-7001`).
    #[error("{field}: {message}")]
    Invalid {
        /// The parameter.
        field: &'static str,
        /// The rule.
        message: String,
    },
    /// No such key or operation (`2-60-7002`).
    #[error("{0}")]
    NotFound(String),
    /// The key is not in a state that allows this (`2-60-7003`).
    #[error("{label}: {message}")]
    State {
        /// The key.
        label: String,
        /// Current state and allowed next step.
        message: String,
    },
    /// The requesting officer tried to approve their own operation (`2-60-7004`).
    #[error("operation {0} was requested by you; a second, different officer must approve it")]
    SelfApproval(String),
    /// The operation's approval window passed (`2-60-7005`).
    #[error("operation {0} expired without approval; request it again")]
    Expired(String),
    /// The operation was already executed or failed (`2-60-7006`).
    #[error("operation {id} is {state}; it cannot be approved again")]
    Done {
        /// Operation id.
        id: String,
        /// `executed` or `failed`.
        state: String,
    },
    /// An imported certificate failed a check (`2-60-7010` … `2-60-7017`).
    #[error("certificate refused: {message} [{code}]")]
    Certificate {
        /// Stable code of the check.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The label is already used on the token or in the registry (`2-60-7020`).
    #[error("label {0:?} already exists")]
    LabelExists(String),
    /// The HSM failed (`2-60-5003`).
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The audit entry could not be written, so nothing was done (`2-60-7090`).
    #[error("audit log: {0}; the operation was not carried out")]
    Audit(String),
    /// The control database failed (`2-60-5004`).
    #[error("control database: {0}")]
    Database(String),
    /// The audit log no longer holds the newest checkpoint the token's anchor names: its
    /// newest checkpoints were deleted, or the database replaced by an older copy
    /// (`2-60-7091`). No checkpoint is written over it.
    #[error("the audit log does not match the token's anchor: {0}; check it with `dccsign audit verify --with-token`, and see docs/operations.md (the audit anchor)")]
    AuditAnchor(String),
}

impl KeyOpError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            KeyOpError::Invalid { .. } => "2-60-7001",
            KeyOpError::NotFound(_) => "2-60-7002",
            KeyOpError::State { .. } => "2-60-7003",
            KeyOpError::SelfApproval(_) => "2-60-7004",
            KeyOpError::Expired(_) => "2-60-7005",
            KeyOpError::Done { .. } => "2-60-7006",
            KeyOpError::Certificate { code, .. } => code,
            KeyOpError::LabelExists(_) => "2-60-7020",
            KeyOpError::Hsm(_) => "2-60-5003",
            KeyOpError::Audit(_) => "2-60-7090",
            KeyOpError::Database(_) => "2-60-5004",
            KeyOpError::AuditAnchor(_) => "2-60-7091",
        }
    }
}

impl From<rusqlite::Error> for KeyOpError {
    fn from(e: rusqlite::Error) -> Self {
        KeyOpError::Database(e.to_string())
    }
}

fn refuse(code: &'static str, message: impl Into<String>) -> KeyOpError {
    KeyOpError::Certificate {
        code,
        message: message.into(),
    }
}

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE managed_keys (
    label        TEXT    PRIMARY KEY,
    key_id       BLOB    NOT NULL,
    role         TEXT    NOT NULL CHECK (role IN ('dsc', 'upload')),
    types        TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    public_key   BLOB    NOT NULL,
    certificate  BLOB,
    kid          BLOB    UNIQUE,
    not_before   INTEGER,
    not_after    INTEGER,
    created_at   INTEGER NOT NULL,
    certified_at INTEGER,
    published_at INTEGER,
    activated_at INTEGER,
    usage_end    INTEGER,
    retired_at   INTEGER,
    destroyed_at INTEGER
);
CREATE TABLE operations (
    id          TEXT    PRIMARY KEY,
    operation   TEXT    NOT NULL,
    parameters  TEXT    NOT NULL,
    requester   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'executed', 'failed')),
    approver    TEXT,
    executed_at INTEGER,
    result      TEXT
);
"#];

/// A key managed through ceremonies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedKey {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`.
    pub key_id: Vec<u8>,
    /// `dsc` (signs certificates) or `upload` (signs EU gateway packages).
    pub role: String,
    /// Certificate types it is for.
    pub types: Vec<CertType>,
    /// Where it is in its life.
    pub state: KeyState,
    /// SEC1 public key read from the token at generation.
    pub public_key: Vec<u8>,
    /// DER of the imported certificate.
    pub certificate: Option<Vec<u8>>,
    /// kid of the certificate.
    pub kid: Option<[u8; 8]>,
    /// Certificate validity (Unix seconds).
    pub not_before: Option<i64>,
    /// Certificate validity end (Unix seconds).
    pub not_after: Option<i64>,
    /// When it was generated.
    pub created_at: i64,
    /// When its upload package was made.
    pub published_at: Option<i64>,
    /// When it started signing.
    pub activated_at: Option<i64>,
    /// End of the private key usage period (set at activation).
    pub usage_end: Option<i64>,
}

/// A two-person operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// `OP-` + 16 hex digits.
    pub id: String,
    /// e.g. `keys.generate`.
    pub operation: String,
    /// Exact parameters.
    pub parameters: Value,
    /// Officer who asked.
    pub requester: String,
    /// When it was asked.
    pub created_at: i64,
    /// Last moment it may be approved.
    pub expires_at: i64,
    /// `pending`, `executed` or `failed`.
    pub state: String,
    /// Officer who approved.
    pub approver: Option<String>,
    /// Outcome once executed.
    pub result: Option<String>,
}

impl Operation {
    /// The key label the operation is about.
    pub fn label(&self) -> String {
        self.parameters["label"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// The key lifecycle over the token and the control database.
pub struct KeyManager {
    db: Mutex<Connection>,
    token: Arc<Token>,
    settings: KeySettings,
    switch: Option<Arc<dyn SignerSwitch>>,
    ledger: Option<Arc<dyn Ledger>>,
    audit_key: Option<KeyHandle>,
    executors: std::collections::HashMap<String, OperationExecutor>,
}

/// Carries out an approved two-person operation of another module (parameters as requested, the
/// approving officer, now) and returns the result recorded in the audit log. Must be
/// idempotent: approving again after a crash between its effect and the audit entry must not
/// do it twice.
pub type OperationExecutor =
    Arc<dyn Fn(&Value, &str, i64) -> Result<String, String> + Send + Sync + 'static>;

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("environment", &self.settings.environment)
            .finish_non_exhaustive()
    }
}

fn valid_label(label: &str) -> Result<(), KeyOpError> {
    if label.is_empty()
        || label.len() > 64
        || !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(KeyOpError::Invalid {
            field: "label",
            message: "must be 1-64 characters of A-Z a-z 0-9 - _ .".into(),
        });
    }
    Ok(())
}

fn types_str(types: &[CertType]) -> String {
    types
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_types(s: &str) -> Vec<CertType> {
    s.split(',').filter_map(|t| t.parse().ok()).collect()
}

fn row_to_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<ManagedKey> {
    let state: String = r.get("state")?;
    let kid: Option<Vec<u8>> = r.get("kid")?;
    Ok(ManagedKey {
        label: r.get("label")?,
        key_id: r.get("key_id")?,
        role: r.get("role")?,
        types: parse_types(&r.get::<_, String>("types")?),
        state: state.parse().unwrap_or(KeyState::Destroyed),
        public_key: r.get("public_key")?,
        certificate: r.get("certificate")?,
        kid: kid.and_then(|k| k.try_into().ok()),
        not_before: r.get("not_before")?,
        not_after: r.get("not_after")?,
        created_at: r.get("created_at")?,
        published_at: r.get("published_at")?,
        activated_at: r.get("activated_at")?,
        usage_end: r.get("usage_end")?,
    })
}

fn row_to_op(r: &rusqlite::Row<'_>) -> rusqlite::Result<Operation> {
    let params: String = r.get("parameters")?;
    Ok(Operation {
        id: r.get("id")?,
        operation: r.get("operation")?,
        parameters: serde_json::from_str(&params).unwrap_or(Value::Null),
        requester: r.get("requester")?,
        created_at: r.get("created_at")?,
        expires_at: r.get("expires_at")?,
        state: r.get("state")?,
        approver: r.get("approver")?,
        result: r.get("result")?,
    })
}

impl KeyManager {
    /// Opens (creating if needed) the control database.
    pub fn open(
        path: &Path,
        token: Arc<Token>,
        settings: KeySettings,
    ) -> Result<KeyManager, KeyOpError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let all: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| m.to_string())
            .chain(std::iter::once(audit::SCHEMA.to_string()))
            .collect();
        if version > all.len() {
            return Err(KeyOpError::Database(format!(
                "control database version {version} is newer than this dccsign"
            )));
        }
        for (i, sql) in all.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(KeyManager {
            db: Mutex::new(conn),
            token,
            settings,
            switch: None,
            ledger: None,
            audit_key: None,
            executors: Default::default(),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends the entry of an operation that took effect outside the control database (a
    /// single revocation, lift or replacement in the ledger), by `officer` (the caller's
    /// identity) with `result`. No transaction spans both databases, so the entry follows the
    /// effect, as for an approved operation carried out in the ledger; the caller reports an
    /// entry that could not be written.
    pub fn record_external(
        &self,
        officer: &str,
        operation: &str,
        parameters: Value,
        result: &str,
        now: i64,
    ) -> Result<(), KeyOpError> {
        let record = Record {
            officer,
            operation,
            parameters,
            approvals: &[],
            result,
        };
        self.audited(record, now, |_| Ok(()))
    }

    /// Runs `effect` and appends the audit entry in one transaction; fails (and rolls back)
    /// when the entry cannot be written.
    fn audited<T>(
        &self,
        record: Record<'_>,
        now: i64,
        effect: impl FnOnce(&Transaction<'_>) -> Result<T, KeyOpError>,
    ) -> Result<T, KeyOpError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let out = effect(&tx)?;
        audit::append(&tx, &record, now).map_err(|e| KeyOpError::Audit(e.to_string()))?;
        tx.commit()
            .map_err(|e| KeyOpError::Audit(format!("commit: {e}")))?;
        Ok(out)
    }

    /// Passes `checked` through; a refusal is first recorded in the audit log (as `operation`
    /// by `officer`).
    fn audit_refusal<T>(
        &self,
        officer: &str,
        operation: &str,
        parameters: &Value,
        checked: Result<T, KeyOpError>,
        now: i64,
    ) -> Result<T, KeyOpError> {
        checked.map_err(|e| self.refused(officer, operation, parameters.clone(), e, now))
    }

    /// Records a refusal in the audit log and returns it.
    fn refused(
        &self,
        officer: &str,
        operation: &str,
        parameters: Value,
        e: KeyOpError,
        now: i64,
    ) -> KeyOpError {
        let result = format!("refused: {e} [{}]", e.code());
        let logged = self.audited(
            Record {
                officer,
                operation,
                parameters,
                approvals: &[],
                result: &result,
            },
            now,
            |_| Ok(()),
        );
        match logged {
            Ok(()) => e,
            Err(audit_error) => audit_error,
        }
    }

    /// The key, when `to` may follow its state (the error names the state and the next step).
    fn advance(&self, label: &str, to: KeyState) -> Result<ManagedKey, KeyOpError> {
        let k = self.key(label)?;
        k.state.check(to).map_err(|message| KeyOpError::State {
            label: label.into(),
            message,
        })?;
        Ok(k)
    }

    fn key(&self, label: &str) -> Result<ManagedKey, KeyOpError> {
        self.db()
            .query_row(
                "SELECT * FROM managed_keys WHERE label = ?1",
                [label],
                row_to_key,
            )
            .optional()?
            .ok_or_else(|| KeyOpError::NotFound(format!("no managed key {label:?}")))
    }

    /// All managed keys.
    pub fn list(&self) -> Result<Vec<ManagedKey>, KeyOpError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT * FROM managed_keys ORDER BY created_at, label")?;
        let keys = stmt
            .query_map([], row_to_key)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    /// Operations still waiting for approval (expired ones are shown as such by their time).
    pub fn pending(&self) -> Result<Vec<Operation>, KeyOpError> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT * FROM operations WHERE state = 'pending' ORDER BY created_at")?;
        let ops = stmt
            .query_map([], row_to_op)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ops)
    }

    fn request(
        &self,
        officer: &str,
        operation: &str,
        parameters: Value,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let mut b = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        let op = Operation {
            id: format!("OP-{}", hex::encode(b)),
            operation: operation.to_string(),
            parameters: parameters.clone(),
            requester: officer.to_string(),
            created_at: now,
            expires_at: now + self.settings.operation_ttl.whole_seconds(),
            state: "pending".into(),
            approver: None,
            result: None,
        };
        let result = format!("pending {} (needs a second officer)", op.id);
        self.audited(
            Record {
                officer,
                operation: &format!("{operation}.request"),
                parameters,
                approvals: &[],
                result: &result,
            },
            now,
            |tx| {
                tx.execute(
                    "INSERT INTO operations (id, operation, parameters, requester, created_at, expires_at, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending')",
                    params![op.id, op.operation, op.parameters.to_string(), op.requester, op.created_at, op.expires_at],
                )?;
                Ok(())
            },
        )?;
        Ok(op)
    }

    /// Second half of a two-person operation: another officer approves, and it is executed.
    pub fn approve(&self, officer: &str, id: &str, now: i64) -> Result<Operation, KeyOpError> {
        let params = json!({"operation": id});
        let op = self
            .db()
            .query_row("SELECT * FROM operations WHERE id = ?1", [id], row_to_op)
            .optional()?;
        let checked = match op {
            None => Err(KeyOpError::NotFound(format!("no operation {id}"))),
            Some(op) if op.state != "pending" => Err(KeyOpError::Done {
                id: id.into(),
                state: op.state,
            }),
            Some(op) if now > op.expires_at => Err(KeyOpError::Expired(id.into())),
            Some(op) if op.requester == officer => Err(KeyOpError::SelfApproval(id.into())),
            Some(op) => Ok(op),
        };
        let op = self.audit_refusal(officer, "keys.approve", &params, checked, now)?;
        match op.operation.as_str() {
            "keys.generate" => self.execute_generate(&op, officer, now),
            "keys.activate" => self.execute_activate(&op, officer, now),
            "keys.retire" => self.execute_retire(&op, officer, now),
            "keys.destroy" => self.execute_destroy(&op, officer, now),
            other if self.executors.contains_key(other) => self.execute_external(&op, officer, now),
            other => Err(KeyOpError::Invalid {
                field: "operation",
                message: format!("unknown operation kind {other}"),
            }),
        }
    }

    /// Operations of other modules (e.g. `revocation.bulk`) that a second officer approves
    /// like key operations, audited the same way; `executor` carries one out on approval.
    pub fn with_operation(mut self, operation: &str, executor: OperationExecutor) -> Self {
        self.executors.insert(operation.to_string(), executor);
        self
    }

    /// Asks for a two-person operation registered with [`KeyManager::with_operation`].
    pub fn request_operation(
        &self,
        officer: &str,
        operation: &str,
        parameters: Value,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        if !self.executors.contains_key(operation) {
            return Err(KeyOpError::Invalid {
                field: "operation",
                message: format!("{operation} is not an operation this daemon carries out"),
            });
        }
        self.request(officer, operation, parameters, now)
    }

    fn execute_external(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let executor = &self.executors[&op.operation];
        let checked = executor(&op.parameters, approver, now).map_err(KeyOpError::Database);
        let result = self.audit_refusal(approver, &op.operation, &op.parameters, checked, now)?;
        self.finish(op, approver, now, &format!("ok: {result}"), |_| Ok(()))
    }

    fn finish(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
        result: &str,
        update: impl FnOnce(&Transaction<'_>) -> Result<(), KeyOpError>,
    ) -> Result<Operation, KeyOpError> {
        let approvals = vec![approver.to_string()];
        self.audited(
            Record {
                officer: &op.requester,
                operation: &op.operation,
                parameters: op.parameters.clone(),
                approvals: &approvals,
                result,
            },
            now,
            |tx| {
                update(tx)?;
                tx.execute(
                    "UPDATE operations SET state = 'executed', approver = ?2, executed_at = ?3, result = ?4
                     WHERE id = ?1 AND state = 'pending'",
                    params![op.id, approver, now, result],
                )?;
                Ok(())
            },
        )?;
        let mut done = op.clone();
        done.state = "executed".into();
        done.approver = Some(approver.into());
        done.result = Some(result.to_string());
        Ok(done)
    }
}
