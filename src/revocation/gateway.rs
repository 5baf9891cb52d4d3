//! HTTP/1.1 over mutual TLS to the EU gateway and to revocation subscribers: rustls (TLS 1.2 or
//! 1.3, the server verified against a configured CA, our client certificate from PEM files) and
//! hyper's connection-level client, one connection per request, every request bounded by one
//! timeout. Only `https://` URLs are accepted.
//!
//! Errors say whether a retry can help ([`DeliveryError::retryable`]): transport failures,
//! timeouts and server errors can; refusals of the request (4xx) and configuration errors
//! cannot.
//!
//! The gateway's revocation endpoints (dgc-gateway `RevocationListController`):
//! `POST /revocation-list` (base64 CMS, `application/cms-text`; 201 with the batch id in
//! `ETag`), `POST /revocation-list/delete` (CMS over `{"batchId":…}`; 204) and
//! `GET /revocation-list` with `If-Modified-Since` (200 with a page of the batch list, 204 when
//! nothing is newer).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, ETAG, HOST, IF_MODIFIED_SINCE};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::hsm::TlsPrivateKey;

/// Bodies quoted in errors are cut to this many bytes.
pub const ERROR_BODY_LIMIT: usize = 512;
/// Largest response body read.
const MAX_RESPONSE_BODY: usize = 16 * 1024 * 1024;
/// Most pages followed by [`Gateway::list`].
const MAX_LIST_PAGES: usize = 10_000;

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// Our configuration is wrong (files, URL, headers): retrying does not help.
    #[error("configuration: {0}")]
    Config(String),
    /// Connecting, the TLS handshake or the HTTP exchange failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The whole request took longer than the configured timeout.
    #[error("timed out")]
    Timeout,
    /// The server failed (5xx, 408, 429, or a success answer that lacks what it must carry).
    #[error("server error, HTTP {status}: {body}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Start of the response body (at most 512 bytes), or what was missing.
        body: String,
    },
    /// The server refused the request (4xx other than 408 and 429, or a redirect).
    #[error("rejected, HTTP {status}: {body}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Start of the response body (at most 512 bytes).
        body: String,
    },
}

impl DeliveryError {
    /// Whether a later retry can succeed: transport errors, timeouts and server errors.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            DeliveryError::Transport(_) | DeliveryError::Timeout | DeliveryError::Server { .. }
        )
    }

    /// A short code for metrics and the outbox: `config`, `transport`, `timeout`, `http-503`, …
    pub fn code(&self) -> String {
        match self {
            DeliveryError::Config(_) => "config".into(),
            DeliveryError::Transport(_) => "transport".into(),
            DeliveryError::Timeout => "timeout".into(),
            DeliveryError::Server { status, .. } | DeliveryError::Rejected { status, .. } => {
                format!("http-{status}")
            }
        }
    }

    /// The error for an unexpected HTTP status: 5xx, 408 (request timeout) and 429 (too many
    /// requests) are the server's problem and retryable; every other status is a refusal.
    pub fn from_status(status: u16, body: &[u8]) -> DeliveryError {
        let body = truncate(body);
        if status >= 500 || status == 408 || status == 429 {
            DeliveryError::Server { status, body }
        } else {
            DeliveryError::Rejected { status, body }
        }
    }
}

