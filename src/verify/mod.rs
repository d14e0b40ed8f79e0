//! The whole-image verify engine: split the disk into chunks, let worker
//! threads take them in order, skip ranges that read as zeros on both sides,
//! compare the rest, and report mismatching sectors merged into runs.
//!
//! Workers take chunks from a shared counter rather than splitting the disk into
//! fixed halves, so reads stay near-sequential (good for readahead) and a worker
//! can stop as soon as an earlier mismatch makes its chunk irrelevant.

mod merge;

pub use crate::pool::Progress;
pub use crate::report::{requested_range, Mismatch, Report, VerifyOptions, MAX_LOCATED};
pub use merge::merge_ranges;

use crate::compare::{first_difference, first_nonzero};
use crate::driver::{zero_status, BlockDriver, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::pool;
use crate::storage::View;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// One side of the comparison, padded with zeros past its own end.
struct Side<'a> {
    driver: &'a dyn BlockDriver,
}

impl Side<'_> {
    fn size(&self) -> u64 {
        self.driver.size()
    }

    fn zero_status(&self, offset: u64, max_len: u64) -> Result<(u64, bool)> {
        let size = self.size();
        if offset >= size {
            return Ok((max_len, true));
        }
        let (len, zero) = zero_status(self.driver, offset, max_len.min(size - offset))?;
        Ok((len.clamp(1, max_len), zero))
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let stored = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(stored);
        if !head.is_empty() {
            self.driver.read_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// Ranges at least this long that are not mapped as part of their chunk get a
/// view of their own (a qcow2 chunk whose clusters are not host-contiguous).
const MIN_RANGE_VIEW: usize = 256 << 10;

/// How far one look for a run of zeros on both sides goes; bounds the time a
/// worker spends before it checks for cancellation again.
const ZERO_LOOKAHEAD: u64 = 64 << 30;

/// One side's bytes over a whole chunk, mapped on first use.
struct ChunkView {
    start: u64,
    view: Option<View>,
    tried: bool,
}

impl ChunkView {
    fn new(start: u64) -> Self {
        ChunkView {
            start,
            view: None,
            tried: false,
        }
    }

    /// The bytes of `[pos, pos + n)`, if the chunk (up to `chunk_end`) is mapped.
    fn get(&mut self, side: &Side<'_>, chunk_end: u64, pos: u64, n: usize) -> Option<&[u8]> {
        if !self.tried {
            self.tried = true;
            let end = chunk_end.min(side.size());
            if end > self.start {
                let len = usize::try_from(end - self.start).ok()?;
                // An error here is reported by the read that follows instead.
                self.view = side.driver.read_view(self.start, len).ok().flatten();
            }
        }
        let view = self.view.as_ref()?;
        let from = usize::try_from(pos.checked_sub(self.start)?).ok()?;
        view.get(from..from.checked_add(n)?)
    }

    fn faulted(&self) -> bool {
        self.view.as_ref().is_some_and(View::faulted)
    }
}

/// A worker's read buffers, as long as the longest read so far (at most a
/// chunk, or the range if shorter): chunks compared through mapped views, or
/// proven zero on both sides, are never read into them, and a batch of many
/// small pairs would otherwise clear two whole chunks of memory per pair for
/// a few clusters of data.
struct Buffers {
    len: usize,
    raw: Vec<u8>,
    test: Vec<u8>,
}

impl Buffers {
    fn new(len: u64) -> Self {
        Buffers {
            len: usize::try_from(len).unwrap_or(1 << 20),
            raw: Vec::new(),
            test: Vec::new(),
        }
    }

    /// The buffers, at least `n` bytes long each (`n` is at most a chunk).
    fn ready(&mut self, n: usize) -> &mut Self {
        let n = n.min(self.len);
        if self.raw.len() < n {
            self.raw.resize(n, 0);
            self.test.resize(n, 0);
        }
        self
    }
}

/// Runs found in one chunk.
struct ChunkResult {
    runs: Vec<Mismatch>,
    bytes_read: u64,
}

struct Shared<'a> {
    raw: Side<'a>,
    test: Side<'a>,
    options: &'a VerifyOptions,
    /// The disk's size: the larger of the two sides.
    total: u64,
    /// The guest bytes to verify, within `0..total`.
    range: Range<u64>,
    /// Chunk `i` is `i * chunk_size..(i + 1) * chunk_size` within `range`: the
    /// grid does not move with the range, so a range reads what a whole-disk
    /// verify reads there.
    chunk_size: u64,
    next_chunk: AtomicU64,
    /// The lowest chunk index with a finding (or error), for early stop.
    first_hit: AtomicU64,
    cancelled: AtomicBool,
    done_bytes: AtomicU64,
    runs_found: AtomicU64,
    results: Mutex<Vec<(u64, ChunkResult)>>,
    errors: Mutex<Vec<(u64, Error)>>,
}

/// Push a mismatching sector range into `runs`, merging with the last run.
/// `error` is the test side's read error there (its text and errno), if any.
fn add_run(
    runs: &mut Vec<Mismatch>,
    start: u64,
    end: u64,
    first_byte: u64,
    error: Option<(String, i32)>,
) {
    let (error, errno) = error.unzip();
    if let Some(last) = runs.last_mut() {
        let last_end = last.offset + last.length;
        if last_end >= start && last.offset <= start && last.error == error && last.errno == errno {
            last.length = last_end.max(end) - last.offset;
            return;
        }
    }
    runs.push(Mismatch {
        offset: start,
        length: end - start,
        first_byte,
        error,
        errno,
    });
}

/// Whether the first of `runs` has ended before `pos`: a run that reaches `pos`
/// may go on there, so a search that stops at the first run must look on.
fn first_run_closed(runs: &[Mismatch], pos: u64) -> bool {
    match runs {
        [] => false,
        [first] => first.offset + first.length < pos,
        _ => true,
    }
}

/// Compare `a` with `b` (buffers of the guest range at `base`) sector by
/// sector, appending runs. `b == None` means "compare `a` with zeros". With
/// `stop_after_first_run`, stops where the first run of sectors ends.
/// Returns whether anything differed.
fn collect_runs(
    runs: &mut Vec<Mismatch>,
    base: u64,
    a: &[u8],
    b: Option<&[u8]>,
    stop_after_first_run: bool,
    total: u64,
) -> bool {
    let differs = |from: usize| -> Option<usize> {
        let x = a.get(from..).unwrap_or(&[]);
        let found = match b {
            Some(b) => first_difference(x, b.get(from..).unwrap_or(&[])),
            None => first_nonzero(x),
        };
        found.map(|d| from + d)
    };
    let Some(mut pos) = differs(0) else {
        return false;
    };
    loop {
        let abs = base + pos as u64;
        let sector_start = abs - abs % SECTOR_SIZE;
        let sector_end = (sector_start + SECTOR_SIZE).min(total);
        add_run(runs, sector_start, sector_end, abs, None);
        let next_from = usize::try_from(sector_end - base).unwrap_or(usize::MAX);
        if next_from >= a.len() {
            break;
        }
        match differs(next_from) {
            Some(next) => {
                let next_abs = base + next as u64;
                if stop_after_first_run && next_abs - next_abs % SECTOR_SIZE != sector_end {
                    break;
                }
                pos = next;
            }
            None => break,
        }
    }
    true
}

impl Shared<'_> {
    /// The part of chunk `index` inside the range (empty past its end).
    fn chunk_bounds(&self, index: u64) -> Range<u64> {
        let grid_start = index.saturating_mul(self.chunk_size);
        let grid_end = grid_start.saturating_add(self.chunk_size);
        let clamp = |at: u64| at.clamp(self.range.start, self.range.end);
        clamp(grid_start)..clamp(grid_end)
    }

    /// The longest piece of the range a chunk covers: what a buffer needs.
    /// A small disk gets small buffers: a batch of many small pairs would
    /// otherwise clear two whole chunks of memory per worker and pair.
    fn buffer_len(&self) -> u64 {
        self.chunk_size.min(self.range.end - self.range.start)
    }

    fn worker(&self) {
        let mut bufs = Buffers::new(self.buffer_len());
        loop {
            if self.cancelled.load(Ordering::Relaxed) {
                return;
            }
            let index = self.next_chunk.fetch_add(1, Ordering::Relaxed);
            let Range { start, end } = self.chunk_bounds(index);
            if start >= end {
                return;
            }
            if !self.options.all && index > self.first_hit.load(Ordering::Relaxed) {
                return;
            }
            let zero_end = self.both_zero_until(start);
            if zero_end >= end {
                self.skip_zero_chunks(index, zero_end);
                self.done_bytes.fetch_add(end - start, Ordering::Relaxed);
                continue;
            }
            match self.check_chunk(start, end, &mut bufs) {
                Ok(result) => {
                    if !result.runs.is_empty() {
                        self.first_hit.fetch_min(index, Ordering::Relaxed);
                        let n = self
                            .runs_found
                            .fetch_add(result.runs.len() as u64, Ordering::Relaxed)
                            + result.runs.len() as u64;
                        if n >= self.options.max_runs as u64 {
                            self.first_hit.fetch_min(index, Ordering::Relaxed);
                        }
                    }
                    self.results
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((index, result));
                }
                Err(e) => {
                    self.first_hit.fetch_min(index, Ordering::Relaxed);
                    self.errors
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((index, e));
                    if self.options.all {
                        self.cancelled.store(true, Ordering::Relaxed);
                    }
                }
            }
            self.done_bytes.fetch_add(end - start, Ordering::Relaxed);
        }
    }

    /// How far from `start` both sides read as zeros without reading them
    /// (looking at most `ZERO_LOOKAHEAD` ahead). Errors end the run: the chunk
    /// is then checked, and reports them, the ordinary way.
    fn both_zero_until(&self, start: u64) -> u64 {
        let limit = start.saturating_add(ZERO_LOOKAHEAD).min(self.range.end);
        let mut pos = start;
        while pos < limit {
            let Ok((raw_len, true)) = self.raw.zero_status(pos, limit - pos) else {
                break;
            };
            let Ok((test_len, true)) = self.test.zero_status(pos, raw_len) else {
                break;
            };
            pos += test_len;
        }
        pos
    }

    /// Chunk `index` reads as zeros on both sides up to `zero_end`: move the
    /// shared counter past the chunks that lie wholly inside, so sparse disks
    /// cost time for their data, not for their virtual size. Counts the bytes of
    /// the chunks this call skipped (chunks already taken count themselves).
    fn skip_zero_chunks(&self, index: u64, zero_end: u64) {
        let first_after = zero_end / self.chunk_size;
        if first_after <= index + 1 {
            return;
        }
        let previous = self.next_chunk.fetch_max(first_after, Ordering::Relaxed);
        if previous < first_after {
            let skipped_start = self.chunk_bounds(previous).start;
            let skipped_end = self.chunk_bounds(first_after).start;
            self.done_bytes
                .fetch_add(skipped_end - skipped_start, Ordering::Relaxed);
        }
    }

    /// Verify `[start, end)`. Errors on the reference side are returned; errors
    /// on the test side become findings.
    fn check_chunk(&self, start: u64, end: u64, bufs: &mut Buffers) -> Result<ChunkResult> {
        let stop_early = !self.options.all;
        let mut result = ChunkResult {
            runs: Vec::new(),
            bytes_read: 0,
        };
        let mut raw_view = ChunkView::new(start);
        let mut test_view = ChunkView::new(start);
        let mut pos = start;
        while pos < end {
            if stop_early && first_run_closed(&result.runs, pos) {
                break;
            }
            let (raw_len, raw_zero) = self.raw.zero_status(pos, end - pos)?;
            let (test_len, test_zero) = match self.test.zero_status(pos, end - pos) {
                Ok(status) => status,
                Err(e) => {
                    let unit = self.test.driver.granularity().max(SECTOR_SIZE);
                    let bad_end = ((pos / unit + 1) * unit).min(end);
                    self.test_error(&mut result.runs, pos, bad_end, e);
                    pos = bad_end;
                    continue;
                }
            };
            let len = raw_len.min(test_len).min(end - pos);
            let both_zero = raw_zero && test_zero;
            let mapped = both_zero
                || self.compare_mapped(
                    &mut result,
                    (pos, len, end),
                    (raw_zero, test_zero),
                    (&mut raw_view, &mut test_view),
                    bufs,
                );
            if !mapped {
                self.compare_read(&mut result, (pos, len), (raw_zero, test_zero), bufs)?;
            }
            pos += len;
        }
        Ok(result)
    }

    /// Compare `[pos, pos + len)` from mapped views where the drivers offer them
    /// (the test side may still be read into a buffer, e.g. compressed
    /// clusters). Returns false, with nothing recorded, when it could not vouch
    /// for the answer: a side is not mapped, a read failed, or a mapped page
    /// could not be read. The caller then reads with `compare_read`.
    fn compare_mapped(
        &self,
        result: &mut ChunkResult,
        (pos, len, chunk_end): (u64, u64, u64),
        (raw_zero, test_zero): (bool, bool),
        (raw_view, test_view): (&mut ChunkView, &mut ChunkView),
        bufs: &mut Buffers,
    ) -> bool {
        let n = len as usize;
        let stop_early = !self.options.all;
        let mark = result.runs.len();
        let raw_bytes = if raw_zero {
            None
        } else {
            match raw_view.get(&self.raw, chunk_end, pos, n) {
                Some(bytes) => Some(bytes),
                None => return false,
            }
        };
        let mut range_view = None;
        let test_bytes = if test_zero {
            None
        } else {
            let chunk_bytes = test_view.get(&self.test, chunk_end, pos, n);
            if chunk_bytes.is_none() && n >= MIN_RANGE_VIEW && pos + len <= self.test.size() {
                range_view = self.test.driver.read_view(pos, n).ok().flatten();
            }
            match chunk_bytes.or(range_view.as_deref()) {
                Some(bytes) => Some(bytes),
                None => {
                    let buf = bufs.ready(n).test.get_mut(..n).unwrap_or(&mut []);
                    if self.test.read(buf, pos).is_err() {
                        return false;
                    }
                    Some(&*buf)
                }
            }
        };
        match (raw_bytes, test_bytes) {
            (Some(r), Some(t)) => {
                collect_runs(&mut result.runs, pos, r, Some(t), stop_early, self.total)
            }
            (Some(only), None) | (None, Some(only)) => {
                collect_runs(&mut result.runs, pos, only, None, stop_early, self.total)
            }
            (None, None) => false,
        };
        let faulted = raw_view.faulted()
            || test_view.faulted()
            || range_view.as_ref().is_some_and(View::faulted);
        if faulted {
            result.runs.truncate(mark);
            return false;
        }
        result.bytes_read += len;
        true
    }

    /// Compare `[pos, pos + len)` by reading both sides into the buffers.
    fn compare_read(
        &self,
        result: &mut ChunkResult,
        (pos, len): (u64, u64),
        (raw_zero, test_zero): (bool, bool),
        bufs: &mut Buffers,
    ) -> Result<()> {
        let stop_early = !self.options.all;
        let n = len as usize;
        let bufs = bufs.ready(n);
        match (raw_zero, test_zero) {
            (true, true) => {}
            (false, true) => {
                let buf = bufs.raw.get_mut(..n).unwrap_or(&mut []);
                self.raw.read(buf, pos)?;
                result.bytes_read += len;
                collect_runs(&mut result.runs, pos, buf, None, stop_early, self.total);
            }
            (true, false) => {
                let buf = bufs.test.get_mut(..n).unwrap_or(&mut []);
                if let Err(e) = self.test.read(buf, pos) {
                    self.test_read_failed(&mut result.runs, (pos, len), e, bufs, true)?;
                } else {
                    result.bytes_read += len;
                    collect_runs(&mut result.runs, pos, buf, None, stop_early, self.total);
                }
            }
            (false, false) => {
                let rbuf = bufs.raw.get_mut(..n).unwrap_or(&mut []);
                let tbuf = bufs.test.get_mut(..n).unwrap_or(&mut []);
                self.raw.read(rbuf, pos)?;
                if let Err(e) = self.test.read(tbuf, pos) {
                    self.test_read_failed(&mut result.runs, (pos, len), e, bufs, false)?;
                } else {
                    result.bytes_read += len;
                    collect_runs(
                        &mut result.runs,
                        pos,
                        rbuf,
                        Some(tbuf),
                        stop_early,
                        self.total,
                    );
                }
            }
        }
        Ok(())
    }

    fn test_error(&self, runs: &mut Vec<Mismatch>, start: u64, end: u64, e: Error) {
        let sector_start = start - start % SECTOR_SIZE;
        add_run(
            runs,
            sector_start,
            end,
            start,
            Some((e.to_string(), e.errno())),
        );
    }

    /// A test-side read of `[pos, pos+len)` failed. Narrow it down: re-read unit
    /// by unit, so the finding names the bad cluster and the rest is still checked.
    fn test_read_failed(
        &self,
        runs: &mut Vec<Mismatch>,
        (pos, len): (u64, u64),
        first_error: Error,
        bufs: &mut Buffers,
        raw_is_zero: bool,
    ) -> Result<()> {
        let unit = self.test.driver.granularity().max(SECTOR_SIZE);
        let end = pos + len;
        let mut at = pos;
        let mut reported = false;
        let bufs = bufs.ready(usize::try_from(len).unwrap_or(usize::MAX));
        while at < end {
            let piece_end = ((at / unit + 1) * unit).min(end);
            let n = (piece_end - at) as usize;
            let tbuf = bufs.test.get_mut(..n).unwrap_or(&mut []);
            match self.test.read(tbuf, at) {
                Ok(()) => {
                    let rbuf = bufs.raw.get_mut(..n).unwrap_or(&mut []);
                    if raw_is_zero {
                        collect_runs(runs, at, tbuf, None, !self.options.all, self.total);
                    } else {
                        self.raw.read(rbuf, at)?;
                        collect_runs(runs, at, rbuf, Some(tbuf), !self.options.all, self.total);
                    }
                }
                Err(e) => {
                    self.test_error(runs, at, piece_end, e);
                    reported = true;
                }
            }
            if !self.options.all && !runs.is_empty() {
                return Ok(());
            }
            at = piece_end;
        }
        if !reported {
            // The whole read failed but no piece did: report the range once.
            self.test_error(runs, pos, end, first_error);
        }
        Ok(())
    }
}

