//! `import-cert`: every check of a CSCA-signed certificate, in order.

use der::{Decode, DecodePem, Encode};
use rusqlite::params;
use serde_json::json;
use x509_cert::Certificate;

use super::settings::{ext, Csca};
use super::{refuse, types_str, KeyManager, KeyOpError, ManagedKey};
use crate::audit::Record;
use crate::dcc::CertType;
use crate::keys::{Dsc, KeyState};

impl KeyManager {
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
        let (key, dsc) = self.audit_refusal(officer, "keys.import-cert", &params, checked, now)?;
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

    /// Every check of `import-cert`, in order; the first failure is returned.
    pub(super) fn check_certificate(
        &self,
        label: &str,
        pem_or_der: &[u8],
        now: i64,
    ) -> Result<(ManagedKey, Dsc), KeyOpError> {
        let key = self.advance(label, KeyState::Certified)?;
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
    pub(super) fn chaining_csca(&self, cert: &Certificate) -> Result<&Csca, KeyOpError> {
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
