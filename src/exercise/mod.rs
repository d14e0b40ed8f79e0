//! `exercise`: a seeded, reproducible random workload run through the mirrored
//! device, the way a guest OS install drives a disk, until a driver corrupts a
//! sector. Every read is compared by [`Blkverify`]; at the end the whole device
//! is verified, so writes that were never read back are checked too.
//!
//! With a queue depth above 1, worker threads keep that many ops in flight. The
//! workers take ops in number order and admit each to the device, whose rule
//! ([`crate::blkverify::order`]) makes an op that overlaps one still in flight
//! wait for it unless both only read, so every pair of overlapping ops of
//! which one writes runs in number order: the raw reference stays well
//! defined and each read's expected bytes are the same whatever the timing.
//!
//! The op log (`--log`) is written as ops are issued, so it survives a crash or a
//! hang of the driver under test; [`crate::record`] owns its format.
//!
//! **Replay** is the same engine on a record's ops instead of drawn ones: an
//! op log (writes' bytes from the seed) or a serve trace (writes' bytes from
//! the trace, and every request a client can make, block status included,
//! checked as serve checks it). That is why exercise sits above serve in the
//! layers: a trace's requests mean what serve made them mean. A replay of a
//! trace at queue depth 1 runs its requests in the order serve applied them,
//! so it repeats the live run and meets its finding at the same request.
//!
//! The parts: [`workload`] draws the ops, `dispatch` runs them, `finding`
//! explains a difference; this module checks what the caller asked for
//! ([`Request`]) and runs it ([`run`]).

mod dispatch;
mod finding;
pub mod workload;

pub use crate::compare::hexdump_diff;
pub use crate::record::{
    check_queue_depth, parse_log, Log, OpLog, Record, LOG_MAGIC, MAX_QUEUE_DEPTH,
};
pub use finding::Finding;
pub use workload::{
    fill_pattern, pattern_key, pattern_word, Mix, Op, OpKind, SizeMix, Workload, MAX_REQUEST,
};

use crate::blkverify::{parse_spec, Blkverify, Spec};
use crate::driver::{BlockDriver, OpenOptions, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::verify::{self, VerifyOptions};
use dispatch::{Dispatcher, Pacer, Stats};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The ops a run makes when neither an op count nor a duration is given.
pub const DEFAULT_OPS: u64 = 10_000;

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
    /// Replayed from a record (an op log or a trace), in its order.
    Replay {
        /// The record.
        record: Arc<Record>,
        /// The positions of the ops to run, in order (shrinking runs
        /// subsets); `None` runs them all.
        positions: Option<Arc<[usize]>>,
    },
}

impl Plan {
    /// Replay every op of `record`.
    pub fn replay(record: Record) -> Plan {
        Plan::Replay {
            record: Arc::new(record),
            positions: None,
        }
    }

    /// The seed (a trace's writes carry their bytes: 0).
    pub fn seed(&self) -> u64 {
        match self {
            Plan::Generated { workload, .. } => workload.seed,
            Plan::Replay { record, .. } => match record.as_ref() {
                Record::Log(log) => log.seed,
                Record::Trace(_) => 0,
            },
        }
    }

    /// The record's position of the `position`-th op issued (replays).
    fn index(&self, position: u64) -> Option<usize> {
        let position = usize::try_from(position).ok()?;
        match self {
            Plan::Generated { .. } => None,
            Plan::Replay {
                positions: Some(p), ..
            } => p.get(position).copied(),
            Plan::Replay { .. } => Some(position),
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
            Plan::Replay { record, .. } => record.ops().get(self.index(position)?).copied(),
        }
    }

    /// How many ops the plan holds, if it is bounded.
    fn len(&self) -> Option<u64> {
        match self {
            Plan::Generated {
                limit: Limit::Ops(n),
                ..
            } => Some(*n),
            Plan::Generated { .. } => None,
            Plan::Replay {
                positions: Some(p), ..
            } => Some(p.len() as u64),
            Plan::Replay { record, .. } => Some(record.ops().len() as u64),
        }
    }

    /// The connection that sent the `position`-th op (traces).
    fn connection(&self, position: u64) -> Option<u64> {
        match self {
            Plan::Replay { record, .. } => record.connection(self.index(position)?),
            Plan::Generated { .. } => None,
        }
    }

    /// Fill `buf` with the bytes of write `op`, the `position`-th op issued:
    /// its pattern, or the trace's data. False if the trace holds none.
    fn fill(&self, position: u64, op: &Op, buf: &mut [u8]) -> bool {
        match self {
            Plan::Replay { record, .. } => match record.as_ref() {
                Record::Trace(trace) => self
                    .index(position)
                    .is_some_and(|index| trace.fill(index, buf)),
                Record::Log(log) => {
                    fill_pattern(buf, log.seed, op.number, op.offset);
                    true
                }
            },
            Plan::Generated { workload, .. } => {
                fill_pattern(buf, workload.seed, op.number, op.offset);
                true
            }
        }
    }

