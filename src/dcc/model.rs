//! The typed DCC payload (schema 1.3.x), built only from a validated JSON value.

use ciborium::Value as Cbor;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value as Json;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};

use super::CertType;

/// `nam`: names as written and ICAO 9303 transliterations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Name {
    /// `fn`: surname(s).
    pub family: Option<String>,
    /// `fnt`: standardised surname(s).
    pub family_std: Option<String>,
    /// `gn`: forename(s).
    pub given: Option<String>,
    /// `gnt`: standardised forename(s).
    pub given_std: Option<String>,
}

/// `v[0]`: one vaccination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vaccination {
    /// `tg` disease targeted.
    pub tg: String,
    /// `vp` vaccine or prophylaxis.
    pub vp: String,
    /// `mp` medicinal product.
    pub mp: String,
    /// `ma` marketing authorisation holder.
    pub ma: String,
    /// `dn` dose number.
    pub dn: u64,
    /// `sd` total doses in the series.
    pub sd: u64,
    /// `dt` date of vaccination.
    pub dt: String,
    /// `co` country of vaccination.
    pub co: String,
    /// `is` certificate issuer.
    pub is: String,
    /// `ci` UVCI.
    pub ci: Option<String>,
}

/// `t[0]`: one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Test {
    /// `tg` disease targeted.
    pub tg: String,
    /// `tt` type of test.
    pub tt: String,
    /// `nm` NAAT name.
    pub nm: Option<String>,
    /// `ma` RAT device.
    pub ma: Option<String>,
    /// `sc` sample collection time (RFC 3339 text).
    pub sc: String,
    /// `tr` result.
    pub tr: String,
    /// `tc` testing centre.
    pub tc: Option<String>,
    /// `co` country of test.
    pub co: String,
    /// `is` certificate issuer.
    pub is: String,
    /// `ci` UVCI.
    pub ci: Option<String>,
}

/// `r[0]`: one recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// `tg` disease targeted.
    pub tg: String,
    /// `fr` first positive NAAT result.
    pub fr: String,
    /// `co` country of test.
    pub co: String,
    /// `is` certificate issuer.
    pub is: String,
    /// `df` valid from.
    pub df: String,
    /// `du` valid until.
    pub du: String,
    /// `ci` UVCI.
    pub ci: Option<String>,
}

/// The one statement of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// `v`.
    Vaccination(Vaccination),
    /// `t`.
    Test(Test),
    /// `r`.
    Recovery(Recovery),
}

/// A validated DCC payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dcc {
    /// `ver` schema version.
    pub ver: String,
    /// `nam`.
    pub nam: Name,
    /// `dob` date of birth (possibly partial or empty).
    pub dob: String,
    /// The statement.
    pub statement: Statement,
}

pub(crate) fn parse_date(s: &str) -> Option<Date> {
    if s.len() != 10 {
        return None;
    }
    Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()
}

/// Parses an ISO 8601 date-time as the schema allows it: `YYYY-MM-DDThh:mm:ss`, optional
/// fractional seconds, then `Z`, `±hh`, `±hhmm` or `±hh:mm`. (Issuing is stricter: see
/// `validate`.)
pub fn parse_date_time(s: &str) -> Option<OffsetDateTime> {
    let (head, zone) = if let Some(h) = s.strip_suffix('Z') {
        (h, "Z".to_string())
    } else {
        let i = s.rfind(['+', '-']).filter(|&i| i > 10)?;
        let z = &s[i + 1..];
        let norm = match z.len() {
            2 => format!("{z}:00"),
            4 if !z.contains(':') => format!("{}:{}", &z[..2], &z[2..]),
            5 => z.to_string(),
            _ => return None,
        };
        (&s[..i], format!("{}{norm}", &s[i..i + 1]))
    };
    OffsetDateTime::parse(&format!("{head}{zone}"), &Rfc3339).ok()
}

impl Dcc {
    /// The certificate type.
    pub fn cert_type(&self) -> CertType {
        match self.statement {
            Statement::Vaccination(_) => CertType::Vaccination,
            Statement::Test(_) => CertType::Test,
            Statement::Recovery(_) => CertType::Recovery,
        }
    }

    /// `ci`, if present.
    pub fn uvci(&self) -> Option<&str> {
        match &self.statement {
            Statement::Vaccination(v) => v.ci.as_deref(),
            Statement::Test(t) => t.ci.as_deref(),
            Statement::Recovery(r) => r.ci.as_deref(),
        }
    }

