//! The block-driver trait, the mapping a range lookup returns, and the probe that
//! picks a driver for a file.
//!
//! A driver answers two questions: "what are the bytes at this guest range?"
//! (`read_at`) and "what kind of storage backs it?" (`map`). The second lets the
//! verifier skip ranges that read as zeros on both sides without reading them.

pub(crate) mod cache;
pub mod gate;
mod locks;
pub mod nbd;
pub mod qcow2;
pub mod raw;
pub(crate) mod read;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

use crate::error::{Error, Result};
use crate::storage::{FileStorage, Overlay, Storage, View};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes per sector (defined at the bottom, in [`crate::size`]; re-exported
/// here, where drivers and their callers look for it).
pub use crate::size::SECTOR_SIZE;

/// The largest table a driver loads whole at open, whatever its format calls
/// it: a qcow2 L1 table (QEMU refuses larger ones), a vmdk grain directory, a
/// VHD BAT, a VDI block map. It bounds what a hostile header can make us
/// allocate; 32 MiB maps far more disk than any of these formats holds (8 Mi
/// entries of 1 MiB VDI blocks is 8 TiB; a 2 TiB vmdk with 4 KiB grains needs
/// 4 MiB).
pub const MAX_TABLE_BYTES: u64 = 32 << 20;

/// What backs one guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Data stored at `host_offset` in the driver's data file.
    Data {
        /// Byte offset in the data file of the range's first byte.
        host_offset: u64,
    },
    /// One compressed cluster (the extent never spans more than one).
    Compressed {
        /// Byte offset of the compressed stream in the image file.
        host_offset: u64,
        /// Bytes that hold the compressed stream (rounded to sectors, as stored).
        compressed_size: u64,
    },
    /// Reads as zeros because the metadata says so.
    Zero {
        /// A host cluster stays reserved for it (qcow2 "allocated zero").
        allocated: bool,
    },
    /// Nothing stored here: the range reads from the backing file, or as zeros.
    Unallocated,
}

impl Mapping {
    /// The short name used in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Mapping::Data { .. } => "data",
            Mapping::Compressed { .. } => "compressed",
            Mapping::Zero { .. } => "zero",
            Mapping::Unallocated => "unallocated",
        }
    }
}

/// A guest range with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// What backs it.
    pub mapping: Mapping,
}

/// One step of a format's lookup path: the table consulted and the entry used
/// (qcow2 `L1 0` then `L2 80`; vmdk `GD 3` then `GT 17`; vhdx `BAT 12`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableIndex {
    /// The table's name, as the format's specification calls it.
    pub table: &'static str,
    /// The entry's index in that table.
    pub index: u64,
}

/// Where a guest byte lives, in the terms a driver developer debugs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The mapping kind at the top image: data, compressed, zero, unallocated, or
    /// backing (unallocated here, served by a backing file).
    pub kind: &'static str,
    /// The format whose tables `tables` names (the top image's).
    pub format: Format,
    /// What one table entry maps, in the format's words: "cluster", "grain",
    /// "block".
    pub unit: &'static str,
    /// The lookup path through the top image's tables, outermost first.
    pub tables: Vec<TableIndex>,
    /// Subcluster index, for qcow2 images with extended L2 entries.
    pub subcluster: Option<u32>,
    /// Offset of the byte in `file`, where the data is stored.
    pub host_offset: Option<u64>,
    /// The file the bytes come from (the image, its data file, an extent, or a
    /// backing file).
    pub file: PathBuf,
    /// 0 for the image itself, 1 for its backing file, and so on.
    pub backing_depth: u32,
}

impl Location {
    /// The index used in table `name`, if the lookup went through it.
    pub fn index_in(&self, name: &str) -> Option<u64> {
        self.tables
            .iter()
            .find(|t| t.table == name)
            .map(|t| t.index)
    }
}

