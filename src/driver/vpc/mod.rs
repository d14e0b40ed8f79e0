//! The VHD driver (QEMU's `vpc`), read-only: fixed disks (the data, then the
//! footer), dynamic disks (a footer copy, the dynamic disk header, the BAT,
//! then blocks each led by a sector bitmap) and differencing disks (a dynamic
//! disk whose clear bitmap bits and unallocated blocks read from a parent VHD,
//! found through the parent locators).
//!
//! Everything the reads depend on is checked at open, as QEMU checks it: both
//! footers' checksums (a footer copy that disagrees on a field reads depend on
//! is refused), the dynamic header's checksum, the BAT's size and place, and
//! every BAT entry's block, which must lie inside the file and overlap no
//! metadata and no other block. QEMU reads a block's data whatever its sector
//! bitmap says; we follow the bitmap, as the specification does (QEMU's own
//! images set every bit of every block they allocate, so the two agree on
//! them).

pub mod dynamic;
pub mod footer;
pub mod parent;

use super::read::{map_flat, read_backing, read_mapped, view_through_map};
use super::{
    check_range, gate, BlockDriver, Extent, Format, Location, Mapping, OpenOptions, TableIndex,
    MAX_TABLE_BYTES, SECTOR_SIZE,
};
use crate::error::{usize_of, Error, Result};
use crate::storage::{Storage, View};
use dynamic::{DynamicHeader, UNALLOCATED};
use footer::{Footer, FOOTER_SIZE, TYPE_DIFFERENCING, TYPE_FIXED};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Whether the last sector of `storage` is a valid fixed-disk footer: the
/// probe for fixed VHDs, which have no magic at the start (QEMU probes them as
/// raw). The checksum must be right, so a raw disk whose last sector merely
/// starts with `conectix` stays raw.
pub fn has_fixed_footer(storage: &dyn Storage) -> Result<bool> {
    let len = storage.len()?;
    if len < FOOTER_SIZE as u64 {
        return Ok(false);
    }
    let mut tail = [0u8; FOOTER_SIZE];
    storage.read_exact_at(&mut tail, len - FOOTER_SIZE as u64)?;
    Ok(footer::is_valid(&tail) && footer::be_u32(&tail, 60) == TYPE_FIXED)
}

/// What a block's sector bitmap holds, learnt on first use.
const BITMAP_UNKNOWN: u8 = 0;
const BITMAP_FULL: u8 = 1;
const BITMAP_EMPTY: u8 = 2;
const BITMAP_MIXED: u8 = 3;

/// The BAT and the blocks of a dynamic or differencing disk.
struct Sparse {
    header: DynamicHeader,
    header_offset: u64,
    bat: Vec<u32>,
    block_size: u64,
    bitmap_size: u64,
    /// One of the `BITMAP_*` values per BAT entry.
    bitmap_states: Vec<AtomicU8>,
    /// The last mixed bitmap read, so runs of small extents in one block read
    /// it once.
    last_bitmap: Mutex<Option<(u64, Arc<[u8]>)>>,
}

/// An open VHD.
pub struct Vpc {
    file: Arc<dyn Storage>,
    footer: Footer,
    size: u64,
    /// `None` for a fixed disk.
    sparse: Option<Sparse>,
    /// Whether the end of the file holds a valid footer (always, for fixed
    /// disks; sparse disks read their copy at offset 0).
    trailing_footer: bool,
    backing: Option<Arc<dyn BlockDriver>>,
    /// The parent as the image names it, for messages and `info`.
    parent_name: Option<String>,
}

