//! `exercise`: run a seeded (or replayed) workload on a mirrored device with the
//! GIL released; Ctrl-C is checked about ten times a second.

use super::errors::{open_options, run_detached, to_pyerr};
use super::verify::run_with_progress;
use crate::blkverify::{parse_spec, Blkverify, Spec};
use crate::driver::BlockDriver;
use crate::error::Error;
use crate::exercise::{
    self as engine, hexdump_diff, ExerciseOptions, Finding, Limit, Mix, OpLog, Plan, SizeMix,
    Workload,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::Duration;

/// The ops a run makes when neither `ops` nor `duration` is given.
const DEFAULT_OPS: u64 = 10_000;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn finding_dict<'py>(py: Python<'py>, f: &Finding) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("op_number", f.op.map(|op| op.number))?;
    d.set_item(
        "op",
        f.op.map(|op| {
            let line = op.log_line();
            line.split_once(' ')
                .map_or(line.clone(), |(_, rest)| rest.to_string())
        }),
    )?;
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
    let lines = match (f.sector, f.first_byte) {
        (Some(sector), Some(first_byte))
            if !(f.test_bytes.is_empty() && f.raw_bytes.is_empty()) =>
        {
            hexdump_diff(sector * 512, first_byte, &f.test_bytes, &f.raw_bytes, 4)
        }
        _ => Vec::new(),
    };
    d.set_item("hexdump", PyList::new(py, lines)?)?;
    d.set_item("last_change", f.last_change.map(|op| op.log_line()))?;
    d.set_item("diagnosis", &f.diagnosis)?;
    Ok(d)
}

/// Run an exercise; returns a dict (see the Python `ExerciseResult`).
#[pyfunction]
#[pyo3(signature = (spec=None, *, ops=None, duration=None, seed=None, mix=None, size_mix=None,
    queue_depth=None, log=None, replay=None, format=None, timeout=None, verify=true,
    backing=true, max_backing_depth=16, allow_backing_anywhere=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn exercise<'py>(
    py: Python<'py>,
    spec: Option<String>,
    ops: Option<u64>,
    duration: Option<f64>,
    seed: Option<u64>,
    mix: Option<&str>,
    size_mix: Option<&str>,
    queue_depth: Option<usize>,
    log: Option<PathBuf>,
    replay: Option<PathBuf>,
    format: Option<&str>,
    timeout: Option<f64>,
    verify: bool,
    backing: bool,
    max_backing_depth: u32,
    allow_backing_anywhere: bool,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    if ops.is_some() && duration.is_some() {
        return Err(PyValueError::new_err("give ops or duration, not both"));
    }
    if let Some(q) = queue_depth.filter(|q| !(1..=256).contains(q)) {
        return Err(PyValueError::new_err(format!(
            "queue depth {q} is not 1 to 256"
        )));
    }
    let limit = match (ops, duration) {
        (_, Some(d)) if !(d.is_finite() && d > 0.0 && d < 1e9) => {
            return Err(PyValueError::new_err(format!(
                "duration {d} is not a positive number of seconds"
            )))
        }
        (_, Some(d)) => Limit::Duration(Duration::from_secs_f64(d)),
        (Some(n), None) => Limit::Ops(n),
        (None, None) => Limit::Ops(DEFAULT_OPS),
    };
    let replayed = match &replay {
        Some(path) => {
            if ops.is_some()
                || duration.is_some()
                || seed.is_some()
                || mix.is_some()
                || size_mix.is_some()
            {
                return Err(PyValueError::new_err(
                    "a replay runs the log's ops: ops, duration, seed, mix and size_mix do not apply",
                ));
            }
            let path = path.clone();
            Some(run_detached(py, move || {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::io(&path, "read the op log", e))?;
                engine::parse_log(&path.display().to_string(), &text)
            })?)
        }
        None => None,
    };
    let spec = match (spec, replayed.as_ref().and_then(|l| l.spec.clone())) {
        (Some(spec), _) | (None, Some(spec)) => spec,
        (None, None) => {
            return Err(PyValueError::new_err(
                "exercise needs a blkverify:RAW:TEST spec (the log does not name one)",
            ))
        }
    };
    let Some(Spec { raw, test }) = parse_spec(&spec).map_err(to_pyerr)? else {
        return Err(PyValueError::new_err(format!(
            "{spec}: exercise needs a mirrored device, blkverify:RAW:TEST"
        )));
    };
    let mix = match mix {
        Some(text) => Mix::parse(text).map_err(to_pyerr)?,
        None => Mix::default(),
    };
    let size_mix = match size_mix {
        Some(text) => SizeMix::parse(text).map_err(to_pyerr)?,
        None => SizeMix::default(),
    };
    let seed = seed.unwrap_or_else(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            >> 1
    });
    let queue_depth = queue_depth
        .or(replayed.as_ref().and_then(|l| l.queue_depth))
        .unwrap_or(1);
    let writes = match &replayed {
        Some(l) => l.ops.iter().any(|op| op.writes()),
        None => mix.writes(),
    };
    let options = open_options(
        timeout,
        writes,
        format,
        None,
        backing,
        max_backing_depth,
        allow_backing_anywhere,
    )?;
    let device = run_detached(py, move || Blkverify::open(&raw, &test, &options))?;
    let plan = match replayed {
        Some(l) => Plan::Replay {
            seed: l.seed,
            ops: l.ops,
        },
        None => Plan::Generated {
            workload: Workload {
                seed,
                size: device.size(),
                mix,
                size_mix: size_mix.clone(),
            },
            limit,
        },
    };
    let mut op_log = match &log {
        Some(path) => {
            let path = path.clone();
            Some(run_detached(py, move || OpLog::create(&path))?)
        }
        None => None,
    };
    let run_options = ExerciseOptions {
        queue_depth,
        verify_at_end: verify,
        ..ExerciseOptions::default()
    };

    let outcome = {
        let (device, plan) = (&device, &plan);
        let op_log = op_log.as_mut();
        run_with_progress(
            py,
            progress.map(Bound::unbind),
            |done: u64| vec![done],
            |tick| engine::run(device, plan, &run_options, op_log, tick),
        )?
    };
    let outcome = match outcome {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => return Err(to_pyerr(e)),
        Err(pending) => {
            return Err(pending.unwrap_or_else(|| PyKeyboardInterrupt::new_err("cancelled")))
        }
    };
    drop(op_log);

    let d = PyDict::new(py);
    let elapsed = outcome.elapsed.as_secs_f64();
    d.set_item("spec", &spec)?;
    d.set_item("ops", outcome.ops)?;
    d.set_item("issued", outcome.issued)?;
    d.set_item("seed", outcome.seed)?;
    d.set_item("queue_depth", queue_depth)?;
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
    d.set_item("size", device.size())?;
    d.set_item("test_format", device.test().format_name())?;
    match &plan {
        Plan::Generated { workload, .. } => {
            d.set_item("mix", workload.mix.to_string())?;
            d.set_item("size_mix", workload.size_mix.to_string())?;
        }
        Plan::Replay { .. } => {
            d.set_item("mix", py.None())?;
            d.set_item("size_mix", py.None())?;
        }
    }
    let list = PyList::empty(py);
    for f in &outcome.findings {
        list.append(finding_dict(py, f)?)?;
    }
    d.set_item("mismatches", list)?;
    Ok(d)
}
