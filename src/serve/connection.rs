//! One client: the handshake (within the time limit), then its requests.
//!
//! The client's thread reads requests, as many as one `recv` brings
//! ([`Inbox`]). Each is checked (`validate`), its data read, and it is
//! admitted to the device, which numbers it. If it conflicts with nothing in
//! flight and both sides are local files, it runs right there (a write's data
//! straight from the receive buffer) and its reply joins the batch written
//! when the thread is about to block reading; otherwise (it must wait for an
//! earlier request, it is a flush or has FUA, or a side is an NBD export
//! whose latency wants requests in flight) it goes to the connection's
//! workers. While a trace records, a connection to an NBD side has one
//! worker, which runs its requests in number order: the NBD side sees them
//! as the trace holds them.
//!
//! What one connection can make serve hold is bounded:
//! - at most `max_in_flight` requests (64) and [`MAX_QUEUED_BYTES`] (64 MiB)
//!   of request data (a write's data, a read's two buffers) wait for or run
//!   on its workers, one request of any size always passing; past that the
//!   thread reads no more, and the client's further requests wait in the
//!   socket (TCP's own backpressure);
//! - at most [`MAX_WORKERS`] (8) worker threads;
//! - one request on the reading thread (at most 64 MiB: a 32 MiB read's two
//!   buffers), the receive buffer and the reply batch (256 KiB each, a
//!   reply batch over it is written at once);
//! - buffers grown past 1 MiB for a large request are given back after it,
//!   so each thread keeps at most 3 MiB between requests.
//!
//! A request must arrive whole within the request timeout once its first
//! byte has come ([`Inbox`]); a client that stops reading its replies for
//! [`REPLY_TIMEOUT`] is disconnected.
//!
//! The connection ends when the client disconnects (`NBD_CMD_DISC` or EOF),
//! breaks the protocol, stalls, or the server stops: requests already
//! running finish on both sides, and replies to a client that left are
//! dropped and counted.

use super::execute::{self, Buffers, KEEP_BUFFER};
use super::handshake::{self, Negotiated};
use super::inbox::{Ended, Inbox};
use super::reply::{Reply, Writer};
use super::validate::validate_request;
use super::{lock, Context};
use crate::blkverify::order::{self, Ticket};
use crate::nbd::wire::{
    RequestHeader, CMD_CACHE, CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE,
};
use crate::nbd::Stream;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The reading side's buffer: many small requests arrive in one `recv`.
const READ_BUFFER: usize = 256 << 10;

/// How long a reply may take to leave: a client that stops reading for this
/// long is disconnected.
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The most worker threads one connection starts.
pub(super) const MAX_WORKERS: usize = 8;

/// The most request data one connection holds for its workers (one request
/// of any size is always let through).
pub(super) const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Write data buffers kept for reuse between jobs.
const SPARE_PAYLOADS: usize = 2 * MAX_WORKERS;

/// Serve one client on `stream` until it leaves or the server stops.
pub(super) fn serve(ctx: &Context<'_>, id: u64, stream: Stream) {
    let mut slot = Slot { ctx, held: false };
    let Some(negotiated) = handshake(ctx, &stream, &mut slot) else {
        return;
    };
    ctx.shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let connection = Connection {
        ctx,
        id,
        negotiated,
        writer: Mutex::new(Writer::new(write_half, negotiated.structured)),
        queue: Mutex::default(),
        work: Condvar::new(),
        room: Condvar::new(),
    };
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        connection.read_requests(stream, |connection| {
            workers.push(scope.spawn(move || connection.work()));
        });
        let mut queue = connection.lock_queue();
        queue.closed = true;
        ctx.shared
            .stats
            .peak_in_flight
            .fetch_max(queue.peak_in_flight as u64, Ordering::Relaxed);
        drop(queue);
        connection.work.notify_all();
        // Joined one by one, not left to the scope: a join waits for the
        // thread's end, its thread-locals freed, so that nothing of the
        // connection outlives it.
        for worker in workers {
            let _ = worker.join();
        }
    });
    let mut writer = lock(&connection.writer);
    writer.flush();
    let dropped = writer.dropped;
    drop(writer);
    ctx.shared
        .stats
        .dropped_replies
        .fetch_add(dropped, Ordering::Relaxed);
}

