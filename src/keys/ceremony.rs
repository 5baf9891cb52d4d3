//! Key ceremonies for security officers: managed keys in the HSM, their states, pending
//! two-person operations and the audit log, all in one SQLite "control" database.
//!
//! Every operation writes its audit entry in the same transaction as its effect on the
//! database; an HSM effect (a generated key) is undone when that transaction fails, so an
//! operation without its audit entry has no effect (fail closed). Refusals are audited too.

use std::path::Path;
use std::sync::{Arc, Mutex};

use der::{Decode, DecodePem, Encode, EncodePem};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{json, Value};
use x509_cert::Certificate;

use super::dsc::{ActiveDsc, Dsc, SignerSwitch};
use super::state::KeyState;
use crate::audit::{self, Record};
use crate::config::{Config, Environment};
use crate::dcc::CertType;
use crate::hsm::{HsmError, KeyHandle, Token, TokenSigner};
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

/// Signs checkpoints with the audit key inside the token.
struct HsmCheckpointSigner<'a> {
    token: &'a Token,
    key: &'a KeyHandle,
}

impl audit::CheckpointSigner for HsmCheckpointSigner<'_> {
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], audit::AuditError> {
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(message).into();
        self.token
            .sign_digest(self.key, &digest)
            .map_err(|e| audit::AuditError::Sign(e.to_string()))
    }
}

/// A CSCA that may certify our DSCs.
#[derive(Debug, Clone)]
pub struct Csca {
    /// Where it came from (for messages).
    pub name: String,
    /// The certificate.
    pub cert: Certificate,
    /// Its subject key identifier.
    pub ski: Vec<u8>,
    /// Its P-256 public key.
    pub key: p256::PublicKey,
    /// The environment it is for.
    pub environment: Environment,
}

/// Settings of the key lifecycle, from `[keys]`.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// This deployment's environment.
    pub environment: Environment,
    /// CSCAs that may certify our DSCs.
    pub cscas: Vec<Csca>,
    /// Wait between publish and activate.
    pub propagation_delay: time::Duration,
    /// Private key usage period from activation.
    pub usage_period: time::Duration,
    /// How long a pending operation may be approved.
    pub operation_ttl: time::Duration,
    /// DSCs configured statically (`[[dsc]]`): label and kid, for kid collisions.
    pub configured: Vec<(String, [u8; 8])>,
    /// The same DSCs with their certificates and types, for the trust list.
    pub configured_dscs: Vec<(Dsc, Vec<CertType>)>,
    /// Issuing country (trust list).
    pub country: String,
}

fn ext<'a>(cert: &'a Certificate, oid: &str) -> Option<&'a [u8]> {
    cert.tbs_certificate
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id.to_string() == oid)
        .map(|e| e.extn_value.as_bytes())
}

impl KeySettings {
    /// Reads the CSCAs and the configured DSCs' kids.
    pub fn from_config(cfg: &Config) -> Result<KeySettings, KeyOpError> {
        let mut cscas = Vec::new();
        for c in &cfg.keys.csca {
            let path = cfg.resolve(&c.certificate);
            let name = path.display().to_string();
            let bad = |m: String| KeyOpError::Invalid {
                field: "keys.csca",
                message: format!("{name}: {m}"),
            };
            let pem = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
            let cert = Certificate::from_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
            let ski = ext(&cert, "2.5.29.14")
                .and_then(|v| x509_cert::ext::pkix::SubjectKeyIdentifier::from_der(v).ok())
                .map(|s| s.0.as_bytes().to_vec())
                .ok_or_else(|| bad("no subject key identifier".into()))?;
            let key = p256::PublicKey::from_sec1_bytes(
                cert.tbs_certificate
                    .subject_public_key_info
                    .subject_public_key
                    .raw_bytes(),
            )
            .map_err(|_| bad("only P-256 CSCAs are supported".into()))?;
            cscas.push(Csca {
                name,
                cert,
                ski,
                key,
                environment: c.environment,
            });
        }
        let mut configured = Vec::new();
        let mut configured_dscs = Vec::new();
        for d in &cfg.dscs {
            let path = cfg.resolve(&d.certificate);
            if let Ok(dsc) = Dsc::from_pem_file(&d.key, &path) {
                configured.push((d.key.clone(), dsc.kid));
                configured_dscs.push((dsc, d.types.clone()));
            }
        }
        Ok(KeySettings {
            environment: cfg.keys.environment,
            cscas,
            propagation_delay: time::Duration::hours(cfg.keys.propagation_delay_hours.into()),
            usage_period: time::Duration::days(cfg.keys.usage_period_days.into()),
            operation_ttl: time::Duration::hours(cfg.keys.operation_ttl_hours.into()),
            configured,
            configured_dscs,
            country: cfg.issuer.country.clone(),
        })
    }
}

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

