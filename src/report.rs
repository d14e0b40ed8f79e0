//! What a verification is asked and what it answers: its options, the guest
//! range they select, the mismatching runs it finds, and its report. Both
//! engines that verify share them: `verify` (against a reference image) and
//! `digest::check` (against a block digests file), so they live below both.

use crate::driver::{BlockDriver, OpenOptions};
use crate::error::{Error, Result};
use crate::size::SECTOR_SIZE;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

/// How many of a report's runs (the first, in guest order) are located in
/// each side's metadata: locating reads metadata, and a report of 100,000
/// runs is read for its first ones.
pub const MAX_LOCATED: usize = 1000;

/// How to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Report every mismatching run instead of stopping at the first.
    pub all: bool,
    /// A size difference is itself a mismatch.
    pub strict: bool,
    /// Bytes per unit of work (rounded to sectors).
    pub chunk_size: u64,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// The most runs `all` collects before it stops (bounds memory).
    pub max_runs: usize,
    /// The first guest byte to verify (a multiple of 512).
    pub start: u64,
    /// How many bytes from `start` to verify; `None`: to the end of the disk.
    /// A multiple of 512, unless the range ends where the disk does.
    pub length: Option<u64>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            all: false,
            strict: false,
            chunk_size: 8 << 20,
            threads: 0,
            max_runs: 100_000,
            start: 0,
            length: None,
        }
    }
}

/// A run of consecutive mismatching sectors (or blocks, when the reference is
/// a block digests file: see [`Report::block_size`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Guest offset of the run's first sector (a multiple of 512), or block.
    pub offset: u64,
    /// Length in bytes (whole sectors or blocks, except at the end of the disk).
    pub length: u64,
    /// Guest offset of the first byte that differs (a block digest does not
    /// say which: then the run's first byte).
    pub first_byte: u64,
    /// Set when the test image could not be read here: the error.
    pub error: Option<String>,
    /// The errno of that error (positive), for a return-value report.
    pub errno: Option<i32>,
}

impl Mismatch {
    /// The first mismatching sector.
    pub fn sector(&self) -> u64 {
        self.offset / SECTOR_SIZE
    }

    /// The guest offset just past the run.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// What a verification found.
#[derive(Debug, Clone)]
pub struct Report {
    /// No mismatch (and, with `strict`, equal sizes).
    pub identical: bool,
    /// The reference's size.
    pub raw_size: u64,
    /// The test image's size.
    pub test_size: u64,
    /// The compared disk: the larger of the two sizes.
    pub virtual_size: u64,
    /// The guest bytes this report covers: `0..virtual_size` unless a range
    /// was asked for.
    pub range: Range<u64>,
    /// Guest bytes verified (read and compared, or proven zero on both sides).
    pub bytes_compared: u64,
    /// Guest bytes that were read from at least one side.
    pub bytes_read: u64,
    /// Mismatching runs, in disk order.
    pub mismatches: Vec<Mismatch>,
    /// `max_runs` was reached; more mismatches may exist.
    pub truncated: bool,
    /// Things the user should know (size differences).
    pub warnings: Vec<String>,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// `None` when bytes were compared (mismatches are sector runs); the block
    /// size when the reference was a block digests file (mismatches are runs of
    /// whole blocks, and block `i` starts at `i * block_size`).
    pub block_size: Option<u64>,
}

/// The guest range `options` asks for on a disk of `total` bytes. It starts on
/// a sector and ends on one, or where the disk does (whose size need not be a
/// multiple of 512), so every run a range finds is one a whole-disk verify
/// finds too.
pub fn requested_range(options: &VerifyOptions, total: u64) -> Result<Range<u64>> {
    aligned_range(options, total, SECTOR_SIZE)
}

/// [`requested_range`] on a grid of `align` bytes (a block digests file's
/// blocks: a range of whole blocks).
pub(crate) fn aligned_range(options: &VerifyOptions, total: u64, align: u64) -> Result<Range<u64>> {
    let align = align.max(1);
    let start = options.start;
    let end = match options.length {
        Some(length) => start.checked_add(length).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the range at {start:#x} of {length} bytes ends past 2^64"
            ))
        })?,
        None => total.max(start),
    };
    if start % align != 0 {
        return Err(Error::InvalidArgument(format!(
            "the range's start ({start:#x}) is not a multiple of {align} bytes"
        )));
    }
    if end > total {
        return Err(Error::InvalidArgument(format!(
            "the range {start:#x}..{end:#x} ends past the end of the disk ({total} bytes)"
        )));
    }
    if end % align != 0 && end != total {
        return Err(Error::InvalidArgument(format!(
            "the range's length ({}) is not a multiple of {align} bytes, and the range does not end where the disk does",
            end - start
        )));
    }
    Ok(start..end)
}

/// The warning that `image`'s backing file was not opened (`--no-backing`), so
/// its unallocated clusters were `done` (compared, hashed) as zeros.
pub fn unopened_backing(
    path: &Path,
    image: &dyn BlockDriver,
    options: &OpenOptions,
    done: &str,
) -> Option<String> {
    if options.backing.follow {
        return None;
    }
    let (_, name) = image
        .info()
        .into_iter()
        .find(|(k, _)| k == "backing_file")?;
    Some(format!(
        "{}: backing file '{name}' was not opened (--no-backing): unallocated clusters were {done} as zeros",
        path.display()
    ))
}
