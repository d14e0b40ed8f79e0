//! The Python bindings: the only code that names pyo3. Every call that touches
//! the disk releases the GIL, panics never cross into Python, and errors map to
//! one exception hierarchy rooted at `blkverify_rs.Error` (see `errors.rs`).
//!
//! One file per Python-facing concern; each registers itself in `_native` below.

mod create;
mod device;
mod errors;
mod exercise;
mod image;
mod verify;

use crate::driver::Format;
use errors::{exc, CorruptImageError, FormatError, MismatchError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("Error", py.get_type::<exc::Error>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("CorruptImageError", py.get_type::<CorruptImageError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    // The format registry's names, so that Python never keeps its own list.
    let names = |pick: fn(&Format) -> bool| {
        Format::ALL
            .iter()
            .filter(|f| pick(f))
            .map(Format::name)
            .collect::<Vec<_>>()
    };
    m.add(
        "READABLE_FORMATS",
        PyTuple::new(py, names(Format::can_read))?,
    )?;
    m.add(
        "WRITABLE_FORMATS",
        PyTuple::new(py, names(Format::can_write))?,
    )?;
    m.add_class::<image::PyImage>()?;
    m.add_class::<device::PyDevice>()?;
    m.add_function(wrap_pyfunction!(device::open_device, m)?)?;
    m.add_function(wrap_pyfunction!(image::open, m)?)?;
    m.add_function(wrap_pyfunction!(verify::verify, m)?)?;
    m.add_function(wrap_pyfunction!(create::create, m)?)?;
    m.add_function(wrap_pyfunction!(verify::verify_many, m)?)?;
    m.add_function(wrap_pyfunction!(exercise::exercise, m)?)?;
    m.add_function(wrap_pyfunction!(image::probe_format, m)?)?;
    Ok(())
}
