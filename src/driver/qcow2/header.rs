//! The qcow2 header and its extensions: parsing and every check we make before
//! trusting a field. Layout from the qcow2 specification (docs/interop/qcow2.txt).

use crate::bytes::BeBytes;
use crate::driver::MAX_TABLE_BYTES;
use crate::error::{usize_of, Error, Result};
use std::path::Path;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Length of the version 3 header without the compression type byte.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Length of the version 3 header QEMU writes: the compression type byte,
/// padded to a multiple of 8.
pub const V3_HEADER_LENGTH: u32 = 112;

/// Where each header field lives, as the specification's "Header" section
/// lists them: every reader and writer of the header goes through these, so
/// the layout is spelled once. Fields past `SNAPSHOTS_OFFSET` exist in
/// version 3 only.
pub mod field {
    use super::{Be32, Be64, Be8};

    /// The magic, "QFI\xfb".
    pub const MAGIC: Be32 = Be32(0);
    /// 2 or 3.
    pub const VERSION: Be32 = Be32(4);
    /// Where the backing file name starts (0: none).
    pub const BACKING_FILE_OFFSET: Be64 = Be64(8);
    /// Length of the backing file name.
    pub const BACKING_FILE_SIZE: Be32 = Be32(16);
    /// log2 of the cluster size.
    pub const CLUSTER_BITS: Be32 = Be32(20);
    /// Virtual disk size in bytes.
    pub const SIZE: Be64 = Be64(24);
    /// 0 (none), 1 (AES) or 2 (LUKS).
    pub const CRYPT_METHOD: Be32 = Be32(32);
    /// Entries in the active L1 table.
    pub const L1_SIZE: Be32 = Be32(36);
    /// Where the active L1 table starts.
    pub const L1_TABLE_OFFSET: Be64 = Be64(40);
    /// Where the refcount table starts.
    pub const REFCOUNT_TABLE_OFFSET: Be64 = Be64(48);
    /// The refcount table's length in clusters. It follows
    /// `REFCOUNT_TABLE_OFFSET` directly, so one write moves the table.
    pub const REFCOUNT_TABLE_CLUSTERS: Be32 = Be32(56);
    /// Internal snapshots.
    pub const NB_SNAPSHOTS: Be32 = Be32(60);
    /// Where the snapshot table starts.
    pub const SNAPSHOTS_OFFSET: Be64 = Be64(64);
    /// Incompatible feature bits (version 3).
    pub const INCOMPATIBLE_FEATURES: Be64 = Be64(72);
    /// Compatible feature bits (version 3).
    pub const COMPATIBLE_FEATURES: Be64 = Be64(80);
    /// Autoclear feature bits (version 3).
    pub const AUTOCLEAR_FEATURES: Be64 = Be64(88);
    /// log2 of the refcount width in bits (version 3).
    pub const REFCOUNT_ORDER: Be32 = Be32(96);
    /// Bytes of header before the extensions (version 3).
    pub const HEADER_LENGTH: Be32 = Be32(100);
    /// How compressed clusters are encoded (version 3, when `HEADER_LENGTH`
    /// is past it).
    pub const COMPRESSION_TYPE: Be8 = Be8(104);
}

/// A one-byte header field at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct Be8(pub usize);
/// A big-endian 32-bit header field at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct Be32(pub usize);
/// A big-endian 64-bit header field at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct Be64(pub usize);

impl Be8 {
    /// The field's value, or `None` if `buf` ends before it.
    pub fn get(self, buf: &[u8]) -> Option<u8> {
        BeBytes(buf).u8(self.0)
    }
    /// Store `value`; a field past the end of `buf` is left out.
    pub fn put(self, buf: &mut [u8], value: u8) {
        put_bytes(buf, self.0, &[value]);
    }
}

