//! The VDI header: VirtualBox's little-endian pre-header (a 64-byte text, the
//! signature at 64, the version at 68) and the version 1.1 header that follows
//! (its size at 72, then image type, flags, a 256-byte description, the block
//! map and data offsets at 340 and 344, the legacy geometry with the sector
//! size at 360, the disk size at 368, block size, extra bytes per block,
//! blocks in the image and blocks allocated at 376..392, then the image,
//! last-snapshot, link and parent UUIDs at 392..456).

use crate::driver::{MAX_TABLE_BYTES, SECTOR_SIZE};
use crate::error::{Error, Result};
use std::path::Path;

/// Bytes of the header read (QEMU reads and writes one sector).
pub const HEADER_READ: usize = 512;

/// The signature at offset 64.
pub const SIGNATURE: u32 = 0xbeda_107f;

/// Version 1.1, the only one QEMU and VirtualBox write.
pub const VERSION_1_1: u32 = 0x0001_0001;

/// The smallest header size holding every field read here (QEMU writes it;
/// VirtualBox writes 0x190, with the logical geometry after the UUIDs).
pub const MIN_HEADER_SIZE: u32 = 0x180;

/// Bytes before the header proper: text, signature, version.
pub const PRE_HEADER: u64 = 72;

/// Image types.
pub const TYPE_DYNAMIC: u32 = 1;
/// Every block allocated at creation.
pub const TYPE_STATIC: u32 = 2;

/// The only block size QEMU and VirtualBox use (QEMU refuses any other).
pub const BLOCK_SIZE: u32 = 1 << 20;

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes of the header after the pre-header.
    pub header_size: u32,
    /// Dynamic or static.
    pub image_type: u32,
    /// Where the block map starts.
    pub offset_bmap: u64,
    /// Where data block 0 starts.
    pub offset_data: u64,
    /// The disk size, rounded up to whole sectors as QEMU does.
    pub disk_size: u64,
    /// The disk size as stored.
    pub stored_disk_size: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// Entries in the block map.
    pub blocks_in_image: u32,
    /// Data blocks in use, as the header counts them.
    pub blocks_allocated: u32,
    /// The image's UUID.
    pub uuid_image: [u8; 16],
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

impl Header {
    /// Parse and check the header at the start of `bytes` (the first
    /// [`HEADER_READ`] bytes of a file of `file_len` bytes).
    pub fn parse(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header> {
        let raw = Raw { path, bytes };
        if bytes.len() < HEADER_READ {
            return Err(raw.corrupt(format!(
                "file is {file_len} bytes, too short to hold a VDI header ({HEADER_READ} bytes)"
            )));
        }
        let (header_size, image_type) = raw.identity()?;
        let (offset_bmap, offset_data) = raw.offsets(header_size)?;
        let block_size = raw.units()?;
        let (blocks_in_image, blocks_allocated) = raw.block_counts()?;
        let bmap_bytes = u64::from(blocks_in_image) * 4;
        let stored_disk_size = le_u64(bytes, 368);
        // VBoxManage convertfromraw can leave a size that is not whole
        // sectors: QEMU rounds it up, and so do we.
        let disk_size = stored_disk_size
            .div_ceil(SECTOR_SIZE)
            .saturating_mul(SECTOR_SIZE);
        let room = u64::from(blocks_in_image) * u64::from(block_size);
        if disk_size > room {
            return Err(raw.corrupt(format!(
                "disk_size is {stored_disk_size}, but the block map's {blocks_in_image} blocks hold only {room} bytes"
            )));
        }
        raw.refuse_differencing()?;
        let bmap_end = offset_bmap + bmap_bytes;
        if bmap_end > file_len {
            return Err(raw.corrupt(format!(
                "block map at {offset_bmap:#x} ({bmap_bytes} bytes) lies past the end of the file (size {file_len:#x})"
            )));
        }
        if blocks_allocated > 0 && offset_data < bmap_end {
            return Err(raw.corrupt(format!(
                "offset_data is {offset_data:#x}, inside the block map ({offset_bmap:#x}..{bmap_end:#x})"
            )));
        }
        let mut uuid_image = [0u8; 16];
        uuid_image.copy_from_slice(bytes.get(392..408).unwrap_or(&[0; 16]));
        Ok(Header {
            header_size,
            image_type,
            offset_bmap,
            offset_data,
            disk_size,
            stored_disk_size,
            block_size,
            blocks_in_image,
            blocks_allocated,
            uuid_image,
        })
    }
}

/// The header's bytes (at least [`HEADER_READ`] of them), being checked.
struct Raw<'a> {
    path: &'a Path,
    bytes: &'a [u8],
}

