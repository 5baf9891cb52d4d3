//! `dccsign.v1.Keys`: the key-lifecycle service for security officers (issuers are refused by
//! the service's role allow-list). The officer's identity comes from the mTLS certificate only;
//! the work is done by [`KeyManager`] on the blocking pool (PKCS#11 and SQLite).

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status};

use super::authz::{Authorizer, Caller, Service};
use super::limits::Limits;
use super::{error, pb};
use crate::dcc::CertType;
use crate::issuance::Issuer;
use crate::keys::{KeyManager, KeyOpError, ManagedKey, Operation};

/// The service.
#[derive(Clone)]
pub struct KeysService {
    issuer: Arc<Issuer>,
    authz: Arc<Authorizer>,
    limits: Arc<Limits>,
    token_label: String,
    manager: Option<Arc<KeyManager>>,
}

impl std::fmt::Debug for KeysService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeysService").finish_non_exhaustive()
    }
}

impl KeysService {
    /// A service over the issuer's DSCs and, when given, the managed keys; its calls count
    /// against each caller's `limits`, like issuance and revocation calls.
    pub fn new(
        issuer: Arc<Issuer>,
        (authz, limits): (Arc<Authorizer>, Arc<Limits>),
        token_label: String,
        manager: Option<Arc<KeyManager>>,
    ) -> Self {
        KeysService {
            issuer,
            authz,
            limits,
            token_label,
            manager,
        }
    }

    /// Authorises the caller for `service` and admits the call under its limits (requests in
    /// flight and rate): overload is refused with RESOURCE_EXHAUSTED.
    fn admit<T>(
        &self,
        req: &Request<T>,
        service: Service,
    ) -> Result<(Caller, OwnedSemaphorePermit), Status> {
        let caller = self.authz.authorize(req, service, "")?;
        let permit = self.limits.admit(&caller.identity, "")?;
        Ok((caller, permit))
    }

    /// Runs `f` with the key manager on the blocking pool, mapping its error once. The call's
    /// `permit` goes with the work, so a caller that goes away keeps its place until it ends.
    async fn run<T: Send + 'static>(
        &self,
        permit: OwnedSemaphorePermit,
        f: impl FnOnce(&KeyManager, i64) -> Result<T, KeyOpError> + Send + 'static,
    ) -> Result<T, Status> {
        let Some(m) = self.manager.clone() else {
            return Err(Status::failed_precondition(
                "key lifecycle is not configured ([keys] in dccsign.toml)",
            ));
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&m, now)
        })
        .await
        .map_err(|e| Status::internal(format!("key operation task failed: {e}")))?
        .map_err(|e| error::from_key_op(&e))
    }
}

pub(super) fn op_info(o: Operation) -> pb::Operation {
    pb::Operation {
        id: o.id,
        operation: o.operation,
        parameters_json: o.parameters.to_string(),
        requester: o.requester,
        created_at: o.created_at,
        expires_at: o.expires_at,
        state: o.state,
        approver: o.approver.unwrap_or_default(),
        result: o.result.unwrap_or_default(),
    }
}

fn key_info(token_label: &str, k: ManagedKey) -> pb::KeyInfo {
    pb::KeyInfo {
        uri: crate::hsm::KeyUri::new(token_label, &k.label, Some(k.key_id.clone())).to_string(),
        label: k.label,
        kid: k.kid.map(|k| k.to_vec()).unwrap_or_default(),
        types: k
            .types
            .iter()
            .map(|t| pb::CertificateType::from(*t) as i32)
            .collect(),
        not_before: k.not_before.unwrap_or_default(),
        not_after: k.not_after.unwrap_or_default(),
        state: k.state.to_string(),
        managed: true,
        usage_end: k.usage_end.unwrap_or_default(),
        created_at: k.created_at,
        certificates_signed: 0,
    }
}

