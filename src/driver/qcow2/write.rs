//! The qcow2 driver, write side: cluster and L2 allocation, refcounts, copy on
//! write, zero clusters, discard, subclusters and lazy refcounts.
//!
//! Every update follows QEMU's crash-safe order, per L2 table touched by a
//! request: guest data and refcount increments first, then a flush; then the
//! L2 entries; then (for a new or copied L2 table) a flush and the L1 entry;
//! then a flush and the refcount decrements of whatever the old entries held.
//! A crash at any point leaves old-or-new data and, at worst, leaked clusters.
//!
//! One writer at a time holds the `WriteState` mutex; readers never take it.
//! They see an L1 entry under a read lock and an L2 table as an immutable
//! `Arc`, which a writer replaces only after the new table is on disk.

use super::l2::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::refcount::{self, Refcounts};
use super::{header, Qcow2};
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};

/// The largest file (in clusters) whose refcounts a writable open of a dirty
/// image rebuilds: 8 bytes of memory each, so at most 256 MiB.
const MAX_REBUILD_CLUSTERS: u64 = 32 << 20;
/// An extended L2 bitmap with every subcluster reading as zeros.
const ALL_ZEROES: u64 = 0xffff_ffff << 32;
/// An extended L2 bitmap with every subcluster allocated.
const ALL_ALLOCATED: u64 = 0xffff_ffff;

/// The mutable metadata state of a writable image.
pub(super) struct WriteState {
    rc: Refcounts,
    /// Clusters at or past this index are free (past every allocation).
    end_cluster: u64,
    /// No cluster below this index is free.
    free_hint: u64,
    /// Writes were issued since the last flush.
    pending: bool,
    /// The incompatible feature bits as they are on disk.
    incompatible: u64,
}

/// What a request does to one cluster.
#[derive(Clone, Copy)]
enum Op<'a> {
    /// Write these bytes.
    Data(&'a [u8]),
    /// Write zeros as data (v2 images, unaligned pieces).
    ZeroData,
    /// Make the range read as zeros through metadata where possible.
    Zero { unmap: bool },
    /// Drop whole clusters.
    Discard,
}

/// One L2 entry (with its bitmap for extended L2) as the writer sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    entry: u64,
    bitmap: u64,
}