/// Fill in where an unallocated byte at `offset` is read from: the backing
/// file's own location of it, when a backing file covers it (else the byte
/// reads as zeros and `location` stays as it is).
pub(crate) fn locate_in_backing(
    location: &mut Location,
    backing: Option<&dyn BlockDriver>,
    offset: u64,
) -> Result<()> {
    let Some(backing) = backing.filter(|b| offset < b.size()) else {
        return Ok(());
    };
    location.kind = "backing";
    location.backing_depth = 1;
    location.file = backing.path().to_path_buf();
    match backing.locate(offset)? {
        Some(inner) => {
            location.host_offset = inner.host_offset;
            location.file = inner.file;
            location.backing_depth = inner.backing_depth + 1;
        }
        None => location.host_offset = Some(offset),
    }
    Ok(())
}

/// A disk-image format driver. Guest offsets are bytes from the start of the
/// virtual disk. Every method takes `&self`, so one driver serves many threads.
pub trait BlockDriver: Send + Sync {
    /// The format of the guest bytes this driver serves, from the one
    /// registry of formats.
    fn format(&self) -> Format;

    /// The driver's name, as QEMU spells it: its format's name ("raw",
    /// "qcow2", "vmdk"). Drivers that are not a format of a file (the NBD
    /// client, "nbd"; the mirrored device, "blkverify") name themselves.
    fn format_name(&self) -> &'static str {
        self.format().name()
    }

    /// The image file's path.
    fn path(&self) -> &Path;

    /// The virtual disk size in bytes.
    fn size(&self) -> u64;

    /// The allocation unit: the smallest range `map` can tell apart.
    fn granularity(&self) -> u64;

    /// Fill `buf` with the guest bytes at `offset`. The range must lie inside the
    /// disk; otherwise `InvalidArgument`. A short read of the underlying file is an
    /// error, never silently zeros, except where the format defines it as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// A zero-copy view of the guest range `[offset, offset + len)`, when the
    /// driver stores all of it contiguously in a file that can be mapped (raw
    /// data, a host-contiguous qcow2 data extent). `Ok(None)` means "use
    /// `read_at`". Check [`View::faulted`] after using the bytes: a page that
    /// could not be read reads as zeros, and `read_at` then reports the error.
    fn read_view(&self, offset: u64, len: usize) -> Result<Option<View>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// The mapping of the guest range starting at `offset`, at most `max_len` long
    /// (and never past the end of the disk). The returned extent starts at
    /// `offset` and is at least one byte long.
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent>;

    /// The backing file, if the image has one and it was opened.
    fn backing(&self) -> Option<&dyn BlockDriver> {
        None
    }

    /// Where the byte at `offset` lives, for formats with metadata worth naming.
    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let _ = offset;
        Ok(None)
    }

    /// Human-readable facts about the image (cluster size, features).
    fn info(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Whether writes are refused (the image was opened read-only).
    fn is_read_only(&self) -> bool {
        true
    }

    /// Write `buf` at guest `offset`. Any byte offset and length inside the disk
    /// are allowed; a write past the end is `InvalidArgument`, never a resize.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(Error::ReadOnly(self.path().to_path_buf()))
    }

    /// Make `[offset, offset + len)` read as zeros. With `unmap`, the driver may
    /// free the storage behind it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let _ = (offset, len, unmap);
        Err(Error::ReadOnly(self.path().to_path_buf()))
    }

    /// Tell the driver the range's contents are no longer needed. Afterwards it
    /// reads as zeros or as the backing file, as QEMU's driver of the format does.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::ReadOnly(self.path().to_path_buf()))
    }

    /// Make every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

impl fmt::Debug for dyn BlockDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.format_name(), self.path().display())
    }
}

/// Check that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(path: &Path, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "{}: request at offset {offset} of {len} bytes lies past the end of the image ({size} bytes)",
            path.display()
        ))),
    }
}

/// Whether the guest range starting at `offset` reads as zeros without reading
/// it, and for how long that answer holds (at most `max_len`). Follows backing
/// files through unallocated ranges. `false` means "must be read", not "non-zero".
pub fn zero_status(driver: &dyn BlockDriver, offset: u64, max_len: u64) -> Result<(u64, bool)> {
    let extent = driver.map(offset, max_len)?;
    match extent.mapping {
        Mapping::Data { .. } | Mapping::Compressed { .. } => Ok((extent.length, false)),
        Mapping::Zero { .. } => Ok((extent.length, true)),
        Mapping::Unallocated => match driver.backing() {
            Some(backing) if offset < backing.size() => {
                let len = extent.length.min(backing.size() - offset);
                zero_status(backing, offset, len)
            }
            _ => Ok((extent.length, true)),
        },
    }
}

