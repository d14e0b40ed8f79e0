//! Findings: what the two sides' difference was, turned into a report a driver
//! developer can act on (both sides' bytes, the op that last changed the byte,
//! and a diagnosis: zeros, stale data, or data meant for another offset).

use super::{pattern_key, pattern_word, Op, OpKind, Plan};
use crate::blkverify::difference::{zeros_diagnosis, Seen};
use crate::blkverify::{Blkverify, Difference};
use crate::driver::SECTOR_SIZE;
use crate::error::{Error, Result, ReturnMismatch};
use crate::verify;

/// A difference between the two sides, and the op that found it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The op that found it; `None` for the final flush or verify.
    pub op: Option<Op>,
    /// The last op before the finding that changed the first differing byte.
    pub last_change: Option<Op>,
    /// The difference: phase "op", "final flush" or "final verify"; its
    /// diagnosis may name an earlier write's data (stale, misplaced).
    pub difference: Difference,
}

impl Finding {
    /// The finding of `op` (if any) that `difference` is.
    fn new(op: Option<Op>, difference: Difference) -> Self {
        Finding {
            op,
            last_change: None,
            difference,
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
    let seen = op.zip(seen).map(|(op, test)| Seen {
        offset: op.offset,
        test,
        raw: &[],
    });
    if let Some(difference) = Difference::of_error(device, phase, &e, seen) {
        return Ok(Finding::new(op, difference));
    }
    match e {
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

/// The finding for the final verify's first mismatch. A test-side read error
/// there is a return-value finding, as the same failure in an op would be.
pub(super) fn of_verify(device: &Blkverify, m: &verify::Mismatch) -> Finding {
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
            Difference {
                test_ret: Some(test_ret),
                raw_ret: Some(0),
                test_error: Some(e.clone()),
                ..Difference::new("final verify", "return_value", message)
            }
        }
        None => Difference::new(
            "final verify",
            "contents",
            format!(
                "blkverify: final verify: contents mismatch in sector {}",
                m.first_byte / SECTOR_SIZE
            ),
        ),
    };
    Finding::new(None, base.at_byte(device, m.first_byte, None))
}

/// How far back `explain` looks for the op that last changed a byte.
const EXPLAIN_LOOK_BACK: u64 = 1_000_000;

/// Name the last op before the finding that changed its first differing byte,
/// and say what the test side's bytes are when we can tell: zeros, or the data
/// an earlier write put there (a stale or lost write).
pub(super) fn explain(plan: &Plan, issued: u64, f: &mut Finding) {
    let Some(first_byte) = f.difference.first_byte else {
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
    let test = &f.difference.test_bytes;
    let mut diagnosis = zeros_diagnosis(test);
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
        diagnosis = misplaced(plan, before, &f.difference);
    }
    f.last_change = last_change;
    if f.difference.diagnosis.is_none() {
        f.difference.diagnosis = diagnosis;
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
fn misplaced(plan: &Plan, before: u64, f: &Difference) -> Option<String> {
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
