//! Validation of a DCC payload: schema 1.3.x structure ([`validate_schema`]) and, for issuing,
//! value sets and the EU and Swedish business rules ([`validate`]). Every violation is
//! collected; nothing stops at the first.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use super::model::{
    parse_date, parse_date_time, Dcc, Name, Recovery, Statement, Test, Vaccination,
};
use super::rules::{FieldError, Rule, ValidationErrors};
use super::uvci;
use super::valuesets::ValueSet;
use super::CertType;

/// COVID-19 (SNOMED CT 840539006).
pub const COVID_19: &str = "840539006";
/// Test result "not detected".
pub const NOT_DETECTED: &str = "260415000";
/// Test type rapid antigen test.
pub const RAT: &str = "LP217198-3";

/// Tunable limits of the business rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The issuing country: `co` and the UVCI's country must equal it.
    pub issuer_country: String,
    /// Oldest accepted test sample (default 7 days).
    pub max_sample_age: Duration,
    /// Tolerated clock difference for "not in the future" (default 5 minutes).
    pub clock_skew: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            issuer_country: "SE".into(),
            max_sample_age: Duration::days(7),
            clock_skew: Duration::minutes(5),
        }
    }
}

/// Parses JSON bytes; a syntax error becomes one error at `$` (position only, no content).
pub fn parse_json(bytes: &[u8]) -> Result<Value, ValidationErrors> {
    serde_json::from_slice(bytes).map_err(|e| {
        ValidationErrors(vec![FieldError::new(
            "$",
            Rule::Syntax,
            format!(
                "not valid JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )])
    })
}

/// Converts a DCC in CBOR to JSON for validation: text keys; integers stay integers; tag 0 /
/// tag 1004 around text is removed; floats and byte strings are refused.
pub fn cbor_to_json(bytes: &[u8]) -> Result<Value, ValidationErrors> {
    let v: ciborium::Value = ciborium::de::from_reader(bytes).map_err(|_| {
        ValidationErrors(vec![FieldError::new(
            "$",
            Rule::Syntax,
            "not well-formed CBOR",
        )])
    })?;
    let mut errors = Vec::new();
    let json = cbor_value_to_json(&v, "$", &mut errors);
    if errors.is_empty() {
        Ok(json)
    } else {
        Err(ValidationErrors(errors))
    }
}

fn cbor_value_to_json(v: &ciborium::Value, path: &str, errors: &mut Vec<FieldError>) -> Value {
    use ciborium::Value as C;
    match v {
        C::Text(s) => Value::String(s.clone()),
        C::Integer(i) => {
            let i = i128::from(*i);
            match i64::try_from(i) {
                Ok(n) => Value::from(n),
                Err(_) => {
                    errors.push(FieldError::new(
                        path,
                        Rule::WrongType,
                        "integer out of range",
                    ));
                    Value::Null
                }
            }
        }
        C::Tag(0 | 1004, inner) if matches!(**inner, C::Text(_)) => {
            cbor_value_to_json(inner, path, errors)
        }
        C::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| cbor_value_to_json(x, &format!("{}[{i}]", path_root(path)), errors))
                .collect(),
        ),
        C::Map(m) => {
            let mut o = Map::new();
            for (k, v) in m {
                match k {
                    C::Text(k) => {
                        let p = join(path, k);
                        o.insert(k.clone(), cbor_value_to_json(v, &p, errors));
                    }
                    _ => errors.push(FieldError::new(
                        path,
                        Rule::WrongType,
                        "map keys must be text strings",
                    )),
                }
            }
            Value::Object(o)
        }
        C::Bool(b) => Value::Bool(*b),
        C::Null => Value::Null,
        _ => {
            errors.push(FieldError::new(
                path,
                Rule::WrongType,
                "floats, byte strings and tags are not allowed",
            ));
            Value::Null
        }
    }
}

fn path_root(p: &str) -> &str {
    if p == "$" {
        ""
    } else {
        p
    }
}

fn join(prefix: &str, key: &str) -> String {
    match path_root(prefix) {
        "" => key.to_string(),
        p => format!("{p}.{key}"),
    }
}

/// Which rules apply.
#[derive(Clone, Copy)]
struct Mode<'a> {
    /// Business rules and value sets (issuing) — or only the schema.
    issuing: Option<(&'a Policy, OffsetDateTime, Option<CertType>)>,
}

struct Ctx {
    errors: Vec<FieldError>,
}

impl Ctx {
    fn err(&mut self, path: impl Into<String>, rule: Rule, msg: impl Into<String>) {
        self.errors.push(FieldError::new(path, rule, msg));
    }

    fn object<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a Map<String, Value>> {
        match v {
            Value::Object(o) => Some(o),
            _ => {
                self.err(path, Rule::NotAnObject, "must be a JSON object");
                None
            }
        }
    }

    /// A string field: presence, type and maximum length.
    fn text<'a>(
        &mut self,
        o: &'a Map<String, Value>,
        key: &str,
        prefix: &str,
        required: bool,
        max: Option<usize>,
    ) -> Option<&'a str> {
        let path = join(prefix, key);
        match o.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.err(path, Rule::Required, "is required");
                }
                None
            }
            Some(Value::String(s)) => {
                if let Some(max) = max {
                    if s.chars().count() > max {
                        self.err(
                            path,
                            Rule::TooLong,
                            format!("must be at most {max} characters"),
                        );
                        return None;
                    }
                }
                Some(s)
            }
            Some(_) => {
                self.err(path, Rule::WrongType, "must be a string");
                None
            }
        }
    }

    /// A positive integer field (`dn`, `sd`).
    fn dose(&mut self, o: &Map<String, Value>, key: &str, prefix: &str) -> Option<u64> {
        let path = join(prefix, key);
        match o.get(key) {
            None | Some(Value::Null) => {
                self.err(path, Rule::Required, "is required");
                None
            }
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v >= 1 => Some(v),
                _ if n.is_f64() => {
                    self.err(path, Rule::WrongType, "must be an integer");
                    None
                }
                _ => {
                    self.err(path, Rule::DoseRange, "must be an integer of at least 1");
                    None
                }
            },
            Some(_) => {
                self.err(path, Rule::WrongType, "must be an integer");
                None
            }
        }
    }

    fn date(&mut self, o: &Map<String, Value>, key: &str, prefix: &str) -> Option<String> {
        let s = self.text(o, key, prefix, true, None)?;
        if parse_date(s).is_none() {
            self.err(
                join(prefix, key),
                Rule::DateFormat,
                "must be a complete date YYYY-MM-DD",
            );
            return None;
        }
        Some(s.to_string())
    }

    fn unknown(&mut self, o: &Map<String, Value>, allowed: &[&str], prefix: &str) {
        for k in o.keys() {
            if !allowed.contains(&k.as_str()) {
                // A key is free text from the caller: name it only if it looks like a field
                // name, so that a name or date sent as a key never reaches messages or logs.
                let plain = !k.is_empty()
                    && k.len() <= 20
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                let shown = if plain { k.as_str() } else { "*" };
                self.err(
                    join(prefix, shown),
                    Rule::UnknownField,
                    "is not a field of the DCC schema",
                );
            }
        }
    }

    fn value_set(&mut self, code: Option<&str>, set: ValueSet, path: &str) {
        if let Some(c) = code {
            if !set.contains(c) {
                self.err(
                    path,
                    Rule::ValueSet,
                    format!("is not in the value set {}", set.name()),
                );
            }
        }
    }
}

