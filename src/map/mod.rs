//! The allocation map of a whole image: which guest ranges hold data, which are
//! compressed, zero or unallocated, and which layer of the backing chain answers
//! for each, as `qemu-img map` tells it.
//!
//! It is gathered in one pass over the drivers' metadata (`BlockDriver::map`,
//! `backing`, `locate`), never by reading guest data, so its cost follows the
//! number of extents, not the disk size: a 1 TiB sparse qcow2 is a few thousand
//! lookups. [`walk`] streams the merged extents to a sink, so a caller that only
//! aggregates them ([`picture`]) never holds the whole list.

pub mod picture;

use crate::driver::{BlockDriver, Mapping};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use picture::{
    picture, CellClass, FindingPlace, FindingRange, Picture, PictureRequest, Segment,
};

/// What the answering layer's metadata says about a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapKind {
    /// Data stored uncompressed at `host_offset` in `file`.
    Data,
    /// Compressed clusters or grains in `file` (no single host offset: each
    /// has its own stream).
    Compressed,
    /// Reads as zeros because the metadata says so (a zero cluster, a hole in a
    /// raw file).
    Zero,
    /// Nothing in the chain stores it: it reads as zeros.
    Unallocated,
    /// The metadata could not be read here (only when the caller asked to
    /// mark errors instead of stopping at them; see [`OnError`]).
    Error,
}

impl MapKind {
    /// The name reports use (`data`, `compressed`, `zero`, `unallocated`).
    pub fn name(&self) -> &'static str {
        match self {
            MapKind::Data => "data",
            MapKind::Compressed => "compressed",
            MapKind::Zero => "zero",
            MapKind::Unallocated => "unallocated",
            MapKind::Error => "error",
        }
    }
}

/// A guest range with one mapping, after merging neighbours that agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapExtent {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// What the answering layer's metadata says.
    pub kind: MapKind,
    /// The layer that answers: 0 for the image itself, 1 for its backing file,
    /// and so on. For `Unallocated`, the deepest layer that was asked.
    pub depth: u32,
    /// Where the range's first byte is stored in `file` (data only).
    pub host_offset: Option<u64>,
    /// The file the bytes are stored in (data and compressed: the image, its
    /// external data file or extent file), else the image at `depth` whose
    /// metadata answered.
    pub file: Arc<Path>,
}

/// What to do when a layer's metadata cannot be read at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Stop and return the error (`blkverify map`).
    Stop,
    /// Record the driver's allocation unit there as [`MapKind::Error`] and go
    /// on, so a picture of a damaged image shows where the damage is.
    Mark,
}

/// How often, in raw lookups, [`walk`] calls its tick (for Ctrl-C).
const TICK_EVERY: u64 = 4096;

/// Stream the merged extents of `driver`'s whole disk, in guest order, to
/// `sink`. Unallocated ranges are followed down the backing chain that was
/// opened. `tick(done)` is called now and then with the guest bytes mapped so
/// far; `false` stops the walk with `Error::Cancelled`.
pub fn walk(
    driver: &dyn BlockDriver,
    on_error: OnError,
    tick: &mut dyn FnMut(u64) -> bool,
    sink: &mut dyn FnMut(MapExtent) -> Result<()>,
) -> Result<()> {
    let mut walker = Walker {
        on_error,
        tick,
        sink,
        pending: None,
        files: Vec::new(),
        lookups: 0,
    };
    if !(walker.tick)(0) {
        return Err(Error::Cancelled);
    }
    walker.layer(driver, 0, 0, driver.size())?;
    walker.flush()
}

/// Every merged extent of `driver`'s disk (see [`walk`]).
pub fn extents(
    driver: &dyn BlockDriver,
    tick: &mut dyn FnMut(u64) -> bool,
) -> Result<Vec<MapExtent>> {
    let mut out = Vec::new();
    walk(driver, OnError::Stop, tick, &mut |e| {
        out.push(e);
        Ok(())
    })?;
    Ok(out)
}

/// The images of `driver`'s backing chain as opened, top first: (path, format,
/// virtual size).
pub fn chain(driver: &dyn BlockDriver) -> Vec<(PathBuf, &'static str, u64)> {
    let mut out = Vec::new();
    let mut layer = Some(driver);
    while let Some(d) = layer {
        out.push((d.path().to_path_buf(), d.format_name(), d.size()));
        layer = d.backing();
    }
    out
}

