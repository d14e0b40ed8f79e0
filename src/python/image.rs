//! `Image`: an open image, and the I/O calls it shares with `Device` (which
//! builds on this module; `open.rs`, above both, opens either).

use super::detached::run_detached;
use super::errors::to_pyerr;
use crate::driver::{self, BlockDriver};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open image (read-only).
#[pyclass(module = "blkverify_rs._native", name = "Image")]
pub struct PyImage {
    driver: Option<Arc<dyn BlockDriver>>,
    path: PathBuf,
}

impl PyImage {
    pub(crate) fn new(driver: Arc<dyn BlockDriver>, path: PathBuf) -> PyImage {
        PyImage {
            driver: Some(driver),
            path,
        }
    }

    fn driver(&self) -> PyResult<Arc<dyn BlockDriver>> {
        self.driver.clone().ok_or_else(|| {
            PyValueError::new_err(format!("{}: I/O on a closed image", self.path.display()))
        })
    }
}

#[pymethods]
impl PyImage {
    /// The virtual disk size in bytes.
    #[getter]
    fn size(&self) -> PyResult<u64> {
        Ok(self.driver()?.size())
    }

    /// The format, as `formats()` names it ("raw", "qcow2", "vmdk", "vpc", ...).
    #[getter]
    fn format(&self) -> PyResult<&'static str> {
        Ok(self.driver()?.format_name())
    }

    /// The path the image was opened from.
    #[getter]
    fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.driver.is_none()
    }

    /// Read `length` guest bytes at `offset`.
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        read_bytes(py, self.driver()?, offset, length)
    }

    /// Fill `buf` (a writable, contiguous buffer) with the guest bytes at
    /// `offset`; returns the number of bytes read.
    fn readinto(&self, py: Python<'_>, offset: u64, buf: &Bound<'_, PyAny>) -> PyResult<usize> {
        read_into(py, self.driver()?, offset, buf)
    }

    /// The mapping of the guest range: a list of (offset, length, kind,
    /// host_offset or None) tuples, as the driver's metadata describes it.
    #[pyo3(signature = (offset=0, length=None))]
    fn map<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: Option<u64>,
    ) -> PyResult<Bound<'py, PyList>> {
        map_list(py, self.driver()?, offset, length)
    }

    /// Where the byte at `offset` lives (a dict), or None for raw images.
    fn locate<'py>(&self, py: Python<'py>, offset: u64) -> PyResult<Option<Bound<'py, PyDict>>> {
        let driver = self.driver()?;
        let loc = run_detached(py, || driver.locate(offset))?;
        loc.map(|l| location_dict(py, &l)).transpose()
    }

    /// Facts about the image: a dict of strings.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.driver()?.info() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Whether the image refuses writes.
    #[getter]
    fn read_only(&self) -> PyResult<bool> {
        Ok(self.driver()?.is_read_only())
    }

    /// Write `data` (any bytes-like object) at guest `offset`.
    fn write(&self, py: Python<'_>, offset: u64, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        write_from(py, self.driver()?, offset, data)
    }

    /// Make `[offset, offset + length)` read as zeros; `unmap` lets the driver
    /// free the storage.
    #[pyo3(signature = (offset, length, unmap=false))]
    fn write_zeroes(&self, py: Python<'_>, offset: u64, length: u64, unmap: bool) -> PyResult<()> {
        let driver = self.driver()?;
        run_detached(py, move || driver.write_zeroes(offset, length, unmap))
    }

    /// Discard `[offset, offset + length)`.
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        let driver = self.driver()?;
        run_detached(py, move || driver.discard(offset, length))
    }

    /// Make every completed write durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let driver = self.driver()?;
        run_detached(py, move || driver.flush())
    }

    /// Release the image. Further I/O raises ValueError.
    fn close(&mut self) {
        self.driver = None;
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &mut self,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        match &self.driver {
            Some(d) => format!(
                "<blkverify_rs.Image {} format={} size={}>",
                self.path.display(),
                d.format_name(),
                d.size()
            ),
            None => format!("<blkverify_rs.Image {} closed>", self.path.display()),
        }
    }
}

/// Read `length` guest bytes at `offset` of `driver` into a new `bytes`.
pub(crate) fn read_bytes(
    py: Python<'_>,
    driver: Arc<dyn BlockDriver>,
    offset: u64,
    length: usize,
) -> PyResult<Bound<'_, PyBytes>> {
    driver::check_range(driver.path(), driver.size(), offset, length as u64).map_err(to_pyerr)?;
    PyBytes::new_with(py, length, |buf| {
        run_detached(py, || driver.read_at(buf, offset))
    })
}