impl Vpc {
    /// Open a VHD on `file`, following a differencing disk's parent as
    /// `options` allow. `chain` holds the canonical paths of the images above.
    pub fn open(file: Arc<dyn Storage>, options: &OpenOptions, chain: &[PathBuf]) -> Result<Vpc> {
        let path = file.path().to_path_buf();
        let file_len = file.len()?;
        if file_len < FOOTER_SIZE as u64 {
            return Err(Error::corrupt(
                &path,
                format!("vpc: file is {file_len} bytes, too short to hold a VHD footer"),
            ));
        }
        let tail_at = file_len - FOOTER_SIZE as u64;
        let mut head = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut head, 0)?;
        let mut tail = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut tail, tail_at)?;

        // As QEMU does: the copy at offset 0 if there is one (sparse disks),
        // else the footer at the end (fixed disks).
        let (footer, trailing_footer) = if head.starts_with(footer::COOKIE) {
            let footer = Footer::parse(&path, &head, 0)?;
            if footer.disk_type == TYPE_FIXED {
                return Err(Error::corrupt(
                    &path,
                    "vpc: the footer at 0x0 says the disk is fixed, but a fixed disk has its only footer at the end of the file",
                ));
            }
            let trailing = tail_at >= FOOTER_SIZE as u64 && footer::is_valid(&tail);
            if trailing {
                let copy = Footer::parse(&path, &tail, tail_at)?;
                if let Some(field) = footer.first_difference(&copy) {
                    return Err(Error::corrupt(
                        &path,
                        format!(
                            "vpc: the footer at the end of the file ({tail_at:#x}) and its copy at 0x0 differ in the {field}"
                        ),
                    ));
                }
            }
            (footer, trailing)
        } else {
            if !tail.starts_with(footer::COOKIE) {
                return Err(Error::format(
                    &path,
                    "vpc: no VHD footer (cookie 'conectix') at the start or the end of the file: not a VHD image",
                ));
            }
            let footer = Footer::parse(&path, &tail, tail_at)?;
            if footer.disk_type != TYPE_FIXED {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "vpc: the footer at the end of the file says the disk is {}, but there is no copy at 0x0, which {} disks have",
                        footer.type_name(),
                        footer.type_name()
                    ),
                ));
            }
            (footer, true)
        };
        let size = footer.disk_size(&path)?;

        if footer.disk_type == TYPE_FIXED {
            if size > tail_at {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "vpc: disk size is {size} bytes, more than the {tail_at} bytes of data before the footer"
                    ),
                ));
            }
            return Ok(Vpc {
                file,
                footer,
                size,
                sparse: None,
                trailing_footer,
                backing: None,
                parent_name: None,
            });
        }

        let sparse = open_sparse(file.as_ref(), &footer, size, file_len, trailing_footer)?;
        let mut image = Vpc {
            file,
            footer,
            size,
            sparse: Some(sparse),
            trailing_footer,
            backing: None,
            parent_name: None,
        };
        if image.footer.disk_type == TYPE_DIFFERENCING {
            image.open_parent(file_len, options, chain)?;
        }
        Ok(image)
    }

    /// Find and open a differencing disk's parent (or only name it, when the
    /// policy says not to follow parents).
    fn open_parent(
        &mut self,
        file_len: u64,
        options: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<()> {
        let path = self.file.path().to_path_buf();
        let Some(sparse) = &self.sparse else {
            return Ok(());
        };
        let candidates = parent::candidates(&path, self.file.as_ref(), &sparse.header, file_len)?;
        let dir = gate::image_dir(&path);
        // Without a parent to open, the name is only reported: no file is looked up.
        let usable = candidates
            .iter()
            .filter_map(|c| c.name.as_ref().ok().map(|n| (c, n)))
            .find(|(_, name)| options.backing.follow && gate::resolve_relative(dir, name).exists());
        self.parent_name = usable
            .map(|(_, n)| n.clone())
            .or_else(|| candidates.iter().find_map(|c| c.name.clone().ok()))
            .or_else(|| candidates.first().map(|c| c.stored.clone()));
        if !options.backing.follow {
            return Ok(());
        }
        let Some((_, name)) = usable else {
            let tried: Vec<String> = candidates
                .iter()
                .map(|c| match &c.name {
                    Ok(n) => format!(
                        "{} '{}' ({}: not found)",
                        c.source,
                        c.stored,
                        gate::resolve_relative(dir, n).display()
                    ),
                    Err(why) => format!("{} '{}' ({why})", c.source, c.stored),
                })
                .collect();
            return Err(Error::io(
                &path,
                format!(
                    "vpc: cannot find the parent of this differencing disk (tried: {}; read without it with --no-backing)",
                    if tried.is_empty() {
                        "nothing: the image names no parent".to_string()
                    } else {
                        tried.join(", ")
                    }
                ),
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        };
        let parent = gate::open_backing(&path, "vpc", name, Some("vpc"), options, chain)?;
        let want = footer::uuid_string(&sparse.header.parent_unique_id);
        let got = parent
            .info()
            .into_iter()
            .find(|(k, _)| k == "unique_id")
            .map(|(_, v)| v)
            .unwrap_or_default();
        if got != want {
            return Err(Error::corrupt(
                &path,
                format!(
                    "vpc: parent '{name}' ({}) has unique id {got}, but this differencing disk was made from {want}",
                    parent.path().display()
                ),
            ));
        }
        self.backing = Some(parent);
        Ok(())
    }

    /// The disk's footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
}

/// Read and check the dynamic header and the BAT.
fn open_sparse(
    file: &dyn Storage,
    footer: &Footer,
    size: u64,
    file_len: u64,
    trailing_footer: bool,
) -> Result<Sparse> {
    let path = file.path();
    let corrupt = |msg: String| Error::corrupt(path, format!("vpc: {msg}"));
    let header_offset = footer.data_offset;
    let header_len = dynamic::HEADER_SIZE as u64;
    if header_offset
        .checked_add(header_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(corrupt(format!(
            "footer's data offset {header_offset:#x}: the dynamic disk header there lies past the end of the file (size {file_len:#x})"
        )));
    }
    let mut raw_header = vec![0u8; dynamic::HEADER_SIZE];
    file.read_exact_at(&mut raw_header, header_offset)?;
    let header = DynamicHeader::parse(path, &raw_header, header_offset)?;
    let block_size = u64::from(header.block_size);
    let bitmap_size = header.bitmap_size();
    let bat_offset = header.table_offset;
    let bat_bytes = check_bat_place(&header, size, file_len, &corrupt)?;
    // Metadata no block may overlap, and that must not overlap each other.
    let mut regions: Vec<(&str, u64, u64)> = vec![
        ("the footer copy", 0, FOOTER_SIZE as u64),
        ("the dynamic disk header", header_offset, header_len),
        ("the BAT", bat_offset, bat_bytes),
    ];
    if trailing_footer {
        regions.push((
            "the footer",
            file_len - FOOTER_SIZE as u64,
            FOOTER_SIZE as u64,
        ));
    }
    for (i, &(what, at, len)) in regions.iter().enumerate() {
        for &(other, other_at, other_len) in regions.iter().take(i) {
            if overlaps(at, len, other_at, other_len) {
                return Err(corrupt(format!(
                    "{what} at {at:#x} overlaps {other} at {other_at:#x}"
                )));
            }
        }
    }
    let mut raw_bat = vec![0u8; usize_of(bat_bytes)?];
    file.read_exact_at(&mut raw_bat, bat_offset)?;
    let bat: Vec<u32> = raw_bat
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    drop(raw_bat);
    check_blocks(
        &bat,
        bitmap_size + block_size,
        block_size,
        &regions,
        file_len,
        &corrupt,
    )?;
    let bitmap_states = (0..bat.len())
        .map(|_| AtomicU8::new(BITMAP_UNKNOWN))
        .collect();
    Ok(Sparse {
        header,
        header_offset,
        bat,
        block_size,
        bitmap_size,
        bitmap_states,
        last_bitmap: Mutex::new(None),
    })
}

/// The BAT's size: it must map the whole disk, stay within the table cap
/// and lie in the file.
fn check_bat_place(
    header: &DynamicHeader,
    size: u64,
    file_len: u64,
    corrupt: &impl Fn(String) -> Error,
) -> Result<u64> {
    let covered = u64::from(header.max_table_entries) * u64::from(header.block_size);
    if covered < size {
        return Err(corrupt(format!(
            "max_table_entries is {}: the BAT maps {covered} bytes, less than the disk size {size}",
            header.max_table_entries
        )));
    }
    let bat_bytes = header.bat_bytes();
    if bat_bytes > MAX_TABLE_BYTES {
        return Err(corrupt(format!(
            "max_table_entries is {}, a BAT of {bat_bytes} bytes (the limit is {})",
            header.max_table_entries, MAX_TABLE_BYTES
        )));
    }
    let bat_offset = header.table_offset;
    if bat_offset
        .checked_add(bat_bytes)
        .is_none_or(|end| end > file_len)
    {
        return Err(corrupt(format!(
            "BAT at {bat_offset:#x} ({bat_bytes} bytes) lies past the end of the file (size {file_len:#x})"
        )));
    }
    Ok(bat_bytes)
}

/// Every BAT entry, as QEMU checks them at open (it refuses an image with a
/// block past the end of the file), and more: no block (its bitmap and data,
/// `span` bytes) may overlap the metadata `regions` or another block.
fn check_blocks(
    bat: &[u32],
    span: u64,
    block_size: u64,
    regions: &[(&str, u64, u64)],
    file_len: u64,
    corrupt: &impl Fn(String) -> Error,
) -> Result<()> {
    let mut starts: Vec<u64> = Vec::new();
    for (index, &entry) in bat.iter().enumerate() {
        if entry == UNALLOCATED {
            continue;
        }
        let start = u64::from(entry) * SECTOR_SIZE;
        let guest = index as u64 * block_size;
        if start + span > file_len {
            return Err(corrupt(format!(
                "BAT entry {index} (guest offset {guest:#x}) puts its block at {start:#x}, past the end of the file (size {file_len:#x})"
            )));
        }
        if let Some((what, at, _)) = regions
            .iter()
            .find(|&&(_, at, len)| overlaps(start, span, at, len))
        {
            return Err(corrupt(format!(
                "BAT entry {index} (guest offset {guest:#x}) puts its block at {start:#x}, on top of {what} at {at:#x}"
            )));
        }
        starts.push((u64::from(entry) << 32) | index as u64);
    }
    starts.sort_unstable();
    for pair in starts.windows(2) {
        let [a, b] = *pair else { continue };
        if (b >> 32) * SECTOR_SIZE < (a >> 32) * SECTOR_SIZE + span {
            return Err(corrupt(format!(
                "BAT entries {} and {} put their blocks at {:#x} and {:#x}, which overlap",
                a & 0xffff_ffff,
                b & 0xffff_ffff,
                (a >> 32) * SECTOR_SIZE,
                (b >> 32) * SECTOR_SIZE
            )));
        }
    }
    Ok(())
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl Sparse {
    /// The BAT entry of block `block` of the image at `path`. Open made sure
    /// the table covers the disk, so a block past it is a bug, never an
    /// unallocated block.
    fn entry(&self, path: &Path, block: u64) -> Result<u32> {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "{}: block {block} lies past the BAT's {} entries",
                    path.display(),
                    self.bat.len()
                ))
            })
    }

    /// Where block `block`'s bitmap starts.
    fn bitmap_offset(&self, entry: u32) -> u64 {
        u64::from(entry) * SECTOR_SIZE
    }

    /// Read block `block`'s sector bitmap (`entry` is its BAT entry).
    fn bitmap(&self, file: &dyn Storage, block: u64, entry: u32) -> Result<Arc<[u8]>> {
        let mut last = self
            .last_bitmap
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((cached, bitmap)) = last.as_ref() {
            if *cached == block {
                return Ok(bitmap.clone());
            }
        }
        let mut bytes = vec![0u8; usize_of(self.bitmap_size)?];
        file.read_exact_at(&mut bytes, self.bitmap_offset(entry))?;
        let bitmap: Arc<[u8]> = Arc::from(bytes);
        *last = Some((block, bitmap.clone()));
        Ok(bitmap)
    }

    /// Whether block `block`'s bitmap is all set, all clear or mixed.
    fn bitmap_state(&self, file: &dyn Storage, block: u64, entry: u32) -> Result<u8> {
        let slot = usize::try_from(block)
            .ok()
            .and_then(|i| self.bitmap_states.get(i));
        if let Some(state) = slot.map(|s| s.load(Ordering::Relaxed)) {
            if state != BITMAP_UNKNOWN {
                return Ok(state);
            }
        }
        let bitmap = self.bitmap(file, block, entry)?;
        // Only the bits of the block's sectors count; the padding may hold anything.
        // A u32 block size's bitmap is at most 1 MiB: it fits a usize.
        let used = (self.block_size / SECTOR_SIZE / 8) as usize;
        let bits = bitmap.get(..used).unwrap_or(&[]);
        let state = if bits.iter().all(|&b| b == 0xff) {
            BITMAP_FULL
        } else if bits.iter().all(|&b| b == 0) {
            BITMAP_EMPTY
        } else {
            BITMAP_MIXED
        };
        if let Some(s) = slot {
            s.store(state, Ordering::Relaxed);
        }
        Ok(state)
    }

    /// The extent at `offset`, at most up to `limit` (a guest offset).
    fn map(&self, file: &dyn Storage, offset: u64, limit: u64) -> Result<Extent> {
        let block = offset / self.block_size;
        let in_block = offset % self.block_size;
        let block_end = (block + 1) * self.block_size;
        let entry = self.entry(file.path(), block)?;
        let data_start = self.bitmap_offset(entry) + self.bitmap_size;
        let (length, mapping) = match entry {
            UNALLOCATED => (block_end.min(limit) - offset, Mapping::Unallocated),
            _ => match self.bitmap_state(file, block, entry)? {
                BITMAP_FULL => (
                    block_end.min(limit) - offset,
                    Mapping::Data {
                        host_offset: data_start + in_block,
                    },
                ),
                BITMAP_EMPTY => (block_end.min(limit) - offset, Mapping::Unallocated),
                _ => {
                    let bitmap = self.bitmap(file, block, entry)?;
                    let sector = in_block / SECTOR_SIZE;
                    let sectors = self.block_size / SECTOR_SIZE;
                    let run = dynamic::run_length(&bitmap, sector, sectors);
                    let run_end = block * self.block_size + (sector + run) * SECTOR_SIZE;
                    let length = run_end.min(limit) - offset;
                    if dynamic::bit(&bitmap, sector) {
                        (
                            length,
                            Mapping::Data {
                                host_offset: data_start + in_block,
                            },
                        )
                    } else {
                        (length, Mapping::Unallocated)
                    }
                }
            },
        };
        // Unallocated ranges run on over following unallocated or empty
        // blocks, and into the clear sectors that start a mixed one.
        let mut end = offset + length;
        if mapping == Mapping::Unallocated && end == block_end {
            let mut next = block + 1;
            while end < limit {
                let entry = self.entry(file.path(), next)?;
                let state = match entry {
                    UNALLOCATED => BITMAP_EMPTY,
                    _ => self.bitmap_state(file, next, entry)?,
                };
                if state == BITMAP_MIXED {
                    let bitmap = self.bitmap(file, next, entry)?;
                    if !dynamic::bit(&bitmap, 0) {
                        end += dynamic::run_length(&bitmap, 0, self.block_size / SECTOR_SIZE)
                            * SECTOR_SIZE;
                    }
                    break;
                }
                if state != BITMAP_EMPTY {
                    break;
                }
                end += self.block_size;
                next += 1;
            }
        }
        let length = end.min(limit) - offset;
        Ok(Extent {
            offset,
            length,
            mapping,
        })
    }
}

