//! Verification of a health certificate against a trust store: signature, validity period and
//! key usage are checked and reported separately (the official test vectors expect each
//! result on its own).

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::cwt::DecodedClaims;
use super::sign1::{self, Algorithm};
use super::trust::{PublicKey, TrustStore, TrustedDsc};
use super::{cbor_json, hc1, CoseError};
use crate::dcc::CertType;
use crate::revocation::hash::{signature_hash_es256, signature_hash_ps256, RevocationHash};

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyFailure {
    /// No kid in the headers.
    #[error("no kid in the COSE headers")]
    NoKid,
    /// No trusted DSC has this kid.
    #[error("no trusted DSC with kid {0}")]
    UnknownKid(String),
    /// The algorithm is neither ES256 nor PS256, or does not fit the DSC's key.
    #[error("unsupported or mismatching algorithm")]
    UnsupportedAlgorithm,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// A claim needed for the check is missing.
    #[error("claim {0} missing")]
    MissingClaim(&'static str),
    /// The certificate has expired (at > exp).
    #[error("expired")]
    Expired,
    /// The certificate's validity is not inside the DSC's (`notBefore ≤ iat`,
    /// `exp ≤ notAfter`: the shell model).
    #[error("iat/exp outside the DSC's validity")]
    OutsideDscValidity,
    /// The certificate is not valid yet (at < iat).
    #[error("not valid yet")]
    NotYetValid,
    /// The payload holds no single recognisable statement (v, t or r).
    #[error("payload has no single v/t/r statement")]
    NoStatement,
    /// The DSC's extended key usage does not allow the statement's type.
    #[error("the DSC may not sign {0} certificates")]
    WrongKeyUsage(CertType),
}

/// The outcome of verification; each check on its own.
#[derive(Debug, Clone)]
pub struct Report {
    /// kid from the headers.
    pub kid: Option<Vec<u8>>,
    /// `iss` claim.
    pub iss: Option<String>,
    /// `iat` claim.
    pub iat: Option<i64>,
    /// `exp` claim.
    pub exp: Option<i64>,
    /// The statement type found in the payload.
    pub cert_type: Option<CertType>,
    /// The DCC as JSON.
    pub payload: serde_json::Value,
    /// Signature with the trusted DSC of that kid.
    pub signature: Result<(), VerifyFailure>,
    /// `iat ≤ at ≤ exp` (the official vectors treat the expiry second itself as valid), and,
    /// when the DSC is known, `notBefore ≤ iat` and `exp ≤ notAfter`.
    pub expiration: Result<(), VerifyFailure>,
    /// The DSC's extended key usage allows the statement type.
    pub key_usage: Result<(), VerifyFailure>,
    /// The certificate's `SIGNATURE` revocation hash (ES256: over `r`; PS256: over the whole
    /// signature), whether or not the signature verified; `None` for another algorithm or an
    /// ES256 signature that is not 64 bytes.
    pub signature_hash: Option<RevocationHash>,
}

impl Report {
    /// All three checks passed.
    pub fn is_valid(&self) -> bool {
        self.signature.is_ok() && self.expiration.is_ok() && self.key_usage.is_ok()
    }
}

fn check_signature(
    dsc: &TrustedDsc,
    alg: Option<Algorithm>,
    protected: &[u8],
    payload: &[u8],
    signature: &[u8],
) -> Result<(), VerifyFailure> {
    let tbs = sign1::sig_structure_raw(protected, payload);
    match (&dsc.public_key, alg) {
        // ring's P-256 (assembly, fixed-base tables) verifies in a fifth of the time of the
        // portable `p256` arithmetic; the load generator verifies a sample of every run with it.
        (PublicKey::P256 { sec1, .. }, Some(Algorithm::Es256)) => {
            let key = ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                sec1,
            );
            key.verify(&tbs, signature)
                .map_err(|_| VerifyFailure::BadSignature)
        }
        (PublicKey::Rsa(pk), Some(Algorithm::Ps256)) => {
            let digest = Sha256::digest(&tbs);
            pk.verify(rsa::Pss::new_with_salt::<Sha256>(32), &digest, signature)
                .map_err(|_| VerifyFailure::BadSignature)
        }
        _ => Err(VerifyFailure::UnsupportedAlgorithm),
    }
}

