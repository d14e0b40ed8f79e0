//! `serve`: the mirrored device as an NBD server running on Rust threads, and
//! `Server`, its handle. Waiting releases the GIL and runs Python's signal
//! handlers about ten times a second, so a CLI can stop the server on
//! SIGINT/SIGTERM while it serves.

use super::detached::run_detached;
use super::errors::to_pyerr;
use super::finding::serve_finding_dict;
use super::options::{open_options, Kwargs};
use crate::blkverify::IoCounts;
use crate::record::{Recorder, TraceHeader, TraceStats};
use crate::serve::{open_device, Listen, Policy, ServeOptions, Server, Summary};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a wait looks for signals.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

fn counts_dict<'py>(py: Python<'py>, c: &IoCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("read", c.read)?;
    d.set_item("written", c.written)?;
    d.set_item("zeroed", c.zeroed)?;
    d.set_item("discarded", c.discarded)?;
    Ok(d)
}

fn summary_dict<'py>(py: Python<'py>, s: &Summary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("requests", s.requests)?;
    let by = PyDict::new(py);
    for (name, n) in &s.by_command {
        by.set_item(name, n)?;
    }
    d.set_item("by_command", by)?;
    d.set_item("refused", s.refused)?;
    d.set_item("connections", s.connections)?;
    d.set_item("dropped_replies", s.dropped_replies)?;
    d.set_item("truncated_requests", s.truncated_requests)?;
    d.set_item("findings", s.findings)?;
    d.set_item("stopped_by", &s.stopped_by)?;
    d.set_item("elapsed_s", s.elapsed.as_secs_f64())?;
    d.set_item("test", counts_dict(py, &s.counts.test)?)?;
    d.set_item("raw", counts_dict(py, &s.counts.raw)?)?;
    d.set_item("test_image", &s.test_image.0)?;
    d.set_item("test_format", s.test_image.1)?;
    d.set_item("raw_image", &s.raw_image)?;
    Ok(d)
}

fn trace_dict<'py>(
    py: Python<'py>,
    recorder: &Recorder,
    s: &TraceStats,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", recorder.path().display().to_string())?;
    d.set_item("requests", s.requests)?;
    d.set_item("writes", s.writes)?;
    d.set_item("write_bytes", s.write_bytes)?;
    d.set_item("new_blocks", s.new_blocks)?;
    d.set_item("repeated_blocks", s.repeated_blocks)?;
    d.set_item("zero_blocks", s.zero_blocks)?;
    d.set_item("file_bytes", s.file_bytes)?;
    Ok(d)
}

/// A running `blkverify serve`.
#[pyclass(module = "blkverify_rs._native", name = "Server")]
pub struct PyServer {
    server: Server,
    /// What the server came to, once taken: the summary, or its error.
    outcome: Option<Result<Py<PyDict>, PyErr>>,
    /// The trace being recorded, if one is.
    recorder: Option<Arc<Recorder>>,
}

impl PyServer {
    /// Wait up to `timeout` for the end, the GIL released, running signal
    /// handlers between slices (a handler's exception is raised).
    fn wait_for(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(SIGNAL_POLL),
                None => SIGNAL_POLL,
            };
            let server = &self.server;
            if py.detach(|| server.wait(Some(slice))) {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }
}

#[pymethods]
impl PyServer {
    /// The URI clients connect to.
    #[getter]
    fn uri(&self) -> &str {
        self.server.uri()
    }

    /// Whether the server is stopping or has stopped.
    #[getter]
    fn stopping(&self) -> bool {
        self.server.is_stopping()
    }

    /// Findings so far.
    #[getter]
    fn finding_count(&self) -> u64 {
        self.server.finding_count()
    }

    /// Why the trace stopped being written, if it failed (serve goes on
    /// serving: the caller decides).
    #[getter]
    fn trace_error(&self) -> Option<String> {
        self.recorder.as_ref().and_then(|r| r.error())
    }

    /// Ask the server to stop (why, for the summary); returns at once.
    #[pyo3(signature = (reason=None))]
    fn stop(&self, reason: Option<&str>) {
        match reason {
            Some(reason) => self.server.stop_because(reason),
            None => self.server.stop(),
        }
    }

    /// Remove the Unix socket (and its private directory) now: for a process
    /// about to exit at once, without stopping the server.
    fn remove_socket(&self) {
        self.server.remove_socket();
    }

