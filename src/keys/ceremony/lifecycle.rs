//! Publish, activate (two-person), retire (two-person) and destroy (two-person).

use der::Decode;
use rusqlite::params;
use serde_json::json;
use x509_cert::Certificate;

use super::{KeyManager, KeyOpError, ManagedKey, Operation};
use crate::audit::Record;
use crate::hsm::HsmError;
use crate::keys::KeyState;

impl KeyManager {
    /// Builds the EU gateway upload package of a certified DSC (base64 of CMS SignedData signed
    /// by the certified upload key); the DSC becomes `published`.
    pub fn publish(&self, officer: &str, label: &str, now: i64) -> Result<String, KeyOpError> {
        use base64::Engine;
        let params = json!({"label": label});
        let built = self.upload_package(label);
        let package = self.audit_refusal(officer, "keys.publish", &params, built, now)?;
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

    pub(super) fn upload_package(&self, label: &str) -> Result<Vec<u8>, KeyOpError> {
        let k = self.key(label)?;
        if k.role != "dsc" {
            return Err(KeyOpError::Invalid {
                field: "label",
                message: "only DSCs are published; the upload key signs the package".into(),
            });
        }
        self.advance(label, KeyState::Published)?;
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
        crate::keys::signed_data(
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
        self.audit_refusal(
            officer,
            "keys.activate",
            &params,
            self.activatable(label, now),
            now,
        )?;
        self.request(officer, "keys.activate", params, now)
    }

    pub(super) fn activatable(&self, label: &str, now: i64) -> Result<ManagedKey, KeyOpError> {
        let k = self.advance(label, KeyState::Active)?;
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

    pub(super) fn execute_activate(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.label();
        let k = self.audit_refusal(
            approver,
            "keys.activate",
            &op.parameters,
            self.activatable(&label, now),
            now,
        )?;
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
        let checked = self.advance(label, KeyState::Retired);
        self.audit_refusal(officer, "keys.retire", &params, checked, now)?;
        self.request(officer, "keys.retire", params, now)
    }

    pub(super) fn execute_retire(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.label();
        let checked = self.advance(&label, KeyState::Retired);
        self.audit_refusal(approver, "keys.retire", &op.parameters, checked, now)?;
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

    /// The destroy rule, checked at the request and again at the approval: the key is retired,
    /// and nothing it signed is still valid unless `forced`.
    fn destroyable(&self, label: &str, forced: bool, now: i64) -> Result<(), KeyOpError> {
        let (report, allowed) = self.destroy_report(label, now)?;
        if self.key(label)?.state == KeyState::Retired && (allowed || forced) {
            Ok(())
        } else {
            Err(KeyOpError::State {
                label: label.into(),
                message: report,
            })
        }
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
        let forced = force_reason.is_some_and(|r| !r.trim().is_empty());
        let params = json!({"label": label, "forced": forced, "reason": force_reason});
        let checked = self.destroyable(label, forced, now);
        self.audit_refusal(officer, "keys.destroy", &params, checked, now)?;
        self.request(officer, "keys.destroy", params, now)
    }

    pub(super) fn execute_destroy(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.label();
        let forced = op.parameters["forced"].as_bool().unwrap_or(false);
        let checked = self.destroyable(&label, forced, now);
        self.audit_refusal(approver, "keys.destroy", &op.parameters, checked, now)?;
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
}