impl Qcow2 {
    /// Set up writing: check the image may be written, rebuild refcounts of a
    /// dirty image, and clear autoclear bits we do not maintain.
    pub(super) fn enable_writes(&mut self) -> Result<()> {
        let h = &self.header;
        if h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
            return Err(Error::format(
                self.file.path(),
                "qcow2: the image is marked corrupt (incompatible feature bit 1); repair it with 'qemu-img check -r all' before writing",
            ));
        }
        let rc = Refcounts::load(
            self.file.as_ref(),
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )?;
        let cluster_size = h.cluster_size();
        let mut state = WriteState {
            rc,
            end_cluster: self.file.len()?.div_ceil(cluster_size),
            free_hint: 0,
            pending: false,
            incompatible: h.incompatible_features,
        };
        // Past the end of the file, clusters may still hold a refcount (QEMU
        // allocates before it writes): start allocating past the last one.
        if let Some(ti) = state.rc.table.iter().rposition(|e| e & OFFSET_MASK != 0) {
            let per_block = state.rc.entries_per_block();
            let base = ti as u64 * per_block;
            for i in (0..per_block).rev() {
                if state.rc.get(self.file.as_ref(), base + i)? != 0 {
                    state.end_cluster = state.end_cluster.max(base + i + 1);
                    break;
                }
            }
        }
        if h.version >= 3 && h.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            self.rebuild_refcounts(&mut state)?;
            state.incompatible &= !header::INCOMPAT_DIRTY;
            self.write_incompatible(&mut state)?;
            self.barrier(&mut state)?;
        } else {
            self.check_metadata_refcounts(&mut state)?;
        }
        let keep = h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW;
        if h.version >= 3 && h.autoclear_features != keep {
            self.write_field(&mut state, header::field::AUTOCLEAR_FEATURES, keep)?;
            self.barrier(&mut state)?;
        }
        self.writer = Some(std::sync::Mutex::new(state));
        Ok(())
    }

    /// Refuse to write an image whose refcounts call its own metadata free:
    /// the allocator would hand those clusters out again and overwrite the
    /// header or a table (QEMU's overlap checks stop the same writes).
    fn check_metadata_refcounts(&self, ws: &mut WriteState) -> Result<()> {
        let h = &self.header;
        let cluster_size = h.cluster_size();
        let mut tables = vec![
            ("the header".to_string(), 0, cluster_size),
            (
                "the L1 table".to_string(),
                h.l1_table_offset,
                u64::from(h.l1_size) * 8,
            ),
            (
                "the refcount table".to_string(),
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cluster_size,
            ),
        ];
        for block in ws.rc.table.iter().map(|e| e & OFFSET_MASK) {
            if block != 0 {
                tables.push((
                    format!("the refcount block at {block:#x}"),
                    block,
                    cluster_size,
                ));
            }
        }
        if h.nb_snapshots > 0 {
            let len = snapshot_table_len(self.file.as_ref(), h)?;
            tables.push(("the snapshot table".to_string(), h.snapshots_offset, len));
        }
        for (what, offset, bytes) in tables {
            if bytes == 0 {
                continue;
            }
            let first = offset >> h.cluster_bits;
            let last = (offset + bytes - 1) >> h.cluster_bits;
            for cluster in first..=last {
                if ws.rc.get(self.file.as_ref(), cluster)? == 0 {
                    return Err(self.corrupt(format!(
                        "the refcount of {what} (cluster at {:#x}) is 0, so writing could overwrite it; repair the image with 'qemu-img check -r all' first",
                        cluster << h.cluster_bits
                    )));
                }
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<MutexGuard<'_, WriteState>> {
        match &self.writer {
            Some(m) => Ok(m.lock().unwrap_or_else(PoisonError::into_inner)),
            None => Err(Error::ReadOnly(self.file.path().to_path_buf())),
        }
    }

    fn meta_write(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        ws.pending = true;
        self.file.write_all_at(buf, offset)
    }

    fn data_write(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        ws.pending = true;
        self.data.write_all_at(buf, offset)
    }

    /// Make everything written so far durable before what comes next.
    fn barrier(&self, ws: &mut WriteState) -> Result<()> {
        if ws.pending {
            if self.header.has_data_file() {
                self.data.flush()?;
            }
            self.file.flush()?;
            ws.pending = false;
        }
        Ok(())
    }

    /// Write one 64-bit header field.
    fn write_field(&self, ws: &mut WriteState, field: header::Be64, value: u64) -> Result<()> {
        self.meta_write(ws, &value.to_be_bytes(), field.offset())
    }

    /// Point the header at a new refcount table, in one write.
    fn write_reftable_fields(
        &self,
        ws: &mut WriteState,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<()> {
        let (at, bytes) = header::refcount_table_fields(table_offset, table_clusters);
        self.meta_write(ws, &bytes, at)
    }

    fn write_incompatible(&self, ws: &mut WriteState) -> Result<()> {
        let bits = ws.incompatible;
        self.write_field(ws, header::field::INCOMPATIBLE_FEATURES, bits)
    }

    fn lazy_refcounts(&self) -> bool {
        self.header.version >= 3
            && self.header.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Before the first metadata change of an image with lazy refcounts, mark
    /// it dirty, as QEMU does; `close` clears the bit again.
    fn mark_dirty(&self, ws: &mut WriteState) -> Result<()> {
        if self.lazy_refcounts() && ws.incompatible & header::INCOMPAT_DIRTY == 0 {
            ws.incompatible |= header::INCOMPAT_DIRTY;
            self.write_incompatible(ws)?;
            self.barrier(ws)?;
        }
        Ok(())
    }

    /// Flush everything and clear the dirty bit (lazy refcounts).
    pub(super) fn close_writes(&self) -> Result<()> {
        let mut ws = self.state()?;
        self.barrier(&mut ws)?;
        if ws.incompatible & header::INCOMPAT_DIRTY != 0 {
            ws.incompatible &= !header::INCOMPAT_DIRTY;
            self.write_incompatible(&mut ws)?;
            self.barrier(&mut ws)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- refcounts

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
        let mut block = vec![0u8; usize::try_from(cluster_size).unwrap_or(0)];
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
        self.barrier(ws)?;
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
        table.resize(usize::try_from(entries).unwrap_or(0), 0);
        let blocks_start = start + table_clusters;
        for (i, ti) in missing.iter().enumerate() {
            let offset = (blocks_start + i as u64) * cluster_size;
            let block = vec![0u8; usize::try_from(cluster_size).unwrap_or(0)];
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
        let bytes: Vec<u8> = ws.rc.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.meta_write(ws, &bytes, start * cluster_size)?;
        self.barrier(ws)?;
        self.write_reftable_fields(ws, start * cluster_size, table_clusters as u32)?;
        self.barrier(ws)?;
        let old_offset = ws.rc.table_offset;
        let old_clusters = u64::from(ws.rc.table_clusters);
        ws.rc.table_offset = start * cluster_size;
        ws.rc.table_clusters = table_clusters as u32;
        ws.end_cluster = end;
        drop(old_table);
        self.free_range(ws, old_offset, old_clusters * cluster_size)?;
        Ok(())
    }

    /// Allocate one host cluster (refcount 1, written) and return its offset.
    fn alloc_cluster(&self, ws: &mut WriteState) -> Result<u64> {
        'search: loop {
            let mut cluster = ws.free_hint.max(1);
            while cluster < ws.end_cluster && ws.rc.get(self.file.as_ref(), cluster)? != 0 {
                cluster += 1;
            }
            if self.ensure_refblock(ws, cluster)? {
                continue 'search;
            }
            ws.rc.set(self.file.as_ref(), cluster, 1)?;
            ws.free_hint = cluster + 1;
            ws.end_cluster = ws.end_cluster.max(cluster + 1);
            return Ok(cluster << self.header.cluster_bits);
        }
    }

    /// Drop one reference from every host cluster overlapping the range.
    fn free_range(&self, ws: &mut WriteState, start: u64, len: u64) -> Result<()> {
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
                ws.free_hint = ws.free_hint.min(cluster);
            }
        }
        Ok(())
    }

    /// Count every reference in the image and write fresh refcount structures
    /// past its end (after a crash with lazy refcounts). The old structures
    /// become unreferenced clusters with refcount 0.
    fn rebuild_refcounts(&self, ws: &mut WriteState) -> Result<()> {
        let h = &self.header;
        let cluster_size = h.cluster_size();
        let bits = h.cluster_bits;
        // One count per cluster of the file: a reference more than a cluster
        // past its end is corrupt (as `qemu-img check` says too), so the array
        // never grows past the file, and a file too big to count is refused.
        let file_len = self.file.len()?;
        let file_clusters = file_len.div_ceil(cluster_size) + 1;
        if file_clusters > MAX_REBUILD_CLUSTERS {
            return Err(self.corrupt(format!(
                "the image is dirty (lazy refcounts) and its file has {file_clusters} clusters, more than the {MAX_REBUILD_CLUSTERS} whose refcounts we rebuild; repair it with 'qemu-img check -r all'"
            )));
        }
        let mut counts: Vec<u64> = vec![0; usize::try_from(file_clusters).unwrap_or(0)];
        let path = self.file.path();
        let mut add = |start: u64, len: u64| -> Result<()> {
            if len == 0 {
                return Ok(());
            }
            let end = start.saturating_add(len);
            for cluster in (start >> bits)..=((end - 1) >> bits) {
                let slot = usize::try_from(cluster)
                    .ok()
                    .and_then(|i| counts.get_mut(i))
                    .ok_or_else(|| {
                        Error::corrupt(
                            path,
                            format!(
                                "qcow2: rebuilding refcounts: a reference to {start:#x} ({len} bytes) lies past the end of the file ({file_len:#x})"
                            ),
                        )
                    })?;
                *slot += 1;
            }
            Ok(())
        };
        add(0, cluster_size)?;
        let mut l1_tables = vec![(h.l1_table_offset, h.l1_size)];
        for s in &self.snapshots {
            // Checked at open (read_snapshots).
            l1_tables.push((s.l1_table_offset, s.l1_size));
        }
        if h.nb_snapshots > 0 {
            let table_len = snapshot_table_len(self.file.as_ref(), h)?;
            add(h.snapshots_offset, table_len)?;
        }
        let width = h.l2_entry_size() / 8;
        for (l1_offset, l1_size) in l1_tables {
            add(l1_offset, u64::from(l1_size) * 8)?;
            let l1 = super::read_l1(self.file.as_ref(), l1_offset, l1_size)?;
            for l1_entry in l1 {
                let l2_offset = l1_entry & OFFSET_MASK;
                if l2_offset == 0 {
                    continue;
                }
                add(l2_offset, cluster_size)?;
                let table = self.load_l2(l2_offset)?;
                for e in table.iter().step_by(usize::try_from(width).unwrap_or(1)) {
                    if e & COMPRESSED != 0 {
                        let (host, size) = super::l2::compressed_descriptor(*e, bits);
                        add(host & !511, host + size - (host & !511))?;
                    } else if e & OFFSET_MASK != 0 && !h.has_data_file() {
                        add(e & OFFSET_MASK, cluster_size)?;
                    }
                }
            }
        }
        let layout = refcount::fresh_layout(&mut counts, bits, h.refcount_order)?;
        for (offset, block) in &layout.blocks {
            self.meta_write(ws, block, *offset)?;
        }
        self.meta_write(ws, &layout.table, layout.table_offset)?;
        self.barrier(ws)?;
        self.write_reftable_fields(ws, layout.table_offset, layout.table_clusters)?;
        self.barrier(ws)?;
        ws.rc = Refcounts::load(
            self.file.as_ref(),
            bits,
            h.refcount_order,
            layout.table_offset,
            layout.table_clusters,
        )?;
        ws.end_cluster = counts.len() as u64;
        ws.free_hint = 0;
        Ok(())
    }

    // ------------------------------------------------------------ requests

    fn check_write(&self, offset: u64, len: u64) -> Result<MutexGuard<'_, WriteState>> {
        let ws = self.state()?;
        crate::driver::check_range(self.file.path(), self.size, offset, len)?;
        Ok(ws)
    }

    pub(super) fn do_write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut ws = self.check_write(offset, buf.len() as u64)?;
        self.apply(&mut ws, offset, buf.len() as u64, Op::Data(buf))
    }

    pub(super) fn do_write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let mut ws = self.check_write(offset, len)?;
        if self.header.version < 3 && self.header.backing_file.is_none() {
            // No zero flag in v2, but with no backing file an unallocated cluster
            // reads as zeros: like QEMU, whole clusters are deallocated and only
            // the partial clusters at the edges get zero data.
            let (start, end) = self.whole_clusters(offset, len);
            if start >= end {
                return self.apply(&mut ws, offset, len, Op::ZeroData);
            }
            if offset < start {
                self.apply(&mut ws, offset, start - offset, Op::ZeroData)?;
            }
            self.apply(&mut ws, start, end - start, Op::Discard)?;
            if end < offset + len {
                self.apply(&mut ws, end, offset + len - end, Op::ZeroData)?;
            }
            return Ok(());
        }
        let op = if self.header.version < 3 || self.header.data_file_raw() {
            // No zero flag (v2 over a backing file), or a raw data file that must
            // itself read as zeros.
            Op::ZeroData
        } else {
            Op::Zero { unmap }
        };
        self.apply(&mut ws, offset, len, op)
    }

    /// The whole clusters inside `[offset, offset + len)`, plus the partial
    /// cluster at the end of the disk when the range reaches it; `start >= end`
    /// when there are none.
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cluster_size = self.header.cluster_size();
        let start = offset.div_ceil(cluster_size) * cluster_size;
        let end = if offset + len == self.size {
            self.size
        } else {
            (offset + len) / cluster_size * cluster_size
        };
        (start, end)
    }

    pub(super) fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut ws = self.check_write(offset, len)?;
        if self.header.version < 3 && self.header.backing_file.is_some() {
            // A v2 image has no zero flag, so a discard would expose the backing
            // file's data: QEMU ignores it, and so do we.
            return Ok(());
        }
        // Like QEMU, only whole clusters are discarded, plus the partial
        // cluster at the end of the disk when the range reaches it.
        let (start, end) = self.whole_clusters(offset, len);
        if start >= end {
            return Ok(());
        }
        self.apply(&mut ws, start, end - start, Op::Discard)
    }

    pub(super) fn do_flush(&self) -> Result<()> {
        let mut ws = self.state()?;
        ws.pending = true;
        self.barrier(&mut ws)
    }

    /// Apply `op` to `[offset, offset + len)`, one L2 table at a time.
    fn apply(&self, ws: &mut WriteState, offset: u64, len: u64, op: Op<'_>) -> Result<()> {
        let bits = self.header.cluster_bits;
        let span = self.header.l2_entries() << bits;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let table_end = (pos / span + 1) * span;
            let piece_end = end.min(table_end);
            let piece_op = match op {
                Op::Data(buf) => {
                    let from = usize::try_from(pos - offset).unwrap_or(0);
                    let to = usize::try_from(piece_end - offset).unwrap_or(0);
                    Op::Data(buf.get(from..to).unwrap_or(&[]))
                }
                other => other,
            };
            self.apply_in_table(ws, pos, piece_end, piece_op)?;
            pos = piece_end;
        }
        Ok(())
    }

    fn get_entry(&self, table: &[u64], index: u64) -> Entry {
        if self.header.extended_l2() {
            let at = usize::try_from(index * 2).unwrap_or(usize::MAX);
            Entry {
                entry: table.get(at).copied().unwrap_or(0),
                bitmap: table.get(at + 1).copied().unwrap_or(0),
            }
        } else {
            Entry {
                entry: table
                    .get(usize::try_from(index).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or(0),
                bitmap: 0,
            }
        }
    }

    fn put_entry(&self, table: &mut [u64], index: u64, e: Entry) {
        if self.header.extended_l2() {
            let at = usize::try_from(index * 2).unwrap_or(usize::MAX);
            if let Some(s) = table.get_mut(at) {
                *s = e.entry;
            }
            if let Some(s) = table.get_mut(at + 1) {
                *s = e.bitmap;
            }
        } else if let Some(s) = table.get_mut(usize::try_from(index).unwrap_or(usize::MAX)) {
            *s = e.entry;
        }
    }

    fn apply_in_table(&self, ws: &mut WriteState, start: u64, end: u64, op: Op<'_>) -> Result<()> {
        let bits = self.header.cluster_bits;
        let cluster_size = self.header.cluster_size();
        let l2_entries = self.header.l2_entries();
        let l1_index = (start >> bits) / l2_entries;
        let l1_entry = {
            let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
            l1.get(usize::try_from(l1_index).unwrap_or(usize::MAX))
                .copied()
                .ok_or_else(|| self.corrupt(format!("L1 index {l1_index} is past the L1 table")))?
        };
        let old_l2 = super::l2::l1_offset(l1_entry)
            .map_err(|e| self.corrupt(format!("L1 index {l1_index}: {e}")))?;
        let words = usize::try_from(l2_entries * self.header.l2_entry_size() / 8).unwrap_or(0);
        let mut table: Vec<u64> = if old_l2 == 0 {
            vec![0; words]
        } else {
            self.load_l2(old_l2)?.to_vec()
        };
        // A new table, or one shared with a snapshot, is written to a new cluster.
        let new_table = old_l2 == 0 || l1_entry & COPIED == 0;
        let mut changed: Option<(u64, u64)> = None;
        let mut frees: Vec<(u64, u64)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let guest_cluster = pos >> bits;
            let cluster_start = guest_cluster << bits;
            let cluster_len = cluster_size.min(self.size - cluster_start);
            let a = pos - cluster_start;
            let b = (end - cluster_start).min(cluster_len);
            let index = guest_cluster % l2_entries;
            let old = self.get_entry(&table, index);
            let piece = match op {
                Op::Data(buf) => {
                    let from = usize::try_from(pos - start).unwrap_or(0);
                    Op::Data(buf.get(from..from + (b - a) as usize).unwrap_or(&[]))
                }
                other => other,
            };
            let new =
                self.plan_cluster(ws, cluster_start, cluster_len, a, b, old, piece, &mut frees)?;
            if new != old {
                self.mark_dirty(ws)?;
                self.put_entry(&mut table, index, new);
                changed = Some(match changed {
                    None => (index, index),
                    Some((lo, hi)) => (lo.min(index), hi.max(index)),
                });
            }
            pos = cluster_start + b;
        }
        let Some((lo, hi)) = changed else {
            return Ok(());
        };
        // Data and refcounts reach the disk before the L2 entries naming them.
        let l2_offset = if new_table {
            self.alloc_cluster(ws)?
        } else {
            old_l2
        };
        self.barrier(ws)?;
        let entry_bytes = self.header.l2_entry_size();
        let words_per_entry = usize::try_from(entry_bytes / 8).unwrap_or(1);
        let (first, count) = if new_table {
            (0, table.len())
        } else {
            (
                usize::try_from(lo).unwrap_or(0) * words_per_entry,
                usize::try_from(hi - lo + 1).unwrap_or(0) * words_per_entry,
            )
        };
        let bytes: Vec<u8> = table
            .iter()
            .skip(first)
            .take(count)
            .flat_map(|e| e.to_be_bytes())
            .collect();
        self.meta_write(ws, &bytes, l2_offset + first as u64 * 8)?;
        self.cache.insert(l2_offset, Arc::from(table));
        if new_table {
            self.barrier(ws)?;
            let entry = l2_offset | COPIED;
            self.meta_write(ws, &entry.to_be_bytes(), self.l1_offset + l1_index * 8)?;
            let mut l1 = self.l1.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = l1.get_mut(usize::try_from(l1_index).unwrap_or(usize::MAX)) {
                *slot = entry;
            }
            if old_l2 != 0 {
                frees.push((old_l2, cluster_size));
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
        if !frees.is_empty() {
            // The entries that named the old clusters are gone from the disk
            // before the clusters can be reused.
            self.barrier(ws)?;
            for (host, len) in frees {
                self.free_range(ws, host, len)?;
            }
        }
        Ok(())
    }

    /// The host range an entry holds a reference to, if any (what freeing it
    /// releases). Data clusters in an external data file have no refcounts.
    fn held_range(&self, e: Entry) -> Option<(u64, u64)> {
        if e.entry & COMPRESSED != 0 {
            let (host, size) = super::l2::compressed_descriptor(e.entry, self.header.cluster_bits);
            let start = host & !511;
            return Some((start, host + size - start));
        }
        let host = e.entry & OFFSET_MASK;
        if host == 0 || self.header.has_data_file() {
            return None;
        }
        Some((host, self.header.cluster_size()))
    }

    /// The host cluster of a non-compressed entry, if it has one.
    fn host_of(&self, e: Entry) -> Option<u64> {
        if e.entry & COMPRESSED != 0 {
            return None;
        }
        let host = e.entry & OFFSET_MASK;
        if host != 0 || (self.header.has_data_file() && e.entry & COPIED != 0) {
            Some(host)
        } else {
            None
        }
    }

    /// Whether the entry's cluster may be written in place (refcount 1).
    fn owned(&self, e: Entry) -> bool {
        self.host_of(e).is_some() && (e.entry & COPIED != 0 || self.header.has_data_file())
    }

    /// A host cluster for new data at guest `cluster_start`.
    fn new_data_cluster(&self, ws: &mut WriteState, cluster_start: u64) -> Result<u64> {
        if self.header.has_data_file() {
            // QEMU keeps guest and host offsets equal in an external data file.
            Ok(cluster_start)
        } else {
            self.alloc_cluster(ws)
        }
    }

    /// The current guest bytes of `[from, to)`, with `data` laid over
    /// `[a, a + data.len())` (offsets relative to the cluster).
    fn merged(
        &self,
        cluster_start: u64,
        from: u64,
        to: u64,
        a: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; usize::try_from(to - from).unwrap_or(0)];
        let readable = to.min(self.size - cluster_start);
        let covered = a <= from && a + len >= readable;
        if !covered && readable > from {
            let part = buf
                .get_mut(..usize::try_from(readable - from).unwrap_or(0))
                .unwrap_or(&mut []);
            self.read_at(part, cluster_start + from)?;
        }
        let at = usize::try_from(a - from).unwrap_or(0);
        if let Some(dst) = buf.get_mut(at..at + usize::try_from(len).unwrap_or(0)) {
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
        Ok(buf)
    }

    /// Write data (or zeros) at `[a, b)` of one cluster; returns the new entry.
    #[allow(clippy::too_many_arguments)]
    fn write_cluster(
        &self,
        ws: &mut WriteState,
        cluster_start: u64,
        cluster_len: u64,
        a: u64,
        b: u64,
        old: Entry,
        data: Option<&[u8]>,
        frees: &mut Vec<(u64, u64)>,
    ) -> Result<Entry> {
        let cluster_size = self.header.cluster_size();
        let len = b - a;
        if self.header.extended_l2() {
            let sub = cluster_size / 32;
            let (sa, sb) = (a / sub, b.div_ceil(sub));
            let mask = ((1u64 << (sb - sa)) - 1) << sa;
            if self.owned(old) {
                let host = self.host_of(old).unwrap_or(0);
                if old.bitmap & mask == mask {
                    self.write_piece(ws, host + a, data, len)?;
                    return Ok(old);
                }
                let buf = self.merged(
                    cluster_start,
                    sa * sub,
                    (sb * sub).min(cluster_size),
                    a,
                    data,
                    len,
                )?;
                self.data_write(ws, &buf, host + sa * sub)?;
                return Ok(Entry {
                    entry: old.entry,
                    bitmap: (old.bitmap | mask) & !(mask << 32),
                });
            }
            if self.host_of(old).is_none() && old.entry & COMPRESSED == 0 {
                // Unallocated or zero subclusters only: allocate the cluster and
                // fill just the subclusters this write touches.
                let host = self.new_data_cluster(ws, cluster_start)?;
                let buf = self.merged(
                    cluster_start,
                    sa * sub,
                    (sb * sub).min(cluster_size),
                    a,
                    data,
                    len,
                )?;
                self.data_write(ws, &buf, host + sa * sub)?;
                if !self.header.has_data_file() && self.file.len()? < host + cluster_size {
                    self.file.set_len(host + cluster_size)?;
                }
                return Ok(Entry {
                    entry: host | COPIED,
                    bitmap: (old.bitmap & !(mask << 32) & ALL_ZEROES) | mask,
                });
            }
            // Compressed, or shared with a snapshot: copy the whole cluster.
            let buf = self.merged(cluster_start, 0, cluster_size, a, data, len)?;
            let host = self.new_data_cluster(ws, cluster_start)?;
            self.data_write(ws, &buf, host)?;
            frees.extend(self.held_range(old));
            let _ = cluster_len;
            return Ok(Entry {
                entry: host | COPIED,
                bitmap: ALL_ALLOCATED,
            });
        }
        if old.entry & ZERO == 0 && self.owned(old) {
            let host = self.host_of(old).unwrap_or(0);
            self.write_piece(ws, host + a, data, len)?;
            return Ok(old);
        }
        if old.entry & ZERO != 0 && self.owned(old) {
            // An allocated zero cluster we own: reuse its host cluster.
            let host = self.host_of(old).unwrap_or(0);
            let mut buf = vec![0u8; usize::try_from(cluster_size).unwrap_or(0)];
            if let (Some(d), Some(dst)) = (data, buf.get_mut(a as usize..b as usize)) {
                dst.copy_from_slice(d);
            }
            self.data_write(ws, &buf, host)?;
            return Ok(Entry {
                entry: host | COPIED,
                bitmap: 0,
            });
        }
        let buf = self.merged(cluster_start, 0, cluster_size, a, data, len)?;
        let host = self.new_data_cluster(ws, cluster_start)?;
        self.data_write(ws, &buf, host)?;
        frees.extend(self.held_range(old));
        Ok(Entry {
            entry: host | COPIED,
            bitmap: 0,
        })
    }

    fn write_piece(
        &self,
        ws: &mut WriteState,
        host: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<()> {
        match data {
            Some(d) => self.data_write(ws, d, host),
            None => {
                let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
                self.data_write(ws, &zeros, host)
            }
        }
    }

    /// Whether `[from, to)` of the disk already reads as zeros (without reading).
    fn reads_as_zero(&self, from: u64, to: u64) -> Result<bool> {
        let mut pos = from;
        while pos < to {
            let (len, zero) = crate::driver::zero_status(self, pos, to - pos)?;
            if !zero {
                return Ok(false);
            }
            pos += len.max(1);
        }
        Ok(true)
    }

    /// Decide and perform what `op` does to `[a, b)` of one cluster.
    #[allow(clippy::too_many_arguments)]
    fn plan_cluster(
        &self,
        ws: &mut WriteState,
        cluster_start: u64,
        cluster_len: u64,
        a: u64,
        b: u64,
        old: Entry,
        op: Op<'_>,
        frees: &mut Vec<(u64, u64)>,
    ) -> Result<Entry> {
        let ext = self.header.extended_l2();
        let mut whole = a == 0 && b == cluster_len;
        if let Op::Zero { .. } = op {
            // Like QEMU: zeroing part of a cluster that holds no data (unallocated
            // or already zero) while the rest of it reads as zeros zeroes the whole
            // cluster with the zero flag. The contents are the same either way; the
            // allocation map then matches QEMU's.
            let holds_no_data = old.entry & COMPRESSED == 0
                && (old.entry & ZERO != 0 || self.host_of(old).is_none());
            if !whole
                && !ext
                && holds_no_data
                && self.reads_as_zero(cluster_start, cluster_start + a)?
                && self.reads_as_zero(cluster_start + b, cluster_start + cluster_len)?
            {
                whole = true;
            }
        }
        match op {
            Op::Data(d) => {
                self.write_cluster(ws, cluster_start, cluster_len, a, b, old, Some(d), frees)
            }
            Op::ZeroData => {
                if self.reads_as_zero(cluster_start + a, cluster_start + b)? {
                    return Ok(old);
                }
                self.write_cluster(ws, cluster_start, cluster_len, a, b, old, None, frees)
            }
            Op::Discard => {
                let allocated = old.entry & COMPRESSED != 0 || self.host_of(old).is_some();
                if !(allocated || self.header.backing_file.is_some()) {
                    return Ok(old);
                }
                frees.extend(self.held_range(old));
                Ok(if ext {
                    Entry {
                        entry: 0,
                        bitmap: ALL_ZEROES,
                    }
                } else if self.header.version >= 3 {
                    Entry {
                        entry: ZERO,
                        bitmap: 0,
                    }
                } else {
                    Entry {
                        entry: 0,
                        bitmap: 0,
                    }
                })
            }
            Op::Zero { unmap } => {
                if whole {
                    let keep = !unmap && self.owned(old);
                    if !keep {
                        frees.extend(self.held_range(old));
                    }
                    return Ok(match (ext, keep) {
                        (true, true) => Entry {
                            entry: old.entry,
                            bitmap: ALL_ZEROES,
                        },
                        (true, false) => Entry {
                            entry: 0,
                            bitmap: ALL_ZEROES,
                        },
                        (false, true) => Entry {
                            entry: old.entry | ZERO,
                            bitmap: 0,
                        },
                        (false, false) => Entry {
                            entry: ZERO,
                            bitmap: 0,
                        },
                    });
                }
                let sub = self.header.cluster_size() / 32;
                let (mut sa, mut sb) = (a.div_ceil(sub), b / sub);
                if ext && old.entry & COMPRESSED == 0 {
                    // As for whole clusters above, QEMU flags a partial subcluster
                    // zero when it holds no data and the rest of it reads as zeros.
                    let no_data = |k: u64| old.bitmap & (1u64 << k) == 0;
                    let edge = |k: u64| -> Result<bool> {
                        let s0 = k * sub;
                        let s1 = (s0 + sub).min(cluster_len);
                        Ok(no_data(k)
                            && self.reads_as_zero(cluster_start + s0, cluster_start + a.max(s0))?
                            && self.reads_as_zero(cluster_start + b.min(s1), cluster_start + s1)?)
                    };
                    if a % sub != 0 && edge(a / sub)? {
                        sa = a / sub;
                    }
                    if b % sub != 0 && edge(b / sub)? {
                        sb = b / sub + 1;
                    }
                }
                let plain =
                    old.entry & COMPRESSED == 0 && (self.host_of(old).is_none() || self.owned(old));
                if !ext || sa >= sb || !plain {
                    if self.reads_as_zero(cluster_start + a, cluster_start + b)? {
                        return Ok(old);
                    }
                    return self.write_cluster(
                        ws,
                        cluster_start,
                        cluster_len,
                        a,
                        b,
                        old,
                        None,
                        frees,
                    );
                }
                // Zero the unaligned ends as data, then flag the whole
                // subclusters between them as zero.
                let mut e = old;
                if a < sa * sub {
                    e = self.write_cluster(
                        ws,
                        cluster_start,
                        cluster_len,
                        a,
                        sa * sub,
                        e,
                        None,
                        frees,
                    )?;
                }
                if sb * sub < b {
                    e = self.write_cluster(
                        ws,
                        cluster_start,
                        cluster_len,
                        sb * sub,
                        b,
                        e,
                        None,
                        frees,
                    )?;
                }
                let mask = ((1u64 << (sb - sa)) - 1) << sa;
                Ok(Entry {
                    entry: e.entry,
                    bitmap: (e.bitmap & !mask) | (mask << 32),
                })
            }
        }
    }
}

/// Bytes of the snapshot table (entries are variable-length).
fn snapshot_table_len(file: &dyn crate::storage::Storage, h: &header::Header) -> Result<u64> {
    let file_len = file.len()?;
    let len = file_len
        .saturating_sub(h.snapshots_offset)
        .min(super::snapshot::MAX_TABLE_BYTES);
    let mut table = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut table, h.snapshots_offset)?;
    super::snapshot::table_len(file.path(), &table, h.nb_snapshots)
}