struct Walker<'a> {
    on_error: OnError,
    tick: &'a mut dyn FnMut(u64) -> bool,
    sink: &'a mut dyn FnMut(MapExtent) -> Result<()>,
    /// The extent being grown by merging.
    pending: Option<MapExtent>,
    /// Every file named so far, so extents share one allocation per file.
    files: Vec<Arc<Path>>,
    lookups: u64,
}

impl Walker<'_> {
    /// Map `[start, end)` of `layer` (at `depth` in the chain).
    fn layer(&mut self, layer: &dyn BlockDriver, depth: u32, start: u64, end: u64) -> Result<()> {
        let mut at = start;
        while at < end {
            self.lookups += 1;
            if self.lookups % TICK_EVERY == 0 && !(self.tick)(at) {
                return Err(Error::Cancelled);
            }
            let extent = match layer.map(at, end - at) {
                Ok(extent) => extent,
                Err(e) if self.on_error == OnError::Stop => return Err(e),
                Err(_) => {
                    // Skip to the next allocation unit: the lookup failed for
                    // the unit that holds `at`.
                    let unit = layer.granularity().max(1);
                    let next = (at / unit).saturating_add(1).saturating_mul(unit);
                    let length = next.min(end) - at;
                    let file = self.file(layer.path());
                    self.emit(MapExtent {
                        offset: at,
                        length,
                        kind: MapKind::Error,
                        depth,
                        host_offset: None,
                        file,
                    })?;
                    at += length;
                    continue;
                }
            };
            // A driver answers for at least one byte and never past `end`.
            let length = extent.length.clamp(1, end - at);
            let (kind, host_offset) = match extent.mapping {
                Mapping::Data { host_offset } => (MapKind::Data, Some(host_offset)),
                Mapping::Compressed { .. } => (MapKind::Compressed, None),
                Mapping::Zero { .. } => (MapKind::Zero, None),
                Mapping::Unallocated => {
                    self.unallocated(layer, depth, at, at + length)?;
                    at += length;
                    continue;
                }
            };
            let file = match kind {
                MapKind::Data | MapKind::Compressed => self.stored_in(layer, at, kind),
                _ => self.file(layer.path()),
            };
            self.emit(MapExtent {
                offset: at,
                length,
                kind,
                depth,
                host_offset,
                file,
            })?;
            at += length;
        }
        Ok(())
    }

    /// `[start, end)` is unallocated in `layer`: the backing file answers for
    /// what it covers; past its end (or with none) the range reads as zeros.
    fn unallocated(
        &mut self,
        layer: &dyn BlockDriver,
        depth: u32,
        start: u64,
        end: u64,
    ) -> Result<()> {
        let mut at = start;
        if let Some(backing) = layer.backing().filter(|b| start < b.size()) {
            let covered = end.min(backing.size());
            self.layer(backing, depth.saturating_add(1), start, covered)?;
            at = covered;
        }
        if at < end {
            let file = self.file(layer.path());
            self.emit(MapExtent {
                offset: at,
                length: end - at,
                kind: MapKind::Unallocated,
                depth,
                host_offset: None,
                file,
            })?;
        }
        Ok(())
    }

    /// The file that stores `layer`'s `kind` of bytes at `offset`: the
    /// format's `locate` names it (an external data file, a VMDK extent file);
    /// else the image itself.
    fn stored_in(&mut self, layer: &dyn BlockDriver, offset: u64, kind: MapKind) -> Arc<Path> {
        match layer.locate(offset) {
            Ok(Some(location)) if location.kind == kind.name() => self.file(&location.file),
            _ => self.file(layer.path()),
        }
    }

    fn file(&mut self, path: &Path) -> Arc<Path> {
        if let Some(known) = self.files.iter().find(|f| f.as_ref() == path) {
            return known.clone();
        }
        let file: Arc<Path> = Arc::from(path);
        self.files.push(file.clone());
        file
    }

    /// Merge `next` into the pending extent when they agree (kind, depth, file,
    /// and for data a contiguous host range), else pass the pending one on.
    fn emit(&mut self, next: MapExtent) -> Result<()> {
        if let Some(pending) = &mut self.pending {
            let end = pending.offset + pending.length;
            let host_continues = match (pending.host_offset, next.host_offset) {
                (Some(h), Some(n)) => h.checked_add(pending.length) == Some(n),
                (None, None) => true,
                _ => false,
            };
            if end == next.offset
                && pending.kind == next.kind
                && pending.depth == next.depth
                && Arc::ptr_eq(&pending.file, &next.file)
                && host_continues
            {
                pending.length += next.length;
                return Ok(());
            }
        }
        match self.pending.replace(next) {
            Some(done) => (self.sink)(done),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(done) => (self.sink)(done),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
