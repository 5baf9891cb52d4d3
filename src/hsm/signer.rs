//! A token key as an X.509 / PKCS#10 signer (the rcgen idea: a signing trait that lets a remote
//! key sign). The builder hands us the DER to be signed; we hash it, the token signs the digest
//! with `CKM_ECDSA`, and we return the DER-encoded ECDSA signature that X.509 expects.

use der::asn1::AnyRef;
use p256::ecdsa::{DerSignature, Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use spki::{AlgorithmIdentifier, SignatureAlgorithmIdentifier};

use super::{KeyHandle, Token};

/// Borrows a token and one of its keys to sign certificates and requests (ecdsa-with-SHA256).
#[derive(Debug)]
pub struct TokenSigner<'a> {
    token: &'a Token,
    key: &'a KeyHandle,
}

impl<'a> TokenSigner<'a> {
    /// A signer for `key` on `token`.
    pub fn new(token: &'a Token, key: &'a KeyHandle) -> Self {
        TokenSigner { token, key }
    }
}

impl signature::Keypair for TokenSigner<'_> {
    type VerifyingKey = VerifyingKey;
    fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from(&self.key.public_key)
    }
}

impl signature::Signer<DerSignature> for TokenSigner<'_> {
    fn try_sign(&self, msg: &[u8]) -> Result<DerSignature, signature::Error> {
        let digest: [u8; 32] = Sha256::digest(msg).into();
        let raw = self
            .token
            .sign_digest(self.key, &digest)
            .map_err(signature::Error::from_source)?;
        let sig = Signature::from_slice(&raw).map_err(signature::Error::from_source)?;
        Ok(sig.to_der())
    }
}

impl SignatureAlgorithmIdentifier for TokenSigner<'_> {
    type Params = AnyRef<'static>;
    const SIGNATURE_ALGORITHM_IDENTIFIER: AlgorithmIdentifier<AnyRef<'static>> =
        AlgorithmIdentifier {
            oid: ecdsa::ECDSA_SHA256_OID,
            parameters: None,
        };
}
