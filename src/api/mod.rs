//! The gRPC daemon: services, mutual-TLS authentication and per-service authorization, the
//! mapping of errors to gRPC statuses, admission limits, health and metrics.
//!
//! Every request passes, in order: the TLS handshake (client certificate verified against the
//! client CA bundle and its CRLs, TLS 1.3 only) → [`authz`] (identity → role → service allow-list →
//! certificate types) → [`limits`] (in flight, rate) → the service → [`error`] (one mapping).

pub mod authz;
pub mod client;
pub mod client_crl;
pub mod cork;
pub mod error;
pub mod health;
pub mod issuance;
pub mod keys;
pub mod limits;
pub mod pb;
pub mod refusals;
pub mod revocation;
pub mod server;
pub mod tls;

pub use server::{serve, ServeError};
