//! DCC payload model and validation (placeholder until the module lands).
mod cert_type;
pub use cert_type::{CertType, UnknownCertType};
