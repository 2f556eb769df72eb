//! The nftables record's largest part: element hash ─▶ the one Service
//! that owns it, for millions of elements (2.3 million at 100,000
//! Services x 10 endpoints).
//!
//! A hash map of them costs its entry size over its fill, and a map that
//! grows by doubling sits between 44% and 88% full: 54 MB for those 2.3
//! million 12-byte entries. [`Owners`] keeps them in one sorted array
//! instead (28 MB), with a table of where each 16-bit prefix of the hash
//! starts, so a lookup is a short binary search in about 35 entries. A
//! removed element is marked in place; an element the array lacks goes to
//! a small map beside it, merged into the array when that map outgrows an
//! eighth of it plus 1,024 (or the marks a quarter of it plus 1,024): a
//! merge is one pass over the array, and an eighth more between two of
//! them keeps their cost per insert constant. The change that triggers
//! one pays for it (once in some 290,000 new elements at 2.3 million).
//!
//! ```text
//!  get(h):    added[h] ─▶ or sorted[starts[h >> 48] .. starts[(h >> 48) + 1]] by binary search
//!  insert(h): in sorted? set in place : added[h] = owner ─▶ merge when added > sorted / 8 + 1,024
//!             (get_or_insert: the same, leaving an owner it finds)
//!  remove(h): added.remove(h) or mark sorted[i] FREE ─▶ merge when marks > sorted / 4 + 1,024
//! ```

use std::collections::HashMap;

/// An element's 64-bit hash as a key aligned to 4 bytes: with its
/// owner's id, an entry takes 12 bytes (a `u64` key made it 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementHash([u32; 2]);

impl ElementHash {
    /// The key of a 64-bit hash.
    pub fn new(h: u64) -> Self {
        Self([h as u32, (h >> 32) as u32])
    }

    /// The hash back.
    pub fn get(self) -> u64 {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 32)
    }

    /// Its top 16 bits: its bucket of the array's start table.
    fn prefix(self) -> usize {
        (self.0[1] >> 16) as usize
    }
}

impl std::hash::Hash for ElementHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.get());
    }
}

/// The hasher of [`ElementHash`] keys, which are hashes already: their
/// own value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Passthrough(u64);

impl std::hash::Hasher for Passthrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Elements by their hash, in a hash map.
pub type ByHash<V> = HashMap<ElementHash, V, std::hash::BuildHasherDefault<Passthrough>>;

/// The owner of a removed element of the sorted array.
const FREE: u32 = u32::MAX;

/// Buckets of [`Owners::starts`]: one per 16-bit prefix.
const BUCKETS: usize = 1 << 16;

/// Element hash ─▶ owner id, 12 bytes an element (see the module).
#[derive(Debug, Clone, Default)]
pub struct Owners {
    /// By hash; an owner of [`FREE`] marks a removed element.
    sorted: Vec<(ElementHash, u32)>,
    /// `starts[p]`: the first index of `sorted` whose hash has a prefix
    /// of `p` or more; `BUCKETS + 1` of them (none before the first merge).
    starts: Vec<u32>,
    /// Elements `sorted` does not have.
    added: ByHash<u32>,
    /// Elements of `sorted` marked [`FREE`].
    freed: usize,
}