impl BlockDriver for Vpc {
    fn format(&self) -> Format {
        Format::Vpc
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.sparse.as_ref().map_or(SECTOR_SIZE, |s| s.block_size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size, offset, buf.len() as u64)?;
        if self.sparse.is_none() {
            return self.file.read_exact_at(buf, offset);
        }
        read_mapped(self, buf, offset, |piece, guest, mapping| {
            match mapping {
            Mapping::Data { host_offset } => self.file.read_exact_at(piece, host_offset),
            Mapping::Unallocated => read_backing(self.backing(), piece, guest),
            Mapping::Zero { .. } => {
                piece.fill(0);
                Ok(())
            }
            Mapping::Compressed { .. } => Err(Error::Internal(format!(
                "{}: the vpc map gave a compressed extent at guest offset {guest:#x}; VHD has no compressed blocks",
                self.path().display()
            ))),
        }
        })
    }

    fn read_view(&self, offset: u64, len: usize) -> Result<Option<View>> {
        view_through_map(self, self.file.as_ref(), self.backing.as_ref(), offset, len)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_range(self.path(), self.size, offset, max_len.min(1))?;
        match &self.sparse {
            None => map_flat(self.file.as_ref(), self.size, offset, max_len),
            Some(sparse) => {
                let limit = offset.saturating_add(max_len.max(1)).min(self.size);
                sparse.map(self.file.as_ref(), offset, limit)
            }
        }
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref()
    }

    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let extent = self.map(offset, 1)?;
        let mut location = Location {
            kind: extent.mapping.kind(),
            format: Format::Vpc,
            unit: if self.sparse.is_some() {
                "block"
            } else {
                "sector"
            },
            tables: Vec::new(),
            subcluster: None,
            host_offset: None,
            file: self.path().to_path_buf(),
            backing_depth: 0,
        };
        if let Some(sparse) = &self.sparse {
            let block = offset / sparse.block_size;
            location.tables.push(TableIndex {
                table: "BAT",
                index: block,
            });
            if sparse.entry(self.path(), block)? != UNALLOCATED
                && extent.mapping == Mapping::Unallocated
            {
                // An allocated block whose bitmap sends this sector elsewhere.
                location.tables.push(TableIndex {
                    table: "bitmap",
                    index: offset % sparse.block_size / SECTOR_SIZE,
                });
            }
        }
        match extent.mapping {
            Mapping::Data { host_offset } => location.host_offset = Some(host_offset),
            Mapping::Unallocated => {
                if let Some(backing) = self.backing.as_deref().filter(|b| offset < b.size()) {
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
                }
            }
            Mapping::Zero { .. } | Mapping::Compressed { .. } => {}
        }
        Ok(Some(location))
    }

    fn info(&self) -> Vec<(String, String)> {
        let f = &self.footer;
        let (c, h, s) = f.geometry;
        let mut facts = vec![
            ("subformat".to_string(), f.type_name().to_string()),
            ("creator_app".to_string(), footer::tag(&f.creator_app)),
            (
                "size_from".to_string(),
                if f.sized_by_geometry() {
                    "geometry"
                } else {
                    "current_size"
                }
                .to_string(),
            ),
            ("geometry".to_string(), format!("{c}/{h}/{s}")),
            ("current_size".to_string(), f.current_size.to_string()),
            ("unique_id".to_string(), footer::uuid_string(&f.unique_id)),
            (
                "footer_at_end".to_string(),
                self.trailing_footer.to_string(),
            ),
        ];
        if let Some(sparse) = &self.sparse {
            facts.push(("block_size".to_string(), sparse.block_size.to_string()));
            facts.push((
                "max_table_entries".to_string(),
                sparse.header.max_table_entries.to_string(),
            ));
            facts.push((
                "header_offset".to_string(),
                format!("{:#x}", sparse.header_offset),
            ));
            facts.push((
                "bat_offset".to_string(),
                format!("{:#x}", sparse.header.table_offset),
            ));
            if f.disk_type == TYPE_DIFFERENCING {
                facts.push((
                    "parent_unique_id".to_string(),
                    footer::uuid_string(&sparse.header.parent_unique_id),
                ));
                if let Some(name) = &self.parent_name {
                    facts.push(("backing_file".to_string(), name.clone()));
                }
            }
        }
        facts
    }
}
