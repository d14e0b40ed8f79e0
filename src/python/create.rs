//! `create`: make a new raw or qcow2 image.

use super::errors::run_detached;
use crate::driver::qcow2::create::{create as create_image, CreateOptions};
use crate::driver::Format;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;

fn parse_format(name: &str, what: &str) -> PyResult<Format> {
    Format::parse(name)
        .filter(Format::can_write)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "{what} '{name}' is not supported (use {})",
                Format::names(Format::can_write).replace(", ", " or ")
            ))
        })
}

/// Create an image at `path` (replacing any file there).
#[pyfunction]
#[pyo3(signature = (path, size=None, format="qcow2", cluster_size=65536, backing=None,
    backing_format=None, version=3, refcount_bits=16, extended_l2=false, lazy_refcounts=false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn create(
    py: Python<'_>,
    path: PathBuf,
    size: Option<u64>,
    format: &str,
    cluster_size: u64,
    backing: Option<String>,
    backing_format: Option<&str>,
    version: u32,
    refcount_bits: u32,
    extended_l2: bool,
    lazy_refcounts: bool,
) -> PyResult<()> {
    let options = CreateOptions {
        format: parse_format(format, "format")?,
        size,
        cluster_size,
        version,
        refcount_bits,
        extended_l2,
        lazy_refcounts,
        backing,
        backing_format: backing_format
            .map(|f| parse_format(f, "backing format"))
            .transpose()?,
    };
    run_detached(py, move || create_image(&path, &options))
}
