//! One NBD connection with many requests in flight, matched by cookie.
//!
//! Any number of threads call [`Connection::call`] at once. Each request gets a
//! cookie and a slot in a table, and is sent whole under the writer lock. The
//! replies may come back in any order (the protocol allows it, and servers do:
//! `qemu-nbd` runs each request in its own coroutine), so no thread owns the
//! reading side: a waiting thread that finds it free becomes the reader. It
//! reads replies, files each one into its request's slot and wakes the thread
//! that waits for it, until its own reply is in; then it hands the reading to
//! another waiting thread. We rejected a reader thread of our own: it costs a
//! second thread switch for every reply, while here, at queue depth 1, the
//! caller reads its own reply as it did when one request was all we allowed.
//!
//! A server error answers one request. A reply for a cookie no request has, a
//! malformed reply, a closed connection, or a server silent for the timeout
//! while requests wait (bytes arriving keep it alive: a busy server is not a
//! dead one) breaks the connection: every request waiting fails with the
//! reason, and later ones fail at once. The socket is shut down, so nothing
//! blocks on it, and the position in the stream is never guessed at.

use super::{explain_timeout, MAX_OPTION_REPLY, MAX_STATUS_REPLY};
use crate::nbd::wire::{
    command_name, ChunkHeader, RequestHeader, SimpleReply, Wire, CMD_BLOCK_STATUS, CMD_DISC,
    CMD_READ, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use crate::nbd::Stream;
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// Requests whose data is at most this long go out in one `write` with their
/// header (one system call, one packet); longer ones are not copied.
const COALESCE_MAX: usize = 64 << 10;

/// The reading side's buffer: several small replies arrive in one `read`.
const READ_BUFFER: usize = 256 << 10;

/// A request's header fields (the magic and the cookie aside).
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// The request as messages name it: `read at offset 0x1000 (4096 bytes)`.
    pub fn describe(&self) -> String {
        format!(
            "{} at offset {:#x} ({} bytes)",
            command_name(self.command),
            self.offset,
            self.length
        )
    }

    fn is_read(&self) -> bool {
        self.command == CMD_READ
    }
}

