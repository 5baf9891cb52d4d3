//! The signing pool: one PKCS#11 session per worker thread, fed by a bounded queue.
//!
//! A `Session` may run one operation at a time and is not `Sync`, so each worker owns one. Jobs
//! carry a reply callback, so a caller never runs a PKCS#11 call itself: the daemon's async
//! pipeline awaits a oneshot ([`SigningPool::sign_async`], [`SigningPool::hmac_async`]),
//! synchronous callers block on it ([`SigningPool::sign`], [`SigningPool::hmac`]). Room in the
//! queue is a semaphore permit that travels with the job, so waiting for room is itself async.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::copies::SessionCopies;
use super::token::to_raw64;
use super::{HsmError, KeyHandle, SecretKeyHandle};

/// Receives the result of one signature: raw `r||s` or the error.
pub type SignReply = Box<dyn FnOnce(Result<[u8; 64], HsmError>) + Send + 'static>;

/// Receives the result of one HMAC-SHA256.
pub type MacReply = Box<dyn FnOnce(Result<[u8; 32], HsmError>) + Send + 'static>;

enum Work {
    /// `CKM_ECDSA` over a SHA-256 digest.
    Sign {
        key: ObjectHandle,
        digest: [u8; 32],
        /// With the token object even when the pool signs with session copies.
        direct: bool,
        reply: SignReply,
    },
    /// `CKM_SHA256_HMAC` over data.
    Hmac {
        key: ObjectHandle,
        data: Vec<u8>,
        reply: MacReply,
    },
}

struct Job {
    work: Work,
    /// The job's place in the queue, given back when the job is done.
    _slot: OwnedSemaphorePermit,
}

/// Room for one job in a pool's queue, taken ahead of the job: a caller that must hand a job
/// over without waiting (a callback on another stage's thread) takes it first
/// ([`SigningPool::queue_slot`]) and spends it with [`SigningPool::submit_in`].
#[derive(Debug)]
pub struct QueueSlot(OwnedSemaphorePermit);

/// A fixed set of worker threads, each with its own session on the token.
pub struct SigningPool {
    tx: Option<Sender<Job>>,
    slots: Arc<Semaphore>,
    workers: Vec<JoinHandle<()>>,
    /// `dccsign_hsm_queue_depth{pool=<name>}`.
    queue_depth: metrics::Gauge,
}

impl std::fmt::Debug for SigningPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningPool")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl SigningPool {
    /// Starts `size` workers named `<name>-<i>`, whose gauges carry the label `pool=<name>`.
    /// With `copies`, they sign with session copies of the keys (see [`super::copies`]);
    /// without, with the token objects themselves.
    pub(crate) fn start(
        ctx: Pkcs11,
        slot: Slot,
        (name, size, queue): (&'static str, usize, usize),
        copies: Option<Arc<SessionCopies>>,
    ) -> Result<Self, HsmError> {
        let queue = queue.max(1);
        let (tx, rx) = bounded::<Job>(queue);
        let mut workers = Vec::with_capacity(size);
        for i in 0..size {
            // Open the session here so a failure is reported to the caller, not a thread.
            let session = ctx.open_ro_session(slot)?;
            let rx = rx.clone();
            let ctx = ctx.clone();
            let copies = copies.clone();
            let busy = metrics::gauge!("dccsign_hsm_sessions_busy", "pool" => name);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(ctx, slot, session, copies, rx, busy))
                .map_err(|e| HsmError::Wrapper(format!("cannot start worker thread: {e}")))?;
            workers.push(handle);
        }
        Ok(SigningPool {
            tx: Some(tx),
            slots: Arc::new(Semaphore::new(queue)),
            workers,
            queue_depth: metrics::gauge!("dccsign_hsm_queue_depth", "pool" => name),
        })
    }

    /// Number of worker threads (= sessions).
    pub fn size(&self) -> usize {
        self.workers.len()
    }

    fn enqueue(&self, work: Work, slot: OwnedSemaphorePermit) -> Result<(), HsmError> {
        self.try_enqueue(work, slot)
            .map_err(|_| HsmError::PoolClosed)
    }

    /// Queues a job; gives the work back when the pool is shutting down.
    fn try_enqueue(&self, work: Work, slot: OwnedSemaphorePermit) -> Result<(), Work> {
        let Some(tx) = self.tx.as_ref() else {
            return Err(work);
        };
        self.queue_depth.set(tx.len() as f64);
        // Never full: every queued job holds one of the `queue` permits.
        tx.try_send(Job { work, _slot: slot })
            .map_err(|e| e.into_inner().work)
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, HsmError> {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HsmError::PoolClosed)
    }

    /// Queues a signature over a SHA-256 digest; `reply` runs once, with the result (or
    /// [`HsmError::PoolClosed`], like [`SigningPool::submit_in`]). Returns
    /// [`HsmError::Overloaded`] at once when the queue is full (then `reply` never runs).
    pub fn submit(
        &self,
        key: &KeyHandle,
        digest: [u8; 32],
        reply: SignReply,
    ) -> Result<(), HsmError> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| HsmError::Overloaded)?;
        self.submit_in(QueueSlot(slot), key, digest, reply);
        Ok(())
    }

    /// Waits (asynchronously) for room in the queue and keeps it for one job.
    pub async fn queue_slot(&self) -> Result<QueueSlot, HsmError> {
        self.slot().await.map(QueueSlot)
    }

    /// Queues a signature over a SHA-256 digest in room taken before; never waits. `reply`
    /// runs exactly once: on a worker thread with the result, or here with
    /// [`HsmError::PoolClosed`] when the pool is shutting down.
    pub fn submit_in(&self, slot: QueueSlot, key: &KeyHandle, digest: [u8; 32], reply: SignReply) {
        let work = Work::Sign {
            key: key.private,
            digest,
            direct: false,
            reply,
        };
        if let Err(Work::Sign { reply, .. }) = self.try_enqueue(work, slot.0) {
            reply(Err(HsmError::PoolClosed));
        }
    }

    /// Signs a SHA-256 digest on a worker; waits (asynchronously) for room in the queue.
    pub async fn sign_async(
        &self,
        key: &KeyHandle,
        digest: [u8; 32],
    ) -> Result<[u8; 64], HsmError> {
        self.sign_on_worker(key, digest, false).await
    }

    async fn sign_on_worker(
        &self,
        key: &KeyHandle,
        digest: [u8; 32],
        direct: bool,
    ) -> Result<[u8; 64], HsmError> {
        let slot = self.slot().await?;
        let (tx, rx) = oneshot::channel();
        let reply: SignReply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let key = key.private;
        let work = Work::Sign {
            key,
            digest,
            direct,
            reply,
        };
        self.enqueue(work, slot)?;
        rx.await.map_err(|_| HsmError::PoolClosed)?
    }

    /// Signs with the key's token object, never its session copy, and waits (blocking): a
    /// health check that the token itself is still there, which session copies would hide
    /// (they keep signing from memory after a software token lost its store).
    pub fn sign_with_token_object(
        &self,
        key: &KeyHandle,
        digest: [u8; 32],
    ) -> Result<[u8; 64], HsmError> {
        futures_executor::block_on(self.sign_on_worker(key, digest, true))
    }

    /// HMAC-SHA256 of `data` under a secret key of the token, on a worker.
    pub async fn hmac_async(
        &self,
        key: &SecretKeyHandle,
        data: Vec<u8>,
    ) -> Result<[u8; 32], HsmError> {
        let slot = self.slot().await?;
        let (tx, rx) = oneshot::channel();
        let reply: MacReply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let key = key.handle;
        self.enqueue(Work::Hmac { key, data, reply }, slot)?;
        rx.await.map_err(|_| HsmError::PoolClosed)?
    }

    /// Signs a SHA-256 digest and waits for the result (blocks the calling thread, which must
    /// not be an async runtime's; waits for room in the queue rather than failing).
    pub fn sign(&self, key: &KeyHandle, digest: [u8; 32]) -> Result<[u8; 64], HsmError> {
        futures_executor::block_on(self.sign_async(key, digest))
    }

    /// HMAC-SHA256 and waits for the result (blocking, like [`SigningPool::sign`]).
    pub fn hmac(&self, key: &SecretKeyHandle, data: Vec<u8>) -> Result<[u8; 32], HsmError> {
        futures_executor::block_on(self.hmac_async(key, data))
    }
}

