//! The qcow2 header and its extensions: parsing and every check we make before
//! trusting a field. Layout from the qcow2 specification (docs/interop/qcow2.txt).

use crate::error::{Error, Result};
use std::path::Path;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Length of the version 3 header without the compression type byte.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;

/// Incompatible feature: the refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: QEMU found corruption and marked the image.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Autoclear feature: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// QEMU refuses L1 tables larger than this; so do we.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU refuses refcount tables larger than this; so do we.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The longest backing file name the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// The most snapshots an image may have.
pub const MAX_SNAPSHOTS: u32 = 65536;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (window bits 12), QEMU's default.
    Deflate,
    /// A zstd frame.
    Zstd,
}

/// The parsed, checked header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9 to 21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the active L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Its length in clusters.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table starts.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Bytes of header before the extensions.
    pub header_length: u32,
    /// How compressed clusters are encoded.
    pub compression_type: CompressionType,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format from its header extension, if any.
    pub backing_format: Option<String>,
    /// The external data file name, if any.
    pub data_file: Option<String>,
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries carry subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the external data file is itself a valid raw image.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// L1 entries needed to cover `size` bytes of guest disk.
    pub fn l1_entries_needed(&self, size: u64) -> u64 {
        let bytes_per_l2 = self.l2_entries() << self.cluster_bits;
        size.div_ceil(bytes_per_l2)
    }
}

/// Big-endian field access that cannot panic: a field past the end of the
/// buffer reads as `None`.
pub(crate) struct BeBytes<'a>(pub &'a [u8]);

impl BeBytes<'_> {
    pub(crate) fn u8(&self, at: usize) -> Option<u8> {
        self.0.get(at).copied()
    }
    pub(crate) fn u16(&self, at: usize) -> Option<u16> {
        Some(u16::from_be_bytes(
            self.0.get(at..at.checked_add(2)?)?.try_into().ok()?,
        ))
    }
    pub(crate) fn u32(&self, at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(
            self.0.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    }
    pub(crate) fn u64(&self, at: usize) -> Option<u64> {
        Some(u64::from_be_bytes(
            self.0.get(at..at.checked_add(8)?)?.try_into().ok()?,
        ))
    }
}

/// The names of incompatible feature bits we do not know, from the image's own
/// feature name table when it has one.
fn describe_unknown_features(bits: u64, table: &[(u8, u8, String)]) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        let name = table
            .iter()
            .find(|(kind, b, _)| *kind == 0 && *b == bit)
            .map(|(_, _, name)| format!("bit {bit} '{name}'"))
            .unwrap_or_else(|| format!("bit {bit}"));
        parts.push(name);
    }
    parts.join(", ")
}

