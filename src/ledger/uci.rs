//! The uniqueness of UVCI hashes, kept so that recording a certificate writes no page at a
//! random place of the database file.
//!
//! A UVCI hash is random, so a B-tree keyed by it (the `UNIQUE` index that `certificates` had
//! up to schema version 6) gets each new key on a random leaf: every certificate dirtied one
//! random page, written once to the WAL and again, by the checkpoint, at a random place of the
//! database file. With 10 million rows those leaves no longer coalesce in a checkpoint, and this
//! disk's random writes cost 22 % of the rate (docs/benchmarks.md, "Sixteenth session").
//!
//! Since schema version 7 the hashes live in two places:
//! - `uci_index (uci_hash PRIMARY KEY, certificate_id) WITHOUT ROWID` holds the hash of every
//!   certificate whose id is at most the mark `counters.uci_indexed_through`;
//! - the newer certificates ("recent") are the tail of `certificates` by id. The ledger writer
//!   holds their hashes in memory ([`UciIndex`], rebuilt from that tail when it starts); readers
//!   look in `uci_index` and scan the tail ([`find_sql!`]).
//!
//! Once [`RECENT_LIMIT`] hashes are recent, the writer merges them into `uci_index` in hash
//! order: a slice per group commit, inside that group's transaction, so that every leaf of the
//! index is written about once per merge for all the keys it gets, and in key order. The last
//! slice moves the mark in the same transaction. A crash mid-merge leaves hashes in both places
//! (the insert ignores them the next time), never in neither.
//!
//! The writer reads `uci_index` only for a hash its Bloom filter may hold ([`super::bloom`]),
//! loaded from the index by a thread of its own when the writer starts; until it arrives, every
//! check reads the index. Hashes merged meanwhile are added to it when it does.
//!
//! Invariants:
//! - every certificate row with `id <= uci_indexed_through` has its `(uci_hash, id)` in
//!   `uci_index`;
//! - `uci_index` holds no entry of a row that no longer exists (the trigger
//!   `certificates_uci_index_delete` removes it with the row);
//! - the writer never reuses an id it saw, so a merge that started at id `hi` meets no new row
//!   at or below `hi`.

use std::collections::BTreeMap;
use std::ops::Bound;

use rusqlite::{params, Connection, OptionalExtension};

use super::bloom::HashFilter;
use crate::revocation::hash::RevocationHash;

/// How many recent hashes start a merge. With 10 million rows `uci_index` has ~60 000 leaves,
/// so a merge of this many writes each leaf about once for two keys (a B-tree keyed at random
/// wrote one leaf per key). It also bounds what a reader scans when a hash is not in the index
/// (up to ~1.5 times this many rows) and the writer's memory (~50 bytes per hash, ~10 MiB).
pub(crate) const RECENT_LIMIT: usize = 131_072;

/// Entries merged per group commit beyond twice the group's size: a slice is `2 × group +
/// this` long, so a merge runs at least twice as fast as hashes arrive (a group of `g` writes
/// adds at most `g`), and the recent hashes peak at ~1.5 × [`RECENT_LIMIT`]. A slice
/// proportional to the group keeps a small group's commit small: at moderate load (groups of
/// one or two writes) a fixed 64 more made every commit of a merge several times as long, and
/// the merges were where the tail latency came from (docs/benchmarks.md, eighteenth session).
const SLICE_EXTRA: usize = 8;

/// The query that finds the certificate id of a UVCI hash (`?1`) from any connection: the
/// index, else the recent tail. `hit(id)` is a common table expression to start a statement
/// with; the caller joins `certificates` on it.
macro_rules! find_sql {
    () => {
        "WITH hit(id) AS (
             SELECT certificate_id FROM uci_index WHERE uci_hash = ?1
             UNION ALL
             SELECT id FROM certificates
             WHERE id > (SELECT value FROM counters WHERE name = 'uci_indexed_through')
               AND uci_hash = ?1
             LIMIT 1) "
    };
}
pub(crate) use find_sql;

/// A change to the recent hashes made in the open transaction.
#[derive(Debug, Clone, Copy)]
enum Change {
    Added(RevocationHash, i64),
    Removed(RevocationHash, i64),
}

/// A merge in progress: every recent row with `id <= hi` goes to `uci_index`.
#[derive(Debug, Clone, Copy)]
struct Merge {
    hi: i64,
    /// Hashes up to this one (in order) are merged.
    after: Option<RevocationHash>,
}

