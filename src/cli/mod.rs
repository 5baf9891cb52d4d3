//! Sub-commands. Exit codes: 0 success; 1 operational error (token, ledger, files); 2 rejected
//! input (every problem is printed with field, rule and code); 3 the certificate is not valid
//! (`verify`); 4 the certificate is revoked (`verify --revocation`).

mod example;
mod issue;
mod keys;
mod ledger;
mod load;
mod revocation;
mod serve;
mod tls;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use dccsign::config::Config;

/// Exit code for a rejected payload or request.
pub const EXIT_REJECTED: u8 = 2;
/// Exit code for a certificate that does not verify.
pub const EXIT_INVALID: u8 = 3;
/// Exit code for a certificate whose signature verifies but which the revocation list revokes.
pub const EXIT_REVOKED: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "dccsign",
    version,
    about = "Signing back-end for EU digital COVID certificates"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

/// Where the configuration comes from.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// State directory written by `dev-init` (uses <DIR>/dccsign.toml).
    #[arg(long, conflicts_with = "config")]
    pub state_dir: Option<PathBuf>,
    /// Configuration file.
    #[arg(long, env = "DCCSIGN_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// Loads the configuration and exports SoftHSM's config location.
    pub fn load(&self) -> Result<Config, String> {
        let path = match (&self.config, &self.state_dir) {
            (Some(c), _) => c.clone(),
            (None, Some(d)) => d.join("dccsign.toml"),
            (None, None) => return Err("give --state-dir DIR or --config FILE".into()),
        };
        let cfg = Config::load(&path).map_err(|e| e.to_string())?;
        cfg.export_softhsm_env();
        Ok(cfg)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a development PKI: SoftHSM token, CSCA, one DSC per type, config. Idempotent.
    DevInit {
        /// State directory to create or complete.
        #[arg(long, default_value = "./var")]
        state_dir: PathBuf,
        /// Issuing country (ISO 3166-1 alpha-2).
        #[arg(long, default_value = "SE")]
        country: String,
    },
    /// Validate and sign one payload; prints the HC1 string.
    Sign(issue::SignArgs),
    /// Verify an HC1 string (or a file holding one); prints the payload as JSON.
    Verify(verify::VerifyArgs),
    /// Print a valid example payload with fresh dates (fictitious person).
    ExamplePayload(example::ExampleArgs),
    /// Run the gRPC signing daemon over mutual TLS.
    Serve(serve::ServeArgs),
    /// Issue one certificate through a running daemon (mTLS client); prints the HC1.
    Issue(serve::IssueArgs),
    /// Drive a running daemon with load over mTLS and report throughput and latency.
    Load(load::LoadArgs),
    /// Key ceremonies for security officers (over mTLS to the daemon).
    Keys(keys::KeysArgs),
    /// The audit log of key operations.
    Audit(keys::AuditArgs),
    /// Offline operator commands on the ledger (the daemon stopped): interrupted reservations.
    Ledger(ledger::LedgerArgs),
    /// A certificate request (PKCS#10, signed in the token) for a TLS key of the daemon in the
    /// token — its server key or its client key towards the EU gateway; `--generate` makes the
    /// key first. Both steps are recorded in the audit log.
    TlsCsr(tls::TlsCsrArgs),
    /// Write the trust list for verifiers: active DSCs and retired ones still needed (officer).
    TrustList(keys::TrustListArgs),
    /// Revoke a certificate by its UVCI (issuers: their own; officers: any).
    Revoke(revocation::RevokeArgs),
    /// Issue a corrected certificate and revoke the old one as "replaced", atomically (issuer).
    Replace(revocation::ReplaceArgs),
    /// EU gateway batches, the outbox, the signed verifier list, lifts and bulk revocation.
    Revocation(revocation::RevocationArgs),
    /// Development CSCA operator: certify a CSR as a DSC with the development CSCA; prints PEM.
    DevSignCsr {
        /// State directory written by `dev-init`.
        #[arg(long)]
        state_dir: PathBuf,
        /// The PKCS#10 request (PEM).
        #[arg(long)]
        csr: PathBuf,
        /// Certificate types for the extended key usage, comma-separated (none: no extended key
        /// usage, e.g. for the upload certificate).
        #[arg(long, value_delimiter = ',')]
        types: Vec<dccsign::dcc::CertType>,
        /// Start of validity (RFC 3339), default now.
        #[arg(long)]
        not_before: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 730)]
        days: u64,
        /// Key usage nonRepudiation instead of digitalSignature (a certificate import must
        /// refuse; for testing).
        #[arg(long)]
        without_digital_signature: bool,
    },
    /// Development: issue another client certificate from the dev TLS CA (e.g. an expired one),
    /// with `--server` a server certificate for localhost, or with `--revoke` put a client's
    /// certificate on the dev TLS CA's CRL.
    DevClientCert {
        /// State directory written by `dev-init`.
        #[arg(long)]
        state_dir: PathBuf,
        /// Client name; the identity is spiffe://dccsign.dev/<name>.
        #[arg(long)]
        name: String,
        /// Start of validity (RFC 3339), default now.
        #[arg(long)]
        not_before: Option<String>,
        /// Validity in hours (with `--revoke`, the CRL's).
        #[arg(long, default_value_t = 24 * 365)]
        hours: u64,
        /// A server certificate for localhost instead (`pki/tls/<name>.{pem,key}`), e.g. for a
        /// stand-in of the EU gateway.
        #[arg(long)]
        server: bool,
        /// Revoke client <name>'s certificate instead: re-issue the CRL
        /// `pki/tls/clients-crl.pem` with it added (a running daemon reads the file again
        /// within `client_crl_check_seconds`).
        #[arg(long, conflicts_with_all = ["server", "not_before"])]
        revoke: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DCCSIGN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the command line.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::DevInit { state_dir, country } => dev_init(&state_dir, &country),
        Command::Sign(args) => issue::sign(args),
        Command::Verify(args) => verify::verify(args),
        Command::ExamplePayload(args) => example::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Issue(args) => serve::issue(args),
        Command::Load(args) => load::run(args),
        Command::Keys(a) => keys::keys(a),
        Command::Audit(a) => keys::audit(a),
        Command::Ledger(a) => ledger::ledger(a),
        Command::TlsCsr(a) => tls::tls_csr(a),
        Command::TrustList(a) => keys::trust_list(a),
        Command::Revoke(a) => revocation::revoke(a),
        Command::Replace(a) => revocation::replace(a),
        Command::Revocation(a) => revocation::revocation(a),
        Command::DevSignCsr {
            state_dir,
            csr,
            types,
            not_before,
            days,
            without_digital_signature,
        } => dev_sign_csr(
            &state_dir,
            &csr,
            &types,
            not_before.as_deref(),
            days,
            !without_digital_signature,
        ),
        Command::DevClientCert {
            state_dir,
            name,
            hours,
            revoke: true,
            ..
        } => match dccsign::keys::dev_revoke_client(
            &state_dir,
            &name,
            std::time::Duration::from_secs(hours * 3600),
        ) {
            Ok(crl) => {
                println!("{}", crl.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::DevClientCert {
            state_dir,
            name,
            not_before,
            hours,
            server,
            ..
        } => dev_client_cert(&state_dir, &name, not_before.as_deref(), hours, server),
    }
}

/// `--not-before` as a time (now when absent).
fn start_time(not_before: Option<&str>) -> Result<std::time::SystemTime, ExitCode> {
    match not_before {
        None => Ok(std::time::SystemTime::now()),
        Some(s) => {
            match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
                Ok(t) => Ok(std::time::SystemTime::UNIX_EPOCH
                    + std::time::Duration::from_secs(t.unix_timestamp().max(0) as u64)),
                Err(_) => {
                    eprintln!("error: --not-before must be RFC 3339");
                    Err(ExitCode::from(EXIT_REJECTED))
                }
            }
        }
    }
}

fn dev_sign_csr(
    state_dir: &Path,
    csr: &Path,
    types: &[dccsign::dcc::CertType],
    not_before: Option<&str>,
    days: u64,
    digital_signature: bool,
) -> ExitCode {
    let start = match start_time(not_before) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let lifetime = std::time::Duration::from_secs(days * 86_400);
    let result = std::fs::read(csr)
        .map_err(|e| format!("{}: {e}", csr.display()))
        .and_then(|pem| {
            dccsign::keys::dev_sign_csr(state_dir, &pem, types, start, lifetime, digital_signature)
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(pem) => {
            print!("{pem}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dev_client_cert(
    state_dir: &Path,
    name: &str,
    not_before: Option<&str>,
    hours: u64,
    server: bool,
) -> ExitCode {
    let start = match start_time(not_before) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let lifetime = std::time::Duration::from_secs(hours * 3600);
    let role = if server {
        dccsign::keys::TlsRole::Server
    } else {
        dccsign::keys::TlsRole::Client
    };
    match dccsign::keys::dev_tls_cert(state_dir, name, role, start, lifetime) {
        Ok((cert, key)) => {
            println!("{}\n{}", cert.display(), key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dev_init(state_dir: &Path, country: &str) -> ExitCode {
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        eprintln!("error: --country must be two upper-case letters");
        return ExitCode::from(EXIT_REJECTED);
    }
    match dccsign::keys::dev_init(state_dir, country) {
        Ok(report) => {
            if report.created.is_empty() {
                println!("development PKI already complete; nothing changed");
            } else {
                for c in &report.created {
                    println!("created {c}");
                }
            }
            println!("config: {}", report.config.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: dev-init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Unix seconds as RFC 3339 (`-` when absent or out of range).
pub fn fmt_time(t: Option<i64>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}
