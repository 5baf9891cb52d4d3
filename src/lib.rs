//! dccsign: a signing back-end for EU digital COVID certificates.
//!
//! The pipeline (see `docs/architecture.md`): [`dcc`] validates a payload, [`issuance`] builds
//! the CWT with [`cose`], reserves a row in the [`ledger`], signs inside the token through
//! [`hsm`], completes the row and returns the HC1. [`keys`] holds the DSC certificates,
//! [`revocation`] the hashes recorded for later revocation, [`config`] the configuration.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod config;
pub mod cose;
pub mod dcc;
pub mod hsm;
pub mod issuance;
pub mod keys;
pub mod ledger;
pub mod revocation;
