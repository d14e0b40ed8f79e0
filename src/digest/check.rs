//! Checking an image against a block digests file: hash the image block by
//! block, as [`super::digest`] does, and compare each block's digest with the
//! file's. Blocks that differ are findings, merged into runs.
//!
//! As `verify` does, a size difference is a warning and the common part is
//! compared: blocks are cut on the reference's grid (its last block may be
//! short), the image reads as zeros past its end, and an image longer than the
//! reference must read as zeros past the reference's end.

use super::file::BlockDigests;
use super::scan::{ChunkOut, Grid, OnError, Padded, Run, Scanner};
use super::{lock, BlockDigest, ZERO_LOOKAHEAD};
use crate::compare::first_nonzero;
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::pool::{run_workers, worker_count, Progress};
use crate::report::{aligned_range, Mismatch, Report, VerifyOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// A finding before it is turned into offsets: blocks `[block, block + count)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finding {
    pub(super) block: u64,
    pub(super) count: u64,
    pub(super) error: Option<String>,
}

fn add_finding(found: &mut Vec<Finding>, block: u64, count: u64, error: Option<&str>) {
    if count == 0 {
        return;
    }
    if let Some(last) = found.last_mut() {
        let last_end = last.block + last.count;
        if last.block <= block && last_end >= block && last.error.as_deref() == error {
            last.count = last_end.max(block + count) - last.block;
            return;
        }
    }
    found.push(Finding {
        block,
        count,
        error: error.map(str::to_string),
    });
}

/// Compare the image's blocks starting at `first` (`out`) with the reference's.
pub(super) fn compare(
    reference: &BlockDigests,
    first: u64,
    out: &ChunkOut,
    found: &mut Vec<Finding>,
) {
    let zero = *reference.zero_digest();
    let end = first + out.blocks();
    let mut expected = reference.runs_in(first, end);
    let mut current = expected.next();
    let mut used = 0u64; // blocks of `current` already compared
    let mut block = first;
    let mut digests = out.digests.iter();
    for run in &out.runs {
        let (mut left, kind) = match run {
            Run::Zero(n) => (*n, None),
            Run::Data(n) => (*n, Some(())),
            Run::Failed(n, e) => {
                add_finding(found, block, *n, Some(e));
                block += n;
                // Skip the reference's blocks these cover.
                let mut skip = *n;
                while skip > 0 {
                    let Some(exp) = current else { break };
                    let take = skip.min(exp.count - used);
                    skip -= take;
                    used += take;
                    if used == exp.count {
                        current = expected.next();
                        used = 0;
                    }
                }
                continue;
            }
        };
        while left > 0 {
            let Some(exp) = current else {
                // The reference has no blocks here (cannot happen: the grid is
                // the reference's); count it as a difference rather than pass it.
                add_finding(found, block, left, None);
                block += left;
                break;
            };
            let take = left.min(exp.count - used);
            let offset = usize::try_from(used).unwrap_or(usize::MAX);
            let theirs = |j: u64| -> BlockDigest {
                exp.digests
                    .and_then(|d| d.get(offset + usize::try_from(j).unwrap_or(usize::MAX)))
                    .copied()
                    .unwrap_or(zero)
            };
            match (kind, exp.digests) {
                (None, None) => {}
                (None, Some(_)) => {
                    for j in 0..take {
                        if theirs(j) != zero {
                            add_finding(found, block + j, 1, None);
                        }
                    }
                }
                (Some(()), _) => {
                    for j in 0..take {
                        let ours = digests.next().copied().unwrap_or(zero);
                        if ours != theirs(j) {
                            add_finding(found, block + j, 1, None);
                        }
                    }
                }
            }
            block += take;
            left -= take;
            used += take;
            if used == exp.count {
                current = expected.next();
                used = 0;
            }
        }
    }
}

/// Check that `[from, to)` of the image reads as zeros (the part past the
/// reference's end), recording the blocks that do not.
pub(super) fn tail_findings(
    image: &Padded<'_>,
    block_size: u64,
    (from, to): (u64, u64),
    buf: &mut Vec<u8>,
    found: &mut Vec<Finding>,
    bytes_read: &mut u64,
) {
    let mut pos = from;
    while pos < to {
        let block = pos / block_size;
        let block_end = ((block + 1) * block_size).min(to);
        let (len, zero) = match image.zero_status(pos, block_end - pos) {
            Ok(status) => status,
            Err(e) => {
                add_finding(found, block, 1, Some(&e.to_string()));
                pos = block_end;
                continue;
            }
        };
        let len = len.min(block_end - pos);
        if !zero {
            // At most one block (64 MiB at most): it fits a usize.
            let n = len as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let bytes = buf.get_mut(..n).unwrap_or(&mut []);
            match image.read(bytes, pos) {
                Ok(()) => {
                    *bytes_read += len;
                    if first_nonzero(bytes).is_some() {
                        add_finding(found, block, 1, None);
                        pos = block_end;
                        continue;
                    }
                }
                Err(e) => {
                    add_finding(found, block, 1, Some(&e.to_string()));
                    pos = block_end;
                    continue;
                }
            }
        }
        pos += len;
    }
}

