//! `create`: make a new raw or qcow2 image.

use super::detached::run_detached;
use super::options::{format_for, Kwargs};
use crate::driver::qcow2::create::{create as create_image, CreateOptions};
use crate::driver::Access;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// Create an image at `path` (replacing any file there). `options`: `size`,
/// `format`, `cluster_size`, `version`, `refcount_bits`, `extended_l2`,
/// `lazy_refcounts`, `backing`, `backing_format`.
#[pyfunction]
#[pyo3(signature = (path, **options))]
pub(crate) fn create(
    py: Python<'_>,
    path: PathBuf,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<()> {
    let kw = Kwargs::new(py, options)?;
    let defaults = CreateOptions::default();
    let options = CreateOptions {
        format: format_for(kw.take("format")?, Access::Write)?.unwrap_or(defaults.format),
        size: kw.take("size")?,
        cluster_size: kw.take("cluster_size")?.unwrap_or(defaults.cluster_size),
        version: kw.take("version")?.unwrap_or(defaults.version),
        refcount_bits: kw.take("refcount_bits")?.unwrap_or(defaults.refcount_bits),
        extended_l2: kw.take("extended_l2")?.unwrap_or(defaults.extended_l2),
        lazy_refcounts: kw
            .take("lazy_refcounts")?
            .unwrap_or(defaults.lazy_refcounts),
        backing: kw.take("backing")?,
        backing_format: format_for(kw.take("backing_format")?, Access::Read)?,
    };
    kw.finish("create")?;
    run_detached(py, move || create_image(&path, &options))
}
