//! The core's rules that Python asks about rather than repeating them: the
//! size grammar, the format registry, the `blkverify:RAW:TEST` spec syntax,
//! and the limits and defaults (`add_constants`).

use crate::blkverify::{parse_spec as parse, Spec};
use crate::driver::{Access, Format};
use crate::size::{self, SizeError};
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;
use std::path::PathBuf;

/// A size as QEMU's tools read it: bytes, an optional fraction and a binary
/// suffix (`4k`, `1.5M`, `2G`; b, k, M, G, T, P, E in any case), or hex
/// (`0x1000`). A malformed size is a `ValueError`; a negative one, or one above
/// 2**63 - 1, an `OverflowError`, as Python says of numbers out of range.
#[pyfunction]
pub(crate) fn parse_size(text: &str) -> PyResult<u64> {
    size::parse_size(text).map_err(|e| match e {
        SizeError::Invalid(_) => PyValueError::new_err(e.to_string()),
        SizeError::OutOfRange(_) => PyOverflowError::new_err(e.to_string()),
    })
}

/// The core's limits and defaults, as constants of `_native`, so that Python
/// reads each number from its one owner instead of spelling it again.
pub(crate) fn add_constants(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SECTOR_SIZE", crate::driver::SECTOR_SIZE)?;
    m.add(
        "DEFAULT_BACKING_DEPTH",
        crate::driver::DEFAULT_BACKING_DEPTH,
    )?;
    m.add("DIGEST_BLOCK_SIZE", crate::digest::BLOCK_SIZE)?;
    m.add("MAX_LOCATED", crate::verify::MAX_LOCATED)?;
    m.add("MAX_QUEUE_DEPTH", crate::exercise::MAX_QUEUE_DEPTH)?;
    m.add("ON_MISMATCH", crate::serve::Policy::NAMES.to_vec())?;
    Ok(())
}

/// The names of the formats blkverify can read (`readable`), create and write
/// (`writable`), whose every byte QEMU counts as allocated (`qemu_all_allocated`),
/// or, with none of these, every format it knows.
#[pyfunction]
#[pyo3(signature = (*, readable=false, writable=false, qemu_all_allocated=false))]
pub(crate) fn formats(
    readable: bool,
    writable: bool,
    qemu_all_allocated: bool,
) -> Vec<&'static str> {
    Format::ALL
        .iter()
        .filter(|f| !readable || f.supports(Access::Read))
        .filter(|f| !writable || f.supports(Access::Write))
        .filter(|f| !qemu_all_allocated || qemu_counts_all_allocated(**f))
        .map(Format::name)
        .collect()
}

/// Whether QEMU's driver for `format` reports every byte as allocated (to
/// qemu-io's `alloc` and `map`), which `io` must answer as qemu-io does. raw
/// has no allocation metadata; QEMU's vpc and vdi drivers open no backing
/// file, so they read an unallocated block as zeros and count it allocated.
/// The match names every format, so a new one must be decided here.
fn qemu_counts_all_allocated(format: Format) -> bool {
    match format {
        Format::Raw | Format::Vpc | Format::Vdi => true,
        Format::Qcow2 | Format::Vmdk | Format::Vhdx => false,
    }
}

/// `(raw, test)` for a `blkverify:RAW:TEST` spec, `None` for anything else
/// (a plain image); `ValueError` for the prefix with a part missing.
#[pyfunction]
pub(crate) fn parse_spec(spec: &str) -> PyResult<Option<(PathBuf, PathBuf)>> {
    parse(spec)
        .map(|s| s.map(|Spec { raw, test }| (raw, test)))
        .map_err(super::errors::to_pyerr)
}

/// Whether `text` is an NBD URI (`nbd://…`, `nbd+unix://…`), which names an
/// export, not a file: it never resolves against a directory.
#[pyfunction]
pub(crate) fn is_nbd_uri(text: &str) -> bool {
    crate::driver::nbd::is_uri(text)
}

/// The spec of the mirrored device over `raw` and `test`.
#[pyfunction]
pub(crate) fn make_spec(raw: PathBuf, test: PathBuf) -> String {
    Spec { raw, test }.to_string()
}
