//! The VHD hard disk footer: 512 big-endian bytes at the end of every VHD
//! file, with a copy at offset 0 in dynamic and differencing disks. It gives
//! the disk type, the disk size (two ways: CHS geometry and current size) and,
//! for sparse disks, where the dynamic disk header is.
//!
//! Layout (Microsoft's "Virtual Hard Disk Image Format Specification"):
//! cookie `conectix` (0), features (8), format version (12), data offset (16),
//! time stamp (24), creator application (28), creator version (32), creator
//! host OS (36), original size (40), current size (48), disk geometry:
//! cylinders u16, heads u8, sectors per track u8 (56), disk type (60),
//! checksum (64), unique id (68, 16 bytes), saved state (84), reserved to 512.

use crate::driver::SECTOR_SIZE;
use crate::error::{Error, Result};
use std::path::Path;

/// Bytes in a footer (and in its copy).
pub const FOOTER_SIZE: usize = 512;

/// The footer's cookie.
pub const COOKIE: &[u8; 8] = b"conectix";

/// Disk types (footer offset 60).
pub const TYPE_FIXED: u32 = 2;
/// A sparse disk: a dynamic disk header, a BAT and blocks with sector bitmaps.
pub const TYPE_DYNAMIC: u32 = 3;
/// A sparse disk whose unwritten sectors read from a parent disk.
pub const TYPE_DIFFERENCING: u32 = 4;

/// The largest disk QEMU opens: 2040 GiB, in sectors.
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// The CHS geometry that means "too big for CHS": its size is the current size.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;

/// Creator applications whose images size the disk by its CHS geometry (Virtual
/// PC, and QEMU without `force_size`); every other creator (Hyper-V `win `,
/// QEMU with `force_size` `qem2`, Azure `wa\0\0`, disk2vhd, XenServer...)
/// stores the exact size in the current-size field. This is QEMU 10's rule.
const CHS_CREATORS: [&[u8; 4]; 2] = [b"vpc ", b"qemu"];

/// A parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Format version (0x00010000 for 1.0).
    pub version: u32,
    /// Offset of the dynamic disk header (all ones in fixed disks).
    pub data_offset: u64,
    /// The application that made the image (`qemu`, `qem2`, `win `, `vpc `...).
    pub creator_app: [u8; 4],
    /// The disk size in bytes, as the creator wrote it.
    pub current_size: u64,
    /// Cylinders, heads and sectors per track.
    pub geometry: (u16, u8, u8),
    /// Fixed, dynamic or differencing.
    pub disk_type: u32,
    /// The disk's identity; a differencing child names its parent's.
    pub unique_id: [u8; 16],
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_be_bytes)
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// The VHD checksum of `bytes`: the one's complement of the byte sum, with the
/// four bytes at `checksum_at` (the checksum field itself) counted as zeros.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

/// Whether `bytes` is a footer whose checksum is right. Used by the probe, so
/// that a raw disk whose last sector merely starts with `conectix` stays raw.
pub fn is_valid(bytes: &[u8]) -> bool {
    bytes.len() == FOOTER_SIZE
        && bytes.starts_with(COOKIE)
        && checksum(bytes, 64) == be_u32(bytes, 64)
}

