//! Replies, simple or structured as the client negotiated, written in
//! batches: replies to requests run on the reading thread wait in a buffer
//! until that thread is about to block (one `write` for all of them); large
//! reads go out with one `writev`, header and data, never copied.
//!
//! A client that left is not an error here: its replies are counted as
//! dropped (the requests themselves ran on both sides).

use crate::nbd::wire::{
    errno_to_nbd, ChunkHeader, RequestHeader, SimpleReply, CMD_READ, MAX_STRING, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
};
use crate::nbd::Stream;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

/// Data up to this size is copied into the batch; larger goes out at once.
const COPY_MAX: usize = 64 << 10;

/// A batch is written when it grows past this.
const BATCH_MAX: usize = 256 << 10;

/// What a request came to, as its reply says it.
pub(super) enum Reply<'a> {
    /// A read's data.
    Data(&'a [u8]),
    /// Success without data.
    Done,
    /// Failure: an errno and a message for people (structured replies carry it).
    Error { errno: i32, message: &'a str },
    /// Block status extents `(length, flags)` of the `base:allocation` context.
    Status {
        context: u32,
        extents: &'a [(u32, u32)],
    },
}

/// The writing side of one connection.
pub(super) struct Writer {
    stream: Stream,
    structured: bool,
    batch: Vec<u8>,
    /// Replies in `batch`.
    batched: u64,
    /// The client is gone (a write failed): every later reply is dropped.
    gone: bool,
    /// Replies that never reached the client.
    pub dropped: u64,
}

impl Writer {
    pub fn new(stream: Stream, structured: bool) -> Writer {
        Writer {
            stream,
            structured,
            batch: Vec::with_capacity(BATCH_MAX),
            batched: 0,
            gone: false,
            dropped: 0,
        }
    }

    /// Queue the reply to `request`; with `now`, write it (and the batch)
    /// before returning.
    pub fn reply(&mut self, request: &RequestHeader, reply: Reply<'_>, now: bool) {
        if self.gone {
            self.dropped += 1;
            return;
        }
        let cookie = request.cookie;
        let is_read = request.command == CMD_READ;
        let mut head = [0u8; 32];
        let mut head_len = 0usize;
        let mut push = |bytes: &[u8]| {
            if let Some(dst) = head.get_mut(head_len..head_len + bytes.len()) {
                dst.copy_from_slice(bytes);
                head_len += bytes.len();
            }
        };
        let mut body: &[u8] = &[];
        let mut owned = Vec::new();
        match (reply, self.structured) {
            (Reply::Data(data), true) if !data.is_empty() => {
                push(
                    &ChunkHeader {
                        flags: REPLY_FLAG_DONE,
                        kind: REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        length: 8 + data.len() as u32,
                    }
                    .encode(),
                );
                push(&request.offset.to_be_bytes());
                body = data;
            }
            (Reply::Data(_) | Reply::Done, true) if is_read => push(
                &ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    kind: REPLY_TYPE_NONE,
                    cookie,
                    length: 0,
                }
                .encode(),
            ),
            (Reply::Data(data), false) => {
                push(&SimpleReply { error: 0, cookie }.encode());
                body = data;
            }
            (Reply::Data(_) | Reply::Done, _) => push(&SimpleReply { error: 0, cookie }.encode()),
            (Reply::Error { errno, message }, true) => {
                let message = message.as_bytes();
                let message = message.get(..MAX_STRING).unwrap_or(message);
                push(
                    &ChunkHeader {
                        flags: REPLY_FLAG_DONE,
                        kind: REPLY_TYPE_ERROR,
                        cookie,
                        length: 6 + message.len() as u32,
                    }
                    .encode(),
                );
                push(&errno_to_nbd(errno, request.command, request.flags).to_be_bytes());
                push(&(message.len() as u16).to_be_bytes());
                body = message;
            }
            (Reply::Error { errno, .. }, false) => push(
                &SimpleReply {
                    error: errno_to_nbd(errno, request.command, request.flags),
                    cookie,
                }
                .encode(),
            ),
            (Reply::Status { context, extents }, _) => {
                push(
                    &ChunkHeader {
                        flags: REPLY_FLAG_DONE,
                        kind: REPLY_TYPE_BLOCK_STATUS,
                        cookie,
                        length: 4 + 8 * extents.len() as u32,
                    }
                    .encode(),
                );
                push(&context.to_be_bytes());
                owned.reserve(8 * extents.len());
                for (length, flags) in extents {
                    owned.extend_from_slice(&length.to_be_bytes());
                    owned.extend_from_slice(&flags.to_be_bytes());
                }
                body = &owned;
            }
        }
        let head = head.get(..head_len).unwrap_or(&[]);
        if body.len() <= COPY_MAX {
            self.batch.extend_from_slice(head);
            self.batch.extend_from_slice(body);
            self.batched += 1;
            if now || self.batch.len() >= BATCH_MAX {
                self.flush();
            }
        } else {
            self.flush();
            if self.gone {
                self.dropped += 1;
                return;
            }
            if write_all_parts(
                &mut self.stream,
                &mut [IoSlice::new(head), IoSlice::new(body)],
            )
            .is_err()
            {
                self.lost();
                self.dropped += 1;
            }
        }
    }

    /// The client is gone, or stopped reading for the reply timeout: no
    /// reply can reach it any more. The socket is shut down, so that the
    /// connection's reading ends too (requests already running finish).
    fn lost(&mut self) {
        self.gone = true;
        let _ = self.stream.shutdown();
    }

    /// Write the batch.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if !self.gone
            && write_all_parts(&mut self.stream, &mut [IoSlice::new(&self.batch)]).is_err()
        {
            self.lost();
        }
        if self.gone {
            self.dropped += self.batched;
        }
        self.batch.clear();
        self.batched = 0;
    }
}

/// Write every byte of `parts`, in as few system calls as the socket allows.
/// `sendmsg` with `MSG_NOSIGNAL`, not `writev`: a client that left gives
/// `EPIPE`, never a SIGPIPE that would kill a process not ignoring it.
fn write_all_parts(stream: &mut Stream, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while !parts.is_empty() {
        // SAFETY: an all-zero msghdr is a valid empty one; only its iovec
        // fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on Unix (std documents it),
        // and `parts` outlives the call.
        msg.msg_iov = parts.as_mut_ptr().cast::<libc::iovec>();
        msg.msg_iovlen = parts.len().min(libc::UIO_MAXIOV as usize) as _;
        // SAFETY: `fd` is the stream's open socket for the whole call, and
        // `msg` points at `parts`, valid buffers the kernel only reads.
        let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        match usize::try_from(sent) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
