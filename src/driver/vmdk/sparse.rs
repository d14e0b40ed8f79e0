//! One hosted sparse extent: its header (or footer), the grain directory (GD)
//! and grain tables (GT) that map the extent's grains, and reading grains,
//! plain or compressed.
//!
//! A guest offset in the extent is grain `g = offset / grainSize`; GD entry
//! `g / numGTEsPerGT` holds the sector of a grain table, whose entry
//! `g % numGTEsPerGT` holds the grain's sector: 0 for an unallocated grain
//! (read from the parent, or zeros), 1 for a zero grain when the `zeroed_grain`
//! flag is set, else where the grain (or its grain marker, when compressed)
//! starts. Grain tables are checked when first loaded and kept in a bounded
//! cache; the grain directory is loaded whole at open (at most 32 MiB).

use super::header::{self, Header};
use super::stream::{self, GRAIN_MARKER_BYTES};
use crate::driver::cache::{L2Cache, L2Table};
use crate::driver::SECTOR_SIZE;
use crate::error::{usize_of, Error, Result};
use crate::storage::Storage;
use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Grain tables cached per extent (at most 16 MiB of decoded entries).
const GT_CACHE_TABLES: u64 = 4096;

static NEXT_EXTENT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last grain this thread inflated: (extent id, host offset, bytes),
    /// so small reads inside one compressed grain inflate it once.
    static LAST_GRAIN: RefCell<(u64, u64, Vec<u8>)> = const { RefCell::new((0, u64::MAX, Vec::new())) };
    /// The compressed stream being read (grows to the largest one seen, at
    /// most two grains).
    static STREAM: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What a grain table entry says about a grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not stored here: the parent's bytes, or zeros.
    Unallocated,
    /// Reads as zeros (`zeroed_grain`).
    Zero,
    /// Stored as is, from this byte offset of the file.
    Data {
        /// Byte offset of the piece's first byte in the file.
        host_offset: u64,
    },
    /// A compressed grain whose grain marker starts at this byte offset.
    Compressed {
        /// Byte offset of the grain marker.
        host_offset: u64,
    },
}

/// A run of grains with one kind of mapping, inside one grain table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Bytes from the offset asked for.
    pub length: u64,
    /// What maps it.
    pub grain: Grain,
    /// The grain directory entry used.
    pub gd_index: u64,
    /// The grain table entry of the first grain.
    pub gt_index: u64,
}

/// An open sparse extent.
pub struct SparseExtent {
    id: u64,
    file: Arc<dyn Storage>,
    header: Header,
    /// The file's length at open (it is opened read-only).
    file_len: u64,
    /// Grain directory entries: sectors of grain tables, 0 for none.
    gd: Vec<u32>,
    cache: L2Cache,
    /// The embedded descriptor's bytes (up to its first NUL), if it has one.
    descriptor: Option<Vec<u8>>,
}

