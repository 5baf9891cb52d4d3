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
