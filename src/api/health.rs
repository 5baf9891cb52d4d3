//! Health: SERVING only while the HSM signs (a canary signature verified against each DSC) and
//! the ledger accepts writes; NOT_SERVING otherwise, and back by itself when they recover.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::hsm::Token;
use crate::issuance::Issuer;

/// The service names reported besides the overall status (""): both sign through the canary's
/// HSM and ledger.
pub const ISSUANCE_SERVICES: [&str; 2] = ["dccsign.v1.BulkIssuance", "dccsign.v1.Issuance"];

/// Runs the canary every `interval` and reports the result. After an HSM failure the keys are
/// looked up again (a reloaded token hands out new object handles) before the next check.
pub async fn run(
    issuer: Arc<Issuer>,
    token: Arc<Token>,
    reporter: HealthReporter,
    interval: Duration,
) {
    let mut last: Option<bool> = None;
    loop {
        let (i, tk) = (issuer.clone(), token.clone());
        let result = tokio::task::spawn_blocking(move || {
            i.canary().or_else(|first| {
                if first.starts_with("HSM") {
                    i.reconnect_hsm(&tk).map_err(|e| format!("{first}; {e}"))?;
                    i.canary()
                } else {
                    Err(first)
                }
            })
        })
        .await
        .unwrap_or_else(|e| Err(format!("canary task: {e}")));
        let ok = result.is_ok();
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        for name in ISSUANCE_SERVICES {
            reporter.set_service_status(name, status).await;
        }
        metrics::gauge!("dccsign_healthy").set(if ok { 1.0 } else { 0.0 });
        if last != Some(ok) {
            match &result {
                Ok(()) => tracing::info!("health: SERVING"),
                Err(e) => tracing::error!(reason = %e, "health: NOT_SERVING"),
            }
        }
        last = Some(ok);
        tokio::time::sleep(interval).await;
    }
}
