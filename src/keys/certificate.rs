//! X.509 certificates built with `x509-cert` and signed inside the token: a country signing CA
//! (CSCA) and document signers (DSC) following the eHN certificate governance profile.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use const_oid::ObjectIdentifier;
use der::asn1::{GeneralizedTime, OctetString};
use der::referenced::OwnedToRef;
use der::Encode;
use p256::ecdsa::DerSignature;
use rand::RngCore;
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::Certificate;

use super::KeysError;
use crate::dcc::CertType;
use crate::hsm::{KeyHandle, Token, TokenSigner};

/// What to put in a certificate besides the key.
#[derive(Debug, Clone)]
pub struct CertProfile {
    /// Subject as an RFC 4514 string, e.g. `CN=…,O=…,C=SE`.
    pub subject: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// Length of validity.
    pub lifetime: Duration,
}

fn build_err(e: impl std::fmt::Display) -> KeysError {
    KeysError::Build(e.to_string())
}

/// A positive random 16-byte serial number (RFC 5280: ≤ 20 octets, positive, unpredictable).
pub fn random_serial() -> Result<SerialNumber, KeysError> {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::new(&b).map_err(build_err)
}

fn validity(p: &CertProfile) -> Result<Validity, KeysError> {
    // Whole seconds: certificates carry no fractions.
    let start = p
        .not_before
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(build_err)?;
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(start.as_secs());
    let end = start + p.lifetime;
    Ok(Validity {
        not_before: Time::GeneralTime(GeneralizedTime::from_system_time(start).map_err(build_err)?),
        not_after: Time::GeneralTime(GeneralizedTime::from_system_time(end).map_err(build_err)?),
    })
}

fn spki_of(key: &KeyHandle) -> Result<SubjectPublicKeyInfoOwned, KeysError> {
    SubjectPublicKeyInfoOwned::from_key(key.public_key).map_err(build_err)
}

/// A builder with our defaults: random serial, the profile's subject and validity, and no
/// extensions but those the caller adds (`issuer: None` = self-signed).
fn builder<'s>(
    profile: &CertProfile,
    issuer: Option<Name>,
    spki: SubjectPublicKeyInfoOwned,
    signer: &'s TokenSigner<'s>,
) -> Result<CertificateBuilder<'s, TokenSigner<'s>>, KeysError> {
    let subject = Name::from_str(&profile.subject).map_err(build_err)?;
    CertificateBuilder::new(
        Profile::Manual { issuer },
        random_serial()?,
        validity(profile)?,
        subject,
        spki,
        signer,
    )
    .map_err(build_err)
}

/// Builds the self-signed CSCA certificate: CA with pathLen 0, keyCertSign + cRLSign, SKI.
pub fn build_csca(
    token: &Token,
    key: &KeyHandle,
    profile: &CertProfile,
) -> Result<Certificate, KeysError> {
    let signer = TokenSigner::new(token, key);
    let spki = spki_of(key)?;
    let ski = SubjectKeyIdentifier::try_from(spki.owned_to_ref()).map_err(build_err)?;
    let mut b = builder(profile, None, spki, &signer)?;
    b.add_extension(&BasicConstraints {
        ca: true,
        path_len_constraint: Some(0),
    })
    .map_err(build_err)?;
    b.add_extension(&KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign))
        .map_err(build_err)?;
    b.add_extension(&ski).map_err(build_err)?;
    b.build::<DerSignature>().map_err(build_err)
}

/// Builds a DSC certificate for `dsc_key`, signed by the CSCA key: keyUsage digitalSignature,
/// AKI = the CSCA's SKI, SKI, and an extended key usage naming exactly `types`
/// (`1.3.6.1.4.1.1847.2021.1.{1,2,3}`).
pub fn build_dsc(
    token: &Token,
    csca_key: &KeyHandle,
    csca_cert: &Certificate,
    dsc_key: &KeyHandle,
    types: &[CertType],
    profile: &CertProfile,
) -> Result<Certificate, KeysError> {
    let eku = types
        .iter()
        .map(|t| ObjectIdentifier::new(t.eku_oid()).map_err(build_err))
        .collect::<Result<Vec<_>, _>>()?;
    build_leaf(
        token,
        csca_key,
        csca_cert,
        &dsc_key.public_key,
        &eku,
        None,
        profile,
        KeyUsages::DigitalSignature,
    )
}

/// Builds an end-entity certificate for `public_key`, signed inside the token by `ca_key`:
/// keyUsage `usage` (critical; digitalSignature for DSCs and TLS), AKI = the CA's SKI, SKI, a
/// non-critical extended key usage with `eku` (omitted when empty) and an optional subject
/// alternative name.
#[allow(clippy::too_many_arguments)]
pub fn build_leaf(
    token: &Token,
    ca_key: &KeyHandle,
    ca_cert: &Certificate,
    public_key: &p256::PublicKey,
    eku: &[ObjectIdentifier],
    san: Option<SubjectAltName>,
    profile: &CertProfile,
    usage: KeyUsages,
) -> Result<Certificate, KeysError> {
    let signer = TokenSigner::new(token, ca_key);
    let spki = SubjectPublicKeyInfoOwned::from_key(*public_key).map_err(build_err)?;
    let ski = SubjectKeyIdentifier::try_from(spki.owned_to_ref()).map_err(build_err)?;
    let ca_ski = ca_cert
        .tbs_certificate
        .get::<SubjectKeyIdentifier>()
        .map_err(build_err)?
        .map(|(_, ski)| ski.0)
        .ok_or_else(|| KeysError::Build("CA certificate has no subject key identifier".into()))?;
    let aki = AuthorityKeyIdentifier {
        key_identifier: Some(OctetString::new(ca_ski.as_bytes()).map_err(build_err)?),
        authority_cert_issuer: None,
        authority_cert_serial_number: None,
    };
    let issuer = Some(ca_cert.tbs_certificate.subject.clone());
    let mut b = builder(profile, issuer, spki, &signer)?;
    b.add_extension(&KeyUsage(usage.into()))
        .map_err(build_err)?;
    b.add_extension(&aki).map_err(build_err)?;
    b.add_extension(&ski).map_err(build_err)?;
    if !eku.is_empty() {
        b.add_extension(&NonCriticalEku(ExtendedKeyUsage(eku.to_vec())))
            .map_err(build_err)?;
    }
    if let Some(san) = san {
        b.add_extension(&san).map_err(build_err)?;
    }
    b.build::<DerSignature>().map_err(build_err)
}

/// An extended key usage marked non-critical, as in the EU's DSCs (x509-cert marks EKU critical
/// by default).
struct NonCriticalEku(ExtendedKeyUsage);

impl const_oid::AssociatedOid for NonCriticalEku {
    const OID: ObjectIdentifier = const_oid::db::rfc5280::ID_CE_EXT_KEY_USAGE;
}

impl der::Encode for NonCriticalEku {
    fn encoded_len(&self) -> der::Result<der::Length> {
        self.0.encoded_len()
    }
    fn encode(&self, w: &mut impl der::Writer) -> der::Result<()> {
        self.0.encode(w)
    }
}

impl x509_cert::ext::AsExtension for NonCriticalEku {
    fn critical(&self, _: &Name, _: &[x509_cert::ext::Extension]) -> bool {
        false
    }
}

/// PEM text of a certificate.
pub(crate) fn to_pem(cert: &Certificate) -> Result<String, KeysError> {
    let der = cert.to_der().map_err(build_err)?;
    Ok(der_to_pem(&der))
}

/// PEM-armours DER certificate bytes.
pub(crate) fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}
