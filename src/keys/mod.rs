//! Document-signer (DSC) lifecycle: the certificates we build inside the token (a development
//! CSCA and its DSCs), loading configured DSCs and checking them against their keys.
//!
//! Invariant: a DSC is only used for the certificate types its extended key usage allows, and
//! only while its key is present on the token and matches the certificate.

mod ceremony;
mod certificate;
mod crl;
mod dev;
mod dsc;
mod publish;
mod state;
mod tls;

pub use ceremony::{
    Csca, KeyManager, KeyOpError, KeySettings, ManagedKey, Operation, OperationExecutor,
    AUDIT_ANCHOR_LABEL,
};
pub use certificate::{build_csca, build_dsc, build_leaf, random_serial, CertProfile};
pub use crl::{crl_from_pem, crl_lists, crl_to_pem, issue_crl};
pub use dev::{
    dev_client_cert, dev_init, dev_revoke_client, dev_sign_csr, dev_tls_cert, DevInitReport,
    DEV_CLIENTS, DEV_TOKEN_LABEL,
};
pub use dsc::{ActiveDsc, Dsc, DscSet, SignerSwitch};
pub use publish::signed_data;
pub use state::KeyState;
pub use tls::{
    dev_identity, issue_tls_leaf, tls_csr, Leaf, TlsCa, TlsRequest, TlsRole, DEV_IDENTITY_PREFIX,
};

/// Errors of the key layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// The token failed.
    #[error(transparent)]
    Hsm(#[from] crate::hsm::HsmError),
    /// A certificate could not be built or encoded.
    #[error("certificate building: {0}")]
    Build(String),
    /// A certificate file could not be parsed.
    #[error("certificate {path}: {message}")]
    Parse {
        /// The file (or a label when not from a file).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A DSC does not fit its configuration or its key.
    #[error("DSC {label:?}: {message}")]
    Dsc {
        /// The key label.
        label: String,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}