/// Verify `test` against the reference `raw`, over the whole disk or the range
/// `options.start`/`options.length` asks for (see [`requested_range`]). `tick`
/// is called from the calling thread about ten times a second with the
/// progress so far; returning `false` cancels the run (`Error::Cancelled`).
pub fn verify(
    raw: &dyn BlockDriver,
    test: &dyn BlockDriver,
    options: &VerifyOptions,
    tick: &mut dyn FnMut(Progress) -> bool,
) -> Result<Report> {
    let started = Instant::now();
    let raw_size = raw.size();
    let test_size = test.size();
    let total = raw_size.max(test_size);
    let range = requested_range(options, total)?;
    let range_len = range.end - range.start;
    let chunk_size = (options.chunk_size.max(SECTOR_SIZE) / SECTOR_SIZE) * SECTOR_SIZE;
    let chunk_size = chunk_size.min(256 << 20);
    let first_chunk = range.start / chunk_size;
    let chunks = range.end.div_ceil(chunk_size).saturating_sub(first_chunk);
    let threads = pool::worker_count(options.threads, chunks);

    let mut warnings = Vec::new();
    if raw_size != test_size {
        warnings.push(format!(
            "image sizes differ: {} is {raw_size} bytes, {} is {test_size} bytes; the longer one's tail must read as zeros",
            raw.path().display(),
            test.path().display()
        ));
    }

    let shared = Shared {
        raw: Side { driver: raw },
        test: Side { driver: test },
        options,
        total,
        range: range.clone(),
        chunk_size,
        next_chunk: AtomicU64::new(first_chunk),
        first_hit: AtomicU64::new(u64::MAX),
        cancelled: AtomicBool::new(false),
        done_bytes: AtomicU64::new(0),
        runs_found: AtomicU64::new(0),
        results: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
    };

    let work = || shared.worker();
    if !pool::run_workers(
        threads,
        range_len,
        &shared.done_bytes,
        &shared.cancelled,
        tick,
        &work,
    ) {
        return Err(Error::Cancelled);
    }

    let Found {
        mismatches,
        bytes_read,
        truncated,
    } = shared.found()?;
    let bytes_compared = match mismatches.first() {
        Some(first) if !options.all => first.first_byte - range.start,
        _ => range_len,
    };
    let identical = mismatches.is_empty() && !(options.strict && raw_size != test_size);
    Ok(Report {
        identical,
        raw_size,
        test_size,
        virtual_size: total,
        range,
        bytes_compared,
        bytes_read,
        mismatches,
        truncated,
        warnings,
        elapsed: started.elapsed(),
        block_size: None,
    })
}

