//! Allocation: host clusters for data and tables, the refcount blocks and
//! refcount table that count them (growing both as the file grows), new L2
//! tables, and the decrements that free clusters again.

use super::WriteState;
use crate::driver::qcow2::l2::{COPIED, OFFSET_MASK};
use crate::driver::qcow2::refcount;
use crate::driver::qcow2::{header, Qcow2};
use crate::error::{usize_of, Error, Result};
use std::sync::{Arc, PoisonError};

/// The step by which the image file grows ahead of new data clusters, so
/// that allocating writes do not each change the file's length.
const GROW_STEP: u64 = 1 << 20;

impl Qcow2 {
    /// Make sure a refcount block covers `cluster`. Returns true if it had to
    /// create metadata (the caller must then look for free clusters again).
    fn ensure_refblock(&self, ws: &mut WriteState, cluster: u64) -> Result<bool> {
        let per_block = ws.rc.entries_per_block();
        let ti = cluster / per_block;
        let index = usize::try_from(ti).unwrap_or(usize::MAX);
        match ws.rc.table.get(index) {
            None => {
                self.grow_reftable(ws, ti + 1)?;
                return Ok(true);
            }
            Some(e) if e & OFFSET_MASK != 0 => return Ok(false),
            Some(_) => {}
        }
        // No block covers [ti * per_block, (ti + 1) * per_block), so every
        // cluster there is free: put the block at the first and let it count
        // itself.
        let cluster_size = self.header.cluster_size();
        let block_cluster = ti * per_block;
        let mut block = vec![0u8; usize_of(cluster_size)?];
        refcount::set_entry(&mut block, 0, ws.rc.order(), 1);
        let block_offset = block_cluster * cluster_size;
        if block_offset == 0 {
            // Cluster 0 is the header: a table without a block for it lies.
            return Err(self.corrupt(
                "refcount table entry 0 is empty, but the header cluster it covers is in use"
                    .to_string(),
            ));
        }
        self.meta_write(ws, &block, block_offset)?;
        ws.rc.insert_block(block_offset, block);
        // The table may name the block once the block is on disk.
        self.sync(ws)?;
        let at = ws.rc.table_offset + ti * 8;
        self.meta_write(ws, &block_offset.to_be_bytes(), at)?;
        if let Some(slot) = ws.rc.table.get_mut(index) {
            *slot = block_offset;
        }
        ws.end_cluster = ws.end_cluster.max(block_cluster + 1);
        Ok(true)
    }