/// A place among the clients in transmission (what `shared` limits),
/// given back when the connection ends.
struct Slot<'c, 'a> {
    ctx: &'c Context<'a>,
    held: bool,
}

impl Slot<'_, '_> {
    fn claim(&mut self) -> Result<(), String> {
        let mut registry = lock(&self.ctx.shared.registry);
        let limit = self.ctx.options.shared;
        if registry.transmitting >= limit {
            return Err(format!(
                "blkverify serve is serving its {limit} client(s) already (--shared {limit})"
            ));
        }
        registry.transmitting += 1;
        self.held = true;
        Ok(())
    }
}

impl Drop for Slot<'_, '_> {
    fn drop(&mut self) {
        if self.held {
            let mut registry = lock(&self.ctx.shared.registry);
            registry.transmitting = registry.transmitting.saturating_sub(1);
        }
    }
}

/// The handshake, bounded in time; the agreed terms, or `None` when the
/// client leaves, is refused or breaks the protocol.
fn handshake(ctx: &Context<'_>, stream: &Stream, slot: &mut Slot<'_, '_>) -> Option<Negotiated> {
    let mut timed = Timed {
        stream: stream.try_clone().ok()?,
        until: Instant::now() + ctx.options.handshake_limit,
    };
    // A client that breaks the protocol, times out or leaves is simply
    // disconnected: there is nobody to tell.
    handshake::negotiate(&mut timed, &ctx.export, &mut || slot.claim())
        .ok()
        .flatten()
}

/// A socket whose every read and write must end by `until`.
struct Timed {
    stream: Stream,
    until: Instant,
}

impl Timed {
    fn left(&self) -> io::Result<Duration> {
        match self.until.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            )),
        }
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A request handed to the workers.
struct Job<'d> {
    request: RequestHeader,
    ticket: Ticket<'d>,
    payload: Vec<u8>,
}

impl Job<'_> {
    /// The bytes of request data this job makes the connection hold.
    fn cost(&self) -> usize {
        Job::cost_of(&self.request, &self.payload)
    }

    /// A write holds its data; a read (or cache) its two sides' buffers.
    fn cost_of(request: &RequestHeader, payload: &[u8]) -> usize {
        match request.command {
            CMD_READ | CMD_CACHE => 2 * request.length as usize,
            _ => payload.len(),
        }
    }
}

#[derive(Default)]
struct Queue<'d> {
    jobs: VecDeque<Job<'d>>,
    /// Jobs queued or running.
    in_flight: usize,
    /// Their request data (see [`Job::cost`]).
    queued_bytes: usize,
    /// The most jobs ever in flight at once.
    peak_in_flight: usize,
    /// Write data buffers the workers gave back, for the next jobs.
    spare: Vec<Vec<u8>>,
    workers: usize,
    idle: usize,
    /// No more jobs will come: idle workers leave.
    closed: bool,
}

struct Connection<'c, 'a> {
    ctx: &'c Context<'a>,
    id: u64,
    negotiated: Negotiated,
    writer: Mutex<Writer>,
    queue: Mutex<Queue<'a>>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// The reader waits here for the in-flight count to drop.
    room: Condvar,
}

