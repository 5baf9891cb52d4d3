//! A logged-in token: the anchor session, key generation, key lookup and one-off signing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand::RngCore;
use secrecy::SecretString;

use super::copies::SessionCopies;
use super::{context::context, load_pin, HsmError, KeyUri, PinSource, SigningPool};

/// DER of the named-curve OID for P-256 (prime256v1, 1.2.840.10045.3.1.7), the `CKA_EC_PARAMS`
/// value. Named curve, never explicit parameters (the EU gateway refuses those).
pub const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// How to reach a token.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Path of the PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so` for SoftHSM).
    pub module: PathBuf,
    /// Token label.
    pub label: String,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Directory that relative PIN file paths are resolved against.
    pub base_dir: PathBuf,
}

/// A secret (HMAC) key on the token.
#[derive(Debug, Clone)]
pub struct SecretKeyHandle {
    /// `CKA_LABEL`.
    pub label: String,
    pub(super) handle: ObjectHandle,
}

/// A private key on the token, with its public half read from the token.
#[derive(Debug, Clone)]
pub struct KeyHandle {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID` (random, 16 bytes for keys we generate).
    pub id: Vec<u8>,
    /// The public key.
    pub public_key: p256::PublicKey,
    pub(crate) private: ObjectHandle,
}

impl KeyHandle {
    /// The RFC 7512 URI of this key on `token`.
    pub fn uri(&self, token: &Token) -> KeyUri {
        KeyUri::new(token.label(), &self.label, Some(self.id.clone()))
    }
}

/// A token opened and logged in through its PKCS#11 module.
///
/// The anchor session stays open for the token's lifetime: closing the last session of an
/// application logs it out of the token.
pub struct Token {
    ctx: Pkcs11,
    slot: Mutex<Slot>,
    label: String,
    settings: TokenSettings,
    anchor: Mutex<Session>,
    /// Session copies of the keys the signing pools use.
    copies: Arc<SessionCopies>,
    /// Whether new signing pools use session copies (default: yes).
    session_copies: AtomicBool,
    /// A salted SHA-256 of the last PIN the token refused on a reconnect: the same PIN is not
    /// offered again (a real HSM locks its user PIN after a few failures), a changed PIN source
    /// is tried once.
    refused_pin: Mutex<Option<[u8; 32]>>,
    /// The salt of `refused_pin`, random per process.
    pin_salt: [u8; 16],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

fn login(session: &Session, user: UserType, pin: &SecretString) -> Result<(), HsmError> {
    match session.login(user, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>, HsmError> {
    for slot in ctx.get_slots_with_initialized_token()? {
        let info = ctx.get_token_info(slot)?;
        if info.label().trim_end() == label {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

impl Token {
    /// Loads the module (once per process), finds the token by label, opens the anchor session
    /// and logs in as user. A wrong PIN fails at once and is not retried.
    pub fn open(settings: &TokenSettings) -> Result<Token, HsmError> {
        let ctx = context(&settings.module)?;
        let slot = find_slot(&ctx, &settings.label)?
            .ok_or_else(|| HsmError::TokenNotFound(settings.label.clone()))?;
        let info = ctx.get_token_info(slot)?;
        if info.user_pin_locked() {
            return Err(HsmError::PinLocked);
        }
        let pin = load_pin(&settings.pin, &settings.base_dir)?;
        let anchor = ctx.open_rw_session(slot)?;
        login(&anchor, UserType::User, &pin)?;
        Ok(Token {
            copies: Arc::new(SessionCopies::new(ctx.clone())),
            session_copies: AtomicBool::new(true),
            refused_pin: Mutex::new(None),
            pin_salt: rand::random(),
            ctx,
            slot: Mutex::new(slot),
            label: settings.label.clone(),
            settings: settings.clone(),
            anchor: Mutex::new(anchor),
        })
    }

    /// Finds the token again (its slot may have changed), opens a new anchor session and logs
    /// in — for recovery after the token went away and came back. Key handles must be looked up
    /// again afterwards, and signing pools started anew.
    ///
    /// A PIN the token refused is not offered again: the call fails with
    /// [`HsmError::WrongPin`] without `C_Login` until the PIN source holds another PIN, which is
    /// then tried once. A locked PIN is not tried at all.
    pub fn reconnect(&self) -> Result<(), HsmError> {
        let attempt = || -> Result<(Slot, Session), HsmError> {
            let slot = find_slot(&self.ctx, &self.label)?
                .ok_or_else(|| HsmError::TokenNotFound(self.label.clone()))?;
            if self.ctx.get_token_info(slot)?.user_pin_locked() {
                return Err(HsmError::PinLocked);
            }
            let pin = load_pin(&self.settings.pin, &self.settings.base_dir)?;
            let fingerprint = self.pin_fingerprint(&pin);
            let mut refused = self.refused_pin.lock().unwrap_or_else(|p| p.into_inner());
            if *refused == Some(fingerprint) {
                return Err(HsmError::WrongPin);
            }
            let session = self.ctx.open_rw_session(slot)?;
            match login(&session, UserType::User, &pin) {
                Ok(()) => *refused = None,
                Err(e @ HsmError::WrongPin) => {
                    *refused = Some(fingerprint);
                    metrics::counter!("dccsign_hsm_pin_refusals_total").increment(1);
                    tracing::error!(token = %self.label,
                        "the token refused the user PIN on reconnecting; it is not offered again until the PIN source changes");
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            Ok((slot, session))
        };
        let (slot, session) = match attempt() {
            Ok(ok) => ok,
            Err(e @ (HsmError::WrongPin | HsmError::PinLocked | HsmError::Pin(_))) => {
                return Err(e)
            }
            Err(_) => {
                // The module lost the token (SoftHSM keeps failing after its token directory
                // vanished, even once it is back): finalise and initialise the library again,
                // which the PKCS#11 specification allows, so it reads its tokens anew.
                let _ = self.ctx.clone().finalize();
                match self
                    .ctx
                    .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                {
                    Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                    Err(e) => return Err(e.into()),
                }
                attempt()?
            }
        };
        *self.anchor.lock().unwrap_or_else(|p| p.into_inner()) = session;
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = slot;
        // Every handle changed: the copies of the old ones are gone or meaningless.
        self.copies.clear();
        Ok(())
    }

    /// A salted SHA-256 of a PIN, to recognise a refused one without keeping it.
    fn pin_fingerprint(&self, pin: &SecretString) -> [u8; 32] {
        use secrecy::ExposeSecret;
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.pin_salt);
        h.update(pin.expose_secret().as_bytes());
        h.finalize().into()
    }

    /// True when an initialised token with this label exists in the module.
    pub fn exists(module: &std::path::Path, label: &str) -> Result<bool, HsmError> {
        let ctx = context(module)?;
        Ok(find_slot(&ctx, label)?.is_some())
    }

    /// Initialises a fresh token in a free slot (SoftHSM always offers one) and sets its user
    /// PIN. Used by `dev-init`; production tokens are set up with the vendor's tools.
    pub fn initialize(
        module: &std::path::Path,
        label: &str,
        so_pin: &SecretString,
        user_pin: &SecretString,
    ) -> Result<(), HsmError> {
        let ctx = context(module)?;
        if find_slot(&ctx, label)?.is_some() {
            return Err(HsmError::Wrapper(format!("token {label:?} already exists")));
        }
        let mut free = None;
        for slot in ctx.get_slots_with_token()? {
            if !ctx.get_token_info(slot)?.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let free =
            free.ok_or_else(|| HsmError::Wrapper("no free slot to initialise a token in".into()))?;
        ctx.init_token(free, so_pin, label)?;
        // SoftHSM moves an initialised token to a new slot id: look it up again.
        let slot = find_slot(&ctx, label)?.ok_or_else(|| HsmError::TokenNotFound(label.into()))?;
        let session = ctx.open_rw_session(slot)?;
        login(&session, UserType::So, so_pin)?;
        session.init_pin(user_pin)?;
        session.logout()?;
        Ok(())
    }

    /// The token label.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn anchor(&self) -> std::sync::MutexGuard<'_, Session> {
        self.anchor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Generates a P-256 key pair inside the token: `CKA_TOKEN`, `CKA_SENSITIVE`,
    /// `!CKA_EXTRACTABLE`, `CKA_SIGN` (and no decrypt, unwrap or derive), named-curve
    /// parameters and a random 16-byte `CKA_ID`.
    /// Refuses a label that already exists.
    pub fn generate_p256(&self, label: &str) -> Result<KeyHandle, HsmError> {
        if self.find_object(ObjectClass::PRIVATE_KEY, label)?.is_some() {
            return Err(HsmError::KeyExists(label.to_string()));
        }
        let mut id = vec![0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Derive(false),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            // Nothing but signing: SoftHSM would otherwise default decrypt/unwrap to true.
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let session = self.anchor();
        let (_pub_h, priv_h) =
            session.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
        let public_key = read_public_key(&session, &id)?;
        Ok(KeyHandle {
            label: label.to_string(),
            id,
            public_key,
            private: priv_h,
        })
    }

    /// Removes a key pair (private and public objects with the key's `CKA_ID`) from the token.
    /// A session copy of the private key is destroyed first, so no pool can sign with it after.
    pub fn destroy_key_pair(&self, key: &KeyHandle) -> Result<usize, HsmError> {
        self.copies.forget(key.private)?;
        let session = self.anchor();
        // By id, so any other session copy of the key goes as well.
        let found = session.find_objects(&[Attribute::Id(key.id.clone())])?;
        for h in &found {
            session.destroy_object(*h)?;
        }
        Ok(found.len())
    }

    fn find_object(
        &self,
        class: ObjectClass,
        label: &str,
    ) -> Result<Option<ObjectHandle>, HsmError> {
        Ok(labelled(&self.anchor(), class, label)?.into_iter().next())
    }

    /// The values of the token's data objects (`CKO_DATA`) with this label: none, one, or
    /// more after an interrupted [`Token::replace_data`].
    pub fn data_values(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        let session = self.anchor();
        let found = labelled(&session, ObjectClass::DATA, label)?;
        let mut values = Vec::with_capacity(found.len());
        for h in found {
            match session
                .get_attributes(h, &[AttributeType::Value])?
                .into_iter()
                .next()
            {
                Some(Attribute::Value(v)) => values.push(v),
                _ => {
                    return Err(HsmError::Malformed(format!(
                        "data object {label:?} has no value"
                    )))
                }
            }
        }
        Ok(values)
    }

    /// Makes `value` the value of the token's data object with this label (private: read only
    /// after login). Tokens may keep a data object's value read-only (SoftHSM does), so a new
    /// object is created first and the old ones destroyed after: an interruption in between
    /// leaves both, never none.
    pub fn replace_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        let session = self.anchor();
        let old = labelled(&session, ObjectClass::DATA, label)?;
        session.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Application(b"dccsign".to_vec()),
            Attribute::Value(value.to_vec()),
        ])?;
        for h in old {
            session.destroy_object(h)?;
        }
        Ok(())
    }

    /// The private key with this label, and its public key.
    pub fn find_key(&self, label: &str) -> Result<KeyHandle, HsmError> {
        let session = self.anchor();
        let found = session.find_objects(&[
            // Never a session copy (`copies`) of the key.
            Attribute::Token(true),
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?;
        let private = *found
            .first()
            .ok_or_else(|| HsmError::KeyNotFound(label.to_string()))?;
        let id = match session.get_attributes(private, &[AttributeType::Id])?.pop() {
            Some(Attribute::Id(id)) => id,
            _ => return Err(HsmError::Malformed(format!("key {label:?} has no CKA_ID"))),
        };
        let public_key = read_public_key(&session, &id)?;
        Ok(KeyHandle {
            label: label.to_string(),
            id,
            public_key,
            private,
        })
    }

    /// Labels of all private keys on the token.
    pub fn key_labels(&self) -> Result<Vec<String>, HsmError> {
        let session = self.anchor();
        let mut out = Vec::new();
        for h in session.find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::PRIVATE_KEY),
        ])? {
            if let Some(Attribute::Label(l)) =
                session.get_attributes(h, &[AttributeType::Label])?.pop()
            {
                out.push(String::from_utf8_lossy(&l).into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Signs a SHA-256 digest with `CKM_ECDSA` on the anchor session; returns raw `r||s`.
    /// For one-off operations (certificates, CSRs); bulk signing goes through [`SigningPool`].
    pub fn sign_digest(&self, key: &KeyHandle, digest: &[u8; 32]) -> Result<[u8; 64], HsmError> {
        let session = self.anchor();
        let sig = session.sign(&Mechanism::Ecdsa, key.private, digest)?;
        to_raw64(sig)
    }

    /// Generates a 256-bit HMAC key inside the token (`CKK_GENERIC_SECRET`, sensitive,
    /// non-extractable, sign only). Refuses a label that already exists.
    pub fn generate_hmac_key(&self, label: &str) -> Result<SecretKeyHandle, HsmError> {
        if self.find_object(ObjectClass::SECRET_KEY, label)?.is_some() {
            return Err(HsmError::KeyExists(label.to_string()));
        }
        let template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let h = self
            .anchor()
            .generate_key(&Mechanism::GenericSecretKeyGen, &template)?;
        Ok(SecretKeyHandle {
            label: label.to_string(),
            handle: h,
        })
    }

    /// The HMAC key with this label.
    pub fn find_hmac_key(&self, label: &str) -> Result<SecretKeyHandle, HsmError> {
        let handle = self
            .find_object(ObjectClass::SECRET_KEY, label)?
            .ok_or_else(|| HsmError::KeyNotFound(label.to_string()))?;
        Ok(SecretKeyHandle {
            label: label.to_string(),
            handle,
        })
    }

    /// HMAC-SHA256 of `data` inside the token.
    pub fn hmac_sha256(&self, key: &SecretKeyHandle, data: &[u8]) -> Result<[u8; 32], HsmError> {
        let mac = self
            .anchor()
            .sign(&Mechanism::Sha256Hmac, key.handle, data)?;
        mac.try_into().map_err(|v: Vec<u8>| {
            HsmError::Malformed(format!("HMAC of {} bytes, expected 32", v.len()))
        })
    }

    /// Whether the token would reveal the private key's `CKA_VALUE` (it must not).
    pub fn private_value_readable(&self, key: &KeyHandle) -> Result<bool, HsmError> {
        let session = self.anchor();
        let info = session.get_attribute_info(key.private, &[AttributeType::Value])?;
        if matches!(info.first(), Some(AttributeInfo::Available(_))) {
            return Ok(true);
        }
        let attrs = session.get_attributes(key.private, &[AttributeType::Value]);
        Ok(matches!(attrs, Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(_)))))
    }

    /// `CKA_SENSITIVE` and `CKA_EXTRACTABLE` of each session copy of the private key that this
    /// process holds (`hsm::copies`): for checks and diagnostics; normally one or none, and
    /// always `(true, false)`.
    pub fn session_copies(&self, key: &KeyHandle) -> Result<Vec<(bool, bool)>, HsmError> {
        let session = self.anchor();
        let found = session.find_objects(&[
            Attribute::Token(false),
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(key.id.clone()),
        ])?;
        found
            .into_iter()
            .map(|h| protection_flags(&session, h))
            .collect()
    }

    /// The private key's `CKA_SENSITIVE` and `CKA_EXTRACTABLE` flags as the token reports them.
    pub fn protection_flags(&self, key: &KeyHandle) -> Result<(bool, bool), HsmError> {
        protection_flags(&self.anchor(), key.private)
    }

    /// Whether signing pools started from now on sign with session copies of the keys
    /// (`[hsm] session_key_copies`, default true; see `hsm::copies`).
    pub fn set_session_copies(&self, enabled: bool) {
        self.session_copies.store(enabled, Ordering::Relaxed);
    }

    /// Starts a signing pool of `size` sessions, each owned by a worker thread, fed by a queue
    /// bounded at `queue` jobs. It signs with session copies of the keys unless they are
    /// switched off ([`Token::set_session_copies`]). Its threads are `hsm-worker-<i>`, its
    /// gauges `pool="hsm-worker"`: the issuing pool.
    pub fn signing_pool(&self, size: usize, queue: usize) -> Result<SigningPool, HsmError> {
        self.named_signing_pool("hsm-worker", size, queue)
    }

    /// [`Token::signing_pool`] with threads `<name>-<i>` and gauges `pool=<name>`, for a pool
    /// beside the issuing one (e.g. a TLS key's).
    pub fn named_signing_pool(
        &self,
        name: &'static str,
        size: usize,
        queue: usize,
    ) -> Result<SigningPool, HsmError> {
        let copies = self
            .session_copies
            .load(Ordering::Relaxed)
            .then(|| self.copies.clone());
        self.start_pool((name, size, queue), copies)
    }

    /// A signing pool that always signs with the token objects themselves — the raw baseline of
    /// the load generator, whatever the configuration says.
    pub fn signing_pool_on_token_objects(
        &self,
        size: usize,
        queue: usize,
    ) -> Result<SigningPool, HsmError> {
        self.start_pool(("hsm-worker", size, queue), None)
    }

    fn start_pool(
        &self,
        (name, size, queue): (&'static str, usize, usize),
        copies: Option<Arc<SessionCopies>>,
    ) -> Result<SigningPool, HsmError> {
        let slot = *self.slot.lock().unwrap_or_else(|p| p.into_inner());
        SigningPool::start(
            self.ctx.clone(),
            slot,
            (name, size.max(1), queue.max(1)),
            copies,
        )
    }
}

/// `CKA_SENSITIVE` and `CKA_EXTRACTABLE` of an object (absent = the unsafe value).
fn protection_flags(session: &Session, object: ObjectHandle) -> Result<(bool, bool), HsmError> {
    let attrs = session.get_attributes(
        object,
        &[AttributeType::Sensitive, AttributeType::Extractable],
    )?;
    let mut sensitive = false;
    let mut extractable = true;
    for a in attrs {
        match a {
            Attribute::Sensitive(v) => sensitive = v,
            Attribute::Extractable(v) => extractable = v,
            _ => {}
        }
    }
    Ok((sensitive, extractable))
}

fn read_public_key(session: &Session, id: &[u8]) -> Result<p256::PublicKey, HsmError> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Id(id.to_vec()),
    ])?;
    let h = *found
        .first()
        .ok_or_else(|| HsmError::Malformed("public key object missing".into()))?;
    let point = match session.get_attributes(h, &[AttributeType::EcPoint])?.pop() {
        Some(Attribute::EcPoint(p)) => p,
        _ => return Err(HsmError::Malformed("public key has no CKA_EC_POINT".into())),
    };
    // CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (some modules return it bare).
    let sec1 = if point.len() == 67 && point[0] == 0x04 && point[1] == 0x41 {
        &point[2..]
    } else {
        &point[..]
    };
    let pk = p256::PublicKey::from_sec1_bytes(sec1)
        .map_err(|_| HsmError::Malformed("CKA_EC_POINT is not a P-256 point".into()))?;
    debug_assert_eq!(pk.to_encoded_point(false).len(), 65);
    Ok(pk)
}

/// The token objects (`CKA_TOKEN`, never session copies) of `class` labelled `label`.
fn labelled(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Vec<ObjectHandle>, HsmError> {
    Ok(session.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?)
}

pub(crate) fn to_raw64(sig: Vec<u8>) -> Result<[u8; 64], HsmError> {
    sig.try_into().map_err(|v: Vec<u8>| {
        HsmError::Malformed(format!("ECDSA signature of {} bytes, expected 64", v.len()))
    })
}
