//! `Device`: the mirrored blkverify device (a raw reference and a test image), and
//! `open_device`. Every call releases the GIL; a mismatch raises `MismatchError`.

use super::detached::run_detached;
use super::image::{map_list, read_bytes, read_into, write_from};
use super::options::{open_options, Kwargs};
use crate::blkverify::{Blkverify, Spec};
use crate::driver::BlockDriver;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;

/// A `blkverify:RAW:TEST` device.
#[pyclass(module = "blkverify_rs._native", name = "Device")]
pub struct PyDevice {
    device: Option<Arc<Blkverify>>,
    raw: PathBuf,
    test: PathBuf,
}

impl PyDevice {
    pub(crate) fn new(device: Blkverify) -> PyDevice {
        PyDevice {
            raw: device.raw().path().to_path_buf(),
            test: device.test().path().to_path_buf(),
            device: Some(Arc::new(device)),
        }
    }

    fn spec(&self) -> Spec {
        Spec {
            raw: self.raw.clone(),
            test: self.test.clone(),
        }
    }

    fn device(&self) -> PyResult<Arc<Blkverify>> {
        self.device.clone().ok_or_else(|| {
            PyValueError::new_err(format!("{}: I/O on a closed device", self.spec()))
        })
    }

    fn driver(&self) -> PyResult<Arc<dyn BlockDriver>> {
        Ok(self.device()?)
    }
}

#[pymethods]
impl PyDevice {
    /// The virtual disk size in bytes (the test image's).
    #[getter]
    fn size(&self) -> PyResult<u64> {
        Ok(self.device()?.size())
    }

    /// "blkverify".
    #[getter]
    fn format(&self) -> PyResult<&'static str> {
        Ok(self.device()?.format_name())
    }

    /// The test image's format, as `formats()` names it ("raw", "qcow2", ...).
    #[getter]
    fn test_format(&self) -> PyResult<&'static str> {
        Ok(self.device()?.test().format_name())
    }

    /// The raw reference's path.
    #[getter]
    fn raw(&self) -> String {
        self.raw.display().to_string()
    }

    /// The test image's path.
    #[getter]
    fn test(&self) -> String {
        self.test.display().to_string()
    }

    /// The spec, `blkverify:RAW:TEST`.
    #[getter]
    fn path(&self) -> String {
        self.spec().to_string()
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.device.is_none()
    }

    /// Whether the device refuses writes.
    #[getter]
    fn read_only(&self) -> PyResult<bool> {
        Ok(self.device()?.is_read_only())
    }

    /// Read `length` bytes at `offset` from both sides; raises `MismatchError` if
    /// they differ.
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        read_bytes(py, self.driver()?, offset, length)
    }

    /// Fill `buf` from `offset` (both sides, compared); returns the byte count.
    fn readinto(&self, py: Python<'_>, offset: u64, buf: &Bound<'_, PyAny>) -> PyResult<usize> {
        read_into(py, self.driver()?, offset, buf)
    }

    /// Write `data` at `offset` on both sides.
    fn write(&self, py: Python<'_>, offset: u64, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        write_from(py, self.driver()?, offset, data)
    }

    /// Make `[offset, offset + length)` read as zeros on both sides.
    #[pyo3(signature = (offset, length, unmap=false))]
    fn write_zeroes(&self, py: Python<'_>, offset: u64, length: u64, unmap: bool) -> PyResult<()> {
        let device = self.device()?;
        run_detached(py, move || device.write_zeroes(offset, length, unmap))
    }

    /// Discard `[offset, offset + length)` on both sides.
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        let device = self.device()?;
        run_detached(py, move || device.discard(offset, length))
    }

    /// Flush both sides.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let device = self.device()?;
        run_detached(py, move || device.flush())
    }

    /// The test image's mapping, as `Image.map` returns it.
    #[pyo3(signature = (offset=0, length=None))]
    fn map<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: Option<u64>,
    ) -> PyResult<Bound<'py, PyList>> {
        map_list(py, self.driver()?, offset, length)
    }

    /// Facts about the device and its test image: a dict of strings.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.device()?.info() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Release both images. Further I/O raises ValueError.
    fn close(&mut self) {
        self.device = None;
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
        let state = match &self.device {
            Some(d) => format!("test_format={} size={}", d.test().format_name(), d.size()),
            None => "closed".to_string(),
        };
        format!("<blkverify_rs.Device {} {state}>", self.path())
    }
}

/// Open a mirrored device from explicit `raw` and `test` paths (for paths that
/// contain a colon); `options` as for `open`, applied to the test side.
#[pyfunction]
#[pyo3(signature = (raw, test, **options))]
pub(crate) fn open_device(
    py: Python<'_>,
    raw: PathBuf,
    test: PathBuf,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyDevice> {
    let kw = Kwargs::new(py, options)?;
    let options = open_options(&kw)?;
    kw.finish("open_device")?;
    let device = run_detached(py, move || Blkverify::open(&raw, &test, &options))?;
    Ok(PyDevice::new(device))
}
