//! The WAL checkpointer: copies committed pages from the write-ahead log into the database file
//! on its own thread and connection.
//!
//! SQLite's automatic checkpoint runs inside the `COMMIT` that crosses its threshold, so with it
//! the ledger writer stopped every ~40 group commits to copy ~1 000 pages and `fsync` the
//! database file while every request in flight waited. Here the writer turns the automatic
//! checkpoint off and pokes this thread when [`Due`] says so: every [`WRITES_PER_CHECKPOINT`]
//! writes, or [`COMMITS_PER_CHECKPOINT`] commits if the groups are small (either is about
//! SQLite's threshold of 1 000 WAL frames, so a page rewritten by many commits is still copied
//! once); this thread runs a `PASSIVE` checkpoint, which never blocks the writer.
//!
//! A checkpoint does not make anything durable: a commit is durable in the WAL when `COMMIT`
//! returns (`synchronous=FULL`). What it bounds is the WAL's size. SQLite starts the WAL over
//! only when a write transaction begins with every frame already copied, which a busy writer,
//! committing again microseconds after its last commit, almost never finds. So when this thread
//! has finished a checkpoint it raises a flag, and the writer, between two groups, runs one more
//! `PASSIVE` checkpoint itself (its *catch-up*): it copies only the few commits made meanwhile,
//! and the writer's next transaction starts the WAL over.
//!
//! The catch-up is on the writer's path, so every request in flight waits for it, and it ends
//! with a `fsync` of the database file after writes at random places in it: on the development
//! VM's disk ~2–3 ms on a fresh ledger and ~12 ms with 10 million rows, where each
//! certificate's UVCI-hash index leaf is a page of its own. So this thread checkpoints in
//! passes until a pass had little left to copy ([`converge`]): the catch-up then copies what was
//! committed during that last, short pass instead of during the whole checkpoint. With 10
//! million rows that cut the catch-up from 10–12 ms to ~6 ms and p99.9 from ~100 to ~50 ms, and
//! the open-loop p99 at 6 000/s on a fresh ledger fell from a median of 12.3 to 9.7 ms; the
//! rate moved within the noise (docs/benchmarks.md, "Sixteenth session").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::Connection;

/// Writes (reservations, completions, releases) between two background checkpoints: ~1 000
/// WAL frames, SQLite's default threshold, at the group sizes of a busy ledger (a commit of 27
/// writes wrote ~30 frames).
///
/// Counting commits instead, as before, checkpointed far more often under moderate load: at
/// 4 000 certificates/s the groups hold ~5 writes, and a checkpoint every 32 commits meant 45
/// a second, each with two `fsync`s and the writer's catch-up on the critical path (stream
/// open loop at 4 000/s, three alternated runs: p50 3.9–7.0 ms against 2.9–5.4 ms when
/// counting ~1 000 writes; the checkpoint thread's CPU per certificate fell from 9.6 to 3.4 µs).
pub(super) const WRITES_PER_CHECKPOINT: u32 = 1000;

/// Commits between two background checkpoints when the groups are small (a commit writes at
/// least ~3 frames: the table and two index leaves), so that a quiet ledger's WAL stays near
/// 1 000 frames too.
pub(super) const COMMITS_PER_CHECKPOINT: u32 = 256;

/// The writer's count towards the next background checkpoint.
#[derive(Default)]
pub(super) struct Due {
    writes: u32,
    commits: u32,
}

impl Due {
    /// Counts a commit of `writes` writes; true when a checkpoint is due (and starts over).
    pub(super) fn committed(&mut self, writes: usize) -> bool {
        self.writes = self
            .writes
            .saturating_add(u32::try_from(writes).unwrap_or(u32::MAX));
        self.commits += 1;
        if self.writes >= WRITES_PER_CHECKPOINT || self.commits >= COMMITS_PER_CHECKPOINT {
            *self = Due::default();
            return true;
        }
        false
    }
}

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

impl Checkpointer {
    /// Lets the thread end on its own (when the writer's [`Poker`] is dropped) instead of
    /// waiting for it.
    pub(super) fn detach(mut self) {
        self.thread.take();
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
    passive_counts(conn).map(|(log, _)| log)
}

/// One `PASSIVE` checkpoint: the frames in the WAL, and how many of them are copied.
fn passive_counts(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// Checkpoints until the last pass copied at most [`CAUGHT_UP_FRAMES`] frames (at most
/// [`MAX_PASSES`] passes), and returns the frames in the WAL: each pass copies what was
/// committed during the one before, so the writer's catch-up after it copies only what was
/// committed since the last, short pass.
fn converge(conn: &Connection) -> rusqlite::Result<i64> {
    let (mut log, mut copied) = passive_counts(conn)?;
    for _ in 1..MAX_PASSES {
        let (now_log, now_copied) = passive_counts(conn)?;
        let pass = now_copied - copied;
        (log, copied) = (now_log, now_copied);
        if pass <= CAUGHT_UP_FRAMES {
            break;
        }
    }
    Ok(log)
}

/// A pass that copied at most this many frames (a few group commits) ends [`converge`].
const CAUGHT_UP_FRAMES: i64 = 64;

/// At most this many passes per background checkpoint.
const MAX_PASSES: usize = 4;

fn run(conn: &Connection, rx: &crossbeam_channel::Receiver<()>, done: &AtomicBool) {
    let mut failing = false;
    while rx.recv().is_ok() {
        let started = std::time::Instant::now();
        match converge(conn) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `converge` copies every frame when nobody writes meanwhile and reports the WAL's size.
    #[test]
    fn converge_copies_the_whole_wal_of_an_idle_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let w = Connection::open(&path).unwrap();
        w.pragma_update(None, "journal_mode", "WAL").unwrap();
        w.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        w.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        for _ in 0..50 {
            w.execute("INSERT INTO t VALUES (zeroblob(3000))", [])
                .unwrap();
        }
        let c = Connection::open(&path).unwrap();
        let frames = converge(&c).unwrap();
        assert!(frames >= 50, "{frames} frames");
        assert_eq!(passive_counts(&c).unwrap(), (frames, frames));
    }

    /// Busy groups are counted by writes, small ones by commits; the count starts over.
    #[test]
    fn a_checkpoint_is_due_after_enough_writes_or_commits() {
        let commits_until_due = |group: usize| {
            let mut due = Due::default();
            (1..).find(|_| due.committed(group)).unwrap()
        };
        assert_eq!(commits_until_due(27), 38); // 38 × 27 = 1 026 writes
        assert_eq!(commits_until_due(5), 200);
        assert_eq!(commits_until_due(1), COMMITS_PER_CHECKPOINT);
        assert_eq!(commits_until_due(2000), 1);
        let mut due = Due::default();
        assert!((0..200).filter(|_| due.committed(5)).count() == 1);
        assert!(
            !due.committed(5),
            "counting starts over after a checkpoint is due"
        );
    }
}
