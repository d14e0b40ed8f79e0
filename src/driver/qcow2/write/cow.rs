//! Copy on write: writing guest bytes into one cluster, in place when the
//! image owns the cluster, else into a newly allocated one filled with the
//! cluster's current contents (from a snapshot's shared cluster, a compressed
//! cluster, the backing file or zeros) and the new bytes laid over them.

use super::{Entry, WriteState, ALL_ALLOCATED, ALL_ZEROES};
use crate::driver::qcow2::l2::{COMPRESSED, COPIED, ZERO};
use crate::driver::qcow2::Qcow2;
use crate::driver::BlockDriver;
use crate::error::Result;

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
    pub(super) fn write_cluster(
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
}
