//! The VHDX driver (read-only): Hyper-V's virtual disk, fixed, dynamic and
//! differencing, with 512- or 4096-byte logical sectors and any block size
//! from 1 MiB to 256 MiB. Layout from Microsoft's MS-VHDX specification.
//!
//! Opening reads the header section ([`header`]), replays a dirty log in
//! memory ([`log`]), reads the metadata region ([`metadata`]) and the whole
//! BAT ([`bat`]), and for a differencing disk opens the parent its locator
//! names through the backing gate. Block states map onto the shared kinds:
//! fully present is data, zero is zero, not present/undefined/unmapped are
//! unallocated (the parent's data in a differencing disk, else zeros), and a
//! partially present block is data or unallocated sector by sector, as its
//! sector bitmap says.

pub mod bat;
pub mod header;
pub mod log;
pub mod metadata;

use super::read::{read_backing, read_mapped, view_through_map};
use super::{
    check_range, gate, locate_in_backing, BlockDriver, Extent, Format, Location, Mapping,
    OpenOptions, TableIndex,
};
use crate::error::{usize_of, Error, Result};
use crate::storage::{Storage, View};
use bat::{Block, Geometry};
use header::{guid_string, Header, Region, Regions, HEADER_SECTION, MIB};
use metadata::Metadata;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bitmap bytes read per `map` call in a partially present block (32 Ki
/// sectors), so a block of alternating sectors costs no more than it must.
const BITMAP_WINDOW: u64 = 4096;

/// An open VHDX image.
pub struct Vhdx {
    /// The file, or the file with its log replayed over it.
    file: Arc<dyn Storage>,
    file_len: u64,
    header: Header,
    regions: Regions,
    meta: Metadata,
    geometry: Geometry,
    bat: Vec<u64>,
    backing: Option<Arc<dyn BlockDriver>>,
    /// The parent's name as the locator gives it (for messages and `info`).
    parent_name: Option<String>,
    /// Log entries replayed in memory at open, and the head's sequence number.
    replayed: Option<(usize, u64)>,
}

fn corrupt(path: &Path, message: String) -> Error {
    Error::corrupt(path, format!("vhdx: {message}"))
}

impl Vhdx {
    /// Open a VHDX image on `file`, following a differencing disk's parent as
    /// `options` allow. `chain` holds the canonical paths of the images above.
    /// The file is only read, whatever `options.writable` says.
    pub fn open(file: Arc<dyn Storage>, options: &OpenOptions, chain: &[PathBuf]) -> Result<Self> {
        let path = file.path().to_path_buf();
        let len = file.len()?;
        let mut magic = [0u8; 8];
        if len >= 8 {
            file.read_exact_at(&mut magic, 0)?;
        }
        if &magic != b"vhdxfile" {
            return Err(Error::format(
                &path,
                "vhdx: the file type identifier is not 'vhdxfile': not a VHDX image",
            ));
        }
        if len < HEADER_SECTION {
            return Err(corrupt(
                &path,
                format!("the file is {len} bytes, shorter than the 1 MiB header section"),
            ));
        }
        let mut first = vec![0u8; header::HEADER_BYTES];
        let mut second = vec![0u8; header::HEADER_BYTES];
        file.read_exact_at(&mut first, header::HEADER_OFFSETS[0])?;
        file.read_exact_at(&mut second, header::HEADER_OFFSETS[1])?;
        let header = header::parse_headers(&path, &first, &second)?;

        // The specification allows no other I/O before the log is replayed.
        let (file, replayed): (Arc<dyn Storage>, _) = if header.log_is_dirty() {
            let overlay = log::replay(&path, file, &header, len)?;
            let facts = (overlay.entries, overlay.head_sequence);
            (Arc::new(overlay), Some(facts))
        } else {
            (file, None)
        };
        let file_len = file.len()?;

        let mut first = vec![0u8; header::REGION_TABLE_BYTES];
        let mut second = vec![0u8; header::REGION_TABLE_BYTES];
        file.read_exact_at(&mut first, header::REGION_TABLE_OFFSETS[0])?;
        file.read_exact_at(&mut second, header::REGION_TABLE_OFFSETS[1])?;
        let regions = header::parse_regions(&path, &first, &second)?;
        let log_region = Region {
            offset: header.log_offset,
            length: u64::from(header.log_length),
        };
        for (name, region) in [("BAT", regions.bat), ("metadata", regions.metadata)] {
            if log_region.overlaps(region.offset, region.length) {
                return Err(corrupt(
                    &path,
                    format!(
                        "the {name} region at {:#x} overlaps the log at {:#x}",
                        region.offset, log_region.offset
                    ),
                ));
            }
        }

        let meta = metadata::parse(&path, file.as_ref(), regions.metadata, file_len)?;
        let geometry = Geometry::new(
            meta.disk_size,
            u64::from(meta.block_size),
            u64::from(meta.logical_sector_size),
            meta.has_parent,
        );
        let bat = read_bat(&path, file.as_ref(), &regions, &geometry, file_len)?;
        check_bat_places(&path, &bat, &geometry, &regions, log_region)?;

        let mut image = Vhdx {
            file,
            file_len,
            header,
            regions,
            meta,
            geometry,
            bat,
            backing: None,
            parent_name: None,
            replayed,
        };
        if image.meta.has_parent && options.backing.follow {
            let name = image.parent_name()?;
            image.backing = Some(image.open_parent(&name, options, chain)?);
            image.parent_name = Some(name);
        } else if image.meta.has_parent {
            image.parent_name = image.parent_name().ok();
        }
        Ok(image)
    }

    /// The parent's file name, from the locator's `relative_path` (Windows
    /// separators turned into `/`).
    fn parent_name(&self) -> Result<String> {
        match self.meta.locator("relative_path") {
            Some(relative) => Ok(relative.replace('\\', "/")),
            None => {
                let others: Vec<String> = ["volume_path", "absolute_win32_path"]
                    .iter()
                    .filter_map(|k| self.meta.locator(k).map(|v| format!("{k} '{v}'")))
                    .collect();
                Err(Error::format(
                    self.path(),
                    format!(
                        "vhdx: the parent locator has no relative_path{}; blkverify follows only relative paths (give --no-backing to read without the parent)",
                        if others.is_empty() {
                            String::new()
                        } else {
                            format!(" (it has {}, Windows paths)", others.join(", "))
                        }
                    ),
                ))
            }
        }
    }

    /// Open the parent through the gate and check that it is the disk the
    /// child was made from: the same sector size, and a DataWriteGuid the
    /// locator's `parent_linkage` (or `parent_linkage2`) names.
    fn open_parent(
        &self,
        name: &str,
        options: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<Arc<dyn BlockDriver>> {
        let parent = gate::open_backing(self.path(), "vhdx", name, Some("vhdx"), options, chain)?;
        let facts = parent.info();
        let fact = |key: &str| {
            facts
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let normal = |g: &str| {
            g.trim_matches(|c| c == '{' || c == '}')
                .to_ascii_lowercase()
        };
        let guid = normal(&fact("data_write_guid"));
        let linked = ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| self.meta.locator(k))
            .any(|g| normal(g) == guid);
        if !linked {
            return Err(corrupt(
                self.path(),
                format!(
                    "parent '{name}' has DataWriteGuid {{{guid}}}, but the parent locator's parent_linkage is {}: the parent changed after this disk was made from it",
                    self.meta.locator("parent_linkage").unwrap_or("")
                ),
            ));
        }
        let sector = self.meta.logical_sector_size.to_string();
        if fact("logical_sector_size") != sector {
            return Err(corrupt(
                self.path(),
                format!(
                    "parent '{name}' has {}-byte logical sectors, this disk {sector}-byte ones",
                    fact("logical_sector_size")
                ),
            ));
        }
        Ok(parent)
    }

    /// The parsed metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    fn block_size(&self) -> u64 {
        self.geometry.block_size
    }

    /// BAT entry `index`. The BAT was read whole, with an entry for every
    /// block of the disk, so an index past it is a bug, never a block that
    /// is not present.
    fn bat_entry(&self, index: u64) -> Result<u64> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "{}: BAT entry {index} lies past the BAT's {} entries",
                    self.path().display(),
                    self.bat.len()
                ))
            })
    }

    /// The payload block `block`'s state, or a read error naming its entry.
    fn block(&self, block: u64) -> Result<Block> {
        let index = self.geometry.payload_index(block);
        let entry = self.bat_entry(index)?;
        let decoded = bat::decode_payload(entry, self.meta.has_parent)
            .map_err(|e| self.bat_error(index, block, e))?;
        if let Block::Present { file_offset } | Block::Partial { file_offset } = decoded {
            // The part of the block the disk can reach must be in the file: a
            // truncated image is an error, never zeros.
            let start = block * self.block_size();
            let reach = self
                .block_size()
                .min(self.meta.disk_size.saturating_sub(start));
            if file_offset.saturating_add(reach) > self.file_len {
                return Err(self.bat_error(
                    index,
                    block,
                    format!(
                        "payload block at {file_offset:#x} lies past the end of the file (size {:#x})",
                        self.file_len
                    ),
                ));
            }
        }
        Ok(decoded)
    }

    fn bat_error(&self, index: u64, block: u64, fact: String) -> Error {
        corrupt(
            self.path(),
            format!(
                "BAT entry {index} (payload block {block}, guest offset {:#x}): {fact}",
                block * self.block_size()
            ),
        )
    }

    /// The extent of a partially present block starting at `offset`: a run
    /// of sectors the bitmap marks present (data) or absent (the parent's).
    fn map_partial(&self, block: u64, file_offset: u64, offset: u64, limit: u64) -> Result<Extent> {
        let g = &self.geometry;
        let index = g.bitmap_index(block);
        let entry = self.bat_entry(index)?;
        let bitmap = match bat::decode_bitmap(entry) {
            Ok(Some(at)) => at,
            Ok(None) => {
                return Err(self.bat_error(
                    g.payload_index(block),
                    block,
                    format!(
                        "the block is partially present, but its sector bitmap (BAT entry {index}) is not"
                    ),
                ))
            }
            Err(e) => return Err(self.bat_error(index, block, e)),
        };
        if bitmap.saturating_add(MIB) > self.file_len {
            return Err(self.bat_error(
                index,
                block,
                format!(
                    "sector bitmap block at {bitmap:#x} lies past the end of the file (size {:#x})",
                    self.file_len
                ),
            ));
        }
        let block_start = block * self.block_size();
        let sector = g.sector_size;
        let first = (offset - block_start) / sector;
        let block_end = (block_start + self.block_size()).min(limit);
        let last = (block_end - block_start).div_ceil(sector);
        let first_bit = g.bitmap_bit(block) + first;
        let bits = (last - first).min(BITMAP_WINDOW * 8 - first_bit % 8);
        let byte_start = first_bit / 8;
        let mut bytes =
            vec![0u8; (first_bit + bits).div_ceil(8).saturating_sub(byte_start) as usize];
        self.file.read_exact_at(&mut bytes, bitmap + byte_start)?;
        let bit = |i: u64| {
            let b = first_bit + i;
            bytes
                .get((b / 8 - byte_start) as usize)
                .is_some_and(|byte| byte >> (b % 8) & 1 != 0)
        };
        let present = bit(0);
        let run = (1..bits).find(|&i| bit(i) != present).unwrap_or(bits);
        let end = (block_start + (first + run) * sector).min(block_end);
        let mapping = if present {
            Mapping::Data {
                host_offset: file_offset + (offset - block_start),
            }
        } else {
            Mapping::Unallocated
        };
        Ok(Extent {
            offset,
            length: end - offset,
            mapping,
        })
    }
}