    /// Whether writes' bytes are patterns (derived from the seed), which a
    /// finding can trace back to the op that wrote them.
    fn patterned(&self) -> bool {
        !matches!(self, Plan::Replay { record, .. } if matches!(record.as_ref(), Record::Trace(_)))
    }
}

/// What is checked after the last op, when no op found anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalCheck {
    /// Nothing.
    Skip,
    /// Both sides flushed, then the whole device verified.
    Whole,
    /// Both sides flushed, then every range the ops wrote or read read back
    /// and compared: what shrinking needs, at the cost of the ops' own bytes.
    Touched,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct ExerciseOptions {
    /// Ops in flight at once (1 to [`MAX_QUEUE_DEPTH`]).
    pub queue_depth: usize,
    /// What is checked after the last op.
    pub final_check: FinalCheck,
    /// Worker threads for the final verify (0: one per core).
    pub verify_threads: usize,
}

impl Default for ExerciseOptions {
    fn default() -> Self {
        ExerciseOptions {
            queue_depth: 1,
            final_check: FinalCheck::Whole,
            verify_threads: 0,
        }
    }
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

/// An exercise as a caller asks for it, unchecked. [`Exercise::prepare`]
/// checks it, reads the replayed log and opens the device.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The mirrored device, `blkverify:RAW:TEST` (default: the replayed log's).
    pub spec: Option<String>,
    /// Run this many ops (default [`DEFAULT_OPS`]).
    pub ops: Option<u64>,
    /// Or run for this many seconds.
    pub duration: Option<f64>,
    /// The seed (default: random).
    pub seed: Option<u64>,
    /// Op weights, as [`Mix::parse`] reads them (default [`Mix::default`]).
    pub mix: Option<String>,
    /// Request sizes, as [`SizeMix::parse`] reads them.
    pub size_mix: Option<String>,
    /// Ops in flight (default: the replayed log's, else 1).
    pub queue_depth: Option<u64>,
    /// Replay the ops of this record (an op log or a trace) instead of
    /// drawing them.
    pub replay: Option<PathBuf>,
    /// Or of this record, already read (shrinking reads it once).
    pub record: Option<Arc<Record>>,
    /// Replay only the ops at these positions of the record (growing).
    pub positions: Option<Vec<usize>>,
    /// Write the op log here.
    pub log: Option<PathBuf>,
    /// What to check after the last op (default: verify the whole device).
    pub final_check: Option<FinalCheck>,
}

/// An exercise ready to run: checked, its device open, its plan made, its
/// op log created.
pub struct Exercise {
    /// The device's spec.
    pub spec: String,
    /// The mirrored device.
    pub device: Blkverify,
    /// Where the ops come from.
    pub plan: Plan,
    /// How to run.
    pub options: ExerciseOptions,
    log: Option<OpLog>,
}

