//! `exercise`: a seeded, reproducible random workload run through the mirrored
//! device, the way a guest OS install drives a disk, until a driver corrupts a
//! sector. Every read is compared by [`Blkverify`]; at the end the whole device
//! is verified, so writes that were never read back are checked too.
//!
//! With a queue depth above 1, worker threads keep that many ops in flight. The
//! dispatcher issues ops in number order and holds back any op that overlaps one
//! still in flight, so every pair of overlapping ops runs in number order: the
//! raw reference stays well defined and each read's expected bytes are the same
//! whatever the timing. (Overlap is judged on ranges widened to the test side's
//! request granularity for NBD exports, whose client read-modify-writes partial
//! blocks; to whole sectors otherwise.)
//!
//! The op log (`--log`) is written as ops are issued, so it survives a crash or a
//! hang of the driver under test; see [`workload`] for its format.

pub mod workload;

pub use workload::{
    fill_pattern, log_header, parse_log, pattern_key, pattern_word, Log, Mix, Op, OpKind, SizeMix,
    Workload, LOG_MAGIC,
};

use crate::blkverify::Blkverify;
use crate::driver::{BlockDriver, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::verify::{self, VerifyOptions};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a generated run lasts.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// This many ops.
    Ops(u64),
    /// Until this much time has passed.
    Duration(Duration),
}

/// Where the ops come from.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Drawn from a seeded workload.
    Generated {
        /// The workload.
        workload: Workload,
        /// When to stop.
        limit: Limit,
    },
    /// Replayed from a log, in its order.
    Replay {
        /// The seed the write patterns derive from.
        seed: u64,
        /// The ops.
        ops: Vec<Op>,
    },
}

impl Plan {
    /// The seed.
    pub fn seed(&self) -> u64 {
        match self {
            Plan::Generated { workload, .. } => workload.seed,
            Plan::Replay { seed, .. } => *seed,
        }
    }

    /// Whether any op may change the device (then both sides must be writable).
    pub fn writes(&self) -> bool {
        match self {
            Plan::Generated { workload, .. } => workload.mix.writes(),
            Plan::Replay { ops, .. } => ops.iter().any(Op::writes),
        }
    }

    /// The `position`-th op issued, if the plan has one.
    fn op(&self, position: u64) -> Option<Op> {
        match self {
            Plan::Generated {
                workload,
                limit: Limit::Ops(n),
            } => (position < *n).then(|| workload.op(position)),
            Plan::Generated { workload, .. } => Some(workload.op(position)),
            Plan::Replay { ops, .. } => ops.get(usize::try_from(position).ok()?).copied(),
        }
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct ExerciseOptions {
    /// Ops in flight at once (1 to 256).
    pub queue_depth: usize,
    /// Verify the whole device after the last op.
    pub verify_at_end: bool,
    /// Worker threads for the final verify (0: one per core).
    pub verify_threads: usize,
}

impl Default for ExerciseOptions {
    fn default() -> Self {
        ExerciseOptions {
            queue_depth: 1,
            verify_at_end: true,
            verify_threads: 0,
        }
    }
}

/// A difference between the two sides.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The op that found it; `None` for the final flush or verify.
    pub op: Option<Op>,
    /// Where it was found: "op", "final flush" or "final verify".
    pub phase: &'static str,
    /// "contents" (different bytes) or "return_value" (different results).
    pub kind: &'static str,
    /// The one-line message (blkverify's, for op findings).
    pub message: String,
    /// The first differing sector (contents findings).
    pub sector: Option<u64>,
    /// The first differing byte (contents findings).
    pub first_byte: Option<u64>,
    /// The test side's result: 0 or a negative errno (return-value findings).
    pub test_ret: Option<i32>,
    /// The raw side's result.
    pub raw_ret: Option<i32>,
    /// The test side's error text, if it failed.
    pub test_error: Option<String>,
    /// The raw side's error text, if it failed.
    pub raw_error: Option<String>,
    /// The first differing sector as the test side returned it.
    pub test_bytes: Vec<u8>,
    /// The same sector on the raw reference.
    pub raw_bytes: Vec<u8>,
    /// The last op before the finding that changed the first differing byte.
    pub last_change: Option<Op>,
    /// What the test side's bytes are, when we can tell: an earlier write's
    /// data (stale), or zeros.
    pub diagnosis: Option<String>,
}

/// What a run did and found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Ops completed.
    pub ops: u64,
    /// Ops issued (a generated run's ops are numbers `0..issued`).
    pub issued: u64,
    /// Wall-clock time of the ops (the final verify excluded).
    pub elapsed: Duration,
    /// Wall-clock time of the final flush and verify.
    pub verify_elapsed: Duration,
    /// Guest bytes read by read ops.
    pub bytes_read: u64,
    /// Guest bytes written by write ops (zeroing and discard not counted).
    pub bytes_written: u64,
    /// Findings, by op number (the final verify's last).
    pub findings: Vec<Finding>,
    /// The whole device was verified at the end.
    pub verified: bool,
}