impl Owners {
    /// Elements held.
    pub fn len(&self) -> usize {
        self.sorted.len() - self.freed + self.added.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where `h` is in `sorted`, marked or not.
    fn find(&self, h: ElementHash) -> Option<usize> {
        if self.sorted.is_empty() {
            return None;
        }
        let p = h.prefix();
        let (from, to) = (self.starts[p] as usize, self.starts[p + 1] as usize);
        let key = h.get();
        self.sorted[from..to]
            .binary_search_by_key(&key, |(e, _)| e.get())
            .ok()
            .map(|i| from + i)
    }

    /// The owner of `h`.
    pub fn get(&self, h: ElementHash) -> Option<u32> {
        if let Some(&o) = self.added.get(&h) {
            return Some(o);
        }
        let o = self.sorted[self.find(h)?].1;
        (o != FREE).then_some(o)
    }

    /// Sets the owner of `h`.
    pub fn insert(&mut self, h: ElementHash, owner: u32) {
        debug_assert_ne!(owner, FREE, "an owner id");
        match self.find(h) {
            Some(i) => {
                if self.sorted[i].1 == FREE {
                    self.freed -= 1;
                }
                self.sorted[i].1 = owner;
            }
            None => self.add(h, owner),
        }
    }

    /// The owner of `h`, or, when it has none, `owner` becomes it (and
    /// `None`): one lookup where `get` then `insert` took two.
    pub fn get_or_insert(&mut self, h: ElementHash, owner: u32) -> Option<u32> {
        debug_assert_ne!(owner, FREE, "an owner id");
        if let Some(&o) = self.added.get(&h) {
            return Some(o);
        }
        match self.find(h) {
            Some(i) if self.sorted[i].1 != FREE => Some(self.sorted[i].1),
            Some(i) => {
                self.sorted[i].1 = owner;
                self.freed -= 1;
                None
            }
            None => {
                self.add(h, owner);
                None
            }
        }
    }

    /// Puts `h`, which `sorted` lacks, in `added`.
    fn add(&mut self, h: ElementHash, owner: u32) {
        self.added.insert(h, owner);
        if self.added.len() > self.sorted.len() / 8 + 1_024 {
            self.merge();
        }
    }

    /// Removes `h`; its owner.
    pub fn remove(&mut self, h: ElementHash) -> Option<u32> {
        if let Some(o) = self.added.remove(&h) {
            return Some(o);
        }
        let i = self.find(h)?;
        let o = std::mem::replace(&mut self.sorted[i].1, FREE);
        if o == FREE {
            return None;
        }
        self.freed += 1;
        if self.freed > self.sorted.len() / 4 + 1_024 {
            self.merge();
        }
        Some(o)
    }

    /// Moves `added` into `sorted`, drops the marked, and makes `starts`
    /// again: one pass over the array (merged from its end, in place).
    fn merge(&mut self) {
        let mut added: Vec<(ElementHash, u32)> = self.added.drain().collect();
        added.sort_unstable_by_key(|(h, _)| h.get());
        self.added.shrink_to(0);
        let old = self.sorted.len();
        self.sorted.reserve_exact(added.len());
        // Both are sorted: fill from the back, largest first, into the
        // room `reserve_exact` made (the array's own entries move right).
        self.sorted
            .resize(old + added.len(), (ElementHash::new(0), FREE));
        let (mut i, mut j, mut k) = (old, added.len(), old + added.len());
        while j > 0 {
            debug_assert!(
                i == 0 || self.sorted[i - 1].0 != added[j - 1].0,
                "a key in both the array and the map"
            );
            let take_old = i > 0 && self.sorted[i - 1].0.get() > added[j - 1].0.get();
            k -= 1;
            if take_old {
                i -= 1;
                self.sorted[k] = self.sorted[i];
            } else {
                j -= 1;
                self.sorted[k] = added[j];
            }
        }
        self.sorted.retain(|&(_, o)| o != FREE);
        self.sorted.shrink_to_fit();
        self.freed = 0;
        self.starts.clear();
        self.starts.reserve_exact(BUCKETS + 1);
        let mut at = 0;
        for p in 0..BUCKETS {
            while at < self.sorted.len() && self.sorted[at].0.prefix() < p {
                at += 1;
            }
            self.starts.push(at as u32);
        }
        self.starts.push(self.sorted.len() as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes spread like real ones (a fixed odd multiplier).
    fn h(i: u64) -> ElementHash {
        ElementHash::new(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    #[test]
    fn holds_what_a_map_holds_through_merges() {
        let mut o = Owners::default();
        let mut m: HashMap<u64, u32> = HashMap::new();
        // Enough inserts for several merges, then removals, re-inserts
        // and owner changes of elements in the array and in the map.
        for i in 0..20_000u64 {
            o.insert(h(i), (i % 7) as u32);
            m.insert(i, (i % 7) as u32);
        }
        assert!(o.sorted.len() > 10_000, "merged into the array");
        for i in (0..20_000u64).step_by(3) {
            assert_eq!(o.remove(h(i)), m.remove(&i), "remove {i}");
        }
        assert_eq!(o.remove(h(0)), None, "twice");
        // What `get_or_insert` finds is left as it is; what it does not
        // find (removed from the array, or never there) it inserts.
        assert_eq!(o.get_or_insert(h(1), 8), m.get(&1).copied());
        assert_eq!(o.get_or_insert(h(0), 8), None);
        assert_eq!(o.get_or_insert(h(40_000), 8), None);
        m.insert(0, 8);
        m.insert(40_000, 8);
        for i in (0..25_000u64).step_by(5) {
            o.insert(h(i), 9);
            m.insert(i, 9);
        }
        for i in (0..30_000u64).chain([40_000]) {
            assert_eq!(o.get(h(i)), m.get(&i).copied(), "get {i}");
        }
        assert_eq!(o.len(), m.len());
        for i in (0..30_000u64).chain([40_000]) {
            assert_eq!(o.remove(h(i)), m.remove(&i), "remove all {i}");
        }
        assert!(o.is_empty());
        assert_eq!(o.get(h(1)), None);
    }

    #[test]
    fn prefixes_at_both_ends_are_found() {
        let mut o = Owners::default();
        let edges = [0, 1, u64::MAX, u64::MAX - 1, 1 << 48, (1 << 48) - 1];
        for (n, &e) in edges.iter().enumerate() {
            o.insert(ElementHash::new(e), n as u32);
        }
        o.merge();
        assert!(o.added.is_empty());
        for (n, &e) in edges.iter().enumerate() {
            assert_eq!(o.get(ElementHash::new(e)), Some(n as u32), "{e:#x}");
        }
        assert_eq!(o.get(ElementHash::new(2)), None);
    }
}
