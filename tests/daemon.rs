//! The daemon end to end: real process on an ephemeral 127.0.0.1 port, real mutual TLS, real
//! SoftHSM. Every HC1 is verified by our verifier and the independent `dgc` crate.

mod common;

use base64::Engine;
use common::{error_detail, issue_request, pem_der, Daemon, Dev};
use dccsign::api::pb;
use serde_json::json;

fn verify_both(d: &Dev, t: &str, hc1: &str) {
    let out = d.run(&["verify", "--trust", d.dsc_pem(t).to_str().unwrap(), hc1]);
    assert!(out.status.success(), "our verify: {}", common::stderr(&out));
    let mut trust = dgc::TrustList::default();
    trust
        .add_key_from_certificate(
            &base64::engine::general_purpose::STANDARD.encode(pem_der(&d.dsc_pem(t))),
        )
        .unwrap();
    let (_, validity) = dgc::validate(hc1, &trust).unwrap();
    assert!(
        matches!(validity, dgc::SignatureValidity::Valid),
        "dgc rejected {t}"
    );
}

/// A connection refused during the TLS handshake surfaces on the client's first call as a
/// transport error (with TLS 1.3 the server checks the client certificate after the client
/// considers the handshake done).
fn refused_by_tls(e: &tonic::Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    ) && !e.metadata().contains_key("grpc-status-details-bin")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn unary_issue_of_every_type_over_mtls() {
    let d = Daemon::start();
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        for t in ["test", "vaccination", "recovery"] {
            let p = d.dev.example(t);
            let r = c
                .issue(issue_request(t, &p, &format!("unary-{t}")))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.request_id, format!("unary-{t}"));
            assert!(r.uvci.starts_with("URN:UVCI:01:SE:DEV/"));
            assert_eq!(r.kid.len(), 8);
            assert!(r.exp > r.iat);
            assert_eq!(dccsign::cose::hc1::decode(&r.hc1).unwrap(), r.cose);
            verify_both(&d.dev, t, &r.hc1);
        }
        // Without a request id the server makes one.
        let r = c
            .issue(issue_request("test", &d.dev.example("test"), ""))
            .await
            .unwrap()
            .into_inner();
        assert!(r.request_id.starts_with("srv-"), "{}", r.request_id);
        // GetSigningInfo names the DSC that signed.
        let info = c
            .get_signing_info(pb::GetSigningInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.signers.len(), 3);
        let test = info
            .signers
            .iter()
            .find(|s| s.r#type == pb::CertificateType::Test as i32)
            .unwrap();
        assert_eq!(test.kid, r.kid);
        assert_eq!(test.certificate, pem_der(&d.dev.dsc_pem("test")));
    });
}

#[test]
fn stream_with_mixed_items_answers_each() {
    let d = Daemon::start();
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        let mut bad_result = d.dev.example("test");
        bad_result["t"][0]["tr"] = json!("260373001");
        let items = vec![
            issue_request("vaccination", &d.dev.example("vaccination"), "s-1"),
            issue_request("test", &bad_result, "s-2"),
            issue_request("recovery", &d.dev.example("recovery"), "s-3"),
            issue_request("vaccination", &d.dev.example("test"), "s-4"), // type mismatch
            issue_request("test", &d.dev.example("test"), "s-5"),
            pb::IssueRequest {
                request_id: "s-6".into(),
                r#type: 0,
                payload: None,
                want_qr: 0,
            },
        ];
        let resp = c
            .issue_stream(tokio_stream::iter(items))
            .await
            .unwrap()
            .into_inner();
        let mut got = std::collections::HashMap::new();
        let mut resp = resp;
        while let Some(m) = resp.message().await.unwrap() {
            got.insert(m.request_id.clone(), m.result.unwrap());
        }
        assert_eq!(got.len(), 6, "{got:?}");
        for (id, t) in [("s-1", "vaccination"), ("s-3", "recovery"), ("s-5", "test")] {
            match &got[id] {
                pb::issue_stream_response::Result::Ok(r) => verify_both(&d.dev, t, &r.hc1),
                other => panic!("{id}: {other:?}"),
            }
        }
        let err = |id: &str| match &got[id] {
            pb::issue_stream_response::Result::Error(e) => e.clone(),
            other => panic!("{id} should fail: {other:?}"),
        };
        assert_eq!(err("s-2").violations[0].field, "t[0].tr");
        assert_eq!(err("s-2").violations[0].rule, "test-result-not-negative");
        assert_eq!(err("s-4").violations[0].rule, "type-mismatch");
        assert_eq!(err("s-6").code, "2-60-1001-40");
    });
    assert_eq!(d.dev.ledger_counts(), (0, 3));
}

#[test]
fn batches_answer_every_item_in_order_and_refuse_oversized_ones() {
    let d = Daemon::start();
    rt().block_on(async {
        let ch = d.channel("issuer-all").await.unwrap();
        let mut c = pb::bulk_issuance_client::BulkIssuanceClient::new(ch);
        let mut bad_result = d.dev.example("test");
        bad_result["t"][0]["tr"] = json!("260373001");
        let first = pb::IssueBatchRequest {
            batch_id: "b-1".into(),
            items: vec![
                issue_request("vaccination", &d.dev.example("vaccination"), "b1-1"),
                issue_request("test", &bad_result, "b1-2"),
                issue_request("recovery", &d.dev.example("recovery"), "b1-3"),
                pb::IssueRequest {
                    request_id: "b1-4".into(),
                    r#type: 0,
                    payload: None,
                    want_qr: 0,
                },
            ],
        };
        // 257 items: one more than a batch may hold.
        let oversized = pb::IssueBatchRequest {
            batch_id: "b-2".into(),
            items: (0..257)
                .map(|i| issue_request("test", &d.dev.example("test"), &format!("b2-{i}")))
                .collect(),
        };
        let empty = pb::IssueBatchRequest {
            batch_id: "b-3".into(),
            items: vec![],
        };
        let mut resp = c
            .issue_batches(tokio_stream::iter(vec![first, oversized, empty]))
            .await
            .unwrap()
            .into_inner();
        let mut got = std::collections::HashMap::new();
        while let Some(b) = resp.message().await.unwrap() {
            got.insert(b.batch_id.clone(), b.results);
        }
        assert_eq!(got.len(), 3, "one answer per batch: {:?}", got.keys());

        // Results follow the items' order, each with its request id.
        let b1 = &got["b-1"];
        let ids: Vec<_> = b1.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["b1-1", "b1-2", "b1-3", "b1-4"]);
        use pb::issue_stream_response::Result as R;
        for (i, t) in [(0, "vaccination"), (2, "recovery")] {
            match &b1[i].result {
                Some(R::Ok(r)) => verify_both(&d.dev, t, &r.hc1),
                other => panic!("item {i}: {other:?}"),
            }
        }
        match &b1[1].result {
            Some(R::Error(e)) => {
                assert_eq!(e.violations[0].field, "t[0].tr");
                assert_eq!(e.violations[0].rule, "test-result-not-negative");
            }
            other => panic!("b1-2 should fail: {other:?}"),
        }
        match &b1[3].result {
            Some(R::Error(e)) => assert_eq!(e.code, "2-60-1001-40"),
            other => panic!("b1-4 should fail: {other:?}"),
        }

        // The oversized batch: every item refused with the batch rule, nothing signed.
        let b2 = &got["b-2"];
        assert_eq!(b2.len(), 257);
        for (i, r) in b2.iter().enumerate() {
            assert_eq!(r.request_id, format!("b2-{i}"));
            match &r.result {
                Some(R::Error(e)) => {
                    assert_eq!(e.code, "2-60-1001-43");
                    assert_eq!(e.request_id, format!("b2-{i}"));
                    assert_eq!(e.violations[0].field, "items");
                    assert_eq!(e.violations[0].rule, "batch-size");
                }
                other => panic!("b2-{i} should be refused: {other:?}"),
            }
        }
        assert!(got["b-3"].is_empty());
    });
    assert_eq!(d.dev.ledger_counts(), (0, 2));
}

