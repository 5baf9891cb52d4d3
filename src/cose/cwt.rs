//! CWT claims of a health certificate: `{1: iss, 4: exp, 6: iat, -260: {1: DCC}}`.

use ciborium::Value;
use serde::ser::{Serialize, SerializeMap, Serializer};

use super::CoseError;

/// CWT claim keys.
const ISS: i64 = 1;
const EXP: i64 = 4;
const IAT: i64 = 6;
const HCERT: i64 = -260;

/// The claims we issue. `iat`/`exp` are CBOR unsigned integers (NumericDate; floats were a
/// real-world bug). `H` is the DCC: anything that serialises as its map — a
/// [`crate::dcc::Dcc`] (or a reference to one) when issuing, a CBOR [`Value`] when read back.
#[derive(Debug, Clone, PartialEq)]
pub struct CwtClaims<H = Value> {
    /// Issuing country.
    pub iss: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// The DCC map, placed under `hcert {1: …}`.
    pub hcert: H,
}

/// The claims map `{1: iss, 4: exp, 6: iat, -260: {1: DCC}}`, the layout [`CwtClaims::to_cbor_bytes`]
/// writes (ciborium encodes the integer keys as CBOR integers of the shortest form).
impl<H: Serialize> Serialize for CwtClaims<H> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// `{1: DCC}`, the hcert claim's value.
        struct Hcert<'a, H>(&'a H);
        impl<H: Serialize> Serialize for Hcert<'_, H> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(&1i64, self.0)?;
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry(&ISS, &self.iss)?;
        m.serialize_entry(&EXP, &self.exp)?;
        m.serialize_entry(&IAT, &self.iat)?;
        m.serialize_entry(&HCERT, &Hcert(&self.hcert))?;
        m.end()
    }
}

/// Claims as read from foreign data: anything may be missing.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedClaims {
    /// `iss`, if a text string.
    pub iss: Option<String>,
    /// `iat`, if an integer.
    pub iat: Option<i64>,
    /// `exp`, if an integer.
    pub exp: Option<i64>,
    /// `hcert[1]`, the DCC.
    pub dcc: Option<Value>,
}

impl<H: Serialize> CwtClaims<H> {
    /// Deterministic CBOR: keys in the order 1, 4, 6, -260. Serialised straight from the
    /// fields (neither the claims nor the DCC map are copied into a tree first).
    pub fn to_cbor_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        // Integers, text and a DCC map into a Vec: cannot fail.
        let _ = ciborium::ser::into_writer(self, &mut out);
        out
    }
}

impl CwtClaims {
    /// Strict reader for claims we issued: all four claims present with the right types.
    pub fn from_cbor_bytes(bytes: &[u8]) -> Result<Self, CoseError> {
        let d = DecodedClaims::from_cbor_bytes(bytes)?;
        let uint = |v: Option<i64>, name: &str| -> Result<u64, CoseError> {
            v.and_then(|x| u64::try_from(x).ok())
                .ok_or_else(|| CoseError::Claims(format!("{name} missing or negative")))
        };
        Ok(CwtClaims {
            iss: d
                .iss
                .ok_or_else(|| CoseError::Claims("iss missing".into()))?,
            iat: uint(d.iat, "iat")?,
            exp: uint(d.exp, "exp")?,
            hcert: d
                .dcc
                .ok_or_else(|| CoseError::Claims("hcert missing".into()))?,
        })
    }
}

fn int_key(k: &Value) -> Option<i64> {
    match k {
        Value::Integer(i) => i64::try_from(*i).ok(),
        _ => None,
    }
}

fn as_seconds(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => i64::try_from(*i).ok(),
        // Tolerated when reading foreign data: some issuers wrote floats.
        Value::Float(f) if f.is_finite() => Some(*f as i64),
        Value::Tag(1, inner) => as_seconds(inner),
        _ => None,
    }
}

