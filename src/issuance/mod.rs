//! The signing pipeline: payload → validation → UVCI → CWT → ledger reservation → signature in
//! the HSM → ledger completion → COSE_Sign1 → HC1.
//!
//! Data flows one way through `dcc` (what may be signed), `cose` (the bytes), `ledger` (the
//! record) and `hsm` (the signature). The order of the two ledger commits around the HSM call is
//! the record-before-sign invariant: no signature exists without a durable reservation, and no
//! signature is returned before its completed row is durable.

mod error;
mod lifetime;
mod pipeline;

pub use error::IssueError;
pub use lifetime::{expiry, LifetimePolicy};

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::config::{Config, GivenUvci};
use crate::cose::{self, CwtClaims, ProtectedHeader};
use crate::dcc::{self, CertType, FieldError, Policy, Rule, ValidationErrors};
use crate::hsm::{SecretKeyHandle, SigningPool, Token};
use crate::keys::{ActiveDsc, DscSet};
use crate::ledger::{Ledger, LedgerError, RequestKey, Reservation, StoredRequest};
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

/// The HMAC key in the token from which generated UVCIs are derived (per client and request
/// id), so that a retried request gets the same UVCI without the ledger storing it.
#[derive(Debug, Clone)]
pub struct UvciKey {
    /// The token holding the key.
    pub token: Arc<Token>,
    /// The key.
    pub key: SecretKeyHandle,
}

/// Who asks: the client identity, its request id (unique per client) and its UVCI prefix.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// The client identity (from its certificate).
    pub client: &'a str,
    /// The request id, unique per client.
    pub request_id: &'a str,
    /// The UVCI prefix for certificates of this client.
    pub uvci_prefix: &'a str,
    /// Which UVCIs this client's payloads may carry themselves.
    pub given_uvci: GivenUvci,
    /// Ledger row of the certificate this one replaces (revoked as `replaced` atomically with
    /// this one's completion).
    pub replaces: Option<i64>,
}

/// What the ledger records with a reservation besides the certificate: the caller's request and
/// the certificate this one replaces.
#[derive(Debug, Default)]
struct Recorded {
    request: Option<RequestKey>,
    replaces: Option<i64>,
}

/// Validates and signs certificates.
pub struct Issuer {
    settings: IssuerSettings,
    /// Swapped as a whole (key refresh after an HSM outage, later rotation); a request keeps
    /// the snapshot it started with.
    signers: RwLock<Arc<BTreeMap<CertType, Arc<Signer>>>>,
    pool: RwLock<Arc<SigningPool>>,
    ledger: Arc<dyn Ledger>,
    uvci_key: RwLock<Option<UvciKey>>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// An issuer signing with `dscs` through `pool`, recording in `ledger`, deriving generated
    /// UVCIs with `uvci_key` when given (random UVCIs otherwise, and then no replay of them).
    pub fn new(
        settings: IssuerSettings,
        dscs: &DscSet,
        pool: SigningPool,
        ledger: Arc<dyn Ledger>,
        uvci_key: Option<UvciKey>,
    ) -> Self {
        let signers = dscs
            .iter()
            .map(|(t, d)| {
                (
                    t,
                    Arc::new(Signer {
                        header: ProtectedHeader::es256(d.dsc.kid),
                        dsc: d.clone(),
                    }),
                )
            })
            .collect();
        Issuer {
            settings,
            signers: RwLock::new(Arc::new(signers)),
            pool: RwLock::new(Arc::new(pool)),
            ledger,
            uvci_key: RwLock::new(uvci_key),
        }
    }

    /// Ends the issuer on this thread: waits (up to `wait`) until the replies of finished
    /// requests, which run on the ledger writer and the HSM workers, have let go of the signing
    /// pool and the ledger, then drops both here, so that their threads are joined before the
    /// caller goes on. A process that exits right after a request (the `sign` command) would
    /// otherwise let a worker close its PKCS#11 session while the token library tears itself
    /// down. Holders other than those replies (the daemon's services) make it wait the whole
    /// `wait`; it is for one-shot callers.
    pub fn close(self, wait: std::time::Duration) {
        let deadline = std::time::Instant::now() + wait;
        let pool = self.pool.into_inner().unwrap_or_else(|p| p.into_inner());
        let ledger = self.ledger;
        while (Arc::strong_count(&pool) > 1 || Arc::strong_count(&ledger) > 1)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(pool);
        drop(ledger);
    }

