//! Issuing a plan's ops: one after the other at queue depth 1, or through a
//! pool of workers that keeps up to the queue depth in flight, never two that
//! overlap (see the module doc of [`super`]).

use super::finding::{self, Finding};
use super::{fill_pattern, Op, OpKind, OpLog, Plan};
use crate::blkverify::Blkverify;
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Counters the workers share.
#[derive(Default)]
pub(super) struct Stats {
    pub done: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// How one op ended: fine, a finding, or an error that ends the run.
enum OpResult {
    Done,
    Finding(Box<Finding>),
    Failed(Error),
}

/// An op a worker is running: its number and the guest range it may touch.
struct InFlight {
    number: u64,
    start: u64,
    end: u64,
}

/// Calls the caller's tick about ten times a second and watches the deadline.
pub(super) struct Pacer<'t> {
    deadline: Option<Instant>,
    last_tick: Instant,
    tick: &'t mut dyn FnMut(u64) -> bool,
    /// The tick asked to stop.
    pub cancelled: bool,
}

impl<'t> Pacer<'t> {
    pub fn new(deadline: Option<Instant>, tick: &'t mut dyn FnMut(u64) -> bool) -> Self {
        Pacer {
            deadline,
            last_tick: Instant::now(),
            tick,
            cancelled: false,
        }
    }

    /// False when the run must stop: out of time, or cancelled by the tick.
    fn keep_going(&mut self, stats: &Stats) -> bool {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return false;
        }
        if now.duration_since(self.last_tick) >= Duration::from_millis(100) {
            self.last_tick = now;
            if !(self.tick)(stats.done.load(Ordering::Relaxed)) {
                self.cancelled = true;
                return false;
            }
        }
        true
    }
}

/// What issuing the ops came to.
#[derive(Default)]
pub(super) struct Dispatched {
    /// Ops issued.
    pub issued: u64,
    /// Findings, by op number.
    pub findings: Vec<Finding>,
    /// The error that ended the run, if one did.
    pub error: Option<Error>,
}

/// Issues a plan's ops on a device.
pub(super) struct Dispatcher<'a, 't> {
    pub device: &'a Blkverify,
    pub plan: &'a Plan,
    pub stats: &'a Stats,
    pub log: Option<&'a mut OpLog>,
    pub pacer: &'a mut Pacer<'t>,
}

