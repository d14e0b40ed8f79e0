//! The VHDX header section (MS-VHDX 2.2): the file type identifier, the two
//! headers (the current one is the valid one with the larger sequence number,
//! each checked by CRC-32C) and the region table that locates the BAT and the
//! metadata region. Every field is checked before it is trusted.

use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

/// 1 MiB: the alignment of every object in the file, and the header section's size.
pub const MIB: u64 = 1 << 20;
/// The header section: identifier, two headers, two region tables.
pub const HEADER_SECTION: u64 = MIB;
/// Where the two headers live.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes a header's checksum covers.
pub const HEADER_BYTES: usize = 4096;
/// Where the two copies of the region table live.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes a region table's checksum covers.
pub const REGION_TABLE_BYTES: usize = 64 << 10;
/// The most entries a region table may have.
pub const MAX_REGIONS: u32 = 2047;

/// A GUID as stored: Data1 (LE u32), Data2 (LE u16), Data3 (LE u16), Data4.
pub type Guid = [u8; 16];

/// Build a stored GUID from its textual parts.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// The BAT region.
pub const BAT_GUID: Guid = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// The metadata region.
pub const METADATA_GUID: Guid = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

/// A GUID as Windows writes it: `{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}`.
pub fn guid_string(g: &Guid) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    let mut s = format!("{{{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-", g[8], g[9]);
    for b in &g[10..16] {
        let _ = write!(s, "{b:02x}");
    }
    s.push('}');
    s
}

/// Little-endian fields of a byte slice; `None` past its end.
#[derive(Clone, Copy)]
pub struct Le<'a>(pub &'a [u8]);

impl Le<'_> {
    /// The bytes at `at..at + N`.
    pub fn bytes<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.0.get(at..at.checked_add(N)?)?.try_into().ok()
    }
    /// A u16 at `at`.
    pub fn u16(&self, at: usize) -> Option<u16> {
        self.bytes(at).map(u16::from_le_bytes)
    }
    /// A u32 at `at`.
    pub fn u32(&self, at: usize) -> Option<u32> {
        self.bytes(at).map(u32::from_le_bytes)
    }
    /// A u64 at `at`.
    pub fn u64(&self, at: usize) -> Option<u64> {
        self.bytes(at).map(u64::from_le_bytes)
    }

    /// The `N` bytes at `at` of a structure read whole, at a size that holds
    /// all its fields: a field past its end is a bug of ours, refused rather
    /// than read as zeros.
    pub fn field<const N: usize>(&self, at: usize) -> std::result::Result<[u8; N], PastEnd> {
        self.bytes(at).ok_or(PastEnd {
            at,
            width: N,
            len: self.0.len(),
        })
    }
    /// A u16 field at `at` (see [`Le::field`]).
    pub fn field_u16(&self, at: usize) -> std::result::Result<u16, PastEnd> {
        self.field(at).map(u16::from_le_bytes)
    }
    /// A u32 field at `at` (see [`Le::field`]).
    pub fn field_u32(&self, at: usize) -> std::result::Result<u32, PastEnd> {
        self.field(at).map(u32::from_le_bytes)
    }
    /// A u64 field at `at` (see [`Le::field`]).
    pub fn field_u64(&self, at: usize) -> std::result::Result<u64, PastEnd> {
        self.field(at).map(u64::from_le_bytes)
    }
}

/// A field taken past the end of a structure that was read whole (see
/// [`Le::field`]): an internal error.
#[derive(Debug, Clone, Copy)]
pub struct PastEnd {
    at: usize,
    width: usize,
    len: usize,
}

impl std::fmt::Display for PastEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vhdx: the {}-byte field at byte {} lies past its structure's {} bytes",
            self.width, self.at, self.len
        )
    }
}

impl PastEnd {
    /// The internal error, naming the image.
    pub fn internal(self, path: &Path) -> Error {
        Error::Internal(format!("{}: {self}", path.display()))
    }
}

impl From<PastEnd> for String {
    fn from(e: PastEnd) -> String {
        format!("internal error (please report it): {e}")
    }
}

/// CRC-32C of `buf` with the four bytes at `checksum_at` taken as zero, as
/// every VHDX checksum is computed.
pub fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let (head, rest) = buf.split_at(checksum_at.min(buf.len()));
    let tail = rest.get(4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(head);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4][..rest.len().min(4)]);
    crc32c::crc32c_append(crc, tail)
}