    fn pool(&self) -> Arc<SigningPool> {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds the HSM side after an outage: reconnects the token, starts a new signing pool of
    /// the same size and looks the keys up again.
    pub fn reconnect_hsm(&self, token: &Token) -> Result<(), String> {
        token.reconnect().map_err(|e| format!("HSM: {e}"))?;
        let size = self.pool().size();
        let pool = token
            .signing_pool(size, 4096)
            .map_err(|e| format!("HSM: {e}"))?;
        self.refresh_keys(token)?;
        *self.pool.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pool);
        Ok(())
    }

    fn signers(&self) -> Arc<BTreeMap<CertType, Arc<Signer>>> {
        self.signers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Looks every DSC key up again by label and checks it still matches its certificate
    /// (object handles change when a token is reloaded, e.g. after an HSM outage).
    pub fn refresh_keys(&self, token: &Token) -> Result<(), String> {
        let current = self.signers();
        let mut fresh = BTreeMap::new();
        for (t, s) in current.iter() {
            let key = token
                .find_key(&s.dsc.key.label)
                .map_err(|e| format!("HSM: {e}"))?;
            if key.public_key != s.dsc.dsc.public_key {
                return Err(format!(
                    "HSM: key {} no longer matches its certificate",
                    key.label
                ));
            }
            let dsc = Arc::new(ActiveDsc {
                dsc: s.dsc.dsc.clone(),
                key,
                types: s.dsc.types.clone(),
                usage_end: s.dsc.usage_end,
            });
            fresh.insert(
                *t,
                Arc::new(Signer {
                    header: s.header.clone(),
                    dsc,
                }),
            );
        }
        let mut uvci_key = self.uvci_key.write().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = uvci_key.as_mut() {
            k.key = token
                .find_hmac_key(&k.key.label)
                .map_err(|e| format!("HSM: {e}"))?;
        }
        drop(uvci_key);
        *self.signers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    /// The settings in force.
    pub fn settings(&self) -> &IssuerSettings {
        &self.settings
    }

    /// The DSC that signs `t`, if any.
    pub fn dsc_for(&self, t: CertType) -> Option<Arc<ActiveDsc>> {
        self.signers().get(&t).map(|s| s.dsc.clone())
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The health canary: one signature through the pool with each DSC's key, checked against
    /// the DSC's certified public key, one more with the token object itself (the pool signs
    /// with session copies, which outlive a software token's store), and a ledger write check.
    pub fn canary(&self) -> Result<(), String> {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let mut digest = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut digest);
        let now = OffsetDateTime::now_utc();
        for s in self.signers().values() {
            // Private key usage period: a metric always, a warning from one month before.
            if let Some(end) = s.dsc.usage_end {
                let left = (end - now).whole_seconds();
                metrics::gauge!("dccsign_dsc_usage_seconds_left", "kid" => s.dsc.dsc.kid_hex())
                    .set(left as f64);
                if left < 30 * 86_400 {
                    tracing::warn!(kid = %s.dsc.dsc.kid_hex(), label = %s.dsc.key.label,
                        seconds_left = left, "DSC private key usage period ends within a month: activate a successor");
                }
            }
            let sig = self
                .pool()
                .sign(&s.dsc.key, digest)
                .map_err(|e| format!("HSM: {e}"))?;
            let sig = p256::ecdsa::Signature::from_slice(&sig).map_err(|e| format!("HSM: {e}"))?;
            p256::ecdsa::VerifyingKey::from(&s.dsc.dsc.public_key)
                .verify_prehash(&digest, &sig)
                .map_err(|_| format!("HSM: signature of {} does not verify", s.dsc.dsc.label))?;
            self.pool()
                .sign_with_token_object(&s.dsc.key, digest)
                .map_err(|e| format!("HSM: {e}"))?;
        }
        if let Some(k) = self.uvci_key() {
            self.pool()
                .hmac(&k.key, b"canary".to_vec())
                .map_err(|e| format!("HSM: {e}"))?;
        }
        self.ledger
            .check_writable()
            .map_err(|e| format!("ledger: {e}"))
    }

    fn uvci_key(&self) -> Option<UvciKey> {
        self.uvci_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Validates, records and signs one certificate of type `t` at time `now`, without a
    /// caller's request id: a generated UVCI is random. Blocks the calling thread (not for use
    /// on an async runtime: see [`Issuer::issue_async`]).
    pub fn issue(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        futures_executor::block_on(self.issue_async(t, payload, now))
    }

    /// [`Issuer::issue`] for async callers: waits for the ledger and the HSM without blocking.
    pub async fn issue_async(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
    ) -> Result<Issued, IssueError> {
        let dcc = self.validated(t, payload, now)?;
        let signer = self.signer(t, now)?;
        let (iat, exp) = expiry(&dcc, &self.settings.lifetime, &signer.dsc.dsc, now)?;
        let given = dcc.uvci().is_some();
        // A random UVCI that collides (vanishingly rare) is drawn again.
        for _attempt in 0..3 {
            let mut dcc = dcc.clone();
            if !given {
                let prefix = &self.settings.uvci_prefix;
                dcc.set_uvci(dcc::uvci::generate(
                    &self.settings.country,
                    prefix,
                    &mut rand::rngs::OsRng,
                ));
            }
            match self
                .sign(&signer, &dcc, t, (iat, exp), Recorded::default())
                .await
            {
                Err(IssueError::DuplicateUvci) if !given => continue,
                other => return other,
            }
        }
        Err(IssueError::DuplicateUvci)
    }

    /// Issues for a caller with a request id, idempotently: the same request id with the same
    /// payload returns the same bytes (rebuilt from the re-sent payload, the recorded times and
    /// the recorded signature — no second signature); with another payload it is refused.
    /// Blocks the calling thread (see [`Issuer::issue_for_async`]).
    pub fn issue_for(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
        ctx: RequestContext<'_>,
    ) -> Result<Issued, IssueError> {
        futures_executor::block_on(self.issue_for_async(t, payload, now, ctx))
    }

    /// [`Issuer::issue_for`] for async callers (the daemon): the ledger's group commits and the
    /// HSM workers are awaited, so no thread waits per request.
    ///
    /// The ledger is not read before issuing: a request id recorded before makes the reservation
    /// fail (`(client, request_id)` is unique), and so does its UVCI or its replacement. Only
    /// when issuing fails before a signature exists is the request looked up, and a recorded one
    /// is then answered as it always was (replayed, refused as reused, or in progress). A read
    /// per request under the reader's lock was ~2 % of the daemon's CPU at saturation.
    pub async fn issue_for_async(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
        ctx: RequestContext<'_>,
    ) -> Result<Issued, IssueError> {
        let request_hash = request_hash(t, payload);
        let e = match self.issue_new(t, payload, now, ctx, request_hash).await {
            Ok(issued) => return Ok(issued),
            // The HSM or the ledger failed: the request's state is not the question.
            Err(e @ (IssueError::Hsm(_) | IssueError::Ledger(_))) => return Err(e),
            Err(e) => e,
        };
        match self
            .ledger
            .find_request(ctx.client, ctx.request_id)
            .map_err(IssueError::Ledger)?
        {
            Some(stored) if stored.request_hash != request_hash => Err(IssueError::RequestIdReused),
            Some(stored) => self.replay(t, payload, ctx, stored).await,
            None => Err(e),
        }
    }

    /// Issues for a request id not seen before (the reservation fails if it was).
    async fn issue_new(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
        ctx: RequestContext<'_>,
        request_hash: [u8; 32],
    ) -> Result<Issued, IssueError> {
        let mut dcc = self.validated(t, payload, now)?;
        let signer = self.signer(t, now)?;
        let (iat, exp) = expiry(&dcc, &self.settings.lifetime, &signer.dsc.dsc, now)?;
        match dcc.uvci() {
            None => dcc.set_uvci(self.derived_uvci(ctx).await?),
            Some(ci)
                if ctx.given_uvci == GivenUvci::OwnPrefix
                    && !dcc::uvci::in_namespace(ci, ctx.uvci_prefix) =>
            {
                return Err(IssueError::Invalid(ValidationErrors(vec![
                    FieldError::new(
                        format!("{}[0].ci", t.payload_key()),
                        Rule::UvciNamespace,
                        format!(
                            "this client's UVCIs must start with URN:UVCI:01:{}:{}/",
                            self.settings.country, ctx.uvci_prefix
                        ),
                    ),
                ])));
            }
            Some(_) => {}
        }
        let key = RequestKey {
            client: ctx.client.to_string(),
            request_id: ctx.request_id.to_string(),
            request_hash,
        };
        let recorded = Recorded {
            request: Some(key),
            replaces: ctx.replaces,
        };
        self.sign(&signer, &dcc, t, (iat, exp), recorded).await
    }

    fn validated(
        &self,
        t: CertType,
        payload: Payload<'_>,
        now: OffsetDateTime,
    ) -> Result<dcc::Dcc, IssueError> {
        let json = match payload {
            Payload::Json(b) => dcc::parse_json(b)?,
            Payload::Cbor(b) => dcc::cbor_to_json(b)?,
        };
        Ok(dcc::validate(&json, Some(t), &self.settings.policy, now)?)
    }

    fn signer(&self, t: CertType, now: OffsetDateTime) -> Result<Arc<Signer>, IssueError> {
        let signer = self
            .signers()
            .get(&t)
            .cloned()
            .ok_or(IssueError::NoSigner(t))?;
        // Never past the private key usage period.
        if signer.dsc.usage_end.is_some_and(|end| now > end) {
            return Err(IssueError::UsagePeriodOver(t));
        }
        // DscSet::load refuses such a configuration; keep the check next to the signature.
        if !signer.dsc.dsc.allows(t) {
            return Err(IssueError::NoSigner(t));
        }
        Ok(signer)
    }

    /// The UVCI for a caller's request: HMAC-SHA256 in the token (on a pool worker's session)
    /// over client and request id.
    async fn derived_uvci(&self, ctx: RequestContext<'_>) -> Result<String, IssueError> {
        match self.uvci_key() {
            Some(k) => {
                let mut data = Vec::with_capacity(ctx.client.len() + ctx.request_id.len() + 1);
                data.extend_from_slice(ctx.client.as_bytes());
                data.push(0);
                data.extend_from_slice(ctx.request_id.as_bytes());
                let mac = self
                    .pool()
                    .hmac_async(&k.key, data)
                    .await
                    .map_err(IssueError::Hsm)?;
                Ok(dcc::uvci::from_digest(
                    &self.settings.country,
                    ctx.uvci_prefix,
                    &mac,
                ))
            }
            None => Ok(dcc::uvci::generate(
                &self.settings.country,
                ctx.uvci_prefix,
                &mut rand::rngs::OsRng,
            )),
        }
    }

    /// Rebuilds the response of a recorded request from the re-sent payload.
    async fn replay(
        &self,
        t: CertType,
        payload: Payload<'_>,
        ctx: RequestContext<'_>,
        stored: StoredRequest,
    ) -> Result<Issued, IssueError> {
        let signature = stored.signature.ok_or(IssueError::RequestInProgress)?;
        let rec = stored.record.reservation;
        // Validate as at the original issuance (the sample-age rules then give the same answer).
        let at = OffsetDateTime::from_unix_timestamp(rec.iat)
            .map_err(|e| IssueError::Replay(e.to_string()))?;
        let mut dcc = self.validated(t, payload, at)?;
        if dcc.uvci().is_none() {
            if self.uvci_key().is_none() {
                return Err(IssueError::Replay(
                    "no uvci_key is configured to rebuild the generated UVCI".into(),
                ));
            }
            dcc.set_uvci(self.derived_uvci(ctx).await?);
        }
        let uvci = dcc.uvci().unwrap_or_default().to_string();
        if hash::uci_hash(&uvci) != rec.uci_hash {
            return Err(IssueError::Replay(
                "the rebuilt UVCI differs from the recorded one".into(),
            ));
        }
        let header = ProtectedHeader::es256(rec.kid);
        let claims = CwtClaims {
            iss: self.settings.country.clone(),
            iat: rec.iat as u64,
            exp: rec.exp as u64,
            hcert: &dcc,
        };
        let cose = cose::sign1::assemble(&header, &claims.to_cbor_bytes(), &signature);
        metrics::counter!("dccsign_idempotent_replays_total").increment(1);
        Ok(Issued {
            uvci,
            hc1: cose::hc1::encode(&cose),
            cose,
            kid: rec.kid,
            cert_type: t,
            iat: rec.iat,
            exp: rec.exp,
        })
    }

    async fn sign(
        &self,
        signer: &Signer,
        dcc: &dcc::Dcc,
        t: CertType,
        (iat, exp): (i64, i64),
        recorded: Recorded,
    ) -> Result<Issued, IssueError> {
        let Recorded { request, replaces } = recorded;
        let uvci = dcc.uvci().unwrap_or_default().to_string();
        let claims = CwtClaims {
            iss: self.settings.country.clone(),
            iat: iat as u64,
            exp: exp as u64,
            hcert: dcc,
        };
        let payload = claims.to_cbor_bytes();
        let tbs = cose::sign1::sig_structure(&signer.header, &payload);
        let digest: [u8; 32] = Sha256::digest(&tbs).into();

        let reservation = Reservation {
            uci_hash: hash::uci_hash(&uvci),
            country_uci_hash: hash::country_uci_hash(&self.settings.country, &uvci),
            cert_type: t,
            kid: signer.dsc.dsc.kid,
            iat,
            exp,
            replaces,
        };
        // Room in the HSM queue first: the chain's stages hand over without waiting.
        let pool = self.pool();
        let slot = pool.queue_slot().await.map_err(IssueError::Hsm)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        pipeline::Chain {
            ledger: self.ledger.clone(),
            pool,
            slot,
            dsc: signer.dsc.clone(),
            digest,
            reservation,
            request,
        }
        .start(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        let signature = rx.await.map_err(|_| {
            IssueError::Ledger(LedgerError::Database("issuance chain dropped".into()))
        })??;

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

impl crate::keys::SignerSwitch for Issuer {
    fn switch_to(&self, dsc: Arc<ActiveDsc>) {
        let mut guard = self.signers.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**guard).clone();
        let signer = Arc::new(Signer {
            header: ProtectedHeader::es256(dsc.dsc.kid),
            dsc: dsc.clone(),
        });
        for t in &dsc.types {
            next.insert(*t, signer.clone());
        }
        *guard = Arc::new(next);
        tracing::warn!(kid = %dsc.dsc.kid_hex(), label = %dsc.key.label,
            types = ?dsc.types, "signer switched: new requests of these types use this DSC");
    }

    fn withdraw(&self, label: &str) {
        let mut guard = self.signers.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**guard).clone();
        next.retain(|_, s| s.dsc.key.label != label);
        *guard = Arc::new(next);
        tracing::warn!(label = %label, "signer withdrawn: it signs nothing more");
    }
}

/// SHA-256 over the type, the payload kind and the payload bytes as received.
fn request_hash(t: CertType, payload: Payload<'_>) -> [u8; 32] {
    let (kind, bytes) = match payload {
        Payload::Json(b) => (b'j', b),
        Payload::Cbor(b) => (b'c', b),
    };
    let mut h = Sha256::new();
    h.update(t.as_str().as_bytes());
    h.update([0, kind]);
    h.update(bytes);
    h.finalize().into()
}
