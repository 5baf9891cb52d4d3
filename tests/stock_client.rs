//! A stock gRPC client that is not tonic — Python grpcio with server reflection, installed by
//! `.ci/deps` — issues a certificate over mutual TLS.

mod common;

#[test]
fn python_grpcio_with_reflection_issues_over_mtls() {
    let d = common::Daemon::start();
    let payload = d.dev.file("python-payload.json");
    std::fs::write(&payload, d.dev.example("vaccination").to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/stock_client.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            &d.addr,
            d.dev.path().to_str().unwrap(),
            payload.to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python client failed (run .ci/deps for grpcio):\n{}\n{}",
        common::stderr(&out),
        d.log()
    );
    let hc1 = common::stdout(&out).trim().to_string();
    let v = d.dev.run(&[
        "verify",
        "--trust",
        d.dev.dsc_pem("vaccination").to_str().unwrap(),
        &hc1,
    ]);
    assert!(v.status.success(), "{}", common::stderr(&v));
}
