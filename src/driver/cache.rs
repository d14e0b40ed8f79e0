//! A bounded, write-back cache of decoded second-level tables (qcow2's L2
//! tables, vmdk's grain tables), shared by every reader thread and the writer.
//! It serves more than one format, so it lives at `driver/` level.
//!
//! Tables are handed out as `Arc`s, so a lookup holds the lock only to find or
//! insert, never while walking entries. The writer changes a cached table in
//! place (`Arc::make_mut`: a reader still walking the old version keeps its
//! copy) and marks the changed entries dirty; they reach the file when the
//! writer writes the table back (on flush, close, or to keep the number of
//! dirty tables bounded), never on every guest write. Readers never evict a
//! dirty table, so they always see the newest entries.
//!
//! When full, the least recently used half of the clean tables is dropped at
//! once: that keeps eviction O(log n) per miss on long sequential scans, where
//! evicting one table per miss would scan the map each time.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Decoded L2 entries (for extended L2, pairs of entry and bitmap, interleaved).
pub type L2Table = Arc<[u64]>;

struct Slot {
    table: L2Table,
    last_use: u64,
    /// The words changed since the table was last written to the file.
    dirty: Option<Range<usize>>,
}

struct Inner {
    slots: HashMap<u64, Slot>,
    clock: u64,
    dirty: usize,
}

/// The cache, keyed by the table's host offset.
pub struct L2Cache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl L2Cache {
    /// A cache that holds at most `capacity` tables (at least 2), dirty ones
    /// aside: the writer keeps those to at most half of it.
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                clock: 0,
                dirty: 0,
            }),
            capacity: capacity.max(2),
        }
    }

    /// How many tables the cache holds when full.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The table at `offset`, loading it with `load` on a miss. The lock is not
    /// held while loading; two threads may load the same table, which is
    /// harmless: the first copy cached wins, so a table the writer changed in
    /// the meantime is never replaced by a stale one.
    pub fn get_or_load<E>(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<L2Table, E>,
    ) -> Result<L2Table, E> {
        {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            if let Some(slot) = inner.slots.get_mut(&offset) {
                slot.last_use = now;
                return Ok(slot.table.clone());
            }
        }
        let table = load()?;
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.get(&offset) {
            return Ok(slot.table.clone());
        }
        self.make_room(&mut inner);
        let now = inner.clock;
        inner.slots.insert(
            offset,
            Slot {
                table: table.clone(),
                last_use: now,
                dirty: None,
            },
        );
        Ok(table)
    }

    /// Drop the least recently used half of the clean tables if the cache is full.
    fn make_room(&self, inner: &mut Inner) {
        if inner.slots.len() < self.capacity {
            return;
        }
        let mut ages: Vec<u64> = inner
            .slots
            .values()
            .filter(|s| s.dirty.is_none())
            .map(|s| s.last_use)
            .collect();
        ages.sort_unstable();
        let cutoff = ages.get(ages.len() / 2).copied().unwrap_or(0);
        inner
            .slots
            .retain(|_, slot| slot.dirty.is_some() || slot.last_use > cutoff);
    }

    /// Put a table the writer just wrote to the file (clean), replacing any
    /// older copy.
    pub fn insert_clean(&self, offset: u64, table: L2Table) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        self.make_room(&mut inner);
        let old = inner.slots.insert(
            offset,
            Slot {
                table,
                last_use: now,
                dirty: None,
            },
        );
        if old.is_some_and(|s| s.dirty.is_some()) {
            inner.dirty -= 1;
        }
    }

    /// Change the cached table at `offset`: `change` gets its words and
    /// returns the range it changed, which becomes dirty. Returns false (and
    /// changes nothing) when the table is not cached; the caller loads it and
    /// tries again.
    pub fn modify(&self, offset: u64, change: impl FnOnce(&mut [u64]) -> Range<usize>) -> bool {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let Some(slot) = inner.slots.get_mut(&offset) else {
            return false;
        };
        slot.last_use = now;
        let changed = change(Arc::make_mut(&mut slot.table));
        if changed.is_empty() {
            return true;
        }
        let was_clean = slot.dirty.is_none();
        slot.dirty = Some(match slot.dirty.take() {
            Some(d) => d.start.min(changed.start)..d.end.max(changed.end),
            None => changed,
        });
        if was_clean {
            inner.dirty += 1;
        }
        true
    }

    /// How many tables hold changes the file does not have yet.
    pub fn dirty_count(&self) -> usize {
        self.lock().dirty
    }

    /// The offsets of the dirty tables, least recently used first.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let inner = self.lock();
        let mut dirty: Vec<(u64, u64)> = inner
            .slots
            .iter()
            .filter(|(_, s)| s.dirty.is_some())
            .map(|(offset, s)| (s.last_use, *offset))
            .collect();
        dirty.sort_unstable();
        dirty.into_iter().map(|(_, offset)| offset).collect()
    }

    /// Take the dirty words of the table at `offset` to write them back: the
    /// table as it is now and the changed range. The table counts as clean
    /// from here; if the write fails, `mark_dirty` puts the range back.
    pub fn take_dirty(&self, offset: u64) -> Option<(L2Table, Range<usize>)> {
        let mut inner = self.lock();
        let slot = inner.slots.get_mut(&offset)?;
        let range = slot.dirty.take()?;
        let table = slot.table.clone();
        inner.dirty -= 1;
        Some((table, range))
    }

    /// Mark `range` of `table` at `offset` dirty again (its write-back failed),
    /// putting the table back if a reader evicted it in the meantime.
    pub fn mark_dirty(&self, offset: u64, table: L2Table, range: Range<usize>) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let slot = inner.slots.entry(offset).or_insert(Slot {
            table,
            last_use: now,
            dirty: None,
        });
        let was_clean = slot.dirty.is_none();
        slot.dirty = Some(match slot.dirty.take() {
            Some(d) => d.start.min(range.start)..d.end.max(range.end),
            None => range,
        });
        if was_clean {
            inner.dirty += 1;
        }
    }

    /// Forget the table at `offset` (its cluster was freed). Its changes, if
    /// any, are dropped with it: nothing names the table any more.
    pub fn discard(&self, offset: u64) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.remove(&offset) {
            if slot.dirty.is_some() {
                inner.dirty -= 1;
            }
        }
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

    #[test]
    fn dirty_tables_stay_until_written_back() {
        let cache = L2Cache::new(4);
        let load = |o: u64| move || Ok::<_, ()>(Arc::from(vec![o; 4]));
        cache.get_or_load(1, load(1)).unwrap();
        // A reader holding the table keeps its version while the writer changes it.
        let held = cache.get_or_load(1, load(1)).unwrap();
        assert!(cache.modify(1, |t| {
            t[2] = 42;
            2..3
        }));
        assert_eq!(held[2], 1);
        assert!(!cache.modify(99, |_| 0..1));
        for offset in 2..40 {
            cache.get_or_load(offset, load(offset)).unwrap();
        }
        // Readers evicted clean tables only.
        assert_eq!(cache.dirty_count(), 1);
        assert_eq!(cache.get_or_load(1, load(1)).unwrap()[2], 42);
        assert_eq!(cache.dirty_offsets(), vec![1]);
        let (table, range) = cache.take_dirty(1).unwrap();
        assert_eq!((table[2], range), (42, 2..3));
        assert_eq!(cache.dirty_count(), 0);
        assert!(cache.take_dirty(1).is_none());
        cache.mark_dirty(1, table, 0..1);
        assert_eq!(cache.take_dirty(1).unwrap().1, 0..1);
    }
}
