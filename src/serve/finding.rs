//! What serve reports when the two sides differ: exercise's record (the
//! blkverify message, the first differing sector with both sides' bytes,
//! the return values) plus the global request number, the connection, and
//! where the test side keeps the byte.

use crate::blkverify::Blkverify;
use crate::compare::hexdump_diff;
use crate::driver::{BlockDriver, Location, SECTOR_SIZE};
use crate::error::Error;

/// A difference between the two sides.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The global request number (the order serve applied requests in);
    /// `None` for the final flush.
    pub request: Option<u64>,
    /// The connection that sent the request (numbered from 1).
    pub connection: Option<u64>,
    /// The request: `read 1048576 4096`, `flush`; `None` for the final flush.
    pub op: Option<String>,
    /// Where it was found: "request" or "final flush".
    pub phase: &'static str,
    /// "contents" (different bytes) or "return_value" (different results).
    pub kind: &'static str,
    /// The one-line message, the seed's format.
    pub message: String,
    /// The first differing sector (contents findings).
    pub sector: Option<u64>,
    /// The first differing byte (contents findings).
    pub first_byte: Option<u64>,
    /// The test side's result: 0 or a negative errno (return-value findings).
    pub test_ret: Option<i32>,
    /// The raw side's result.
    pub raw_ret: Option<i32>,
    /// The test side's error text, if it failed.
    pub test_error: Option<String>,
    /// The raw side's error text, if it failed.
    pub raw_error: Option<String>,
    /// The first differing sector as the test side gave it.
    pub test_bytes: Vec<u8>,
    /// The same sector on the reference.
    pub raw_bytes: Vec<u8>,
    /// What the test side's bytes are, when that can be told.
    pub diagnosis: Option<String>,
    /// Where the test side keeps the first differing byte (or the request's
    /// first byte): its mapping and table path.
    pub mapping: Option<Location>,
}

impl Finding {
    /// A short hexdump diff of the first differing sector; empty when neither
    /// side's bytes are known.
    pub fn hexdump(&self) -> Vec<String> {
        match (self.sector, self.first_byte) {
            (Some(sector), Some(first_byte))
                if !(self.test_bytes.is_empty() && self.raw_bytes.is_empty()) =>
            {
                hexdump_diff(
                    sector * SECTOR_SIZE,
                    first_byte,
                    &self.test_bytes,
                    &self.raw_bytes,
                    4,
                )
            }
            _ => Vec::new(),
        }
    }
}

/// Both sides' bytes of a read request, as the request saw them.
pub(super) struct Seen<'a> {
    pub offset: u64,
    pub test: &'a [u8],
    pub raw: &'a [u8],
}

/// The finding `e` stands for, or `None` when `e` is not a difference
/// between the sides (both failed alike: the caller answers with the error).
/// `request` is the request's number and connection, `op` its description.
pub(super) fn of_error(
    device: &Blkverify,
    request: Option<(u64, u64)>,
    op: String,
    e: &Error,
    seen: Option<Seen<'_>>,
) -> Option<Finding> {
    let (phase, op) = match request {
        Some(_) => ("request", Some(op)),
        None => ("final flush", None),
    };
    let base = Finding {
        request: request.map(|r| r.0),
        connection: request.map(|r| r.1),
        op,
        phase,
        kind: "contents",
        message: e.to_string(),
        sector: None,
        first_byte: None,
        test_ret: None,
        raw_ret: None,
        test_error: None,
        raw_error: None,
        test_bytes: Vec::new(),
        raw_bytes: Vec::new(),
        diagnosis: None,
        mapping: None,
    };
    match e {
        Error::Mismatch(m) => {
            let first_byte = m.first_byte;
            let sector = first_byte / SECTOR_SIZE;
            let (test_bytes, raw_bytes) = sector_bytes(device, sector, seen);
            let diagnosis = (!test_bytes.is_empty() && test_bytes.iter().all(|&b| b == 0))
                .then(|| "the test side reads zeros here".to_string());
            Some(Finding {
                sector: Some(sector),
                first_byte: Some(first_byte),
                test_bytes,
                raw_bytes,
                diagnosis,
                mapping: device.test().locate(first_byte).ok().flatten(),
                ..base
            })
        }
        Error::ReturnMismatch(m) => Some(Finding {
            kind: "return_value",
            test_ret: Some(m.test_ret),
            raw_ret: Some(m.raw_ret),
            test_error: m.test_error.clone(),
            raw_error: m.raw_error.clone(),
            mapping: device.test().locate(m.offset).ok().flatten(),
            ..base
        }),
        _ => None,
    }
}

/// Both sides' bytes of one sector: from the request's buffers where the
/// request covered it (the test side's bytes as it returned them: a second
/// read may not return the same), else read again.
fn sector_bytes(device: &Blkverify, sector: u64, seen: Option<Seen<'_>>) -> (Vec<u8>, Vec<u8>) {
    let offset = sector * SECTOR_SIZE;
    let read = |side: &dyn BlockDriver| -> Vec<u8> {
        let n = side.size().saturating_sub(offset).min(SECTOR_SIZE) as usize;
        let mut buf = vec![0u8; n];
        match side.read_at(&mut buf, offset) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    };
    let (mut test, mut raw) = (read(device.test()), read(device.raw()));
    if let Some(seen) = seen {
        // The part of the sector the request covered, as it saw it.
        let start = offset.max(seen.offset);
        let end = (offset + SECTOR_SIZE).min(seen.offset + seen.test.len() as u64);
        if start < end {
            let (from, into, n) = (
                (start - seen.offset) as usize,
                (start - offset) as usize,
                (end - start) as usize,
            );
            for (dst, src) in [(&mut test, seen.test), (&mut raw, seen.raw)] {
                if let (Some(d), Some(s)) = (dst.get_mut(into..into + n), src.get(from..from + n)) {
                    d.copy_from_slice(s);
                }
            }
        }
    }
    (test, raw)
}
