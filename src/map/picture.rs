//! The allocation map cut into a bounded number of cells, for drawing: each
//! cell covers a power-of-two guest range and is coloured by the class that
//! covers most of it. Built from the streamed extents, so memory follows the
//! cell count (at most `max_cells`) and the findings, never the extent count.

use super::{walk, MapExtent, MapKind, OnError};
use crate::driver::{BlockDriver, SECTOR_SIZE};
use crate::error::Result;
use std::path::PathBuf;
use std::sync::Arc;

/// Backing depths from here down share one colour class.
pub const DEEPEST_CLASS: u32 = 64;

/// The most cells a picture may ask for (a page draws 65536; this bounds the
/// memory a caller's `max_cells` can make us allocate: two bytes a cell).
pub const MAX_CELLS: u64 = 1 << 24;

/// What a cell is coloured by. The order is the legend's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CellClass {
    /// Data in the image itself (depth 0).
    Data,
    /// Compressed clusters in the image itself.
    Compressed,
    /// Zero ranges of the image itself.
    Zero,
    /// Served by the backing file at this depth (data, compressed or zero
    /// there); depths from [`DEEPEST_CLASS`] on share one class.
    Backing(u32),
    /// Nothing in the chain stores it (reads as zeros).
    Unallocated,
    /// The metadata could not be read.
    Error,
    /// Past the end of the image (a verify compared a longer reference).
    PastEnd,
}

impl CellClass {
    /// The class an extent of `kind` at `depth` is drawn as.
    pub fn of(kind: MapKind, depth: u32) -> CellClass {
        match (kind, depth) {
            (MapKind::Unallocated, _) => CellClass::Unallocated,
            (MapKind::Error, _) => CellClass::Error,
            (MapKind::Data, 0) => CellClass::Data,
            (MapKind::Compressed, 0) => CellClass::Compressed,
            (MapKind::Zero, 0) => CellClass::Zero,
            (_, depth) => CellClass::Backing(depth.min(DEEPEST_CLASS)),
        }
    }

    /// A short stable name: `data`, `compressed`, `zero`, `backing1`...,
    /// `unallocated`, `error`, `past_end`.
    pub fn name(&self) -> String {
        match self {
            CellClass::Data => "data".into(),
            CellClass::Compressed => "compressed".into(),
            CellClass::Zero => "zero".into(),
            CellClass::Backing(depth) => format!("backing{depth}"),
            CellClass::Unallocated => "unallocated".into(),
            CellClass::Error => "error".into(),
            CellClass::PastEnd => "past_end".into(),
        }
    }
}

/// A finding to place on the picture: a mismatching run of a verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FindingRange {
    /// Guest offset of the run.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// The first differing byte, where the finding's mapping is taken.
    pub first_byte: u64,
}

/// What to draw.
#[derive(Debug, Clone)]
pub struct PictureRequest {
    /// Findings to place, in any order.
    pub findings: Vec<FindingRange>,
    /// Cover at least this many guest bytes (a verify's compared range may run
    /// past the image's end); the image's size when smaller.
    pub cover: u64,
    /// The most cells (a power of two is not required; at most [`MAX_CELLS`]).
    pub max_cells: u64,
    /// Stop at unreadable metadata, or mark it and go on.
    pub on_error: OnError,
}

impl Default for PictureRequest {
    fn default() -> Self {
        PictureRequest {
            findings: Vec::new(),
            cover: 0,
            max_cells: 1 << 16,
            on_error: OnError::Stop,
        }
    }
}

/// The mapping at the start of the cells `first_cell..` (up to the next
/// segment's): the extent that covers those cell starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The first cell whose start this extent covers.
    pub first_cell: u64,
    /// The extent's kind.
    pub kind: MapKind,
    /// The extent's depth.
    pub depth: u32,
    /// Host offset of the first cell's first byte (data only); later cells
    /// of the segment add `cell_size` each.
    pub host_offset: Option<u64>,
    /// Index into [`Picture::files`].
    pub file: u32,
}

/// Where a finding's first differing byte lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FindingPlace {
    /// The kind there, or `None` past the end of the image.
    pub kind: Option<MapKind>,
    /// The answering layer.
    pub depth: u32,
    /// Host offset of that byte (data only).
    pub host_offset: Option<u64>,
    /// Index into [`Picture::files`] (meaningless when `kind` is `None`).
    pub file: u32,
    /// The class it is drawn as.
    pub class: CellClass,
}

