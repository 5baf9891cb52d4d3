//! The gateway client against a stand-in EU gateway over mutual TLS, with batches signed as CMS
//! inside a real SoftHSM token and every CMS also checked by OpenSSL.
//!
//! One development state directory (its own SoftHSM token) for this test process: PKCS#11 reads
//! `SOFTHSM2_CONF` once, at `C_Initialize`. Each test generates its own upload key in it.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine;
use dccsign::hsm::{KeyHandle, PinSource, Token, TokenSettings, SOFTHSM_MODULE};
use dccsign::keys::{build_csca, CertProfile, DEV_TOKEN_LABEL};
use dccsign::revocation::batch::{
    batch_json, cms_base64, delete_json, open_cms, parse_batch_json, plan, HashType, PlannedBatch,
    Revoked, MAX_ENTRIES,
};
use dccsign::revocation::gateway::{DeliveryError, Gateway, HttpsClient};
use der::Encode;
use gateway::StandIn;
use x509_cert::Certificate;

const DAY: i64 = 86_400;

struct Fixture {
    dev: common::Dev,
    token: Token,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dev = common::Dev::new();
        dev.stand_in_cert();
        std::env::set_var("SOFTHSM2_CONF", dev.file("softhsm2.conf"));
        let token = Token::open(&TokenSettings {
            module: PathBuf::from(SOFTHSM_MODULE),
            label: DEV_TOKEN_LABEL.into(),
            pin: PinSource::File(dev.file("secrets/user.pin")),
            base_dir: dev.path().to_path_buf(),
        })
        .unwrap();
        Fixture { dev, token }
    })
}

/// An upload key generated in the token for one test, with a self-signed certificate.
struct Uploader {
    key: KeyHandle,
    cert: Certificate,
}

impl Uploader {
    fn new(label: &str) -> Uploader {
        let t = &fixture().token;
        let key = t.generate_p256(label).unwrap();
        let cert = build_csca(
            t,
            &key,
            &CertProfile {
                subject: format!("CN=upload {label},O=dccsign test,C=SE"),
                not_before: SystemTime::now(),
                lifetime: Duration::from_secs(30 * DAY as u64),
            },
        )
        .unwrap();
        Uploader { key, cert }
    }

    fn der(&self) -> Vec<u8> {
        self.cert.to_der().unwrap()
    }

    fn cms(&self, json: &[u8]) -> String {
        cms_base64(&fixture().token, &self.key, &self.cert, json).unwrap()
    }
}

fn dev_file(rel: &str) -> PathBuf {
    fixture().dev.file(rel)
}

/// A stand-in for country SE on the development server certificate, trusting development
/// client certificates.
fn stand_in(up: &Uploader) -> StandIn {
    let (cert, key) = fixture().dev.stand_in_cert();
    StandIn::start(&cert, &key, &dev_file("pki/tls/ca.pem"), up.der(), "SE")
}

fn client_of(dir: &Path, timeout: Duration) -> HttpsClient {
    HttpsClient::new(
        &dir.join("pki/tls/ca.pem"),
        &dir.join("pki/clients/issuer-all.pem"),
        &dir.join("pki/clients/issuer-all.key"),
        timeout,
    )
    .unwrap()
}

