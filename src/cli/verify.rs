//! `dccsign verify`: decode and verify an HC1 against trusted DSC certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use dccsign::cose::{verify_hc1, TrustStore};

use super::EXIT_INVALID;

/// Arguments of `verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// PEM file with one or more trusted DSC certificates (repeatable).
    #[arg(long, required = true)]
    trust: Vec<PathBuf>,
    /// Verify as of this time (RFC 3339), default now.
    #[arg(long)]
    at: Option<String>,
    /// The `HC1:` string, or a file containing it, or `-` for standard input.
    input: String,
}

/// Runs `verify`.
pub fn verify(args: VerifyArgs) -> ExitCode {
    let mut trust = TrustStore::new();
    for p in &args.trust {
        let added = std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|pem| trust.add_pem(&pem).map_err(|e| e.to_string()));
        if let Err(e) = added {
            eprintln!("error: trust file {}: {e}", p.display());
            return ExitCode::FAILURE;
        }
    }
    let at = match &args.at {
        None => time::OffsetDateTime::now_utc(),
        Some(s) => {
            match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
                Ok(t) => t,
                Err(_) => {
                    eprintln!("error: --at must be RFC 3339, e.g. 2026-11-23T10:00:00Z");
                    return ExitCode::from(super::EXIT_REJECTED);
                }
            }
        }
    };
    let text = if args.input.starts_with("HC1:") {
        args.input.clone()
    } else if args.input == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
            eprintln!("error: stdin: {e}");
            return ExitCode::FAILURE;
        }
        s
    } else {
        match std::fs::read_to_string(&args.input) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {}: {e}", args.input);
                return ExitCode::FAILURE;
            }
        }
    };
    let report = match verify_hc1(text.trim(), &trust, at) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("invalid: cannot decode: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let kid = report
        .kid
        .as_deref()
        .map(hex::encode)
        .unwrap_or_else(|| "-".into());
    eprintln!(
        "kid {kid} iss {} type {} iat {} exp {}",
        report.iss.as_deref().unwrap_or("-"),
        report.cert_type.map(|t| t.as_str()).unwrap_or("-"),
        super::fmt_time(report.iat),
        super::fmt_time(report.exp)
    );
    let checks = [
        ("signature", &report.signature),
        ("expiration", &report.expiration),
        ("key usage", &report.key_usage),
    ];
    for (name, r) in checks {
        match r {
            Ok(()) => eprintln!("  {name}: ok"),
            Err(f) => eprintln!("  {name}: FAILED: {f}"),
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&report.payload).unwrap_or_default()
    );
    if report.is_valid() {
        eprintln!("valid");
        ExitCode::SUCCESS
    } else {
        eprintln!("invalid");
        ExitCode::from(EXIT_INVALID)
    }
}
