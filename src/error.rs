//! One error type for the whole core. Every message names the file, the field and
//! the fact, so a user can act on it without a debugger.

use crate::driver::SECTOR_SIZE;
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
    /// raw reference. The message is blkverify's, in 512-byte sectors: the request
    /// (`sector_num`, `nb_sectors`) and the first differing sector.
    #[error(
        "blkverify: {op} sector_num={} nb_sectors={} contents mismatch in sector {sector}",
        request_sectors(*.offset, *.length).0,
        request_sectors(*.offset, *.length).1
    )]
    Mismatch {
        /// The operation ("read").
        op: &'static str,
        /// Guest offset of the request, in bytes.
        offset: u64,
        /// Length of the request, in bytes.
        length: u64,
        /// The first differing 512-byte sector.
        sector: u64,
        /// Guest offset of the first differing byte.
        first_byte: u64,
    },
    /// The two sides of the mirrored device returned different results for the same
    /// request (one failed, or they failed with different errors). The values are
    /// QEMU's: 0 for success, a negative errno for a failure; the test side first.
    #[error(
        "blkverify: {op} sector_num={} nb_sectors={} return value mismatch {test_ret} != {raw_ret}",
        request_sectors(*.offset, *.length).0,
        request_sectors(*.offset, *.length).1
    )]
    ReturnMismatch {
        /// The operation ("read", "write", "write_zeroes", "discard", "flush").
        op: &'static str,
        /// Guest offset of the request, in bytes.
        offset: u64,
        /// Length of the request, in bytes.
        length: u64,
        /// The test side's result: 0 or a negative errno.
        test_ret: i32,
        /// The raw side's result: 0 or a negative errno.
        raw_ret: i32,
        /// The test side's error, if it failed (for the detail a message can't hold).
        test_error: Option<String>,
        /// The raw side's error, if it failed.
        raw_error: Option<String>,
    },
}

/// A byte range as blkverify reports it: the first 512-byte sector and the number of
/// sectors the range touches.
pub fn request_sectors(offset: u64, length: u64) -> (u64, u64) {
    let first = offset / SECTOR_SIZE;
    let end = offset.saturating_add(length).div_ceil(SECTOR_SIZE);
    (first, end.saturating_sub(first))
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
            Error::ReadOnly(_) => libc::EROFS,
            Error::Format { .. } => libc::ENOTSUP,
            Error::Corrupt { .. }
            | Error::Cancelled
            | Error::Mismatch { .. }
            | Error::ReturnMismatch { .. } => libc::EIO,
        }
    }
}