impl Raw<'_> {
    fn corrupt(&self, msg: String) -> Error {
        Error::corrupt(self.path, format!("vdi: {msg}"))
    }

    fn unsupported(&self, msg: String) -> Error {
        Error::format(self.path, format!("vdi: {msg}"))
    }

    /// The signature, the version (1.1), the header size and the image type
    /// (dynamic or static): `(header_size, image_type)`.
    fn identity(&self) -> Result<(u32, u32)> {
        let signature = le_u32(self.bytes, 64);
        if signature != SIGNATURE {
            return Err(self.unsupported(format!(
                "signature is {signature:#010x}, not {SIGNATURE:#010x}: not a VDI image"
            )));
        }
        let version = le_u32(self.bytes, 68);
        if version != VERSION_1_1 {
            return Err(self.unsupported(format!(
                "version is {}.{}; only version 1.1 is supported",
                version >> 16,
                version & 0xffff
            )));
        }
        let header_size = le_u32(self.bytes, 72);
        if header_size < MIN_HEADER_SIZE {
            return Err(self.corrupt(format!(
                "header_size is {header_size:#x}, smaller than the {MIN_HEADER_SIZE:#x} bytes of a version 1.1 header"
            )));
        }
        let image_type = le_u32(self.bytes, 76);
        match image_type {
            TYPE_DYNAMIC | TYPE_STATIC => Ok((header_size, image_type)),
            3 | 4 => Err(self.unsupported(format!(
                "image type is {image_type} ({}); only dynamic (1) and static (2) images are supported",
                if image_type == 3 { "undo" } else { "differencing" }
            ))),
            _ => Err(self.unsupported(format!(
                "image type is {image_type}; only dynamic (1) and static (2) images are defined"
            ))),
        }
    }

    /// The block map's and the data's offsets: whole sectors, the block map
    /// past the header.
    fn offsets(&self, header_size: u32) -> Result<(u64, u64)> {
        let offset_bmap = u64::from(le_u32(self.bytes, 340));
        let offset_data = u64::from(le_u32(self.bytes, 344));
        for (name, value) in [("offset_bmap", offset_bmap), ("offset_data", offset_data)] {
            if value % SECTOR_SIZE != 0 {
                return Err(self.unsupported(format!(
                    "{name} is {value:#x}, not a multiple of {SECTOR_SIZE} (unsupported, as in QEMU)"
                )));
            }
        }
        let header_end = PRE_HEADER + u64::from(header_size);
        if offset_bmap < header_end {
            return Err(self.corrupt(format!(
                "offset_bmap is {offset_bmap:#x}, inside the header (which ends at {header_end:#x})"
            )));
        }
        Ok((offset_bmap, offset_data))
    }

    /// The sector size, the block size and the extra block bytes, each the
    /// one value QEMU reads. Returns the block size.
    fn units(&self) -> Result<u32> {
        let sector_size = le_u32(self.bytes, 360);
        if u64::from(sector_size) != SECTOR_SIZE {
            return Err(self.unsupported(format!(
                "sector_size is {sector_size}; only {SECTOR_SIZE} is supported"
            )));
        }
        let block_size = le_u32(self.bytes, 376);
        if block_size != BLOCK_SIZE {
            return Err(self.unsupported(format!(
                "block_size is {block_size}; only {BLOCK_SIZE} (1 MiB) is supported, as in QEMU"
            )));
        }
        let block_extra = le_u32(self.bytes, 380);
        if block_extra != 0 {
            return Err(self.unsupported(format!(
                "block_extra is {block_extra}; only 0 is supported (QEMU would misread such an image)"
            )));
        }
        Ok(block_size)
    }

    /// The blocks in the image (a block map within the table cap) and those
    /// allocated (no more than that).
    fn block_counts(&self) -> Result<(u32, u32)> {
        let blocks_in_image = le_u32(self.bytes, 384);
        let blocks_allocated = le_u32(self.bytes, 388);
        let bmap_bytes = u64::from(blocks_in_image) * 4;
        if bmap_bytes > MAX_TABLE_BYTES {
            return Err(self.corrupt(format!(
                "blocks_in_image is {blocks_in_image}, a block map of {bmap_bytes} bytes (the limit is {MAX_TABLE_BYTES})"
            )));
        }
        if blocks_allocated > blocks_in_image {
            return Err(self.corrupt(format!(
                "blocks_allocated is {blocks_allocated}, more than blocks_in_image ({blocks_in_image})"
            )));
        }
        Ok((blocks_in_image, blocks_allocated))
    }

    /// A differencing image (a link or parent UUID) is refused.
    fn refuse_differencing(&self) -> Result<()> {
        for (name, at) in [("link", 424), ("parent", 440)] {
            if self
                .bytes
                .get(at..at + 16)
                .is_some_and(|u| u.iter().any(|&b| b != 0))
            {
                return Err(self.unsupported(format!(
                    "the {name} UUID is set: differencing VDI images are not supported"
                )));
            }
        }
        Ok(())
    }
}
