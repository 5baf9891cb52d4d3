//! `dccsign.v1.Revocation`: revoke and replace certificates, export batches, run the outbox,
//! serve the signed verifier list. Issuers act only on certificates the ledger records as
//! theirs; officers act on any; bulk revocation is a two-person operation of the key manager.
//! Logs carry the kid and the outcome, never the UVCI.

use std::sync::Arc;

use serde_json::json;
use tonic::{Request, Response, Status};

use super::authz::{Authorizer, Caller, Service};
use super::issuance::{spawn_issue, Body, Who};
use super::limits::{run_admitted, Limits};
use super::{error, pb};
use crate::config::Role;
use crate::dcc::CertType;
use crate::issuance::{IssueError, Issuer};
use crate::keys::KeyManager;
use crate::revocation::engine::{EngineError, RevocationEngine, BULK_OPERATION};
use crate::revocation::store::{CertificateInfo, Reason, StoreError};
use crate::revocation::{hash, rfc3339};

/// The service.
#[derive(Clone)]
pub struct RevocationService {
    engine: Arc<RevocationEngine>,
    issuer: Arc<Issuer>,
    authz: Arc<Authorizer>,
    manager: Arc<KeyManager>,
    limits: Arc<Limits>,
}

impl std::fmt::Debug for RevocationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationService").finish_non_exhaustive()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn bad(field: &'static str, message: &str) -> Status {
    error::from_revocation(&EngineError::Store(StoreError::Invalid {
        field,
        message: message.into(),
    }))
}

fn officer_only(caller: &Caller) -> Result<(), Status> {
    if caller.config.role == Role::Officer {
        Ok(())
    } else {
        Err(error::permission_denied(
            "only security officers may call this method",
            "",
        ))
    }
}

fn parse_time(field: &'static str, s: &str) -> Result<i64, Status> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| bad(field, "must be RFC 3339, e.g. 2026-12-01T00:00:00Z"))
}

impl RevocationService {
    /// A service over the engine; replacements are issued by `issuer`; bulk revocations go
    /// through `manager`'s two-person operations. Every call counts against the caller's
    /// `limits`, the same ones its issuance requests count against.
    pub fn new(
        engine: Arc<RevocationEngine>,
        issuer: Arc<Issuer>,
        authz: Arc<Authorizer>,
        manager: Arc<KeyManager>,
        limits: Arc<Limits>,
    ) -> Self {
        RevocationService {
            engine,
            issuer,
            authz,
            manager,
            limits,
        }
    }

    /// Authorises the caller for `service` and admits the call under its limits (requests in
    /// flight and rate: overload is refused with RESOURCE_EXHAUSTED here as on issuance), then
    /// runs `work` in a task of its own that holds the permit ([`run_admitted`]): a client that
    /// goes away cannot cut a change short of its audit entry, and its place in the in-flight
    /// limit is kept until the work ends.
    async fn call<R, T, F>(
        &self,
        req: Request<R>,
        service: Service,
        work: impl FnOnce(RevocationService, Caller, R) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<Response<T>, Status>> + Send + 'static,
        T: Send + 'static,
    {
        let caller = self.authz.authorize(&req, service, "")?;
        let permit = self.limits.admit(&caller.identity, "")?;
        let work = work(self.clone(), caller, req.into_inner());
        run_admitted(permit, work)
            .await
            .map_err(|e| Status::internal(format!("revocation task failed: {e}")))?
    }

    /// Runs blocking store/token work on the blocking pool, mapping its error once.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RevocationEngine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, Status> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| Status::internal(format!("revocation task failed: {e}")))?
            .map_err(|e| error::from_revocation(&e))
    }

    /// Appends the audit entry of a revocation, lift or replacement that took effect (see
    /// [`KeyManager::record_external`]). The parameters name the ledger row and the kid, never
    /// the UVCI. An entry that cannot be written fails the call with INTERNAL, saying that the
    /// change itself stands.
    async fn audit(
        &self,
        caller: &Caller,
        operation: &'static str,
        parameters: serde_json::Value,
        result: String,
    ) -> Result<(), Status> {
        let (m, who) = (self.manager.clone(), caller.identity.clone());
        let written = tokio::task::spawn_blocking(move || {
            m.record_external(&who, operation, parameters, &result, now())
        })
        .await
        .map_err(|e| Status::internal(format!("audit task failed: {e}")))?;
        written.map_err(|e| {
            tracing::error!(client = %caller.identity, operation, error = %e,
                "the change took effect but its audit entry could not be written");
            Status::internal(format!(
                "{operation} took effect, but its audit entry could not be written: {e}"
            ))
        })
    }