/// Every image format blkverify knows, whether or not it can read it yet: the
/// one registry that the probe, the command line's format choices and the error
/// messages are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A flat file or block device.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware's virtual disk (sparse, flat and stream-optimized extents).
    Vmdk,
    /// Microsoft's Virtual PC / Hyper-V VHD (QEMU calls it `vpc`).
    Vpc,
    /// Microsoft's Hyper-V VHDX.
    Vhdx,
    /// VirtualBox's disk image.
    Vdi,
}

impl Format {
    /// Every format, in the order help texts list them.
    pub const ALL: [Format; 6] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vpc,
        Format::Vhdx,
        Format::Vdi,
    ];

    /// Parse a format name as given on the command line or in a header extension
    /// (QEMU's names: `vpc` is VHD).
    pub fn parse(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The name, as QEMU spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
        }
    }

    /// What a file of this format is, for messages ("a VMDK image").
    pub fn description(&self) -> &'static str {
        match self {
            Format::Raw => "a raw image",
            Format::Qcow2 => "a qcow2 image",
            Format::Vmdk => "a VMDK image",
            Format::Vpc => "a VHD (vpc) image",
            Format::Vhdx => "a VHDX image",
            Format::Vdi => "a VDI image",
        }
    }

    /// Whether blkverify has a driver that reads this format.
    pub fn can_read(&self) -> bool {
        matches!(
            self,
            Format::Raw | Format::Qcow2 | Format::Vmdk | Format::Vpc | Format::Vhdx | Format::Vdi
        )
    }

    /// Whether images of this format can be opened for writing (and created).
    pub fn can_write(&self) -> bool {
        matches!(self, Format::Raw | Format::Qcow2)
    }

    /// The names of the formats `pick` selects, comma-separated, for messages.
    pub fn names(pick: impl Fn(&Format) -> bool) -> String {
        Format::ALL
            .iter()
            .filter(|f| pick(f))
            .map(Format::name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether blkverify can do `access` with images of this format.
    pub fn supports(&self, access: Access) -> bool {
        match access {
            Access::Read => self.can_read(),
            Access::Write => self.can_write(),
        }
    }

    /// Parse a user-given format name that must support `access`, with the
    /// one message every caller gives for a name that does not.
    pub fn parse_for(name: &str, access: Access) -> Result<Format> {
        let supported = Format::names(|f| f.supports(access));
        match Format::parse(name) {
            Some(format) if format.supports(access) => Ok(format),
            Some(_) => Err(Error::InvalidArgument(format!(
                "format '{name}' cannot be {} (supported: {supported})",
                match access {
                    Access::Read => "read",
                    Access::Write => "written",
                }
            ))),
            None => Err(Error::InvalidArgument(format!(
                "unknown format '{name}' (supported: {supported})"
            ))),
        }
    }
}

/// What a caller needs to do with a format's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read them (verify, io, a backing file).
    Read,
    /// Create and write them (create, exercise).
    Write,
}

/// The longest backing chain followed unless the caller says otherwise
/// (`--max-backing-depth`, `max_backing_depth=`).
pub const DEFAULT_BACKING_DEPTH: u32 = 16;

/// How backing files are followed.
#[derive(Debug, Clone)]
pub struct BackingPolicy {
    /// Open backing files at all. When false, unallocated ranges read as zeros.
    pub follow: bool,
    /// The longest chain below the top image.
    pub max_depth: u32,
    /// Follow backing files outside the directory tree of the image that names
    /// them. Off by default: an untrusted image must not make us read (and
    /// report on) arbitrary files.
    pub allow_anywhere: bool,
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy {
            follow: true,
            max_depth: DEFAULT_BACKING_DEPTH,
            allow_anywhere: false,
        }
    }
}

