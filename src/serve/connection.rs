//! One client: the handshake (within the time limit), then its requests.
//!
//! The client's thread reads requests. Each is checked (`validate`), its
//! data read, and it is admitted to the device, which numbers it. If it
//! conflicts with nothing in flight and both sides are local files, it runs
//! right there and its reply joins the batch written when the thread is about
//! to block reading; otherwise (it must wait for an earlier request, it is a
//! flush or has FUA, or a side is an NBD export whose latency wants requests
//! in flight) it goes to the connection's workers. At most
//! `max_in_flight` requests wait for or run on workers; past that the thread
//! reads no more, so a client cannot make serve hold more than that much.
//!
//! The connection ends when the client disconnects (`NBD_CMD_DISC` or EOF),
//! breaks the protocol, or the server stops: requests already running finish
//! on both sides, and replies to a client that left are dropped and counted.

use super::execute::{self, Buffers, KEEP_BUFFER};
use super::handshake::{self, Negotiated};
use super::reply::{Reply, Writer};
use super::validate::validate_request;
use super::{lock, Context};
use crate::blkverify::order::{self, Ticket};
use crate::nbd::wire::{RequestHeader, CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_WRITE, MAX_REQUEST};
use crate::nbd::Stream;
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The reading side's buffer: many small requests arrive in one `read`.
const READ_BUFFER: usize = 256 << 10;

/// How long a reply may take to leave: a client that stops reading for this
/// long is dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The most worker threads one connection starts.
const MAX_WORKERS: usize = 8;

/// The most write data one connection holds for its workers (one request of
/// any size is always let through).
pub(super) const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Serve one client on `stream` until it leaves or the server stops.
pub(super) fn serve(ctx: &Context<'_>, id: u64, stream: Stream) {
    let mut slot = Slot { ctx, held: false };
    let Some(negotiated) = handshake(ctx, &stream, &mut slot) else {
        return;
    };
    ctx.shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_read_timeout(None);
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
        connection.read_requests(stream, |connection| {
            scope.spawn(move || connection.work());
        });
        let mut queue = connection.lock_queue();
        queue.closed = true;
        drop(queue);
        connection.work.notify_all();
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

#[derive(Default)]
struct Queue<'d> {
    jobs: VecDeque<Job<'d>>,
    /// Jobs queued or running.
    in_flight: usize,
    /// Their write data.
    queued_bytes: usize,
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

    /// Read and dispatch requests until the client leaves or the server
    /// stops; then wait for the jobs in flight. `spawn` starts a worker.
    fn read_requests(&'c self, stream: Stream, mut spawn: impl FnMut(&'c Self)) {
        let ctx = self.ctx;
        let stats = &ctx.shared.stats;
        let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
        let mut buffers = Buffers::default();
        // Writes' data, apart from the buffers a request runs with.
        let mut payload_buf = Vec::new();
        loop {
            if reader.buffer().len() < RequestHeader::SIZE {
                // About to block: let the batched replies go first.
                lock(&self.writer).flush();
            }
            if ctx.shared.stopping() {
                self.refuse_buffered(&mut reader);
                break;
            }
            let mut head = [0u8; RequestHeader::SIZE];
            if reader.read_exact(&mut head).is_err() {
                break;
            }
            let Ok(request) = RequestHeader::decode(&head) else {
                // Not a request: the stream cannot be trusted from here on.
                break;
            };
            if request.command == CMD_DISC {
                break;
            }
            let length = request.length as usize;
            let payload_len = if request.command == CMD_WRITE {
                length
            } else {
                0
            };
            if let Err(refusal) = validate_request(&ctx.export, &self.negotiated, &request) {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if payload_len > 0 && !skip(&mut reader, payload_len as u64) {
                    stats.truncated_requests.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let reply = Reply::Error {
                    errno: refusal.errno,
                    message: &refusal.message,
                };
                lock(&self.writer).reply(&request, reply, false);
                continue;
            }
            if payload_len > 0 {
                if reader.buffer().len() < payload_len {
                    lock(&self.writer).flush();
                }
                if payload_buf.len() < payload_len {
                    payload_buf.resize(payload_len, 0);
                }
                let payload = payload_buf.get_mut(..payload_len).unwrap_or(&mut []);
                if reader.read_exact(payload).is_err() {
                    stats.truncated_requests.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            let kind = execute::kind(&request);
            if let Some(n) = stats.by_command.get(command_index(request.command)) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            let ticket = ctx.device.admit(&order::Request {
                kind,
                offset: request.offset,
                length: u64::from(request.length),
                source: self.id,
                data: (payload_len > 0).then(|| payload_buf.get(..payload_len).unwrap_or(&[])),
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
                    payload_buf.get(..payload_len).unwrap_or(&[]),
                    &mut buffers,
                );
                drop(ticket);
                lock(&self.writer).reply(&request, outcome.reply(&request, &buffers), false);
                buffers.trim();
                if payload_buf.capacity() > KEEP_BUFFER {
                    payload_buf = Vec::new();
                }
                continue;
            }
            let payload = if payload_len > 0 {
                let mut data = std::mem::take(&mut payload_buf);
                data.truncate(payload_len);
                data
            } else {
                Vec::new()
            };
            self.hand_off(
                Job {
                    request,
                    ticket,
                    payload,
                },
                &mut spawn,
            );
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

    /// Give `job` to the workers, starting one if none is idle; first wait
    /// while the connection has `max_in_flight` requests in flight.
    fn hand_off(&'c self, job: Job<'a>, spawn: &mut impl FnMut(&'c Self)) {
        let cap = self.ctx.options.max_in_flight.max(1);
        let bytes = job.payload.len();
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
        let start = queue.idle == 0 && queue.workers < MAX_WORKERS.min(cap);
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
            let mut queue = self.lock_queue();
            queue.in_flight -= 1;
            queue.queued_bytes -= payload.len();
            drop(queue);
            self.room.notify_all();
        }
    }

    /// The server is stopping: answer the requests already received whole
    /// with `ESHUTDOWN`, without running them.
    fn refuse_buffered(&self, reader: &mut BufReader<Stream>) {
        loop {
            let buffered = reader.buffer();
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
            reader.consume(RequestHeader::SIZE + payload);
            let reply = Reply::Error {
                errno: libc::ESHUTDOWN,
                message: "blkverify serve is shutting down",
            };
            lock(&self.writer).reply(&request, reply, false);
        }
    }
}

/// Read and throw away `n` bytes (a refused write's data), up to twice the
/// largest request; false if the client left, or sent more than that (the
/// connection is then dropped: a denial of service).
fn skip(reader: &mut impl Read, n: u64) -> bool {
    if n > 2 * MAX_REQUEST {
        return false;
    }
    io::copy(&mut reader.take(n), &mut io::sink()).is_ok_and(|copied| copied == n)
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
