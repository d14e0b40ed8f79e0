//! The order of overlapping requests: the one rule that keeps the two sides of
//! the mirrored device comparable when requests run concurrently.
//!
//! Two requests *conflict* when their ranges overlap and at least one of them
//! writes (two reads may run together: the bytes they must return are the
//! same either way). Ranges are widened to the device's [`Order::unit`]:
//! whole sectors, or an NBD side's minimum block size, since our NBD client
//! read-modify-writes partial blocks and so touches the whole block.
//!
//! Every request is *admitted* before it runs: it gets the next global request
//! number, and it may run once no request admitted before it that it conflicts
//! with is still in flight. So conflicting requests reach both sides in number
//! order, and requests that do not conflict commute: whatever the timing, the
//! run is equivalent to running every request one at a time in number order.
//! A replay in number order at queue depth 1 therefore repeats a live run, and
//! a read's expected bytes never depend on timing. A request never waits for a
//! later one, so waiting cannot deadlock.
//!
//! Admitting never blocks; [`Ticket::wait`] does, only when the request
//! conflicts with one admitted earlier. A caller that admits in its own order
//! (exercise takes its ops in op-number order under its queue lock) gets that
//! order applied; a server admits each request as it arrives.
//!
//! An [`Observer`] sees every request as it is admitted, in number order (the
//! hook a trace records from).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// What a request does, as the device and an observer see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read both sides and compare.
    Read,
    /// Write both sides.
    Write {
        /// Durable before the reply.
        fua: bool,
    },
    /// Make the range read as zeros on both sides.
    Zero {
        /// The driver may free the storage.
        unmap: bool,
        /// Durable before the reply.
        fua: bool,
        /// Only if faster than writing zeros.
        fast: bool,
    },
    /// Discard the range (checked).
    Discard {
        /// Durable before the reply.
        fua: bool,
    },
    /// Flush both sides.
    Flush,
    /// Ask the test side which ranges are holes or zeros (checked against the
    /// reference).
    BlockStatus {
        /// One extent only (NBD's `REQ_ONE`): only that extent is checked.
        one: bool,
    },
    /// Read without returning the data (a prefetch hint; compared too).
    Cache,
}

impl Kind {
    /// Whether the request changes the device.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Kind::Write { .. } | Kind::Zero { .. } | Kind::Discard { .. }
        )
    }

    /// Whether the request touches a range at all (a flush does not: it
    /// conflicts with nothing).
    pub fn has_range(&self) -> bool {
        !matches!(self, Kind::Flush)
    }

    /// The name in messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write { .. } => "write",
            Kind::Zero { .. } => "write_zeroes",
            Kind::Discard { .. } => "discard",
            Kind::Flush => "flush",
            Kind::BlockStatus { .. } => "block_status",
            Kind::Cache => "cache",
        }
    }
}

/// A request as it is admitted.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// What it does.
    pub kind: Kind,
    /// Guest offset (0 for a flush).
    pub offset: u64,
    /// Length in bytes (0 for a flush).
    pub length: u64,
    /// Who sent it: a connection's number, a worker's; only reported.
    pub source: u64,
    /// A write's data, for an observer.
    pub data: Option<&'a [u8]>,
}

/// A request the device admitted: what an [`Observer`] sees.
#[derive(Debug, Clone, Copy)]
pub struct Admitted<'a> {
    /// Its global request number.
    pub number: u64,
    /// The request.
    pub request: &'a Request<'a>,
}

/// Sees every request as it is admitted, in number order. It is called with
/// the admission lock held, so every request waits for it: copy what it
/// needs and hand the work to another thread.
pub trait Observer: Send + Sync {
    /// `admitted` was given its number and will run (after any earlier
    /// request it conflicts with).
    fn admitted(&self, admitted: &Admitted<'_>);
}

/// A request in flight: its number and its widened range.
#[derive(Debug, Clone, Copy)]
struct Entry {
    number: u64,
    start: u64,
    end: u64,
    writes: bool,
}

impl Entry {
    fn conflicts(&self, other: &Entry) -> bool {
        self.start < other.end && other.start < self.end && (self.writes || other.writes)
    }
}

#[derive(Default)]
struct State {
    next: u64,
    /// Requests admitted and not yet done (flushes aside). Small: at most the
    /// requests in flight.
    in_flight: Vec<Entry>,
    /// Tickets waiting in [`Ticket::wait`].
    waiters: usize,
}

/// The admission of requests to one device (see the module doc).
pub struct Order {
    state: Mutex<State>,
    released: Condvar,
    unit: u64,
    observer: Option<Arc<dyn Observer>>,
}

impl Order {
    /// Order requests whose ranges are widened to `unit` bytes (at least 1).
    pub fn new(unit: u64) -> Order {
        Order {
            state: Mutex::default(),
            released: Condvar::new(),
            unit: unit.max(1),
            observer: None,
        }
    }

    /// The unit ranges are widened to.
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// Let `observer` see every request admitted from now on.
    pub fn set_observer(&mut self, observer: Arc<dyn Observer>) {
        self.observer = Some(observer);
    }

