//! Configured document signers: certificate + key on the token, checked against each other.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use der::{DecodePem, Encode};
use time::OffsetDateTime;
use x509_cert::Certificate;

use super::KeysError;
use crate::config::Config;
use crate::cose::trust::{PublicKey, TrustedDsc};
use crate::dcc::CertType;
use crate::hsm::{KeyHandle, KeyUri, Token};

/// A DSC certificate with the facts we use from it.
#[derive(Debug, Clone)]
pub struct Dsc {
    /// Label of its private key on the token.
    pub label: String,
    /// DER of the certificate.
    pub cert_der: Vec<u8>,
    /// kid: first 8 bytes of SHA-256 over the DER.
    pub kid: [u8; 8],
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Types allowed by the extended key usage; `None` when the certificate has none (then it
    /// may sign all types). Same semantics as [`TrustedDsc::types`].
    pub eku_types: Option<Vec<CertType>>,
    /// The certified public key.
    pub public_key: p256::PublicKey,
}

impl Dsc {
    /// Parses a DSC certificate (the verifier's parser, so issuing and verifying agree).
    /// Refuses anything but a named-curve P-256 key.
    pub fn from_der(label: &str, der: &[u8]) -> Result<Dsc, KeysError> {
        let perr = |message: String| KeysError::Parse {
            path: label.to_string(),
            message,
        };
        let t = TrustedDsc::from_der(der).map_err(|e| perr(e.to_string()))?;
        let PublicKey::P256 {
            key: public_key, ..
        } = t.public_key
        else {
            return Err(perr("the DSC key must be ECDSA P-256".into()));
        };
        Ok(Dsc {
            label: label.to_string(),
            cert_der: t.der,
            kid: t.kid,
            not_before: t.not_before,
            not_after: t.not_after,
            eku_types: t.types,
            public_key,
        })
    }

    /// Reads a PEM certificate file.
    pub fn from_pem_file(label: &str, path: &Path) -> Result<Dsc, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let cert = Certificate::from_pem(text.as_bytes()).map_err(|e| KeysError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let der = cert.to_der().map_err(|e| KeysError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Dsc::from_der(label, &der)
    }

    /// Whether the extended key usage allows signing this type.
    pub fn allows(&self, t: CertType) -> bool {
        self.eku_types.as_ref().is_none_or(|v| v.contains(&t))
    }

    /// kid as lower-case hex.
    pub fn kid_hex(&self) -> String {
        hex::encode(self.kid)
    }
}

/// A DSC whose key was found on the token and matches the certificate.
#[derive(Debug)]
pub struct ActiveDsc {
    /// The certificate.
    pub dsc: Dsc,
    /// Its private key on the token.
    pub key: KeyHandle,
    /// The types it is configured to sign.
    pub types: Vec<CertType>,
    /// End of its private key usage period: for a managed key its activation plus
    /// `keys.usage_period_days`; for a configured DSC its certificate's `notBefore` plus the
    /// same period. `None`: unbounded (tests and tools that build a signer directly).
    pub usage_end: Option<OffsetDateTime>,
}

/// Switches the signer of some types to another DSC, atomically for new requests (requests in
/// flight finish with the key they started with). Implemented by the issuer; called by key
/// activation.
pub trait SignerSwitch: Send + Sync {
    /// From now on `dsc` signs its types.
    fn switch_to(&self, dsc: Arc<ActiveDsc>);
    /// From now on the key `label` signs nothing (its types have no signer until another
    /// activation).
    fn withdraw(&self, label: &str);
}

/// The configured DSCs, by type.
#[derive(Debug, Default, Clone)]
pub struct DscSet {
    by_type: BTreeMap<CertType, Arc<ActiveDsc>>,
}

impl DscSet {
    /// Loads every configured DSC and checks it: the certificate parses, its EKU allows every
    /// configured type, its key is on the token and equals the certified key, and it has not
    /// expired. Any failure is an error naming the DSC. Its private key usage period ends
    /// `keys.usage_period_days` after the certificate's `notBefore` (a warning at load when it
    /// has; requests are refused from then on).
    pub fn load(cfg: &Config, token: &Token, now: OffsetDateTime) -> Result<DscSet, KeysError> {
        let mut by_type = BTreeMap::new();
        for d in &cfg.dscs {
            let derr = |message: String| KeysError::Dsc {
                label: d.key.clone(),
                message,
            };
            let (label, want_id) =
                KeyUri::resolve(&d.key, token.label()).map_err(|e| derr(e.to_string()))?;
            let dsc = Dsc::from_pem_file(&label, &cfg.resolve(&d.certificate))?;
            for t in &d.types {
                if !dsc.allows(*t) {
                    return Err(derr(format!(
                        "configured for {t} but its extended key usage does not allow {t}"
                    )));
                }
            }
            if dsc.not_after <= now {
                return Err(derr(format!("certificate expired at {}", dsc.not_after)));
            }
            let key = token.find_key(&label).map_err(|e| derr(e.to_string()))?;
            if want_id.as_ref().is_some_and(|id| *id != key.id) {
                return Err(derr(
                    "the key's CKA_ID differs from the id in the URI".into(),
                ));
            }
            if key.public_key != dsc.public_key {
                return Err(derr(
                    "the key on the token does not match the certificate".into(),
                ));
            }
            // Private key usage period (6 months by default): from the certificate's
            // notBefore, the key's first day in service as far as the configuration tells.
            let usage_end =
                dsc.not_before + time::Duration::days(cfg.keys.usage_period_days.into());
            if usage_end <= now {
                tracing::warn!(label = %label, kid = %dsc.kid_hex(), usage_end = %usage_end,
                    "configured DSC is past its private key usage period: its types are refused (2-60-5010) until a successor signs them");
            }
            let active = Arc::new(ActiveDsc {
                dsc,
                key,
                types: d.types.clone(),
                usage_end: Some(usage_end),
            });
            for t in &d.types {
                by_type.insert(*t, active.clone());
            }
        }
        Ok(DscSet { by_type })
    }

    /// The DSC that signs type `t`.
    pub fn for_type(&self, t: CertType) -> Option<&Arc<ActiveDsc>> {
        self.by_type.get(&t)
    }

    /// All (type, DSC) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (CertType, &Arc<ActiveDsc>)> {
        self.by_type.iter().map(|(t, d)| (*t, d))
    }
}