/// An op log being written.
pub struct OpLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl OpLog {
    /// Create (or truncate) the log file.
    pub fn create(path: &Path) -> Result<OpLog> {
        let file = File::create(path).map_err(|e| Error::io(path, "create the op log", e))?;
        Ok(OpLog {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 16, file),
        })
    }

    fn line(&mut self, text: &str) -> Result<()> {
        writeln!(self.out, "{text}").map_err(|e| Error::io(&self.path, "write the op log", e))
    }

    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io(&self.path, "write the op log", e))
    }
}

/// Counters the workers share.
#[derive(Default)]
struct Stats {
    done: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// The result of one op: fine, a finding, or an error that ends the run.
enum Outcome1 {
    Ok,
    Finding(Box<Finding>),
    Error(Error),
}

/// The dispatcher and workers' shared state.
struct Queue {
    pending: VecDeque<Op>,
    in_flight: Vec<(u64, u64, u64)>,
    closed: bool,
    stop: bool,
    findings: Vec<Finding>,
    error: Option<Error>,
}

/// Run `plan` on `device`. `log`, if given, gets the header and every op as it
/// is issued, and the findings as comments. `tick(ops_done)` is called from the
/// calling thread about ten times a second; returning `false` stops the run
/// (`Error::Cancelled`, after the ops in flight complete).
pub fn run(
    device: &Blkverify,
    plan: &Plan,
    options: &ExerciseOptions,
    mut log: Option<&mut OpLog>,
    tick: &mut dyn FnMut(u64) -> bool,
) -> Result<Outcome> {
    let size = device.size();
    let seed = plan.seed();
    let queue_depth = options.queue_depth.clamp(1, 256);
    if let Plan::Replay { ops, .. } = plan {
        if let Some(op) = ops.iter().find(|op| op.offset + op.length > size) {
            return Err(Error::InvalidArgument(format!(
                "op {op} ends past the end of the device ({size} bytes)"
            )));
        }
    }
    let unit = if device.test().format_name() == "nbd" {
        device.test().granularity().max(SECTOR_SIZE)
    } else {
        SECTOR_SIZE
    };
    if let Some(log) = log.as_deref_mut() {
        let extra = match plan {
            Plan::Generated { workload, .. } => {
                format!("# mix {}\n# size-mix {}\n", workload.mix, workload.size_mix)
            }
            Plan::Replay { .. } => "# replayed\n".to_string(),
        };
        log.line(
            log_header(
                seed,
                size,
                &device.path().display().to_string(),
                queue_depth,
                &extra,
            )
            .trim_end(),
        )?;
    }

    let stats = Stats::default();
    let started = Instant::now();
    let deadline = match plan {
        Plan::Generated {
            limit: Limit::Duration(d),
            ..
        } => Some(started + *d),
        _ => None,
    };
    let mut last_tick = started;
    let mut cancelled = false;
    let mut issued = 0u64;
    let mut findings = Vec::new();
    let mut error = None;

    // Returns false when the run must stop (cancelled, or out of time).
    let mut keep_going = |stats: &Stats, cancelled: &mut bool| -> bool {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return false;
        }
        if now.duration_since(last_tick) >= Duration::from_millis(100) {
            last_tick = now;
            if !tick(stats.done.load(Ordering::Relaxed)) {
                *cancelled = true;
                return false;
            }
        }
        true
    };

