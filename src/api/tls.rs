//! Mutual TLS for the daemon with rustls: TLS 1.3 only, a client certificate is required and
//! must chain to the configured client CA bundle (unknown CA, expired or missing certificates
//! fail the handshake). The caller's identity — the client certificate's first URI SAN, else
//! its first DNS SAN — is read once per connection and handed to every request on it.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use der::Decode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

use super::client_crl::{ClientVerifier, Live};
use super::cork::Cork;
use crate::hsm::TlsPrivateKey;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// URI or DNS SAN of the verified client certificate; `None` if it has neither.
    pub identity: Option<String>,
}

/// The identity in a client certificate: the first URI SAN, else the first DNS SAN.
pub fn identity_of(cert_der: &[u8]) -> Option<String> {
    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    let (_, san) = cert.tbs_certificate.get::<SubjectAltName>().ok()??;
    let uri = san.0.iter().find_map(|n| match n {
        GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
        _ => None,
    });
    uri.or_else(|| {
        san.0.iter().find_map(|n| match n {
            GeneralName::DnsName(d) => Some(d.to_string()),
            _ => None,
        })
    })
}

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsSetupError(pub String);

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsSetupError(format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!("{}: no certificate", path.display())));
    }
    Ok(certs)
}

/// The only TLS version either end speaks.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The only application protocol either end offers: HTTP/2, which gRPC runs on.
const ALPN_H2: &[u8] = b"h2";