#[test]
fn errors_carry_status_code_field_and_stable_code() {
    let d = Daemon::start();
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        let mut p = d.dev.example("test");
        p["t"][0]["tr"] = json!("260373001");
        p["nam"]["fnt"] = json!("ZZMARKERZZ lower");
        let s = c
            .issue(issue_request("test", &p, "bad-1"))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(!s.message().contains("ZZMARKERZZ"));
        let det = error_detail(&s);
        assert_eq!(det.request_id, "bad-1");
        let fields: Vec<_> = det
            .violations
            .iter()
            .map(|v| (v.field.as_str(), v.code.as_str()))
            .collect();
        assert!(fields.contains(&("t[0].tr", "2-60-1001-21")), "{fields:?}");
        assert!(fields.contains(&("nam.fnt", "2-60-1001-11")), "{fields:?}");
        // The standard rich error model carries the same violations.
        use tonic_types::StatusExt;
        let bad = s.get_details_bad_request().expect("google.rpc.BadRequest");
        assert_eq!(bad.field_violations.len(), det.violations.len());

        // A reused UVCI is ALREADY_EXISTS.
        let mut v = d.dev.example("vaccination");
        v["v"][0]["ci"] = json!("URN:UVCI:01:SE:DEV/REUSED00001");
        c.issue(issue_request("vaccination", &v, "u-1"))
            .await
            .unwrap();
        let s = c
            .issue(issue_request("vaccination", &v, "u-2"))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        assert_eq!(error_detail(&s).code, "2-60-1001-91");

        // issuer-test's namespace is DEVTEST (its uvci_prefix): a UVCI in issuer-all's (DEV)
        // is refused at the field, and nothing is recorded.
        let mut t = dccsign::api::client::issuance(d.channel("issuer-test").await.unwrap());
        let mut p = d.dev.example("test");
        p["t"][0]["ci"] = json!("URN:UVCI:01:SE:DEV/NOTYOURS0001");
        let s = t
            .issue(issue_request("test", &p, "ns-1"))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let det = error_detail(&s);
        assert_eq!(det.code, "2-60-1001-29");
        assert_eq!(det.violations[0].field, "t[0].ci");
        assert_eq!(det.violations[0].rule, "uvci-namespace");
        assert!(
            det.violations[0]
                .message
                .contains("URN:UVCI:01:SE:DEVTEST/"),
            "{det:?}"
        );
        p["t"][0]["ci"] = json!("URN:UVCI:01:SE:DEVTEST/MINE0001");
        let ok = t
            .issue(issue_request("test", &p, "ns-2"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.uvci, "URN:UVCI:01:SE:DEVTEST/MINE0001");
    });
    assert_eq!(d.dev.ledger_counts(), (0, 2));
}

#[test]
fn mtls_and_authorization_refusals() {
    let d = Daemon::start();
    // An expired certificate from the right CA, and a valid one for an unknown identity.
    let past = (time::OffsetDateTime::now_utc() - time::Duration::days(3))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let dir = d.dev.path().to_str().unwrap();
    assert!(d
        .dev
        .run(&[
            "dev-client-cert",
            "--state-dir",
            dir,
            "--name",
            "expired",
            "--not-before",
            &past,
            "--hours",
            "1"
        ])
        .status
        .success());
    assert!(d
        .dev
        .run(&["dev-client-cert", "--state-dir", dir, "--name", "stranger"])
        .status
        .success());
    let other = Dev::new(); // another CA
    rt().block_on(async {
        let p = d.dev.example("vaccination");
        let req = || issue_request("vaccination", &p, "");
        // Expired certificate: the handshake fails, no RPC gets through.
        let expired = d.channel("expired").await;
        if let Ok(ch) = expired {
            let e = dccsign::api::client::issuance(ch)
                .issue(req())
                .await
                .unwrap_err();
            assert!(refused_by_tls(&e), "{e}");
        }
        // A certificate from another CA.
        let foreign = dccsign::api::client::connect(
            &d.addr,
            &other.file("pki/clients/issuer-all.pem"),
            &other.file("pki/clients/issuer-all.key"),
            &d.dev.file("pki/tls/ca.pem"),
            "localhost",
        )
        .await;
        if let Ok(ch) = foreign {
            let e = dccsign::api::client::issuance(ch)
                .issue(req())
                .await
                .unwrap_err();
            assert!(refused_by_tls(&e), "{e}");
        }
        // No client certificate at all.
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(d.dev.file("pki/tls/ca.pem")).unwrap(),
            ))
            .domain_name("localhost");
        let anon = tonic::transport::Endpoint::from_shared(format!("https://{}", d.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await;
        if let Ok(ch) = anon {
            let e = dccsign::api::client::issuance(ch)
                .issue(req())
                .await
                .unwrap_err();
            assert!(refused_by_tls(&e), "{e}");
        }
        // Verified, but not configured.
        let e = dccsign::api::client::issuance(d.channel("stranger").await.unwrap())
            .issue(req())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(error_detail(&e).code, "2-60-9001");
        // issuer-test may issue test certificates only.
        let mut c = dccsign::api::client::issuance(d.channel("issuer-test").await.unwrap());
        let e = c.issue(req()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(error_detail(&e).code, "2-60-9001");
        let ok = c
            .issue(issue_request("test", &d.dev.example("test"), ""))
            .await
            .unwrap()
            .into_inner();
        assert!(
            ok.uvci.starts_with("URN:UVCI:01:SE:DEVTEST/"),
            "{}",
            ok.uvci
        );
        // An issuer may not call the officers' Keys service; an officer may.
        let mut keys =
            dccsign::api::pb::keys_client::KeysClient::new(d.channel("issuer-all").await.unwrap());
        let e = keys.list_keys(pb::ListKeysRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(error_detail(&e).code, "2-60-9001");
        let mut keys =
            dccsign::api::pb::keys_client::KeysClient::new(d.channel("officer-1").await.unwrap());
        let listed = keys
            .list_keys(pb::ListKeysRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.keys.len(), 3);
        assert!(listed
            .keys
            .iter()
            .all(|k| k.uri.starts_with("pkcs11:token=dccsign-dev;") && k.state == "active"));
        // An officer may not call the Issuance service.
        let e = dccsign::api::client::issuance(d.channel("officer-1").await.unwrap())
            .issue(req())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    });
    let log = d.log();
    assert!(log.matches("TLS handshake refused").count() >= 3, "{log}");
    assert!(log.contains("expired"), "{log}");
    // Each authorization refusal is a warning naming the caller, the method and the code.
    let warned = |client: &str, method: &str| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains("call refused")
                && l.contains(&format!("spiffe://dccsign.dev/{client}"))
                && l.contains(method)
                && l.contains("2-60-9001")
        })
    };
    assert!(warned("stranger", "/dccsign.v1.Issuance/Issue"), "{log}");
    assert!(warned("issuer-test", "/dccsign.v1.Issuance/Issue"), "{log}");
    assert!(warned("issuer-all", "/dccsign.v1.Keys/ListKeys"), "{log}");
    assert!(warned("officer-1", "/dccsign.v1.Issuance/Issue"), "{log}");
    // Only the issuer-test certificate was signed.
    assert_eq!(d.dev.ledger_counts(), (0, 1));
}

