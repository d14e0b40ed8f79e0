//! Keyword arguments, taken by name into the structs the core owns. A native
//! function receives its options as `**options` and builds each core struct
//! (`OpenOptions`, `VerifyOptions`, an exercise `Request`, `CreateOptions`, a
//! map `PictureRequest`) once, here; a key left out keeps the core's default.

use super::errors::to_pyerr;
use super::rules::parse_size;
use crate::driver::{Access, Format, OpenOptions};
use crate::map::{FindingRange, OnError, PictureRequest};
use crate::verify::VerifyOptions;
use pyo3::conversion::FromPyObjectOwned;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use std::time::Duration;

/// The `**options` of one call, taken key by key.
pub(crate) struct Kwargs<'py> {
    dict: Bound<'py, PyDict>,
}

impl<'py> Kwargs<'py> {
    /// A copy of `options` (so taking a key never changes the caller's dict).
    pub fn new(py: Python<'py>, options: Option<&Bound<'py, PyDict>>) -> PyResult<Self> {
        Ok(Kwargs {
            dict: match options {
                Some(d) => d.copy()?,
                None => PyDict::new(py),
            },
        })
    }

    /// The value of `key`, taken out; `None` when it is absent or `None`.
    pub fn take<T: FromPyObjectOwned<'py>>(&self, key: &str) -> PyResult<Option<T>> {
        let Some(value) = self.dict.get_item(key)? else {
            return Ok(None);
        };
        self.dict.del_item(key)?;
        if value.is_none() {
            return Ok(None);
        }
        value.extract().map(Some).map_err(Into::into)
    }

    /// A size taken out: an int, or a string in QEMU's size grammar (`"1.5G"`).
    pub fn take_size(&self, key: &str) -> PyResult<Option<u64>> {
        match self.take::<Bound<'py, PyAny>>(key)? {
            None => Ok(None),
            Some(value) => match value.cast::<PyString>() {
                Ok(text) => parse_size(&text.to_cow()?).map(Some),
                Err(_) => value.extract().map(Some),
            },
        }
    }

    /// A `TypeError` naming any key no option took, as Python says it.
    pub fn finish(self, function: &str) -> PyResult<()> {
        match self.dict.keys().iter().next() {
            Some(key) => Err(PyTypeError::new_err(format!(
                "{function}() got an unexpected keyword argument {}",
                key.repr()?
            ))),
            None => Ok(()),
        }
    }
}

/// A format name the caller must be able to use for `access`.
pub(crate) fn format_for(name: Option<String>, access: Access) -> PyResult<Option<Format>> {
    name.map(|n| Format::parse_for(&n, access))
        .transpose()
        .map_err(to_pyerr)
}

/// `OpenOptions` from `format`, `read_only`, `snapshot`, `backing`,
/// `max_backing_depth`, `allow_backing_anywhere`, `timeout` (seconds) and
/// `force_share`.
pub(crate) fn open_options(kw: &Kwargs<'_>) -> PyResult<OpenOptions> {
    let mut options = OpenOptions {
        writable: !kw.take("read_only")?.unwrap_or(true),
        format: format_for(kw.take("format")?, Access::Read)?,
        snapshot: kw.take("snapshot")?,
        io_timeout: kw
            .take::<f64>("timeout")?
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(Duration::from_secs_f64),
        force_share: kw.take("force_share")?.unwrap_or(false),
        ..OpenOptions::default()
    };
    let policy = &mut options.backing;
    policy.follow = kw.take("backing")?.unwrap_or(policy.follow);
    policy.max_depth = kw.take("max_backing_depth")?.unwrap_or(policy.max_depth);
    policy.allow_anywhere = kw
        .take("allow_backing_anywhere")?
        .unwrap_or(policy.allow_anywhere);
    Ok(options)
}

/// [`open_options`] for an image that is only read (digest, map): never
/// writable, whatever `read_only` says.
pub(crate) fn read_only_options(kw: &Kwargs<'_>) -> PyResult<OpenOptions> {
    Ok(OpenOptions {
        writable: false,
        ..open_options(kw)?
    })
}

/// `VerifyOptions` from `all`, `strict`, `threads`, `chunk_size`, `max_runs`,
/// and the range `start` and `length` (ints or size strings).
pub(crate) fn verify_options(kw: &Kwargs<'_>) -> PyResult<VerifyOptions> {
    let defaults = VerifyOptions::default();
    Ok(VerifyOptions {
        all: kw.take("all")?.unwrap_or(defaults.all),
        strict: kw.take("strict")?.unwrap_or(defaults.strict),
        threads: kw.take("threads")?.unwrap_or(defaults.threads),
        chunk_size: kw.take("chunk_size")?.unwrap_or(defaults.chunk_size),
        max_runs: kw
            .take::<usize>("max_runs")?
            .unwrap_or(defaults.max_runs)
            .max(1),
        start: kw.take_size("start")?.unwrap_or(defaults.start),
        length: kw.take_size("length")?,
    })
}

/// `PictureRequest` from `findings` ((offset, length, first_byte) runs),
/// `cover` (bytes the picture spans at least), `max_cells` and `mark_errors`
/// (draw unreadable metadata instead of raising).
pub(crate) fn picture_request(kw: &Kwargs<'_>) -> PyResult<PictureRequest> {
    let defaults = PictureRequest::default();
    let findings: Vec<(u64, u64, u64)> = kw.take("findings")?.unwrap_or_default();
    Ok(PictureRequest {
        findings: findings
            .into_iter()
            .map(|(offset, length, first_byte)| FindingRange {
                offset,
                length,
                first_byte,
            })
            .collect(),
        cover: kw.take("cover")?.unwrap_or(defaults.cover),
        max_cells: kw
            .take::<u64>("max_cells")?
            .unwrap_or(defaults.max_cells)
            .max(1),
        on_error: if kw.take("mark_errors")?.unwrap_or(false) {
            OnError::Mark
        } else {
            defaults.on_error
        },
    })
}
