//! The sparse extent header (VMware's `SparseExtentHeader`, magic "KDMV"): its
//! layout, and every check we make before trusting a field. Layout from VMware's
//! "Virtual Disk Format 5.0" specification; all fields are little-endian and
//! offsets and sizes count 512-byte sectors.
//!
//! ```text
//!   0  magic "KDMV"          4  version            8  flags
//!  12  capacity (u64)       20  grainSize (u64)   28  descriptorOffset (u64)
//!  36  descriptorSize (u64) 44  numGTEsPerGT (u32) 48 rgdOffset (u64)
//!  56  gdOffset (u64)       64  overHead (u64)    72  uncleanShutdown (u8)
//!  73  "\n", " ", "\r", "\n" (newline check bytes) 77  compressAlgorithm (u16)
//! ```

use crate::driver::{MAX_TABLE_BYTES, SECTOR_SIZE};
use crate::error::{Error, Result};
use std::path::Path;

/// The magic of a hosted sparse extent, as it appears in the file.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// The magic of ESX's older sparse format (vmfsSparse, "COWD"), which we refuse.
pub const COWD_MAGIC: &[u8; 4] = b"COWD";
/// Bytes of the header (one sector).
pub const HEADER_BYTES: usize = SECTOR_SIZE as usize;

/// The newline check bytes are valid (bit 0).
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// A redundant grain directory and grain tables exist (bit 1).
pub const FLAG_RGD: u32 = 1 << 1;
/// Grain table entry 1 means "this grain reads as zeros" (bit 2).
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Grains are compressed (bit 16).
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// The file carries markers: grain markers before compressed grains (bit 17).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` of a stream-optimized file whose grain directory follows the
/// grains: the footer (a second header at the end of the file) has the real one.
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm`: grains are zlib streams (RFC 1950).
pub const COMPRESSION_DEFLATE: u16 = 1;

/// The largest grain we read: 1 MiB. The specification's grains are 4 KiB to
/// 64 KiB; QEMU accepts up to 1 GiB, but a compressed grain needs buffers of
/// twice its size per thread.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// The most grain table entries per grain table (the specification says 512,
/// and QEMU refuses more).
pub const MAX_GTES_PER_GT: u32 = 512;
/// The largest descriptor we read (QEMU reads at most 1 MiB too).
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// The header's fields as stored, before any check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    /// `version`.
    pub version: u32,
    /// `flags`.
    pub flags: u32,
    /// `capacity`, in sectors.
    pub capacity: u64,
    /// `grainSize`, in sectors.
    pub grain_size: u64,
    /// `descriptorOffset`, in sectors.
    pub descriptor_offset: u64,
    /// `descriptorSize`, in sectors.
    pub descriptor_size: u64,
    /// `numGTEsPerGT`.
    pub gtes_per_gt: u32,
    /// `rgdOffset`, in sectors.
    pub rgd_offset: u64,
    /// `gdOffset`, in sectors (or [`GD_AT_END`]).
    pub gd_offset: u64,
    /// `overHead`, in sectors: the metadata area at the start of the file.
    pub overhead: u64,
    /// `uncleanShutdown`.
    pub unclean_shutdown: u8,
    /// The four newline check bytes.
    pub check_bytes: [u8; 4],
    /// `compressAlgorithm`.
    pub compress_algorithm: u16,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decode a header from its sector (which starts with the magic). `None` if
/// `bytes` is too short to hold one or the magic is not "KDMV".
pub fn decode(bytes: &[u8]) -> Option<RawHeader> {
    if bytes.get(..4)? != MAGIC {
        return None;
    }
    Some(RawHeader {
        version: le_u32(bytes, 4)?,
        flags: le_u32(bytes, 8)?,
        capacity: le_u64(bytes, 12)?,
        grain_size: le_u64(bytes, 20)?,
        descriptor_offset: le_u64(bytes, 28)?,
        descriptor_size: le_u64(bytes, 36)?,
        gtes_per_gt: le_u32(bytes, 44)?,
        rgd_offset: le_u64(bytes, 48)?,
        gd_offset: le_u64(bytes, 56)?,
        overhead: le_u64(bytes, 64)?,
        unclean_shutdown: *bytes.get(72)?,
        check_bytes: bytes.get(73..77)?.try_into().ok()?,
        compress_algorithm: le_u16(bytes, 77)?,
    })
}

/// The checked header of one sparse extent (after the footer replaced it, for
/// stream-optimized files with the grain directory at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1, 2 or 3.
    pub version: u32,
    /// The flags as stored.
    pub flags: u32,
    /// The extent's size in sectors (at least 1).
    pub capacity: u64,
    /// Sectors per grain: a power of two, 1 to [`MAX_GRAIN_SECTORS`].
    pub grain_sectors: u64,
    /// The embedded descriptor's byte offset and length, if there is one.
    pub descriptor: Option<(u64, u64)>,
    /// Entries per grain table, 1 to [`MAX_GTES_PER_GT`].
    pub gtes_per_gt: u32,
    /// Byte offset of the grain directory.
    pub gd_offset: u64,
    /// Byte offset of the redundant grain directory, when the flags say there
    /// is one. Reads never use it (nor does QEMU); we check that it fits.
    pub rgd_offset: Option<u64>,
    /// Sectors of metadata at the start of the file; grains lie after it.
    pub overhead: u64,
    /// Grains are zlib streams behind grain markers.
    pub compressed: bool,
    /// Grain table entry 1 means a zero grain.
    pub zeroed_grain: bool,
    /// The writer did not close the file cleanly.
    pub unclean_shutdown: bool,
}

impl Header {
    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR_SIZE
    }

    /// The extent's size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE
    }

    /// Guest bytes one grain table maps.
    pub fn gt_span(&self) -> u64 {
        u64::from(self.gtes_per_gt) * self.grain_bytes()
    }

    /// Bytes of one grain table (4-byte entries).
    pub fn gt_bytes(&self) -> u64 {
        u64::from(self.gtes_per_gt) * 4
    }

    /// Entries in the grain directory: one per grain table the capacity needs.
    pub fn gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(u64::from(self.gtes_per_gt) * self.grain_sectors)
    }

    /// Bytes of the grain directory (4-byte entries).
    pub fn gd_bytes(&self) -> u64 {
        self.gd_entries() * 4
    }
}

/// Check every field of `raw`, the header (`what`: "header" or "footer") of
/// the sparse extent `path`, a file of `file_len` bytes. Unsupported features
/// are `Format` errors; impossible values are `Corrupt`.
pub fn check(path: &Path, what: &str, raw: &RawHeader, file_len: u64) -> Result<Header> {
    let corrupt = |m: String| Error::corrupt(path, format!("vmdk: {what}: {m}"));
    let unsupported = |m: String| Error::format(path, format!("vmdk: {what}: {m}"));
    let compressed = check_encoding(raw, &corrupt, &unsupported)?;
    check_geometry(raw, file_len, &corrupt, &unsupported)?;
    let descriptor = descriptor_place(raw, &corrupt)?;
    let mut header = Header {
        version: raw.version,
        flags: raw.flags,
        capacity: raw.capacity,
        grain_sectors: raw.grain_size,
        descriptor,
        gtes_per_gt: raw.gtes_per_gt,
        gd_offset: 0,
        rgd_offset: None,
        overhead: raw.overhead,
        compressed,
        zeroed_grain: raw.flags & FLAG_ZERO_GRAIN != 0,
        unclean_shutdown: raw.unclean_shutdown != 0,
    };
    place_grain_directories(&mut header, raw, file_len, &corrupt)?;
    if let Some((at, len)) = header.descriptor {
        check_fits(&corrupt, "embedded descriptor", at, len, file_len)?;
    }
    Ok(header)
}

/// The version, the compression and the flags that go with it, and the
/// newline check bytes. Returns whether grains are compressed.
fn check_encoding(
    raw: &RawHeader,
    corrupt: &impl Fn(String) -> Error,
    unsupported: &impl Fn(String) -> Error,
) -> Result<bool> {
    if !(1..=3).contains(&raw.version) {
        return Err(unsupported(format!(
            "version is {} (supported: 1 to 3)",
            raw.version
        )));
    }
    let compressed = match raw.compress_algorithm {
        0 => false,
        COMPRESSION_DEFLATE => true,
        other => {
            return Err(unsupported(format!(
                "compressAlgorithm is {other} (supported: 0, none, and 1, deflate)"
            )))
        }
    };
    if compressed != (raw.flags & FLAG_COMPRESSED != 0) {
        return Err(corrupt(format!(
            "compressAlgorithm is {} but the compressed-grains flag (bit 16) is {} (flags {:#x})",
            raw.compress_algorithm,
            if compressed { "clear" } else { "set" },
            raw.flags
        )));
    }
    if compressed && raw.flags & FLAG_MARKERS == 0 {
        return Err(unsupported(format!(
            "grains are compressed but the markers flag (bit 17) is clear (flags {:#x}); \
             compressed grains without grain markers are not supported",
            raw.flags
        )));
    }
    if raw.flags & FLAG_NL_DETECT != 0 && raw.check_bytes != *b"\n \r\n" {
        return Err(corrupt(format!(
            "the newline check bytes are {:02x?}, not 0a 20 0d 0a: the file was damaged by a \
             text-mode (ASCII) transfer",
            raw.check_bytes
        )));
    }
    Ok(compressed)
}

/// The grain size, the grain table size, the capacity and the overhead.
fn check_geometry(
    raw: &RawHeader,
    file_len: u64,
    corrupt: &impl Fn(String) -> Error,
    unsupported: &impl Fn(String) -> Error,
) -> Result<()> {
    if raw.grain_size == 0 || !raw.grain_size.is_power_of_two() {
        return Err(corrupt(format!(
            "grainSize is {} sectors; it must be a power of two",
            raw.grain_size
        )));
    }
    if raw.grain_size > MAX_GRAIN_SECTORS {
        return Err(unsupported(format!(
            "grainSize is {} sectors, larger than the {MAX_GRAIN_SECTORS} sectors (1 MiB) we read",
            raw.grain_size
        )));
    }
    if raw.gtes_per_gt == 0 || raw.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(corrupt(format!(
            "numGTEsPerGT is {}; it must be 1 to {MAX_GTES_PER_GT}",
            raw.gtes_per_gt
        )));
    }
    if raw.capacity == 0 {
        return Err(corrupt("capacity is 0 sectors".to_string()));
    }
    if raw.capacity > u64::MAX / SECTOR_SIZE {
        return Err(corrupt(format!(
            "capacity is {} sectors, more bytes than 64 bits can count",
            raw.capacity
        )));
    }
    let overhead_bytes = raw.overhead.saturating_mul(SECTOR_SIZE);
    if overhead_bytes > file_len {
        return Err(corrupt(format!(
            "overHead is {} sectors, but the file is only {file_len} bytes long (truncated?)",
            raw.overhead
        )));
    }
    Ok(())
}

/// Where the embedded descriptor is, and its length, if there is one.
fn descriptor_place(
    raw: &RawHeader,
    corrupt: &impl Fn(String) -> Error,
) -> Result<Option<(u64, u64)>> {
    let offset = match raw.descriptor_offset {
        0 => return Ok(None),
        offset => offset,
    };
    if raw.descriptor_size == 0 || raw.descriptor_size > MAX_DESCRIPTOR_BYTES / SECTOR_SIZE {
        return Err(corrupt(format!(
            "descriptorSize is {} sectors; it must be 1 to {}",
            raw.descriptor_size,
            MAX_DESCRIPTOR_BYTES / SECTOR_SIZE
        )));
    }
    let at = table_place(
        corrupt,
        "descriptor",
        offset,
        raw.descriptor_size * SECTOR_SIZE,
    )?;
    Ok(Some((at, raw.descriptor_size * SECTOR_SIZE)))
}

/// Place the grain directory (and the redundant one, if the flags say so)
/// in the file, within the table cap.
fn place_grain_directories(
    header: &mut Header,
    raw: &RawHeader,
    file_len: u64,
    corrupt: &impl Fn(String) -> Error,
) -> Result<()> {
    let gd_bytes = header.gd_bytes();
    if gd_bytes > MAX_TABLE_BYTES {
        return Err(corrupt(format!(
            "capacity of {} sectors with {} grain table entries of {} sectors needs a grain \
             directory of {gd_bytes} bytes (the limit is {MAX_TABLE_BYTES})",
            raw.capacity, raw.gtes_per_gt, raw.grain_size
        )));
    }
    let gd_offset = table_place(corrupt, "grain directory", raw.gd_offset, gd_bytes)?;
    check_fits(corrupt, "grain directory", gd_offset, gd_bytes, file_len)?;
    header.gd_offset = gd_offset;
    if raw.flags & FLAG_RGD != 0 && raw.rgd_offset != 0 {
        let what = "redundant grain directory";
        let rgd = table_place(corrupt, what, raw.rgd_offset, gd_bytes)?;
        check_fits(corrupt, what, rgd, gd_bytes, file_len)?;
        header.rgd_offset = Some(rgd);
    }
    Ok(())
}

/// The byte offset of a table stored at sector `sector`: never sector 0 (the
/// header) nor the end-of-file placeholder.
fn table_place(
    corrupt: &impl Fn(String) -> Error,
    what: &str,
    sector: u64,
    bytes: u64,
) -> Result<u64> {
    if sector == 0 {
        return Err(corrupt(format!(
            "the {what} is at sector 0, on top of the header"
        )));
    }
    match sector.checked_mul(SECTOR_SIZE) {
        Some(at) if at.checked_add(bytes).is_some() && sector != GD_AT_END => Ok(at),
        _ => Err(corrupt(format!(
            "the {what} offset is sector {sector:#x}, past any file"
        ))),
    }
}

fn check_fits(
    corrupt: &impl Fn(String) -> Error,
    what: &str,
    at: u64,
    bytes: u64,
    file_len: u64,
) -> Result<()> {
    if at.saturating_add(bytes) > file_len {
        return Err(corrupt(format!(
            "the {what} at {at:#x} ({bytes} bytes) lies past the end of the file (size {file_len:#x})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header `qemu-img create -f vmdk x.vmdk 5G` writes.
    fn qemu_header() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        b[12..20].copy_from_slice(&10_485_760u64.to_le_bytes());
        b[20..28].copy_from_slice(&128u64.to_le_bytes());
        b[28..36].copy_from_slice(&1u64.to_le_bytes());
        b[36..44].copy_from_slice(&20u64.to_le_bytes());
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        b[48..56].copy_from_slice(&21u64.to_le_bytes());
        b[56..64].copy_from_slice(&0x297u64.to_le_bytes());
        b[64..72].copy_from_slice(&0x580u64.to_le_bytes());
        b[73..77].copy_from_slice(b"\n \r\n");
        b
    }

    #[test]
    fn qemu_header_checks_out() {
        let raw = decode(&qemu_header()).unwrap();
        let h = check(Path::new("x.vmdk"), "header", &raw, 0x580 * 512).unwrap();
        assert_eq!(h.grain_bytes(), 65536);
        assert_eq!(h.gd_entries(), 160);
        assert_eq!(h.gd_offset, 0x297 * 512);
        assert_eq!(h.rgd_offset, Some(21 * 512));
        assert_eq!(h.descriptor, Some((512, 20 * 512)));
        assert!(!h.compressed && !h.zeroed_grain);
    }

    #[test]
    fn bad_fields_are_named() {
        let base = decode(&qemu_header()).unwrap();
        let cases: Vec<(RawHeader, &str)> = vec![
            (RawHeader { version: 4, ..base }, "version is 4"),
            (
                RawHeader {
                    grain_size: 3,
                    ..base
                },
                "grainSize is 3",
            ),
            (
                RawHeader {
                    grain_size: 4096,
                    ..base
                },
                "grainSize is 4096",
            ),
            (
                RawHeader {
                    gtes_per_gt: 513,
                    ..base
                },
                "numGTEsPerGT is 513",
            ),
            (
                RawHeader {
                    capacity: 0,
                    ..base
                },
                "capacity is 0",
            ),
            (
                RawHeader {
                    capacity: u64::MAX,
                    ..base
                },
                "capacity is",
            ),
            (
                RawHeader {
                    gd_offset: 0,
                    ..base
                },
                "grain directory is at sector 0",
            ),
            (
                RawHeader {
                    gd_offset: 1 << 40,
                    ..base
                },
                "past the end of the file",
            ),
            (
                RawHeader {
                    gd_offset: u64::MAX,
                    ..base
                },
                "past any file",
            ),
            (
                RawHeader {
                    compress_algorithm: 2,
                    ..base
                },
                "compressAlgorithm is 2",
            ),
            (
                RawHeader {
                    compress_algorithm: 1,
                    ..base
                },
                "compressed-grains flag",
            ),
            (
                RawHeader {
                    check_bytes: *b"\n \n\n",
                    ..base
                },
                "text-mode",
            ),
            (
                RawHeader {
                    overhead: 1 << 50,
                    ..base
                },
                "overHead is",
            ),
            (
                RawHeader {
                    descriptor_size: 4096,
                    ..base
                },
                "descriptorSize is 4096",
            ),
        ];
        for (raw, want) in cases {
            let err = check(Path::new("x.vmdk"), "header", &raw, 0x580 * 512)
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }
}
