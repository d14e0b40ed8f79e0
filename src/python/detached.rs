//! Running core code off the GIL: one call with panics contained
//! ([`run_detached`]), or a long one that reports progress and stops on Ctrl-C
//! ([`run_with_progress`]).

use super::errors::{panic_to_pyerr, to_pyerr};
use crate::error::Error;
use pyo3::call::PyCallArgs;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Run core code with the GIL released, turning a panic into `blkverify_rs.Error`.
pub(crate) fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match outcome {
        Ok(result) => result.map_err(to_pyerr),
        Err(panic) => Err(panic_to_pyerr(panic)),
    }
}

/// Run `work` with the GIL released while the tick it is given (called back with
/// the GIL) checks for Ctrl-C and calls `progress` with `args(p)`. A callback
/// error or a signal cancels the work and is raised; so is the work's error
/// (`Error::Cancelled` as `KeyboardInterrupt`).
pub(crate) fn run_with_progress<T: Send, P: Send, A>(
    py: Python<'_>,
    progress: Option<Bound<'_, PyAny>>,
    args: fn(P) -> A,
    work: impl FnOnce(&mut dyn FnMut(P) -> bool) -> Result<T, Error> + Send,
) -> PyResult<T>
where
    A: for<'py> PyCallArgs<'py>,
{
    let progress = progress.map(Bound::unbind);
    let mut pending: Option<PyErr> = None;
    let outcome = {
        let pending = &mut pending;
        py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let mut tick = |p: P| -> bool {
                    Python::attach(|py| {
                        let called = py.check_signals().and_then(|()| match &progress {
                            Some(cb) => cb.call1(py, args(p)).map(drop),
                            None => Ok(()),
                        });
                        match called {
                            Ok(()) => true,
                            Err(e) => {
                                *pending = Some(e);
                                false
                            }
                        }
                    })
                };
                work(&mut tick)
            }))
        })
    };
    match (outcome, pending) {
        (Err(panic), _) => Err(panic_to_pyerr(panic)),
        (Ok(_), Some(e)) => Err(e),
        (Ok(result), None) => result.map_err(to_pyerr),
    }
}
