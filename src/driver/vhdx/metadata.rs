//! The VHDX metadata region (MS-VHDX 2.6): its table and the items a reader
//! needs — file parameters (block size, has-parent), virtual disk size,
//! logical and physical sector size, page 83 data (the disk's GUID) and, for a
//! differencing disk, the parent locator.

use super::header::{guid, guid_string, Guid, Le, PastEnd, Region, MIB};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::path::Path;

/// The metadata table is the region's first 64 KiB.
pub const TABLE_BYTES: usize = 64 << 10;
/// The most entries the table may have.
pub const MAX_ENTRIES: u16 = 2047;
/// The largest metadata item.
pub const MAX_ITEM: u32 = MIB as u32;
/// The largest virtual disk the format allows: 64 TiB.
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Payload block sizes: 1 MiB to 256 MiB, powers of two.
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

const FILE_PARAMETERS: Guid = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const PAGE_83: Guid = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const PHYSICAL_SECTOR_SIZE: Guid = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const PARENT_LOCATOR: Guid = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// The one parent locator type the specification defines: a VHDX parent.
pub const VHDX_PARENT_TYPE: Guid = guid(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// The metadata items, checked.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Payload block size in bytes.
    pub block_size: u32,
    /// The file keeps every block allocated (a fixed disk).
    pub leave_blocks_allocated: bool,
    /// A differencing disk: unallocated data comes from the parent.
    pub has_parent: bool,
    /// The virtual disk size in bytes.
    pub disk_size: u64,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// The disk's identity (SCSI page 83).
    pub page83: Guid,
    /// The parent locator's key/value pairs, for a differencing disk.
    pub parent_locator: Option<Vec<(String, String)>>,
}

