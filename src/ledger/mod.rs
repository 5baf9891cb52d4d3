//! The ledger: one row per certificate, without personal data.
//!
//! Invariants (see `docs/architecture.md`):
//! - **record before sign**: a row reserving the UVCI (by its hash, unique) is committed before
//!   the HSM signs; the row is completed with the signature hash after signing, and the caller
//!   gets the certificate only after that second commit is durable (`synchronous=FULL`);
//! - **no personal data**: rows hold hashes (`SHA-256(UVCI)[0..16]`,
//!   `SHA-256(country‖UVCI)[0..16]`, `SHA-256(r)[0..16]`), the kid, the type and times — never
//!   names, birth dates, the UVCI itself or the payload;
//! - a reservation whose signing failed is released, so the UVCI can be used again; a crash
//!   between reservation and completion leaves a `reserved` row (no signature was returned),
//!   a caller that goes away does not (`issuance::pipeline` runs on without it);
//! - idempotency: a caller's `(client, request_id)` is recorded with the reservation, with a hash
//!   of the request and, once signed, the signature — enough to rebuild the same bytes from the
//!   re-sent payload, without storing the payload.

mod bloom;
mod checkpoint;
mod sqlite;
mod uci;

pub(crate) use uci::find_sql;

pub use sqlite::SqliteLedger;

use crate::dcc::CertType;
use crate::revocation::hash::RevocationHash;

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The UVCI is already recorded (signed, or reserved by an issuance in progress or one that
    /// crashed before completing).
    #[error("UVCI already used ({state})")]
    DuplicateUvci {
        /// State of the existing row: `signed` or `reserved`.
        state: String,
    },
    /// The caller's request id is already recorded (a concurrent or crashed attempt).
    #[error("request id already recorded")]
    DuplicateRequest,
    /// The reservation to complete or release does not exist or is not in state `reserved`.
    #[error("reservation {0} is not pending")]
    NotReserved(i64),
    /// The certificate to replace cannot be replaced (revoked, already replaced, not signed or
    /// unknown).
    #[error("the certificate cannot be replaced: {0}")]
    NotReplaceable(String),
    /// The database failed (disk full, locked beyond the timeout, I/O error…).
    #[error("ledger database: {0}")]
    Database(String),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Database(e.to_string())
    }
}

/// What is recorded before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// `SHA-256(UVCI)[0..16]` — unique across the ledger.
    pub uci_hash: RevocationHash,
    /// `SHA-256(country‖UVCI)[0..16]`.
    pub country_uci_hash: RevocationHash,
    /// Certificate type.
    pub cert_type: CertType,
    /// kid of the DSC that will sign.
    pub kid: [u8; 8],
    /// Issued-at (Unix seconds).
    pub iat: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
    /// Row id of the certificate this one replaces: the reservation fails unless that one is
    /// signed, not revoked and not already replaced, and the completion revokes it as
    /// `replaced` in the same transaction.
    pub replaces: Option<i64>,
}

/// A caller's request, recorded with the reservation so a retry returns the same certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    /// The client identity.
    pub client: String,
    /// The client's request id.
    pub request_id: String,
    /// SHA-256 over the type and the payload bytes as received.
    pub request_hash: [u8; 32],
}

/// A recorded request with its certificate row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    /// SHA-256 over the type and the payload bytes as received.
    pub request_hash: [u8; 32],
    /// The certificate row.
    pub record: CertificateRecord,
    /// The 64-byte signature once signed (not personal data; needed to return the same bytes).
    pub signature: Option<[u8; 64]>,
}

/// Id of a reservation row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationId(pub i64);

/// A ledger row: the reservation and, once signed, its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Row id.
    pub id: i64,
    /// What was recorded before signing.
    pub reservation: Reservation,
    /// `SHA-256(r)[0..16]` once signed.
    pub signature_hash: Option<RevocationHash>,
    /// `reserved` or `signed`.
    pub state: String,
    /// The client that asked for it (`None` for offline issuance).
    pub issuer: Option<String>,
}

/// Rows recorded since a given row: the last row id and the count per kid.
pub type RecordedSince = (i64, Vec<([u8; 8], u64)>);

/// Row counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerCounts {
    /// Rows reserved but not completed.
    pub reserved: u64,
    /// Rows completed with a signature.
    pub signed: u64,
}

