//! The revocation engine of the daemon: builds and signs batches (upload key in the token),
//! delivers the outbox to the EU gateway and to subscribers on the retry schedule, signs
//! verifier lists (list key in the token) and purges expired rows.
//!
//! One run ([`RevocationEngine::run_once`]) at a time: the daemon runs it on a schedule and
//! `dccsign revocation publish` asks for one now.

use std::sync::Arc;

use x509_cert::der::Decode;
use x509_cert::Certificate;

use super::batch::{self, HashType};
use super::gateway::{DeliveryError, Gateway, HttpsClient};
use super::list;
use super::schedule::RetrySchedule;
use super::store::{OutboxRow, RevocationStore, StoreError};
use crate::config::{Config, TlsKey};
use crate::hsm::{KeyHandle, KeyUri, TlsPrivateKey, Token, TokenTlsKey};

/// The two-person operation kind of a bulk revocation (approved through the key manager).
pub const BULK_OPERATION: &str = "revocation.bulk";

/// Carries out an approved bulk revocation: parameters `reason` and `kid` (hex) or `issuer`,
/// `from`, `to`; idempotent (already revoked certificates are skipped).
pub fn bulk_executor(engine: Arc<RevocationEngine>) -> crate::keys::OperationExecutor {
    Arc::new(move |params, approver, now| {
        let selector = super::store::BulkSelector::from_params(params)?;
        let reason: super::store::Reason = params["reason"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|e: StoreError| e.to_string())?;
        let n = engine
            .store()
            .bulk_revoke(&selector, reason, approver, now)
            .map_err(|e| e.to_string())?;
        Ok(format!("revoked {n} certificates"))
    })
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token failed while signing a batch or a list.
    #[error("HSM: {0}")]
    Hsm(String),
    /// Something needed is not configured (the message names the setting).
    #[error("not configured: {0}")]
    NotConfigured(String),
    /// The configuration is wrong (the message names the setting).
    #[error("configuration: {0}")]
    Config(String),
}

impl EngineError {
    /// The stable code (docs/error-codes.md).
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::Store(e) => e.code(),
            EngineError::Hsm(_) => "2-60-5003",
            EngineError::NotConfigured(_) | EngineError::Config(_) => "2-60-8007",
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Suspensions whose end passed, lifted.
    pub lifted_suspensions: u64,
    /// Batches built and signed.
    pub batches_built: u64,
    /// Subscriber events queued.
    pub events_queued: u64,
    /// Outbox rows delivered.
    pub delivered: u64,
    /// Outbox rows that failed and will be retried.
    pub retried: u64,
    /// Outbox rows that failed for good.
    pub failed: u64,
    /// Certificate rows purged.
    pub purged_certificates: u64,
    /// Batches of ours at the gateway that the outbox never recorded (last day).
    pub unknown_gateway_batches: u64,
}

struct Upload {
    key: KeyHandle,
    cert: Certificate,
}

struct ListKey {
    key: KeyHandle,
    kid: [u8; 8],
}

/// Revocation work that needs the token or the network.
pub struct RevocationEngine {
    store: RevocationStore,
    token: Arc<Token>,
    country: String,
    hash_types: Vec<HashType>,
    schedule: RetrySchedule,
    upload: Option<Upload>,
    list_key: Option<ListKey>,
    gateway: Option<Gateway>,
    client: Option<HttpsClient>,
    subscribers: Vec<(String, String)>,
    retention_seconds: i64,
    running: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RevocationEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationEngine")
            .field("country", &self.country)
            .finish_non_exhaustive()
    }
}

fn find_key(token: &Token, setting: &str, value: &str) -> Result<KeyHandle, EngineError> {
    let (label, _) = KeyUri::resolve(value, token.label())
        .map_err(|e| EngineError::Config(format!("{setting}: {e}")))?;
    token
        .find_key(&label)
        .map_err(|e| EngineError::Config(format!("{setting} {label}: {e}")))
}

