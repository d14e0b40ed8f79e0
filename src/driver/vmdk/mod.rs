//! The VMDK driver (read-only): every disk `qemu-img create -f vmdk` makes.
//!
//! A VMDK disk is a descriptor plus extents laid end to end. Monolithic sparse
//! and stream-optimized disks are one sparse extent file with the descriptor
//! inside it; monolithicFlat and twoGbMaxExtent{Sparse,Flat} disks are a text
//! descriptor file naming flat or sparse extent files, which resolve through
//! [`gate::resolve_part`] (inside the descriptor's directory tree unless the
//! policy allows otherwise). A differencing disk names its parent in
//! `parentFileNameHint`; the parent opens through [`gate::open_backing`] as a
//! VMDK, and its CID must be the child's `parentCID`, or the child was made
//! from a parent that has changed since.
//!
//! Layout: `header` (the sparse extent header), `descriptor` (the text),
//! `sparse` (grain directory and tables, reading grains), `stream` (markers,
//! the footer and compressed grains of stream-optimized extents).

pub mod descriptor;
pub mod header;
pub mod sparse;
pub mod stream;

use super::read::{read_backing, read_through_map};
use super::{
    check_range, gate, locate_in_backing, BlockDriver, Extent, Format, Location, Mapping,
    OpenOptions, TableIndex, SECTOR_SIZE,
};
use crate::error::{usize_of, Error, Result};
use crate::storage::{Storage, View};
use descriptor::{CreateType, Descriptor, ExtentKind, NO_PARENT};
use sparse::{Grain, SparseExtent};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How one extent stores its bytes.
enum Data {
    /// Raw bytes at a fixed offset of a file.
    Flat {
        file: Arc<dyn Storage>,
        /// Byte offset of the extent's first byte in `file`.
        offset: u64,
    },
    /// A sparse extent (grains through a grain directory and tables).
    Sparse(Box<SparseExtent>),
}

/// One extent, placed in the disk.
struct Slot {
    /// Guest offset of the extent's first byte.
    start: u64,
    /// Its length in bytes.
    len: u64,
    data: Data,
}

impl Slot {
    fn file(&self) -> &Arc<dyn Storage> {
        match &self.data {
            Data::Flat { file, .. } => file,
            Data::Sparse(sparse) => sparse.file(),
        }
    }
}

/// What backs a guest range, inside one extent.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// The extent's index.
    slot: usize,
    /// Bytes from the offset asked for.
    length: u64,
    /// The mapping (host offsets are in the extent's file).
    grain: Grain,
    /// The grain directory and table entries, for sparse extents.
    tables: Option<(u64, u64)>,
}

/// An open VMDK disk.
pub struct Vmdk {
    path: PathBuf,
    descriptor: Descriptor,
    slots: Vec<Slot>,
    size: u64,
    /// The extents come from a descriptor file, so locations name the extent.
    listed: bool,
    backing: Option<Arc<dyn BlockDriver>>,
    /// A descriptor file, kept open while the disk is: it holds the disk's
    /// image locks, as QEMU's open descriptor file does.
    _descriptor_file: Option<Arc<dyn Storage>>,
}