impl Be32 {
    /// The field's value, or `None` if `buf` ends before it.
    pub fn get(self, buf: &[u8]) -> Option<u32> {
        BeBytes(buf).u32(self.0)
    }
    /// Store `value`; a field past the end of `buf` is left out.
    pub fn put(self, buf: &mut [u8], value: u32) {
        put_bytes(buf, self.0, &value.to_be_bytes());
    }
    /// The field's byte offset in the file.
    pub fn offset(self) -> u64 {
        self.0 as u64
    }
}

impl Be64 {
    /// The field's value, or `None` if `buf` ends before it.
    pub fn get(self, buf: &[u8]) -> Option<u64> {
        BeBytes(buf).u64(self.0)
    }
    /// Store `value`; a field past the end of `buf` is left out.
    pub fn put(self, buf: &mut [u8], value: u64) {
        put_bytes(buf, self.0, &value.to_be_bytes());
    }
    /// The field's byte offset in the file.
    pub fn offset(self) -> u64 {
        self.0 as u64
    }
}

fn put_bytes(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = at
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(at..end))
    {
        dst.copy_from_slice(bytes);
    }
}

/// The bytes that point the header at a new refcount table: its offset and
/// length in clusters, two adjacent fields written in one piece so that no
/// crash leaves one without the other. Returns the file offset and the bytes.
pub fn refcount_table_fields(table_offset: u64, table_clusters: u32) -> (u64, [u8; 12]) {
    const _: () = assert!(field::REFCOUNT_TABLE_CLUSTERS.0 == field::REFCOUNT_TABLE_OFFSET.0 + 8);
    let base = field::REFCOUNT_TABLE_OFFSET.0;
    let mut bytes = [0u8; 12];
    Be64(0).put(&mut bytes, table_offset);
    Be32(field::REFCOUNT_TABLE_CLUSTERS.0 - base).put(&mut bytes, table_clusters);
    (base as u64, bytes)
}

/// Write a header extension at `at` (its type, its length, then its data
/// padded to a multiple of 8 bytes); returns where the next one starts.
/// Whatever would fall past the end of `buf` is left out.
pub fn put_extension(buf: &mut [u8], at: usize, ext_type: u32, data: &[u8]) -> usize {
    Be32(at).put(buf, ext_type);
    Be32(at.saturating_add(4)).put(buf, data.len() as u32);
    put_bytes(buf, at.saturating_add(EXT_HEADER_BYTES), data);
    at.saturating_add(EXT_HEADER_BYTES)
        .saturating_add(data.len().div_ceil(8).saturating_mul(8))
}

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
/// Compatible feature: refcount updates may be postponed (lazy refcounts).
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// QEMU refuses refcount tables larger than this; so do we.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The longest backing file name the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// The most snapshots an image may have.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Bytes of a header extension's type and length, before its data.
pub const EXT_HEADER_BYTES: usize = 8;
/// Bytes of one feature name table entry: type, bit number, 46-byte name.
const FEATURE_TABLE_ENTRY_BYTES: usize = 48;
const EXT_END: u32 = 0;
/// Header extension: the backing file's format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
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

/// The first cluster being parsed, with the facts every check's message needs.
struct Source<'a> {
    path: &'a Path,
    first_cluster: &'a [u8],
    file_len: u64,
}

impl Source<'_> {
    fn corrupt(&self, msg: String) -> Error {
        Error::corrupt(self.path, format!("qcow2: {msg}"))
    }

    fn too_short(&self) -> Error {
        self.corrupt(format!(
            "file is {} bytes, too short to hold a qcow2 header",
            self.file_len
        ))
    }

    fn u32(&self, f: Be32) -> Result<u32> {
        f.get(self.first_cluster).ok_or_else(|| self.too_short())
    }

    fn u64(&self, f: Be64) -> Result<u64> {
        f.get(self.first_cluster).ok_or_else(|| self.too_short())
    }
}

/// The fields every version has (the first 72 bytes).
struct Common {
    version: u32,
    backing_file_offset: u64,
    backing_file_size: u32,
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
}

