//! Revocation (DOMAIN.md §5, `docs/revocation.md`): the hashes recorded at signing time, revoke
//! and replace, EU gateway batches, the durable outbox that delivers them, the signed verifier
//! list and retention.
//!
//! Data flows one way: the ledger's certificate rows and revocation rows → [`batch`] plans
//! immutable batches → the outbox delivers them through [`gateway`] on the [`schedule`];
//! [`list`] turns the revocation rows of one kid into the signed verifier list.

pub mod batch;
pub mod engine;
pub mod gateway;
pub mod hash;
pub mod list;
pub mod schedule;
pub mod store;

/// A Unix time as RFC 3339 UTC (empty for a time out of range).
pub(crate) fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
