//! Write-back of the cached metadata, in the order QEMU's qcow2 cache keeps
//! (block/qcow2-cache.c, qcow2-cluster.c, qcow2-refcount.c):
//!
//! - A refcount increment reaches the file before any L2 entry that names the
//!   new cluster: while dirty L2 entries name such clusters, writing back an
//!   L2 table first writes back every dirty refcount block and syncs
//!   (`l2_after_refcounts`, QEMU's L2 cache depending on the refcount cache).
//!   Images with lazy refcounts skip this, as QEMU does: the dirty bit, set
//!   before their first such entry, makes the next read-write open rebuild
//!   their refcounts.
//! - A refcount decrement reaches the file only after the L2 entry that
//!   stopped naming the cluster (`refcounts_after_l2`, the reverse
//!   dependency). Until then the freed cluster is not reused either: data
//!   written into it could show through the old entry after a crash.
//! - An L2 entry that makes data visible which a crash could lose, and whose
//!   loss would show other bytes than the old ones (copied data, a reused or
//!   zero-allocated cluster, a cluster past a file end not yet synced), is
//!   written only after an fdatasync (`l2_after_sync`, QEMU's
//!   depends_on_flush, which QEMU sets after copy on write).
//!
//! The two dependencies never hold at once: setting one while the other
//! holds first writes back and syncs what the other waits for, as
//! qcow2_cache_set_dependency does. `fdatasync` runs only where one of these
//! orderings needs it at write-back time, and for a guest flush; never once
//! per guest write.

use super::WriteState;
use crate::driver::qcow2::{header, Qcow2};
use crate::error::Result;

/// What the dirty cached metadata waits for before it may be written.
#[derive(Default)]
pub(in crate::driver::qcow2) struct Order {
    /// Dirty L2 entries name clusters whose refcount increments are only cached.
    l2_after_refcounts: bool,
    /// Dirty refcount decrements belong to clusters that dirty L2 entries
    /// stopped naming.
    refcounts_after_l2: bool,
    /// Dirty L2 entries name data written since the last fdatasync.
    pub(super) l2_after_sync: bool,
}

impl Qcow2 {
    /// fdatasync the image (and its data file) if anything was written since
    /// the last one; then drop the orderings that it satisfied.
    pub(super) fn sync(&self, ws: &mut WriteState) -> Result<()> {
        if ws.pending {
            if self.header.has_data_file() {
                self.data.flush()?;
            }
            self.file.flush()?;
            ws.pending = false;
        }
        ws.order.l2_after_sync = false;
        if ws.rc.dirty_count() == 0 {
            ws.order.l2_after_refcounts = false;
        }
        if self.cache.dirty_count() == 0 {
            ws.order.refcounts_after_l2 = false;
            // Every L2 entry that named a freed cluster is gone from the disk.
            if let Some(lowest) = ws.quarantine.iter().min() {
                ws.free_hint = ws.free_hint.min(*lowest);
            }
            ws.quarantine.clear();
        }
        Ok(())
    }

    /// Whether refcounts on disk must stay accurate for the L2 tables on disk
    /// (not for a lazy-refcount image whose dirty bit is set).
    fn accurate_refcounts(&self, ws: &WriteState) -> bool {
        ws.incompatible & header::INCOMPAT_DIRTY == 0
    }

    /// Dirty L2 entries are about to name a cluster whose refcount increment
    /// is only cached.
    pub(super) fn l2_needs_refcounts(&self, ws: &mut WriteState) -> Result<()> {
        self.mark_dirty(ws)?;
        if !self.accurate_refcounts(ws) || ws.order.l2_after_refcounts {
            return Ok(());
        }
        if ws.order.refcounts_after_l2 {
            self.before_l2_write(ws)?;
            self.write_l2_tables(ws)?;
            self.sync(ws)?;
        }
        ws.order.l2_after_refcounts = true;
        Ok(())
    }

    /// Cached refcount decrements are about to follow dirty L2 changes.
    pub(super) fn refcounts_need_l2(&self, ws: &mut WriteState) -> Result<()> {
        if ws.order.refcounts_after_l2 {
            return Ok(());
        }
        if ws.order.l2_after_refcounts {
            self.write_refblocks(ws)?;
            self.sync(ws)?;
        }
        ws.order.refcounts_after_l2 = true;
        Ok(())
    }