    if queue_depth == 1 {
        let mut buf = Vec::new();
        while let Some(op) = plan.op(issued) {
            if !keep_going(&stats, &mut cancelled) {
                break;
            }
            if let Some(log) = log.as_deref_mut() {
                log.line(&op.log_line())?;
            }
            issued += 1;
            match execute(device, seed, &op, &mut buf, &stats) {
                Outcome1::Ok => {}
                Outcome1::Finding(f) => {
                    findings.push(*f);
                    break;
                }
                Outcome1::Error(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
    } else {
        let queue = Mutex::new(Queue {
            pending: VecDeque::new(),
            in_flight: Vec::new(),
            closed: false,
            stop: false,
            findings: Vec::new(),
            error: None,
        });
        let wake = Condvar::new();
        let lock = || queue.lock().unwrap_or_else(PoisonError::into_inner);
        let widen = |op: &Op| {
            op.range()
                .map(|(start, end)| (start / unit * unit, end.div_ceil(unit) * unit))
        };
        let dispatched: Result<()> = std::thread::scope(|scope| {
            for _ in 0..queue_depth {
                scope.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        let op = {
                            let mut q = lock();
                            loop {
                                if let Some(op) = q.pending.pop_front() {
                                    break op;
                                }
                                if q.closed {
                                    return;
                                }
                                q = wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                            }
                        };
                        let result = execute(device, seed, &op, &mut buf, &stats);
                        let mut q = lock();
                        q.in_flight.retain(|(number, _, _)| *number != op.number);
                        match result {
                            Outcome1::Ok => {}
                            Outcome1::Finding(f) => {
                                q.findings.push(*f);
                                q.stop = true;
                            }
                            Outcome1::Error(e) => {
                                q.error.get_or_insert(e);
                                q.stop = true;
                            }
                        }
                        wake.notify_all();
                    }
                });
            }
            let mut outcome = Ok(());
            'ops: while let Some(op) = plan.op(issued) {
                if !keep_going(&stats, &mut cancelled) {
                    break;
                }
                let range = widen(&op);
                let mut q = lock();
                loop {
                    if q.stop {
                        break 'ops;
                    }
                    let overlaps = range.is_some_and(|(start, end)| {
                        q.in_flight.iter().any(|(_, s, e)| *s < end && start < *e)
                    });
                    if q.in_flight.len() < queue_depth && !overlaps {
                        break;
                    }
                    let (guard, _) = wake
                        .wait_timeout(q, Duration::from_millis(50))
                        .unwrap_or_else(PoisonError::into_inner);
                    q = guard;
                    if !q.in_flight.is_empty() && q.in_flight.len() >= queue_depth {
                        drop(q);
                        if !keep_going(&stats, &mut cancelled) {
                            break 'ops;
                        }
                        q = lock();
                    }
                }
                if let Some(log) = log.as_deref_mut() {
                    if let Err(e) = log.line(&op.log_line()) {
                        outcome = Err(e);
                        break;
                    }
                }
                let (start, end) = range.unwrap_or((0, 0));
                q.in_flight.push((op.number, start, end));
                q.pending.push_back(op);
                issued += 1;
                wake.notify_all();
            }
            let mut q = lock();
            q.closed = true;
            wake.notify_all();
            drop(q);
            outcome
        });
        let q = queue.into_inner().unwrap_or_else(PoisonError::into_inner);
        dispatched?;
        findings = q.findings;
        error = q.error;
        findings.sort_by_key(|f| f.op.map_or(u64::MAX, |op| op.number));
    }
    let elapsed = started.elapsed();

    let finish_log = |log: Option<&mut OpLog>, findings: &[Finding]| -> Result<()> {
        if let Some(log) = log {
            for f in findings {
                log.line(&format!("# finding: {}", f.message))?;
            }
            log.flush()?;
        }
        Ok(())
    };
    if let Some(e) = error {
        finish_log(log, &findings)?;
        return Err(e);
    }
    if cancelled {
        finish_log(log, &findings)?;
        return Err(Error::Cancelled);
    }

    let verify_started = Instant::now();
    let mut verified = false;
    if findings.is_empty() && options.verify_at_end {
        match device.flush() {
            Ok(()) => {}
            Err(e) => match finding_of(device, None, "final flush", e) {
                Outcome1::Finding(f) => findings.push(*f),
                Outcome1::Error(e) => return Err(e),
                Outcome1::Ok => {}
            },
        }
        if findings.is_empty() {
            let verify_options = VerifyOptions {
                threads: options.verify_threads,
                ..VerifyOptions::default()
            };
            let mut verify_tick = |_: verify::Progress| tick(stats.done.load(Ordering::Relaxed));
            let report = verify::verify(
                device.raw(),
                device.test(),
                &verify_options,
                &mut verify_tick,
            )?;
            verified = true;
            if let Some(m) = report.mismatches.first() {
                findings.push(verify_finding(device, m));
            }
        }
    }
    for f in &mut findings {
        explain(plan, issued, f);
    }
    finish_log(log, &findings)?;
    Ok(Outcome {
        seed,
        ops: stats.done.load(Ordering::Relaxed),
        issued,
        elapsed,
        verify_elapsed: verify_started.elapsed(),
        bytes_read: stats.bytes_read.load(Ordering::Relaxed),
        bytes_written: stats.bytes_written.load(Ordering::Relaxed),
        findings,
        verified,
    })
}