    /// Sets `ci`.
    pub fn set_uvci(&mut self, uvci: String) {
        match &mut self.statement {
            Statement::Vaccination(v) => v.ci = Some(uvci),
            Statement::Test(t) => t.ci = Some(uvci),
            Statement::Recovery(r) => r.ci = Some(uvci),
        }
    }

    /// `t[0].sc` as a time.
    pub fn sample_time(&self) -> Option<OffsetDateTime> {
        match &self.statement {
            Statement::Test(t) => parse_date_time(&t.sc),
            _ => None,
        }
    }

    /// `r[0].du` as a date.
    pub fn recovery_valid_until(&self) -> Option<Date> {
        match &self.statement {
            Statement::Recovery(r) => parse_date(&r.du),
            _ => None,
        }
    }

    /// The payload as JSON, fields in schema order, absent optional fields omitted.
    pub fn to_json(&self) -> Json {
        // A map of text keys, text and unsigned integers always converts.
        serde_json::to_value(self).unwrap_or(Json::Null)
    }

    /// The DCC map for the CWT's hcert claim as a CBOR tree: text keys, `dn`/`sd` unsigned
    /// integers, `sc` untagged text. Issuing does not build it: it serialises the `Dcc` itself
    /// ([`Dcc::to_cbor_bytes`], or as the `hcert` of a [`crate::cose::CwtClaims`]).
    pub fn to_cbor(&self) -> Cbor {
        Cbor::serialized(self).unwrap_or(Cbor::Null)
    }

    /// The DCC map in CBOR, written straight from the fields.
    pub fn to_cbor_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        // Text, unsigned integers and definite-length maps into a Vec: cannot fail.
        let _ = ciborium::ser::into_writer(self, &mut out);
        out
    }
}

/// The DCC map in schema order — `ver`, `nam`, `dob`, then `v`, `t` or `r` holding an array of
/// one entry — with absent optional fields left out. The one description of the layout: JSON
/// ([`Dcc::to_json`]) and CBOR (the signed payload) are both written from it, the CBOR straight
/// into the output buffer, without a tree in between (this runs for every signature).
impl Serialize for Dcc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use Field::{Text, Uint};
        fn text(v: &Option<String>) -> Option<Field<'_>> {
            v.as_deref().map(Field::Text)
        }
        let n = &self.nam;
        let nam = Present([
            ("fn", text(&n.family)),
            ("fnt", text(&n.family_std)),
            ("gn", text(&n.given)),
            ("gnt", text(&n.given_std)),
        ]);
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("ver", &self.ver)?;
        m.serialize_entry("nam", &nam)?;
        m.serialize_entry("dob", &self.dob)?;
        match &self.statement {
            Statement::Vaccination(v) => m.serialize_entry(
                "v",
                &[Present([
                    ("tg", Some(Text(&v.tg))),
                    ("vp", Some(Text(&v.vp))),
                    ("mp", Some(Text(&v.mp))),
                    ("ma", Some(Text(&v.ma))),
                    ("dn", Some(Uint(v.dn))),
                    ("sd", Some(Uint(v.sd))),
                    ("dt", Some(Text(&v.dt))),
                    ("co", Some(Text(&v.co))),
                    ("is", Some(Text(&v.is))),
                    ("ci", text(&v.ci)),
                ])][..],
            )?,
            Statement::Test(t) => m.serialize_entry(
                "t",
                &[Present([
                    ("tg", Some(Text(&t.tg))),
                    ("tt", Some(Text(&t.tt))),
                    ("nm", text(&t.nm)),
                    ("ma", text(&t.ma)),
                    ("sc", Some(Text(&t.sc))),
                    ("tr", Some(Text(&t.tr))),
                    ("tc", text(&t.tc)),
                    ("co", Some(Text(&t.co))),
                    ("is", Some(Text(&t.is))),
                    ("ci", text(&t.ci)),
                ])][..],
            )?,
            Statement::Recovery(r) => m.serialize_entry(
                "r",
                &[Present([
                    ("tg", Some(Text(&r.tg))),
                    ("fr", Some(Text(&r.fr))),
                    ("co", Some(Text(&r.co))),
                    ("is", Some(Text(&r.is))),
                    ("df", Some(Text(&r.df))),
                    ("du", Some(Text(&r.du))),
                    ("ci", text(&r.ci)),
                ])][..],
            )?,
        }
        m.end()
    }
}

/// One field's value: text or an unsigned integer (`dn`, `sd`).
#[derive(Clone, Copy)]
enum Field<'a> {
    Text(&'a str),
    Uint(u64),
}