fn statement_type(payload: &serde_json::Value) -> Option<CertType> {
    let obj = payload.as_object()?;
    let found: Vec<CertType> = ["v", "t", "r"]
        .iter()
        .filter(|k| {
            obj.get(**k)
                .and_then(|a| a.as_array())
                .is_some_and(|a| !a.is_empty())
        })
        .filter_map(|k| CertType::from_payload_key(k))
        .collect();
    match found.as_slice() {
        [t] => Some(*t),
        _ => None,
    }
}

/// Verifies COSE bytes. `Err` only for input that cannot be decoded at all.
pub fn verify_cose(
    cose: &[u8],
    trust: &TrustStore,
    at: OffsetDateTime,
) -> Result<Report, CoseError> {
    let msg = sign1::parse(cose)?;
    let claims = DecodedClaims::from_cbor_bytes(&msg.payload)?;
    let payload = claims
        .dcc
        .as_ref()
        .map(cbor_json::to_json)
        .unwrap_or(serde_json::Value::Null);
    let cert_type = statement_type(&payload);
    let dsc = match &msg.kid {
        None => Err(VerifyFailure::NoKid),
        Some(k) => trust
            .get(k)
            .ok_or_else(|| VerifyFailure::UnknownKid(hex::encode(k))),
    };
    let signature = dsc
        .clone()
        .and_then(|d| check_signature(d, msg.alg, &msg.protected, &msg.payload, &msg.signature));
    let now = at.unix_timestamp();
    let expiration = match (claims.iat, claims.exp) {
        (_, None) => Err(VerifyFailure::MissingClaim("exp")),
        (None, _) => Err(VerifyFailure::MissingClaim("iat")),
        (Some(_), Some(exp)) if now > exp => Err(VerifyFailure::Expired),
        (Some(iat), Some(_)) if now < iat => Err(VerifyFailure::NotYetValid),
        (Some(iat), Some(exp)) => match &dsc {
            Ok(d) if iat < d.not_before.unix_timestamp() || exp > d.not_after.unix_timestamp() => {
                Err(VerifyFailure::OutsideDscValidity)
            }
            _ => Ok(()),
        },
    };
    let signature_hash = match msg.alg {
        Some(Algorithm::Es256) => <&[u8; 64]>::try_from(msg.signature.as_slice())
            .ok()
            .map(signature_hash_es256),
        Some(Algorithm::Ps256) => Some(signature_hash_ps256(&msg.signature)),
        None => None,
    };
    let key_usage = dsc.and_then(|d| match cert_type {
        None => Err(VerifyFailure::NoStatement),
        Some(t) if d.allows(t) => Ok(()),
        Some(t) => Err(VerifyFailure::WrongKeyUsage(t)),
    });
    Ok(Report {
        kid: msg.kid,
        iss: claims.iss,
        iat: claims.iat,
        exp: claims.exp,
        cert_type,
        payload,
        signature,
        expiration,
        key_usage,
        signature_hash,
    })
}

