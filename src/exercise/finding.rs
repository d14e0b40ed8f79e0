//! Findings: what the two sides' difference was, turned into a report a driver
//! developer can act on (both sides' bytes, the op that last changed the byte,
//! and a diagnosis: zeros, stale data, or data meant for another offset).

use super::{pattern_key, pattern_word, Op, OpKind, Plan};
use crate::blkverify::Blkverify;
use crate::compare::hexdump_diff;
use crate::driver::{BlockDriver, Location, SECTOR_SIZE};
use crate::error::{ContentsMismatch, Error, Result, ReturnMismatch};
use crate::verify;

/// A difference between the two sides.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The op that found it; `None` for the final flush or verify.
    pub op: Option<Op>,
    /// Where it was found: "op", "final flush" or "final verify".
    pub phase: &'static str,
    /// "contents" (different bytes) or "return_value" (different results).
    pub kind: &'static str,
    /// The one-line message (blkverify's, for op findings).
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
    /// The last op before the finding that changed the first differing byte.
    pub last_change: Option<Op>,
    /// What the test side's bytes are, when we can tell: an earlier write's
    /// data (stale), or zeros.
    pub diagnosis: Option<String>,
    /// The connection that sent the op (a trace's replay).
    pub connection: Option<u64>,
    /// Where the test side keeps the first differing byte (or the op's
    /// first byte).
    pub mapping: Option<Location>,
}

impl Finding {
    /// A finding with nothing known yet but where and what it is.
    fn new(op: Option<Op>, phase: &'static str, kind: &'static str, message: String) -> Self {
        Finding {
            op,
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
            last_change: None,
            diagnosis: None,
            connection: None,
            mapping: None,
        }
    }

