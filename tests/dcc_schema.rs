//! Payload validation: the schema's own test cases and examples (eu-dcc-schema 1.3.3), and each
//! business rule with the field and rule it must report.

mod common;

use dccsign::dcc::{self, CertType, Policy, Rule};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

fn read_dir_json(rel: &str) -> Vec<(String, Value)> {
    let dir = common::shared_dir().join("dcc/schema").join(rel);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn schema_valid_cases_and_examples_pass() {
    let mut n = 0;
    for rel in [
        "test/valid",
        "examples/vaccination",
        "examples/test",
        "examples/recovery",
    ] {
        for (name, v) in read_dir_json(rel) {
            if let Err(e) = dcc::validate_schema(&v) {
                panic!("{rel}/{name} should be valid:\n{e}");
            }
            n += 1;
        }
    }
    assert!(n >= 13 + 14 + 7 + 6, "only {n} files checked");
}

#[test]
fn schema_invalid_cases_fail_for_the_right_reason() {
    let expect = [
        ("empty.json", "v", Rule::ExactlyOneEntry),
        ("invalid_dob.json", "dob", Rule::DateOfBirthFormat),
        ("invalid_dob2.json", "dob", Rule::DateOfBirthFormat),
        ("invalid_vac.json", "v[0].dn", Rule::DoseRange),
        ("missing_dob.json", "dob", Rule::Required),
        (
            "missing_fnt_gnt.json",
            "nam",
            Rule::StandardisedNameRequired,
        ),
    ];
    let cases = read_dir_json("test/invalid");
    assert_eq!(cases.len(), expect.len());
    for (name, path, rule) in expect {
        let v = &cases.iter().find(|(n, _)| n == name).unwrap().1;
        let e = dcc::validate_schema(v).expect_err(name);
        assert!(
            e.has(path, rule),
            "{name}: expected {path} {rule:?}, got:\n{e}"
        );
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn ts(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0).unwrap().format(&Rfc3339).unwrap()
}

fn base(key: &str, entry: Value) -> Value {
    let mut p = json!({
        "ver": "1.3.0",
        "nam": {"fn": "Testsson", "fnt": "TESTSSON", "gn": "Test", "gnt": "TEST"},
        "dob": "1980-01-01",
    });
    p[key] = json!([entry]);
    p
}

fn test_payload() -> Value {
    base(
        "t",
        json!({
            "tg": "840539006", "tt": "LP217198-3", "ma": "1232", "sc": ts(now() - Duration::hours(3)),
            "tr": "260415000", "tc": "Testcenter", "co": "SE", "is": "Issuer",
        }),
    )
}

fn vacc_payload() -> Value {
    base(
        "v",
        json!({
            "tg": "840539006", "vp": "J07BX03", "mp": "EU/1/20/1528", "ma": "ORG-100030215",
            "dn": 2, "sd": 2, "dt": (now() - Duration::days(20)).date().to_string(), "co": "SE", "is": "Issuer",
        }),
    )
}

fn rec_payload() -> Value {
    base(
        "r",
        json!({
            "tg": "840539006", "fr": (now() - Duration::days(20)).date().to_string(),
            "df": (now() - Duration::days(9)).date().to_string(),
            "du": (now() + Duration::days(150)).date().to_string(), "co": "SE", "is": "Issuer",
        }),
    )
}

fn check(p: &Value, t: CertType) -> Result<dcc::Dcc, dcc::ValidationErrors> {
    dcc::validate(p, Some(t), &Policy::default(), now())
}

fn refused(p: &Value, t: CertType, path: &str, rule: Rule) {
    let e = check(p, t).expect_err("should be refused");
    assert!(
        e.has(path, rule),
        "expected {path} {rule:?} ({}), got:\n{e}",
        rule.code()
    );
}

#[test]
fn fresh_payloads_of_each_type_pass() {
    assert_eq!(
        check(&test_payload(), CertType::Test).unwrap().cert_type(),
        CertType::Test
    );
    assert_eq!(
        check(&vacc_payload(), CertType::Vaccination)
            .unwrap()
            .cert_type(),
        CertType::Vaccination
    );
    assert_eq!(
        check(&rec_payload(), CertType::Recovery)
            .unwrap()
            .cert_type(),
        CertType::Recovery
    );
    // NAAT without a device, with an offset sample time.
    let mut p = test_payload();
    p["t"][0]["tt"] = json!("LP6464-4");
    p["t"][0].as_object_mut().unwrap().remove("ma");
    p["t"][0]["sc"] = json!(ts(
        (now() - Duration::hours(1)).to_offset(time::UtcOffset::from_hms(1, 0, 0).unwrap())
    ));
    check(&p, CertType::Test).unwrap();
    // A booster after a one-dose course: 2/1.
    let mut p = vacc_payload();
    p["v"][0]["dn"] = json!(2);
    p["v"][0]["sd"] = json!(1);
    check(&p, CertType::Vaccination).unwrap();
}

#[test]
fn test_rules() {
    let t = CertType::Test;
    let mut p = test_payload();
    p["t"][0]["tr"] = json!("260373001");
    refused(&p, t, "t[0].tr", Rule::TestResultNotNegative);

    let mut p = test_payload();
    p["t"][0]["sc"] = json!(ts(now() - Duration::days(8)));
    refused(&p, t, "t[0].sc", Rule::SampleTooOld);

    let mut p = test_payload();
    p["t"][0]["sc"] = json!(ts(now() + Duration::minutes(30)));
    refused(&p, t, "t[0].sc", Rule::SampleInFuture);
    // Within the 5-minute skew it is fine.
    let mut p = test_payload();
    p["t"][0]["sc"] = json!(ts(now() + Duration::minutes(2)));
    check(&p, t).unwrap();

    let mut p = test_payload();
    p["t"][0]["sc"] = json!("2021-12-16T10:03:12+0100");
    refused(&p, t, "t[0].sc", Rule::DateTimeFormat);
    let mut p = test_payload();
    p["t"][0]["sc"] = json!(format!("{}.5Z", &ts(now() - Duration::hours(1))[..19]));
    refused(&p, t, "t[0].sc", Rule::DateTimeFormat);

    let mut p = test_payload();
    p["t"][0]["tt"] = json!("LP0000-0");
    refused(&p, t, "t[0].tt", Rule::ValueSet);

    let mut p = test_payload();
    p["t"][0]["ma"] = json!("424242");
    refused(&p, t, "t[0].ma", Rule::ValueSet);

    let mut p = test_payload();
    p["t"][0].as_object_mut().unwrap().remove("ma");
    refused(&p, t, "t[0].ma", Rule::RatDeviceRequired);

    let mut p = test_payload();
    p["t"][0]["tg"] = json!("123456");
    refused(&p, t, "t[0].tg", Rule::DiseaseNotCovid19);
}

#[test]
fn structural_and_issuer_rules() {
    let t = CertType::Test;
    let mut p = test_payload();
    p.as_object_mut().unwrap().remove("nam");
    refused(&p, t, "nam", Rule::Required);

    let mut p = test_payload();
    p["v"] = vacc_payload()["v"].clone();
    refused(&p, t, "$", Rule::ExactlyOneStatement);

    refused(&vacc_payload(), t, "v", Rule::TypeMismatch);

    let mut p = test_payload();
    p["t"][0]["co"] = json!("NO");
    refused(&p, t, "t[0].co", Rule::CountryNotIssuer);

    let mut p = test_payload();
    p["t"][0]["ci"] = json!("URN:UVCI:01:NO:ABC/123");
    refused(&p, t, "t[0].ci", Rule::UvciCountry);
    let mut p = test_payload();
    p["t"][0]["ci"] = json!("not a uvci");
    refused(&p, t, "t[0].ci", Rule::UvciFormat);
    // A foreign-style check character is never enforced.
    let mut p = test_payload();
    p["t"][0]["ci"] = json!("URN:UVCI:01:SE:ABC/123#A");
    check(&p, t).unwrap();

    let mut p = test_payload();
    p["t"][0]["extra"] = json!("smuggled");
    refused(&p, t, "t[0].extra", Rule::UnknownField);
    // A key that is free text is not echoed.
    let mut p = test_payload();
    p["nam"]["Andersson, Astrid 1931-07-13"] = json!("x");
    refused(&p, t, "nam.*", Rule::UnknownField);
    let mut p = test_payload();
    p["nam"]["fnt"] = json!("lower");
    refused(&p, t, "nam.fnt", Rule::StandardisedNameFormat);
    let mut p = test_payload();
    p["nam"]["fn"] = json!("A".repeat(81));
    refused(&p, t, "nam.fn", Rule::TooLong);
    let mut p = test_payload();
    p["dob"] = json!((now() + Duration::days(400)).date().to_string());
    refused(&p, t, "dob", Rule::DateInFuture);
}

#[test]
fn vaccination_and_recovery_rules() {
    let v = CertType::Vaccination;
    let mut p = vacc_payload();
    p["v"][0]["dn"] = json!(3);
    p["v"][0]["sd"] = json!(2);
    refused(&p, v, "v[0].dn", Rule::DoseExceedsSeries);
    let mut p = vacc_payload();
    p["v"][0]["dn"] = json!(0);
    refused(&p, v, "v[0].dn", Rule::DoseRange);
    let mut p = vacc_payload();
    p["v"][0]["sd"] = json!("2");
    refused(&p, v, "v[0].sd", Rule::WrongType);
    let mut p = vacc_payload();
    p["v"][0]["dt"] = json!((now() + Duration::days(3)).date().to_string());
    refused(&p, v, "v[0].dt", Rule::DateInFuture);
    let mut p = vacc_payload();
    p["v"][0]["mp"] = json!("EU/1/99/9999");
    refused(&p, v, "v[0].mp", Rule::ValueSet);

    let r = CertType::Recovery;
    let mut p = rec_payload();
    p["r"][0]["fr"] = json!((now() - Duration::days(5)).date().to_string());
    refused(&p, r, "r[0].df", Rule::RecoveryDateOrder);
    let mut p = rec_payload();
    p["r"][0]["du"] = json!((now() - Duration::days(10)).date().to_string());
    refused(&p, r, "r[0].du", Rule::RecoveryDateOrder);
    let mut p = rec_payload();
    p["r"][0]["df"] = json!("2021-02-30");
    refused(&p, r, "r[0].df", Rule::DateFormat);
}

#[test]
fn all_problems_are_reported_at_once_without_values() {
    let mut p = test_payload();
    p["nam"] = json!({"fn": "Zzmarkerzz", "fnt": "ZZMARKERZZ lower", "gnt": "QQ MARKER"});
    p["dob"] = json!("ZZMARKERZZ");
    p["t"][0]["tr"] = json!("260373001");
    p["t"][0]["co"] = json!("ZZMARKERZZ");
    p["t"][0]["tc"] = json!(format!("ZZMARKERZZ{}", "x".repeat(80)));
    let e = check(&p, CertType::Test).unwrap_err();
    assert!(e.0.len() >= 6, "expected every problem, got:\n{e}");
    let text = e.to_string();
    for needle in ["ZZMARKERZZ", "Zzmarkerzz", "QQ MARKER"] {
        assert!(!text.contains(needle), "{needle} echoed:\n{text}");
    }
    assert!(e.0.iter().all(|x| x.code().starts_with("2-60-1001-")));
}

#[test]
fn cbor_round_trip_keeps_types() {
    let d = check(&vacc_payload(), CertType::Vaccination).unwrap();
    let bytes = d.to_cbor_bytes();
    assert_eq!(dcc::cbor_to_json(&bytes).unwrap(), d.to_json());
    let ciborium::Value::Map(root) = d.to_cbor() else {
        panic!("not a map")
    };
    let v = &root
        .iter()
        .find(|(k, _)| k.as_text() == Some("v"))
        .unwrap()
        .1;
    let entry = v.as_array().unwrap()[0].as_map().unwrap();
    let get = |k: &str| {
        &entry
            .iter()
            .find(|(x, _)| x.as_text() == Some(k))
            .unwrap()
            .1
    };
    assert!(
        matches!(get("dn"), ciborium::Value::Integer(_)),
        "dn must be an integer"
    );
    assert!(matches!(get("sd"), ciborium::Value::Integer(_)));
    let t = check(&test_payload(), CertType::Test).unwrap().to_cbor();
    let text = format!("{t:?}");
    assert!(!text.contains("Tag("), "sc must be untagged text");
    // A CBOR payload is validated like JSON.
    let again = dcc::validate(
        &dcc::cbor_to_json(&bytes).unwrap(),
        Some(CertType::Vaccination),
        &Policy::default(),
        now(),
    )
    .unwrap();
    assert_eq!(again, d);
    // Floats are refused.
    let mut bad = Vec::new();
    ciborium::ser::into_writer(
        &ciborium::Value::Map(vec![(
            ciborium::Value::Text("x".into()),
            ciborium::Value::Float(1.5),
        )]),
        &mut bad,
    )
    .unwrap();
    assert!(dcc::cbor_to_json(&bad).is_err());
    assert!(dcc::parse_json(b"{not json")
        .unwrap_err()
        .has("$", Rule::Syntax));
}

#[test]
fn every_rule_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/error-codes.md"))
        .unwrap();
    for r in Rule::ALL {
        let row = format!("| `{}` | `{}` |", r.code(), r.name());
        assert!(doc.contains(&row), "docs/error-codes.md lacks {row}");
    }
}