/// The drawable map.
#[derive(Debug, Clone)]
pub struct Picture {
    /// The image's virtual size.
    pub image_size: u64,
    /// Guest bytes the picture covers (the image, or the request's `cover`).
    pub size: u64,
    /// Bytes per cell: a power of two, at least a sector.
    pub cell_size: u64,
    /// `ceil(size / cell_size)`.
    pub cells: u64,
    /// The classes present, in legend order.
    pub classes: Vec<CellClass>,
    /// Guest bytes of each class (parallel to `classes`).
    pub class_bytes: Vec<u64>,
    /// Per cell: the index in `classes` of the class covering most of it.
    pub dominant: Vec<u8>,
    /// Per cell: the percentage (0 to 100) of the cell that class covers.
    pub share: Vec<u8>,
    /// The mapping at each cell's start, as runs of cells.
    pub segments: Vec<Segment>,
    /// Per requested finding, in request order: where its first byte lives.
    pub findings: Vec<FindingPlace>,
    /// The files segments and findings name.
    pub files: Vec<PathBuf>,
    /// Merged extents in the map.
    pub extents: u64,
}

/// The smallest power-of-two cell size, at least a sector, that draws `size`
/// bytes in at most `max_cells` cells.
pub fn cell_size_for(size: u64, max_cells: u64) -> u64 {
    let max_cells = max_cells.max(1);
    let mut cell = SECTOR_SIZE;
    while size.div_ceil(cell) > max_cells && cell < (1 << 62) {
        cell <<= 1;
    }
    cell
}

/// Gather `driver`'s map in one pass and cut it into cells (see the module
/// doc). `tick` as for [`walk`].
pub fn picture(
    driver: &dyn BlockDriver,
    request: &PictureRequest,
    tick: &mut dyn FnMut(u64) -> bool,
) -> Result<Picture> {
    let image_size = driver.size();
    let size = image_size.max(request.cover);
    let cell_size = cell_size_for(size, request.max_cells.clamp(1, MAX_CELLS));
    let cells = size.div_ceil(cell_size);
    let cell_count = usize::try_from(cells).unwrap_or(usize::MAX);
    let mut builder = Builder {
        cell_size,
        dominant: vec![0; cell_count],
        share: vec![0; cell_count],
        current: (0, Vec::new()),
        seen: Vec::new(),
        class_bytes: Vec::new(),
        segments: Vec::new(),
        files: Vec::new(),
        extents: 0,
        order: sorted_findings(&request.findings),
        next_finding: 0,
        places: vec![None; request.findings.len()],
        findings: &request.findings,
    };
    walk(driver, request.on_error, tick, &mut |extent| {
        builder.add(&extent);
        Ok(())
    })?;
    if size > image_size {
        builder.add_range(image_size, size, CellClass::PastEnd);
    }
    Ok(builder.finish(image_size, size, cells))
}

fn sorted_findings(findings: &[FindingRange]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..findings.len()).collect();
    order.sort_by_key(|&i| findings.get(i).map_or(0, |f| f.first_byte));
    order
}

struct Builder<'a> {
    cell_size: u64,
    /// Class indices here are in order of first sight; `finish` renumbers them.
    dominant: Vec<u8>,
    share: Vec<u8>,
    /// The cell being filled and the bytes of each class in it so far.
    current: (u64, Vec<(u8, u64)>),
    seen: Vec<CellClass>,
    class_bytes: Vec<u64>,
    segments: Vec<Segment>,
    files: Vec<Arc<std::path::Path>>,
    extents: u64,
    order: Vec<usize>,
    next_finding: usize,
    places: Vec<Option<FindingPlace>>,
    findings: &'a [FindingRange],
}

