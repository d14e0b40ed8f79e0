//! The exception hierarchy and the one `Error` → `PyErr` mapping.

use crate::error::{ContentsMismatch, Error, ReturnMismatch};
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;

/// The exception classes. A module of their own, so the root can be named
/// `Error` in Python without clashing with the core's `Error`.
pub(crate) mod exc {
    use pyo3::create_exception;
    use pyo3::exceptions::PyException;

    create_exception!(
        blkverify_rs,
        Error,
        PyException,
        "The root of blkverify_rs's errors."
    );
    create_exception!(
        blkverify_rs,
        FormatError,
        Error,
        "The image uses something blkverify does not support or must not trust."
    );
    create_exception!(
        blkverify_rs,
        CorruptImageError,
        Error,
        "The image's metadata contradicts itself or the file."
    );
    create_exception!(
        blkverify_rs,
        MismatchError,
        Error,
        "The test image returned different bytes than the reference."
    );
}

pub(crate) use exc::{CorruptImageError, FormatError, MismatchError};

pub(crate) fn to_pyerr(e: Error) -> PyErr {
    match e {
        Error::Io {
            path,
            context,
            source,
        } => {
            let errno = crate::error::io_errno(&source);
            // std's Display appends " (os error N)"; Python's OSError shows errno itself.
            let text = source.to_string();
            let text = match text.rfind(" (os error ") {
                Some(cut) => text.get(..cut).unwrap_or(&text).to_string(),
                None => text,
            };
            let message = format!("{context}: {text}");
            PyOSError::new_err((errno, message, path.display().to_string()))
        }
        Error::Format { .. } => FormatError::new_err(e.to_string()),
        Error::Corrupt { .. } => CorruptImageError::new_err(e.to_string()),
        Error::InvalidArgument(m) => PyValueError::new_err(m),
        // A bug of ours, not the user's mistake: the root class, as a panic
        // caught at the boundary is (`panic_to_pyerr`).
        Error::Internal(_) => exc::Error::new_err(e.to_string()),
        Error::ReadOnly(_) => PyOSError::new_err((libc::EROFS, e.to_string())),
        Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
        Error::Mismatch(ContentsMismatch {
            op,
            offset,
            length,
            sector,
            first_byte,
        }) => mismatch_error(
            &e,
            op,
            (offset, length),
            (Some(sector), Some(first_byte)),
            (None, None),
        ),
        Error::ReturnMismatch(ReturnMismatch {
            op,
            offset,
            length,
            test_ret,
            raw_ret,
            ..
        }) => mismatch_error(
            &e,
            op,
            (offset, length),
            (None, None),
            (Some(test_ret), Some(raw_ret)),
        ),
    }
}

/// A `MismatchError` whose attributes describe the request (`op`, `offset`,
/// `length`) and the finding: `sector`/`first_byte` for different bytes, or
/// `test_ret`/`raw_ret` (0 or a negative errno) when the sides' results differ.
fn mismatch_error(
    e: &Error,
    op: &str,
    (offset, length): (u64, u64),
    (sector, first_byte): (Option<u64>, Option<u64>),
    (test_ret, raw_ret): (Option<i32>, Option<i32>),
) -> PyErr {
    let err = MismatchError::new_err(e.to_string());
    Python::attach(|py| {
        let value = err.value(py);
        // Setting attributes on a fresh exception instance fails only when memory
        // runs out; the exception and its message stand even then.
        let _ = value.setattr("op", op);
        let _ = value.setattr("offset", offset);
        let _ = value.setattr("length", length);
        let _ = value.setattr("sector", sector);
        let _ = value.setattr("first_byte", first_byte);
        let _ = value.setattr("test_ret", test_ret);
        let _ = value.setattr("raw_ret", raw_ret);
    });
    err
}

/// A panic caught at the binding boundary, as `blkverify_rs.Error`.
pub(crate) fn panic_to_pyerr(panic: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".to_string());
    exc::Error::new_err(format!("internal error (please report it): {what}"))
}
