//! `dccsign tls-csr`: a certificate request for a TLS key of the daemon in the token — its
//! server key, or its client key towards the EU gateway — so that a production TLS key is made
//! and certified without ever leaving the HSM.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use dccsign::hsm::{HsmError, KeyUri, Token};
use dccsign::keys::{KeyManager, KeySettings, TlsRequest, TlsRole};
use serde_json::json;

use super::ConfigArgs;

/// Arguments of `tls-csr`.
#[derive(clap::Args, Debug)]
pub struct TlsCsrArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The key: a label or a `pkcs11:` URI in the configured token (e.g. `tls-server`, the
    /// label `[server] key` names).
    #[arg(long)]
    key: String,
    /// Generate the key first (P-256, sensitive, never extractable, signing only); refused if
    /// it exists. Without it the key must exist.
    #[arg(long)]
    generate: bool,
    /// `server` (serverAuth: the daemon's own certificate) or `client` (clientAuth: towards the
    /// EU gateway and subscribers).
    #[arg(long, default_value = "server")]
    role: Role,
    /// Subject, an RFC 4514 name, e.g. `CN=dccsign.example.se,O=Example Agency,C=SE`.
    #[arg(long)]
    subject: String,
    /// DNS name for the subject alternative name (repeat for more).
    #[arg(long)]
    dns: Vec<String>,
    /// IP address for it (repeat for more).
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// URI for it (repeat for more).
    #[arg(long)]
    uri: Vec<String>,
    /// Where to write the request (PEM); standard output when absent.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Role {
    Server,
    Client,
}

/// Runs `tls-csr`.
pub fn tls_csr(args: TlsCsrArgs) -> ExitCode {
    match run(&args) {
        Ok(pem) => {
            match &args.out {
                Some(path) => {
                    if let Err(e) = std::fs::write(path, &pem) {
                        eprintln!("error: {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                    println!("{}", path.display());
                }
                None => print!("{pem}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &TlsCsrArgs) -> Result<String, String> {
    let cfg = args.config.load()?;
    let token = Arc::new(Token::open(&cfg.token_settings()).map_err(|e| e.to_string())?);
    let (label, _) = KeyUri::resolve(&args.key, token.label()).map_err(|e| e.to_string())?;
    // Every step that changes the token, and every request made, is in the audit log.
    let settings = KeySettings::from_config(&cfg).map_err(|e| e.to_string())?;
    let manager = KeyManager::open(&cfg.resolve(&cfg.keys.database), token.clone(), settings)
        .map_err(|e| format!("audit log: {e}"))?;
    let who = format!(
        "local:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
    let now = || time::OffsetDateTime::now_utc().unix_timestamp();
    let key = match (token.find_key(&label), args.generate) {
        (Ok(_), true) => {
            return Err(format!(
                "a key labelled {label:?} exists already; leave out --generate to make a request \
                 for it, or choose another label"
            ))
        }
        (Ok(key), false) => key,
        (Err(HsmError::KeyNotFound(_)), true) => {
            let key = token.generate_p256(&label).map_err(|e| e.to_string())?;
            let recorded =
                manager.record_external(&who, "tls.generate", json!({"label": label}), "ok", now());
            if let Err(e) = recorded {
                // No audit entry, no key.
                let undone = token
                    .destroy_key_pair(&key)
                    .map_err(|d| format!("; removing the key failed too: {d}"));
                return Err(format!(
                    "audit log: {e}{}",
                    undone.err().unwrap_or_default()
                ));
            }
            key
        }
        (Err(HsmError::KeyNotFound(_)), false) => {
            return Err(format!(
                "no key labelled {label:?} in the token; add --generate to make one"
            ))
        }
        (Err(e), _) => return Err(e.to_string()),
    };
    let role = match args.role {
        Role::Server => TlsRole::Server,
        Role::Client => TlsRole::Client,
    };
    let request = TlsRequest {
        subject: &args.subject,
        role,
        dns: &args.dns,
        ips: &args.ip,
        uris: &args.uri,
    };
    let pem = dccsign::keys::tls_csr(&token, &key, request).map_err(|e| e.to_string())?;
    manager
        .record_external(
            &who,
            "tls.csr",
            json!({"label": label, "subject": args.subject, "role": format!("{:?}", args.role).to_lowercase(),
                   "dns": args.dns, "ip": args.ip, "uri": args.uri}),
            "ok",
            now(),
        )
        .map_err(|e| format!("audit log: {e}"))?;
    Ok(pem)
}