/// Whether `buf` carries a valid checksum at `checksum_at`; the stored and
/// computed values otherwise.
pub fn check_checksum(buf: &[u8], checksum_at: usize) -> std::result::Result<(), (u32, u32)> {
    // A buffer too short to hold the checksum has none: it matches no CRC.
    let Some(stored) = Le(buf).u32(checksum_at) else {
        return Err((0, checksum(buf, checksum_at)));
    };
    let computed = checksum(buf, checksum_at);
    if stored == computed {
        Ok(())
    } else {
        Err((stored, computed))
    }
}

/// The current header's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2: which copy is current.
    pub which: u8,
    /// Larger is newer.
    pub sequence_number: u64,
    /// Changes whenever the file is opened for writing.
    pub file_write_guid: Guid,
    /// Changes whenever the guest-visible data changes; a child's parent
    /// locator records its parent's.
    pub data_write_guid: Guid,
    /// Nonzero when the log holds entries to replay.
    pub log_guid: Guid,
    /// 0: the only log format there is.
    pub log_version: u16,
    /// Log size in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Log offset in the file (a multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Whether the log must be replayed before the file can be read.
    pub fn log_is_dirty(&self) -> bool {
        self.log_guid != [0; 16]
    }
}

/// Parse one header copy, or say why it is not valid.
fn parse_one(buf: &[u8], which: u8) -> std::result::Result<Header, String> {
    let f = Le(buf);
    if buf.get(..4) != Some(b"head".as_slice()) {
        return Err("signature is not 'head'".into());
    }
    if let Err((stored, computed)) = check_checksum(buf, 4) {
        return Err(format!(
            "checksum {stored:#010x} does not match the CRC-32C of its 4 KiB ({computed:#010x})"
        ));
    }
    let version = f.field_u16(66)?;
    if version != 1 {
        return Err(format!("Version is {version}, not 1"));
    }
    Ok(Header {
        which,
        sequence_number: f.field_u64(8)?,
        file_write_guid: f.field(16)?,
        data_write_guid: f.field(32)?,
        log_guid: f.field(48)?,
        log_version: f.field_u16(64)?,
        log_length: f.field_u32(68)?,
        log_offset: f.field_u64(72)?,
    })
}

/// Choose the current header from the two 4 KiB copies, then check its log fields.
pub fn parse_headers(path: &Path, first: &[u8], second: &[u8]) -> Result<Header> {
    let h1 = parse_one(first, 1);
    let h2 = parse_one(second, 2);
    let current = match (h1, h2) {
        (Ok(a), Err(_)) => a,
        (Err(_), Ok(b)) => b,
        (Err(e1), Err(e2)) => {
            return Err(Error::corrupt(
                path,
                format!(
                    "vhdx: no valid header: header 1 at {:#x}: {e1}; header 2 at {:#x}: {e2}",
                    HEADER_OFFSETS[0], HEADER_OFFSETS[1]
                ),
            ))
        }
        (Ok(a), Ok(b)) => {
            if a.sequence_number > b.sequence_number {
                a
            } else if b.sequence_number > a.sequence_number {
                b
            } else if (Header {
                which: 2,
                ..a.clone()
            }) == b
            {
                // Disk2VHD writes two identical headers; QEMU accepts them too.
                a
            } else {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "vhdx: both headers are valid with SequenceNumber {} but differ, so neither is current",
                        a.sequence_number
                    ),
                ));
            }
        }
    };
    let h = &current;
    let name = format!("vhdx: header {}", h.which);
    if h.log_offset < HEADER_SECTION || h.log_offset % MIB != 0 {
        return Err(Error::corrupt(
            path,
            format!(
                "{name}: LogOffset {:#x} is not a multiple of 1 MiB past the header section",
                h.log_offset
            ),
        ));
    }
    if u64::from(h.log_length) % MIB != 0 {
        return Err(Error::corrupt(
            path,
            format!(
                "{name}: LogLength {:#x} is not a multiple of 1 MiB",
                h.log_length
            ),
        ));
    }
    // The specification tolerates another LogVersion when the log is empty;
    // QEMU refuses it always, and so do we (a reader no stricter than QEMU's
    // would accept what the oracle calls broken).
    if h.log_version != 0 {
        return Err(Error::format(
            path,
            format!(
                "{name}: LogVersion is {}, a log format blkverify does not know",
                h.log_version
            ),
        ));
    }
    if h.log_is_dirty() && h.log_length == 0 {
        return Err(Error::corrupt(
            path,
            format!("{name}: LogGuid is set but LogLength is 0"),
        ));
    }
    Ok(current)
}

