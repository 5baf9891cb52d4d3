//! Revocation hashes of the EU "Revocation B2B" specification: the first 16 bytes of a SHA-256,
//! sent base64 with padding (24 characters).

use base64::Engine;
use sha2::{Digest, Sha256};

/// A 16-byte revocation hash.
pub type RevocationHash = [u8; 16];

fn first16(data: &[&[u8]]) -> RevocationHash {
    let mut h = Sha256::new();
    for d in data {
        h.update(d);
    }
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// `SIGNATURE` hash of an ES256 signature: SHA-256 over `r` only (the first 32 bytes of the
/// 64-byte `r||s`), so that re-encodings of `s` (malleability) map to the same entry.
pub fn signature_hash_es256(signature: &[u8; 64]) -> RevocationHash {
    first16(&[&signature[..32]])
}

/// `SIGNATURE` hash of a PS256 signature: SHA-256 over the whole signature.
pub fn signature_hash_ps256(signature: &[u8]) -> RevocationHash {
    first16(&[signature])
}

/// `UCI` hash (deprecated upstream): SHA-256 over the UTF-8 UVCI.
pub fn uci_hash(uvci: &str) -> RevocationHash {
    first16(&[uvci.as_bytes()])
}

/// `COUNTRYCODEUCI` hash (deprecated upstream): SHA-256 over the issuing country code followed
/// by the UVCI.
pub fn country_uci_hash(country: &str, uvci: &str) -> RevocationHash {
    first16(&[country.as_bytes(), uvci.as_bytes()])
}

/// Base64 with padding, as the gateway expects (24 characters).
pub fn to_base64(h: &RevocationHash) -> String {
    base64::engine::general_purpose::STANDARD.encode(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from DOMAIN.md §5.
    const UVCI: &str = "URN:UVCI:01:SE:EHM/TARN89875439877";

    #[test]
    fn uci_vector() {
        assert_eq!(to_base64(&uci_hash(UVCI)), "l1wSv/+3M+V2uniI/yPGLw==");
    }

    #[test]
    fn country_uci_vector() {
        assert_eq!(
            to_base64(&country_uci_hash("SE", UVCI)),
            "cZP4f4VA8Uqaz1Yo9q6nPA=="
        );
    }

    #[test]
    fn signature_vector_uses_r_only() {
        let mut sig = [0u8; 64];
        for (i, b) in sig.iter_mut().enumerate().take(32) {
            *b = (i + 1) as u8;
        }
        assert_eq!(
            to_base64(&signature_hash_es256(&sig)),
            "riFsLvUkejeCwTXvonmj5A=="
        );
        // s does not matter.
        sig[40] = 0xff;
        assert_eq!(
            to_base64(&signature_hash_es256(&sig)),
            "riFsLvUkejeCwTXvonmj5A=="
        );
        // PS256 hashes the whole signature.
        assert_ne!(signature_hash_ps256(&sig), signature_hash_es256(&sig));
    }
}
