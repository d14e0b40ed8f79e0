//! The Python bindings: the only module that names pyo3. Every call that touches
//! the disk releases the GIL, panics never cross into Python, and errors map to
//! one exception hierarchy rooted at `blkverify_rs.Error`.

use crate::driver::{self, BackingPolicy, BlockDriver, Format, OpenOptions};
use crate::error::Error;
use crate::verify::{self as engine, Progress, VerifyOptions};
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

create_exception!(_native, BlkverifyError, PyException, "The root of blkverify_rs's errors.");
create_exception!(
    _native,
    FormatError,
    BlkverifyError,
    "The image uses something blkverify does not support or must not trust."
);
create_exception!(
    _native,
    CorruptImageError,
    BlkverifyError,
    "The image's metadata contradicts itself or the file."
);
create_exception!(
    _native,
    MismatchError,
    BlkverifyError,
    "The test image returned different bytes than the reference."
);

fn to_pyerr(e: Error) -> PyErr {
    match e {
        Error::Io {
            path,
            context,
            source,
        } => {
            let errno = source.raw_os_error().unwrap_or(libc::EIO);
            // std's Display appends " (os error N)"; Python's OSError shows errno itself.
            let text = source.to_string();
            let text = match text.rfind(" (os error ") {
                Some(cut) => text.get(..cut).unwrap_or(&text).to_string(),
                None => text,
            };
            let message = format!("{context}: {text}");
            PyOSError::new_err((errno, message, path.display().to_string()))
        }
        Error::Format { .. } => FormatError::new_err(e.to_string()),
        Error::Corrupt { .. } => CorruptImageError::new_err(e.to_string()),
        Error::InvalidArgument(m) => PyValueError::new_err(m),
        Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
    }
}

/// Run core code with the GIL released, turning a panic into `blkverify_rs.Error`.
fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match outcome {
        Ok(result) => result.map_err(to_pyerr),
        Err(panic) => Err(panic_to_pyerr(panic)),
    }
}

fn panic_to_pyerr(panic: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".to_string());
    BlkverifyError::new_err(format!("internal error (please report it): {what}"))
}

fn parse_format(name: Option<&str>) -> PyResult<Option<Format>> {
    match name {
        None => Ok(None),
        Some(n) => Format::parse(n).map(Some).ok_or_else(|| {
            PyValueError::new_err(format!("unknown format '{n}' (supported: raw, qcow2)"))
        }),
    }
}

fn open_options(
    format: Option<&str>,
    snapshot: Option<String>,
    backing: bool,
    max_backing_depth: u32,
) -> PyResult<OpenOptions> {
    Ok(OpenOptions {
        format: parse_format(format)?,
        snapshot,
        backing: BackingPolicy {
            follow: backing,
            max_depth: max_backing_depth,
        },
    })
}

/// An open image (read-only).
#[pyclass(module = "blkverify_rs._native", name = "Image")]
pub struct PyImage {
    driver: Option<Arc<dyn BlockDriver>>,
    path: PathBuf,
}

impl PyImage {
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

    /// "raw" or "qcow2".
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
    fn read<'py>(&self, py: Python<'py>, offset: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let driver = self.driver()?;
        driver::check_range(driver.path(), driver.size(), offset, length as u64).map_err(to_pyerr)?;
        PyBytes::new_with(py, length, |buf| {
            run_detached(py, || driver.read_at(buf, offset))
        })
    }

    /// Fill `buf` (a writable, contiguous buffer) with the guest bytes at
    /// `offset`; returns the number of bytes read.
    fn readinto(&self, py: Python<'_>, offset: u64, buf: &Bound<'_, PyAny>) -> PyResult<usize> {
        let driver = self.driver()?;
        let view = PyBuffer::<u8>::get(buf)?;
        if view.readonly() {
            return Err(PyValueError::new_err("readinto needs a writable buffer"));
        }
        if !view.is_c_contiguous() {
            return Err(PyValueError::new_err("readinto needs a contiguous buffer"));
        }
        let len = view.len_bytes();
        driver::check_range(driver.path(), driver.size(), offset, len as u64).map_err(to_pyerr)?;
        let ptr = view.buf_ptr() as usize;
        run_detached(py, move || {
            // SAFETY: `view` holds a buffer export for the whole call, so the
            // object can neither be freed nor resized while the GIL is released;
            // it is writable and C-contiguous (checked above), and `len` is its
            // length in bytes. Concurrent Python writers would race on the bytes
            // only, never on memory safety of this slice's bounds.
            let slice = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            driver.read_at(slice, offset)
        })?;
        drop(view);
        Ok(len)
    }

    /// The mapping of the guest range: a list of (offset, length, kind,
    /// host_offset or None) tuples, as the driver's metadata describes it.
    #[pyo3(signature = (offset=0, length=None))]
    fn map<'py>(&self, py: Python<'py>, offset: u64, length: Option<u64>) -> PyResult<Bound<'py, PyList>> {
        let driver = self.driver()?;
        let end = length.map_or(driver.size(), |l| offset.saturating_add(l).min(driver.size()));
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

fn location_dict<'py>(py: Python<'py>, l: &driver::Location) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("file", l.file.display().to_string())?;
    d.set_item("kind", l.kind)?;
    d.set_item("l1_index", l.l1_index)?;
    d.set_item("l2_index", l.l2_index)?;
    d.set_item("subcluster", l.subcluster)?;
    d.set_item("host_offset", l.host_offset)?;
    d.set_item("backing_depth", l.backing_depth)?;
    Ok(d)
}

