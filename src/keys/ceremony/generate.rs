//! Generation (two-person) and the certificate request signed inside the token.

use der::EncodePem;
use rusqlite::params;
use serde_json::json;

use super::{parse_types, types_str, valid_label, KeyManager, KeyOpError, Operation};
use crate::audit::Record;
use crate::dcc::CertType;
use crate::hsm::{HsmError, KeyHandle, TokenSigner};
use crate::keys::KeyState;

impl KeyManager {
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
        self.audit_refusal(officer, "keys.generate", &params, checked, now)?;
        self.request(officer, "keys.generate", params, now)
    }

    pub(super) fn label_is_new(&self, label: &str) -> Result<(), KeyOpError> {
        let known = self.key(label).is_ok()
            || self.settings.configured.iter().any(|(l, _)| l == label)
            || self.token.find_key(label).is_ok();
        if known {
            Err(KeyOpError::LabelExists(label.to_string()))
        } else {
            Ok(())
        }
    }

    pub(super) fn execute_generate(
        &self,
        op: &Operation,
        approver: &str,
        now: i64,
    ) -> Result<Operation, KeyOpError> {
        let label = op.label();
        let types = parse_types(op.parameters["types"].as_str().unwrap_or_default());
        let role = op.parameters["role"].as_str().unwrap_or("dsc").to_string();
        // The label may have been taken since the request.
        self.audit_refusal(
            approver,
            "keys.generate",
            &op.parameters,
            self.label_is_new(&label),
            now,
        )?;
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
        let pem = self.audit_refusal(
            officer,
            "keys.csr",
            &params,
            self.build_csr(label, subject),
            now,
        )?;
        self.audited(
            Record {
                officer,
                operation: "keys.csr",
                parameters: params,
                approvals: &[],
                result: "ok",
            },
            now,
            |_| Ok(pem),
        )
    }

    pub(super) fn build_csr(&self, label: &str, subject: &str) -> Result<String, KeyOpError> {
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
}
