//! EU gateway revocation batches (DOMAIN.md §5): planning immutable batches from revoked
//! certificates, their JSON, validating a batch as the gateway does, and the CMS envelope the
//! gateway accepts (SignedData with the JSON attached, signed by the upload certificate).
//!
//! A batch holds 1 to [`MAX_ENTRIES`] hashes of one hash type that share one kid and one
//! expiry. Our batches expire at the first UTC midnight at or after the certificates' `exp`,
//! so that one batch covers a whole day of expiries; planning is deterministic whatever order
//! the revoked certificates come in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use der::{Decode, Encode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_cert::Certificate;

use crate::revocation::hash::RevocationHash;

/// Most entries the gateway accepts in one batch.
pub const MAX_ENTRIES: usize = 1000;

const DAY: i64 = 86_400;

/// What the hashes of a batch are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashType {
    /// SHA-256 of the signature (`r` only for ES256); required for new systems.
    Signature,
    /// SHA-256 of the UVCI (deprecated upstream).
    Uci,
    /// SHA-256 of the issuing country code followed by the UVCI (deprecated upstream).
    CountryCodeUci,
}

impl HashType {
    /// All hash types, in the gateway's order.
    pub const ALL: [HashType; 3] = [HashType::Signature, HashType::Uci, HashType::CountryCodeUci];

    /// The gateway's name: `SIGNATURE`, `UCI` or `COUNTRYCODEUCI`.
    pub fn as_str(self) -> &'static str {
        match self {
            HashType::Signature => "SIGNATURE",
            HashType::Uci => "UCI",
            HashType::CountryCodeUci => "COUNTRYCODEUCI",
        }
    }
}

impl fmt::Display for HashType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HashType {
    type Err = BatchError;

    /// Parses the gateway's name exactly (upper case).
    fn from_str(s: &str) -> Result<Self, BatchError> {
        HashType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| field("hashType", "must be one of SIGNATURE, UCI, COUNTRYCODEUCI"))
    }
}

/// A revoked certificate as the planner needs it: no personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// kid of the DSC that signed the certificate (first 8 bytes of SHA-256 of its DER).
    pub kid: [u8; 8],
    /// The certificate's `exp` (Unix seconds).
    pub exp: i64,
    /// The revocation hash of the batch's hash type.
    pub hash: RevocationHash,
}

/// One batch to be built and uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBatch {
    /// kid shared by all entries.
    pub kid: [u8; 8],
    /// Hash type of all entries.
    pub hash_type: HashType,
    /// Expiry of the batch (Unix seconds, a UTC midnight).
    pub expires: i64,
    /// 1 to [`MAX_ENTRIES`] distinct hashes, ascending.
    pub hashes: Vec<RevocationHash>,
}

/// A batch JSON checked by [`parse_batch_json`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedBatch {
    /// Issuing country (2 upper-case letters).
    pub country: String,
    /// `expires` as Unix seconds.
    pub expires: i64,
    /// The kid.
    pub kid: [u8; 8],
    /// The hash type.
    pub hash_type: HashType,
    /// The entries' hashes in document order (distinct).
    pub hashes: Vec<RevocationHash>,
}

/// Why a batch, a delete request or a CMS envelope is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The bytes are not a JSON document.
    #[error("not JSON: {0}")]
    Json(String),
    /// A field breaks a rule.
    #[error("{field}: {rule}")]
    Field {
        /// JSON path of the field, e.g. `entries[3].hash` (`$` for the document itself).
        field: String,
        /// The rule it breaks.
        rule: String,
    },
    /// The CMS envelope is malformed or its signature does not verify.
    #[error("CMS: {0}")]
    Cms(String),
}

fn field(name: impl Into<String>, rule: impl Into<String>) -> BatchError {
    BatchError::Field {
        field: name.into(),
        rule: rule.into(),
    }
}

/// `exp` rounded up to the next UTC midnight; an `exp` exactly at midnight stays. Saturates at
/// the last midnight representable in an `i64`.
pub fn expires_midnight(exp: i64) -> i64 {
    let rem = exp.rem_euclid(DAY);
    if rem == 0 {
        exp
    } else {
        match exp.checked_add(DAY - rem) {
            Some(v) => v,
            None => i64::MAX - i64::MAX.rem_euclid(DAY),
        }
    }
}