impl Vmdk {
    /// Open the VMDK disk in `storage`: a sparse extent with an embedded
    /// descriptor, or a descriptor file. `chain` holds the canonical paths of
    /// the disks above this one (it may be a parent).
    pub fn open(
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<Self> {
        let path = storage.path().to_path_buf();
        let len = storage.len()?;
        let mut head = [0u8; header::HEADER_BYTES];
        // At most HEADER_BYTES, so it fits a usize.
        let n = len.min(header::HEADER_BYTES as u64) as usize;
        let head = head.get_mut(..n).unwrap_or(&mut []);
        storage.read_exact_at(head, 0)?;
        let (descriptor, slots, descriptor_file) = if head.starts_with(header::MAGIC) {
            let (descriptor, slot) = open_monolithic(storage)?;
            (descriptor, vec![slot], None)
        } else if head.starts_with(header::COWD_MAGIC) {
            return Err(Error::format(
                &path,
                "vmdk: this is a vmfsSparse (COWD) extent, which blkverify does not read",
            ));
        } else if looks_like_text(head) {
            let descriptor = read_descriptor_file(storage.as_ref(), len)?;
            let slots = open_extents(&path, &descriptor, options)?;
            (descriptor, slots, Some(storage))
        } else {
            return Err(Error::format(
                &path,
                "vmdk: not a VMDK image (neither the sparse extent magic KDMV nor a text descriptor)",
            ));
        };
        let listed = descriptor_file.is_some();
        let size = slots.last().map_or(0, |s| s.start + s.len);
        let backing = match &descriptor.parent_hint {
            Some(name) if options.backing.follow => {
                let parent = gate::open_backing(&path, "vmdk", name, Some("vmdk"), options, chain)?;
                check_parent_cid(&path, &descriptor, name, parent.as_ref())?;
                Some(parent)
            }
            _ => None,
        };
        Ok(Vmdk {
            path,
            descriptor,
            slots,
            size,
            listed,
            backing,
            _descriptor_file: descriptor_file,
        })
    }

    /// The descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The extent holding guest `offset` (which lies inside the disk).
    fn slot_of(&self, offset: u64) -> Result<usize> {
        let after = self.slots.partition_point(|s| s.start <= offset);
        after
            .checked_sub(1)
            .filter(|&i| self.slots.get(i).is_some_and(|s| offset - s.start < s.len))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: offset {offset:#x} is in no extent",
                    self.path.display()
                ))
            })
    }

    /// What backs the guest range at `offset`, at most `max_len` bytes of it
    /// (never past its extent).
    fn piece(&self, offset: u64, max_len: u64) -> Result<Piece> {
        let index = self.slot_of(offset)?;
        let slot = self.slot(index)?;
        let in_extent = offset - slot.start;
        let max_len = max_len.max(1).min(slot.len - in_extent);
        match &slot.data {
            Data::Flat { file, offset: base } => {
                let host = base + in_extent;
                let (length, grain) = flat_run(file.as_ref(), host, max_len, base + slot.len)?;
                Ok(Piece {
                    slot: index,
                    length,
                    grain,
                    tables: None,
                })
            }
            Data::Sparse(sparse) => {
                let run = sparse.run(in_extent, max_len)?;
                Ok(Piece {
                    slot: index,
                    length: run.length,
                    grain: run.grain,
                    tables: Some((run.gd_index, run.gt_index)),
                })
            }
        }
    }

    /// Extent `index` of the descriptor (an index `slot_of` gave).
    fn slot(&self, index: usize) -> Result<&Slot> {
        self.slots.get(index).ok_or_else(|| {
            Error::Internal(format!(
                "{}: extent index {index} out of range ({} extents)",
                self.path.display(),
                self.slots.len()
            ))
        })
    }
}

/// The mapping of a flat extent's bytes from `host` (at most `max_len`, never
/// past `end`): data, or a hole of the file, which reads as zeros.
fn flat_run(file: &dyn Storage, host: u64, max_len: u64, end: u64) -> Result<(u64, Grain)> {
    let data = Grain::Data { host_offset: host };
    match file.next_data(host) {
        Some((start, _)) if start == u64::MAX || start >= end => {
            // No data up to the extent's end. If the file is now shorter than
            // the extent, it shrank under us: zeros would be a silent wrong
            // answer.
            let now = file.len()?;
            if now < end {
                return Err(Error::io(
                    file.path(),
                    format!("map offset {host:#x}"),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the extent file is {now} bytes, shorter than its extent ({end})"),
                    ),
                ));
            }
            Ok((max_len, Grain::Zero))
        }
        Some((start, _)) if start > host => Ok((max_len.min(start - host), Grain::Zero)),
        Some((start, data_end)) if start == host && data_end > host => {
            Ok((max_len.min(data_end - host), data))
        }
        _ => Ok((max_len, data)),
    }
}