    /// Requests admitted so far (the next request's number).
    pub fn admitted(&self) -> u64 {
        self.lock().next
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Give `request` the next number and mark it in flight until the ticket
    /// is dropped. Never blocks; the ticket says whether the request must
    /// [`Ticket::wait`] for an earlier one.
    pub fn admit(&self, request: &Request<'_>) -> Ticket<'_> {
        let unit = self.unit;
        let end = request.offset.saturating_add(request.length);
        let range = request.kind.has_range().then(|| {
            (
                request.offset / unit * unit,
                end.div_ceil(unit).saturating_mul(unit),
            )
        });
        let mut state = self.lock();
        let number = state.next;
        state.next += 1;
        let entry = range.map(|(start, end)| Entry {
            number,
            start,
            end,
            writes: request.kind.writes(),
        });
        let blocked = entry.is_some_and(|e| state.in_flight.iter().any(|f| f.conflicts(&e)));
        if let Some(e) = entry {
            state.in_flight.push(e);
        }
        if let Some(observer) = &self.observer {
            observer.admitted(&Admitted { number, request });
        }
        drop(state);
        Ticket {
            order: self,
            number,
            entry,
            blocked,
        }
    }
}

/// An admitted request: its number, and its place in flight until dropped.
pub struct Ticket<'a> {
    order: &'a Order,
    number: u64,
    entry: Option<Entry>,
    blocked: bool,
}

impl Ticket<'_> {
    /// The global request number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Whether an earlier conflicting request was in flight when this one was
    /// admitted: the caller must [`wait`](Ticket::wait) before running it
    /// (and may hand it to another thread to do so).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Block until no request admitted earlier that conflicts with this one is
    /// in flight.
    pub fn wait(&mut self) {
        let Some(me) = self.entry.filter(|_| self.blocked) else {
            return;
        };
        let order = self.order;
        let mut state = order.lock();
        while state
            .in_flight
            .iter()
            .any(|f| f.number < me.number && f.conflicts(&me))
        {
            state.waiters += 1;
            state = order
                .released
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiters -= 1;
        }
        self.blocked = false;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let Some(me) = self.entry else {
            return;
        };
        let mut state = self.order.lock();
        if let Some(at) = state.in_flight.iter().position(|f| f.number == me.number) {
            state.in_flight.swap_remove(at);
        }
        let wake = state.waiters > 0;
        drop(state);
        // Woken outside the lock: a wake-up is a system call.
        if wake {
            self.order.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    fn request(kind: Kind, offset: u64, length: u64) -> Request<'static> {
        Request {
            kind,
            offset,
            length,
            source: 0,
            data: None,
        }
    }

    const WRITE: Kind = Kind::Write { fua: false };

    #[test]
    fn conflicts_are_overlaps_with_a_write_in_whole_units() {
        let order = Order::new(512);
        let a = order.admit(&request(WRITE, 0, 100));
        // same sector, another byte: widened, they overlap
        let b = order.admit(&request(Kind::Read, 300, 10));
        assert!(!a.is_blocked());
        assert!(b.is_blocked());
        // the next sector, and a flush: no conflict
        let c = order.admit(&request(WRITE, 512, 512));
        let d = order.admit(&request(Kind::Flush, 0, 0));
        assert!(!c.is_blocked() && !d.is_blocked());
        // two reads never conflict
        let e = order.admit(&request(Kind::Read, 300, 10));
        assert!(e.is_blocked(), "it overlaps the write a");
        drop(a);
        let f = order.admit(&request(Kind::Read, 0, 512));
        assert!(!f.is_blocked(), "reads b and e do not block a read");
        assert_eq!(
            [b.number(), c.number(), d.number(), e.number(), f.number()],
            [1, 2, 3, 4, 5]
        );
        assert_eq!(order.admitted(), 6);
    }

    #[test]
    fn a_blocked_request_runs_after_the_earlier_one_only() {
        let order = Order::new(512);
        let log = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            let first = order.admit(&request(WRITE, 0, 4096));
            let mut second = order.admit(&request(WRITE, 1024, 512));
            let unrelated = order.admit(&request(WRITE, 8192, 512));
            assert!(second.is_blocked() && !unrelated.is_blocked());
            let log = &log;
            let waiter = scope.spawn(move || {
                second.wait();
                log.lock().unwrap().push(second.number());
            });
            std::thread::sleep(Duration::from_millis(50));
            log.lock().unwrap().push(first.number());
            drop(first);
            waiter.join().unwrap();
            drop(unrelated);
        });
        assert_eq!(*log.lock().unwrap(), vec![0, 1]);
    }

    #[test]
    fn the_observer_sees_requests_in_number_order() {
        struct Seen(Mutex<Vec<(u64, &'static str, Option<usize>)>>);
        impl Observer for Seen {
            fn admitted(&self, a: &Admitted<'_>) {
                self.0.lock().unwrap().push((
                    a.number,
                    a.request.kind.name(),
                    a.request.data.map(<[u8]>::len),
                ));
            }
        }
        let seen = Arc::new(Seen(Mutex::new(Vec::new())));
        let mut order = Order::new(512);
        order.set_observer(seen.clone());
        let data = [7u8; 512];
        let counter = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let mut t = order.admit(&Request {
                            kind: WRITE,
                            offset: (n % 3) * 512,
                            length: 512,
                            source: n,
                            data: Some(&data),
                        });
                        t.wait();
                    }
                });
            }
        });
        let seen = seen.0.lock().unwrap();
        assert_eq!(seen.len(), 400);
        assert!(seen
            .iter()
            .enumerate()
            .all(|(i, s)| *s == (i as u64, "write", Some(512))));
    }
}