    /// Wait up to `timeout` seconds (`None`: until it ends) for the server to
    /// end; returns whether it has. Signal handlers run while it waits.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        self.wait_for(py, timeout)
    }

    /// The findings from the `start`-th on, as dicts.
    #[pyo3(signature = (start=0))]
    fn findings<'py>(&self, py: Python<'py>, start: usize) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for f in self.server.findings(start) {
            list.append(serve_finding_dict(py, &f)?)?;
        }
        Ok(list)
    }

    /// Wait for the end and return the summary (a dict); raises the error
    /// that ended the server, if one did.
    fn summary(&mut self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        if self.outcome.is_none() {
            self.wait_for(py, None)?;
            let server = &self.server;
            let taken = py.detach(|| server.take_outcome());
            // The server has ended: no request is admitted any more, and the
            // trace can be closed.
            let recorder = self.recorder.clone();
            let traced = py.detach(|| recorder.map(|r| (r.finish(), r)));
            self.outcome = Some(match taken {
                Some(Ok(summary)) => {
                    let d = summary_dict(py, &summary)?;
                    let (trace, trace_error) = match &traced {
                        Some((Ok(stats), r)) => (Some(trace_dict(py, r, stats)?), None),
                        Some((Err(e), _)) => (None, Some(e.clone())),
                        None => (None, None),
                    };
                    d.set_item("trace", trace)?;
                    d.set_item("trace_error", trace_error)?;
                    Ok(d.unbind())
                }
                Some(Err(e)) => Err(to_pyerr(e)),
                None => Err(PyValueError::new_err(
                    "the server's outcome was already taken",
                )),
            });
        }
        match &self.outcome {
            Some(Ok(d)) => Ok(d.clone_ref(py)),
            Some(Err(e)) => Err(e.clone_ref(py)),
            None => Err(PyValueError::new_err("the server has no outcome")),
        }
    }

    fn __repr__(&self) -> String {
        format!("<blkverify_rs.Server {}>", self.server.uri())
    }
}

/// Start serving the mirrored device of `raw` and `test` over NBD; returns
/// once the socket listens. `options`: `format`, `read_only`,
/// `force_share`, `backing`, `max_backing_depth`, `allow_backing_anywhere`,
/// `timeout` (for an NBD test side), `socket`, `port`, `bind`,
/// `export_name`, `shared`, `persistent`, `on_mismatch`,
/// `handshake_limit` and `request_timeout` (seconds), `max_in_flight`.
#[pyfunction]
#[pyo3(signature = (raw, test, **options))]
pub(crate) fn serve(
    py: Python<'_>,
    raw: PathBuf,
    test: PathBuf,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyServer> {
    let kw = Kwargs::new(py, options)?;
    // `trace`: record every request admitted to the device to this file.
    let trace: Option<PathBuf> = kw.take("trace")?;
    let read_only: bool = kw.take("read_only")?.unwrap_or(false);
    let open = open_options(&kw)?;
    let socket: Option<PathBuf> = kw.take("socket")?;
    let port: Option<u16> = kw.take("port")?;
    let bind: Option<String> = kw.take("bind")?;
    let listen = match (socket, port) {
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "give socket or port, not both (a Unix socket or TCP)",
            ))
        }
        (Some(path), None) => Listen::Socket(path),
        (None, Some(port)) => Listen::Tcp {
            bind: bind.unwrap_or_else(|| "127.0.0.1".to_string()),
            port,
        },
        (None, None) if bind.is_some() => {
            return Err(PyValueError::new_err("bind needs port (TCP)"));
        }
        (None, None) => Listen::TempSocket,
    };
    let defaults = ServeOptions::default();
    let on_mismatch = match kw.take::<String>("on_mismatch")? {
        Some(name) => Policy::parse(&name).map_err(to_pyerr)?,
        None => defaults.on_mismatch,
    };
    let options = ServeOptions {
        listen,
        export_name: kw.take("export_name")?.unwrap_or_default(),
        shared: kw.take("shared")?.unwrap_or(defaults.shared),
        persistent: kw.take("persistent")?.unwrap_or(defaults.persistent),
        on_mismatch,
        handshake_limit: kw
            .take::<f64>("handshake_limit")?
            .filter(|t| t.is_finite() && *t > 0.0)
            .map_or(defaults.handshake_limit, Duration::from_secs_f64),
        max_in_flight: kw.take("max_in_flight")?.unwrap_or(defaults.max_in_flight),
        request_timeout: kw
            .take::<f64>("request_timeout")?
            .filter(|t| t.is_finite() && *t > 0.0)
            .map_or(defaults.request_timeout, Duration::from_secs_f64),
        in_order: trace.is_some(),
    };
    kw.finish("serve")?;
    let (server, recorder) = run_detached(py, move || {
        let mut device = open_device(&raw, &test, &open, read_only)?;
        let recorder = match &trace {
            Some(path) => {
                let creator = format!("blkverify {} serve", env!("CARGO_PKG_VERSION"));
                let header = TraceHeader::of_device(&device, &creator);
                let recorder = Arc::new(Recorder::start(path, &header)?);
                device.set_observer(recorder.clone());
                Some(recorder)
            }
            None => None,
        };
        Ok((Server::start(device, options)?, recorder))
    })?;
    Ok(PyServer {
        server,
        outcome: None,
        recorder,
    })
}
