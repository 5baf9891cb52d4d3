//! A certificate revocation list (RFC 5280 §5) signed by a CA key in the token: what the
//! development TLS CA publishes for the client certificates it revoked, and what the daemon's
//! mutual TLS checks (`[server] client_crls`, `src/api/client_crl.rs`). Version 2 with the
//! extensions RFC 5280 requires of a CRL issuer (authority key identifier, CRL number) and a
//! `nextUpdate`, as webpki expects.

use std::time::{Duration, SystemTime};

use der::asn1::{BitString, GeneralizedTime, OctetString};
use der::{Decode, Encode};
use p256::ecdsa::DerSignature;
use signature::Signer;
use spki::DynSignatureAlgorithmIdentifier;
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::pkix::crl::CrlNumber;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};
use x509_cert::ext::{AsExtension, Extension};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Time;
use x509_cert::Certificate;

use super::tls::TlsCa;
use super::KeysError;
use crate::hsm::TokenSigner;

fn b(e: impl std::fmt::Display) -> KeysError {
    KeysError::Build(e.to_string())
}

fn time(t: SystemTime) -> Result<Time, KeysError> {
    // Whole seconds: DER times carry no fractions.
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(b)?
        .as_secs();
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    Ok(Time::GeneralTime(
        GeneralizedTime::from_system_time(t).map_err(b)?,
    ))
}

/// The PEM label of a CRL (RFC 7468 §9).
const PEM_LABEL: &str = "X509 CRL";

/// A CRL in PEM (`X509 CRL`).
pub fn crl_from_pem(pem: &[u8]) -> Result<CertificateList, KeysError> {
    let (label, der) = der::pem::decode_vec(pem).map_err(b)?;
    if label != PEM_LABEL {
        return Err(KeysError::Build(format!(
            "expected a PEM {PEM_LABEL}, found {label}"
        )));
    }
    CertificateList::from_der(&der).map_err(b)
}

/// The revoked entries of `previous` (if any) and one for `revoke`, with a CRL number one
/// higher than `previous`'s: a new CRL signed by `ca`, valid from `now` for `lifetime`.
pub fn issue_crl(
    ca: TlsCa<'_>,
    previous: Option<&CertificateList>,
    revoke: Option<&Certificate>,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateList, KeysError> {
    let mut revoked: Vec<RevokedCert> = previous
        .and_then(|p| p.tbs_cert_list.revoked_certificates.clone())
        .unwrap_or_default();
    if let Some(cert) = revoke {
        if cert.tbs_certificate.issuer != ca.cert.tbs_certificate.subject {
            return Err(KeysError::Build(
                "the certificate to revoke was not issued by this CA".into(),
            ));
        }
        let serial = &cert.tbs_certificate.serial_number;
        if !revoked.iter().any(|r| &r.serial_number == serial) {
            revoked.push(RevokedCert {
                serial_number: serial.clone(),
                revocation_date: time(now)?,
                crl_entry_extensions: None,
            });
        }
    }
    let number = previous.map(crl_number).transpose()?.flatten().unwrap_or(0) + 1;
    let issuer = ca.cert.tbs_certificate.subject.clone();
    let mut extensions = vec![
        CrlNumber(der::asn1::Uint::new(&number.to_be_bytes()).map_err(b)?)
            .to_extension(&issuer, &[])
            .map_err(b)?,
    ];
    let ski = ca
        .cert
        .tbs_certificate
        .get::<SubjectKeyIdentifier>()
        .map_err(b)?;
    if let Some((_, ski)) = ski {
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(ski.0.as_bytes()).map_err(b)?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        };
        extensions.push(aki.to_extension(&issuer, &[]).map_err(b)?);
    }
    let signer = TokenSigner::new(ca.token, ca.key);
    let tbs = TbsCertList {
        version: x509_cert::Version::V2,
        signature: signer.signature_algorithm_identifier().map_err(b)?,
        issuer,
        this_update: time(now)?,
        next_update: Some(time(now + lifetime)?),
        // RFC 5280 §5.1.2.6: absent, not empty, when nothing is revoked.
        revoked_certificates: (!revoked.is_empty()).then_some(revoked),
        crl_extensions: Some(extensions),
    };
    let sig: DerSignature = signer.try_sign(&tbs.to_der().map_err(b)?).map_err(b)?;
    Ok(CertificateList {
        signature_algorithm: tbs.signature.clone(),
        tbs_cert_list: tbs,
        signature: BitString::from_bytes(sig.as_bytes()).map_err(b)?,
    })
}

/// The CRL number of `crl`, if it has one.
fn crl_number(crl: &CertificateList) -> Result<Option<u64>, KeysError> {
    let ext: Option<&Extension> = crl
        .tbs_cert_list
        .crl_extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_CRL_NUMBER);
    let Some(ext) = ext else { return Ok(None) };
    let n = CrlNumber::from_der(ext.extn_value.as_bytes()).map_err(b)?;
    let bytes = n.0.as_bytes();
    if bytes.len() > 8 {
        return Err(KeysError::Build("CRL number beyond 64 bits".into()));
    }
    Ok(Some(
        bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
    ))
}

/// PEM (`-----BEGIN X509 CRL-----`) of a CRL.
pub fn crl_to_pem(crl: &CertificateList) -> Result<String, KeysError> {
    der::pem::encode_string(
        PEM_LABEL,
        der::pem::LineEnding::LF,
        &crl.to_der().map_err(b)?,
    )
    .map_err(b)
}

/// Whether `crl` lists the certificate with `serial`.
pub fn crl_lists(crl: &CertificateList, serial: &SerialNumber) -> bool {
    crl.tbs_cert_list
        .revoked_certificates
        .iter()
        .flatten()
        .any(|r| &r.serial_number == serial)
}