fn is_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn dob_ok(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let b = s.as_bytes();
    let year_ok = b.len() >= 4
        && b[..4].iter().all(u8::is_ascii_digit)
        && (s.starts_with("19") || s.starts_with("20"));
    match b.len() {
        4 => year_ok,
        7 => {
            year_ok
                && b[4] == b'-'
                && s[5..7].parse::<u8>().is_ok_and(|m| (1..=12).contains(&m))
                && b[5..7].iter().all(u8::is_ascii_digit)
        }
        10 => year_ok && parse_date(s).is_some(),
        _ => false,
    }
}

/// RFC 3339 exactly as the Swedish API writes it: `YYYY-MM-DDThh:mm:ssZ` or with `±hh:mm`; no
/// fractional seconds.
fn strict_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let base = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let zone = match b.len() {
        20 => b[19] == b'Z',
        25 => (b[19] == b'+' || b[19] == b'-') && digits(20..22) && b[22] == b':' && digits(23..25),
        _ => false,
    };
    base && zone && OffsetDateTime::parse(s, &Rfc3339).is_ok()
}

const ROOT_FIELDS: &[&str] = &["ver", "nam", "dob", "v", "t", "r"];
const NAME_FIELDS: &[&str] = &["fn", "fnt", "gn", "gnt"];
const V_FIELDS: &[&str] = &["tg", "vp", "mp", "ma", "dn", "sd", "dt", "co", "is", "ci"];
const T_FIELDS: &[&str] = &["tg", "tt", "nm", "ma", "sc", "tr", "tc", "co", "is", "ci"];
const R_FIELDS: &[&str] = &["tg", "fr", "co", "is", "df", "du", "ci"];