/// An auditor reads key states, pending operations, the trust list, the revocation store's
/// status and verifier lists, and changes nothing: every other method refuses it.
#[test]
fn an_auditor_reads_and_changes_nothing() {
    let dev = Dev::new();
    let dir = dev.path().to_str().unwrap().to_string();
    let out = dev.run(&[
        "dev-client-cert",
        "--state-dir",
        &dir,
        "--name",
        "auditor-1",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let d = Daemon::start_with(dev, |cfg| {
        cfg.push_str(
            "\n[[client]]\nidentity = \"spiffe://dccsign.dev/auditor-1\"\nrole = \"auditor\"\n",
        );
    });
    rt().block_on(async {
        let ch = d.channel("auditor-1").await.unwrap();
        let mut keys = pb::keys_client::KeysClient::new(ch.clone());
        let listed = keys.list_keys(pb::ListKeysRequest {}).await.unwrap();
        assert_eq!(listed.into_inner().keys.len(), 3);
        keys.list_pending(pb::ListPendingRequest {}).await.unwrap();
        let trust = keys.trust_list(pb::TrustListRequest {}).await.unwrap();
        assert!(trust.into_inner().json.contains("certificate"));
        let mut rev = pb::revocation_client::RevocationClient::new(ch.clone());
        rev.status(pb::StatusRequest {}).await.unwrap();
        let kid = listed_kid(&d).await;
        rev.get_list(pb::GetListRequest { kid, since: None })
            .await
            .unwrap();

        let denied = |e: tonic::Status| {
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
            assert_eq!(error_detail(&e).code, "2-60-9001");
        };
        denied(
            keys.generate_key(pb::GenerateKeyRequest {
                label: "audited".into(),
                types: vec![pb::CertificateType::Test as i32],
                ..Default::default()
            })
            .await
            .unwrap_err(),
        );
        denied(
            keys.approve(pb::ApproveRequest {
                operation_id: "OP-1".into(),
            })
            .await
            .unwrap_err(),
        );
        denied(
            rev.revoke(pb::RevokeRequest {
                uvci: "URN:UVCI:01:SE:DEV/X".into(),
                reason: "fraud".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        );
        denied(
            rev.lift(pb::LiftRequest {
                uvci: "URN:UVCI:01:SE:DEV/X".into(),
            })
            .await
            .unwrap_err(),
        );
        denied(
            dccsign::api::client::issuance(ch)
                .issue(issue_request("test", &d.dev.example("test"), "audit-1"))
                .await
                .unwrap_err(),
        );
        // An issuer still may not read the revocation store's status.
        let mut issuer =
            pb::revocation_client::RevocationClient::new(d.channel("issuer-all").await.unwrap());
        denied(issuer.status(pb::StatusRequest {}).await.unwrap_err());
    });
    assert_eq!(d.dev.ledger_counts(), (0, 0));
}

/// The kid of one configured DSC, as an officer lists it.
async fn listed_kid(d: &Daemon) -> Vec<u8> {
    let mut keys = pb::keys_client::KeysClient::new(d.channel("officer-1").await.unwrap());
    let listed = keys.list_keys(pb::ListKeysRequest {}).await.unwrap();
    listed.into_inner().keys[0].kid.clone()
}

#[test]
fn health_reports_serving_after_the_canary() {
    let d = Daemon::start();
    rt().block_on(async {
        use tonic_health::pb::health_check_response::ServingStatus;
        let ch = d.channel("issuer-all").await.unwrap();
        let up = wait_for_health(&ch, ServingStatus::Serving).await;
        assert!(up, "never SERVING:\n{}", d.log());
        // The bulk service follows the same canary.
        let bulk = health_status(&ch, "dccsign.v1.BulkIssuance").await;
        assert_eq!(bulk, ServingStatus::Serving as i32);
    });
}

#[test]
fn overload_is_refused_and_the_daemon_stays_healthy() {
    let dev = Dev::new();
    let d = Daemon::start_with(dev, |cfg| {
        *cfg = cfg.replace(
            "max_in_flight_per_client = 256",
            "max_in_flight_per_client = 2",
        );
    });
    rt().block_on(async {
        let ch = d.channel("issuer-all").await.unwrap();
        let p = d.dev.example("vaccination");
        let mut tasks = Vec::new();
        for i in 0..40 {
            let mut c = dccsign::api::client::issuance(ch.clone());
            let req = issue_request("vaccination", &p, &format!("o-{i}"));
            tasks.push(tokio::spawn(async move { c.issue(req).await }));
        }
        let (mut ok, mut exhausted) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(s) if s.code() == tonic::Code::ResourceExhausted => exhausted += 1,
                Err(s) => panic!("unexpected {s}"),
            }
        }
        assert!(exhausted > 0, "no request was refused ({ok} ok)");
        assert!(ok > 0);
        // Still serving.
        let mut c = dccsign::api::client::issuance(ch);
        c.issue(issue_request("vaccination", &p, "after"))
            .await
            .unwrap();
    });
}

/// A unary call the client gives up on keeps its place in the client's in-flight limit for as
/// long as the signing it started runs: cancelling calls cannot push more work in than the limit.
#[test]
fn a_cancelled_call_keeps_its_place_until_its_work_ends() {
    let d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace(
            "max_in_flight_per_client = 256",
            "max_in_flight_per_client = 1",
        );
    });
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        let p = d.dev.example("test");
        // Another writer holds the ledger: the first call's reservation waits for it.
        let other = rusqlite::Connection::open(d.dev.file("ledger.sqlite")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut first = tonic::Request::new(issue_request("test", &p, "cancel-1"));
        first.set_timeout(std::time::Duration::from_millis(300));
        let e = c.issue(first).await.unwrap_err();
        common::assert_abandoned(&e);
        // Its work still runs: the next call is refused, not admitted beside it.
        let e = c
            .issue(issue_request("test", &d.dev.example("test"), "cancel-2"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert_eq!(error_detail(&e).code, "2-60-5005");
        // The ledger free again: the first call's work ends, and its retry is answered.
        other.execute_batch("ROLLBACK").unwrap();
        let retry = loop {
            match c.issue(issue_request("test", &p, "cancel-1")).await {
                Err(e)
                    if matches!(
                        e.code(),
                        tonic::Code::ResourceExhausted | tonic::Code::Aborted
                    ) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                other => break other,
            }
        };
        assert_eq!(retry.unwrap().into_inner().request_id, "cancel-1");
    });
}

/// At `max_connections` open connections the daemon accepts no more until one closes: the
/// next client waits (here: its connect times out), and gets in once a place is free.
#[test]
fn connections_beyond_the_limit_wait_until_one_closes() {
    let d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace("[server]\n", "[server]\nmax_connections = 2\n");
    });
    rt().block_on(async {
        let wait = std::time::Duration::from_secs(2);
        let a = d.channel("issuer-all").await.unwrap();
        let b = d.channel("issuer-test").await.unwrap();
        for ch in [&a, &b] {
            dccsign::api::client::issuance(ch.clone())
                .get_signing_info(pb::GetSigningInfoRequest {})
                .await
                .unwrap();
        }
        let third = tokio::time::timeout(wait, d.channel("officer-1")).await;
        assert!(
            !matches!(third, Ok(Ok(_))),
            "a third connection was served beside two"
        );
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(10), d.channel("officer-1"))
            .await
            .expect("no place freed")
            .unwrap();
        pb::keys_client::KeysClient::new(c)
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap();
    });
    assert!(d.log().contains("at the limit"), "{}", d.log());
}

