//! The PKCS#11 layer: one context per process, a logged-in token with a long-lived anchor
//! session, P-256 key generation inside the token, and a pool of signing sessions each owned by a
//! worker thread.
//!
//! Invariants (see `docs/architecture.md`):
//! - private keys are generated inside the token as `CKA_SENSITIVE`, non-extractable objects and
//!   are only ever referenced by handle; no key material enters this process;
//! - PKCS#11 calls run on dedicated threads (the pool's workers, or the caller's own thread for
//!   one-off operations such as certificate issuance), never on an async runtime;
//! - a wrong PIN is reported once and never retried (tokens lock after a few failures);
//! - the pool signs with session copies of the keys (`CKA_TOKEN = false`, otherwise the same
//!   attributes), which a destroy removes before the key itself (`copies`).

mod context;
mod copies;
mod error;
mod pin;
mod pool;
mod signer;
mod tls_key;
mod token;
mod uri;

pub use error::HsmError;
pub(crate) use pin::write_private_file;
pub use pin::{load_pin, PinSource};
pub use pool::{QueueSlot, SignReply, SigningPool};
pub use signer::TokenSigner;
pub use tls_key::{TlsPrivateKey, TokenTlsKey};
pub use token::{KeyHandle, SecretKeyHandle, Token, TokenSettings};
pub use uri::KeyUri;

/// PKCS#11 module path of SoftHSM v2 on Debian.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
