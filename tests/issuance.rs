//! The issuance pipeline in-process against a real SoftHSM token: what the ledger records, and
//! the record-before-sign invariant when the ledger fails. (One token per test process.)

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use dccsign::config::{Config, GivenUvci};
use dccsign::dcc::{CertType, Rule};
use dccsign::hsm::Token;
use dccsign::issuance::{IssueError, Issuer, IssuerSettings, Payload};
use dccsign::keys::DscSet;
use dccsign::ledger::{
    CertificateRecord, Ledger, LedgerCounts, LedgerError, LedgerWrite, RecordedSince, SqliteLedger,
    StoredRequest, WriteReply,
};
use dccsign::revocation::hash::RevocationHash;
use sha2::{Digest, Sha256};

struct Env {
    _dir: tempfile::TempDir,
    cfg: Config,
    token: Arc<Token>,
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let report = dccsign::keys::dev_init(dir.path(), "SE").unwrap();
        let cfg = Config::load(&report.config).unwrap();
        let token = Arc::new(Token::open(&cfg.token_settings()).unwrap());
        Env {
            _dir: dir,
            cfg,
            token,
        }
    })
}

/// A real SQLite ledger that can be told to fail (a disk-full or I/O error stand-in).
struct FlakyLedger {
    inner: SqliteLedger,
    fail_reserve: AtomicBool,
    fail_complete: AtomicBool,
}

impl Ledger for FlakyLedger {
    fn submit(&self, w: LedgerWrite, reply: WriteReply) {
        let inject = match w {
            LedgerWrite::Reserve(..) => self.fail_reserve.load(Ordering::SeqCst),
            LedgerWrite::Complete(..) => self.fail_complete.load(Ordering::SeqCst),
            LedgerWrite::Release(..) => false,
        };
        if inject {
            return reply(Err(LedgerError::Database(
                "injected: disk I/O error".into(),
            )));
        }
        self.inner.submit(w, reply)
    }
    fn find_request(&self, client: &str, id: &str) -> Result<Option<StoredRequest>, LedgerError> {
        self.inner.find_request(client, id)
    }
    fn find_by_uci_hash(
        &self,
        h: &RevocationHash,
    ) -> Result<Option<CertificateRecord>, LedgerError> {
        self.inner.find_by_uci_hash(h)
    }
    fn counts(&self) -> Result<LedgerCounts, LedgerError> {
        self.inner.counts()
    }
    fn last_expiry(&self, kid: &[u8; 8]) -> Result<Option<i64>, LedgerError> {
        self.inner.last_expiry(kid)
    }
    fn recorded_since(&self, after: i64) -> Result<RecordedSince, LedgerError> {
        self.inner.recorded_since(after)
    }
    fn check_writable(&self) -> Result<(), LedgerError> {
        self.inner.check_writable()
    }
}

fn issuer(ledger: Arc<dyn Ledger>) -> Issuer {
    let e = env();
    let now = time::OffsetDateTime::now_utc();
    let dscs = DscSet::load(&e.cfg, &e.token, now).unwrap();
    let pool = e.token.signing_pool(2, 16).unwrap();
    let key = e.cfg.uvci_key(&e.token).unwrap();
    assert!(key.is_some(), "dev-init configures a UVCI key");
    Issuer::new(
        IssuerSettings::from_config(&e.cfg),
        &dscs,
        pool,
        ledger,
        key,
    )
}

fn vaccination(ci: Option<&str>) -> Vec<u8> {
    let now = time::OffsetDateTime::now_utc();
    let mut v = serde_json::json!({
        "ver": "1.3.0",
        "nam": {"fnt": "TESTSSON", "gnt": "TEST"},
        "dob": "1980-01-01",
        "v": [{"tg": "840539006", "vp": "J07BX03", "mp": "EU/1/20/1528", "ma": "ORG-100030215",
               "dn": 1, "sd": 2, "dt": (now - time::Duration::days(3)).date().to_string(), "co": "SE", "is": "I"}]
    });
    if let Some(ci) = ci {
        v["v"][0]["ci"] = serde_json::json!(ci);
    }
    serde_json::to_vec(&v).unwrap()
}

fn flaky() -> Arc<FlakyLedger> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    Arc::new(FlakyLedger {
        inner: SqliteLedger::open(&dir.join("ledger.sqlite")).unwrap(),
        fail_reserve: AtomicBool::new(false),
        fail_complete: AtomicBool::new(false),
    })
}

