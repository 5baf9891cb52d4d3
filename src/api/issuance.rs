//! `dccsign.v1.Issuance`: Issue, IssueStream and GetSigningInfo.
//!
//! Signing runs as async tasks: the pipeline awaits the ledger writer's group commits and the
//! HSM workers through oneshot replies, so no thread is parked per request and PKCS#11 and
//! SQLite writes never run on the runtime's threads. QR rendering, the one CPU-heavy optional
//! step, runs on the blocking pool.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::authz::{Authorizer, Caller, Service};
use super::error::{self, codes};
use super::limits::Limits;
use super::pb;
use crate::config::GivenUvci;
use crate::dcc::CertType;
use crate::issuance::{IssueError, Issued, Issuer, Payload, RequestContext};

/// The service.
#[derive(Clone)]
pub struct IssuanceService {
    issuer: Arc<Issuer>,
    authz: Arc<Authorizer>,
    limits: Arc<Limits>,
    max_stream_items: u64,
}

impl std::fmt::Debug for IssuanceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuanceService").finish_non_exhaustive()
    }
}

/// How many items of one stream are signed concurrently.
const STREAM_CONCURRENCY: usize = 64;

/// Most items in one `IssueBatchRequest`.
pub const MAX_BATCH_ITEMS: usize = 256;

/// How many items of one `IssueBatches` stream are signed concurrently (several batches).
const BATCH_STREAM_CONCURRENCY: usize = 512;

/// The next message of a client's stream; `None` at its end or on a client error (logged).
async fn next_message<T>(inbound: &mut Streaming<T>, caller: &Caller) -> Option<T> {
    match inbound.message().await {
        Ok(item) => item,
        Err(e) => {
            tracing::info!(client = %caller.identity, error = %e, "stream ended by client error");
            None
        }
    }
}

fn new_request_id() -> String {
    let mut b = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    format!("srv-{}", hex::encode(b))
}

fn request_id(given: &str) -> Result<String, Status> {
    if given.is_empty() {
        return Ok(new_request_id());
    }
    if given.len() > 128
        || !given
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(error::bad_request(
            "request_id",
            codes::REQUEST_ID_INVALID,
            "request-id-format",
            "must be 1-128 characters of A-Z a-z 0-9 - _ . :",
            "",
        ));
    }
    Ok(given.to_string())
}

fn cert_type(t: i32, rid: &str) -> Result<CertType, Status> {
    match pb::CertificateType::try_from(t)
        .ok()
        .and_then(pb::CertificateType::cert_type)
    {
        Some(t) => Ok(t),
        None => Err(error::bad_request(
            "type",
            codes::TYPE_REQUIRED,
            "type-required",
            "must be TEST, VACCINATION or RECOVERY",
            rid,
        )),
    }
}

pub(super) enum Body {
    Json(String),
    Cbor(Vec<u8>),
}

/// Who asks, for the pipeline: the caller's identity, its request id, the UVCI prefix of its
/// certificates (its own, else the issuer's) and which UVCIs it may give itself.
pub(super) struct Who {
    client: String,
    request_id: String,
    uvci_prefix: String,
    given_uvci: GivenUvci,
}

impl Who {
    /// `caller` with request id `request_id`.
    pub(super) fn new(caller: &Caller, issuer: &Issuer, request_id: String) -> Who {
        Who {
            client: caller.identity.clone(),
            request_id,
            uvci_prefix: caller
                .config
                .uvci_prefix
                .clone()
                .unwrap_or_else(|| issuer.settings().uvci_prefix.clone()),
            given_uvci: caller.config.given_uvci,
        }
    }
}

/// Runs the pipeline for one request in a task of its own, not part of the handler's future: a
/// client that goes away (or whose deadline passes) must not cut the pipeline between
/// reservation and completion, or its retry would find the request "in progress" forever.
pub(super) fn spawn_issue(
    issuer: Arc<Issuer>,
    t: CertType,
    body: Body,
    who: Who,
    replaces: Option<i64>,
) -> tokio::task::JoinHandle<Result<Issued, IssueError>> {
    tokio::spawn(async move { run_issue(&issuer, t, &body, &who, replaces).await })
}