/// Groups revoked certificates into batches: by kid and expiry day ([`expires_midnight`]),
/// hashes sorted and de-duplicated, at most [`MAX_ENTRIES`] per batch. The result is ordered by
/// kid, expiry and first hash and does not depend on the order of `entries`.
pub fn plan(entries: &[Revoked], hash_type: HashType) -> Vec<PlannedBatch> {
    let mut groups: BTreeMap<([u8; 8], i64), BTreeSet<RevocationHash>> = BTreeMap::new();
    for e in entries {
        groups
            .entry((e.kid, expires_midnight(e.exp)))
            .or_default()
            .insert(e.hash);
    }
    let mut out = Vec::new();
    for ((kid, expires), hashes) in groups {
        let hashes: Vec<RevocationHash> = hashes.into_iter().collect();
        for chunk in hashes.chunks(MAX_ENTRIES) {
            out.push(PlannedBatch {
                kid,
                hash_type,
                expires,
                hashes: chunk.to_vec(),
            });
        }
    }
    out
}

/// RFC 3339 UTC with `Z` and whole seconds; outside the years 0–9999 (which RFC 3339 cannot
/// express) the bare number, which every validator refuses.
fn rfc3339_utc(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The gateway's batch JSON, byte for byte:
/// `{"country":"SE","expires":"2026-12-01T00:00:00Z","kid":"…","hashType":"SIGNATURE","entries":[{"hash":"…"},…]}`
/// (kid and hashes base64 with padding). An expiry beyond the year 9999 cannot be written as
/// RFC 3339 and is written as a bare number, which [`parse_batch_json`] and the gateway refuse.
pub fn batch_json(country: &str, b: &PlannedBatch) -> Vec<u8> {
    let mut s = String::with_capacity(120 + b.hashes.len() * 36);
    s.push_str("{\"country\":");
    s.push_str(&json_string(country));
    s.push_str(",\"expires\":\"");
    s.push_str(&rfc3339_utc(b.expires));
    s.push_str("\",\"kid\":\"");
    s.push_str(&B64.encode(b.kid));
    s.push_str("\",\"hashType\":\"");
    s.push_str(b.hash_type.as_str());
    s.push_str("\",\"entries\":[");
    for (i, h) in b.hashes.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{\"hash\":\"");
        s.push_str(&B64.encode(h));
        s.push_str("\"}");
    }
    s.push_str("]}");
    s.into_bytes()
}

/// The gateway's delete request: `{"batchId":"…"}`.
pub fn delete_json(batch_id: &str) -> Vec<u8> {
    format!("{{\"batchId\":{}}}", json_string(batch_id)).into_bytes()
}

fn object<'a>(
    v: &'a Value,
    path: &str,
    allowed: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, BatchError> {
    let map = v
        .as_object()
        .ok_or_else(|| field(path, "must be a JSON object"))?;
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        let name = if path == "$" {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        return Err(field(name, "unknown field"));
    }
    Ok(map)
}

fn string<'a>(
    map: &'a serde_json::Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, BatchError> {
    match map.get(key) {
        None => Err(field(path, "is required")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(field(path, "must be a string")),
    }
}

/// Decodes strict base64 (standard alphabet, canonical padding) of exactly `N` bytes.
fn b64_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N.div_ceil(3) * 4 {
        return None;
    }
    B64.decode(s).ok()?.try_into().ok()
}

