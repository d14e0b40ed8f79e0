//! The VDI driver (VirtualBox), read-only: static and dynamic images. A header,
//! a block map of little-endian 32-bit entries (one per 1 MiB block of the
//! disk: the index of the data block holding it, `0xffffffff` for a block
//! never written and `0xfffffffe` for a discarded one, both reading as zeros),
//! then the data blocks.
//!
//! At open: the header (see `header`), the block map's place, and the map as a
//! whole (the count of allocated entries must be the header's
//! `blocks_allocated`, and no two entries may share a data block, as `qemu-img
//! check` requires). At the first read of a block: its entry, which must name
//! a data block that exists and lies inside the file.

pub mod header;

use super::read::{read_mapped, view_through_map};
use super::{check_range, BlockDriver, Extent, Format, Location, Mapping, TableIndex};
use crate::error::{usize_of, Error, Result};
use crate::storage::{Storage, View};
use header::Header;
use std::path::Path;
use std::sync::Arc;

/// A block never written: reads as zeros.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// A block discarded (VirtualBox's compaction): reads as zeros.
pub const DISCARDED: u32 = 0xffff_fffe;

/// An open VDI image.
pub struct Vdi {
    file: Arc<dyn Storage>,
    header: Header,
    bmap: Vec<u32>,
    file_len: u64,
}

impl Vdi {
    /// Open a VDI image on `file`.
    pub fn open(file: Arc<dyn Storage>) -> Result<Vdi> {
        let path = file.path().to_path_buf();
        let file_len = file.len()?;
        let mut first = vec![0u8; usize_of(file_len.min(header::HEADER_READ as u64))?];
        file.read_exact_at(&mut first, 0)?;
        let header = Header::parse(&path, &first, file_len)?;

        let mut raw = vec![0u8; header.blocks_in_image as usize * 4];
        file.read_exact_at(&mut raw, header.offset_bmap)?;
        let bmap: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        drop(raw);

        // The map as a whole, as `qemu-img check` reads it: no data block used
        // twice, and as many in use as the header says.
        let mut owner = vec![UNALLOCATED; bmap.len()];
        let mut allocated = 0u32;
        for (block, &entry) in bmap.iter().enumerate() {
            if entry >= DISCARDED {
                continue;
            }
            allocated += 1;
            if let Some(slot) = usize::try_from(entry).ok().and_then(|e| owner.get_mut(e)) {
                if *slot != UNALLOCATED {
                    return Err(Error::corrupt(
                        &path,
                        format!(
                            "vdi: block map entries {} and {block} both point to data block {entry}",
                            *slot
                        ),
                    ));
                }
                *slot = block as u32;
            }
        }
        if allocated != header.blocks_allocated {
            return Err(Error::corrupt(
                &path,
                format!(
                    "vdi: blocks_allocated is {}, but the block map has {allocated} allocated entries",
                    header.blocks_allocated
                ),
            ));
        }
        Ok(Vdi {
            file,
            header,
            bmap,
            file_len,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// Block map entry `block`. The map covers the disk (checked at open), so
    /// a block past it is a bug, never an unallocated block.
    fn entry(&self, block: u64) -> Result<u32> {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.bmap.get(i))
            .copied()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "{}: block {block} lies past the block map's {} entries",
                    self.path().display(),
                    self.bmap.len()
                ))
            })
    }

    /// Where block `block`'s data starts in the file, checked.
    fn data_offset(&self, block: u64, entry: u32) -> Result<u64> {
        let guest = block * self.block_size();
        if entry >= self.header.blocks_in_image {
            return Err(Error::corrupt(
                self.path(),
                format!(
                    "vdi: block map entry {block} (guest offset {guest:#x}) is {entry}, beyond the image's {} blocks",
                    self.header.blocks_in_image
                ),
            ));
        }
        let start = self.header.offset_data + u64::from(entry) * self.block_size();
        if start + self.block_size() > self.file_len {
            return Err(Error::corrupt(
                self.path(),
                format!(
                    "vdi: block map entry {block} (guest offset {guest:#x}) puts its data at {start:#x}, past the end of the file (size {:#x})",
                    self.file_len
                ),
            ));
        }
        Ok(start)
    }

    fn mapping_of(&self, block: u64) -> Result<Mapping> {
        Ok(match self.entry(block)? {
            UNALLOCATED => Mapping::Unallocated,
            DISCARDED => Mapping::Zero { allocated: false },
            entry => Mapping::Data {
                host_offset: self.data_offset(block, entry)?,
            },
        })
    }
}

impl BlockDriver for Vdi {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.header.disk_size
    }

    fn granularity(&self) -> u64 {
        self.block_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size(), offset, buf.len() as u64)?;
        read_mapped(self, buf, offset, |piece, _, mapping| match mapping {
            Mapping::Data { host_offset } => self.file.read_exact_at(piece, host_offset),
            // No backing files: unallocated blocks read as zeros, as do
            // blocks the map marks zero.
            _ => {
                piece.fill(0);
                Ok(())
            }
        })
    }

    fn read_view(&self, offset: u64, len: usize) -> Result<Option<View>> {
        view_through_map(self, self.file.as_ref(), None, offset, len)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.size();
        check_range(self.path(), size, offset, max_len.min(1))?;
        let limit = offset.saturating_add(max_len.max(1)).min(size);
        let block_size = self.block_size();
        let block = offset / block_size;
        let first = self.mapping_of(block)?;
        let mapping = match first {
            Mapping::Data { host_offset } => Mapping::Data {
                host_offset: host_offset + offset % block_size,
            },
            other => other,
        };
        // Run on over following blocks of the same kind (and, for data,
        // stored right after the previous one).
        let mut next = block + 1;
        while next * block_size < limit {
            // A bad entry further on ends the extent; its own lookup reports it.
            let continues = match (first, self.mapping_of(next)) {
                (Mapping::Data { host_offset }, Ok(Mapping::Data { host_offset: h })) => {
                    h == host_offset + (next - block) * block_size
                }
                (a, Ok(b)) => a == b,
                (_, Err(_)) => false,
            };
            if !continues {
                break;
            }
            next += 1;
        }
        Ok(Extent {
            offset,
            length: (next * block_size).min(limit) - offset,
            mapping,
        })
    }

    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let extent = self.map(offset, 1)?;
        let host_offset = match extent.mapping {
            Mapping::Data { host_offset } => Some(host_offset),
            _ => None,
        };
        Ok(Some(Location {
            kind: extent.mapping.kind(),
            format: Format::Vdi,
            unit: "block",
            tables: vec![TableIndex {
                table: "block map",
                index: offset / self.block_size(),
            }],
            subcluster: None,
            host_offset,
            file: self.path().to_path_buf(),
            backing_depth: 0,
        }))
    }

    fn info(&self) -> Vec<(String, String)> {
        let h = &self.header;
        let uuid: String = h.uuid_image.iter().map(|b| format!("{b:02x}")).collect();
        vec![
            (
                "image_type".to_string(),
                if h.image_type == header::TYPE_STATIC {
                    "static"
                } else {
                    "dynamic"
                }
                .to_string(),
            ),
            ("block_size".to_string(), h.block_size.to_string()),
            ("blocks_in_image".to_string(), h.blocks_in_image.to_string()),
            (
                "blocks_allocated".to_string(),
                h.blocks_allocated.to_string(),
            ),
            ("header_size".to_string(), format!("{:#x}", h.header_size)),
            ("offset_bmap".to_string(), format!("{:#x}", h.offset_bmap)),
            ("offset_data".to_string(), format!("{:#x}", h.offset_data)),
            ("uuid".to_string(), uuid),
        ]
    }
}
