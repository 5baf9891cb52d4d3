//! Authorization: the caller's identity comes only from its verified client certificate; the
//! configuration maps identities to a role; each gRPC service admits some roles only (Boulder's
//! per-service allow-lists), and issuers only the certificate types they were given.

use std::collections::HashMap;

use tonic::{Request, Status};

use super::error::permission_denied;
use super::tls::Peer;
use crate::config::{ClientConfig, Role};
use crate::dcc::CertType;

/// The gRPC services and the roles each admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `dccsign.v1.Issuance`: issuers only.
    Issuance,
    /// `dccsign.v1.Keys`: key lifecycle, security officers only.
    Keys,
    /// `dccsign.v1.Revocation`: issuers (their own certificates) and officers (method checks
    /// narrow it further).
    Revocation,
    /// The read-only methods of `dccsign.v1.Keys` (keys, pending operations, trust list):
    /// officers and auditors.
    KeysRead,
    /// The read-only methods of `dccsign.v1.Revocation` (the verifier list, the store's
    /// status): issuers, officers and auditors (method checks narrow it further).
    RevocationRead,
}

impl Service {
    /// Roles allowed to call the service.
    pub fn allowed_roles(self) -> &'static [Role] {
        match self {
            Service::Issuance => &[Role::Issuer],
            Service::Keys => &[Role::Officer],
            Service::Revocation => &[Role::Issuer, Role::Officer],
            Service::KeysRead => &[Role::Officer, Role::Auditor],
            Service::RevocationRead => &[Role::Issuer, Role::Officer, Role::Auditor],
        }
    }
}

/// An authenticated, authorised caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The identity from the client certificate.
    pub identity: String,
    /// Its configuration.
    pub config: ClientConfig,
}

impl Caller {
    /// Whether this issuer may issue type `t`.
    pub fn may_issue(&self, t: CertType) -> bool {
        self.config.role == Role::Issuer && self.config.types.contains(&t)
    }
}

/// Identity → configuration.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    clients: HashMap<String, ClientConfig>,
}

impl Authorizer {
    /// From the `[[client]]` sections.
    pub fn new(clients: &[ClientConfig]) -> Self {
        Authorizer {
            clients: clients
                .iter()
                .map(|c| (c.identity.clone(), c.clone()))
                .collect(),
        }
    }

    /// The caller of `req` if it may call `service`; PERMISSION_DENIED (`2-60-9001`) otherwise.
    pub fn authorize<T>(
        &self,
        req: &Request<T>,
        service: Service,
        request_id: &str,
    ) -> Result<Caller, Status> {
        let identity = req
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.identity.clone())
            .ok_or_else(|| {
                permission_denied(
                    "the client certificate carries no URI or DNS identity",
                    request_id,
                )
            })?;
        let config = self.clients.get(&identity).ok_or_else(|| {
            permission_denied("the client identity is not configured", request_id)
        })?;
        if !service.allowed_roles().contains(&config.role) {
            return Err(permission_denied(
                "the client's role may not call this service",
                request_id,
            ));
        }
        Ok(Caller {
            identity,
            config: config.clone(),
        })
    }
}