impl SparseExtent {
    /// Open the sparse extent in `file` (which starts with "KDMV"), reading its
    /// footer when the grain directory is at the end, its grain directory and
    /// its embedded descriptor.
    pub fn open(file: Arc<dyn Storage>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let file_len = file.len()?;
        let corrupt = |m: String| Error::corrupt(&path, format!("vmdk: {m}"));
        if file_len < header::HEADER_BYTES as u64 {
            return Err(corrupt(format!(
                "the file is {file_len} bytes, shorter than a sparse extent header (512)"
            )));
        }
        let mut first = [0u8; header::HEADER_BYTES];
        file.read_exact_at(&mut first, 0)?;
        let raw = header::decode(&first)
            .ok_or_else(|| corrupt("the sparse extent does not start with KDMV".to_string()))?;
        let header = if raw.gd_offset == header::GD_AT_END {
            let footer = stream::read_footer(file.as_ref(), file_len)?;
            for (field, head, foot) in [
                ("capacity", raw.capacity, footer.capacity),
                ("grainSize", raw.grain_size, footer.grain_size),
                (
                    "numGTEsPerGT",
                    u64::from(raw.gtes_per_gt),
                    u64::from(footer.gtes_per_gt),
                ),
            ] {
                if head != foot {
                    return Err(corrupt(format!(
                        "the header says {field} {head}, the footer says {foot}"
                    )));
                }
            }
            if footer.gd_offset == header::GD_AT_END {
                return Err(corrupt(
                    "the footer's gdOffset is 0xffffffffffffffff too: the grain directory is nowhere"
                        .to_string(),
                ));
            }
            header::check(&path, "footer", &footer, file_len)?
        } else {
            header::check(&path, "header", &raw, file_len)?
        };

        let gd_bytes = usize_of(header.gd_bytes())?;
        let mut raw_gd = vec![0u8; gd_bytes];
        file.read_exact_at(&mut raw_gd, header.gd_offset)?;
        let gd = raw_gd
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let descriptor = match header.descriptor {
            None => None,
            Some((at, len)) => {
                let mut bytes = vec![0u8; usize_of(len)?];
                file.read_exact_at(&mut bytes, at)?;
                let text_len = super::descriptor::text_of(&bytes).len();
                bytes.truncate(text_len);
                Some(bytes)
            }
        };
        let capacity = usize::try_from(header.gd_entries().min(GT_CACHE_TABLES)).unwrap_or(4);
        Ok(SparseExtent {
            id: NEXT_EXTENT_ID.fetch_add(1, Ordering::Relaxed),
            file,
            header,
            file_len,
            gd,
            cache: L2Cache::new(capacity),
            descriptor,
        })
    }