/// Checks a batch JSON as the gateway does: `country` 2 upper-case letters; `expires` an
/// RFC 3339 date-time after `now` (Unix seconds); `kid` base64 of 8 bytes; `hashType` one of the
/// three names; 1 to 1000 `entries`, each `{"hash": base64 of 16 bytes}`, no hash twice; no
/// unknown fields anywhere. The first problem found is returned, naming the field and the rule.
pub fn parse_batch_json(bytes: &[u8], now: i64) -> Result<ParsedBatch, BatchError> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| BatchError::Json(e.to_string()))?;
    let top = object(
        &doc,
        "$",
        &["country", "expires", "kid", "hashType", "entries"],
    )?;

    let country = string(top, "country", "country")?;
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(field(
            "country",
            "must be 2 upper-case letters (ISO 3166-1 alpha-2)",
        ));
    }

    let expires = string(top, "expires", "expires")?;
    let expires = OffsetDateTime::parse(expires, &Rfc3339)
        .map_err(|_| field("expires", "must be an RFC 3339 date-time"))?
        .unix_timestamp();
    if expires <= now {
        return Err(field("expires", "must be in the future"));
    }

    let kid = string(top, "kid", "kid")?;
    let kid = b64_exact::<8>(kid)
        .ok_or_else(|| field("kid", "must be base64 of 8 bytes (12 characters)"))?;

    let hash_type: HashType = string(top, "hashType", "hashType")?.parse()?;

    let entries = match top.get("entries") {
        None => return Err(field("entries", "is required")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(field("entries", "must be an array")),
    };
    if entries.is_empty() || entries.len() > MAX_ENTRIES {
        return Err(field(
            "entries",
            format!(
                "must hold 1 to {MAX_ENTRIES} entries, has {}",
                entries.len()
            ),
        ));
    }
    let mut seen: HashMap<RevocationHash, usize> = HashMap::with_capacity(entries.len());
    let mut hashes = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let path = format!("entries[{i}]");
        let entry = object(e, &path, &["hash"])?;
        let hpath = format!("{path}.hash");
        let h = string(entry, "hash", &hpath)?;
        let h = b64_exact::<16>(h)
            .ok_or_else(|| field(&hpath, "must be base64 of 16 bytes (24 characters)"))?;
        if let Some(first) = seen.insert(h, i) {
            return Err(field(
                hpath,
                format!("duplicates entries[{first}].hash (a hash appears once per batch)"),
            ));
        }
        hashes.push(h);
    }

    Ok(ParsedBatch {
        country: country.to_string(),
        expires,
        kid,
        hash_type,
        hashes,
    })
}

/// Checks a delete request `{"batchId":"…"}` (no other fields; the id 1 to 64 letters, digits
/// or `-`) and returns the batch id.
pub fn parse_delete_json(bytes: &[u8]) -> Result<String, BatchError> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| BatchError::Json(e.to_string()))?;
    let top = object(&doc, "$", &["batchId"])?;
    let id = string(top, "batchId", "batchId")?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(field(
            "batchId",
            "must be 1 to 64 characters: letters, digits or '-'",
        ));
    }
    Ok(id.to_string())
}

/// The CMS upload of `json`: base64 (standard alphabet, padded, one line) of
/// [`crate::keys::signed_data`] — SignedData with the JSON attached, one signer (`key`, inside
/// the token) and one certificate (`cert`).
pub fn cms_base64(
    token: &crate::hsm::Token,
    key: &crate::hsm::KeyHandle,
    cert: &Certificate,
    json: &[u8],
) -> Result<String, crate::keys::KeysError> {
    let der = crate::keys::signed_data(token, key, cert, json)?;
    Ok(B64.encode(der))
}

fn cms(msg: impl Into<String>) -> BatchError {
    BatchError::Cms(msg.into())
}

