//! A difference between the two sides, made into a record a driver developer
//! can act on: the device's one-line message, the first differing sector
//! with both sides' bytes, the two results, and where the test side keeps the
//! byte. Exercise's and serve's findings are this record plus what each knows
//! of the request that found it (see `exercise::Finding`, `serve::Finding`).

use super::Blkverify;
use crate::compare::hexdump_diff;
use crate::driver::{BlockDriver, Location, SECTOR_SIZE};
use crate::error::Error;

/// What two sides' difference was.
#[derive(Debug, Clone)]
pub struct Difference {
    /// Where it was found: "op" or "request", "final flush", "final verify".
    pub phase: &'static str,
    /// "contents" (different bytes) or "return_value" (different results).
    pub kind: &'static str,
    /// The one-line message (the device's, the seed's format).
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
    /// The first differing sector as the test side returned it.
    pub test_bytes: Vec<u8>,
    /// The same sector on the raw reference.
    pub raw_bytes: Vec<u8>,
    /// What the test side's bytes are, when that can be told: zeros, or (for
    /// exercise) an earlier write's data.
    pub diagnosis: Option<String>,
    /// The connection that sent the request (numbered from 1).
    pub connection: Option<u64>,
    /// Where the test side keeps the first differing byte (or the request's
    /// first byte): its mapping and table path.
    pub mapping: Option<Location>,
}

/// Both sides' bytes of a read request, as the request saw them.
pub struct Seen<'a> {
    /// The request's offset.
    pub offset: u64,
    /// What the test side returned for the whole request.
    pub test: &'a [u8],
    /// What the reference returned; empty when the caller kept no copy (the
    /// sector is read again).
    pub raw: &'a [u8],
}

impl Difference {
    /// A difference with nothing known yet but where and what it is.
    pub fn new(phase: &'static str, kind: &'static str, message: String) -> Self {
        Difference {
            phase,
            kind,
            message,
            sector: None,
            first_byte: None,
            test_ret: None,
            raw_ret: None,
            test_error: None,
            raw_error: None,
            test_bytes: Vec::new(),
            raw_bytes: Vec::new(),
            diagnosis: None,
            connection: None,
            mapping: None,
        }
    }

    /// The difference `e` stands for, found in `phase`; `None` when `e` is
    /// not a difference between the sides (both failed alike: the caller
    /// decides what that means). `seen` is a read request's bytes.
    pub fn of_error(
        device: &Blkverify,
        phase: &'static str,
        e: &Error,
        seen: Option<Seen<'_>>,
    ) -> Option<Self> {
        let message = e.to_string();
        match e {
            Error::Mismatch(m) => {
                let found =
                    Difference::new(phase, "contents", message).at_byte(device, m.first_byte, seen);
                Some(Difference {
                    diagnosis: zeros_diagnosis(&found.test_bytes),
                    ..found
                })
            }
            Error::ReturnMismatch(m) => Some(Difference {
                test_ret: Some(m.test_ret),
                raw_ret: Some(m.raw_ret),
                test_error: m.test_error.clone(),
                raw_error: m.raw_error.clone(),
                mapping: device.test().locate(m.offset).ok().flatten(),
                ..Difference::new(phase, "return_value", message)
            }),
            _ => None,
        }
    }

    /// This difference with its first differing byte: the sector, both
    /// sides' bytes of it (from `seen` where the request covered it, else
    /// read again), and where the test side keeps the byte.
    pub fn at_byte(self, device: &Blkverify, first_byte: u64, seen: Option<Seen<'_>>) -> Self {
        let sector = first_byte / SECTOR_SIZE;
        let (test_bytes, raw_bytes) = sector_bytes(device, sector, seen);
        Difference {
            sector: Some(sector),
            first_byte: Some(first_byte),
            test_bytes,
            raw_bytes,
            mapping: device.test().locate(first_byte).ok().flatten(),
            ..self
        }
    }

    /// A short hexdump diff of the first differing sector (see
    /// [`hexdump_diff`]); empty when neither side's bytes are known.
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

/// The diagnosis of a test side whose bytes are all zeros; `None` for any
/// other bytes, or none.
pub fn zeros_diagnosis(test_bytes: &[u8]) -> Option<String> {
    (!test_bytes.is_empty() && test_bytes.iter().all(|&b| b == 0))
        .then(|| "the test side reads zeros here".to_string())
}

/// Both sides' bytes of one sector (short at the end of a side): from the
/// request's buffers where the request covered it (the test side's bytes as
/// it returned them: a second read may not return the same), else read again.
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
