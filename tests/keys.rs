//! Key ceremonies against the real daemon (mTLS, SoftHSM, two officer certificates): the
//! two-person rule, CSR and certificate import with every refusal, and the audit log.

mod common;

use std::process::Output;

use common::{stderr, stdout, Daemon};

/// `dccsign keys …` as a development client against the daemon.
fn keys(d: &Daemon, who: &str, args: &[&str]) -> Output {
    let dir = d.dev.path().to_str().unwrap().to_string();
    let mut all = vec!["keys", "--state-dir", &dir, "--addr", &d.addr, "--as", who];
    all.extend_from_slice(args);
    d.dev.run(&all)
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Refused with exit code 2 and the given stable code in the message.
fn refused(o: Output, code: &str) -> String {
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}\n{err}", stdout(&o));
    assert!(err.contains(code), "expected {code}: {err}");
    err
}

/// generate (officer-1) + approve (officer-2): a key in state "generated".
fn generated(d: &Daemon, label: &str, types: &str) {
    let op = ok(keys(d, "officer-1", &["generate", label, "--types", types]));
    ok(keys(d, "officer-2", &["approve", op.trim()]));
}

fn csr(d: &Daemon, label: &str) -> std::path::PathBuf {
    let pem = ok(keys(
        d,
        "officer-1",
        &[
            "csr",
            label,
            "--subject",
            "CN=DSC test,O=eHealth Agency,C=SE",
        ],
    ));
    let path = d.dev.file(&format!("{label}.csr"));
    std::fs::write(&path, pem).unwrap();
    path
}

/// The development CSCA certifies `csr` for `types`.
fn certify(d: &Daemon, csr: &std::path::Path, types: &str, extra: &[&str]) -> std::path::PathBuf {
    let dir = d.dev.path().to_str().unwrap().to_string();
    let mut args = vec![
        "dev-sign-csr",
        "--state-dir",
        &dir,
        "--csr",
        csr.to_str().unwrap(),
        "--types",
        types,
    ];
    args.extend_from_slice(extra);
    let pem = ok(d.dev.run(&args));
    let path = csr.with_extension(format!("{}.pem", types.replace(',', "-")));
    std::fs::write(&path, pem).unwrap();
    path
}

fn audit_verify(d: &Daemon) -> Output {
    let dir = d.dev.path().to_str().unwrap().to_string();
    d.dev.run(&["audit", "verify", "--state-dir", &dir])
}

