//! The core's rules that Python asks about rather than repeating them: the
//! size grammar, the format registry, and the `blkverify:RAW:TEST` spec syntax.

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

/// The names of the formats blkverify can read (`readable`), create and write
/// (`writable`), or, with neither, every format it knows.
#[pyfunction]
#[pyo3(signature = (*, readable=false, writable=false))]
pub(crate) fn formats(readable: bool, writable: bool) -> Vec<&'static str> {
    Format::ALL
        .iter()
        .filter(|f| !readable || f.supports(Access::Read))
        .filter(|f| !writable || f.supports(Access::Write))
        .map(Format::name)
        .collect()
}

/// `(raw, test)` for a `blkverify:RAW:TEST` spec, `None` for anything else
/// (a plain image); `ValueError` for the prefix with a part missing.
#[pyfunction]
pub(crate) fn parse_spec(spec: &str) -> PyResult<Option<(PathBuf, PathBuf)>> {
    parse(spec)
        .map(|s| s.map(|Spec { raw, test }| (raw, test)))
        .map_err(super::errors::to_pyerr)
}

/// The spec of the mirrored device over `raw` and `test`.
#[pyfunction]
pub(crate) fn make_spec(raw: PathBuf, test: PathBuf) -> String {
    Spec { raw, test }.to_string()
}