/// A reservation that was never completed nor released: the process stopped between
/// reservation and completion (or the completion failed). Its UVCI and request id stay blocked
/// until an operator releases it (`dccsign ledger interrupted`; docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    /// Row id.
    pub id: i64,
    /// Certificate type.
    pub cert_type: String,
    /// kid of the DSC that was to sign.
    pub kid: [u8; 8],
    /// When it was reserved (Unix seconds).
    pub reserved_at: i64,
    /// The client that asked for it (`None` for offline issuance).
    pub issuer: Option<String>,
    /// The client's request id, if it gave one.
    pub request_id: Option<String>,
}

/// A write to the ledger. Reserve returns the new reservation's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerWrite {
    /// Records the intent to sign (and the caller's request, if any) in one transaction.
    Reserve(Reservation, Option<RequestKey>),
    /// Completes a reservation with the signature hash and the signature.
    Complete(ReservationId, RevocationHash, [u8; 64]),
    /// Deletes a reservation whose signing failed.
    Release(ReservationId),
}

/// The result of a write: the reservation id for [`LedgerWrite::Reserve`], `None` for the
/// others.
pub type WriteResult = Result<Option<ReservationId>, LedgerError>;

/// Receives the result of a write once it is durable (or has failed).
pub type WriteReply = Box<dyn FnOnce(WriteResult) + Send + 'static>;

/// Storage for certificate records. A write's reply must run only once the write is durable.
pub trait Ledger: Send + Sync {
    /// Queues a write; `reply` runs (on any thread) when it is durable or has failed. Must not
    /// block on I/O: callers include the daemon's async runtime.
    fn submit(&self, write: LedgerWrite, reply: WriteReply);

    /// Records the intent to sign (and the caller's request, if any) in one transaction; fails
    /// with [`LedgerError::DuplicateUvci`] when the UVCI hash exists and
    /// [`LedgerError::DuplicateRequest`] when the request id does. Blocks until durable.
    fn reserve(
        &self,
        r: &Reservation,
        request: Option<&RequestKey>,
    ) -> Result<ReservationId, LedgerError> {
        write_blocking(self, LedgerWrite::Reserve(r.clone(), request.cloned()))?
            .ok_or_else(|| LedgerError::Database("reservation without id".into()))
    }
    /// Completes a reservation with the signature hash and the signature (kept on the
    /// certificate row, for replays). Blocks until durable.
    fn complete(
        &self,
        id: ReservationId,
        signature_hash: &RevocationHash,
        signature: &[u8; 64],
    ) -> Result<(), LedgerError> {
        write_blocking(self, LedgerWrite::Complete(id, *signature_hash, *signature)).map(|_| ())
    }
    /// Deletes a reservation whose signing failed (no signature exists). Blocks until durable.
    fn release(&self, id: ReservationId) -> Result<(), LedgerError> {
        write_blocking(self, LedgerWrite::Release(id)).map(|_| ())
    }
    /// A recorded request of `client`.
    fn find_request(
        &self,
        client: &str,
        request_id: &str,
    ) -> Result<Option<StoredRequest>, LedgerError>;
    /// The row for a UVCI hash.
    fn find_by_uci_hash(
        &self,
        h: &RevocationHash,
    ) -> Result<Option<CertificateRecord>, LedgerError>;
    /// Row counts.
    fn counts(&self) -> Result<LedgerCounts, LedgerError>;
    /// The latest `exp` of the certificates a DSC signed (`None`: it signed nothing).
    fn last_expiry(&self, kid: &[u8; 8]) -> Result<Option<i64>, LedgerError>;
    /// Rows recorded after row `after_id`, per kid, and the last row id (audit checkpoints).
    fn recorded_since(&self, after_id: i64) -> Result<RecordedSince, LedgerError>;
    /// Whether the database accepts writes right now (health checks).
    fn check_writable(&self) -> Result<(), LedgerError>;
}

fn write_blocking<L: Ledger + ?Sized>(ledger: &L, w: LedgerWrite) -> WriteResult {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    ledger.submit(
        w,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv()
        .map_err(|_| LedgerError::Database("ledger writer stopped".into()))?
}

/// Submits a write and waits (asynchronously) until it is durable or has failed.
pub async fn write(ledger: &dyn Ledger, w: LedgerWrite) -> WriteResult {
    let (tx, rx) = tokio::sync::oneshot::channel();
    ledger.submit(
        w,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.await
        .map_err(|_| LedgerError::Database("ledger writer stopped".into()))?
}
