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
//!   between reservation and completion leaves a `reserved` row (no signature was returned).

mod sqlite;

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
    /// The reservation to complete or release does not exist or is not in state `reserved`.
    #[error("reservation {0} is not pending")]
    NotReserved(i64),
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
}

/// Row counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerCounts {
    /// Rows reserved but not completed.
    pub reserved: u64,
    /// Rows completed with a signature.
    pub signed: u64,
}

/// Storage for certificate records. Implementations must make `reserve` and `complete` durable
/// before returning.
pub trait Ledger: Send + Sync {
    /// Records the intent to sign; fails with [`LedgerError::DuplicateUvci`] when the UVCI hash
    /// exists.
    fn reserve(&self, r: &Reservation) -> Result<ReservationId, LedgerError>;
    /// Completes a reservation with the signature hash.
    fn complete(
        &self,
        id: ReservationId,
        signature_hash: &RevocationHash,
    ) -> Result<(), LedgerError>;
    /// Deletes a reservation whose signing failed (no signature exists).
    fn release(&self, id: ReservationId) -> Result<(), LedgerError>;
    /// The row for a UVCI hash.
    fn find_by_uci_hash(
        &self,
        h: &RevocationHash,
    ) -> Result<Option<CertificateRecord>, LedgerError>;
    /// Row counts.
    fn counts(&self) -> Result<LedgerCounts, LedgerError>;
    /// Whether the database accepts writes right now (health checks).
    fn check_writable(&self) -> Result<(), LedgerError>;
}
