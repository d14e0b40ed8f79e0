//! Issuing a plan's ops: one after the other at queue depth 1, or through a
//! pool of workers that keeps up to the queue depth in flight, never two that
//! overlap (see the module doc of [`super`]).

use super::finding::{self, Finding};
use super::{fill_pattern, Op, OpKind, OpLog, Plan};
use crate::blkverify::Blkverify;
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
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

/// An op a worker is running: its number, the guest range it may touch, and
/// whether it only reads.
struct InFlight {
    number: u64,
    start: u64,
    end: u64,
    read: bool,
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

    /// Up to `queue_depth` ops in flight on worker threads. Each worker takes
    /// the next op itself, in number order, and one that overlaps an op in
    /// flight (ranges widened to `unit`) waits for it; the calling thread only
    /// ticks. We rejected a dispatching thread that hands ops to the workers:
    /// against an NBD server each hand-off (a wake-up there, another back)
    /// cost more than the request itself.
    pub fn queued(&mut self, queue_depth: usize, unit: u64) -> Result<Dispatched> {
        let queue = Queue {
            state: Mutex::new(QueueState {
                log: self.log.take(),
                ..QueueState::default()
            }),
            next: Condvar::new(),
            ended: Condvar::new(),
            deadline: self.pacer.deadline,
            unit,
        };
        let (device, plan, stats) = (self.device, self.plan, self.stats);
        std::thread::scope(|scope| {
            for _ in 0..queue_depth {
                scope.spawn(|| queue.work(device, plan, stats, queue_depth));
            }
            let mut q = queue.lock();
            while q.workers_done < queue_depth {
                q = queue
                    .ended
                    .wait_timeout(q, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                if q.workers_done < queue_depth && !q.stop {
                    drop(q);
                    let keep_going = self.pacer.keep_going(stats);
                    q = queue.lock();
                    if !keep_going {
                        q.stop = true;
                        queue.next.notify_all();
                    }
                }
            }
        });
        let q = queue
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        self.log = q.log;
        let mut findings = q.findings;
        findings.sort_by_key(|f| f.op.map_or(u64::MAX, |op| op.number));
        Ok(Dispatched {
            issued: q.issued,
            findings,
            error: q.error,
        })
    }
}

/// What the workers share.
#[derive(Default)]
struct QueueState<'a> {
    /// Ops issued so far: the next op is the plan's op at this position.
    issued: u64,
    in_flight: Vec<InFlight>,
    /// Workers waiting for the next op to stop overlapping one in flight.
    waiting: usize,
    workers_done: usize,
    stop: bool,
    findings: Vec<Finding>,
    error: Option<Error>,
    log: Option<&'a mut OpLog>,
}

struct Queue<'a> {
    state: Mutex<QueueState<'a>>,
    /// Workers wait here for the next op to stop overlapping.
    next: Condvar,
    /// The calling thread waits here for the workers to end (and ticks).
    ended: Condvar,
    deadline: Option<Instant>,
    unit: u64,
}

impl<'a> Queue<'a> {
    fn lock(&self) -> MutexGuard<'_, QueueState<'a>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker: take the next op, run it, until the plan ends or a finding,
    /// an error or the caller stops the run. Other workers are woken outside
    /// the lock (a wake-up is a system call, which would keep every worker
    /// waiting for the lock).
    fn work(&self, device: &Blkverify, plan: &Plan, stats: &Stats, queue_depth: usize) {
        let mut buf = Vec::new();
        let mut q = self.lock();
        loop {
            let (guard, op) = self.take(q, plan, queue_depth);
            q = guard;
            let Some(op) = op else {
                break;
            };
            // The op after this one may be free to go: let a waiter look.
            let wake_one = q.waiting > 0;
            drop(q);
            if wake_one {
                self.next.notify_one();
            }
            let result = execute(device, plan.seed(), &op, &mut buf, stats);
            q = self.lock();
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
            // No wake-up here: this worker looks at the next op itself, and
            // wakes a waiter if it can go.
        }
        // The run is over for every worker: those waiting for an op that
        // will never come must hear it.
        let wake_all = q.waiting > 0;
        q.workers_done += 1;
        let last = q.workers_done == queue_depth;
        drop(q);
        if wake_all {
            self.next.notify_all();
        }
        if last {
            self.ended.notify_all();
        }
    }

    /// Issue the next op of `plan` (logged, and marked in flight), waiting
    /// while it conflicts with an op in flight: their ranges (widened to the
    /// unit) overlap and one of them writes (two reads may run together: the
    /// bytes they must read are the same either way). `None` when the run is
    /// over.
    fn take<'q>(
        &'q self,
        mut q: MutexGuard<'q, QueueState<'a>>,
        plan: &Plan,
        queue_depth: usize,
    ) -> (MutexGuard<'q, QueueState<'a>>, Option<Op>) {
        let unit = self.unit;
        loop {
            if q.stop || self.deadline.is_some_and(|d| Instant::now() >= d) {
                return (q, None);
            }
            let Some(op) = plan.op(q.issued) else {
                return (q, None);
            };
            let read = op.kind == OpKind::Read;
            let range = op
                .range()
                .map(|(start, end)| (start / unit * unit, end.div_ceil(unit) * unit));
            let conflicts = range.is_some_and(|(start, end)| {
                q.in_flight
                    .iter()
                    .any(|f| f.start < end && start < f.end && !(read && f.read))
            });
            if !conflicts && q.in_flight.len() < queue_depth {
                if let Some(log) = q.log.as_deref_mut() {
                    if let Err(e) = log.op(&op) {
                        q.error.get_or_insert(e);
                        q.stop = true;
                        return (q, None);
                    }
                }
                let (start, end) = range.unwrap_or((0, 0));
                q.in_flight.push(InFlight {
                    number: op.number,
                    start,
                    end,
                    read,
                });
                q.issued += 1;
                return (q, Some(op));
            }
            q.waiting += 1;
            q = self.next.wait(q).unwrap_or_else(PoisonError::into_inner);
            q.waiting -= 1;
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
