//! `exercise`: run a seeded (or replayed) workload on a mirrored device with the
//! GIL released, Ctrl-C checked about ten times a second; and the op log, read
//! and written for shrinking.

use super::detached::{run_detached, run_with_progress};
use super::finding::exercise_finding_dict;
use super::options::{format_for, open_options, Kwargs};
use crate::driver::{Access, BlockDriver};
use crate::exercise::{Exercise, FinalCheck, Log, Op, Outcome, Plan, Request};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;

/// Run an exercise on the device `spec`; returns a dict (see the Python
/// `ExerciseResult`). `options`: `ops`, `duration`, `seed`, `mix`, `size_mix`,
/// `queue_depth`, `log`, `replay`, `verify`, and for the test side `format`,
/// `timeout`, `backing`, `max_backing_depth`, `allow_backing_anywhere`.
#[pyfunction]
#[pyo3(signature = (spec=None, progress=None, **options))]
pub(crate) fn exercise<'py>(
    py: Python<'py>,
    spec: Option<String>,
    progress: Option<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let kw = Kwargs::new(py, options)?;
    let format = format_for(kw.take("format")?, Access::Write)?;
    let request = Request {
        spec,
        ops: kw.take("ops")?,
        duration: kw.take("duration")?,
        seed: kw.take("seed")?,
        mix: kw.take("mix")?,
        size_mix: kw.take("size_mix")?,
        queue_depth: kw.take("queue_depth")?,
        replay: kw.take("replay")?,
        record: None,
        positions: None,
        log: kw.take("log")?,
        final_check: (!kw.take("verify")?.unwrap_or(true)).then_some(FinalCheck::Skip),
    };
    let mut open = open_options(&kw)?;
    open.format = format;
    kw.finish("exercise")?;
    let mut exercise = run_detached(py, move || Exercise::prepare(request, &open))?;
    let outcome = run_with_progress(py, progress, |done: u64| (done,), |tick| exercise.run(tick))?;
    outcome_dict(py, &exercise, &outcome, false)
}

/// What a run did and found, as a dict (see the Python `ExerciseResult`);
/// `serve_keys` as [`exercise_finding_dict`] takes it.
pub(crate) fn outcome_dict<'py>(
    py: Python<'py>,
    exercise: &Exercise,
    outcome: &Outcome,
    serve_keys: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let elapsed = outcome.elapsed.as_secs_f64();
    d.set_item("spec", &exercise.spec)?;
    d.set_item("ops", outcome.ops)?;
    d.set_item("issued", outcome.issued)?;
    d.set_item("seed", outcome.seed)?;
    d.set_item("queue_depth", exercise.options.queue_depth)?;
    d.set_item("elapsed_s", elapsed)?;
    d.set_item(
        "ops_per_s",
        if elapsed > 0.0 {
            outcome.ops as f64 / elapsed
        } else {
            0.0
        },
    )?;
    d.set_item("verify_elapsed_s", outcome.verify_elapsed.as_secs_f64())?;
    d.set_item("bytes_read", outcome.bytes_read)?;
    d.set_item("bytes_written", outcome.bytes_written)?;
    d.set_item("verified", outcome.verified)?;
    d.set_item("size", exercise.device.size())?;
    d.set_item("test_format", exercise.device.test().format_name())?;
    let (mix, size_mix) = match &exercise.plan {
        Plan::Generated { workload, .. } => (
            Some(workload.mix.to_string()),
            Some(workload.size_mix.to_string()),
        ),
        Plan::Replay { .. } => (None, None),
    };
    d.set_item("mix", mix)?;
    d.set_item("size_mix", size_mix)?;
    let list = PyList::empty(py);
    for f in &outcome.findings {
        list.append(exercise_finding_dict(py, f, serve_keys)?)?;
    }
    d.set_item("mismatches", list)?;
    Ok(d)
}

/// Read the op log at `path`: a dict of `seed`, `size`, `queue_depth`, `spec`
/// (each `None` when the log does not say) and `ops`, a list of
/// `(op number, log line)`.
#[pyfunction]
pub(crate) fn read_log(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let log = run_detached(py, move || Log::read(&path))?;
    let d = PyDict::new(py);
    d.set_item("seed", log.seed)?;
    d.set_item("size", log.size)?;
    d.set_item("queue_depth", log.queue_depth)?;
    d.set_item("spec", &log.spec)?;
    let ops: Vec<(u64, String)> = log
        .ops
        .iter()
        .map(|op| (op.number, op.log_line()))
        .collect();
    d.set_item("ops", ops)?;
    Ok(d)
}

/// Write an op log to `path`: `log` as `read_log` returns it, then `comments`
/// (each as a `# ` line).
#[pyfunction]
#[pyo3(signature = (path, log, comments=Vec::new()))]
pub(crate) fn write_log(
    py: Python<'_>,
    path: PathBuf,
    log: &Bound<'_, PyDict>,
    comments: Vec<String>,
) -> PyResult<()> {
    let kw = Kwargs::new(py, Some(log))?;
    let seed = kw
        .take("seed")?
        .ok_or_else(|| PyValueError::new_err("an op log needs a seed"))?;
    let size = kw.take("size")?;
    let queue_depth = kw.take("queue_depth")?;
    let spec = kw.take("spec")?;
    let lines: Vec<(u64, String)> = kw.take("ops")?.unwrap_or_default();
    kw.finish("write_log")?;
    let ops = lines
        .iter()
        .map(|(number, line)| match Op::parse(line) {
            Ok(op) if op.number == *number => Ok(op),
            Ok(_) => Err(format!("op line '{line}' is not op {number}")),
            Err(m) => Err(format!("op line '{line}': {m}")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(PyValueError::new_err)?;
    let log = Log {
        seed,
        spec,
        queue_depth,
        size,
        ops,
    };
    run_detached(py, move || log.write(&path, &comments))
}
