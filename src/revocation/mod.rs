//! Revocation. For now: the hash definitions the ledger records at signing time so that any
//! certificate can later be revoked without keeping personal data (DOMAIN.md §5).

pub mod hash;
