//! The qcow2 driver, write side: cluster and L2 allocation, refcounts, copy on
//! write, zero clusters, discard, subclusters and lazy refcounts.
//!
//! The work is split as imago splits its qcow2 driver: allocation and
//! refcounts (`alloc`), copy on write (`cow`), zero writes and discard
//! (`zero`), the refcount checks and rebuild of a writable open (`rebuild`),
//! and the write-back of cached metadata in a crash-safe order (`writeback`);
//! this module holds the state and runs each request one L2 table at a time.
//!
//! Guest data is written at once. Metadata changes go to the caches: L2
//! entries to the shared L2 cache, refcounts to the refcount block cache. They
//! reach the file on `flush`, on `close`, and when a cache must make room,
//! ordered as QEMU's qcow2 cache orders them (see `writeback`), so a crash at
//! any point leaves an image with no corruption (leaked clusters at worst),
//! every write completed before the last flush reads back, and every other
//! write reads, per sector, as its old data or its new.
//!
//! One writer at a time holds the `WriteState` mutex; readers never take it.
//! They see an L1 entry under a read lock and an L2 table through the cache,
//! where the writer's changes are visible as soon as they are made.

mod alloc;
mod cow;
mod rebuild;
mod writeback;
mod zero;

#[cfg(test)]
mod tests;

use super::l2::{self, COMPRESSED, COPIED, OFFSET_MASK};
use super::refcount::Refcounts;
use super::{header, Qcow2};
use crate::driver::cache::L2Table;
use crate::error::{usize_of, Error, Result};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use writeback::Order;

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
    /// Writes were issued since the last fdatasync.
    pending: bool,
    /// The incompatible feature bits as they are on disk.
    incompatible: u64,
    /// What must reach the disk before what, for the dirty cached metadata.
    order: Order,
    /// The image file's length, as the open found it and our writes and
    /// length changes made it since.
    file_len: u64,
    /// The image file's length at open.
    len_at_open: u64,
    /// Nothing at or past this offset of the image file was written since the
    /// open, so it reads as zeros (a hole, or past the end of the file).
    written_end: u64,
    /// Freed clusters that an L2 entry on disk may still name: they are not
    /// reused until the L2 tables that dropped them are on disk.
    quarantine: HashSet<u64>,
    /// Tables and blocks written back to make room, not for a flush.
    evictions: u64,
    /// L1 indices whose entry names a new L2 table in memory only: the
    /// entries reach the file at the next flush or close, once the tables
    /// and their refcounts are durable (`write_new_l1_entries`).
    new_l1: Vec<u64>,
}

impl WriteState {
    /// Note a write of `len` bytes at `offset` of the image file.
    fn note_write(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        self.pending = true;
        self.written_end = self.written_end.max(end);
        self.file_len = self.file_len.max(end);
    }
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
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Entry {
    entry: u64,
    bitmap: u64,
}

/// The part of one guest cluster a request touches: bytes `[a, b)` of the
/// cluster at `cluster_start`, which is `cluster_len` bytes long (shorter than
/// a cluster only at the end of the disk).
#[derive(Clone, Copy)]
pub(super) struct Piece {
    cluster_start: u64,
    cluster_len: u64,
    a: u64,
    b: u64,
}

impl Piece {
    fn len(&self) -> u64 {
        self.b - self.a
    }

    fn whole(&self) -> bool {
        self.a == 0 && self.b == self.cluster_len
    }
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
        let file_len = self.file.len()?;
        let mut state = WriteState {
            rc,
            end_cluster: file_len.div_ceil(cluster_size),
            free_hint: 0,
            pending: false,
            incompatible: h.incompatible_features,
            order: Order::default(),
            file_len,
            len_at_open: file_len,
            written_end: file_len,
            quarantine: HashSet::new(),
            evictions: 0,
            new_l1: Vec::new(),
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
            self.sync(&mut state)?;
        } else {
            self.check_metadata_refcounts(&mut state)?;
        }
        let keep = h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW;
        if h.version >= 3 && h.autoclear_features != keep {
            self.write_field(&mut state, header::field::AUTOCLEAR_FEATURES, keep)?;
            self.sync(&mut state)?;
        }
        self.writer = Some(std::sync::Mutex::new(state));
        Ok(())
    }

    /// Cache at most `l2_tables` L2 tables and `refblocks` refcount blocks
    /// (half of each may be dirty), so tests can make write-backs happen
    /// between flushes. Only right after a writable open.
    #[cfg(test)]
    pub(super) fn set_cache_limits(&mut self, l2_tables: usize, refblocks: usize) {
        self.cache = crate::driver::cache::L2Cache::new(l2_tables);
        if let Some(m) = &self.writer {
            let mut ws = m.lock().unwrap_or_else(PoisonError::into_inner);
            ws.rc.set_capacity(refblocks);
        }
    }

