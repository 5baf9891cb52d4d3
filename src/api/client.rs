//! A gRPC client over mutual TLS (used by `dccsign issue`, `dccsign load` and the other CLI
//! commands). TLS is rustls through tokio-rustls, as on the server, with the writes corked the
//! same way ([`Cork`]): a unary call's HEADERS and DATA frames, and the calls of many tasks
//! ready at once, leave in one TLS record and one system call.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint, Uri};

use super::cork::Cork;
use super::pb::issuance_client::IssuanceClient;
use super::tls::client_config;

/// Connects to `addr` (`host:port`) presenting `cert`/`key`, trusting the server certificate
/// if it chains to `ca` and is valid for `domain`.
pub async fn connect(
    addr: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
    domain: &str,
) -> Result<Channel, String> {
    let config = client_config(cert, key, ca).map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(domain.to_string())
        .map_err(|e| format!("server name {domain:?}: {e}"))?;
    let connector = MtlsConnector {
        addr: addr.to_string(),
        server_name,
        tls: TlsConnector::from(Arc::new(config)),
    };
    // The endpoint's own TLS stays off (the connector does it); the requests still say `https`.
    let origin: Uri = format!("https://{addr}")
        .parse()
        .map_err(|e| format!("address {addr:?}: {e}"))?;
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .origin(origin)
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

/// An Issuance client on `channel`.
pub fn issuance(channel: Channel) -> IssuanceClient<Channel> {
    IssuanceClient::new(channel)
}

/// Opens TCP + TLS connections to one daemon (the channel calls it again to reconnect).
#[derive(Clone)]
struct MtlsConnector {
    addr: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl Service<Uri> for MtlsConnector {
    type Response = TokioIo<Cork<TlsStream<TcpStream>>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.server_name, tcp).await?;
            Ok(TokioIo::new(Cork::new(tls)))
        })
    }
}
