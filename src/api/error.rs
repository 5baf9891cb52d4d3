//! The one mapping from internal errors to gRPC: a status code, a message without payload
//! values, and machine-readable details — the standard rich error model
//! (`grpc-status-details-bin`: `google.rpc.BadRequest` field violations + `google.rpc.ErrorInfo`
//! whose metadata carries the stable `code` and the `request_id`) and, for clients that use our
//! contract, `dccsign.v1.ErrorDetail` in the binary metadata `dccsign-error-bin`.

use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::pb;
use crate::hsm::HsmError;
use crate::issuance::IssueError;

/// Code of "calling system lacks authorization or agreement" (Swedish API).
pub const NOT_AUTHORIZED: &str = "2-60-9001";
/// Request-level codes (`2-60-1001` family, 40s).
pub mod codes {
    /// `type` is missing or unknown.
    pub const TYPE_REQUIRED: &str = "2-60-1001-40";
    /// No payload was sent.
    pub const PAYLOAD_REQUIRED: &str = "2-60-1001-41";
    /// `request_id` is too long or has characters outside `A-Z a-z 0-9 - _ . :`.
    pub const REQUEST_ID_INVALID: &str = "2-60-1001-42";
    /// An `IssueBatchRequest` holds more items than allowed.
    pub const BATCH_TOO_LARGE: &str = "2-60-1001-43";
    /// Service-side limit reached.
    pub const OVERLOADED: &str = "2-60-5005";
}

fn violation(field: &str, code: &str, rule: &str, message: &str) -> pb::FieldViolation {
    pb::FieldViolation {
        field: field.into(),
        code: code.into(),
        rule: rule.into(),
        message: message.into(),
    }
}

/// The detail for an issuance error.
pub fn detail(e: &IssueError, request_id: &str) -> pb::ErrorDetail {
    let violations = match e {
        IssueError::Invalid(v) => {
            v.0.iter()
                .map(|f| violation(&f.path, f.code(), f.rule.name(), &f.message))
                .collect()
        }
        IssueError::Lifetime { field, message } => {
            vec![violation(field, e.code(), "certificate-lifetime", message)]
        }
        IssueError::DuplicateUvci => vec![violation(
            "ci",
            e.code(),
            "uvci-not-unique",
            "this UVCI has already been used",
        )],
        _ => vec![],
    };
    pb::ErrorDetail {
        code: e.code().into(),
        request_id: request_id.into(),
        violations,
    }
}

/// gRPC code for an issuance error.
pub fn grpc_code(e: &IssueError) -> Code {
    match e {
        IssueError::Invalid(_) | IssueError::Lifetime { .. } => Code::InvalidArgument,
        IssueError::DuplicateUvci | IssueError::RequestIdReused => Code::AlreadyExists,
        IssueError::RequestInProgress => Code::Aborted,
        IssueError::Replay(_) => Code::Internal,
        IssueError::NoSigner(_)
        | IssueError::SignerNotYetValid { .. }
        | IssueError::UsagePeriodOver(_)
        | IssueError::NotReplaceable(_) => Code::FailedPrecondition,
        IssueError::Hsm(HsmError::Overloaded) => Code::ResourceExhausted,
        IssueError::Hsm(_) | IssueError::Ledger(_) => Code::Unavailable,
    }
}

/// Builds a status from code, message and detail.
pub fn status(code: Code, message: &str, d: &pb::ErrorDetail) -> Status {
    let mut details = ErrorDetails::new();
    for v in &d.violations {
        details.add_bad_request_violation(
            v.field.clone(),
            format!("{} [{} {}]", v.message, v.code, v.rule),
        );
    }
    details.set_error_info(
        reason(code),
        "dccsign",
        [
            ("code".to_string(), d.code.clone()),
            ("request_id".to_string(), d.request_id.clone()),
        ],
    );
    let mut s = Status::with_error_details(code, message, details);
    s.metadata_mut().insert_bin(
        "dccsign-error-bin",
        MetadataValue::from_bytes(&d.encode_to_vec()),
    );
    s
}

fn reason(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_REQUEST",
        Code::PermissionDenied => "NOT_AUTHORIZED",
        Code::AlreadyExists => "UVCI_NOT_UNIQUE",
        Code::ResourceExhausted => "OVERLOADED",
        Code::Unavailable => "UNAVAILABLE",
        Code::FailedPrecondition => "NOT_CONFIGURED",
        _ => "ERROR",
    }
}

