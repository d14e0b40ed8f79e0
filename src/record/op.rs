//! The op: one request to the mirrored device as a record holds it, whether
//! exercise drew it (and its write's bytes derive from the seed) or serve
//! received it from a client (and its write's bytes are in the trace).

use crate::blkverify::order::{self, Kind};

/// What an op does: the device's own request kinds ([`Kind`]), with their
/// flags. Exercise draws reads, writes, write-zeroes, discards and flushes
/// without flags; a serve trace holds every kind a client can send.
pub use crate::blkverify::order::Kind as OpKind;

/// The longest op a record may hold (a block status request aside, which
/// only asks and may span the whole device).
pub const MAX_REQUEST: u64 = 64 << 20;

/// The most ops an exercise keeps in flight at once.
pub const MAX_QUEUE_DEPTH: usize = 256;

/// `queue_depth` if it is 1 to [`MAX_QUEUE_DEPTH`]: the one check of that range.
pub fn check_queue_depth(queue_depth: u64) -> std::result::Result<usize, String> {
    usize::try_from(queue_depth)
        .ok()
        .filter(|q| (1..=MAX_QUEUE_DEPTH).contains(q))
        .ok_or_else(|| format!("queue depth {queue_depth} is not 1 to {MAX_QUEUE_DEPTH}"))
}

/// One op of a workload or a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Its number: the op number of a seeded sequence (kept through replay
    /// and shrinking, so a write's bytes stay the same), or the global request
    /// number serve gave it.
    pub number: u64,
    /// What it does.
    pub kind: OpKind,
    /// Guest offset in bytes (0 for flush).
    pub offset: u64,
    /// Length in bytes (0 for flush).
    pub length: u64,
}

impl Op {
    /// The guest range it touches, `None` for flush.
    pub fn range(&self) -> Option<(u64, u64)> {
        self.kind
            .has_range()
            .then(|| (self.offset, self.offset + self.length))
    }

    /// Whether the op changes the device.
    pub fn writes(&self) -> bool {
        self.kind.writes()
    }

    /// Whether the op is a write whose bytes the record must supply.
    pub fn carries_data(&self) -> bool {
        matches!(self.kind, Kind::Write { .. })
    }

    /// The device's view of the op, to admit it (`source` is who sent it).
    pub fn admission<'a>(&self, source: u64, data: Option<&'a [u8]>) -> order::Request<'a> {
        order::Request {
            kind: self.kind,
            offset: self.offset,
            length: self.length,
            source,
            data,
        }
    }
}