    /// The certificate a UVCI names, if the caller may act on it.
    async fn certificate(&self, caller: &Caller, uvci: &str) -> Result<CertificateInfo, Status> {
        let uvci = uvci.trim();
        if uvci.is_empty() {
            return Err(bad("uvci", "required"));
        }
        let h = hash::uci_hash(uvci);
        let found = self
            .run(move |e| e.store().find(&h).map_err(EngineError::from))
            .await?
            .ok_or_else(|| error::from_revocation(&EngineError::Store(StoreError::NotFound)))?;
        if caller.config.role != Role::Officer
            && found.issuer.as_deref() != Some(caller.identity.as_str())
        {
            tracing::warn!(client = %caller.identity, kid = %hex::encode(found.kid),
                code = "2-60-8003", "refused: certificate issued by another client");
            return Err(error::not_your_certificate());
        }
        Ok(found)
    }
}

impl RevocationService {
    async fn revoke_now(
        &self,
        caller: Caller,
        r: pb::RevokeRequest,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let reason: Reason = r
            .reason
            .parse()
            .map_err(|e| error::from_revocation(&EngineError::Store(e)))?;
        if reason == Reason::Replaced {
            return Err(bad("reason", "\"replaced\" is set by Replace only"));
        }
        let until = match r.until.trim() {
            "" => None,
            s => Some(parse_time("until", s)?),
        };
        let cert = self.certificate(&caller, &r.uvci).await?;
        let by = caller.identity.clone();
        let id = cert.id;
        let outcome = self
            .run(move |e| {
                e.store()
                    .revoke(id, reason, &by, until, now())
                    .map_err(EngineError::from)
            })
            .await?;
        tracing::info!(client = %caller.identity, kid = %hex::encode(cert.kid), reason = reason.as_str(),
            version = outcome.version, already = outcome.already, "certificate revoked");
        self.audit(
            &caller,
            "revocation.revoke",
            json!({"certificate_id": id, "kid": hex::encode(cert.kid),
                   "reason": reason.as_str(), "until": until}),
            if outcome.already {
                format!("ok: already revoked (list version {})", outcome.version)
            } else {
                format!("ok: list version {}", outcome.version)
            },
        )
        .await?;
        metrics::counter!("dccsign_revocations_total", "reason" => reason.as_str()).increment(1);
        Ok(Response::new(pb::RevokeResponse {
            version: outcome.version,
            already_revoked: outcome.already,
            kid: cert.kid.to_vec(),
        }))
    }