impl Dispatcher<'_, '_> {
    /// Queue depth 1: each op on the calling thread, until the plan ends, a
    /// finding or an error, or the pacer says stop.
    pub fn serial(&mut self) -> Result<Dispatched> {
        let mut buf = Vec::new();
        let mut out = Dispatched::default();
        while let Some(op) = self.plan.op(out.issued) {
            if !self.pacer.keep_going(self.stats) {
                break;
            }
            if let Some(log) = self.log.as_deref_mut() {
                log.op(&op)?;
            }
            out.issued += 1;
            match execute(self.device, self.plan.seed(), &op, &mut buf, self.stats) {
                OpResult::Done => {}
                OpResult::Finding(f) => {
                    out.findings.push(*f);
                    break;
                }
                OpResult::Failed(e) => {
                    out.error = Some(e);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Up to `queue_depth` ops in flight on worker threads. Ops are issued in
    /// number order, and one that overlaps an op in flight (ranges widened to
    /// `unit`) waits for it.
    pub fn queued(&mut self, queue_depth: usize, unit: u64) -> Result<Dispatched> {
        let queue = Queue {
            state: Mutex::default(),
            wake: Condvar::new(),
        };
        let (device, seed, stats) = (self.device, self.plan.seed(), self.stats);
        let mut issued = 0u64;
        let dispatched: Result<()> = std::thread::scope(|scope| {
            for _ in 0..queue_depth {
                scope.spawn(|| queue.work(device, seed, stats));
            }
            let outcome = self.issue(&queue, queue_depth, unit, &mut issued);
            let mut q = queue.lock();
            q.closed = true;
            queue.wake.notify_all();
            drop(q);
            outcome
        });
        let q = queue
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        dispatched?;
        let mut findings = q.findings;
        findings.sort_by_key(|f| f.op.map_or(u64::MAX, |op| op.number));
        Ok(Dispatched {
            issued,
            findings,
            error: q.error,
        })
    }

    /// The dispatching half of [`Dispatcher::queued`]: hand ops to the workers
    /// until the plan ends, a worker says stop, or the pacer does.
    fn issue(
        &mut self,
        queue: &Queue,
        queue_depth: usize,
        unit: u64,
        issued: &mut u64,
    ) -> Result<()> {
        let widen = |op: &Op| {
            op.range()
                .map(|(start, end)| (start / unit * unit, end.div_ceil(unit) * unit))
        };
        while let Some(op) = self.plan.op(*issued) {
            if !self.pacer.keep_going(self.stats) {
                return Ok(());
            }
            let range = widen(&op);
            let mut q = queue.lock();
            loop {
                if q.stop {
                    return Ok(());
                }
                let overlaps = range.is_some_and(|(start, end)| {
                    q.in_flight.iter().any(|f| f.start < end && start < f.end)
                });
                if q.in_flight.len() < queue_depth && !overlaps {
                    break;
                }
                let (guard, _) = queue
                    .wake
                    .wait_timeout(q, Duration::from_millis(50))
                    .unwrap_or_else(PoisonError::into_inner);
                q = guard;
                if !q.in_flight.is_empty() && q.in_flight.len() >= queue_depth {
                    // Every slot is busy, perhaps for long: keep ticking.
                    drop(q);
                    if !self.pacer.keep_going(self.stats) {
                        return Ok(());
                    }
                    q = queue.lock();
                }
            }
            if let Some(log) = self.log.as_deref_mut() {
                log.op(&op)?;
            }
            let (start, end) = range.unwrap_or((0, 0));
            q.in_flight.push(InFlight {
                number: op.number,
                start,
                end,
            });
            q.pending.push_back(op);
            *issued += 1;
            queue.wake.notify_all();
        }
        Ok(())
    }
}

/// The dispatcher and workers' shared state.
#[derive(Default)]
struct QueueState {
    pending: VecDeque<Op>,
    in_flight: Vec<InFlight>,
    closed: bool,
    stop: bool,
    findings: Vec<Finding>,
    error: Option<Error>,
}

struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker: run pending ops until the queue is closed.
    fn work(&self, device: &Blkverify, seed: u64, stats: &Stats) {
        let mut buf = Vec::new();
        loop {
            let op = {
                let mut q = self.lock();
                loop {
                    if let Some(op) = q.pending.pop_front() {
                        break op;
                    }
                    if q.closed {
                        return;
                    }
                    q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let result = execute(device, seed, &op, &mut buf, stats);
            let mut q = self.lock();
            q.in_flight.retain(|f| f.number != op.number);
            match result {
                OpResult::Done => {}
                OpResult::Finding(f) => {
                    q.findings.push(*f);
                    q.stop = true;
                }
                OpResult::Failed(e) => {
                    q.error.get_or_insert(e);
                    q.stop = true;
                }
            }
            self.wake.notify_all();
        }
    }
}

/// Run one op through the device.
fn execute(device: &Blkverify, seed: u64, op: &Op, buf: &mut Vec<u8>, stats: &Stats) -> OpResult {
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
            OpResult::Done
        }
        Err(e) => {
            // A read's buffer holds what the test side returned: keep it, a
            // second read may not return the same (a transient fault).
            let seen = (op.kind == OpKind::Read).then(|| buf.get(..length).unwrap_or(&[]));
            match finding::of_error(device, Some(*op), "op", e, seen) {
                Ok(f) => OpResult::Finding(Box::new(f)),
                Err(e) => OpResult::Failed(e),
            }
        }
    }
}