/// The version 3 fields (fixed values for version 2).
struct Features {
    incompatible: u64,
    compatible: u64,
    autoclear: u64,
    refcount_order: u32,
    header_length: u32,
    compression_byte: u8,
}

/// What the header extensions say.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<String>,
    /// The feature name table: (feature type, bit, name).
    feature_table: Vec<(u8, u8, String)>,
}

/// Parse and check the header from the image's first cluster (or as much of it
/// as the file holds). `file_len` is the image file's length.
pub fn parse(path: &Path, first_cluster: &[u8], file_len: u64) -> Result<Header> {
    let src = Source {
        path,
        first_cluster,
        file_len,
    };
    let common = parse_common(&src)?;
    let features = parse_features(&src, &common)?;
    let extensions = parse_extensions(&src, &common, &features)?;
    let compression_type = check_features(&src, &common, &features, &extensions)?;
    let backing_file = parse_backing_name(&src, &common, &features)?;
    let header = Header {
        version: common.version,
        cluster_bits: common.cluster_bits,
        size: common.size,
        l1_size: common.l1_size,
        l1_table_offset: common.l1_table_offset,
        refcount_table_offset: common.refcount_table_offset,
        refcount_table_clusters: common.refcount_table_clusters,
        nb_snapshots: common.nb_snapshots,
        snapshots_offset: common.snapshots_offset,
        incompatible_features: features.incompatible,
        compatible_features: features.compatible,
        autoclear_features: features.autoclear,
        refcount_order: features.refcount_order,
        header_length: features.header_length,
        compression_type,
        backing_file,
        backing_format: extensions.backing_format,
        data_file: extensions.data_file,
    };
    check_tables(path, &header, file_len)?;
    Ok(header)
}

/// The magic, the version and the fields of the version 2 header, in the
/// order they sit (a short file fails at the first field it lacks).
fn parse_common(src: &Source) -> Result<Common> {
    let path = src.path;
    let magic = src.u32(field::MAGIC)?;
    if magic != MAGIC {
        return Err(Error::format(path, "not a qcow2 image (bad magic)"));
    }
    let version = src.u32(field::VERSION)?;
    if version != 2 && version != 3 {
        return Err(Error::format(
            path,
            format!(
                "qcow2: header field version is {version}; only versions 2 and 3 are supported"
            ),
        ));
    }
    let backing_file_offset = src.u64(field::BACKING_FILE_OFFSET)?;
    let backing_file_size = src.u32(field::BACKING_FILE_SIZE)?;
    let cluster_bits = src.u32(field::CLUSTER_BITS)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(src.corrupt(format!(
            "header field cluster_bits is {cluster_bits}; it must be 9 to 21 (512 B to 2 MiB clusters)"
        )));
    }
    let size = src.u64(field::SIZE)?;
    if size > i64::MAX as u64 {
        return Err(src.corrupt(format!(
            "header field size is {size}, larger than the largest disk ({})",
            i64::MAX
        )));
    }
    let crypt_method = src.u32(field::CRYPT_METHOD)?;
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
    Ok(Common {
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        l1_size: src.u32(field::L1_SIZE)?,
        l1_table_offset: src.u64(field::L1_TABLE_OFFSET)?,
        refcount_table_offset: src.u64(field::REFCOUNT_TABLE_OFFSET)?,
        refcount_table_clusters: src.u32(field::REFCOUNT_TABLE_CLUSTERS)?,
        nb_snapshots: src.u32(field::NB_SNAPSHOTS)?,
        snapshots_offset: src.u64(field::SNAPSHOTS_OFFSET)?,
    })
}

