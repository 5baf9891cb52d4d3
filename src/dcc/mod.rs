//! The DCC payload: model, validation rules with stable codes, value sets and UVCIs.
//!
//! [`validate`] is the gate in front of the signer: it collects every violation as a
//! [`FieldError`] (field path, [`Rule`], code, message without payload values) and returns a
//! typed [`Dcc`] only when there are none.

mod cert_type;
pub mod model;
pub mod rules;
pub mod uvci;
pub mod validate;
pub mod valuesets;

pub use cert_type::{CertType, UnknownCertType};
pub use model::Dcc;
pub use rules::{FieldError, Rule, ValidationErrors};
pub use validate::{cbor_to_json, parse_json, validate, validate_schema, Policy};