/// Whether the first bytes of a file can start a text descriptor. The text
/// ends at the first NUL, as QEMU reads it: what follows is not looked at.
/// `qemu-img convert` pads a descriptor with NULs, but when QEMU rewrites the
/// CID with fewer hex digits it ends the text earlier and leaves the old
/// text's last bytes behind the new NUL.
fn looks_like_text(head: &[u8]) -> bool {
    let text = descriptor::text_of(head);
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    matches!(first, Some(b'#') | Some(b'a'..=b'z') | Some(b'A'..=b'Z'))
}

fn parse_descriptor(path: &Path, text: &[u8]) -> Result<Descriptor> {
    descriptor::parse(text).map_err(|p| match p {
        descriptor::Problem::Unsupported(m) => Error::format(path, format!("vmdk: {m}")),
        descriptor::Problem::Invalid(m) => Error::corrupt(path, format!("vmdk: {m}")),
    })
}

/// A monolithic disk: one sparse extent, its descriptor embedded.
fn open_monolithic(storage: Arc<dyn Storage>) -> Result<(Descriptor, Slot)> {
    let path = storage.path().to_path_buf();
    let sparse = SparseExtent::open(storage)?;
    let corrupt = |m: String| Error::corrupt(&path, format!("vmdk: {m}"));
    let text = sparse.descriptor().unwrap_or(&[]);
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(corrupt(
            "the sparse extent has no embedded descriptor, so it is one extent of a disk, \
             not a disk: open the descriptor file that lists it"
                .to_string(),
        ));
    }
    let descriptor = parse_descriptor(&path, text)?;
    let h = sparse.header();
    if !descriptor.create_type.is_embedded() {
        return Err(corrupt(format!(
            "the embedded descriptor says createType {}, a disk made of a descriptor file and extents",
            descriptor.create_type.name()
        )));
    }
    if (descriptor.create_type == CreateType::StreamOptimized) != h.compressed {
        return Err(corrupt(format!(
            "the embedded descriptor says createType {}, but the grains are {}compressed",
            descriptor.create_type.name(),
            if h.compressed { "" } else { "not " }
        )));
    }
    match descriptor.extents.as_slice() {
        [line] if line.kind == ExtentKind::Sparse && line.sectors == h.capacity => {}
        [line] => {
            return Err(corrupt(format!(
            "the embedded descriptor's extent (line {}) is {} sectors {}, but the header says a \
                 SPARSE extent of {} sectors",
            line.line,
            line.sectors,
            if line.kind == ExtentKind::Sparse {
                "SPARSE"
            } else {
                "FLAT"
            },
            h.capacity
        )))
        }
        lines => {
            return Err(corrupt(format!(
                "the embedded descriptor lists {} extents; a {} disk has one",
                lines.len(),
                descriptor.create_type.name()
            )))
        }
    }
    let slot = Slot {
        start: 0,
        len: h.capacity_bytes(),
        data: Data::Sparse(Box::new(sparse)),
    };
    Ok((descriptor, slot))
}

/// Read and parse a descriptor file of `len` bytes.
fn read_descriptor_file(storage: &dyn Storage, len: u64) -> Result<Descriptor> {
    let path = storage.path();
    if len > header::MAX_DESCRIPTOR_BYTES {
        return Err(Error::corrupt(
            path,
            format!(
                "vmdk: the descriptor file is {len} bytes; a descriptor is at most {} bytes",
                header::MAX_DESCRIPTOR_BYTES
            ),
        ));
    }
    let mut bytes = vec![0u8; usize_of(len)?];
    storage.read_exact_at(&mut bytes, 0)?;
    let descriptor = parse_descriptor(path, descriptor::text_of(&bytes))?;
    if descriptor.create_type.is_embedded() {
        return Err(Error::format(
            path,
            format!(
                "vmdk: createType '{}' is a single sparse file with its descriptor inside; \
                 a separate descriptor file cannot describe one",
                descriptor.create_type.name()
            ),
        ));
    }
    Ok(descriptor)
}

