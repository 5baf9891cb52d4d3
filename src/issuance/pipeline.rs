//! The record–sign–record chain of one certificate, run from each stage's reply on that
//! stage's own thread.
//!
//! A certificate passes three stages: the reservation commit (the ledger writer), the signature
//! (an HSM worker) and the completion commit (the ledger writer again). Each stage starts the
//! next from its reply, so the request's task is woken once, when the completion is durable,
//! and not between the stages: two thread hand-offs fewer per certificate than awaiting each
//! stage on the async runtime. Measured in docs/benchmarks.md ("Twelfth session"): throughput
//! within the noise, ~10 µs less on the async workers and 4–8 µs more on the writer per
//! certificate; it is here for the last invariant below.
//!
//! Invariants:
//! - **record before sign**: the HSM job is queued only from the reservation's reply, which the
//!   ledger runs once the commit is durable ([`Ledger::submit`]'s contract);
//! - **durable before returned**: the signature reaches the caller only from the completion's
//!   reply, so once the completed row is durable;
//! - a failed signature releases the reservation before the caller hears of the failure;
//! - **no stage waits**: the chain's room in the HSM queue ([`QueueSlot`]) is taken before the
//!   reservation, so the writer thread only hands the job over;
//! - the chain runs to its end even when the caller has gone away (a cancelled request), so it
//!   leaves a signed row or none, never a reservation nobody will complete.

use std::sync::Arc;
use std::time::Instant;

use super::IssueError;
use crate::hsm::{HsmError, QueueSlot, SigningPool};
use crate::keys::ActiveDsc;
use crate::ledger::{Ledger, LedgerError, LedgerWrite, RequestKey, Reservation, ReservationId};
use crate::revocation::hash;

/// Receives the end of the chain: the signature once its completed row is durable, or why
/// there is none.
pub(super) type Done = Box<dyn FnOnce(Result<[u8; 64], IssueError>) + Send + 'static>;

/// What one certificate's chain needs.
pub(super) struct Chain {
    /// Where the rows go.
    pub ledger: Arc<dyn Ledger>,
    /// Who signs, and the room in its queue taken for this signature.
    pub pool: Arc<SigningPool>,
    /// The room in `pool`'s queue for this signature.
    pub slot: QueueSlot,
    /// The DSC whose key signs.
    pub dsc: Arc<ActiveDsc>,
    /// SHA-256 of the COSE `Sig_structure`.
    pub digest: [u8; 32],
    /// The row recorded before signing.
    pub reservation: Reservation,
    /// The caller's request key, recorded on the row.
    pub request: Option<RequestKey>,
}

impl Chain {
    /// Starts the chain; `done` runs exactly once, on whichever thread ends it.
    pub(super) fn start(self, done: Done) {
        let Chain {
            ledger,
            pool,
            slot,
            dsc,
            digest,
            reservation,
            request,
        } = self;
        let started = Instant::now();
        let next = ledger.clone();
        ledger.submit(
            LedgerWrite::Reserve(reservation, request),
            Box::new(move |r| {
                let id = match r.and_then(|id| {
                    id.ok_or_else(|| LedgerError::Database("reservation without id".into()))
                }) {
                    Ok(id) => id,
                    Err(e) => return done(Err(reservation_error(e))),
                };
                commit_seconds(started);
                // The reservation is durable: now, and only now, the HSM may sign.
                let started = Instant::now();
                let key = &dsc.key;
                pool.submit_in(
                    slot,
                    key,
                    digest,
                    Box::new(move |s| signed(next, id, s, started, done)),
                );
            }),
        );
    }
}

/// The HSM's reply (on its worker thread): completes the row, or releases it.
fn signed(
    ledger: Arc<dyn Ledger>,
    id: ReservationId,
    signature: Result<[u8; 64], HsmError>,
    started: Instant,
    done: Done,
) {
    let signature = match signature {
        Ok(s) => s,
        Err(e) => {
            return ledger.submit(
                LedgerWrite::Release(id),
                Box::new(move |r| {
                    if let Err(release) = r {
                        tracing::error!(error = %release, "could not release reservation after HSM failure");
                    }
                    done(Err(IssueError::Hsm(e)));
                }),
            );
        }
    };
    metrics::histogram!("dccsign_hsm_sign_seconds").record(started.elapsed().as_secs_f64());
    let started = Instant::now();
    let completion = LedgerWrite::Complete(id, hash::signature_hash_es256(&signature), signature);
    ledger.submit(
        completion,
        Box::new(move |r| {
            commit_seconds(started);
            done(r.map(|_| signature).map_err(IssueError::Ledger));
        }),
    );
}

fn commit_seconds(started: Instant) {
    metrics::histogram!("dccsign_ledger_commit_seconds").record(started.elapsed().as_secs_f64());
}

/// A refused reservation, in the caller's terms.
fn reservation_error(e: LedgerError) -> IssueError {
    match e {
        LedgerError::DuplicateUvci { .. } => IssueError::DuplicateUvci,
        LedgerError::DuplicateRequest => IssueError::RequestInProgress,
        LedgerError::NotReplaceable(why) => IssueError::NotReplaceable(why),
        other => IssueError::Ledger(other),
    }
}
