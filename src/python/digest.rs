//! `digest`, an image's blkhash-compatible digest (with progress and Ctrl-C),
//! and `BlockDigests`, a block digests file loaded for reading.

use super::detached::{run_detached, run_with_progress};
use super::errors::to_pyerr;
use super::options::{read_only_options, verify_options, Kwargs};
use super::verify::{report_to_dict, unopened_backing, Names};
use crate::digest::{
    self as engine, to_hex, Algorithm, BlockDigests, BlockSpan, DigestOptions, Run, DIGEST_LEN,
};
use crate::driver;
use crate::verify::Progress;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;

/// `DigestOptions` from `algorithm` and `threads`.
fn digest_options(kw: &Kwargs<'_>) -> PyResult<DigestOptions> {
    let defaults = DigestOptions::default();
    let algorithm = match kw.take::<String>("algorithm")? {
        None => defaults.algorithm,
        Some(name) => Algorithm::parse(&name).ok_or_else(|| {
            let known: Vec<&str> = Algorithm::ALL.iter().map(Algorithm::name).collect();
            PyValueError::new_err(format!(
                "unknown digest algorithm '{name}' (supported: {})",
                known.join(", ")
            ))
        })?,
    };
    Ok(DigestOptions {
        algorithm,
        threads: kw.take("threads")?.unwrap_or(defaults.threads),
        chunk_size: kw.take("chunk_size")?.unwrap_or(defaults.chunk_size),
    })
}

/// The digest of the image at `path` as a dict (see the Python `Digest`).
/// `options`: `format`, `snapshot`, `backing`, `max_backing_depth`,
/// `allow_backing_anywhere`, `timeout` (as `open`), `algorithm`, `threads`,
/// `chunk_size`, and `blocks` (write the block digests file there).
/// `progress(done, total)` is called about ten times a second.
#[pyfunction]
#[pyo3(signature = (path, progress=None, **options))]
pub(crate) fn digest<'py>(
    py: Python<'py>,
    path: PathBuf,
    progress: Option<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let kw = Kwargs::new(py, options)?;
    let open = read_only_options(&kw)?;
    let digest_options = digest_options(&kw)?;
    let blocks: Option<PathBuf> = kw.take("blocks")?;
    kw.finish("digest")?;
    let image = run_detached(py, || driver::open(&path, &open))?;
    let result = run_with_progress(
        py,
        progress,
        |p: Progress| (p.done, p.total),
        |tick| engine::digest(image.as_ref(), &digest_options, blocks.as_deref(), tick),
    )?;
    let warnings: Vec<String> = unopened_backing(&path, image.as_ref(), &open, "hashed")
        .into_iter()
        .collect();
    let d = PyDict::new(py);
    d.set_item("image", path.display().to_string())?;
    d.set_item("warnings", PyList::new(py, &warnings)?)?;
    d.set_item("digest", result.hexdigest())?;
    d.set_item("algorithm", result.algorithm.name())?;
    d.set_item("block_size", result.block_size)?;
    d.set_item("size", result.size)?;
    d.set_item("bytes_read", result.bytes_read)?;
    d.set_item("elapsed_s", result.elapsed.as_secs_f64())?;
    Ok(d)
}

/// A block digests file, loaded and checked: an image's digest and the digest
/// of each of its blocks.
#[pyclass(module = "blkverify_rs._native", name = "BlockDigests", frozen)]
pub struct PyBlockDigests {
    digests: Arc<BlockDigests>,
}

#[pymethods]
impl PyBlockDigests {
    /// Load the file at `path`. A damaged, truncated or foreign file raises
    /// `FormatError`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<PyBlockDigests> {
        let digests = run_detached(py, || BlockDigests::load(&path))?;
        Ok(PyBlockDigests {
            digests: Arc::new(digests),
        })
    }

    /// The file's path.
    #[getter]
    fn path(&self) -> String {
        self.digests.path().display().to_string()
    }

    /// The image's virtual size in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.digests.size()
    }

    /// Bytes per block.
    #[getter]
    fn block_size(&self) -> u64 {
        self.digests.block_size()
    }

    /// Blocks in the image.
    #[getter]
    fn block_count(&self) -> u64 {
        self.digests.block_count()
    }

    /// "sha256" or "blake3".
    #[getter]
    fn algorithm(&self) -> &'static str {
        self.digests.algorithm().name()
    }

    /// The image's digest in hex, as `blkverify digest` (and blksum) print it.
    #[getter]
    fn hexdigest(&self) -> String {
        to_hex(self.digests.image_digest())
    }

    /// The digest of block `index` as bytes (a zero block's is the digest of a
    /// block of zeros). `IndexError` past the last block.
    fn block<'py>(&self, py: Python<'py>, index: u64) -> PyResult<Bound<'py, PyBytes>> {
        let digest = self.digests.block(index).ok_or_else(|| {
            PyIndexError::new_err(format!(
                "block {index} is past the last block ({} blocks)",
                self.digests.block_count()
            ))
        })?;
        Ok(PyBytes::new(py, &digest))
    }

    fn __repr__(&self) -> String {
        format!(
            "BlockDigests({:?}, size={}, algorithm={:?})",
            self.path(),
            self.size(),
            self.algorithm()
        )
    }
}