/// Validates against the DCC schema 1.3.x only: structure, types, lengths, patterns and formats;
/// no value sets, no clock, no business rules; `ci` required as in the schema.
pub fn validate_schema(payload: &Value) -> Result<Dcc, ValidationErrors> {
    run(payload, Mode { issuing: None })
}

/// Validates a payload for issuing at `now`: the schema, value sets, `co` and UVCI country equal
/// to the issuer's, the requested type, and the test / vaccination / recovery rules. `ci` is
/// optional (the issuer generates it). Unknown fields are refused.
///
/// Vaccination doses: `dn ≤ sd`, except that `sd = 1` allows `dn > 1`: a booster after a
/// one-dose primary course is written `2/1`, `3/1` … per the eHN guidelines on encoding
/// boosters; after a multi-dose course boosters are written `3/3`, so `3/2` is refused.
pub fn validate(
    payload: &Value,
    expected: Option<CertType>,
    policy: &Policy,
    now: OffsetDateTime,
) -> Result<Dcc, ValidationErrors> {
    run(
        payload,
        Mode {
            issuing: Some((policy, now, expected)),
        },
    )
}

fn run(payload: &Value, mode: Mode<'_>) -> Result<Dcc, ValidationErrors> {
    let mut ctx = Ctx { errors: Vec::new() };
    let dcc = root(&mut ctx, payload, mode);
    match dcc {
        Some(d) if ctx.errors.is_empty() => Ok(d),
        _ => {
            if ctx.errors.is_empty() {
                ctx.err("$", Rule::NotAnObject, "is not a DCC payload");
            }
            Err(ValidationErrors(ctx.errors))
        }
    }
}