/// A printable form of a four-byte tag (`qemu`, `wa\0\0` as `wa\x00\x00`).
pub fn tag(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

impl Footer {
    /// Parse and check the footer read at `at` (for messages) of `path`.
    pub fn parse(path: &Path, bytes: &[u8], at: u64) -> Result<Footer> {
        let corrupt = |msg: String| Error::corrupt(path, format!("vpc: footer at {at:#x}: {msg}"));
        if bytes.len() != FOOTER_SIZE {
            return Err(corrupt(format!(
                "only {} bytes, a footer is {FOOTER_SIZE}",
                bytes.len()
            )));
        }
        if !bytes.starts_with(COOKIE) {
            return Err(Error::format(
                path,
                format!("vpc: no VHD footer (cookie 'conectix') at {at:#x}: not a VHD image"),
            ));
        }
        let stored = be_u32(bytes, 64);
        let computed = checksum(bytes, 64);
        if stored != computed {
            return Err(corrupt(format!(
                "checksum is {stored:#010x}, but the footer sums to {computed:#010x}"
            )));
        }
        let version = be_u32(bytes, 12);
        if version >> 16 != 1 {
            return Err(Error::format(
                path,
                format!(
                    "vpc: footer at {at:#x}: format version is {}.{}; only major version 1 is supported",
                    version >> 16,
                    version & 0xffff
                ),
            ));
        }
        let disk_type = be_u32(bytes, 60);
        if !matches!(disk_type, TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING) {
            return Err(Error::format(
                path,
                format!(
                    "vpc: footer at {at:#x}: disk type is {disk_type}; only 2 (fixed), 3 (dynamic) and 4 (differencing) are defined"
                ),
            ));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(bytes.get(28..32).unwrap_or(&[0; 4]));
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(bytes.get(68..84).unwrap_or(&[0; 16]));
        Ok(Footer {
            version,
            data_offset: be_u64(bytes, 16),
            creator_app,
            current_size: be_u64(bytes, 48),
            geometry: (
                be_u16(bytes, 56),
                bytes.get(58).copied().unwrap_or(0),
                bytes.get(59).copied().unwrap_or(0),
            ),
            disk_type,
            unique_id,
        })
    }

    /// Sectors the CHS geometry describes.
    pub fn chs_sectors(&self) -> u64 {
        let (c, h, s) = self.geometry;
        u64::from(c) * u64::from(h) * u64::from(s)
    }

    /// Whether the disk size comes from the CHS geometry rather than the
    /// current size (see [`CHS_CREATORS`]).
    pub fn sized_by_geometry(&self) -> bool {
        CHS_CREATORS.contains(&&self.creator_app) && self.chs_sectors() != MAX_GEOMETRY
    }

    /// The virtual disk size in bytes, by QEMU's rule: the CHS geometry for
    /// images Virtual PC or QEMU (without `force_size`) made, unless the
    /// geometry is the maximum one; otherwise the current size, rounded down to
    /// whole sectors. Disks over 2040 GiB are refused, as QEMU refuses them.
    pub fn disk_size(&self, path: &Path) -> Result<u64> {
        let sectors = if self.sized_by_geometry() {
            self.chs_sectors()
        } else {
            self.current_size / SECTOR_SIZE
        };
        if sectors > MAX_SECTORS {
            let (c, h, s) = self.geometry;
            let source = if self.sized_by_geometry() {
                format!("geometry {c}/{h}/{s}")
            } else {
                format!("current size {}", self.current_size)
            };
            return Err(Error::format(
                path,
                format!(
                    "vpc: disk size ({source}) is {sectors} sectors, more than the 2040 GiB ({MAX_SECTORS} sectors) VHD allows"
                ),
            ));
        }
        Ok(sectors * SECTOR_SIZE)
    }

    /// The fields on which reading depends, named, to compare a footer with its
    /// copy.
    pub fn first_difference(&self, other: &Footer) -> Option<&'static str> {
        if self.disk_type != other.disk_type {
            Some("disk type")
        } else if self.data_offset != other.data_offset {
            Some("data offset")
        } else if self.current_size != other.current_size {
            Some("current size")
        } else if self.geometry != other.geometry {
            Some("disk geometry")
        } else if self.creator_app != other.creator_app {
            Some("creator application")
        } else if self.unique_id != other.unique_id {
            Some("unique id")
        } else {
            None
        }
    }

    /// The disk type's name.
    pub fn type_name(&self) -> &'static str {
        match self.disk_type {
            TYPE_FIXED => "fixed",
            TYPE_DYNAMIC => "dynamic",
            _ => "differencing",
        }
    }
}

/// A UUID as text.
pub fn uuid_string(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or(""),
        hex.get(8..12).unwrap_or(""),
        hex.get(12..16).unwrap_or(""),
        hex.get(16..20).unwrap_or(""),
        hex.get(20..32).unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer(app: &[u8; 4], size: u64, geometry: (u16, u8, u8)) -> Vec<u8> {
        let mut b = vec![0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[16..24].copy_from_slice(&512u64.to_be_bytes());
        b[28..32].copy_from_slice(app);
        b[48..56].copy_from_slice(&size.to_be_bytes());
        b[56..58].copy_from_slice(&geometry.0.to_be_bytes());
        b[58] = geometry.1;
        b[59] = geometry.2;
        b[60..64].copy_from_slice(&TYPE_DYNAMIC.to_be_bytes());
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    #[test]
    fn size_rule_follows_the_creator() {
        let p = Path::new("t.vhd");
        let chs = (20, 16, 63); // 20160 sectors
        for (app, want) in [
            (b"qemu", 20160 * 512),
            (b"vpc ", 20160 * 512),
            (b"qem2", 10 << 20),
            (b"win ", 10 << 20),
            (b"wa\0\0", 10 << 20),
        ] {
            let f = Footer::parse(p, &footer(app, 10 << 20, chs), 0).unwrap();
            assert_eq!(f.disk_size(p).unwrap(), want, "{}", tag(app));
        }
        let f = Footer::parse(p, &footer(b"qemu", 10 << 20, (65535, 16, 255)), 0).unwrap();
        assert_eq!(f.disk_size(p).unwrap(), 10 << 20);
        let f = Footer::parse(p, &footer(b"win ", 1_000_000, chs), 0).unwrap();
        assert_eq!(f.disk_size(p).unwrap(), 999_936);
        let f = Footer::parse(p, &footer(b"win ", (MAX_SECTORS + 1) * 512, chs), 0).unwrap();
        assert!(f.disk_size(p).unwrap_err().to_string().contains("2040 GiB"));
    }

    #[test]
    fn checksum_is_checked() {
        let mut b = footer(b"qemu", 1 << 20, (1, 1, 1));
        assert!(is_valid(&b));
        b[100] = 1;
        assert!(!is_valid(&b));
        let e = Footer::parse(Path::new("t.vhd"), &b, 0).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}
