//! The verifier-side revocation list (`docs/revocation.md`, "Verifier list"): per DSC kid, the
//! sorted set of revoked `SIGNATURE` hashes with a monotonically increasing version, encoded as
//! deterministic CBOR and signed as a COSE_Sign1 (ES256) by the list-signing key in the token;
//! plus a delta form that takes a verifier from one version to a later one.
//!
//! Payload layout (CBOR map, integer keys, canonical: definite lengths, shortest integers, keys
//! in ascending order, hashes sorted ascending and unique):
//!
//! ```text
//! full  = { 1: 1, 2: bstr .size 8 (DSC kid), 3: uint (version), 4: uint (issued, NumericDate),
//!           5: [* bstr .size 16] (revoked hashes) }
//! delta = { 1: 1, 2: kid, 3: uint (version), 4: uint (issued),
//!           6: uint (since), 7: [* bstr .size 16] (added), 8: [* bstr .size 16] (removed) }
//! ```
//!
//! COSE protected header: `{1: -7 (ES256), 3: content type, 4: list key kid}` where the content
//! type is [`CONTENT_TYPE_FULL`] or [`CONTENT_TYPE_DELTA`] and the list key kid is the first 8
//! bytes of SHA-256 over the list key's SubjectPublicKeyInfo DER ([`list_key_kid`]).
//!
//! The list is built purely from [`ListEntry`] rows (the version at which each hash was added
//! and, if the revocation was lifted, removed); signing takes a closure so that the digest can
//! be signed inside the token.

use std::collections::BTreeSet;

use ciborium::Value;
use coset::{iana, CborSerializable, CoseSign1, Header, HeaderBuilder, TaggedCborSerializable};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use sha2::{Digest, Sha256};

use super::hash::RevocationHash;
use crate::cose::sign1::sig_structure_raw;

/// Version of the payload layout (key 1). A decoder refuses any other.
pub const FORMAT_VERSION: u64 = 1;
/// COSE content type (protected header label 3) of a full list.
pub const CONTENT_TYPE_FULL: &str = "application/vnd.dccsign.revocation-list+cbor";
/// COSE content type (protected header label 3) of a delta.
pub const CONTENT_TYPE_DELTA: &str = "application/vnd.dccsign.revocation-delta+cbor";

/// Map keys of the payload.
mod key {
    pub const FORMAT: u64 = 1;
    pub const KID: u64 = 2;
    pub const VERSION: u64 = 3;
    pub const ISSUED: u64 = 4;
    pub const HASHES: u64 = 5;
    pub const SINCE: u64 = 6;
    pub const ADDED: u64 = 7;
    pub const REMOVED: u64 = 8;
}

/// Why a list could not be opened, decoded or applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListError {
    /// The bytes are not a tagged (18) COSE_Sign1 with an attached payload.
    #[error("revocation list: not a tagged COSE_Sign1 with a payload: {0}")]
    Structure(String),
    /// The protected header does not name ES256.
    #[error("revocation list: the protected header does not name ES256")]
    UnsupportedAlgorithm,
    /// The protected header carries no kid.
    #[error("revocation list: no kid in the protected header")]
    MissingKid,
    /// The list was signed by another key than the one given to verify it.
    #[error("revocation list: signed by key {found}, expected the list key {expected}")]
    WrongKey {
        /// kid (hex) of the given public key.
        expected: String,
        /// kid (hex) in the list's protected header.
        found: String,
    },
    /// The signature does not verify with the list key.
    #[error("revocation list: the signature does not verify with the list key")]
    BadSignature,
    /// The content type is missing, unknown, or does not match the payload's form.
    #[error("revocation list: content type {0}")]
    ContentType(String),
    /// The payload is not well-formed CBOR.
    #[error("revocation list payload: CBOR: {0}")]
    Cbor(String),
    /// The payload uses a layout version this build does not know.
    #[error("revocation list payload: format version {0} is not supported (expected 1)")]
    UnsupportedFormat(u64),
    /// The payload's map is missing a field, has an unknown one, or a field of the wrong type.
    #[error("revocation list payload: {0}")]
    Malformed(String),
    /// The payload is well-formed but not in the canonical encoding.
    #[error("revocation list payload: not in canonical CBOR encoding")]
    NotCanonical,
    /// A delta was given where a full list is needed.
    #[error("revocation list: this is a delta (since version {since}); a full list is needed")]
    NotFull {
        /// The delta's base version.
        since: u64,
    },
    /// A full list was given where a delta is needed.
    #[error("revocation list: this is a full list; a delta is needed")]
    NotDelta,
    /// The delta is for another DSC.
    #[error("revocation delta is for kid {delta}, the list for kid {list}")]
    KidMismatch {
        /// kid (hex) of the full list.
        list: String,
        /// kid (hex) of the delta.
        delta: String,
    },
    /// The delta does not start at the full list's version.
    #[error("revocation delta starts at version {since}, the list is at version {list}")]
    VersionMismatch {
        /// The full list's version.
        list: u64,
        /// The delta's base version.
        since: u64,
    },
    /// The delta would take the version backwards.
    #[error("revocation delta goes backwards: since {since}, version {version}")]
    Backwards {
        /// The delta's base version.
        since: u64,
        /// The delta's version.
        version: u64,
    },
    /// The delta does not fit the list it is applied to.
    #[error("revocation delta does not fit the list: {0}")]
    Inconsistent(String),
}