fn root(ctx: &mut Ctx, payload: &Value, mode: Mode<'_>) -> Option<Dcc> {
    let o = ctx.object(payload, "$")?;
    let issuing = mode.issuing;
    if issuing.is_some() {
        ctx.unknown(o, ROOT_FIELDS, "$");
    }
    let ver = ctx.text(o, "ver", "$", true, None);
    if let Some(v) = ver {
        if !is_version(v) {
            ctx.err(
                "ver",
                Rule::Version,
                "must be a semantic version like 1.3.0",
            );
        } else if issuing.is_some() && !v.starts_with("1.") {
            ctx.err(
                "ver",
                Rule::Version,
                "only schema major version 1 is supported",
            );
        }
    }
    let nam = match o.get("nam") {
        None | Some(Value::Null) => {
            ctx.err("nam", Rule::Required, "is required");
            None
        }
        Some(v) => name(ctx, v, mode),
    };
    let dob = ctx.text(o, "dob", "$", true, None);
    if let Some(d) = dob {
        if !dob_ok(d) {
            ctx.err(
                "dob",
                Rule::DateOfBirthFormat,
                "must be YYYY-MM-DD, YYYY-MM or YYYY between 1900 and 2099, or empty",
            );
        } else if let Some((policy, now, _)) = issuing {
            let today = (now + policy.clock_skew).date().to_string();
            if !d.is_empty() && d > &today[..d.len()] {
                ctx.err("dob", Rule::DateInFuture, "must not be in the future");
            }
        }
    }

    let present: Vec<&str> = ["v", "t", "r"]
        .into_iter()
        .filter(|k| o.contains_key(*k))
        .collect();
    let statement = match present.as_slice() {
        [] => {
            ctx.err(
                "$",
                Rule::ExactlyOneStatement,
                "exactly one of v (vaccination), t (test) or r (recovery) is required",
            );
            None
        }
        [key] => {
            let t = CertType::from_payload_key(key)?;
            if let Some((_, _, Some(expected))) = issuing {
                if expected != t {
                    ctx.err(*key, Rule::TypeMismatch, format!("a {expected} certificate was requested but the payload holds a {t} statement"));
                }
            }
            statement(ctx, &o[*key], key, t, mode)
        }
        _ => {
            ctx.err(
                "$",
                Rule::ExactlyOneStatement,
                "only one of v, t and r may be present",
            );
            None
        }
    };
    Some(Dcc {
        ver: ver?.to_string(),
        nam: nam?,
        dob: dob?.to_string(),
        statement: statement?,
    })
}

fn name(ctx: &mut Ctx, v: &Value, mode: Mode<'_>) -> Option<Name> {
    let o = ctx.object(v, "nam")?;
    if mode.issuing.is_some() {
        ctx.unknown(o, NAME_FIELDS, "nam");
    }
    let family = ctx.text(o, "fn", "nam", false, Some(80));
    let given = ctx.text(o, "gn", "nam", false, Some(80));
    let std = |ctx: &mut Ctx, key: &str| {
        let s = ctx.text(o, key, "nam", false, Some(80))?;
        if !s.bytes().all(|b| b.is_ascii_uppercase() || b == b'<') {
            ctx.err(
                join("nam", key),
                Rule::StandardisedNameFormat,
                "must match ^[A-Z<]*$ (ICAO 9303 transliteration)",
            );
            return None;
        }
        Some(s.to_string())
    };
    let family_std = std(ctx, "fnt");
    let given_std = std(ctx, "gnt");
    let has = |k: &str| o.get(k).is_some_and(|v| !v.is_null());
    if !has("fnt") && !has("gnt") {
        ctx.err(
            "nam",
            Rule::StandardisedNameRequired,
            "at least one of fnt and gnt is required",
        );
    }
    Some(Name {
        family: family.map(str::to_string),
        family_std,
        given: given.map(str::to_string),
        given_std,
    })
}

/// Checks shared by every entry: tg, co, is, ci.
struct Common {
    tg: Option<String>,
    co: Option<String>,
    is: Option<String>,
    ci: Option<String>,
}

fn common(ctx: &mut Ctx, o: &Map<String, Value>, p: &str, mode: Mode<'_>) -> Common {
    let tg = ctx.text(o, "tg", p, true, None);
    let co = ctx.text(o, "co", p, true, None);
    let is = ctx.text(o, "is", p, true, Some(80));
    let ci = ctx.text(o, "ci", p, mode.issuing.is_none(), Some(80));
    if let Some(c) = co {
        if c.is_empty() || c.len() > 10 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            ctx.err(
                join(p, "co"),
                Rule::ValueSet,
                "must be an ISO 3166-1 alpha-2 country code",
            );
        }
    }
    if let Some(s) = is {
        if s.is_empty() {
            ctx.err(join(p, "is"), Rule::Required, "must not be empty");
        }
    }
    if let Some((policy, _, _)) = mode.issuing {
        if let Some(t) = tg {
            if t != COVID_19 {
                ctx.err(
                    join(p, "tg"),
                    Rule::DiseaseNotCovid19,
                    "must be 840539006 (COVID-19)",
                );
            }
        }
        if let Some(c) = co {
            if !ValueSet::Country.contains(c) {
                ctx.err(
                    join(p, "co"),
                    Rule::ValueSet,
                    "is not in the value set country-2-codes",
                );
            } else if c != policy.issuer_country {
                ctx.err(
                    join(p, "co"),
                    Rule::CountryNotIssuer,
                    "must be the issuing country",
                );
            }
        }
        if let Some(ci) = ci {
            if let Err((rule, msg)) = uvci::check_syntax(ci, Some(&policy.issuer_country)) {
                ctx.err(join(p, "ci"), rule, msg);
            }
        }
    }
    Common {
        tg: tg.map(str::to_string),
        co: co.map(str::to_string),
        is: is.map(str::to_string),
        ci: ci.map(str::to_string),
    }
}

