//! Write-zeroes and discard: the zero flag (or subcluster bits) where the
//! format has it, deallocation where unallocated reads as zeros, and zero
//! data where neither will do; discard of whole clusters only, as QEMU does.

use super::{Entry, Op, Piece, WriteState, ALL_ZEROES};
use crate::driver::qcow2::l2::{COMPRESSED, ZERO};
use crate::driver::qcow2::Qcow2;
use crate::error::Result;

impl Qcow2 {
    pub(in crate::driver::qcow2) fn do_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
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

    pub(in crate::driver::qcow2) fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
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

    /// Whether `[from, to)` of the disk already reads as zeros (without reading).
    pub(super) fn reads_as_zero(&self, from: u64, to: u64) -> Result<bool> {
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

    /// What a discard does to one whole cluster: the new entry, with what the
    /// old one held added to `frees`.
    pub(super) fn discard_cluster(&self, old: Entry, frees: &mut Vec<(u64, u64)>) -> Entry {
        let allocated = old.entry & COMPRESSED != 0 || self.host_of(old).is_some();
        if !(allocated || self.header.backing_file.is_some()) {
            return old;
        }
        frees.extend(self.held_range(old));
        if self.header.extended_l2() {
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
        }
    }

    /// Make `[a, b)` of one cluster read as zeros, through the zero flag (or
    /// subcluster bits) where it can and as zero data where it must.
    pub(super) fn zero_cluster(
        &self,
        ws: &mut WriteState,
        piece: Piece,
        old: Entry,
        unmap: bool,
        frees: &mut Vec<(u64, u64)>,
    ) -> Result<Entry> {
        let Piece {
            cluster_start,
            cluster_len,
            a,
            b,
        } = piece;
        let ext = self.header.extended_l2();
        let mut whole = piece.whole();
        // Like QEMU: zeroing part of a cluster that holds no data (unallocated
        // or already zero) while the rest of it reads as zeros zeroes the whole
        // cluster with the zero flag. The contents are the same either way; the
        // allocation map then matches QEMU's.
        let holds_no_data =
            old.entry & COMPRESSED == 0 && (old.entry & ZERO != 0 || self.host_of(old).is_none());
        if !whole
            && !ext
            && holds_no_data
            && self.reads_as_zero(cluster_start, cluster_start + a)?
            && self.reads_as_zero(cluster_start + b, cluster_start + cluster_len)?
        {
            whole = true;
        }
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
        let plain = old.entry & COMPRESSED == 0 && (self.host_of(old).is_none() || self.owned(old));
        if !ext || sa >= sb || !plain {
            if self.reads_as_zero(cluster_start + a, cluster_start + b)? {
                return Ok(old);
            }
            return self.write_cluster(ws, piece, old, None, frees);
        }
        // Zero the unaligned ends as data, then flag the whole
        // subclusters between them as zero.
        let mut e = old;
        if a < sa * sub {
            let head = Piece {
                b: sa * sub,
                ..piece
            };
            e = self.write_cluster(ws, head, e, None, frees)?;
        }
        if sb * sub < b {
            let tail = Piece {
                a: sb * sub,
                ..piece
            };
            e = self.write_cluster(ws, tail, e, None, frees)?;
        }
        let mask = ((1u64 << (sb - sa)) - 1) << sa;
        Ok(Entry {
            entry: e.entry,
            bitmap: (e.bitmap & !mask) | (mask << 32),
        })
    }
}