impl DecodedClaims {
    /// Tolerant reader for verification of foreign data.
    pub fn from_cbor_bytes(bytes: &[u8]) -> Result<Self, CoseError> {
        let v: Value =
            ciborium::de::from_reader(bytes).map_err(|e| CoseError::Cbor(e.to_string()))?;
        let Value::Map(entries) = v else {
            return Err(CoseError::Claims("the CWT is not a map".into()));
        };
        let mut out = DecodedClaims {
            iss: None,
            iat: None,
            exp: None,
            dcc: None,
        };
        for (k, v) in entries {
            match int_key(&k) {
                Some(ISS) => out.iss = v.as_text().map(str::to_string),
                Some(IAT) => out.iat = as_seconds(&v),
                Some(EXP) => out.exp = as_seconds(&v),
                Some(HCERT) => {
                    if let Value::Map(h) = v {
                        out.dcc = h
                            .into_iter()
                            .find(|(k, _)| int_key(k) == Some(1))
                            .map(|(_, v)| v);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_key_order() {
        let c = CwtClaims {
            iss: "SE".into(),
            iat: 1_700_000_000,
            exp: 1_700_259_200,
            hcert: Value::Map(vec![(
                Value::Text("ver".into()),
                Value::Text("1.3.0".into()),
            )]),
        };
        let b = c.to_cbor_bytes();
        // map(4), key 1 "SE", key 4 uint32, key 6 uint32, key -260 (0x39 0x01 0x03)
        assert_eq!(&b[..5], &[0xa4, 0x01, 0x62, b'S', b'E']);
        assert_eq!(b[5], 0x04);
        assert_eq!(b[6], 0x1a, "exp must be a CBOR unsigned integer");
        assert_eq!(b[11], 0x06);
        assert_eq!(b[12], 0x1a, "iat must be a CBOR unsigned integer");
        assert_eq!(&b[17..20], &[0x39, 0x01, 0x03]);
        assert_eq!(CwtClaims::from_cbor_bytes(&b).unwrap(), c);
    }

    #[test]
    fn claims_serialise_to_the_bytes_of_the_claims_tree() {
        // The same claims as one ciborium Value tree, the way they were built before: the
        // bytes must not change, whatever the sizes of the integers and strings.
        let dcc = Value::Map(vec![
            (Value::Text("ver".into()), Value::Text("1.3.0".into())),
            (
                Value::Text("nam".into()),
                Value::Map(vec![(
                    Value::Text("fn".into()),
                    Value::Text("Åström".into()),
                )]),
            ),
            (
                Value::Text("v".into()),
                Value::Array(vec![Value::Map(vec![
                    (Value::Text("dn".into()), Value::Integer(2.into())),
                    (Value::Text("sd".into()), Value::Integer(300.into())),
                ])]),
            ),
        ]);
        for (iss, iat, exp) in [
            ("SE", 0, 23),
            ("XA", 24, 255),
            ("DE", 1_700_000_000, 1_700_259_200),
            (
                "a very long issuer name, over twenty-three bytes",
                65_535,
                u64::MAX,
            ),
        ] {
            let c = CwtClaims {
                iss: iss.into(),
                iat,
                exp,
                hcert: dcc.clone(),
            };
            let tree = Value::Map(vec![
                (Value::Integer(ISS.into()), Value::Text(iss.into())),
                (Value::Integer(EXP.into()), Value::Integer(exp.into())),
                (Value::Integer(IAT.into()), Value::Integer(iat.into())),
                (
                    Value::Integer(HCERT.into()),
                    Value::Map(vec![(Value::Integer(1.into()), dcc.clone())]),
                ),
            ]);
            let mut expected = Vec::new();
            ciborium::ser::into_writer(&tree, &mut expected).unwrap();
            assert_eq!(
                c.to_cbor_bytes(),
                expected,
                "iss {iss}, iat {iat}, exp {exp}"
            );
        }
    }
}
