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
//! hang of the driver under test; see [`log`] for its format.
//!
//! The parts: [`workload`] draws the ops, `dispatch` runs them, `finding`
//! explains a difference, [`log`] reads and writes op logs; this module checks
//! what the caller asked for ([`Request`]) and runs it ([`run`]).

mod dispatch;
mod finding;
pub mod log;
pub mod workload;

pub use crate::compare::hexdump_diff;
pub use finding::Finding;
pub use log::{parse_log, Log, OpLog, LOG_MAGIC};
pub use workload::{
    fill_pattern, pattern_key, pattern_word, Mix, Op, OpKind, SizeMix, Workload, MAX_REQUEST,
};

use crate::blkverify::{parse_spec, Blkverify, Spec};
use crate::driver::{BlockDriver, OpenOptions};
use crate::error::{Error, Result};
use crate::verify::{self, VerifyOptions};
use dispatch::{Dispatcher, Pacer, Stats};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The most ops an exercise keeps in flight at once.
pub const MAX_QUEUE_DEPTH: usize = 256;

/// The ops a run makes when neither an op count nor a duration is given.
pub const DEFAULT_OPS: u64 = 10_000;

/// `queue_depth` if it is 1 to [`MAX_QUEUE_DEPTH`]: the one check of that range.
pub fn check_queue_depth(queue_depth: u64) -> std::result::Result<usize, String> {
    usize::try_from(queue_depth)
        .ok()
        .filter(|q| (1..=MAX_QUEUE_DEPTH).contains(q))
        .ok_or_else(|| format!("queue depth {queue_depth} is not 1 to {MAX_QUEUE_DEPTH}"))
}

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
    /// Ops in flight at once (1 to [`MAX_QUEUE_DEPTH`]).
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
    /// Replay this log's ops instead of drawing them.
    pub replay: Option<PathBuf>,
    /// Write the op log here.
    pub log: Option<PathBuf>,
    /// Skip the whole-device verify after the last op.
    pub no_verify: bool,
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
        let replayed = match &request.replay {
            Some(_)
                if request.ops.is_some()
                    || request.duration.is_some()
                    || request.seed.is_some()
                    || request.mix.is_some()
                    || request.size_mix.is_some() =>
            {
                return Err(invalid(
                    "a replay runs the log's ops: ops, duration, seed, mix and size_mix do not apply",
                ))
            }
            Some(path) => Some(Log::read(path)?),
            None => None,
        };
        let spec = match (request.spec, replayed.as_ref().and_then(|l| l.spec.clone())) {
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
        let queue_depth = queue_depth
            .or(replayed.as_ref().and_then(|l| l.queue_depth))
            .unwrap_or(1);
        let writes = match &replayed {
            Some(l) => l.ops.iter().any(Op::writes),
            None => mix.writes(),
        };
        let open = OpenOptions {
            writable: writes,
            snapshot: None,
            ..open.clone()
        };
        let device = Blkverify::open(&raw, &test, &open)?;
        let plan = match replayed {
            Some(l) => Plan::Replay {
                seed: l.seed,
                ops: l.ops,
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
                verify_at_end: !request.no_verify,
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
    if let Plan::Replay { ops, .. } = plan {
        if let Some(op) = ops.iter().find(|op| op.offset + op.length > size) {
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
    if findings.is_empty() && options.verify_at_end {
        let mut verify_tick = |_: verify::Progress| tick(stats.done.load(Ordering::Relaxed));
        let (finding, whole) = final_check(device, options, &mut verify_tick)?;
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

/// End the op log: the findings as comments, then a flush.
fn finish_log(log: Option<&mut OpLog>, findings: &[Finding]) -> Result<()> {
    if let Some(log) = log {
        for f in findings {
            log.comment(&format!("finding: {}", f.message))?;
        }
        log.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
