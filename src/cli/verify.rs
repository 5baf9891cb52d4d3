//! `dccsign verify`: decode and verify an HC1 against trusted DSC certificates and, optionally,
//! against a signed verifier revocation list.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dccsign::cose::{verify_hc1, TrustStore};
use dccsign::revocation::list::{self, RevocationList};

use super::{EXIT_INVALID, EXIT_REVOKED};

/// Arguments of `verify`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Exit codes: 0 valid; 1 operational error (unreadable files, or a revocation list that does not \
verify with --revocation-key, is a delta, is for another DSC, or is stale); 2 bad arguments; 3 invalid \
(signature, validity period or key usage); 4 revoked (the signature verifies and the \
certificate's SIGNATURE hash is in the --revocation list; reported even if it has also expired).

Revocation: --revocation takes a full verifier list of the certificate's DSC (a COSE_Sign1 file, \
docs/revocation.md) and --revocation-key the list-signing public key (PEM; in a development \
state directory: pki/revocation-list-key.pem). The list is checked before anything is printed; \
a list whose signature does not verify is never taken as \"not revoked\". The daemon signs the \
list when it is fetched, with that time as `issued`; a list issued more than \
--max-list-age-hours before the verification time (or more than 5 minutes after it) is stale: \
an old list that predates a revocation must not pass as current.")]
pub struct VerifyArgs {
    /// PEM file with one or more trusted DSC certificates (repeatable).
    #[arg(long, required = true)]
    trust: Vec<PathBuf>,
    /// Verify as of this time (RFC 3339), default now.
    #[arg(long)]
    at: Option<String>,
    /// Signed verifier revocation list (full form, COSE_Sign1) of the certificate's DSC; a
    /// certificate whose SIGNATURE hash it holds is reported revoked (exit 4). Needs
    /// --revocation-key.
    #[arg(long, value_name = "LIST", requires = "revocation_key")]
    revocation: Option<PathBuf>,
    /// The list-signing public key (PEM) that --revocation must be signed with.
    #[arg(long, value_name = "PEM", requires = "revocation")]
    revocation_key: Option<PathBuf>,
    /// The oldest --revocation list accepted, in hours between its `issued` time and the
    /// verification time.
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u64).range(1..))]
    max_list_age_hours: u64,
    /// The `HC1:` string, or a file containing it, or `-` for standard input.
    input: String,
}

/// Clock skew allowed between the list's signer and the verifier.
const LIST_SKEW_SECONDS: i64 = 300;

/// Reads and opens a verifier list: signature by the key in `key_pem`, full form, issued at
/// most `max_age_hours` before `at` (and not after it, beyond the clock skew).
fn load_list(
    path: &Path,
    key_pem: &Path,
    at: time::OffsetDateTime,
    max_age_hours: u64,
) -> Result<RevocationList, String> {
    use p256::pkcs8::DecodePublicKey;
    let pem = std::fs::read_to_string(key_pem)
        .map_err(|e| format!("revocation key {}: {e}", key_pem.display()))?;
    let key = p256::PublicKey::from_public_key_pem(&pem).map_err(|e| {
        format!(
            "revocation key {}: not a P-256 public key in PEM: {e}",
            key_pem.display()
        )
    })?;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let list = list::open(&bytes, &key).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(since) = list.since() {
        return Err(format!(
            "{}: revocation list is a delta (since version {since}), not a full list; apply it \
             to the full list first",
            path.display()
        ));
    }
    let issued = i64::try_from(list.issued()).unwrap_or(i64::MAX);
    let at = at.unix_timestamp();
    let max_age = i64::try_from(max_age_hours.saturating_mul(3600)).unwrap_or(i64::MAX);
    let when = super::fmt_time(Some(issued));
    if issued > at.saturating_add(LIST_SKEW_SECONDS) {
        return Err(format!(
            "{}: revocation list issued at {when}, after the verification time",
            path.display()
        ));
    }
    if at.saturating_sub(issued) > max_age {
        return Err(format!(
            "{}: revocation list issued at {when}, more than {max_age_hours} h before the \
             verification time; fetch a fresh one (dccsign revocation list)",
            path.display()
        ));
    }
    Ok(list)
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
    let list = match (&args.revocation, &args.revocation_key) {
        (Some(l), Some(k)) => match load_list(l, k, at, args.max_list_age_hours) {
            Ok(list) => Some(list),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        // clap requires both or neither.
        _ => None,
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
    if let Some(list) = &list {
        if report.kid.as_deref() != Some(&list.kid()[..]) {
            eprintln!(
                "error: the revocation list is for kid {}, the certificate has kid {kid}",
                hex::encode(list.kid())
            );
            return ExitCode::FAILURE;
        }
    }
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
    // A revocation hash only means something for an authentic signature.
    let mut revoked = false;
    if let Some(list) = &list {
        let at = format!(
            "list version {}, issued {}",
            list.version(),
            super::fmt_time(i64::try_from(list.issued()).ok())
        );
        match (&report.signature, report.signature_hash) {
            (Ok(()), Some(h)) if list.contains(&h) => {
                revoked = true;
                eprintln!("  revocation: REVOKED ({at})");
            }
            (Ok(()), Some(_)) => eprintln!("  revocation: ok, not in the list ({at})"),
            _ => eprintln!("  revocation: not checked, the signature does not verify"),
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&report.payload).unwrap_or_default()
    );
    if revoked {
        eprintln!("revoked");
        ExitCode::from(EXIT_REVOKED)
    } else if report.is_valid() {
        eprintln!("valid");
        ExitCode::SUCCESS
    } else {
        eprintln!("invalid");
        ExitCode::from(EXIT_INVALID)
    }
}
