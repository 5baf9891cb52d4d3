//! Errors of the HSM layer. Each names the PKCS#11 function that failed and its return value.

use cryptoki::error::{Error as CkError, RvError};

/// An error from the token or the signing pool.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded (wrong path, missing library).
    #[error("cannot load PKCS#11 module {module}: {reason}")]
    Module {
        /// Path of the module.
        module: String,
        /// What went wrong.
        reason: String,
    },
    /// A PKCS#11 function returned an error code.
    #[error("PKCS#11 {function} failed: {rv}")]
    Call {
        /// Name of the PKCS#11 function (`C_Sign`, `C_Login`, …).
        function: String,
        /// The return value, e.g. `CKR_DEVICE_ERROR`.
        rv: String,
    },
    /// Another error from the cryptoki wrapper (conversion, unsupported attribute…).
    #[error("PKCS#11 wrapper: {0}")]
    Wrapper(String),
    /// The user PIN was refused. It is never retried automatically.
    #[error("the token refused the user PIN (C_Login: CKR_PIN_INCORRECT); not retried, check the PIN source")]
    WrongPin,
    /// The token has locked the user PIN after too many failures.
    #[error("the token's user PIN is locked (CKR_PIN_LOCKED); a security officer must reset it")]
    PinLocked,
    /// The PIN could not be read from its source, or the source is unsafe.
    #[error("PIN source: {0}")]
    Pin(String),
    /// No token with this label is present.
    #[error("no initialised token labelled {0:?} in the PKCS#11 module")]
    TokenNotFound(String),
    /// No private key object with this label exists on the token.
    #[error("no private key labelled {0:?} on the token")]
    KeyNotFound(String),
    /// A key with this label already exists; labels are never reused.
    #[error("a key labelled {0:?} already exists on the token")]
    KeyExists(String),
    /// The token returned a public key or signature that is not valid P-256 material.
    #[error("malformed key material from the token: {0}")]
    Malformed(String),
    /// A `pkcs11:` URI could not be parsed.
    #[error("invalid pkcs11 URI: {0}")]
    Uri(String),
    /// The signing pool has shut down.
    #[error("the signing pool is shut down")]
    PoolClosed,
    /// The signing pool's queue is full.
    #[error("the signing pool's queue is full")]
    Overloaded,
}

impl HsmError {
    /// True when the error means the HSM is (temporarily) unable to serve: the caller may report
    /// "unavailable" rather than a bad request.
    pub fn is_unavailable(&self) -> bool {
        !matches!(
            self,
            HsmError::KeyExists(_) | HsmError::Uri(_) | HsmError::Malformed(_)
        )
    }
}

impl From<CkError> for HsmError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(RvError::PinIncorrect, _) => HsmError::WrongPin,
            CkError::Pkcs11(RvError::PinLocked, _) => HsmError::PinLocked,
            CkError::Pkcs11(rv, function) => HsmError::Call {
                function: format!("C_{function:?}"),
                rv: rv_name(rv),
            },
            CkError::LibraryLoading(e) => HsmError::Module {
                module: String::new(),
                reason: e.to_string(),
            },
            other => HsmError::Wrapper(other.to_string()),
        }
    }
}

/// `CKR_`-style name of a return value (`RvError`'s Debug is the CamelCase variant name).
fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn names_function_and_return_value() {
        let e: HsmError = CkError::Pkcs11(RvError::DeviceError, Function::Sign).into();
        assert_eq!(e.to_string(), "PKCS#11 C_Sign failed: CKR_DEVICE_ERROR");
        let e: HsmError = CkError::Pkcs11(RvError::PinIncorrect, Function::Login).into();
        assert!(matches!(e, HsmError::WrongPin));
    }
}