/// Open an image read-only.
#[pyfunction]
#[pyo3(signature = (path, format=None, snapshot=None, backing=true, max_backing_depth=64))]
fn open(
    py: Python<'_>,
    path: PathBuf,
    format: Option<&str>,
    snapshot: Option<String>,
    backing: bool,
    max_backing_depth: u32,
) -> PyResult<PyImage> {
    let options = open_options(format, snapshot, backing, max_backing_depth)?;
    let p = path.clone();
    let driver = run_detached(py, move || driver::open(&p, &options))?;
    Ok(PyImage {
        driver: Some(driver),
        path,
    })
}

/// Verify `test` against the reference `raw`; returns a dict (see the Python
/// `Report`). `progress(done, total)` is called about ten times a second.
#[pyfunction]
#[pyo3(signature = (raw, test, *, all=false, strict=false, raw_format=None, test_format=None,
    snapshot=None, backing=true, max_backing_depth=64, threads=0, chunk_size=0,
    max_runs=100_000, progress=None))]
#[allow(clippy::too_many_arguments)]
fn verify<'py>(
    py: Python<'py>,
    raw: PathBuf,
    test: PathBuf,
    all: bool,
    strict: bool,
    raw_format: Option<&str>,
    test_format: Option<&str>,
    snapshot: Option<String>,
    backing: bool,
    max_backing_depth: u32,
    threads: usize,
    chunk_size: u64,
    max_runs: usize,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let raw_options = open_options(raw_format, None, backing, max_backing_depth)?;
    let test_options = open_options(test_format, snapshot, backing, max_backing_depth)?;
    let mut options = VerifyOptions {
        all,
        strict,
        threads,
        max_runs: max_runs.max(1),
        ..VerifyOptions::default()
    };
    if chunk_size > 0 {
        options.chunk_size = chunk_size;
    }
    let (raw_path, test_path) = (raw.clone(), test.clone());
    let (raw_driver, test_driver) = run_detached(py, move || {
        Ok((
            driver::open(&raw_path, &raw_options)?,
            driver::open(&test_path, &test_options)?,
        ))
    })?;
    if raw_driver.format_name() != "raw" {
        return Err(FormatError::new_err(format!(
            "{}: the reference must be a raw image, but it is {}",
            raw.display(),
            raw_driver.format_name()
        )));
    }

    let progress = progress.map(|p| p.unbind());
    let mut pending: Option<PyErr> = None;
    let report = {
        let pending = &mut pending;
        let (rd, td) = (raw_driver.clone(), test_driver.clone());
        let outcome = py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let mut tick = |p: Progress| -> bool {
                    Python::attach(|py| {
                        if let Err(e) = py.check_signals() {
                            *pending = Some(e);
                            return false;
                        }
                        if let Some(cb) = &progress {
                            if let Err(e) = cb.call1(py, (p.done, p.total)) {
                                *pending = Some(e);
                                return false;
                            }
                        }
                        true
                    })
                };
                engine::verify(rd.as_ref(), td.as_ref(), &options, &mut tick)
            }))
        });
        match outcome {
            Ok(Ok(report)) => report,
            Ok(Err(Error::Cancelled)) => {
                return Err(pending
                    .take()
                    .unwrap_or_else(|| PyKeyboardInterrupt::new_err("cancelled")))
            }
            Ok(Err(e)) => return Err(to_pyerr(e)),
            Err(panic) => return Err(panic_to_pyerr(panic)),
        }
    };

    // Describe where each reported mismatch lives in the test image's metadata.
    let locations = {
        let td = test_driver.clone();
        let offsets: Vec<u64> = report.mismatches.iter().take(1000).map(|m| m.first_byte).collect();
        py.detach(move || {
            offsets
                .iter()
                .map(|&o| if o < td.size() { td.locate(o).ok().flatten() } else { None })
                .collect::<Vec<_>>()
        })
    };

    let d = PyDict::new(py);
    d.set_item("raw", raw.display().to_string())?;
    d.set_item("test", test.display().to_string())?;
    d.set_item("raw_format", raw_driver.format_name())?;
    d.set_item("test_format", test_driver.format_name())?;
    d.set_item("virtual_size", report.virtual_size)?;
    d.set_item("raw_size", report.raw_size)?;
    d.set_item("test_size", report.test_size)?;
    d.set_item("identical", report.identical)?;
    d.set_item("bytes_compared", report.bytes_compared)?;
    d.set_item("bytes_read", report.bytes_read)?;
    d.set_item("elapsed_s", report.elapsed.as_secs_f64())?;
    d.set_item("truncated", report.truncated)?;
    d.set_item("warnings", PyList::new(py, &report.warnings)?)?;
    let list = PyList::empty(py);
    for (i, m) in report.mismatches.iter().enumerate() {
        let md = PyDict::new(py);
        md.set_item("sector", m.sector())?;
        md.set_item("offset", m.offset)?;
        md.set_item("length", m.length)?;
        md.set_item("first_byte", m.first_byte)?;
        if let Some(e) = &m.error {
            md.set_item("error", e)?;
        }
        if let Some(Some(loc)) = locations.get(i) {
            md.set_item("mapping", location_dict(py, loc)?)?;
        }
        list.append(md)?;
    }
    d.set_item("mismatches", list)?;
    Ok(d)
}

/// Whether `path` names something we can open (used for CLI messages).
#[pyfunction]
fn probe_format(py: Python<'_>, path: PathBuf) -> PyResult<&'static str> {
    run_detached(py, move || {
        let storage = crate::storage::FileStorage::open_read_only(Path::new(&path))?;
        Ok(driver::probe(&storage)?.name())
    })
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("Error", py.get_type::<BlkverifyError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("CorruptImageError", py.get_type::<CorruptImageError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add_class::<PyImage>()?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(probe_format, m)?)?;
    Ok(())
}
