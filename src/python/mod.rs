//! The Python bindings: the only code that names pyo3. Every call that touches
//! the disk releases the GIL (`detached.rs`), panics never cross into Python,
//! and errors map to one exception hierarchy rooted at `blkverify_rs.Error`
//! (`errors.rs`). Options arrive as keyword arguments and become the core's
//! structs once (`options.rs`).
//!
//! One file per Python-facing concern; each registers itself in `_native` below.

mod batch;
mod create;
mod detached;
mod device;
mod digest;
mod errors;
mod exercise;
mod finding;
mod image;
mod map;
mod open;
mod options;
mod replay;
mod rules;
mod serve;
mod verify;

use errors::{exc, CorruptImageError, FormatError, MismatchError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    rules::add_constants(m)?;
    m.add("DIGESTS_FORMAT", verify::DIGESTS)?;
    m.add("REPORT_FIELDS", PyTuple::new(py, verify::REPORT_FIELDS)?)?;
    m.add(
        "REPORT_JSON_FIELDS",
        PyTuple::new(py, verify::REPORT_JSON_FIELDS)?,
    )?;
    m.add(
        "DIGEST_ALGORITHMS",
        crate::digest::Algorithm::ALL.map(|a| a.name()).to_vec(),
    )?;
    m.add("Error", py.get_type::<exc::Error>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("CorruptImageError", py.get_type::<CorruptImageError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add_class::<replay::PyRecording>()?;
    m.add_class::<image::PyImage>()?;
    m.add_class::<device::PyDevice>()?;
    m.add_class::<digest::PyBlockDigests>()?;
    m.add_class::<digest::PySpanJoiner>()?;
    m.add_class::<map::PyMapExtent>()?;
    m.add_class::<serve::PyServer>()?;
    m.add_class::<batch::PyVerifyStream>()?;
    m.add_function(wrap_pyfunction!(open::open, m)?)?;
    m.add_function(wrap_pyfunction!(device::open_device, m)?)?;
    m.add_function(wrap_pyfunction!(image::probe_format, m)?)?;
    m.add_function(wrap_pyfunction!(create::create, m)?)?;
    m.add_function(wrap_pyfunction!(verify::verify, m)?)?;
    m.add_function(wrap_pyfunction!(batch::verify_stream, m)?)?;
    m.add_function(wrap_pyfunction!(batch::scan_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(verify::check_pair, m)?)?;
    m.add_function(wrap_pyfunction!(verify::merge_reports, m)?)?;
    m.add_function(wrap_pyfunction!(digest::digest, m)?)?;
    m.add_function(wrap_pyfunction!(digest::digest_span, m)?)?;
    m.add_function(wrap_pyfunction!(digest::check_spans, m)?)?;
    m.add_function(wrap_pyfunction!(map::map, m)?)?;
    m.add_function(wrap_pyfunction!(map::map_picture, m)?)?;
    m.add_function(wrap_pyfunction!(exercise::exercise, m)?)?;
    m.add_function(wrap_pyfunction!(exercise::read_log, m)?)?;
    m.add_function(wrap_pyfunction!(exercise::write_log, m)?)?;
    m.add_function(wrap_pyfunction!(serve::serve, m)?)?;
    m.add_function(wrap_pyfunction!(rules::parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(rules::formats, m)?)?;
    m.add_function(wrap_pyfunction!(rules::parse_spec, m)?)?;
    m.add_function(wrap_pyfunction!(rules::make_spec, m)?)?;
    m.add_function(wrap_pyfunction!(rules::is_nbd_uri, m)?)?;
    Ok(())
}