    async fn replace_now(
        &self,
        caller: Caller,
        r: pb::ReplaceRequest,
    ) -> Result<Response<pb::ReplaceResponse>, Status> {
        if caller.config.role != Role::Issuer {
            return Err(error::permission_denied(
                "only issuers replace certificates (officers revoke)",
                "",
            ));
        }
        let old = self.certificate(&caller, &r.uvci).await?;
        let t: CertType = old
            .cert_type
            .parse()
            .map_err(|_| Status::internal("ledger row with an unknown type"))?;
        if !caller.may_issue(t) {
            return Err(error::permission_denied(
                "the client may not issue this certificate type",
                "",
            ));
        }
        let qr = pb::QrFormat::try_from(r.want_qr).unwrap_or(pb::QrFormat::None);
        let body = r
            .payload
            .ok_or_else(|| bad("payload", "payload_json or payload_cbor is required"))?;
        // The request id derives from the replaced certificate: a retried replacement returns
        // the same new certificate instead of a second one.
        let old_hash = hash::uci_hash(r.uvci.trim());
        let rid = format!("replace:{}", hex::encode(old_hash));
        let body = match body {
            pb::replace_request::Payload::PayloadJson(j) => Body::Json(j),
            pb::replace_request::Payload::PayloadCbor(c) => Body::Cbor(c),
        };
        let who = Who::new(&caller, &self.issuer, rid.clone());
        let task = spawn_issue(self.issuer.clone(), t, body, who, Some(old.id));
        let issued = task
            .await
            .map_err(|e| Status::internal(format!("replacement task failed: {e}")))?
            .map_err(|e| match e {
                // The same replacement again is a retry (same answer); another payload for a
                // certificate already replaced is refused as such.
                IssueError::RequestIdReused => error::from_issue(
                    &IssueError::NotReplaceable("it is already replaced".into()),
                    &rid,
                ),
                other => error::from_issue(&other, &rid),
            })?;
        tracing::info!(client = %caller.identity, old_kid = %hex::encode(old.kid),
            kid = %hex::encode(issued.kid), "certificate replaced");
        self.audit(
            &caller,
            "revocation.replace",
            json!({"certificate_id": old.id, "kid": hex::encode(old.kid),
                   "new_kid": hex::encode(issued.kid)}),
            "ok: replaced (a retry gets the same answer)".into(),
        )
        .await?;
        metrics::counter!("dccsign_revocations_total", "reason" => "replaced").increment(1);
        let resp = tokio::task::spawn_blocking(move || super::issuance::response(rid, issued, qr))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::ReplaceResponse {
            certificate: Some(resp),
        }))
    }

    async fn lift_now(
        &self,
        caller: Caller,
        r: pb::LiftRequest,
    ) -> Result<Response<pb::LiftResponse>, Status> {
        officer_only(&caller)?;
        let cert = self.certificate(&caller, &r.uvci).await?;
        let by = caller.identity.clone();
        let id = cert.id;
        let version = self
            .run(move |e| e.store().lift(id, &by, now()).map_err(EngineError::from))
            .await?;
        tracing::info!(client = %caller.identity, kid = %hex::encode(cert.kid), version, "revocation lifted");
        self.audit(
            &caller,
            "revocation.lift",
            json!({"certificate_id": id, "kid": hex::encode(cert.kid)}),
            format!("ok: list version {version}"),
        )
        .await?;
        Ok(Response::new(pb::LiftResponse { version }))
    }

    async fn bulk_now(
        &self,
        caller: Caller,
        r: pb::BulkRevocationRequest,
    ) -> Result<Response<pb::Operation>, Status> {
        officer_only(&caller)?;
        let reason: Reason = r
            .reason
            .parse()
            .map_err(|e| error::from_revocation(&EngineError::Store(e)))?;
        if matches!(reason, Reason::Replaced | Reason::Suspended) {
            return Err(bad(
                "reason",
                "bulk revocation takes wrong-patient, serious-error or fraud",
            ));
        }
        let params = match r.selector {
            Some(pb::bulk_revocation_request::Selector::Kid(kid)) => {
                if kid.len() != 8 {
                    return Err(bad("kid", "must be 8 bytes"));
                }
                json!({"reason": reason.as_str(), "kid": hex::encode(kid)})
            }
            Some(pb::bulk_revocation_request::Selector::Issuer(w)) => {
                if w.issuer.trim().is_empty() {
                    return Err(bad("issuer.issuer", "required"));
                }
                let from = parse_time("issuer.from", &w.from)?;
                let to = parse_time("issuer.to", &w.to)?;
                if to <= from {
                    return Err(bad("issuer.to", "must be after issuer.from"));
                }
                json!({"reason": reason.as_str(), "issuer": w.issuer, "from": from, "to": to})
            }
            None => return Err(bad("selector", "kid or issuer is required")),
        };
        let m = self.manager.clone();
        let officer = caller.identity.clone();
        let op = tokio::task::spawn_blocking(move || {
            m.request_operation(&officer, BULK_OPERATION, params, now())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| error::from_key_op(&e))?;
        Ok(Response::new(super::keys::op_info(op)))
    }

    async fn export_now(
        &self,
        caller: Caller,
        _r: pb::ExportBatchesRequest,
    ) -> Result<Response<pb::ExportBatchesResponse>, Status> {
        officer_only(&caller)?;
        let (built, batches) = self
            .run(|e| {
                let built = e.build_batches(now())?;
                Ok((built, e.store().batches(true)?))
            })
            .await?;
        Ok(Response::new(pb::ExportBatchesResponse {
            built: built as i64,
            batches: batches
                .into_iter()
                .map(|b| pb::Batch {
                    id: b.id,
                    kid: b.kid.to_vec(),
                    hash_type: b.hash_type,
                    expires: rfc3339(b.expires),
                    entries: b.entries,
                    json: b.json,
                    cms: b.cms,
                    state: b.state,
                    gateway_id: b.gateway_id.unwrap_or_default(),
                    upload_state: b.upload_state.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn publish_now(
        &self,
        caller: Caller,
        _r: pb::RunOutboxRequest,
    ) -> Result<Response<pb::RunOutboxResponse>, Status> {
        officer_only(&caller)?;
        let r = self
            .engine
            .run_once(now())
            .await
            .map_err(|e| error::from_revocation(&e))?;
        Ok(Response::new(pb::RunOutboxResponse {
            lifted_suspensions: r.lifted_suspensions as i64,
            batches_built: r.batches_built as i64,
            events_queued: r.events_queued as i64,
            delivered: r.delivered as i64,
            retried: r.retried as i64,
            failed: r.failed as i64,
            purged_certificates: r.purged_certificates as i64,
            unknown_gateway_batches: r.unknown_gateway_batches as i64,
        }))
    }

    async fn get_list_now(
        &self,
        _caller: Caller,
        r: pb::GetListRequest,
    ) -> Result<Response<pb::GetListResponse>, Status> {
        let kid: [u8; 8] = r
            .kid
            .as_slice()
            .try_into()
            .map_err(|_| bad("kid", "must be 8 bytes"))?;
        let since = match r.since {
            Some(v) if v < 0 => return Err(bad("since", "must be ≥ 0")),
            Some(v) => Some(v as u64),
            None => None,
        };
        let (list, version) = self.run(move |e| e.signed_list(kid, since, now())).await?;
        Ok(Response::new(pb::GetListResponse {
            list,
            version: version as i64,
        }))
    }

    async fn status_now(
        &self,
        caller: Caller,
        _r: pb::StatusRequest,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        if caller.config.role == Role::Issuer {
            return Err(error::permission_denied(
                "only security officers and auditors may call this method",
                "",
            ));
        }
        let (version, st) = self
            .run(|e| Ok((e.store().version()?, e.store().status()?)))
            .await?;
        Ok(Response::new(pb::StatusResponse {
            version,
            counts: st
                .counts
                .into_iter()
                .map(|(kind, target, state, count)| pb::OutboxCount {
                    kind,
                    target,
                    state,
                    count,
                })
                .collect(),
            failures: st
                .failures
                .into_iter()
                .map(
                    |(id, kind, target, attempts, last_error)| pb::OutboxProblem {
                        id,
                        kind,
                        target,
                        attempts,
                        last_error,
                        next_attempt_at: 0,
                    },
                )
                .collect(),
            retrying: st
                .retrying
                .into_iter()
                .map(
                    |(id, kind, target, attempts, next, last_error)| pb::OutboxProblem {
                        id,
                        kind,
                        target,
                        attempts,
                        last_error,
                        next_attempt_at: next,
                    },
                )
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::revocation_server::Revocation for RevocationService {
    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        self.call(req, Service::Revocation, |svc, caller, r| async move {
            svc.revoke_now(caller, r).await
        })
        .await
    }

    async fn replace(
        &self,
        req: Request<pb::ReplaceRequest>,
    ) -> Result<Response<pb::ReplaceResponse>, Status> {
        self.call(req, Service::Revocation, |svc, caller, r| async move {
            svc.replace_now(caller, r).await
        })
        .await
    }

    async fn lift(
        &self,
        req: Request<pb::LiftRequest>,
    ) -> Result<Response<pb::LiftResponse>, Status> {
        self.call(req, Service::Revocation, |svc, caller, r| async move {
            svc.lift_now(caller, r).await
        })
        .await
    }

    async fn request_bulk_revocation(
        &self,
        req: Request<pb::BulkRevocationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        self.call(req, Service::Revocation, |svc, caller, r| async move {
            svc.bulk_now(caller, r).await
        })
        .await
    }

    async fn export_batches(
        &self,
        req: Request<pb::ExportBatchesRequest>,
    ) -> Result<Response<pb::ExportBatchesResponse>, Status> {
        self.call(req, Service::Revocation, |svc, caller, r| async move {
            svc.export_now(caller, r).await
        })
        .await
    }

    async fn publish(
        &self,
        req: Request<pb::RunOutboxRequest>,
    ) -> Result<Response<pb::RunOutboxResponse>, Status> {
        self.call(req, Service::Revocation, |svc, caller, r| async move {
            svc.publish_now(caller, r).await
        })
        .await
    }

    async fn get_list(
        &self,
        req: Request<pb::GetListRequest>,
    ) -> Result<Response<pb::GetListResponse>, Status> {
        self.call(req, Service::RevocationRead, |svc, caller, r| async move {
            svc.get_list_now(caller, r).await
        })
        .await
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.call(req, Service::RevocationRead, |svc, caller, r| async move {
            svc.status_now(caller, r).await
        })
        .await
    }
}