fn client() -> HttpsClient {
    client_of(fixture().dev.path(), Duration::from_secs(20))
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn small_batch(seed: u8, days_ahead: i64) -> PlannedBatch {
    let exp = now() + days_ahead * DAY;
    let entries: Vec<Revoked> = (0..3u8)
        .map(|i| Revoked {
            kid: [seed; 8],
            exp,
            hash: [seed.wrapping_mul(31).wrapping_add(i); 16],
        })
        .collect();
    let mut p = plan(&entries, HashType::Signature);
    assert_eq!(p.len(), 1);
    p.remove(0)
}

/// `openssl cms -verify -noverify` (signature and digest, no chain): the content on success,
/// OpenSSL's error otherwise.
fn openssl_verify(der: &[u8]) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let input = dir.path().join("f.der");
    let out = dir.path().join("content");
    std::fs::write(&input, der).unwrap();
    let o = Command::new("openssl")
        .args([
            "cms",
            "-verify",
            "-noverify",
            "-inform",
            "DER",
            "-binary",
            "-in",
        ])
        .arg(&input)
        .arg("-out")
        .arg(&out)
        .output()
        .expect("openssl missing: run .ci/deps");
    if o.status.success() {
        Ok(std::fs::read(&out).unwrap())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn b64d(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn upload_returns_the_batch_id_and_the_stand_in_keeps_it() {
    let up = Uploader::new("upload-basic");
    let gw_server = stand_in(&up);
    let gw = Gateway::new(client(), &format!("{}/", gw_server.url()));
    let b = small_batch(1, 10);
    let json = batch_json("SE", &b);
    let cms = up.cms(&json);
    assert!(
        !cms.contains('\n') && cms.len().is_multiple_of(4),
        "one line of padded base64"
    );

    // Independently verified, and by our own parser.
    let der = b64d(&cms);
    assert_eq!(openssl_verify(&der).unwrap(), json);
    let (content, signer) = open_cms(&der).unwrap();
    assert_eq!(content, json);
    assert_eq!(signer, up.cert);

    let id = block(gw.upload(&cms)).unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert!(!id.contains('"'));
    let stored = gw_server.uploads();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].batch_id, id);
    assert_eq!(
        stored[0].json,
        serde_json::from_slice::<serde_json::Value>(&json).unwrap()
    );
    assert_eq!(stored[0].cms, der);
    assert!(!stored[0].deleted);
    assert_eq!(gw_server.requests(), 1);
}

#[test]
fn server_errors_are_retried_and_refusals_are_final() {
    let up = Uploader::new("upload-retry");
    let gw_server = stand_in(&up);
    let gw = Gateway::new(client(), &gw_server.url());
    let cms = up.cms(&batch_json("SE", &small_batch(2, 5)));

    gw_server.fail_next(503, 2);
    for _ in 0..2 {
        let e = block(gw.upload(&cms)).unwrap_err();
        assert!(
            matches!(e, DeliveryError::Server { status: 503, .. }),
            "{e:?}"
        );
        assert!(e.retryable());
        assert_eq!(e.code(), "http-503");
        assert!(e.to_string().contains("scripted failure 503"), "{e}");
    }
    assert!(
        gw_server.uploads().is_empty(),
        "failed uploads are not stored"
    );
    block(gw.upload(&cms)).unwrap();
    assert_eq!(gw_server.requests(), 3);
    assert_eq!(gw_server.uploads().len(), 1);

    gw_server.fail_next(400, 1);
    let e = block(gw.upload(&cms)).unwrap_err();
    assert!(
        matches!(e, DeliveryError::Rejected { status: 400, .. }),
        "{e:?}"
    );
    assert!(!e.retryable());
    assert_eq!(e.code(), "http-400");
    assert_eq!(gw_server.uploads().len(), 1);
}

#[test]
fn the_stand_in_refuses_what_the_gateway_refuses() {
    let up = Uploader::new("upload-refusals");
    let gw_server = stand_in(&up);
    let gw = Gateway::new(client(), &gw_server.url());
    let refused = |cms: &str| -> (u16, String) {
        match block(gw.upload(cms)).unwrap_err() {
            DeliveryError::Rejected { status, body } => (status, body),
            e => panic!("expected a refusal, got {e:?}"),
        }
    };

    // An expiry in the past: the batch itself is invalid.
    let mut past = small_batch(3, 1);
    past.expires -= 3 * DAY;
    let (s, body) = refused(&up.cms(&batch_json("SE", &past)));
    assert_eq!((s, body.as_str()), (400, "expires: must be in the future"));

    // Another country's batch.
    let (s, body) = refused(&up.cms(&batch_json("DK", &small_batch(3, 1))));
    assert_eq!(s, 403);
    assert!(body.contains("country"), "{body}");

    // Signed by a key that is not the upload certificate's.
    let other = Uploader::new("upload-refusals-other");
    let (s, body) = refused(&other.cms(&batch_json("SE", &small_batch(3, 1))));
    assert_eq!(s, 403);
    assert!(body.contains("upload certificate"), "{body}");

    // A tampered CMS.
    let mut der = b64d(&up.cms(&batch_json("SE", &small_batch(3, 1))));
    let pos = der.windows(9).position(|w| w == b"\"country\"").unwrap();
    der[pos + 12] ^= 0x01; // "SE" → "SD"
    let (s, body) = refused(&base64::engine::general_purpose::STANDARD.encode(&der));
    assert_eq!(s, 400);
    assert!(body.contains("message-digest"), "{body}");

    // Not base64.
    let (s, body) = refused("%%%not base64%%%");
    assert_eq!(s, 400);
    assert!(body.contains("base64"), "{body}");

    assert!(gw_server.uploads().is_empty());
    assert_eq!(gw_server.requests(), 5);
}

#[test]
fn tampered_cms_fails_openssl_and_open_cms() {
    let up = Uploader::new("upload-tamper");
    let json = batch_json("SE", &small_batch(4, 3));
    let der = b64d(&up.cms(&json));
    assert_eq!(openssl_verify(&der).unwrap(), json);
    open_cms(&der).unwrap();

    // One byte of the content.
    let pos = der.windows(json.len()).position(|w| w == json).unwrap();
    let mut t = der.clone();
    t[pos + json.len() / 2] ^= 0x20;
    assert!(openssl_verify(&t).is_err());
    assert!(open_cms(&t).is_err());

    // One byte of the signature (s is the last element of the only SignerInfo).
    let mut t = der.clone();
    let n = t.len();
    t[n - 2] ^= 0x01;
    let o = openssl_verify(&t);
    assert!(o.is_err(), "{o:?}");
    assert!(open_cms(&t).is_err());

    // One byte of the signed attributes (inside the message-digest value).
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&json).into();
    let pos = der.windows(32).position(|w| w == digest).unwrap();
    let mut t = der.clone();
    t[pos] ^= 0x01;
    assert!(openssl_verify(&t).is_err());
    assert!(open_cms(&t).is_err());
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let up = Uploader::new("upload-other-ca");
    let gw_server = stand_in(&up);
    let cms = up.cms(&batch_json("SE", &small_batch(5, 2)));
    let other = common::Dev::new();

    // Our CA for the server, but the other CA's client certificate.
    let c = HttpsClient::new(
        &dev_file("pki/tls/ca.pem"),
        &other.file("pki/clients/issuer-all.pem"),
        &other.file("pki/clients/issuer-all.key"),
        Duration::from_secs(20),
    )
    .unwrap();
    let e = block(Gateway::new(c, &gw_server.url()).upload(&cms)).unwrap_err();
    assert!(matches!(e, DeliveryError::Transport(_)), "{e:?}");
    assert!(e.retryable());
    assert_eq!(e.code(), "transport");

    // The other CA only: the server certificate does not verify.
    let c = client_of(other.path(), Duration::from_secs(20));
    let e = block(Gateway::new(c, &gw_server.url()).upload(&cms)).unwrap_err();
    match &e {
        DeliveryError::Transport(m) => assert!(m.contains("TLS handshake"), "{m}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(gw_server.requests(), 0);
    assert!(gw_server.uploads().is_empty());

    // The right client still gets through.
    block(Gateway::new(client(), &gw_server.url()).upload(&cms)).unwrap();
}

#[test]
fn configuration_errors_name_the_file() {
    let missing = dev_file("pki/tls/nope.pem");
    let e = HttpsClient::new(
        &missing,
        &dev_file("pki/clients/issuer-all.pem"),
        &dev_file("pki/clients/issuer-all.key"),
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(
        matches!(&e, DeliveryError::Config(m) if m.contains("nope.pem")),
        "{e:?}"
    );
    let e = HttpsClient::new(
        &dev_file("pki/tls/ca.pem"),
        &dev_file("pki/clients/issuer-all.pem"),
        &dev_file("pki/clients/missing.key"),
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(
        matches!(&e, DeliveryError::Config(m) if m.contains("missing.key")),
        "{e:?}"
    );
    // A key that does not belong to the certificate.
    let e = HttpsClient::new(
        &dev_file("pki/tls/ca.pem"),
        &dev_file("pki/clients/issuer-all.pem"),
        &dev_file("pki/clients/officer-1.key"),
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(
        matches!(&e, DeliveryError::Config(m) if m.contains("issuer-all.pem") && m.contains("officer-1.key")),
        "{e:?}"
    );
}

#[test]
fn plain_http_is_refused_before_connecting() {
    let up = Uploader::new("upload-http");
    let gw_server = stand_in(&up);
    let url = gw_server.url().replace("https://", "http://");
    let gw = Gateway::new(client(), &url);
    let e = block(gw.upload(&up.cms(&batch_json("SE", &small_batch(6, 2))))).unwrap_err();
    match &e {
        DeliveryError::Config(m) => assert!(m.contains("only https:// URLs"), "{m}"),
        e => panic!("{e:?}"),
    }
    assert!(!e.retryable());
    assert_eq!(e.code(), "config");
    let e = block(client().post_json(&format!("{url}/events"), b"{}".to_vec())).unwrap_err();
    assert!(matches!(e, DeliveryError::Config(_)), "{e:?}");
    assert_eq!(gw_server.requests(), 0);
}

#[test]
fn a_silent_server_times_out_and_a_closed_one_is_a_transport_error() {
    // Accepts TCP but never speaks TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let c = client_of(fixture().dev.path(), Duration::from_millis(500));
    let started = std::time::Instant::now();
    let e = block(c.post_json(&format!("{url}/events"), b"{}".to_vec())).unwrap_err();
    assert_eq!(e, DeliveryError::Timeout);
    assert!(e.retryable());
    assert_eq!(e.code(), "timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
    drop(silent);

    // Nobody listening.
    let e = block(client().post_json(&format!("{url}/events"), b"{}".to_vec())).unwrap_err();
    assert!(matches!(e, DeliveryError::Transport(_)), "{e:?}");

    // A gateway that closes every connection, then serves again.
    let up = Uploader::new("upload-closed");
    let gw_server = stand_in(&up);
    let gw = Gateway::new(client(), &gw_server.url());
    let cms = up.cms(&batch_json("SE", &small_batch(7, 2)));
    gw_server.stop_accepting();
    let e = block(gw.upload(&cms)).unwrap_err();
    assert!(matches!(e, DeliveryError::Transport(_)), "{e:?}");
    gw_server.resume();
    block(gw.upload(&cms)).unwrap();
}

#[test]
fn delete_known_and_unknown_batches() {
    let up = Uploader::new("upload-delete");
    let gw_server = stand_in(&up);
    let gw = Gateway::new(client(), &gw_server.url());
    let id = block(gw.upload(&up.cms(&batch_json("SE", &small_batch(8, 4))))).unwrap();

    let del = up.cms(&delete_json(&id));
    assert_eq!(openssl_verify(&b64d(&del)).unwrap(), delete_json(&id));
    block(gw.delete(&del)).unwrap();
    let stored = gw_server.uploads();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].deleted);

    // Unknown ids (and a second deletion) answer 404, which counts as done.
    let unknown = up.cms(&delete_json("00000000-0000-0000-0000-000000000000"));
    let raw = block(client().send(
        http::Method::POST,
        &format!("{}/revocation-list/delete", gw_server.url()),
        &[("Content-Type", "application/cms-text".into())],
        unknown.clone().into_bytes(),
    ))
    .unwrap();
    assert_eq!(raw.status, 404, "{}", String::from_utf8_lossy(&raw.body));
    block(gw.delete(&unknown)).unwrap();
    block(gw.delete(&del)).unwrap();

    // A deletion signed by someone else is refused and changes nothing.
    let id2 = block(gw.upload(&up.cms(&batch_json("SE", &small_batch(9, 4))))).unwrap();
    let other = Uploader::new("upload-delete-other");
    let e = block(gw.delete(&other.cms(&delete_json(&id2)))).unwrap_err();
    assert!(
        matches!(e, DeliveryError::Rejected { status: 403, .. }),
        "{e:?}"
    );
    assert!(!gw_server.uploads()[1].deleted);
}

#[test]
fn list_returns_batches_newer_than_if_modified_since() {
    let up = Uploader::new("upload-list");
    let gw_server = stand_in(&up);
    let gw = Gateway::new(client(), &gw_server.url());
    let before = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    assert!(
        block(gw.list(before)).unwrap().is_empty(),
        "204: nothing yet"
    );

    let ids: Vec<String> = (10..15u8)
        .map(|s| block(gw.upload(&up.cms(&batch_json("SE", &small_batch(s, 2))))).unwrap())
        .collect();
    // Pages of 2: the client follows `more` with the last date.
    gw_server.set_page_size(2);
    let listed = block(gw.list(before)).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|b| b.batch_id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    assert!(listed.iter().all(|b| b.country == "SE" && !b.deleted));
    let dates: Vec<_> = listed.iter().map(|b| b.date.clone()).collect();
    assert!(dates.windows(2).all(|w| {
        time::OffsetDateTime::parse(&w[0], &time::format_description::well_known::Rfc3339).unwrap()
            < time::OffsetDateTime::parse(&w[1], &time::format_description::well_known::Rfc3339)
                .unwrap()
    }));

    // Since the third: only the last two.
    let third =
        time::OffsetDateTime::parse(&dates[2], &time::format_description::well_known::Rfc3339)
            .unwrap();
    let later = block(gw.list(third)).unwrap();
    assert_eq!(
        later
            .iter()
            .map(|b| b.batch_id.as_str())
            .collect::<Vec<_>>(),
        [ids[3].as_str(), ids[4].as_str()]
    );

    // A deletion moves the batch to the end of the list, marked deleted.
    block(gw.delete(&up.cms(&delete_json(&ids[0])))).unwrap();
    let listed = block(gw.list(before)).unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[4].batch_id, ids[0]);
    assert!(listed[4].deleted);

    // The gateway refuses a date in the future.
    let e = block(gw.list(time::OffsetDateTime::now_utc() + time::Duration::hours(1))).unwrap_err();
    assert!(
        matches!(e, DeliveryError::Rejected { status: 400, .. }),
        "{e:?}"
    );
}

#[test]
fn subscriber_events_are_posted() {
    let up = Uploader::new("upload-events");
    let gw_server = stand_in(&up);
    let event = serde_json::json!({"event": "revoked", "uvciHash": "l1wSv/+3M+V2uniI/yPGLw=="});
    let status = block(client().post_json(
        &format!("{}/events", gw_server.url()),
        serde_json::to_vec(&event).unwrap(),
    ))
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(gw_server.events(), vec![event]);

    let e = block(client().post_json(&format!("{}/events", gw_server.url()), b"{".to_vec()))
        .unwrap_err();
    assert!(
        matches!(e, DeliveryError::Rejected { status: 400, .. }),
        "{e:?}"
    );
    let e = block(client().post_json(&format!("{}/nowhere", gw_server.url()), b"{}".to_vec()))
        .unwrap_err();
    assert!(
        matches!(e, DeliveryError::Rejected { status: 404, .. }),
        "{e:?}"
    );
    assert_eq!(gw_server.events().len(), 1);
    assert_eq!(
        gw_server.requests(),
        0,
        "requests() counts upload attempts only"
    );
}

#[test]
fn a_2500_entry_plan_is_verified_by_openssl_and_accepted() {
    let up = Uploader::new("upload-2500");
    let gw_server = stand_in(&up);
    let gw = Gateway::new(client(), &gw_server.url());
    let base = now();
    // Two kids; expiries spread over several days (3 to 6 days ahead).
    let entries: Vec<Revoked> = (0..2500u32)
        .map(|i| {
            let mut hash = [0u8; 16];
            hash[..4].copy_from_slice(&i.to_be_bytes());
            hash[15] = 0x5a;
            Revoked {
                kid: [if i % 2 == 0 { 0xa1 } else { 0xb2 }; 8],
                exp: base + 3 * DAY + (i as i64 * 7919) % (3 * DAY),
                hash,
            }
        })
        .collect();
    let batches = plan(&entries, HashType::Signature);
    let expected: usize = {
        let mut groups = std::collections::BTreeMap::<([u8; 8], i64), usize>::new();
        for e in &entries {
            *groups
                .entry((e.kid, dccsign::revocation::batch::expires_midnight(e.exp)))
                .or_default() += 1;
        }
        assert!(groups.len() >= 6, "{} groups", groups.len());
        groups.values().map(|n| n.div_ceil(MAX_ENTRIES)).sum()
    };
    assert_eq!(batches.len(), expected);

    let mut ids = Vec::new();
    for b in &batches {
        let json = batch_json("SE", b);
        let cms = up.cms(&json);
        let der = b64d(&cms);
        assert_eq!(openssl_verify(&der).unwrap(), json, "OpenSSL");
        assert_eq!(open_cms(&der).unwrap().0, json);
        let parsed = parse_batch_json(&json, now()).unwrap();
        assert_eq!(parsed.hashes, b.hashes);
        ids.push(block(gw.upload(&cms)).unwrap());
    }
    let stored = gw_server.uploads();
    assert_eq!(stored.len(), batches.len());
    assert_eq!(
        stored
            .iter()
            .map(|s| s.batch_id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    let mut all = std::collections::BTreeSet::new();
    for s in &stored {
        let entries = s.json["entries"].as_array().unwrap();
        assert!(!entries.is_empty() && entries.len() <= MAX_ENTRIES);
        for e in entries {
            assert!(all.insert(e["hash"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(all.len(), 2500, "every entry uploaded exactly once");
}

#[test]
fn open_cms_accepts_a_cms_made_by_openssl() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = |n: &str| dir.path().join(n);
    let run = |args: &[&str]| {
        let o = Command::new("openssl").args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let s = |n: &str| p(n).to_str().unwrap().to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=openssl upload/C=SE",
        "-days",
        "2",
        "-keyout",
        &s("k.pem"),
        "-out",
        &s("c.pem"),
    ]);
    let json = batch_json("SE", &small_batch(20, 2));
    std::fs::write(p("batch.json"), &json).unwrap();
    // OpenSSL's own signed attributes (content type, signing time, SMIMECapabilities, digest).
    run(&[
        "cms",
        "-sign",
        "-binary",
        "-nodetach",
        "-md",
        "sha256",
        "-outform",
        "DER",
        "-in",
        &s("batch.json"),
        "-signer",
        &s("c.pem"),
        "-inkey",
        &s("k.pem"),
        "-out",
        &s("batch.der"),
    ]);
    let der = std::fs::read(p("batch.der")).unwrap();
    let (content, signer) = open_cms(&der).unwrap();
    assert_eq!(content, json);
    assert_eq!(signer.to_der().unwrap(), common::pem_der(&p("c.pem")));
    // And a one-byte change in its content is caught.
    let pos = der.windows(json.len()).position(|w| w == json).unwrap();
    let mut t = der.clone();
    t[pos + 5] ^= 0x01;
    assert!(open_cms(&t).is_err());
}