/// One revocation as the store keeps it: the hash and the list versions at which it was added
/// and, if the revocation was lifted, removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListEntry {
    /// The `SIGNATURE` hash of the revoked certificate.
    pub hash: RevocationHash,
    /// Version at which the revocation was recorded.
    pub added: u64,
    /// Version at which the revocation was lifted, if it was.
    pub removed: Option<u64>,
}

impl ListEntry {
    /// Whether the hash is revoked in the list at version `v`.
    fn present_at(&self, v: u64) -> bool {
        self.added <= v && self.removed.is_none_or(|r| r > v)
    }
}

/// What a list carries besides its header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListBody {
    /// The complete set of revoked hashes at the list's version (sorted, unique).
    Full {
        /// Revoked hashes.
        hashes: Vec<RevocationHash>,
    },
    /// The changes from version `since` to the list's version (each sorted, unique, disjoint).
    Delta {
        /// The version the delta applies to.
        since: u64,
        /// Hashes revoked after `since` and still revoked.
        added: Vec<RevocationHash>,
        /// Hashes revoked at `since` whose revocation has been lifted since.
        removed: Vec<RevocationHash>,
    },
}

/// A revocation list of one DSC, full or delta. Built by [`full`], [`delta`],
/// [`RevocationList::from_cbor`], [`open`] or [`RevocationList::apply`]; the hashes are always
/// sorted and unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationList {
    kid: [u8; 8],
    version: u64,
    issued: u64,
    body: ListBody,
}

/// The list's version: the highest version any entry was added or removed at (0 if none).
fn current_version(entries: &[ListEntry]) -> u64 {
    entries
        .iter()
        .flat_map(|e| std::iter::once(e.added).chain(e.removed))
        .max()
        .unwrap_or(0)
}

fn present_at(entries: &[ListEntry], v: u64) -> BTreeSet<RevocationHash> {
    entries
        .iter()
        .filter(|e| e.present_at(v))
        .map(|e| e.hash)
        .collect()
}

/// The full list of DSC `kid` at the current version (the highest version in `entries`, 0 if
/// none): every hash whose revocation has not been lifted. `issued` is a Unix time (negative
/// values are taken as 0).
pub fn full(kid: [u8; 8], entries: &[ListEntry], issued: i64) -> RevocationList {
    let version = current_version(entries);
    RevocationList {
        kid,
        version,
        issued: issued.max(0) as u64,
        body: ListBody::Full {
            hashes: present_at(entries, version).into_iter().collect(),
        },
    }
}

/// The delta of DSC `kid` from version `since` to the current version: `added` = revoked now
/// but not at `since`, `removed` = revoked at `since` but lifted since. Applied to the full list
/// at `since` it gives [`full`]. `issued` as in [`full`].
pub fn delta(kid: [u8; 8], entries: &[ListEntry], since: u64, issued: i64) -> RevocationList {
    let version = current_version(entries);
    let now = present_at(entries, version);
    let then = present_at(entries, since);
    RevocationList {
        kid,
        version,
        issued: issued.max(0) as u64,
        body: ListBody::Delta {
            since,
            added: now.difference(&then).copied().collect(),
            removed: then.difference(&now).copied().collect(),
        },
    }
}

fn hash_array(hashes: &[RevocationHash]) -> Value {
    Value::Array(hashes.iter().map(|h| Value::Bytes(h.to_vec())).collect())
}

fn uint(v: u64) -> Value {
    Value::Integer(v.into())
}

impl RevocationList {
    /// The same list labelled with version `v` when that is higher than its own: the store's
    /// change counter, which keeps growing when purged rows take the highest entry version
    /// with them (a list version never goes back).
    pub fn at_version(mut self, v: u64) -> RevocationList {
        self.version = self.version.max(v);
        self
    }

    /// The DSC kid the list is for.
    pub fn kid(&self) -> [u8; 8] {
        self.kid
    }

    /// The list's version (for a delta: the version it leads to).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the list was built (Unix time).
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// The hashes (full) or changes (delta).
    pub fn body(&self) -> &ListBody {
        &self.body
    }

    /// Whether this is a delta.
    pub fn is_delta(&self) -> bool {
        matches!(self.body, ListBody::Delta { .. })
    }

    /// A delta's base version (`None` for a full list).
    pub fn since(&self) -> Option<u64> {
        match self.body {
            ListBody::Delta { since, .. } => Some(since),
            ListBody::Full { .. } => None,
        }
    }