/// The first [`ERROR_BODY_LIMIT`] bytes of `body` as text.
fn truncate(body: &[u8]) -> String {
    let cut = &body[..body.len().min(ERROR_BODY_LIMIT)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if body.len() > ERROR_BODY_LIMIT {
        s.push('…');
    }
    s
}

/// An error with its chain of causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn config_file(path: &Path, e: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::Config(format!("{}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, DeliveryError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| config_file(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| config_file(path, e))?;
    if certs.is_empty() {
        return Err(config_file(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The `ETag` header as sent (quotes included).
    pub etag: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// An HTTPS client with our client certificate; cheap to clone.
#[derive(Clone)]
pub struct HttpsClient {
    tls: TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Where a request goes.
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    host_header: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, DeliveryError> {
        let bad = |why: &str| DeliveryError::Config(format!("URL {url:?}: {why}"));
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => {}
            Some(s) => return Err(bad(&format!("only https:// URLs are allowed, not {s}://"))),
            None => return Err(bad("only https:// URLs are allowed")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information in the URL is not allowed"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name =
            ServerName::try_from(bare.clone()).map_err(|e| bad(&format!("host {host}: {e}")))?;
        Ok(Target {
            host: bare,
            port: authority.port_u16().unwrap_or(443),
            server_name,
            host_header: authority.as_str().to_string(),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
        })
    }
}

impl HttpsClient {
    /// A client that trusts servers chaining to the CA certificates in `ca_pem` and presents
    /// the certificate (chain) in `client_cert_pem` with the key in `client_key_pem`. Every
    /// request made with it is bounded by `timeout`. Errors name the file.
    pub fn new(
        ca_pem: &Path,
        client_cert_pem: &Path,
        client_key_pem: &Path,
        timeout: Duration,
    ) -> Result<Self, DeliveryError> {
        Self::with_key(
            ca_pem,
            client_cert_pem,
            TlsPrivateKey::File(client_key_pem),
            timeout,
        )
    }

    /// [`HttpsClient::new`] with the client key in the token (the HSM signs each handshake)
    /// or in a PEM file.
    pub fn with_key(
        ca_pem: &Path,
        client_cert_pem: &Path,
        client_key: TlsPrivateKey<'_>,
        timeout: Duration,
    ) -> Result<Self, DeliveryError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs(ca_pem)? {
            roots.add(ca).map_err(|e| config_file(ca_pem, e))?;
        }
        let certified = client_key
            .certified(read_certs(client_cert_pem)?, client_cert_pem, &provider)
            .map_err(|e| DeliveryError::Config(format!("client {e}")))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| DeliveryError::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpsClient {
            tls: TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    /// The timeout of one request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one request on a new connection and reads the whole answer, all within the
    /// timeout. Any HTTP status is an `Ok` answer here; errors are configuration (URL, header),
    /// transport and timeout.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Response, DeliveryError> {
        let target = Target::parse(url)?;
        let mut req = Request::builder()
            .method(method)
            .uri(target.path.as_str())
            .header(HOST, target.host_header.as_str());
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| DeliveryError::Config(format!("header name {name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| DeliveryError::Config(format!("header {name}: {e}")))?;
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| DeliveryError::Config(format!("request: {e}")))?;
        match tokio::time::timeout(self.timeout, self.exchange(&target, req)).await {
            Ok(r) => r,
            Err(_) => Err(DeliveryError::Timeout),
        }
    }

    async fn exchange(
        &self,
        t: &Target,
        req: Request<Full<Bytes>>,
    ) -> Result<Response, DeliveryError> {
        let where_ = format!("{}:{}", t.host, t.port);
        let transport = |what: &str, e: &dyn std::error::Error| {
            DeliveryError::Transport(format!("{what} {where_}: {}", chain(e)))
        };
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| transport("connecting to", &e))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(t.server_name.clone(), tcp)
            .await
            .map_err(|e| transport("TLS handshake with", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| transport("HTTP/1.1 with", &e))?;

        let exchange = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| transport("request to", &e))?;
            let status = resp.status().as_u16();
            let etag = resp
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
                .collect()
                .await
                .map_err(|e| transport("reading the answer of", e.as_ref()))?
                .to_bytes()
                .to_vec();
            Ok(Response { status, etag, body })
        };
        // Drive the connection and the exchange together. The exchange decides the outcome:
        // when the connection ends first, the exchange still completes (with what was received)
        // or fails (with what is missing).
        let mut conn = std::pin::pin!(conn);
        let mut exchange = std::pin::pin!(exchange);
        let mut conn_open = true;
        loop {
            tokio::select! {
                r = &mut exchange => return r,
                _ = &mut conn, if conn_open => conn_open = false,
            }
        }
    }

    /// POSTs one JSON document (a subscriber event); any 2xx is success and returns the status.
    pub async fn post_json(&self, url: &str, json: Vec<u8>) -> Result<u16, DeliveryError> {
        let r = self
            .send(
                Method::POST,
                url,
                &[(CONTENT_TYPE.as_str(), "application/json".into())],
                json,
            )
            .await?;
        if (200..300).contains(&r.status) {
            Ok(r.status)
        } else {
            Err(DeliveryError::from_status(r.status, &r.body))
        }
    }
}

/// One entry of the gateway's batch list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GatewayBatch {
    /// The batch id.
    #[serde(rename = "batchId")]
    pub batch_id: String,
    /// Uploading country.
    pub country: String,
    /// When the batch was added or deleted (RFC 3339), the list's order and paging key.
    pub date: String,
    /// Whether the batch was deleted.
    #[serde(default)]
    pub deleted: bool,
}

#[derive(serde::Deserialize)]
struct BatchListPage {
    #[serde(default)]
    more: bool,
    #[serde(default)]
    batches: Vec<GatewayBatch>,
}

/// The EU gateway's revocation endpoints under one base URL.
#[derive(Debug, Clone)]
pub struct Gateway {
    client: HttpsClient,
    base_url: String,
}

const CMS_TEXT: &str = "application/cms-text";

impl Gateway {
    /// The gateway at `base_url` (e.g. `https://dgcg.example.eu`; a trailing `/` is ignored).
    /// The URL is checked on every request: anything but `https://` fails as
    /// [`DeliveryError::Config`].
    pub fn new(client: HttpsClient, base_url: &str) -> Gateway {
        Gateway {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Uploads a batch (base64 CMS) and returns the batch id the gateway assigned (its `ETag`,
    /// quotes removed). A success without an `ETag` is a server error (retryable).
    pub async fn upload(&self, cms_b64: &str) -> Result<String, DeliveryError> {
        let r = self
            .client
            .send(
                Method::POST,
                &self.url("/revocation-list"),
                &[(CONTENT_TYPE.as_str(), CMS_TEXT.into())],
                cms_b64.as_bytes().to_vec(),
            )
            .await?;
        if !(200..300).contains(&r.status) {
            return Err(DeliveryError::from_status(r.status, &r.body));
        }
        let id = r
            .etag
            .as_deref()
            .map(|e| e.trim().trim_start_matches("W/").trim_matches('"'))
            .filter(|e| !e.is_empty());
        match id {
            Some(id) => Ok(id.to_string()),
            None => Err(DeliveryError::Server {
                status: r.status,
                body: "the answer carries no ETag (batch id)".into(),
            }),
        }
    }

    /// Deletes a batch (base64 CMS over `{"batchId":…}`). 2xx, and 404 (the gateway does not
    /// know the batch, e.g. it is already deleted), count as done.
    pub async fn delete(&self, cms_b64: &str) -> Result<(), DeliveryError> {
        let r = self
            .client
            .send(
                Method::POST,
                &self.url("/revocation-list/delete"),
                &[(CONTENT_TYPE.as_str(), CMS_TEXT.into())],
                cms_b64.as_bytes().to_vec(),
            )
            .await?;
        if (200..300).contains(&r.status) || r.status == 404 {
            Ok(())
        } else {
            Err(DeliveryError::from_status(r.status, &r.body))
        }
    }

    /// All batches (every country's) added or deleted after `since`, following the gateway's
    /// paging: each further page is asked for with the last batch's `date`.
    ///
    /// `If-Modified-Since` is sent as RFC 3339 UTC (e.g. `2021-06-01T00:00:00Z`), which is what
    /// the gateway parses (ISO date-time), not the RFC 7231 HTTP date.
    pub async fn list(&self, since: OffsetDateTime) -> Result<Vec<GatewayBatch>, DeliveryError> {
        let mut since = since
            .to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(|e| DeliveryError::Config(format!("If-Modified-Since {since}: {e}")))?;
        let mut all = Vec::new();
        for _ in 0..MAX_LIST_PAGES {
            let r = self
                .client
                .send(
                    Method::GET,
                    &self.url("/revocation-list"),
                    &[
                        (IF_MODIFIED_SINCE.as_str(), since.clone()),
                        (ACCEPT.as_str(), "application/json".into()),
                    ],
                    Vec::new(),
                )
                .await?;
            match r.status {
                204 | 304 => return Ok(all),
                200 => {}
                s => return Err(DeliveryError::from_status(s, &r.body)),
            }
            let page: BatchListPage =
                serde_json::from_slice(&r.body).map_err(|e| DeliveryError::Server {
                    status: r.status,
                    body: format!("the batch list is not valid JSON: {e}"),
                })?;
            let next = page.batches.last().map(|b| b.date.clone());
            all.extend(page.batches);
            match next {
                Some(d) if page.more => {
                    if d == since {
                        return Err(DeliveryError::Server {
                            status: r.status,
                            body: format!("the batch list does not advance past {d}"),
                        });
                    }
                    since = d;
                }
                _ => return Ok(all),
            }
        }
        Err(DeliveryError::Server {
            status: 200,
            body: format!("the batch list has more than {MAX_LIST_PAGES} pages"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes_and_codes() {
        let e = DeliveryError::from_status(503, b"busy");
        assert!(e.retryable());
        assert_eq!(e.code(), "http-503");
        assert!(matches!(e, DeliveryError::Server { status: 503, .. }));
        for s in [500, 502, 504, 408, 429] {
            assert!(DeliveryError::from_status(s, b"").retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 413, 301, 302] {
            let e = DeliveryError::from_status(s, b"no");
            assert!(!e.retryable(), "{s}");
            assert_eq!(e.code(), format!("http-{s}"));
        }
        assert!(DeliveryError::Transport("x".into()).retryable());
        assert!(DeliveryError::Timeout.retryable());
        assert!(!DeliveryError::Config("x".into()).retryable());
        assert_eq!(DeliveryError::Transport("x".into()).code(), "transport");
        assert_eq!(DeliveryError::Timeout.code(), "timeout");
        assert_eq!(DeliveryError::Config("x".into()).code(), "config");
    }

    #[test]
    fn bodies_are_cut_to_512_bytes() {
        let long = vec![b'a'; 2000];
        match DeliveryError::from_status(400, &long) {
            DeliveryError::Rejected { body, .. } => {
                assert_eq!(body.trim_end_matches('…').len(), ERROR_BODY_LIMIT);
                assert!(body.ends_with('…'));
            }
            e => panic!("{e:?}"),
        }
        match DeliveryError::from_status(500, b"short") {
            DeliveryError::Server { body, .. } => assert_eq!(body, "short"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn only_https_urls() {
        for (url, needle) in [
            (
                "http://127.0.0.1:8080/x",
                "only https:// URLs are allowed, not http://",
            ),
            ("127.0.0.1:8080", "only https:// URLs are allowed"),
            ("ftp://host/", "only https:// URLs are allowed"),
            ("https://user:pw@host/", "user information"),
            ("not a url", "URL \"not a url\""),
        ] {
            match Target::parse(url) {
                Err(DeliveryError::Config(m)) => assert!(m.contains(needle), "{url}: {m}"),
                Err(e) => panic!("{url}: {e:?}"),
                Ok(_) => panic!("{url} accepted"),
            }
        }
        let t = Target::parse("https://127.0.0.1:8443/revocation-list?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
        assert_eq!(t.path, "/revocation-list?x=1");
        assert_eq!(t.host_header, "127.0.0.1:8443");
        let t = Target::parse("HTTPS://gw.example.eu").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("gw.example.eu", 443, "/")
        );
        let t = Target::parse("https://[::1]:9/").unwrap();
        assert_eq!(t.host, "::1");
        assert!(matches!(t.server_name, ServerName::IpAddress(_)));
    }
}