/// Fill the writable, contiguous buffer `buf` from `offset` of `driver`.
///
/// The driver reads into a buffer of ours with the GIL released, and the bytes
/// are then copied into `buf` with the GIL held, by Python's own buffer copy. Reading straight into `buf`
/// would hand the driver a `&mut [u8]` over memory that other Python threads
/// may write while the GIL is released: two writers of the same bytes, which
/// Rust's `&mut` promises cannot exist. The copy costs one memcpy of the
/// request; the request is read whole, so a mirrored device still checks it
/// as one request.
pub(crate) fn read_into(
    py: Python<'_>,
    driver: Arc<dyn BlockDriver>,
    offset: u64,
    buf: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let view = PyBuffer::<u8>::get(buf)?;
    if view.readonly() {
        return Err(PyValueError::new_err("readinto needs a writable buffer"));
    }
    if !view.is_c_contiguous() {
        return Err(PyValueError::new_err("readinto needs a contiguous buffer"));
    }
    let len = view.len_bytes();
    driver::check_range(driver.path(), driver.size(), offset, len as u64).map_err(to_pyerr)?;
    // Small reads (the common case: one block) reuse a buffer of this thread's.
    SCRATCH.with(|scratch| -> PyResult<()> {
        let mut own = Vec::new();
        let mut scratch = scratch.try_borrow_mut();
        let bytes = match scratch.as_deref_mut() {
            Ok(scratch) if len <= SCRATCH_MAX => {
                if scratch.len() < len {
                    scratch.resize(len, 0);
                }
                scratch
            }
            _ => {
                own.resize(len, 0);
                &mut own
            }
        };
        let bytes = bytes.get_mut(..len).unwrap_or(&mut []);
        run_detached(py, || driver.read_at(bytes, offset))?;
        // With the GIL held, by Python's own copy (PyBuffer_FromContiguous).
        view.copy_from_slice(py, bytes)
    })?;
    drop(view);
    Ok(len)
}

/// Reads up to this size go through a per-thread buffer (see [`read_into`]).
const SCRATCH_MAX: usize = 1 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write the bytes-like `data` at `offset` of `driver`.
///
/// The bytes are copied out of `data` with the GIL held, then written with it
/// released: a `&[u8]` over `data` itself would promise the driver bytes that
/// no one changes, which other Python threads could break while the GIL is
/// released.
pub(crate) fn write_from(
    py: Python<'_>,
    driver: Arc<dyn BlockDriver>,
    offset: u64,
    data: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let view = PyBuffer::<u8>::get(data)?;
    if !view.is_c_contiguous() {
        return Err(PyValueError::new_err("write needs a contiguous buffer"));
    }
    let bytes = view.to_vec(py)?;
    drop(view);
    run_detached(py, || driver.write_at(&bytes, offset))?;
    Ok(bytes.len())
}

/// The mapping of `[offset, offset + length)` as (offset, length, kind,
/// host_offset or None) tuples.
pub(crate) fn map_list(
    py: Python<'_>,
    driver: Arc<dyn BlockDriver>,
    offset: u64,
    length: Option<u64>,
) -> PyResult<Bound<'_, PyList>> {
    let end = length.map_or(driver.size(), |l| {
        offset.saturating_add(l).min(driver.size())
    });
    let extents = run_detached(py, || {
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let e = driver.map(at, end - at)?;
            let host = match e.mapping {
                driver::Mapping::Data { host_offset } => Some(host_offset),
                driver::Mapping::Compressed { host_offset, .. } => Some(host_offset),
                _ => None,
            };
            out.push((e.offset, e.length, e.mapping.kind(), host));
            at += e.length.max(1);
        }
        Ok(out)
    })?;
    PyList::new(py, extents)
}

pub(crate) fn location_dict<'py>(
    py: Python<'py>,
    l: &driver::Location,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("file", l.file.display().to_string())?;
    d.set_item("kind", l.kind)?;
    d.set_item("unit", l.unit)?;
    let tables = PyList::empty(py);
    for t in &l.tables {
        let entry = PyDict::new(py);
        entry.set_item("table", t.table)?;
        entry.set_item("index", t.index)?;
        tables.append(entry)?;
    }
    d.set_item("tables", tables)?;
    // qcow2's own fields, kept for the reports that predate `tables`.
    if l.format == driver::Format::Qcow2 {
        d.set_item("l1_index", l.index_in("L1"))?;
        d.set_item("l2_index", l.index_in("L2"))?;
    }
    d.set_item("subcluster", l.subcluster)?;
    d.set_item("host_offset", l.host_offset)?;
    d.set_item("backing_depth", l.backing_depth)?;
    Ok(d)
}

/// Whether `path` names something we can open (used for CLI messages).
#[pyfunction]
pub(crate) fn probe_format(py: Python<'_>, path: PathBuf) -> PyResult<&'static str> {
    run_detached(py, move || {
        let storage = crate::storage::FileStorage::open_read_only(Path::new(&path))?;
        Ok(driver::probe(&storage)?.name())
    })
}
