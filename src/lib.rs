//! dccsign: a signing back-end for EU digital COVID certificates.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod hsm;
pub mod config;
pub mod dcc;
pub mod keys;
pub mod ledger;
pub mod revocation;