/// Options for opening an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open for writing. Backing files are always opened read-only.
    pub writable: bool,
    /// The format; `None` probes the file's magic.
    pub format: Option<Format>,
    /// An internal snapshot to read instead of the active image (ID or name).
    pub snapshot: Option<String>,
    /// How backing files are followed.
    pub backing: BackingPolicy,
    /// Connect and I/O timeout for network drivers (default 30 s).
    pub io_timeout: Option<std::time::Duration>,
    /// Open even if another process has the image open for writing
    /// (`-U`/`--force-share`, as in qemu-img): share every permission with
    /// others. Read-only opens only.
    pub force_share: bool,
    /// With `writable`: writes go to a copy-on-write overlay in memory and a
    /// scratch file, never to the image (QEMU's `-snapshot`). The image is
    /// opened and locked read-only.
    pub overlay: bool,
}

/// Open an image: a file, or an NBD export given as an `nbd://` or
/// `nbd+unix://` URI.
pub fn open(path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDriver>> {
    locks::check_force_share(path, options)?;
    if let Some(uri) = path.to_str().filter(|s| nbd::is_uri(s)) {
        if let Some(format) = options.format.filter(|f| *f != Format::Raw) {
            return Err(Error::format(
                path,
                format!(
                    "an NBD export is served as raw bytes; format {} cannot be layered on it",
                    format.name()
                ),
            ));
        }
        if options.snapshot.is_some() {
            return Err(Error::format(path, "NBD exports have no snapshots"));
        }
        let timeout = options
            .io_timeout
            .unwrap_or(std::time::Duration::from_secs(30));
        return Ok(Arc::new(nbd::Nbd::connect(uri, options.writable, timeout)?));
    }
    open_in_chain(
        path,
        options.format,
        options.snapshot.as_deref(),
        options,
        &[],
    )
}

/// Open one image of a backing chain. `chain` holds the canonical paths of the
/// images above it, to catch loops.
pub(crate) fn open_in_chain(
    path: &Path,
    format: Option<Format>,
    snapshot: Option<&str>,
    options: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Arc<dyn BlockDriver>> {
    // Only the top image is ever opened for writing; backing files never are,
    // nor images of a format we cannot write: those open as if read-only was
    // asked, so a write fails as it would under `-r`.
    let top = chain.is_empty();
    let writable = options.writable && top && format.is_none_or(|f| f.can_write());
    let overlay = writable && options.overlay;
    let writable = writable && !overlay;
    let mut storage = if writable {
        FileStorage::open_read_write(path)?
    } else {
        FileStorage::open_read_only(path)?
    };
    let format = match format {
        Some(format) => format,
        None => probe(&storage)?,
    };
    if writable && !format.can_write() {
        storage = FileStorage::open_read_only(path)?;
    }
    let writable = writable && format.can_write();
    if format.can_read() {
        locks::lock_image(&mut storage, format, options, top, writable)?;
    }
    let storage: Arc<dyn Storage> = if overlay && format.can_write() {
        Arc::new(Overlay::new(storage)?)
    } else {
        Arc::new(storage)
    };
    if options.writable && chain.is_empty() && snapshot.is_some() {
        return Err(Error::InvalidArgument(format!(
            "{}: snapshots are read-only; open without a snapshot to write",
            path.display()
        )));
    }
    match format {
        Format::Raw => {
            if let Some(name) = snapshot {
                return Err(Error::format(
                    path,
                    format!("raw images have no snapshots (asked for snapshot '{name}')"),
                ));
            }
            Ok(Arc::new(raw::Raw::new(storage)?))
        }
        Format::Qcow2 => Ok(Arc::new(qcow2::Qcow2::open(
            storage, snapshot, options, chain,
        )?)),
        Format::Vmdk => {
            if let Some(name) = snapshot {
                return Err(Error::format(
                    path,
                    format!("vmdk images have no internal snapshots (asked for snapshot '{name}')"),
                ));
            }
            Ok(Arc::new(vmdk::Vmdk::open(storage, options, chain)?))
        }
        Format::Vhdx => {
            if let Some(name) = snapshot {
                return Err(Error::format(
                    path,
                    format!("vhdx images have no snapshots (asked for snapshot '{name}')"),
                ));
            }
            Ok(Arc::new(vhdx::Vhdx::open(storage, options, chain)?))
        }
        Format::Vpc | Format::Vdi if snapshot.is_some() => Err(Error::format(
            path,
            format!("{} images have no snapshots", format.name()),
        )),
        Format::Vpc => Ok(Arc::new(vpc::Vpc::open(storage, options, chain)?)),
        Format::Vdi => Ok(Arc::new(vdi::Vdi::open(storage)?)),
    }
}

/// The first eight bytes of a block digests file: the file format of the
/// digest engine (a layer above this one), whose magic is defined here so that
/// the probe can refuse such a file by name, rather than read it as a raw
/// image, without knowing that layer. The digest engine's file module
/// re-exports it as its `MAGIC`.
pub const BLOCK_DIGESTS_MAGIC: [u8; 8] = *b"BVDIGEST";

/// Pick a driver by the file's first bytes. Formats we know but cannot read are
/// refused rather than compared as raw bytes, which would be a silent wrong
/// answer.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let format = detect(storage)?;
    if format.can_read() {
        Ok(format)
    } else {
        Err(cannot_read(storage.path(), format))
    }
}

/// The refusal for a format blkverify recognises but has no reader for.
fn cannot_read(path: &Path, format: Format) -> Error {
    Error::format(
        path,
        format!(
            "file is {}, which blkverify cannot read; give -f raw to compare its bytes as they are",
            format.description()
        ),
    )
}

/// Which format the file's magic says it is (raw when none matches). qcow
/// version 1 and LUKS volumes, which no driver here will read, are refused, and
/// so are block digests files, which are not images.
pub fn detect(storage: &dyn Storage) -> Result<Format> {
    let len = storage.len()?;
    // The first sector holds every magic the probe knows.
    let mut head = [0u8; SECTOR_SIZE as usize];
    // At most the head's length, so it fits a usize.
    let n = len.min(head.len() as u64) as usize;
    let head = head.get_mut(..n).unwrap_or(&mut []);
    storage.read_exact_at(head, 0)?;
    let path = storage.path();
    if head.starts_with(b"QFI\xfb") {
        let version = head
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes);
        return match version {
            Some(1) => Err(Error::format(
                path,
                "qcow (version 1) images are not supported; convert with 'qemu-img convert -O qcow2'",
            )),
            _ => Ok(Format::Qcow2),
        };
    }
    if head.starts_with(&BLOCK_DIGESTS_MAGIC) {
        return Err(Error::format(
            path,
            "file is a block digests file, not an image: it can only be the reference of verify (give -f raw to read its bytes as they are)",
        ));
    }
    let refused: &[(&[u8], &str)] = &[
        (b"LUKS\xba\xbe", "a LUKS encrypted volume"),
        (b"QED\0", "a QED image"),
    ];
    for (magic, what) in refused {
        if head.starts_with(magic) {
            return Err(Error::format(
                path,
                format!("file is {what}, which blkverify cannot read; give -f raw to compare its bytes as they are"),
            ));
        }
    }
    let magics: &[(&[u8], Format)] = &[
        (b"KDMV", Format::Vmdk),
        // ESX's older sparse extent (vmfsSparse): probed as VMDK, as QEMU
        // does, so that it is refused by name rather than compared as raw.
        (b"COWD", Format::Vmdk),
        (b"# Disk DescriptorFile", Format::Vmdk),
        (b"conectix", Format::Vpc),
        (b"vhdxfile", Format::Vhdx),
    ];
    for (magic, format) in magics {
        if head.starts_with(magic) {
            return Ok(*format);
        }
    }
    if head.get(64..68) == Some(b"\x7f\x10\xda\xbe".as_slice()) {
        return Ok(Format::Vdi);
    }
    // A fixed VHD's only footer is its last sector (QEMU probes these as raw).
    if vpc::has_fixed_footer(storage)? {
        return Ok(Format::Vpc);
    }
    Ok(Format::Raw)
}
