//! Block digests of part of an image, and joining parts again: what lets a
//! digest, or a check against block digests, be cut into ranges that run on
//! different hosts (a cluster's workers), with only digests travelling.
//!
//! A [`BlockSpan`] holds the per-block digests of blocks `[first, end)`,
//! run-encoded as the engine's chunks are (a run of zero blocks is a count).
//! [`digest_span`] computes one where the image is; [`join`] feeds spans, in
//! order, to the outer hash (and a block digests file), giving the digest the
//! whole image's [`super::digest`] gives; [`check_spans`] checks the spans of
//! one image against the spans of another (the reference), giving the report
//! [`super::check`] gives against that reference's block digests file.

use super::check::{tail_findings, Finding};
use super::file::{BlockDigests, BlockDigestsWriter};
use super::hash::{Algorithm, BlockDigest, Outer};
use super::scan::{ChunkOut, Grid, OnError, Padded, Run, Scanner};
use super::{lock, ImageDigest, BLOCK_SIZE};
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::pool::{run_workers, worker_count, Progress};
use crate::report::{Report, VerifyOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Blocks per unit of work inside one span (8 MiB, as the engine's chunks).
const SPAN_CHUNK_BLOCKS: u64 = 128;

/// The block digests of blocks `[first, first + blocks())` of an image.
#[derive(Debug, Default, Clone)]
pub struct BlockSpan {
    /// The first block.
    pub first: u64,
    /// The blocks hashed on the grid: zero runs, digests, and blocks that
    /// could not be read (with the error).
    pub out: ChunkOut,
    /// Blocks past the grid's end (where the reference ends) that do not read
    /// as zeros, with the read error where that was the reason.
    pub tail: Vec<(u64, Option<String>)>,
}

impl BlockSpan {
    /// A span of blocks from `first` with these runs and digests, as they
    /// travel between hosts.
    pub fn from_parts(first: u64, runs: Vec<Run>, digests: Vec<BlockDigest>) -> Result<Self> {
        let data: u64 = runs
            .iter()
            .map(|r| match r {
                Run::Data(n) => *n,
                _ => 0,
            })
            .sum();
        if data != digests.len() as u64 {
            return Err(Error::InvalidArgument(format!(
                "a block span's runs hold {data} digests, but it carries {}",
                digests.len()
            )));
        }
        Ok(BlockSpan {
            first,
            out: ChunkOut {
                runs,
                digests,
                bytes_read: 0,
            },
            tail: Vec::new(),
        })
    }

    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.first.saturating_add(self.out.blocks())
    }
}

/// Hash blocks `[first, end)` of `image` on a grid of 64 KiB blocks that ends
/// at `grid_end` (the image's size, or the reference's when checking against
/// one). Blocks past `grid_end` are not hashed: they must read as zeros, and
/// those that do not are the span's `tail`. With `record_errors`, a block
/// that cannot be read is a `Failed` run (a finding when checking); without,
/// the first read error is the result. `tick` as for [`super::digest`].
pub fn digest_span(
    image: &dyn BlockDriver,
    algorithm: Algorithm,
    grid_end: u64,
    (first, end): (u64, u64),
    threads: usize,
    record_errors: bool,
    tick: &mut dyn FnMut(Progress) -> bool,
) -> Result<BlockSpan> {
    let grid = Grid {
        block_size: BLOCK_SIZE,
        grid_end,
    };
    let total = grid_end.max(image.size());
    let last = total.div_ceil(BLOCK_SIZE);
    if first > end || end > last {
        return Err(Error::InvalidArgument(format!(
            "{}: blocks {first}..{end} are not blocks of a {total}-byte disk ({last} blocks)",
            image.path().display()
        )));
    }
    let hashed_end = end.min(grid.blocks());
    let hashed_first = first.min(hashed_end);
    let chunks = (hashed_end - hashed_first).div_ceil(SPAN_CHUNK_BLOCKS);
    let threads = worker_count(threads, chunks);
    let on_error = if record_errors {
        OnError::Record
    } else {
        OnError::Fail
    };
    let padded = Padded { driver: image };
    let span_bytes = (end * BLOCK_SIZE).min(total) - (first * BLOCK_SIZE).min(total);
    let next_chunk = AtomicU64::new(0);
    let cancelled = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let results: Mutex<Vec<(u64, ChunkOut)>> = Mutex::new(Vec::new());
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let work = || {
        let mut scanner = Scanner::new(padded, grid, algorithm, on_error);
        loop {
            if cancelled.load(Ordering::Relaxed) {
                return;
            }
            let index = next_chunk.fetch_add(1, Ordering::Relaxed);
            if index >= chunks {
                return;
            }
            let from = hashed_first + index * SPAN_CHUNK_BLOCKS;
            let to = (from + SPAN_CHUNK_BLOCKS).min(hashed_end);
            match scanner.scan(from, to) {
                Ok(out) => lock(&results).push((index, out)),
                Err(e) => {
                    lock(&failed).get_or_insert(e);
                    cancelled.store(true, Ordering::Relaxed);
                    return;
                }
            }
            let bytes = (to * BLOCK_SIZE).min(grid_end) - (from * BLOCK_SIZE).min(grid_end);
            done.fetch_add(bytes, Ordering::Relaxed);
        }
    };
    if !run_workers(threads, span_bytes, &done, &cancelled, tick, &work) {
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        return Err(Error::Cancelled);
    }
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(index, _)| *index);
    let mut out = ChunkOut::default();
    for (_, chunk) in results {
        out.append(chunk);
    }
    let mut span = BlockSpan {
        first: hashed_first,
        out,
        tail: Vec::new(),
    };
    // Past the grid: the image must read as zeros there.
    let tail = (
        (first * BLOCK_SIZE).max(grid_end),
        (end * BLOCK_SIZE).min(total),
    );
    if tail.0 < tail.1 {
        let mut found = Vec::new();
        let mut buf = Vec::new();
        tail_findings(
            &padded,
            BLOCK_SIZE,
            tail,
            &mut buf,
            &mut found,
            &mut span.out.bytes_read,
        );
        for f in found {
            for block in f.block..f.block + f.count {
                span.tail.push((block, f.error.clone()));
            }
        }
    }
    Ok(span)
}