    /// Replace the refcount table with one of at least `min_entries` entries,
    /// placed past the end of everything, with the blocks it needs to count
    /// itself. The header switches to it in one write, after a flush.
    fn grow_reftable(&self, ws: &mut WriteState, min_entries: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let per_block = ws.rc.entries_per_block();
        let per_cluster = cluster_size / 8;
        let old_len = ws.rc.table.len() as u64;
        let mut entries = min_entries.max(old_len * 2).div_ceil(per_cluster) * per_cluster;
        let start = ws.end_cluster;
        let has_block = |table: &[u64], ti: u64| {
            table
                .get(usize::try_from(ti).unwrap_or(usize::MAX))
                .is_some_and(|e| e & OFFSET_MASK != 0)
        };
        let (table_clusters, missing) = loop {
            let table_clusters = entries / per_cluster;
            let mut blocks = 0u64;
            let missing = loop {
                let end = start + table_clusters + blocks;
                let missing: Vec<u64> = (start / per_block..=(end - 1) / per_block)
                    .filter(|ti| !has_block(&ws.rc.table, *ti))
                    .collect();
                if missing.len() as u64 == blocks {
                    break missing;
                }
                blocks = missing.len() as u64;
            };
            let end = start + table_clusters + blocks;
            if (end - 1) / per_block < entries {
                break (table_clusters, missing);
            }
            entries = ((end - 1) / per_block + 1).div_ceil(per_cluster) * per_cluster;
        };
        if table_clusters * cluster_size > header::MAX_REFTABLE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "{}: the image would need a refcount table larger than QEMU allows",
                self.file.path().display()
            )));
        }
        let mut table = ws.rc.table.clone();
        table.resize(usize_of(entries)?, 0);
        let blocks_start = start + table_clusters;
        for (i, ti) in missing.iter().enumerate() {
            let offset = (blocks_start + i as u64) * cluster_size;
            let block = vec![0u8; usize_of(cluster_size)?];
            self.meta_write(ws, &block, offset)?;
            ws.rc.insert_block(offset, block);
            if let Some(slot) = table.get_mut(usize::try_from(*ti).unwrap_or(usize::MAX)) {
                *slot = offset;
            }
        }
        let old_table = std::mem::replace(&mut ws.rc.table, table);
        let end = blocks_start + missing.len() as u64;
        for cluster in start..end {
            ws.rc.set(self.file.as_ref(), cluster, 1)?;
        }
        // The table, its blocks and their refcounts are on disk before the
        // header names the table; the old one is freed once it names it.
        self.flush_refblocks(ws)?;
        let bytes: Vec<u8> = ws.rc.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.meta_write(ws, &bytes, start * cluster_size)?;
        self.sync(ws)?;
        self.write_reftable_fields(ws, start * cluster_size, table_clusters as u32)?;
        self.sync(ws)?;
        let old_offset = ws.rc.table_offset;
        let old_clusters = u64::from(ws.rc.table_clusters);
        ws.rc.table_offset = start * cluster_size;
        ws.rc.table_clusters = table_clusters as u32;
        ws.end_cluster = end;
        drop(old_table);
        self.free_range(ws, old_offset, old_clusters * cluster_size, true)?;
        Ok(())
    }

    /// Allocate one host cluster (its refcount 1, in the cache) and return
    /// its offset. Quarantined clusters are passed over.
    pub(super) fn alloc_cluster(&self, ws: &mut WriteState) -> Result<u64> {
        'search: loop {
            let mut cluster = ws.free_hint.max(1);
            while cluster < ws.end_cluster
                && (ws.rc.get(self.file.as_ref(), cluster)? != 0
                    || (!ws.quarantine.is_empty() && ws.quarantine.contains(&cluster)))
            {
                cluster += 1;
            }
            if self.ensure_refblock(ws, cluster)? {
                continue 'search;
            }
            ws.rc.set(self.file.as_ref(), cluster, 1)?;
            ws.free_hint = cluster + 1;
            ws.end_cluster = ws.end_cluster.max(cluster + 1);
            self.l2_needs_refcounts(ws)?;
            return Ok(cluster << self.header.cluster_bits);
        }
    }

    /// Drop one reference from every host cluster overlapping the range.
    /// `on_disk`: nothing on disk names the range any more. Otherwise an L2
    /// entry that did is only cached, so a cluster freed here is not reused
    /// until that entry is on disk.
    pub(super) fn free_range(
        &self,
        ws: &mut WriteState,
        start: u64,
        len: u64,
        on_disk: bool,
    ) -> Result<()> {
        let bits = self.header.cluster_bits;
        let first = start >> bits;
        let last = (start + len.max(1) - 1) >> bits;
        for cluster in first..=last {
            let count = ws.rc.get(self.file.as_ref(), cluster)?;
            if count == 0 {
                return Err(self.corrupt(format!(
                    "cluster at host offset {:#x} is referenced but its refcount is 0",
                    cluster << bits
                )));
            }
            ws.rc.set(self.file.as_ref(), cluster, count - 1)?;
            if count == 1 {
                // A freed L2 table must not be found in the cache under its
                // old offset once the cluster holds something else.
                self.cache.discard(cluster << bits);
                if on_disk {
                    ws.free_hint = ws.free_hint.min(cluster);
                } else {
                    ws.quarantine.insert(cluster);
                }
            }
        }
        Ok(())
    }

    /// Drop the references that the L2 changes just made no longer hold;
    /// the decrements reach the disk after those changes do.
    pub(super) fn free_dropped(&self, ws: &mut WriteState, frees: &[(u64, u64)]) -> Result<()> {
        self.refcounts_need_l2(ws)?;
        for (host, len) in frees {
            self.free_range(ws, *host, *len, false)?;
        }
        Ok(())
    }

    /// A new L2 table for L1 index `l1_index`, whose entry is `l1_entry`: a
    /// copy of the table at `old_l2` (the entry's offset, a table shared with
    /// a snapshot), or an empty one when that is 0. The table
    /// and its refcount reach the disk before the L1 entry names it, as in
    /// QEMU's l2_allocate; a shared table loses our reference only once the
    /// L1 entry on disk no longer names it.
    ///
    /// Unlike QEMU, the entry for an empty table is not written (nor synced
    /// for) here but at the next flush or close (`write_new_l1_entries`):
    /// until then the range reads from the new table in memory, and a crash
    /// leaves the entry 0 on disk, so the range reads as before, which is
    /// all a write that no flush has covered may promise. A sequential
    /// writer then never waits for the disk mid-stream, once per 512 MiB
    /// (64 KiB clusters). A shared table is still replaced at once: the
    /// old one is freed only after the entry on disk moved off it.
    pub(super) fn new_l2_table(
        &self,
        ws: &mut WriteState,
        l1_index: u64,
        l1_entry: u64,
        old_l2: u64,
    ) -> Result<u64> {
        let cluster_size = self.header.cluster_size();
        let table: Vec<u64> = if old_l2 == 0 {
            vec![0; usize_of(cluster_size / 8)?]
        } else {
            self.load_l2(old_l2)?.to_vec()
        };
        let l2_offset = self.alloc_cluster(ws)?;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        // Written even when empty: a clean table may leave the cache, and is
        // then read back from the file through the L1 entry in memory.
        self.meta_write(ws, &bytes, l2_offset)?;
        let entry = l2_offset | COPIED;
        let at = self.l1_offset + l1_index * 8;
        if old_l2 == 0 {
            // Write the entry's old value over itself now, so that the file
            // holds the space the flush will write it into: a fresh image's
            // L1 table may be a hole, and on a full disk the flush could
            // otherwise not name the tables the writes before it went into.
            self.meta_write(ws, &l1_entry.to_be_bytes(), at)?;
        } else {
            self.flush_refblocks(ws)?;
            self.sync(ws)?;
            self.meta_write(ws, &entry.to_be_bytes(), at)?;
        }
        {
            let mut l1 = self.l1.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = l1.get_mut(usize::try_from(l1_index).unwrap_or(usize::MAX)) {
                *slot = entry;
            }
        }
        self.cache.insert_clean(l2_offset, Arc::from(table));
        if old_l2 == 0 {
            ws.new_l1.push(l1_index);
        } else {
            self.sync(ws)?;
            self.free_range(ws, old_l2, cluster_size, true)?;
        }
        Ok(l2_offset)
    }

    /// Write the L1 entries that name new tables (`new_l2_table`), once the
    /// tables as made (empty) and their refcounts are durable; runs of
    /// neighbours go in one write. The caller syncs after. A crash before
    /// that sync leaves each entry old or new, and each new one names a
    /// table whose every entry on disk is either 0 or an entry whose own
    /// orderings held when it was written. An entry stays listed until it
    /// is written.
    pub(super) fn write_new_l1_entries(&self, ws: &mut WriteState) -> Result<()> {
        if ws.new_l1.is_empty() {
            return Ok(());
        }
        self.flush_refblocks(ws)?;
        self.sync(ws)?;
        ws.new_l1.sort_unstable();
        ws.new_l1.dedup();
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for &index in &ws.new_l1 {
            let entry = self.l1_entry(index)?.to_be_bytes();
            match runs.last_mut() {
                Some((first, bytes)) if *first + (bytes.len() / 8) as u64 == index => {
                    bytes.extend_from_slice(&entry);
                }
                _ => runs.push((index, entry.to_vec())),
            }
        }
        for (first, bytes) in runs {
            self.meta_write(ws, &bytes, self.l1_offset + first * 8)?;
        }
        ws.new_l1.clear();
        Ok(())
    }

    /// Make the image file cover the host cluster at `host`, a fresh one
    /// past everything written: the file grows by whole steps, which read as
    /// zeros until written. An L2 entry naming the cluster waits for the new
    /// length to be durable (a crash must not leave it past the end).
    pub(super) fn cover_cluster(&self, ws: &mut WriteState, host: u64) -> Result<()> {
        let end = host.saturating_add(self.header.cluster_size());
        if ws.file_len >= end {
            return Ok(());
        }
        let ahead = end.div_ceil(GROW_STEP).saturating_mul(GROW_STEP).max(end);
        ws.pending = true;
        let new_len = match self.file.set_len(ahead) {
            Ok(()) => ahead,
            // Near a full disk, take only what this cluster needs.
            Err(_) => {
                self.file.set_len(end)?;
                end
            }
        };
        ws.file_len = new_len;
        ws.order.l2_after_sync = true;
        Ok(())
    }

    /// A host cluster for new data at guest `cluster_start`.
    pub(super) fn new_data_cluster(&self, ws: &mut WriteState, cluster_start: u64) -> Result<u64> {
        if self.header.has_data_file() {
            // QEMU keeps guest and host offsets equal in an external data file.
            Ok(cluster_start)
        } else {
            self.alloc_cluster(ws)
        }
    }
}
