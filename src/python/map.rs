//! `map` and `map_picture`: the allocation map of a whole image, as extents or
//! cut into cells for the HTML page. Both open the image as `open` does
//! (read-only), walk its metadata with the GIL released and stop on Ctrl-C.

use super::detached::run_with_progress;
use super::options::{picture_request, read_only_options, Kwargs};
use crate::driver::{self, BlockDriver};
use crate::map::{self as engine, CellClass, MapKind};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;

/// A guest range with one mapping, as `map` lists it: an immutable record
/// (native, because a fragmented image has hundreds of thousands of them).
#[pyclass(
    module = "blkverify_rs._native",
    name = "MapExtent",
    frozen,
    eq,
    hash,
    get_all,
    skip_from_py_object
)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PyMapExtent {
    /// Guest offset of the first byte.
    offset: u64,
    /// Length in bytes.
    length: u64,
    /// `data`, `compressed`, `zero` or `unallocated`.
    kind: &'static str,
    /// The layer that answers: 0 the image, 1 its backing file...
    depth: u32,
    /// Where a data range's first byte is stored in `file`.
    host_offset: Option<u64>,
    /// The file holding a data range's bytes, else the image at `depth`.
    file: String,
}

#[pymethods]
impl PyMapExtent {
    #[new]
    #[pyo3(signature = (*, offset, length, kind, depth, host_offset, file))]
    fn new(
        offset: u64,
        length: u64,
        kind: &str,
        depth: u32,
        host_offset: Option<u64>,
        file: String,
    ) -> PyResult<Self> {
        let kind = [
            MapKind::Data,
            MapKind::Compressed,
            MapKind::Zero,
            MapKind::Unallocated,
        ]
        .iter()
        .map(MapKind::name)
        .find(|k| *k == kind)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "kind must be data, compressed, zero or unallocated, not '{kind}'"
            ))
        })?;
        Ok(PyMapExtent {
            offset,
            length,
            kind,
            depth,
            host_offset,
            file,
        })
    }

    /// The object `blkverify map --json` prints.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("offset", self.offset)?;
        d.set_item("length", self.length)?;
        d.set_item("kind", self.kind)?;
        d.set_item("depth", self.depth)?;
        d.set_item("host_offset", self.host_offset)?;
        d.set_item("file", &self.file)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let host = self
            .host_offset
            .map_or_else(|| "None".to_string(), |h| h.to_string());
        format!(
            "MapExtent(offset={}, length={}, kind='{}', depth={}, host_offset={host}, file={:?})",
            self.offset, self.length, self.kind, self.depth, self.file
        )
    }
}

/// Where a finding lies: (kind or None past the end, depth, host_offset, file
/// index, class index).
type PlaceTuple = (Option<&'static str>, u32, Option<u64>, u32, Option<usize>);

/// Open `path` read-only with the open options in `kw` (`format`, `snapshot`,
/// the backing policy, `timeout`).
fn open_read_only(
    py: Python<'_>,
    path: PathBuf,
    kw: &Kwargs<'_>,
) -> PyResult<Arc<dyn BlockDriver>> {
    let options = read_only_options(kw)?;
    super::detached::run_detached(py, move || driver::open(&path, &options))
}

/// Every merged extent of the image at `path`, in guest order, as `MapExtent`s.
/// `options`: the open options. `progress(done, total)` is called now and then.
#[pyfunction]
#[pyo3(signature = (path, progress=None, **options))]
pub(crate) fn map<'py>(
    py: Python<'py>,
    path: PathBuf,
    progress: Option<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyList>> {
    let kw = Kwargs::new(py, options)?;
    let image = open_read_only(py, path, &kw)?;
    kw.finish("map")?;
    let total = image.size();
    let extents = run_with_progress(
        py,
        progress,
        |p: (u64, u64)| p,
        |tick| {
            let rows = engine::extents(image.as_ref(), &mut |done| tick((done, total)))?;
            Ok(rows
                .into_iter()
                .map(|e| PyMapExtent {
                    offset: e.offset,
                    length: e.length,
                    kind: e.kind.name(),
                    depth: e.depth,
                    host_offset: e.host_offset,
                    file: e.file.display().to_string(),
                })
                .collect::<Vec<_>>())
        },
    )?;
    PyList::new(py, extents)
}

/// The image at `path` cut into cells, with findings placed on it; see
/// `map::Picture`. `options`: the open options and the picture's
/// (`findings`, `cover`, `max_cells`, `mark_errors`; see `options.rs`).
/// Returns a dict: `path`, `format`, `image_size`, `size`, `cell_size`,
/// `cells`, `extents`, `classes` [(name, bytes)], `dominant` and `share`
/// (bytes, one per cell), `segments` [(first_cell, kind, depth, host_offset,
/// file)], `findings` [(kind, depth, host_offset, file, class)], `files`,
/// `chain` [(path, format, size)], `info` and `granularity`.
#[pyfunction]
#[pyo3(signature = (path, progress=None, **options))]
pub(crate) fn map_picture<'py>(
    py: Python<'py>,
    path: PathBuf,
    progress: Option<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let kw = Kwargs::new(py, options)?;
    let image = open_read_only(py, path.clone(), &kw)?;
    let request = picture_request(&kw)?;
    kw.finish("map_picture")?;
    let total = image.size();
    let picture = {
        let image = image.clone();
        run_with_progress(
            py,
            progress,
            |p: (u64, u64)| p,
            move |tick| engine::picture(image.as_ref(), &request, &mut |done| tick((done, total))),
        )?
    };

    let d = PyDict::new(py);
    d.set_item("path", path.display().to_string())?;
    d.set_item("format", image.format_name())?;
    d.set_item("image_size", picture.image_size)?;
    d.set_item("size", picture.size)?;
    d.set_item("cell_size", picture.cell_size)?;
    d.set_item("cells", picture.cells)?;
    d.set_item("extents", picture.extents)?;
    d.set_item("granularity", image.granularity())?;
    let classes: Vec<(String, u64)> = picture
        .classes
        .iter()
        .zip(&picture.class_bytes)
        .map(|(c, b)| (c.name(), *b))
        .collect();
    d.set_item("classes", classes)?;
    d.set_item("dominant", PyBytes::new(py, &picture.dominant))?;
    d.set_item("share", PyBytes::new(py, &picture.share))?;
    let segments: Vec<(u64, &str, u32, Option<u64>, u32)> = picture
        .segments
        .iter()
        .map(|s| (s.first_cell, s.kind.name(), s.depth, s.host_offset, s.file))
        .collect();
    d.set_item("segments", segments)?;
    let class_index = |c: CellClass| picture.classes.iter().position(|k| *k == c);
    let places: Vec<PlaceTuple> = picture
        .findings
        .iter()
        .map(|f| {
            (
                f.kind.map(|k| k.name()),
                f.depth,
                f.host_offset,
                f.file,
                class_index(f.class),
            )
        })
        .collect();
    d.set_item("findings", places)?;
    let files: Vec<String> = picture
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    d.set_item("files", files)?;
    let chain: Vec<(String, &str, u64)> = engine::chain(image.as_ref())
        .into_iter()
        .map(|(p, f, s)| (p.display().to_string(), f, s))
        .collect();
    d.set_item("chain", chain)?;
    let info = PyDict::new(py);
    for (k, v) in image.info() {
        info.set_item(k, v)?;
    }
    d.set_item("info", info)?;
    Ok(d)
}