/// The feature bits, refcount width and header length: read from a version 3
/// header, fixed by the specification for version 2.
fn parse_features(src: &Source, common: &Common) -> Result<Features> {
    let features = if common.version == 2 {
        Features {
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_byte: 0,
        }
    } else {
        let cluster_size = 1u64 << common.cluster_bits;
        let incompatible = src.u64(field::INCOMPATIBLE_FEATURES)?;
        let compatible = src.u64(field::COMPATIBLE_FEATURES)?;
        let autoclear = src.u64(field::AUTOCLEAR_FEATURES)?;
        let refcount_order = src.u32(field::REFCOUNT_ORDER)?;
        let header_length = src.u32(field::HEADER_LENGTH)?;
        if header_length < V3_MIN_HEADER_LENGTH {
            return Err(src.corrupt(format!(
                "header field header_length is {header_length}; version 3 needs at least {V3_MIN_HEADER_LENGTH}"
            )));
        }
        if u64::from(header_length) > cluster_size {
            return Err(src.corrupt(format!(
                "header field header_length is {header_length}, larger than a cluster ({cluster_size})"
            )));
        }
        if u64::from(header_length) > src.file_len {
            return Err(src.too_short());
        }
        let compression_byte = if header_length > V3_MIN_HEADER_LENGTH {
            field::COMPRESSION_TYPE
                .get(src.first_cluster)
                .ok_or_else(|| src.too_short())?
        } else {
            0
        };
        Features {
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression_byte,
        }
    };
    if features.refcount_order > 6 {
        return Err(src.corrupt(format!(
            "header field refcount_order is {}; it must be 0 to 6 (1 to 64-bit refcounts)",
            features.refcount_order
        )));
    }
    Ok(features)
}

/// Walk the header extensions, which live between the header and the backing
/// file name (or the end of the first cluster).
fn parse_extensions(src: &Source, common: &Common, features: &Features) -> Result<Extensions> {
    let cluster_size = 1u64 << common.cluster_bits;
    let first_cluster = src.first_cluster;
    let b = BeBytes(first_cluster);
    let ext_end = if common.backing_file_offset != 0 {
        common.backing_file_offset.min(cluster_size)
    } else {
        cluster_size
    };
    let ext_end = usize_of(ext_end.min(first_cluster.len() as u64))?;
    let mut at = usize::try_from(features.header_length).unwrap_or(usize::MAX);
    let mut found = Extensions::default();
    while at < ext_end {
        if at.saturating_add(EXT_HEADER_BYTES) > ext_end {
            // QEMU refuses this too ("Header extension too large").
            return Err(src.corrupt(format!(
                "header extension at offset {at:#x} is truncated: its 8-byte type and length run past the end of the header area ({ext_end:#x})"
            )));
        }
        let ext_type = b.u32(at).ok_or_else(|| src.too_short())?;
        let ext_len = b.u32(at + 4).ok_or_else(|| src.too_short())?;
        if ext_type == EXT_END {
            break;
        }
        let data_start = at + EXT_HEADER_BYTES;
        let data_end = data_start
            .checked_add(usize::try_from(ext_len).unwrap_or(usize::MAX))
            .filter(|end| *end <= ext_end)
            .ok_or_else(|| {
                src.corrupt(format!(
                    "header extension {ext_type:#010x} at offset {at:#x} has length {ext_len}, running past the end of the header area ({ext_end:#x})"
                ))
            })?;
        let data = first_cluster.get(data_start..data_end).unwrap_or(&[]);
        let text = |what: &str| -> Result<String> {
            let s = std::str::from_utf8(data)
                .map_err(|_| src.corrupt(format!("header extension {what} is not valid UTF-8")))?;
            Ok(s.trim_end_matches('\0').to_string())
        };
        match ext_type {
            EXT_BACKING_FORMAT => {
                // QEMU keeps the name in a 16-byte buffer and refuses longer ones.
                if ext_len >= 16 {
                    return Err(src.corrupt(format!(
                        "header extension backing format is {ext_len} bytes long; the longest allowed is 15"
                    )));
                }
                found.backing_format = Some(text("backing format")?)
            }
            EXT_DATA_FILE => found.data_file = Some(text("external data file name")?),
            EXT_FEATURE_TABLE => {
                for entry in data.chunks_exact(FEATURE_TABLE_ENTRY_BYTES) {
                    let kind = entry.first().copied().unwrap_or(0);
                    let bit = entry.get(1).copied().unwrap_or(0);
                    let name = entry.get(2..).unwrap_or(&[]);
                    let name = String::from_utf8_lossy(name)
                        .trim_end_matches('\0')
                        .to_string();
                    found.feature_table.push((kind, bit, name));
                }
            }
            EXT_CRYPTO => {
                return Err(Error::format(
                    src.path,
                    "qcow2: image has a full-disk-encryption header extension; encrypted images are not supported",
                ))
            }
            _ => {}
        }
        at = data_end.div_ceil(8).saturating_mul(8);
    }
    Ok(found)
}

