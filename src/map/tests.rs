//! The map walk and the picture, on scripted drivers: merging, backing depth,
//! files, errors, cells and findings.

use super::picture::{cell_size_for, FindingRange};
use super::*;
use crate::driver::{Extent, Format, Location};
use std::path::Path;

/// A driver whose metadata is a list of extents; `map` answers at most one
/// `unit` at a time (as a cluster-by-cluster format would), so merging is
/// exercised. Ranges in `broken` fail to map.
pub(crate) struct Scripted {
    path: PathBuf,
    size: u64,
    unit: u64,
    extents: Vec<(u64, u64, Mapping)>,
    backing: Option<Box<Scripted>>,
    broken: Vec<(u64, u64)>,
    data_file: Option<PathBuf>,
}

impl Scripted {
    pub(crate) fn new(path: &str, size: u64, unit: u64, extents: &[(u64, u64, Mapping)]) -> Self {
        Scripted {
            path: PathBuf::from(path),
            size,
            unit,
            extents: extents.to_vec(),
            backing: None,
            broken: Vec::new(),
            data_file: None,
        }
    }

    fn with_backing(mut self, backing: Scripted) -> Self {
        self.backing = Some(Box::new(backing));
        self
    }
}

fn data(host_offset: u64) -> Mapping {
    Mapping::Data { host_offset }
}

const ZERO: Mapping = Mapping::Zero { allocated: false };
const UNALLOC: Mapping = Mapping::Unallocated;
const COMPRESSED: Mapping = Mapping::Compressed {
    host_offset: 0x9000,
    compressed_size: 512,
};

impl BlockDriver for Scripted {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn granularity(&self) -> u64 {
        self.unit
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        panic!("the map must never read data");
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        assert!(offset < self.size, "map past the end: {offset}");
        if self.broken.iter().any(|(s, e)| (*s..*e).contains(&offset)) {
            return Err(Error::corrupt(
                &self.path,
                format!("bad entry at {offset:#x}"),
            ));
        }
        let (start, len, mapping) = *self
            .extents
            .iter()
            .find(|(s, l, _)| (*s..s + l).contains(&offset))
            .unwrap_or(&(0, self.size, Mapping::Unallocated));
        let unit_end = (offset / self.unit + 1) * self.unit;
        let end = (start + len).min(unit_end).min(offset + max_len);
        let mapping = match mapping {
            Mapping::Data { host_offset } => data(host_offset + (offset - start)),
            m => m,
        };
        Ok(Extent {
            offset,
            length: end - offset,
            mapping,
        })
    }
    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref().map(|b| b as &dyn BlockDriver)
    }
    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let kind = self.map(offset, 1)?.mapping.kind();
        Ok(self.data_file.as_ref().map(|file| Location {
            kind,
            format: Format::Raw,
            unit: "unit",
            tables: Vec::new(),
            subcluster: None,
            host_offset: None,
            file: file.clone(),
            backing_depth: 0,
        }))
    }
}

/// An extent as (offset, length, kind, depth, host offset, file).
type Row = (u64, u64, &'static str, u32, Option<u64>, String);

fn all(driver: &dyn BlockDriver) -> Vec<Row> {
    extents(driver, &mut |_| true)
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e.offset,
                e.length,
                e.kind.name(),
                e.depth,
                e.host_offset,
                e.file.display().to_string(),
            )
        })
        .collect()
}

#[test]
fn neighbours_that_agree_merge_and_the_rest_do_not() {
    let image = Scripted::new(
        "top",
        0x10000,
        0x1000,
        &[
            (0, 0x3000, data(0x40000)),
            // contiguous in the guest and the host: merges with the first
            (0x3000, 0x1000, data(0x43000)),
            // contiguous in the guest only
            (0x4000, 0x1000, data(0x80000)),
            (0x5000, 0x2000, ZERO),
            (0x7000, 0x1000, COMPRESSED),
            (0x8000, 0x1000, COMPRESSED),
            (0x9000, 0x7000, UNALLOC),
        ],
    );
    assert_eq!(
        all(&image),
        vec![
            (0, 0x4000, "data", 0, Some(0x40000), "top".into()),
            (0x4000, 0x1000, "data", 0, Some(0x80000), "top".into()),
            (0x5000, 0x2000, "zero", 0, None, "top".into()),
            (0x7000, 0x2000, "compressed", 0, None, "top".into()),
            (0x9000, 0x7000, "unallocated", 0, None, "top".into()),
        ]
    );
}