/// Check `image` against the block digests `reference`, as `verify` checks
/// an image against a raw one: the same options, and a [`Report`] whose
/// mismatches are runs of whole blocks (`block_size` is set). `tick` as for
/// [`super::digest`]. Read errors in the image are findings (with the error);
/// there is no reference side to fail.
pub fn check(
    reference: &BlockDigests,
    image: &dyn BlockDriver,
    options: &VerifyOptions,
    tick: &mut dyn FnMut(Progress) -> bool,
) -> Result<Report> {
    let started = Instant::now();
    let block_size = reference.block_size();
    let reference_size = reference.size();
    let test_size = image.size();
    let total = reference_size.max(test_size);
    // A range is whole blocks (the file has nothing finer), on the same grid
    // as the whole disk's chunks, so ranges checked apart merge into the
    // whole-disk report.
    let range = aligned_range(options, total, block_size)?;
    let range_len = range.end - range.start;
    let first_block = range.start / block_size;
    let end_block = range.end.div_ceil(block_size);
    let chunk_blocks = (options.chunk_size / block_size).clamp(1, 4096);
    let first_chunk = first_block / chunk_blocks;
    let chunks = end_block.div_ceil(chunk_blocks);
    let threads = worker_count(options.threads, chunks.saturating_sub(first_chunk));
    let checker = Checker {
        reference,
        padded: Padded { driver: image },
        options,
        grid: Grid {
            block_size,
            grid_end: reference_size,
        },
        range,
        first_block,
        end_block,
        chunk_blocks,
        chunks,
        next_chunk: AtomicU64::new(first_chunk),
        first_hit: AtomicU64::new(u64::MAX),
        cancelled: AtomicBool::new(false),
        done: AtomicU64::new(0),
        runs_found: AtomicU64::new(0),
        results: Mutex::new(Vec::new()),
    };
    let work = || checker.worker();
    if !run_workers(
        threads,
        range_len,
        &checker.done,
        &checker.cancelled,
        tick,
        &work,
    ) {
        return Err(Error::Cancelled);
    }
    let mut results = checker
        .results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(index, _, _)| *index);
    let mut bytes_read = 0;
    let mut findings = Vec::new();
    for (_, found, read) in results {
        bytes_read += read;
        findings.extend(found);
    }
    report(
        reference,
        image.path(),
        test_size,
        findings,
        (bytes_read, checker.runs_found.load(Ordering::Relaxed)),
        options,
        started,
    )
}

/// One check, shared by its workers: what is checked, on which grid, and the
/// counters the workers take chunks from and report to.
struct Checker<'a> {
    reference: &'a BlockDigests,
    padded: Padded<'a>,
    options: &'a VerifyOptions,
    /// The reference's blocks (the image is hashed on them).
    grid: Grid,
    /// The guest bytes to check.
    range: std::ops::Range<u64>,
    /// The blocks of `range`: `[first_block, end_block)`.
    first_block: u64,
    end_block: u64,
    /// Blocks per chunk; chunk `i` is blocks `i * chunk_blocks..` within the range.
    chunk_blocks: u64,
    /// Chunks up to the end of the range.
    chunks: u64,
    next_chunk: AtomicU64,
    /// The lowest chunk with a finding, for an early stop without `all`.
    first_hit: AtomicU64,
    cancelled: AtomicBool,
    /// Guest bytes done, for progress.
    done: AtomicU64,
    runs_found: AtomicU64,
    /// Per chunk: its findings and the bytes read.
    results: Mutex<Vec<(u64, Vec<Finding>, u64)>>,
}