/// Refuse feature bits we do not know and combinations that contradict each
/// other; returns the compression type.
fn check_features(
    src: &Source,
    common: &Common,
    features: &Features,
    extensions: &Extensions,
) -> Result<CompressionType> {
    let incompatible = features.incompatible;
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(Error::format(
            src.path,
            format!(
                "qcow2: header field incompatible_features has unsupported bits {unknown:#x} ({})",
                describe_unknown_features(unknown, &extensions.feature_table)
            ),
        ));
    }
    let compression_byte = features.compression_byte;
    let compression_type = match compression_byte {
        0 => CompressionType::Deflate,
        1 => CompressionType::Zstd,
        other => {
            return Err(Error::format(
                src.path,
                format!("qcow2: header field compression_type is {other}; only 0 (deflate) and 1 (zstd) are supported"),
            ))
        }
    };
    let compression_bit = incompatible & INCOMPAT_COMPRESSION != 0;
    if compression_bit != (compression_type != CompressionType::Deflate) {
        return Err(src.corrupt(format!(
            "header field compression_type is {compression_byte} but the compression incompatible feature bit is {}",
            if compression_bit { "set" } else { "clear" }
        )));
    }
    let cluster_bits = common.cluster_bits;
    if incompatible & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
        return Err(src.corrupt(format!(
            "extended L2 entries need clusters of at least 16 KiB (cluster_bits {cluster_bits})"
        )));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 && extensions.data_file.is_none() {
        return Err(src.corrupt(
            "the external data file feature bit is set but no data file name extension is present"
                .to_string(),
        ));
    }
    Ok(compression_type)
}

