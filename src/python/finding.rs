//! Findings as dicts, for exercise's, a replay's and serve's results: one set
//! of keys (the Python `ExerciseFinding`), with serve's three more
//! (`request`, `connection`, `mapping`: the Python `ServeFinding`).

use super::image::location_dict;
use crate::blkverify::Difference;
use crate::{exercise, serve};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An exercise finding as a dict; with `serve_keys`, also serve's keys, as a
/// replay reports it (the op's number is the request's).
pub(crate) fn exercise_finding_dict<'py>(
    py: Python<'py>,
    f: &exercise::Finding,
    serve_keys: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let number = f.op.map(|op| op.number);
    finding_dict(
        py,
        (number, f.op.map(|op| op.command())),
        f.last_change.map(|op| op.log_line()),
        &f.difference,
        serve_keys.then_some(number),
    )
}

/// A serve finding as a dict: exercise's keys (the request's number is the
/// op's; no `last_change`), and serve's.
pub(crate) fn serve_finding_dict<'py>(
    py: Python<'py>,
    f: &serve::Finding,
) -> PyResult<Bound<'py, PyDict>> {
    finding_dict(
        py,
        (f.request, f.op.clone()),
        None,
        &f.difference,
        Some(f.request),
    )
}

/// The dict: `op` is the op's number and command, `request` (serve's keys)
/// the request's number.
fn finding_dict<'py>(
    py: Python<'py>,
    (op_number, op): (Option<u64>, Option<String>),
    last_change: Option<String>,
    f: &Difference,
    request: Option<Option<u64>>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("op_number", op_number)?;
    d.set_item("op", op)?;
    d.set_item("phase", f.phase)?;
    d.set_item("kind", f.kind)?;
    d.set_item("message", &f.message)?;
    d.set_item("sector", f.sector)?;
    d.set_item("first_byte", f.first_byte)?;
    d.set_item("test_ret", f.test_ret)?;
    d.set_item("raw_ret", f.raw_ret)?;
    d.set_item("test_error", &f.test_error)?;
    d.set_item("raw_error", &f.raw_error)?;
    d.set_item("test_bytes", hex(&f.test_bytes))?;
    d.set_item("raw_bytes", hex(&f.raw_bytes))?;
    d.set_item("hexdump", PyList::new(py, f.hexdump())?)?;
    d.set_item("last_change", last_change)?;
    d.set_item("diagnosis", &f.diagnosis)?;
    if let Some(request) = request {
        d.set_item("request", request)?;
        d.set_item("connection", f.connection)?;
        let mapping = match &f.mapping {
            Some(l) => Some(location_dict(py, l)?),
            None => None,
        };
        d.set_item("mapping", mapping)?;
    }
    Ok(d)
}