/// The pipeline for one request, in the caller's task: only for callers that are themselves a
/// task no client can cancel (see [`spawn_issue`]).
async fn run_issue(
    issuer: &Issuer,
    t: CertType,
    body: &Body,
    who: &Who,
    replaces: Option<i64>,
) -> Result<Issued, IssueError> {
    let now = time::OffsetDateTime::now_utc();
    let ctx = RequestContext {
        client: &who.client,
        request_id: &who.request_id,
        uvci_prefix: &who.uvci_prefix,
        given_uvci: who.given_uvci,
        replaces,
    };
    let payload = match body {
        Body::Json(j) => Payload::Json(j.as_bytes()),
        Body::Cbor(c) => Payload::Cbor(c),
    };
    issuer.issue_for_async(t, payload, now, ctx).await
}

/// A checked request, ready to sign.
struct Prepared {
    rid: String,
    t: CertType,
    body: Body,
    qr: pb::QrFormat,
}

fn prepare(caller: &Caller, r: pb::IssueRequest) -> Result<Prepared, Status> {
    let rid = request_id(&r.request_id)?;
    let t = cert_type(r.r#type, &rid)?;
    if !caller.may_issue(t) {
        return Err(error::permission_denied(
            &format!("this issuer may not issue {t} certificates"),
            &rid,
        ));
    }
    let body = match r.payload {
        Some(pb::issue_request::Payload::PayloadJson(j)) => Body::Json(j),
        Some(pb::issue_request::Payload::PayloadCbor(c)) => Body::Cbor(c),
        None => {
            return Err(error::bad_request(
                "payload",
                codes::PAYLOAD_REQUIRED,
                "payload-required",
                "give payload_json or payload_cbor",
                &rid,
            ))
        }
    };
    let qr = pb::QrFormat::try_from(r.want_qr).unwrap_or(pb::QrFormat::None);
    Ok(Prepared { rid, t, body, qr })
}

pub(super) fn response(
    rid: String,
    issued: Issued,
    qr: pb::QrFormat,
) -> Result<pb::IssueResponse, Status> {
    let mut resp = pb::IssueResponse {
        request_id: rid,
        uvci: issued.uvci,
        hc1: String::new(),
        cose: issued.cose,
        kid: issued.kid.to_vec(),
        iat: issued.iat,
        exp: issued.exp,
        qr_png: vec![],
        qr_svg: String::new(),
    };
    match qr {
        pb::QrFormat::Png => {
            resp.qr_png =
                crate::cose::qr::png(&issued.hc1).map_err(|e| Status::internal(e.to_string()))?
        }
        pb::QrFormat::Svg => {
            resp.qr_svg =
                crate::cose::qr::svg(&issued.hc1).map_err(|e| Status::internal(e.to_string()))?
        }
        pb::QrFormat::None => {}
    }
    resp.hc1 = issued.hc1;
    Ok(resp)
}

impl IssuanceService {
    /// A service over `issuer`.
    pub fn new(
        issuer: Arc<Issuer>,
        authz: Arc<Authorizer>,
        limits: Arc<Limits>,
        max_stream_items: u64,
    ) -> Self {
        IssuanceService {
            issuer,
            authz,
            limits,
            max_stream_items,
        }
    }

    /// Signs one prepared request in the caller's task; logs and counts the outcome. The
    /// caller is a task of its own (see [`spawn_issue`] for why).
    async fn sign(
        &self,
        caller: &Caller,
        p: Prepared,
    ) -> Result<pb::IssueResponse, (Status, pb::ErrorDetail)> {
        let started = Instant::now();
        let (t, rid, qr) = (p.t, p.rid.clone(), p.qr);
        let who = Who::new(caller, &self.issuer, p.rid);
        let result = run_issue(&self.issuer, t, &p.body, &who, None).await;
        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!("dccsign_request_seconds", "type" => t.as_str()).record(elapsed);
        match result {
            Ok(issued) => {
                metrics::counter!("dccsign_certificates_signed_total",
                    "type" => t.as_str(), "kid" => hex::encode(issued.kid), "client" => caller.identity.clone())
                .increment(1);
                tracing::info!(request_id = %rid, client = %caller.identity, cert_type = %t,
                    kid = %hex::encode(issued.kid), outcome = "signed", latency_ms = elapsed * 1e3, "issue");
                let built = if qr == pb::QrFormat::None {
                    response(rid.clone(), issued, qr)
                } else {
                    let r = rid.clone();
                    tokio::task::spawn_blocking(move || response(r, issued, qr))
                        .await
                        .unwrap_or_else(|e| Err(Status::internal(format!("QR rendering: {e}"))))
                };
                built.map_err(|s| (s, internal_detail(rid)))
            }
            Err(e) => {
                let d = error::detail(&e, &rid);
                metrics::counter!("dccsign_rejections_total", "code" => d.code.clone())
                    .increment(1);
                tracing::info!(request_id = %rid, client = %caller.identity, cert_type = %t,
                    outcome = %d.code, latency_ms = elapsed * 1e3, "issue refused");
                Err((error::from_issue(&e, &rid), d))
            }
        }
    }

    /// One item of a stream or a batch, checked, admitted and signed in the caller's task (a
    /// task of its own); `over` when the stream has carried more items than allowed.
    async fn item(
        &self,
        caller: &Caller,
        item: pb::IssueRequest,
        over: bool,
    ) -> pb::IssueStreamResponse {
        let given = item.request_id.clone();
        let out = if over {
            let s = error::resource_exhausted("the stream carried more items than allowed", &given);
            Err(status_detail(&s, &given))
        } else {
            match prepare(caller, item) {
                Err(s) => Err(status_detail(&s, &given)),
                Ok(p) => match self.limits.admit(&caller.identity, &p.rid) {
                    Err(s) => Err(status_detail(&s, &p.rid)),
                    Ok(_permit) => self.sign(caller, p).await.map_err(|(_, d)| d),
                },
            }
        };
        match out {
            Ok(ok) => pb::IssueStreamResponse {
                request_id: ok.request_id.clone(),
                result: Some(pb::issue_stream_response::Result::Ok(ok)),
            },
            Err(d) => pb::IssueStreamResponse {
                request_id: if d.request_id.is_empty() {
                    given
                } else {
                    d.request_id.clone()
                },
                result: Some(pb::issue_stream_response::Result::Error(d)),
            },
        }
    }
}

/// The detail of an internal error.
fn internal_detail(request_id: String) -> pb::ErrorDetail {
    pb::ErrorDetail {
        code: "2-60-5000".into(),
        request_id,
        violations: vec![],
    }
}

/// An oversized batch: every item gets the same error (built once) and nothing is signed.
fn batch_too_large(items: &[pb::IssueRequest]) -> Vec<pb::IssueStreamResponse> {
    let message = format!("a batch holds at most {MAX_BATCH_ITEMS} items");
    let s = error::bad_request("items", codes::BATCH_TOO_LARGE, "batch-size", &message, "");
    let detail = status_detail(&s, "");
    items
        .iter()
        .map(|item| pb::IssueStreamResponse {
            request_id: item.request_id.clone(),
            result: Some(pb::issue_stream_response::Result::Error(pb::ErrorDetail {
                request_id: item.request_id.clone(),
                ..detail.clone()
            })),
        })
        .collect()
}

fn status_detail(s: &Status, rid: &str) -> pb::ErrorDetail {
    use prost::Message;
    s.metadata()
        .get_bin("dccsign-error-bin")
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| pb::ErrorDetail::decode(b.as_ref()).ok())
        .unwrap_or_else(|| internal_detail(rid.into()))
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::issuance_server::Issuance for IssuanceService {
    async fn issue(
        &self,
        req: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let given = req.get_ref().request_id.clone();
        let caller = self.authz.authorize(&req, Service::Issuance, &given)?;
        let p = prepare(&caller, req.into_inner()).inspect_err(|s| {
            metrics::counter!("dccsign_rejections_total", "code" => status_detail(s, "").code)
                .increment(1);
        })?;
        let permit = self.limits.admit(&caller.identity, &p.rid)?;
        let rid = p.rid.clone();
        let svc = self.clone();
        super::limits::run_admitted(permit, async move { svc.sign(&caller, p).await })
            .await
            .map_err(|e| {
                let d = internal_detail(rid);
                error::status(
                    tonic::Code::Internal,
                    &format!("signing task failed: {e}"),
                    &d,
                )
            })?
            .map(Response::new)
            .map_err(|(s, _)| s)
    }

    type IssueStreamStream = ResponseStream<pb::IssueStreamResponse>;

    async fn issue_stream(
        &self,
        req: Request<Streaming<pb::IssueRequest>>,
    ) -> Result<Response<Self::IssueStreamStream>, Status> {
        let caller = self.authz.authorize(&req, Service::Issuance, "")?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::IssueStreamResponse, Status>>(
            STREAM_CONCURRENCY * 2,
        );
        let svc = self.clone();
        tokio::spawn(async move {
            let gate = Arc::new(tokio::sync::Semaphore::new(STREAM_CONCURRENCY));
            let mut count: u64 = 0;
            while let Some(item) = next_message(&mut inbound, &caller).await {
                count += 1;
                let Ok(slot) = gate.clone().acquire_owned().await else {
                    break;
                };
                let (svc, caller, tx) = (svc.clone(), caller.clone(), tx.clone());
                let over = count > svc.max_stream_items;
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = tx.send(Ok(svc.item(&caller, item, over).await)).await;
                });
                if over {
                    break;
                }
            }
            // Wait for the items in progress before the response stream ends.
            let _ = gate.acquire_many(STREAM_CONCURRENCY as u32).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_signing_info(
        &self,
        req: Request<pb::GetSigningInfoRequest>,
    ) -> Result<Response<pb::GetSigningInfoResponse>, Status> {
        self.authz.authorize(&req, Service::Issuance, "")?;
        let signers = CertType::ALL
            .iter()
            .filter_map(|t| {
                self.issuer.dsc_for(*t).map(|d| pb::SigningInfo {
                    r#type: pb::CertificateType::from(*t) as i32,
                    kid: d.dsc.kid.to_vec(),
                    certificate: d.dsc.cert_der.clone(),
                    not_before: d.dsc.not_before.unix_timestamp(),
                    not_after: d.dsc.not_after.unix_timestamp(),
                })
            })
            .collect();
        Ok(Response::new(pb::GetSigningInfoResponse { signers }))
    }
}

#[tonic::async_trait]
impl pb::bulk_issuance_server::BulkIssuance for IssuanceService {
    type IssueBatchesStream = ResponseStream<pb::IssueBatchResponse>;

    async fn issue_batches(
        &self,
        req: Request<Streaming<pb::IssueBatchRequest>>,
    ) -> Result<Response<Self::IssueBatchesStream>, Status> {
        let caller = self.authz.authorize(&req, Service::Issuance, "")?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::IssueBatchResponse, Status>>(
            BATCH_STREAM_CONCURRENCY / MAX_BATCH_ITEMS * 4,
        );
        let svc = self.clone();
        tokio::spawn(async move {
            let gate = Arc::new(tokio::sync::Semaphore::new(BATCH_STREAM_CONCURRENCY));
            let mut count: u64 = 0;
            while let Some(batch) = next_message(&mut inbound, &caller).await {
                let pb::IssueBatchRequest { batch_id, items } = batch;
                if items.len() > MAX_BATCH_ITEMS {
                    let results = batch_too_large(&items);
                    let _ = tx
                        .send(Ok(pb::IssueBatchResponse { batch_id, results }))
                        .await;
                    continue;
                }
                // Room for every item of the batch (at most MAX_BATCH_ITEMS of the gate's).
                let Ok(slots) = gate.clone().acquire_many_owned(items.len() as u32).await else {
                    break;
                };
                let first = count;
                count += items.len() as u64;
                let (svc, caller, tx) = (svc.clone(), caller.clone(), tx.clone());
                let over = count > svc.max_stream_items;
                tokio::spawn(async move {
                    let _slots = slots;
                    let max = svc.max_stream_items;
                    // The items run concurrently in this one task: no task per item.
                    let results = futures_util::future::join_all(
                        items
                            .into_iter()
                            .enumerate()
                            .map(|(i, item)| svc.item(&caller, item, first + i as u64 >= max)),
                    )
                    .await;
                    let _ = tx
                        .send(Ok(pb::IssueBatchResponse { batch_id, results }))
                        .await;
                });
                if over {
                    break;
                }
            }
            // Wait for the batches in progress before the response stream ends.
            let _ = gate.acquire_many(BATCH_STREAM_CONCURRENCY as u32).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