#[test]
fn two_officers_generate_certify_and_import_a_key() {
    let d = Daemon::start();
    let op = ok(keys(
        &d,
        "officer-1",
        &["generate", "dsc-test-2027a", "--types", "test"],
    ));
    let op = op.trim();
    assert!(op.starts_with("OP-"), "{op}");
    // The requester cannot approve their own operation; it stays pending.
    refused(keys(&d, "officer-1", &["approve", op]), "2-60-7004");
    let pending = ok(keys(&d, "officer-2", &["pending"]));
    assert!(
        pending.contains(op) && pending.contains("dsc-test-2027a"),
        "{pending}"
    );
    // An issuer cannot use the Keys service at all.
    refused(keys(&d, "issuer-all", &["pending"]), "2-60-9001");
    // The second officer approves: the key now exists in the HSM.
    let done = ok(keys(&d, "officer-2", &["approve", op]));
    assert!(done.contains("executed"), "{done}");
    refused(keys(&d, "officer-2", &["approve", op]), "2-60-7006");
    assert!(!ok(keys(&d, "officer-2", &["pending"])).contains(op));
    // The same label cannot be generated twice.
    refused(
        keys(
            &d,
            "officer-1",
            &["generate", "dsc-test-2027a", "--types", "test"],
        ),
        "2-60-7020",
    );

    // A CSR signed inside the token; OpenSSL (not us) checks its signature.
    let req = csr(&d, "dsc-test-2027a");
    let check = std::process::Command::new("openssl")
        .args(["req", "-verify", "-noout", "-in", req.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    // Import before certification is the only allowed next step; activation is not.
    let cert = certify(&d, &req, "test", &[]);
    let out = ok(keys(
        &d,
        "officer-1",
        &["import-cert", "dsc-test-2027a", cert.to_str().unwrap()],
    ));
    assert!(out.contains("dsc-test-2027a certified kid "), "{out}");
    // A CSR for a certified key is refused, naming the state and the next step.
    let err = refused(
        keys(
            &d,
            "officer-1",
            &["csr", "dsc-test-2027a", "--subject", "CN=x"],
        ),
        "2-60-7003",
    );
    assert!(
        err.contains("the key is certified") && err.contains("publish"),
        "{err}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(keys(&d, "officer-2", &["list", "--json"]))).unwrap();
    let k = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == "dsc-test-2027a")
        .unwrap();
    assert_eq!(
        (k["state"].as_str(), k["managed"].as_bool()),
        (Some("certified"), Some(true))
    );
    assert_eq!(k["types"], serde_json::json!(["test"]));
    // Configured DSCs are listed as well.
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["managed"] == false));

    // The audit log holds every step (request, refusals, approval, csr, import) and is intact.
    let v = audit_verify(&d);
    let out = stdout(&v);
    assert!(v.status.success(), "{out}{}", stderr(&v));
    let entries: u32 = out
        .split("intact: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(entries, 8, "{out}");
    let conn = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT operation, officer, approvals, result FROM audit ORDER BY seq")
        .unwrap();
    let rows: Vec<(String, String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let expect = [
        ("keys.generate.request", "officer-1", "pending OP-"),
        ("keys.approve", "officer-1", "refused: "),
        ("keys.generate", "officer-1", "ok: generated"),
        ("keys.approve", "officer-2", "refused: "),
        ("keys.generate", "officer-1", "refused: "),
        ("keys.csr", "officer-1", "ok"),
        ("keys.import-cert", "officer-1", "ok: certified"),
        ("keys.csr", "officer-1", "refused: "),
    ];
    for (row, (op, who, result)) in rows.iter().zip(expect) {
        assert_eq!(row.0, op, "{rows:?}");
        assert!(row.1.ends_with(who) && row.3.starts_with(result), "{row:?}");
    }
    // The executed generate names its approver.
    assert_eq!(rows[2].2, r#"["spiffe://dccsign.dev/officer-2"]"#);
}

#[test]
fn import_refuses_every_bad_certificate() {
    let mut d = Daemon::start();
    generated(&d, "k-a", "test");
    generated(&d, "k-b", "test");
    let req_a = csr(&d, "k-a");
    let req_b = csr(&d, "k-b");
    let import = |d: &Daemon, cert: &std::path::Path| {
        keys(
            d,
            "officer-1",
            &["import-cert", "k-a", cert.to_str().unwrap()],
        )
    };
    // Another key's certificate.
    let other = certify(&d, &req_b, "test", &[]);
    refused(import(&d, &other), "2-60-7010");
    // EKU for another type than the key was generated for.
    let wrong_eku = certify(&d, &req_a, "vaccination", &[]);
    let err = refused(import(&d, &wrong_eku), "2-60-7013");
    assert!(err.contains("declared for test"), "{err}");
    // Key usage without digitalSignature.
    let no_ds = certify(&d, &req_a, "test", &["--without-digital-signature"]);
    refused(import(&d, &no_ds), "2-60-7012");
    // Expired.
    let expired = certify(
        &d,
        &req_a,
        "test",
        &["--not-before", "2020-01-01T00:00:00Z", "--days", "30"],
    );
    refused(import(&d, &expired), "2-60-7015");
    // Signed by another CSCA (a second development PKI).
    let stranger = common::Dev::new();
    let dir = stranger.path().to_str().unwrap().to_string();
    let pem = ok(stranger.run(&[
        "dev-sign-csr",
        "--state-dir",
        &dir,
        "--csr",
        req_a.to_str().unwrap(),
        "--types",
        "test",
    ]));
    let unchained = d.dev.file("unchained.pem");
    std::fs::write(&unchained, pem).unwrap();
    refused(import(&d, &unchained), "2-60-7014");
    // A certificate we already hold (kid collision with a configured DSC).
    refused(import(&d, &d.dev.file("pki/dsc-test.pem")), "2-60-7016");
    // Not a certificate.
    refused(import(&d, &req_a), "2-60-7011");
    // Nothing changed: still generated. The good certificate is accepted.
    let good = certify(&d, &req_a, "test", &[]);
    // A test-environment CSCA is refused by a production deployment.
    let cfg = d.dev.file("dccsign.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "environment = \"test\"\n# Days",
            "environment = \"production\"\n# Days",
        ),
    )
    .unwrap();
    d.restart();
    let err = refused(import(&d, &good), "2-60-7017");
    assert!(
        err.contains("test environment") && err.contains("production"),
        "{err}"
    );
    std::fs::write(&cfg, text).unwrap();
    d.restart();
    ok(import(&d, &good));
    // Every refusal is in the audit log, which is intact.
    assert!(audit_verify(&d).status.success());
}

#[test]
fn an_operation_expires_unapproved() {
    let d = Daemon::start_with(common::Dev::new(), |c| {
        *c = c.replace("operation_ttl_hours = 24", "operation_ttl_hours = 0");
    });
    let op = ok(keys(
        &d,
        "officer-1",
        &["generate", "late", "--types", "test"],
    ));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    refused(keys(&d, "officer-2", &["approve", op.trim()]), "2-60-7005");
}

#[test]
fn the_audit_log_detects_tampering_and_a_failing_write_blocks_the_operation() {
    let d = Daemon::start();
    generated(&d, "k-audit", "recovery");
    csr(&d, "k-audit");
    assert!(audit_verify(&d).status.success());
    let db = d.dev.file("control.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();

    // Change one byte of one entry: detected, and the entry is named.
    let original: String = conn
        .query_row("SELECT officer FROM audit WHERE seq = 2", [], |r| r.get(0))
        .unwrap();
    conn.execute(
        "UPDATE audit SET officer = 'spiffe://dccsign.dev/officer-3' WHERE seq = 2",
        [],
    )
    .unwrap();
    let v = audit_verify(&d);
    assert_eq!(v.status.code(), Some(3));
    assert!(stdout(&v).contains("entry 2:"), "{}", stdout(&v));
    conn.execute("UPDATE audit SET officer = ?1 WHERE seq = 2", [&original])
        .unwrap();
    assert!(
        audit_verify(&d).status.success(),
        "{}",
        stdout(&audit_verify(&d))
    );

    // The audit table refuses writes: the operation fails and has no effect.
    conn.execute_batch(
        "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    )
    .unwrap();
    // Even the request cannot be recorded without its entry.
    let o = keys(
        &d,
        "officer-1",
        &["generate", "k-blocked", "--types", "test"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("2-60-7090"), "{}", stderr(&o));
    conn.execute_batch("DROP TRIGGER no_audit").unwrap();
    assert!(!ok(keys(&d, "officer-2", &["pending"])).contains("k-blocked"));
    let op = ok(keys(
        &d,
        "officer-1",
        &["generate", "k-blocked", "--types", "test"],
    ));
    conn.execute_batch(
        "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    )
    .unwrap();
    let o = keys(&d, "officer-2", &["approve", op.trim()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("2-60-7090"), "{}", stderr(&o));
    conn.execute_batch("DROP TRIGGER no_audit").unwrap();
    // Not executed: still pending, not in the key list, and the label is free in the token —
    // approving now generates it.
    assert!(ok(keys(&d, "officer-2", &["pending"])).contains(op.trim()));
    let list = ok(keys(&d, "officer-2", &["list", "--json"]));
    assert!(!list.contains("k-blocked"), "{list}");
    ok(keys(&d, "officer-2", &["approve", op.trim()]));
    assert!(audit_verify(&d).status.success());
}

/// `audit verify --with-token`.
fn verify_token(d: &Daemon) -> Output {
    let dir = d.dev.path().to_str().unwrap().to_string();
    d.dev
        .run(&["audit", "verify", "--state-dir", &dir, "--with-token"])
}

/// The token keeps the newest audit checkpoint (the anchor). Deleting the newest checkpoints
/// with the entries after the newest remaining one leaves a log that verifies on its own; the
/// anchor finds it: `audit verify --with-token` names the missing checkpoint and the daemon
/// refuses to start. `audit reanchor` accepts the log as it is, on the record.
#[test]
fn deleted_audit_checkpoints_are_found_through_the_token() {
    let mut d = Daemon::start();
    let dir = d.dev.path().to_str().unwrap().to_string();
    // Checkpoint 1 at the first start, entries for a generated key, checkpoint 2 at the next.
    generated(&d, "k-anchor", "recovery");
    d.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let v = verify_token(&d);
        if stdout(&v).contains("token anchor: checkpoint 2 over") {
            assert!(v.status.success(), "{}", stdout(&v));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}{}{}",
            stdout(&v),
            stderr(&v),
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(d.terminate().success(), "{}", d.log());
    // The anchor is a private data object in the token, which another PKCS#11 client sees.
    assert!(
        d.dev
            .pkcs11_objects("data")
            .contains(dccsign::keys::AUDIT_ANCHOR_LABEL),
        "{}",
        d.dev.pkcs11_objects("data")
    );

    let conn = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
    let kept: i64 = conn
        .query_row(
            "SELECT count FROM audit_checkpoints WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    conn.execute("DELETE FROM audit_checkpoints WHERE id >= 2", [])
        .unwrap();
    conn.execute("DELETE FROM audit WHERE seq > ?1", [kept])
        .unwrap();
    // On its own the log is consistent: this is what the anchor adds.
    assert!(
        audit_verify(&d).status.success(),
        "{}",
        stdout(&audit_verify(&d))
    );
    let v = verify_token(&d);
    assert_eq!(v.status.code(), Some(3), "{}{}", stdout(&v), stderr(&v));
    assert!(
        stdout(&v).contains("checkpoint 2: missing"),
        "{}",
        stdout(&v)
    );
    let err = d.dev.refused_start();
    assert!(err.contains("does not match the token's anchor"), "{err}");
    assert!(err.contains("checkpoint 2: missing"), "{err}");

    let o = d.dev.run(&[
        "audit",
        "reanchor",
        "--state-dir",
        &dir,
        "--reason",
        "control.sqlite restored from a backup",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("audit.reanchor recorded"),
        "{}",
        stdout(&o)
    );
    let v = verify_token(&d);
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
    let (op, params): (String, String) = conn
        .query_row(
            "SELECT operation, parameters FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(op, "audit.reanchor");
    assert!(
        params.contains("checkpoint 2: missing") && params.contains("backup"),
        "{params}"
    );
    d.restart();
    assert!(d.log().contains("serving"), "{}", d.log());
}

/// generate + approve + csr + certificate by the development CSCA + import: "certified".
fn certified(d: &Daemon, label: &str, types: &str) -> std::path::PathBuf {
    generated(d, label, types);
    let req = csr(d, label);
    let cert = certify(d, &req, types, &[]);
    ok(keys(
        d,
        "officer-1",
        &["import-cert", label, cert.to_str().unwrap()],
    ));
    cert
}

/// The country's upload key, certified (no extended key usage).
fn upload_key(d: &Daemon, label: &str) {
    let op = ok(keys(
        d,
        "officer-1",
        &["generate", label, "--role", "upload"],
    ));
    ok(keys(d, "officer-2", &["approve", op.trim()]));
    let req = csr(d, label);
    let dir = d.dev.path().to_str().unwrap().to_string();
    let pem = ok(d.dev.run(&[
        "dev-sign-csr",
        "--state-dir",
        &dir,
        "--csr",
        req.to_str().unwrap(),
    ]));
    let cert = d.dev.file(&format!("{label}.pem"));
    std::fs::write(&cert, pem).unwrap();
    ok(keys(
        d,
        "officer-1",
        &["import-cert", label, cert.to_str().unwrap()],
    ));
}

/// publish + activate (officer-1) + approve (officer-2).
fn activate(d: &Daemon, label: &str) -> String {
    let pkg = d.dev.file(&format!("{label}.cms.b64"));
    ok(keys(
        d,
        "officer-1",
        &["publish", label, "--out", pkg.to_str().unwrap()],
    ));
    let op = ok(keys(d, "officer-1", &["activate", label]));
    refused(keys(d, "officer-1", &["approve", op.trim()]), "2-60-7004");
    ok(keys(d, "officer-2", &["approve", op.trim()]))
}

/// Issues one test certificate as issuer-all.
fn issue_test(
    rt: &tokio::runtime::Runtime,
    d: &Daemon,
    request_id: &str,
) -> Result<dccsign::api::pb::IssueResponse, tonic::Status> {
    rt.block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        c.issue(common::issue_request("test", &test_payload(d), request_id))
            .await
            .map(|r| r.into_inner())
    })
}

fn test_payload(d: &Daemon) -> serde_json::Value {
    let mut p = d.dev.example("test");
    p["t"][0].as_object_mut().unwrap().remove("ci");
    p
}

#[test]
fn publish_then_rotate_while_a_client_issues_continuously() {
    let d = Daemon::start();
    upload_key(&d, "upload-1");
    let cert = certified(&d, "dsc-test-new", "test");
    // Activation must wait for publication.
    let err = refused(
        keys(&d, "officer-1", &["activate", "dsc-test-new"]),
        "2-60-7003",
    );
    assert!(
        err.contains("the key is certified") && err.contains("publish"),
        "{err}"
    );

    // The upload package: OpenSSL verifies the CMS against the CSCA and returns the DSC.
    let pkg = d.dev.file("pkg.b64");
    ok(keys(
        &d,
        "officer-1",
        &["publish", "dsc-test-new", "--out", pkg.to_str().unwrap()],
    ));
    let der = d.dev.file("pkg.der");
    let b64 = std::process::Command::new("openssl")
        .args([
            "base64",
            "-d",
            "-A",
            "-in",
            pkg.to_str().unwrap(),
            "-out",
            der.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(b64.status.success());
    let content = d.dev.file("content.der");
    let v = std::process::Command::new("openssl")
        .args([
            "cms",
            "-verify",
            "-inform",
            "DER",
            "-in",
            der.to_str().unwrap(),
            "-CAfile",
            d.dev.file("pki/csca.pem").to_str().unwrap(),
            "-purpose",
            "any",
            "-out",
            content.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
    assert_eq!(std::fs::read(&content).unwrap(), common::pem_der(&cert));
    let info = std::process::Command::new("openssl")
        .args([
            "cms",
            "-cmsout",
            "-print",
            "-inform",
            "DER",
            "-in",
            der.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&info).matches("signerInfos:").count(), 1);

    // A client issues test certificates continuously while the officers activate the new key.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let payload = test_payload(&d);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = rt.block_on(d.channel("issuer-all")).unwrap();
    let worker = {
        let stop = stop.clone();
        rt.spawn(async move {
            let mut c = dccsign::api::client::issuance(channel);
            let mut seen: Vec<Result<Vec<u8>, String>> = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let req = common::issue_request("test", &payload, &format!("rot-{n}"));
                seen.push(match c.issue(req).await {
                    Ok(r) => Ok(r.into_inner().kid),
                    Err(e) => Err(e.to_string()),
                });
            }
            seen
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let op = ok(keys(&d, "officer-1", &["activate", "dsc-test-new"]));
    let done = ok(keys(&d, "officer-2", &["approve", op.trim()]));
    assert!(done.contains("executed"), "{done}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = rt.block_on(worker).unwrap();
    assert!(
        seen.len() >= 20,
        "only {} requests around the switch",
        seen.len()
    );
    let failures: Vec<_> = seen.iter().filter(|r| r.is_err()).collect();
    assert!(failures.is_empty(), "{failures:?}");
    let kids: Vec<&Vec<u8>> = seen.iter().map(|r| r.as_ref().unwrap()).collect();
    let (old, new) = (kids[0], kids[kids.len() - 1]);
    assert_ne!(old, new, "the kid must change");
    // Old kid first, then only the new one: one switch, never back.
    let switch = kids.iter().position(|k| *k == new).unwrap();
    assert!(
        switch > 0 && kids[switch..].iter().all(|k| *k == new),
        "{kids:?}"
    );
    assert!(kids[..switch].iter().all(|k| *k == old));
    // The signing info now names the new DSC, and its certificates verify against it.
    let list: serde_json::Value =
        serde_json::from_str(&ok(keys(&d, "officer-2", &["list", "--json"]))).unwrap();
    let k = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == "dsc-test-new")
        .unwrap();
    assert_eq!(k["state"], "active");
    assert_eq!(k["kid"].as_str().unwrap(), hex::encode(new));
    // Every certificate signed after the switch is counted for the new key.
    let after = kids.len() - switch;
    assert_eq!(
        k["certificates_signed"].as_u64().unwrap(),
        after as u64,
        "{k}"
    );
    assert!(k["usage_seconds_left"].as_i64().unwrap() > 180 * 86_400);
    let hc1 = issue_test(&rt, &d, "after-rotation").unwrap().hc1;
    let out = d
        .dev
        .run(&["verify", "--trust", cert.to_str().unwrap(), &hc1]);
    assert!(out.status.success(), "{}", stderr(&out));

    // After a restart the managed key still signs its types.
    let mut d = d;
    d.restart();
    let kid = issue_test(&rt, &d, "after-restart").unwrap().kid;
    assert_eq!(&kid, new);

    // The next rotation retires the managed predecessor in the same approved operation.
    certified(&d, "dsc-test-newer", "test");
    let done = activate(&d, "dsc-test-newer");
    assert!(done.contains("retired: [dsc-test-new]"), "{done}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(keys(&d, "officer-2", &["list", "--json"]))).unwrap();
    let state = |label: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|k| k["label"] == label)
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (state("dsc-test-new"), state("dsc-test-newer")),
        ("retired".into(), "active".into())
    );
    let kid = issue_test(&rt, &d, "after-second-rotation").unwrap().kid;
    assert_ne!(&kid, new);
    assert!(audit_verify(&d).status.success());
}

#[test]
fn activation_waits_for_propagation_and_signing_stops_after_the_usage_period() {
    // 48 h propagation delay (the production default): activation is refused right after publish.
    let d = Daemon::start_with(common::Dev::new(), |c| {
        *c = c.replace(
            "propagation_delay_hours = 0",
            "propagation_delay_hours = 48",
        );
    });
    upload_key(&d, "upload-1");
    certified(&d, "dsc-a", "test");
    let pkg = d.dev.file("a.b64");
    ok(keys(
        &d,
        "officer-1",
        &["publish", "dsc-a", "--out", pkg.to_str().unwrap()],
    ));
    let err = refused(keys(&d, "officer-1", &["activate", "dsc-a"]), "2-60-7003");
    assert!(err.contains("propagation delay of 48 h"), "{err}");
    drop(d);

    // A usage period of 0 days: the key is past it a second after activation, and nothing is
    // signed with it.
    let d = Daemon::start_with(common::Dev::new(), |c| {
        *c = c
            .replace("usage_period_days = 183", "usage_period_days = 0")
            .replace("health_interval_seconds = 5", "health_interval_seconds = 1");
    });
    // The configured DSCs too: their period runs from their certificates' notBefore.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = issue_test(&rt, &d, "configured").unwrap_err();
    assert_eq!(common::error_detail(&e).code, "2-60-5010", "{e}");
    assert!(
        d.log()
            .contains("configured DSC is past its private key usage period"),
        "{}",
        d.log()
    );
    upload_key(&d, "upload-1");
    certified(&d, "dsc-b", "test");
    let done = activate(&d, "dsc-b");
    assert!(done.contains("executed"), "{done}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let e = issue_test(&rt, &d, "too-late").unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert_eq!(common::error_detail(&e).code, "2-60-5010");
    // The health loop warns (log and metric) once less than a month is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !d.log().contains("usage period ends within a month") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn private_key_labels(d: &Daemon) -> String {
    d.dev.pkcs11_objects("privkey")
}

fn trust_list(d: &Daemon) -> serde_json::Value {
    let out = d.dev.file("trust.json");
    let dir = d.dev.path().to_str().unwrap().to_string();
    ok(d.dev.run(&[
        "trust-list",
        "--state-dir",
        &dir,
        "--addr",
        &d.addr,
        "--as",
        "officer-2",
        "--out",
        out.to_str().unwrap(),
    ]));
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

fn kids(list: &serde_json::Value, state: &str) -> Vec<String> {
    list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == state)
        .map(|c| c["kid"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn retire_then_destroy_with_the_trust_list_following_the_ledger() {
    use base64::Engine;
    let d = Daemon::start();
    upload_key(&d, "upload-1");
    certified(&d, "dsc-r", "recovery");
    activate(&d, "dsc-r");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let issue = |rid: &str| {
        let mut p = d.dev.example("recovery");
        p["r"][0].as_object_mut().unwrap().remove("ci");
        rt.block_on(async {
            let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
            c.issue(common::issue_request("recovery", &p, rid)).await
        })
    };
    let kid = issue("r-1").unwrap().into_inner().kid;
    let kid_b64 = base64::engine::general_purpose::STANDARD.encode(&kid);
    let list = trust_list(&d);
    assert!(kids(&list, "active").contains(&kid_b64), "{list}");
    // The configured recovery DSC was superseded and signed nothing: not listed.
    assert_eq!(list["certificates"].as_array().unwrap().len(), 3, "{list}");

    // Retire (two-person): it signs nothing more, and stays trusted while its certificate is valid.
    let op = ok(keys(&d, "officer-1", &["retire", "dsc-r"]));
    refused(keys(&d, "officer-1", &["approve", op.trim()]), "2-60-7004");
    ok(keys(&d, "officer-2", &["approve", op.trim()]));
    let e = issue("r-2").unwrap_err();
    assert_eq!(common::error_detail(&e).code, "2-60-5001", "{e}");
    let list = trust_list(&d);
    assert!(kids(&list, "retired").contains(&kid_b64), "{list}");

    // Destroy: a dry run reports and does nothing; without force it is refused.
    let dry = keys(&d, "officer-1", &["destroy", "dsc-r"]);
    assert!(dry.status.success());
    assert!(
        stderr(&dry).contains("valid until") && stderr(&dry).contains("dry run"),
        "{}",
        stderr(&dry)
    );
    refused(
        keys(&d, "officer-1", &["destroy", "dsc-r", "--execute"]),
        "2-60-7003",
    );
    let has_key = |d: &Daemon| {
        private_key_labels(d)
            .lines()
            .any(|l| l.trim() == "label:      dsc-r")
    };
    assert!(has_key(&d));
    // Forced with a reason, approved by the second officer: the private key leaves the token.
    let op = ok(keys(
        &d,
        "officer-1",
        &[
            "destroy",
            "dsc-r",
            "--execute",
            "--force",
            "--reason",
            "compromise drill",
        ],
    ));
    ok(keys(&d, "officer-2", &["approve", op.trim()]));
    assert!(!has_key(&d), "{}", private_key_labels(&d));
    let list = ok(keys(&d, "officer-2", &["list", "--json"]));
    assert!(list.contains("\"destroyed\""), "{list}");
    // Its certificate stays in the trust list until what it signed expires.
    assert!(kids(&trust_list(&d), "retired").contains(&kid_b64));
    // The audit log records the forced destruction with its reason, and is intact.
    let conn = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit WHERE operation LIKE 'keys.destroy%' AND parameters LIKE '%compromise drill%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 3, "request, start, result");
    assert!(audit_verify(&d).status.success());
}

#[test]
fn signed_checkpoints_catch_truncation_and_forgery() {
    let mut d = Daemon::start_with(common::Dev::new(), |c| {
        *c = c.replace(
            "checkpoint_interval_seconds = 300",
            "checkpoint_interval_seconds = 1",
        );
    });
    generated(&d, "k-cp", "test");
    let rt = tokio::runtime::Runtime::new().unwrap();
    issue_test(&rt, &d, "cp-1").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(d.terminate().success());
    let v = audit_verify(&d);
    assert!(v.status.success(), "{}", stdout(&v));
    let checkpoints: u32 = stdout(&v)
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(checkpoints >= 2, "{}", stdout(&v));
    let conn = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
    // A checkpoint counts the certificates recorded per DSC since the previous one.
    let signed: Vec<String> = conn
        .prepare("SELECT signed FROM audit_checkpoints")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let total: u64 = signed
        .iter()
        .map(|j| serde_json::from_str::<serde_json::Value>(j).unwrap())
        .flat_map(|v| {
            v["certificates_since_previous"]
                .as_object()
                .unwrap()
                .values()
                .map(|n| n.as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .sum();
    assert_eq!(total, 1, "{signed:?}");
    // Removing the newest entry (which no hash chain alone can notice) is caught by the
    // checkpoint that covered it.
    let last: i64 = conn
        .query_row("SELECT max(seq) FROM audit", [], |r| r.get(0))
        .unwrap();
    conn.execute("DELETE FROM audit WHERE seq = ?1", [last])
        .unwrap();
    let v = audit_verify(&d);
    assert_eq!(v.status.code(), Some(3));
    assert!(
        stdout(&v).contains(&format!("entry {last}: missing")) && stdout(&v).contains("truncated"),
        "{}",
        stdout(&v)
    );
    // A checkpoint whose recorded counts were changed no longer verifies with the HSM's key.
    conn.execute(
        "UPDATE audit_checkpoints SET signed = replace(signed, ':1', ':9')",
        [],
    )
    .unwrap();
    let v = audit_verify(&d);
    assert!(stdout(&v).contains("bad signature"), "{}", stdout(&v));
}