/// Joins the spans of an image's blocks, fed in order, into its digest (and
/// block digests file): what [`join`] does, one span at a time, so a caller
/// need not hold them all.
pub struct Joiner {
    algorithm: Algorithm,
    size: u64,
    outer: Outer,
    writer: Option<BlockDigestsWriter>,
    next: u64,
    bytes_read: u64,
    started: Instant,
}

impl Joiner {
    /// A joiner for an image of `size` bytes; with `blocks`, its block
    /// digests file is written there (it appears only when `finish` succeeds).
    pub fn new(algorithm: Algorithm, size: u64, blocks: Option<&Path>) -> Result<Self> {
        let zero_digest = algorithm.hash(&vec![0u8; BLOCK_SIZE as usize]);
        let writer = match blocks {
            Some(path) => Some(BlockDigestsWriter::create(
                path, algorithm, BLOCK_SIZE, size,
            )?),
            None => None,
        };
        Ok(Joiner {
            algorithm,
            size,
            outer: Outer::new(algorithm, &zero_digest),
            writer,
            next: 0,
            bytes_read: 0,
            started: Instant::now(),
        })
    }

    /// The next span: it must start where the last one ended. A span with
    /// blocks that could not be read gives that error.
    pub fn feed(&mut self, span: &BlockSpan) -> Result<()> {
        if span.first != self.next {
            return Err(Error::InvalidArgument(format!(
                "block spans do not follow each other: one starts at block {}, where block {} was expected",
                span.first, self.next
            )));
        }
        if span.end() > self.size.div_ceil(BLOCK_SIZE) {
            return Err(Error::InvalidArgument(format!(
                "a block span ends at block {}, past the {} blocks of a {}-byte image",
                span.end(),
                self.size.div_ceil(BLOCK_SIZE),
                self.size
            )));
        }
        let mut digests = span.out.digests.as_slice();
        for run in &span.out.runs {
            match run {
                Run::Zero(n) => {
                    self.outer.zeros(*n);
                    if let Some(w) = self.writer.as_mut() {
                        w.zeros(*n)?;
                    }
                }
                Run::Data(n) => {
                    let n = usize::try_from(*n).unwrap_or(usize::MAX);
                    let these = digests.get(..n).ok_or_else(|| {
                        Error::InvalidArgument("a block span has too few digests".into())
                    })?;
                    digests = digests.get(n..).unwrap_or(&[]);
                    self.outer.digests(these);
                    if let Some(w) = self.writer.as_mut() {
                        w.digests(these)?;
                    }
                }
                Run::Failed(_, e) => return Err(Error::InvalidArgument(e.clone())),
            }
        }
        self.next = span.end();
        self.bytes_read += span.out.bytes_read;
        Ok(())
    }

