//! The signing pool: one PKCS#11 session per worker thread, fed by a bounded queue.
//!
//! A `Session` may run one operation at a time and is not `Sync`, so each worker owns one. Jobs
//! carry a reply callback, which lets synchronous callers block on a channel and asynchronous
//! callers complete a oneshot without the PKCS#11 call ever running on their runtime.

use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;

use super::token::to_raw64;
use super::{HsmError, KeyHandle};

/// Receives the result of one signature: raw `r||s` or the error.
pub type SignReply = Box<dyn FnOnce(Result<[u8; 64], HsmError>) + Send + 'static>;

struct Job {
    key: ObjectHandle,
    digest: [u8; 32],
    reply: SignReply,
}

/// A fixed set of worker threads, each with its own session on the token.
pub struct SigningPool {
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SigningPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningPool")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl SigningPool {
    pub(crate) fn start(
        ctx: Pkcs11,
        slot: Slot,
        size: usize,
        queue: usize,
    ) -> Result<Self, HsmError> {
        let (tx, rx) = bounded::<Job>(queue);
        let mut workers = Vec::with_capacity(size);
        for i in 0..size {
            // Open the session here so a failure is reported to the caller, not a thread.
            let session = ctx.open_ro_session(slot)?;
            let rx = rx.clone();
            let ctx = ctx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("hsm-worker-{i}"))
                .spawn(move || worker(ctx, slot, session, rx))
                .map_err(|e| HsmError::Wrapper(format!("cannot start worker thread: {e}")))?;
            workers.push(handle);
        }
        Ok(SigningPool {
            tx: Some(tx),
            workers,
        })
    }

    /// Number of worker threads (= sessions).
    pub fn size(&self) -> usize {
        self.workers.len()
    }

    /// Queues a signature over a SHA-256 digest; `reply` runs on the worker thread with the
    /// result. Returns [`HsmError::Overloaded`] at once when the queue is full.
    pub fn submit(
        &self,
        key: &KeyHandle,
        digest: [u8; 32],
        reply: SignReply,
    ) -> Result<(), HsmError> {
        let tx = self.tx.as_ref().ok_or(HsmError::PoolClosed)?;
        metrics::gauge!("dccsign_hsm_queue_depth").set(tx.len() as f64);
        match tx.try_send(Job {
            key: key.private,
            digest,
            reply,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(HsmError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(HsmError::PoolClosed),
        }
    }

    /// Signs a SHA-256 digest and waits for the result (blocks the calling thread; waits for
    /// room in the queue rather than failing).
    pub fn sign(&self, key: &KeyHandle, digest: [u8; 32]) -> Result<[u8; 64], HsmError> {
        let tx = self.tx.as_ref().ok_or(HsmError::PoolClosed)?;
        let (rtx, rrx) = bounded(1);
        let reply: SignReply = Box::new(move |r| {
            let _ = rtx.send(r);
        });
        metrics::gauge!("dccsign_hsm_queue_depth").set(tx.len() as f64);
        tx.send(Job {
            key: key.private,
            digest,
            reply,
        })
        .map_err(|_| HsmError::PoolClosed)?;
        rrx.recv().map_err(|_| HsmError::PoolClosed)?
    }
}

impl Drop for SigningPool {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn session_lost(e: &CkError) -> bool {
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

fn worker(ctx: Pkcs11, slot: Slot, session: Session, rx: crossbeam_channel::Receiver<Job>) {
    let mut session = Some(session);
    let busy = metrics::gauge!("dccsign_hsm_sessions_busy");
    for job in rx.iter() {
        busy.increment(1.0);
        if session.is_none() {
            session = ctx.open_ro_session(slot).ok();
        }
        let result = match &session {
            None => Err(HsmError::Call {
                function: "C_OpenSession".into(),
                rv: "session could not be reopened".into(),
            }),
            Some(s) => match s.sign(&Mechanism::Ecdsa, job.key, &job.digest) {
                Ok(sig) => to_raw64(sig),
                Err(e) => {
                    if session_lost(&e) {
                        // Drop the session; the next job opens a fresh one.
                        session = None;
                    }
                    Err(e.into())
                }
            },
        };
        busy.decrement(1.0);
        (job.reply)(result);
    }
}