fn statement(
    ctx: &mut Ctx,
    v: &Value,
    key: &str,
    t: CertType,
    mode: Mode<'_>,
) -> Option<Statement> {
    let arr = match v {
        Value::Array(a) => a,
        _ => {
            ctx.err(key, Rule::WrongType, "must be an array with one entry");
            return None;
        }
    };
    if arr.len() != 1 {
        ctx.err(key, Rule::ExactlyOneEntry, "must hold exactly one entry");
        return None;
    }
    let p = format!("{key}[0]");
    let o = ctx.object(&arr[0], &p)?;
    if mode.issuing.is_some() {
        let allowed = match t {
            CertType::Vaccination => V_FIELDS,
            CertType::Test => T_FIELDS,
            CertType::Recovery => R_FIELDS,
        };
        ctx.unknown(o, allowed, &p);
    }
    let c = common(ctx, o, &p, mode);
    match t {
        CertType::Vaccination => vaccination(ctx, o, &p, mode, c),
        CertType::Test => test(ctx, o, &p, mode, c),
        CertType::Recovery => recovery(ctx, o, &p, mode, c),
    }
}

fn not_future(ctx: &mut Ctx, date: Option<&str>, path: String, mode: Mode<'_>) {
    if let (Some(d), Some((policy, now, _))) = (date.and_then(parse_date), mode.issuing) {
        if d > (now + policy.clock_skew).date() {
            ctx.err(path, Rule::DateInFuture, "must not be in the future");
        }
    }
}

fn vaccination(
    ctx: &mut Ctx,
    o: &Map<String, Value>,
    p: &str,
    mode: Mode<'_>,
    c: Common,
) -> Option<Statement> {
    let vp = ctx.text(o, "vp", p, true, None);
    let mp = ctx.text(o, "mp", p, true, None);
    let ma = ctx.text(o, "ma", p, true, None);
    let dn = ctx.dose(o, "dn", p);
    let sd = ctx.dose(o, "sd", p);
    let dt = ctx.date(o, "dt", p);
    if mode.issuing.is_some() {
        ctx.value_set(vp, ValueSet::VaccineProphylaxis, &join(p, "vp"));
        ctx.value_set(mp, ValueSet::VaccineProduct, &join(p, "mp"));
        ctx.value_set(ma, ValueSet::VaccineManufacturer, &join(p, "ma"));
        if let (Some(dn), Some(sd)) = (dn, sd) {
            if dn > sd && sd != 1 {
                ctx.err(
                    join(p, "dn"),
                    Rule::DoseExceedsSeries,
                    "must not exceed sd (boosters after a multi-dose series are written n/n)",
                );
            }
        }
        not_future(ctx, dt.as_deref(), join(p, "dt"), mode);
    }
    Some(Statement::Vaccination(Vaccination {
        tg: c.tg?,
        vp: vp?.into(),
        mp: mp?.into(),
        ma: ma?.into(),
        dn: dn?,
        sd: sd?,
        dt: dt?,
        co: c.co?,
        is: c.is?,
        ci: c.ci,
    }))
}