/// What the workers found, merged: the mismatching runs in disk order, the
/// bytes read, and whether `max_runs` cut the list.
struct Found {
    mismatches: Vec<Mismatch>,
    bytes_read: u64,
    truncated: bool,
}

impl Shared<'_> {
    /// After the workers: the chunks' runs merged in disk order (the first
    /// run followed to its end without `--all`, the run cap applied with
    /// it), or the reference-side error that comes before the first finding
    /// (any, with `--all`): then nothing can be vouched for.
    fn found(&self) -> Result<Found> {
        let options = self.options;
        let mut results =
            std::mem::take(&mut *self.results.lock().unwrap_or_else(PoisonError::into_inner));
        let mut errors =
            std::mem::take(&mut *self.errors.lock().unwrap_or_else(PoisonError::into_inner));
        results.sort_by_key(|(index, _)| *index);
        errors.sort_by_key(|(index, _)| *index);
        let first_result_hit = results
            .iter()
            .find(|(_, r)| !r.runs.is_empty())
            .map(|(index, _)| *index);
        if let Some((error_index, _)) = errors.first() {
            if options.all || first_result_hit.is_none_or(|hit| *error_index <= hit) {
                let (_, e) = errors.swap_remove(0);
                return Err(e);
            }
        }
        let mut mismatches: Vec<Mismatch> = Vec::new();
        let mut bytes_read = 0;
        for (_, result) in &results {
            bytes_read += result.bytes_read;
            for run in &result.runs {
                add_run(
                    &mut mismatches,
                    run.offset,
                    run.offset + run.length,
                    run.first_byte,
                    run.error.clone().zip(run.errno),
                );
            }
        }
        let mut truncated = false;
        if !options.all {
            mismatches.truncate(1);
            let mut looked_at: Vec<u64> = results
                .iter()
                .map(|(index, _)| *index)
                .chain(errors.iter().map(|(index, _)| *index))
                .collect();
            bytes_read += self.finish_first_run(&mut mismatches, &mut looked_at);
        } else if mismatches.len() > options.max_runs {
            mismatches.truncate(options.max_runs);
            truncated = true;
        } else if self.runs_found.load(Ordering::Relaxed) >= options.max_runs as u64 {
            truncated = true;
        }
        Ok(Found {
            mismatches,
            bytes_read,
            truncated,
        })
    }

    /// Without `--all` the workers stop at the chunk of the first finding, so
    /// the first run may be cut where that chunk ends. Follow it into the
    /// chunks no worker looked at (`looked_at`), one at a time, until it ends:
    /// the run reported is then the whole run whatever the thread timing, and
    /// the same run a verify split into ranges finds. Returns the bytes read.
    fn finish_first_run(&self, mismatches: &mut Vec<Mismatch>, looked_at: &mut Vec<u64>) -> u64 {
        let mut bufs: Option<Buffers> = None;
        let mut bytes_read = 0;
        loop {
            let Some(first) = mismatches.first() else {
                return bytes_read;
            };
            let run_end = first.offset + first.length;
            if run_end >= self.range.end || run_end % self.chunk_size != 0 {
                return bytes_read;
            }
            let index = run_end / self.chunk_size;
            if looked_at.contains(&index) {
                return bytes_read;
            }
            looked_at.push(index);
            let bufs = bufs.get_or_insert_with(|| Buffers::new(self.buffer_len()));
            let chunk = self.chunk_bounds(index);
            // A reference-side error here lies after the first finding, which
            // stands (as it does when a worker meets one there).
            let Ok(result) = self.check_chunk(chunk.start, chunk.end, bufs) else {
                return bytes_read;
            };
            bytes_read += result.bytes_read;
            for run in result.runs {
                add_run(
                    mismatches,
                    run.offset,
                    run.offset + run.length,
                    run.first_byte,
                    run.error.zip(run.errno),
                );
            }
            mismatches.truncate(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_name_the_first_byte() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[700] = 1; // sector 1
        b[1100] = 1; // sector 2
        b[3000] = 1; // sector 5
        let mut runs = Vec::new();
        assert!(collect_runs(&mut runs, 0, &a, Some(&b), false, 4096));
        assert_eq!(
            runs,
            vec![
                Mismatch {
                    offset: 512,
                    length: 1024,
                    first_byte: 700,
                    error: None,
                    errno: None
                },
                Mismatch {
                    offset: 2560,
                    length: 512,
                    first_byte: 3000,
                    error: None,
                    errno: None
                },
            ]
        );
        let mut first = Vec::new();
        collect_runs(&mut first, 0, &a, Some(&b), true, 4096);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].first_byte, 700);
        let mut zeros = Vec::new();
        assert!(collect_runs(&mut zeros, 1 << 20, &b, None, false, 2 << 20));
        assert_eq!(zeros[0].offset, (1 << 20) + 512);
        assert!(!collect_runs(&mut Vec::new(), 0, &a, None, false, 4096));
    }

    #[test]
    fn unaligned_disk_end() {
        let a = vec![0u8; 700];
        let mut b = a.clone();
        b[650] = 9;
        let mut runs = Vec::new();
        collect_runs(&mut runs, 0, &a, Some(&b), false, 700);
        assert_eq!(
            runs,
            vec![Mismatch {
                offset: 512,
                length: 188,
                first_byte: 650,
                error: None,
                errno: None
            }]
        );
    }
}

