//! The qcow2 driver, write side: cluster and L2 allocation, refcounts, copy on
//! write, zero clusters, discard, subclusters and lazy refcounts.
//!
//! The work is split as imago splits its qcow2 driver: allocation and
//! refcounts (`alloc`), copy on write (`cow`), zero writes and discard
//! (`zero`), and the refcount checks and rebuild of a writable open
//! (`rebuild`); this module holds the state and runs each request one L2
//! table at a time.
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

mod alloc;
mod cow;
mod rebuild;
mod zero;

use super::l2::{self, COMPRESSED, COPIED, OFFSET_MASK};
use super::refcount::Refcounts;
use super::{header, Qcow2};
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};

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
pub(super) enum Op<'a> {
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
pub(super) struct Entry {
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
        let old_l2 = l2::l1_offset(l1_entry)
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
            Op::Discard => Ok(self.discard_cluster(old, frees)),
            Op::Zero { unmap } => {
                self.zero_cluster(ws, cluster_start, cluster_len, a, b, old, unmap, frees)
            }
        }
    }

    /// The host range an entry holds a reference to, if any (what freeing it
    /// releases). Data clusters in an external data file have no refcounts.
    fn held_range(&self, e: Entry) -> Option<(u64, u64)> {
        if e.entry & COMPRESSED != 0 {
            let (host, size) = l2::compressed_descriptor(e.entry, self.header.cluster_bits);
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
}