    /// How many tables and blocks were written back to make room.
    #[cfg(test)]
    pub(super) fn evictions(&self) -> u64 {
        self.state().map(|ws| ws.evictions).unwrap_or(0)
    }

    fn state(&self) -> Result<MutexGuard<'_, WriteState>> {
        match &self.writer {
            Some(m) => Ok(m.lock().unwrap_or_else(PoisonError::into_inner)),
            None => Err(Error::ReadOnly(self.file.path().to_path_buf())),
        }
    }

    fn meta_write(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        ws.note_write(offset, buf.len() as u64);
        self.file.write_all_at(buf, offset)
    }

    fn data_write(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        if self.header.has_data_file() {
            ws.pending = true;
            self.data.write_all_at(buf, offset)
        } else {
            self.meta_write(ws, buf, offset)
        }
    }

    /// Make `[offset, offset + len)` of the data read as zeros (fallocate
    /// ZERO_RANGE, else PUNCH_HOLE, else written zeros), as QEMU's
    /// handle_alloc_space zeroes a cluster that holds stale bytes.
    fn data_zero(&self, ws: &mut WriteState, offset: u64, len: u64) -> Result<()> {
        if self.header.has_data_file() {
            ws.pending = true;
            self.data.zero_range(offset, len)
        } else {
            ws.note_write(offset, len);
            self.file.zero_range(offset, len)
        }
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
    /// it dirty, as QEMU does: from then on its refcounts may lag behind its
    /// L2 tables on disk, and `close` clears the bit again.
    fn mark_dirty(&self, ws: &mut WriteState) -> Result<()> {
        if self.lazy_refcounts() && ws.incompatible & header::INCOMPAT_DIRTY == 0 {
            ws.incompatible |= header::INCOMPAT_DIRTY;
            self.write_incompatible(ws)?;
            self.sync(ws)?;
        }
        Ok(())
    }

    /// Write back every cached change, make it durable, give back the file
    /// space grown ahead of need, and clear the dirty bit (lazy refcounts).
    pub(super) fn close_writes(&self) -> Result<()> {
        let mut ws = self.state()?;
        self.flush_caches(&mut ws, true)?;
        let cluster_size = self.header.cluster_size();
        let target = (ws.end_cluster * cluster_size)
            .max(ws.len_at_open)
            .max(ws.written_end);
        if ws.file_len > target {
            self.file.set_len(target)?;
            ws.file_len = target;
            ws.pending = true;
        }
        if ws.incompatible & header::INCOMPAT_DIRTY != 0 {
            ws.incompatible &= !header::INCOMPAT_DIRTY;
            self.write_incompatible(&mut ws)?;
        }
        self.sync(&mut ws)
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
        self.flush_caches(&mut ws, false)
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
                    let from = usize_of(pos - offset)?;
                    let to = usize_of(piece_end - offset)?;
                    Op::Data(buf.get(from..to).unwrap_or(&[]))
                }
                other => other,
            };
            self.apply_in_table(ws, pos, piece_end, piece_op)?;
            self.bound_dirty(ws)?;
            pos = piece_end;
        }
        Ok(())
    }

    fn get_entry(&self, table: &[u64], index: u64) -> Result<Entry> {
        let (entry, bitmap) = self.l2_entry(table, index)?;
        Ok(Entry { entry, bitmap })
    }

    /// Store `e` at `index`; returns the words it occupies.
    fn put_entry(&self, table: &mut [u64], index: u64, e: Entry) -> std::ops::Range<usize> {
        let index = usize::try_from(index).unwrap_or(usize::MAX);
        if self.header.extended_l2() {
            let at = index.saturating_mul(2);
            if let Some(s) = table.get_mut(at) {
                *s = e.entry;
            }
            if let Some(s) = table.get_mut(at.saturating_add(1)) {
                *s = e.bitmap;
            }
            at..at.saturating_add(2)
        } else {
            if let Some(s) = table.get_mut(index) {
                *s = e.entry;
            }
            index..index.saturating_add(1)
        }
    }

    /// The L1 entry at `l1_index`, as the writer has it (in memory).
    fn l1_entry(&self, l1_index: u64) -> Result<u64> {
        let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
        l1.get(usize::try_from(l1_index).unwrap_or(usize::MAX))
            .copied()
            .ok_or_else(|| self.corrupt(format!("L1 index {l1_index} is past the L1 table")))
    }

    fn apply_in_table(&self, ws: &mut WriteState, start: u64, end: u64, op: Op<'_>) -> Result<()> {
        let bits = self.header.cluster_bits;
        let cluster_size = self.header.cluster_size();
        let l2_entries = self.header.l2_entries();
        let l1_index = (start >> bits) / l2_entries;
        let l1_entry = self.l1_entry(l1_index)?;
        let old_l2 = l2::l1_offset(l1_entry)
            .map_err(|e| self.corrupt(format!("L1 index {l1_index}: {e}")))?;
        // Plan every cluster against the table as it is; the changes go into
        // the cached table afterwards, in one step.
        let table: Option<L2Table> = if old_l2 == 0 {
            None
        } else {
            Some(self.load_l2(old_l2)?)
        };
        let mut changes: Vec<(u64, Entry)> = Vec::new();
        let mut frees: Vec<(u64, u64)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let guest_cluster = pos >> bits;
            let cluster_start = guest_cluster << bits;
            let cluster_len = cluster_size.min(self.size - cluster_start);
            let piece = Piece {
                cluster_start,
                cluster_len,
                a: pos - cluster_start,
                b: (end - cluster_start).min(cluster_len),
            };
            let index = guest_cluster % l2_entries;
            // No L2 table yet: every entry reads as unallocated (0).
            let old = match table.as_ref() {
                Some(t) => self.get_entry(t, index)?,
                None => Entry::default(),
            };
            let piece_op = match op {
                Op::Data(buf) => {
                    let from = usize_of(pos - start)?;
                    let len = usize_of(piece.len())?;
                    Op::Data(buf.get(from..from + len).unwrap_or(&[]))
                }
                other => other,
            };
            let new = self.plan_cluster(ws, piece, old, piece_op, &mut frees)?;
            if new != old {
                changes.push((index, new));
            }
            pos = cluster_start + piece.b;
        }
        // No copy of the table may stay alive here: the cache then changes
        // it in place instead of copying it.
        drop(table);
        if changes.is_empty() {
            return Ok(());
        }
        // A missing table, or one shared with a snapshot, gets a new cluster.
        let l2_offset = if old_l2 == 0 || l1_entry & COPIED == 0 {
            self.new_l2_table(ws, l1_index, l1_entry, old_l2)?
        } else {
            old_l2
        };
        self.set_entries(l2_offset, &changes)?;
        self.generation.fetch_add(1, Ordering::Release);
        if !frees.is_empty() {
            self.free_dropped(ws, &frees)?;
        }
        Ok(())
    }

    /// Put `changes` into the cached table at `l2_offset` (loading it if a
    /// reader evicted it since), where they are dirty until written back.
    fn set_entries(&self, l2_offset: u64, changes: &[(u64, Entry)]) -> Result<()> {
        loop {
            let applied = self.cache.modify(l2_offset, |table| {
                let (mut first, mut end) = (usize::MAX, 0);
                for (index, e) in changes {
                    let words = self.put_entry(table, *index, *e);
                    first = first.min(words.start);
                    end = end.max(words.end);
                }
                first.min(end)..end
            });
            if applied {
                return Ok(());
            }
            self.load_l2(l2_offset)?;
        }
    }

    /// Decide and perform what `op` does to one piece of a cluster.
    fn plan_cluster(
        &self,
        ws: &mut WriteState,
        piece: Piece,
        old: Entry,
        op: Op<'_>,
        frees: &mut Vec<(u64, u64)>,
    ) -> Result<Entry> {
        let Piece { cluster_start, .. } = piece;
        match op {
            Op::Data(d) => self.write_cluster(ws, piece, old, Some(d), frees),
            Op::ZeroData => {
                if self.reads_as_zero(cluster_start + piece.a, cluster_start + piece.b)? {
                    return Ok(old);
                }
                self.write_cluster(ws, piece, old, None, frees)
            }
            Op::Discard => Ok(self.discard_cluster(old, frees)),
            Op::Zero { unmap } => self.zero_cluster(ws, piece, old, unmap, frees),
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

    /// The entry's host cluster, if it may be written in place (refcount 1).
    fn owned_host(&self, e: Entry) -> Option<u64> {
        self.host_of(e)
            .filter(|_| e.entry & COPIED != 0 || self.header.has_data_file())
    }

    /// Whether the entry's cluster may be written in place (refcount 1).
    fn owned(&self, e: Entry) -> bool {
        self.owned_host(e).is_some()
    }
}