#[cfg(test)]
mod engine_tests {
    use super::*;
    use crate::driver::raw::Raw;
    use crate::driver::{Extent, Format, Mapping};
    use crate::storage::MemStorage;
    use std::io;
    use std::path::Path;
    use std::sync::Arc;

    /// A driver that fails reads touching `[bad_start, bad_end)` with EIO, like a
    /// disk with a bad spot.
    struct Faulty {
        inner: Raw,
        bad_start: u64,
        bad_end: u64,
    }

    impl BlockDriver for Faulty {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn path(&self) -> &Path {
            Path::new("faulty.img")
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn granularity(&self) -> u64 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let end = offset + buf.len() as u64;
            if offset < self.bad_end && end > self.bad_start {
                return Err(Error::io(
                    self.path(),
                    format!("read at {offset:#x}"),
                    io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            self.inner.read_at(buf, offset)
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
            Ok(Extent {
                offset,
                length: max_len.min(self.size() - offset),
                mapping: Mapping::Data {
                    host_offset: offset,
                },
            })
        }
    }

    fn raw(bytes: Vec<u8>) -> Raw {
        Raw::new(Arc::new(MemStorage::new("raw.img", bytes, false))).unwrap()
    }

    fn options(all: bool) -> VerifyOptions {
        VerifyOptions {
            all,
            chunk_size: 64 << 10,
            threads: 2,
            ..VerifyOptions::default()
        }
    }

    #[test]
    fn test_side_read_errors_are_findings_narrowed_to_the_bad_unit() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let reference = raw(data.clone());
        let mut changed = data.clone();
        changed[900_000] ^= 0xff;
        let test = Faulty {
            inner: raw(changed),
            bad_start: 300_000,
            bad_end: 300_001,
        };
        let report = verify(&reference, &test, &options(true), &mut |_| true).unwrap();
        assert!(!report.identical);
        assert_eq!(report.mismatches.len(), 2, "{:?}", report.mismatches);
        let bad = &report.mismatches[0];
        // The failing read is narrowed to its 4 KiB unit.
        assert_eq!(bad.offset, 300_000 / 4096 * 4096);
        assert_eq!(bad.length, 4096);
        assert!(bad
            .error
            .as_deref()
            .unwrap_or("")
            .contains("Input/output error"));
        // And the rest of the disk was still checked.
        assert_eq!(report.mismatches[1].first_byte, 900_000);
        // Without --all, the first finding is the read error.
        let first = verify(&reference, &test, &options(false), &mut |_| true).unwrap();
        assert_eq!(first.mismatches.len(), 1);
        assert!(first.mismatches[0].error.is_some());
    }