impl Builder<'_> {
    fn class_index(&mut self, class: CellClass) -> u8 {
        let index = match self.seen.iter().position(|c| *c == class) {
            Some(i) => i,
            None => {
                self.seen.push(class);
                self.class_bytes.push(0);
                self.seen.len() - 1
            }
        };
        // At most 64 backing classes and 6 others.
        u8::try_from(index).unwrap_or(u8::MAX)
    }

    fn file_index(&mut self, file: &Arc<std::path::Path>) -> u32 {
        let index = match self.files.iter().position(|f| Arc::ptr_eq(f, file)) {
            Some(i) => i,
            None => {
                self.files.push(file.clone());
                self.files.len() - 1
            }
        };
        u32::try_from(index).unwrap_or(u32::MAX)
    }

    fn add(&mut self, extent: &MapExtent) {
        self.extents += 1;
        let class = CellClass::of(extent.kind, extent.depth);
        let start = extent.offset;
        let end = start.saturating_add(extent.length);
        let file = self.file_index(&extent.file);
        // The segment: this extent covers the start of a cell.
        let first_cell = start.div_ceil(self.cell_size);
        if let Some(cell_start) = first_cell.checked_mul(self.cell_size).filter(|s| *s < end) {
            self.segments.push(Segment {
                first_cell,
                kind: extent.kind,
                depth: extent.depth,
                host_offset: extent
                    .host_offset
                    .map(|h| h.saturating_add(cell_start - start)),
                file,
            });
        }
        // Findings whose first byte lies here.
        while let Some(&i) = self.order.get(self.next_finding) {
            let Some(finding) = self.findings.get(i) else {
                break;
            };
            if finding.first_byte >= end {
                break;
            }
            if let Some(place) = self.places.get_mut(i) {
                *place = Some(FindingPlace {
                    kind: Some(extent.kind),
                    depth: extent.depth,
                    host_offset: extent
                        .host_offset
                        .map(|h| h.saturating_add(finding.first_byte.saturating_sub(start))),
                    file,
                    class,
                });
            }
            self.next_finding += 1;
        }
        self.add_range(start, end, class);
    }

    /// Count `[start, end)` as `class` in the totals and the cells.
    fn add_range(&mut self, start: u64, end: u64, class: CellClass) {
        let index = self.class_index(class);
        if let Some(bytes) = self.class_bytes.get_mut(usize::from(index)) {
            *bytes += end - start;
        }
        let cs = self.cell_size;
        let mut at = start;
        while at < end {
            let cell = at / cs;
            if cell != self.current.0 {
                self.finish_cell();
                self.current.0 = cell;
            }
            let cell_end = (cell + 1).saturating_mul(cs);
            if at == cell * cs && end >= cell_end {
                // Whole cells: all this class.
                let whole = end / cs - cell;
                let from = usize::try_from(cell).unwrap_or(usize::MAX);
                let to = usize::try_from(cell + whole).unwrap_or(usize::MAX);
                if let Some(d) = self.dominant.get_mut(from..to) {
                    d.fill(index);
                }
                if let Some(s) = self.share.get_mut(from..to) {
                    s.fill(100);
                }
                at = (cell + whole) * cs;
                self.current.0 = cell + whole;
                continue;
            }
            let take = end.min(cell_end) - at;
            match self.current.1.iter_mut().find(|(c, _)| *c == index) {
                Some((_, bytes)) => *bytes += take,
                None => self.current.1.push((index, take)),
            }
            at += take;
        }
    }

    /// Settle the partly filled cell: its dominant class and share.
    fn finish_cell(&mut self) {
        let parts = std::mem::take(&mut self.current.1);
        let total: u64 = parts.iter().map(|(_, b)| b).sum();
        // The most bytes wins; a tie goes to the class earlier in the legend.
        let best = parts.iter().max_by(|a, b| {
            a.1.cmp(&b.1).then_with(|| {
                let (ca, cb) = (
                    self.seen.get(usize::from(a.0)),
                    self.seen.get(usize::from(b.0)),
                );
                cb.cmp(&ca)
            })
        });
        if let (Some(&(index, bytes)), Ok(cell)) = (best, usize::try_from(self.current.0)) {
            if let Some(d) = self.dominant.get_mut(cell) {
                *d = index;
            }
            if let Some(s) = self.share.get_mut(cell) {
                let percent = u128::from(bytes) * 100 / u128::from(total.max(1));
                *s = u8::try_from(percent).unwrap_or(100);
            }
        }
    }

    fn finish(mut self, image_size: u64, size: u64, cells: u64) -> Picture {
        self.finish_cell();
        // A finding past everything drawn still needs its class in the legend.
        if self.places.iter().any(Option::is_none) {
            self.class_index(CellClass::PastEnd);
        }
        // Renumber classes into legend order.
        let mut legend: Vec<(CellClass, u64, u8)> = self
            .seen
            .iter()
            .zip(&self.class_bytes)
            .enumerate()
            .map(|(i, (c, b))| (*c, *b, u8::try_from(i).unwrap_or(u8::MAX)))
            .collect();
        legend.sort_by_key(|(c, _, _)| *c);
        let mut renumber = [0u8; 256];
        for (new, (_, _, old)) in legend.iter().enumerate() {
            if let Some(slot) = renumber.get_mut(usize::from(*old)) {
                *slot = u8::try_from(new).unwrap_or(u8::MAX);
            }
        }
        for d in &mut self.dominant {
            *d = renumber.get(usize::from(*d)).copied().unwrap_or(*d);
        }
        let findings = self
            .places
            .iter()
            .map(|p| {
                p.unwrap_or(FindingPlace {
                    kind: None,
                    depth: 0,
                    host_offset: None,
                    file: 0,
                    class: CellClass::PastEnd,
                })
            })
            .collect();
        Picture {
            image_size,
            size,
            cell_size: self.cell_size,
            cells,
            classes: legend.iter().map(|(c, _, _)| *c).collect(),
            class_bytes: legend.iter().map(|(_, b, _)| *b).collect(),
            dominant: self.dominant,
            share: self.share,
            segments: self.segments,
            findings,
            files: self.files.iter().map(|f| f.to_path_buf()).collect(),
            extents: self.extents,
        }
    }
}
