//! Session copies of token keys for the signing pool.
//!
//! SoftHSM (and other file-backed software tokens) re-reads a token object from its store on
//! every use: each `C_SignInit` on a `CKA_TOKEN` key stats, locks and re-reads the object file and
//! decrypts the key anew. The pool therefore signs with a *session copy* of each key, made once
//! with `C_CopyObject` and `CKA_TOKEN = false`. The copy keeps every other attribute of the
//! original (`CKA_SENSITIVE`, non-extractable, `CKA_PRIVATE`), lives only inside the token
//! library and disappears with the session that made it; no key material enters our code.
//! Measured on SoftHSM 2.6.1 (docs/benchmarks.md): ECDSA 11.9 k/s → 17.9 k/s on one thread,
//! HMAC-SHA256 33.7 k/s → 107 k/s.
//!
//! Invariants:
//! - copies are owned by one *keeper* session of this registry, not by the workers, so a worker
//!   that loses its session loses no copy;
//! - [`Token::destroy_key_pair`](super::Token::destroy_key_pair) destroys the copy before the
//!   original, so a destroyed key cannot sign through a copy;
//! - a token that refuses the copy (`CKA_COPYABLE = false`, or a template it does not accept) is
//!   used through the original object; copying is also switched off by configuration
//!   (`[hsm] session_key_copies = false`).

use std::sync::{Mutex, RwLock};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::HsmError;

/// The session copies of the keys a token's signing pools have used.
pub(crate) struct SessionCopies {
    ctx: Pkcs11,
    /// The session owning the copies; opened on first use, dropped when lost.
    keeper: Mutex<Option<Session>>,
    /// Token object → the handle to sign with (its copy, or itself when copying was refused).
    handles: RwLock<Handles>,
}

impl std::fmt::Debug for SessionCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCopies")
            .field("keys", &self.read().len())
            .finish()
    }
}

/// A handful of keys (the DSCs in use and the UVCI key): a list is the right map.
#[derive(Default)]
struct Handles(Vec<(ObjectHandle, ObjectHandle)>);

impl Handles {
    fn get(&self, key: &ObjectHandle) -> Option<&ObjectHandle> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, h)| h)
    }
    fn insert(&mut self, key: ObjectHandle, handle: ObjectHandle) {
        self.remove(&key);
        self.0.push((key, handle));
    }
    fn remove(&mut self, key: &ObjectHandle) -> Option<ObjectHandle> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.swap_remove(i).1)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Return values meaning the token will never copy this object with this template.
fn copy_refused(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::ActionProhibited
                | RvError::AttributeReadOnly
                | RvError::AttributeValueInvalid
                | RvError::TemplateInconsistent
                | RvError::FunctionNotSupported,
            _
        )
    )
}

impl SessionCopies {
    pub(crate) fn new(ctx: Pkcs11) -> Self {
        SessionCopies {
            ctx,
            keeper: Mutex::new(None),
            handles: RwLock::new(Handles::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Handles> {
        self.handles.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Handles> {
        self.handles.write().unwrap_or_else(|p| p.into_inner())
    }

    fn keeper(&self) -> std::sync::MutexGuard<'_, Option<Session>> {
        self.keeper.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle to sign with for `key`: its session copy, made on first use. Falls back to
    /// `key` itself when no copy can be made now (the next call tries again) or ever (remembered).
    pub(crate) fn resolve(&self, slot: Slot, key: ObjectHandle) -> ObjectHandle {
        if let Some(h) = self.read().get(&key) {
            return *h;
        }
        let mut keeper = self.keeper();
        // Another worker may have made it while this one waited for the keeper.
        if let Some(h) = self.read().get(&key) {
            return *h;
        }
        if keeper.is_none() {
            *keeper = self.ctx.open_ro_session(slot).ok();
        }
        let Some(session) = keeper.as_ref() else {
            return key;
        };
        match session.copy_object(key, &[Attribute::Token(false)]) {
            Ok(copy) => {
                self.write().insert(key, copy);
                metrics::gauge!("dccsign_hsm_session_copies").increment(1.0);
                copy
            }
            Err(e) if copy_refused(&e) => {
                tracing::warn!(error = %e, "the token refuses session copies; signing with the token object");
                self.write().insert(key, key);
                key
            }
            Err(e) => {
                if super::pool::session_lost(&e) {
                    *keeper = None;
                }
                key
            }
        }
    }

    /// Forgets a copy that the token no longer knows (its handle was refused), so the next
    /// [`SessionCopies::resolve`] makes a new one.
    pub(crate) fn invalidate(&self, key: ObjectHandle, copy: ObjectHandle) {
        let mut handles = self.write();
        if handles.get(&key) == Some(&copy) {
            handles.remove(&key);
        }
    }

    /// Destroys the session copy of `key`, if there is one. Called before the token object is
    /// destroyed.
    pub(crate) fn forget(&self, key: ObjectHandle) -> Result<(), HsmError> {
        let keeper = self.keeper();
        let Some(copy) = self.write().remove(&key) else {
            return Ok(());
        };
        if copy == key {
            return Ok(());
        }
        metrics::gauge!("dccsign_hsm_session_copies").decrement(1.0);
        match keeper.as_ref().map(|s| s.destroy_object(copy)) {
            None | Some(Ok(())) => Ok(()),
            // Already gone with a lost session.
            Some(Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _))) => Ok(()),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Drops every copy (the keeper session is closed, which destroys them), e.g. when the token
    /// is reconnected and all handles change.
    pub(crate) fn clear(&self) {
        let mut keeper = self.keeper();
        self.write().clear();
        *keeper = None;
        metrics::gauge!("dccsign_hsm_session_copies").set(0.0);
    }
}
