//! Revocation against the real daemon (mTLS, SoftHSM, SQLite): revoke and replace with the
//! issuer rules, bulk revocation under the two-person rule, the signed verifier list checked by
//! `dccsign verify`, delivery to a stand-in EU gateway through the outbox (503, 400, restart,
//! lift → deletion and re-batching, subscriber events), and the retention purge.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::process::Output;

use common::{stderr, stdout, Daemon};
use sha2::{Digest, Sha256};

/// `dccsign <args…> --state-dir … --addr … --as who` against the daemon.
fn cli(d: &Daemon, who: &str, args: &[&str]) -> Output {
    let dir = d.dev.path().to_str().unwrap().to_string();
    // Client options go right after the command (`revocation` has subcommands).
    let mut all: Vec<&str> = vec![args[0], "--state-dir", &dir, "--addr", &d.addr, "--as", who];
    all.extend_from_slice(&args[1..]);
    d.dev.run(&all)
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    format!("{}{}", stdout(&o), stderr(&o))
}

/// Refused with exit code 2 and the given stable code.
fn refused(o: Output, code: &str) -> String {
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}\n{err}", stdout(&o));
    assert!(err.contains(code), "expected {code}: {err}");
    err
}

/// A fresh example payload of type `t` in a file; without its `ci` unless `keep_ci` (then the
/// daemon generates one).
fn payload_file(d: &Daemon, t: &str, keep_ci: bool) -> std::path::PathBuf {
    let mut p = d.dev.example(t);
    let group = match t {
        "test" => "t",
        "vaccination" => "v",
        _ => "r",
    };
    if !keep_ci {
        p[group][0].as_object_mut().unwrap().remove("ci");
    }
    // Distinct payloads, so a replacement is never mistaken for its retry.
    p[group][0]["is"] = serde_json::json!(format!("Issuer {}", rand_name()));
    let path = d.dev.file(&format!("p-{}.json", rand_name()));
    std::fs::write(&path, p.to_string()).unwrap();
    path
}

/// Issues one certificate of type `t` through `dccsign issue`; returns (UVCI, HC1).
fn issue(d: &Daemon, who: &str, t: &str, keep_ci: bool) -> (String, String) {
    let path = payload_file(d, t, keep_ci);
    let out = ok(cli(
        d,
        who,
        &["issue", "--type", t, "--payload", path.to_str().unwrap()],
    ));
    let hc1 = out
        .lines()
        .find(|l| l.starts_with("HC1:"))
        .expect("an HC1 line")
        .to_string();
    (uvci_of(d, &hc1), hc1)
}

/// `dccsign revoke` of `uvci` by `who`.
fn revoke(d: &Daemon, who: &str, uvci: &str, reason: &str, until: Option<&str>) -> Output {
    let mut args = vec!["revoke", "--uvci", uvci, "--reason", reason];
    if let Some(t) = until {
        args.extend_from_slice(&["--until", t]);
    }
    cli(d, who, &args)
}

/// `dccsign replace` of `uvci` with the payload in `file`.
fn replace(d: &Daemon, who: &str, uvci: &str, file: &std::path::Path) -> Output {
    cli(
        d,
        who,
        &[
            "replace",
            "--uvci",
            uvci,
            "--payload",
            file.to_str().unwrap(),
        ],
    )
}

fn rand_name() -> String {
    let mut b = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    hex::encode(b)
}

/// The UVCI inside an HC1 (decoded by `dccsign verify`'s JSON output).
fn uvci_of(d: &Daemon, hc1: &str) -> String {
    let json = verify(d, hc1, &[]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("verify prints JSON");
    for g in ["v", "t", "r"] {
        if let Some(ci) = v.pointer(&format!("/{g}/0/ci")).and_then(|c| c.as_str()) {
            return ci.to_string();
        }
    }
    panic!("no ci in {v}");
}

fn verify(d: &Daemon, hc1: &str, extra: &[&str]) -> Output {
    let mut args = vec!["verify"];
    let trust: Vec<String> = ["test", "vaccination", "recovery"]
        .iter()
        .map(|t| d.dev.dsc_pem(t).to_str().unwrap().to_string())
        .collect();
    for t in &trust {
        args.extend_from_slice(&["--trust", t]);
    }
    args.extend_from_slice(extra);
    args.push(hc1);
    d.dev.run(&args)
}

/// The COSE_Sign1 array of an HC1, decoded here without dccsign's decoder: base45 → zlib → CBOR.
fn cose_array(hc1: &str) -> Vec<ciborium::Value> {
    let z = base45::decode(hc1.trim_start_matches("HC1:")).unwrap();
    let mut cose = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&z[..]), &mut cose).unwrap();
    match ciborium::from_reader(&cose[..]).unwrap() {
        ciborium::Value::Tag(18, inner) => inner.into_array().unwrap(),
        other => other.into_array().unwrap(),
    }
}