    /// The digest, once every block was fed.
    pub fn finish(self) -> Result<ImageDigest> {
        let blocks = self.size.div_ceil(BLOCK_SIZE);
        if self.next != blocks {
            return Err(Error::InvalidArgument(format!(
                "block spans cover {} blocks of {blocks}",
                self.next
            )));
        }
        let digest = self.outer.finish(self.size);
        if let Some(writer) = self.writer {
            writer.finish(&digest)?;
        }
        Ok(ImageDigest {
            digest,
            algorithm: self.algorithm,
            block_size: BLOCK_SIZE,
            size: self.size,
            bytes_read: self.bytes_read,
            elapsed: self.started.elapsed(),
        })
    }
}

/// The digest of an image of `size` bytes from the spans of all its blocks,
/// in order: equal to [`super::digest`] of the image. With `blocks`, also
/// write its block digests file there.
pub fn join(
    algorithm: Algorithm,
    size: u64,
    spans: &[BlockSpan],
    blocks: Option<&Path>,
) -> Result<ImageDigest> {
    let mut joiner = Joiner::new(algorithm, size, blocks)?;
    for span in spans {
        joiner.feed(span)?;
    }
    joiner.finish()
}

/// One image's spans, as [`check_spans`] takes them: the image's path (named
/// in the report), its size, and the spans of its blocks, in order.
#[derive(Debug, Clone, Copy)]
pub struct Spans<'a> {
    /// The image's path.
    pub path: &'a Path,
    /// Its virtual size.
    pub size: u64,
    /// The spans.
    pub spans: &'a [BlockSpan],
}

/// Check `test`, given as the spans of its blocks on the reference's grid
/// (see [`digest_span`]), against `reference`, given as the spans of all its
/// blocks. The report is the one [`super::check`] gives against the
/// reference's block digests file, with the same `options` (`start`/`length`
/// included: the test spans then cover that range's blocks). The reference's
/// spans must be whole: a reference block that could not be read is that
/// error.
pub fn check_spans(
    reference: Spans<'_>,
    algorithm: Algorithm,
    test: Spans<'_>,
    options: &VerifyOptions,
) -> Result<Report> {
    let started = Instant::now();
    let digests =
        BlockDigests::from_spans(reference.path, algorithm, reference.size, reference.spans)?;
    let mut found: Vec<(u64, Vec<Finding>)> = Vec::new();
    let mut bytes_read = 0;
    let mut runs_found = 0;
    for span in test.spans {
        let mut these = Vec::new();
        super::check::compare(&digests, span.first, &span.out, &mut these);
        for (block, error) in &span.tail {
            these.push(Finding {
                block: *block,
                count: 1,
                error: error.clone(),
            });
        }
        these.sort_by_key(|f| f.block);
        runs_found += these.len() as u64;
        bytes_read += span.out.bytes_read;
        found.push((span.first, these));
    }
    found.sort_by_key(|(first, _)| *first);
    let findings = found.into_iter().flat_map(|(_, f)| f).collect();
    super::check::report(
        &digests,
        test.path,
        test.size,
        findings,
        (bytes_read, runs_found),
        options,
        started,
    )
}
