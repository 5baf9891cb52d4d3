//! Criterion benchmarks of each pipeline stage and of the whole pipeline.
//!
//! `cargo bench --bench pipeline`. The HSM stages use a SoftHSM token created in a temporary
//! directory by `dccsign dev-init` (the bench builds the binary's library code path directly).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::{Digest, Sha256};

use dccsign::cose::{self, CwtClaims, ProtectedHeader};
use dccsign::dcc::{self, CertType, Policy};
use dccsign::hsm::Token;
use dccsign::issuance::{Issuer, IssuerSettings, Payload};
use dccsign::keys::DscSet;
use dccsign::ledger::SqliteLedger;

fn payload(now: time::OffsetDateTime) -> serde_json::Value {
    serde_json::json!({
        "ver": "1.3.0",
        "nam": { "fn": "Testsson", "fnt": "TESTSSON", "gn": "Test", "gnt": "TEST" },
        "dob": "1980-01-01",
        "v": [{
            "tg": "840539006", "vp": "J07BX03", "mp": "EU/1/20/1528", "ma": "ORG-100030215",
            "dn": 2, "sd": 2, "dt": (now - time::Duration::days(30)).date().to_string(),
            "co": "SE", "is": "dccsign development"
        }]
    })
}

fn stages(c: &mut Criterion) {
    let now = time::OffsetDateTime::now_utc();
    let json = payload(now);
    let json_bytes = serde_json::to_vec(&json).unwrap();
    let policy = Policy::default();
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(1));

    g.bench_function("validate", |b| {
        b.iter(|| {
            let v = dcc::parse_json(black_box(&json_bytes)).unwrap();
            dcc::validate(&v, Some(CertType::Vaccination), &policy, now).unwrap()
        })
    });

    let mut d = dcc::validate(&json, Some(CertType::Vaccination), &policy, now).unwrap();
    d.set_uvci("URN:UVCI:01:SE:DEV/ABCDEFGHIJKLMNOP#Q".into());
    g.bench_function("cbor_cwt", |b| {
        b.iter(|| {
            CwtClaims {
                iss: "SE".into(),
                iat: 1_800_000_000,
                exp: 1_823_328_000,
                hcert: black_box(&d),
            }
            .to_cbor_bytes()
        })
    });

    let cwt = CwtClaims {
        iss: "SE".into(),
        iat: 1_800_000_000,
        exp: 1_823_328_000,
        hcert: &d,
    }
    .to_cbor_bytes();
    let header = ProtectedHeader::es256([1, 2, 3, 4, 5, 6, 7, 8]);
    let sig = [7u8; 64];
    g.bench_function("cose_build", |b| {
        b.iter(|| {
            let tbs = cose::sign1::sig_structure(&header, black_box(&cwt));
            let digest: [u8; 32] = Sha256::digest(&tbs).into();
            black_box(digest);
            cose::sign1::assemble(&header, &cwt, &sig)
        })
    });

    let cose_bytes = cose::sign1::assemble(&header, &cwt, &sig);
    g.bench_function("zlib_base45", |b| {
        b.iter(|| cose::hc1::encode(black_box(&cose_bytes)))
    });
    g.finish();
}

/// A development state directory with a SoftHSM token, for the HSM benches.
fn dev_state() -> (tempfile::TempDir, dccsign::config::Config) {
    let dir = tempfile::tempdir().unwrap();
    let report = dccsign::keys::dev_init(dir.path(), "SE").unwrap();
    let cfg = dccsign::config::Config::load(&report.config).unwrap();
    (dir, cfg)
}

fn hsm(c: &mut Criterion) {
    let (_dir, cfg) = dev_state();
    let now = time::OffsetDateTime::now_utc();
    let token = Token::open(&cfg.token_settings()).unwrap();
    let dscs = DscSet::load(&cfg, &token, now).unwrap();
    let key = dscs.for_type(CertType::Vaccination).unwrap().key.clone();

    let mut g = c.benchmark_group("hsm");
    g.throughput(Throughput::Elements(1));
    let pool = token.signing_pool(1, 16).unwrap();
    let digest: [u8; 32] = Sha256::digest(b"bench").into();
    g.bench_function("sign_one_thread", |b| {
        b.iter(|| pool.sign(&key, black_box(digest)).unwrap())
    });
    drop(pool);

    let pool = token.signing_pool(1, 16).unwrap();
    let ledger = SqliteLedger::open(&cfg.resolve(&cfg.ledger.path)).unwrap();
    let issuer = Issuer::new(
        IssuerSettings::from_config(&cfg),
        &dscs,
        pool,
        Arc::new(ledger),
        None,
    );
    let json = serde_json::to_vec(&payload(now)).unwrap();
    g.bench_function("whole_pipeline", |b| {
        b.iter(|| {
            issuer
                .issue(CertType::Vaccination, Payload::Json(black_box(&json)), now)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, stages, hsm);
criterion_main!(benches);
