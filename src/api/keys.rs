//! `dccsign.v1.Keys`: the key-lifecycle service for security officers. For now read-only
//! (`ListKeys`); issuers are refused by the service's role allow-list.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::authz::{Authorizer, Service};
use super::pb;
use crate::dcc::CertType;
use crate::issuance::Issuer;

/// The service.
#[derive(Clone)]
pub struct KeysService {
    issuer: Arc<Issuer>,
    authz: Arc<Authorizer>,
    token_label: String,
}

impl std::fmt::Debug for KeysService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeysService").finish_non_exhaustive()
    }
}

impl KeysService {
    /// A service over the issuer's DSCs.
    pub fn new(issuer: Arc<Issuer>, authz: Arc<Authorizer>, token_label: String) -> Self {
        KeysService {
            issuer,
            authz,
            token_label,
        }
    }
}

#[tonic::async_trait]
impl pb::keys_server::Keys for KeysService {
    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let caller = self.authz.authorize(&req, Service::Keys, "")?;
        let mut keys: Vec<pb::KeyInfo> = Vec::new();
        for t in CertType::ALL {
            let Some(d) = self.issuer.dsc_for(t) else {
                continue;
            };
            if keys.iter().any(|k| k.label == d.key.label) {
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
            });
        }
        tracing::info!(client = %caller.identity, keys = keys.len(), "list keys");
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }
}
