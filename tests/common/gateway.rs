//! A stand-in for the EU gateway's revocation endpoints, for tests: HTTP/1.1 over mutual TLS
//! (TLS 1.2/1.3, a client certificate chained to the given CA is required) on an ephemeral
//! loopback port, served by its own thread and tokio runtime so that sync `#[test]`s can use it.
//!
//! Contract (dgc-gateway `RevocationListController`):
//! - `POST /revocation-list`, `Content-Type: application/cms-text`, body = base64 CMS of a batch
//!   JSON. Checked with `open_cms` and `parse_batch_json`; the signer certificate must be the
//!   expected upload certificate (else 403) and the batch country ours (else 403); invalid → 400
//!   with the error text; success → 201 with `ETag: "<new id>"`.
//! - `POST /revocation-list/delete`, CMS over `{"batchId":…}` by the upload certificate: unknown
//!   or already deleted id → 404; else marked deleted (its date moves) → 204.
//! - `GET /revocation-list` with `If-Modified-Since` (RFC 3339, as the gateway parses it; missing,
//!   malformed or in the future → 400): batches whose date is after it, oldest first, a page of
//!   at most `page_size` with `more`; 204 when none.
//! - `POST /events`: a subscriber endpoint; records the JSON body → 200 (not JSON → 400).
//!
//! Scripting: `fail_next` answers a status to the next N uploads without storing them;
//! `stop_accepting` closes new connections at once until `resume`.
//! Self-contained: used through `#[path = "common/gateway.rs"] mod gateway;`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use der::Encode;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use dccsign::revocation::batch::{open_cms, parse_batch_json, parse_delete_json};

/// A batch the stand-in accepted.
#[derive(Debug, Clone)]
pub struct StoredBatch {
    /// The id returned in the ETag.
    pub batch_id: String,
    /// The batch JSON as uploaded (parsed).
    pub json: Value,
    /// The CMS as uploaded (DER, base64-decoded).
    pub cms: Vec<u8>,
    /// Deleted since.
    pub deleted: bool,
    /// Date of the last change (upload or deletion), RFC 3339 with milliseconds.
    pub date: String,
}

struct Stored {
    public: StoredBatch,
    changed: OffsetDateTime,
}

struct State {
    batches: Vec<Stored>,
    fail: Option<(u16, usize)>,
    requests: usize,
    events: Vec<Value>,
    accepting: bool,
    page_size: usize,
    last_change: OffsetDateTime,
}

struct Shared {
    state: Mutex<State>,
    upload_cert_der: Vec<u8>,
    country: String,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running stand-in gateway; stops when dropped.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tls_config(cert: &Path, key: &Path, client_ca: &Path) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(client_ca) {
        roots.add(c).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap()
}

impl StandIn {
    /// Starts on `127.0.0.1:0` with the server certificate and key, requiring client
    /// certificates chained to `client_ca_pem`; uploads must be signed by the certificate whose
    /// DER is `expected_upload_cert_der` and be for `country`.
    pub fn start(
        server_cert_pem: &Path,
        server_key_pem: &Path,
        client_ca_pem: &Path,
        expected_upload_cert_der: Vec<u8>,
        country: &str,
    ) -> StandIn {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(
            server_cert_pem,
            server_key_pem,
            client_ca_pem,
        )));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                batches: Vec::new(),
                fail: None,
                requests: 0,
                events: Vec::new(),
                accepting: true,
                page_size: 1000,
                last_change: OffsetDateTime::UNIX_EPOCH,
            }),
            upload_cert_der: expected_upload_cert_der,
            country: country.to_string(),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("stand-in-gateway-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        let tcp = tokio::select! {
                            _ = &mut stopped => break,
                            r = listener.accept() => match r {
                                Ok((tcp, _)) => tcp,
                                Err(_) => continue,
                            },
                        };
                        if !sh.lock().accepting {
                            drop(tcp);
                            continue;
                        }
                        let acceptor = acceptor.clone();
                        let sh = sh.clone();
                        tokio::spawn(async move {
                            let tls = match tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(tcp),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => tls,
                                _ => return, // failed handshakes are just dropped
                            };
                            let service = hyper::service::service_fn(move |req| {
                                let sh = sh.clone();
                                async move { Ok::<_, Infallible>(handle(req, &sh).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        });
                    }
                });
            })
            .unwrap();
        StandIn {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Answers `status` to the next `times` `POST /revocation-list` requests without storing.
    pub fn fail_next(&self, status: u16, times: usize) {
        self.shared.lock().fail = Some((status, times));
    }

    /// Closes new connections right after accepting them (a transport failure for clients).
    pub fn stop_accepting(&self) {
        self.shared.lock().accepting = false;
    }

    /// Serves new connections again.
    pub fn resume(&self) {
        self.shared.lock().accepting = true;
    }

    /// Largest page of `GET /revocation-list` (default 1000).
    pub fn set_page_size(&self, n: usize) {
        self.shared.lock().page_size = n.max(1);
    }

    /// The accepted batches, oldest first.
    pub fn uploads(&self) -> Vec<StoredBatch> {
        self.shared
            .lock()
            .batches
            .iter()
            .map(|b| b.public.clone())
            .collect()
    }

    /// `POST /revocation-list` requests received (upload attempts), failed and scripted ones
    /// included.
    pub fn requests(&self) -> usize {
        self.shared.lock().requests
    }

    /// The JSON bodies received on `POST /events`.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .body(Full::new(body.into()))
        .unwrap()
}

