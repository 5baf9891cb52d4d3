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

use crate::revocation::hash::RevocationHash;

/// How many recent hashes start a merge. With 10 million rows `uci_index` has ~60 000 leaves,
/// so a merge of this many writes each leaf about once for two keys (a B-tree keyed at random
/// wrote one leaf per key). It also bounds what a reader scans when a hash is not in the index
/// (up to ~1.1 times this many rows) and the writer's memory (~50 bytes per hash, ~7 MiB).
pub(crate) const RECENT_LIMIT: usize = 131_072;

/// Entries merged per group commit, beyond the group's own size (a slice is `group + this`
/// long, so that a merge keeps ahead of the recent hashes that arrive while it runs).
const SLICE_EXTRA: usize = 64;

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
}

impl UciIndex {
    /// Reads the mark and the recent tail (on the writer's connection, before its first write).
    pub(super) fn load(c: &Connection, limit: usize) -> Result<UciIndex, rusqlite::Error> {
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
        };
        index.start_merge_if_due();
        Ok(index)
    }

    /// How many hashes the writer holds in memory.
    #[cfg(test)]
    pub(super) fn recent_len(&self) -> usize {
        self.recent.len()
    }

    /// The id to insert the next row with: `max(?, max(id) + 1)` in SQL, so that rows written
    /// by another connection cannot collide with it.
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
        let want = group + SLICE_EXTRA;
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
        metrics::gauge!("dccsign_ledger_uci_recent").set(self.recent.len() as f64);
    }

    /// The open transaction was rolled back.
    pub(super) fn aborted(&mut self) {
        self.pending.clear();
        self.staged = None;
    }

    fn start_merge_if_due(&mut self) {
        if self.merge.is_none() && self.recent.len() >= self.limit {
            let hi = self.recent.values().copied().max().unwrap_or(self.through);
            self.merge = Some(Merge { hi, after: None });
        }
    }
}
