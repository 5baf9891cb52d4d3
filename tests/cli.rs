//! End to end through the real binary: dev-init, sign every type, verify with our verifier and
//! with the independent `dgc` crate, and every refusal with its field and code — against a real
//! SoftHSM token, one state directory per test.

mod common;

use base64::Engine;
use common::{pem_der, stderr, stdout, Dev};
use serde_json::json;

fn verify_with_dgc(hc1: &str, dsc_der: &[u8]) -> dgc::SignatureValidity {
    let mut trust = dgc::TrustList::default();
    trust
        .add_key_from_certificate(&base64::engine::general_purpose::STANDARD.encode(dsc_der))
        .expect("dgc accepts our DSC certificate");
    let (_container, validity) = dgc::validate(hc1, &trust).expect("dgc decodes our HC1");
    validity
}

#[test]
fn dev_init_is_idempotent() {
    let dev = Dev::new();
    let before: Vec<(String, Vec<u8>)> = [
        "pki/csca.pem",
        "pki/dsc-test.pem",
        "dccsign.toml",
        "secrets/user.pin",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(dev.file(f)).unwrap()))
    .collect();
    let out = dev.run(&["dev-init", "--state-dir", dev.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("nothing changed"), "{}", stdout(&out));
    for (f, bytes) in before {
        assert_eq!(std::fs::read(dev.file(&f)).unwrap(), bytes, "{f} changed");
    }
    // The PIN files are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dev.file("secrets/user.pin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn every_type_signs_and_verifies_with_ours_and_dgc() {
    let dev = Dev::new();
    for t in ["test", "vaccination", "recovery"] {
        let payload = dev.example(t);
        let hc1 = dev.sign_ok(t, &payload);

        // Ours.
        let out = dev.run(&["verify", "--trust", dev.dsc_pem(t).to_str().unwrap(), &hc1]);
        assert!(
            out.status.success(),
            "{t}: our verify failed: {}",
            stderr(&out)
        );
        let decoded: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(decoded["nam"], payload["nam"]);
        let key = &t[..1];
        assert_eq!(decoded[key][0]["tg"], "840539006");
        let ci = decoded[key][0]["ci"].as_str().unwrap();
        assert!(ci.starts_with("URN:UVCI:01:SE:DEV/"), "{ci}");

        // Independent.
        let der = pem_der(&dev.dsc_pem(t));
        assert!(
            matches!(verify_with_dgc(&hc1, &der), dgc::SignatureValidity::Valid),
            "{t}: dgc rejected our signature"
        );
        // And with another type's DSC the signature must not verify (dgc and ours).
        let other = if t == "test" { "vaccination" } else { "test" };
        let other_der = pem_der(&dev.dsc_pem(other));
        assert!(!matches!(
            verify_with_dgc(&hc1, &other_der),
            dgc::SignatureValidity::Valid
        ));
        let out = dev.run(&[
            "verify",
            "--trust",
            dev.dsc_pem(other).to_str().unwrap(),
            &hc1,
        ]);
        assert_eq!(out.status.code(), Some(3));
    }
    assert_eq!(dev.ledger_counts(), (0, 3));
}