/// Where a reply's payload goes.
pub(super) enum Payload<'a> {
    /// No payload expected.
    None,
    /// Read data, into this buffer.
    Data(&'a mut [u8]),
    /// Block status extents `(length, flags)` for the negotiated context.
    Status(&'a mut Vec<(u32, u32)>),
}

/// A complete reply's payload: a read's data, a block status request's extents.
type Reply = (Vec<u8>, Vec<(u32, u32)>);

/// Why a request did not succeed.
#[derive(Debug, Clone)]
pub(super) enum Failure {
    /// The server answered it with an error: the code and its message.
    Server { code: u32, message: String },
    /// The connection failed (and is unusable): what kind of failure, and why.
    Connection { kind: io::ErrorKind, reason: String },
}

/// A request in flight.
struct Slot {
    request: Request,
    /// The thread that waits for the reply.
    waiter: Thread,
    /// The waiter has sent its request and waits (or reads): a reader that
    /// hands over picks such a slot, never one still being sent.
    waiting: bool,
    /// A read's data, filled in by whichever thread reads the reply.
    data: Vec<u8>,
    /// A block status request's extents `(length, flags)`, likewise. For a
    /// read: the pieces of it that data and hole chunks covered so far,
    /// `(start, end)` from the request's offset, adjacent ones merged (a
    /// structured read succeeds only when they cover it exactly once).
    extents: Vec<(u32, u32)>,
    /// The first error chunk of a structured reply still in progress.
    server_error: Option<(u32, String)>,
    /// Set when the reply is complete, or the connection failed.
    outcome: Option<Result<(), Failure>>,
    sent: Instant,
}

#[derive(Default)]
struct Table {
    slots: HashMap<u64, Slot>,
    next_cookie: u64,
    /// Why the connection is unusable, once it is.
    broken: Option<String>,
}

/// The reading side: whoever holds it reads replies.
struct Replies {
    stream: BufReader<Stream>,
    /// When bytes last arrived (a busy server still sends some).
    last_received: Instant,
}

/// A structured reply chunk's type and payload length.
#[derive(Clone, Copy)]
struct Chunk {
    kind: u16,
    len: u32,
}

/// One connection to an NBD server, after the handshake.
pub(super) struct Connection {
    writer: Mutex<Stream>,
    reader: Mutex<Replies>,
    table: Mutex<Table>,
    /// A handle to shut the socket down with, whoever holds the others.
    control: Stream,
    structured: bool,
    /// The negotiated `base:allocation` context id, if any.
    status_context: Option<u32>,
    timeout: Duration,
    /// How often a blocked reader looks at the clock, and a waiter at its slot.
    poll: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Connection {
    /// Take over `stream` after the handshake. `timeout` bounds how long the
    /// server may stay silent while requests wait, and every write.
    pub fn new(
        stream: Stream,
        structured: bool,
        status_context: Option<u32>,
        timeout: Duration,
    ) -> io::Result<Connection> {
        let poll = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        stream.set_timeouts(poll, timeout)?;
        Ok(Connection {
            writer: Mutex::new(stream.try_clone()?),
            reader: Mutex::new(Replies {
                stream: BufReader::with_capacity(READ_BUFFER, stream.try_clone()?),
                last_received: Instant::now(),
            }),
            table: Mutex::default(),
            control: stream,
            structured,
            status_context,
            timeout,
            poll,
        })
    }

    /// Send `request` (with `write_data` for a write) and wait for its reply,
    /// while other threads' requests are in flight on the same connection. A
    /// read's data lands in `payload`'s buffer, which is `request.length`
    /// long; a block status request's extents in its vector.
    pub fn call(
        &self,
        request: Request,
        write_data: Option<&[u8]>,
        payload: Payload<'_>,
    ) -> Result<(), Failure> {
        let cookie = self.register(request)?;
        if let Err(e) = self.send(cookie, &request, write_data) {
            let e = explain_timeout(e, self.timeout);
            self.break_connection(e.kind(), format!("sending the request failed: {e}"));
        }
        let (data, extents) = self.wait(cookie)?;
        match payload {
            Payload::None => {}
            Payload::Status(out) => *out = extents,
            Payload::Data(buf) => {
                let src = data.get(..buf.len()).ok_or_else(|| Failure::Connection {
                    kind: io::ErrorKind::InvalidData,
                    reason: "the reply is shorter than the request".to_string(),
                })?;
                buf.copy_from_slice(src);
            }
        }
        Ok(())
    }

    fn register(&self, request: Request) -> Result<u64, Failure> {
        // Made before locking: every thread needs the table.
        let data = if request.is_read() {
            // At most MAX_REQUEST (32 MiB), checked before a request is made.
            vec![0u8; request.length as usize]
        } else {
            Vec::new()
        };
        let slot = Slot {
            request,
            waiter: thread::current(),
            waiting: false,
            data,
            extents: Vec::new(),
            server_error: None,
            outcome: None,
            sent: Instant::now(),
        };
        let mut table = lock(&self.table);
        if let Some(why) = &table.broken {
            return Err(Failure::Connection {
                kind: io::ErrorKind::BrokenPipe,
                reason: format!("connection unusable after an earlier error: {why}"),
            });
        }
        table.next_cookie = table.next_cookie.wrapping_add(1);
        let cookie = table.next_cookie;
        table.slots.insert(cookie, slot);
        Ok(cookie)
    }

    fn send(&self, cookie: u64, request: &Request, write_data: Option<&[u8]>) -> io::Result<()> {
        let header = RequestHeader {
            flags: request.flags,
            command: request.command,
            cookie,
            offset: request.offset,
            length: request.length,
        }
        .encode();
        let mut writer = lock(&self.writer);
        match write_data {
            Some(data) if data.len() <= COALESCE_MAX => {
                let mut message = Vec::with_capacity(header.len() + data.len());
                message.extend_from_slice(&header);
                message.extend_from_slice(data);
                writer.write_all(&message)
            }
            Some(data) => {
                writer.write_all(&header)?;
                writer.write_all(data)
            }
            None => writer.write_all(&header),
        }
    }

    /// Wait for `cookie`'s reply, reading replies whenever nobody else does.
    fn wait(&self, cookie: u64) -> Result<Reply, Failure> {
        loop {
            if let Some(replies) = self.try_reader() {
                return self.read_as_reader(replies, cookie);
            }
            {
                let mut table = lock(&self.table);
                match table.slots.get_mut(&cookie) {
                    Some(slot) if slot.outcome.is_none() => slot.waiting = true,
                    _ => return take_outcome(&mut table, cookie),
                }
            }
            // The reader may have left after our first try and before it
            // could see our flag: try again, or sleep until a reader that
            // leaves later (and so sees the flag) wakes us.
            if let Some(replies) = self.try_reader() {
                return self.read_as_reader(replies, cookie);
            }
            thread::park_timeout(self.poll);
        }
    }

    /// The reading side, if nobody holds it.
    fn try_reader(&self) -> Option<MutexGuard<'_, Replies>> {
        match self.reader.try_lock() {
            Ok(replies) => Some(replies),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// As the reader: read replies until `cookie`'s is complete (or the
    /// connection fails), then hand the reading to a waiting thread and take
    /// the reply.
    fn read_as_reader(
        &self,
        mut replies: MutexGuard<'_, Replies>,
        cookie: u64,
    ) -> Result<Reply, Failure> {
        self.read_until(&mut replies, cookie);
        drop(replies);
        let mut table = lock(&self.table);
        let next = next_reader(&table, cookie);
        let outcome = take_outcome(&mut table, cookie);
        drop(table);
        if let Some(next) = next {
            next.unpark();
        }
        outcome
    }

    /// Read replies until `cookie`'s is complete, or the connection fails.
    fn read_until(&self, replies: &mut Replies, cookie: u64) {
        // The previous reader may have filed our reply before we got here.
        if lock(&self.table)
            .slots
            .get(&cookie)
            .is_none_or(|s| s.outcome.is_some())
        {
            return;
        }
        loop {
            match self.read_reply(replies) {
                Ok(Some(done)) if done == cookie => return,
                Ok(_) => {}
                Err(Wire::Io(e)) => {
                    let e = explain_timeout(e, self.timeout);
                    return self.break_connection(e.kind(), e.to_string());
                }
                Err(Wire::Protocol(m)) => {
                    return self.break_connection(io::ErrorKind::InvalidData, m);
                }
            }
        }
    }

    /// Fail every request in flight with `reason`, and all later ones.
    fn break_connection(&self, kind: io::ErrorKind, reason: String) {
        let mut table = lock(&self.table);
        table.broken.get_or_insert_with(|| reason.clone());
        let waiters: Vec<Thread> = table
            .slots
            .values_mut()
            .filter(|s| s.outcome.is_none())
            .map(|slot| {
                slot.outcome = Some(Err(Failure::Connection {
                    kind,
                    reason: reason.clone(),
                }));
                slot.waiter.clone()
            })
            .collect();
        drop(table);
        for waiter in waiters {
            waiter.unpark();
        }
        // Wake anything blocked on the socket; the stream is of no more use.
        let _ = self.control.shutdown();
    }

    /// Read one reply message (a simple reply, or one chunk of a structured
    /// one) and file it. Returns the cookie whose reply it completed.
    fn read_reply(&self, replies: &mut Replies) -> Result<Option<u64>, Wire> {
        let magic = u32::from_be_bytes(self.fill_array(replies)?);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let SimpleReply { error, cookie } =
                    SimpleReply::decode_body(&self.fill_array(replies)?);
                // An error reply, or one to anything but a read, has no data:
                // it is filed at once.
                let error = (error != 0).then(|| (error, String::new()));
                let finished = |r: &Request| {
                    if error.is_none() && r.command == CMD_BLOCK_STATUS {
                        return Err(Wire::Protocol(format!(
                            "simple reply to {}, which needs a structured one",
                            r.describe()
                        )));
                    }
                    Ok(error.is_some() || !r.is_read())
                };
                if let Some((_, (mut data, _))) = self.claim(cookie, &error, finished)? {
                    self.fill(replies, &mut data)?;
                    // A simple reply's data covers the whole read.
                    let whole = vec![(0, data.len() as u32)];
                    self.file(cookie, data, whole, None, true);
                }
                Ok(Some(cookie))
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let ChunkHeader {
                    flags,
                    kind: chunk_type,
                    cookie,
                    length: len,
                } = ChunkHeader::decode_body(&self.fill_array(replies)?);
                let done = flags & REPLY_FLAG_DONE != 0;
                // The chunk that ends most replies to writes: nothing follows.
                let finished = |_: &Request| Ok(done && chunk_type == REPLY_TYPE_NONE && len == 0);
                if let Some((request, (mut data, mut extents))) =
                    self.claim(cookie, &None, finished)?
                {
                    let chunk = Chunk {
                        kind: chunk_type,
                        len,
                    };
                    let error =
                        self.read_chunk(replies, &request, (&mut data, &mut extents), chunk)?;
                    self.file(cookie, data, extents, error, done);
                }
                Ok(done.then_some(cookie))
            }
            other => Err(Wire::Protocol(format!("reply has bad magic {other:#010x}"))),
        }
    }

    /// The payload of one structured reply chunk for `request`, whose data
    /// buffer and extents are `out`. Returns the server's error, for an error
    /// chunk.
    fn read_chunk(
        &self,
        replies: &mut Replies,
        request: &Request,
        out: (&mut [u8], &mut Vec<(u32, u32)>),
        chunk: Chunk,
    ) -> Result<Option<(u32, String)>, Wire> {
        let (data, extents) = out;
        let Chunk {
            kind: chunk_type,
            len,
        } = chunk;
        match chunk_type {
            REPLY_TYPE_NONE if len == 0 => Ok(None),
            REPLY_TYPE_NONE => Err(Wire::Protocol("NONE chunk with a payload".to_string())),
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                if !request.is_read() {
                    return Err(Wire::Protocol(format!(
                        "data chunk in reply to {}",
                        request.describe()
                    )));
                }
                let at = u64::from_be_bytes(self.fill_array(replies)?);
                let n = if chunk_type == REPLY_TYPE_OFFSET_DATA {
                    len.checked_sub(8).ok_or_else(|| {
                        Wire::Protocol("OFFSET_DATA chunk shorter than its header".to_string())
                    })?
                } else if len == 12 {
                    u32::from_be_bytes(self.fill_array(replies)?)
                } else {
                    return Err(Wire::Protocol(
                        "OFFSET_HOLE chunk of wrong length".to_string(),
                    ));
                };
                let outside = || {
                    Wire::Protocol(format!(
                        "chunk at {at:#x} ({n} bytes) lies outside {}",
                        request.describe()
                    ))
                };
                let from = at
                    .checked_sub(request.offset)
                    .and_then(|r| usize::try_from(r).ok())
                    .ok_or_else(outside)?;
                let to = from.checked_add(n as usize).ok_or_else(outside)?;
                let dst = data.get_mut(from..to).ok_or_else(outside)?;
                // Inside the request: `from` and `to` fit its u32 length.
                cover(extents, from as u32, to as u32).map_err(|why| {
                    Wire::Protocol(format!(
                        "chunk at {at:#x} ({n} bytes) in reply to {}: {why}",
                        request.describe()
                    ))
                })?;
                if chunk_type == REPLY_TYPE_OFFSET_DATA {
                    self.fill(replies, dst)?;
                } else {
                    dst.fill(0);
                }
                Ok(None)
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let Some(context) = self
                    .status_context
                    .filter(|_| request.command == CMD_BLOCK_STATUS)
                else {
                    return Err(Wire::Protocol(format!(
                        "block status chunk in reply to {}",
                        request.describe()
                    )));
                };
                if len < 12 || (len - 4) % 8 != 0 || len > MAX_STATUS_REPLY {
                    return Err(Wire::Protocol(format!(
                        "block status chunk of {len} bytes is not a context id and whole extents"
                    )));
                }
                let id = u32::from_be_bytes(self.fill_array(replies)?);
                if id != context {
                    return Err(Wire::Protocol(format!(
                        "block status for context {id}, not the negotiated {context}"
                    )));
                }
                let count = ((len - 4) / 8) as usize;
                if extents.len().saturating_add(count) > (MAX_STATUS_REPLY / 8) as usize {
                    return Err(Wire::Protocol(format!(
                        "block status chunks in reply to {} hold more than {} extents",
                        request.describe(),
                        MAX_STATUS_REPLY / 8
                    )));
                }
                for _ in 0..count {
                    let length = u32::from_be_bytes(self.fill_array(replies)?);
                    let flags = u32::from_be_bytes(self.fill_array(replies)?);
                    extents.push((length, flags));
                }
                Ok(None)
            }
            t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                if !(6..=MAX_OPTION_REPLY).contains(&len) {
                    return Err(Wire::Protocol(format!("error chunk of {len} bytes")));
                }
                let code = u32::from_be_bytes(self.fill_array(replies)?);
                let message_len = u32::from(u16::from_be_bytes(self.fill_array(replies)?));
                let rest = len - 6;
                if message_len > rest {
                    return Err(Wire::Protocol("error chunk lengths disagree".to_string()));
                }
                let mut message = vec![0u8; message_len as usize];
                self.fill(replies, &mut message)?;
                self.skip(replies, u64::from(rest - message_len))?;
                Ok(Some((code, String::from_utf8_lossy(&message).into_owned())))
            }
            // Chunk types we do not know carry nothing we need.
            _ if len <= MAX_OPTION_REPLY => {
                self.skip(replies, u64::from(len))?;
                Ok(None)
            }
            other => Err(Wire::Protocol(format!(
                "unknown chunk type {other} too large"
            ))),
        }
    }

    /// Claim a reply message for `cookie`, which must be a request in flight.
    /// If `finished` says no bytes follow that matter, the reply is filed now
    /// (with `error`), under the same lock, and `None` returned; otherwise the
    /// request and its data buffer, taken out of the table so that the table
    /// is not locked while the socket fills it.
    fn claim(
        &self,
        cookie: u64,
        error: &Option<(u32, String)>,
        finished: impl FnOnce(&Request) -> Result<bool, Wire>,
    ) -> Result<Option<(Request, Reply)>, Wire> {
        let mut table = lock(&self.table);
        let slot = match table.slots.get_mut(&cookie) {
            Some(slot) if slot.outcome.is_none() => slot,
            _ => {
                return Err(Wire::Protocol(format!(
                    "the server replied to cookie {cookie:#x}, which no request in flight has"
                )))
            }
        };
        if finished(&slot.request)? {
            let waiter = complete(slot, error.clone());
            drop(table);
            waiter.unpark();
            return Ok(None);
        }
        let reply = (
            std::mem::take(&mut slot.data),
            std::mem::take(&mut slot.extents),
        );
        Ok(Some((slot.request, reply)))
    }

    /// File a reply message for `cookie`: its data buffer and extents back,
    /// the server's error (the first counts), and, when the reply is `done`,
    /// its outcome, waking its waiter.
    fn file(
        &self,
        cookie: u64,
        data: Vec<u8>,
        extents: Vec<(u32, u32)>,
        error: Option<(u32, String)>,
        done: bool,
    ) {
        let mut table = lock(&self.table);
        let Some(slot) = table.slots.get_mut(&cookie) else {
            return;
        };
        slot.data = data;
        slot.extents = extents;
        if done {
            let waiter = complete(slot, error);
            drop(table);
            waiter.unpark();
        } else if let Some(error) = error {
            slot.server_error.get_or_insert(error);
        }
    }

    fn fill_array<const N: usize>(&self, replies: &mut Replies) -> Result<[u8; N], Wire> {
        let mut bytes = [0u8; N];
        self.fill(replies, &mut bytes)?;
        Ok(bytes)
    }

    fn skip(&self, replies: &mut Replies, mut n: u64) -> Result<(), Wire> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let take = n.min(scratch.len() as u64) as usize;
            self.fill(replies, scratch.get_mut(..take).unwrap_or(&mut []))?;
            n -= take as u64;
        }
        Ok(())
    }

    /// Fill `buf` from the socket. A read that times out is retried while the
    /// server is not overdue: bytes arrived or a request was sent within the
    /// timeout.
    fn fill(&self, replies: &mut Replies, buf: &mut [u8]) -> Result<(), Wire> {
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            match replies.stream.read(rest) {
                Ok(0) => {
                    return Err(Wire::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    )))
                }
                Ok(n) => {
                    done += n;
                    replies.last_received = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.overdue(replies.last_received) {
                        return Err(Wire::Io(e));
                    }
                }
                Err(e) => return Err(Wire::Io(e)),
            }
        }
        Ok(())
    }

    /// Whether the server has been silent for the timeout while a request
    /// waited: nothing arrived since the later of the last bytes received and
    /// the oldest waiting request's sending.
    fn overdue(&self, last_received: Instant) -> bool {
        let table = lock(&self.table);
        let oldest = table
            .slots
            .values()
            .filter(|s| s.outcome.is_none())
            .map(|s| s.sent)
            .min();
        oldest.is_some_and(|sent| sent.max(last_received).elapsed() >= self.timeout)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Tell the server we are leaving; ignore failures.
        if lock(&self.table).broken.is_none() {
            let header = RequestHeader {
                flags: 0,
                command: CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            }
            .encode();
            let _ = lock(&self.writer).write_all(&header);
        }
    }
}