/// Run one op through the device.
fn execute(device: &Blkverify, seed: u64, op: &Op, buf: &mut Vec<u8>, stats: &Stats) -> Outcome1 {
    let length = usize::try_from(op.length).unwrap_or(usize::MAX);
    if matches!(op.kind, OpKind::Read | OpKind::Write) && buf.len() < length {
        buf.resize(length, 0);
    }
    let data = buf.get_mut(..length).unwrap_or(&mut []);
    let result = match op.kind {
        OpKind::Read => device.read_at(data, op.offset),
        OpKind::Write => {
            fill_pattern(data, seed, op.number, op.offset);
            device.write_at(data, op.offset)
        }
        OpKind::Zero { unmap } => device.write_zeroes(op.offset, op.length, unmap),
        OpKind::Discard => device.discard(op.offset, op.length),
        OpKind::Flush => device.flush(),
    };
    stats.done.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(()) => {
            match op.kind {
                OpKind::Read => stats.bytes_read.fetch_add(op.length, Ordering::Relaxed),
                OpKind::Write => stats.bytes_written.fetch_add(op.length, Ordering::Relaxed),
                _ => 0,
            };
            Outcome1::Ok
        }
        Err(e) => {
            // A read's buffer holds what the test side returned: keep it, a
            // second read may not return the same (a transient fault).
            let seen = (op.kind == OpKind::Read).then(|| buf.get(..length).unwrap_or(&[]));
            finding_of_with(device, Some(*op), "op", e, seen)
        }
    }
}

fn finding_of(device: &Blkverify, op: Option<Op>, phase: &'static str, e: Error) -> Outcome1 {
    finding_of_with(device, op, phase, e, None)
}

/// Turn an op's error into a finding (the two sides differ), or into an error
/// that ends the run (both sides failed alike: the environment, not the driver).
fn finding_of_with(
    device: &Blkverify,
    op: Option<Op>,
    phase: &'static str,
    e: Error,
    seen: Option<&[u8]>,
) -> Outcome1 {
    let message = e.to_string();
    match e {
        Error::Mismatch { first_byte, .. } => {
            let sector = first_byte / SECTOR_SIZE;
            let (test_bytes, raw_bytes) = sector_bytes(device, sector, op, seen);
            Outcome1::Finding(Box::new(Finding {
                op,
                phase,
                kind: "contents",
                message,
                sector: Some(sector),
                first_byte: Some(first_byte),
                test_ret: None,
                raw_ret: None,
                test_error: None,
                raw_error: None,
                test_bytes,
                raw_bytes,
                last_change: None,
                diagnosis: None,
            }))
        }
        Error::ReturnMismatch {
            test_ret,
            raw_ret,
            test_error,
            raw_error,
            ..
        } => Outcome1::Finding(Box::new(Finding {
            op,
            phase,
            kind: "return_value",
            message,
            sector: None,
            first_byte: None,
            test_ret: Some(test_ret),
            raw_ret: Some(raw_ret),
            test_error,
            raw_error,
            test_bytes: Vec::new(),
            raw_bytes: Vec::new(),
            last_change: None,
            diagnosis: None,
        })),
        Error::Io {
            path,
            context,
            source,
        } => Outcome1::Error(Error::Io {
            path,
            context: match op {
                Some(op) => format!("exercise op {op}: {context}"),
                None => format!("exercise {phase}: {context}"),
            },
            source,
        }),
        other => Outcome1::Error(other),
    }
}

