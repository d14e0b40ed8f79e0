//! The dynamic disk header and the block allocation table (BAT) of sparse VHDs
//! (dynamic and differencing disks).
//!
//! The header (1024 big-endian bytes at the footer's data offset): cookie
//! `cxsparse` (0), data offset (8, unused), table offset (16), header version
//! (24), max table entries (28), block size (32), checksum (36), parent unique
//! id (40), parent time stamp (56), parent Unicode name (64, 512 bytes of
//! UTF-16 big-endian), eight parent locator entries of 24 bytes (576).
//!
//! Each BAT entry is a big-endian sector number: where the block's sector
//! bitmap starts, followed by the block's data; `0xffffffff` is "not
//! allocated". In the bitmap, bit 7 of byte 0 is the block's first sector: a
//! set bit means the sector is stored in this file, a clear one that it reads
//! from the parent (differencing) or as zeros (dynamic).

use super::footer::{be_u32, be_u64, checksum};
use crate::driver::SECTOR_SIZE;
use crate::error::{Error, Result};
use std::path::Path;

/// Bytes in the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;

/// A BAT entry that maps nothing.
pub const UNALLOCATED: u32 = 0xffff_ffff;

/// The smallest block size read (see [`DynamicHeader::parse`]).
pub const MIN_BLOCK_SIZE: u32 = 4096;

/// Locator entries in the header.
pub const LOCATORS: usize = 8;

/// One parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    /// Platform code: `W2ru`, `W2ku`, `MacX`, `Mac `, `Wi2r`, `Wi2k`, or 0.
    pub platform: [u8; 4],
    /// Bytes of locator data.
    pub data_length: u32,
    /// Where the locator data lies in the file.
    pub data_offset: u64,
}

/// The parsed dynamic disk header.
#[derive(Debug, Clone)]
pub struct DynamicHeader {
    /// Where the BAT starts.
    pub table_offset: u64,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes of data per block (a power of two, at least 512).
    pub block_size: u32,
    /// The parent's unique id (differencing disks).
    pub parent_unique_id: [u8; 16],
    /// The parent's file name, as the header records it.
    pub parent_name: String,
    /// The parent locators in use (platform code not zero).
    pub locators: Vec<Locator>,
}

impl DynamicHeader {
    /// Parse and check the header read at `at`.
    pub fn parse(path: &Path, bytes: &[u8], at: u64) -> Result<DynamicHeader> {
        let corrupt = |msg: String| {
            Error::corrupt(path, format!("vpc: dynamic disk header at {at:#x}: {msg}"))
        };
        if bytes.len() != HEADER_SIZE {
            return Err(corrupt(format!(
                "only {} bytes, the header is {HEADER_SIZE}",
                bytes.len()
            )));
        }
        if !bytes.starts_with(b"cxsparse") {
            return Err(corrupt(format!(
                "cookie is '{}', not 'cxsparse'",
                bytes.get(..8).unwrap_or(&[]).escape_ascii()
            )));
        }
        let stored = be_u32(bytes, 36);
        let computed = checksum(bytes, 36);
        if stored != computed {
            return Err(corrupt(format!(
                "checksum is {stored:#010x}, but the header sums to {computed:#010x}"
            )));
        }
        let version = be_u32(bytes, 24);
        if version >> 16 != 1 {
            return Err(Error::format(
                path,
                format!(
                    "vpc: dynamic disk header at {at:#x}: header version is {}.{}; only major version 1 is supported",
                    version >> 16,
                    version & 0xffff
                ),
            ));
        }
        let block_size = be_u32(bytes, 32);
        if u64::from(block_size) < SECTOR_SIZE || !block_size.is_power_of_two() {
            return Err(corrupt(format!(
                "block size is {block_size}, not a power of two of at least {SECTOR_SIZE}"
            )));
        }
        if block_size < MIN_BLOCK_SIZE {
            // QEMU sizes the bitmap as block_size / 4096 sectors, rounded down,
            // so it puts a small block's data where the specification puts its
            // bitmap: no answer would be right for both.
            return Err(Error::format(
                path,
                format!(
                    "vpc: dynamic disk header at {at:#x}: block size is {block_size}; blocks under {MIN_BLOCK_SIZE} bytes are not supported (QEMU and the specification disagree on their layout)"
                ),
            ));
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(bytes.get(40..56).unwrap_or(&[0; 16]));
        let name_units: Vec<u16> = bytes
            .get(64..576)
            .unwrap_or(&[])
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let parent_name = String::from_utf16_lossy(&name_units);
        let locators = (0..LOCATORS)
            .map(|i| {
                let base = 576 + 24 * i;
                let mut platform = [0u8; 4];
                platform.copy_from_slice(bytes.get(base..base + 4).unwrap_or(&[0; 4]));
                Locator {
                    platform,
                    data_length: be_u32(bytes, base + 8),
                    data_offset: be_u64(bytes, base + 16),
                }
            })
            .filter(|l| l.platform != [0; 4])
            .collect();
        Ok(DynamicHeader {
            table_offset: be_u64(bytes, 16),
            max_table_entries: be_u32(bytes, 28),
            block_size,
            parent_unique_id,
            parent_name,
            locators,
        })
    }

    /// Bytes of the sector bitmap in front of each block: one bit per sector,
    /// padded to whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        // One bit per sector, in whole sectors.
        (u64::from(self.block_size) / SECTOR_SIZE)
            .div_ceil(8)
            .div_ceil(SECTOR_SIZE)
            * SECTOR_SIZE
    }

