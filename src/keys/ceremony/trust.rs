//! What the ledger and the HSM add: signers to restore, counts, the trust list, signed
//! audit checkpoints.

use std::sync::Arc;

use rusqlite::OptionalExtension;
use serde_json::{json, Value};

use super::{types_str, KeyManager, KeyOpError, ManagedKey};
use crate::audit;
use crate::dcc::CertType;
use crate::hsm::{KeyHandle, Token};
use crate::keys::{ActiveDsc, Dsc, KeyState, SignerSwitch};
use crate::ledger::Ledger;

/// The token's data object that keeps the newest audit checkpoint ([`audit::Anchor`]).
pub const AUDIT_ANCHOR_LABEL: &str = "dccsign-audit-anchor";

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

impl KeyManager {
    /// Checkpoints are signed by `key` (in the token).
    pub fn with_audit_key(mut self, key: KeyHandle) -> Self {
        self.audit_key = Some(key);
        self
    }

    /// Writes a signed checkpoint: entry count and head hash, with the certificates recorded
    /// per DSC since the previous checkpoint, and keeps it in the token as the audit anchor.
    /// Refused while the database does not match the anchor in force
    /// ([`KeyManager::check_audit_anchor`]): a new anchor would hide the loss. `Ok(None)` when
    /// no audit key is configured.
    pub fn checkpoint(&self, now: i64) -> Result<Option<i64>, KeyOpError> {
        if self.audit_key.is_none() {
            return Ok(None);
        }
        self.check_audit_anchor()?;
        self.write_checkpoint(now).map(|a| Some(a.count))
    }

    /// The audit anchor in the token, if one was written (the newest, should an interrupted
    /// replacement have left two).
    pub fn audit_anchor(&self) -> Result<Option<audit::Anchor>, KeyOpError> {
        let mut newest: Option<audit::Anchor> = None;
        for b in self.token.data_values(AUDIT_ANCHOR_LABEL)? {
            let a = audit::Anchor::from_bytes(&b).ok_or_else(|| {
                KeyOpError::AuditAnchor(format!(
                    "the token's data object {AUDIT_ANCHOR_LABEL:?} is not an audit anchor"
                ))
            })?;
            if newest.is_none_or(|n| a.id > n.id) {
                newest = Some(a);
            }
        }
        Ok(newest)
    }

    /// Checks that the control database still holds, unchanged, the newest checkpoint the
    /// token's audit anchor names (see [`audit::check_anchor`]). Nothing to check without an
    /// audit key, or before the first checkpoint kept in the token.
    pub fn check_audit_anchor(&self) -> Result<(), KeyOpError> {
        if self.audit_key.is_none() {
            return Ok(());
        }
        let Some(anchor) = self.audit_anchor()? else {
            return Ok(());
        };
        match audit::check_anchor(&self.db(), &anchor) {
            Ok(None) => Ok(()),
            Ok(Some(problem)) => Err(KeyOpError::AuditAnchor(problem)),
            Err(e) => Err(KeyOpError::Database(e.to_string())),
        }
    }

    /// Accepts the control database as it is although it does not match the token's anchor
    /// (after a restore from a backup, say): records `audit.reanchor` with the old anchor, the
    /// problem found and `reason`, then writes a checkpoint that becomes the anchor.
    pub fn reanchor(
        &self,
        operator: &str,
        reason: &str,
        now: i64,
    ) -> Result<audit::Anchor, KeyOpError> {
        if self.audit_key.is_none() {
            return Err(KeyOpError::Invalid {
                field: "keys.audit_key",
                message: "no audit key configured: there is no anchor".into(),
            });
        }
        let old = self.audit_anchor()?;
        let problem = match self.check_audit_anchor() {
            Ok(()) => None,
            Err(KeyOpError::AuditAnchor(p)) => Some(p),
            Err(e) => return Err(e),
        };
        let params = json!({
            "old_anchor": old.map(|a| json!({
                "checkpoint": a.id, "entries": a.count, "head": hex::encode(a.head),
            })),
            "problem": problem,
            "reason": reason,
        });
        self.record_external(operator, "audit.reanchor", params, "ok", now)?;
        self.write_checkpoint(now)
    }

    /// Signs and stores a checkpoint, then keeps it in the token as the anchor.
    fn write_checkpoint(&self, now: i64) -> Result<audit::Anchor, KeyOpError> {
        let Some(key) = &self.audit_key else {
            return Err(KeyOpError::Invalid {
                field: "keys.audit_key",
                message: "no audit key configured".into(),
            });
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
        let anchor = audit::checkpoint(&db, &signer, &extra, now)
            .map_err(|e| KeyOpError::Audit(e.to_string()))?;
        drop(db);
        // After the checkpoint is durable: a crash in between leaves the previous anchor,
        // whose checkpoint is still there.
        self.token
            .replace_data(AUDIT_ANCHOR_LABEL, &anchor.to_bytes())?;
        Ok(anchor)
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

    pub(super) fn active_dsc(&self, k: &ManagedKey) -> Result<Arc<ActiveDsc>, KeyOpError> {
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
}
