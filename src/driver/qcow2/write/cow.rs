//! Copy on write: writing guest bytes into one cluster, in place when the
//! image owns the cluster, else into a newly allocated one that must also hold
//! the cluster's current contents (from a snapshot's shared cluster, a
//! compressed cluster, the backing file) with the new bytes laid over them;
//! where those contents are zeros, no zeros are written (`fill`).

use super::{Entry, Piece, WriteState, ALL_ALLOCATED, ALL_ZEROES};
use crate::driver::qcow2::l2::{COMPRESSED, COPIED, ZERO};
use crate::driver::qcow2::Qcow2;
use crate::driver::BlockDriver;
use crate::error::{usize_of, Result};

impl Qcow2 {
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
        let mut buf = vec![0u8; usize_of(to - from)?];
        let readable = to.min(self.size - cluster_start);
        let covered = a <= from && a + len >= readable;
        if !covered && readable > from {
            let part = buf.get_mut(..usize_of(readable - from)?).unwrap_or(&mut []);
            self.read_at(part, cluster_start + from)?;
        }
        let at = usize_of(a - from)?;
        if let Some(dst) = buf.get_mut(at..at + usize_of(len)?) {
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
        Ok(buf)
    }

    /// Write data (or zeros) at `[a, b)` of one cluster; returns the new entry.
    pub(super) fn write_cluster(
        &self,
        ws: &mut WriteState,
        piece: Piece,
        old: Entry,
        data: Option<&[u8]>,
        frees: &mut Vec<(u64, u64)>,
    ) -> Result<Entry> {
        let cluster_size = self.header.cluster_size();
        let Piece {
            cluster_start,
            a,
            b,
            ..
        } = piece;
        if self.header.extended_l2() {
            let sub = cluster_size / 32;
            let (sa, sb) = (a / sub, b.div_ceil(sub));
            let mask = ((1u64 << (sb - sa)) - 1) << sa;
            let (from, to) = (sa * sub, (sb * sub).min(cluster_size));
            if let Some(host) = self.owned_host(old) {
                if old.bitmap & mask == mask {
                    self.write_piece(ws, host + a, data, piece.len())?;
                    return Ok(old);
                }
                // Subclusters that were not allocated hold stale bytes.
                self.fill(ws, piece, from, to, host, data, false)?;
                return Ok(Entry {
                    entry: old.entry,
                    bitmap: (old.bitmap | mask) & !(mask << 32),
                });
            }
            if self.host_of(old).is_none() && old.entry & COMPRESSED == 0 {
                // Unallocated or zero subclusters only: allocate the cluster and
                // fill just the subclusters this write touches.
                let host = self.new_data_cluster(ws, cluster_start)?;
                let fresh = self.fresh(ws, host);
                self.fill(ws, piece, from, to, host, data, fresh)?;
                return Ok(Entry {
                    entry: host | COPIED,
                    bitmap: (old.bitmap & !(mask << 32) & ALL_ZEROES) | mask,
                });
            }
            // Compressed, or shared with a snapshot: copy the whole cluster.
            let host = self.new_data_cluster(ws, cluster_start)?;
            let fresh = self.fresh(ws, host);
            self.fill(ws, piece, 0, cluster_size, host, data, fresh)?;
            frees.extend(self.held_range(old));
            return Ok(Entry {
                entry: host | COPIED,
                bitmap: ALL_ALLOCATED,
            });
        }
        match self.owned_host(old) {
            Some(host) if old.entry & ZERO == 0 => {
                self.write_piece(ws, host + a, data, piece.len())?;
                return Ok(old);
            }
            Some(host) => {
                // An allocated zero cluster we own: reuse its host cluster,
                // whose bytes are stale.
                let fresh = self.fresh(ws, host);
                self.fill(ws, piece, 0, cluster_size, host, data, fresh)?;
                return Ok(Entry {
                    entry: host | COPIED,
                    bitmap: 0,
                });
            }
            None => {}
        }
        let host = self.new_data_cluster(ws, cluster_start)?;
        let fresh = self.fresh(ws, host);
        self.fill(ws, piece, 0, cluster_size, host, data, fresh)?;
        frees.extend(self.held_range(old));
        Ok(Entry {
            entry: host | COPIED,
            bitmap: 0,
        })
    }

    /// Whether the host cluster at `host` reads as zeros: it lies in the image
    /// file past everything written since the open (and so past the file's
    /// old end). Clusters of an external data file may hold anything.
    fn fresh(&self, ws: &WriteState, host: u64) -> bool {
        !self.header.has_data_file() && host >= ws.written_end
    }

    /// Fill `[from, to)` (relative to the cluster) of the host cluster at
    /// `host`, which now holds the guest cluster of `piece`: the guest bytes
    /// `[a, b)` from `data` (zeros for `None`), the rest the cluster's current
    /// guest bytes. `fresh`: the host cluster reads as zeros.
    ///
    /// Where the rest reads as zeros (no backing data), no buffer of zeros is
    /// written, as QEMU's handle_alloc_space avoids it: a fresh cluster already
    /// reads as zeros, so only the guest bytes are written; a reused one is
    /// zeroed with `fallocate` first. Otherwise the current bytes are copied
    /// (copy on write). Where a crash could lose the written bytes and show
    /// something other than the old ones through the new L2 entry, that entry
    /// waits for an fdatasync.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        ws: &mut WriteState,
        piece: Piece,
        from: u64,
        to: u64,
        host: u64,
        data: Option<&[u8]>,
        fresh: bool,
    ) -> Result<()> {
        let Piece {
            cluster_start,
            cluster_len,
            a,
            b,
        } = piece;
        let readable_to = to.min(cluster_len);
        let rest_zero = self.reads_as_zero(cluster_start + from, cluster_start + a)?
            && self.reads_as_zero(cluster_start + b, cluster_start + readable_to)?;
        if fresh {
            self.cover_cluster(ws, host)?;
        }
        if !rest_zero {
            let buf = self.merged(cluster_start, from, to, a, data, piece.len())?;
            self.data_write(ws, &buf, host + from)?;
            ws.order.l2_after_sync = true;
            return Ok(());
        }
        if fresh {
            if data.is_some() && !self.reads_as_zero(cluster_start + a, cluster_start + b)? {
                ws.order.l2_after_sync = true;
            }
        } else {
            // Zero the stale bytes around the guest bytes, never under them:
            // in a cluster the guest already sees, those may be its data.
            match data {
                None => self.data_zero(ws, host + from, to - from)?,
                Some(_) => {
                    if a > from {
                        self.data_zero(ws, host + from, a - from)?;
                    }
                    if to > b {
                        self.data_zero(ws, host + b, to - b)?;
                    }
                }
            }
            ws.order.l2_after_sync = true;
        }
        match data {
            Some(d) => self.data_write(ws, d, host + a),
            // Zeros: the cluster is fresh or was just zeroed.
            None => Ok(()),
        }
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
                let zeros = vec![0u8; usize_of(len)?];
                self.data_write(ws, &zeros, host)
            }
        }
    }
}