    /// Bytes the BAT occupies.
    pub fn bat_bytes(&self) -> u64 {
        u64::from(self.max_table_entries) * 4
    }
}

/// Whether sector `sector` of a block is present in `bitmap`.
pub fn bit(bitmap: &[u8], sector: u64) -> bool {
    usize::try_from(sector / 8)
        .ok()
        .and_then(|i| bitmap.get(i))
        .is_some_and(|byte| byte & (0x80 >> (sector % 8)) != 0)
}

/// How many sectors from `first` (below `limit`) share `first`'s bit.
pub fn run_length(bitmap: &[u8], first: u64, limit: u64) -> u64 {
    let value = bit(bitmap, first);
    let mut end = first + 1;
    while end < limit {
        // Whole bytes at a time where the run covers them.
        if end % 8 == 0 && end + 8 <= limit {
            let byte = usize::try_from(end / 8)
                .ok()
                .and_then(|i| bitmap.get(i))
                .copied()
                .unwrap_or(0);
            if byte == if value { 0xff } else { 0 } {
                end += 8;
                continue;
            }
        }
        if bit(bitmap, end) != value {
            break;
        }
        end += 1;
    }
    end - first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs() {
        let mut bitmap = vec![0xffu8; 4];
        bitmap[2] = 0b1110_0000;
        assert!(bit(&bitmap, 0));
        assert_eq!(run_length(&bitmap, 0, 32), 19);
        assert!(!bit(&bitmap, 19));
        assert_eq!(run_length(&bitmap, 19, 32), 5);
        assert_eq!(run_length(&bitmap, 24, 32), 8);
        assert_eq!(run_length(&bitmap, 3, 10), 7);
    }

    #[test]
    fn bitmap_size_is_whole_sectors() {
        let mut h = DynamicHeader {
            table_offset: 0,
            max_table_entries: 0,
            block_size: 2 << 20,
            parent_unique_id: [0; 16],
            parent_name: String::new(),
            locators: Vec::new(),
        };
        assert_eq!(h.bitmap_size(), 512);
        h.block_size = MIN_BLOCK_SIZE;
        assert_eq!(h.bitmap_size(), 512);
        h.block_size = 1 << 31;
        assert_eq!(h.bitmap_size(), 512 << 10);
    }
}
