//! `dccsign ledger`: offline operator commands on the ledger file (the daemon stopped).

use std::process::ExitCode;

use dccsign::audit::{self, Record};
use dccsign::ledger::{Interrupted, Ledger, ReservationId, SqliteLedger};
use serde_json::json;

use super::ConfigArgs;

/// Arguments of `ledger`.
#[derive(clap::Args, Debug)]
pub struct LedgerArgs {
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(clap::Subcommand, Debug)]
enum LedgerCommand {
    /// List the reservations a stopped process left behind (reserved, never completed nor
    /// released): their UVCIs and request ids stay blocked. With `--release`, free them. Needs
    /// the daemon stopped (one writer per ledger).
    Interrupted {
        #[command(flatten)]
        config: ConfigArgs,
        /// Release these reservations (row ids from the list), after recording the release in
        /// the audit log. No signature was ever returned for them; a retry then issues anew.
        #[arg(long, value_name = "ID", conflicts_with = "release_all")]
        release: Vec<i64>,
        /// Release every listed reservation.
        #[arg(long)]
        release_all: bool,
    },
}

/// Runs `ledger`.
pub fn ledger(args: LedgerArgs) -> ExitCode {
    let LedgerCommand::Interrupted {
        config,
        release,
        release_all,
    } = args.command;
    match interrupted(&config, &release, release_all) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn interrupted(config: &ConfigArgs, release: &[i64], release_all: bool) -> Result<(), String> {
    let cfg = config.load()?;
    let path = cfg.resolve(&cfg.ledger.path);
    let ledger = SqliteLedger::open(&path).map_err(|e| format!("ledger: {e}"))?;
    let found = ledger.interrupted().map_err(|e| format!("ledger: {e}"))?;
    for i in &found {
        println!("{}", line(i));
    }
    println!("{} interrupted reservation(s)", found.len());
    let chosen: Vec<&Interrupted> = if release_all {
        found.iter().collect()
    } else {
        release
            .iter()
            .map(|id| {
                found.iter().find(|i| i.id == *id).ok_or_else(|| {
                    format!("--release {id}: not an interrupted reservation (see the list)")
                })
            })
            .collect::<Result<_, _>>()?
    };
    if chosen.is_empty() {
        return Ok(());
    }
    // Recorded first, so that no release goes unrecorded (the audit log lives in the control
    // database, the rows in the ledger: no transaction spans both).
    record_release(&cfg.resolve(&cfg.keys.database), &chosen)?;
    for i in &chosen {
        ledger
            .release(ReservationId(i.id))
            .map_err(|e| format!("release of {}: {e}", i.id))?;
        println!("released {}", i.id);
    }
    Ok(())
}

fn line(i: &Interrupted) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(i.reserved_at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| i.reserved_at.to_string());
    format!(
        "{}\treserved {at}\t{}\tkid {}\tclient {}\trequest {}",
        i.id,
        i.cert_type,
        hex::encode(i.kid),
        i.issuer.as_deref().unwrap_or("-"),
        i.request_id.as_deref().unwrap_or("-"),
    )
}

/// Appends `ledger.release-interrupted` to the audit log, by the local operator.
fn record_release(control: &std::path::Path, chosen: &[&Interrupted]) -> Result<(), String> {
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "audit log in {}: {e} (nothing released; the daemon creates it at its first start)",
            control.display()
        )
    };
    let mut db =
        rusqlite::Connection::open_with_flags(control, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| cannot(&e))?;
    db.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| cannot(&e))?;
    let rows: Vec<_> = chosen
        .iter()
        .map(|i| {
            json!({
                "id": i.id,
                "type": i.cert_type,
                "kid": hex::encode(i.kid),
                "reserved_at": i.reserved_at,
                "client": i.issuer,
                "request_id": i.request_id,
            })
        })
        .collect();
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let officer = format!("local:{user}");
    let tx = db.transaction().map_err(|e| cannot(&e))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    audit::append(
        &tx,
        &Record {
            officer: &officer,
            operation: "ledger.release-interrupted",
            parameters: json!({ "reservations": rows }),
            approvals: &[],
            result: "ok",
        },
        now,
    )
    .map_err(|e| cannot(&e))?;
    tx.commit().map_err(|e| cannot(&e))
}
