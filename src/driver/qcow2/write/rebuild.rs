//! Refcount integrity at a writable open: the refcounts of the header and
//! tables are checked, and those of a dirty image (lazy refcounts, after a
//! crash) are rebuilt from every reference in its tables.

use super::WriteState;
use crate::driver::qcow2::l2::{self, COMPRESSED, OFFSET_MASK};
use crate::driver::qcow2::refcount::{self, Refcounts};
use crate::driver::qcow2::{self as qcow2, header, Qcow2};
use crate::error::{usize_of, Error, Result};

/// The largest file (in clusters) whose refcounts a writable open of a dirty
/// image rebuilds: 8 bytes of memory each, so at most 256 MiB.
const MAX_REBUILD_CLUSTERS: u64 = 32 << 20;

impl Qcow2 {
    /// Refuse to write an image whose refcounts call its own metadata free:
    /// the allocator would hand those clusters out again and overwrite the
    /// header or a table (QEMU's overlap checks stop the same writes).
    pub(super) fn check_metadata_refcounts(&self, ws: &mut WriteState) -> Result<()> {
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

    /// Count every reference in the image and write fresh refcount structures
    /// past its end (after a crash with lazy refcounts). The old structures
    /// become unreferenced clusters with refcount 0.
    pub(super) fn rebuild_refcounts(&self, ws: &mut WriteState) -> Result<()> {
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
        let mut counts: Vec<u64> = vec![0; usize_of(file_clusters)?];
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
            let l1 = qcow2::read_l1(self.file.as_ref(), l1_offset, l1_size)?;
            for l1_entry in l1 {
                let l2_offset = l1_entry & OFFSET_MASK;
                if l2_offset == 0 {
                    continue;
                }
                add(l2_offset, cluster_size)?;
                let table = self.load_l2(l2_offset)?;
                for e in table.iter().step_by(usize::try_from(width).unwrap_or(1)) {
                    if e & COMPRESSED != 0 {
                        let (host, size) = l2::compressed_descriptor(*e, bits);
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
        self.sync(ws)?;
        self.write_reftable_fields(ws, layout.table_offset, layout.table_clusters)?;
        self.sync(ws)?;
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
}

/// Bytes of the snapshot table (entries are variable-length).
fn snapshot_table_len(file: &dyn crate::storage::Storage, h: &header::Header) -> Result<u64> {
    let file_len = file.len()?;
    let len = file_len
        .saturating_sub(h.snapshots_offset)
        .min(qcow2::snapshot::MAX_SNAPSHOT_TABLE_BYTES);
    let mut table = vec![0u8; usize_of(len)?];
    file.read_exact_at(&mut table, h.snapshots_offset)?;
    qcow2::snapshot::table_len(file.path(), &table, h.nb_snapshots)
}
