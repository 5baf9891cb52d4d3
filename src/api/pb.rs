//! Code generated from `proto/dccsign/v1/issuance.proto`.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("dccsign.v1");

/// The encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/dccsign_descriptor.bin"));

impl From<crate::dcc::CertType> for CertificateType {
    fn from(t: crate::dcc::CertType) -> Self {
        match t {
            crate::dcc::CertType::Test => CertificateType::Test,
            crate::dcc::CertType::Vaccination => CertificateType::Vaccination,
            crate::dcc::CertType::Recovery => CertificateType::Recovery,
        }
    }
}

impl CertificateType {
    /// The certificate type, or `None` for `UNSPECIFIED`.
    pub fn cert_type(self) -> Option<crate::dcc::CertType> {
        match self {
            CertificateType::Test => Some(crate::dcc::CertType::Test),
            CertificateType::Vaccination => Some(crate::dcc::CertType::Vaccination),
            CertificateType::Recovery => Some(crate::dcc::CertType::Recovery),
            CertificateType::Unspecified => None,
        }
    }
}