/// The status for an issuance error.
pub fn from_issue(e: &IssueError, request_id: &str) -> Status {
    let d = detail(e, request_id);
    let message = match e {
        IssueError::Invalid(v) => {
            format!("payload rejected: {} problem(s); see details", v.0.len())
        }
        other => other.to_string(),
    };
    status(grpc_code(e), &message, &d)
}

/// PERMISSION_DENIED with `2-60-9001`.
pub fn permission_denied(reason: &str, request_id: &str) -> Status {
    let d = pb::ErrorDetail {
        code: NOT_AUTHORIZED.into(),
        request_id: request_id.into(),
        violations: vec![],
    };
    status(
        Code::PermissionDenied,
        &format!("calling system lacks authorization or agreement: {reason} [{NOT_AUTHORIZED}]"),
        &d,
    )
}

/// RESOURCE_EXHAUSTED.
pub fn resource_exhausted(reason: &str, request_id: &str) -> Status {
    let d = pb::ErrorDetail {
        code: codes::OVERLOADED.into(),
        request_id: request_id.into(),
        violations: vec![],
    };
    status(
        Code::ResourceExhausted,
        &format!("{reason} [{}]", codes::OVERLOADED),
        &d,
    )
}

/// INVALID_ARGUMENT for a request field (not the payload).
pub fn bad_request(field: &str, code: &str, rule: &str, message: &str, request_id: &str) -> Status {
    let d = pb::ErrorDetail {
        code: code.into(),
        request_id: request_id.into(),
        violations: vec![violation(field, code, rule, message)],
    };
    status(
        Code::InvalidArgument,
        &format!("{field}: {message} [{code} {rule}]"),
        &d,
    )
}

/// The status for a key-lifecycle error: the code names the rule; certificate checks and bad
/// parameters carry a field violation.
pub fn from_key_op(e: &crate::keys::KeyOpError) -> Status {
    use crate::keys::KeyOpError as K;
    let (code, field, rule) = match e {
        K::Invalid { field, .. } => (Code::InvalidArgument, *field, "invalid-parameter"),
        K::NotFound(_) => (Code::NotFound, "", ""),
        K::State { .. } => (Code::FailedPrecondition, "label", "key-state"),
        K::SelfApproval(_) => (Code::PermissionDenied, "operation_id", "two-person-rule"),
        K::Expired(_) | K::Done { .. } => (
            Code::FailedPrecondition,
            "operation_id",
            "operation-not-pending",
        ),
        K::Certificate { .. } => (Code::InvalidArgument, "certificate", "certificate-check"),
        K::LabelExists(_) => (Code::AlreadyExists, "label", "label-exists"),
        K::Hsm(_) | K::Audit(_) | K::Database(_) => (Code::Unavailable, "", ""),
        K::AuditAnchor(_) => (Code::FailedPrecondition, "", "audit-anchor"),
    };
    coded(code, e.code(), field, rule, &e.to_string())
}

/// The status for a revocation error: the code names the rule, the violation the field.
pub fn from_revocation(e: &crate::revocation::engine::EngineError) -> Status {
    use crate::revocation::engine::EngineError as E;
    use crate::revocation::store::StoreError as S;
    let (code, field, rule) = match e {
        E::Store(S::NotFound) => (Code::NotFound, "uvci", "unknown-certificate"),
        E::Store(S::NotSigned) => (Code::FailedPrecondition, "uvci", "not-signed"),
        E::Store(S::NotRevoked) => (Code::FailedPrecondition, "uvci", "not-revoked"),
        E::Store(S::Invalid { field, .. }) => (Code::InvalidArgument, *field, "invalid-parameter"),
        E::NotConfigured(_) | E::Config(_) => (Code::FailedPrecondition, "", ""),
        _ => (Code::Unavailable, "", ""),
    };
    coded(code, e.code(), field, rule, &e.to_string())
}

/// A status whose message ends in the stable code, with the detail naming the field and the rule
/// (no field: no violation).
fn coded(code: Code, stable: &str, field: &str, rule: &str, message: &str) -> Status {
    let d = pb::ErrorDetail {
        code: stable.into(),
        request_id: String::new(),
        violations: if field.is_empty() {
            vec![]
        } else {
            vec![violation(field, stable, rule, message)]
        },
    };
    status(code, &format!("{message} [{stable}]"), &d)
}

/// PERMISSION_DENIED with `2-60-8003`: an issuer acting on a certificate it did not issue.
pub fn not_your_certificate() -> Status {
    coded(
        Code::PermissionDenied,
        "2-60-8003",
        "uvci",
        "not-issued-by-caller",
        "issuers may act only on certificates they issued",
    )
}
