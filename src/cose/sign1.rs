//! COSE_Sign1 (RFC 8152 §4.2), tag 18, with alg and kid in the protected header.

use ciborium::Value;
use coset::{iana, CborSerializable, CoseSign1, Header, HeaderBuilder, TaggedCborSerializable};

use super::CoseError;

/// Signature algorithms of the HCERT specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// ECDSA P-256 with SHA-256 (COSE -7), primary.
    Es256,
    /// RSASSA-PSS with SHA-256 (COSE -37), secondary.
    Ps256,
}

/// The protected header bytes for one kid, encoded once and reused for every signature (we
/// always sign exactly the bytes we emit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedHeader {
    bytes: Vec<u8>,
    kid: [u8; 8],
}

impl ProtectedHeader {
    /// `{1: -7, 4: h'kid'}`: ES256 and the kid, both protected.
    pub fn es256(kid: [u8; 8]) -> Self {
        let header = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES256)
            .key_id(kid.to_vec())
            .build();
        // Encoding a header map of an int and a byte string cannot fail.
        let bytes = header.to_vec().unwrap_or_default();
        ProtectedHeader { bytes, kid }
    }

    /// The serialized header map.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The kid it carries.
    pub fn kid(&self) -> [u8; 8] {
        self.kid
    }

    fn coset(&self) -> coset::ProtectedHeader {
        coset::ProtectedHeader {
            original_data: Some(self.bytes.clone()),
            header: Header::from_slice(&self.bytes).unwrap_or_default(),
        }
    }
}

/// The bytes to sign: CBOR `["Signature1", protected, h'', payload]`.
pub fn sig_structure(protected: &ProtectedHeader, payload: &[u8]) -> Vec<u8> {
    sig_structure_raw(protected.bytes(), payload)
}

/// The Sig_structure over arbitrary protected-header bytes (verification of foreign data).
pub fn sig_structure_raw(protected: &[u8], payload: &[u8]) -> Vec<u8> {
    let arr = Value::Array(vec![
        Value::Text("Signature1".into()),
        Value::Bytes(protected.to_vec()),
        Value::Bytes(Vec::new()),
        Value::Bytes(payload.to_vec()),
    ]);
    let mut out = Vec::with_capacity(payload.len() + protected.len() + 16);
    let _ = ciborium::ser::into_writer(&arr, &mut out);
    out
}

/// The tagged COSE_Sign1: `18([protected, {}, payload, signature])`.
pub fn assemble(protected: &ProtectedHeader, payload: &[u8], signature: &[u8; 64]) -> Vec<u8> {
    let msg = CoseSign1 {
        protected: protected.coset(),
        unprotected: Header::default(),
        payload: Some(payload.to_vec()),
        signature: signature.to_vec(),
    };
    msg.to_tagged_vec().unwrap_or_default()
}

/// A parsed COSE_Sign1 from any issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSign1 {
    /// The protected header bytes exactly as received.
    pub protected: Vec<u8>,
    /// The algorithm, when recognised.
    pub alg: Option<Algorithm>,
    /// The kid: from the protected header, else from the unprotected one.
    pub kid: Option<Vec<u8>>,
    /// The payload (the CWT).
    pub payload: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
    /// Whether it carried CBOR tag 18.
    pub tagged: bool,
}

fn alg_of(h: &Header) -> Option<Algorithm> {
    match &h.alg {
        Some(coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES256)) => {
            Some(Algorithm::Es256)
        }
        Some(coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::PS256)) => {
            Some(Algorithm::Ps256)
        }
        _ => None,
    }
}

/// Parses a COSE_Sign1, tagged (18) or not; a CWT tag (61) around it is tolerated.
pub fn parse(cose: &[u8]) -> Result<ParsedSign1, CoseError> {
    let mut bytes = cose;
    // CBOR tag 61 (CWT) is D8 3D.
    if bytes.starts_with(&[0xd8, 0x3d]) {
        bytes = &bytes[2..];
    }
    let tagged = bytes.first() == Some(&0xd2);
    let msg = if tagged {
        CoseSign1::from_tagged_slice(bytes)
    } else {
        CoseSign1::from_slice(bytes)
    }
    .map_err(|e| CoseError::Structure(format!("{e:?}")))?;
    let kid = if !msg.protected.header.key_id.is_empty() {
        Some(msg.protected.header.key_id.clone())
    } else if !msg.unprotected.key_id.is_empty() {
        Some(msg.unprotected.key_id.clone())
    } else {
        None
    };
    let alg = alg_of(&msg.protected.header).or_else(|| alg_of(&msg.unprotected));
    Ok(ParsedSign1 {
        protected: msg.protected.original_data.clone().unwrap_or_default(),
        alg,
        kid,
        payload: msg
            .payload
            .ok_or_else(|| CoseError::Structure("detached payload".into()))?,
        signature: msg.signature,
        tagged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_header_bytes() {
        let kid = [0x5f, 0x74, 0x91, 0x01, 0x95, 0xc5, 0xce, 0xcb];
        let h = ProtectedHeader::es256(kid);
        let mut expected = vec![0xa2, 0x01, 0x26, 0x04, 0x48];
        expected.extend_from_slice(&kid);
        assert_eq!(h.bytes(), &expected[..]);
    }

    #[test]
    fn assemble_and_parse() {
        let h = ProtectedHeader::es256([1; 8]);
        let cose = assemble(&h, b"payload", &[9; 64]);
        assert_eq!(&cose[..2], &[0xd2, 0x84]);
        let p = parse(&cose).unwrap();
        assert!(p.tagged);
        assert_eq!(p.alg, Some(Algorithm::Es256));
        assert_eq!(p.kid.as_deref(), Some(&[1u8; 8][..]));
        assert_eq!(p.protected, h.bytes());
        assert_eq!(p.payload, b"payload");
        assert_eq!(p.signature, vec![9; 64]);
        // Empty unprotected header map.
        assert!(cose.windows(1).any(|w| w == [0xa0]));
        let tbs = sig_structure(&h, b"payload");
        assert_eq!(tbs[0], 0x84);
        assert_eq!(&tbs[1..12], b"\x6aSignature1");
    }
}
