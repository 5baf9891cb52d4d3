//! A TLS key in the token: a rustls [`SigningKey`] whose handshake signatures the HSM makes, so
//! the private key is never in a file or in this process. The daemon's server key is one; the
//! client key it presents to the EU gateway and to subscribers can be another.
//!
//! rustls asks for a signature synchronously, in the middle of a handshake on the async
//! runtime. PKCS#11 calls never run there (see `src/hsm`): the signature is made by a signing
//! pool of its own — one worker thread with its own session — and the handshake's thread waits
//! for it (~0.1 ms with SoftHSM; one signature per handshake, and connections are long-lived).
//! A pool of its own, not the issuing pool: a handshake must not queue behind thousands of
//! certificates at full load.
//!
//! Only ECDSA P-256 with SHA-256 (`ecdsa_secp256r1_sha256`), which every TLS 1.3 client offers.

use std::path::Path;
use std::sync::{Arc, RwLock};

use p256::pkcs8::EncodePublicKey;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::{Digest, Sha256};

use super::{HsmError, KeyHandle, KeyUri, SigningPool, Token};

/// Handshakes waiting for the TLS signing worker before new ones are refused.
const QUEUE: usize = 64;

/// A TLS key in the token.
#[derive(Debug, Clone)]
pub struct TokenTlsKey(Arc<Inner>);

/// Where a TLS private key is.
#[derive(Debug)]
pub enum TlsPrivateKey<'a> {
    /// In the token; `name` says which key in errors.
    Token {
        /// The key.
        key: TokenTlsKey,
        /// Its URI or label as configured.
        name: &'a str,
    },
    /// A PEM (PKCS#8) file: the key is then in this process's memory too.
    File(&'a Path),
}

impl TlsPrivateKey<'_> {
    /// The certificate chain `certs` (read from `cert_path`, leaf first) with this key, as
    /// rustls presents them. Fails, naming the file and the key, when the key cannot be read
    /// or the certificate does not belong to it.
    pub fn certified(
        self,
        certs: Vec<CertificateDer<'static>>,
        cert_path: &Path,
        provider: &CryptoProvider,
    ) -> Result<CertifiedKey, String> {
        let (signing_key, name): (Arc<dyn SigningKey>, String) = match self {
            TlsPrivateKey::Token { key, name } => (Arc::new(key), name.to_string()),
            TlsPrivateKey::File(path) => {
                let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
                let der = PrivateKeyDer::from_pem_file(path).map_err(|x| e(&x))?;
                let key = provider
                    .key_provider
                    .load_private_key(der)
                    .map_err(|x| e(&x))?;
                (key, path.display().to_string())
            }
        };
        let certified = CertifiedKey::new(certs, signing_key);
        certified.keys_match().map_err(|e| {
            format!(
                "certificate {} does not belong to key {name}: {e}",
                cert_path.display()
            )
        })?;
        Ok(certified)
    }
}

#[derive(Debug)]
struct Inner {
    token: Arc<Token>,
    /// Looked up again by label when a signature fails (handles change when a token reloads).
    key: RwLock<KeyHandle>,
    spki: Vec<u8>,
    pool: SigningPool,
}

impl TokenTlsKey {
    /// The key named by `reference` (a `pkcs11:` URI on `token`, or a label), with a signing
    /// worker of its own: thread `<pool>-0`, gauges `pool=<pool>`. Fails when the key is
    /// missing or is not P-256.
    pub fn open(token: Arc<Token>, reference: &str, pool: &'static str) -> Result<Self, HsmError> {
        let (label, id) = KeyUri::resolve(reference, token.label())?;
        let key = token.find_key(&label)?;
        if id.as_ref().is_some_and(|id| *id != key.id) {
            return Err(HsmError::Uri(format!(
                "{reference}: the key labelled {label:?} has another id"
            )));
        }
        let spki = key
            .public_key
            .to_public_key_der()
            .map_err(|e| HsmError::Malformed(format!("public key of {label}: {e}")))?
            .into_vec();
        let pool = token.named_signing_pool(pool, 1, QUEUE)?;
        Ok(TokenTlsKey(Arc::new(Inner {
            token,
            key: RwLock::new(key),
            spki,
            pool,
        })))
    }

    /// The public key (to compare with the certificate's).
    pub fn public_key(&self) -> p256::PublicKey {
        self.0.key().public_key
    }
}

impl Inner {
    fn key(&self) -> KeyHandle {
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Signs a digest; after a failure, looks the key up again by label and tries once more
    /// (a reloaded token gives its objects new handles, a lost session is reopened).
    fn sign_digest(&self, digest: [u8; 32]) -> Result<[u8; 64], HsmError> {
        let key = self.key();
        match self.pool.sign(&key, digest) {
            Ok(sig) => Ok(sig),
            Err(first) => {
                let fresh = self.token.find_key(&key.label).map_err(|_| first)?;
                if fresh.public_key != key.public_key {
                    return Err(HsmError::Malformed(format!(
                        "key {} no longer matches its certificate",
                        key.label
                    )));
                }
                let sig = self.pool.sign(&fresh, digest)?;
                *self.key.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                Ok(sig)
            }
        }
    }
}

impl SigningKey for TokenTlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(TlsSigner(self.0.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

/// One handshake's signer.
#[derive(Debug)]
struct TlsSigner(Arc<Inner>);

impl Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(message).into();
        let raw = self.0.sign_digest(digest).map_err(|e| {
            metrics::counter!("dccsign_tls_hsm_sign_failures_total").increment(1);
            tracing::error!(error = %e, "TLS handshake signature in the HSM failed");
            rustls::Error::General(format!("HSM: {e}"))
        })?;
        let sig = p256::ecdsa::Signature::from_slice(&raw)
            .map_err(|e| rustls::Error::General(format!("HSM signature: {e}")))?;
        Ok(sig.to_der().as_bytes().to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}