    /// The checked header (the footer's, for stream-optimized files with one).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The embedded descriptor's text, if the header points at one.
    pub fn descriptor(&self) -> Option<&[u8]> {
        self.descriptor.as_deref()
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn corrupt(&self, message: String) -> Error {
        Error::corrupt(self.path(), format!("vmdk: {message}"))
    }

    /// The grain table of GD entry `gd_index`, or `None` if it has none.
    fn grain_table(&self, gd_index: u64) -> Result<Option<L2Table>> {
        let entry = usize::try_from(gd_index)
            .ok()
            .and_then(|i| self.gd.get(i))
            .copied()
            .ok_or_else(|| {
                self.corrupt(format!(
                    "GD index {gd_index} is past the grain directory's {} entries",
                    self.gd.len()
                ))
            })?;
        if entry == 0 {
            return Ok(None);
        }
        let gt_offset = u64::from(entry) * SECTOR_SIZE;
        let table = self.cache.get_or_load(gt_offset, || {
            let gt_bytes = self.header.gt_bytes();
            if gt_offset + gt_bytes > self.file_len {
                return Err(self.corrupt(format!(
                    "GD index {gd_index}: grain table at {gt_offset:#x} lies past the end of the file (size {:#x})",
                    self.file_len
                )));
            }
            let gd_offset = self.header.gd_offset;
            if gt_offset < gd_offset + self.header.gd_bytes() && gd_offset < gt_offset + gt_bytes {
                return Err(self.corrupt(format!(
                    "GD index {gd_index}: grain table at {gt_offset:#x} overlaps the grain directory (at {gd_offset:#x})"
                )));
            }
            let mut raw = vec![0u8; usize_of(gt_bytes)?];
            self.file.read_exact_at(&mut raw, gt_offset)?;
            let entries: Vec<u64> = raw
                .chunks_exact(4)
                .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            Ok(Arc::from(entries))
        })?;
        Ok(Some(table))
    }

    /// Decode grain table entry `gt_index` of GD entry `gd_index`, for the
    /// grain at extent offset `grain_start`.
    fn decode(&self, gte: u64, gd_index: u64, gt_index: u64, grain_start: u64) -> Result<Grain> {
        let h = &self.header;
        match gte {
            0 => return Ok(Grain::Unallocated),
            1 if h.zeroed_grain => return Ok(Grain::Zero),
            _ => {}
        }
        let host_offset = gte * SECTOR_SIZE;
        if gte < h.overhead {
            return Err(self.corrupt(format!(
                "GD index {gd_index}, GT index {gt_index}: grain at sector {gte:#x} lies inside \
                 the metadata area (overHead is {:#x} sectors)",
                h.overhead
            )));
        }
        if h.compressed {
            return Ok(Grain::Compressed { host_offset });
        }
        let needed = h.grain_bytes().min(h.capacity_bytes() - grain_start);
        if host_offset + needed > self.file_len {
            return Err(self.corrupt(format!(
                "GD index {gd_index}, GT index {gt_index}: grain at host offset {host_offset:#x} \
                 lies past the end of the file (size {:#x})",
                self.file_len
            )));
        }
        Ok(Grain::Data { host_offset })
    }

    /// The run of grains at extent offset `offset`, at most `max_len` bytes
    /// long, never past the grain table that maps `offset` nor the extent's end.
    pub fn run(&self, offset: u64, max_len: u64) -> Result<Run> {
        let h = &self.header;
        let grain = h.grain_bytes();
        let gtes = u64::from(h.gtes_per_gt);
        let grain_index = offset / grain;
        let (gd_index, gt_index) = (grain_index / gtes, grain_index % gtes);
        let table_end = (gd_index + 1).saturating_mul(h.gt_span());
        let limit = offset
            .saturating_add(max_len.max(1))
            .min(table_end)
            .min(h.capacity_bytes());
        let Some(table) = self.grain_table(gd_index)? else {
            return Ok(Run {
                length: limit - offset,
                grain: Grain::Unallocated,
                gd_index,
                gt_index,
            });
        };
        // A grain table holds every entry of its span: an index past it is a
        // bug, never an unallocated grain.
        let entry = |index: u64| {
            usize::try_from(index)
                .ok()
                .and_then(|i| table.get(i))
                .copied()
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "{}: grain table entry {index} of GD entry {gd_index} lies past the table's {} entries",
                        self.file.path().display(),
                        table.len()
                    ))
                })
        };
        let within = offset % grain;
        let first = match self.decode(entry(gt_index)?, gd_index, gt_index, offset - within)? {
            Grain::Data { host_offset } => Grain::Data {
                host_offset: host_offset + within,
            },
            other => other,
        };
        let mut end = offset - within + grain;
        if !matches!(first, Grain::Compressed { .. }) {
            // Extend over following grains mapped the same way (data: at
            // contiguous host offsets).
            while end < limit {
                let index = end / grain % gtes;
                let next = self.decode(entry(index)?, gd_index, index, end)?;
                let continues = match (first, next) {
                    (Grain::Data { host_offset }, Grain::Data { host_offset: h }) => {
                        h == host_offset + (end - offset)
                    }
                    (a, b) => a == b && !matches!(a, Grain::Data { .. }),
                };
                if !continues {
                    break;
                }
                end += grain;
            }
        }
        Ok(Run {
            length: end.min(limit) - offset,
            grain: first,
            gd_index,
            gt_index,
        })
    }

    /// The stored length of the compressed grain whose marker is at
    /// `host_offset`, marker included, after checking the marker.
    pub fn compressed_size(&self, host_offset: u64, grain_start: u64) -> Result<u64> {
        let (_, size) = self.grain_marker(host_offset, grain_start)?;
        Ok(GRAIN_MARKER_BYTES + u64::from(size))
    }

    /// Read and check the grain marker at `host_offset` of the grain at extent
    /// offset `grain_start`: returns its sector and stream length.
    fn grain_marker(&self, host_offset: u64, grain_start: u64) -> Result<(u64, u32)> {
        let what = || {
            let g = grain_start / self.header.grain_bytes();
            let gtes = u64::from(self.header.gtes_per_gt);
            format!(
                "GD index {}, GT index {}: compressed grain at host offset {host_offset:#x}",
                g / gtes,
                g % gtes
            )
        };
        if host_offset + GRAIN_MARKER_BYTES > self.file_len {
            return Err(self.corrupt(format!(
                "{} lies past the end of the file (size {:#x})",
                what(),
                self.file_len
            )));
        }
        let mut marker = [0u8; GRAIN_MARKER_BYTES as usize];
        self.file.read_exact_at(&mut marker, host_offset)?;
        let (lba, size) = stream::grain_marker(&marker);
        let sector = grain_start / SECTOR_SIZE;
        if lba != sector {
            return Err(self.corrupt(format!(
                "{}: its grain marker says sector {lba:#x}, but the grain table maps it at sector {sector:#x}",
                what()
            )));
        }
        let max = 2 * self.header.grain_bytes();
        if size == 0 || u64::from(size) > max {
            return Err(self.corrupt(format!(
                "{}: its grain marker says the stream is {size} bytes (it must be 1 to {max}, twice a grain)",
                what()
            )));
        }
        let end = host_offset + GRAIN_MARKER_BYTES + u64::from(size);
        if end > self.file_len {
            return Err(self.corrupt(format!(
                "{}: its {size}-byte stream runs past the end of the file (size {:#x})",
                what(),
                self.file_len
            )));
        }
        Ok((lba, size))
    }

    /// Inflate the compressed grain at extent offset `grain_start` (marker at
    /// `host_offset`) into `out`, which holds a whole grain. The stream must
    /// hold at least the grain's bytes inside the extent, and no more than a
    /// grain.
    fn inflate_grain(&self, host_offset: u64, grain_start: u64, out: &mut [u8]) -> Result<()> {
        let (_, size) = self.grain_marker(host_offset, grain_start)?;
        let grain = self.header.grain_bytes();
        let needed = grain.min(self.header.capacity_bytes() - grain_start);
        STREAM.with(|cell| {
            let mut stream = cell.borrow_mut();
            // At most twice a grain (checked by grain_marker): it fits a usize.
            let n = size as usize;
            if stream.len() < n {
                stream.resize(n, 0);
            }
            let input = stream.get_mut(..n).unwrap_or(&mut []);
            self.file
                .read_exact_at(input, host_offset + GRAIN_MARKER_BYTES)?;
            let describe = |e: String| {
                let g = grain_start / grain;
                let gtes = u64::from(self.header.gtes_per_gt);
                self.corrupt(format!(
                    "GD index {}, GT index {}: compressed grain at host offset {host_offset:#x} ({size} bytes): {e}",
                    g / gtes,
                    g % gtes
                ))
            };
            let held = stream::inflate(input, out).map_err(describe)?;
            if (held as u64) < needed {
                return Err(describe(format!(
                    "zlib stream holds {held} bytes, not a whole grain ({needed})"
                )));
            }
            Ok(())
        })
    }

    /// Fill `buf` with the bytes at extent offset `offset` of the compressed
    /// grain whose marker is at `host_offset` (`buf` stays inside the grain).
    pub fn read_compressed(&self, buf: &mut [u8], offset: u64, host_offset: u64) -> Result<()> {
        let grain = self.header.grain_bytes();
        let within = offset % grain;
        let grain_start = offset - within;
        let grain_len = usize_of(grain)?;
        if within == 0 && buf.len() == grain_len {
            // A whole grain (the verifier's case): inflate in place, and leave
            // the one-grain cache to small reads.
            return self.inflate_grain(host_offset, grain_start, buf);
        }
        let id = self.id;
        LAST_GRAIN.with(|cell| {
            let mut last = cell.borrow_mut();
            if last.0 != id || last.1 != host_offset || last.2.len() != grain_len {
                last.1 = u64::MAX;
                last.2.resize(grain_len, 0);
                self.inflate_grain(host_offset, grain_start, &mut last.2)?;
                last.0 = id;
                last.1 = host_offset;
            }
            let from = usize::try_from(within).unwrap_or(usize::MAX);
            let src = last
                .2
                .get(from..from.saturating_add(buf.len()))
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "{}: a compressed read at {within:#x} in the grain at {grain_start:#x} crosses the grain",
                        self.file.path().display()
                    ))
                })?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }
}
