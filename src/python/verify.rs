//! `verify` and `verify_many`: the whole-image engine, with progress and Ctrl-C.

use super::errors::{open_options, panic_to_pyerr, to_pyerr};
use super::image::location_dict;
use crate::error::{Error, Result};
use crate::verify::{self as engine, BatchProgress, Job, Progress, Verified, VerifyOptions};
use pyo3::exceptions::{PyKeyboardInterrupt, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Where the first mismatches live in the test image's metadata (for reports).
const MAX_LOCATED: usize = 1000;

#[allow(clippy::too_many_arguments)]
fn make_job(
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
) -> PyResult<Job> {
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
    Ok(Job {
        raw_options: open_options(
            None,
            false,
            raw_format,
            None,
            backing,
            max_backing_depth,
            allow_backing_anywhere,
        )?,
        test_options: open_options(
            None,
            false,
            test_format,
            snapshot,
            backing,
            max_backing_depth,
            allow_backing_anywhere,
        )?,
        raw,
        test,
        options,
    })
}

/// The report as a dict (see the Python `Report`). Locating mismatches reads
/// metadata, so it runs with the GIL released.
fn report_dict<'py>(
    py: Python<'py>,
    job: &Job,
    verified: &Verified,
) -> PyResult<Bound<'py, PyDict>> {
    let report = &verified.report;
    let locations = {
        let td = verified.test.clone();
        let offsets: Vec<u64> = report
            .mismatches
            .iter()
            .take(MAX_LOCATED)
            .map(|m| m.first_byte)
            .collect();
        // Locating is best effort: an error or a panic just leaves no mapping.
        py.detach(move || {
            catch_unwind(AssertUnwindSafe(|| {
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
            }))
            .unwrap_or_default()
        })
    };

    let d = PyDict::new(py);
    d.set_item("raw", job.raw.display().to_string())?;
    d.set_item("test", job.test.display().to_string())?;
    d.set_item("raw_format", verified.raw.format_name())?;
    d.set_item("test_format", verified.test.format_name())?;
    d.set_item("virtual_size", report.virtual_size)?;
    d.set_item("raw_size", report.raw_size)?;
    d.set_item("test_size", report.test_size)?;
    d.set_item("identical", report.identical)?;
    d.set_item("bytes_compared", report.bytes_compared)?;
    d.set_item("bytes_read", report.bytes_read)?;
    d.set_item("elapsed_s", report.elapsed.as_secs_f64())?;
    d.set_item("truncated", report.truncated)?;
    let mut warnings = report.warnings.clone();
    if !job.test_options.backing.follow {
        if let Some((_, name)) = verified
            .test
            .info()
            .into_iter()
            .find(|(k, _)| k == "backing_file")
        {
            warnings.push(format!(
                "{}: backing file '{name}' was not opened (--no-backing): unallocated clusters were compared as zeros",
                job.test.display()
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

/// Run `work` with the GIL released while `tick` (called back with the GIL)
/// checks for Ctrl-C and calls the user's progress callback. A callback error
/// or a signal cancels the work and is returned as `Err`.
pub(crate) fn run_with_progress<T: Send, P: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    args: fn(P) -> Vec<u64>,
    work: impl FnOnce(&mut dyn FnMut(P) -> bool) -> T + Send,
) -> PyResult<std::result::Result<T, Option<PyErr>>> {
    let mut pending: Option<PyErr> = None;
    let outcome = {
        let pending = &mut pending;
        py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let mut tick = |p: P| -> bool {
                    Python::attach(|py| {
                        if let Err(e) = py.check_signals() {
                            *pending = Some(e);
                            return false;
                        }
                        if let Some(cb) = &progress {
                            let values = args(p);
                            let call = match values.as_slice() {
                                [a] => cb.call1(py, (*a,)),
                                [a, b] => cb.call1(py, (*a, *b)),
                                [a, b, c, d] => cb.call1(py, (*a, *b, *c, *d)),
                                _ => Ok(py.None()),
                            };
                            if let Err(e) = call {
                                *pending = Some(e);
                                return false;
                            }
                        }
                        true
                    })
                };
                work(&mut tick)
            }))
        })
    };
    match outcome {
        Ok(value) if pending.is_none() => Ok(Ok(value)),
        Ok(_) => Ok(Err(pending)),
        Err(panic) => Err(panic_to_pyerr(panic)),
    }
}

