//! The map behind the DNS stub's bounded caches (`cache.rs`, `encoded.rs`):
//! its owner inserts, then evicts while over its bound, one entry at a
//! time, the one under a clock hand going round the entries (CLOCK, "second
//! chance"): an entry used since the hand last passed it is passed over
//! once. The entry just inserted takes the evicted one's slot, behind the
//! hand, so without uses the order of eviction is the order of insertion.
//!
//! One at a time because emptying a full cache at once (10,000 upstream
//! answers dropped in one go, once a second at 10,000 new names a second)
//! held the serving thread for milliseconds while queries waited in its
//! sockets (BENCHMARKS.md "DNS stub", uncached). A clock and not random
//! eviction (CoreDNS's `cache`): when a working set of as many names as
//! entries moved on to new names, random eviction also took new names
//! while old ones stayed, and those were fetched from the upstream again.

use std::hash::Hash;

use indexmap::IndexMap;

/// Entries the hand passes over at most before it evicts one, used or not:
/// the cost of making room stays bounded when every entry was used.
const PASSES: usize = 8;

/// A map whose owner bounds it, calling [`ClockMap::evict`] to make room.
#[derive(Debug)]
pub struct ClockMap<K, V> {
    /// Each value with whether it was used since the hand last passed it.
    entries: IndexMap<K, (V, bool)>,
    hand: usize,
}

impl<K, V> Default for ClockMap<K, V> {
    fn default() -> Self {
        Self {
            entries: IndexMap::new(),
            hand: 0,
        }
    }
}

impl<K: Hash + Eq, V> ClockMap<K, V> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[cfg(test)]
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: Hash + indexmap::Equivalent<K> + ?Sized,
    {
        self.entries.contains_key(key)
    }

    /// The value of `key`, marked used.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        Q: Hash + indexmap::Equivalent<K> + ?Sized,
    {
        let (v, used) = self.entries.get_mut(key)?;
        *used = true;
        Some(v)
    }

    /// Keeps `value` for `key`, unused (a key it holds keeps its slot);
    /// returns the value it replaces.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.entries.insert(key, (value, false)).map(|(v, _)| v)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        Q: Hash + indexmap::Equivalent<K> + ?Sized,
    {
        self.entries.swap_remove(key).map(|(v, _)| v)
    }

    /// Evicts the entry under the hand, or the first unused one of the
    /// next few, but never the newest while there is another: the one
    /// inserted last takes the evicted one's slot. `None` when empty.
    pub fn evict(&mut self) -> Option<(K, V)> {
        for _ in 0..PASSES {
            let i = self.at_hand()?;
            let (_, (_, used)) = self.entries.get_index_mut(i)?;
            if !std::mem::take(used) {
                break;
            }
            self.hand = i + 1;
        }
        let i = self.at_hand()?;
        let (k, (v, _)) = self.entries.swap_remove_index(i)?;
        self.hand = i + 1;
        Some((k, v))
    }

    /// The hand's slot, among all but the last entry (the newest), or the
    /// only one.
    fn at_hand(&mut self) -> Option<usize> {
        let others = self.entries.len().checked_sub(1)?;
        if self.hand >= others {
            self.hand = 0;
        }
        Some(self.hand)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.hand = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(n: u32) -> ClockMap<u32, u32> {
        let mut m = ClockMap::default();
        for k in 0..n {
            m.insert(k, k);
        }
        m
    }

    #[test]
    fn unused_entries_are_evicted_in_the_order_they_came() {
        let mut m = full(5);
        let mut order = Vec::new();
        for k in 5..20 {
            m.insert(k, k);
            order.push(m.evict().expect("an entry").0);
            assert_eq!(m.len(), 5);
        }
        assert_eq!(order, (0..15).collect::<Vec<_>>());
    }

    #[test]
    fn a_used_entry_is_passed_over_once() {
        let mut m = full(5);
        assert_eq!(m.get_mut(&0), Some(&mut 0));
        let order: Vec<u32> = (5..10)
            .map(|k| {
                m.insert(k, k);
                m.evict().expect("an entry").0
            })
            .collect();
        assert_eq!(order, [1, 2, 3, 4, 0], "0 passed over once, then in turn");
    }

    #[test]
    fn the_hand_passes_over_a_bounded_number_of_used_entries() {
        let mut m = full(100);
        for k in 0..100 {
            m.get_mut(&k);
        }
        m.insert(100, 100);
        assert_eq!(m.evict().map(|(k, _)| k), Some(PASSES as u32));
        assert_eq!(m.len(), 100);
    }

    #[test]
    fn the_newest_entry_goes_last() {
        let mut m = ClockMap::default();
        m.insert(1, 1);
        m.insert(2, 2);
        for _ in 0..3 {
            m.get_mut(&1);
            assert_eq!(m.evict().map(|(k, _)| k), Some(1), "not the newest");
            m.insert(1, 1);
            assert_eq!(m.evict().map(|(k, _)| k), Some(2));
            m.insert(2, 2);
        }
        m.evict();
        assert_eq!(m.evict().map(|(k, _)| k), Some(2), "the only one left");
        assert!(m.evict().is_none());
    }

    #[test]
    fn a_replaced_value_keeps_its_slot_and_is_unused() {
        let mut m = full(3);
        m.get_mut(&0);
        assert_eq!(m.insert(0, 10), Some(0));
        m.insert(3, 3);
        assert_eq!(m.evict(), Some((0, 10)));
        assert_eq!(m.remove(&1), Some(1));
        assert!(!m.contains_key(&1));
    }
}
