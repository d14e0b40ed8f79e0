//! A batch from Python: `verify_stream` verifies the pairs of a Python
//! iterable as a stream (see `crate::batch::stream`), yielding each pair's
//! report dict (or its exception, as a value) in order, and `scan_pairs` is
//! the first pass over the pairs that checks them all and sizes the progress
//! total before anything runs.

use super::detached::run_with_progress;
use super::errors::to_pyerr;
use super::verify::{job_options, pair_job, report_dict};
use crate::batch::{self, BatchProgress, BatchStream, StreamOptions};
use crate::driver::OpenOptions;
use crate::error::Error;
use crate::verify::VerifyOptions;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyRuntimeWarning};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyIterator};
use std::ffi::CString;

/// Check every pair of `pairs` by the pair rules (the `ValueError`
/// `check_pair` raises, or whatever iterating `pairs` raises) and add up
/// their size hints: the file sizes, which a first pass can know without
/// opening an image. Returns `(pairs, bytes)`.
#[pyfunction]
pub(crate) fn scan_pairs(pairs: &Bound<'_, PyAny>) -> PyResult<(usize, u64)> {
    let (open, options) = (OpenOptions::default(), VerifyOptions::default());
    let mut count = 0usize;
    let mut total = 0u64;
    for pair in pairs.try_iter()? {
        let job = pair_job(&pair?, &open, &options)?;
        count += 1;
        total = total.saturating_add(batch::size_hint(&job));
    }
    Ok((count, total))
}

/// Verify the pairs of the iterable `pairs` (see `verify_many`), a few at a
/// time: an iterator of one report dict (or the exception the pair raised,
/// as a value) per pair, in order. `pairs_total` and `total`, from a first
/// pass (`scan_pairs`), give the progress its totals from the start.
#[pyfunction]
#[pyo3(signature = (pairs, progress=None, pairs_total=None, total=None, **options))]
pub(crate) fn verify_stream(
    py: Python<'_>,
    pairs: &Bound<'_, PyAny>,
    progress: Option<Py<PyAny>>,
    pairs_total: Option<usize>,
    total: Option<u64>,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyVerifyStream> {
    let (open, options) = job_options(py, options, "verify_stream")?;
    let pairs = pairs.try_iter()?.unbind();
    let stream = BatchStream::new(StreamOptions {
        threads: options.threads,
        pairs_total,
        total,
    });
    Ok(PyVerifyStream {
        pairs: Some(pairs),
        open,
        options: VerifyOptions {
            threads: 0,
            ..options
        },
        progress,
        stream: Some(stream),
        input_error: None,
    })
}

/// A batch in progress (see `verify_stream`).
#[pyclass(module = "blkverify_rs._native", name = "VerifyStream")]
pub(crate) struct PyVerifyStream {
    /// The pairs not fed yet (`None` once they ran out, or failed).
    pairs: Option<Py<PyIterator>>,
    open: OpenOptions,
    options: VerifyOptions,
    progress: Option<Py<PyAny>>,
    /// `None` once closed.
    stream: Option<BatchStream>,
    /// A bad pair, or an error of the iterable: raised once the pairs
    /// before it have been yielded.
    input_error: Option<PyErr>,
}

#[pymethods]
impl PyVerifyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(mut slf: PyRefMut<'_, Self>) -> PyResult<Option<Bound<'_, PyAny>>> {
        let py = slf.py();
        let this = &mut *slf;
        if let Some(stream) = this.stream.as_mut() {
            // The display starts at zero, from the first pass's total, before
            // any pair is fed (and opened, which changes it).
            let progress = this.progress.as_ref().map(|p| p.bind(py).clone());
            let started = run_with_progress(py, progress, progress_args, |tick| stream.start(tick));
            if let Err(e) = started {
                this.close(py);
                return Err(e);
            }
        }
        if let Err(e) = this.feed(py) {
            this.close(py);
            return Err(e);
        }
        let Some(stream) = this.stream.as_mut() else {
            return Ok(None);
        };
        warn(py, stream)?;
        let progress = this.progress.as_ref().map(|p| p.bind(py).clone());
        let next = run_with_progress(py, progress, progress_args, |tick| stream.next_result(tick));
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                this.close(py);
                return Err(e);
            }
        };
        warn(py, stream)?;
        match next {
            None => {
                this.close(py);
                match this.input_error.take() {
                    Some(e) => Err(e),
                    None => Ok(None),
                }
            }
            Some((job, Ok(checked))) => Ok(Some(report_dict(py, &job, &checked)?.into_any())),
            Some((_, Err(Error::Cancelled))) => {
                this.close(py);
                Err(PyKeyboardInterrupt::new_err("cancelled"))
            }
            Some((_, Err(e))) => Ok(Some(to_pyerr(e).into_value(py).into_bound(py).into_any())),
        }
    }

    /// Stop: pairs being verified are cancelled, and every image is closed
    /// (at once, or as soon as a pair that is opening gives up).
    fn close(&mut self, py: Python<'_>) {
        self.pairs = None;
        if let Some(stream) = self.stream.take() {
            py.detach(move || drop(stream));
        }
    }
}

impl PyVerifyStream {
    /// Feed the stream from `pairs` while its window has room. A bad pair,
    /// or an error of the iterable, waits its turn (`input_error`); Ctrl-C
    /// (an exception that is not an `Exception`) is raised at once.
    fn feed(&mut self, py: Python<'_>) -> PyResult<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        while stream.room() > 0 {
            let Some(pairs) = &self.pairs else {
                return Ok(());
            };
            let mut pairs = pairs.bind(py).clone();
            let job = match pairs.next() {
                None => {
                    self.pairs = None;
                    return Ok(());
                }
                Some(pair) => pair.and_then(|pair| pair_job(&pair, &self.open, &self.options)),
            };
            match job {
                Ok(job) => stream.feed(job),
                Err(e) if !e.is_instance_of::<PyException>(py) => return Err(e),
                Err(e) => {
                    self.input_error = Some(e);
                    self.pairs = None;
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// What `progress` is called with.
fn progress_args(p: BatchProgress) -> (u64, u64, usize, usize) {
    (p.done, p.total, p.pairs_done, p.pairs_total)
}

/// Tell the caller what the stream has to say (a `RuntimeWarning`: fewer
/// pairs at once than asked for, for want of descriptors).
fn warn(py: Python<'_>, stream: &mut BatchStream) -> PyResult<()> {
    match stream.take_notice() {
        Some(notice) => {
            let message = CString::new(notice.replace('\0', " ")).unwrap_or_default();
            PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), &message, 1)
        }
        None => Ok(()),
    }
}
