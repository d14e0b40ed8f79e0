//! `open`: an image path gives an `Image`, a `blkverify:RAW:TEST` spec a
//! `Device`. It sits above both classes: `Device` builds on `Image`'s I/O
//! calls, and `Image` knows nothing of `Device`.

use super::detached::run_detached;
use super::device::PyDevice;
use super::image::PyImage;
use super::options::{open_options, Kwargs};
use crate::blkverify::{open_spec, Opened};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// Open an image, or a mirrored device when `path` is a `blkverify:RAW:TEST`
/// spec. `options`: `format`, `read_only`, `snapshot`, `backing`,
/// `max_backing_depth`, `allow_backing_anywhere`, `timeout`.
#[pyfunction]
#[pyo3(signature = (path, **options))]
pub(crate) fn open<'py>(
    py: Python<'py>,
    path: PathBuf,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let kw = Kwargs::new(py, options)?;
    let options = open_options(&kw)?;
    kw.finish("open")?;
    let p = path.clone();
    match run_detached(py, move || open_spec(&p, &options))? {
        Opened::Image(driver) => Ok(Bound::new(py, PyImage::new(driver, path))?.into_any()),
        Opened::Device(device) => Ok(Bound::new(py, PyDevice::new(device))?.into_any()),
    }
}