/// The ledger writer's view of the UVCI hashes (see the module documentation).
#[derive(Debug)]
pub(super) struct UciIndex {
    /// Committed rows with `id > through`: hash → id.
    recent: BTreeMap<RevocationHash, i64>,
    through: i64,
    /// The id for the next row: above every id this writer saw.
    next_id: i64,
    limit: usize,
    merge: Option<Merge>,
    /// Changes of the open transaction, in order.
    pending: Vec<Change>,
    /// Merge progress made in the open transaction.
    staged: Option<Option<Merge>>,
    /// Every hash in `uci_index` may be in it (`None`: not loaded, every check reads the index).
    filter: Option<HashFilter>,
    /// The filter being loaded, and the hashes merged since the load started.
    loading: Option<(FilterLoad, Vec<RevocationHash>)>,
}

/// Where the loading thread sends the filter (or why it could not load it).
type FilterLoad = crossbeam_channel::Receiver<Result<HashFilter, String>>;

/// Reads every hash of `uci_index` into a filter, on a thread of its own (one read transaction:
/// a snapshot). ~3 s at 10 million rows.
fn load_filter(c: Connection) -> FilterLoad {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let load = move || -> Result<HashFilter, rusqlite::Error> {
        let started = std::time::Instant::now();
        // The mark bounds the number of hashes (ids start at 1), without counting them.
        let n: i64 = c.query_row(
            "SELECT value FROM counters WHERE name = 'uci_indexed_through'",
            [],
            |r| r.get(0),
        )?;
        let mut filter = HashFilter::with_capacity(usize::try_from(n).unwrap_or(0));
        let mut stmt = c.prepare("SELECT uci_hash FROM uci_index")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            if let Ok(h) = <RevocationHash>::try_from(r.get_ref(0)?.as_blob()?) {
                filter.insert(&h);
            }
        }
        tracing::info!(
            at_most = n,
            mib = filter.bytes() >> 20,
            seconds = started.elapsed().as_secs_f64(),
            "UVCI hash filter loaded"
        );
        Ok(filter)
    };
    let spawned = std::thread::Builder::new()
        .name("ledger-filter".into())
        .spawn(move || {
            let _ = tx.send(load().map_err(|e| e.to_string()));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start loading the UVCI hash filter");
    }
    rx
}

impl UciIndex {
    /// Reads the mark and the recent tail (on the writer's connection, before its first write),
    /// and starts loading the filter on `filter_conn`, if given.
    pub(super) fn load(
        c: &Connection,
        limit: usize,
        filter_conn: Option<Connection>,
    ) -> Result<UciIndex, rusqlite::Error> {
        let through: i64 = c.query_row(
            "SELECT value FROM counters WHERE name = 'uci_indexed_through'",
            [],
            |r| r.get(0),
        )?;
        let mut recent = BTreeMap::new();
        let mut next_id = through + 1;
        let mut stmt = c.prepare("SELECT uci_hash, id FROM certificates WHERE id > ?1")?;
        let mut rows = stmt.query(params![through])?;
        while let Some(r) = rows.next()? {
            let h: Vec<u8> = r.get(0)?;
            let id: i64 = r.get(1)?;
            let h: RevocationHash = h.try_into().map_err(|_| {
                rusqlite::Error::InvalidColumnType(
                    0,
                    "uci_hash".into(),
                    rusqlite::types::Type::Blob,
                )
            })?;
            recent.insert(h, id);
            next_id = next_id.max(id + 1);
        }
        let mut index = UciIndex {
            recent,
            through,
            next_id,
            limit: limit.max(1),
            merge: None,
            pending: Vec::new(),
            staged: None,
            filter: None,
            loading: filter_conn.map(|fc| (load_filter(fc), Vec::new())),
        };
        index.start_merge_if_due();
        Ok(index)
    }

    /// How many hashes the writer holds in memory.
    #[cfg(test)]
    pub(super) fn recent_len(&self) -> usize {
        self.recent.len()
    }

    /// The id to insert the next row with: above every row when the writer started (the mark
    /// and the tail), and above every id it inserted since. Nothing else inserts certificates
    /// while it runs (the writer lock in `sqlite.rs`).
    pub(super) fn next_id(&self) -> i64 {
        self.next_id
    }