/// A thread that waits for a reply (not `me`, the reader leaving), to wake so
/// that it becomes the reader.
fn next_reader(table: &Table, me: u64) -> Option<Thread> {
    table
        .slots
        .iter()
        .find(|(cookie, s)| **cookie != me && s.waiting && s.outcome.is_none())
        .map(|(_, s)| s.waiter.clone())
}

/// The reply in `slot` is complete: set its outcome (the first server error
/// of its chunks, or `error`). Returns its waiter, to wake once the table is
/// unlocked (a wake-up is a system call: not one made holding the lock every
/// thread needs).
fn complete(slot: &mut Slot, error: Option<(u32, String)>) -> Thread {
    let request = slot.request;
    slot.outcome = Some(match slot.server_error.take().or(error) {
        Some((code, message)) => Err(Failure::Server { code, message }),
        // A read that succeeds must have had every byte sent: data the
        // server never sent would read as zeros.
        None if request.is_read() && slot.extents != [(0, request.length)] => {
            let covered: u64 = slot
                .extents
                .iter()
                .map(|(start, end)| u64::from(end - start))
                .sum();
            Err(Failure::Connection {
                kind: io::ErrorKind::InvalidData,
                reason: format!(
                    "the server's reply to {} covers {covered} of its {} bytes",
                    request.describe(),
                    request.length
                ),
            })
        }
        None => Ok(()),
    });
    slot.waiter.clone()
}