/// One client identity cannot take every connection: beyond `max_connections_per_client`
/// its new connections are closed after the handshake, while other clients still connect, and
/// a place frees when one of its connections closes.
#[test]
fn one_client_cannot_take_every_connection() {
    let d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace("[server]\n", "[server]\nmax_connections_per_client = 2\n");
    });
    let rt = rt();
    let served = |ch: Result<tonic::transport::Channel, String>| async move {
        match ch {
            Ok(ch) => dccsign::api::client::issuance(ch)
                .get_signing_info(pb::GetSigningInfoRequest {})
                .await
                .is_ok(),
            Err(_) => false,
        }
    };
    rt.block_on(async {
        let a = d.channel("issuer-test").await.unwrap();
        let b = d.channel("issuer-test").await.unwrap();
        for ch in [&a, &b] {
            assert!(served(Ok(ch.clone())).await, "{}", d.log());
        }
        assert!(
            !served(d.channel("issuer-test").await).await,
            "a third connection of one client was served"
        );
        assert!(served(d.channel("issuer-all").await).await, "{}", d.log());
        drop(a);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !served(d.channel("issuer-test").await).await {
            assert!(
                std::time::Instant::now() < deadline,
                "no place freed:\n{}",
                d.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        drop(b);
    });
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("max_connections_per_client")
                && l.contains("dccsign.dev/issuer-test")),
        "{log}"
    );
}

/// Key-lifecycle calls count against the caller's limits like issuance and revocation calls,
/// and one the client abandons keeps its place until its work ends.
#[test]
fn a_keys_call_keeps_its_place_until_its_work_ends() {
    let d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace(
            "max_in_flight_per_client = 256",
            "max_in_flight_per_client = 1",
        );
    });
    rt().block_on(async {
        let mut k = pb::keys_client::KeysClient::new(d.channel("officer-1").await.unwrap());
        // Another writer holds the control database: the request waits for it.
        let other = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut req = tonic::Request::new(pb::GenerateKeyRequest {
            label: "dsc-held".into(),
            types: vec![pb::CertificateType::Test as i32],
            ..Default::default()
        });
        req.set_timeout(std::time::Duration::from_millis(300));
        common::assert_abandoned(&k.generate_key(req).await.unwrap_err());
        let e = k
            .list_pending(pb::ListPendingRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        other.execute_batch("ROLLBACK").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let pending = loop {
            match k.list_pending(pb::ListPendingRequest::default()).await {
                Err(e)
                    if e.code() == tonic::Code::ResourceExhausted
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                other => break other.unwrap().into_inner().operations,
            }
        };
        // The abandoned request ran to its end: it is pending, waiting for a second officer.
        assert_eq!(pending.len(), 1, "{pending:?}");
    });
}