/// Verify `test` against the reference `raw`; returns a dict (see the Python
/// `Report`). `progress(done, total)` is called about ten times a second.
#[pyfunction]
#[pyo3(signature = (raw, test, *, all=false, strict=false, raw_format=None, test_format=None,
    snapshot=None, backing=true, max_backing_depth=16, allow_backing_anywhere=false, threads=0,
    chunk_size=0, max_runs=100_000, progress=None))]
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
    let job = make_job(
        raw,
        test,
        all,
        strict,
        raw_format,
        test_format,
        snapshot,
        backing,
        max_backing_depth,
        allow_backing_anywhere,
        threads,
        chunk_size,
        max_runs,
    )?;
    let outcome = run_with_progress(
        py,
        progress.map(Bound::unbind),
        |p: Progress| vec![p.done, p.total],
        |tick| engine::verify_pair(&job, tick),
    )?;
    match outcome {
        Ok(Ok(verified)) => report_dict(py, &job, &verified),
        Ok(Err(e)) => Err(to_pyerr(e)),
        Err(pending) => Err(pending.unwrap_or_else(|| PyKeyboardInterrupt::new_err("cancelled"))),
    }
}

fn opt_str(d: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<String>> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => Ok(Some(v.extract()?)),
        _ => Ok(None),
    }
}

fn opt_bool(d: &Bound<'_, PyDict>, key: &str, default: bool) -> PyResult<bool> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => v.extract(),
        _ => Ok(default),
    }
}

/// Verify many pairs within one core budget. `pairs` is a list of dicts with
/// `raw`, `test` and optionally `raw_format`, `test_format`, `snapshot`, `all`,
/// `strict`. Returns one item per pair, in order: a report dict, or the
/// exception the pair raised (as a value). `progress(done, total, pairs_done,
/// pairs_total)` is called about ten times a second.
#[pyfunction]
#[pyo3(signature = (pairs, *, all=false, strict=false, backing=true, max_backing_depth=16,
    allow_backing_anywhere=false, threads=0, max_runs=100_000, progress=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn verify_many<'py>(
    py: Python<'py>,
    pairs: Vec<Bound<'py, PyDict>>,
    all: bool,
    strict: bool,
    backing: bool,
    max_backing_depth: u32,
    allow_backing_anywhere: bool,
    threads: usize,
    max_runs: usize,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyList>> {
    let mut jobs = Vec::with_capacity(pairs.len());
    for pair in &pairs {
        let (Some(raw), Some(test)) = (opt_str(pair, "raw")?, opt_str(pair, "test")?) else {
            return Err(PyTypeError::new_err("each pair needs 'raw' and 'test'"));
        };
        jobs.push(make_job(
            PathBuf::from(raw),
            PathBuf::from(test),
            opt_bool(pair, "all", all)?,
            opt_bool(pair, "strict", strict)?,
            opt_str(pair, "raw_format")?.as_deref(),
            opt_str(pair, "test_format")?.as_deref(),
            opt_str(pair, "snapshot")?,
            backing,
            max_backing_depth,
            allow_backing_anywhere,
            0,
            0,
            max_runs,
        )?);
    }
    let outcome = run_with_progress(
        py,
        progress.map(Bound::unbind),
        |p: BatchProgress| vec![p.done, p.total, p.pairs_done as u64, p.pairs_total as u64],
        |tick| engine::verify_many(&jobs, threads, tick),
    )?;
    let results: Vec<Result<Verified>> = match outcome {
        Ok(results) => results,
        Err(pending) => {
            return Err(pending.unwrap_or_else(|| PyKeyboardInterrupt::new_err("cancelled")))
        }
    };
    let list = PyList::empty(py);
    for (job, result) in jobs.iter().zip(results) {
        match result {
            Ok(verified) => list.append(report_dict(py, job, &verified)?)?,
            Err(Error::Cancelled) => {
                return Err(PyKeyboardInterrupt::new_err("cancelled"));
            }
            Err(e) => list.append(to_pyerr(e).into_value(py))?,
        }
    }
    Ok(list)
}