impl<'c, 'a> Connection<'c, 'a> {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue<'a>> {
        lock(&self.queue)
    }

    /// Read and dispatch requests until the client leaves, breaks the
    /// protocol, stalls in the middle of a request, or the server stops;
    /// then wait for the jobs in flight. `spawn` starts a worker.
    fn read_requests(&'c self, stream: Stream, mut spawn: impl FnMut(&'c Self)) {
        let ctx = self.ctx;
        let stats = &ctx.shared.stats;
        let Ok(mut inbox) = Inbox::new(stream, READ_BUFFER, ctx.options.request_timeout) else {
            return;
        };
        let mut buffers = Buffers::default();
        // Writes' data too large for the inbox, apart from the buffers a
        // request runs with.
        let mut payload_buf = Vec::new();
        loop {
            if inbox.buffered().len() < RequestHeader::SIZE {
                // About to block: let the batched replies go first.
                lock(&self.writer).flush();
            }
            if ctx.shared.stopping() {
                self.refuse_buffered(&mut inbox);
                break;
            }
            if let Err(ended) = inbox.fill(RequestHeader::SIZE, false) {
                self.count_end(ended, inbox.buffered().len());
                break;
            }
            let head = inbox
                .buffered()
                .get(..RequestHeader::SIZE)
                .and_then(|h| <&[u8; RequestHeader::SIZE]>::try_from(h).ok());
            let Some(Ok(request)) = head.map(RequestHeader::decode) else {
                // Not a request: the stream cannot be trusted from here on.
                break;
            };
            inbox.consume(RequestHeader::SIZE);
            if request.command == CMD_DISC {
                break;
            }
            let payload_len = if request.command == CMD_WRITE {
                request.length as usize
            } else {
                0
            };
            if let Err(refusal) = validate_request(&ctx.export, &self.negotiated, &request) {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if refusal.disconnect {
                    break;
                }
                if payload_len > 0 {
                    if let Err(ended) = inbox.skip(payload_len as u64) {
                        self.count_end(ended, 1);
                        break;
                    }
                }
                let reply = Reply::Error {
                    errno: refusal.errno,
                    message: &refusal.message,
                };
                lock(&self.writer).reply(&request, reply, false);
                continue;
            }
            // A write's data: in the inbox when it fits, else read straight
            // into a buffer of its own.
            let in_inbox = payload_len <= inbox.capacity();
            if payload_len > 0 {
                if inbox.buffered().len() < payload_len {
                    lock(&self.writer).flush();
                }
                let got = if in_inbox {
                    inbox.fill(payload_len, true)
                } else {
                    if payload_buf.len() < payload_len {
                        payload_buf.resize(payload_len, 0);
                    }
                    inbox.read_exact_into(payload_buf.get_mut(..payload_len).unwrap_or(&mut []))
                };
                if let Err(ended) = got {
                    self.count_end(ended, 1);
                    break;
                }
            }
            let payload: &[u8] = if in_inbox {
                inbox.buffered().get(..payload_len).unwrap_or(&[])
            } else {
                payload_buf.get(..payload_len).unwrap_or(&[])
            };
            if let Some(n) = stats.by_command.get(command_index(request.command)) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            let ticket = ctx.device.admit(&order::Request {
                kind: execute::kind(&request),
                offset: request.offset,
                length: u64::from(request.length),
                source: self.id,
                data: (payload_len > 0).then_some(payload),
            });
            let inline = ctx.export.inline
                && !ticket.is_blocked()
                && request.command != CMD_FLUSH
                && request.flags & CMD_FLAG_FUA == 0;
            if inline {
                let outcome = execute::execute(
                    ctx,
                    self.id,
                    ticket.number(),
                    &request,
                    payload,
                    &mut buffers,
                );
                drop(ticket);
                lock(&self.writer).reply(&request, outcome.reply(&request, &buffers), false);
                buffers.trim();
            } else {
                let mut data = self.spare_payload();
                data.extend_from_slice(payload);
                self.hand_off(
                    Job {
                        request,
                        ticket,
                        payload: data,
                    },
                    &mut spawn,
                );
            }
            if in_inbox {
                inbox.consume(payload_len);
            }
            if payload_buf.capacity() > KEEP_BUFFER {
                payload_buf = Vec::new();
            }
        }
        // Wait for the jobs in flight; their replies go out (or are dropped).
        let mut queue = self.lock_queue();
        while queue.in_flight > 0 {
            queue = self
                .room
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The reading ended: a request cut short by the client leaving or
    /// stalling is counted (`partial`: bytes of one had come).
    fn count_end(&self, ended: Ended, partial: usize) {
        if partial > 0 || ended == Ended::Stalled {
            let stats = &self.ctx.shared.stats;
            stats.truncated_requests.fetch_add(1, Ordering::Relaxed);
            if ended == Ended::Stalled {
                stats.stalled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// An empty buffer for a write's data on its way to a worker: one that a
    /// worker gave back, so that no request allocates.
    fn spare_payload(&self) -> Vec<u8> {
        self.lock_queue().spare.pop().unwrap_or_default()
    }

    /// Give `job` to the workers, starting one if none is idle; first wait
    /// while the connection has `max_in_flight` requests, or
    /// [`MAX_QUEUED_BYTES`] of request data, in flight (one request of any
    /// size is always let through).
    fn hand_off(&'c self, job: Job<'a>, spawn: &mut impl FnMut(&'c Self)) {
        let cap = self.ctx.options.max_in_flight.max(1);
        let bytes = job.cost();
        let mut queue = self.lock_queue();
        while queue.in_flight >= cap
            || (queue.in_flight > 0 && queue.queued_bytes + bytes > MAX_QUEUED_BYTES)
        {
            lock(&self.writer).flush();
            queue = self
                .room
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        queue.jobs.push_back(job);
        queue.in_flight += 1;
        queue.queued_bytes += bytes;
        queue.peak_in_flight = queue.peak_in_flight.max(queue.in_flight);
        // One worker takes the jobs in the order they were admitted: their
        // numbers' order.
        let workers = if self.ctx.export.one_worker {
            1
        } else {
            MAX_WORKERS.min(cap)
        };
        let start = queue.idle == 0 && queue.workers < workers;
        if start {
            queue.workers += 1;
        }
        drop(queue);
        if start {
            spawn(self);
        } else {
            self.work.notify_one();
        }
    }

    /// A worker: run jobs until the connection closes.
    fn work(&self) {
        let mut buffers = Buffers::default();
        loop {
            let mut queue = self.lock_queue();
            let job = loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break Some(job);
                }
                if queue.closed {
                    break None;
                }
                queue.idle += 1;
                queue = self
                    .work
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                queue.idle -= 1;
            };
            drop(queue);
            let Some(Job {
                request,
                mut ticket,
                payload,
            }) = job
            else {
                return;
            };
            ticket.wait();
            let outcome = execute::execute(
                self.ctx,
                self.id,
                ticket.number(),
                &request,
                &payload,
                &mut buffers,
            );
            drop(ticket);
            lock(&self.writer).reply(&request, outcome.reply(&request, &buffers), true);
            buffers.trim();
            let cost = Job::cost_of(&request, &payload);
            let mut queue = self.lock_queue();
            queue.in_flight -= 1;
            queue.queued_bytes -= cost;
            if payload.capacity() > 0
                && payload.capacity() <= KEEP_BUFFER
                && queue.spare.len() < SPARE_PAYLOADS
            {
                let mut payload = payload;
                payload.clear();
                queue.spare.push(payload);
            }
            drop(queue);
            self.room.notify_all();
        }
    }

    /// The server is stopping: answer the requests already received whole
    /// with `ESHUTDOWN`, without running them.
    fn refuse_buffered(&self, inbox: &mut Inbox) {
        loop {
            let buffered = inbox.buffered();
            let Some(head) = buffered
                .get(..RequestHeader::SIZE)
                .and_then(|h| <&[u8; RequestHeader::SIZE]>::try_from(h).ok())
            else {
                return;
            };
            let Ok(request) = RequestHeader::decode(head) else {
                return;
            };
            let payload = if request.command == CMD_WRITE {
                request.length as usize
            } else {
                0
            };
            if request.command == CMD_DISC || buffered.len() < RequestHeader::SIZE + payload {
                return;
            }
            inbox.consume(RequestHeader::SIZE + payload);
            let reply = Reply::Error {
                errno: libc::ESHUTDOWN,
                message: "blkverify serve is shutting down",
            };
            lock(&self.writer).reply(&request, reply, false);
        }
    }
}

/// The index of `command` in the summary's counts.
fn command_index(command: u16) -> usize {
    use crate::nbd::wire::{CMD_BLOCK_STATUS, CMD_CACHE, CMD_READ, CMD_TRIM, CMD_WRITE_ZEROES};
    match command {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_WRITE_ZEROES => 2,
        CMD_TRIM => 3,
        CMD_FLUSH => 4,
        CMD_CACHE => 5,
        CMD_BLOCK_STATUS => 6,
        _ => usize::MAX,
    }
}
