//! COSE_Sign1 (RFC 8152 §4.2), tag 18, with alg and kid in the protected header.

use ciborium::tag::Required;
use coset::{iana, CborSerializable, CoseSign1, Header, HeaderBuilder, TaggedCborSerializable};
use serde::ser::{Serialize, SerializeMap, Serializer};

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
}

/// The bytes to sign: CBOR `["Signature1", protected, h'', payload]`.
pub fn sig_structure(protected: &ProtectedHeader, payload: &[u8]) -> Vec<u8> {
    sig_structure_raw(protected.bytes(), payload)
}

/// The Sig_structure over arbitrary protected-header bytes (verification of foreign data).
pub fn sig_structure_raw(protected: &[u8], payload: &[u8]) -> Vec<u8> {
    let sig_structure = ("Signature1", Bstr(protected), Bstr(&[]), Bstr(payload));
    cbor(&sig_structure, payload.len() + protected.len() + 16)
}

/// The tagged COSE_Sign1: `18([protected, {}, payload, signature])`.
pub fn assemble(protected: &ProtectedHeader, payload: &[u8], signature: &[u8; 64]) -> Vec<u8> {
    let sign1 = (
        Bstr(protected.bytes()),
        EmptyMap,
        Bstr(payload),
        Bstr(signature),
    );
    let tagged: Required<_, COSE_SIGN1_TAG> = Required(sign1);
    cbor(&tagged, payload.len() + protected.bytes().len() + 80)
}

/// CBOR tag of a COSE_Sign1 (RFC 9052 §4.2).
const COSE_SIGN1_TAG: u64 = 18;

/// Serialises `value` (arrays of byte strings, text and maps: cannot fail into a `Vec`) into a
/// buffer of `capacity` bytes, straight from the borrowed parts: no CBOR tree and no copies.
fn cbor(value: &impl Serialize, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    let _ = ciborium::ser::into_writer(value, &mut out);
    out
}

/// A CBOR byte string (a plain `&[u8]` would serialise as an array of integers).
struct Bstr<'a>(&'a [u8]);

impl Serialize for Bstr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// The empty unprotected header `{}`.
struct EmptyMap;

impl Serialize for EmptyMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
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
    fn direct_encoding_is_the_bytes_coset_and_a_cbor_tree_give() {
        use ciborium::Value;
        let h = ProtectedHeader::es256([0x5f, 0x74, 0x91, 0x01, 0x95, 0xc5, 0xce, 0xcb]);
        // Payloads across every CBOR length class of a byte string.
        for n in [0, 1, 23, 24, 255, 256, 400, 65_535, 65_536] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let sig = [0xa5; 64];
            let reference = CoseSign1 {
                protected: coset::ProtectedHeader {
                    original_data: Some(h.bytes().to_vec()),
                    header: Header::from_slice(h.bytes()).unwrap(),
                },
                unprotected: Header::default(),
                payload: Some(payload.clone()),
                signature: sig.to_vec(),
            }
            .to_tagged_vec()
            .unwrap();
            assert_eq!(
                assemble(&h, &payload, &sig),
                reference,
                "payload of {n} bytes"
            );
            let tree = Value::Array(vec![
                Value::Text("Signature1".into()),
                Value::Bytes(h.bytes().to_vec()),
                Value::Bytes(Vec::new()),
                Value::Bytes(payload.clone()),
            ]);
            let mut expected = Vec::new();
            ciborium::ser::into_writer(&tree, &mut expected).unwrap();
            assert_eq!(
                sig_structure(&h, &payload),
                expected,
                "payload of {n} bytes"
            );
        }
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
