//! One request, validated and admitted, run on the device; and what a
//! difference between the sides does to its reply (`--on-mismatch`):
//! - `stop`: EIO, and the server stops;
//! - `eio`: EIO;
//! - `reference`: the reference's bytes, or the raw side's result.
//!
//! Every difference is a finding, whatever the policy. An error both sides
//! share is no finding: the client gets it as it is.

use super::finding;
use super::handshake::ALLOCATION_CONTEXT;
use super::reply::Reply;
use super::{status, Context, Policy};
use crate::blkverify::difference::Seen;
use crate::blkverify::order::Kind;
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::nbd::wire::{
    RequestHeader, CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};

/// Buffers a thread reuses from request to request: no allocation per read.
#[derive(Default)]
pub(super) struct Buffers {
    /// A read's data from the test side; a write's data.
    pub data: Vec<u8>,
    /// A read's data from the reference.
    pub reference: Vec<u8>,
    /// Block status checks.
    pub scratch: Vec<u8>,
}

/// Buffers up to this size are kept between requests; larger ones (a 32 MiB
/// read) are given back once the request is done.
pub(super) const KEEP_BUFFER: usize = 1 << 20;

impl Buffers {
    /// Give back buffers grown past [`KEEP_BUFFER`] for a large request.
    pub fn trim(&mut self) {
        for buf in [&mut self.data, &mut self.reference, &mut self.scratch] {
            if buf.capacity() > KEEP_BUFFER {
                *buf = Vec::new();
            }
        }
    }

    /// Make `data` and `reference` at least `len` long.
    fn reserve(&mut self, len: usize) {
        for buf in [&mut self.data, &mut self.reference] {
            if buf.len() < len {
                buf.resize(len, 0);
            }
        }
    }
}

/// Where a read's reply data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Test,
    Reference,
}

/// What a request came to.
pub(super) enum Outcome {
    /// A read's data: `length` bytes of this buffer.
    Data(Source),
    Done,
    Error {
        errno: i32,
        message: String,
    },
    Status(Vec<(u32, u32)>),
}

impl Outcome {
    /// The reply to `request`, with `buffers` holding a read's data.
    pub fn reply<'a>(&'a self, request: &RequestHeader, buffers: &'a Buffers) -> Reply<'a> {
        let len = request.length as usize;
        match self {
            Outcome::Data(source) => {
                let buf = match source {
                    Source::Test => &buffers.data,
                    Source::Reference => &buffers.reference,
                };
                Reply::Data(buf.get(..len).unwrap_or(&[]))
            }
            Outcome::Done => Reply::Done,
            Outcome::Error { errno, message } => Reply::Error {
                errno: *errno,
                message,
            },
            Outcome::Status(extents) => Reply::Status {
                context: ALLOCATION_CONTEXT,
                extents,
            },
        }
    }
}

