//! The signing pipeline: payload → validation → UVCI → CWT → ledger reservation → signature in
//! the HSM → ledger completion → COSE_Sign1 → HC1.
//!
//! Data flows one way through `dcc` (what may be signed), `cose` (the bytes), `ledger` (the
//! record) and `hsm` (the signature). The order of the two ledger commits around the HSM call is
//! the record-before-sign invariant: no signature exists without a durable reservation, and no
//! signature is returned before its completed row is durable.

mod error;
mod lifetime;

pub use error::IssueError;
pub use lifetime::{expiry, LifetimePolicy};

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::config::Config;
use crate::cose::{self, CwtClaims, ProtectedHeader};
use crate::dcc::{self, CertType, Policy};
use crate::hsm::SigningPool;
use crate::keys::{ActiveDsc, DscSet};
use crate::ledger::{Ledger, LedgerError, Reservation};
use crate::revocation::hash;

/// A payload as received: DCC JSON or DCC CBOR.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// UTF-8 JSON like the schema's examples.
    Json(&'a [u8]),
    /// The DCC map in CBOR.
    Cbor(&'a [u8]),
}

/// A signed certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The UVCI (`ci`), given or generated.
    pub uvci: String,
    /// `HC1:` + Base45(zlib(COSE)).
    pub hc1: String,
    /// The tagged COSE_Sign1 bytes.
    pub cose: Vec<u8>,
    /// kid of the signing DSC.
    pub kid: [u8; 8],
    /// Certificate type.
    pub cert_type: CertType,
    /// Issued-at (Unix seconds).
    pub iat: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
}

/// Static settings of the issuer.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// Issuing country (CWT `iss`, UVCI country).
    pub country: String,
    /// UVCI issuing-entity prefix.
    pub uvci_prefix: String,
    /// Payload rules.
    pub policy: Policy,
    /// Certificate lifetimes.
    pub lifetime: LifetimePolicy,
}

impl IssuerSettings {
    /// Settings from the configuration file.
    pub fn from_config(cfg: &Config) -> Self {
        IssuerSettings {
            country: cfg.issuer.country.clone(),
            uvci_prefix: cfg.issuer.uvci_prefix.clone(),
            policy: Policy {
                issuer_country: cfg.issuer.country.clone(),
                max_sample_age: time::Duration::hours(cfg.validation.max_sample_age_hours.into()),
                clock_skew: time::Duration::seconds(cfg.validation.clock_skew_seconds.into()),
            },
            lifetime: LifetimePolicy::from_config(&cfg.validity),
        }
    }
}

struct Signer {
    dsc: Arc<ActiveDsc>,
    header: ProtectedHeader,
}