#[test]
fn unallocated_ranges_are_answered_down_the_chain() {
    let base = Scripted::new(
        "base",
        0x8000,
        0x1000,
        &[(0, 0x2000, data(0x10000)), (0x2000, 0x1000, ZERO)],
    );
    let mid =
        Scripted::new("mid", 0x10000, 0x1000, &[(0x1000, 0x1000, data(0x5000))]).with_backing(base);
    let top = Scripted::new("top", 0x10000, 0x1000, &[(0x3000, 0x1000, ZERO)]).with_backing(mid);
    assert_eq!(
        all(&top),
        vec![
            (0, 0x1000, "data", 2, Some(0x10000), "base".into()),
            (0x1000, 0x1000, "data", 1, Some(0x5000), "mid".into()),
            (0x2000, 0x1000, "zero", 2, None, "base".into()),
            (0x3000, 0x1000, "zero", 0, None, "top".into()),
            // unallocated in all three, down to the bottom's end
            (0x4000, 0x4000, "unallocated", 2, None, "base".into()),
            // past the base's end: the middle layer answers zeros
            (0x8000, 0x8000, "unallocated", 1, None, "mid".into()),
        ]
    );
}

#[test]
fn data_lives_in_the_file_locate_names() {
    let mut image = Scripted::new("img", 0x4000, 0x1000, &[(0, 0x2000, data(0))]);
    image.data_file = Some(PathBuf::from("img.data"));
    assert_eq!(
        all(&image),
        vec![
            (0, 0x2000, "data", 0, Some(0), "img.data".into()),
            (0x2000, 0x2000, "unallocated", 0, None, "img".into()),
        ]
    );
}

#[test]
fn a_broken_entry_stops_the_walk_or_is_marked() {
    let mut image = Scripted::new("img", 0x4000, 0x1000, &[(0, 0x4000, data(0x1000))]);
    image.broken = vec![(0x1000, 0x2000)];
    let err = extents(&image, &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("bad entry at 0x1000"), "{err}");
    let mut marked = Vec::new();
    walk(&image, OnError::Mark, &mut |_| true, &mut |e| {
        marked.push((e.offset, e.length, e.kind));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        marked,
        vec![
            (0, 0x1000, MapKind::Data),
            (0x1000, 0x1000, MapKind::Error),
            (0x2000, 0x2000, MapKind::Data),
        ]
    );
}

#[test]
fn the_tick_can_cancel_a_long_walk() {
    // One lookup per unit: 8192 lookups, so the tick is called mid-walk.
    let image = Scripted::new("img", 8192 * 512, 512, &[(0, 8192 * 512, ZERO)]);
    let mut calls = 0;
    let err = extents(&image, &mut |_| {
        calls += 1;
        calls < 2
    })
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled));
}

#[test]
fn a_terabyte_of_nothing_is_a_handful_of_lookups() {
    // A sparse 1 TiB image whose driver answers a whole L2 table's span (512
    // MiB) per lookup, as qcow2 does for an empty L1 entry.
    let image = Scripted::new("img", 1 << 40, 512 << 20, &[]);
    let mut ticks = 0;
    let map = extents(&image, &mut |_| {
        ticks += 1;
        true
    })
    .unwrap();
    assert_eq!(map.len(), 1);
    assert_eq!(map.first().map(|e| e.length), Some(1 << 40));
    let p = picture(&image, &PictureRequest::default(), &mut |_| true).unwrap();
    assert_eq!(p.cells, 1 << 16);
    assert_eq!(p.cell_size, 1 << 24);
    assert_eq!(p.segments.len(), 1);
    assert_eq!(p.classes, vec![CellClass::Unallocated]);
}

#[test]
fn cell_sizes_are_powers_of_two_within_the_cap() {
    assert_eq!(cell_size_for(0, 1 << 16), 512);
    assert_eq!(cell_size_for(4 << 20, 1 << 16), 512);
    assert_eq!(cell_size_for((32 << 20) + 1, 1 << 16), 1024);
    assert_eq!(cell_size_for(1 << 40, 1 << 16), 1 << 24);
    assert_eq!(cell_size_for(u64::MAX, 1 << 16), 1 << 48);
}