/// Parse and check the header from the image's first cluster (or as much of it
/// as the file holds). `file_len` is the image file's length.
pub fn parse(path: &Path, first_cluster: &[u8], file_len: u64) -> Result<Header> {
    let b = BeBytes(first_cluster);
    let corrupt = |msg: String| Error::corrupt(path, format!("qcow2: {msg}"));
    let too_short = || {
        corrupt(format!(
            "file is {file_len} bytes, too short to hold a qcow2 header"
        ))
    };
    let magic = b.u32(0).ok_or_else(too_short)?;
    if magic != MAGIC {
        return Err(Error::format(path, "not a qcow2 image (bad magic)"));
    }
    let version = b.u32(4).ok_or_else(too_short)?;
    if version != 2 && version != 3 {
        return Err(Error::format(
            path,
            format!(
                "qcow2: header field version is {version}; only versions 2 and 3 are supported"
            ),
        ));
    }
    let field64 = |at: usize| b.u64(at).ok_or_else(too_short);
    let field32 = |at: usize| b.u32(at).ok_or_else(too_short);
    let backing_file_offset = field64(8)?;
    let backing_file_size = field32(16)?;
    let cluster_bits = field32(20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "header field cluster_bits is {cluster_bits}; it must be 9 to 21 (512 B to 2 MiB clusters)"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = field64(24)?;
    if size > i64::MAX as u64 {
        return Err(corrupt(format!(
            "header field size is {size}, larger than the largest disk ({})",
            i64::MAX
        )));
    }
    let crypt_method = field32(32)?;
    if crypt_method != 0 {
        let what = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "an unknown method",
        };
        return Err(Error::format(
            path,
            format!(
                "qcow2: image is encrypted (header field crypt_method is {crypt_method}, {what}); encrypted images are not supported"
            ),
        ));
    }
    let l1_size = field32(36)?;
    let l1_table_offset = field64(40)?;
    let refcount_table_offset = field64(48)?;
    let refcount_table_clusters = field32(56)?;
    let nb_snapshots = field32(60)?;
    let snapshots_offset = field64(64)?;

    let (incompatible_features, compatible_features, autoclear_features, refcount_order);
    let header_length;
    let mut compression_byte = 0u8;
    if version == 2 {
        incompatible_features = 0;
        compatible_features = 0;
        autoclear_features = 0;
        refcount_order = 4;
        header_length = V2_HEADER_LENGTH;
    } else {
        incompatible_features = field64(72)?;
        compatible_features = field64(80)?;
        autoclear_features = field64(88)?;
        refcount_order = field32(96)?;
        header_length = field32(100)?;
        if header_length < V3_MIN_HEADER_LENGTH {
            return Err(corrupt(format!(
                "header field header_length is {header_length}; version 3 needs at least {V3_MIN_HEADER_LENGTH}"
            )));
        }
        if u64::from(header_length) > cluster_size {
            return Err(corrupt(format!(
                "header field header_length is {header_length}, larger than a cluster ({cluster_size})"
            )));
        }
        if u64::from(header_length) > file_len {
            return Err(too_short());
        }
        if header_length > V3_MIN_HEADER_LENGTH {
            compression_byte = b.u8(104).ok_or_else(too_short)?;
        }
    }
    if refcount_order > 6 {
        return Err(corrupt(format!(
            "header field refcount_order is {refcount_order}; it must be 0 to 6 (1 to 64-bit refcounts)"
        )));
    }

    // Header extensions live between the header and the backing file name (or
    // the end of the first cluster).
    let ext_end = if backing_file_offset != 0 {
        backing_file_offset.min(cluster_size)
    } else {
        cluster_size
    };
    let ext_end = usize::try_from(ext_end.min(first_cluster.len() as u64)).unwrap_or(0);
    let mut at = usize::try_from(header_length).unwrap_or(usize::MAX);
    let mut backing_format = None;
    let mut data_file = None;
    let mut feature_table: Vec<(u8, u8, String)> = Vec::new();
    while at < ext_end {
        if at.saturating_add(8) > ext_end {
            // QEMU refuses this too ("Header extension too large").
            return Err(corrupt(format!(
                "header extension at offset {at:#x} is truncated: its 8-byte type and length run past the end of the header area ({ext_end:#x})"
            )));
        }
        let ext_type = b.u32(at).ok_or_else(too_short)?;
        let ext_len = b.u32(at + 4).ok_or_else(too_short)?;
        if ext_type == EXT_END {
            break;
        }
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(usize::try_from(ext_len).unwrap_or(usize::MAX))
            .filter(|end| *end <= ext_end)
            .ok_or_else(|| {
                corrupt(format!(
                    "header extension {ext_type:#010x} at offset {at:#x} has length {ext_len}, running past the end of the header area ({ext_end:#x})"
                ))
            })?;
        let data = first_cluster.get(data_start..data_end).unwrap_or(&[]);
        let text = |what: &str| -> Result<String> {
            let s = std::str::from_utf8(data)
                .map_err(|_| corrupt(format!("header extension {what} is not valid UTF-8")))?;
            Ok(s.trim_end_matches('\0').to_string())
        };
        match ext_type {
            EXT_BACKING_FORMAT => {
                // QEMU keeps the name in a 16-byte buffer and refuses longer ones.
                if ext_len >= 16 {
                    return Err(corrupt(format!(
                        "header extension backing format is {ext_len} bytes long; the longest allowed is 15"
                    )));
                }
                backing_format = Some(text("backing format")?)
            }
            EXT_DATA_FILE => data_file = Some(text("external data file name")?),
            EXT_FEATURE_TABLE => {
                for entry in data.chunks_exact(48) {
                    let kind = entry.first().copied().unwrap_or(0);
                    let bit = entry.get(1).copied().unwrap_or(0);
                    let name = entry.get(2..).unwrap_or(&[]);
                    let name = String::from_utf8_lossy(name)
                        .trim_end_matches('\0')
                        .to_string();
                    feature_table.push((kind, bit, name));
                }
            }
            EXT_CRYPTO => {
                return Err(Error::format(
                    path,
                    "qcow2: image has a full-disk-encryption header extension; encrypted images are not supported",
                ))
            }
            _ => {}
        }
        at = data_end.div_ceil(8).saturating_mul(8);
    }

    let unknown = incompatible_features & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(Error::format(
            path,
            format!(
                "qcow2: header field incompatible_features has unsupported bits {unknown:#x} ({})",
                describe_unknown_features(unknown, &feature_table)
            ),
        ));
    }
    let compression_type = match compression_byte {
        0 => CompressionType::Deflate,
        1 => CompressionType::Zstd,
        other => {
            return Err(Error::format(
                path,
                format!("qcow2: header field compression_type is {other}; only 0 (deflate) and 1 (zstd) are supported"),
            ))
        }
    };
    let compression_bit = incompatible_features & INCOMPAT_COMPRESSION != 0;
    if compression_bit != (compression_type != CompressionType::Deflate) {
        return Err(corrupt(format!(
            "header field compression_type is {compression_byte} but the compression incompatible feature bit is {}",
            if compression_bit { "set" } else { "clear" }
        )));
    }
    if incompatible_features & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
        return Err(corrupt(format!(
            "extended L2 entries need clusters of at least 16 KiB (cluster_bits {cluster_bits})"
        )));
    }
    if incompatible_features & INCOMPAT_DATA_FILE != 0 && data_file.is_none() {
        return Err(corrupt(
            "the external data file feature bit is set but no data file name extension is present"
                .to_string(),
        ));
    }

    let backing_file = if backing_file_offset != 0 {
        if backing_file_size > MAX_BACKING_NAME {
            return Err(corrupt(format!(
                "header field backing_file_size is {backing_file_size}; the longest allowed is {MAX_BACKING_NAME}"
            )));
        }
        if backing_file_offset < u64::from(header_length) {
            return Err(corrupt(format!(
                "header field backing_file_offset is {backing_file_offset:#x}, inside the header (header_length {header_length})"
            )));
        }
        let start = usize::try_from(backing_file_offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(backing_file_size as usize);
        if end as u64 > cluster_size {
            return Err(corrupt(format!(
                "backing file name at offset {backing_file_offset:#x} ({backing_file_size} bytes) lies outside the first cluster"
            )));
        }
        let name = first_cluster.get(start..end).ok_or_else(|| {
            corrupt(format!(
                "backing file name at offset {backing_file_offset:#x} ({backing_file_size} bytes) lies past the end of the file ({file_len} bytes)"
            ))
        })?;
        let name = std::str::from_utf8(name)
            .map_err(|_| corrupt("backing file name is not valid UTF-8".to_string()))?;
        if name.contains('\0') {
            return Err(corrupt(format!(
                "backing file name {:?} contains a NUL byte",
                name.trim_end_matches('\0')
            )));
        }
        if name.is_empty() {
            None
        } else {
            Some(name.to_string())
        }
    } else {
        None
    };

    let header = Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible_features,
        compatible_features,
        autoclear_features,
        refcount_order,
        header_length,
        compression_type,
        backing_file,
        backing_format,
        data_file,
    };
    check_tables(path, &header, file_len)?;
    Ok(header)
}

