//! Issuing a plan's ops: one after the other at queue depth 1, or through a
//! pool of workers that keeps up to the queue depth in flight. Every op is
//! admitted to the device in op order as it is issued, and the device orders
//! the ones that overlap (see [`crate::blkverify::order`]).

use super::finding::{self, Finding};
use super::{Op, OpKind, OpLog, Plan};
use crate::blkverify::order::Ticket;
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
        let mut buf = Buffers::default();
        let mut out = Dispatched::default();
        while let Some(op) = self.plan.op(out.issued) {
            if !self.pacer.keep_going(self.stats) {
                break;
            }
            if let Some(log) = self.log.as_deref_mut() {
                log.op(&op)?;
            }
            let position = out.issued;
            out.issued += 1;
            let source = self.plan.connection(position).unwrap_or(op.number);
            let _admitted = self.device.admit(&op.admission(source, None));
            match execute(self.device, self.plan, position, &op, &mut buf, self.stats) {
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
    /// the next op itself, in number order, and admits it to the device, which
    /// makes one that overlaps an op in flight wait for it; the calling thread
    /// only ticks. We rejected a dispatching thread that hands ops to the
    /// workers: against an NBD server each hand-off (a wake-up there, another
    /// back) cost more than the request itself.
    pub fn queued(&mut self, queue_depth: usize) -> Result<Dispatched> {
        let queue = Queue {
            state: Mutex::new(QueueState {
                log: self.log.take(),
                ..QueueState::default()
            }),
            ended: Condvar::new(),
            deadline: self.pacer.deadline,
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
    workers_done: usize,
    stop: bool,
    findings: Vec<Finding>,
    error: Option<Error>,
    log: Option<&'a mut OpLog>,
}

struct Queue<'a> {
    state: Mutex<QueueState<'a>>,
    /// The calling thread waits here for the workers to end (and ticks).
    ended: Condvar,
    deadline: Option<Instant>,
}

impl<'a> Queue<'a> {
    fn lock(&self) -> MutexGuard<'_, QueueState<'a>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker: take the next op (admitted to the device), wait until the
    /// device lets it run, run it, until the plan ends or a finding, an error
    /// or the caller stops the run.
    fn work(&self, device: &Blkverify, plan: &Plan, stats: &Stats, queue_depth: usize) {
        let mut buf = Buffers::default();
        loop {
            let Some((position, op, mut admitted)) = self.take(device, plan) else {
                break;
            };
            admitted.wait();
            let result = execute(device, plan, position, &op, &mut buf, stats);
            drop(admitted);
            let mut q = self.lock();
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
        }
        let mut q = self.lock();
        q.workers_done += 1;
        let last = q.workers_done == queue_depth;
        drop(q);
        if last {
            self.ended.notify_all();
        }
    }

    /// Issue the next op of `plan`: log it and admit it to the device, in op
    /// order (under the queue lock, so the device numbers ops in the order
    /// they are logged). `None` when the run is over.
    fn take<'d>(&self, device: &'d Blkverify, plan: &Plan) -> Option<(u64, Op, Ticket<'d>)> {
        let mut q = self.lock();
        if q.stop || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let op = plan.op(q.issued)?;
        if let Some(log) = q.log.as_deref_mut() {
            if let Err(e) = log.op(&op) {
                q.error.get_or_insert(e);
                q.stop = true;
                return None;
            }
        }
        let position = q.issued;
        q.issued += 1;
        let source = plan.connection(position).unwrap_or(op.number);
        let admitted = device.admit(&op.admission(source, None));
        Some((position, op, admitted))
    }
}

/// Buffers a worker reuses from op to op.
#[derive(Default)]
pub(super) struct Buffers {
    /// A read's or a write's data.
    data: Vec<u8>,
    /// Block status checks.
    scratch: Vec<u8>,
}

/// Run `op`, the `position`-th op issued, through the device: as serve runs
/// a client's request of that kind (a FUA request flushes both sides after
/// it; a block status is checked against the reference).
fn execute(
    device: &Blkverify,
    plan: &Plan,
    position: u64,
    op: &Op,
    bufs: &mut Buffers,
    stats: &Stats,
) -> OpResult {
    let length = usize::try_from(op.length).unwrap_or(usize::MAX);
    let moves_data = matches!(op.kind, OpKind::Read | OpKind::Cache | OpKind::Write { .. });
    if moves_data && bufs.data.len() < length {
        bufs.data.resize(length, 0);
    }
    let data = bufs.data.get_mut(..length).unwrap_or(&mut []);
    let durable = |result: Result<()>, fua: bool| match result {
        Ok(()) if fua => device.flush(),
        other => other,
    };
    let result = match op.kind {
        OpKind::Read | OpKind::Cache => device.read_at(data, op.offset),
        OpKind::Write { fua } => {
            if !plan.fill(position, op, data) {
                return OpResult::Failed(Error::Internal(format!(
                    "the record holds no data for op {op}"
                )));
            }
            durable(device.write_at(data, op.offset), fua)
        }
        OpKind::Zero { unmap, fua, .. } => {
            durable(device.write_zeroes(op.offset, op.length, unmap), fua)
        }
        OpKind::Discard { fua } => durable(device.discard(op.offset, op.length), fua),
        OpKind::Flush => device.flush(),
        OpKind::BlockStatus { one } => {
            crate::serve::block_status(device, op.offset, op.length, one, &mut bufs.scratch)
                .map(|_| ())
        }
    };
    stats.done.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(()) => {
            match op.kind {
                OpKind::Read => stats.bytes_read.fetch_add(op.length, Ordering::Relaxed),
                OpKind::Write { .. } => stats.bytes_written.fetch_add(op.length, Ordering::Relaxed),
                _ => 0,
            };
            OpResult::Done
        }
        Err(e) => {
            // A read's buffer holds what the test side returned: keep it, a
            // second read may not return the same (a transient fault).
            let reads = matches!(op.kind, OpKind::Read | OpKind::Cache);
            let seen = reads.then(|| bufs.data.get(..length).unwrap_or(&[]));
            match finding::of_error(device, Some(*op), "op", e, seen) {
                Ok(mut f) => {
                    f.difference.connection = plan.connection(position);
                    OpResult::Finding(Box::new(f))
                }
                Err(e) => OpResult::Failed(e),
            }
        }
    }
}
