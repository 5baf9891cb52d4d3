//! `dccsign revoke`, `dccsign replace` and `dccsign revocation …`: clients of the daemon's
//! Revocation service over mutual TLS.

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use dccsign::api::pb;

use super::serve::{exit_code, runtime, ClientArgs};

/// Arguments of `revoke`.
#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The certificate's UVCI.
    #[arg(long)]
    uvci: String,
    /// wrong-patient, serious-error, fraud or suspended.
    #[arg(long)]
    reason: String,
    /// End of a suspension (RFC 3339).
    #[arg(long)]
    until: Option<String>,
}

/// Arguments of `replace`.
#[derive(clap::Args, Debug)]
pub struct ReplaceArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The UVCI of the certificate to replace.
    #[arg(long)]
    uvci: String,
    /// The corrected DCC JSON payload (its `ci` new or absent).
    #[arg(long)]
    payload: PathBuf,
    /// Write the new certificate's QR code as PNG.
    #[arg(long)]
    qr: Option<PathBuf>,
}

/// Arguments of `revocation`.
#[derive(clap::Args, Debug)]
pub struct RevocationArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: RevocationCommand,
}

#[derive(clap::Subcommand, Debug)]
enum RevocationCommand {
    /// Build the EU gateway batches (JSON + CMS base64) not built yet and export every batch
    /// not uploaded yet (officer).
    Batches {
        /// Directory to write `<id>.json` and `<id>.cms` into (default: list only).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the outbox once now (build, deliver, retry, purge); the daemon also runs it on a
    /// schedule (officer).
    Publish,
    /// Write the signed verifier list of one DSC (full, or the delta since a version).
    List {
        /// DSC kid (16 hex digits or base64).
        #[arg(long)]
        kid: String,
        /// Only the changes since this version.
        #[arg(long)]
        since: Option<i64>,
        /// Output file (COSE_Sign1).
        #[arg(long)]
        out: PathBuf,
    },
    /// Outbox counts, retries and final failures (officer).
    Status,
    /// Lift a revocation (a suspension that ends early, or one entered by mistake; officer).
    Lift {
        /// The certificate's UVCI.
        #[arg(long)]
        uvci: String,
    },
    /// Ask to revoke every certificate of a DSC, or of a client in a time window
    /// (two-person: a second officer runs `dccsign keys approve OP-…`).
    Bulk {
        /// wrong-patient, serious-error or fraud.
        #[arg(long)]
        reason: String,
        /// DSC kid (16 hex digits or base64).
        #[arg(long, conflicts_with = "issuer")]
        kid: Option<String>,
        /// Client identity whose certificates are revoked.
        #[arg(long, requires_all = ["from", "to"])]
        issuer: Option<String>,
        /// Window start (RFC 3339, inclusive).
        #[arg(long)]
        from: Option<String>,
        /// Window end (RFC 3339, exclusive).
        #[arg(long)]
        to: Option<String>,
    },
}

fn parse_kid(s: &str) -> Result<Vec<u8>, tonic::Status> {
    hex::decode(s)
        .ok()
        .filter(|k| k.len() == 8)
        .or_else(|| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .ok()
                .filter(|k| k.len() == 8)
        })
        .ok_or_else(|| tonic::Status::invalid_argument("kid: 16 hex digits or base64 of 8 bytes"))
}

fn write(path: &std::path::Path, bytes: &[u8]) -> Result<(), tonic::Status> {
    std::fs::write(path, bytes)
        .map_err(|e| tonic::Status::internal(format!("{}: {e}", path.display())))
}