/// Validates and signs certificates.
pub struct Issuer {
    settings: IssuerSettings,
    signers: BTreeMap<CertType, Signer>,
    pool: SigningPool,
    ledger: Arc<dyn Ledger>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// An issuer signing with `dscs` through `pool`, recording in `ledger`.
    pub fn new(
        settings: IssuerSettings,
        dscs: &DscSet,
        pool: SigningPool,
        ledger: Arc<dyn Ledger>,
    ) -> Self {
        let signers = dscs
            .iter()
            .map(|(t, d)| {
                (
                    t,
                    Signer {
                        header: ProtectedHeader::es256(d.dsc.kid),
                        dsc: d.clone(),
                    },
                )
            })
            .collect();
        Issuer {
            settings,
            signers,
            pool,
            ledger,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &IssuerSettings {
        &self.settings
    }

    /// The DSC that signs `t`, if any.
    pub fn dsc_for(&self, t: CertType) -> Option<&Arc<ActiveDsc>> {
        self.signers.get(&t).map(|s| &s.dsc)
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The health canary: one signature through the pool with each DSC's key, checked against
    /// the DSC's certified public key, and a ledger write check.
    pub fn canary(&self) -> Result<(), String> {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let mut digest = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut digest);
        for s in self.signers.values() {
            let sig = self
                .pool
                .sign(&s.dsc.key, digest)
                .map_err(|e| format!("HSM: {e}"))?;
            let sig = p256::ecdsa::Signature::from_slice(&sig).map_err(|e| format!("HSM: {e}"))?;
            p256::ecdsa::VerifyingKey::from(&s.dsc.dsc.public_key)
                .verify_prehash(&digest, &sig)
                .map_err(|_| format!("HSM: signature of {} does not verify", s.dsc.dsc.label))?;
        }
        self.ledger
            .check_writable()
            .map_err(|e| format!("ledger: {e}"))
    }

    /// Validates, records and signs one certificate of type `t` at time `now`, generating a
    /// UVCI with the configured prefix when the payload has none.
    pub fn issue(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        self.issue_with_prefix(t, payload, now, &self.settings.uvci_prefix)
    }

    /// Like [`Issuer::issue`], with the UVCI prefix of the calling issuer.
    pub fn issue_with_prefix(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
        uvci_prefix: &str,
    ) -> Result<Issued, IssueError> {
        let json = match payload {
            Payload::Json(b) => dcc::parse_json(b)?,
            Payload::Cbor(b) => dcc::cbor_to_json(b)?,
        };
        let mut dcc = dcc::validate(&json, Some(t), &self.settings.policy, now)?;
        let signer = self.signers.get(&t).ok_or(IssueError::NoSigner(t))?;
        if !signer.dsc.dsc.allows(t) {
            // DscSet::load refuses such a configuration; keep the check next to the signature.
            return Err(IssueError::NoSigner(t));
        }
        let (iat, exp) = expiry(&dcc, &self.settings.lifetime, &signer.dsc.dsc, now)?;
        let given_uvci = dcc.uvci().is_some();
        // A generated UVCI that collides (vanishingly rare) is drawn again.
        for _attempt in 0..3 {
            if !given_uvci {
                let uvci = dcc::uvci::generate(
                    &self.settings.country,
                    uvci_prefix,
                    &mut rand::rngs::OsRng,
                );
                dcc.set_uvci(uvci);
            }
            match self.sign(signer, &dcc, t, iat, exp) {
                Err(IssueError::DuplicateUvci) if !given_uvci => continue,
                other => return other,
            }
        }
        Err(IssueError::DuplicateUvci)
    }

    fn sign(
        &self,
        signer: &Signer,
        dcc: &dcc::Dcc,
        t: CertType,
        iat: i64,
        exp: i64,
    ) -> Result<Issued, IssueError> {
        let uvci = dcc.uvci().unwrap_or_default().to_string();
        let claims = CwtClaims {
            iss: self.settings.country.clone(),
            iat: iat as u64,
            exp: exp as u64,
            hcert: dcc.to_cbor(),
        };
        let payload = claims.to_cbor_bytes();
        let tbs = cose::sign1::sig_structure(&signer.header, &payload);
        let digest: [u8; 32] = Sha256::digest(&tbs).into();

        let reservation = self
            .ledger
            .reserve(&Reservation {
                uci_hash: hash::uci_hash(&uvci),
                country_uci_hash: hash::country_uci_hash(&self.settings.country, &uvci),
                cert_type: t,
                kid: signer.dsc.dsc.kid,
                iat,
                exp,
            })
            .map_err(|e| match e {
                LedgerError::DuplicateUvci { .. } => IssueError::DuplicateUvci,
                other => IssueError::Ledger(other),
            })?;

        let signature = match self.pool.sign(&signer.dsc.key, digest) {
            Ok(s) => s,
            Err(e) => {
                if let Err(release) = self.ledger.release(reservation) {
                    tracing::error!(error = %release, "could not release reservation after HSM failure");
                }
                return Err(IssueError::Hsm(e));
            }
        };
        self.ledger
            .complete(reservation, &hash::signature_hash_es256(&signature))
            .map_err(IssueError::Ledger)?;

        let cose = cose::sign1::assemble(&signer.header, &payload, &signature);
        let hc1 = cose::hc1::encode(&cose);
        Ok(Issued {
            uvci,
            hc1,
            cose,
            kid: signer.dsc.dsc.kid,
            cert_type: t,
            iat,
            exp,
        })
    }
}