#[test]
fn graceful_shutdown_keeps_every_acknowledged_certificate() {
    let mut d = Daemon::start();
    let acknowledged = rt().block_on(async {
        let ch = d.channel("issuer-all").await.unwrap();
        let p = d.dev.example("vaccination");
        let mut tasks = Vec::new();
        for w in 0..8 {
            let mut c = dccsign::api::client::issuance(ch.clone());
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let mut uvcis = Vec::new();
                for i in 0..200 {
                    match c
                        .issue(issue_request("vaccination", &p, &format!("g-{w}-{i}")))
                        .await
                    {
                        Ok(r) => uvcis.push(r.into_inner().uvci),
                        Err(_) => break,
                    }
                }
                uvcis
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let pid = d.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit {status:?}\n{}", d.log());
    // The daemon stopped its background tasks and closed the issuer in order: the HSM workers
    // and the ledger writer were joined before the process exited.
    assert!(
        d.log().contains("shutdown: signing pool and ledger closed"),
        "{}",
        d.log()
    );
    assert!(!acknowledged.is_empty());
    use dccsign::ledger::Ledger;
    let ledger = dccsign::ledger::SqliteLedger::open(&d.dev.file("ledger.sqlite")).unwrap();
    for u in &acknowledged {
        let rec = ledger
            .find_by_uci_hash(&dccsign::revocation::hash::uci_hash(u))
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged {u} has no ledger row"));
        assert_eq!(rec.state, "signed");
    }
    assert!(d.log().contains("shutdown"), "{}", d.log());
}

#[test]
fn no_personal_data_in_daemon_logs_or_ledger() {
    let d = Daemon::start();
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        let mut p = d.dev.example("test");
        common::marker_person(&mut p);
        c.issue(issue_request("test", &p, "pd-1")).await.unwrap();
        let mut bad = p.clone();
        bad["nam"]["fnt"] = json!("ZZMARKERZZ lower");
        bad["t"][0]["tc"] = json!("ZZMARKERZZ");
        let _ = c
            .issue(issue_request("test", &bad, "pd-2"))
            .await
            .unwrap_err();
    });
    let log = d.log();
    assert!(log.contains("pd-1"), "request ids are logged:\n{log}");
    d.dev.assert_no_personal_data(&log);
}

#[test]
fn startup_refusals_are_one_line_reasons() {
    // A world-readable PIN file.
    let dev = Dev::new();
    dev.pin_world_readable();
    let err = dev.refused_start();
    assert!(err.contains("chmod 600"), "{err}");

    // A DSC whose key is not in the token.
    let dev = Dev::new();
    let cfg = std::fs::read_to_string(dev.file("dccsign.toml"))
        .unwrap()
        .replace("object=dsc-recovery;", "object=dsc-missing;");
    std::fs::write(dev.file("dccsign.toml"), cfg).unwrap();
    let err = dev.refused_start();
    assert!(
        err.contains("no private key labelled \"dsc-missing\""),
        "{err}"
    );
}

/// Client certificates on their CA's CRL are refused at the handshake, without a restart:
/// `dev-init` writes an empty CRL that the configuration names, `dev-client-cert --revoke`
/// re-issues it, and the daemon reads it again when the file changes; a connection the client
/// opened before is closed as well. A CRL that goes bad
/// later leaves the one in force; start-up refuses a CRL of another CA, or one past its
/// `nextUpdate`.
#[test]
fn a_revoked_client_certificate_is_refused_without_a_restart() {
    let d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace(
            "client_crls = [",
            "client_crl_check_seconds = 1\nclient_crls = [",
        );
    });
    let dir = d.dev.path().to_str().unwrap().to_string();
    let works = |name: &str| -> bool {
        rt().block_on(async {
            match d.channel(name).await {
                Ok(ch) => dccsign::api::client::issuance(ch)
                    .get_signing_info(pb::GetSigningInfoRequest {})
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
    };
    assert!(works("issuer-test"), "{}", d.log());
    // A connection opened before the revocation, kept open across it (on a runtime of its own
    // that lives as long).
    let kept_rt = rt();
    let kept = kept_rt.block_on(async {
        let ch = d.channel("issuer-test").await.unwrap();
        let mut c = dccsign::api::client::issuance(ch);
        c.get_signing_info(pb::GetSigningInfoRequest {})
            .await
            .unwrap();
        c
    });
    let out = d.dev.run(&[
        "dev-client-cert",
        "--state-dir",
        &dir,
        "--name",
        "issuer-test",
        "--revoke",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let crl = d.dev.file("pki/tls/clients-crl.pem");
    // OpenSSL reads the CRL we made, signed by the CA key in the token, and finds the serial.
    let openssl = |args: &[&str]| common::openssl(d.dev.path(), args);
    let ca = d.dev.file("pki/tls/ca.pem");
    let text = openssl(&[
        "crl",
        "-in",
        crl.to_str().unwrap(),
        "-CAfile",
        ca.to_str().unwrap(),
        "-noout",
        "-text",
    ]);
    let serial = openssl(&[
        "x509",
        "-in",
        d.dev.file("pki/clients/issuer-test.pem").to_str().unwrap(),
        "-noout",
        "-serial",
    ]);
    let serial = serial.trim().trim_start_matches("serial=");
    assert!(text.contains(serial), "{serial} not in\n{text}");
    assert!(text.contains("X509v3 CRL Number"), "{text}");

    // Within a few checks, new connections of issuer-test fail; issuer-all's do not.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while works("issuer-test") {
        assert!(
            std::time::Instant::now() < deadline,
            "still admitted:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(works("issuer-all"), "{}", d.log());
    // The connection opened before is closed too: its calls fail (the channel's reconnection
    // is refused at the handshake) instead of going on over the old connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while kept_rt
        .block_on(kept.clone().get_signing_info(pb::GetSigningInfoRequest {}))
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection opened before the revocation still serves:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = d.log();
    assert!(
        log.lines().any(|l| l
            .contains("closing a connection: its client certificate no longer passes")
            && l.contains("dccsign.dev/issuer-test")),
        "{log}"
    );
    // Its reconnection tried to resume the TLS session, which would skip the certificate
    // check of a full handshake; the daemon checked the resumed session's certificate.
    assert!(log.contains("TLS session resumption refused"), "{log}");
    assert!(log.contains("client CRLs read again"), "{log}");
    assert!(log.contains("Revoked"), "{log}");
    assert!(!log.contains("within 24 h"), "{log}");
    // A CRL that reaches its nextUpdate within a day is reported (once), still in force.
    let out = d.dev.run(&[
        "dev-client-cert",
        "--state-dir",
        &dir,
        "--name",
        "issuer-test",
        "--revoke",
        "--hours",
        "2",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !d.log().contains("reaches its nextUpdate within 24 h") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(!works("issuer-test"));

    // A file that no longer parses: reported, and the CRL in force stays.
    std::fs::write(&crl, "not a CRL").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !d.log().contains("client CRLs not reloaded") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(!works("issuer-test"));
    assert!(works("issuer-all"));

    // Start-up: a CRL of another CA, and one past its nextUpdate, each in one line.
    let dev = Dev::new();
    std::fs::copy(
        Dev::new().file("pki/tls/clients-crl.pem"),
        dev.file("pki/tls/clients-crl.pem"),
    )
    .unwrap();
    let err = dev.refused_start();
    assert!(err.contains("not signed by a CA in client_ca"), "{err}");
    assert!(err.contains("clients-crl.pem"), "{err}");
    let dev = Dev::new();
    let out = dev.run(&[
        "dev-client-cert",
        "--state-dir",
        dev.path().to_str().unwrap(),
        "--name",
        "issuer-test",
        "--revoke",
        "--hours",
        "0",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let err = dev.refused_start();
    assert!(err.contains("past its nextUpdate"), "{err}");
}

/// The production path for the server's TLS key: `tls-csr --generate` makes a key in the token
/// and a certificate request signed there; another CA (OpenSSL here, standing in for the
/// organisation's) certifies it; the daemon serves with that certificate and the key in the
/// token, and a client trusting only that CA connects. Both steps are in the audit log.
#[test]
fn a_tls_key_made_in_the_token_is_certified_by_another_ca_and_served() {
    let dev = Dev::new();
    let dir = dev.path().to_str().unwrap().to_string();
    let csr = dev.file("prod.csr");
    let out = dev.run(&[
        "tls-csr",
        "--state-dir",
        &dir,
        "--key",
        "tls-prod",
        "--generate",
        "--subject",
        "CN=localhost,O=Example Agency,C=SE",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--out",
        csr.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    // A second --generate for the label is refused; a request for a missing key too.
    let again = dev.run(&[
        "tls-csr",
        "--state-dir",
        &dir,
        "--key",
        "tls-prod",
        "--generate",
        "--subject",
        "CN=x",
        "--dns",
        "x",
    ]);
    assert!(!again.status.success());
    assert!(common::stderr(&again).contains("exists already"));
    let missing = dev.run(&[
        "tls-csr",
        "--state-dir",
        &dir,
        "--key",
        "tls-none",
        "--subject",
        "CN=x",
        "--dns",
        "x",
    ]);
    assert!(common::stderr(&missing).contains("add --generate"));

    let openssl = |args: &[&str]| common::openssl(dev.path(), args);
    let text = openssl(&["req", "-in", "prod.csr", "-verify", "-noout", "-text"]);
    assert!(
        text.contains("DNS:localhost, IP Address:127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    // The organisation's CA (a software key: a stand-in) certifies the request.
    common::openssl_ca(dev.path(), "org-ca", "Org TLS CA");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "prod.csr",
        "-CA",
        "org-ca.pem",
        "-CAkey",
        "org-ca.key",
        "-CAcreateserial",
        "-copy_extensions",
        "copy",
        "-days",
        "1",
        "-out",
        "prod.pem",
    ]);
    let d = Daemon::start_with(dev, |cfg| {
        *cfg = cfg
            .replace(
                "certificate = \"pki/tls/server.pem\"",
                "certificate = \"prod.pem\"",
            )
            .replace("object=tls-server;", "object=tls-prod;");
    });
    rt().block_on(async {
        let ch = dccsign::api::client::connect(
            &d.addr,
            &d.dev.file("pki/clients/issuer-all.pem"),
            &d.dev.file("pki/clients/issuer-all.key"),
            &d.dev.file("org-ca.pem"),
            "localhost",
        )
        .await
        .unwrap();
        dccsign::api::client::issuance(ch)
            .get_signing_info(pb::GetSigningInfoRequest {})
            .await
            .unwrap();
    });
    let control = rusqlite::Connection::open(d.dev.file("control.sqlite")).unwrap();
    let ops: Vec<String> = control
        .prepare("SELECT operation FROM audit WHERE operation LIKE 'tls.%' ORDER BY rowid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ops, ["tls.generate", "tls.csr"]);
}

/// A client certificate must say it is for client authentication: one from a trusted CA with
/// the right identity but no extended key usage extension is refused at the handshake (webpki
/// alone accepts it), and the same certificate with `clientAuth` is served.
#[test]
fn a_client_certificate_without_client_auth_is_refused() {
    let dev = Dev::new();
    let openssl = |args: &[&str]| common::openssl(dev.path(), args);
    // Another CA the daemon trusts for clients (a software key: a stand-in).
    common::openssl_ca(dev.path(), "org-ca", "Org client CA");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=issuer-test",
    ]);
    let san = "subjectAltName=URI:spiffe://dccsign.dev/issuer-test\n";
    std::fs::write(dev.file("plain.ext"), san).unwrap();
    std::fs::write(
        dev.file("client-auth.ext"),
        format!("{san}extendedKeyUsage=clientAuth\n"),
    )
    .unwrap();
    for (ext, out) in [
        ("plain.ext", "plain.pem"),
        ("client-auth.ext", "client-auth.pem"),
    ] {
        openssl(&[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "org-ca.pem",
            "-CAkey",
            "org-ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            ext,
            "-out",
            out,
        ]);
    }
    let bundle = [
        std::fs::read_to_string(dev.file("pki/tls/ca.pem")).unwrap(),
        std::fs::read_to_string(dev.file("org-ca.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(dev.file("client-cas.pem"), bundle).unwrap();
    // No CRLs here: the development CRL covers only the development CA (fail closed).
    let d = Daemon::start_with(dev, |cfg| {
        let crls = cfg
            .lines()
            .find(|l| l.starts_with("client_crls"))
            .unwrap()
            .to_string();
        *cfg = cfg.replace(&crls, "").replace(
            "client_ca = \"pki/tls/ca.pem\"",
            "client_ca = \"client-cas.pem\"",
        );
    });
    let served = |cert: &str| {
        rt().block_on(async {
            let ch = dccsign::api::client::connect(
                &d.addr,
                &d.dev.file(cert),
                &d.dev.file("client.key"),
                &d.dev.file("pki/tls/ca.pem"),
                "localhost",
            )
            .await;
            match ch {
                Ok(ch) => dccsign::api::client::issuance(ch)
                    .get_signing_info(pb::GetSigningInfoRequest {})
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
    };
    assert!(served("client-auth.pem"), "{}", d.log());
    assert!(
        !served("plain.pem"),
        "a certificate without clientAuth was served"
    );
    assert!(d.log().contains("InvalidPurpose"), "{}", d.log());
}

/// `dev-init` generates the server's TLS key in the token and writes no key file: the daemon
/// signs its handshakes with the token, cannot start without that key, and refuses a key that
/// does not belong to its certificate. A PEM key file still works where a configuration names
/// one.
#[test]
fn the_server_tls_key_is_in_the_token() {
    let uri = "pkcs11:token=dccsign-dev;object=tls-server;type=private";
    let dev = Dev::new();
    assert!(!dev.file("pki/tls/server.key").exists());
    let cfg = std::fs::read_to_string(dev.file("dccsign.toml")).unwrap();
    assert!(cfg.contains(&format!("key = \"{uri}\"")), "{cfg}");
    for entry in walk(dev.path()) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        if text.contains("PRIVATE KEY") {
            assert!(
                entry.starts_with(dev.file("pki/clients")),
                "a private key file outside pki/clients: {}",
                entry.display()
            );
        }
    }

    // The handshake is signed with the token key: a daemon up on it issues over mutual TLS.
    let mut d = Daemon::start_with(dev, |_| {});
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        c.issue(issue_request("test", &d.dev.example("test"), "tls-1"))
            .await
            .unwrap();
    });
    assert!(d.terminate().success(), "{}", d.log());
    let dev = &d.dev;

    // Another key of the token: refused, naming the certificate and the key.
    let edit = |dev: &Dev, from: &str, to: &str| {
        let cfg = std::fs::read_to_string(dev.file("dccsign.toml")).unwrap();
        std::fs::write(dev.file("dccsign.toml"), cfg.replace(from, to)).unwrap();
    };
    edit(dev, "object=tls-server;", "object=dev-tls-ca;");
    let err = dev.refused_start();
    assert!(
        err.contains(
            "server.pem does not belong to key pkcs11:token=dccsign-dev;object=dev-tls-ca"
        ),
        "{err}"
    );
    // No such key: refused.
    edit(dev, "object=dev-tls-ca;", "object=tls-missing;");
    let err = dev.refused_start();
    assert!(
        err.contains("no private key labelled \"tls-missing\""),
        "{err}"
    );

    // A PEM key file, as configurations from before name one.
    let (cert, key) = dev.stand_in_cert();
    edit(
        dev,
        &uri.replace("tls-server", "tls-missing"),
        "pki/tls/gateway.key",
    );
    edit(dev, "pki/tls/server.pem", "pki/tls/gateway.pem");
    assert!(cert.exists() && key.exists());
    d.restart();
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        c.issue(issue_request("test", &d.dev.example("test"), "tls-2"))
            .await
            .unwrap();
    });
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn idempotent_request_ids_survive_a_restart() {
    let mut d = Daemon::start();
    let p = d.dev.example("vaccination");
    let first = rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        let a = c
            .issue(issue_request("vaccination", &p, "idem-1"))
            .await
            .unwrap()
            .into_inner();
        let b = c
            .issue(issue_request("vaccination", &p, "idem-1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(a, b, "same id, same payload: the stored response");
        let mut other = p.clone();
        other["v"][0]["dn"] = json!(1);
        let e = c
            .issue(issue_request("vaccination", &other, "idem-1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        assert_eq!(error_detail(&e).code, "2-60-1001-92");
        a
    });
    assert_eq!(d.dev.ledger_counts(), (0, 1));
    d.restart();
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        let again = c
            .issue(issue_request("vaccination", &p, "idem-1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again, first, "after a restart, still the same bytes");
        // Another client's identical request id is its own.
        let mut t = dccsign::api::client::issuance(d.channel("issuer-test").await.unwrap());
        t.issue(issue_request("test", &d.dev.example("test"), "idem-1"))
            .await
            .unwrap();
    });
    assert_eq!(d.dev.ledger_counts(), (0, 2));
}

async fn health_status(ch: &tonic::transport::Channel, service: &str) -> i32 {
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    h.check(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    })
    .await
    .map(|r| r.into_inner().status)
    .unwrap_or(-1)
}

async fn wait_for_health(
    ch: &tonic::transport::Channel,
    want: tonic_health::pb::health_check_response::ServingStatus,
) -> bool {
    for _ in 0..150 {
        if health_status(ch, "dccsign.v1.Issuance").await == want as i32 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

#[test]
fn health_follows_the_ledger_and_the_token() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace("health_interval_seconds = 5", "health_interval_seconds = 1");
    });
    rt().block_on(async {
        let ch = d.channel("issuer-all").await.unwrap();
        assert!(
            wait_for_health(&ch, ServingStatus::Serving).await,
            "{}",
            d.log()
        );

        // Another writer holds the ledger's write lock: NOT_SERVING; released: SERVING again.
        let other = rusqlite::Connection::open(d.dev.file("ledger.sqlite")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(
            wait_for_health(&ch, ServingStatus::NotServing).await,
            "{}",
            d.log()
        );
        other.execute_batch("ROLLBACK").unwrap();
        assert!(
            wait_for_health(&ch, ServingStatus::Serving).await,
            "{}",
            d.log()
        );
        let mut c = dccsign::api::client::issuance(ch.clone());
        c.issue(issue_request(
            "test",
            &d.dev.example("test"),
            "after-ledger",
        ))
        .await
        .unwrap();

        // The token disappears: NOT_SERVING, and issuing answers UNAVAILABLE.
        std::fs::rename(d.dev.file("tokens"), d.dev.file("tokens.away")).unwrap();
        assert!(
            wait_for_health(&ch, ServingStatus::NotServing).await,
            "{}",
            d.log()
        );
        let e = c
            .issue(issue_request(
                "test",
                &d.dev.example("test"),
                "during-outage",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert_eq!(error_detail(&e).code, "2-60-5003");
        std::fs::rename(d.dev.file("tokens.away"), d.dev.file("tokens")).unwrap();
        // The token is back: SERVING again by itself, and issuing works.
        assert!(
            wait_for_health(&ch, ServingStatus::Serving).await,
            "{}",
            d.log()
        );
        c.issue(issue_request("test", &d.dev.example("test"), "after-token"))
            .await
            .unwrap();
        // A new connection: its handshake is signed by the server key in the reconnected token.
        let mut fresh = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        fresh
            .issue(issue_request("test", &d.dev.example("test"), "new-conn"))
            .await
            .unwrap();
    });
    // Nothing was recorded for the refused request.
    assert_eq!(d.dev.ledger_counts(), (0, 3));
    let log = d.log();
    assert!(log.contains("NOT_SERVING"), "{log}");
    let _ = d.terminate();
}

/// After an HSM outage the daemon logs in again with the PIN from its source. A PIN the token
/// refuses is not offered again at every health check (a real HSM locks its user PIN after a
/// few failures): only once the PIN source changes is it tried, once.
#[test]
fn a_refused_pin_is_not_offered_again() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace("health_interval_seconds = 5", "health_interval_seconds = 1");
    });
    let pin_file = d.dev.file("secrets/user.pin");
    let right = std::fs::read_to_string(&pin_file).unwrap();
    let refusals = |d: &Daemon| d.log().matches("the token refused the user PIN").count();
    rt().block_on(async {
        let ch = d.channel("issuer-all").await.unwrap();
        assert!(
            wait_for_health(&ch, ServingStatus::Serving).await,
            "{}",
            d.log()
        );
        // A wrong PIN in the source, and an outage that makes the daemon log in again.
        std::fs::write(&pin_file, "not-the-pin").unwrap();
        std::fs::rename(d.dev.file("tokens"), d.dev.file("tokens.away")).unwrap();
        assert!(
            wait_for_health(&ch, ServingStatus::NotServing).await,
            "{}",
            d.log()
        );
        std::fs::rename(d.dev.file("tokens.away"), d.dev.file("tokens")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while refusals(&d) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(refusals(&d), 1, "{}", d.log());
        // Four more health checks: still NOT_SERVING, and the PIN was not offered again.
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        assert_eq!(refusals(&d), 1, "{}", d.log());
        let mut c = dccsign::api::client::issuance(ch.clone());
        let e = c
            .issue(issue_request("test", &d.dev.example("test"), "wrong-pin"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        // The right PIN back in the source: tried, and the daemon serves again by itself.
        std::fs::write(&pin_file, &right).unwrap();
        assert!(
            wait_for_health(&ch, ServingStatus::Serving).await,
            "{}",
            d.log()
        );
        c.issue(issue_request("test", &d.dev.example("test"), "right-pin"))
            .await
            .unwrap();
    });
    assert_eq!(refusals(&d), 1, "{}", d.log());
}

#[test]
fn the_client_deadline_is_honoured() {
    let d = Daemon::start();
    rt().block_on(async {
        let mut c = dccsign::api::client::issuance(d.channel("issuer-all").await.unwrap());
        let mut req = tonic::Request::new(issue_request(
            "vaccination",
            &d.dev.example("vaccination"),
            "deadline-1",
        ));
        req.set_timeout(std::time::Duration::from_micros(1));
        let e = c.issue(req).await.unwrap_err();
        common::assert_abandoned(&e);
        // The same request retried in time succeeds: the pipeline of the abandoned attempt (if
        // it reached the server) ran to its end instead of leaving the request "in progress".
        let retry = loop {
            let mut req = tonic::Request::new(issue_request(
                "vaccination",
                &d.dev.example("vaccination"),
                "deadline-1",
            ));
            req.set_timeout(std::time::Duration::from_secs(10));
            match c.issue(req).await {
                Err(e) if e.code() == tonic::Code::Aborted => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                other => break other,
            }
        };
        assert_eq!(retry.unwrap().into_inner().request_id, "deadline-1");
        // A normal deadline works.
        let mut req = tonic::Request::new(issue_request(
            "vaccination",
            &d.dev.example("vaccination"),
            "deadline-2",
        ));
        req.set_timeout(std::time::Duration::from_secs(10));
        c.issue(req).await.unwrap();
    });
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn prometheus_metrics_cover_signing_rejections_and_the_hsm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    // The shared harness turns metrics off; this daemon has them on an ephemeral port.
    let dev = Dev::new();
    let mut child = std::process::Command::new(common::bin())
        .args([
            "serve",
            "--state-dir",
            dev.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics,
        ])
        .env_remove("SOFTHSM2_CONF")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr = line.split_whitespace().last().unwrap().to_string();
    rt().block_on(async {
        let ch = dccsign::api::client::connect(
            &addr,
            &dev.file("pki/clients/issuer-all.pem"),
            &dev.file("pki/clients/issuer-all.key"),
            &dev.file("pki/tls/ca.pem"),
            "localhost",
        )
        .await
        .unwrap();
        let mut c = dccsign::api::client::issuance(ch);
        c.issue(issue_request(
            "vaccination",
            &dev.example("vaccination"),
            "m-1",
        ))
        .await
        .unwrap();
        let mut bad = dev.example("test");
        bad["t"][0]["tr"] = json!("260373001");
        c.issue(issue_request("test", &bad, "m-2"))
            .await
            .unwrap_err();
    });
    let text = scrape(&metrics);
    // The exporter (scrapes, and the upkeep that drains the histograms) has a thread of its
    // own: on the request runtime it held up the requests behind it.
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for thread in ["metrics-export", "hsm-worker-0", "tls-server-0"] {
        assert!(
            threads.iter().any(|n| n.starts_with(thread)),
            "no {thread} thread among {threads:?}"
        );
    }
    for needle in [
        "dccsign_certificates_signed_total{type=\"vaccination\"",
        "client=\"spiffe://dccsign.dev/issuer-all\"",
        "dccsign_rejections_total{code=\"2-60-1001-21\"} 1",
        "dccsign_request_seconds_bucket",
        "dccsign_hsm_sign_seconds_bucket",
        "dccsign_ledger_commit_seconds_bucket",
        // Latency buckets fine enough for the 5 ms target; group sizes in writes, not seconds.
        "dccsign_ledger_commit_seconds_bucket{le=\"0.0075\"}",
        "dccsign_ledger_group_size_bucket{le=\"512\"}",
        // The signed certificate's UVCI hash, held by the writer until a merge.
        "dccsign_ledger_uci_recent 1",
        // The issuing pool and the server key's pool, apart.
        "dccsign_hsm_queue_depth{pool=\"hsm-worker\"}",
        "dccsign_hsm_sessions_busy{pool=\"hsm-worker\"}",
        "dccsign_hsm_sessions_busy{pool=\"tls-server\"}",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
}

#[test]
fn the_load_generator_reports_verified_throughput() {
    let d = Daemon::start();
    let dir = d.dev.path().to_str().unwrap().to_string();
    // `dccsign load` against this daemon, with these arguments.
    let load = |args: &[&str]| {
        let mut all = vec!["load", "--state-dir", &dir, "--addr", &d.addr];
        all.extend_from_slice(args);
        d.dev.run(&all)
    };
    // Each mode; the client names the certificates, except in stream mode, where the daemon
    // derives the UVCIs in the token.
    for (mode, uvci) in [
        ("unary", "client"),
        ("stream", "daemon"),
        ("batch", "client"),
    ] {
        let out = load(&[
            "--uvci",
            uvci,
            "--batch",
            "4",
            "--mode",
            mode,
            "--duration",
            "2",
            "--connections",
            "2",
            "--concurrency",
            "8",
            "--verify-every",
            "5",
            "--json",
        ]);
        assert!(out.status.success(), "{mode}: {}", common::stderr(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(r["ok"].as_u64().unwrap() > 0, "{r}");
        assert!(r["verified"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["verify_failures"], 0);
        assert_eq!(r["errors"], json!({}));
        assert!(
            r["latency_ms"]["p99"].as_f64().unwrap() >= r["latency_ms"]["p50"].as_f64().unwrap()
        );
        // The machine's CPU use over the run: some busy, none beyond the CPUs there are.
        let m = &r["machine"];
        let cpus = m["cpus"].as_f64().unwrap();
        let (busy, stolen) = (
            m["busy_cpus"].as_f64().unwrap(),
            m["stolen_cpus"].as_f64().unwrap(),
        );
        assert!(busy > 0.0 && stolen >= 0.0, "{m}");
        assert!(busy + stolen <= cpus + 1e-9, "{m}");
    }
    // Open loop paces every mode, evenly or with Poisson arrivals: 100 certificates/s for 2 s
    // is ~200, not as many as fit; the report says how late the messages left.
    for (mode, arrivals) in [("stream", "even"), ("batch", "even"), ("unary", "poisson")] {
        let out = load(&[
            "--mode",
            mode,
            "--batch",
            "2",
            "--rate",
            "100",
            "--arrivals",
            arrivals,
            "--duration",
            "2",
            "--json",
        ]);
        assert!(out.status.success(), "{mode}: {}", common::stderr(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ok = r["ok"].as_u64().unwrap();
        assert!((150..=260).contains(&ok), "{mode} at 100/s for 2 s: {r}");
        assert_eq!(r["errors"], json!({}));
        assert_eq!(r["arrivals"], arrivals);
        let lag = &r["schedule_lag_ms"];
        assert!(
            lag["p99"].as_f64().unwrap() >= lag["p50"].as_f64().unwrap(),
            "{r}"
        );
    }
    let out = load(&["--rate", "0", "--duration", "1"]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("--rate must be a positive number"), "{err}");
    // The CI floor on the daemon/raw ratio can fail: an impossible floor does, naming both rates.
    let out = load(&[
        "--duration",
        "1",
        "--concurrency",
        "4",
        "--min-ratio",
        "1000",
        "--raw-seconds",
        "1",
        "--json",
    ]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("is below the floor 1000"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["raw_hsm"]["signatures_per_second"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(r["raw_hsm"]["ratio"].as_f64().unwrap() < 1000.0, "{r}");
    // The raw rate is measured before and after the run; the ratio's denominator is their mean.
    let both: Vec<f64> = r["raw_hsm"]["before_after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(both.len(), 2, "{r}");
    assert!(both.iter().all(|v| *v > 0.0), "{r}");
    let mean = r["raw_hsm"]["signatures_per_second"].as_f64().unwrap();
    assert!((mean - (both[0] + both[1]) / 2.0).abs() < 1e-6, "{r}");
    let rate = r["certificates_per_second"].as_f64().unwrap();
    assert!(
        (r["raw_hsm"]["ratio"].as_f64().unwrap() - rate / mean).abs() < 1e-9,
        "{r}"
    );
    // Every certificate the generator counted is in the ledger.
    let (_, signed) = d.dev.ledger_counts();
    assert!(signed > 0);
}

/// The `serving` log line's field `name` (e.g. `async_workers=1`).
fn serving_field(log: &str, name: &str) -> Option<usize> {
    let line = log.lines().find(|l| l.contains("serving"))?;
    let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn async_workers_sets_the_runtime_threads_beside_the_hsm_workers() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    // Automatic (the dev config's 0): half the CPUs, at least one; one HSM worker per CPU.
    let mut d = Daemon::start();
    let log = d.log();
    // The log is a file here: plain text, no terminal colour codes.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    assert_eq!(
        serving_field(&log, "async_workers"),
        Some((cpus / 2).max(1)),
        "{log}"
    );
    assert_eq!(serving_field(&log, "hsm_workers"), Some(cpus), "{log}");
    assert!(d.terminate().success());
    // Set: that many.
    let mut d = Daemon::start_with(Dev::new(), |cfg| {
        *cfg = cfg.replace("async_workers = 0", "async_workers = 3");
    });
    let log = d.log();
    assert_eq!(serving_field(&log, "async_workers"), Some(3), "{log}");
    rt().block_on(async {
        let ch = d.channel("issuer-all").await.unwrap();
        assert!(
            wait_for_health(
                &ch,
                tonic_health::pb::health_check_response::ServingStatus::Serving
            )
            .await,
            "{}",
            d.log()
        );
    });
    assert!(d.terminate().success());
}

/// A reservation left by a process that stopped between reservation and completion keeps its
/// request id "in progress" (`2-60-5008`). The daemon names it at start-up; with the daemon
/// stopped, `dccsign ledger interrupted` lists it and `--release` frees it after recording the
/// release in the audit log; the retry then issues.
#[test]
fn an_interrupted_reservation_is_reported_listed_and_released() {
    use dccsign::ledger::{Ledger, RequestKey, Reservation, SqliteLedger};
    use sha2::{Digest, Sha256};
    let mut d = Daemon::start();
    let dir = d.dev.path().to_str().unwrap().to_string();
    let payload = d.dev.example("vaccination");
    // The daemon derives the UVCI from the request id with a key in the token; the row only
    // needs the request's key (client, request id, hash) to block the retry.
    let uvci = "URN:UVCI:01:SE:DEV/CRASHED1";
    let (client, rid) = ("spiffe://dccsign.dev/issuer-all", "crashed-1");
    let list = |d: &Daemon, extra: &[&str]| {
        let mut args = vec!["ledger", "interrupted", "--state-dir", &dir];
        args.extend_from_slice(extra);
        d.dev.run(&args)
    };
    // One writer per ledger: not while the daemon runs.
    let busy = list(&d, &[]);
    assert!(!busy.status.success());
    assert!(
        common::stderr(&busy).contains("in use by another dccsign process"),
        "{}",
        common::stderr(&busy)
    );
    // What a crash after the reservation leaves: the request's row, never completed.
    assert!(d.terminate().success());
    let mut request_hash = Sha256::new();
    request_hash.update(b"vaccination");
    request_hash.update([0, b'j']);
    request_hash.update(payload.to_string().as_bytes());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let id = SqliteLedger::open(&d.dev.file("ledger.sqlite"))
        .unwrap()
        .reserve(
            &Reservation {
                uci_hash: dccsign::revocation::hash::uci_hash(uvci),
                country_uci_hash: dccsign::revocation::hash::country_uci_hash("SE", uvci),
                cert_type: dccsign::dcc::CertType::Vaccination,
                kid: [1; 8],
                iat: now,
                exp: now + 3600,
                replaces: None,
            },
            Some(&RequestKey {
                client: client.into(),
                request_id: rid.into(),
                request_hash: request_hash.finalize().into(),
            }),
        )
        .unwrap()
        .0;
    d.restart();
    assert!(
        d.log().contains("interrupted reservations") && d.log().contains(&format!("[{id}]")),
        "{}",
        d.log()
    );
    let issue = |d: &Daemon| {
        rt().block_on(async {
            let ch = d.channel("issuer-all").await.unwrap();
            dccsign::api::client::issuance(ch)
                .issue(issue_request("vaccination", &payload, rid))
                .await
        })
    };
    let err = issue(&d).unwrap_err();
    assert_eq!(error_detail(&err).code, "2-60-5008", "{err}");

    // Listed (daemon stopped), then released.
    assert!(d.terminate().success());
    let out = list(&d, &[]);
    let text = common::stdout(&out);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(text.contains(&format!("{id}\treserved ")), "{text}");
    assert!(
        text.contains(&format!("client {client}\trequest {rid}")),
        "{text}"
    );
    assert!(text.contains("1 interrupted reservation(s)"), "{text}");
    let wrong = list(&d, &["--release", &(id + 1000).to_string()]);
    assert!(!wrong.status.success());
    assert!(common::stderr(&wrong).contains("not an interrupted reservation"));
    let out = list(&d, &["--release", &id.to_string()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::stdout(&out).contains(&format!("released {id}")),
        "{}",
        common::stdout(&out)
    );
    let (operation, officer, parameters): (String, String, String) =
        rusqlite::Connection::open(d.dev.file("control.sqlite"))
            .unwrap()
            .query_row(
                "SELECT operation, officer, parameters FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
    assert_eq!(operation, "ledger.release-interrupted");
    assert!(officer.starts_with("local:"), "{officer}");
    assert!(parameters.contains(rid), "{parameters}");
    let verify = d.dev.run(&["audit", "verify", "--state-dir", &dir]);
    assert!(verify.status.success(), "{}", common::stderr(&verify));
    assert!(common::stdout(&list(&d, &[])).contains("0 interrupted reservation(s)"));

    // The retry issues, and the start-up no longer warns.
    d.restart();
    issue(&d).unwrap();
    assert_eq!(d.log().matches("interrupted reservations").count(), 1);
    d.dev.assert_no_personal_data(&d.log());
}
