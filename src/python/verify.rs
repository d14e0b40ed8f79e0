//! `verify` and `verify_many`: the whole-image engine, with progress and Ctrl-C;
//! and the one place the rules of a pair (`raw`, `test` and their options) live.

use super::detached::run_with_progress;
use super::errors::to_pyerr;
use super::image::location_dict;
use super::options::{format_for, open_options, verify_options, Kwargs};
use crate::batch::{self, Checked, ReferenceKind, VerifyJob};
use crate::driver::{Access, Format, Location, OpenOptions};
use crate::error::Error;
use crate::verify::{self as engine, Mismatch, Progress, Report, VerifyOptions, MAX_LOCATED};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyMapping};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) use crate::report::unopened_backing;

/// The `raw_format` that names a block digests file as the reference.
pub(crate) use crate::batch::DIGESTS_FORMAT as DIGESTS;

/// The keys a pair may have.
const PAIR_KEYS: [&str; 10] = [
    "raw",
    "test",
    "raw_format",
    "test_format",
    "snapshot",
    "all",
    "strict",
    "workers",
    "raw_workers",
    "test_workers",
];

/// A pair, `(raw, test)` or a mapping with `raw`, `test` and optionally
/// `raw_format`, `test_format`, `snapshot`, `all`, `strict`, and `workers` or
/// `raw_workers`/`test_workers` (`None` is the same as left out), checked and
/// turned into a job: both sides open with `open`'s backing policy, and
/// `all`/`strict` default to `options`'. `workers` (the cluster workers that
/// can see the pair's files: a list of names or addresses), or `raw_workers`
/// and `test_workers` (those that see each side: the sides are then hashed
/// where they live), are for the cluster's scheduling only; here they are
/// checked and left out. Every mistake is a `ValueError` that names the
/// key.
pub(crate) fn pair_job(
    pair: &Bound<'_, PyAny>,
    open: &OpenOptions,
    options: &VerifyOptions,
) -> PyResult<VerifyJob> {
    let keys = PairKeys {
        dict: pair_dict(pair)?,
    };
    keys.check_workers()?;
    let (raw, test) = (keys.path("raw")?, keys.path("test")?);
    // The reference may be a block digests file: named so, or found by its magic.
    let (reference, raw_format) = match keys.text("raw_format")?.as_deref() {
        Some(DIGESTS) => (ReferenceKind::Digests, None),
        Some(_) => (ReferenceKind::Image, keys.format("raw_format")?),
        None => (ReferenceKind::Detect, None),
    };
    Ok(VerifyJob {
        reference,
        raw_options: OpenOptions {
            writable: false,
            format: raw_format,
            snapshot: None,
            ..open.clone()
        },
        test_options: OpenOptions {
            writable: false,
            format: keys.format("test_format")?,
            snapshot: keys.text("snapshot")?,
            ..open.clone()
        },
        options: VerifyOptions {
            all: keys.flag("all", options.all)?,
            strict: keys.flag("strict", options.strict)?,
            ..options.clone()
        },
        raw,
        test,
    })
}

fn bad(message: String) -> PyErr {
    PyValueError::new_err(message)
}

/// A pair as a dict of its keys: a (raw, test) tuple becomes one; a key that
/// is not in [`PAIR_KEYS`] is refused, naming it.
fn pair_dict<'py>(pair: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(pair.py());
    if let Ok(mapping) = pair.cast::<PyMapping>() {
        dict.update(mapping)?;
    } else {
        let (raw, test): (Bound<'_, PyAny>, Bound<'_, PyAny>) = pair.extract().map_err(|_| {
            bad("a pair is (raw, test) or a mapping with 'raw' and 'test'".to_string())
        })?;
        dict.set_item("raw", raw)?;
        dict.set_item("test", test)?;
    }
    let mut unknown: Vec<String> = dict
        .keys()
        .iter()
        .map(|key| key.str().map(|k| k.to_string()))
        .filter(|key| !key.as_ref().is_ok_and(|k| PAIR_KEYS.contains(&k.as_str())))
        .collect::<PyResult<_>>()?;
    unknown.sort();
    if let Some(key) = unknown.first() {
        return Err(bad(format!("unknown key '{key}'")));
    }
    Ok(dict)
}