/// Open the extents a descriptor file lists, each through the gate.
fn open_extents(path: &Path, descriptor: &Descriptor, options: &OpenOptions) -> Result<Vec<Slot>> {
    let mut slots = Vec::with_capacity(descriptor.extents.len());
    let mut start = 0u64;
    for line in &descriptor.extents {
        let corrupt = |m: String| {
            Error::corrupt(
                path,
                format!(
                    "vmdk: extent '{}' (descriptor line {}): {m}",
                    line.file_name, line.line
                ),
            )
        };
        let extent_path = gate::resolve_part(path, "vmdk", "extent", &line.file_name, options)?;
        let metadata = matches!(line.kind, ExtentKind::Sparse);
        let file: Arc<dyn Storage> =
            Arc::new(super::locks::open_extent(&extent_path, metadata, options)?);
        // The sum of all extents was checked against 64 bits by the parser.
        let len = line.sectors * SECTOR_SIZE;
        let data = match line.kind {
            ExtentKind::Flat { offset } => {
                let file_len = file.len()?;
                let needed = offset.saturating_add(len);
                if needed > file_len {
                    return Err(corrupt(format!(
                        "the extent needs bytes {offset:#x} to {needed:#x} of its file, \
                         but the file is {file_len:#x} bytes long"
                    )));
                }
                Data::Flat { file, offset }
            }
            ExtentKind::Sparse => {
                let mut magic = [0u8; 4];
                let file_len = file.len()?;
                if file_len >= 4 {
                    file.read_exact_at(&mut magic, 0)?;
                }
                if &magic == header::COWD_MAGIC {
                    return Err(Error::format(
                        path,
                        format!(
                            "vmdk: extent '{}' (descriptor line {}) is a vmfsSparse (COWD) extent, \
                             which blkverify does not read",
                            line.file_name, line.line
                        ),
                    ));
                }
                if &magic != header::MAGIC {
                    return Err(corrupt(
                        "a SPARSE extent must start with the magic KDMV".to_string(),
                    ));
                }
                let sparse = SparseExtent::open(file)?;
                let capacity = sparse.header().capacity;
                if capacity != line.sectors {
                    return Err(corrupt(format!(
                        "the descriptor says {} sectors, but the extent's header says its capacity is {capacity}",
                        line.sectors
                    )));
                }
                Data::Sparse(Box::new(sparse))
            }
        };
        slots.push(Slot { start, len, data });
        start += len;
    }
    Ok(slots)
}

/// A differencing disk's parent must still be the disk it was made from: its
/// CID must be the child's parentCID (QEMU fails the reads that reach such a
/// parent; we refuse the chain at open).
fn check_parent_cid(
    path: &Path,
    descriptor: &Descriptor,
    name: &str,
    parent: &dyn BlockDriver,
) -> Result<()> {
    let parent_cid = parent
        .info()
        .into_iter()
        .find(|(key, _)| key == "cid")
        .and_then(|(_, value)| u32::from_str_radix(&value, 16).ok());
    if descriptor.parent_cid == NO_PARENT {
        return Err(Error::corrupt(
            path,
            format!(
                "vmdk: parentFileNameHint names '{name}', but parentCID is ffffffff (no parent)"
            ),
        ));
    }
    match parent_cid {
        Some(cid) if cid == descriptor.parent_cid => Ok(()),
        Some(cid) => Err(Error::corrupt(
            path,
            format!(
                "vmdk: parentCID is {:08x}, but the parent '{name}' has CID {cid:08x}: \
                 the parent changed after this disk was made from it",
                descriptor.parent_cid
            ),
        )),
        None => Err(Error::corrupt(
            path,
            format!("vmdk: the parent '{name}' has no CID to check parentCID against"),
        )),
    }
}

