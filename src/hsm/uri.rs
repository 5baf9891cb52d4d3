//! RFC 7512 `pkcs11:` URIs naming a key object: `pkcs11:token=dccsign-dev;object=dsc-test;type=private`.

use std::fmt;
use std::str::FromStr;

use super::HsmError;

/// A key addressed by token label, object label and optionally `CKA_ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUri {
    /// Token label (`token=`).
    pub token: String,
    /// Object label (`object=`, i.e. `CKA_LABEL`).
    pub object: String,
    /// Object id (`id=`, i.e. `CKA_ID`), when known.
    pub id: Option<Vec<u8>>,
}

impl KeyUri {
    /// A URI for the private key `object` on `token`.
    pub fn new(token: &str, object: &str, id: Option<Vec<u8>>) -> Self {
        KeyUri {
            token: token.to_string(),
            object: object.to_string(),
            id,
        }
    }
}

fn pct_encode(out: &mut String, bytes: &[u8], all: bool) {
    for &b in bytes {
        let unreserved = b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if unreserved && !all {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn pct_decode(s: &str) -> Result<Vec<u8>, HsmError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| HsmError::Uri(format!("truncated percent-escape in {s:?}")))?;
            let b = u8::from_str_radix(hex, 16)
                .map_err(|_| HsmError::Uri(format!("bad percent-escape %{hex}")))?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

impl KeyUri {
    /// Resolves a key reference from the configuration — a bare `CKA_LABEL` or a `pkcs11:` URI —
    /// to `(label, id)` on the token labelled `token`. A URI naming another token is refused.
    pub fn resolve(reference: &str, token: &str) -> Result<(String, Option<Vec<u8>>), HsmError> {
        if !reference.starts_with("pkcs11:") {
            return Ok((reference.to_string(), None));
        }
        let uri: KeyUri = reference.parse()?;
        if uri.token != token {
            return Err(HsmError::Uri(format!(
                "the URI names token {:?}, the configured token is {:?}",
                uri.token, token
            )));
        }
        Ok((uri.object, uri.id))
    }
}

impl fmt::Display for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::from("pkcs11:token=");
        pct_encode(&mut s, self.token.as_bytes(), false);
        if let Some(id) = &self.id {
            s.push_str(";id=");
            pct_encode(&mut s, id, true);
        }
        s.push_str(";object=");
        pct_encode(&mut s, self.object.as_bytes(), false);
        s.push_str(";type=private");
        f.write_str(&s)
    }
}

impl FromStr for KeyUri {
    type Err = HsmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| HsmError::Uri(format!("{s:?} does not start with pkcs11:")))?;
        let path = rest.split('?').next().unwrap_or("");
        let (mut token, mut object, mut id) = (None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| HsmError::Uri(format!("attribute {attr:?} has no '='")))?;
            let text = || -> Result<String, HsmError> {
                String::from_utf8(pct_decode(v)?)
                    .map_err(|_| HsmError::Uri(format!("{k} is not UTF-8")))
            };
            match k {
                "token" => token = Some(text()?),
                "object" => object = Some(text()?),
                "id" => id = Some(pct_decode(v)?),
                "type" if v != "private" && v != "secret-key" => {
                    return Err(HsmError::Uri(format!(
                        "type={v}: only private and secret keys are addressed"
                    )))
                }
                _ => {}
            }
        }
        Ok(KeyUri {
            token: token.ok_or_else(|| HsmError::Uri("missing token=".into()))?,
            object: object.ok_or_else(|| HsmError::Uri("missing object=".into()))?,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let u = KeyUri::new("dccsign dev", "dsc-test", Some(vec![0x01, 0xab]));
        let s = u.to_string();
        assert_eq!(
            s,
            "pkcs11:token=dccsign%20dev;id=%01%AB;object=dsc-test;type=private"
        );
        assert_eq!(s.parse::<KeyUri>().unwrap(), u);
    }

    #[test]
    fn resolve_label_or_uri() {
        assert_eq!(
            KeyUri::resolve("dsc-test", "t").unwrap(),
            ("dsc-test".into(), None)
        );
        let (label, id) =
            KeyUri::resolve("pkcs11:token=t;id=%01;object=k;type=private", "t").unwrap();
        assert_eq!((label.as_str(), id), ("k", Some(vec![1])));
        let e = KeyUri::resolve("pkcs11:token=other;object=k", "t").unwrap_err();
        assert!(
            e.to_string().contains("the URI names token \"other\""),
            "{e}"
        );
    }

    #[test]
    fn rfc7512_example() {
        let u: KeyUri =
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;object=my-key;type=private"
                .parse()
                .unwrap();
        assert_eq!(u.token, "The Software PKCS#11 Softtoken");
        assert_eq!(u.object, "my-key");
        assert!("pkcs11:object=x".parse::<KeyUri>().is_err());
        assert!("pkcs11:token=t;object=x;type=cert"
            .parse::<KeyUri>()
            .is_err());
    }
}