impl Drop for SigningPool {
    fn drop(&mut self) {
        self.tx.take();
        self.slots.close();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

pub(super) fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError,
            _
        )
    )
}

fn worker(
    ctx: Pkcs11,
    slot: Slot,
    session: Session,
    copies: Option<Arc<SessionCopies>>,
    rx: crossbeam_channel::Receiver<Job>,
    busy: metrics::Gauge,
) {
    let mut session = Some(session);
    for job in rx.iter() {
        busy.increment(1.0);
        if session.is_none() {
            session = ctx.open_ro_session(slot).ok();
        }
        let (mechanism, key, data, direct): (Mechanism, ObjectHandle, &[u8], bool) = match &job.work
        {
            Work::Sign {
                key,
                digest,
                direct,
                ..
            } => (Mechanism::Ecdsa, *key, digest, *direct),
            Work::Hmac { key, data, .. } => (Mechanism::Sha256Hmac, *key, data, false),
        };
        let copies = if direct { None } else { copies.as_deref() };
        let result = match &session {
            None => Err(HsmError::Call {
                function: "C_OpenSession".into(),
                rv: "session could not be reopened".into(),
            }),
            Some(s) => {
                let mut result = sign_with(s, copies, slot, &mechanism, key, data);
                if let Err(SignFailure::CopyGone(copy, _)) = result {
                    // The copy vanished (its keeper session was lost): make a new one, once.
                    if let Some(c) = copies {
                        c.invalidate(key, copy);
                    }
                    result = sign_with(s, copies, slot, &mechanism, key, data);
                }
                result.map_err(|f| {
                    let (SignFailure::CopyGone(_, e) | SignFailure::Token(e)) = f;
                    if session_lost(&e) {
                        // Drop the session; the next job opens a fresh one.
                        session = None;
                    }
                    HsmError::from(e)
                })
            }
        };
        busy.decrement(1.0);
        match job.work {
            Work::Sign { reply, .. } => reply(result.and_then(to_raw64)),
            Work::Hmac { reply, .. } => reply(result.and_then(|mac| {
                mac.try_into().map_err(|v: Vec<u8>| {
                    HsmError::Malformed(format!("HMAC of {} bytes, expected 32", v.len()))
                })
            })),
        }
    }
}

/// Why a signature failed.
enum SignFailure {
    /// The session copy with this handle is no longer known to the token.
    CopyGone(ObjectHandle, CkError),
    /// Any other error of the token.
    Token(CkError),
}

/// Signs with the session copy of `key` when there is one, else with `key`.
fn sign_with(
    session: &Session,
    copies: Option<&SessionCopies>,
    slot: Slot,
    mechanism: &Mechanism,
    key: ObjectHandle,
    data: &[u8],
) -> Result<Vec<u8>, SignFailure> {
    let handle = copies.map_or(key, |c| c.resolve(slot, key));
    session.sign(mechanism, handle, data).map_err(|e| match e {
        CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)
            if handle != key =>
        {
            SignFailure::CopyGone(handle, e)
        }
        e => SignFailure::Token(e),
    })
}