impl Serialize for Field<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Field::Text(t) => s.serialize_str(t),
            Field::Uint(n) => s.serialize_u64(n),
        }
    }
}

/// A map of the fields that are present, in the order given (a definite-length map in CBOR:
/// the count is known before the first entry).
struct Present<'a, const N: usize>([(&'static str, Option<Field<'a>>); N]);

impl<const N: usize> Serialize for Present<'_, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let present = self.0.iter().filter(|(_, v)| v.is_some()).count();
        let mut m = s.serialize_map(Some(present))?;
        for (k, v) in &self.0 {
            if let Some(v) = v {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DCC map as a ciborium tree, built field by field the way issuing built it before it
    /// serialised the `Dcc` directly: the reference the direct bytes are checked against.
    fn reference_tree(d: &Dcc) -> Cbor {
        let t = |s: &str| Cbor::Text(s.to_string());
        let map = |e: Vec<(&str, Option<Cbor>)>| {
            Cbor::Map(
                e.into_iter()
                    .filter_map(|(k, v)| v.map(|v| (t(k), v)))
                    .collect(),
            )
        };
        let o = |v: &Option<String>| v.as_deref().map(t);
        let n = &d.nam;
        let (key, entry) = match &d.statement {
            Statement::Vaccination(v) => (
                "v",
                map(vec![
                    ("tg", Some(t(&v.tg))),
                    ("vp", Some(t(&v.vp))),
                    ("mp", Some(t(&v.mp))),
                    ("ma", Some(t(&v.ma))),
                    ("dn", Some(Cbor::Integer(v.dn.into()))),
                    ("sd", Some(Cbor::Integer(v.sd.into()))),
                    ("dt", Some(t(&v.dt))),
                    ("co", Some(t(&v.co))),
                    ("is", Some(t(&v.is))),
                    ("ci", o(&v.ci)),
                ]),
            ),
            Statement::Test(x) => (
                "t",
                map(vec![
                    ("tg", Some(t(&x.tg))),
                    ("tt", Some(t(&x.tt))),
                    ("nm", o(&x.nm)),
                    ("ma", o(&x.ma)),
                    ("sc", Some(t(&x.sc))),
                    ("tr", Some(t(&x.tr))),
                    ("tc", o(&x.tc)),
                    ("co", Some(t(&x.co))),
                    ("is", Some(t(&x.is))),
                    ("ci", o(&x.ci)),
                ]),
            ),
            Statement::Recovery(r) => (
                "r",
                map(vec![
                    ("tg", Some(t(&r.tg))),
                    ("fr", Some(t(&r.fr))),
                    ("co", Some(t(&r.co))),
                    ("is", Some(t(&r.is))),
                    ("df", Some(t(&r.df))),
                    ("du", Some(t(&r.du))),
                    ("ci", o(&r.ci)),
                ]),
            ),
        };
        map(vec![
            ("ver", Some(t(&d.ver))),
            (
                "nam",
                Some(map(vec![
                    ("fn", o(&n.family)),
                    ("fnt", o(&n.family_std)),
                    ("gn", o(&n.given)),
                    ("gnt", o(&n.given_std)),
                ])),
            ),
            ("dob", Some(t(&d.dob))),
            (key, Some(Cbor::Array(vec![entry]))),
        ])
    }

    /// Payloads of every type, with every optional field present and with none, text of every
    /// CBOR length class (0, < 24, < 256 and longer, non-ASCII) and doses of every integer size
    /// (the largest above `u32`, below `i64::MAX`, which the decoder refuses above).
    fn samples() -> Vec<Dcc> {
        let long = "Å".repeat(150);
        let mut out = Vec::new();
        for full in [true, false] {
            let some = |s: &str| full.then(|| s.to_string());
            let nam = Name {
                family: some("Åström-Löfgren, a surname longer than 23 bytes"),
                family_std: some("ASTROEM<LOEFGREN"),
                given: some(&long),
                given_std: full.then(String::new),
            };
            let ci = some("URN:UVCI:01:SE:EHM/V12907267LAJW#E");
            for (dn, sd) in [(1, 1), (23, 24), (255, 256), (65_536, 1 << 40)] {
                out.push(Dcc {
                    ver: "1.3.0".into(),
                    nam: nam.clone(),
                    dob: if full { "1958-11-11" } else { "" }.into(),
                    statement: Statement::Vaccination(Vaccination {
                        tg: "840539006".into(),
                        vp: "1119349007".into(),
                        mp: "EU/1/20/1528".into(),
                        ma: "ORG-100030215".into(),
                        dn,
                        sd,
                        dt: "2021-02-18".into(),
                        co: "SE".into(),
                        is: long.clone(),
                        ci: ci.clone(),
                    }),
                });
            }
            out.push(Dcc {
                ver: "1.3.2".into(),
                nam: nam.clone(),
                dob: "1958".into(),
                statement: Statement::Test(Test {
                    tg: "840539006".into(),
                    tt: "LP217198-3".into(),
                    nm: some("Roche LightCycler qPCR"),
                    ma: some("1232"),
                    sc: "2021-04-13T14:20:00+02:00".into(),
                    tr: "260415000".into(),
                    tc: some("Teststation Sättra"),
                    co: "SE".into(),
                    is: "E-hälsomyndigheten".into(),
                    ci: ci.clone(),
                }),
            });
            out.push(Dcc {
                ver: "1.3.0".into(),
                nam,
                dob: "1958-11".into(),
                statement: Statement::Recovery(Recovery {
                    tg: "840539006".into(),
                    fr: "2021-01-10".into(),
                    co: "SE".into(),
                    is: "E-hälsomyndigheten".into(),
                    df: "2021-01-20".into(),
                    du: "2021-07-09".into(),
                    ci,
                }),
            });
        }
        out
    }

    #[test]
    fn the_direct_cbor_is_the_bytes_of_the_reference_tree() {
        for d in samples() {
            let mut expected = Vec::new();
            ciborium::ser::into_writer(&reference_tree(&d), &mut expected).unwrap();
            assert_eq!(d.to_cbor_bytes(), expected, "{d:?}");
            assert_eq!(d.to_cbor(), reference_tree(&d), "{d:?}");
            // And as the hcert claim, the way issuing signs it.
            fn claims<H: Serialize>(hcert: H) -> Vec<u8> {
                crate::cose::CwtClaims {
                    iss: "SE".into(),
                    iat: 1_700_000_000,
                    exp: 1_731_536_000,
                    hcert,
                }
                .to_cbor_bytes()
            }
            assert_eq!(claims(&d), claims(reference_tree(&d)));
        }
    }

    #[test]
    fn json_has_the_values_and_the_order_of_the_cbor() {
        // Key order at every level, as a list of paths (map equality ignores order).
        fn json_paths(v: &Json, at: &str, out: &mut Vec<String>) {
            match v {
                Json::Object(m) => m.iter().for_each(|(k, v)| {
                    out.push(format!("{at}.{k}"));
                    json_paths(v, &format!("{at}.{k}"), out);
                }),
                Json::Array(a) => a
                    .iter()
                    .for_each(|v| json_paths(v, &format!("{at}[]"), out)),
                _ => {}
            }
        }
        fn cbor_paths(v: &Cbor, at: &str, out: &mut Vec<String>) {
            match v {
                Cbor::Map(m) => m.iter().for_each(|(k, v)| {
                    let k = k.as_text().unwrap();
                    out.push(format!("{at}.{k}"));
                    cbor_paths(v, &format!("{at}.{k}"), out);
                }),
                Cbor::Array(a) => a
                    .iter()
                    .for_each(|v| cbor_paths(v, &format!("{at}[]"), out)),
                _ => {}
            }
        }
        for d in samples() {
            let json = d.to_json();
            let from_cbor = crate::dcc::cbor_to_json(&d.to_cbor_bytes()).unwrap();
            assert_eq!(json, from_cbor, "{d:?}");
            let (mut j, mut c) = (Vec::new(), Vec::new());
            json_paths(&json, "$", &mut j);
            cbor_paths(&reference_tree(&d), "$", &mut c);
            assert_eq!(j, c, "{d:?}");
        }
    }

    #[test]
    fn iso_offsets() {
        let z = parse_date_time("2021-06-11T15:30:00Z").unwrap();
        for s in [
            "2021-06-11T17:30:00+02",
            "2021-06-11T17:30:00+0200",
            "2021-06-11T17:30:00+02:00",
            "2021-06-11T15:30:00.000Z",
        ] {
            assert_eq!(parse_date_time(s), Some(z), "{s}");
        }
        for s in [
            "2021-06-11T17:30:00",
            "2021-06-11",
            "2021-06-11T17:30:00+2",
            "junk",
        ] {
            assert_eq!(parse_date_time(s), None, "{s}");
        }
    }
}