/// The 64-byte signature of an HC1.
fn cose_signature(hc1: &str) -> Vec<u8> {
    cose_array(hc1)[3].as_bytes().unwrap().clone()
}

/// The kid (hex) of the DSC that signed an HC1 (protected header, label 4).
fn kid_of(hc1: &str) -> String {
    let arr = cose_array(hc1);
    let prot: ciborium::Value = ciborium::from_reader(&arr[0].as_bytes().unwrap()[..]).unwrap();
    let kid = prot
        .as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_integer() == Some(4.into()))
        .map(|(_, v)| v.as_bytes().unwrap().clone())
        .unwrap();
    hex::encode(kid)
}

/// The content of a base64 CMS file as `openssl cms -verify` returns it (it must verify).
fn openssl_cms_content(path: &std::path::Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let der =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text.trim()).unwrap();
    let der_path = path.with_extension("der");
    std::fs::write(&der_path, der).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["cms", "-verify", "-noverify", "-inform", "DER", "-in"])
        .arg(&der_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Officer `who` asks to revoke everything issuer-all ever issued (two-person).
fn bulk_issuer_all(d: &Daemon, who: &str) -> Output {
    cli(
        d,
        who,
        &[
            "revocation",
            "bulk",
            "--reason",
            "fraud",
            "--issuer",
            "spiffe://dccsign.dev/issuer-all",
            "--from",
            "2000-01-01T00:00:00Z",
            "--to",
            "2100-01-01T00:00:00Z",
        ],
    )
}

/// Officer `who` approves operation `op`.
fn approve(d: &Daemon, who: &str, op: &str) -> Output {
    cli(d, who, &["keys", "approve", op])
}

fn ledger(d: &Daemon) -> rusqlite::Connection {
    rusqlite::Connection::open(d.dev.file("ledger.sqlite")).unwrap()
}

fn count(d: &Daemon, sql: &str) -> i64 {
    ledger(d).query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn revoke_and_replace_follow_the_issuer_rules_and_the_list_answers_revoked() {
    let d = Daemon::start();
    let (uvci_a, hc1_a) = issue(&d, "issuer-all", "vaccination", true);
    let (uvci_b, _) = issue(&d, "issuer-test", "test", false);
    let (_, hc1_c) = issue(&d, "issuer-all", "vaccination", true);

    // The SIGNATURE hash the ledger recorded equals SHA-256(r)[0..16] computed here.
    let sig = cose_signature(&hc1_a);
    let expected: [u8; 16] = Sha256::digest(&sig[..32])[..16].try_into().unwrap();
    let uci: [u8; 16] = Sha256::digest(uvci_a.as_bytes())[..16].try_into().unwrap();
    let recorded: Vec<u8> = ledger(&d)
        .query_row(
            "SELECT signature_hash FROM certificates WHERE uci_hash = ?1",
            [&uci[..]],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(recorded, expected);

    // Another issuer may not revoke it; an unknown UVCI is NOT_FOUND; the reason is checked.
    refused(
        revoke(&d, "issuer-test", &uvci_a, "fraud", None),
        "2-60-8003",
    );
    refused(
        revoke(
            &d,
            "issuer-all",
            "URN:UVCI:01:SE:DEV/NOSUCHCERT1",
            "fraud",
            None,
        ),
        "2-60-8002",
    );
    refused(
        revoke(&d, "issuer-all", &uvci_a, "because", None),
        "2-60-8001",
    );
    refused(
        revoke(
            &d,
            "issuer-all",
            &uvci_a,
            "fraud",
            Some("2099-01-01T00:00:00Z"),
        ),
        "2-60-8001",
    );
    // Each refusal is in the daemon's log with the caller, the method and the code, and the
    // UVCIs are not.
    let log = d.log();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("call refused")).collect();
    for code in ["2-60-8003", "2-60-8002", "2-60-8001"] {
        assert!(
            refusals.iter().any(|l| l.contains(code)
                && l.contains("/dccsign.v1.Revocation/Revoke")
                && l.contains("spiffe://dccsign.dev/issuer-")),
            "{code} not logged:\n{log}"
        );
    }
    assert!(
        !log.contains("NOSUCHCERT1") && !log.contains(uvci_a.as_str()),
        "{log}"
    );
    // Another client's certificate is a warning (an authorization refusal), the rest information.
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("2-60-8003") && l.contains("WARN")),
        "{log}"
    );
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("2-60-8002") && l.contains("INFO")),
        "{log}"
    );
    // Its issuer may; twice changes nothing.
    let first = ok(revoke(&d, "issuer-all", &uvci_a, "wrong-patient", None));
    assert!(first.contains("revoked: version 1"), "{first}");
    let again = ok(revoke(&d, "issuer-all", &uvci_a, "wrong-patient", None));
    assert!(again.contains("already revoked"), "{again}");
    assert_eq!(count(&d, "SELECT count(*) FROM revocations"), 1);
    // A revoked certificate cannot be replaced.
    let fixed = payload_file(&d, "vaccination", false);
    refused(replace(&d, "issuer-all", &uvci_a, &fixed), "2-60-8004");

    // Replace B: a new certificate, B revoked as "replaced" in the same transaction.
    let fixed_t = payload_file(&d, "test", false);
    refused(replace(&d, "issuer-all", &uvci_b, &fixed_t), "2-60-8003");
    let out = ok(replace(&d, "issuer-test", &uvci_b, &fixed_t));
    let new_hc1 = out
        .lines()
        .find(|l| l.starts_with("HC1:"))
        .unwrap()
        .to_string();
    assert!(verify(&d, &new_hc1, &[]).status.success());
    let uci_b: [u8; 16] = Sha256::digest(uvci_b.as_bytes())[..16].try_into().unwrap();
    let (reason, by): (String, String) = ledger(&d)
        .query_row(
            "SELECT r.reason, r.revoked_by FROM revocations r JOIN certificates c ON c.id = r.certificate_id
             WHERE c.uci_hash = ?1",
            [&uci_b[..]],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(reason, "replaced");
    assert!(by.ends_with("issuer-test"), "{by}");
    let replacements = "SELECT count(*) FROM certificates WHERE replaces IS NOT NULL";
    assert_eq!(count(&d, replacements), 1);
    // The same replacement again is a retry: the same new certificate, nothing else issued.
    let retry = ok(replace(&d, "issuer-test", &uvci_b, &fixed_t));
    assert!(
        retry.contains(&new_hc1),
        "a retried replacement returns the same certificate"
    );
    assert_eq!(count(&d, replacements), 1);
    // Another replacement of a replaced certificate is refused.
    let other = payload_file(&d, "test", false);
    refused(replace(&d, "issuer-test", &uvci_b, &other), "2-60-8004");
    assert_eq!(count(&d, replacements), 1);

    // Suspension with an end; an officer may lift any revocation.
    let (uvci_s, _) = issue(&d, "issuer-all", "recovery", false);
    refused(
        revoke(
            &d,
            "issuer-all",
            &uvci_s,
            "suspended",
            Some("2001-01-01T00:00:00Z"),
        ),
        "2-60-8001",
    );
    ok(revoke(
        &d,
        "issuer-all",
        &uvci_s,
        "suspended",
        Some("2099-01-01T00:00:00Z"),
    ));
    refused(
        cli(&d, "issuer-all", &["revocation", "lift", "--uvci", &uvci_s]),
        "2-60-9001",
    );
    ok(cli(
        &d,
        "officer-1",
        &["revocation", "lift", "--uvci", &uvci_s],
    ));
    refused(
        cli(&d, "officer-1", &["revocation", "lift", "--uvci", &uvci_s]),
        "2-60-8006",
    );

    // The signed verifier list of the vaccination DSC: A is revoked, C is not.
    let kid = kid_of(&hc1_a);
    let list = d.dev.file("list.cbor");
    ok(cli(
        &d,
        "issuer-all",
        &[
            "revocation",
            "list",
            "--kid",
            &kid,
            "--out",
            list.to_str().unwrap(),
        ],
    ));
    let key = d.dev.file("pki/revocation-list-key.pem");
    let extra = [
        "--revocation",
        list.to_str().unwrap(),
        "--revocation-key",
        key.to_str().unwrap(),
    ];
    let revoked = verify(&d, &hc1_a, &extra);
    assert!(
        !revoked.status.success(),
        "a revoked certificate must not verify as valid"
    );
    assert!(
        format!("{}{}", stdout(&revoked), stderr(&revoked))
            .to_lowercase()
            .contains("revoked"),
        "{}",
        stderr(&revoked)
    );
    let valid = verify(&d, &hc1_c, &extra);
    assert!(valid.status.success(), "{}", stderr(&valid));
    // A list is current for --max-list-age-hours (48 by default) after it was signed: verified
    // three days later it is stale, never "not revoked"; with a longer age it is taken.
    let later = (time::OffsetDateTime::now_utc() + time::Duration::days(3))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut at_later = extra.to_vec();
    at_later.extend_from_slice(&["--at", &later]);
    let stale = verify(&d, &hc1_c, &at_later);
    assert_eq!(stale.status.code(), Some(1), "{}", stderr(&stale));
    assert!(
        stderr(&stale).contains("more than 48 h before the verification time"),
        "{}",
        stderr(&stale)
    );
    at_later.extend_from_slice(&["--max-list-age-hours", "96"]);
    let taken = verify(&d, &hc1_c, &at_later);
    assert!(taken.status.success(), "{}", stderr(&taken));
    let revoked_later = verify(&d, &hc1_a, &at_later);
    assert_eq!(
        revoked_later.status.code(),
        Some(4),
        "{}",
        stderr(&revoked_later)
    );
    // The delta since version 0, applied to the empty list, is the full list.
    let delta = d.dev.file("delta.cbor");
    ok(cli(
        &d,
        "officer-1",
        &[
            "revocation",
            "list",
            "--kid",
            &kid,
            "--since",
            "0",
            "--out",
            delta.to_str().unwrap(),
        ],
    ));
    let pem = std::fs::read_to_string(&key).unwrap();
    let public =
        <p256::PublicKey as p256::pkcs8::DecodePublicKey>::from_public_key_pem(&pem).unwrap();
    let full_list =
        dccsign::revocation::list::open(&std::fs::read(&list).unwrap(), &public).unwrap();
    let delta_list =
        dccsign::revocation::list::open(&std::fs::read(&delta).unwrap(), &public).unwrap();
    assert!(delta_list.is_delta());
    let kid_bytes: [u8; 8] = hex::decode(&kid).unwrap().try_into().unwrap();
    let rebuilt = dccsign::revocation::list::full(kid_bytes, &[], 0)
        .apply(&delta_list)
        .unwrap();
    assert_eq!(rebuilt.body(), full_list.body());
    assert_eq!(rebuilt.version(), full_list.version());
    assert!(full_list.contains(&expected));
    // A list signed by another key is refused, never "valid".
    let other = d.dev.file("pki/audit-key.pem");
    let wrong = verify(
        &d,
        &hc1_c,
        &[
            "--revocation",
            list.to_str().unwrap(),
            "--revocation-key",
            other.to_str().unwrap(),
        ],
    );
    assert!(!wrong.status.success());

    // The daemon's log names no UVCI.
    for u in [&uvci_a, &uvci_b, &uvci_s] {
        assert!(!d.log().contains(u.as_str()), "UVCI in the log");
    }
}

