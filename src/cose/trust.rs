//! Trusted DSC certificates, looked up by kid.

use std::collections::HashMap;

use der::{Decode, DecodePem, Encode};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs8::DecodePublicKey;
use time::OffsetDateTime;
use x509_cert::ext::pkix::ExtendedKeyUsage;
use x509_cert::Certificate;

use super::{kid::kid, CoseError};
use crate::dcc::CertType;

/// OID of the named curve P-256 (prime256v1).
const P256_OID: &str = "1.2.840.10045.3.1.7";

/// A DSC's public key.
#[derive(Debug, Clone)]
pub enum PublicKey {
    /// ECDSA P-256 (ES256).
    P256 {
        /// The point.
        key: p256::PublicKey,
        /// Its uncompressed SEC1 encoding (65 bytes), computed once: the verifier takes it.
        sec1: Box<[u8]>,
    },
    /// RSA (PS256).
    Rsa(Box<rsa::RsaPublicKey>),
}

/// A DSC certificate with the facts verification needs.
#[derive(Debug, Clone)]
pub struct TrustedDsc {
    /// The certificate DER.
    pub der: Vec<u8>,
    /// First 8 bytes of SHA-256 of the DER.
    pub kid: [u8; 8],
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Types allowed by the extended key usage (`1.3.6.1.4.1.1847.2021.1.x` or the
    /// `1.3.6.1.4.1.0.1847.2021.1.x` variant); `None` when the certificate has no extended key
    /// usage extension (or an empty one), which allows all types. An extension without any DCC OID (e.g. only an
    /// ICAO document-signer OID) allows none, as the official test vectors expect (IS/3).
    pub types: Option<Vec<CertType>>,
    /// The public key.
    pub public_key: PublicKey,
}

fn to_time(t: &x509_cert::time::Time) -> Result<OffsetDateTime, CoseError> {
    OffsetDateTime::from_unix_timestamp(t.to_unix_duration().as_secs() as i64)
        .map_err(|e| CoseError::Certificate(e.to_string()))
}

impl TrustedDsc {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<TrustedDsc, CoseError> {
        let cerr = |e: &dyn std::fmt::Display| CoseError::Certificate(e.to_string());
        let cert = Certificate::from_der(der).map_err(|e| cerr(&e))?;
        let tbs = &cert.tbs_certificate;
        let spki = &tbs.subject_public_key_info;
        let alg = spki.algorithm.oid.to_string();
        let public_key = match alg.as_str() {
            "1.2.840.10045.2.1" => {
                // Named curve only: explicit parameters break the EU gateway.
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.decode_as::<const_oid::ObjectIdentifier>().ok());
                if curve.map(|c| c.to_string()).as_deref() != Some(P256_OID) {
                    return Err(CoseError::Certificate(
                        "EC key is not on the named curve P-256".into(),
                    ));
                }
                let key = p256::PublicKey::from_sec1_bytes(spki.subject_public_key.raw_bytes())
                    .map_err(|_| CoseError::Certificate("EC key is not a P-256 point".into()))?;
                let sec1 = key.to_encoded_point(false).as_bytes().into();
                PublicKey::P256 { key, sec1 }
            }
            "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => {
                let spki_der = spki.to_der().map_err(|e| cerr(&e))?;
                PublicKey::Rsa(Box::new(
                    rsa::RsaPublicKey::from_public_key_der(&spki_der).map_err(|e| cerr(&e))?,
                ))
            }
            other => {
                return Err(CoseError::Certificate(format!(
                    "unsupported key algorithm {other}"
                )))
            }
        };
        let types = tbs
            .get::<ExtendedKeyUsage>()
            .map_err(|e| cerr(&e))?
            // An empty sequence is malformed (RFC 5280: SIZE (1..MAX)) and restricts nothing,
            // as the official vectors expect (common/CO15).
            .filter(|(_, eku)| !eku.0.is_empty())
            .map(|(_, eku)| {
                eku.0
                    .iter()
                    .filter_map(|o| CertType::from_eku_oid(&o.to_string()))
                    .collect()
            });
        Ok(TrustedDsc {
            der: der.to_vec(),
            kid: kid(der),
            not_before: to_time(&tbs.validity.not_before)?,
            not_after: to_time(&tbs.validity.not_after)?,
            types,
            public_key,
        })
    }

    /// Whether the certificate may sign statements of type `t`.
    pub fn allows(&self, t: CertType) -> bool {
        self.types.as_ref().is_none_or(|v| v.contains(&t))
    }
}

/// DSCs by kid.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    by_kid: HashMap<[u8; 8], TrustedDsc>,
}

impl TrustStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a DER certificate; returns its kid.
    pub fn add_der(&mut self, der: &[u8]) -> Result<[u8; 8], CoseError> {
        let dsc = TrustedDsc::from_der(der)?;
        let kid = dsc.kid;
        self.by_kid.insert(kid, dsc);
        Ok(kid)
    }

    /// Adds every `CERTIFICATE` block of a PEM text; returns how many.
    pub fn add_pem(&mut self, pem_text: &str) -> Result<usize, CoseError> {
        let mut n = 0;
        let mut rest = pem_text;
        const END: &str = "-----END CERTIFICATE-----";
        while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
            let end = rest[start..]
                .find(END)
                .ok_or_else(|| CoseError::Certificate("unterminated PEM block".into()))?
                + start
                + END.len();
            let cert = Certificate::from_pem(&rest.as_bytes()[start..end])
                .map_err(|e| CoseError::Certificate(e.to_string()))?;
            self.add_der(
                &cert
                    .to_der()
                    .map_err(|e| CoseError::Certificate(e.to_string()))?,
            )?;
            n += 1;
            rest = &rest[end..];
        }
        if n == 0 {
            return Err(CoseError::Certificate("no CERTIFICATE block found".into()));
        }
        Ok(n)
    }

    /// The DSC for a kid.
    pub fn get(&self, kid: &[u8]) -> Option<&TrustedDsc> {
        let k: [u8; 8] = kid.try_into().ok()?;
        self.by_kid.get(&k)
    }

    /// Number of DSCs.
    pub fn len(&self) -> usize {
        self.by_kid.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty()
    }
}