    #[test]
    fn reference_side_read_errors_are_errors() {
        let data = vec![7u8; 1 << 20];
        let reference = Faulty {
            inner: raw(data.clone()),
            bad_start: 500_000,
            bad_end: 500_001,
        };
        let test = raw(data);
        let err = verify(&reference, &test, &options(false), &mut |_| true).unwrap_err();
        assert!(err.to_string().contains("faulty.img"), "{err}");
    }

    #[test]
    fn first_mismatch_is_the_lowest_whatever_the_thread_order() {
        let data = vec![1u8; 4 << 20];
        let reference = raw(data.clone());
        let mut changed = data;
        for at in [3_000_000usize, 70_000, 2_000_000] {
            changed[at] = 0;
        }
        let test = raw(changed);
        for threads in [1, 2, 4, 8] {
            let mut o = options(false);
            o.threads = threads;
            let r = verify(&reference, &test, &o, &mut |_| true).unwrap();
            assert_eq!(r.mismatches.len(), 1);
            assert_eq!(r.mismatches[0].first_byte, 70_000);
        }
    }

    #[test]
    fn the_first_run_is_whole_though_it_crosses_chunks_no_worker_took() {
        let data = vec![1u8; 1 << 20];
        let reference = raw(data.clone());
        let mut changed = data;
        // Sectors from the last of chunk 2 (64 KiB chunks) into chunk 4.
        changed[(3 << 16) - 512..(4 << 16) + 1024].fill(0);
        changed[900_000] = 0;
        let test = raw(changed);
        for threads in [1, 2, 4] {
            let mut o = options(false);
            o.threads = threads;
            let r = verify(&reference, &test, &o, &mut |_| true).unwrap();
            assert_eq!(r.mismatches.len(), 1);
            assert_eq!(r.mismatches[0].offset, (3 << 16) - 512);
            assert_eq!(
                r.mismatches[0].length,
                (1 << 16) + 1536,
                "threads={threads}"
            );
        }
    }

    #[test]
    fn cancelling_from_the_tick_stops_the_run() {
        let reference = raw(vec![0u8; 1 << 20]);
        let test = raw(vec![0u8; 1 << 20]);
        let err = verify(&reference, &test, &options(true), &mut |_| false).unwrap_err();
        assert!(matches!(err, Error::Cancelled));
    }
}