    /// What every L2 write-back waits for.
    fn before_l2_write(&self, ws: &mut WriteState) -> Result<()> {
        if ws.order.l2_after_refcounts {
            self.write_refblocks(ws)?;
            self.sync(ws)?;
        } else if ws.order.l2_after_sync {
            self.sync(ws)?;
        }
        Ok(())
    }

    /// What every refcount block write-back waits for.
    fn before_refblock_write(&self, ws: &mut WriteState) -> Result<()> {
        if ws.order.refcounts_after_l2 {
            self.before_l2_write(ws)?;
            self.write_l2_tables(ws)?;
            self.sync(ws)?;
        }
        Ok(())
    }

    /// Write the dirty words of the L2 table at `offset`, with no ordering check.
    fn write_l2_table(&self, ws: &mut WriteState, offset: u64) -> Result<()> {
        let Some((table, range)) = self.cache.take_dirty(offset) else {
            return Ok(());
        };
        let bytes: Vec<u8> = table
            .get(range.clone())
            .unwrap_or(&[])
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect();
        if let Err(e) = self.meta_write(ws, &bytes, offset + range.start as u64 * 8) {
            self.cache.mark_dirty(offset, table, range);
            return Err(e);
        }
        Ok(())
    }

    /// Write every dirty L2 table, with no ordering check.
    fn write_l2_tables(&self, ws: &mut WriteState) -> Result<()> {
        for offset in self.cache.dirty_offsets() {
            self.write_l2_table(ws, offset)?;
        }
        Ok(())
    }

    /// Write the dirty bytes of the refcount block at `offset`, with no
    /// ordering check.
    fn write_refblock(&self, ws: &mut WriteState, offset: u64) -> Result<()> {
        ws.pending = true;
        ws.rc.write_back(self.file.as_ref(), offset)
    }

    /// Write every dirty refcount block, with no ordering check.
    fn write_refblocks(&self, ws: &mut WriteState) -> Result<()> {
        for offset in ws.rc.dirty_offsets() {
            self.write_refblock(ws, offset)?;
        }
        Ok(())
    }

    /// Write back every dirty refcount block, in order.
    pub(super) fn flush_refblocks(&self, ws: &mut WriteState) -> Result<()> {
        self.before_refblock_write(ws)?;
        self.write_refblocks(ws)
    }

    /// Write back every dirty table and block, in order, and sync: a guest
    /// flush, or (`closing`) the close. Like QEMU, a flush of an image whose
    /// refcounts are lazy (dirty bit set) leaves its refcount blocks cached.
    pub(super) fn flush_caches(&self, ws: &mut WriteState, closing: bool) -> Result<()> {
        // First: its sync also makes durable what the L2 tables below wait
        // for (their data and refcounts), so a flush that named new tables
        // still syncs twice, not three times.
        self.write_new_l1_entries(ws)?;
        if self.cache.dirty_count() > 0 {
            self.before_l2_write(ws)?;
            self.write_l2_tables(ws)?;
        }
        if closing || self.accurate_refcounts(ws) {
            self.flush_refblocks(ws)?;
        }
        self.sync(ws)
    }

    /// Keep at most half of each cache dirty, writing back the least
    /// recently used tables and blocks (in order) past that.
    pub(super) fn bound_dirty(&self, ws: &mut WriteState) -> Result<()> {
        let l2_limit = self.cache.capacity() / 2;
        if self.cache.dirty_count() > l2_limit {
            self.before_l2_write(ws)?;
            for offset in self.cache.dirty_offsets() {
                if self.cache.dirty_count() <= l2_limit {
                    break;
                }
                self.write_l2_table(ws, offset)?;
                ws.evictions += 1;
            }
        }
        let rc_limit = ws.rc.capacity() / 2;
        if ws.rc.dirty_count() > rc_limit {
            self.before_refblock_write(ws)?;
            for offset in ws.rc.dirty_offsets() {
                if ws.rc.dirty_count() <= rc_limit {
                    break;
                }
                self.write_refblock(ws, offset)?;
                ws.evictions += 1;
            }
        }
        Ok(())
    }
}