#[test]
fn qr_outputs_are_written() {
    let dev = Dev::new();
    let p = dev.file("v.json");
    std::fs::write(&p, serde_json::to_vec(&dev.example("vaccination")).unwrap()).unwrap();
    let png = dev.file("v.png");
    let svg = dev.file("v.svg");
    let out = dev.run(&[
        "sign",
        "--state-dir",
        dev.path().to_str().unwrap(),
        "--type",
        "vaccination",
        "--payload",
        p.to_str().unwrap(),
        "--qr",
        png.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hc1 = stdout(&out).trim().to_string();
    // An independent decoder (ZBar) reads the HC1 back from the PNG.
    let zbar = std::process::Command::new("zbarimg")
        .args(["--quiet", "--raw", png.to_str().unwrap()])
        .output()
        .expect("zbarimg missing: run .ci/deps");
    assert!(zbar.status.success(), "{}", stderr(&zbar));
    assert_eq!(stdout(&zbar).trim(), hc1);
    let png = std::fs::read(png).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.contains("<svg"));
}

/// Signs a mutated example and expects a refusal naming `path` and `rule`, with nothing in the
/// ledger.
fn expect_refusal(dev: &Dev, t: &str, payload: serde_json::Value, path: &str, rule: &str) {
    let before = dev.ledger_counts();
    let out = dev.sign(t, &payload);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected refusal for {rule}: {err}"
    );
    let line = err
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{path}:")) && l.contains(rule))
        .unwrap_or_else(|| panic!("no line for {path} / {rule} in:\n{err}"));
    assert!(line.contains("[2-60-1001"), "no 2-60-1001 code in {line}");
    assert!(stdout(&out).is_empty(), "a refusal printed a certificate");
    assert_eq!(
        dev.ledger_counts(),
        before,
        "the ledger changed on a refusal"
    );
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn refusals_name_field_and_rule_and_write_nothing() {
    let dev = Dev::new();
    let now = time::OffsetDateTime::now_utc();
    let test = dev.example("test");

    let mut p = test.clone();
    p["t"][0]["tr"] = json!("260373001");
    expect_refusal(&dev, "test", p, "t[0].tr", "test-result-not-negative");

    let mut p = test.clone();
    p["t"][0]["sc"] = json!(rfc3339(now - time::Duration::days(8)));
    expect_refusal(&dev, "test", p, "t[0].sc", "sample-too-old");

    let mut p = test.clone();
    p["t"][0]["sc"] = json!(rfc3339(now + time::Duration::hours(1)));
    expect_refusal(&dev, "test", p, "t[0].sc", "sample-in-future");

    let mut p = test.clone();
    let sc =
        (now - time::Duration::hours(1)).to_offset(time::UtcOffset::from_hms(1, 0, 0).unwrap());
    p["t"][0]["sc"] = json!(format!(
        "{}+0100",
        sc.format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .unwrap()
    ));
    expect_refusal(&dev, "test", p, "t[0].sc", "date-time-format");

    let mut p = test.clone();
    p["t"][0]["tt"] = json!("LP1234-5");
    expect_refusal(&dev, "test", p, "t[0].tt", "value-set");

    let mut p = test.clone();
    p["t"][0]["ma"] = json!("999999");
    expect_refusal(&dev, "test", p, "t[0].ma", "value-set");

    let mut p = test.clone();
    p.as_object_mut().unwrap().remove("nam");
    expect_refusal(&dev, "test", p, "nam", "required");

    let mut p = test.clone();
    p["v"] = dev.example("vaccination")["v"].clone();
    expect_refusal(&dev, "test", p, "$", "exactly-one-statement");
}

#[test]
fn duplicate_uvci_is_refused_and_recorded_once() {
    let dev = Dev::new();
    let uvci = "URN:UVCI:01:SE:DEV/DUPLICATE0001";
    let mut p = dev.example("vaccination");
    p["v"][0]["ci"] = json!(uvci);
    dev.sign_ok("vaccination", &p);
    assert_eq!(dev.ledger_counts(), (0, 1));
    let out = dev.sign("vaccination", &p);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(stderr(&out).contains("2-60-1001-91"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    assert_eq!(dev.ledger_counts(), (0, 1));
}

#[test]
fn wrong_pin_fails_and_is_not_retried() {
    let dev = Dev::new();
    std::fs::write(dev.file("secrets/user.pin"), "definitely-wrong\n").unwrap();
    let out = dev.sign("test", &dev.example("test"));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("refused the user PIN"), "{err}");
    assert!(err.contains("not retried"), "{err}");
}

#[test]
fn world_readable_pin_file_is_refused() {
    let dev = Dev::new();
    dev.pin_world_readable();
    let out = dev.sign("test", &dev.example("test"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}

#[test]
fn a_dsc_is_never_used_for_a_type_its_eku_excludes() {
    let dev = Dev::new();
    let cfg = std::fs::read_to_string(dev.file("dccsign.toml")).unwrap();
    // Point the vaccination signer at the test-only DSC.
    let cfg = cfg.replace(
        "object=dsc-vaccination;type=private\"\ncertificate = \"pki/dsc-vaccination.pem\"",
        "object=dsc-test;type=private\"\ncertificate = \"pki/dsc-test.pem\"",
    );
    assert!(
        cfg.matches("object=dsc-test;").count() == 2,
        "replacement failed:\n{cfg}"
    );
    std::fs::write(dev.file("dccsign.toml"), cfg).unwrap();
    let out = dev.sign("vaccination", &dev.example("vaccination"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("extended key usage does not allow vaccination"),
        "{}",
        stderr(&out)
    );
    assert_eq!(dev.ledger_counts(), (0, 0));
}

#[test]
fn ledger_and_logs_hold_no_personal_data() {
    let dev = Dev::new();
    let mut p = dev.example("test");
    common::marker_person(&mut p);
    let out = dev.sign("test", &p);
    assert!(out.status.success(), "{}", stderr(&out));
    // A rejected one too (error messages must not echo values).
    let mut bad = p.clone();
    bad["nam"]["fnt"] = json!("ZZMARKERZZ lower");
    let out_bad = dev.sign("test", &bad);
    assert_eq!(out_bad.status.code(), Some(2));
    let logs = format!("{}{}", stderr(&out), stderr(&out_bad));
    dev.assert_no_personal_data(&logs);
    assert_eq!(dev.ledger_counts(), (0, 1));
}

#[test]
fn an_independent_pkcs11_client_sees_sign_only_non_extractable_keys() {
    // OpenSC's pkcs11-tool reads the key attributes from the token (our own check of CKA_VALUE
    // is in tests/hsm.rs).
    let dev = Dev::new();
    let listing = dev.pkcs11_objects("privkey");
    let mut keys = 0;
    for block in listing.split("Private Key Object").skip(1) {
        keys += 1;
        assert!(
            block.contains("Usage:      sign\n"),
            "key usable for more than signing:\n{block}"
        );
        assert!(block.contains("always sensitive"), "{block}");
        assert!(block.contains("never extractable"), "{block}");
        assert!(
            block.contains("local"),
            "key not generated on the token:\n{block}"
        );
    }
    assert_eq!(
        keys, 10,
        "expected CSCA, TLS CA, TLS server and gateway-client keys, audit key, revocation-list \
         key, upload key and 3 DSC keys:\n{listing}"
    );
    assert!(listing.contains("label:      tls-server"), "{listing}");
    assert!(
        listing.contains("label:      tls-gateway-client"),
        "{listing}"
    );
    // The HMAC key for UVCIs: a secret key that never leaves the token either.
    let listing = dev.pkcs11_objects("secrkey");
    assert!(listing.contains("uvci-hmac"), "{listing}");
    assert!(
        listing.contains("always sensitive") && listing.contains("never extractable"),
        "{listing}"
    );
}

#[test]
fn a_key_uri_for_another_token_is_refused() {
    let dev = Dev::new();
    let cfg = std::fs::read_to_string(dev.file("dccsign.toml")).unwrap();
    let cfg = cfg.replace(
        "pkcs11:token=dccsign-dev;object=dsc-test;",
        "pkcs11:token=elsewhere;object=dsc-test;",
    );
    std::fs::write(dev.file("dccsign.toml"), cfg).unwrap();
    let out = dev.sign("test", &dev.example("test"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the URI names token \"elsewhere\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn json_logs_are_structured_and_free_of_personal_data() {
    let dev = Dev::new();
    let mut p = dev.example("test");
    p["nam"]["fnt"] = json!("ZZMARKERZZ");
    let path = dev.file("p.json");
    std::fs::write(&path, p.to_string()).unwrap();
    let out = std::process::Command::new(common::bin())
        .args([
            "--log-format",
            "json",
            "sign",
            "--state-dir",
            dev.path().to_str().unwrap(),
            "--type",
            "test",
            "--payload",
            path.to_str().unwrap(),
        ])
        .env("DCCSIGN_LOG", "info")
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
        .collect();
    let signed = events
        .iter()
        .find(|e| e["fields"]["message"] == "signed")
        .unwrap_or_else(|| panic!("no 'signed' event in {events:?}"));
    assert_eq!(signed["fields"]["cert_type"], "test");
    assert_eq!(signed["fields"]["kid"].as_str().unwrap().len(), 16);
    assert!(!stderr(&out).contains("ZZMARKERZZ"));
}

/// `verify --revocation`: a list signed in the development token by `revocation-list-key` that
/// holds the certificate's SIGNATURE hash → revoked (4); one where that revocation was lifted →
/// valid; a tampered list, a list signed by another key, for another DSC, or a delta → error (1).
///
/// The only test in this file that opens a token in-process (SoftHSM reads `SOFTHSM2_CONF` once
/// per process, so a second state directory could not be opened here).
#[test]
fn verify_checks_the_signed_revocation_list() {
    use dccsign::revocation::list::{self, ListEntry, RevocationList};
    use sha2::{Digest, Sha256};

    let dev = Dev::new();
    let hc1 = dev.sign_ok("test", &dev.example("test"));
    // The certificate's kid and SIGNATURE hash, computed here from its COSE bytes:
    // SHA-256 over r (the first 32 bytes of the signature), first 16 bytes.
    let cose = dccsign::cose::hc1::decode(&hc1).unwrap();
    let parsed = dccsign::cose::sign1::parse(&cose).unwrap();
    let kid: [u8; 8] = parsed.kid.clone().unwrap().try_into().unwrap();
    assert_eq!(parsed.signature.len(), 64);
    let hash: [u8; 16] = Sha256::digest(&parsed.signature[..32])[..16]
        .try_into()
        .unwrap();
    let other_hash = [0x42u8; 16];

    // The development token and list key, as the generated config names them.
    let cfg = dccsign::config::Config::load(&dev.file("dccsign.toml")).unwrap();
    cfg.export_softhsm_env();
    let token = dccsign::hsm::Token::open(&cfg.token_settings()).unwrap();
    let list_key = token
        .find_key(
            cfg.revocation
                .list_key
                .as_deref()
                .expect("list_key in dev config"),
        )
        .unwrap();
    let list_pem = cfg.resolve(cfg.revocation.list_public_key.as_deref().unwrap());
    assert_eq!(list_pem, dev.file("pki/revocation-list-key.pem"));
    let audit_key = token.find_key("audit-key").unwrap();

    let write = |name: &str, bytes: &[u8]| {
        let p = dev.file(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let sign_with = |list: &RevocationList, key: &dccsign::hsm::KeyHandle, claimed: [u8; 8]| {
        list::sign(list, claimed, |d| token.sign_digest(key, d)).unwrap()
    };
    let sign = |list: &RevocationList| {
        sign_with(list, &list_key, list::list_key_kid(&list_key.public_key))
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let revoked_entries = [
        ListEntry {
            hash: other_hash,
            added: 1,
            removed: None,
        },
        ListEntry {
            hash,
            added: 2,
            removed: None,
        },
    ];
    let mut lifted_entries = revoked_entries;
    lifted_entries[1].removed = Some(3);

    let revoked_list = list::full(kid, &revoked_entries, now);
    assert!(revoked_list.contains(&hash));
    let revoked_cose = sign(&revoked_list);
    let revoked = write("revoked.cbor", &revoked_cose);
    let lifted_list = list::full(kid, &lifted_entries, now);
    assert!(!lifted_list.contains(&hash) && lifted_list.contains(&other_hash));
    let lifted = write("lifted.cbor", &sign(&lifted_list));
    // The revoked list with one bit of the certificate's hash flipped: unchecked, it would
    // read as "not revoked".
    let mut tampered_bytes = revoked_cose.clone();
    let at = tampered_bytes
        .windows(16)
        .position(|w| w == hash)
        .expect("the hash is in the list");
    tampered_bytes[at + 15] ^= 0x01;
    let tampered = write("tampered.cbor", &tampered_bytes);
    // Signed by another key of the token: with its own kid, and claiming the list key's kid.
    let by_audit_key = write(
        "audit-signed.cbor",
        &sign_with(
            &revoked_list,
            &audit_key,
            list::list_key_kid(&audit_key.public_key),
        ),
    );
    let forged_kid = write(
        "forged.cbor",
        &sign_with(
            &revoked_list,
            &audit_key,
            list::list_key_kid(&list_key.public_key),
        ),
    );
    // A well-signed list for another DSC, and a delta.
    let mut other_kid = kid;
    other_kid[0] ^= 0xff;
    let other_dsc = write(
        "other-dsc.cbor",
        &sign(&list::full(other_kid, &revoked_entries, now)),
    );
    let delta = write(
        "delta.cbor",
        &sign(&list::delta(kid, &revoked_entries, 1, now)),
    );
    drop(token);

    let dsc = dev.dsc_pem("test");
    let verify = |list: &std::path::Path, key: &std::path::Path| {
        dev.run(&[
            "verify",
            "--trust",
            dsc.to_str().unwrap(),
            "--revocation",
            list.to_str().unwrap(),
            "--revocation-key",
            key.to_str().unwrap(),
            &hc1,
        ])
    };

    // Revoked: its own exit code, and the payload is still printed.
    let out = verify(&revoked, &list_pem);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("revocation: REVOKED (list version 2"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().last(), Some("revoked"));
    assert!(stdout(&out).contains("\"t\""), "{}", stdout(&out));

    // The revocation lifted (version 3): valid.
    let out = verify(&lifted, &list_pem);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("revocation: ok, not in the list (list version 3"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().last(), Some("valid"));

    // Every bad list is an error, before anything is printed — never "valid".
    let bad = [
        (&tampered, &list_pem, "signature does not verify"),
        (&forged_kid, &list_pem, "signature does not verify"),
        (&by_audit_key, &list_pem, "signed by key"),
        (&revoked, &dev.file("pki/audit-key.pem"), "signed by key"),
        (&other_dsc, &list_pem, "the revocation list is for kid"),
        (&delta, &list_pem, "not a full list"),
        (
            &dev.file("pki/csca.pem"),
            &list_pem,
            "not a tagged COSE_Sign1",
        ),
    ];
    for (list, key, message) in bad {
        let out = verify(list, key);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            list.display(),
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(message),
            "{}: {}",
            list.display(),
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
        assert!(
            !stderr(&out).lines().any(|l| l == "valid"),
            "{}",
            stderr(&out)
        );
    }

    // The list needs its key.
    let out = dev.run(&[
        "verify",
        "--trust",
        dsc.to_str().unwrap(),
        "--revocation",
        revoked.to_str().unwrap(),
        &hc1,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--revocation-key"),
        "{}",
        stderr(&out)
    );
}