impl Checker<'_> {
    /// Take chunks until there are none left (or a finding makes the rest
    /// irrelevant, or the run is cancelled), and check each.
    fn worker(&self) {
        let mut scanner = Scanner::new(
            self.padded,
            self.grid,
            self.reference.algorithm(),
            OnError::Record,
        );
        let mut tail_buf = Vec::new();
        loop {
            if self.cancelled.load(Ordering::Relaxed) {
                return;
            }
            let index = self.next_chunk.fetch_add(1, Ordering::Relaxed);
            if index >= self.chunks {
                return;
            }
            if !self.options.all && index > self.first_hit.load(Ordering::Relaxed) {
                return;
            }
            let (found, read) = self.check_chunk(index, &mut scanner, &mut tail_buf);
            if !found.is_empty() {
                self.first_hit.fetch_min(index, Ordering::Relaxed);
                let n = self
                    .runs_found
                    .fetch_add(found.len() as u64, Ordering::Relaxed);
                if self.options.all && n + found.len() as u64 >= self.options.max_runs as u64 {
                    self.cancelled.store(true, Ordering::Relaxed);
                }
            }
            lock(&self.results).push((index, found, read));
        }
    }

    /// Check chunk `index`: its findings and the bytes read. A chunk that
    /// reads as zeros without reading is compared as zeros, with the chunks
    /// wholly inside the same zero run that no worker has taken yet.
    fn check_chunk(
        &self,
        index: u64,
        scanner: &mut Scanner<'_>,
        tail_buf: &mut Vec<u8>,
    ) -> (Vec<Finding>, u64) {
        let block_size = self.grid.block_size;
        let hashed_blocks = self.grid.blocks();
        let range = &self.range;
        let first = (index * self.chunk_blocks).max(self.first_block);
        let end = ((index + 1) * self.chunk_blocks).min(self.end_block);
        let start = first * block_size;
        let stop = (end * block_size).min(range.end);
        let mut found = Vec::new();
        let mut read = 0;
        let zero_end = self
            .padded
            .zero_until(start, start.saturating_add(ZERO_LOOKAHEAD).min(range.end));
        if zero_end < stop {
            // Blocks on the reference's grid are hashed; past its end the
            // image must read as zeros.
            match scanner.scan(first, end.min(hashed_blocks)) {
                Ok(out) => {
                    read += out.bytes_read;
                    compare(self.reference, first, &out, &mut found);
                }
                Err(e) => add_finding(&mut found, first, end - first, Some(&e.to_string())),
            }
            let tail = (start.max(self.grid.grid_end), stop);
            if tail.0 < tail.1 {
                tail_findings(
                    &self.padded,
                    block_size,
                    tail,
                    tail_buf,
                    &mut found,
                    &mut read,
                );
            }
            self.done.fetch_add(stop - start, Ordering::Relaxed);
            return (found, read);
        }
        // The chunks to compare as zeros: this one, and those wholly inside
        // the zero run that no worker has taken yet.
        let mut zero_ranges = vec![(first, end)];
        let first_after = if zero_end >= range.end {
            self.chunks
        } else {
            zero_end / (self.chunk_blocks * block_size)
        };
        let previous = self.next_chunk.fetch_max(first_after, Ordering::Relaxed);
        if previous < first_after {
            zero_ranges.push((
                previous * self.chunk_blocks,
                (first_after * self.chunk_blocks).min(self.end_block),
            ));
        }
        for (from, to) in zero_ranges {
            let mut out = ChunkOut::default();
            scanner.zero_blocks(from, to.min(hashed_blocks), &mut out);
            compare(self.reference, from, &out, &mut found);
            let bytes = (to * block_size).min(range.end) - (from * block_size).min(range.end);
            self.done.fetch_add(bytes, Ordering::Relaxed);
        }
        (found, read)
    }
}

/// The report of a check against `reference` of the image at `test` (of
/// `test_size` bytes) from its findings, in block order: runs merged, the run
/// cap applied (`runs_found`: the runs the workers counted as they went),
/// sizes compared. `(bytes_read, runs_found)` as the workers counted them.
pub(super) fn report(
    reference: &BlockDigests,
    test: &Path,
    test_size: u64,
    findings: Vec<Finding>,
    (bytes_read, runs_found): (u64, u64),
    options: &VerifyOptions,
    started: Instant,
) -> Result<Report> {
    let block_size = reference.block_size();
    let reference_size = reference.size();
    let total = reference_size.max(test_size);
    let range = aligned_range(options, total, block_size)?;
    let range_len = range.end - range.start;
    let mut warnings = Vec::new();
    if reference_size != test_size {
        warnings.push(format!(
            "image sizes differ: {} is {reference_size} bytes, {} is {test_size} bytes; the longer one's tail must read as zeros",
            reference.path().display(),
            test.display()
        ));
    }
    let mut merged: Vec<Finding> = Vec::new();
    for f in &findings {
        add_finding(&mut merged, f.block, f.count, f.error.as_deref());
    }
    let mut truncated = false;
    if !options.all {
        merged.truncate(1);
    } else if merged.len() > options.max_runs || runs_found >= options.max_runs as u64 {
        merged.truncate(options.max_runs);
        truncated = true;
    }
    let mismatches: Vec<Mismatch> = merged
        .into_iter()
        .map(|f| {
            let offset = f.block.saturating_mul(block_size).min(total);
            let end = (f.block + f.count).saturating_mul(block_size).min(total);
            Mismatch {
                offset,
                length: end - offset,
                first_byte: offset,
                error: f.error,
                // A block digest run says what failed, not with which errno.
                errno: None,
            }
        })
        .collect();
    let bytes_compared = match mismatches.first() {
        Some(first) if !options.all => first.offset - range.start,
        _ => range_len,
    };
    let identical = mismatches.is_empty() && !(options.strict && reference_size != test_size);
    Ok(Report {
        identical,
        raw_size: reference_size,
        test_size,
        virtual_size: total,
        range,
        bytes_compared,
        bytes_read,
        mismatches,
        truncated,
        warnings,
        elapsed: started.elapsed(),
        block_size: Some(block_size),
    })
}