/// Decodes an `HC1:` string and verifies it.
pub fn verify_hc1(text: &str, trust: &TrustStore, at: OffsetDateTime) -> Result<Report, CoseError> {
    verify_cose(&hc1::decode(text)?, trust, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cose::{sign1, CwtClaims, ProtectedHeader};
    use der::Encode;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use std::str::FromStr;
    use x509_cert::builder::{Builder, CertificateBuilder, Profile};

    /// Test only: a software key and a one-day self-signed DSC (production keys live in the HSM).
    fn dsc() -> (p256::ecdsa::SigningKey, Vec<u8>) {
        let sk = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let spki = spki::SubjectPublicKeyInfoOwned::from_key(*sk.verifying_key()).unwrap();
        let cert = CertificateBuilder::new(
            Profile::Root,
            x509_cert::serial_number::SerialNumber::from(1u32),
            x509_cert::time::Validity::from_now(std::time::Duration::from_secs(86_400)).unwrap(),
            x509_cert::name::Name::from_str("CN=test DSC,C=SE").unwrap(),
            spki,
            &sk,
        )
        .unwrap()
        .build::<p256::ecdsa::DerSignature>()
        .unwrap();
        (sk, cert.to_der().unwrap())
    }

    fn signed(sk: &p256::ecdsa::SigningKey, der: &[u8], iat: i64, exp: i64) -> Vec<u8> {
        let dcc = ciborium::Value::Map(vec![(
            ciborium::Value::Text("t".into()),
            ciborium::Value::Array(vec![ciborium::Value::Map(vec![])]),
        )]);
        let payload = CwtClaims {
            iss: "SE".into(),
            iat: iat as u64,
            exp: exp as u64,
            hcert: dcc,
        }
        .to_cbor_bytes();
        let header = ProtectedHeader::es256(crate::cose::kid::kid(der));
        let digest = Sha256::digest(sign1::sig_structure(&header, &payload));
        let sig: p256::ecdsa::Signature = sk.sign_prehash(&digest).unwrap();
        sign1::assemble(&header, &payload, &sig.to_bytes().into())
    }

    #[test]
    fn report_carries_the_signature_hash_over_r() {
        let (sk, der) = dsc();
        let mut trust = TrustStore::new();
        trust.add_der(&der).unwrap();
        let now = OffsetDateTime::now_utc();
        let t = now.unix_timestamp();
        let cose = signed(&sk, &der, t, t + 3600);
        let sig = sign1::parse(&cose).unwrap().signature;
        let r = verify_cose(&cose, &trust, now).unwrap();
        assert_eq!(
            r.signature_hash.map(|h| h.to_vec()),
            Some(Sha256::digest(&sig[..32])[..16].to_vec())
        );
    }

    #[test]
    fn shell_model_and_clock() {
        let (sk, der) = dsc();
        let mut trust = TrustStore::new();
        trust.add_der(&der).unwrap();
        let now = OffsetDateTime::now_utc();
        let t = now.unix_timestamp();
        // Inside the DSC's day: valid.
        let r = verify_cose(&signed(&sk, &der, t, t + 3600), &trust, now).unwrap();
        assert!(r.is_valid(), "{r:?}");
        // exp after the DSC's notAfter: the signature is fine, the validity is not.
        let r = verify_cose(&signed(&sk, &der, t, t + 3 * 86_400), &trust, now).unwrap();
        assert!(r.signature.is_ok());
        assert_eq!(r.expiration, Err(VerifyFailure::OutsideDscValidity));
        // Clock before iat and after exp.
        let r = verify_cose(&signed(&sk, &der, t + 600, t + 3600), &trust, now).unwrap();
        assert_eq!(r.expiration, Err(VerifyFailure::NotYetValid));
        let r = verify_cose(&signed(&sk, &der, t - 7200, t - 3600), &trust, now).unwrap();
        assert_eq!(r.expiration, Err(VerifyFailure::Expired));
        // A tampered payload does not verify.
        let mut bad = signed(&sk, &der, t, t + 3600);
        let n = bad.len();
        bad[n - 80] ^= 1;
        if let Ok(r) = verify_cose(&bad, &trust, now) {
            assert!(r.signature.is_err());
        }
    }

    #[test]
    fn es256_rejects_a_changed_short_der_or_foreign_signature() {
        let (sk, der) = dsc();
        let (other, _) = dsc();
        let mut trust = TrustStore::new();
        trust.add_der(&der).unwrap();
        let now = OffsetDateTime::now_utc();
        let t = now.unix_timestamp();
        let good = sign1::parse(&signed(&sk, &der, t, t + 3600)).unwrap();
        let with_signature = |sig: &[u8]| {
            // Tag 18: [protected, {}, payload, signature].
            let msg = ciborium::Value::Tag(
                18,
                Box::new(ciborium::Value::Array(vec![
                    ciborium::Value::Bytes(good.protected.clone()),
                    ciborium::Value::Map(vec![]),
                    ciborium::Value::Bytes(good.payload.clone()),
                    ciborium::Value::Bytes(sig.to_vec()),
                ])),
            );
            let mut cose = Vec::new();
            ciborium::ser::into_writer(&msg, &mut cose).unwrap();
            verify_cose(&cose, &trust, now).unwrap().signature
        };
        assert_eq!(with_signature(&good.signature), Ok(()));
        let mut flipped = good.signature.clone();
        flipped[40] ^= 0x01;
        assert_eq!(with_signature(&flipped), Err(VerifyFailure::BadSignature));
        assert_eq!(
            with_signature(&good.signature[..63]),
            Err(VerifyFailure::BadSignature)
        );
        // COSE wants r || s; the same signature DER-encoded is refused.
        let parsed = p256::ecdsa::Signature::from_slice(&good.signature).unwrap();
        assert_eq!(
            with_signature(parsed.to_der().as_bytes()),
            Err(VerifyFailure::BadSignature)
        );
        // Signed over the same bytes by a key that is not the DSC's.
        let digest = Sha256::digest(sign1::sig_structure_raw(&good.protected, &good.payload));
        let foreign: p256::ecdsa::Signature = other.sign_prehash(&digest).unwrap();
        assert_eq!(
            with_signature(&foreign.to_bytes()),
            Err(VerifyFailure::BadSignature)
        );
    }
}
