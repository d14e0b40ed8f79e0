//! A bounded cache of decoded L2 tables, shared by every reader thread.
//!
//! Tables are handed out as `Arc`s, so a lookup holds the lock only to find or
//! insert, never while walking entries. When full, the least recently used half
//! is dropped at once: that keeps eviction O(log n) per miss on long sequential
//! scans, where evicting one table per miss would scan the map each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Decoded L2 entries (for extended L2, pairs of entry and bitmap, interleaved).
pub type L2Table = Arc<[u64]>;

struct Slot {
    table: L2Table,
    last_use: u64,
}

struct Inner {
    slots: HashMap<u64, Slot>,
    clock: u64,
}

/// The cache, keyed by the table's host offset.
pub struct L2Cache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl L2Cache {
    /// A cache that holds at most `capacity` tables (at least 4).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                clock: 0,
            }),
            capacity: capacity.max(4),
        }
    }

    /// The table at `offset`, loading it with `load` on a miss. The lock is not
    /// held while loading; two threads may load the same table, which is harmless.
    pub fn get_or_load<E>(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<L2Table, E>,
    ) -> Result<L2Table, E> {
        {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.clock += 1;
            let now = inner.clock;
            if let Some(slot) = inner.slots.get_mut(&offset) {
                slot.last_use = now;
                return Ok(slot.table.clone());
            }
        }
        let table = load()?;
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.slots.len() >= self.capacity {
            let mut ages: Vec<u64> = inner.slots.values().map(|s| s.last_use).collect();
            ages.sort_unstable();
            let cutoff = ages.get(ages.len() / 2).copied().unwrap_or(0);
            inner.slots.retain(|_, slot| slot.last_use > cutoff);
        }
        let now = inner.clock;
        inner.slots.insert(
            offset,
            Slot {
                table: table.clone(),
                last_use: now,
            },
        );
        Ok(table)
    }
}

impl L2Cache {
    /// Put a table a writer just wrote, replacing any older copy.
    pub fn insert(&self, offset: u64, table: L2Table) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.clock += 1;
        let now = inner.clock;
        inner.slots.insert(
            offset,
            Slot {
                table,
                last_use: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_but_stays_bounded_and_correct() {
        let cache = L2Cache::new(8);
        for round in 0..3u64 {
            for offset in 0..100u64 {
                let t = cache
                    .get_or_load::<()>(offset, || Ok(Arc::from(vec![offset * 10 + round])))
                    .unwrap();
                assert_eq!(t[0] / 10, offset);
                assert!(cache.inner.lock().unwrap().slots.len() <= 8);
            }
        }
    }
}