    /// A short hexdump diff of the first differing sector (see [`hexdump_diff`]);
    /// empty when neither side's bytes are known.
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

/// Turn an op's error into a finding (the two sides differ), or into an error
/// that ends the run (both sides failed alike: the environment, not the
/// driver). `seen` is the test side's data for a read op's whole request.
pub(super) fn of_error(
    device: &Blkverify,
    op: Option<Op>,
    phase: &'static str,
    e: Error,
    seen: Option<&[u8]>,
) -> Result<Finding> {
    let message = e.to_string();
    match e {
        Error::Mismatch(ContentsMismatch { first_byte, .. }) => {
            let sector = first_byte / SECTOR_SIZE;
            let (test_bytes, raw_bytes) = sector_bytes(device, sector, op, seen);
            Ok(Finding {
                sector: Some(sector),
                first_byte: Some(first_byte),
                test_bytes,
                raw_bytes,
                mapping: device.test().locate(first_byte).ok().flatten(),
                ..Finding::new(op, phase, "contents", message)
            })
        }
        Error::ReturnMismatch(ReturnMismatch {
            offset,
            test_ret,
            raw_ret,
            test_error,
            raw_error,
            ..
        }) => Ok(Finding {
            test_ret: Some(test_ret),
            raw_ret: Some(raw_ret),
            test_error,
            raw_error,
            mapping: device.test().locate(offset).ok().flatten(),
            ..Finding::new(op, phase, "return_value", message)
        }),
        Error::Io {
            path,
            context,
            source,
        } => Err(Error::Io {
            path,
            context: match op {
                Some(op) => format!("exercise op {op}: {context}"),
                None => format!("exercise {phase}: {context}"),
            },
            source,
        }),
        other => Err(other),
    }
}

/// Both sides' bytes of one sector (short at the end of a side). `seen` is
/// the test side's data for a read op's whole request, used instead of a
/// second read.
fn sector_bytes(
    device: &Blkverify,
    sector: u64,
    op: Option<Op>,
    seen: Option<&[u8]>,
) -> (Vec<u8>, Vec<u8>) {
    let offset = sector * SECTOR_SIZE;
    let read = |side: &dyn BlockDriver| -> Vec<u8> {
        let n = side.size().saturating_sub(offset).min(SECTOR_SIZE) as usize;
        let mut buf = vec![0u8; n];
        match side.read_at(&mut buf, offset) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    };
    let test = match (op, seen) {
        (Some(op), Some(seen)) => {
            // The part of the sector the read covered, as the test side gave it.
            let start = offset.max(op.offset);
            let end = (offset + SECTOR_SIZE).min(op.offset + op.length);
            let mut bytes = read(device.test());
            let from = (start - op.offset) as usize;
            let into = (start - offset) as usize;
            let n = end.saturating_sub(start) as usize;
            if let (Some(dst), Some(src)) =
                (bytes.get_mut(into..into + n), seen.get(from..from + n))
            {
                dst.copy_from_slice(src);
            }
            bytes
        }
        _ => read(device.test()),
    };
    (test, read(device.raw()))
}

/// The finding for the final verify's first mismatch. A test-side read error
/// there is a return-value finding, as the same failure in an op would be.
pub(super) fn of_verify(device: &Blkverify, m: &verify::Mismatch) -> Finding {
    let sector = m.first_byte / SECTOR_SIZE;
    let (test_bytes, raw_bytes) = sector_bytes(device, sector, None, None);
    let base = match &m.error {
        Some(e) => {
            let test_ret = -m.errno.unwrap_or(libc::EIO);
            let mismatch = ReturnMismatch {
                op: "read",
                offset: m.offset,
                length: m.length,
                test_ret,
                raw_ret: 0,
                test_error: None,
                raw_error: None,
            }
            .to_string();
            let message = format!(
                "blkverify: final verify: {}",
                mismatch.trim_start_matches("blkverify: ")
            );
            Finding {
                test_ret: Some(test_ret),
                raw_ret: Some(0),
                test_error: Some(e.clone()),
                ..Finding::new(None, "final verify", "return_value", message)
            }
        }
        None => Finding::new(
            None,
            "final verify",
            "contents",
            format!("blkverify: final verify: contents mismatch in sector {sector}"),
        ),
    };
    Finding {
        sector: Some(sector),
        first_byte: Some(m.first_byte),
        test_bytes,
        raw_bytes,
        mapping: device.test().locate(m.first_byte).ok().flatten(),
        ..base
    }
}

/// How far back `explain` looks for the op that last changed a byte.
const EXPLAIN_LOOK_BACK: u64 = 1_000_000;

/// Name the last op before the finding that changed its first differing byte,
/// and say what the test side's bytes are when we can tell: zeros, or the data
/// an earlier write put there (a stale or lost write).
pub(super) fn explain(plan: &Plan, issued: u64, f: &mut Finding) {
    let Some(first_byte) = f.first_byte else {
        return;
    };
    let sector = first_byte / SECTOR_SIZE;
    let sector_offset = sector * SECTOR_SIZE;
    // Ops issued before the finding's op, newest first.
    let before = match f.op {
        Some(op) => (0..issued)
            .find(|&p| plan.op(p).is_some_and(|o| o.number == op.number))
            .unwrap_or(issued),
        None => issued,
    };
    let covers = |op: &Op, at: u64| op.writes() && op.offset <= at && at < op.offset + op.length;
    let history = (before.saturating_sub(EXPLAIN_LOOK_BACK)..before)
        .rev()
        .filter_map(|p| plan.op(p).map(|op| (p, op)));
    let mut last_change = None;
    let mut diagnosis = None;
    let test = &f.test_bytes;
    if !test.is_empty() && test.iter().all(|&b| b == 0) {
        diagnosis = Some("the test side reads zeros here".to_string());
    }
    for (position, op) in history.filter(|(_, op)| covers(op, first_byte)) {
        if last_change.is_none() {
            last_change = Some(op);
        }
        if diagnosis.is_some() {
            break;
        }
        if matches!(op.kind, OpKind::Write { .. }) && !test.is_empty() {
            // Does the differing byte hold this write's data on the test side?
            let Some(expect) = written(plan, position, &op, sector_offset, test.len()) else {
                break;
            };
            let lo = (first_byte - sector_offset) as usize;
            let hi = ((op.offset + op.length).min(sector_offset + test.len() as u64)
                - sector_offset) as usize;
            if lo < hi && expect.get(lo..hi) == test.get(lo..hi) {
                let newest = last_change.is_some_and(|l: Op| l.number == op.number);
                diagnosis = Some(if newest {
                    format!("the test side holds op {}'s data here", op.number)
                } else {
                    format!(
                        "the test side holds the data of op {} ({}), an older write: stale",
                        op.number, op
                    )
                });
                break;
            }
        }
    }
    if diagnosis.is_none() && plan.patterned() {
        diagnosis = misplaced(plan, before, f);
    }
    f.last_change = last_change;
    if f.diagnosis.is_none() {
        f.diagnosis = diagnosis;
    }
}

/// The bytes write `op` (the `position`-th op issued) put on the disk, as `len`
/// bytes from `from` (bytes outside the write are left zero); `None` when
/// the plan cannot say.
fn written(plan: &Plan, position: u64, op: &Op, from: u64, len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    if plan.patterned() {
        super::fill_pattern(&mut out, plan.seed(), op.number, from);
        return Some(out);
    }
    let mut data = vec![0u8; usize::try_from(op.length).ok()?];
    if !plan.fill(position, op, &mut data) {
        return None;
    }
    let start = from.max(op.offset);
    let end = (from + len as u64).min(op.offset + op.length);
    if start < end {
        let n = (end - start) as usize;
        out.get_mut((start - from) as usize..)?
            .get_mut(..n)?
            .copy_from_slice(data.get((start - op.offset) as usize..)?.get(..n)?);
    }
    Some(out)
}

/// Write ops `misplaced` searches, newest first.
const MISPLACED_LOOK_BACK: usize = 2000;

/// Whether the test side's bytes at the first difference are data an earlier
/// write meant for another offset: a misplaced write. Every aligned 8-byte word
/// of every write is unique, so one word names the op and the offset it was
/// meant for.
fn misplaced(plan: &Plan, before: u64, f: &Finding) -> Option<String> {
    let first_byte = f.first_byte?;
    let sector_offset = first_byte / SECTOR_SIZE * SECTOR_SIZE;
    let at = usize::try_from(first_byte.div_ceil(8) * 8 - sector_offset).ok()?;
    let word: [u8; 8] = f.test_bytes.get(at..at + 8)?.try_into().ok()?;
    let found_at = sector_offset + at as u64;
    let writes = (0..before)
        .rev()
        .filter_map(|p| plan.op(p))
        .filter(|op| matches!(op.kind, OpKind::Write { .. }))
        .take(MISPLACED_LOOK_BACK);
    for op in writes {
        let key = pattern_key(plan.seed(), op.number);
        let first_word = op.offset.div_ceil(8);
        let end_word = (op.offset + op.length) / 8;
        if let Some(w) = (first_word..end_word).find(|&w| pattern_word(key, w) == word) {
            let meant = w * 8;
            if meant == found_at {
                return None; // in place: the stale-data check above covers it
            }
            let delta = found_at as i128 - meant as i128;
            let sign = if delta < 0 { "-" } else { "+" };
            return Some(format!(
                "the test side holds data op {} ({op}) wrote for offset {meant:#x}: \
                 misplaced by {sign}{:#x} bytes",
                op.number,
                delta.unsigned_abs()
            ));
        }
    }
    None
}
