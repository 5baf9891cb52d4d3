//! The container formats: CWT claims, COSE_Sign1, HC1 (zlib + Base45 + prefix), QR codes, the
//! kid, and verification against a trust store.
//!
//! This module produces the exact bytes to be signed ([`sign1::sig_structure`]) and assembles
//! the result ([`sign1::assemble`]); the signature itself comes from the HSM. Format rules follow
//! the eHN HCERT specification v1.0.8 (see DOMAIN.md §1).

pub mod cbor_json;
pub mod cwt;
pub mod hc1;
pub mod kid;
pub mod qr;
pub mod sign1;
pub mod trust;
pub mod verify;

pub use cwt::CwtClaims;
pub use sign1::{Algorithm, ProtectedHeader};
pub use trust::{TrustStore, TrustedDsc};
pub use verify::{verify_cose, verify_hc1, Report, VerifyFailure};

/// An error decoding or encoding the container formats.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoseError {
    /// The text does not start with the `HC1:` context identifier.
    #[error("missing HC1: prefix")]
    Prefix,
    /// The Base45 text is malformed.
    #[error("base45: {0}")]
    Base45(String),
    /// The zlib stream is malformed.
    #[error("zlib: {0}")]
    Zlib(String),
    /// The bytes are not well-formed CBOR.
    #[error("CBOR: {0}")]
    Cbor(String),
    /// The CBOR is not a COSE_Sign1 structure.
    #[error("COSE_Sign1 structure: {0}")]
    Structure(String),
    /// The CWT claims are missing or of the wrong type.
    #[error("CWT claims: {0}")]
    Claims(String),
    /// A QR code could not be produced (e.g. too much data).
    #[error("QR code: {0}")]
    Qr(String),
    /// A certificate for the trust store could not be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
}