/// Single revocations, lifts and replacements are in the audit log: who, which ledger row and
/// kid, the reason and the outcome (never the UVCI); refused calls add nothing, and the chain
/// verifies.
/// A revocation whose client gives up while the change is under way still gets its audit
/// entry: the work runs to its end in a task of its own.
#[test]
fn a_revocation_the_client_abandons_is_still_audited() {
    let d = Daemon::start();
    let (uvci, _) = issue(&d, "issuer-all", "test", false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Another writer holds the ledger: the revocation waits for it inside the daemon.
    let other = ledger(&d);
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let e = rt.block_on(async {
        let ch = d.channel("issuer-all").await.unwrap();
        let mut c = dccsign::api::pb::revocation_client::RevocationClient::new(ch);
        let mut req = tonic::Request::new(dccsign::api::pb::RevokeRequest {
            uvci: uvci.clone(),
            reason: "fraud".into(),
            ..Default::default()
        });
        req.set_timeout(std::time::Duration::from_millis(300));
        c.revoke(req).await.unwrap_err()
    });
    common::assert_abandoned(&e);
    std::thread::sleep(std::time::Duration::from_millis(200));
    other.execute_batch("ROLLBACK").unwrap();
    // The revocation took effect, and its entry follows.
    let control = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
    let entries = || -> i64 {
        control
            .query_row(
                "SELECT count(*) FROM audit WHERE operation = 'revocation.revoke'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while entries() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(entries(), 1, "{}", d.log());
    let revoked: i64 = ledger(&d)
        .query_row("SELECT count(*) FROM revocations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(revoked, 1);
}

/// An officer's export that the client abandons keeps its in-flight place until its work
/// (building the batches) ends, as every revocation call does.
#[test]
fn an_abandoned_export_keeps_its_place_until_its_work_ends() {
    let d = Daemon::start_with(common::Dev::new(), |c| {
        *c = c.replace(
            "max_in_flight_per_client = 256",
            "max_in_flight_per_client = 1",
        );
    });
    let (uvci, _) = issue(&d, "issuer-all", "test", false);
    ok(revoke(&d, "officer-1", &uvci, "fraud", None));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Another writer holds the ledger: building the batch waits for it inside the daemon.
    let other = ledger(&d);
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    rt.block_on(async {
        let ch = d.channel("officer-1").await.unwrap();
        let mut c = dccsign::api::pb::revocation_client::RevocationClient::new(ch);
        let mut req = tonic::Request::new(dccsign::api::pb::ExportBatchesRequest::default());
        req.set_timeout(std::time::Duration::from_millis(300));
        let e = c.export_batches(req).await.unwrap_err();
        common::assert_abandoned(&e);
        // Its work still runs: the officer's next call is refused, not admitted beside it.
        let e = c
            .status(dccsign::api::pb::StatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        other.execute_batch("ROLLBACK").unwrap();
        // The ledger free again, the export ends and the officer is admitted again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let batches = loop {
            match c
                .export_batches(dccsign::api::pb::ExportBatchesRequest::default())
                .await
            {
                Err(e)
                    if e.code() == tonic::Code::ResourceExhausted
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                other => break other.unwrap().into_inner().batches,
            }
        };
        assert!(!batches.is_empty());
    });
}

#[test]
fn single_revocations_lifts_and_replacements_are_audited() {
    let d = Daemon::start();
    let (uvci_a, _) = issue(&d, "issuer-all", "vaccination", true);
    let (uvci_b, _) = issue(&d, "issuer-all", "test", false);
    let id_of = |uvci: &str| -> i64 {
        ledger(&d)
            .query_row(
                "SELECT id FROM certificates WHERE uci_hash = ?1",
                [&dccsign::revocation::hash::uci_hash(uvci)[..]],
                |r| r.get(0),
            )
            .unwrap()
    };
    let (a, b) = (id_of(&uvci_a), id_of(&uvci_b));
    ok(revoke(
        &d,
        "issuer-all",
        &uvci_a,
        "suspended",
        Some("2099-01-01T00:00:00Z"),
    ));
    refused(
        revoke(&d, "issuer-test", &uvci_a, "fraud", None),
        "2-60-8003",
    );
    ok(cli(
        &d,
        "officer-1",
        &["revocation", "lift", "--uvci", &uvci_a],
    ));
    let corrected = payload_file(&d, "test", false);
    ok(replace(&d, "issuer-all", &uvci_b, &corrected));

    let control = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
    let mut stmt = control
        .prepare(
            "SELECT officer, operation, parameters, result FROM audit
             WHERE operation LIKE 'revocation.%' ORDER BY seq",
        )
        .unwrap();
    let entries: Vec<(String, String, serde_json::Value, String)> = stmt
        .query_map([], |r| {
            let p: String = r.get(2)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                serde_json::from_str(&p).unwrap(),
                r.get(3)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let id = |n: &str| format!("spiffe://dccsign.dev/{n}");
    let ops: Vec<(&str, &str)> = entries
        .iter()
        .map(|(o, op, _, _)| (o.as_str(), op.as_str()))
        .collect();
    assert_eq!(
        ops,
        vec![
            (id("issuer-all").as_str(), "revocation.revoke"),
            (id("officer-1").as_str(), "revocation.lift"),
            (id("issuer-all").as_str(), "revocation.replace"),
        ]
    );
    assert_eq!(entries[0].2["certificate_id"], a);
    assert_eq!(entries[0].2["reason"], "suspended");
    assert!(entries[0].2["until"].is_i64(), "{}", entries[0].2);
    assert!(
        entries[0].3.starts_with("ok: list version "),
        "{}",
        entries[0].3
    );
    assert_eq!(entries[1].2["certificate_id"], a);
    assert_eq!(entries[2].2["certificate_id"], b);
    assert_eq!(entries[0].2["kid"].as_str().unwrap().len(), 16);
    for (_, _, p, _) in &entries {
        let text = p.to_string();
        assert!(
            !text.contains("URN:UVCI") && !text.contains(&uvci_a),
            "{text}"
        );
    }
    let dir = d.dev.path().to_str().unwrap().to_string();
    let verify = d.dev.run(&["audit", "verify", "--state-dir", &dir]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

/// Revocation calls count against the caller's limits, the same budget as its issuance: past
/// the burst, a call is refused as overloaded (2-60-5005) before it reaches the store, and other
/// clients go on.
#[test]
fn revocation_calls_count_against_the_callers_limits() {
    let d = Daemon::start_with(common::Dev::new(), |c| {
        *c = c
            .replace("rate_per_second = 20000", "rate_per_second = 0.001")
            .replace("rate_burst = 40000", "rate_burst = 3");
    });
    // Three tokens for issuer-all: one issuance and two revocation calls (a refusal by the
    // store counts too).
    let (uvci, _) = issue(&d, "issuer-all", "vaccination", true);
    ok(revoke(
        &d,
        "issuer-all",
        &uvci,
        "suspended",
        Some("2099-01-01T00:00:00Z"),
    ));
    revoke(
        &d,
        "issuer-all",
        "URN:UVCI:01:SE:DEV/NOSUCHONE1",
        "fraud",
        None,
    );
    let o = revoke(&d, "issuer-all", &uvci, "fraud", None);
    let err = stderr(&o);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(err.contains("2-60-5005"), "{err}");
    assert!(err.contains("ResourceExhausted"), "{err}");
    // Refused before the store: the suspension stands, not turned into fraud.
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM revocations WHERE reason = 'suspended'"
        ),
        1
    );
    assert_eq!(count(&d, "SELECT count(*) FROM revocations"), 1);
    // Another client has its own budget.
    let (other, _) = issue(&d, "issuer-test", "test", false);
    ok(revoke(&d, "issuer-test", &other, "fraud", None));
}

#[test]
fn bulk_revocation_needs_a_second_officer() {
    let d = Daemon::start();
    for _ in 0..3 {
        issue(&d, "issuer-all", "test", false);
    }
    issue(&d, "issuer-test", "test", false);
    // An issuer cannot ask for one.
    refused(bulk_issuer_all(&d, "issuer-all"), "2-60-9001");
    let op = ok(bulk_issuer_all(&d, "officer-1"));
    let op = op
        .lines()
        .find(|l| l.starts_with("OP-"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        count(&d, "SELECT count(*) FROM revocations"),
        0,
        "nothing before approval"
    );
    refused(approve(&d, "officer-1", &op), "2-60-7004");
    let done = ok(approve(&d, "officer-2", &op));
    assert!(done.contains("revoked 3 certificates"), "{done}");
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM revocations WHERE reason = 'fraud'"
        ),
        3
    );
}

/// The daemon's config with a gateway (the stand-in), a subscriber and fast retries.
fn with_gateway(cfg: &mut String, url: &str) {
    let keys = format!(
        "[revocation]\ngateway_url = \"{url}\"\ngateway_ca = \"pki/tls/ca.pem\"\n\
         gateway_client_certificate = \"pki/tls/gateway-client.pem\"\n\
         gateway_client_key = \"pkcs11:token=dccsign-dev;object=tls-gateway-client;type=private\"\n\
         retry = \"30#1:s\"\noutbox_interval_seconds = 3600\n"
    );
    assert!(
        cfg.contains("[revocation]\n"),
        "dev config without [revocation]"
    );
    *cfg = cfg.replacen("[revocation]\n", &keys, 1);
    cfg.push_str(&format!(
        "\n[[revocation.subscriber]]\nname = \"webcert\"\nurl = \"{url}/events\"\n"
    ));
}

/// The client key towards the gateway is in the token (`with_gateway` uses it, so every
/// delivery test signs its handshakes there); start-up refuses a certificate that is not the
/// key's, in one line.
#[test]
fn a_gateway_client_certificate_must_belong_to_its_token_key() {
    let dev = common::Dev::new();
    let mut cfg = std::fs::read_to_string(dev.file("dccsign.toml")).unwrap();
    with_gateway(&mut cfg, "https://127.0.0.1:9");
    let cfg = cfg.replace("pki/tls/gateway-client.pem", "pki/clients/issuer-all.pem");
    std::fs::write(dev.file("dccsign.toml"), cfg).unwrap();
    let err = dev.refused_start();
    assert!(
        err.contains("issuer-all.pem does not belong to key pkcs11:"),
        "{err}"
    );
}

fn publish(d: &Daemon) -> String {
    ok(cli(d, "officer-1", &["revocation", "publish"]))
}

#[test]
fn outbox_delivers_to_the_gateway_with_retries_across_a_restart() {
    let dev = common::Dev::new();
    let upload_der = common::pem_der(&dev.file("pki/upload.pem"));
    let (cert, key) = dev.stand_in_cert();
    let standin =
        gateway::StandIn::start(&cert, &key, &dev.file("pki/tls/ca.pem"), upload_der, "SE");
    let url = standin.url();
    let mut d = Daemon::start_with(dev, |c| with_gateway(c, &url));
    let mut uvcis = Vec::new();
    for _ in 0..3 {
        uvcis.push(issue(&d, "issuer-all", "vaccination", false).0);
    }
    for u in &uvcis {
        ok(revoke(&d, "issuer-all", u, "serious-error", None));
    }

    // 503 twice: retried on the schedule, across a restart; then delivered exactly once.
    standin.fail_next(503, 2);
    let r = publish(&d);
    assert!(r.contains("built 1") && r.contains("retried 1"), "{r}");
    let status = ok(cli(&d, "officer-1", &["revocation", "status"]));
    assert!(
        status.contains("retrying") && status.contains("503"),
        "{status}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = publish(&d);
    assert!(r.contains("retried 1"), "{r}");
    d.restart();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = publish(&d);
    assert!(r.contains("delivered") && !r.contains("delivered 0"), "{r}");
    assert_eq!(standin.requests(), 3);
    let uploads = standin.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].json["entries"].as_array().unwrap().len(), 3);
    assert_eq!(uploads[0].json["hashType"], "SIGNATURE");
    let gateway_id: String = ledger(&d)
        .query_row("SELECT gateway_id FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(gateway_id, uploads[0].batch_id);
    // Delivered means never again.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    publish(&d);
    assert_eq!(standin.requests(), 3);
    // Reconciliation: a batch of ours that the gateway holds but the outbox never recorded
    // (as after a crash between the gateway's 201 and our commit) is reported.
    let r = publish(&d);
    assert!(r.contains("unknown at gateway 0"), "{r}");
    let client = dccsign::revocation::gateway::HttpsClient::new(
        &d.dev.file("pki/tls/ca.pem"),
        &d.dev.file("pki/clients/issuer-all.pem"),
        &d.dev.file("pki/clients/issuer-all.key"),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let gw = dccsign::revocation::gateway::Gateway::new(client, &url);
    let cms = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &uploads[0].cms);
    let lost = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(gw.upload(&cms))
        .unwrap();
    assert_ne!(lost, gateway_id);
    let r = publish(&d);
    assert!(r.contains("unknown at gateway 1"), "{r}");
    assert!(d.log().contains("the outbox did not record"));
    let requests = standin.requests();
    // Subscriber events: one per revocation.
    assert_eq!(standin.events().len(), 3);
    assert!(standin.events().iter().all(|e| e["event"] == "revoked"));

    // A 400 is final: counted, shown, not retried.
    let (u4, _) = issue(&d, "issuer-all", "vaccination", false);
    ok(revoke(&d, "issuer-all", &u4, "fraud", None));
    standin.fail_next(400, 1);
    let r = publish(&d);
    assert!(r.contains("failed 1"), "{r}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    publish(&d);
    assert_eq!(standin.requests(), requests + 1, "a 400 is not retried");
    let status = ok(cli(&d, "officer-1", &["revocation", "status"]));
    assert!(
        status.contains("FAILED") && status.contains("400"),
        "{status}"
    );

    // Lifting one revocation deletes its batch at the gateway and re-batches the other two.
    ok(cli(
        &d,
        "officer-1",
        &["revocation", "lift", "--uvci", &uvcis[0]],
    ));
    let r = publish(&d);
    assert!(r.contains("built 1"), "{r}");
    let uploads = standin.uploads();
    let first = uploads.iter().find(|u| u.batch_id == gateway_id).unwrap();
    assert!(
        first.deleted,
        "the withdrawn batch is deleted at the gateway"
    );
    let live: Vec<_> = uploads
        .iter()
        .filter(|u| !u.deleted && u.batch_id != lost)
        .collect();
    assert_eq!(
        live.len(),
        1,
        "{:?}",
        live.iter().map(|u| &u.json).collect::<Vec<_>>()
    );
    assert_eq!(live[0].json["entries"].as_array().unwrap().len(), 2);
    assert!(standin.events().iter().any(|e| e["event"] == "lifted"));
    // No personal data went to the gateway or the subscriber.
    let sent = format!("{:?}{:?}", standin.uploads(), standin.events());
    for u in &uvcis {
        assert!(!sent.contains(u.as_str()));
    }
}

#[test]
fn purge_after_the_grace_period_leaves_no_rows_for_expired_certificates() {
    let mut d = Daemon::start();
    let (u, _) = issue(&d, "issuer-all", "test", false);
    issue(&d, "issuer-all", "vaccination", false);
    ok(revoke(&d, "issuer-all", &u, "fraud", None));
    let r = ok(cli(&d, "officer-1", &["revocation", "batches"]));
    assert!(r.contains("built 1"), "{r}");
    assert!(d.terminate().success());
    let store =
        dccsign::revocation::store::RevocationStore::open(&d.dev.file("ledger.sqlite")).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let week = 7 * 86_400;
    // Now: nothing has expired, nothing goes.
    assert_eq!(store.purge(now, week).unwrap(), Default::default());
    assert_eq!(count(&d, "SELECT count(*) FROM certificates"), 2);
    // The clock moves past the test certificate's expiry (72 h) + 7 days: its rows go, the
    // vaccination certificate (a year) stays.
    let later = now + 4 * 86_400 + week;
    let report = store.purge(later, week).unwrap();
    assert_eq!(report.certificates, 1, "{report:?}");
    assert_eq!(count(&d, "SELECT count(*) FROM certificates"), 1);
    assert_eq!(count(&d, "SELECT count(*) FROM revocations"), 0);
    assert_eq!(count(&d, "SELECT count(*) FROM batches"), 0);
    assert_eq!(count(&d, "SELECT count(*) FROM batch_entries"), 0);
    assert_eq!(count(&d, "SELECT count(*) FROM outbox"), 0);
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM certificates WHERE request_id IS NOT NULL"
        ),
        1
    );
    // Far later: everything.
    store.purge(later + 2 * 365 * 86_400, week).unwrap();
    assert_eq!(count(&d, "SELECT count(*) FROM certificates"), 0);
    assert_eq!(
        count(
            &d,
            "SELECT count(*) FROM certificates WHERE request_id IS NOT NULL"
        ),
        0
    );
    // The list version never goes back.
    assert!(store.version().unwrap() >= 1);
}

#[test]
fn exported_batches_verify_with_openssl_and_carry_each_configured_hash_type() {
    let d = Daemon::start_with(common::Dev::new(), |c| {
        *c = c.replacen(
            "[revocation]\n",
            "[revocation]\nuci_batches = true\ncountry_code_uci_batches = true\n",
            1,
        )
    });
    let (u, hc1) = issue(&d, "issuer-all", "vaccination", false);
    ok(revoke(&d, "issuer-all", &u, "serious-error", None));
    let dir = d.dev.file("batches");
    let r = ok(cli(
        &d,
        "officer-1",
        &["revocation", "batches", "--out", dir.to_str().unwrap()],
    ));
    assert!(r.contains("built 3"), "{r}");
    let b64 = |h: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, h);
    let sig = cose_signature(&hc1);
    let expected = [
        ("SIGNATURE", b64(&Sha256::digest(&sig[..32])[..16])),
        ("UCI", b64(&Sha256::digest(u.as_bytes())[..16])),
        (
            "COUNTRYCODEUCI",
            b64(&Sha256::digest(format!("SE{u}").as_bytes())[..16]),
        ),
    ];
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("cms") {
            continue;
        }
        // The CMS as the gateway gets it, checked by OpenSSL: the attached content is the JSON.
        let json = std::fs::read(path.with_extension("json")).unwrap();
        assert_eq!(openssl_cms_content(&path), json);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let t = v["hashType"].as_str().unwrap().to_string();
        let hash = v["entries"][0]["hash"].as_str().unwrap().to_string();
        let want = &expected.iter().find(|(n, _)| *n == t).unwrap().1;
        assert_eq!(&hash, want, "{t}");
        assert_eq!(v["country"], "SE");
        assert!(v["expires"].as_str().unwrap().ends_with("T00:00:00Z"));
        seen.push(t);
    }
    seen.sort();
    assert_eq!(seen, ["COUNTRYCODEUCI", "SIGNATURE", "UCI"]);
}

#[test]
fn thousands_of_revocations_become_batches_grouped_by_kid_and_expiry_day() {
    let d = Daemon::start();
    // At least 2 500 certificates over three DSCs (the load generator's mix) and several expiry
    // days, then one bulk revocation of them all.
    let dir = d.dev.path().to_str().unwrap().to_string();
    while count(
        &d,
        "SELECT count(*) FROM certificates WHERE state = 'signed'",
    ) < 2_500
    {
        let o = d.dev.run(&[
            "load",
            "--state-dir",
            &dir,
            "--addr",
            &d.addr,
            "--mode",
            "stream",
            "--connections",
            "2",
            "--concurrency",
            "32",
            "--duration",
            "2",
            "--verify-every",
            "0",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let op = ok(bulk_issuer_all(&d, "officer-1"));
    let op = op
        .lines()
        .find(|l| l.starts_with("OP-"))
        .unwrap()
        .trim()
        .to_string();
    ok(approve(&d, "officer-2", &op));
    let revoked = count(&d, "SELECT count(*) FROM revocations");
    assert!(revoked >= 2_500, "{revoked}");

    // Expected: per (kid, expiry day) group, ceil(n / 1000) batches.
    let groups: Vec<(Vec<u8>, i64, i64)> = ledger(&d)
        .prepare(
            "SELECT c.kid, (c.exp + 86399) / 86400, count(*) FROM revocations r
             JOIN certificates c ON c.id = r.certificate_id GROUP BY 1, 2",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let kids: std::collections::BTreeSet<_> = groups.iter().map(|g| g.0.clone()).collect();
    assert!(kids.len() >= 2, "two kids at least");
    let days: std::collections::BTreeSet<_> = groups.iter().map(|g| g.1).collect();
    assert!(days.len() >= 2, "several expiry days: {groups:?}");
    let expected: i64 = groups.iter().map(|g| (g.2 + 999) / 1000).sum();

    let out = d.dev.file("batches");
    let r = ok(cli(
        &d,
        "officer-1",
        &["revocation", "batches", "--out", out.to_str().unwrap()],
    ));
    assert!(r.contains(&format!("built {expected}")), "{r}");
    let mut seen = std::collections::HashSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("cms") {
            continue;
        }
        files += 1;
        let v: serde_json::Value = serde_json::from_slice(&openssl_cms_content(&path)).unwrap();
        let entries = v["entries"].as_array().unwrap();
        assert!((1..=1000).contains(&entries.len()));
        for e in entries {
            assert!(
                seen.insert(e["hash"].as_str().unwrap().to_string()),
                "an entry in one batch only"
            );
        }
    }
    assert_eq!(files, expected);
    assert_eq!(seen.len() as i64, revoked);
    // Every batch holds one kid and one expiry day, as recorded.
    let mixed: i64 = count(
        &d,
        "SELECT count(*) FROM (SELECT b.id FROM batch_entries e JOIN batches b ON b.id = e.batch_id
           JOIN certificates c ON c.id = e.certificate_id
           GROUP BY b.id HAVING count(DISTINCT c.kid) > 1 OR max((c.exp + 86399) / 86400) * 86400 != b.expires)",
    );
    assert_eq!(mixed, 0);
}