/// The device's kind of request for an NBD request.
pub(super) fn kind(request: &RequestHeader) -> Kind {
    let fua = request.flags & CMD_FLAG_FUA != 0;
    match request.command {
        CMD_READ => Kind::Read,
        CMD_WRITE => Kind::Write { fua },
        CMD_WRITE_ZEROES => Kind::Zero {
            unmap: request.flags & CMD_FLAG_NO_HOLE == 0,
            fua,
            fast: request.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_TRIM => Kind::Discard { fua },
        CMD_FLUSH => Kind::Flush,
        CMD_BLOCK_STATUS => Kind::BlockStatus {
            one: request.flags & CMD_FLAG_REQ_ONE != 0,
        },
        // validated: only CACHE is left
        _ => Kind::Cache,
    }
}

/// The request as findings name it: `read 1048576 4096`, `write 0 512 fua`.
pub(super) fn describe(request: &RequestHeader) -> String {
    let kind = kind(request);
    if kind == Kind::Flush {
        return "flush".to_string();
    }
    let mut line = format!("{} {} {}", kind.name(), request.offset, request.length);
    for (flag, name) in [
        (CMD_FLAG_FUA, "fua"),
        (CMD_FLAG_NO_HOLE, "no_hole"),
        (CMD_FLAG_FAST_ZERO, "fast_zero"),
        (CMD_FLAG_REQ_ONE, "req_one"),
    ] {
        if request.flags & flag != 0 {
            line.push(' ');
            line.push_str(name);
        }
    }
    line
}

/// Run `request` (number `number`, from connection `connection`) on the
/// device; `payload` is a write's data.
pub(super) fn execute(
    ctx: &Context<'_>,
    connection: u64,
    number: u64,
    request: &RequestHeader,
    payload: &[u8],
    buffers: &mut Buffers,
) -> Outcome {
    let device = ctx.device;
    let offset = request.offset;
    let length = u64::from(request.length);
    let fua = request.flags & CMD_FLAG_FUA != 0;
    let durable = |result: Result<()>| match result {
        Ok(()) if fua => device.flush(),
        other => other,
    };
    let result: Result<Outcome> = match request.command {
        CMD_READ | CMD_CACHE => {
            let len = request.length as usize;
            buffers.reserve(len);
            let (data, reference) = (&mut buffers.data, &mut buffers.reference);
            match (data.get_mut(..len), reference.get_mut(..len)) {
                (Some(test), Some(raw)) => {
                    device
                        .read_pair(test, raw, offset)
                        .map(|()| match request.command {
                            CMD_READ => Outcome::Data(Source::Test),
                            _ => Outcome::Done,
                        })
                }
                _ => Err(Error::InvalidArgument("read buffers too short".to_string())),
            }
        }
        CMD_WRITE => durable(device.write_at(payload, offset)).map(|()| Outcome::Done),
        CMD_WRITE_ZEROES => {
            let unmap = request.flags & CMD_FLAG_NO_HOLE == 0;
            durable(device.write_zeroes(offset, length, unmap)).map(|()| Outcome::Done)
        }
        CMD_TRIM => durable(device.discard(offset, length)).map(|()| Outcome::Done),
        CMD_FLUSH => device.flush().map(|()| Outcome::Done),
        CMD_BLOCK_STATUS => {
            let one = request.flags & CMD_FLAG_REQ_ONE != 0;
            status::block_status(device, offset, length, one, &mut buffers.scratch)
                .map(Outcome::Status)
        }
        other => Err(Error::InvalidArgument(format!("unknown command {other}"))),
    };
    let e = match result {
        Ok(outcome) => return outcome,
        Err(e) => e,
    };
    let reads = matches!(request.command, CMD_READ | CMD_CACHE);
    let seen = reads.then(|| {
        let len = request.length as usize;
        Seen {
            offset,
            test: buffers.data.get(..len).unwrap_or(&[]),
            raw: buffers.reference.get(..len).unwrap_or(&[]),
        }
    });
    let Some(found) = finding::of_error(
        device,
        Some((number, connection)),
        describe(request),
        &e,
        seen,
    ) else {
        return Outcome::Error {
            errno: e.errno(),
            message: e.to_string(),
        };
    };
    let message = found.difference.message.clone();
    ctx.shared.record(found);
    let eio = Outcome::Error {
        errno: libc::EIO,
        message,
    };
    match ctx.options.on_mismatch {
        Policy::Stop => {
            ctx.shared.stop("a mismatch (--on-mismatch stop)");
            eio
        }
        Policy::Eio => eio,
        Policy::Reference => reference_outcome(ctx, request, &e),
    }
}

/// Under `reference`: what the raw side says. A read gets the reference's
/// bytes (which `read_pair` left in the reference buffer) unless the raw side
/// failed; a block status that lied gets "data" for the whole request; any
/// other request gets the raw side's result.
fn reference_outcome(ctx: &Context<'_>, request: &RequestHeader, e: &Error) -> Outcome {
    let raw_failed = match e {
        Error::ReturnMismatch(m) if m.raw_ret != 0 => Some((-m.raw_ret, m.raw_error.clone())),
        _ => None,
    };
    if let Some((errno, error)) = raw_failed {
        return Outcome::Error {
            errno,
            message: error.unwrap_or_else(|| format!("the reference failed with errno {errno}")),
        };
    }
    match request.command {
        CMD_READ => Outcome::Data(Source::Reference),
        CMD_BLOCK_STATUS => {
            let len = u64::from(request.length)
                .min(ctx.device.size().saturating_sub(request.offset))
                .max(1);
            Outcome::Status(vec![(u32::try_from(len).unwrap_or(u32::MAX), 0)])
        }
        _ => Outcome::Done,
    }
}