/// The backing file name, which must lie in the first cluster, after the header.
fn parse_backing_name(
    src: &Source,
    common: &Common,
    features: &Features,
) -> Result<Option<String>> {
    let (backing_file_offset, backing_file_size) =
        (common.backing_file_offset, common.backing_file_size);
    if backing_file_offset == 0 {
        return Ok(None);
    }
    let header_length = features.header_length;
    let cluster_size = 1u64 << common.cluster_bits;
    if backing_file_size > MAX_BACKING_NAME {
        return Err(src.corrupt(format!(
            "header field backing_file_size is {backing_file_size}; the longest allowed is {MAX_BACKING_NAME}"
        )));
    }
    if backing_file_offset < u64::from(header_length) {
        return Err(src.corrupt(format!(
            "header field backing_file_offset is {backing_file_offset:#x}, inside the header (header_length {header_length})"
        )));
    }
    let start = usize::try_from(backing_file_offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(backing_file_size as usize);
    if end as u64 > cluster_size {
        return Err(src.corrupt(format!(
            "backing file name at offset {backing_file_offset:#x} ({backing_file_size} bytes) lies outside the first cluster"
        )));
    }
    let name = src.first_cluster.get(start..end).ok_or_else(|| {
        src.corrupt(format!(
            "backing file name at offset {backing_file_offset:#x} ({backing_file_size} bytes) lies past the end of the file ({} bytes)",
            src.file_len
        ))
    })?;
    let name = std::str::from_utf8(name)
        .map_err(|_| src.corrupt("backing file name is not valid UTF-8".to_string()))?;
    if name.contains('\0') {
        return Err(src.corrupt(format!(
            "backing file name {:?} contains a NUL byte",
            name.trim_end_matches('\0')
        )));
    }
    Ok((!name.is_empty()).then(|| name.to_string()))
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
    if l1_bytes > MAX_TABLE_BYTES {
        return Err(Error::corrupt(
            path,
            format!(
                "qcow2: header field l1_size is {}, an L1 table of {l1_bytes} bytes (the limit is {MAX_TABLE_BYTES})",
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
        field::MAGIC.put(&mut h, MAGIC);
        field::VERSION.put(&mut h, 3);
        field::CLUSTER_BITS.put(&mut h, cluster_bits);
        field::SIZE.put(&mut h, 1 << 20);
        field::L1_SIZE.put(&mut h, 1);
        field::L1_TABLE_OFFSET.put(&mut h, 3 << cluster_bits);
        field::REFCOUNT_TABLE_OFFSET.put(&mut h, 1 << cluster_bits);
        field::REFCOUNT_TABLE_CLUSTERS.put(&mut h, 1);
        field::REFCOUNT_ORDER.put(&mut h, 4);
        field::HEADER_LENGTH.put(&mut h, V3_HEADER_LENGTH);
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
            field::CLUSTER_BITS.put(&mut h, bits);
            let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err().to_string();
            assert!(err.contains("cluster_bits"), "{err}");
        }
    }

    #[test]
    fn rejects_unknown_incompatible_bits_and_encryption() {
        let mut h = v3_header(16);
        field::INCOMPATIBLE_FEATURES.put(&mut h, 1 << 40);
        let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("bit 40"));
        let mut h = v3_header(16);
        field::CRYPT_METHOD.put(&mut h, 2);
        let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("encrypted"));
    }

    #[test]
    fn rejects_tables_past_eof_and_huge_extensions() {
        let h = v3_header(16);
        let err = parse(Path::new("t"), &h, 3 << 16).unwrap_err().to_string();
        assert!(err.contains("L1 table"), "{err}");
        let mut h = v3_header(16);
        Be32(112).put(&mut h, EXT_BACKING_FORMAT);
        Be32(116).put(&mut h, u32::MAX);
        let err = parse(Path::new("t"), &h, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("header extension"), "{err}");
    }

    #[test]
    fn fields_round_trip_and_the_reftable_fields_are_one_piece() {
        let mut h = v3_header(16);
        let at = put_extension(&mut h, 112, EXT_BACKING_FORMAT, b"raw");
        assert_eq!(at, 112 + 8 + 8);
        let header = parse(Path::new("t"), &h, 1 << 20).unwrap();
        assert_eq!(header.backing_format.as_deref(), Some("raw"));
        assert_eq!(header.refcount_table_offset, 1 << 16);
        let (at, bytes) = refcount_table_fields(0x1234_0000, 7);
        h[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        assert_eq!(field::REFCOUNT_TABLE_OFFSET.get(&h), Some(0x1234_0000));
        assert_eq!(field::REFCOUNT_TABLE_CLUSTERS.get(&h), Some(7));
        // A field past the end of a short buffer is neither read nor written.
        let mut short = [0u8; 10];
        field::SIZE.put(&mut short, u64::MAX);
        assert_eq!(short, [0u8; 10]);
        assert_eq!(field::SIZE.get(&short), None);
    }

    #[test]
    fn truncated_header_is_an_error_not_a_panic() {
        let h = v3_header(16);
        for len in [0usize, 4, 8, 50, 71, 100] {
            assert!(parse(Path::new("t"), &h[..len], len as u64).is_err());
        }
    }
}