/// Opens a CMS SignedData (DER `ContentInfo`) as the gateway does and returns the attached
/// content and the signer's certificate.
///
/// Requires: content type id-signedData; attached id-data content; exactly one certificate and
/// exactly one signer, identified by that certificate (issuer and serial, or subject key
/// identifier); digest SHA-256 and signature ecdsa-with-SHA256 with a P-256 key; signed
/// attributes whose content type is id-data and whose message digest is the SHA-256 of the
/// content; and an ECDSA signature by the certificate's key over the DER of the signed
/// attributes (as a SET OF). The certificate itself is not checked against any trust anchor.
pub fn open_cms(cms_der: &[u8]) -> Result<(Vec<u8>, Certificate), BatchError> {
    use cms::cert::CertificateChoices;
    use cms::content_info::ContentInfo;
    use cms::signed_data::{SignedData, SignerIdentifier};
    use const_oid::db::{rfc5911, rfc5912};

    let ci = ContentInfo::from_der(cms_der).map_err(|e| cms(format!("not a ContentInfo: {e}")))?;
    if ci.content_type != rfc5911::ID_SIGNED_DATA {
        return Err(cms(format!(
            "content type {} is not id-signedData",
            ci.content_type
        )));
    }
    let sd: SignedData = ci
        .content
        .decode_as()
        .map_err(|e| cms(format!("not a SignedData: {e}")))?;

    // Exactly one certificate.
    let certs = sd
        .certificates
        .as_ref()
        .map(|c| c.0.as_slice())
        .unwrap_or(&[]);
    let cert = match certs {
        [CertificateChoices::Certificate(c)] => c.clone(),
        [_] => return Err(cms("the certificate is not an X.509 certificate")),
        _ => {
            return Err(cms(format!(
                "must carry exactly one certificate, has {}",
                certs.len()
            )))
        }
    };

    // Exactly one signer, identified by that certificate.
    let signers = sd.signer_infos.0.as_slice();
    let [si] = signers else {
        return Err(cms(format!(
            "must have exactly one signer, has {}",
            signers.len()
        )));
    };
    let sid_matches = match &si.sid {
        SignerIdentifier::IssuerAndSerialNumber(ias) => {
            ias.issuer == cert.tbs_certificate.issuer
                && ias.serial_number == cert.tbs_certificate.serial_number
        }
        SignerIdentifier::SubjectKeyIdentifier(ski) => {
            matches!(
                cert.tbs_certificate
                    .get::<x509_cert::ext::pkix::SubjectKeyIdentifier>(),
                Ok(Some((_, own))) if own == *ski
            )
        }
    };
    if !sid_matches {
        return Err(cms("the signer is not the enclosed certificate"));
    }
    if si.digest_alg.oid != rfc5912::ID_SHA_256 {
        return Err(cms(format!(
            "digest algorithm {} is not SHA-256",
            si.digest_alg.oid
        )));
    }
    if si.signature_algorithm.oid != rfc5912::ECDSA_WITH_SHA_256 {
        return Err(cms(format!(
            "signature algorithm {} is not ecdsa-with-SHA256",
            si.signature_algorithm.oid
        )));
    }

    // Attached id-data content.
    let eci = &sd.encap_content_info;
    if eci.econtent_type != rfc5911::ID_DATA {
        return Err(cms(format!(
            "encapsulated content type {} is not id-data",
            eci.econtent_type
        )));
    }
    let content = eci
        .econtent
        .as_ref()
        .ok_or_else(|| cms("the content is not attached"))?
        .decode_as::<der::asn1::OctetString>()
        .map_err(|e| cms(format!("content: {e}")))?
        .into_bytes();

    // Signed attributes: content type and message digest.
    let attrs = si
        .signed_attrs
        .as_ref()
        .ok_or_else(|| cms("signed attributes are missing"))?;
    let single = |oid: const_oid::ObjectIdentifier, name: &str| {
        let found: Vec<_> = attrs.iter().filter(|a| a.oid == oid).collect();
        match found.as_slice() {
            [a] if a.values.len() == 1 => Ok(a.values.as_slice()[0].clone()),
            [] => Err(cms(format!("signed attribute {name} is missing"))),
            _ => Err(cms(format!("signed attribute {name} must have one value"))),
        }
    };
    let ct: const_oid::ObjectIdentifier = single(rfc5911::ID_CONTENT_TYPE, "content-type")?
        .decode_as()
        .map_err(|e| cms(format!("content-type attribute: {e}")))?;
    if ct != rfc5911::ID_DATA {
        return Err(cms("content-type attribute is not id-data"));
    }
    let md = single(rfc5911::ID_MESSAGE_DIGEST, "message-digest")?
        .decode_as::<der::asn1::OctetString>()
        .map_err(|e| cms(format!("message-digest attribute: {e}")))?;
    if md.as_bytes() != &Sha256::digest(&content)[..] {
        return Err(cms(
            "message-digest attribute is not the SHA-256 of the content",
        ));
    }

    // The signature over the DER of the signed attributes (SET OF, not [0]).
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| cms(format!("certificate key: {e}")))?;
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&spki)
        .map_err(|_| cms("the certificate's key is not a P-256 key"))?;
    let signed = attrs
        .to_der()
        .map_err(|e| cms(format!("signed attributes: {e}")))?;
    let sig = p256::ecdsa::Signature::from_der(si.signature.as_bytes())
        .map_err(|_| cms("the signature is not a DER ECDSA signature"))?;
    key.verify(&signed, &sig)
        .map_err(|_| cms("the signature does not verify with the certificate's key"))?;

    Ok((content, cert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    const NOW: i64 = 1_764_547_200; // 2025-12-01T00:00:00Z

    fn midnight(y: i32, m: u8, d: u8) -> i64 {
        time::Date::from_calendar_date(y, time::Month::try_from(m).unwrap(), d)
            .unwrap()
            .midnight()
            .assume_utc()
            .unix_timestamp()
    }

    #[test]
    fn midnight_rounding() {
        let m = midnight(2026, 12, 1);
        assert_eq!(expires_midnight(m), m, "exactly midnight stays");
        assert_eq!(expires_midnight(m + 1), m + DAY);
        assert_eq!(expires_midnight(m - 1), m);
        assert_eq!(expires_midnight(m - DAY + 1), m);
        assert_eq!(expires_midnight(m + DAY - 1), m + DAY);
        // Year and leap-day boundaries.
        assert_eq!(
            expires_midnight(midnight(2026, 12, 31) + 12 * 3600),
            midnight(2027, 1, 1)
        );
        assert_eq!(
            expires_midnight(midnight(2028, 2, 28) + 1),
            midnight(2028, 2, 29)
        );
        assert_eq!(expires_midnight(0), 0);
        assert_eq!(expires_midnight(1), DAY);
        assert_eq!(expires_midnight(-1), 0);
        assert_eq!(expires_midnight(-DAY - 1), -DAY);
        let top = expires_midnight(i64::MAX);
        assert_eq!(top.rem_euclid(DAY), 0);
        assert!(i64::MAX - top < DAY);
    }

    fn hash(rng: &mut impl Rng) -> RevocationHash {
        let mut h = [0u8; 16];
        rng.fill(&mut h);
        h
    }

    #[test]
    fn plan_2500_entries() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let kids = [[1u8; 8], [2u8; 8]];
        let day0 = midnight(2026, 6, 1);
        // (kid, day offset, count): 1200 + 300 + 1000 = 2500 entries.
        // kid1/day1: 1200 → 2 batches, kid1/day2: 300 → 1, kid2/day1: 1000 → 1 (exactly full).
        let layout = [(0usize, 1i64, 1200usize), (0, 2, 300), (1, 1, 1000)];
        let mut entries = Vec::new();
        for (k, day, n) in layout {
            for i in 0..n {
                // Spread exp over the whole day before the midnight, including the midnight
                // itself for the first entry.
                let exp = day0 + day * DAY - (i as i64 * 37) % DAY;
                entries.push(Revoked {
                    kid: kids[k],
                    exp,
                    hash: hash(&mut rng),
                });
            }
        }
        assert_eq!(entries.len(), 2500);
        let batches = plan(&entries, HashType::Signature);
        assert_eq!(batches.len(), 4);
        let sizes: Vec<usize> = batches.iter().map(|b| b.hashes.len()).collect();
        assert_eq!(sizes, vec![1000, 200, 300, 1000]);

        let mut all = BTreeSet::new();
        for b in &batches {
            assert!(!b.hashes.is_empty() && b.hashes.len() <= MAX_ENTRIES);
            assert_eq!(b.hash_type, HashType::Signature);
            assert_eq!(b.expires.rem_euclid(DAY), 0);
            assert!(b.hashes.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
            for h in &b.hashes {
                let e = entries.iter().find(|e| e.hash == *h).unwrap();
                assert_eq!(e.kid, b.kid);
                assert_eq!(expires_midnight(e.exp), b.expires);
                assert!(all.insert(*h), "a hash in two batches");
            }
        }
        assert_eq!(all.len(), 2500, "every entry in exactly one batch");
        // Ordered by (kid, expires, first hash).
        let keys: Vec<_> = batches
            .iter()
            .map(|b| (b.kid, b.expires, b.hashes[0]))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);

        // Deterministic under any input order, and duplicates collapse.
        for seed in 0..5 {
            let mut shuffled = entries.clone();
            shuffled.extend_from_slice(&entries[..50]);
            shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            assert_eq!(plan(&shuffled, HashType::Signature), batches);
        }
        assert!(plan(&[], HashType::Uci).is_empty());
    }

    #[test]
    fn plan_splits_exactly_at_the_limit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mk = |n: usize, rng: &mut rand::rngs::StdRng| -> Vec<Revoked> {
            (0..n)
                .map(|_| Revoked {
                    kid: [9; 8],
                    exp: NOW + 10,
                    hash: hash(rng),
                })
                .collect()
        };
        let sizes = |v: &[PlannedBatch]| v.iter().map(|b| b.hashes.len()).collect::<Vec<_>>();
        assert_eq!(sizes(&plan(&mk(1000, &mut rng), HashType::Uci)), [1000]);
        assert_eq!(sizes(&plan(&mk(1001, &mut rng), HashType::Uci)), [1000, 1]);
        assert_eq!(
            sizes(&plan(&mk(2000, &mut rng), HashType::Uci)),
            [1000, 1000]
        );
    }

    fn small() -> PlannedBatch {
        PlannedBatch {
            kid: [0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03],
            hash_type: HashType::Signature,
            expires: midnight(2026, 12, 1),
            hashes: vec![[0u8; 16], [0xff; 16]],
        }
    }

    #[test]
    fn batch_json_is_byte_exact() {
        let json = batch_json("SE", &small());
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"country":"SE","expires":"2026-12-01T00:00:00Z","kid":"3q2+7wABAgM=","hashType":"SIGNATURE","entries":[{"hash":"AAAAAAAAAAAAAAAAAAAAAA=="},{"hash":"/////////////////////w=="}]}"#
        );
        let parsed = parse_batch_json(&json, NOW).unwrap();
        assert_eq!(
            parsed,
            ParsedBatch {
                country: "SE".into(),
                expires: midnight(2026, 12, 1),
                kid: small().kid,
                hash_type: HashType::Signature,
                hashes: small().hashes,
            }
        );
        assert_eq!(delete_json("abc-123"), br#"{"batchId":"abc-123"}"#);
        assert_eq!(delete_json("a\"b"), br#"{"batchId":"a\"b"}"#);
        assert_eq!(
            parse_delete_json(&delete_json("abc-123")).unwrap(),
            "abc-123"
        );
    }

    #[test]
    fn hash_type_names() {
        for t in HashType::ALL {
            assert_eq!(t.as_str().parse::<HashType>().unwrap(), t);
            assert_eq!(t.to_string(), t.as_str());
        }
        assert_eq!(HashType::CountryCodeUci.as_str(), "COUNTRYCODEUCI");
        assert!("signature".parse::<HashType>().is_err());
    }

    /// Replaces one top-level field (or removes it with `None`) and parses.
    fn with(key: &str, value: Option<Value>) -> Result<ParsedBatch, BatchError> {
        let mut v: Value = serde_json::from_slice(&batch_json("SE", &small())).unwrap();
        match value {
            Some(x) => {
                v[key] = x;
            }
            None => {
                v.as_object_mut().unwrap().remove(key);
            }
        }
        parse_batch_json(&serde_json::to_vec(&v).unwrap(), NOW)
    }

    fn rejected(r: Result<ParsedBatch, BatchError>, expect: &str) {
        let e = r.expect_err(expect).to_string();
        assert!(e.starts_with(expect), "expected {expect:?}, got {e:?}");
    }

    #[test]
    fn parse_rejections_name_the_field() {
        use serde_json::json;
        rejected(
            with("country", Some(json!("se"))),
            "country: must be 2 upper-case letters",
        );
        rejected(
            with("country", Some(json!("SWE"))),
            "country: must be 2 upper-case letters",
        );
        rejected(with("country", None), "country: is required");
        rejected(
            with("country", Some(json!(46))),
            "country: must be a string",
        );
        rejected(
            with("expires", Some(json!("2026-12-01"))),
            "expires: must be an RFC 3339 date-time",
        );
        rejected(
            with("expires", Some(json!("2025-11-30T23:59:59Z"))),
            "expires: must be in the future",
        );
        rejected(
            with("expires", Some(json!("2025-12-01T00:00:00Z"))),
            "expires: must be in the future",
        );
        assert!(with("expires", Some(json!("2025-12-01T01:00:01+01:00"))).is_ok());
        rejected(
            with("kid", Some(json!("3q2+7wABAg=="))),
            "kid: must be base64 of 8 bytes",
        );
        rejected(
            with("kid", Some(json!("3q2+7wABAgM"))),
            "kid: must be base64 of 8 bytes",
        );
        rejected(
            with("hashType", Some(json!("SHA256"))),
            "hashType: must be one of SIGNATURE, UCI, COUNTRYCODEUCI",
        );
        rejected(
            with("entries", Some(json!([]))),
            "entries: must hold 1 to 1000",
        );
        rejected(
            with("entries", Some(json!({"hash": "x"}))),
            "entries: must be an array",
        );
        let many: Vec<Value> = (0..1001u32)
            .map(|i| {
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&i.to_be_bytes());
                json!({ "hash": B64.encode(h) })
            })
            .collect();
        rejected(
            with("entries", Some(Value::Array(many.clone()))),
            "entries: must hold 1 to 1000 entries, has 1001",
        );
        assert_eq!(
            with("entries", Some(Value::Array(many[..1000].to_vec())))
                .unwrap()
                .hashes
                .len(),
            1000
        );
        let good = B64.encode([7u8; 16]);
        let entries = |bad: Value| json!([{"hash": good}, {"hash": good.replace('B', "C")}, {"hash": B64.encode([1u8; 16])}, bad]);
        // 15 bytes, 17 bytes, not base64, missing padding, non-canonical trailing bits.
        for bad in [
            B64.encode([1u8; 15]),
            B64.encode([1u8; 17]),
            "!!!!!!!!!!!!!!!!!!!!!!==".to_string(),
            B64.encode([2u8; 16]).trim_end_matches('=').to_string(),
            "AAAAAAAAAAAAAAAAAAAAAB==".to_string(),
        ] {
            rejected(
                with("entries", Some(entries(json!({ "hash": bad })))),
                "entries[3].hash: must be base64 of 16 bytes (24 characters)",
            );
        }
        rejected(
            with("entries", Some(entries(json!({ "hash": good })))),
            "entries[3].hash: duplicates entries[0].hash",
        );
        rejected(
            with("entries", Some(entries(json!({})))),
            "entries[3].hash: is required",
        );
        rejected(
            with("entries", Some(entries(json!("x")))),
            "entries[3]: must be a JSON object",
        );
        rejected(
            with(
                "entries",
                Some(entries(json!({"hash": B64.encode([3u8; 16]), "x": 1}))),
            ),
            "entries[3].x: unknown field",
        );
        rejected(
            with("deleted", Some(json!(false))),
            "deleted: unknown field",
        );
        assert!(matches!(
            parse_batch_json(b"{", NOW),
            Err(BatchError::Json(_))
        ));
        assert_eq!(
            parse_batch_json(b"[]", NOW).unwrap_err().to_string(),
            "$: must be a JSON object"
        );

        rejected(
            parse_delete_json(b"{}").map(|_| small_parsed()),
            "batchId: is required",
        );
        rejected(
            parse_delete_json(br#"{"batchId":""}"#).map(|_| small_parsed()),
            "batchId: must be 1 to 64 characters",
        );
        rejected(
            parse_delete_json(br#"{"batchId":"a","x":1}"#).map(|_| small_parsed()),
            "x: unknown field",
        );
    }

    fn small_parsed() -> ParsedBatch {
        parse_batch_json(&batch_json("SE", &small()), NOW).unwrap()
    }

    #[test]
    fn out_of_range_expiry_is_refused_not_rewritten() {
        let mut b = small();
        b.expires = expires_midnight(i64::MAX / 2);
        let json = batch_json("SE", &b);
        rejected(
            parse_batch_json(&json, NOW),
            "expires: must be an RFC 3339 date-time",
        );
    }

    // --- CMS with a software key (the token-backed path is tested in tests/revocation_gateway.rs).

    mod soft {
        use super::super::*;
        use cms::builder::{SignedDataBuilder, SignerInfoBuilder};
        use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
        use cms::content_info::ContentInfo;
        use cms::signed_data::{EncapsulatedContentInfo, SignedData, SignerIdentifier};
        use der::{Any, Tag};
        use p256::ecdsa::{DerSignature, SigningKey};
        use x509_cert::builder::{Builder, CertificateBuilder, Profile};
        use x509_cert::name::Name;
        use x509_cert::serial_number::SerialNumber;
        use x509_cert::spki::SubjectPublicKeyInfoOwned;
        use x509_cert::time::Validity;

        pub fn key() -> SigningKey {
            SigningKey::random(&mut rand::rngs::OsRng)
        }

        pub fn cert(key: &SigningKey, cn: &str) -> Certificate {
            let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).unwrap();
            let subject: Name = format!("CN={cn},C=SE").parse().unwrap();
            CertificateBuilder::new(
                Profile::Root,
                SerialNumber::from(42u32),
                Validity::from_now(std::time::Duration::from_secs(3600)).unwrap(),
                subject,
                spki,
                key,
            )
            .unwrap()
            .build::<DerSignature>()
            .unwrap()
        }

        pub fn sign(key: &SigningKey, cert: &Certificate, content: &[u8]) -> Vec<u8> {
            let eci = EncapsulatedContentInfo {
                econtent_type: const_oid::db::rfc5911::ID_DATA,
                econtent: Some(Any::new(Tag::OctetString, content).unwrap()),
            };
            let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
                issuer: cert.tbs_certificate.issuer.clone(),
                serial_number: cert.tbs_certificate.serial_number.clone(),
            });
            let sha256 = spki::AlgorithmIdentifierOwned {
                oid: const_oid::db::rfc5912::ID_SHA_256,
                parameters: None,
            };
            let info = SignerInfoBuilder::new(key, sid, sha256.clone(), &eci, None).unwrap();
            SignedDataBuilder::new(&eci)
                .add_digest_algorithm(sha256)
                .unwrap()
                .add_certificate(CertificateChoices::Certificate(cert.clone()))
                .unwrap()
                .add_signer_info::<_, DerSignature>(info)
                .unwrap()
                .build()
                .unwrap()
                .to_der()
                .unwrap()
        }

        /// Decodes, lets `f` change the SignedData, encodes again.
        pub fn edit(der: &[u8], f: impl FnOnce(&mut SignedData)) -> Vec<u8> {
            let mut ci = ContentInfo::from_der(der).unwrap();
            let mut sd: SignedData = ci.content.decode_as().unwrap();
            f(&mut sd);
            ci.content = Any::encode_from(&sd).unwrap();
            ci.to_der().unwrap()
        }
    }

    fn cms_err(r: Result<(Vec<u8>, Certificate), BatchError>) -> String {
        match r {
            Err(BatchError::Cms(m)) => m,
            other => panic!("expected a CMS error, got {other:?}"),
        }
    }

    #[test]
    fn open_cms_round_trip_and_tampering() {
        let key = soft::key();
        let cert = soft::cert(&key, "upload");
        let json = batch_json("SE", &small());
        let der = soft::sign(&key, &cert, &json);
        let (content, signer) = open_cms(&der).unwrap();
        assert_eq!(content, json);
        assert_eq!(signer, cert);

        // Any single flipped byte in the content or the signature is caught.
        let pos = der.windows(json.len()).position(|w| w == json).unwrap();
        let mut t = der.clone();
        t[pos + 20] ^= 0x01;
        assert!(cms_err(open_cms(&t)).contains("message-digest"));
        let mut t = der.clone();
        let last = t.len() - 3; // inside the signature's s
        t[last] ^= 0x01;
        assert!(open_cms(&t).is_err());

        // Content replaced consistently (new digest) but not re-signed.
        let other = batch_json("DK", &small());
        let t = soft::edit(&der, |sd| {
            sd.encap_content_info.econtent =
                Some(der::Any::new(der::Tag::OctetString, &other[..]).unwrap());
        });
        assert!(cms_err(open_cms(&t)).contains("message-digest"));

        // Signed by another key than the enclosed certificate's.
        let key2 = soft::key();
        let t = soft::sign(&key2, &cert, &json);
        assert_eq!(
            cms_err(open_cms(&t)),
            "the signature does not verify with the certificate's key"
        );

        // Another certificate than the signer's.
        let cert2 = soft::cert(&key, "someone-else");
        let t = soft::edit(&der, |sd| {
            sd.certificates = Some(cms::signed_data::CertificateSet(
                der::asn1::SetOfVec::try_from(vec![cms::cert::CertificateChoices::Certificate(
                    cert2.clone(),
                )])
                .unwrap(),
            ));
        });
        assert_eq!(
            cms_err(open_cms(&t)),
            "the signer is not the enclosed certificate"
        );

        // No certificate, two certificates.
        let t = soft::edit(&der, |sd| sd.certificates = None);
        assert!(cms_err(open_cms(&t)).contains("exactly one certificate, has 0"));
        let t = soft::edit(&der, |sd| {
            let set = sd.certificates.as_mut().unwrap();
            set.0
                .insert(cms::cert::CertificateChoices::Certificate(cert2.clone()))
                .unwrap();
        });
        assert!(cms_err(open_cms(&t)).contains("exactly one certificate, has 2"));

        // Two signers.
        let der2 = soft::sign(&key, &cert, b"other");
        let extra = {
            let ci = cms::content_info::ContentInfo::from_der(&der2).unwrap();
            let sd: cms::signed_data::SignedData = ci.content.decode_as().unwrap();
            sd.signer_infos.0.as_slice()[0].clone()
        };
        let t = soft::edit(&der, |sd| sd.signer_infos.0.insert(extra).unwrap());
        assert!(cms_err(open_cms(&t)).contains("exactly one signer, has 2"));

        // Detached content.
        let t = soft::edit(&der, |sd| sd.encap_content_info.econtent = None);
        assert!(cms_err(open_cms(&t)).contains("not attached"));

        // Not CMS at all.
        assert!(cms_err(open_cms(b"garbage")).contains("not a ContentInfo"));
        assert!(cms_err(open_cms(&cert.to_der().unwrap())).contains("not a ContentInfo"));
    }
}