    /// Whether `h` is revoked. For a full list this is the answer; a delta only knows what it
    /// adds, so for a delta this is "among the added hashes" — apply it to a full list first.
    pub fn contains(&self, h: &RevocationHash) -> bool {
        match &self.body {
            ListBody::Full { hashes } => hashes.binary_search(h).is_ok(),
            ListBody::Delta { added, .. } => added.binary_search(h).is_ok(),
        }
    }

    /// Applies `delta` to this full list: the full list at the delta's version. The delta must
    /// be for the same kid, start at this list's version, not go backwards, and fit (it only
    /// removes hashes the list has and only adds hashes it lacks).
    pub fn apply(&self, delta: &RevocationList) -> Result<RevocationList, ListError> {
        let ListBody::Full { hashes } = &self.body else {
            return Err(ListError::NotFull {
                since: self.since().unwrap_or_default(),
            });
        };
        let ListBody::Delta {
            since,
            added,
            removed,
        } = &delta.body
        else {
            return Err(ListError::NotDelta);
        };
        if delta.kid != self.kid {
            return Err(ListError::KidMismatch {
                list: hex::encode(self.kid),
                delta: hex::encode(delta.kid),
            });
        }
        if *since != self.version {
            return Err(ListError::VersionMismatch {
                list: self.version,
                since: *since,
            });
        }
        if delta.version < *since {
            return Err(ListError::Backwards {
                since: *since,
                version: delta.version,
            });
        }
        let mut set: BTreeSet<RevocationHash> = hashes.iter().copied().collect();
        for h in removed {
            if !set.remove(h) {
                return Err(ListError::Inconsistent(format!(
                    "it removes {} which the list does not hold",
                    hex::encode(h)
                )));
            }
        }
        for h in added {
            if !set.insert(*h) {
                return Err(ListError::Inconsistent(format!(
                    "it adds {} which the list already holds",
                    hex::encode(h)
                )));
            }
        }
        Ok(RevocationList {
            kid: self.kid,
            version: delta.version,
            issued: delta.issued,
            body: ListBody::Full {
                hashes: set.into_iter().collect(),
            },
        })
    }

    /// The canonical CBOR payload (see the module documentation). The same list always gives
    /// the same bytes.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut map = vec![
            (uint(key::FORMAT), uint(FORMAT_VERSION)),
            (uint(key::KID), Value::Bytes(self.kid.to_vec())),
            (uint(key::VERSION), uint(self.version)),
            (uint(key::ISSUED), uint(self.issued)),
        ];
        match &self.body {
            ListBody::Full { hashes } => map.push((uint(key::HASHES), hash_array(hashes))),
            ListBody::Delta {
                since,
                added,
                removed,
            } => {
                map.push((uint(key::SINCE), uint(*since)));
                map.push((uint(key::ADDED), hash_array(added)));
                map.push((uint(key::REMOVED), hash_array(removed)));
            }
        }
        let mut out = Vec::new();
        // Writing a map of integers, byte strings and arrays into a Vec cannot fail.
        let _ = ciborium::ser::into_writer(&Value::Map(map), &mut out);
        out
    }

    /// Decodes a payload written by [`RevocationList::to_cbor`]. Refuses unknown format
    /// versions, unknown or missing fields, unsorted or repeated hashes, and any encoding other
    /// than the canonical one (so one list has exactly one encoding).
    pub fn from_cbor(bytes: &[u8]) -> Result<RevocationList, ListError> {
        let value: Value =
            ciborium::de::from_reader(bytes).map_err(|e| ListError::Cbor(e.to_string()))?;
        let Value::Map(pairs) = value else {
            return Err(ListError::Malformed("not a map".into()));
        };
        let mut fields: [Option<Value>; 9] = Default::default();
        for (k, v) in pairs {
            let k = as_uint(&k)
                .filter(|k| (key::FORMAT..=key::REMOVED).contains(k))
                .ok_or_else(|| ListError::Malformed(format!("unknown key {k:?}")))?;
            let slot = &mut fields[k as usize];
            if slot.is_some() {
                return Err(ListError::Malformed(format!("key {k} appears twice")));
            }
            *slot = Some(v);
        }
        let mut take = |k: u64| fields[k as usize].take();
        let format = take(key::FORMAT)
            .as_ref()
            .and_then(as_uint)
            .ok_or_else(|| {
                ListError::Malformed("format version (1) missing or not a uint".into())
            })?;
        if format != FORMAT_VERSION {
            return Err(ListError::UnsupportedFormat(format));
        }
        let kid: [u8; 8] = match take(key::KID) {
            Some(Value::Bytes(b)) => b
                .try_into()
                .map_err(|_| ListError::Malformed("kid (2) is not 8 bytes".into()))?,
            _ => return Err(ListError::Malformed("kid (2) missing or not a bstr".into())),
        };
        let uint_field = |v: Option<Value>, name: &str| {
            v.as_ref()
                .and_then(as_uint)
                .ok_or_else(|| ListError::Malformed(format!("{name} missing or not a uint")))
        };
        let version = uint_field(take(key::VERSION), "version (3)")?;
        let issued = uint_field(take(key::ISSUED), "issued (4)")?;
        let hashes = take(key::HASHES);
        let since = take(key::SINCE);
        let added = take(key::ADDED);
        let removed = take(key::REMOVED);
        let body = match (hashes, since, added, removed) {
            (Some(h), None, None, None) => ListBody::Full {
                hashes: hash_list(h, "hashes (5)")?,
            },
            (None, Some(s), Some(a), Some(r)) => {
                let added = hash_list(a, "added (7)")?;
                let removed = hash_list(r, "removed (8)")?;
                if let Some(h) = added.iter().find(|h| removed.binary_search(h).is_ok()) {
                    return Err(ListError::Malformed(format!(
                        "{} is both added and removed",
                        hex::encode(h)
                    )));
                }
                ListBody::Delta {
                    since: uint_field(Some(s), "since (6)")?,
                    added,
                    removed,
                }
            }
            _ => {
                return Err(ListError::Malformed(
                    "neither a full list (5) nor a delta (6, 7, 8)".into(),
                ))
            }
        };
        let list = RevocationList {
            kid,
            version,
            issued,
            body,
        };
        if list.to_cbor() != bytes {
            return Err(ListError::NotCanonical);
        }
        Ok(list)
    }

    fn content_type(&self) -> &'static str {
        if self.is_delta() {
            CONTENT_TYPE_DELTA
        } else {
            CONTENT_TYPE_FULL
        }
    }
}