/// `span`'s runs and digests as they travel (see `digest_span`).
fn span_dict<'py>(py: Python<'py>, span: &BlockSpan) -> PyResult<Bound<'py, PyDict>> {
    let runs = PyList::empty(py);
    for run in &span.out.runs {
        match run {
            Run::Zero(n) => runs.append(("zero", *n))?,
            Run::Data(n) => runs.append(("data", *n))?,
            Run::Failed(n, e) => runs.append(("failed", *n, e))?,
        }
    }
    let d = PyDict::new(py);
    d.set_item("first", span.first)?;
    d.set_item("end", span.end())?;
    d.set_item("runs", runs)?;
    d.set_item("digests", PyBytes::new(py, span.out.digests.as_flattened()))?;
    d.set_item("tail", PyList::new(py, &span.tail)?)?;
    d.set_item("bytes_read", span.out.bytes_read)?;
    Ok(d)
}

/// A span back from its dict (as `span_dict` makes it), every field checked.
fn span_from(value: &Bound<'_, PyAny>) -> PyResult<BlockSpan> {
    let bad = |m: &str| PyValueError::new_err(format!("a block span {m}"));
    let item = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        value
            .get_item(key)
            .map_err(|_| bad(&format!("without '{key}'")))
    };
    let first: u64 = item("first")?.extract()?;
    let mut runs = Vec::new();
    for run in item("runs")?.try_iter()? {
        let run = run?;
        let kind: String = run.get_item(0)?.extract()?;
        let count: u64 = run.get_item(1)?.extract()?;
        runs.push(match kind.as_str() {
            "zero" => Run::Zero(count),
            "data" => Run::Data(count),
            "failed" => Run::Failed(count, run.get_item(2)?.extract()?),
            _ => return Err(bad(&format!("with a run of kind '{kind}'"))),
        });
    }
    let bytes: Vec<u8> = item("digests")?.extract()?;
    if bytes.len() % DIGEST_LEN != 0 {
        return Err(bad("whose digests are not whole"));
    }
    let digests = bytes
        .chunks_exact(DIGEST_LEN)
        .map(|c| {
            let mut d = [0u8; DIGEST_LEN];
            d.copy_from_slice(c);
            d
        })
        .collect();
    let mut span = BlockSpan::from_parts(first, runs, digests).map_err(to_pyerr)?;
    span.tail = item("tail")?.extract()?;
    span.out.bytes_read = item("bytes_read")?.extract()?;
    Ok(span)
}

/// The block digests of blocks `[first, end)` of the image at `path` (64 KiB
/// blocks), as a dict: `image`, `format`, `size`, `warnings`, and the span
/// (`first`, `end`, `runs` as `("zero"|"data", count)` or `("failed", count,
/// error)`, `digests`: the data runs' digests, concatenated, `tail`,
/// `bytes_read`). `first == end` only opens the image (for its size).
/// `options`: as `digest` (no `blocks`), and `grid_end` (the blocks' grid
/// ends there, not at the image's end: the reference's size when checking
/// against it; blocks past it must read as zeros, and the `tail` lists
/// `(block, error)` for those that do not) and `record_errors` (a block that
/// cannot be read is a `failed` run, not the error).
#[pyfunction]
#[pyo3(signature = (path, first, end, progress=None, **options))]
pub(crate) fn digest_span<'py>(
    py: Python<'py>,
    path: PathBuf,
    first: u64,
    end: u64,
    progress: Option<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let kw = Kwargs::new(py, options)?;
    let open = read_only_options(&kw)?;
    let digest_options = digest_options(&kw)?;
    let grid_end: Option<u64> = kw.take("grid_end")?;
    let record_errors: bool = kw.take("record_errors")?.unwrap_or(false);
    kw.finish("digest_span")?;
    let image = run_detached(py, || driver::open(&path, &open))?;
    let grid_end = grid_end.unwrap_or(image.size());
    let span = run_with_progress(
        py,
        progress,
        |p: Progress| (p.done, p.total),
        |tick| {
            engine::digest_span(
                image.as_ref(),
                digest_options.algorithm,
                grid_end,
                (first, end),
                digest_options.threads,
                record_errors,
                tick,
            )
        },
    )?;
    let warnings: Vec<String> = unopened_backing(&path, image.as_ref(), &open, "hashed")
        .into_iter()
        .collect();
    let d = span_dict(py, &span)?;
    d.set_item("image", path.display().to_string())?;
    d.set_item("format", image.format_name())?;
    d.set_item("size", image.size())?;
    d.set_item("algorithm", digest_options.algorithm.name())?;
    d.set_item("warnings", PyList::new(py, &warnings)?)?;
    Ok(d)
}