/// The key lifecycle over the token and the control database.
pub struct KeyManager {
    db: Mutex<Connection>,
    token: Arc<Token>,
    settings: KeySettings,
    switch: Option<Arc<dyn SignerSwitch>>,
    ledger: Option<Arc<dyn Ledger>>,
    audit_key: Option<KeyHandle>,
}

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
        })
    }

    /// Checkpoints are signed by `key` (in the token).
    pub fn with_audit_key(mut self, key: KeyHandle) -> Self {
        self.audit_key = Some(key);
        self
    }

    /// Writes a signed checkpoint: entry count and head hash, with the certificates recorded
    /// per DSC since the previous checkpoint. `Ok(None)` when no audit key is configured.
    pub fn checkpoint(&self, now: i64) -> Result<Option<i64>, KeyOpError> {
        let Some(key) = &self.audit_key else {
            return Ok(None);
        };
        let db = self.db();
        let last: Option<String> = db
            .query_row(
                "SELECT signed FROM audit_checkpoints ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let after = last
            .and_then(|j| serde_json::from_str::<Value>(&j).ok())
            .and_then(|v| v["last_ledger_row"].as_i64())
            .unwrap_or(0);
        let (upto, per_kid) = match &self.ledger {
            Some(l) => l
                .recorded_since(after)
                .map_err(|e| KeyOpError::Database(format!("ledger: {e}")))?,
            None => (after, vec![]),
        };
        let counts: serde_json::Map<String, Value> = per_kid
            .into_iter()
            .map(|(kid, n)| (hex::encode(kid), json!(n)))
            .collect();
        let extra = json!({"last_ledger_row": upto, "certificates_since_previous": counts});
        let signer = HsmCheckpointSigner {
            token: &self.token,
            key,
        };
        audit::checkpoint(&db, &signer, &extra, now)
            .map(Some)
            .map_err(|e| KeyOpError::Audit(e.to_string()))
    }

    /// Destroy and the trust list ask `ledger` when a DSC's last certificate expires.
    pub fn with_ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Certificates recorded in the ledger per kid.
    pub fn signed_counts(&self) -> Result<std::collections::HashMap<[u8; 8], u64>, KeyOpError> {
        match &self.ledger {
            Some(l) => Ok(l
                .recorded_since(0)
                .map_err(|e| KeyOpError::Database(format!("ledger: {e}")))?
                .1
                .into_iter()
                .collect()),
            None => Ok(Default::default()),
        }
    }

    /// The latest expiry of what `kid` signed (from the ledger).
    pub fn last_expiry(&self, kid: &[u8; 8]) -> Result<Option<i64>, KeyOpError> {
        match &self.ledger {
            Some(l) => l
                .last_expiry(kid)
                .map_err(|e| KeyOpError::Database(format!("ledger: {e}"))),
            None => Err(KeyOpError::Database("no ledger to ask".into())),
        }
    }

    /// Activation will switch `switch`'s signers (the issuer's).
    pub fn with_switch(mut self, switch: Arc<dyn SignerSwitch>) -> Self {
        self.switch = Some(switch);
        self
    }

    /// The active managed DSCs, ready to sign (for the issuer at start-up).
    pub fn active_signers(&self) -> Result<Vec<Arc<ActiveDsc>>, KeyOpError> {
        self.list()?
            .into_iter()
            .filter(|k| k.role == "dsc" && k.state == KeyState::Active)
            .map(|k| self.active_dsc(&k))
            .collect()
    }

    fn active_dsc(&self, k: &ManagedKey) -> Result<Arc<ActiveDsc>, KeyOpError> {
        let der = k.certificate.as_deref().unwrap_or_default();
        let dsc = Dsc::from_der(&k.label, der).map_err(|e| KeyOpError::State {
            label: k.label.clone(),
            message: format!("its stored certificate is unusable: {e}"),
        })?;
        let key = self.token.find_key(&k.label)?;
        Ok(Arc::new(ActiveDsc {
            dsc,
            key,
            types: k.types.clone(),
            usage_end: k
                .usage_end
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()),
        }))
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
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

    /// First half of a two-person `generate`: checks the parameters and records a pending
    /// operation for another officer to approve.
    pub fn request_generate(
        &self,
        officer: &str,
        label: &str,
        role: &str,
        types: &[CertType],
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let params = json!({"label": label, "role": role, "types": types_str(types)});
        let checked = valid_label(label)
            .and_then(|_| match (role, types.is_empty()) {
                ("dsc", false) | ("upload", true) => Ok(()),
                ("dsc", true) => Err(KeyOpError::Invalid {
                    field: "types",
                    message: "a DSC names at least one of test, vaccination, recovery".into(),
                }),
                ("upload", false) => Err(KeyOpError::Invalid {
                    field: "types",
                    message: "an upload key signs no certificates: give no types".into(),
                }),
                _ => Err(KeyOpError::Invalid {
                    field: "role",
                    message: "must be dsc or upload".into(),
                }),
            })
            .and_then(|_| self.label_is_new(label));
        if let Err(e) = checked {
            return Err(self.refused(officer, "keys.generate", params, e, now));
        }
        self.request(officer, "keys.generate", params, now)
    }

    fn label_is_new(&self, label: &str) -> Result<(), KeyOpError> {
        let known = self.key(label).is_ok()
            || self.settings.configured.iter().any(|(l, _)| l == label)
            || self.token.find_key(label).is_ok();
        if known {
            Err(KeyOpError::LabelExists(label.to_string()))
        } else {
            Ok(())
        }
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
        let op = match checked {
            Ok(op) => op,
            Err(e) => return Err(self.refused(officer, "keys.approve", params, e, now)),
        };
        match op.operation.as_str() {
            "keys.generate" => self.execute_generate(&op, officer, now),
            "keys.activate" => self.execute_activate(&op, officer, now),
            "keys.retire" => self.execute_retire(&op, officer, now),
            "keys.destroy" => self.execute_destroy(&op, officer, now),
            other => Err(KeyOpError::Invalid {
                field: "operation",
                message: format!("unknown operation kind {other}"),
            }),
        }
    }

    fn execute_generate(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.parameters["label"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let types = parse_types(op.parameters["types"].as_str().unwrap_or_default());
        let role = op.parameters["role"].as_str().unwrap_or("dsc").to_string();
        // The label may have been taken since the request.
        if let Err(e) = self.label_is_new(&label) {
            return Err(self.refused(approver, "keys.generate", op.parameters.clone(), e, now));
        }
        let key: KeyHandle = self.token.generate_p256(&label)?;
        let public = p256::EncodedPoint::from(key.public_key).as_bytes().to_vec();
        let result = format!("ok: generated, key id {}", hex::encode(&key.id));
        let written = self.finish(op, approver, now, &result, |tx| {
            tx.execute(
                "INSERT INTO managed_keys (label, key_id, role, types, state, public_key, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'generated', ?5, ?6)",
                params![label, key.id, role, types_str(&types), public, now],
            )?;
            Ok(())
        });
        if written.is_err() {
            // No audit entry, no key: undo the HSM effect.
            if let Err(d) = self.token.destroy_key_pair(&key) {
                tracing::error!(label = %label, error = %d, "could not remove a key whose audit entry failed");
            }
        }
        written
    }

    /// A PKCS#10 request for a generated key, signed inside the token (PEM).
    pub fn csr(
        &self,
        officer: &str,
        label: &str,
        subject: &str,
        now: i64,
    ) -> Result<String, KeyOpError> {
        let params = json!({"label": label, "subject": subject});
        let built = self.build_csr(label, subject);
        match built {
            Ok(pem) => self.audited(
                Record {
                    officer,
                    operation: "keys.csr",
                    parameters: params,
                    approvals: &[],
                    result: "ok",
                },
                now,
                |_| Ok(pem),
            ),
            Err(e) => Err(self.refused(officer, "keys.csr", params, e, now)),
        }
    }

    fn build_csr(&self, label: &str, subject: &str) -> Result<String, KeyOpError> {
        use std::str::FromStr;
        let k = self.key(label)?;
        if k.state != KeyState::Generated {
            return Err(KeyOpError::State {
                label: label.into(),
                message: format!(
                    "the key is {}; a CSR is made for a generated key (allowed next step: {})",
                    k.state,
                    k.state.next_step()
                ),
            });
        }
        let name = x509_cert::name::Name::from_str(subject).map_err(|e| KeyOpError::Invalid {
            field: "subject",
            message: format!("not an RFC 4514 name: {e}"),
        })?;
        let handle = self.token.find_key(label)?;
        let signer = TokenSigner::new(&self.token, &handle);
        let req = x509_cert::builder::RequestBuilder::new(name, &signer)
            .and_then(|b| {
                use x509_cert::builder::Builder;
                b.build::<p256::ecdsa::DerSignature>()
            })
            .map_err(|e| KeyOpError::Hsm(HsmError::Wrapper(format!("CSR: {e}"))))?;
        req.to_pem(der::pem::LineEnding::LF)
            .map_err(|e| KeyOpError::Database(format!("CSR encoding: {e}")))
    }

    /// Imports the CSCA-signed certificate of a generated key after every check; the key
    /// becomes `certified`.
    pub fn import_cert(
        &self,
        officer: &str,
        label: &str,
        pem_or_der: &[u8],
        now: i64,
    ) -> Result<ManagedKey, KeyOpError> {
        let checked = self.check_certificate(label, pem_or_der, now);
        let params = json!({
            "label": label,
            "certificate_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(pem_or_der)),
        });
        let (key, dsc) = match checked {
            Ok(v) => v,
            Err(e) => return Err(self.refused(officer, "keys.import-cert", params, e, now)),
        };
        let result = format!("ok: certified, kid {}", hex::encode(dsc.kid));
        self.audited(
            Record {
                officer,
                operation: "keys.import-cert",
                parameters: params,
                approvals: &[],
                result: &result,
            },
            now,
            |tx| {
                let n = tx.execute(
                    "UPDATE managed_keys SET state = 'certified', certificate = ?2, kid = ?3,
                        not_before = ?4, not_after = ?5, certified_at = ?6
                     WHERE label = ?1 AND state = 'generated'",
                    params![
                        label,
                        dsc.cert_der,
                        &dsc.kid[..],
                        dsc.not_before.unix_timestamp(),
                        dsc.not_after.unix_timestamp(),
                        now
                    ],
                )?;
                if n != 1 {
                    return Err(KeyOpError::State {
                        label: label.into(),
                        message: "the key changed state meanwhile".into(),
                    });
                }
                Ok(())
            },
        )?;
        let _ = key;
        self.key(label)
    }

    /// Builds the EU gateway upload package of a certified DSC (base64 of CMS SignedData signed
    /// by the certified upload key); the DSC becomes `published`.
    pub fn publish(&self, officer: &str, label: &str, now: i64) -> Result<String, KeyOpError> {
        use base64::Engine;
        let params = json!({"label": label});
        let built = self.upload_package(label);
        let package = match built {
            Ok(p) => p,
            Err(e) => return Err(self.refused(officer, "keys.publish", params, e, now)),
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(&package);
        let result = format!(
            "ok: published, package sha256 {}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&package))
        );
        self.audited(
            Record {
                officer,
                operation: "keys.publish",
                parameters: params,
                approvals: &[],
                result: &result,
            },
            now,
            |tx| {
                tx.execute(
                    "UPDATE managed_keys SET state = 'published', published_at = ?2
                     WHERE label = ?1 AND state = 'certified'",
                    params![label, now],
                )?;
                Ok(())
            },
        )?;
        Ok(b64)
    }

    fn upload_package(&self, label: &str) -> Result<Vec<u8>, KeyOpError> {
        let k = self.key(label)?;
        if k.role != "dsc" {
            return Err(KeyOpError::Invalid {
                field: "label",
                message: "only DSCs are published; the upload key signs the package".into(),
            });
        }
        k.state
            .check(KeyState::Published)
            .map_err(|message| KeyOpError::State {
                label: label.into(),
                message,
            })?;
        let upload = self
            .list()?
            .into_iter()
            .find(|u| u.role == "upload" && u.state == KeyState::Certified)
            .ok_or_else(|| KeyOpError::State {
                label: label.into(),
                message: "no certified upload key: generate one with --role upload, then csr and import-cert".into(),
            })?;
        let upload_cert = Certificate::from_der(upload.certificate.as_deref().unwrap_or_default())
            .map_err(|e| KeyOpError::Database(format!("stored upload certificate: {e}")))?;
        let handle = self.token.find_key(&upload.label)?;
        super::publish::signed_data(
            &self.token,
            &handle,
            &upload_cert,
            k.certificate.as_deref().unwrap_or_default(),
        )
        .map_err(|e| KeyOpError::Hsm(HsmError::Wrapper(e.to_string())))
    }

    /// Two-person: asks to activate a published DSC once the propagation delay has passed.
    pub fn request_activate(
        &self,
        officer: &str,
        label: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let params = json!({"label": label});
        if let Err(e) = self.activatable(label, now) {
            return Err(self.refused(officer, "keys.activate", params, e, now));
        }
        self.request(officer, "keys.activate", params, now)
    }

    fn activatable(&self, label: &str, now: i64) -> Result<ManagedKey, KeyOpError> {
        let k = self.key(label)?;
        k.state
            .check(KeyState::Active)
            .map_err(|message| KeyOpError::State {
                label: label.into(),
                message,
            })?;
        let from = k.published_at.unwrap_or(now) + self.settings.propagation_delay.whole_seconds();
        if now < from {
            return Err(KeyOpError::State {
                label: label.into(),
                message: format!(
                    "published {} s ago; verifiers need the propagation delay of {} h: activation is allowed from {}",
                    now - k.published_at.unwrap_or(now),
                    self.settings.propagation_delay.whole_hours(),
                    time::OffsetDateTime::from_unix_timestamp(from)
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                ),
            });
        }
        Ok(k)
    }

    fn execute_activate(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.parameters["label"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let k = match self.activatable(&label, now) {
            Ok(k) => k,
            Err(e) => {
                return Err(self.refused(approver, "keys.activate", op.parameters.clone(), e, now))
            }
        };
        let mut active = k.clone();
        active.usage_end = Some(now + self.settings.usage_period.whole_seconds());
        let signer = self.active_dsc(&active)?;
        // Predecessors whose every type the new key takes over stop signing: retired.
        let predecessors: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|o| {
                o.role == "dsc"
                    && o.state == KeyState::Active
                    && o.types.iter().all(|t| k.types.contains(t))
            })
            .map(|o| o.label)
            .collect();
        let result = format!(
            "ok: active until {}; retired: [{}]",
            active.usage_end.unwrap_or_default(),
            predecessors.join(", ")
        );
        let done = self.finish(op, approver, now, &result, |tx| {
            for p in &predecessors {
                tx.execute(
                    "UPDATE managed_keys SET state = 'retired', retired_at = ?2 WHERE label = ?1",
                    params![p, now],
                )?;
            }
            tx.execute(
                "UPDATE managed_keys SET state = 'active', activated_at = ?2, usage_end = ?3
                 WHERE label = ?1 AND state = 'published'",
                params![label, now, active.usage_end],
            )?;
            Ok(())
        })?;
        // Durable and audited: now new requests of these types go to the new key.
        if let Some(s) = &self.switch {
            s.switch_to(signer);
        }
        Ok(done)
    }

    /// Two-person: asks to retire an active DSC (it signs nothing more).
    pub fn request_retire(
        &self,
        officer: &str,
        label: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let params = json!({"label": label});
        let checked = self.key(label).and_then(|k| {
            k.state
                .check(KeyState::Retired)
                .map_err(|message| KeyOpError::State {
                    label: label.into(),
                    message,
                })
        });
        if let Err(e) = checked {
            return Err(self.refused(officer, "keys.retire", params, e, now));
        }
        self.request(officer, "keys.retire", params, now)
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

    fn execute_retire(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.parameters["label"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let checked = self.key(&label).and_then(|k| {
            k.state
                .check(KeyState::Retired)
                .map_err(|message| KeyOpError::State {
                    label: label.clone(),
                    message,
                })
        });
        if let Err(e) = checked {
            return Err(self.refused(approver, "keys.retire", op.parameters.clone(), e, now));
        }
        let done = self.finish(op, approver, now, "ok: retired", |tx| {
            tx.execute(
                "UPDATE managed_keys SET state = 'retired', retired_at = ?2 WHERE label = ?1",
                params![label, now],
            )?;
            Ok(())
        })?;
        if let Some(s) = &self.switch {
            s.withdraw(&label);
        }
        Ok(done)
    }

    /// What destroying `label` would do now: its state, the last expiry of what it signed, and
    /// whether it is allowed without force.
    pub fn destroy_report(&self, label: &str, now: i64) -> Result<(String, bool), KeyOpError> {
        let k = self.key(label)?;
        if let Err(message) = k.state.check(KeyState::Destroyed) {
            return Ok((format!("{label}: {message}"), false));
        }
        let last = match k.kid {
            Some(kid) => self.last_expiry(&kid)?,
            None => None,
        };
        let fmt = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        Ok(match last {
            Some(exp) if exp >= now => (
                format!(
                    "{label}: certificates it signed are valid until {}; destroying it now needs --force with a reason",
                    fmt(exp)
                ),
                false,
            ),
            Some(exp) => (
                format!("{label}: the last certificate it signed expired at {}; it may be destroyed", fmt(exp)),
                true,
            ),
            None => (format!("{label}: it signed no certificate; it may be destroyed"), true),
        })
    }

    /// Two-person: asks to destroy a retired DSC's private key; refused while certificates it
    /// signed are valid, unless `force_reason` is given (recorded).
    pub fn request_destroy(
        &self,
        officer: &str,
        label: &str,
        force_reason: Option<&str>,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let params =
            json!({"label": label, "forced": force_reason.is_some(), "reason": force_reason});
        let checked = self
            .destroy_report(label, now)
            .and_then(|(report, allowed)| {
                let reason_ok = force_reason.is_some_and(|r| !r.trim().is_empty());
                match (
                    allowed,
                    reason_ok,
                    self.key(label)?.state == KeyState::Retired,
                ) {
                    (_, _, false) => Err(KeyOpError::State {
                        label: label.into(),
                        message: report,
                    }),
                    (true, _, true) | (false, true, true) => Ok(()),
                    (false, false, true) => Err(KeyOpError::State {
                        label: label.into(),
                        message: report,
                    }),
                }
            });
        if let Err(e) = checked {
            return Err(self.refused(officer, "keys.destroy", params, e, now));
        }
        self.request(officer, "keys.destroy", params, now)
    }

    fn execute_destroy(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.parameters["label"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let forced = op.parameters["forced"].as_bool().unwrap_or(false);
        let checked = self
            .destroy_report(&label, now)
            .and_then(|(report, allowed)| {
                if self.key(&label)?.state != KeyState::Retired || !(allowed || forced) {
                    Err(KeyOpError::State {
                        label: label.clone(),
                        message: report,
                    })
                } else {
                    Ok(())
                }
            });
        if let Err(e) = checked {
            return Err(self.refused(approver, "keys.destroy", op.parameters.clone(), e, now));
        }
        // The intent is recorded before the irreversible step (fail closed).
        let approvals = vec![approver.to_string()];
        self.audited(
            Record {
                officer: &op.requester,
                operation: "keys.destroy.start",
                parameters: op.parameters.clone(),
                approvals: &approvals,
                result: "started",
            },
            now,
            |_| Ok(()),
        )?;
        let handle = self.token.find_key(&label)?;
        let removed = self.token.destroy_key_pair(&handle)?;
        let result = format!("ok: destroyed ({removed} objects removed from the token)");
        self.finish(op, approver, now, &result, |tx| {
            tx.execute(
                "UPDATE managed_keys SET state = 'destroyed', destroyed_at = ?2 WHERE label = ?1",
                params![label, now],
            )?;
            Ok(())
        })
    }

    /// The DSCs verifiers must trust now (JSON): active ones, and retired or superseded ones
    /// until the last certificate they signed has expired (the ledger knows).
    pub fn trust_list(&self, now: i64) -> Result<Value, KeyOpError> {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let managed = self.list()?;
        let active_types: Vec<CertType> = managed
            .iter()
            .filter(|k| k.role == "dsc" && k.state == KeyState::Active)
            .flat_map(|k| k.types.clone())
            .collect();
        let mut entries = Vec::new();
        let mut push =
            |kid: [u8; 8], der: &[u8], types: &[CertType], nb: i64, na: i64, state: &str| {
                entries.push(json!({
                    "kid": b64(&kid), "state": state, "types": types_str(types),
                    "not_before": nb, "not_after": na, "certificate": b64(der),
                }));
            };
        let still_valid = |kid: &[u8; 8]| -> Result<bool, KeyOpError> {
            Ok(self.last_expiry(kid)?.is_some_and(|exp| exp >= now))
        };
        for (d, types) in &self.settings.configured_dscs {
            let superseded = types.iter().all(|t| active_types.contains(t));
            let (nb, na) = (d.not_before.unix_timestamp(), d.not_after.unix_timestamp());
            if !superseded {
                push(d.kid, &d.cert_der, types, nb, na, "active");
            } else if still_valid(&d.kid)? {
                push(d.kid, &d.cert_der, types, nb, na, "retired");
            }
        }
        for k in managed.iter().filter(|k| k.role == "dsc") {
            let (Some(kid), Some(der)) = (k.kid, k.certificate.as_deref()) else {
                continue;
            };
            let (nb, na) = (
                k.not_before.unwrap_or_default(),
                k.not_after.unwrap_or_default(),
            );
            match k.state {
                KeyState::Active => push(kid, der, &k.types, nb, na, "active"),
                KeyState::Retired | KeyState::Destroyed if still_valid(&kid)? => {
                    push(kid, der, &k.types, nb, na, "retired")
                }
                _ => {}
            }
        }
        Ok(json!({
            "country": self.settings.country,
            "generated": now,
            "certificates": entries,
        }))
    }

    /// Every check of `import-cert`, in order; the first failure is returned.
    fn check_certificate(
        &self,
        label: &str,
        pem_or_der: &[u8],
        now: i64,
    ) -> Result<(ManagedKey, Dsc), KeyOpError> {
        let key = self.key(label)?;
        KeyState::Generated
            .eq(&key.state)
            .then_some(())
            .ok_or_else(|| KeyOpError::State {
                label: label.into(),
                message: key
                    .state
                    .check(KeyState::Certified)
                    .err()
                    .unwrap_or_default(),
            })?;
        let der = if pem_or_der.starts_with(b"-----BEGIN") {
            Certificate::from_pem(pem_or_der)
                .and_then(|c| c.to_der())
                .map_err(|e| refuse("2-60-7011", format!("not a PEM certificate: {e}")))?
        } else {
            pem_or_der.to_vec()
        };
        let dsc = Dsc::from_der(label, &der).map_err(|e| refuse("2-60-7011", e.to_string()))?;
        let cert = Certificate::from_der(&der).map_err(|e| refuse("2-60-7011", e.to_string()))?;
        // kid collisions first: the same certificate twice is the only realistic collision.
        let others = self.list()?;
        if let Some(o) = others
            .iter()
            .find(|o| o.label != label && o.kid == Some(dsc.kid))
        {
            return Err(refuse(
                "2-60-7016",
                format!(
                    "its kid {} collides with managed key {}",
                    hex::encode(dsc.kid),
                    o.label
                ),
            ));
        }
        if let Some((l, _)) = self.settings.configured.iter().find(|(_, k)| *k == dsc.kid) {
            return Err(refuse(
                "2-60-7016",
                format!(
                    "its kid {} collides with configured DSC {l}",
                    hex::encode(dsc.kid)
                ),
            ));
        }
        if p256::EncodedPoint::from(dsc.public_key).as_bytes() != key.public_key.as_slice() {
            return Err(refuse(
                "2-60-7010",
                format!("its public key differs from the token's key {label}"),
            ));
        }
        let ku =
            ext(&cert, "2.5.29.15").and_then(|v| x509_cert::ext::pkix::KeyUsage::from_der(v).ok());
        if !ku.is_some_and(|k| k.digital_signature()) {
            return Err(refuse("2-60-7012", "its key usage lacks digitalSignature"));
        }
        let mut want: Vec<CertType> = key.types.clone();
        want.sort();
        let got = dsc.eku_types.clone().map(|mut v| {
            v.sort();
            v
        });
        if key.role == "dsc" && got.as_ref() != Some(&want) {
            return Err(refuse(
                "2-60-7013",
                format!(
                    "its extended key usage allows {} but the key is declared for {}",
                    got.map(|g| types_str(&g))
                        .unwrap_or_else(|| "every type (no EKU)".into()),
                    types_str(&want)
                ),
            ));
        }
        let csca = self.chaining_csca(&cert)?;
        if csca.environment != self.settings.environment {
            return Err(refuse(
                "2-60-7017",
                format!(
                    "it chains to CSCA {} of the {} environment; this deployment is {}",
                    csca.name, csca.environment, self.settings.environment
                ),
            ));
        }
        if now < dsc.not_before.unix_timestamp() || now > dsc.not_after.unix_timestamp() {
            return Err(refuse(
                "2-60-7015",
                format!(
                    "it is not valid now (valid {} to {})",
                    dsc.not_before, dsc.not_after
                ),
            ));
        }
        Ok((key, dsc))
    }

    /// The configured CSCA whose SKI is the certificate's AKI and whose key verifies it.
    fn chaining_csca(&self, cert: &Certificate) -> Result<&Csca, KeyOpError> {
        use p256::ecdsa::signature::Verifier;
        let aki = ext(cert, "2.5.29.35")
            .and_then(|v| x509_cert::ext::pkix::AuthorityKeyIdentifier::from_der(v).ok())
            .and_then(|a| a.key_identifier)
            .map(|k| k.as_bytes().to_vec())
            .ok_or_else(|| refuse("2-60-7014", "it has no authority key identifier"))?;
        let csca = self
            .settings
            .cscas
            .iter()
            .find(|c| c.ski == aki)
            .ok_or_else(|| {
                refuse(
                    "2-60-7014",
                    format!(
                        "it does not chain to a configured CSCA (authority key id {})",
                        hex::encode(&aki)
                    ),
                )
            })?;
        let tbs = cert
            .tbs_certificate
            .to_der()
            .map_err(|e| refuse("2-60-7011", e.to_string()))?;
        let sig = p256::ecdsa::Signature::from_der(cert.signature.raw_bytes())
            .map_err(|_| refuse("2-60-7014", "its signature is not ECDSA"))?;
        let ecdsa_sha256 = "1.2.840.10045.4.3.2";
        if cert.signature_algorithm.oid.to_string() != ecdsa_sha256
            || p256::ecdsa::VerifyingKey::from(&csca.key)
                .verify(&tbs, &sig)
                .is_err()
        {
            return Err(refuse(
                "2-60-7014",
                format!("its signature does not verify with CSCA {}", csca.name),
            ));
        }
        Ok(csca)
    }
}