/// The CA certificates in a PEM file, as trust anchors.
fn root_store(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(path)? {
        roots
            .add(ca)
            .map_err(|e| TlsSetupError(format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The private key in a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsSetupError(format!("{}: {e}", path.display())))
}

/// A client's rustls configuration for the daemon: TLS 1.3, ALPN `h2`, presenting the
/// certificate (chain) in `cert` with the key in `key`, trusting servers that chain to `ca`.
pub fn client_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsSetupError(e.to_string()))?
        .with_root_certificates(root_store(ca)?)
        .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
        .map_err(|e| TlsSetupError(format!("client certificate {}: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// The verifier of client certificates: they must chain to a CA in the PEM bundle `client_ca`
/// and, with `crls`, not be revoked (see [`super::client_crl`]).
pub fn client_verifier(
    client_ca: &Path,
    crls: Vec<std::path::PathBuf>,
) -> Result<super::client_crl::ClientVerifier, TlsSetupError> {
    let cas = read_certs(client_ca)?;
    let roots = root_store(client_ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    super::client_crl::ClientVerifier::new(roots, &cas, crls, provider)
}

/// The server's rustls configuration: the certificate chain in `cert`, its key, and the
/// verifier of client certificates. Fails when the certificate does not match the key.
pub fn server_config(
    cert: &Path,
    key: TlsPrivateKey<'_>,
    verifier: Arc<super::client_crl::ClientVerifier>,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = key
        .certified(read_certs(cert)?, cert, &provider)
        .map_err(|e| TlsSetupError(format!("server {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsSetupError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// A TLS connection with its verified peer; its writes are corked (see [`Cork`]). It holds
/// its place among the open connections until it is dropped. Once its client certificate
/// fails a later check ([`Live`]), its reads and writes fail, which ends the connection.
pub struct MtlsStream {
    inner: Cork<TlsStream<TcpStream>>,
    peer: Peer,
    live: Arc<Live>,
    _open: OpenConnection,
}

/// The error of every read and write of a connection closed by a later certificate check.
fn no_longer_valid() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the client certificate no longer passes (revoked or expired): connection closed",
    )
}

/// A place among the daemon's open connections, given back (and counted) when dropped.
struct OpenConnection {
    _permit: OwnedSemaphorePermit,
    _client: ClientPlace,
    gauge: metrics::Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Open connections per client identity (`""`: a certificate without one).
type PerClient = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// A place among one client's open connections, given back when dropped.
struct ClientPlace {
    open: PerClient,
    identity: String,
}

impl ClientPlace {
    /// A place for `identity` if it has fewer than `limit` connections open.
    fn take(open: &PerClient, identity: &str, limit: usize) -> Option<ClientPlace> {
        let mut map = open.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(identity.to_string()).or_insert(0);
        if *n >= limit.max(1) {
            return None;
        }
        *n += 1;
        Some(ClientPlace {
            open: open.clone(),
            identity: identity.to_string(),
        })
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.identity);
            }
        }
    }
}

/// How many connections the daemon serves, and handshakes it makes, at once.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections.
    pub connections: usize,
    /// Handshakes under way.
    pub handshakes: usize,
    /// Open connections of one client identity.
    pub per_client: usize,
    /// Time a handshake may take.
    pub handshake_timeout: Duration,
}

/// Takes a permit of `limit`, logging and counting when the limit makes the accept loop wait.
async fn place(limit: &Arc<Semaphore>, what: &'static str) -> OwnedSemaphorePermit {
    if let Ok(p) = limit.clone().try_acquire_owned() {
        return p;
    }
    metrics::counter!("dccsign_tls_accept_waits_total", "limit" => what).increment(1);
    tracing::warn!(
        limit = what,
        "at the limit: new connections wait in the backlog"
    );
    // Never closed: the semaphore lives as long as the accept loop.
    limit
        .clone()
        .acquire_owned()
        .await
        .expect("the accept loop's semaphore is never closed")
}

impl Connected for MtlsStream {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.live.closed_or_register(cx.waker()) {
            return Poll::Ready(Err(no_longer_valid()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.live.is_closed() {
            return Poll::Ready(Err(no_longer_valid()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.live.is_closed() {
            return Poll::Ready(Err(no_longer_valid()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.live.is_closed() {
            return Poll::Ready(Err(no_longer_valid()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (each bounded by
/// `limits.handshake_timeout`); verified connections come out of the returned stream. Failed
/// handshakes are logged and counted, never passed on. At `limits.connections` open
/// connections or `limits.handshakes` handshakes under way, no connection is accepted until
/// one ends: the rest wait in the kernel's backlog, costing the daemon nothing. A client with
/// `limits.per_client` connections open has a new one closed after its handshake. Each
/// connection's client certificate stays with `verifier`, which checks it again while the
/// connection is open (see [`ClientVerifier::recheck_open`]).
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    verifier: Arc<ClientVerifier>,
    limits: ConnectionLimits,
) -> tokio_stream::wrappers::ReceiverStream<Result<MtlsStream, std::io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let connections = Arc::new(Semaphore::new(limits.connections.max(1)));
    let handshakes = Arc::new(Semaphore::new(limits.handshakes.max(1)));
    let open = metrics::gauge!("dccsign_tls_connections");
    let handshake_timeout = limits.handshake_timeout;
    let per_client: PerClient = Default::default();
    tokio::spawn(async move {
        loop {
            let connection = place(&connections, "connections").await;
            let handshake = place(&handshakes, "handshakes").await;
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let open = open.clone();
            let verifier = verifier.clone();
            let per_client = per_client.clone();
            tokio::spawn(async move {
                let accepted = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(handshake);
                match accepted {
                    Ok(Ok(tls)) => {
                        let conn = tls.get_ref().1;
                        let chain = conn.peer_certificates().unwrap_or_default();
                        // A resumed session brings the certificate of the session it resumes,
                        // unchecked: check it now, against the CRLs in force.
                        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                            if let Err(e) = verifier.check(chain, std::time::SystemTime::now()) {
                                metrics::counter!("dccsign_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::info!(peer = %addr, error = %e,
                                    "TLS session resumption refused");
                                return;
                            }
                        }
                        let identity = chain.first().and_then(|c| identity_of(c.as_ref()));
                        let who = identity.as_deref().unwrap_or("");
                        let Some(client_place) =
                            ClientPlace::take(&per_client, who, limits.per_client)
                        else {
                            metrics::counter!("dccsign_tls_connections_refused_total",
                                "reason" => "per-client")
                            .increment(1);
                            tracing::warn!(peer = %addr, client = who,
                                limit = limits.per_client,
                                "connection closed: the client has max_connections_per_client open");
                            return;
                        };
                        let live = verifier.track(chain, identity.clone());
                        open.increment(1.0);
                        let stream = MtlsStream {
                            inner: Cork::new(tls),
                            peer: Peer { addr, identity },
                            live,
                            _open: OpenConnection {
                                _permit: connection,
                                _client: client_place,
                                gauge: open,
                            },
                        };
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("dccsign_tls_handshake_failures_total").increment(1);
                        tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics::counter!("dccsign_tls_handshake_failures_total").increment(1);
                        tracing::info!(peer = %addr, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
