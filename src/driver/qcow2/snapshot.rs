//! The internal snapshot table: enough of it to read a snapshot's disk.

use crate::bytes::BeBytes;
use crate::error::{Error, Result};
use std::path::Path;

/// One internal snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The unique ID string ("1", "2", ...).
    pub id: String,
    /// The user's name for it.
    pub name: String,
    /// Its L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// The virtual disk size when it was taken, if recorded.
    pub disk_size: Option<u64>,
}

/// The most bytes a snapshot table may occupy (QEMU's limit).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;

/// Parse `count` entries from `table`, the bytes at the snapshot table offset.
pub fn parse_table(path: &Path, table: &[u8], count: u32, version: u32) -> Result<Vec<Snapshot>> {
    let b = BeBytes(table);
    let mut at = 0usize;
    let mut snapshots = Vec::with_capacity(count.min(1024) as usize);
    for index in 0..count {
        let corrupt = |what: &str| {
            Error::corrupt(
                path,
                format!("qcow2: snapshot table entry {index} at table offset {at:#x}: {what}"),
            )
        };
        let field_err = || corrupt("runs past the end of the snapshot table");
        let l1_table_offset = b.u64(at).ok_or_else(field_err)?;
        let l1_size = b.u32(at + 8).ok_or_else(field_err)?;
        let id_size = usize::from(b.u16(at + 12).ok_or_else(field_err)?);
        let name_size = usize::from(b.u16(at + 14).ok_or_else(field_err)?);
        let extra_size = b.u32(at + 36).ok_or_else(field_err)? as usize;
        if extra_size > 1024 {
            return Err(corrupt(&format!(
                "extra_data_size is {extra_size}; the limit is 1024"
            )));
        }
        if version >= 3 && extra_size < 16 {
            // The specification requires the disk size in version 3 entries;
            // `qemu-img check` calls an entry without it incomplete.
            return Err(corrupt(&format!(
                "extra_data_size is {extra_size}; version 3 entries need at least 16 (the entry is incomplete)"
            )));
        }
        let extra_start = at + 40;
        let disk_size = if extra_size >= 16 {
            Some(b.u64(extra_start + 8).ok_or_else(field_err)?)
        } else {
            None
        };
        let id_start = extra_start + extra_size;
        let name_start = id_start + id_size;
        let end = name_start + name_size;
        let id = table.get(id_start..name_start).ok_or_else(field_err)?;
        let name = table.get(name_start..end).ok_or_else(field_err)?;
        snapshots.push(Snapshot {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            l1_table_offset,
            l1_size,
            disk_size,
        });
        at = end.div_ceil(8) * 8;
    }
    Ok(snapshots)
}

/// Bytes that `count` entries occupy at the start of `table`.
pub fn table_len(path: &Path, table: &[u8], count: u32) -> Result<u64> {
    let b = BeBytes(table);
    let mut at = 0usize;
    for index in 0..count {
        let short = || {
            Error::corrupt(
                path,
                format!("qcow2: snapshot table entry {index} runs past the end of the table"),
            )
        };
        let id_size = usize::from(b.u16(at + 12).ok_or_else(short)?);
        let name_size = usize::from(b.u16(at + 14).ok_or_else(short)?);
        let extra_size = b.u32(at + 36).ok_or_else(short)? as usize;
        at = (at + 40 + extra_size.min(1024) + id_size + name_size).div_ceil(8) * 8;
    }
    Ok(at as u64)
}

/// Find a snapshot by ID first, then by name, as QEMU does.
pub fn find<'a>(snapshots: &'a [Snapshot], wanted: &str) -> Option<&'a Snapshot> {
    snapshots
        .iter()
        .find(|s| s.id == wanted)
        .or_else(|| snapshots.iter().find(|s| s.name == wanted))
}