impl BlockDriver for Vmdk {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.slots
            .iter()
            .filter_map(|s| match &s.data {
                Data::Sparse(sparse) => Some(sparse.header().grain_bytes()),
                Data::Flat { .. } => None,
            })
            .min()
            .unwrap_or(SECTOR_SIZE)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        let lookup = |guest: u64, max_len: u64| {
            let piece = self.piece(guest, max_len)?;
            Ok((piece.length, piece))
        };
        read_through_map(&self.path, buf, offset, lookup, |out, guest, piece| {
            let slot = self.slot(piece.slot)?;
            match (piece.grain, &slot.data) {
                (Grain::Data { host_offset }, _) => slot.file().read_exact_at(out, host_offset),
                (Grain::Zero, _) => {
                    out.fill(0);
                    Ok(())
                }
                (Grain::Unallocated, _) => read_backing(self.backing(), out, guest),
                (Grain::Compressed { host_offset }, Data::Sparse(sparse)) => {
                    sparse.read_compressed(out, guest - slot.start, host_offset)
                }
                (Grain::Compressed { .. }, Data::Flat { .. }) => Err(Error::Internal(format!(
                    "{}: a flat extent's map gave a compressed grain at guest offset {guest:#x}",
                    self.path.display()
                ))),
            }
        })
    }

    fn read_view(&self, offset: u64, len: usize) -> Result<Option<View>> {
        check_range(&self.path, self.size, offset, len as u64)?;
        let piece = self.piece(offset, len as u64)?;
        if piece.length < len as u64 {
            return Ok(None);
        }
        match piece.grain {
            Grain::Data { host_offset } => Ok(self
                .slots
                .get(piece.slot)
                .and_then(|s| s.file().view(host_offset, len))),
            Grain::Unallocated => match &self.backing {
                Some(backing) if offset + len as u64 <= backing.size() => {
                    backing.read_view(offset, len)
                }
                _ => Ok(None),
            },
            Grain::Zero | Grain::Compressed { .. } => Ok(None),
        }
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_range(&self.path, self.size, offset, max_len.min(1))?;
        let piece = self.piece(offset, max_len.min(self.size - offset))?;
        let mapping = match piece.grain {
            Grain::Data { host_offset } => Mapping::Data { host_offset },
            Grain::Zero => Mapping::Zero { allocated: false },
            Grain::Unallocated => Mapping::Unallocated,
            Grain::Compressed { host_offset } => {
                let (slot, sparse) = match self.slots.get(piece.slot) {
                    Some(
                        slot @ Slot {
                            data: Data::Sparse(sparse),
                            ..
                        },
                    ) => (slot, sparse),
                    _ => {
                        return Err(Error::Internal(format!(
                            "{}: a flat extent's map gave a compressed grain at guest offset {offset:#x}",
                            self.path.display()
                        )))
                    }
                };
                let grain = sparse.header().grain_bytes();
                let grain_start = (offset - slot.start) / grain * grain;
                Mapping::Compressed {
                    host_offset,
                    compressed_size: sparse.compressed_size(host_offset, grain_start)?,
                }
            }
        };
        Ok(Extent {
            offset,
            length: piece.length,
            mapping,
        })
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref()
    }

    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        check_range(&self.path, self.size, offset, 1)?;
        let piece = self.piece(offset, 1)?;
        let slot = self.slot(piece.slot)?;
        let mut tables = Vec::new();
        if self.listed {
            tables.push(TableIndex {
                table: "extent",
                index: piece.slot as u64,
            });
        }
        if let Some((gd_index, gt_index)) = piece.tables {
            tables.push(TableIndex {
                table: "GD",
                index: gd_index,
            });
            tables.push(TableIndex {
                table: "GT",
                index: gt_index,
            });
        }
        // A hole in a flat extent is still the extent's bytes at that offset.
        let grain = match (&slot.data, piece.grain) {
            (Data::Flat { offset: base, .. }, Grain::Zero) => Grain::Data {
                host_offset: base + (offset - slot.start),
            },
            (_, grain) => grain,
        };
        let kind = match grain {
            Grain::Data { .. } => "data",
            Grain::Compressed { .. } => "compressed",
            Grain::Zero => "zero",
            Grain::Unallocated => "unallocated",
        };
        let mut location = Location {
            kind,
            format: Format::Vmdk,
            unit: match slot.data {
                Data::Flat { .. } => "extent",
                Data::Sparse(_) => "grain",
            },
            tables,
            subcluster: None,
            host_offset: None,
            file: slot.file().path().to_path_buf(),
            backing_depth: 0,
        };
        match grain {
            Grain::Data { host_offset } | Grain::Compressed { host_offset } => {
                location.host_offset = Some(host_offset)
            }
            Grain::Zero => {}
            Grain::Unallocated => locate_in_backing(&mut location, self.backing(), offset)?,
        }
        Ok(Some(location))
    }

    fn info(&self) -> Vec<(String, String)> {
        let d = &self.descriptor;
        let sparse: Vec<&SparseExtent> = self
            .slots
            .iter()
            .filter_map(|s| match &s.data {
                Data::Sparse(sparse) => Some(sparse.as_ref()),
                Data::Flat { .. } => None,
            })
            .collect();
        // As QEMU reports it: the grain size when every extent is sparse with
        // the same grain, else 0.
        let grains: Vec<u64> = sparse.iter().map(|s| s.header().grain_bytes()).collect();
        let cluster_size = match grains.first() {
            Some(&g) if grains.len() == self.slots.len() && grains.iter().all(|&x| x == g) => g,
            _ => 0,
        };
        let mut facts = vec![
            ("create_type".to_string(), d.create_type.name().to_string()),
            ("cid".to_string(), format!("{:08x}", d.cid)),
            ("parent_cid".to_string(), format!("{:08x}", d.parent_cid)),
            ("extents".to_string(), self.slots.len().to_string()),
            ("cluster_size".to_string(), cluster_size.to_string()),
        ];
        if let Some(first) = sparse.first() {
            let h = first.header();
            facts.push(("version".to_string(), h.version.to_string()));
            facts.push(("compressed".to_string(), h.compressed.to_string()));
            facts.push(("zeroed_grain".to_string(), h.zeroed_grain.to_string()));
            facts.push((
                "unclean_shutdown".to_string(),
                h.unclean_shutdown.to_string(),
            ));
        }
        // Each extent, as `qemu-img info` lists them.
        for (index, (slot, line)) in self.slots.iter().zip(&d.extents).enumerate() {
            let key = |name: &str| format!("extent.{index}.{name}");
            facts.push((key("filename"), slot.file().path().display().to_string()));
            facts.push((key("virtual_size"), slot.len.to_string()));
            let kind = match line.kind {
                ExtentKind::Flat { .. } => "FLAT",
                ExtentKind::Sparse => "SPARSE",
            };
            facts.push((
                key("format"),
                if self.listed { kind } else { "" }.to_string(),
            ));
            if let Data::Sparse(sparse) = &slot.data {
                let h = sparse.header();
                facts.push((key("cluster_size"), h.grain_bytes().to_string()));
                if h.compressed {
                    facts.push((key("compressed"), "true".to_string()));
                }
            }
        }
        if let Some(parent) = &d.parent_hint {
            facts.push(("backing_file".to_string(), parent.clone()));
            facts.push(("backing_format".to_string(), "vmdk".to_string()));
        }
        facts
    }
}

#[cfg(test)]
mod tests;