fn test(
    ctx: &mut Ctx,
    o: &Map<String, Value>,
    p: &str,
    mode: Mode<'_>,
    c: Common,
) -> Option<Statement> {
    let tt = ctx.text(o, "tt", p, true, None);
    let nm = ctx.text(o, "nm", p, false, Some(80));
    let ma = ctx.text(o, "ma", p, false, None);
    let sc = ctx.text(o, "sc", p, true, None);
    let tr = ctx.text(o, "tr", p, true, None);
    let tc = ctx.text(o, "tc", p, false, Some(80));
    let sc_path = join(p, "sc");
    let sample = sc.and_then(|s| match parse_date_time(s) {
        Some(t) => Some(t),
        None => {
            ctx.err(
                sc_path.clone(),
                Rule::DateTimeFormat,
                "must be a date-time, e.g. 2021-12-16T09:06:00Z or 2021-12-16T10:03:12+01:00",
            );
            None
        }
    });
    if let Some((policy, now, _)) = mode.issuing {
        ctx.value_set(tt, ValueSet::TestType, &join(p, "tt"));
        match tr {
            Some(r) if !ValueSet::TestResult.contains(r) => ctx.err(
                join(p, "tr"),
                Rule::ValueSet,
                "is not in the value set test-result",
            ),
            Some(r) if r != NOT_DETECTED => ctx.err(
                join(p, "tr"),
                Rule::TestResultNotNegative,
                "a test certificate is issued only for a negative result (260415000)",
            ),
            _ => {}
        }
        if tt == Some(RAT) && ma.is_none() && !o.contains_key("ma") {
            ctx.err(
                join(p, "ma"),
                Rule::RatDeviceRequired,
                "a rapid antigen test must name its device",
            );
        }
        ctx.value_set(ma, ValueSet::TestDevice, &join(p, "ma"));
        if let (Some(s), Some(t)) = (sc, sample) {
            if !strict_date_time(s) {
                ctx.err(sc_path.clone(), Rule::DateTimeFormat, "must be YYYY-MM-DDThh:mm:ssZ or with an offset ±hh:mm, without fractional seconds");
            } else if t > now + policy.clock_skew {
                ctx.err(
                    sc_path.clone(),
                    Rule::SampleInFuture,
                    "the sample time is in the future",
                );
            } else if t < now - policy.max_sample_age {
                ctx.err(
                    sc_path.clone(),
                    Rule::SampleTooOld,
                    format!(
                        "the sample is older than {} hours",
                        policy.max_sample_age.whole_hours()
                    ),
                );
            }
        }
    }
    Some(Statement::Test(Test {
        tg: c.tg?,
        tt: tt?.into(),
        nm: nm.map(str::to_string),
        ma: ma.map(str::to_string),
        sc: sample.and(sc)?.into(),
        tr: tr?.into(),
        tc: tc.map(str::to_string),
        co: c.co?,
        is: c.is?,
        ci: c.ci,
    }))
}

fn recovery(
    ctx: &mut Ctx,
    o: &Map<String, Value>,
    p: &str,
    mode: Mode<'_>,
    c: Common,
) -> Option<Statement> {
    let fr = ctx.date(o, "fr", p);
    let df = ctx.date(o, "df", p);
    let du = ctx.date(o, "du", p);
    if mode.issuing.is_some() {
        let d = |s: &Option<String>| s.as_deref().and_then(parse_date);
        if let (Some(fr), Some(df)) = (d(&fr), d(&df)) {
            if fr > df {
                ctx.err(
                    join(p, "df"),
                    Rule::RecoveryDateOrder,
                    "must not be before fr",
                );
            }
        }
        if let (Some(df), Some(du)) = (d(&df), d(&du)) {
            if df > du {
                ctx.err(
                    join(p, "du"),
                    Rule::RecoveryDateOrder,
                    "must not be before df",
                );
            }
        }
        not_future(ctx, fr.as_deref(), join(p, "fr"), mode);
    }
    Some(Statement::Recovery(Recovery {
        tg: c.tg?,
        fr: fr?,
        co: c.co?,
        is: c.is?,
        df: df?,
        du: du?,
        ci: c.ci,
    }))
}
