//! `digest`, an image's blkhash-compatible digest (with progress and Ctrl-C),
//! and `BlockDigests`, a block digests file loaded for reading.

use super::detached::{run_detached, run_with_progress};
use super::options::{open_options, Kwargs};
use super::verify::unopened_backing;
use crate::digest::{self as engine, to_hex, Algorithm, BlockDigests, DigestOptions};
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
    let open = open_options(&kw)?;
    let digest_options = digest_options(&kw)?;
    let blocks: Option<PathBuf> = kw.take("blocks")?;
    kw.finish("digest")?;
    let open = driver::OpenOptions {
        writable: false,
        ..open
    };
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