#[test]
fn the_ledger_records_hashes_that_match_the_certificate() {
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    let now = time::OffsetDateTime::now_utc();
    let issued = iss
        .issue(
            CertType::Vaccination,
            Payload::Json(&vaccination(None)),
            now,
        )
        .unwrap();

    // Independently from the COSE bytes: the signature is the last 64 bytes (bstr of 64).
    let sig = &issued.cose[issued.cose.len() - 64..];
    let r_hash: [u8; 16] = Sha256::digest(&sig[..32])[..16].try_into().unwrap();
    let uci_hash: [u8; 16] = Sha256::digest(issued.uvci.as_bytes())[..16]
        .try_into()
        .unwrap();
    let cc_hash: [u8; 16] = Sha256::digest(format!("SE{}", issued.uvci).as_bytes())[..16]
        .try_into()
        .unwrap();

    let rec = ledger
        .find_by_uci_hash(&uci_hash)
        .unwrap()
        .expect("row for the UVCI");
    assert_eq!(rec.state, "signed");
    assert_eq!(rec.signature_hash, Some(r_hash));
    assert_eq!(rec.reservation.country_uci_hash, cc_hash);
    assert_eq!(rec.reservation.kid, issued.kid);
    assert_eq!(rec.reservation.cert_type, CertType::Vaccination);
    assert_eq!(
        (rec.reservation.iat, rec.reservation.exp),
        (issued.iat, issued.exp)
    );
    // The kid is the vaccination DSC's.
    let dsc = iss.dsc_for(CertType::Vaccination).unwrap();
    assert_eq!(issued.kid, dccsign::cose::kid::kid(&dsc.dsc.cert_der));
}

#[test]
fn a_failed_reservation_means_no_signature() {
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    ledger.fail_reserve.store(true, Ordering::SeqCst);
    let now = time::OffsetDateTime::now_utc();
    let err = iss
        .issue(
            CertType::Vaccination,
            Payload::Json(&vaccination(Some("URN:UVCI:01:SE:DEV/RESERVEFAIL1"))),
            now,
        )
        .unwrap_err();
    assert!(matches!(err, IssueError::Ledger(_)), "{err}");
    assert_eq!(err.code(), "2-60-5004");
    assert!(!err.is_client_error());
    assert_eq!(ledger.counts().unwrap(), LedgerCounts::default());
}

#[test]
fn a_failed_completion_returns_no_certificate_and_keeps_the_reservation() {
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    ledger.fail_complete.store(true, Ordering::SeqCst);
    let ci = "URN:UVCI:01:SE:DEV/COMPLETEFAIL1";
    let now = time::OffsetDateTime::now_utc();
    let err = iss
        .issue(
            CertType::Vaccination,
            Payload::Json(&vaccination(Some(ci))),
            now,
        )
        .unwrap_err();
    assert!(matches!(err, IssueError::Ledger(_)), "{err}");
    // The durable reservation records that a signature may exist; the UVCI stays blocked.
    assert_eq!(
        ledger.counts().unwrap(),
        LedgerCounts {
            reserved: 1,
            signed: 0
        }
    );
    ledger.fail_complete.store(false, Ordering::SeqCst);
    let again = iss
        .issue(
            CertType::Vaccination,
            Payload::Json(&vaccination(Some(ci))),
            now,
        )
        .unwrap_err();
    assert!(matches!(again, IssueError::DuplicateUvci), "{again}");
}

#[test]
fn cbor_payloads_sign_like_json() {
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    let now = time::OffsetDateTime::now_utc();
    let json: serde_json::Value = serde_json::from_slice(&vaccination(None)).unwrap();
    let d = dccsign::dcc::validate(&json, None, &dccsign::dcc::Policy::default(), now).unwrap();
    let issued = iss
        .issue(
            CertType::Vaccination,
            Payload::Cbor(&d.to_cbor_bytes()),
            now,
        )
        .unwrap();
    let mut trust = dccsign::cose::TrustStore::new();
    trust
        .add_der(&iss.dsc_for(CertType::Vaccination).unwrap().dsc.cert_der)
        .unwrap();
    let report = dccsign::cose::verify_hc1(&issued.hc1, &trust, now).unwrap();
    assert!(report.is_valid(), "{report:?}");
    assert_eq!(report.payload["nam"]["fnt"], "TESTSSON");
    // Wrong type requested: refused before anything is recorded.
    let err = iss
        .issue(CertType::Test, Payload::Cbor(&d.to_cbor_bytes()), now)
        .unwrap_err();
    assert!(err.is_client_error());
    assert_eq!(ledger.counts().unwrap().signed, 1);
}