impl Metadata {
    /// A parent locator value by key.
    pub fn locator(&self, key: &str) -> Option<&str> {
        self.parent_locator
            .as_ref()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

struct Item {
    offset: u32,
    length: u32,
}

fn corrupt(path: &Path, message: String) -> Error {
    Error::corrupt(path, format!("vhdx: metadata {message}"))
}

/// The items a reader needs, by slot, with their names in messages.
const KNOWN: [(Guid, &str); 6] = [
    (FILE_PARAMETERS, "File Parameters"),
    (VIRTUAL_DISK_SIZE, "Virtual Disk Size"),
    (PAGE_83, "Virtual Disk ID (page 83)"),
    (LOGICAL_SECTOR_SIZE, "Logical Sector Size"),
    (PHYSICAL_SECTOR_SIZE, "Physical Sector Size"),
    (PARENT_LOCATOR, "Parent Locator"),
];
/// Slots of [`KNOWN`].
const SLOT_FILE_PARAMETERS: usize = 0;
const SLOT_DISK_SIZE: usize = 1;
const SLOT_PAGE_83: usize = 2;
const SLOT_LOGICAL_SECTOR: usize = 3;
const SLOT_PHYSICAL_SECTOR: usize = 4;
const SLOT_PARENT_LOCATOR: usize = 5;

/// Read and check the metadata region.
pub fn parse(path: &Path, file: &dyn Storage, region: Region, file_len: u64) -> Result<Metadata> {
    let table = read_table(path, file, region, file_len)?;
    let items = Items {
        path,
        file,
        region,
        found: table_items(path, &table, region)?,
    };
    let internal = |e: PastEnd| e.internal(path);
    // Each item is read at least as long as its fields (Items::read's min_len).
    let params = items.read(SLOT_FILE_PARAMETERS, 8)?;
    let p = Le(&params);
    let block_size = p.field_u32(0).map_err(internal)?;
    let bits = p.field_u32(4).map_err(internal)?;
    check_file_parameters(path, block_size, bits)?;
    let logical = Le(&items.read(SLOT_LOGICAL_SECTOR, 4)?)
        .field_u32(0)
        .map_err(internal)?;
    let physical = Le(&items.read(SLOT_PHYSICAL_SECTOR, 4)?)
        .field_u32(0)
        .map_err(internal)?;
    check_sector_sizes(path, logical, physical)?;
    let disk_size = Le(&items.read(SLOT_DISK_SIZE, 8)?)
        .field_u64(0)
        .map_err(internal)?;
    if disk_size > MAX_DISK_SIZE || disk_size % u64::from(logical) != 0 {
        return Err(corrupt(
            path,
            format!(
                "Virtual Disk Size is {disk_size}, not a multiple of the {logical}-byte sector up to 64 TiB"
            ),
        ));
    }
    let page83 = Le(&items.read(SLOT_PAGE_83, 16)?)
        .field(0)
        .map_err(internal)?;
    let has_parent = bits & 2 != 0;
    let parent_locator = if has_parent {
        if items
            .found
            .get(SLOT_PARENT_LOCATOR)
            .is_none_or(Option::is_none)
        {
            return Err(corrupt(
                path,
                "File Parameters say the disk has a parent, but there is no Parent Locator item"
                    .into(),
            ));
        }
        Some(parse_locator(path, &items.read(SLOT_PARENT_LOCATOR, 20)?)?)
    } else {
        None
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: bits & 1 != 0,
        has_parent,
        disk_size,
        logical_sector_size: logical,
        physical_sector_size: physical,
        page83,
        parent_locator,
    })
}

/// The metadata table: the region's first 64 KiB, after checking that the
/// region lies in the file and the table's signature.
fn read_table(path: &Path, file: &dyn Storage, region: Region, file_len: u64) -> Result<Vec<u8>> {
    if region.length < TABLE_BYTES as u64 {
        return Err(corrupt(
            path,
            format!("region at {:#x} has length 0", region.offset),
        ));
    }
    let end = region.offset.saturating_add(region.length);
    if end > file_len {
        return Err(corrupt(
            path,
            format!(
                "region at {:#x} ({:#x} bytes) lies past the end of the file (size {file_len:#x})",
                region.offset, region.length
            ),
        ));
    }
    let mut table = vec![0u8; TABLE_BYTES];
    file.read_exact_at(&mut table, region.offset)?;
    if table.get(..8) != Some(b"metadata".as_slice()) {
        return Err(corrupt(
            path,
            format!("table at {:#x}: signature is not 'metadata'", region.offset),
        ));
    }
    Ok(table)
}

/// The table's entries for the items of [`KNOWN`], by slot: each checked to
/// lie in the region, past the table, overlapping no other, and listed once.
/// A required item we do not know is refused.
fn table_items(path: &Path, table: &[u8], region: Region) -> Result<[Option<Item>; 6]> {
    let t = Le(table);
    let internal = |e: PastEnd| e.internal(path);
    let count = t.field_u16(10).map_err(internal)?;
    if count > MAX_ENTRIES {
        return Err(corrupt(
            path,
            format!("table: EntryCount is {count}, more than the {MAX_ENTRIES} allowed"),
        ));
    }
    let mut items: [Option<Item>; 6] = Default::default();
    let mut spans: Vec<(u32, u32, usize)> = Vec::new();
    for i in 0..usize::from(count) {
        // At most MAX_ENTRIES entries of 32 bytes: all inside the table.
        let at = 32 + 32 * i;
        let id: Guid = t.field(at).map_err(internal)?;
        let offset = t.field_u32(at + 16).map_err(internal)?;
        let length = t.field_u32(at + 20).map_err(internal)?;
        let flags = t.field_u32(at + 24).map_err(internal)?;
        let (is_user, is_required) = (flags & 1 != 0, flags & 4 != 0);
        let what = format!("entry {i} ({})", guid_string(&id));
        check_item_place(path, &what, offset, length, region)?;
        if length > 0 {
            if let Some((_, _, j)) = spans.iter().find(|(o, l, _)| {
                offset < o.saturating_add(*l) && *o < offset.saturating_add(length)
            }) {
                return Err(corrupt(path, format!("{what}: item overlaps entry {j}'s")));
            }
            spans.push((offset, length, i));
        }
        let slot = KNOWN
            .iter()
            .position(|(g, _)| *g == id)
            .filter(|_| !is_user);
        match slot.and_then(|k| items.get_mut(k)) {
            Some(item) => {
                if item.is_some() {
                    return Err(corrupt(path, format!("{what}: item appears twice")));
                }
                *item = Some(Item { offset, length });
            }
            None if is_required => {
                return Err(Error::format(
                    path,
                    format!("vhdx: metadata {what} is a required item blkverify does not know"),
                ))
            }
            None => {}
        }
    }
    Ok(items)
}

/// An entry's item is at most 1 MiB, and, unless empty, lies in the region
/// past the table.
fn check_item_place(
    path: &Path,
    what: &str,
    offset: u32,
    length: u32,
    region: Region,
) -> Result<()> {
    if length > MAX_ITEM {
        return Err(corrupt(
            path,
            format!("{what}: Length {length:#x} is more than 1 MiB"),
        ));
    }
    if length == 0 && offset != 0 {
        return Err(corrupt(
            path,
            format!("{what}: Length is 0 but Offset is {offset:#x}"),
        ));
    }
    let item_end = u64::from(offset) + u64::from(length);
    if length > 0 && (u64::from(offset) < TABLE_BYTES as u64 || item_end > region.length) {
        return Err(corrupt(
            path,
            format!(
                "{what}: item at offset {offset:#x} ({length} bytes) lies outside the region's {:#x} bytes past its table",
                region.length
            ),
        ));
    }
    Ok(())
}

/// The items the table lists, to read.
struct Items<'a> {
    path: &'a Path,
    file: &'a dyn Storage,
    region: Region,
    found: [Option<Item>; 6],
}

