//! A Bloom filter over the UVCI hashes in `uci_index`, so that the ledger writer reads that
//! index only for a hash it may hold.
//!
//! Without it, every new certificate's uniqueness check read one random leaf of `uci_index`
//! (~260 MB at 10 million rows) through `pread`; skipping that read gave +10 to +18 % at 10
//! million rows (docs/benchmarks.md, "Seventeenth session"). A "no" is certain; a "maybe" costs
//! the read it saves otherwise. Deleted rows keep their bits (a false "maybe").
//!
//! The hashes are `SHA-256(UVCI)[0..16]`, already uniform: their own bytes give the bit
//! positions (three, by double hashing), nothing is hashed again. When a part of the filter
//! reaches its capacity a new one twice as large takes the next hashes, so the false-positive
//! rate stays near its design (~2 %) as the index grows, without reading it again.

use crate::revocation::hash::RevocationHash;

/// Bits per hash at a part's capacity (with three positions: ~1.7 % false positives; a part
/// starts with 10–20 bits per hash, rounded up to a power of two).
const BITS_PER_HASH: usize = 10;

/// The smallest part, in hashes.
const MIN_CAPACITY: usize = 1 << 20;

/// Most memory the filter takes (32 MiB: 10–20 bits per hash up to ~13–27 million hashes).
/// Beyond, new hashes go into the last part, and its false positives grow: the filter then
/// saves fewer reads, and costs no more memory.
const MAX_BYTES: usize = 32 << 20;

#[derive(Debug)]
struct Part {
    words: Vec<u64>,
    /// Number of bits − 1 (the number of bits is a power of two).
    mask: u64,
    capacity: usize,
    len: usize,
}

impl Part {
    fn new(capacity: usize) -> Part {
        let bits = (capacity * BITS_PER_HASH).next_power_of_two().max(64);
        Part {
            words: vec![0; bits / 64],
            mask: bits as u64 - 1,
            capacity: bits / BITS_PER_HASH,
            len: 0,
        }
    }

    fn positions(&self, h: &RevocationHash) -> [u64; 3] {
        let a = u64::from_le_bytes(h[0..8].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")) | 1;
        [
            a & self.mask,
            a.wrapping_add(b) & self.mask,
            a.wrapping_add(b.wrapping_mul(2)) & self.mask,
        ]
    }

    fn insert(&mut self, h: &RevocationHash) {
        for p in self.positions(h) {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.len += 1;
    }

    fn may_contain(&self, h: &RevocationHash) -> bool {
        self.positions(h)
            .iter()
            .all(|&p| self.words[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

/// The filter (see the module documentation).
#[derive(Debug)]
pub(super) struct HashFilter {
    parts: Vec<Part>,
}

impl HashFilter {
    /// An empty filter sized for `expected` hashes (at least [`MIN_CAPACITY`], at most
    /// [`MAX_BYTES`]).
    pub(super) fn with_capacity(expected: usize) -> HashFilter {
        let most = MAX_BYTES * 8 / BITS_PER_HASH;
        HashFilter {
            parts: vec![Part::new(expected.clamp(MIN_CAPACITY, most))],
        }
    }

    /// Adds a hash.
    pub(super) fn insert(&mut self, h: &RevocationHash) {
        let last = self.parts.last().expect("a filter has a part");
        let grown = last.capacity * 2;
        if last.len >= last.capacity && self.bytes() + grown * BITS_PER_HASH / 8 <= MAX_BYTES {
            self.parts.push(Part::new(grown));
        }
        self.parts
            .last_mut()
            .expect("a filter has a part")
            .insert(h);
    }

    /// `false`: the hash was never added. `true`: it may have been.
    pub(super) fn may_contain(&self, h: &RevocationHash) -> bool {
        self.parts.iter().any(|p| p.may_contain(h))
    }

    /// Bytes of memory the bits take.
    pub(super) fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.words.len() * 8).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A uniform 16-byte value for `i` (splitmix64 twice: SHA-256 would take most of the test's
    /// time in a debug build).
    fn h(i: u64) -> RevocationHash {
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let a = mix(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut out = [0; 16];
        out[..8].copy_from_slice(&a.to_le_bytes());
        out[8..].copy_from_slice(&mix(a).to_le_bytes());
        out
    }

    /// Every hash added is reported; of hashes never added, few are (the design is ~2 %), also
    /// after the filter grew new parts past its first capacity.
    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut f = HashFilter::with_capacity(0);
        let n = 2 * MIN_CAPACITY as u64;
        for i in 0..n {
            f.insert(&h(i));
        }
        assert!(f.parts.len() >= 2, "{} parts", f.parts.len());
        assert!((0..n).all(|i| f.may_contain(&h(i))));
        let trials = 100_000u64;
        let false_positives = (n..n + trials).filter(|&i| f.may_contain(&h(i))).count();
        assert!(
            false_positives < (trials / 25) as usize,
            "{false_positives} false positives in {trials}"
        );
        // Memory stays proportional to the hashes: under 4 times the bits of a full filter
        // even right after a new part was added.
        assert!(
            f.bytes() < 4 * n as usize * BITS_PER_HASH / 8,
            "{} bytes",
            f.bytes()
        );
    }
}
