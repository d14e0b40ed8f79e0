//! The trace writer's index of recent 4 KiB blocks: a least-recently-used
//! map from a block's 128-bit BLAKE3 digest to the id it was stored under, of
//! bounded size, so that a block written again is stored once without the
//! writer's memory growing with the trace.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A block's digest: BLAKE3, truncated to 128 bits (a collision would need
/// 2^64 blocks; the digests of a client's blocks are not chosen to collide).
pub(super) type Key = [u8; 16];

/// The key's first eight bytes are already uniformly spread: no hashing.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
}

const NONE: usize = usize::MAX;

struct Node {
    key: Key,
    id: u64,
    newer: usize,
    older: usize,
}

/// At most `capacity` keys; inserting past it forgets the least recently
/// used one.
pub(super) struct Window {
    map: HashMap<Key, usize, BuildHasherDefault<KeyHasher>>,
    nodes: Vec<Node>,
    newest: usize,
    oldest: usize,
    capacity: usize,
}

impl Window {
    pub fn new(capacity: usize) -> Window {
        Window {
            map: HashMap::default(),
            nodes: Vec::new(),
            newest: NONE,
            oldest: NONE,
            capacity: capacity.max(1),
        }
    }

    /// The id stored under `key`, made the most recently used.
    pub fn get(&mut self, key: &Key) -> Option<u64> {
        let slot = *self.map.get(key)?;
        self.unlink(slot);
        self.push_newest(slot);
        self.nodes.get(slot).map(|n| n.id)
    }

    /// Remember `key` as block `id` (the caller checked it is not there).
    pub fn insert(&mut self, key: Key, id: u64) {
        let slot = if self.nodes.len() < self.capacity {
            self.nodes.push(Node {
                key,
                id,
                newer: NONE,
                older: NONE,
            });
            self.nodes.len() - 1
        } else {
            let slot = self.oldest;
            self.unlink(slot);
            if let Some(node) = self.nodes.get_mut(slot) {
                self.map.remove(&node.key);
                node.key = key;
                node.id = id;
            }
            slot
        };
        self.map.insert(key, slot);
        self.push_newest(slot);
    }

    /// Keys held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn unlink(&mut self, slot: usize) {
        let Some((newer, older)) = self.nodes.get(slot).map(|n| (n.newer, n.older)) else {
            return;
        };
        match self.nodes.get_mut(newer) {
            Some(n) => n.older = older,
            None => self.newest = older,
        }
        match self.nodes.get_mut(older) {
            Some(n) => n.newer = newer,
            None => self.oldest = newer,
        }
    }

    fn push_newest(&mut self, slot: usize) {
        let old_newest = self.newest;
        if let Some(n) = self.nodes.get_mut(slot) {
            n.newer = NONE;
            n.older = old_newest;
        }
        match self.nodes.get_mut(old_newest) {
            Some(n) => n.newer = slot,
            None => self.oldest = slot,
        }
        self.newest = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> Key {
        [i; 16]
    }

    #[test]
    fn the_least_recently_used_key_goes_first() {
        let mut w = Window::new(3);
        for i in 0..3 {
            w.insert(key(i), u64::from(i) + 100);
        }
        assert_eq!(w.get(&key(0)), Some(100)); // 0 is now the newest
        w.insert(key(3), 103); // forgets 1, the oldest
        assert_eq!(w.get(&key(1)), None);
        assert_eq!(w.len(), 3);
        assert_eq!(
            [w.get(&key(0)), w.get(&key(2)), w.get(&key(3))],
            [Some(100), Some(102), Some(103)]
        );
        w.insert(key(4), 104); // forgets 0 (2 and 3 were used after it)
        assert_eq!(w.get(&key(0)), None);
        let mut one = Window::new(1);
        one.insert(key(7), 7);
        one.insert(key(8), 8);
        assert_eq!((one.get(&key(7)), one.get(&key(8))), (None, Some(8)));
    }
}
