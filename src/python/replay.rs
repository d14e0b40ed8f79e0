//! Records and their replays: `Recording`, an op log or a serve trace read
//! once (the GIL released), which replays all its ops or a subset (on
//! copy-on-write overlays of the images, or in place) and writes a subset in
//! its own format (shrinking).

use super::detached::{run_detached, run_with_progress};
use super::exercise::outcome_dict;
use super::options::{format_for, open_options, Kwargs};
use crate::driver::Access;
use crate::exercise::{Exercise, FinalCheck, Request};
use crate::record::Record;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;

/// An op log or a serve trace, read whole.
#[pyclass(module = "blkverify_rs._native", name = "Recording", frozen)]
pub struct PyRecording {
    record: Arc<Record>,
    path: PathBuf,
}

#[pymethods]
impl PyRecording {
    /// Read the record at `path` (an op log or a trace, told by its first bytes).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let at = path.clone();
        let record = run_detached(py, move || Record::read(&at))?;
        Ok(PyRecording {
            record: Arc::new(record),
            path,
        })
    }

    /// `"trace"` or `"log"`.
    #[getter]
    fn kind(&self) -> &'static str {
        match self.record.as_ref() {
            Record::Trace(_) => "trace",
            Record::Log(_) => "log",
        }
    }

    /// The path it was read from.
    #[getter]
    fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// The device it was recorded on, `blkverify:RAW:TEST`, if it says.
    #[getter]
    fn spec(&self) -> Option<String> {
        self.record.spec()
    }

    /// The device's size, if it says.
    #[getter]
    fn size(&self) -> Option<u64> {
        self.record.size()
    }

    /// How a trace ended when it was not closed cleanly (a one-line note).
    #[getter]
    fn ending(&self) -> Option<String> {
        self.record.ending()
    }

    /// A trace's header (`size`, `started_ns`, `raw`, `test`, `test_format`,
    /// `creator`, `data_bytes`: its unique write data held in memory); `None`
    /// for an op log.
    #[getter]
    fn header<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Record::Trace(trace) = self.record.as_ref() else {
            return Ok(None);
        };
        let h = &trace.header;
        let d = PyDict::new(py);
        d.set_item("size", h.size)?;
        d.set_item("started_ns", h.started_ns)?;
        d.set_item("raw", &h.raw)?;
        d.set_item("test", &h.test)?;
        d.set_item("test_format", &h.test_format)?;
        d.set_item("creator", &h.creator)?;
        d.set_item("data_bytes", trace.data_bytes())?;
        Ok(Some(d))
    }

    fn __len__(&self) -> usize {
        self.record.ops().len()
    }

    /// The ops, as `(number, line, offset, length, writes, connection)`:
    /// `line` is the op log's spelling without the number (`write 0 4096
    /// fua`), `writes` whether it changes the device, `connection` a trace's.
    fn ops<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for (i, op) in self.record.ops().iter().enumerate() {
            list.append((
                op.number,
                op.command(),
                op.offset,
                op.length,
                op.writes(),
                self.record.connection(i),
            ))?;
        }
        Ok(list)
    }

    /// Replay the ops at `positions` (growing; default all) on the device
    /// `spec` (default: the record's), stopping at the first finding; returns
    /// the run as a dict (`exercise`'s keys, findings with serve's too).
    /// `options`: `positions`, `queue_depth` (default 1, or an op log's),
    /// `final_check` (`"whole"`, `"touched"` or `"skip"`), `in_place`
    /// (write the images; default: copy-on-write overlays), and for the test
    /// side `format`, `timeout`, `backing`, `max_backing_depth`,
    /// `allow_backing_anywhere`.
    #[pyo3(signature = (spec=None, progress=None, **options))]
    fn replay<'py>(
        &self,
        py: Python<'py>,
        spec: Option<String>,
        progress: Option<Bound<'py, PyAny>>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let kw = Kwargs::new(py, options)?;
        let format = format_for(kw.take("format")?, Access::Write)?;
        let final_check = match kw.take::<String>("final_check")?.as_deref() {
            None | Some("whole") => FinalCheck::Whole,
            Some("touched") => FinalCheck::Touched,
            Some("skip") => FinalCheck::Skip,
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "final_check '{other}' is not one of whole, touched, skip"
                )))
            }
        };
        let in_place: bool = kw.take("in_place")?.unwrap_or(false);
        let request = Request {
            spec,
            queue_depth: kw.take("queue_depth")?,
            record: Some(Arc::clone(&self.record)),
            positions: kw.take("positions")?,
            final_check: Some(final_check),
            ..Request::default()
        };
        let mut open = open_options(&kw)?;
        open.format = format;
        open.overlay = !in_place;
        kw.finish("replay")?;
        let mut exercise = run_detached(py, move || Exercise::prepare(request, &open))?;
        let outcome =
            run_with_progress(py, progress, |done: u64| (done,), |tick| exercise.run(tick))?;
        let d = outcome_dict(py, &exercise, &outcome, true)?;
        d.set_item("kind", self.kind())?;
        d.set_item("record", self.path.display().to_string())?;
        d.set_item("total", self.record.ops().len())?;
        d.set_item("ending", self.record.ending())?;
        Ok(d)
    }

    /// Write the ops at `positions` (in order) to `path`, in the record's
    /// own format: an op log (naming `spec` if given, with `comments` at its
    /// end), or a trace, with its data.
    #[pyo3(signature = (path, positions, comments=Vec::new(), spec=None))]
    fn write(
        &self,
        py: Python<'_>,
        path: PathBuf,
        positions: Vec<usize>,
        comments: Vec<String>,
        spec: Option<String>,
    ) -> PyResult<()> {
        let record = Arc::clone(&self.record);
        run_detached(py, move || match record.as_ref() {
            Record::Log(log) => {
                let ops = positions
                    .iter()
                    .map(|&p| {
                        log.ops.get(p).copied().ok_or_else(|| {
                            crate::error::Error::InvalidArgument(format!(
                                "no op at position {p} of the log"
                            ))
                        })
                    })
                    .collect::<crate::error::Result<Vec<_>>>()?;
                let subset = crate::record::Log {
                    ops,
                    queue_depth: Some(1),
                    spec: spec.or_else(|| log.spec.clone()),
                    ..log.clone()
                };
                subset.write(&path, &comments)
            }
            Record::Trace(trace) => {
                let creator = format!("blkverify {} shrink", env!("CARGO_PKG_VERSION"));
                trace.write_subset(&path, &positions, &creator)
            }
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "<blkverify_rs.Recording {} {} ({} ops)>",
            self.kind(),
            self.path.display(),
            self.record.ops().len()
        )
    }
}
