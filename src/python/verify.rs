//! `verify`: the whole-image engine, with progress and Ctrl-C.

use super::errors::{open_options, panic_to_pyerr, run_detached, to_pyerr, FormatError};
use super::image::location_dict;
use crate::driver;
use crate::error::Error;
use crate::verify::{self as engine, Progress, VerifyOptions};
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Verify `test` against the reference `raw`; returns a dict (see the Python
/// `Report`). `progress(done, total)` is called about ten times a second.
#[pyfunction]
#[pyo3(signature = (raw, test, *, all=false, strict=false, raw_format=None, test_format=None,
    snapshot=None, backing=true, max_backing_depth=16, allow_backing_anywhere=false, threads=0, chunk_size=0,
    max_runs=100_000, progress=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn verify<'py>(
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
    allow_backing_anywhere: bool,
    threads: usize,
    chunk_size: u64,
    max_runs: usize,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let raw_options = open_options(
        None,
        false,
        raw_format,
        None,
        backing,
        max_backing_depth,
        allow_backing_anywhere,
    )?;
    let test_options = open_options(
        None,
        false,
        test_format,
        snapshot,
        backing,
        max_backing_depth,
        allow_backing_anywhere,
    )?;
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
        let offsets: Vec<u64> = report
            .mismatches
            .iter()
            .take(1000)
            .map(|m| m.first_byte)
            .collect();
        py.detach(move || {
            offsets
                .iter()
                .map(|&o| {
                    if o < td.size() {
                        td.locate(o).ok().flatten()
                    } else {
                        None
                    }
                })
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
    let mut warnings = report.warnings.clone();
    if !backing {
        if let Some((_, name)) = test_driver
            .info()
            .into_iter()
            .find(|(k, _)| k == "backing_file")
        {
            warnings.push(format!(
                "{}: backing file '{name}' was not opened (--no-backing): unallocated clusters were compared as zeros",
                test.display()
            ));
        }
    }
    d.set_item("warnings", PyList::new(py, &warnings)?)?;
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