#[test]
fn a_caller_cannot_ask_for_unbounded_cells() {
    let image = Scripted::new("img", 1 << 40, 1 << 20, &[]);
    let request = PictureRequest {
        max_cells: u64::MAX,
        ..PictureRequest::default()
    };
    let p = picture(&image, &request, &mut |_| true).unwrap();
    assert_eq!(p.cells, super::picture::MAX_CELLS);
    // One cell for a whole huge disk: the share still fits.
    let one = PictureRequest {
        max_cells: 1,
        ..PictureRequest::default()
    };
    let huge = Scripted::new("img", 1 << 62, 1 << 58, &[]);
    let p = picture(&huge, &one, &mut |_| true).unwrap();
    assert_eq!(p.share, vec![100; usize::try_from(p.cells).unwrap()]);
}

#[test]
fn cells_take_their_dominant_class_and_findings_their_place() {
    // 4 KiB in 512-byte cells: 8 cells.
    let base = Scripted::new("base", 0x1000, 0x200, &[(0, 0x1000, data(0x7000))]);
    let top = Scripted::new(
        "top",
        0x1000,
        0x100,
        &[
            (0, 0x400, data(0x1000)),
            // cell 2: 0x100 zero, 0x100 data at depth 1 (tie: zero is earlier
            // in the legend)... then cell 3 all compressed
            (0x400, 0x100, ZERO),
            (0x600, 0x200, COMPRESSED),
            (0x800, 0x300, ZERO),
            (0xb00, 0x500, data(0x3000)),
        ],
    )
    .with_backing(base);
    let request = PictureRequest {
        findings: vec![
            FindingRange {
                offset: 0xc00,
                length: 0x200,
                first_byte: 0xc10,
            },
            FindingRange {
                offset: 0x400,
                length: 0x200,
                first_byte: 0x500,
            },
            FindingRange {
                offset: 0x1000,
                length: 0x200,
                first_byte: 0x1000,
            },
        ],
        cover: 0x1200,
        ..PictureRequest::default()
    };
    let p = picture(&top, &request, &mut |_| true).unwrap();
    assert_eq!(p.cell_size, 512);
    assert_eq!(p.cells, 9);
    assert_eq!(
        p.classes,
        vec![
            CellClass::Data,
            CellClass::Compressed,
            CellClass::Zero,
            CellClass::Backing(1),
            CellClass::PastEnd
        ]
    );
    // data 0x400 + 0x500, compressed 0x200, zero 0x100 + 0x300, backing 0x100
    assert_eq!(p.class_bytes, vec![0x900, 0x200, 0x400, 0x100, 0x200]);
    let (data, comp, zero, past) = (0, 1, 2, 4);
    assert_eq!(
        p.dominant,
        vec![data, data, zero, comp, zero, data, data, data, past]
    );
    assert_eq!(p.share, vec![100, 100, 50, 100, 100, 50, 100, 100, 100]);
    // The mapping at each cell start: one segment per extent that covers one.
    let starts: Vec<(u64, MapKind, u32, Option<u64>)> = p
        .segments
        .iter()
        .map(|s| (s.first_cell, s.kind, s.depth, s.host_offset))
        .collect();
    assert_eq!(
        starts,
        vec![
            (0, MapKind::Data, 0, Some(0x1000)),
            (2, MapKind::Zero, 0, None),
            (3, MapKind::Compressed, 0, None),
            (4, MapKind::Zero, 0, None),
            (6, MapKind::Data, 0, Some(0x3100)),
        ]
    );
    let places: Vec<(Option<MapKind>, u32, Option<u64>, CellClass)> = p
        .findings
        .iter()
        .map(|f| (f.kind, f.depth, f.host_offset, f.class))
        .collect();
    assert_eq!(
        places,
        vec![
            (Some(MapKind::Data), 0, Some(0x3110), CellClass::Data),
            (Some(MapKind::Data), 1, Some(0x7500), CellClass::Backing(1)),
            (None, 0, None, CellClass::PastEnd),
        ]
    );
}