fn text(status: u16, msg: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = answer(status, msg.into());
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
    r
}

fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The next change date: now (milliseconds), strictly after the previous one.
fn next_date(st: &mut State) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap();
    let d = if now > st.last_change {
        now
    } else {
        st.last_change + Duration::from_millis(1)
    };
    st.last_change = d;
    d
}

fn rfc3339(d: OffsetDateTime) -> String {
    d.format(&Rfc3339).unwrap()
}

/// Decodes and checks a CMS body; `Err` is the status and text to answer.
fn open_signed(
    sh: &Shared,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Vec<u8>, (u16, String)> {
    if content_type != Some("application/cms-text") {
        return Err((
            415,
            format!("Content-Type must be application/cms-text, not {content_type:?}"),
        ));
    }
    let b64: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| (400, format!("body: not base64: {e}")))?;
    let (content, signer) = open_cms(&der).map_err(|e| (400, e.to_string()))?;
    if signer.to_der().ok().as_deref() != Some(sh.upload_cert_der.as_slice()) {
        return Err((
            403,
            "the CMS is not signed by the country's upload certificate".into(),
        ));
    }
    Ok(content)
}

async fn handle(req: Request<Incoming>, sh: &Shared) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, 32 * 1024 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(400, format!("body: {e}")),
    };
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
    };
    let content_type = header(http::header::CONTENT_TYPE);
    match (parts.method.clone(), parts.uri.path()) {
        (Method::POST, "/revocation-list") => {
            {
                let mut st = sh.lock();
                st.requests += 1;
                if let Some((status, n)) = st.fail {
                    if n > 0 {
                        st.fail = if n > 1 { Some((status, n - 1)) } else { None };
                        return text(status, format!("scripted failure {status}"));
                    }
                }
            }
            let content = match open_signed(sh, content_type.as_deref(), &body) {
                Ok(c) => c,
                Err((status, msg)) => return text(status, msg),
            };
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let parsed = match parse_batch_json(&content, now) {
                Ok(p) => p,
                Err(e) => return text(400, e.to_string()),
            };
            if parsed.country != sh.country {
                return text(
                    403,
                    format!(
                        "country: {} is not the uploader's country {}",
                        parsed.country, sh.country
                    ),
                );
            }
            let json: Value = serde_json::from_slice(&content).unwrap();
            let der = base64::engine::general_purpose::STANDARD
                .decode(
                    body.iter()
                        .copied()
                        .filter(|b| !b.is_ascii_whitespace())
                        .collect::<Vec<_>>(),
                )
                .unwrap();
            let id = new_id();
            let mut st = sh.lock();
            let changed = next_date(&mut st);
            st.batches.push(Stored {
                public: StoredBatch {
                    batch_id: id.clone(),
                    json,
                    cms: der,
                    deleted: false,
                    date: rfc3339(changed),
                },
                changed,
            });
            let mut r = answer(201, Bytes::new());
            r.headers_mut()
                .insert(http::header::ETAG, format!("\"{id}\"").parse().unwrap());
            r
        }
        (Method::POST, "/revocation-list/delete") => {
            let content = match open_signed(sh, content_type.as_deref(), &body) {
                Ok(c) => c,
                Err((status, msg)) => return text(status, msg),
            };
            let id = match parse_delete_json(&content) {
                Ok(id) => id,
                Err(e) => return text(400, e.to_string()),
            };
            let mut st = sh.lock();
            let changed = next_date(&mut st);
            match st
                .batches
                .iter_mut()
                .find(|b| b.public.batch_id == id && !b.public.deleted)
            {
                None => text(404, format!("no batch {id}")),
                Some(b) => {
                    b.public.deleted = true;
                    b.public.date = rfc3339(changed);
                    b.changed = changed;
                    answer(204, Bytes::new())
                }
            }
        }
        (Method::GET, "/revocation-list") => {
            let Some(since) = header(http::header::IF_MODIFIED_SINCE) else {
                return text(400, "If-Modified-Since is required");
            };
            let Ok(since) = OffsetDateTime::parse(&since, &Rfc3339) else {
                return text(
                    400,
                    format!("If-Modified-Since: {since:?} is not an ISO 8601 date-time"),
                );
            };
            if since > OffsetDateTime::now_utc() {
                return text(400, "IfModifiedSince must be in past");
            }
            let st = sh.lock();
            let mut newer: Vec<&Stored> = st.batches.iter().filter(|b| b.changed > since).collect();
            if newer.is_empty() {
                return answer(204, Bytes::new());
            }
            newer.sort_by_key(|b| b.changed);
            let more = newer.len() > st.page_size;
            let batches: Vec<Value> = newer
                .iter()
                .take(st.page_size)
                .map(|b| {
                    json!({
                        "batchId": b.public.batch_id,
                        "country": sh.country,
                        "date": b.public.date,
                        "deleted": b.public.deleted,
                    })
                })
                .collect();
            let mut r = answer(
                200,
                serde_json::to_vec(&json!({"more": more, "batches": batches})).unwrap(),
            );
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                "application/json".parse().unwrap(),
            );
            r
        }
        (Method::POST, "/events") => match serde_json::from_slice::<Value>(&body) {
            Ok(v) => {
                sh.lock().events.push(v);
                answer(200, Bytes::new())
            }
            Err(e) => text(400, format!("not JSON: {e}")),
        },
        (_, "/revocation-list" | "/revocation-list/delete" | "/events") => {
            text(405, "method not allowed")
        }
        (_, p) => text(404, format!("no route {p}")),
    }
}