#[tonic::async_trait]
impl pb::keys_server::Keys for KeysService {
    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let (caller, permit) = self.admit(&req, Service::KeysRead)?;
        let (managed, counts) = if self.manager.is_some() {
            self.run(permit, |m, _| Ok((m.list()?, m.signed_counts()?)))
                .await?
        } else {
            (vec![], Default::default())
        };
        let mut keys: Vec<pb::KeyInfo> = Vec::new();
        // Configured DSCs that sign now (a managed key that signs is listed with the managed).
        for t in CertType::ALL {
            let Some(d) = self.issuer.dsc_for(t) else {
                continue;
            };
            if keys.iter().any(|k| k.label == d.key.label)
                || managed.iter().any(|m| m.label == d.key.label)
            {
                continue;
            }
            keys.push(pb::KeyInfo {
                uri: crate::hsm::KeyUri::new(
                    &self.token_label,
                    &d.key.label,
                    Some(d.key.id.clone()),
                )
                .to_string(),
                label: d.key.label.clone(),
                kid: d.dsc.kid.to_vec(),
                types: d
                    .types
                    .iter()
                    .map(|t| pb::CertificateType::from(*t) as i32)
                    .collect(),
                not_before: d.dsc.not_before.unix_timestamp(),
                not_after: d.dsc.not_after.unix_timestamp(),
                state: "active".into(),
                managed: false,
                usage_end: 0,
                created_at: 0,
                certificates_signed: counts.get(&d.dsc.kid).copied().unwrap_or(0),
            });
        }
        keys.extend(managed.into_iter().map(|k| {
            let n = k.kid.and_then(|kid| counts.get(&kid).copied()).unwrap_or(0);
            pb::KeyInfo {
                certificates_signed: n,
                ..key_info(&self.token_label, k)
            }
        }));
        tracing::info!(client = %caller.identity, keys = keys.len(), "list keys");
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn generate_key(
        &self,
        req: Request<pb::GenerateKeyRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let r = req.into_inner();
        let mut types = Vec::new();
        for t in r.types {
            match pb::CertificateType::try_from(t)
                .ok()
                .and_then(pb::CertificateType::cert_type)
            {
                Some(t) if !types.contains(&t) => types.push(t),
                Some(_) => {}
                None => {
                    return Err(error::from_key_op(&KeyOpError::Invalid {
                        field: "types",
                        message: "each must be TEST, VACCINATION or RECOVERY".into(),
                    }))
                }
            }
        }
        let op = self
            .run(permit, move |m, now| {
                let role = if r.role.is_empty() { "dsc" } else { &r.role };
                m.request_generate(&officer, &r.label, role, &types, now)
            })
            .await?;
        Ok(Response::new(op_info(op)))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let id = req.into_inner().operation_id;
        let op = self
            .run(permit, move |m, now| m.approve(&officer, &id, now))
            .await?;
        Ok(Response::new(op_info(op)))
    }

    async fn list_pending(
        &self,
        req: Request<pb::ListPendingRequest>,
    ) -> Result<Response<pb::ListPendingResponse>, Status> {
        let (_, permit) = self.admit(&req, Service::KeysRead)?;
        let ops = self.run(permit, |m, _| m.pending()).await?;
        Ok(Response::new(pb::ListPendingResponse {
            operations: ops.into_iter().map(op_info).collect(),
        }))
    }

    async fn create_csr(
        &self,
        req: Request<pb::CreateCsrRequest>,
    ) -> Result<Response<pb::CreateCsrResponse>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let r = req.into_inner();
        let csr_pem = self
            .run(permit, move |m, now| {
                m.csr(&officer, &r.label, &r.subject, now)
            })
            .await?;
        Ok(Response::new(pb::CreateCsrResponse { csr_pem }))
    }

    async fn import_certificate(
        &self,
        req: Request<pb::ImportCertificateRequest>,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let r = req.into_inner();
        let label = self.token_label.clone();
        let k = self
            .run(permit, move |m, now| {
                m.import_cert(&officer, &r.label, &r.certificate, now)
            })
            .await?;
        Ok(Response::new(key_info(&label, k)))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let label = req.into_inner().label;
        let package_base64 = self
            .run(permit, move |m, now| m.publish(&officer, &label, now))
            .await?;
        Ok(Response::new(pb::PublishResponse { package_base64 }))
    }

    async fn activate(
        &self,
        req: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let label = req.into_inner().label;
        let op = self
            .run(permit, move |m, now| {
                m.request_activate(&officer, &label, now)
            })
            .await?;
        Ok(Response::new(op_info(op)))
    }

    async fn retire(
        &self,
        req: Request<pb::RetireRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let label = req.into_inner().label;
        let op = self
            .run(permit, move |m, now| {
                m.request_retire(&officer, &label, now)
            })
            .await?;
        Ok(Response::new(op_info(op)))
    }

    async fn destroy(
        &self,
        req: Request<pb::DestroyRequest>,
    ) -> Result<Response<pb::DestroyResponse>, Status> {
        let (officer, permit) = self.admit(&req, Service::Keys)?;
        let officer = officer.identity;
        let r = req.into_inner();
        let out = self
            .run(permit, move |m, now| {
                let (report, allowed) = m.destroy_report(&r.label, now)?;
                let operation = if r.execute {
                    let reason = Some(r.force_reason.as_str()).filter(|s| !s.is_empty());
                    Some(op_info(m.request_destroy(&officer, &r.label, reason, now)?))
                } else {
                    None
                };
                Ok(pb::DestroyResponse {
                    report,
                    allowed,
                    operation,
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn trust_list(
        &self,
        req: Request<pb::TrustListRequest>,
    ) -> Result<Response<pb::TrustListResponse>, Status> {
        let (_, permit) = self.admit(&req, Service::KeysRead)?;
        let v = self.run(permit, |m, now| m.trust_list(now)).await?;
        Ok(Response::new(pb::TrustListResponse {
            json: serde_json::to_string_pretty(&v).unwrap_or_default(),
        }))
    }
}