impl Exercise {
    /// Check `request` and get everything ready. The test side opens with
    /// `open` (format, backing policy, timeout), writable when any op writes.
    pub fn prepare(request: Request, open: &OpenOptions) -> Result<Exercise> {
        let invalid = |m: &str| Error::InvalidArgument(m.to_string());
        let limit = match (request.ops, request.duration) {
            (Some(_), Some(_)) => return Err(invalid("give ops or duration, not both")),
            (_, Some(d)) if !(d.is_finite() && d > 0.0 && d < 1e9) => {
                return Err(invalid(&format!(
                    "duration {d} is not a positive number of seconds"
                )))
            }
            (_, Some(d)) => Limit::Duration(Duration::from_secs_f64(d)),
            (Some(n), None) => Limit::Ops(n),
            (None, None) => Limit::Ops(DEFAULT_OPS),
        };
        let queue_depth = request
            .queue_depth
            .map(check_queue_depth)
            .transpose()
            .map_err(Error::InvalidArgument)?;
        let drawing = request.ops.is_some()
            || request.duration.is_some()
            || request.seed.is_some()
            || request.mix.is_some()
            || request.size_mix.is_some();
        let replayed = match (request.record, &request.replay) {
            (Some(_), _) | (_, Some(_)) if drawing => {
                return Err(invalid(
                    "a replay runs the record's ops: ops, duration, seed, mix and size_mix do not apply",
                ))
            }
            (Some(record), _) => Some(record),
            (None, Some(path)) => Some(Arc::new(Record::read(path)?)),
            (None, None) => None,
        };
        if let Some(positions) = &request.positions {
            let count = replayed.as_ref().map_or(0, |r| r.ops().len());
            let increasing = positions.windows(2).all(|w| w[0] < w[1]);
            if !increasing || positions.last().is_some_and(|&p| p >= count) {
                return Err(invalid(&format!(
                    "positions must grow and stay below the record's {count} ops"
                )));
            }
        }
        let trace = replayed.as_ref().and_then(|r| match r.as_ref() {
            Record::Trace(t) => Some(t),
            Record::Log(_) => None,
        });
        if let (Some(trace), Some(_)) = (trace, &request.log) {
            return Err(invalid(&format!(
                "{}: a trace's writes carry their data, which an op log cannot hold: \
                 no log of a trace's replay",
                trace.path.display()
            )));
        }
        let spec = match (request.spec, replayed.as_ref().and_then(|r| r.spec())) {
            (Some(spec), _) | (None, Some(spec)) => spec,
            (None, None) => {
                return Err(invalid(
                    "exercise needs a blkverify:RAW:TEST spec (the log does not name one)",
                ))
            }
        };
        let Some(Spec { raw, test }) = parse_spec(&spec)? else {
            return Err(invalid(&format!(
                "{spec}: exercise needs a mirrored device, blkverify:RAW:TEST"
            )));
        };
        let mix = request
            .mix
            .as_deref()
            .map_or(Ok(Mix::default()), Mix::parse)?;
        let size_mix = request
            .size_mix
            .as_deref()
            .map_or(Ok(SizeMix::default()), SizeMix::parse)?;
        let seed = request.seed.unwrap_or_else(|| {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                >> 1
        });
        let recorded_depth = replayed.as_ref().and_then(|r| match r.as_ref() {
            Record::Log(log) => log.queue_depth,
            Record::Trace(_) => None,
        });
        let queue_depth = queue_depth.or(recorded_depth).unwrap_or(1);
        let writes = match &replayed {
            Some(r) => match &request.positions {
                Some(p) => p.iter().any(|&i| r.ops().get(i).is_some_and(Op::writes)),
                None => r.ops().iter().any(Op::writes),
            },
            None => mix.writes(),
        };
        let open = OpenOptions {
            writable: writes,
            snapshot: None,
            ..open.clone()
        };
        let device = Blkverify::open(&raw, &test, &open)?;
        if let Some(trace) = trace {
            if trace.header.size != device.size() {
                return Err(invalid(&format!(
                    "{}: the trace was recorded on a device of {} bytes, and {spec} has {}",
                    trace.path.display(),
                    trace.header.size,
                    device.size()
                )));
            }
        }
        let plan = match replayed {
            Some(record) => Plan::Replay {
                record,
                positions: request.positions.map(Arc::from),
            },
            None => Plan::Generated {
                workload: Workload {
                    seed,
                    size: device.size(),
                    mix,
                    size_mix,
                },
                limit,
            },
        };
        let log = request.log.as_deref().map(OpLog::create).transpose()?;
        Ok(Exercise {
            spec,
            device,
            plan,
            options: ExerciseOptions {
                queue_depth,
                final_check: request.final_check.unwrap_or(FinalCheck::Whole),
                ..ExerciseOptions::default()
            },
            log,
        })
    }