/// Both sides' bytes of one sector (short at the end of a side). `seen` is
/// the test side's data for a read op's whole request, used instead of a
/// second read.
fn sector_bytes(
    device: &Blkverify,
    sector: u64,
    op: Option<Op>,
    seen: Option<&[u8]>,
) -> (Vec<u8>, Vec<u8>) {
    let offset = sector * SECTOR_SIZE;
    let read = |side: &dyn BlockDriver| -> Vec<u8> {
        let n = side.size().saturating_sub(offset).min(SECTOR_SIZE) as usize;
        let mut buf = vec![0u8; n];
        match side.read_at(&mut buf, offset) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    };
    let test = match (op, seen) {
        (Some(op), Some(seen)) => {
            // The part of the sector the read covered, as the test side gave it.
            let start = offset.max(op.offset);
            let end = (offset + SECTOR_SIZE).min(op.offset + op.length);
            let mut bytes = read(device.test());
            let from = (start - op.offset) as usize;
            let into = (start - offset) as usize;
            let n = end.saturating_sub(start) as usize;
            if let (Some(dst), Some(src)) =
                (bytes.get_mut(into..into + n), seen.get(from..from + n))
            {
                dst.copy_from_slice(src);
            }
            bytes
        }
        _ => read(device.test()),
    };
    (test, read(device.raw()))
}

fn verify_finding(device: &Blkverify, m: &verify::Mismatch) -> Finding {
    let sector = m.first_byte / SECTOR_SIZE;
    let (test_bytes, raw_bytes) = sector_bytes(device, sector, None, None);
    let message = match &m.error {
        Some(e) => {
            format!("blkverify: final verify: read error in sector {sector} of the test side: {e}")
        }
        None => format!("blkverify: final verify: contents mismatch in sector {sector}"),
    };
    Finding {
        op: None,
        phase: "final verify",
        kind: if m.error.is_some() {
            "return_value"
        } else {
            "contents"
        },
        message,
        sector: Some(sector),
        first_byte: Some(m.first_byte),
        test_ret: None,
        raw_ret: None,
        test_error: m.error.clone(),
        raw_error: None,
        test_bytes,
        raw_bytes,
        last_change: None,
        diagnosis: None,
    }
}

/// How far back `explain` looks for the op that last changed a byte.
const EXPLAIN_LOOK_BACK: u64 = 1_000_000;

/// Name the last op before the finding that changed its first differing byte,
/// and say what the test side's bytes are when we can tell: zeros, or the data
/// an earlier write put there (a stale or lost write).
fn explain(plan: &Plan, issued: u64, f: &mut Finding) {
    let Some(first_byte) = f.first_byte else {
        return;
    };
    let sector = first_byte / SECTOR_SIZE;
    let sector_offset = sector * SECTOR_SIZE;
    // Ops issued before the finding's op, newest first.
    let before = match f.op {
        Some(op) => (0..issued)
            .find(|&p| plan.op(p).is_some_and(|o| o.number == op.number))
            .unwrap_or(issued),
        None => issued,
    };
    let covers = |op: &Op, at: u64| op.writes() && op.offset <= at && at < op.offset + op.length;
    let history = (before.saturating_sub(EXPLAIN_LOOK_BACK)..before)
        .rev()
        .filter_map(|p| plan.op(p));
    let mut last_change = None;
    let mut diagnosis = None;
    let test = &f.test_bytes;
    if !test.is_empty() && test.iter().all(|&b| b == 0) {
        diagnosis = Some("the test side reads zeros here".to_string());
    }
    for op in history.filter(|op| covers(op, first_byte)) {
        if last_change.is_none() {
            last_change = Some(op);
        }
        if diagnosis.is_some() {
            break;
        }
        if op.kind == OpKind::Write && !test.is_empty() {
            // Does the differing byte hold this write's data on the test side?
            let mut expect = vec![0u8; test.len()];
            fill_pattern(&mut expect, plan.seed(), op.number, sector_offset);
            let lo = (first_byte - sector_offset) as usize;
            let hi = ((op.offset + op.length).min(sector_offset + test.len() as u64)
                - sector_offset) as usize;
            if lo < hi && expect.get(lo..hi) == test.get(lo..hi) {
                let newest = last_change.is_some_and(|l: Op| l.number == op.number);
                diagnosis = Some(if newest {
                    format!("the test side holds op {}'s data here", op.number)
                } else {
                    format!(
                        "the test side holds the data of op {} ({}), an older write: stale",
                        op.number, op
                    )
                });
                break;
            }
        }
    }
    if diagnosis.is_none() {
        diagnosis = misplaced(plan, before, f);
    }
    f.last_change = last_change;
    if f.diagnosis.is_none() {
        f.diagnosis = diagnosis;
    }
}

