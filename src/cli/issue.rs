//! `dccsign sign`: one certificate through the full pipeline, locally (token + ledger).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use dccsign::dcc::CertType;
use dccsign::hsm::Token;
use dccsign::issuance::{IssueError, Issuer, IssuerSettings, Payload};
use dccsign::keys::DscSet;
use dccsign::ledger::SqliteLedger;

use super::{ConfigArgs, EXIT_REJECTED};

/// Arguments of `sign`.
#[derive(clap::Args, Debug)]
pub struct SignArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Certificate type: test, vaccination or recovery.
    #[arg(long = "type")]
    cert_type: CertType,
    /// DCC JSON payload file (`-` for standard input).
    #[arg(long)]
    payload: PathBuf,
    /// Also write the QR code as PNG.
    #[arg(long)]
    qr: Option<PathBuf>,
    /// Also write the QR code as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// Reads a payload file, or standard input for `-`.
pub fn read_payload(p: &PathBuf) -> std::io::Result<Vec<u8>> {
    if p.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
        Ok(v)
    } else {
        std::fs::read(p)
    }
}

/// Runs `sign`.
pub fn sign(args: SignArgs) -> ExitCode {
    let payload = match read_payload(&args.payload) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.payload.display());
            return ExitCode::FAILURE;
        }
    };
    let cfg = match args.config.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let setup = || -> Result<Issuer, String> {
        let token = Token::open(&cfg.token_settings()).map_err(|e| e.to_string())?;
        let dscs = DscSet::load(&cfg, &token, now).map_err(|e| e.to_string())?;
        let pool = token.signing_pool(1, 16).map_err(|e| e.to_string())?;
        let ledger =
            SqliteLedger::open(&cfg.resolve(&cfg.ledger.path)).map_err(|e| e.to_string())?;
        Ok(Issuer::new(
            IssuerSettings::from_config(&cfg),
            &dscs,
            pool,
            Arc::new(ledger),
            None,
        ))
    };
    let issuer = match setup() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = issuer.issue(args.cert_type, Payload::Json(&payload), now);
    // The pool's and the ledger's threads end before the process does.
    issuer.close(std::time::Duration::from_secs(5));
    match result {
        Ok(issued) => {
            type Render = fn(&str) -> Result<Vec<u8>, dccsign::cose::CoseError>;
            let qr: [(&Option<PathBuf>, &str, Render); 2] = [
                (&args.qr, "PNG", dccsign::cose::qr::png),
                (&args.svg, "SVG", |h| {
                    dccsign::cose::qr::svg(h).map(String::into_bytes)
                }),
            ];
            for (path, kind, render) in qr {
                let Some(path) = path else { continue };
                let written = render(&issued.hc1)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| std::fs::write(path, bytes).map_err(|e| e.to_string()));
                if let Err(e) = written {
                    eprintln!("error: QR {kind} {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            tracing::info!(kid = %hex::encode(issued.kid), cert_type = %issued.cert_type, iat = issued.iat, exp = issued.exp, "signed");
            eprintln!(
                "signed {} certificate {} kid {} valid until {}",
                issued.cert_type,
                issued.uvci,
                hex::encode(issued.kid),
                super::fmt_time(Some(issued.exp))
            );
            println!("{}", issued.hc1);
            ExitCode::SUCCESS
        }
        Err(IssueError::Invalid(errors)) => {
            eprintln!("rejected: {} problem(s) in the payload", errors.0.len());
            for e in &errors.0 {
                eprintln!(
                    "  {}: {} [{} {}]",
                    display_path(&e.path),
                    e.message,
                    e.code(),
                    e.rule.name()
                );
            }
            ExitCode::from(EXIT_REJECTED)
        }
        Err(e) if e.is_client_error() => {
            eprintln!("rejected: {e}");
            ExitCode::from(EXIT_REJECTED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn display_path(p: &str) -> &str {
    if p.is_empty() {
        "$"
    } else {
        p
    }
}