/// Read the BAT entries the disk needs (the region may hold more).
fn read_bat(
    path: &Path,
    file: &dyn Storage,
    regions: &Regions,
    geometry: &Geometry,
    file_len: u64,
) -> Result<Vec<u64>> {
    let bytes = geometry.entries * 8;
    let region = regions.bat;
    if bytes > region.length {
        return Err(corrupt(
            path,
            format!(
                "the BAT region at {:#x} holds {} entries, but a disk of this size needs {}",
                region.offset,
                region.length / 8,
                geometry.entries
            ),
        ));
    }
    if region.offset.saturating_add(bytes) > file_len {
        return Err(corrupt(
            path,
            format!(
                "the BAT at {:#x} ({bytes} bytes) lies past the end of the file (size {file_len:#x})",
                region.offset
            ),
        ));
    }
    // Bounded: at most 64 TiB / 1 MiB entries, and inside the file.
    let mut entries = Vec::with_capacity(usize_of(geometry.entries)?);
    let mut chunk = vec![0u8; (1 << 20).min(bytes as usize)];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(chunk.len() as u64) as usize;
        let piece = chunk.get_mut(..n).unwrap_or(&mut []);
        file.read_exact_at(piece, region.offset + done)?;
        entries.extend(
            piece
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        );
        done += n as u64;
    }
    Ok(entries)
}