/// A request of the test client.
fn request(request_id: &str) -> dccsign::issuance::RequestContext<'_> {
    dccsign::issuance::RequestContext {
        client: "spiffe://x/issuer",
        request_id,
        uvci_prefix: "DEV",
        given_uvci: GivenUvci::OwnPrefix,
        replaces: None,
    }
}

/// A client gives UVCIs in its own namespace only, unless configured to give any; a refusal
/// names the field and the rule, and records nothing.
#[test]
fn a_client_gives_uvcis_in_its_own_namespace_only() {
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    let now = time::OffsetDateTime::now_utc();
    let theirs = vaccination(Some("URN:UVCI:01:SE:EHM/NOTOURS1"));
    let err = iss
        .issue_for(
            CertType::Vaccination,
            Payload::Json(&theirs),
            now,
            request("ns-1"),
        )
        .unwrap_err();
    match &err {
        IssueError::Invalid(v) => {
            assert!(v.has("v[0].ci", Rule::UvciNamespace), "{v}");
            assert!(v.to_string().contains("URN:UVCI:01:SE:DEV/"), "{v}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(err.code(), "2-60-1001-29");
    assert!(err.is_client_error());
    assert_eq!(ledger.counts().unwrap(), LedgerCounts::default());
    // A prefix that merely starts like ours is another namespace.
    let longer = vaccination(Some("URN:UVCI:01:SE:DEVX/NOTOURS2"));
    let err = iss
        .issue_for(
            CertType::Vaccination,
            Payload::Json(&longer),
            now,
            request("ns-2"),
        )
        .unwrap_err();
    assert_eq!(err.code(), "2-60-1001-29", "{err}");
    // Its own namespace is signed.
    let ours = vaccination(Some("URN:UVCI:01:SE:DEV/OURS1"));
    let issued = iss
        .issue_for(
            CertType::Vaccination,
            Payload::Json(&ours),
            now,
            request("ns-3"),
        )
        .unwrap();
    assert_eq!(issued.uvci, "URN:UVCI:01:SE:DEV/OURS1");
    // A client configured to give any UVCI of the country may give another namespace's.
    let any = dccsign::issuance::RequestContext {
        given_uvci: GivenUvci::Any,
        ..request("ns-4")
    };
    let issued = iss
        .issue_for(CertType::Vaccination, Payload::Json(&theirs), now, any)
        .unwrap();
    assert_eq!(issued.uvci, "URN:UVCI:01:SE:EHM/NOTOURS1");
    assert_eq!(ledger.counts().unwrap().signed, 2);
}

#[test]
fn a_retried_request_returns_the_same_bytes_without_a_second_signature() {
    use dccsign::issuance::RequestContext;
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    let now = time::OffsetDateTime::now_utc();
    let payload = vaccination(None);
    let ctx = request("retry-1");
    let first = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), now, ctx)
        .unwrap();
    // Later, the same request again: same bytes, one row.
    let later = now + time::Duration::minutes(10);
    let again = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), later, ctx)
        .unwrap();
    assert_eq!(again.cose, first.cose);
    assert_eq!(again.hc1, first.hc1);
    assert_eq!(again.uvci, first.uvci);
    assert_eq!(
        ledger.counts().unwrap(),
        LedgerCounts {
            reserved: 0,
            signed: 1
        }
    );
    // The generated UVCI is derived in the token, not stored: the ledger has only its hash.
    let stored = ledger
        .find_request(ctx.client, ctx.request_id)
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.record.reservation.uci_hash,
        dccsign::revocation::hash::uci_hash(&first.uvci)
    );
    // Another payload under the same request id is refused.
    let other = vaccination(Some("URN:UVCI:01:SE:DEV/OTHERPAYLOAD1"));
    let err = iss
        .issue_for(CertType::Vaccination, Payload::Json(&other), now, ctx)
        .unwrap_err();
    assert!(matches!(err, IssueError::RequestIdReused), "{err}");
    assert_eq!(err.code(), "2-60-1001-92");
    // Another client may use the same request id.
    let ctx2 = RequestContext {
        client: "spiffe://x/other",
        ..ctx
    };
    let theirs = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), now, ctx2)
        .unwrap();
    assert_ne!(theirs.uvci, first.uvci);
    assert_eq!(ledger.counts().unwrap().signed, 2);
}