    /// Run it; see [`run`].
    pub fn run(&mut self, tick: &mut dyn FnMut(u64) -> bool) -> Result<Outcome> {
        run(
            &self.device,
            &self.plan,
            &self.options,
            self.log.as_mut(),
            tick,
        )
    }
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
    let queue_depth = options.queue_depth.clamp(1, MAX_QUEUE_DEPTH);
    if let Plan::Replay { .. } = plan {
        let past = (0..plan.len().unwrap_or(0))
            .filter_map(|p| plan.op(p))
            .find(|op| op.offset + op.length > size);
        if let Some(op) = past {
            return Err(Error::InvalidArgument(format!(
                "op {op} ends past the end of the device ({size} bytes)"
            )));
        }
    }
    if let Some(log) = log.as_deref_mut() {
        let spec = device.path().display().to_string();
        log.header(plan.seed(), Some(size), Some(queue_depth), Some(&spec))?;
        match plan {
            Plan::Generated { workload, .. } => {
                log.comment(&format!("mix {}", workload.mix))?;
                log.comment(&format!("size-mix {}", workload.size_mix))?;
            }
            Plan::Replay { .. } => log.comment("replayed")?,
        }
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
    let mut pacer = Pacer::new(deadline, tick);
    let mut dispatcher = Dispatcher {
        device,
        plan,
        stats: &stats,
        log: log.as_deref_mut(),
        pacer: &mut pacer,
    };
    let dispatched = if queue_depth == 1 {
        dispatcher.serial()?
    } else {
        dispatcher.queued(queue_depth)?
    };
    let elapsed = started.elapsed();
    let cancelled = pacer.cancelled;
    let mut findings = dispatched.findings;

    let stopped = match dispatched.error {
        Some(e) => Some(e),
        None if cancelled => Some(Error::Cancelled),
        None => None,
    };
    if let Some(e) = stopped {
        finish_log(log, &findings)?;
        return Err(e);
    }

    let verify_started = Instant::now();
    let mut verified = false;
    if findings.is_empty() && options.final_check != FinalCheck::Skip {
        let mut verify_tick = |_: verify::Progress| tick(stats.done.load(Ordering::Relaxed));
        let (finding, whole) = match options.final_check {
            FinalCheck::Touched => {
                let ops = (0..dispatched.issued).filter_map(|p| plan.op(p));
                (touched_check(device, ops)?, false)
            }
            _ => final_check(device, options, &mut verify_tick)?,
        };
        findings.extend(finding);
        verified = whole;
    }
    for f in &mut findings {
        finding::explain(plan, dispatched.issued, f);
    }
    finish_log(log, &findings)?;
    Ok(Outcome {
        seed: plan.seed(),
        ops: stats.done.load(Ordering::Relaxed),
        issued: dispatched.issued,
        elapsed,
        verify_elapsed: verify_started.elapsed(),
        bytes_read: stats.bytes_read.load(Ordering::Relaxed),
        bytes_written: stats.bytes_written.load(Ordering::Relaxed),
        findings,
        verified,
    })
}

/// Flush both sides, then verify the whole device. Returns the first finding,
/// if any, and whether the whole device was verified (not when the flush
/// already found a difference).
fn final_check(
    device: &Blkverify,
    options: &ExerciseOptions,
    tick: &mut dyn FnMut(verify::Progress) -> bool,
) -> Result<(Option<Finding>, bool)> {
    if let Err(e) = device.flush() {
        let finding = finding::of_error(device, None, "final flush", e, None)?;
        return Ok((Some(finding), false));
    }
    let verify_options = VerifyOptions {
        threads: options.verify_threads,
        ..VerifyOptions::default()
    };
    let report = verify::verify(device.raw(), device.test(), &verify_options, tick)?;
    let finding = report
        .mismatches
        .first()
        .map(|m| finding::of_verify(device, m));
    Ok((finding, true))
}

/// Flush both sides, then read back every range `ops` wrote or read (block
/// status aside: it may span the device), on both sides, and compare: the
/// first difference is the finding (as the whole verify would report it).
fn touched_check(device: &Blkverify, ops: impl Iterator<Item = Op>) -> Result<Option<Finding>> {
    const PIECE: u64 = 1 << 20;
    if let Err(e) = device.flush() {
        return finding::of_error(device, None, "final flush", e, None).map(Some);
    }
    let mut ranges: Vec<(u64, u64)> = ops
        .filter(|op| op.writes() || matches!(op.kind, OpKind::Read | OpKind::Cache))
        .filter_map(|op| op.range())
        .map(|(start, end)| {
            (
                start / SECTOR_SIZE * SECTOR_SIZE,
                end.div_ceil(SECTOR_SIZE) * SECTOR_SIZE,
            )
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let size = device.size();
    let (mut test, mut raw) = (Vec::new(), Vec::new());
    for (start, end) in merged {
        let mut at = start.min(size);
        let end = end.min(size);
        while at < end {
            let n = (end - at).min(PIECE) as usize;
            test.resize(n, 0);
            raw.resize(n, 0);
            device.raw().read_at(&mut raw, at)?;
            let mismatch = match device.test().read_at(&mut test, at) {
                Err(e) => Some(crate::report::Mismatch {
                    offset: at,
                    length: n as u64,
                    first_byte: at,
                    errno: Some(e.errno()),
                    error: Some(e.to_string()),
                }),
                Ok(()) => crate::compare::first_difference(&test, &raw).map(|i| {
                    let first_byte = at + i as u64;
                    crate::report::Mismatch {
                        offset: first_byte / SECTOR_SIZE * SECTOR_SIZE,
                        length: SECTOR_SIZE,
                        first_byte,
                        errno: None,
                        error: None,
                    }
                }),
            };
            if let Some(m) = mismatch {
                return Ok(Some(finding::of_verify(device, &m)));
            }
            at += n as u64;
        }
    }
    Ok(None)
}

/// End the op log: the findings as comments, then a flush.
fn finish_log(log: Option<&mut OpLog>, findings: &[Finding]) -> Result<()> {
    if let Some(log) = log {
        for f in findings {
            log.comment(&format!("finding: {}", f.difference.message))?;
        }
        log.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