/// Stored blocks must not lie on the header section, the log, the BAT or the
/// metadata region (QEMU checks the same at open).
fn check_bat_places(
    path: &Path,
    bat: &[u64],
    geometry: &Geometry,
    regions: &Regions,
    log: Region,
) -> Result<()> {
    let places = [
        ("the log", log),
        ("the BAT region", regions.bat),
        ("the metadata region", regions.metadata),
    ];
    for (index, &entry) in bat.iter().enumerate() {
        let state = entry & 7;
        let bitmap = geometry.is_bitmap_index(index as u64);
        let length = match (bitmap, state) {
            (false, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) => geometry.block_size,
            (true, bat::BITMAP_PRESENT) => MIB,
            _ => continue,
        };
        let at = bat::file_offset(entry);
        if let Some((name, region)) = places.iter().find(|(_, r)| r.overlaps(at, length)) {
            return Err(corrupt(
                path,
                format!(
                    "BAT entry {index}: the {} at {at:#x} overlaps {name} at {:#x}",
                    if bitmap {
                        "sector bitmap block"
                    } else {
                        "payload block"
                    },
                    region.offset
                ),
            ));
        }
    }
    Ok(())
}

impl BlockDriver for Vhdx {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.meta.disk_size
    }

    fn granularity(&self) -> u64 {
        self.block_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size(), offset, buf.len() as u64)?;
        read_mapped(self, buf, offset, |piece, guest, mapping| {
            match mapping {
            Mapping::Data { host_offset } => self.file.read_exact_at(piece, host_offset),
            Mapping::Zero { .. } => {
                piece.fill(0);
                Ok(())
            }
            Mapping::Unallocated => read_backing(self.backing(), piece, guest),
            Mapping::Compressed { .. } => Err(Error::Internal(format!(
                "{}: the vhdx map gave a compressed extent at guest offset {guest:#x}; vhdx has no compressed blocks",
                self.path().display()
            ))),
        }
        })
    }

    fn read_view(&self, offset: u64, len: usize) -> Result<Option<View>> {
        view_through_map(self, self.file.as_ref(), self.backing.as_ref(), offset, len)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_range(self.path(), self.size(), offset, max_len.min(1))?;
        let size = self.size();
        let limit = offset + max_len.min(size - offset).max(1);
        let bs = self.block_size();
        let block = offset / bs;
        let within = offset - block * bs;
        let mapping = match self.block(block)? {
            Block::Partial { file_offset } => {
                return self.map_partial(block, file_offset, offset, limit)
            }
            Block::Present { file_offset } => Mapping::Data {
                host_offset: file_offset + within,
            },
            Block::Zero => Mapping::Zero { allocated: false },
            Block::Unallocated => Mapping::Unallocated,
        };
        // Extend over following blocks with the same kind of mapping (and,
        // for data, contiguous in the file), so a fixed disk maps as one run.
        let mut end = ((block + 1) * bs).min(limit);
        while end < limit {
            let next = end / bs;
            let continues = match (mapping, self.block(next)) {
                (Mapping::Data { host_offset }, Ok(Block::Present { file_offset })) => {
                    file_offset == host_offset + (end - offset)
                }
                (Mapping::Zero { .. }, Ok(Block::Zero)) => true,
                (Mapping::Unallocated, Ok(Block::Unallocated)) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            end = ((next + 1) * bs).min(limit);
        }
        Ok(Extent {
            offset,
            length: end - offset,
            mapping,
        })
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref()
    }

    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let extent = self.map(offset, 1)?;
        let block = offset / self.block_size();
        let mut location = Location {
            kind: extent.mapping.kind(),
            format: Format::Vhdx,
            unit: "block",
            tables: vec![TableIndex {
                table: "BAT",
                index: self.geometry.payload_index(block),
            }],
            subcluster: None,
            host_offset: None,
            file: self.path().to_path_buf(),
            backing_depth: 0,
        };
        match extent.mapping {
            Mapping::Data { host_offset } => location.host_offset = Some(host_offset),
            Mapping::Unallocated => locate_in_backing(&mut location, self.backing(), offset)?,
            Mapping::Zero { .. } | Mapping::Compressed { .. } => {}
        }
        Ok(Some(location))
    }

    fn info(&self) -> Vec<(String, String)> {
        let m = &self.meta;
        let subformat = if m.has_parent {
            "differencing"
        } else if m.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        let mut facts = vec![
            ("subformat".to_string(), subformat.to_string()),
            ("cluster_size".to_string(), m.block_size.to_string()),
            ("block_size".to_string(), m.block_size.to_string()),
            (
                "logical_sector_size".to_string(),
                m.logical_sector_size.to_string(),
            ),
            (
                "physical_sector_size".to_string(),
                m.physical_sector_size.to_string(),
            ),
            ("log_size".to_string(), self.header.log_length.to_string()),
            ("header".to_string(), self.header.which.to_string()),
            ("region_table".to_string(), self.regions.which.to_string()),
            ("disk_id".to_string(), guid_string(&m.page83)),
            (
                "data_write_guid".to_string(),
                guid_string(&self.header.data_write_guid),
            ),
            (
                "log".to_string(),
                match self.replayed {
                    Some((entries, head)) => {
                        format!("replayed in memory ({entries} entries, head sequence {head})")
                    }
                    None => "empty".to_string(),
                },
            ),
        ];
        if let Some(name) = &self.parent_name {
            facts.push(("backing_file".to_string(), name.clone()));
            facts.push(("backing_format".to_string(), "vhdx".to_string()));
        }
        facts
    }
}