fn client_run(
    client: &ClientArgs,
    default_client: &str,
    f: impl AsyncFnOnce(
        pb::revocation_client::RevocationClient<tonic::transport::Channel>,
    ) -> Result<(), tonic::Status>,
) -> ExitCode {
    let run = || -> Result<ExitCode, String> {
        let rt = runtime()?;
        rt.block_on(async move {
            let channel = client.connect(default_client).await?;
            let c = pb::revocation_client::RevocationClient::new(channel);
            Ok(exit_code(f(c).await))
        })
    };
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `revoke` (default client: issuer-all).
pub fn revoke(args: RevokeArgs) -> ExitCode {
    client_run(&args.client, "issuer-all", async |mut c| {
        let r = c
            .revoke(pb::RevokeRequest {
                uvci: args.uvci.clone(),
                reason: args.reason.clone(),
                until: args.until.clone().unwrap_or_default(),
            })
            .await?
            .into_inner();
        if r.already_revoked {
            eprintln!("already revoked (version {}); nothing changed", r.version);
        } else {
            eprintln!(
                "revoked: version {}, kid {}",
                r.version,
                hex::encode(&r.kid)
            );
        }
        Ok(())
    })
}

/// Runs `replace` (default client: issuer-all).
pub fn replace(args: ReplaceArgs) -> ExitCode {
    client_run(&args.client, "issuer-all", async |mut c| {
        let json = std::fs::read_to_string(&args.payload).map_err(|e| {
            tonic::Status::invalid_argument(format!("{}: {e}", args.payload.display()))
        })?;
        let r = c
            .replace(pb::ReplaceRequest {
                uvci: args.uvci.clone(),
                payload: Some(pb::replace_request::Payload::PayloadJson(json)),
                want_qr: if args.qr.is_some() {
                    pb::QrFormat::Png as i32
                } else {
                    pb::QrFormat::None as i32
                },
            })
            .await?
            .into_inner();
        let cert = r
            .certificate
            .ok_or_else(|| tonic::Status::internal("no certificate in the answer"))?;
        if let Some(p) = &args.qr {
            write(p, &cert.qr_png)?;
        }
        eprintln!(
            "replaced: the old certificate is revoked as \"replaced\"; new UVCI {}",
            cert.uvci
        );
        println!("{}", cert.hc1);
        Ok(())
    })
}

/// Runs `revocation …` (default client: officer-1).
pub fn revocation(args: RevocationArgs) -> ExitCode {
    client_run(&args.client, "officer-1", async |mut c| {
        match args.command {
            RevocationCommand::Batches { out } => {
                let r = c
                    .export_batches(pb::ExportBatchesRequest {})
                    .await?
                    .into_inner();
                eprintln!(
                    "built {} batch(es); {} not uploaded yet",
                    r.built,
                    r.batches.len()
                );
                if let Some(dir) = &out {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| tonic::Status::internal(format!("{}: {e}", dir.display())))?;
                }
                for b in &r.batches {
                    println!(
                        "{} kid {} {} expires {} entries {} upload {}",
                        b.id,
                        base64::engine::general_purpose::STANDARD.encode(&b.kid),
                        b.hash_type,
                        b.expires,
                        b.entries,
                        b.upload_state
                    );
                    if let Some(dir) = &out {
                        write(&dir.join(format!("{}.json", b.id)), &b.json)?;
                        write(&dir.join(format!("{}.cms", b.id)), b.cms.as_bytes())?;
                    }
                }
                Ok(())
            }
            RevocationCommand::Publish => {
                let r = c.publish(pb::RunOutboxRequest {}).await?.into_inner();
                println!(
                "lifted suspensions {} built {} events {} delivered {} retried {} failed {} purged {} unknown at gateway {}",
                r.lifted_suspensions,
                r.batches_built,
                r.events_queued,
                r.delivered,
                r.retried,
                r.failed,
                r.purged_certificates,
                r.unknown_gateway_batches
            );
                Ok(())
            }
            RevocationCommand::List { kid, since, out } => {
                let r = c
                    .get_list(pb::GetListRequest {
                        kid: parse_kid(&kid)?,
                        since,
                    })
                    .await?
                    .into_inner();
                write(&out, &r.list)?;
                eprintln!("wrote {} (version {})", out.display(), r.version);
                Ok(())
            }
            RevocationCommand::Status => {
                let r = c.status(pb::StatusRequest {}).await?.into_inner();
                println!("list version {}", r.version);
                for n in &r.counts {
                    println!("{:8} {:16} {:10} {}", n.kind, n.target, n.state, n.count);
                }
                for p in &r.retrying {
                    println!(
                        "retrying #{} {} {} after {} attempt(s), next {}: {}",
                        p.id,
                        p.kind,
                        p.target,
                        p.attempts,
                        super::fmt_time(Some(p.next_attempt_at)),
                        p.last_error
                    );
                }
                for p in &r.failures {
                    println!(
                        "FAILED #{} {} {} after {} attempt(s): {}",
                        p.id, p.kind, p.target, p.attempts, p.last_error
                    );
                }
                Ok(())
            }
            RevocationCommand::Lift { uvci } => {
                let r = c.lift(pb::LiftRequest { uvci }).await?.into_inner();
                eprintln!("lifted: version {}", r.version);
                Ok(())
            }
            RevocationCommand::Bulk {
                reason,
                kid,
                issuer,
                from,
                to,
            } => {
                let selector = match (kid, issuer) {
                    (Some(k), _) => {
                        Some(pb::bulk_revocation_request::Selector::Kid(parse_kid(&k)?))
                    }
                    (None, Some(issuer)) => Some(pb::bulk_revocation_request::Selector::Issuer(
                        pb::IssuerWindow {
                            issuer,
                            from: from.unwrap_or_default(),
                            to: to.unwrap_or_default(),
                        },
                    )),
                    (None, None) => None,
                };
                let o = c
                    .request_bulk_revocation(pb::BulkRevocationRequest { reason, selector })
                    .await?
                    .into_inner();
                eprintln!(
                    "pending: a second officer runs `dccsign keys approve {}`",
                    o.id
                );
                println!("{}", o.id);
                Ok(())
            }
        }
    })
}
