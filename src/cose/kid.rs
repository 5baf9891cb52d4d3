//! The key identifier of a DSC.

use sha2::{Digest, Sha256};

/// The kid: the first 8 bytes of SHA-256 over the DER of the DSC certificate.
pub fn kid(dsc_der: &[u8]) -> [u8; 8] {
    let d = Sha256::digest(dsc_der);
    let mut k = [0u8; 8];
    k.copy_from_slice(&d[..8]);
    k
}
