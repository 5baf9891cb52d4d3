//! What the key lifecycle reads from `[keys]`: CSCAs, environment, periods, configured DSCs.

use der::{Decode, DecodePem};
use x509_cert::Certificate;

use super::super::dsc::Dsc;
use super::KeyOpError;
use crate::config::{Config, Environment};
use crate::dcc::CertType;

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

pub(super) fn ext<'a>(cert: &'a Certificate, oid: &str) -> Option<&'a [u8]> {
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