/// The most separate pieces a read's reply may come in before they join up.
const MAX_PIECES: usize = 4096;

/// Add `[from, to)` to the sorted, merged pieces of a read covered so far;
/// an error if it overlaps one, or if there are too many pieces.
fn cover(pieces: &mut Vec<(u32, u32)>, from: u32, to: u32) -> Result<(), String> {
    if from == to {
        return Ok(());
    }
    // The first piece that ends after `from`: the only one that can overlap.
    let at = pieces.partition_point(|&(_, end)| end <= from);
    if pieces.get(at).is_some_and(|&(start, _)| start < to) {
        return Err("it overlaps data the reply already sent".to_string());
    }
    // Join the piece that ends at `from` and the one that starts at `to`.
    let before = at
        .checked_sub(1)
        .filter(|&b| pieces.get(b).is_some_and(|p| p.1 == from));
    let after = pieces.get(at).is_some_and(|&(start, _)| start == to);
    match (before, after) {
        (Some(b), true) => {
            let end = pieces.get(at).map_or(to, |&(_, end)| end);
            if let Some(piece) = pieces.get_mut(b) {
                piece.1 = end;
            }
            pieces.remove(at);
        }
        (Some(b), false) => {
            if let Some(piece) = pieces.get_mut(b) {
                piece.1 = to;
            }
        }
        (None, true) => {
            if let Some(piece) = pieces.get_mut(at) {
                piece.0 = from;
            }
        }
        (None, false) => {
            if pieces.len() >= MAX_PIECES {
                return Err(format!(
                    "the reply comes in more than {MAX_PIECES} separate pieces"
                ));
            }
            pieces.insert(at, (from, to));
        }
    }
    Ok(())
}

