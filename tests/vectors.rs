//! Our decoder and verifier against the official EU DCC test vectors (dgc-testdata) in
//! `../shared/dcc/testdata`, compared with each vector's EXPECTEDRESULTS. Vectors listed in
//! `tests/known_issues.csv` there are skipped for the named check.

mod common;

use std::collections::HashSet;
use std::path::Path;

use base64::Engine;
use dccsign::cose::{self, TrustStore};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The checks we run and the name the upstream suite gives each in known_issues.csv.
const CHECKS: &[(&str, &str)] = &[
    ("EXPECTEDUNPREFIX", "test_unprefix"),
    ("EXPECTEDB45DECODE", "test_b45decode"),
    ("EXPECTEDCOMPRESSION", "test_compression"),
    ("EXPECTEDDECODE", "test_cbor_json"),
    ("EXPECTEDSCHEMAVALIDATION", "test_cose_schema"),
    ("EXPECTEDVERIFY", "test_verification_check"),
    ("EXPECTEDEXPIRATIONCHECK", "test_expiration_check"),
    ("EXPECTEDKEYUSAGE", "test_expected_key_usage"),
];

fn known_issues(root: &Path) -> HashSet<(String, String, String)> {
    let text = std::fs::read_to_string(root.join("tests/known_issues.csv")).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.len() >= 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

fn hex(v: &Value, key: &str) -> Option<Vec<u8>> {
    v.get(key)?
        .as_str()
        .and_then(|s| hex::decode(s.trim()).ok())
}

/// Evaluates one check; `None` when the vector lacks the input for it.
fn evaluate(v: &Value, check: &str) -> Option<bool> {
    let ctx = v.get("TESTCTX")?;
    let clock = || {
        ctx.get("VALIDATIONCLOCK")
            .and_then(|c| c.as_str())
            .and_then(|c| OffsetDateTime::parse(c, &Rfc3339).ok())
    };
    let report = || -> Option<cose::Report> {
        let cose_bytes = hex(v, "COSE")?;
        let mut trust = TrustStore::new();
        if let Some(cert) = ctx.get("CERTIFICATE").and_then(|c| c.as_str()) {
            if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(cert.trim()) {
                let _ = trust.add_der(&der);
            }
        }
        let at = clock().unwrap_or_else(OffsetDateTime::now_utc);
        cose::verify_cose(&cose_bytes, &trust, at).ok()
    };
    Some(match check {
        "EXPECTEDUNPREFIX" => {
            let prefixed = v.get("PREFIX")?.as_str()?;
            let b45 = v.get("BASE45")?.as_str()?;
            prefixed.strip_prefix(cose::hc1::PREFIX) == Some(b45)
        }
        "EXPECTEDB45DECODE" => {
            let b45 = v.get("BASE45")?.as_str()?;
            let compressed = hex(v, "COMPRESSED")?;
            base45::decode(b45).ok() == Some(compressed)
        }
        "EXPECTEDCOMPRESSION" => {
            let compressed = hex(v, "COMPRESSED")?;
            let cose_bytes = hex(v, "COSE")?;
            cose::hc1::inflate(&compressed).ok() == Some(cose_bytes)
        }
        "EXPECTEDDECODE" => {
            let json = v.get("JSON")?;
            let cbor = hex(v, "CBOR")?;
            // Some issuers put the whole CWT in CBOR, others only the DCC: take hcert[1] if any.
            match ciborium::de::from_reader::<ciborium::Value, _>(&cbor[..]) {
                Ok(c) => {
                    let claims = cose::cwt::DecodedClaims::from_cbor_bytes(&cbor)
                        .ok()
                        .and_then(|d| d.dcc);
                    let dcc = claims.unwrap_or(c);
                    same_payload(&cose::cbor_json::to_json(&dcc), json)
                }
                Err(_) => false,
            }
        }
        "EXPECTEDSCHEMAVALIDATION" => match report() {
            Some(r) => dccsign::dcc::validate_schema(&r.payload).is_ok(),
            None => {
                let json = v.get("JSON")?;
                dccsign::dcc::validate_schema(json).is_ok()
            }
        },
        "EXPECTEDVERIFY" => {
            v.get("COSE")?;
            report().is_some_and(|r| r.signature.is_ok())
        }
        "EXPECTEDEXPIRATIONCHECK" => {
            v.get("COSE")?;
            clock()?;
            report().is_some_and(|r| r.expiration.is_ok())
        }
        "EXPECTEDKEYUSAGE" => {
            v.get("COSE")?;
            report().is_some_and(|r| r.signature.is_ok() && r.key_usage.is_ok())
        }
        _ => return None,
    })
}

/// JSON equality where numbers compare by value and date-times by instant (issuers differ in
/// how they write `sc`).
fn same_payload(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_payload(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_payload(v, w))
        }
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::String(x), Value::String(y)) => {
            x == y
                || matches!(
                    (OffsetDateTime::parse(x, &Rfc3339), OffsetDateTime::parse(y, &Rfc3339)),
                    (Ok(p), Ok(q)) if p == q
                )
        }
        _ => a == b,
    }
}

#[test]
fn official_vectors_match_expected_results() {
    let root = common::shared_dir().join("dcc/testdata");
    let known = known_issues(&root);
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("2DCode/raw").is_dir())
        .flat_map(|country| {
            std::fs::read_dir(country.path().join("2DCode/raw"))
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect::<Vec<_>>()
        })
        .collect();
    files.sort();

    let (mut vectors, mut run, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for path in &files {
        let Ok(v) = serde_json::from_str::<Value>(&std::fs::read_to_string(path).unwrap()) else {
            continue;
        };
        let Some(expected) = v.get("EXPECTEDRESULTS") else {
            continue;
        };
        vectors += 1;
        let country = path
            .components()
            .rev()
            .nth(3)
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .to_string();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        for (check, upstream) in CHECKS {
            let Some(want) = expected.get(*check).and_then(|x| x.as_bool()) else {
                continue;
            };
            if known.contains(&(upstream.to_string(), country.clone(), stem.clone()))
                || known.contains(&(upstream.to_string(), country.clone(), String::new()))
            {
                skipped += 1;
                continue;
            }
            let Some(got) = evaluate(&v, check) else {
                continue;
            };
            run += 1;
            if got != want {
                failures.push(format!(
                    "{country}/{stem} {check}: expected {want}, got {got}"
                ));
            }
        }
    }
    println!(
        "{vectors} vectors, {run} checks run, {skipped} skipped as known issues, {} mismatches",
        failures.len()
    );
    for f in &failures {
        println!("  {f}");
    }
    assert!(
        vectors >= 130,
        "only {vectors} vectors found under {}",
        root.display()
    );
    assert!(run >= 500, "only {run} checks ran");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
