//! The EU gateway upload package for a DSC: CMS SignedData (RFC 5652) with the DSC's DER as
//! attached content (`id-data`), exactly one signer and one certificate — the country's upload
//! certificate, whose key signs inside the HSM.

use cms::builder::{SignedDataBuilder, SignerInfoBuilder};
use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::signed_data::{EncapsulatedContentInfo, SignerIdentifier};
use der::{Any, Encode, Tag};
use p256::ecdsa::DerSignature;
use spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;

use super::KeysError;
use crate::hsm::{KeyHandle, Token, TokenSigner};

fn err(e: impl std::fmt::Display) -> KeysError {
    KeysError::Build(format!("CMS: {e}"))
}

/// CMS SignedData (DER, as a ContentInfo) over `content`, signed by `upload_key` whose
/// certificate is `upload_cert`: SHA-256, ecdsa-with-SHA256, signed attributes (content type,
/// message digest, signing time).
pub fn signed_data(
    token: &Token,
    upload_key: &KeyHandle,
    upload_cert: &Certificate,
    content: &[u8],
) -> Result<Vec<u8>, KeysError> {
    let eci = EncapsulatedContentInfo {
        econtent_type: const_oid::db::rfc5911::ID_DATA,
        econtent: Some(Any::new(Tag::OctetString, content).map_err(err)?),
    };
    let signer = TokenSigner::new(token, upload_key);
    let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
        issuer: upload_cert.tbs_certificate.issuer.clone(),
        serial_number: upload_cert.tbs_certificate.serial_number.clone(),
    });
    let sha256 = AlgorithmIdentifierOwned {
        oid: const_oid::db::rfc5912::ID_SHA_256,
        parameters: None,
    };
    let info = SignerInfoBuilder::new(&signer, sid, sha256.clone(), &eci, None).map_err(err)?;
    SignedDataBuilder::new(&eci)
        .add_digest_algorithm(sha256)
        .map_err(err)?
        .add_certificate(CertificateChoices::Certificate(upload_cert.clone()))
        .map_err(err)?
        .add_signer_info::<_, DerSignature>(info)
        .map_err(err)?
        .build()
        .map_err(err)?
        .to_der()
        .map_err(err)
}