/// A pair's keys, each read by the rule for its kind of value (`None` is the
/// same as left out).
struct PairKeys<'py> {
    dict: Bound<'py, PyDict>,
}

impl<'py> PairKeys<'py> {
    fn get(&self, key: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(self.dict.get_item(key)?.filter(|v| !v.is_none()))
    }

    /// A required, non-empty path.
    fn path(&self, key: &str) -> PyResult<PathBuf> {
        let value = self
            .get(key)?
            .ok_or_else(|| bad(format!("missing key '{key}'")))?;
        value
            .extract::<PathBuf>()
            .ok()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| bad(format!("'{key}' must be a non-empty string")))
    }

    /// An optional, non-empty string.
    fn text(&self, key: &str) -> PyResult<Option<String>> {
        self.get(key)?
            .map(|v| {
                v.extract::<String>()
                    .ok()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| bad(format!("'{key}' must be a non-empty string")))
            })
            .transpose()
    }

    /// A boolean, `default` when left out.
    fn flag(&self, key: &str, default: bool) -> PyResult<bool> {
        match self.get(key)? {
            None => Ok(default),
            Some(v) => v
                .extract::<bool>()
                .map_err(|_| bad(format!("'{key}' must be true or false"))),
        }
    }

    /// An optional format that can be read.
    fn format(&self, key: &str) -> PyResult<Option<Format>> {
        let name = self.text(key)?;
        format_for(name.clone(), Access::Read).map_err(|e| {
            bad(format!(
                "'{key}' is '{}': {}",
                name.unwrap_or_default(),
                e.value(self.dict.py())
            ))
        })
    }

    /// An optional, non-empty list of worker names or addresses.
    fn names(&self, key: &str) -> PyResult<()> {
        let Some(value) = self.get(key)? else {
            return Ok(());
        };
        let wrong = || {
            bad(format!(
                "'{key}' must be a list of worker names or addresses"
            ))
        };
        if value.is_instance_of::<pyo3::types::PyString>() {
            return Err(wrong());
        }
        let names: Vec<String> = value.extract().map_err(|_| wrong())?;
        if names.is_empty() || names.iter().any(String::is_empty) {
            return Err(wrong());
        }
        Ok(())
    }

    /// `workers`, `raw_workers` and `test_workers` are lists of names, and
    /// `workers` (the whole pair) is not given with the other two.
    fn check_workers(&self) -> PyResult<()> {
        self.names("workers")?;
        self.names("raw_workers")?;
        self.names("test_workers")?;
        if self.get("workers")?.is_some()
            && (self.get("raw_workers")?.is_some() || self.get("test_workers")?.is_some())
        {
            return Err(bad(
                "'workers' pins the whole pair: give it, or 'raw_workers' and 'test_workers', not both"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// The pair rules' verdict on `pair`: nothing, or the `ValueError` `verify_many`
/// would raise for it.
#[pyfunction]
pub(crate) fn check_pair(pair: &Bound<'_, PyAny>) -> PyResult<()> {
    pair_job(pair, &OpenOptions::default(), &VerifyOptions::default()).map(drop)
}

/// The open and verify options of one call (everything but the pairs).
pub(crate) fn job_options(
    py: Python<'_>,
    options: Option<&Bound<'_, PyDict>>,
    function: &str,
) -> PyResult<(OpenOptions, VerifyOptions)> {
    let kw = Kwargs::new(py, options)?;
    let open = open_options(&kw)?;
    let verify = verify_options(&kw)?;
    kw.finish(function)?;
    Ok((open, verify))
}

/// What a report dict says about the pair beyond the engine's `Report`.
pub(crate) struct Names {
    pub(crate) raw: String,
    pub(crate) test: String,
    pub(crate) raw_format: String,
    pub(crate) test_format: String,
}

/// Where a run's first differing byte lives: in the test image's metadata
/// (`mapping`) and in the reference's (`ref_mapping`, when it has metadata).
pub(crate) type Mappings<'py> = (Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>);

/// Declares `ReportFields` and the names of its fields, from one list.
macro_rules! report_fields {
    (
        printed { $($(#[$p_attr:meta])* $printed:ident: $p_type:ty,)* }
        kept { $($(#[$k_attr:meta])* $kept:ident: $k_type:ty,)* }
    ) => {
        /// A report dict, field by field: what `verify`, `verify_many`,
        /// `merge_reports` and `check_spans` return, and what the Python
        /// `Report` is made of (its fields are `REPORT_FIELDS`, in this order).
        #[derive(IntoPyObject, FromPyObject)]
        #[pyo3(from_item_all)]
        pub(crate) struct ReportFields<'py> {
            $($(#[$p_attr])* pub(crate) $printed: $p_type,)*
            $($(#[$k_attr])* pub(crate) $kept: $k_type,)*
        }

        /// Every field of a report dict, in order.
        pub(crate) const REPORT_FIELDS: &[&str] =
            &[$(stringify!($printed),)* $(stringify!($kept),)*];

        /// The fields `--json` prints, in its order (a `None` one is left out).
        pub(crate) const REPORT_JSON_FIELDS: &[&str] = &[$(stringify!($printed),)*];
    };
}

// The one list of a report's fields.
report_fields! {
    printed {
        raw: String,
        test: String,
        raw_format: String,
        test_format: String,
        /// The compared disk: the larger of the two sizes.
        virtual_size: u64,
        raw_size: u64,
        test_size: u64,
        identical: bool,
        bytes_compared: u64,
        elapsed_s: f64,
        truncated: bool,
        warnings: Vec<String>,
        /// Dicts: a run of sectors, or against block digests a run of blocks.
        mismatches: Bound<'py, PyList>,
        /// `(start, length)` of a report of part of the disk, else `None`.
        #[pyo3(default)]
        range: Option<(u64, u64)>,
        /// Set when the reference is a block digests file.
        #[pyo3(default)]
        block_size: Option<u64>,
    }
    kept {
        bytes_read: u64,
        /// How the test image was opened (`open`'s keywords), so that a
        /// report can draw the image it read; `None`: not known.
        #[pyo3(default)]
        test_options: Option<Bound<'py, PyDict>>,
    }
}

/// The report as a dict (see `ReportFields`): `mappings(i, run)` gives
/// the mappings of the `i`th run, where known.
pub(crate) fn report_to_dict<'py>(
    py: Python<'py>,
    names: &Names,
    report: &Report,
    test_options: Option<Bound<'py, PyDict>>,
    mappings: impl Fn(usize, &Mismatch) -> Mappings<'py>,
) -> PyResult<Bound<'py, PyDict>> {
    let list = PyList::empty(py);
    for (i, m) in report.mismatches.iter().enumerate() {
        let md = PyDict::new(py);
        match report.block_size {
            // Against block digests: whole blocks, and no first byte to name.
            Some(block_size) => {
                md.set_item("block", m.offset / block_size)?;
                md.set_item("blocks", m.length.div_ceil(block_size))?;
                md.set_item("offset", m.offset)?;
                md.set_item("length", m.length)?;
            }
            None => {
                md.set_item("sector", m.sector())?;
                md.set_item("offset", m.offset)?;
                md.set_item("length", m.length)?;
                md.set_item("first_byte", m.first_byte)?;
            }
        }
        if let Some(e) = &m.error {
            md.set_item("error", e)?;
        }
        let (mapping, ref_mapping) = mappings(i, m);
        if let Some(found) = mapping {
            md.set_item("mapping", found)?;
        }
        if let Some(found) = ref_mapping {
            md.set_item("ref_mapping", found)?;
        }
        list.append(md)?;
    }
    let whole = report.range == (0..report.virtual_size);
    ReportFields {
        raw: names.raw.clone(),
        test: names.test.clone(),
        raw_format: names.raw_format.clone(),
        test_format: names.test_format.clone(),
        virtual_size: report.virtual_size,
        raw_size: report.raw_size,
        test_size: report.test_size,
        identical: report.identical,
        bytes_compared: report.bytes_compared,
        elapsed_s: report.elapsed.as_secs_f64(),
        truncated: report.truncated,
        warnings: report.warnings.clone(),
        mismatches: list,
        range: (!whole).then(|| (report.range.start, report.range.end - report.range.start)),
        block_size: report.block_size,
        bytes_read: report.bytes_read,
        test_options: Some(test_options.unwrap_or_else(|| PyDict::new(py))),
    }
    .into_pyobject(py)
}

/// The report of a checked pair as a dict.
pub(crate) fn report_dict<'py>(
    py: Python<'py>,
    job: &VerifyJob,
    checked: &Checked,
) -> PyResult<Bound<'py, PyDict>> {
    let names = Names {
        raw: job.raw.display().to_string(),
        test: job.test.display().to_string(),
        raw_format: checked.raw_format.to_string(),
        test_format: checked.test_format.to_string(),
    };
    let as_dict = |found: Option<&Option<Location>>| {
        found
            .and_then(Option::as_ref)
            .and_then(|loc| location_dict(py, loc).ok())
            .map(Bound::into_any)
    };
    let test_options = open_kwargs(py, &job.test_options)?;
    report_to_dict(py, &names, &checked.report, Some(test_options), |i, _| {
        (
            as_dict(checked.locations.get(i)),
            as_dict(checked.ref_locations.get(i)),
        )
    })
}

/// A report dict's fields (as `report_to_dict` makes them) back into the
/// engine's report.
fn report_from_fields(fields: &ReportFields<'_>) -> PyResult<Report> {
    let range = match fields.range {
        Some((start, length)) => start..start.saturating_add(length),
        None => 0..fields.virtual_size,
    };
    let mut mismatches = Vec::new();
    for m in fields.mismatches.try_iter()? {
        let m = m?;
        let error = m.get_item("error").ok().filter(|e| !e.is_none());
        let offset: u64 = m.get_item("offset")?.extract()?;
        let first_byte = match m.get_item("first_byte") {
            Ok(b) => b.extract()?,
            // A run of blocks (against block digests) begins at its offset.
            Err(_) => offset,
        };
        mismatches.push(Mismatch {
            offset,
            length: m.get_item("length")?.extract()?,
            first_byte,
            error: error.map(|e| e.extract()).transpose()?,
            // A report dict does not carry the errno (only the text).
            errno: None,
        });
    }
    Ok(Report {
        identical: fields.identical,
        raw_size: fields.raw_size,
        test_size: fields.test_size,
        virtual_size: fields.virtual_size,
        range,
        bytes_compared: fields.bytes_compared,
        bytes_read: fields.bytes_read,
        mismatches,
        truncated: fields.truncated,
        warnings: fields.warnings.clone(),
        elapsed: Duration::try_from_secs_f64(fields.elapsed_s).unwrap_or_default(),
        block_size: fields.block_size,
    })
}

/// A range's outcome on its way through the merge: a report, or the
/// exception its verify raised.
struct PartError(PyErr);

impl From<Error> for PartError {
    fn from(e: Error) -> Self {
        PartError(to_pyerr(e))
    }
}

/// One report from the reports of consecutive ranges of one pair, in guest
/// order, each a report dict or the exception that range's verify raised:
/// the report one verify of their union gives (see `engine::merge_ranges`).
/// `options`: the pair's `all`, `strict`, `max_runs`. Raises the exception
/// that decides the outcome, if one does.
#[pyfunction]
#[pyo3(signature = (parts, **options))]
pub(crate) fn merge_reports<'py>(
    py: Python<'py>,
    parts: Vec<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let kw = Kwargs::new(py, options)?;
    let options = verify_options(&kw)?;
    kw.finish("merge_reports")?;
    let mut names = None;
    let mut test_options = None;
    let mut mappings: HashMap<u64, Mappings<'py>> = HashMap::new();
    let mut outcomes = Vec::with_capacity(parts.len());
    for part in &parts {
        let Ok(d) = part.cast::<PyDict>() else {
            outcomes.push(Err(PartError(PyErr::from_value(part.clone()))));
            continue;
        };
        let fields: ReportFields<'py> = d.extract()?;
        if test_options.is_none() {
            test_options.clone_from(&fields.test_options);
        }
        if names.is_none() {
            names = Some(Names {
                raw: fields.raw.clone(),
                test: fields.test.clone(),
                raw_format: fields.raw_format.clone(),
                test_format: fields.test_format.clone(),
            });
        }
        for m in fields.mismatches.try_iter()? {
            let m = m?;
            let found = (m.get_item("mapping").ok(), m.get_item("ref_mapping").ok());
            // Block findings have no first byte: they begin at their offset.
            let first = m
                .get_item("first_byte")
                .or_else(|_| m.get_item("offset"))?
                .extract()?;
            mappings.insert(first, found);
        }
        outcomes.push(Ok(report_from_fields(&fields)?));
    }
    let report = engine::merge_ranges(outcomes, &options).map_err(|PartError(e)| e)?;
    let names = names.ok_or_else(|| PyValueError::new_err("no range reports to merge"))?;
    // A run keeps the mappings of the run it begins with; as in one verify,
    // only the first MAX_LOCATED runs are located.
    report_to_dict(py, &names, &report, test_options, |i, m| {
        match mappings.get(&m.first_byte) {
            Some(found) if i < MAX_LOCATED => found.clone(),
            _ => (None, None),
        }
    })
}

/// The keyword arguments that open an image as `options` say (`format` only
/// when the caller named one), so a report can reopen its test image as
/// verify did (to draw its map).
fn open_kwargs<'py>(py: Python<'py>, options: &OpenOptions) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("format", options.format.map(|f| f.name()))?;
    d.set_item("snapshot", options.snapshot.as_deref())?;
    d.set_item("backing", options.backing.follow)?;
    d.set_item("max_backing_depth", options.backing.max_depth)?;
    d.set_item("allow_backing_anywhere", options.backing.allow_anywhere)?;
    d.set_item("timeout", options.io_timeout.map(|t| t.as_secs_f64()))?;
    d.set_item("force_share", options.force_share)?;
    Ok(d)
}

/// Verify a pair (see `pair_job`); returns a dict (see the Python `Report`).
/// `options`: `backing`, `max_backing_depth`, `allow_backing_anywhere`,
/// `threads`, `chunk_size`, `max_runs`, `start`, `length`; and `split`: a disk
/// larger than that gives the report of its first `split` bytes (a range:
/// a cluster verifies the others, see `batch::check_pair_within`).
/// `progress(done, total)` is called about ten times a second.
#[pyfunction]
#[pyo3(signature = (pair, progress=None, **options))]
pub(crate) fn verify<'py>(
    py: Python<'py>,
    pair: &Bound<'py, PyAny>,
    progress: Option<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let kw = Kwargs::new(py, options)?;
    let split = kw.take_size("split")?;
    let open = open_options(&kw)?;
    let options = verify_options(&kw)?;
    kw.finish("verify")?;
    let job = pair_job(pair, &open, &options)?;
    let checked = run_with_progress(
        py,
        progress,
        |p: Progress| (p.done, p.total),
        |tick| match split {
            Some(split) => batch::check_pair_within(&job, split, tick),
            None => batch::check_pair(&job, tick),
        },
    )?;
    report_dict(py, &job, &checked)
}