/// One region of the region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Region {
    /// Whether the two byte ranges share a byte.
    pub fn overlaps(&self, offset: u64, length: u64) -> bool {
        length > 0
            && self.length > 0
            && offset < self.offset.saturating_add(self.length)
            && self.offset < offset.saturating_add(length)
    }
}

/// The two regions this format defines.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    /// The block allocation table.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
    /// Which copy of the region table they came from (1 or 2).
    pub which: u8,
}

/// Why a region table copy is not usable: the fact, and whether it is a
/// refusal (a required region we do not know) rather than damage.
type RegionFault = (String, bool);

fn parse_region_table(buf: &[u8], which: u8) -> std::result::Result<Regions, RegionFault> {
    parse_region_entries(buf, which).map_err(|e| {
        let refusal = e.starts_with(UNKNOWN_REQUIRED);
        (e, refusal)
    })
}

const UNKNOWN_REQUIRED: &str = "a required region blkverify does not know";

fn parse_region_entries(buf: &[u8], which: u8) -> std::result::Result<Regions, String> {
    let f = Le(buf);
    if buf.get(..4) != Some(b"regi".as_slice()) {
        return Err("signature is not 'regi'".into());
    }
    if let Err((stored, computed)) = check_checksum(buf, 4) {
        return Err(format!(
            "checksum {stored:#010x} does not match the CRC-32C of its 64 KiB ({computed:#010x})"
        ));
    }
    let count = f.field_u32(8)?;
    if count > MAX_REGIONS {
        return Err(format!(
            "EntryCount is {count}, more than the {MAX_REGIONS} allowed"
        ));
    }
    let mut bat = None;
    let mut metadata = None;
    let mut seen: Vec<(usize, Region)> = Vec::new();
    for i in 0..count as usize {
        let at = 16 + 32 * i;
        let guid: Guid = f.field(at)?;
        let region = Region {
            offset: f.field_u64(at + 16)?,
            length: u64::from(f.field_u32(at + 24)?),
        };
        let required = f.field_u32(at + 28)? & 1 != 0;
        if region.offset < HEADER_SECTION || region.offset % MIB != 0 {
            return Err(format!(
                "entry {i} ({}): FileOffset {:#x} is not a multiple of 1 MiB past the header section",
                guid_string(&guid),
                region.offset
            ));
        }
        if region.length % MIB != 0 {
            return Err(format!(
                "entry {i} ({}): Length {:#x} is not a multiple of 1 MiB",
                guid_string(&guid),
                region.length
            ));
        }
        if let Some((j, _)) = seen
            .iter()
            .find(|(_, r)| r.overlaps(region.offset, region.length))
        {
            return Err(format!("entry {i} overlaps entry {j}"));
        }
        seen.push((i, region));
        let slot = if guid == BAT_GUID {
            &mut bat
        } else if guid == METADATA_GUID {
            &mut metadata
        } else if required {
            return Err(format!(
                "{UNKNOWN_REQUIRED}: entry {i}, {}",
                guid_string(&guid)
            ));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(format!(
                "entry {i}: region {} appears twice",
                guid_string(&guid)
            ));
        }
        *slot = Some(region);
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions {
            bat,
            metadata,
            which,
        }),
        (None, _) => Err("no BAT region".into()),
        (_, None) => Err("no metadata region".into()),
    }
}

/// The region table: the first copy if it is valid, else the second.
pub fn parse_regions(path: &Path, first: &[u8], second: &[u8]) -> Result<Regions> {
    match parse_region_table(first, 1) {
        Ok(r) => Ok(r),
        Err((e1, refused1)) => parse_region_table(second, 2).map_err(|(e2, refused2)| {
            // A required region we do not know is a format refusal, not damage.
            let unknown = refused1 || refused2;
            let message = format!(
                "vhdx: no valid region table: copy 1 at {:#x}: {e1}; copy 2 at {:#x}: {e2}",
                REGION_TABLE_OFFSETS[0], REGION_TABLE_OFFSETS[1]
            );
            if unknown {
                Error::format(path, message)
            } else {
                Error::corrupt(path, message)
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_answer() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let mut buf = b"abcd\xff\xff\xff\xffefgh".to_vec();
        let crc = checksum(&buf, 4);
        buf[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(crc, crc32c::crc32c(&buf));
    }

    #[test]
    fn guid_text() {
        assert_eq!(
            guid_string(&BAT_GUID),
            "{2dc27766-f623-4200-9d64-115e9bfd4a08}"
        );
    }
}
