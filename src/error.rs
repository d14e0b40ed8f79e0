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
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Format { .. } => libc::ENOTSUP,
            Error::Corrupt { .. } | Error::Cancelled => libc::EIO,
        }
    }
}