fn as_uint(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// An array of 16-byte byte strings in strictly ascending order.
fn hash_list(v: Value, name: &str) -> Result<Vec<RevocationHash>, ListError> {
    let Value::Array(items) = v else {
        return Err(ListError::Malformed(format!("{name} is not an array")));
    };
    let mut out: Vec<RevocationHash> = Vec::with_capacity(items.len());
    for item in items {
        let h: RevocationHash = match item {
            Value::Bytes(b) => b
                .try_into()
                .map_err(|_| ListError::Malformed(format!("{name}: a hash is not 16 bytes")))?,
            _ => {
                return Err(ListError::Malformed(format!(
                    "{name}: a hash is not a bstr"
                )))
            }
        };
        if out.last().is_some_and(|last| *last >= h) {
            return Err(ListError::Malformed(format!(
                "{name}: hashes not sorted ascending or repeated"
            )));
        }
        out.push(h);
    }
    Ok(out)
}

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, BIT STRING of
/// 66 bytes); the 65-byte uncompressed point follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The kid of the list-signing key: the first 8 bytes of SHA-256 over its SubjectPublicKeyInfo
/// DER.
pub fn list_key_kid(public_key: &p256::PublicKey) -> [u8; 8] {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let point = public_key.to_encoded_point(false);
    let mut h = Sha256::new();
    h.update(P256_SPKI_PREFIX);
    h.update(point.as_bytes());
    let d = h.finalize();
    let mut kid = [0u8; 8];
    kid.copy_from_slice(&d[..8]);
    kid
}

/// The protected header `{1: -7, 3: content type, 4: h'kid'}`, encoded.
fn protected_header(content_type: &str, list_key_kid: [u8; 8]) -> Vec<u8> {
    let header = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .content_type(content_type.to_string())
        .key_id(list_key_kid.to_vec())
        .build();
    // A map of an int, a text and a byte string always encodes.
    header.to_vec().unwrap_or_default()
}

fn sign_payload<E>(
    payload: Vec<u8>,
    content_type: &str,
    list_key_kid: [u8; 8],
    sign: impl FnOnce(&[u8; 32]) -> Result<[u8; 64], E>,
) -> Result<Vec<u8>, E> {
    let protected = protected_header(content_type, list_key_kid);
    let digest: [u8; 32] = Sha256::digest(sig_structure_raw(&protected, &payload)).into();
    let signature = sign(&digest)?;
    let msg = CoseSign1 {
        protected: coset::ProtectedHeader {
            header: Header::from_slice(&protected).unwrap_or_default(),
            original_data: Some(protected),
        },
        unprotected: Header::default(),
        payload: Some(payload),
        signature: signature.to_vec(),
    };
    Ok(msg.to_tagged_vec().unwrap_or_default())
}

/// Signs `list` as a tagged COSE_Sign1 (ES256): `sign` gets SHA-256 of the Sig_structure and
/// returns the raw `r||s` (e.g. from [`crate::hsm::Token::sign_digest`] with the list key);
/// `list_key_kid` is [`list_key_kid`] of that key.
pub fn sign<E>(
    list: &RevocationList,
    list_key_kid: [u8; 8],
    sign: impl FnOnce(&[u8; 32]) -> Result<[u8; 64], E>,
) -> Result<Vec<u8>, E> {
    sign_payload(list.to_cbor(), list.content_type(), list_key_kid, sign)
}

/// Opens a signed list: a tagged COSE_Sign1 whose protected header names ES256, the kid of
/// `public_key` and a list content type, with a signature by `public_key`; then decodes the
/// payload and checks that its form (full or delta) matches the content type.
pub fn open(cose: &[u8], public_key: &p256::PublicKey) -> Result<RevocationList, ListError> {
    let msg =
        CoseSign1::from_tagged_slice(cose).map_err(|e| ListError::Structure(e.to_string()))?;
    let header = &msg.protected.header;
    if header.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::ES256,
        ))
    {
        return Err(ListError::UnsupportedAlgorithm);
    }
    if header.key_id.is_empty() {
        return Err(ListError::MissingKid);
    }
    let expected = list_key_kid(public_key);
    if header.key_id != expected {
        return Err(ListError::WrongKey {
            expected: hex::encode(expected),
            found: hex::encode(&header.key_id),
        });
    }
    let content_type = match &header.content_type {
        Some(coset::RegisteredLabel::Text(t)) => t.clone(),
        Some(other) => return Err(ListError::ContentType(format!("{other:?} is not a list"))),
        None => return Err(ListError::ContentType("missing".into())),
    };
    let payload = msg
        .payload
        .as_ref()
        .ok_or_else(|| ListError::Structure("detached payload".into()))?;
    let protected = msg
        .protected
        .original_data
        .as_deref()
        .ok_or_else(|| ListError::Structure("protected header bytes missing".into()))?;
    let sig =
        p256::ecdsa::Signature::from_slice(&msg.signature).map_err(|_| ListError::BadSignature)?;
    let digest = Sha256::digest(sig_structure_raw(protected, payload));
    p256::ecdsa::VerifyingKey::from(public_key)
        .verify_prehash(&digest, &sig)
        .map_err(|_| ListError::BadSignature)?;
    let list = RevocationList::from_cbor(payload)?;
    if content_type != list.content_type() {
        return Err(ListError::ContentType(format!(
            "{content_type:?} does not match a {} payload",
            if list.is_delta() { "delta" } else { "full" }
        )));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::SigningKey;

    const KID: [u8; 8] = [0x5f, 0x74, 0x91, 0x01, 0x95, 0xc5, 0xce, 0xcb];

    fn h(n: u8) -> RevocationHash {
        [n; 16]
    }

    fn e(n: u8, added: u64, removed: Option<u64>) -> ListEntry {
        ListEntry {
            hash: h(n),
            added,
            removed,
        }
    }

    fn hashes(list: &RevocationList) -> Vec<RevocationHash> {
        match list.body() {
            ListBody::Full { hashes } => hashes.clone(),
            ListBody::Delta { .. } => panic!("not full"),
        }
    }

    fn changes(list: &RevocationList) -> (u64, Vec<RevocationHash>, Vec<RevocationHash>) {
        match list.body() {
            ListBody::Delta {
                since,
                added,
                removed,
            } => (*since, added.clone(), removed.clone()),
            ListBody::Full { .. } => panic!("not a delta"),
        }
    }

    /// h9 added 1; h2 added 2, lifted at 4; h3 added 3; h1 added 5 (unsorted on purpose).
    fn sample() -> Vec<ListEntry> {
        vec![
            e(9, 1, None),
            e(2, 2, Some(4)),
            e(3, 3, None),
            e(1, 5, None),
        ]
    }

    fn sign_sw<'a>(
        sk: &'a SigningKey,
    ) -> impl FnOnce(&[u8; 32]) -> Result<[u8; 64], p256::ecdsa::Error> + 'a {
        move |d| {
            let s: p256::ecdsa::Signature = sk.sign_prehash(d)?;
            Ok(s.to_bytes().into())
        }
    }

    fn key() -> SigningKey {
        SigningKey::random(&mut rand::rngs::OsRng)
    }

    fn pk(sk: &SigningKey) -> p256::PublicKey {
        p256::PublicKey::from(sk.verifying_key())
    }

    #[test]
    fn full_holds_the_unlifted_hashes_sorted_at_the_highest_version() {
        let list = full(KID, &sample(), 1_700_000_000);
        assert_eq!(list.version(), 5);
        assert_eq!(list.kid(), KID);
        assert_eq!(list.issued(), 1_700_000_000);
        assert!(!list.is_delta());
        assert_eq!(hashes(&list), vec![h(1), h(3), h(9)]);
        assert!(list.contains(&h(9)) && list.contains(&h(1)));
        assert!(
            !list.contains(&h(2)),
            "a lifted revocation is not in the list"
        );
        assert!(!list.contains(&h(4)));
        // The version counts lifts too: lifting at 7 gives version 7.
        let mut lifted = sample();
        lifted[0].removed = Some(7);
        let later = full(KID, &lifted, 0);
        assert_eq!(later.version(), 7);
        assert!(!later.contains(&h(9)));
        // Nothing recorded: version 0, empty.
        let empty = full(KID, &[], -5);
        assert_eq!((empty.version(), empty.issued()), (0, 0));
        assert!(hashes(&empty).is_empty());
    }

    #[test]
    fn delta_adds_what_came_after_since_and_removes_what_was_lifted() {
        let entries = sample();
        let d = delta(KID, &entries, 2, 10);
        assert!(d.is_delta());
        assert_eq!(d.version(), 5);
        // h3, h1 added after 2; h2 was present at 2 and lifted at 4.
        assert_eq!(changes(&d), (2, vec![h(1), h(3)], vec![h(2)]));
        assert!(d.contains(&h(3)) && !d.contains(&h(9)));
        // From 0: h2 came and went, so it appears in neither list.
        assert_eq!(
            changes(&delta(KID, &entries, 0, 10)),
            (0, vec![h(1), h(3), h(9)], vec![])
        );
        // From 3: h2 was still revoked at 3.
        assert_eq!(
            changes(&delta(KID, &entries, 3, 10)),
            (3, vec![h(1)], vec![h(2)])
        );
        // Up to date: empty.
        assert_eq!(changes(&delta(KID, &entries, 5, 10)), (5, vec![], vec![]));
    }

    #[test]
    fn a_hash_revoked_again_after_a_lift_nets_out() {
        // Revoked at 1, lifted at 3, revoked again at 5 (two rows for one hash).
        let entries = [e(7, 1, Some(3)), e(7, 5, None)];
        assert_eq!(hashes(&full(KID, &entries, 0)), vec![h(7)]);
        // From 2 (present) to 5 (present): no change at all.
        assert_eq!(changes(&delta(KID, &entries, 2, 0)), (2, vec![], vec![]));
        // From 4 (lifted): added again.
        assert_eq!(
            changes(&delta(KID, &entries, 4, 0)),
            (4, vec![h(7)], vec![])
        );
        // The verifier that saw the lift (version 3) gets it back by applying the delta.
        let at3 = full(KID, &entries[..1], 0);
        assert_eq!(at3.version(), 3);
        assert!(!at3.contains(&h(7)));
        let now = at3.apply(&delta(KID, &entries, 3, 0)).unwrap();
        assert_eq!(now, full(KID, &entries, 0));
        assert!(now.contains(&h(7)));
    }

    /// A store's history: every step adds or lifts one revocation at the next version. At every
    /// step the version grows, and every earlier full list plus the delta since it equals the
    /// current full list.
    #[test]
    fn versions_grow_and_every_delta_applies_to_the_full_list_it_starts_from() {
        let mut entries: Vec<ListEntry> = Vec::new();
        let mut history: Vec<RevocationList> = vec![full(KID, &entries, 0)];
        let mut seed: u32 = 12345;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            seed >> 16
        };
        for v in 1..=60u64 {
            let r = next();
            let active: Vec<usize> = (0..entries.len())
                .filter(|&i| entries[i].removed.is_none())
                .collect();
            if r % 3 == 0 && !active.is_empty() {
                let i = active[next() as usize % active.len()];
                entries[i].removed = Some(v);
            } else {
                // Mostly new hashes, sometimes one revoked before (a re-revocation).
                let n = (next() % 40) as u8;
                if !entries
                    .iter()
                    .any(|x| x.hash == h(n) && x.removed.is_none())
                {
                    entries.push(e(n, v, None));
                } else {
                    entries.push(e(100 + v as u8, v, None));
                }
            }
            let now = full(KID, &entries, v as i64);
            let before = history.last().unwrap();
            assert!(now.version() > before.version(), "step {v}");
            for old in &history {
                let d = delta(KID, &entries, old.version(), v as i64);
                assert_eq!(d.version(), now.version());
                let applied = old.apply(&d).unwrap_or_else(|e| panic!("step {v}: {e}"));
                assert_eq!(applied, now, "step {v} from {}", old.version());
            }
            history.push(now);
        }
        // The history did exercise lifts.
        assert!(entries.iter().any(|x| x.removed.is_some()));
    }

    #[test]
    fn apply_refuses_what_does_not_fit() {
        let entries = sample();
        let at3 = full(KID, &entries[..3], 0);
        assert_eq!(at3.version(), 4);
        let d = delta(KID, &entries, 4, 0);
        assert_eq!(at3.apply(&d).unwrap(), full(KID, &entries, 0));
        // Another kid.
        let other = delta([1; 8], &entries, 4, 0);
        assert!(matches!(
            at3.apply(&other),
            Err(ListError::KidMismatch { .. })
        ));
        // A delta from another version.
        let d2 = delta(KID, &entries, 2, 0);
        assert_eq!(
            at3.apply(&d2),
            Err(ListError::VersionMismatch { list: 4, since: 2 })
        );
        // Full on full, delta on delta.
        assert_eq!(at3.apply(&at3), Err(ListError::NotDelta));
        assert_eq!(d.apply(&d), Err(ListError::NotFull { since: 4 }));
        // A delta "from the future" would go backwards.
        let ahead = delta(KID, &entries, 9, 0);
        let at9 = RevocationList {
            version: 9,
            ..full(KID, &entries, 0)
        };
        assert_eq!(
            at9.apply(&ahead),
            Err(ListError::Backwards {
                since: 9,
                version: 5
            })
        );
        // A delta removing a hash the list lacks, or adding one it holds: the base is not the
        // list the delta was made from.
        let lacking = RevocationList {
            version: 2,
            body: ListBody::Full { hashes: vec![] },
            ..at3.clone()
        };
        assert!(matches!(
            lacking.apply(&d2),
            Err(ListError::Inconsistent(_))
        ));
        let holding = RevocationList {
            version: 2,
            body: ListBody::Full {
                hashes: vec![h(1), h(2)],
            },
            ..at3.clone()
        };
        assert!(matches!(
            holding.apply(&d2),
            Err(ListError::Inconsistent(_))
        ));
        let right = RevocationList {
            version: 2,
            body: ListBody::Full {
                hashes: vec![h(2), h(9)],
            },
            ..at3.clone()
        };
        assert_eq!(right.apply(&d2).unwrap(), full(KID, &entries, 0));
    }

    #[test]
    fn cbor_layout_is_pinned_and_round_trips() {
        let list = full(KID, &[e(0xab, 1, None), e(0x01, 2, None)], 1_700_000_000);
        let bytes = list.to_cbor();
        let mut expected = hex::decode("a5010102485f74910195c5cecb0302041a6553f1000582").unwrap();
        expected.push(0x50);
        expected.extend_from_slice(&[0x01; 16]);
        expected.push(0x50);
        expected.extend_from_slice(&[0xab; 16]);
        assert_eq!(hex::encode(&bytes), hex::encode(&expected));
        assert_eq!(list.to_cbor(), bytes, "deterministic");
        assert_eq!(RevocationList::from_cbor(&bytes).unwrap(), list);

        let d = delta(KID, &sample(), 2, 7);
        let bytes = d.to_cbor();
        // {1: 1, 2: kid, 3: 5, 4: 7, 6: 2, 7: [h1, h3], 8: [h2]}
        assert_eq!(&bytes[..1], &[0xa7]);
        assert_eq!(
            &bytes[13..21],
            &[0x03, 0x05, 0x04, 0x07, 0x06, 0x02, 0x07, 0x82]
        );
        assert_eq!(RevocationList::from_cbor(&bytes).unwrap(), d);
        // The same entries in another order give the same bytes.
        let mut shuffled = sample();
        shuffled.reverse();
        assert_eq!(delta(KID, &shuffled, 2, 7).to_cbor(), bytes);
        assert_eq!(
            full(KID, &shuffled, 7).to_cbor(),
            full(KID, &sample(), 7).to_cbor()
        );
    }

    #[test]
    fn decoding_refuses_non_canonical_and_malformed_payloads() {
        let good = full(KID, &[e(1, 1, None), e(2, 1, None)], 5).to_cbor();
        let decode = |b: &[u8]| RevocationList::from_cbor(b);
        assert!(decode(&good).is_ok());
        // Trailing bytes.
        let mut t = good.clone();
        t.push(0x00);
        assert_eq!(decode(&t), Err(ListError::NotCanonical));
        // A non-shortest integer (issued 5 as 0x18 0x05).
        let pos = good.windows(2).position(|w| w == [0x04, 0x05]).unwrap();
        let mut long = good[..pos + 1].to_vec();
        long.extend_from_slice(&[0x18, 0x05]);
        long.extend_from_slice(&good[pos + 2..]);
        assert_eq!(decode(&long), Err(ListError::NotCanonical));
        // Indefinite-length array of hashes.
        let pos = good.windows(2).position(|w| w == [0x05, 0x82]).unwrap();
        let mut indef = good[..pos + 1].to_vec();
        indef.push(0x9f);
        indef.extend_from_slice(&good[pos + 2..]);
        indef.push(0xff);
        assert_eq!(decode(&indef), Err(ListError::NotCanonical));
        // Unsorted hashes.
        let mut unsorted = good.clone();
        let n = unsorted.len();
        unsorted[n - 16] = 0x00; // the second hash now starts below the first
        assert!(matches!(decode(&unsorted), Err(ListError::Malformed(_))));
        // A repeated hash.
        let mut repeated = good.clone();
        repeated[n - 16..].copy_from_slice(&[0x01; 16]);
        assert!(matches!(decode(&repeated), Err(ListError::Malformed(_))));
        // Keys out of order: {2: kid, 1: 1, ...}.
        let mut swapped = vec![0xa5];
        swapped.extend_from_slice(&good[3..13]);
        swapped.extend_from_slice(&good[1..3]);
        swapped.extend_from_slice(&good[13..]);
        assert_eq!(decode(&swapped), Err(ListError::NotCanonical));
        // Unknown format version, unknown key, both forms, wrong kid length, not a map.
        let mut v2 = good.clone();
        v2[2] = 0x02;
        assert_eq!(decode(&v2), Err(ListError::UnsupportedFormat(2)));
        let mut unknown = good.clone();
        unknown[0] = 0xa6;
        unknown.extend_from_slice(&[0x09, 0x00]);
        assert!(matches!(decode(&unknown), Err(ListError::Malformed(_))));
        let mut both = good.clone();
        both[0] = 0xa6;
        both.extend_from_slice(&[0x06, 0x00]);
        assert!(matches!(decode(&both), Err(ListError::Malformed(_))));
        let mut short_kid = good.clone();
        short_kid[4] = 0x47;
        short_kid.remove(5);
        assert!(matches!(decode(&short_kid), Err(ListError::Malformed(_))));
        assert!(matches!(decode(&[0x80]), Err(ListError::Malformed(_))));
        assert!(matches!(decode(&[0xa5, 0x01]), Err(ListError::Cbor(_))));
    }

    #[test]
    fn list_key_kid_is_over_the_spki_der() {
        use p256::pkcs8::EncodePublicKey;
        let sk = key();
        let der = pk(&sk).to_public_key_der().unwrap();
        let d = Sha256::digest(der.as_bytes());
        assert_eq!(list_key_kid(&pk(&sk)).to_vec(), d[..8].to_vec());
    }

    #[test]
    fn signed_list_opens_with_its_key_only() {
        let sk = key();
        let list = full(KID, &sample(), 1_700_000_000);
        let kid = list_key_kid(&pk(&sk));
        let cose = sign(&list, kid, sign_sw(&sk)).unwrap();
        assert_eq!(&cose[..2], &[0xd2, 0x84], "tag 18, array of 4");
        assert_eq!(open(&cose, &pk(&sk)).unwrap(), list);
        // The protected header: {1: -7, 3: content type, 4: kid}.
        let msg = CoseSign1::from_tagged_slice(&cose).unwrap();
        let mut expected = vec![0xa3, 0x01, 0x26, 0x03, 0x78, CONTENT_TYPE_FULL.len() as u8];
        expected.extend_from_slice(CONTENT_TYPE_FULL.as_bytes());
        expected.extend_from_slice(&[0x04, 0x48]);
        expected.extend_from_slice(&kid);
        assert_eq!(msg.protected.original_data.unwrap(), expected);
        assert_eq!(msg.payload.unwrap(), list.to_cbor());

        // A delta carries the delta content type and opens as a delta.
        let d = delta(KID, &sample(), 2, 0);
        let dcose = sign(&d, kid, sign_sw(&sk)).unwrap();
        assert_eq!(open(&dcose, &pk(&sk)).unwrap(), d);
        let dmsg = CoseSign1::from_tagged_slice(&dcose).unwrap();
        assert_eq!(
            dmsg.protected.header.content_type,
            Some(coset::RegisteredLabel::Text(CONTENT_TYPE_DELTA.into()))
        );

        // Every single flipped byte is refused.
        for i in 0..cose.len() {
            let mut bad = cose.clone();
            bad[i] ^= 0x01;
            assert!(open(&bad, &pk(&sk)).is_err(), "flip at {i} accepted");
        }
        // The payload changed and the signature kept.
        let mut tampered = cose.clone();
        let n = tampered.len();
        tampered[n - 64 - 3] ^= 0x80; // in the last hash, before the signature bstr header
        assert_eq!(open(&tampered, &pk(&sk)), Err(ListError::BadSignature));

        // Another key: its kid does not match.
        let other = key();
        assert!(matches!(
            open(&cose, &pk(&other)),
            Err(ListError::WrongKey { .. })
        ));
        // Another key claiming our kid: the signature does not verify.
        let forged = sign(&list, kid, sign_sw(&other)).unwrap();
        assert_eq!(open(&forged, &pk(&sk)), Err(ListError::BadSignature));
        // The signer's error comes back unchanged.
        let failed: Result<Vec<u8>, &str> = sign(&list, kid, |_| Err("token gone"));
        assert_eq!(failed, Err("token gone"));
    }

    #[test]
    fn header_must_name_es256_the_kid_and_the_matching_content_type() {
        let sk = key();
        let kid = list_key_kid(&pk(&sk));
        let list = full(KID, &sample(), 0);
        // A full payload under the delta content type (validly signed) is refused.
        let swapped = sign_payload(list.to_cbor(), CONTENT_TYPE_DELTA, kid, sign_sw(&sk)).unwrap();
        assert!(matches!(
            open(&swapped, &pk(&sk)),
            Err(ListError::ContentType(_))
        ));
        let unknown = sign_payload(list.to_cbor(), "application/cbor", kid, sign_sw(&sk)).unwrap();
        assert!(matches!(
            open(&unknown, &pk(&sk)),
            Err(ListError::ContentType(_))
        ));
        // An HCERT-style header (ES256 and kid, no content type).
        let hcert = crate::cose::ProtectedHeader::es256(kid);
        let digest: [u8; 32] =
            Sha256::digest(crate::cose::sign1::sig_structure(&hcert, &list.to_cbor())).into();
        let sig = sign_sw(&sk)(&digest).unwrap();
        let cose = crate::cose::sign1::assemble(&hcert, &list.to_cbor(), &sig);
        assert_eq!(
            open(&cose, &pk(&sk)),
            Err(ListError::ContentType("missing".into()))
        );
        // Untagged.
        let tagged = sign(&list, kid, sign_sw(&sk)).unwrap();
        assert!(matches!(
            open(&tagged[1..], &pk(&sk)),
            Err(ListError::Structure(_))
        ));
    }
}