fn algorithm_named(name: &str) -> PyResult<Algorithm> {
    Algorithm::parse(name)
        .ok_or_else(|| PyValueError::new_err(format!("unknown digest algorithm '{name}'")))
}

/// Joins the spans (`digest_span` dicts) of an image's blocks, fed in order,
/// into its digest: a client keeps one span at a time, not all of them.
#[pyclass(module = "blkverify_rs._native", name = "SpanJoiner")]
pub struct PySpanJoiner {
    joiner: Option<engine::Joiner>,
}

#[pymethods]
impl PySpanJoiner {
    /// A joiner for an image of `size` bytes hashed with `algorithm`; with
    /// `blocks`, its block digests file is written there.
    #[new]
    #[pyo3(signature = (*, size, algorithm, blocks=None))]
    fn new(size: u64, algorithm: &str, blocks: Option<PathBuf>) -> PyResult<Self> {
        let algorithm = algorithm_named(algorithm)?;
        let joiner = engine::Joiner::new(algorithm, size, blocks.as_deref()).map_err(to_pyerr)?;
        Ok(PySpanJoiner {
            joiner: Some(joiner),
        })
    }

    /// Feed the next span (it must start where the last one ended).
    fn feed(&mut self, py: Python<'_>, span: &Bound<'_, PyAny>) -> PyResult<()> {
        let span = span_from(span)?;
        let joiner = self
            .joiner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the joiner is finished"))?;
        run_detached(py, || joiner.feed(&span))
    }

    /// The digest as a dict (`digest`, `algorithm`, `block_size`, `size`,
    /// `bytes_read`), once every block was fed.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let joiner = self
            .joiner
            .take()
            .ok_or_else(|| PyValueError::new_err("the joiner is finished"))?;
        let result = run_detached(py, || joiner.finish())?;
        let d = PyDict::new(py);
        d.set_item("digest", result.hexdigest())?;
        d.set_item("algorithm", result.algorithm.name())?;
        d.set_item("block_size", result.block_size)?;
        d.set_item("size", result.size)?;
        d.set_item("bytes_read", result.bytes_read)?;
        Ok(d)
    }
}

/// The report of checking `test`, hashed as spans on the reference's grid,
/// against `raw`, hashed as spans of all its blocks (`digest_span` dicts, in
/// order): the report dict `verify` gives against `raw`'s block digests file.
/// `options`: `raw`, `test`, `raw_format`, `test_format` (names for the
/// report), `raw_size`, `test_size`, `algorithm`, and `verify`'s `all`,
/// `strict`, `max_runs`, `start`, `length`.
#[pyfunction]
#[pyo3(signature = (raw_spans, test_spans, **options))]
pub(crate) fn check_spans<'py>(
    py: Python<'py>,
    raw_spans: Vec<Bound<'py, PyAny>>,
    test_spans: Vec<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let kw = Kwargs::new(py, options)?;
    let text = |key: &str| -> PyResult<String> {
        kw.take(key)?
            .ok_or_else(|| PyValueError::new_err(format!("check_spans needs '{key}'")))
    };
    let names = Names {
        raw: text("raw")?,
        test: text("test")?,
        raw_format: text("raw_format")?,
        test_format: text("test_format")?,
    };
    let algorithm = algorithm_named(&text("algorithm")?)?;
    let size = |key: &str| -> PyResult<u64> {
        kw.take(key)?
            .ok_or_else(|| PyValueError::new_err(format!("check_spans needs '{key}'")))
    };
    let (raw_size, test_size) = (size("raw_size")?, size("test_size")?);
    let verify = verify_options(&kw)?;
    kw.finish("check_spans")?;
    let raw_spans = raw_spans
        .iter()
        .map(span_from)
        .collect::<PyResult<Vec<_>>>()?;
    let test_spans = test_spans
        .iter()
        .map(span_from)
        .collect::<PyResult<Vec<_>>>()?;
    let (raw_path, test_path) = (PathBuf::from(&names.raw), PathBuf::from(&names.test));
    let report = run_detached(py, || {
        engine::check_spans(
            engine::Spans {
                path: &raw_path,
                size: raw_size,
                spans: &raw_spans,
            },
            algorithm,
            engine::Spans {
                path: &test_path,
                size: test_size,
                spans: &test_spans,
            },
            &verify,
        )
    })?;
    report_to_dict(py, &names, &report, None, |_, _| (None, None))
}
