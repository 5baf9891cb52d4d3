//! `dccsign keys …` (security officers, over mTLS to the running daemon) and `dccsign audit
//! verify` (local, on the control database).

use std::path::PathBuf;
use std::process::ExitCode;

use dccsign::api::pb;
use dccsign::dcc::CertType;

use super::serve::{exit_code, runtime, ClientArgs};
use super::ConfigArgs;

/// Arguments of `keys`.
#[derive(clap::Args, Debug)]
pub struct KeysArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(clap::Subcommand, Debug)]
enum KeysCommand {
    /// Ask for a new P-256 key in the HSM (two-person: prints the pending operation id).
    Generate {
        /// New key label.
        label: String,
        /// Certificate types, comma-separated: test, vaccination, recovery (DSCs only).
        #[arg(long, value_delimiter = ',', required_unless_present = "role")]
        types: Vec<CertType>,
        /// `dsc` (default) or `upload` (the key that signs EU gateway packages).
        #[arg(long)]
        role: Option<String>,
    },
    /// Approve (and so execute) another officer's pending operation.
    Approve {
        /// Operation id (OP-…).
        operation: String,
    },
    /// Operations waiting for a second officer.
    Pending,
    /// Print a PKCS#10 request for a generated key, signed inside the HSM.
    Csr {
        /// Key label.
        label: String,
        /// Subject (RFC 4514), e.g. "CN=DSC test 2027a,O=eHealth Agency,C=SE".
        #[arg(long)]
        subject: String,
    },
    /// Import the CSCA-signed certificate of a generated key (every check, then "certified").
    ImportCert {
        /// Key label.
        label: String,
        /// Certificate file (PEM or DER).
        certificate: PathBuf,
    },
    /// Write the EU gateway upload package (base64 CMS) of a certified DSC; it becomes published.
    Publish {
        /// Key label.
        label: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Ask to activate a published DSC (two-person; after the propagation delay).
    Activate {
        /// Key label.
        label: String,
    },
    /// Ask to retire an active DSC (two-person): it signs nothing more.
    Retire {
        /// Key label.
        label: String,
    },
    /// Destroy a retired DSC's private key: a dry run unless --execute (then two-person).
    Destroy {
        /// Key label.
        label: String,
        /// Ask for the destruction (a second officer approves).
        #[arg(long)]
        execute: bool,
        /// Destroy although certificates it signed are still valid (with --reason).
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why, recorded in the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// The trust list for verifiers (JSON): active DSCs and retired ones still needed.
    TrustList {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Keys and their state.
    List {
        /// JSON on standard output.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of the top-level `trust-list` (same as `keys trust-list`).
#[derive(clap::Args, Debug)]
pub struct TrustListArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `trust-list`.
pub fn trust_list(args: TrustListArgs) -> ExitCode {
    keys(KeysArgs {
        client: args.client,
        command: KeysCommand::TrustList { out: args.out },
    })
}

/// Runs `keys`.
pub fn keys(args: KeysArgs) -> ExitCode {
    match keys_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn op_line(o: &pb::Operation) -> String {
    format!(
        "{} {} {} requested by {} ({}){}",
        o.id,
        o.operation,
        o.parameters_json,
        o.requester,
        o.state,
        if o.result.is_empty() {
            String::new()
        } else {
            format!(": {}", o.result)
        }
    )
}

fn keys_inner(args: KeysArgs) -> Result<ExitCode, String> {
    let rt = runtime()?;
    rt.block_on(async move {
        let channel = args.client.connect("officer-1").await?;
        let mut c = pb::keys_client::KeysClient::new(channel);
        let result: Result<(), tonic::Status> = async {
            match args.command {
                KeysCommand::Generate { label, types, role } => {
                    let o = c
                        .generate_key(pb::GenerateKeyRequest {
                            label,
                            role: role.unwrap_or_default(),
                            types: types
                                .iter()
                                .map(|t| pb::CertificateType::from(*t) as i32)
                                .collect(),
                        })
                        .await?
                        .into_inner();
                    eprintln!("pending: a second officer runs `dccsign keys approve {}`", o.id);
                    println!("{}", o.id);
                }
                KeysCommand::Approve { operation } => {
                    let o = c
                        .approve(pb::ApproveRequest {
                            operation_id: operation,
                        })
                        .await?
                        .into_inner();
                    println!("{}", op_line(&o));
                }
                KeysCommand::Publish { label, out } => {
                    let r = c
                        .publish(pb::PublishRequest { label })
                        .await?
                        .into_inner();
                    std::fs::write(&out, r.package_base64).map_err(|e| {
                        tonic::Status::internal(format!("{}: {e}", out.display()))
                    })?;
                    eprintln!("wrote {}", out.display());
                }
                KeysCommand::Activate { label } => {
                    let o = c
                        .activate(pb::ActivateRequest { label })
                        .await?
                        .into_inner();
                    eprintln!("pending: a second officer runs `dccsign keys approve {}`", o.id);
                    println!("{}", o.id);
                }
                KeysCommand::Retire { label } => {
                    let o = c.retire(pb::RetireRequest { label }).await?.into_inner();
                    eprintln!("pending: a second officer runs `dccsign keys approve {}`", o.id);
                    println!("{}", o.id);
                }
                KeysCommand::Destroy {
                    label,
                    execute,
                    force,
                    reason,
                } => {
                    let r = c
                        .destroy(pb::DestroyRequest {
                            label,
                            execute,
                            force_reason: if force { reason.unwrap_or_default() } else { String::new() },
                        })
                        .await?
                        .into_inner();
                    eprintln!("{}", r.report);
                    match r.operation {
                        Some(o) => {
                            eprintln!("pending: a second officer runs `dccsign keys approve {}`", o.id);
                            println!("{}", o.id);
                        }
                        None => eprintln!("dry run: nothing was done (add --execute)"),
                    }
                }
                KeysCommand::TrustList { out } => {
                    let r = c.trust_list(pb::TrustListRequest {}).await?.into_inner();
                    std::fs::write(&out, r.json).map_err(|e| {
                        tonic::Status::internal(format!("{}: {e}", out.display()))
                    })?;
                    eprintln!("wrote {}", out.display());
                }
                KeysCommand::Pending => {
                    let r = c.list_pending(pb::ListPendingRequest {}).await?.into_inner();
                    for o in &r.operations {
                        println!(
                            "{} (expires {})",
                            op_line(o),
                            super::fmt_time(Some(o.expires_at))
                        );
                    }
                }
                KeysCommand::Csr { label, subject } => {
                    let r = c
                        .create_csr(pb::CreateCsrRequest { label, subject })
                        .await?
                        .into_inner();
                    print!("{}", r.csr_pem);
                }
                KeysCommand::ImportCert { label, certificate } => {
                    let bytes = std::fs::read(&certificate).map_err(|e| {
                        tonic::Status::invalid_argument(format!("{}: {e}", certificate.display()))
                    })?;
                    let k = c
                        .import_certificate(pb::ImportCertificateRequest {
                            label,
                            certificate: bytes,
                        })
                        .await?
                        .into_inner();
                    println!("{} {} kid {}", k.label, k.state, hex::encode(&k.kid));
                }
                KeysCommand::List { json } => {
                    let r = c.list_keys(pb::ListKeysRequest {}).await?.into_inner();
                    let now = time::OffsetDateTime::now_utc().unix_timestamp();
                    let rows: Vec<serde_json::Value> = r
                        .keys
                        .iter()
                        .map(|k| {
                            serde_json::json!({
                                "label": k.label, "state": k.state, "managed": k.managed,
                                "kid": hex::encode(&k.kid),
                                "types": k.types.iter().filter_map(|t| pb::CertificateType::try_from(*t).ok()
                                    .and_then(pb::CertificateType::cert_type)).map(|t| t.as_str()).collect::<Vec<_>>(),
                                "not_before": k.not_before, "not_after": k.not_after,
                                "usage_seconds_left": (k.usage_end > 0).then(|| k.usage_end - now),
                                "certificates_signed": k.certificates_signed,
                                "uri": k.uri,
                            })
                        })
                        .collect();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
                    } else {
                        for r in rows {
                            let left = r["usage_seconds_left"]
                                .as_i64()
                                .map(|s| format!("{} days", s / 86_400))
                                .unwrap_or_else(|| "-".into());
                            println!(
                                "{:24} {:10} kid {:16} types {} valid to {} usage left {} signed {}",
                                r["label"].as_str().unwrap_or(""),
                                r["state"].as_str().unwrap_or(""),
                                r["kid"].as_str().unwrap_or(""),
                                r["types"],
                                super::fmt_time(r["not_after"].as_i64().filter(|t| *t > 0)),
                                left,
                                r["certificates_signed"]
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        Ok(exit_code(result))
    })
}

/// Arguments of `audit`.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AuditCommand {
    /// Check the hash chain of the audit log and its signed checkpoints.
    Verify {
        #[command(flatten)]
        config: ConfigArgs,
        /// Also check the audit anchor in the token (the newest checkpoint, which the database
        /// alone cannot show deleted); logs in to the token with the configured PIN.
        #[arg(long)]
        with_token: bool,
    },
    /// Accept the audit log as it is although it does not match the token's anchor (after
    /// restoring the control database from a backup, say): records `audit.reanchor` with the
    /// old anchor and the reason, then a checkpoint that becomes the anchor. The daemon
    /// refuses to start until the two match.
    Reanchor {
        #[command(flatten)]
        config: ConfigArgs,
        /// Why (recorded in the audit log), e.g. "control.sqlite restored from the 02:00 backup".
        #[arg(long)]
        reason: String,
    },
}

/// The control database's key manager with the audit key, on the configured token.
fn audit_manager(cfg: &dccsign::config::Config) -> Result<dccsign::keys::KeyManager, String> {
    let token = std::sync::Arc::new(
        dccsign::hsm::Token::open(&cfg.token_settings()).map_err(|e| e.to_string())?,
    );
    let Some(k) = &cfg.keys.audit_key else {
        return Err("no keys.audit_key configured: there are no checkpoints to anchor".into());
    };
    let (label, _) = dccsign::hsm::KeyUri::resolve(k, token.label()).map_err(|e| e.to_string())?;
    let key = token.find_key(&label).map_err(|e| e.to_string())?;
    let settings = dccsign::keys::KeySettings::from_config(cfg).map_err(|e| e.to_string())?;
    dccsign::keys::KeyManager::open(&cfg.resolve(&cfg.keys.database), token, settings)
        .map(|m| m.with_audit_key(key))
        .map_err(|e| format!("audit log: {e}"))
}

/// Runs `audit reanchor`.
fn reanchor(config: ConfigArgs, reason: &str) -> ExitCode {
    let run = || -> Result<dccsign::audit::Anchor, String> {
        let cfg = config.load()?;
        let manager = audit_manager(&cfg)?;
        let who = format!(
            "local:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        );
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        manager
            .reanchor(&who, reason, now)
            .map_err(|e| e.to_string())
    };
    match run() {
        Ok(a) => {
            println!(
                "audit anchor: checkpoint {} over {} entries (audit.reanchor recorded)",
                a.id, a.count
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `audit`.
pub fn audit(args: AuditArgs) -> ExitCode {
    let (config, with_token) = match args.command {
        AuditCommand::Verify { config, with_token } => (config, with_token),
        AuditCommand::Reanchor { config, reason } => return reanchor(config, &reason),
    };
    let cfg = match config.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = cfg.resolve(&cfg.keys.database);
    let conn = match rusqlite::Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let key = match &cfg.keys.audit_public_key {
        None => None,
        Some(p) => {
            use p256::pkcs8::DecodePublicKey;
            let path = cfg.resolve(p);
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    p256::PublicKey::from_public_key_pem(&pem).map_err(|e| e.to_string())
                }) {
                Ok(k) => Some(k),
                Err(e) => {
                    eprintln!("error: audit public key {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    // The token's anchor: the newest checkpoint, which must still be in the database.
    let anchor = if with_token {
        match audit_manager(&cfg).and_then(|m| m.audit_anchor().map_err(|e| e.to_string())) {
            Ok(None) => {
                println!(
                    "token: no audit anchor yet (the daemon writes it with its next checkpoint)"
                );
                None
            }
            Ok(Some(a)) => Some(a),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let anchored = match anchor.map(|a| dccsign::audit::check_anchor(&conn, &a)) {
        None => Ok(None),
        Some(Ok(problem)) => Ok(problem),
        Some(Err(e)) => Err(e),
    };
    let verified = anchored.and_then(|problem| {
        dccsign::audit::verify(&conn, key.as_ref()).map(|mut v| {
            // The chain's own problem comes first: it names an entry.
            if v.problem.is_none() {
                v.problem = problem;
            }
            v
        })
    });
    match verified {
        Ok(v) => match v.problem {
            None => {
                if let Some(a) = anchor {
                    println!(
                        "token anchor: checkpoint {} over {} entries is in the log",
                        a.id, a.count
                    );
                }
                println!(
                    "audit log intact: {} entries, {} checkpoints verified",
                    v.entries, v.checkpoints
                );
                ExitCode::SUCCESS
            }
            Some(p) => {
                println!("audit log BROKEN: {p}");
                ExitCode::from(super::EXIT_INVALID)
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