/// The ledger is read only when issuing fails, so a recorded request must still be answered
/// from the ledger whatever made the new attempt fail: a payload that no longer passes the
/// rules at the time of the retry, or a reservation refused because the first attempt is
/// still recorded without a signature.
#[test]
fn a_retry_is_answered_from_the_ledger_whatever_fails_first() {
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    let now = time::OffsetDateTime::now_utc();
    let payload = vaccination(None);
    let ctx = request("retry-rules");
    let first = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), now, ctx)
        .unwrap();
    // At this time the vaccination date lies in the future: a new request would be refused…
    let earlier = now - time::Duration::days(30);
    let fresh = request("new-at-that-time");
    let refused = iss
        .issue_for(
            CertType::Vaccination,
            Payload::Json(&payload),
            earlier,
            fresh,
        )
        .unwrap_err();
    assert!(refused.is_client_error(), "{refused}");
    // …but the retry of a recorded one is its recorded certificate.
    let again = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), earlier, ctx)
        .unwrap();
    assert_eq!(again.cose, first.cose);

    // A first attempt interrupted after its reservation: the retry is "in progress".
    let stuck = request("retry-stuck");
    ledger.fail_complete.store(true, Ordering::SeqCst);
    let err = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), now, stuck)
        .unwrap_err();
    assert!(matches!(err, IssueError::Ledger(_)), "{err}");
    ledger.fail_complete.store(false, Ordering::SeqCst);
    let err = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), now, stuck)
        .unwrap_err();
    assert!(matches!(err, IssueError::RequestInProgress), "{err}");
    assert_eq!(err.code(), "2-60-5008");
    // With another payload it is a reused request id, in progress or not.
    let other = vaccination(Some("URN:UVCI:01:SE:DEV/STUCKOTHER1"));
    let err = iss
        .issue_for(CertType::Vaccination, Payload::Json(&other), now, stuck)
        .unwrap_err();
    assert!(matches!(err, IssueError::RequestIdReused), "{err}");
    assert_eq!(
        ledger.counts().unwrap(),
        LedgerCounts {
            reserved: 1,
            signed: 1
        }
    );
}

/// A caller that goes away after its reservation is recorded (a cancelled RPC drops the
/// request's future) does not leave the request stuck "in progress": the reservation, the
/// signature and the completion run on without the caller, and the retry replays the recorded
/// certificate.
#[test]
fn a_request_dropped_after_its_reservation_still_completes_and_its_retry_replays() {
    let ledger = flaky();
    let iss = issuer(ledger.clone());
    let now = time::OffsetDateTime::now_utc();
    let payload = vaccination(None);
    let ctx = request("dropped-1");
    let recorded = |c: LedgerCounts| c.reserved + c.signed == 1;
    {
        // Poll the request (never to its end) until its reservation is durable, then drop it.
        let mut fut = std::pin::pin!(iss.issue_for_async(
            CertType::Vaccination,
            Payload::Json(&payload),
            now,
            ctx
        ));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !recorded(ledger.counts().unwrap()) {
            assert!(
                fut.as_mut().poll(&mut cx).is_pending(),
                "issued before it was seen"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no reservation within 20 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let signed_only = LedgerCounts {
        reserved: 0,
        signed: 1,
    };
    while ledger.counts().unwrap() != signed_only {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped request's row stayed {:?}",
            ledger.counts().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let again = iss
        .issue_for(CertType::Vaccination, Payload::Json(&payload), now, ctx)
        .unwrap();
    assert_eq!(
        ledger
            .find_by_uci_hash(&dccsign::revocation::hash::uci_hash(&again.uvci))
            .unwrap()
            .map(|r| r.state),
        Some("signed".to_string())
    );
    assert_eq!(
        ledger.counts().unwrap(),
        signed_only,
        "replayed, not signed again"
    );
}
