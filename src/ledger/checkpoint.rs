//! The WAL checkpointer: copies committed pages from the write-ahead log into the database file
//! on its own thread and connection.
//!
//! SQLite's automatic checkpoint runs inside the `COMMIT` that crosses its threshold, so with it
//! the ledger writer stopped every ~40 group commits to copy ~1 000 pages and `fsync` the
//! database file while every request in flight waited. Here the writer turns the automatic
//! checkpoint off and pokes this thread every [`COMMITS_PER_CHECKPOINT`] commits (about as
//! often as the automatic checkpoint ran, so a page rewritten by many commits is still copied
//! once); this thread runs a `PASSIVE` checkpoint, which never blocks the writer.
//!
//! A checkpoint does not make anything durable: a commit is durable in the WAL when `COMMIT`
//! returns (`synchronous=FULL`). What it bounds is the WAL's size. SQLite starts the WAL over
//! only when a write transaction begins with every frame already copied, which a busy writer,
//! committing again microseconds after its last commit, almost never finds. So when this thread
//! has finished a checkpoint it raises a flag, and the writer, between two groups, runs one more
//! `PASSIVE` checkpoint itself: it copies only the few commits made meanwhile, and the writer's
//! next transaction starts the WAL over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::Connection;

/// Group commits between two background checkpoints (~1 000 WAL frames at the usual group
/// sizes, SQLite's default threshold).
pub(super) const COMMITS_PER_CHECKPOINT: u32 = 32;

/// The checkpoint thread. It stops when the writer's [`Poker`] is dropped; dropping this waits
/// for that.
pub(super) struct Checkpointer {
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on `conn` (a connection of its own to the ledger file) and returns the
    /// writer's handle on it.
    pub(super) fn start(conn: Connection) -> std::io::Result<(Checkpointer, Poker)> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || run(&conn, &rx, &flag))?;
        Ok((
            Checkpointer {
                thread: Some(thread),
            },
            Poker { poke: tx, done },
        ))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer's side of the checkpointer; never blocks.
pub(super) struct Poker {
    poke: crossbeam_channel::Sender<()>,
    done: Arc<AtomicBool>,
}

impl Poker {
    /// Asks for a checkpoint unless one is already asked for.
    pub(super) fn poke(&self) {
        let _ = self.poke.try_send(());
    }

    /// Whether a background checkpoint finished since the last call (then the writer copies
    /// the rest, so that its next transaction starts the WAL over).
    pub(super) fn finished(&self) -> bool {
        self.done.swap(false, Ordering::AcqRel)
    }
}

/// Runs one `PASSIVE` checkpoint (copies what it can without waiting for anyone) and returns
/// the number of frames in the WAL.
pub(super) fn passive(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

fn run(conn: &Connection, rx: &crossbeam_channel::Receiver<()>, done: &AtomicBool) {
    let mut failing = false;
    while rx.recv().is_ok() {
        let started = std::time::Instant::now();
        match passive(conn) {
            Ok(frames) => {
                metrics::histogram!("dccsign_ledger_checkpoint_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::gauge!("dccsign_ledger_wal_frames").set(frames as f64);
                done.store(true, Ordering::Release);
                if failing {
                    tracing::warn!("ledger checkpoints work again");
                    failing = false;
                }
            }
            Err(e) => {
                // The WAL grows until a checkpoint works again; commits stay durable.
                if !failing {
                    tracing::error!(error = %e, "ledger checkpoint failed: the WAL file grows");
                    failing = true;
                }
                metrics::counter!("dccsign_ledger_checkpoint_failures_total").increment(1);
            }
        }
    }
}
