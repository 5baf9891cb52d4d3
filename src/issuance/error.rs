//! Errors of the signing pipeline, each with a stable code. Content problems are in the Swedish
//! API's `2-60-1001` family; service-side problems in `2-60-5xxx`.

use time::OffsetDateTime;

use crate::dcc::{CertType, ValidationErrors};
use crate::hsm::HsmError;
use crate::ledger::LedgerError;

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The payload broke one or more rules; every problem is listed with its field and code.
    #[error("payload rejected:\n{0}")]
    Invalid(#[from] ValidationErrors),
    /// The certificate's lifetime is empty: e.g. a test sample so old that `sc` + 72 h has passed.
    #[error("{field}: {message} [2-60-1001-90 certificate-lifetime]")]
    Lifetime {
        /// Field the lifetime derives from.
        field: &'static str,
        /// What is wrong (never a payload value).
        message: String,
    },
    /// The UVCI (`ci`) is already in the ledger: UVCIs are unique per certificate.
    #[error("ci: this UVCI has already been used [2-60-1001-91 uvci-not-unique]")]
    DuplicateUvci,
    /// The caller's request id was used before with another payload.
    #[error("request_id: this request id was used before with another payload [2-60-1001-92 request-id-reused]")]
    RequestIdReused,
    /// The request id is recorded but its signature is not (yet): another attempt is in
    /// progress, or one was interrupted.
    #[error("request_id: an attempt with this request id is in progress or was interrupted; retry later (one interrupted by a stopped daemon waits for an operator: dccsign ledger interrupted) [2-60-5008]")]
    RequestInProgress,
    /// The certificate to replace is revoked, already replaced or not signed.
    #[error("uvci: {0} [2-60-8004 not-replaceable]")]
    NotReplaceable(String),
    /// A recorded request could not be rebuilt.
    #[error("the recorded request cannot be rebuilt: {0} [2-60-5009]")]
    Replay(String),
    /// The active DSC's private key usage period is over and no successor is active.
    #[error("the document signer for {0} certificates is past its private key usage period; a successor must be activated [2-60-5010]")]
    UsagePeriodOver(CertType),
    /// No DSC is configured (or allowed by its extended key usage) for this type.
    #[error("no document signer is configured for {0} certificates [2-60-5001]")]
    NoSigner(CertType),
    /// The DSC's certificate is not valid yet.
    #[error("the document signer is not valid before {not_before} [2-60-5002]")]
    SignerNotYetValid {
        /// The DSC's notBefore.
        not_before: OffsetDateTime,
    },
    /// The HSM could not sign (no signature was produced or returned).
    #[error("HSM: {0} [2-60-5003]")]
    Hsm(#[source] HsmError),
    /// The ledger could not record the certificate (no signature was returned).
    #[error("ledger: {0} [2-60-5004]")]
    Ledger(#[source] LedgerError),
}

impl IssueError {
    /// The stable code (for `Invalid`, the code of the first problem; see
    /// [`ValidationErrors`] for all of them).
    pub fn code(&self) -> &'static str {
        match self {
            IssueError::Invalid(v) => v.0.first().map(|e| e.code()).unwrap_or("2-60-1001"),
            IssueError::Lifetime { .. } => "2-60-1001-90",
            IssueError::DuplicateUvci => "2-60-1001-91",
            IssueError::RequestIdReused => "2-60-1001-92",
            IssueError::RequestInProgress => "2-60-5008",
            IssueError::Replay(_) => "2-60-5009",
            IssueError::NotReplaceable(_) => "2-60-8004",
            IssueError::NoSigner(_) => "2-60-5001",
            IssueError::UsagePeriodOver(_) => "2-60-5010",
            IssueError::SignerNotYetValid { .. } => "2-60-5002",
            IssueError::Hsm(_) => "2-60-5003",
            IssueError::Ledger(_) => "2-60-5004",
        }
    }

    /// True for problems with the request's content (the caller must fix it); false for
    /// problems of the service (the caller may retry later).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            IssueError::Invalid(_)
                | IssueError::Lifetime { .. }
                | IssueError::DuplicateUvci
                | IssueError::RequestIdReused
        )
    }
}
