//! `dccsign example-payload`: a valid DCC JSON payload with fresh dates, for trying the service.
//! The person is fictitious.

use std::process::ExitCode;

use dccsign::dcc::CertType;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// Arguments of `example-payload`.
#[derive(clap::Args, Debug)]
pub struct ExampleArgs {
    /// Certificate type: test, vaccination or recovery.
    #[arg(long = "type")]
    cert_type: CertType,
    /// Issuing country for `co`.
    #[arg(long, default_value = "SE")]
    country: String,
    /// Put this UVCI in `ci` (default: none, the signer generates one).
    #[arg(long)]
    ci: Option<String>,
}

/// A fresh example payload of type `t` for country `co`.
pub fn example(t: CertType, co: &str, ci: Option<&str>, now: OffsetDateTime) -> serde_json::Value {
    let date = |d: OffsetDateTime| d.date().to_string();
    let mut entry = match t {
        CertType::Test => json!({
            "tg": "840539006",
            "tt": "LP217198-3",
            "ma": "1232",
            "sc": (now - Duration::hours(2)).replace_nanosecond(0).unwrap_or(now).format(&Rfc3339).unwrap_or_default(),
            "tr": "260415000",
            "tc": "Testcenter Exempelstad",
            "co": co,
            "is": "dccsign development",
        }),
        CertType::Vaccination => json!({
            "tg": "840539006",
            "vp": "J07BX03",
            "mp": "EU/1/20/1528",
            "ma": "ORG-100030215",
            "dn": 2,
            "sd": 2,
            "dt": date(now - Duration::days(30)),
            "co": co,
            "is": "dccsign development",
        }),
        CertType::Recovery => json!({
            "tg": "840539006",
            "fr": date(now - Duration::days(20)),
            "df": date(now - Duration::days(9)),
            "du": date(now + Duration::days(160)),
            "co": co,
            "is": "dccsign development",
        }),
    };
    if let Some(ci) = ci {
        entry["ci"] = json!(ci);
    }
    let mut payload = json!({
        "ver": "1.3.0",
        "nam": { "fn": "Testsson", "fnt": "TESTSSON", "gn": "Test", "gnt": "TEST" },
        "dob": "1980-01-01",
    });
    payload[t.payload_key()] = json!([entry]);
    payload
}

/// Runs `example-payload`.
pub fn run(args: ExampleArgs) -> ExitCode {
    let v = example(
        args.cert_type,
        &args.country,
        args.ci.as_deref(),
        OffsetDateTime::now_utc(),
    );
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    ExitCode::SUCCESS
}