impl Items<'_> {
    /// The bytes of the item in `slot`, which must be there and at least
    /// `min_len` bytes long.
    fn read(&self, slot: usize, min_len: u32) -> Result<Vec<u8>> {
        let (_, name) = KNOWN.get(slot).copied().unwrap_or((FILE_PARAMETERS, "?"));
        let item = self
            .found
            .get(slot)
            .and_then(Option::as_ref)
            .ok_or_else(|| corrupt(self.path, format!("item {name} is missing")))?;
        if item.length < min_len {
            return Err(corrupt(
                self.path,
                format!(
                    "item {name} is {} bytes, shorter than its {min_len}",
                    item.length
                ),
            ));
        }
        let mut buf = vec![0u8; item.length as usize];
        self.file
            .read_exact_at(&mut buf, self.region.offset + u64::from(item.offset))?;
        Ok(buf)
    }
}

/// The block size is a power of two from 1 MiB to 256 MiB; no reserved flag
/// is set.
fn check_file_parameters(path: &Path, block_size: u32, bits: u32) -> Result<()> {
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(corrupt(
            path,
            format!("File Parameters: BlockSize is {block_size}, not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    if bits & !3 != 0 {
        return Err(Error::format(
            path,
            format!("vhdx: metadata File Parameters: reserved flags {bits:#x} are set"),
        ));
    }
    Ok(())
}

/// Both sector sizes are 512 or 4096.
fn check_sector_sizes(path: &Path, logical: u32, physical: u32) -> Result<()> {
    for (name, value) in [("Logical", logical), ("Physical", physical)] {
        if value != 512 && value != 4096 {
            return Err(corrupt(
                path,
                format!("{name} Sector Size is {value}, not 512 or 4096"),
            ));
        }
    }
    Ok(())
}

/// The key/value pairs of a VHDX parent locator (MS-VHDX 2.6.2.6).
fn parse_locator(path: &Path, item: &[u8]) -> Result<Vec<(String, String)>> {
    let f = Le(item);
    // The item is at least 20 bytes (read_item's min_len): the type and count are there.
    let internal = |e: PastEnd| e.internal(path);
    let kind: Guid = f.field(0).map_err(internal)?;
    if kind != VHDX_PARENT_TYPE {
        return Err(Error::format(
            path,
            format!(
                "vhdx: parent locator type {} is not a VHDX parent; blkverify cannot follow it",
                guid_string(&kind)
            ),
        ));
    }
    let count = f.field_u16(18).map_err(internal)?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for i in 0..usize::from(count) {
        let at = 20 + 12 * i;
        let entry = (f.u32(at), f.u32(at + 4), f.u16(at + 8), f.u16(at + 10));
        let (Some(key_offset), Some(value_offset), Some(key_len), Some(value_len)) = entry else {
            return Err(corrupt(
                path,
                format!(
                    "parent locator: entry {i} of {count} lies past the item's {} bytes",
                    item.len()
                ),
            ));
        };
        let text = |offset: u32, len: u16, what: &str| -> Result<String> {
            let start = offset as usize;
            let bytes = item
                .get(start..start + usize::from(len))
                .filter(|b| offset > 0 && !b.is_empty() && b.len() % 2 == 0)
                .ok_or_else(|| {
                    corrupt(
                        path,
                        format!(
                            "parent locator: entry {i}: {what} at offset {offset} ({len} bytes) is empty, odd-sized or past the item's {} bytes",
                            item.len()
                        ),
                    )
                })?;
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units)
                .ok()
                .filter(|s| !s.contains('\0'))
                .ok_or_else(|| {
                    corrupt(
                        path,
                        format!(
                            "parent locator: entry {i}: {what} is not UTF-16 text without NULs"
                        ),
                    )
                })
        };
        let key = text(key_offset, key_len, "key")?;
        let value = text(value_offset, value_len, "value")?;
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(corrupt(
                path,
                format!("parent locator: key '{key}' appears twice"),
            ));
        }
        pairs.push((key, value));
    }
    if !pairs.iter().any(|(k, _)| k == "parent_linkage") {
        return Err(corrupt(
            path,
            "parent locator: there is no parent_linkage entry".into(),
        ));
    }
    Ok(pairs)
}