/// Remove `cookie`'s slot, whose reply is complete: its data, or its failure.
fn take_outcome(table: &mut Table, cookie: u64) -> Result<Reply, Failure> {
    match table.slots.remove(&cookie) {
        Some(Slot {
            outcome: Some(outcome),
            data,
            extents,
            ..
        }) => outcome.map(|()| (data, extents)),
        _ => Err(Failure::Connection {
            kind: io::ErrorKind::Other,
            reason: format!("request with cookie {cookie:#x} has no reply"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::cover;

    #[test]
    fn pieces_merge_and_overlaps_are_refused() {
        let mut pieces = Vec::new();
        cover(&mut pieces, 100, 200).unwrap();
        cover(&mut pieces, 0, 50).unwrap();
        cover(&mut pieces, 300, 400).unwrap();
        assert_eq!(pieces, [(0, 50), (100, 200), (300, 400)]);
        cover(&mut pieces, 200, 300).unwrap();
        assert_eq!(pieces, [(0, 50), (100, 400)]);
        cover(&mut pieces, 50, 100).unwrap();
        assert_eq!(pieces, [(0, 400)]);
        assert!(cover(&mut pieces, 399, 401).is_err());
        let mut gap = vec![(0, 50), (60, 100)];
        assert!(
            cover(&mut gap, 50, 70).is_err(),
            "overlaps the piece after the gap"
        );
        assert_eq!(gap, [(0, 50), (60, 100)]);
        assert!(cover(&mut pieces, 0, 1).is_err());
        cover(&mut pieces, 400, 400).unwrap();
        cover(&mut pieces, 400, 512).unwrap();
        assert_eq!(pieces, [(0, 512)]);
        let mut many = Vec::new();
        for i in 0..super::MAX_PIECES as u32 {
            cover(&mut many, 2 * i, 2 * i + 1).unwrap();
        }
        assert!(cover(&mut many, 10_000_000, 10_000_001).is_err());
    }
}
