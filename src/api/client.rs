//! A gRPC client over mutual TLS (used by `dccsign issue` and the tests).

use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pb::issuance_client::IssuanceClient;

/// Connects to `addr` (`host:port`) presenting `cert`/`key`, trusting the server certificate
/// if it chains to `ca` and is valid for `domain`.
pub async fn connect(
    addr: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
    domain: &str,
) -> Result<Channel, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .domain_name(domain);
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

/// An Issuance client on `channel`.
pub fn issuance(channel: Channel) -> IssuanceClient<Channel> {
    IssuanceClient::new(channel)
}
