//! The typed DCC payload (schema 1.3.x), built only from a validated JSON value.

use ciborium::Value as Cbor;
use serde_json::{Map, Value as Json};
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
        self.build()
    }

    /// The DCC map for the CWT's hcert claim: text keys, `dn`/`sd` unsigned integers, `sc`
    /// untagged text. Built directly (no JSON in between: this runs for every signature).
    pub fn to_cbor(&self) -> Cbor {
        self.build()
    }

    /// [`Dcc::to_cbor`] serialised.
    pub fn to_cbor_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        let _ = ciborium::ser::into_writer(&self.to_cbor(), &mut out);
        out
    }

    /// One walk over the fields, in schema order, for both output forms.
    fn build<T: Tree>(&self) -> T {
        fn opt<T: Tree>(m: &mut Vec<(&'static str, T)>, k: &'static str, v: &Option<String>) {
            if let Some(v) = v {
                m.push((k, T::text(v)));
            }
        }
        let mut nam = Vec::with_capacity(4);
        opt(&mut nam, "fn", &self.nam.family);
        opt(&mut nam, "fnt", &self.nam.family_std);
        opt(&mut nam, "gn", &self.nam.given);
        opt(&mut nam, "gnt", &self.nam.given_std);
        let mut e: Vec<(&'static str, T)> = Vec::with_capacity(10);
        let key = match &self.statement {
            Statement::Vaccination(v) => {
                e.push(("tg", T::text(&v.tg)));
                e.push(("vp", T::text(&v.vp)));
                e.push(("mp", T::text(&v.mp)));
                e.push(("ma", T::text(&v.ma)));
                e.push(("dn", T::uint(v.dn)));
                e.push(("sd", T::uint(v.sd)));
                e.push(("dt", T::text(&v.dt)));
                e.push(("co", T::text(&v.co)));
                e.push(("is", T::text(&v.is)));
                opt(&mut e, "ci", &v.ci);
                "v"
            }
            Statement::Test(t) => {
                e.push(("tg", T::text(&t.tg)));
                e.push(("tt", T::text(&t.tt)));
                opt(&mut e, "nm", &t.nm);
                opt(&mut e, "ma", &t.ma);
                e.push(("sc", T::text(&t.sc)));
                e.push(("tr", T::text(&t.tr)));
                opt(&mut e, "tc", &t.tc);
                e.push(("co", T::text(&t.co)));
                e.push(("is", T::text(&t.is)));
                opt(&mut e, "ci", &t.ci);
                "t"
            }
            Statement::Recovery(r) => {
                e.push(("tg", T::text(&r.tg)));
                e.push(("fr", T::text(&r.fr)));
                e.push(("co", T::text(&r.co)));
                e.push(("is", T::text(&r.is)));
                e.push(("df", T::text(&r.df)));
                e.push(("du", T::text(&r.du)));
                opt(&mut e, "ci", &r.ci);
                "r"
            }
        };
        T::map(vec![
            ("ver", T::text(&self.ver)),
            ("nam", T::map(nam)),
            ("dob", T::text(&self.dob)),
            (key, T::array(vec![T::map(e)])),
        ])
    }
}

/// The two trees a `Dcc` is written as: JSON and CBOR.
trait Tree: Sized {
    fn text(s: &str) -> Self;
    fn uint(n: u64) -> Self;
    fn map(entries: Vec<(&'static str, Self)>) -> Self;
    fn array(items: Vec<Self>) -> Self;
}

impl Tree for Json {
    fn text(s: &str) -> Self {
        Json::String(s.to_string())
    }
    fn uint(n: u64) -> Self {
        Json::from(n)
    }
    fn map(entries: Vec<(&'static str, Self)>) -> Self {
        Json::Object(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<Map<_, _>>(),
        )
    }
    fn array(items: Vec<Self>) -> Self {
        Json::Array(items)
    }
}

impl Tree for Cbor {
    fn text(s: &str) -> Self {
        Cbor::Text(s.to_string())
    }
    fn uint(n: u64) -> Self {
        Cbor::Integer(n.into())
    }
    fn map(entries: Vec<(&'static str, Self)>) -> Self {
        Cbor::Map(
            entries
                .into_iter()
                .map(|(k, v)| (Cbor::Text(k.to_string()), v))
                .collect(),
        )
    }
    fn array(items: Vec<Self>) -> Self {
        Cbor::Array(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