    /// The live certificate with this hash, as `(id, state)`, seen from the open transaction.
    pub(super) fn find(
        &self,
        c: &Connection,
        h: &RevocationHash,
    ) -> Result<Option<(i64, String)>, rusqlite::Error> {
        let state_of = |id: i64| -> Result<Option<(i64, String)>, rusqlite::Error> {
            c.prepare_cached("SELECT state FROM certificates WHERE id = ?1 AND uci_hash = ?2")?
                .query_row(params![id, &h[..]], |r| Ok((id, r.get(0)?)))
                .optional()
        };
        let latest = self.pending.iter().rev().find_map(|ch| match ch {
            Change::Added(k, id) if k == h => Some(Some(*id)),
            Change::Removed(k, _) if k == h => Some(None),
            _ => None,
        });
        match latest {
            Some(Some(id)) => return state_of(id),
            Some(None) => return Ok(None),
            None => {}
        }
        if let Some(&id) = self.recent.get(h) {
            // The row may be gone (purged by another connection): then look on.
            if let Some(found) = state_of(id)? {
                return Ok(Some(found));
            }
        }
        if self.filter.as_ref().is_some_and(|f| !f.may_contain(h)) {
            return Ok(None);
        }
        c.prepare_cached(
            "SELECT c.id, c.state FROM uci_index u JOIN certificates c ON c.id = u.certificate_id
             WHERE u.uci_hash = ?1",
        )?
        .query_row(params![&h[..]], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
    }

    /// A row was inserted in the open transaction.
    pub(super) fn added(&mut self, h: RevocationHash, id: i64) {
        self.next_id = self.next_id.max(id + 1);
        self.pending.push(Change::Added(h, id));
    }

    /// A row was deleted in the open transaction.
    pub(super) fn removed(&mut self, h: RevocationHash, id: i64) {
        self.pending.push(Change::Removed(h, id));
    }

    /// A point to roll the pending changes back to (with a savepoint).
    pub(super) fn mark(&self) -> usize {
        self.pending.len()
    }

    /// Forgets the changes made since `mark` (their savepoint was rolled back).
    pub(super) fn rollback_to(&mut self, mark: usize) {
        self.pending.truncate(mark);
    }

    /// Whether a merge is under way (a group's transaction then merges a slice of it).
    pub(super) fn merging(&self) -> bool {
        self.merge.is_some()
    }

    /// Merges the next slice of a due merge into `uci_index`, in the open transaction (the
    /// caller wraps it in a savepoint and calls [`UciIndex::slice_failed`] if it fails).
    pub(super) fn merge_slice(
        &mut self,
        c: &Connection,
        group: usize,
    ) -> Result<(), rusqlite::Error> {
        let Some(m) = self.merge else {
            return Ok(());
        };
        let start = match m.after {
            Some(h) => Bound::Excluded(h),
            None => Bound::Unbounded,
        };
        let want = 2 * group + SLICE_EXTRA;
        let mut last = None;
        let mut done = 0;
        let mut insert = c.prepare_cached(
            "INSERT INTO uci_index (uci_hash, certificate_id)
             SELECT uci_hash, id FROM certificates WHERE id = ?1 AND uci_hash = ?2
             ON CONFLICT (uci_hash) DO NOTHING",
        )?;
        for (h, &id) in self.recent.range((start, Bound::Unbounded)) {
            if done == want {
                break;
            }
            last = Some(*h);
            if id <= m.hi {
                insert.execute(params![id, &h[..]])?;
                // Before the commit: a rolled-back slice only leaves a false "maybe".
                match (&mut self.filter, &mut self.loading) {
                    (Some(f), _) => f.insert(h),
                    (None, Some((_, merged))) => merged.push(*h),
                    (None, None) => {}
                }
                done += 1;
            }
        }
        let finished = done < want;
        if finished {
            c.prepare_cached("UPDATE counters SET value = ?1 WHERE name = 'uci_indexed_through'")?
                .execute(params![m.hi])?;
            self.staged = Some(None);
        } else {
            self.staged = Some(Some(Merge {
                hi: m.hi,
                after: last,
            }));
        }
        Ok(())
    }

    /// The slice's savepoint was rolled back: the merge stays where it was.
    pub(super) fn slice_failed(&mut self) {
        self.staged = None;
    }

    /// The open transaction committed.
    pub(super) fn committed(&mut self) {
        for ch in self.pending.drain(..) {
            match ch {
                Change::Added(h, id) => {
                    self.recent.insert(h, id);
                }
                Change::Removed(h, id) => {
                    if self.recent.get(&h) == Some(&id) {
                        self.recent.remove(&h);
                    }
                }
            }
        }
        match self.staged.take() {
            None => {}
            Some(Some(m)) => self.merge = Some(m),
            Some(None) => {
                let hi = self.merge.take().map_or(self.through, |m| m.hi);
                self.through = hi;
                self.recent.retain(|_, id| *id > hi);
                metrics::counter!("dccsign_ledger_uci_merges_total").increment(1);
            }
        }
        self.start_merge_if_due();
        self.poll_filter(false);
        metrics::gauge!("dccsign_ledger_uci_recent").set(self.recent.len() as f64);
    }

    /// Installs the filter if its load finished (`wait`: waits for it).
    pub(super) fn poll_filter(&mut self, wait: bool) {
        let Some((rx, _)) = &self.loading else {
            return;
        };
        let got = if wait {
            rx.recv()
                .map_err(|_| "the loading thread ended".to_string())
        } else {
            match rx.try_recv() {
                Ok(r) => Ok(r),
                Err(crossbeam_channel::TryRecvError::Empty) => return,
                Err(e) => Err(e.to_string()),
            }
        };
        let (_, merged) = self.loading.take().expect("checked above");
        match got.and_then(|r| r) {
            Ok(mut filter) => {
                for h in &merged {
                    filter.insert(h);
                }
                metrics::gauge!("dccsign_ledger_uci_filter_bytes").set(filter.bytes() as f64);
                self.filter = Some(filter);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot load the UVCI hash filter; every check reads uci_index"
            ),
        }
    }

    /// The open transaction was rolled back.
    pub(super) fn aborted(&mut self) {
        self.pending.clear();
        self.staged = None;
    }

    fn start_merge_if_due(&mut self) {
        if self.merge.is_none() && self.recent.len() >= self.limit {
            // Every committed row is below `next_id`, and no later row will be.
            self.merge = Some(Merge {
                hi: self.next_id - 1,
                after: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: i64) -> RevocationHash {
        use sha2::{Digest, Sha256};
        Sha256::digest(i.to_le_bytes())[..16].try_into().unwrap()
    }

    /// A ledger file with certificates 1..=300 (UVCI hash `h(id)`), the first 200 in
    /// `uci_index`.
    fn ledger(dir: &std::path::Path) -> (std::path::PathBuf, Connection) {
        let path = dir.join("l.sqlite");
        drop(crate::ledger::SqliteLedger::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        for id in 1..=300i64 {
            c.execute(
                "INSERT INTO certificates (id, uci_hash, country_uci_hash, cert_type, kid, iat,
                     exp, state, reserved_at)
                 VALUES (?1, ?2, zeroblob(16), 'test', zeroblob(8), 1, 2, 'reserved', 1)",
                params![id, &h(id)[..]],
            )
            .unwrap();
        }
        c.execute_batch(
            "INSERT INTO uci_index SELECT uci_hash, id FROM certificates WHERE id <= 200;
             UPDATE counters SET value = 200 WHERE name = 'uci_indexed_through';",
        )
        .unwrap();
        (path, c)
    }

    /// Runs the due merge to its end, a slice per transaction.
    fn merge_all(u: &mut UciIndex, c: &Connection) {
        for _ in 0..100 {
            if u.merge.is_none() {
                return;
            }
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            u.merge_slice(c, 0).unwrap();
            c.execute_batch("COMMIT").unwrap();
            u.committed();
        }
        panic!("the merge did not end");
    }

    /// With the filter loaded, the hashes in the index and the recent ones are found, hashes
    /// never recorded are not; so the filter says "no" for none of the indexed hashes.
    #[test]
    fn with_the_filter_every_recorded_hash_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let (path, c) = ledger(dir.path());
        let mut u = UciIndex::load(&c, 1_000, Some(Connection::open(&path).unwrap())).unwrap();
        u.poll_filter(true);
        let f = u.filter.as_ref().expect("the filter is loaded");
        assert!((1..=200).all(|i| f.may_contain(&h(i))));
        assert_eq!(u.recent_len(), 100);
        for id in 1..=300 {
            assert_eq!(
                u.find(&c, &h(id)).unwrap(),
                Some((id, "reserved".into())),
                "{id}"
            );
        }
        for id in 301..400 {
            assert_eq!(u.find(&c, &h(id)).unwrap(), None, "{id}");
        }
    }

    /// Hashes merged while the filter loads (from a snapshot taken before them) are added to it
    /// when it arrives.
    #[test]
    fn hashes_merged_while_the_filter_loads_are_added_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, c) = ledger(dir.path());
        let mut u = UciIndex::load(&c, 50, None).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        u.loading = Some((rx, Vec::new()));
        // The 100 recent hashes (201..=300) are due for a merge: it runs before the filter
        // arrives.
        merge_all(&mut u, &c);
        assert!(u.filter.is_none());
        assert_eq!((u.through, u.recent_len()), (300, 0));
        // A filter loaded from a snapshot that had none of them.
        tx.send(Ok(HashFilter::with_capacity(0))).unwrap();
        u.poll_filter(false);
        let f = u.filter.as_ref().expect("the filter is installed");
        assert!((201..=300).all(|i| f.may_contain(&h(i))));
        for id in 201..=300 {
            assert_eq!(
                u.find(&c, &h(id)).unwrap(),
                Some((id, "reserved".into())),
                "{id}"
            );
        }
    }
}
