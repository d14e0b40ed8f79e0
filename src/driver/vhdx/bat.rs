//! The block allocation table (MS-VHDX 2.5): one 64-bit entry per payload
//! block, with one sector bitmap entry after every `chunk_ratio` of them. An
//! entry is a 3-bit state, 17 reserved bits and a file offset in MiB.

use super::header::MIB;

/// Logical sectors one sector bitmap block (1 MiB of bits) describes.
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

const STATE_MASK: u64 = 7;
const RESERVED_MASK: u64 = 0xf_fff8;
const OFFSET_SHIFT: u32 = 20;

/// Payload block states.
pub const NOT_PRESENT: u64 = 0;
/// See the specification: contents not defined.
pub const UNDEFINED: u64 = 1;
/// Reads as zeros.
pub const ZERO: u64 = 2;
/// Unmapped by the guest (TRIM).
pub const UNMAPPED: u64 = 3;
/// UNMAPPED as draft 0.95 of the specification numbered it; QEMU reads it as
/// unmapped, and so do we.
pub const UNMAPPED_V095: u64 = 5;
/// Stored whole in the file.
pub const FULLY_PRESENT: u64 = 6;
/// Stored in the file sector by sector, as the sector bitmap says (differencing disks).
pub const PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block state: allocated.
pub const BITMAP_PRESENT: u64 = 6;

/// What a payload BAT entry says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Not present, undefined or unmapped: nothing stored (the parent's data,
    /// or zeros).
    Unallocated,
    /// Defined to read as zeros.
    Zero,
    /// Stored whole at this file offset.
    Present {
        /// The block's first byte in the file.
        file_offset: u64,
    },
    /// Stored at this file offset, sector by sector as the bitmap says.
    Partial {
        /// The block's first byte in the file.
        file_offset: u64,
    },
}

/// The shape of the table for one disk.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size (512 or 4096).
    pub sector_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks of the disk.
    pub payload_blocks: u64,
    /// Entries the table must hold.
    pub entries: u64,
}

impl Geometry {
    /// The geometry of a disk; `block_size` and `sector_size` are checked
    /// powers of two with `block_size <= SECTORS_PER_BITMAP * sector_size`.
    pub fn new(disk_size: u64, block_size: u64, sector_size: u64, has_parent: bool) -> Geometry {
        let chunk_ratio = (SECTORS_PER_BITMAP * sector_size / block_size).max(1);
        let payload_blocks = disk_size.div_ceil(block_size);
        let bitmap_blocks = payload_blocks.div_ceil(chunk_ratio);
        let entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        Geometry {
            block_size,
            sector_size,
            chunk_ratio,
            payload_blocks,
            entries,
        }
    }

    /// The BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// The BAT index of the sector bitmap entry covering payload block `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Whether BAT index `index` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, index: u64) -> bool {
        index % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// The bit in the sector bitmap block of the first sector of `block`.
    pub fn bitmap_bit(&self, block: u64) -> u64 {
        (block % self.chunk_ratio) * (self.block_size / self.sector_size)
    }
}

/// The file offset an entry holds.
pub fn file_offset(entry: u64) -> u64 {
    (entry >> OFFSET_SHIFT) * MIB
}

/// Decode a payload entry, or say what is wrong with it.
pub fn decode_payload(entry: u64, has_parent: bool) -> Result<Block, String> {
    let state = entry & STATE_MASK;
    let offset = file_offset(entry);
    let stored = |what: &str| -> Result<u64, String> {
        if entry & RESERVED_MASK != 0 {
            return Err(format!(
                "entry {entry:#018x} ({what}) has reserved bits {:#x} set",
                entry & RESERVED_MASK
            ));
        }
        if offset < MIB {
            return Err(format!(
                "entry {entry:#018x} ({what}) points at file offset {offset:#x}, inside the header section"
            ));
        }
        Ok(offset)
    };
    match state {
        NOT_PRESENT | UNDEFINED | UNMAPPED | UNMAPPED_V095 => Ok(Block::Unallocated),
        ZERO => Ok(Block::Zero),
        FULLY_PRESENT => Ok(Block::Present {
            file_offset: stored("fully present")?,
        }),
        PARTIALLY_PRESENT if has_parent => Ok(Block::Partial {
            file_offset: stored("partially present")?,
        }),
        PARTIALLY_PRESENT => Err(format!(
            "entry {entry:#018x} is partially present, which only a differencing disk may have"
        )),
        _ => Err(format!(
            "entry {entry:#018x} has state {state}, which is reserved"
        )),
    }
}

/// Decode a sector bitmap entry: the bitmap block's file offset, if present.
pub fn decode_bitmap(entry: u64) -> Result<Option<u64>, String> {
    match entry & STATE_MASK {
        0 => Ok(None),
        BITMAP_PRESENT => {
            let offset = file_offset(entry);
            if entry & RESERVED_MASK != 0 || offset < MIB {
                Err(format!(
                    "sector bitmap entry {entry:#018x} has reserved bits set or points into the header section"
                ))
            } else {
                Ok(Some(offset))
            }
        }
        state => Err(format!(
            "sector bitmap entry {entry:#018x} has state {state}, which is reserved"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_counts_follow_the_specification() {
        // 1 MiB blocks, 512-byte sectors: 4096 payload blocks per bitmap block.
        let g = Geometry::new(8192 << 20, MIB, 512, false);
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.entries, 8192 + 1);
        assert_eq!(g.payload_index(4096), 4097);
        assert_eq!(g.bitmap_index(0), 4096);
        assert!(g.is_bitmap_index(4096));
        let d = Geometry::new(8192 << 20, MIB, 512, true);
        assert_eq!(d.entries, 2 * 4097);
        // 256 MiB blocks, 4096-byte sectors: 128 blocks per chunk.
        let g = Geometry::new(1 << 40, 256 * MIB, 4096, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.bitmap_bit(129), 65536);
    }

    #[test]
    fn states() {
        assert_eq!(decode_payload(0, false), Ok(Block::Unallocated));
        assert_eq!(decode_payload(2, false), Ok(Block::Zero));
        assert_eq!(
            decode_payload((3 << 20) | 6, false),
            Ok(Block::Present {
                file_offset: 3 * MIB
            })
        );
        assert!(decode_payload(6, false).is_err());
        assert!(decode_payload((3 << 20) | 7, false).is_err());
        assert!(decode_payload((3 << 20) | 7, true).is_ok());
        assert!(decode_payload(4, true).is_err());
        assert!(decode_payload((3 << 20) | 8 | 6, false).is_err());
    }
}
