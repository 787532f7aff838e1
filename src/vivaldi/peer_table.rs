//! The per-peer table of a node: an open-addressing hash map with linear
//! probing, keys and values stored together.
//!
//! Why not `std::collections::HashMap`: a lookup there reads the control
//! bytes and then the bucket, two cache misses when a simulator with
//! hundreds of nodes touches a random node's table on every update; here the
//! first probe usually lands on the slot holding both key and value, one
//! miss. The table stays at most half full so probe chains stay short.

use std::hash::{BuildHasher, BuildHasherDefault, Hash};

use super::PeerHasher;

/// Map from peer key to per-peer state.
#[derive(Debug, Clone)]
pub(crate) struct PeerTable<K, V> {
    slots: Vec<Option<(K, V)>>,
    len: usize,
}

impl<K: Hash + Eq, V> Default for PeerTable<K, V> {
    fn default() -> Self {
        PeerTable {
            slots: Vec::new(),
            len: 0,
        }
    }
}

fn hash<K: Hash>(k: &K) -> usize {
    BuildHasherDefault::<PeerHasher>::default().hash_one(k) as usize
}

impl<K: Hash + Eq, V> PeerTable<K, V> {
    /// Number of peers.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Index of `k`'s slot, or of the empty slot where it would go.
    /// The table must have at least one empty slot.
    #[inline]
    fn find(&self, k: &K) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = hash(k) & mask;
        loop {
            match &self.slots[i] {
                Some((key, _)) if key != k => i = (i + 1) & mask,
                _ => return i,
            }
        }
    }

    /// The value for `k`, if present.
    #[inline]
    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        if self.slots.is_empty() {
            return None;
        }
        let i = self.find(k);
        self.slots[i].as_mut().map(|(_, v)| v)
    }

    /// The value for `k`, inserting `make()` first if absent.
    #[inline]
    pub(crate) fn get_or_insert_with(&mut self, k: K, make: impl FnOnce() -> V) -> &mut V {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let i = self.find(&k);
        if self.slots[i].is_none() {
            self.slots[i] = Some((k, make()));
            self.len += 1;
        }
        &mut self.slots[i].as_mut().expect("slot just filled").1
    }

    /// Removes `k`; returns whether it was present.
    pub(crate) fn remove(&mut self, k: &K) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.find(k);
        if self.slots[i].take().is_none() {
            return false;
        }
        self.len -= 1;
        // Backward-shift deletion: pull later entries of the probe chain into
        // the hole so lookups never stop early at it.
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let Some((key, _)) = &self.slots[j] else {
                break;
            };
            let home = hash(key) & mask;
            // Move slot j to i unless its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.slots[i] = self.slots[j].take();
                i = j;
            }
        }
        true
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(8);
        let old = std::mem::replace(&mut self.slots, (0..cap).map(|_| None).collect());
        for (k, v) in old.into_iter().flatten() {
            let i = self.find(&k);
            self.slots[i] = Some((k, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn behaves_like_a_hash_map() {
        // A deterministic mix of inserts, lookups and removals, checked
        // against std's map.
        let mut t: PeerTable<u32, u64> = PeerTable::default();
        let mut m: HashMap<u32, u64> = HashMap::new();
        let mut x: u64 = 12345;
        for step in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = ((x >> 33) % 300) as u32;
            match x % 5 {
                0 | 1 => {
                    *t.get_or_insert_with(k, || 0) += step;
                    *m.entry(k).or_insert(0) += step;
                }
                2 => assert_eq!(t.remove(&k), m.remove(&k).is_some()),
                _ => assert_eq!(t.get_mut(&k).copied(), m.get(&k).copied()),
            }
            assert_eq!(t.len(), m.len());
        }
        for (k, v) in &m {
            assert_eq!(t.get_mut(k), Some(&mut v.clone()));
        }
    }

    #[test]
    fn string_keys() {
        let mut t: PeerTable<String, u8> = PeerTable::default();
        for i in 0..100 {
            t.get_or_insert_with(format!("node-{i}"), || i as u8);
        }
        assert_eq!(t.get_mut(&"node-42".to_string()), Some(&mut 42));
        assert!(t.remove(&"node-42".to_string()));
        assert_eq!(t.get_mut(&"node-42".to_string()), None);
        assert_eq!(t.len(), 99);
    }
}