/// Write ops `misplaced` searches, newest first.
const MISPLACED_LOOK_BACK: usize = 2000;

/// Whether the test side's bytes at the first difference are data an earlier
/// write meant for another offset: a misplaced write. Every aligned 8-byte word
/// of every write is unique, so one word names the op and the offset it was
/// meant for.
fn misplaced(plan: &Plan, before: u64, f: &Finding) -> Option<String> {
    let first_byte = f.first_byte?;
    let sector_offset = first_byte / SECTOR_SIZE * SECTOR_SIZE;
    let at = usize::try_from(first_byte.div_ceil(8) * 8 - sector_offset).ok()?;
    let word: [u8; 8] = f.test_bytes.get(at..at + 8)?.try_into().ok()?;
    let found_at = sector_offset + at as u64;
    let writes = (0..before)
        .rev()
        .filter_map(|p| plan.op(p))
        .filter(|op| op.kind == OpKind::Write)
        .take(MISPLACED_LOOK_BACK);
    for op in writes {
        let key = pattern_key(plan.seed(), op.number);
        let first_word = op.offset.div_ceil(8);
        let end_word = (op.offset + op.length) / 8;
        if let Some(w) = (first_word..end_word).find(|&w| pattern_word(key, w) == word) {
            let meant = w * 8;
            if meant == found_at {
                return None; // in place: the stale-data check above covers it
            }
            let delta = found_at as i128 - meant as i128;
            let sign = if delta < 0 { "-" } else { "+" };
            return Some(format!(
                "the test side holds data op {} ({op}) wrote for offset {meant:#x}: \
                 misplaced by {sign}{:#x} bytes",
                op.number,
                delta.unsigned_abs()
            ));
        }
    }
    None
}

/// A short hexdump diff of one sector from the row holding `first_byte` on:
/// the 16-byte rows that differ (at most `max_rows`), each as a `test` line and
/// a `raw` line with `^^` under the differing bytes.
pub fn hexdump_diff(
    sector_offset: u64,
    first_byte: u64,
    test: &[u8],
    raw: &[u8],
    max_rows: usize,
) -> Vec<String> {
    let mut lines = Vec::new();
    let rows = test.len().max(raw.len()).div_ceil(16);
    let first_row = usize::try_from(first_byte.saturating_sub(sector_offset) / 16).unwrap_or(0);
    let mut shown = 0;
    let mut differing = 0;
    for row in first_row..rows {
        let at = row * 16;
        let t = test.get(at..(at + 16).min(test.len())).unwrap_or(&[]);
        let r = raw.get(at..(at + 16).min(raw.len())).unwrap_or(&[]);
        if t == r {
            continue;
        }
        differing += 1;
        if shown == max_rows {
            continue;
        }
        shown += 1;
        let hex = |b: &[u8]| {
            (0..16)
                .map(|i| b.get(i).map_or("  ".to_string(), |x| format!("{x:02x}")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let marks = (0..16)
            .map(|i| if t.get(i) == r.get(i) { "  " } else { "^^" })
            .collect::<Vec<_>>()
            .join(" ");
        let offset = sector_offset + at as u64;
        lines.push(format!("{offset:#010x}  test  {}", hex(t)));
        lines.push(format!("{offset:#010x}  raw   {}", hex(r)));
        lines.push(format!("{:10}        {}", "", marks.trim_end()));
    }
    if differing > shown {
        lines.push(format!(
            "({} more differing rows in this sector)",
            differing - shown
        ));
    }
    lines
}

#[cfg(test)]
mod tests;