impl RevocationEngine {
    /// The engine for the daemon: opens the store in the ledger database, finds the upload and
    /// list keys in the token and builds the mTLS client from `[revocation]`.
    pub fn from_config(cfg: &Config, token: Arc<Token>) -> Result<RevocationEngine, EngineError> {
        let r = &cfg.revocation;
        let store = RevocationStore::open(&cfg.resolve(&cfg.ledger.path))?;
        let schedule = RetrySchedule::parse(&r.retry)
            .map_err(|e| EngineError::Config(format!("revocation.retry: {e}")))?;
        let upload = match (&r.upload_key, &r.upload_certificate) {
            (Some(k), Some(c)) => {
                let key = find_key(&token, "revocation.upload_key", k)?;
                let path = cfg.resolve(c);
                let pem = std::fs::read_to_string(&path).map_err(|e| {
                    EngineError::Config(format!(
                        "revocation.upload_certificate {}: {e}",
                        path.display()
                    ))
                })?;
                let (_, der) = x509_cert::der::pem::decode_vec(pem.as_bytes()).map_err(|e| {
                    EngineError::Config(format!("revocation.upload_certificate: {e}"))
                })?;
                let cert = Certificate::from_der(&der).map_err(|e| {
                    EngineError::Config(format!("revocation.upload_certificate: {e}"))
                })?;
                let spki = cert
                    .tbs_certificate
                    .subject_public_key_info
                    .subject_public_key
                    .raw_bytes();
                if spki != key.public_key.to_sec1_bytes().as_ref() {
                    return Err(EngineError::Config(
                        "revocation.upload_certificate is not the certificate of revocation.upload_key".into(),
                    ));
                }
                Some(Upload { key, cert })
            }
            (None, None) => None,
            _ => {
                return Err(EngineError::Config(
                    "revocation.upload_key and revocation.upload_certificate go together".into(),
                ))
            }
        };
        let list_key = match &r.list_key {
            Some(k) => {
                let key = find_key(&token, "revocation.list_key", k)?;
                let kid = list::list_key_kid(&key.public_key);
                Some(ListKey { key, kid })
            }
            None => None,
        };
        let client = match (
            &r.gateway_ca,
            &r.gateway_client_certificate,
            &r.gateway_client_key,
        ) {
            (Some(ca), Some(cert), Some(key)) => {
                let file;
                let key = match key {
                    TlsKey::Token(name) => TlsPrivateKey::Token {
                        key: TokenTlsKey::open(token.clone(), name, "tls-gateway").map_err(|e| {
                            EngineError::Config(format!(
                                "revocation.gateway_client_key {name}: {e}"
                            ))
                        })?,
                        name,
                    },
                    TlsKey::File(p) => {
                        file = cfg.resolve(p);
                        TlsPrivateKey::File(&file)
                    }
                };
                Some(
                    HttpsClient::with_key(
                        &cfg.resolve(ca),
                        &cfg.resolve(cert),
                        key,
                        std::time::Duration::from_secs(r.request_timeout_seconds.max(1)),
                    )
                    .map_err(|e| EngineError::Config(format!("revocation gateway TLS: {e}")))?,
                )
            }
            (None, None, None) => None,
            _ => {
                return Err(EngineError::Config(
                    "revocation.gateway_ca, gateway_client_certificate and gateway_client_key go together".into(),
                ))
            }
        };
        let gateway = match (&r.gateway_url, &client) {
            (Some(url), Some(c)) => Some(Gateway::new(c.clone(), url)),
            (Some(_), None) => {
                return Err(EngineError::Config(
                    "revocation.gateway_url needs gateway_ca, gateway_client_certificate and gateway_client_key".into(),
                ))
            }
            (None, _) => None,
        };
        if !r.subscribers.is_empty() && client.is_none() {
            return Err(EngineError::Config(
                "revocation subscribers need gateway_ca, gateway_client_certificate and gateway_client_key".into(),
            ));
        }
        let mut hash_types = vec![HashType::Signature];
        if r.uci_batches {
            hash_types.push(HashType::Uci);
        }
        if r.country_code_uci_batches {
            hash_types.push(HashType::CountryCodeUci);
        }
        Ok(RevocationEngine {
            store,
            token,
            country: cfg.issuer.country.clone(),
            hash_types,
            schedule,
            upload,
            list_key,
            gateway,
            client,
            subscribers: r
                .subscribers
                .iter()
                .map(|s| (s.name.clone(), s.url.clone()))
                .collect(),
            retention_seconds: i64::from(r.retention_days) * 86_400,
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// The store.
    pub fn store(&self) -> &RevocationStore {
        &self.store
    }

    /// Builds and signs batches for every revoked, unexpired certificate not yet in one; each
    /// batch is stored with its upload in one transaction. Blocking (PKCS#11 and SQLite).
    pub fn build_batches(&self, now: i64) -> Result<u64, EngineError> {
        let Some(upload) = &self.upload else {
            return Err(EngineError::NotConfigured(
                "revocation.upload_key and revocation.upload_certificate".into(),
            ));
        };
        let mut built = 0;
        for t in &self.hash_types {
            let pending = self.store.unbatched(*t, now)?;
            if pending.is_empty() {
                continue;
            }
            let entries: Vec<batch::Revoked> = pending.iter().map(|(_, r)| r.clone()).collect();
            // Rows by what places them in a batch (equal hashes share the batch entry).
            let mut rows: std::collections::HashMap<_, Vec<i64>> = Default::default();
            for (id, r) in &pending {
                rows.entry((r.kid, batch::expires_midnight(r.exp), r.hash))
                    .or_default()
                    .push(*id);
            }
            for planned in batch::plan(&entries, *t) {
                // `expires` must be in the future when the gateway receives it.
                if planned.expires <= now {
                    continue;
                }
                let members: Vec<i64> = planned
                    .hashes
                    .iter()
                    .filter_map(|h| rows.get(&(planned.kid, planned.expires, *h)))
                    .flatten()
                    .copied()
                    .collect();
                let json = batch::batch_json(&self.country, &planned);
                let cms = batch::cms_base64(&self.token, &upload.key, &upload.cert, &json)
                    .map_err(|e| EngineError::Hsm(e.to_string()))?;
                self.store
                    .record_batch(&planned, &members, &json, &cms, now)?;
                metrics::counter!("dccsign_revocation_batches_built_total", "hash_type" => t.as_str())
                    .increment(1);
                built += 1;
            }
        }
        Ok(built)
    }

    /// The signed verifier list of `kid` (full, or the delta since `since`) and its version.
    /// Blocking (PKCS#11).
    pub fn signed_list(
        &self,
        kid: [u8; 8],
        since: Option<u64>,
        now: i64,
    ) -> Result<(Vec<u8>, u64), EngineError> {
        let Some(lk) = &self.list_key else {
            return Err(EngineError::NotConfigured("revocation.list_key".into()));
        };
        let entries = self.store.list_entries(&kid)?;
        let counter = self.store.version()?.max(0) as u64;
        if since.is_some_and(|v| v > counter) {
            return Err(EngineError::Store(StoreError::Invalid {
                field: "since",
                message: format!("must not exceed the current version {counter}"),
            }));
        }
        let l = match since {
            None => list::full(kid, &entries, now),
            Some(v) => list::delta(kid, &entries, v, now),
        }
        .at_version(counter);
        let version = l.version();
        let cose = list::sign(&l, lk.kid, |digest| {
            self.token
                .sign_digest(&lk.key, digest)
                .map_err(|e| EngineError::Hsm(e.to_string()))
        })?;
        Ok((cose, version))
    }

    /// One run: lift ended suspensions, build batches (when an upload key is configured), queue
    /// subscriber events, deliver what is due, purge. Runs are serialised.
    pub async fn run_once(self: &Arc<Self>, now: i64) -> Result<RunReport, EngineError> {
        let _one = self.running.lock().await;
        let me = self.clone();
        let mut report = tokio::task::spawn_blocking(move || -> Result<RunReport, EngineError> {
            let mut r = RunReport {
                lifted_suspensions: me.store.lift_ended_suspensions(now)?,
                ..RunReport::default()
            };
            if me.upload.is_some() {
                r.batches_built = me.build_batches(now)?;
            }
            let names: Vec<String> = me.subscribers.iter().map(|(n, _)| n.clone()).collect();
            if !names.is_empty() {
                r.events_queued = me.store.enqueue_events(&names, now)?;
            }
            Ok(r)
        })
        .await
        .map_err(|e| EngineError::Hsm(format!("revocation task: {e}")))??;
        self.deliver(now, &mut report).await?;
        // Reconcile with the gateway's own list of the last day: a batch the gateway holds but
        // we never recorded (an answer lost in a crash) is reported. A failing list call does
        // not fail the run.
        if self.gateway.is_some() {
            let since = time::OffsetDateTime::from_unix_timestamp(now - 86_400)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            match self.reconcile(since).await {
                Ok(unknown) => report.unknown_gateway_batches = unknown.len() as u64,
                Err(e) => tracing::warn!(error = %e, "gateway reconciliation failed"),
            }
        }
        let me = self.clone();
        let purged = tokio::task::spawn_blocking(move || me.store.purge(now, me.retention_seconds))
            .await
            .map_err(|e| EngineError::Hsm(format!("purge task: {e}")))??;
        report.purged_certificates = purged.certificates;
        if purged.certificates + purged.batches + purged.outbox > 0 {
            tracing::info!(
                certificates = purged.certificates,
                batches = purged.batches,
                outbox = purged.outbox,
                "purged rows past the retention period"
            );
        }
        Ok(report)
    }

    async fn deliver(
        self: &Arc<Self>,
        now: i64,
        report: &mut RunReport,
    ) -> Result<(), EngineError> {
        let me = self.clone();
        let due = tokio::task::spawn_blocking(move || me.store.due(now, 500))
            .await
            .map_err(|e| EngineError::Hsm(format!("outbox task: {e}")))??;
        for row in due {
            // Not deliverable by this node now (e.g. no gateway configured): stays pending.
            let Some(outcome) = self.send(&row).await else {
                continue;
            };
            let me = self.clone();
            let attempts = row.attempts + 1;
            let kind = row.kind.clone();
            let target = row.target.clone();
            let step = tokio::task::spawn_blocking(move || -> Result<&'static str, StoreError> {
                match outcome {
                    Ok(gateway_id) => {
                        me.store.delivered(row.id, gateway_id.as_deref(), now)?;
                        Ok("delivered")
                    }
                    Err(e) => {
                        let next = if e.retryable() {
                            me.schedule
                                .delay_after(attempts)
                                .map(|d| now + d.as_secs() as i64)
                        } else {
                            None
                        };
                        let msg = e.to_string();
                        me.store.failed(row.id, &msg, next)?;
                        tracing::warn!(outbox = row.id, kind = %row.kind, target = %row.target,
                            attempts, code = %e.code(), final_failure = next.is_none(), error = %msg,
                            "revocation delivery failed");
                        Ok(if next.is_some() { "retried" } else { "failed" })
                    }
                }
            })
            .await
            .map_err(|e| EngineError::Hsm(format!("outbox task: {e}")))??;
            metrics::counter!("dccsign_revocation_outbox_total",
                "kind" => kind, "target" => target, "outcome" => step)
            .increment(1);
            match step {
                "delivered" => report.delivered += 1,
                "retried" => report.retried += 1,
                _ => report.failed += 1,
            }
        }
        Ok(())
    }

    /// Sends one outbox row: the gateway id of an upload (`Some(Ok(Some(id)))`), another
    /// success (`Some(Ok(None))`), a failure, or `None` when this node cannot send it now (no
    /// gateway or client configured: it stays pending).
    async fn send(&self, row: &OutboxRow) -> Option<Result<Option<String>, DeliveryError>> {
        let config = |m: String| Some(Err(DeliveryError::Config(m)));
        match row.kind.as_str() {
            "upload" => {
                let gw = self.gateway.as_ref()?;
                let body =
                    String::from_utf8_lossy(row.body.as_deref().unwrap_or_default()).into_owned();
                Some(gw.upload(&body).await.map(Some))
            }
            "delete" => {
                let (gw, upload) = (self.gateway.as_ref()?, self.upload.as_ref()?);
                let Some(id) = row.gateway_id.clone() else {
                    return config("deletion of a batch without a gateway id".into());
                };
                let json = batch::delete_json(&id);
                let token = self.token.clone();
                let key = upload.key.clone();
                let cert = upload.cert.clone();
                let signed = tokio::task::spawn_blocking(move || {
                    batch::cms_base64(&token, &key, &cert, &json)
                })
                .await;
                // An HSM that fails to sign now may sign later: retried like a transport error.
                let cms = match signed {
                    Ok(Ok(cms)) => cms,
                    Ok(Err(e)) => {
                        return Some(Err(DeliveryError::Transport(format!(
                            "signing the deletion in the HSM: {e}"
                        ))))
                    }
                    Err(e) => return config(format!("signing task: {e}")),
                };
                Some(gw.delete(&cms).await.map(|_| None))
            }
            "event" => {
                let client = self.client.as_ref()?;
                let Some((_, url)) = self.subscribers.iter().find(|(n, _)| *n == row.target) else {
                    return config(format!("subscriber {} is no longer configured", row.target));
                };
                let body = row.body.clone().unwrap_or_default();
                Some(client.post_json(url, body).await.map(|_| None))
            }
            other => config(format!("unknown outbox kind {other}")),
        }
    }

    /// Checks the gateway's list for our country since `since`: batch ids we do not know
    /// (e.g. an upload whose answer was lost) are logged and counted; returns them.
    pub async fn reconcile(&self, since: time::OffsetDateTime) -> Result<Vec<String>, EngineError> {
        let Some(gw) = &self.gateway else {
            return Err(EngineError::NotConfigured("revocation.gateway_url".into()));
        };
        let listed = gw
            .list(since)
            .await
            .map_err(|e| EngineError::Config(format!("gateway list: {e}")))?;
        let known: std::collections::HashSet<String> = self
            .store
            .batches(false)?
            .into_iter()
            .filter_map(|b| b.gateway_id)
            .collect();
        let unknown: Vec<String> = listed
            .into_iter()
            .filter(|b| b.country == self.country && !b.deleted && !known.contains(&b.batch_id))
            .map(|b| b.batch_id)
            .collect();
        metrics::gauge!("dccsign_revocation_gateway_unknown_batches").set(unknown.len() as f64);
        for id in &unknown {
            tracing::warn!(batch = %id, "the gateway holds a batch of ours that the outbox did not record");
        }
        Ok(unknown)
    }
}