/// Check that a table of `bytes` at `offset` is cluster-aligned and inside the file.
pub fn check_table(
    path: &Path,
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if offset % cluster_size != 0 {
        return Err(Error::corrupt(
            path,
            format!("qcow2: {what} offset {offset:#x} is not aligned to a cluster ({cluster_size} bytes)"),
        ));
    }
    if offset == 0 {
        return Err(Error::corrupt(
            path,
            format!("qcow2: {what} offset is 0, overlapping the header"),
        ));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(
            path,
            format!(
                "qcow2: {what} at offset {offset:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes)"
            ),
        )),
    }
}

fn check_tables(path: &Path, h: &Header, file_len: u64) -> Result<()> {
    let cluster_size = h.cluster_size();
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Error::corrupt(
            path,
            format!(
                "qcow2: header field l1_size is {}, an L1 table of {l1_bytes} bytes (the limit is {MAX_L1_BYTES})",
                h.l1_size
            ),
        ));
    }
    let needed = h.l1_entries_needed(h.size);
    if u64::from(h.l1_size) < needed {
        return Err(Error::corrupt(
            path,
            format!(
                "qcow2: header field l1_size is {}, too small for a virtual size of {} bytes (needs {needed})",
                h.l1_size, h.size
            ),
        ));
    }
    check_table(
        path,
        "L1 table",
        h.l1_table_offset,
        l1_bytes,
        cluster_size,
        file_len,
    )?;
    if h.refcount_table_clusters == 0 {
        // QEMU refuses this too ("Image does not contain a reference count table").
        return Err(Error::corrupt(
            path,
            "qcow2: header field refcount_table_clusters is 0; every image has a refcount table",
        ));
    }
    let reftable_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
    if reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(Error::corrupt(
            path,
            format!(
                "qcow2: header field refcount_table_clusters is {}, a table of {reftable_bytes} bytes (the limit is {MAX_REFTABLE_BYTES})",
                h.refcount_table_clusters
            ),
        ));
    }
    check_table(
        path,
        "refcount table",
        h.refcount_table_offset,
        reftable_bytes,
        cluster_size,
        file_len,
    )?;
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Error::corrupt(
            path,
            format!(
                "qcow2: header field nb_snapshots is {}; the limit is {MAX_SNAPSHOTS}",
                h.nb_snapshots
            ),
        ));
    }
    let mut tables = vec![
        ("L1 table", h.l1_table_offset, l1_bytes),
        ("refcount table", h.refcount_table_offset, reftable_bytes),
    ];
    if h.nb_snapshots > 0 {
        // Each entry is at least 40 bytes; the rest is checked when it is read.
        let snapshot_bytes = u64::from(h.nb_snapshots) * 40;
        check_table(
            path,
            "snapshot table",
            h.snapshots_offset,
            snapshot_bytes,
            cluster_size,
            file_len,
        )?;
        tables.push(("snapshot table", h.snapshots_offset, snapshot_bytes));
    }
    // No two of these tables may share a cluster: a reader would take one for
    // the other, and a writer would overwrite one with the other.
    for (i, (what, offset, bytes)) in tables.iter().enumerate() {
        for (other, other_offset, other_bytes) in tables.iter().skip(i + 1) {
            if overlaps(*offset, *bytes, *other_offset, *other_bytes, cluster_size) {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "qcow2: {what} at offset {offset:#x} ({bytes} bytes) overlaps the {other} at offset {other_offset:#x} ({other_bytes} bytes)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Whether two byte ranges share a cluster. Both lie inside the file, so the
/// sums cannot overflow.
pub fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64, cluster_size: u64) -> bool {
    if a_len == 0 || b_len == 0 {
        return false;
    }
    let a_end = a.saturating_add(a_len).div_ceil(cluster_size) * cluster_size;
    let b_end = b.saturating_add(b_len).div_ceil(cluster_size) * cluster_size;
    a / cluster_size * cluster_size < b_end && b / cluster_size * cluster_size < a_end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_header(cluster_bits: u32) -> Vec<u8> {
        let mut h = vec![0u8; 1 << cluster_bits];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 << cluster_bits).to_be_bytes());
        h[48..56].copy_from_slice(&(1u64 << cluster_bits).to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    #[test]
    fn parses_a_minimal_v3_header() {
        let h = v3_header(16);
        let header = parse(Path::new("t"), &h, 1 << 20).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.l2_entries(), 8192);
        assert_eq!(header.compression_type, CompressionType::Deflate);
    }

    #[test]
    fn rejects_cluster_bits_out_of_range() {
        for bits in [8u32, 22, 63] {
            let mut h = v3_header(16);
            h[20..24].copy_from_slice(&bits.to_be_bytes());
            let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err().to_string();
            assert!(err.contains("cluster_bits"), "{err}");
        }
    }

    #[test]
    fn rejects_unknown_incompatible_bits_and_encryption() {
        let mut h = v3_header(16);
        h[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("bit 40"));
        let mut h = v3_header(16);
        h[32..36].copy_from_slice(&2u32.to_be_bytes());
        let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("encrypted"));
    }

    #[test]
    fn rejects_tables_past_eof_and_huge_extensions() {
        let h = v3_header(16);
        let err = parse(Path::new("t"), &h, 3 << 16).unwrap_err().to_string();
        assert!(err.contains("L1 table"), "{err}");
        let mut h = v3_header(16);
        h[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("header extension"), "{err}");
    }

    #[test]
    fn truncated_header_is_an_error_not_a_panic() {
        let h = v3_header(16);
        for len in [0usize, 4, 8, 50, 71, 100] {
            assert!(parse(Path::new("t"), &h[..len], len as u64).is_err());
        }
    }
}
