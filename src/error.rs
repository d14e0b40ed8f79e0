//! One error type for the whole core. Every message names the file, the field and
//! the fact, so a user can act on it without a debugger.

use std::io;
use std::path::{Path, PathBuf};

/// The result type used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error, with the file it happened on.
    #[error("{path}: {context}: {source}")]
    Io {
        /// The file the operation was on.
        path: PathBuf,
        /// What we were doing ("read at offset 0x1000", "open").
        context: String,
        /// The underlying error; its kind maps to a Python `OSError` subclass.
        #[source]
        source: io::Error,
    },
    /// The image uses something we do not support or must not trust
    /// (encryption, unknown incompatible features, another image format).
    #[error("{path}: {message}")]
    Format {
        /// The image.
        path: PathBuf,
        /// The fact, naming the field.
        message: String,
    },
    /// The image's metadata contradicts itself or the file.
    #[error("{path}: {message}")]
    Corrupt {
        /// The image.
        path: PathBuf,
        /// The fact, naming the field and its value.
        message: String,
    },
    /// The caller asked for something impossible (a read past the end, a bad option).
    #[error("{0}")]
    InvalidArgument(String),
    /// A write was asked of an image opened read-only.
    #[error("{}: the image is open read-only", .0.display())]
    ReadOnly(PathBuf),
    /// The operation was cancelled (Ctrl-C, or the caller's progress hook said stop).
    #[error("cancelled")]
    Cancelled,
    /// The mirrored device read different bytes from the test image than from the
    /// raw reference. The message is the device's own (see [`ContentsMismatch`]).
    #[error("{0}")]
    Mismatch(ContentsMismatch),
    /// The two sides of the mirrored device returned different results for the same
    /// request (one failed, or they failed with different errors). The message is
    /// the device's own (see [`ReturnMismatch`]).
    #[error("{0}")]
    ReturnMismatch(ReturnMismatch),
    /// A broken internal invariant: a bug of blkverify, not a fault of the image
    /// or of the caller (a driver's map that returned an extent outside the
    /// request, a worker thread that panicked). The message says what broke.
    #[error("internal error (please report it): {0}")]
    Internal(String),
}

// The two findings of the mirrored device are facts carried by this, the
// bottom layer, so every layer can match on them; their messages are the
// device's (`blkverify.rs` implements `Display` for both, next to the requests
// they describe), so the bottom layer does not spell out a layer above it.

/// The mirrored device read different bytes from the test image than from the
/// raw reference: the request and the first differing sector. Its message,
/// blkverify's in 512-byte sectors, is written by the device (`blkverify.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentsMismatch {
    /// The operation ("read").
    pub op: &'static str,
    /// Guest offset of the request, in bytes.
    pub offset: u64,
    /// Length of the request, in bytes.
    pub length: u64,
    /// The first differing 512-byte sector.
    pub sector: u64,
    /// Guest offset of the first differing byte.
    pub first_byte: u64,
}

/// The two sides of the mirrored device returned different results for the
/// same request. The values are QEMU's: 0 for success, a negative errno for a
/// failure; the test side first. Its message is written by the device
/// (`blkverify.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnMismatch {
    /// The operation ("read", "write", "write_zeroes", "discard", "flush").
    pub op: &'static str,
    /// Guest offset of the request, in bytes.
    pub offset: u64,
    /// Length of the request, in bytes.
    pub length: u64,
    /// The test side's result: 0 or a negative errno.
    pub test_ret: i32,
    /// The raw side's result: 0 or a negative errno.
    pub raw_ret: i32,
    /// The test side's error, if it failed (for the detail a message can't hold).
    pub test_error: Option<String>,
    /// The raw side's error, if it failed.
    pub raw_error: Option<String>,
}

/// The errno an I/O error stands for: the OS's, or for an error made here
/// with a kind and a message, the kind's (`EAGAIN` for a lock conflict,
/// `ETIMEDOUT` for a silent server), else `EIO`.
pub fn io_errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::WouldBlock => libc::EAGAIN,
        io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        _ => libc::EIO,
    })
}

/// `len` (bytes, or a count) as a buffer length or index. Every length the
/// core allocates or indexes with was first checked against a limit that
/// fits in memory (a table cap, the cluster size, the request's length), so
/// this fails only where such a check is missing: an internal error, never an
/// empty buffer or a zero.
#[inline]
pub fn usize_of(len: u64) -> Result<usize> {
    usize::try_from(len).map_err(|_| {
        Error::Internal(format!(
            "a length of {len} does not fit this platform's address space"
        ))
    })
}

impl Error {
    /// An I/O error on `path` while doing `context`.
    pub fn io(path: &Path, context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            context: context.into(),
            source,
        }
    }

    /// An unsupported or refused image feature.
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// Metadata that cannot be trusted.
    pub fn corrupt(path: &Path, message: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// The negative errno QEMU would report for this error (used by the mirrored
    /// device to compare the two sides' return values).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => io_errno(source),
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::Internal(_) => libc::EIO,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Format { .. } => libc::ENOTSUP,
            Error::Corrupt { .. }
            | Error::Cancelled
            | Error::Mismatch { .. }
            | Error::ReturnMismatch { .. } => libc::EIO,
        }
    }
}
