//! Block status (`base:allocation`) from the test side's map, checked.
//!
//! The map's kinds merge into the protocol's two flags: data and compressed
//! ranges are allocated (0); a zero range is `NBD_STATE_ZERO`, and a hole too
//! unless its cluster stays allocated; an unallocated range is whatever the
//! backing file has there, or a hole of zeros past it. A client told a range
//! reads as zeros never reads it (nbdcopy, `qemu-img convert`), so a map
//! that lies would hide corruption: every range reported as zero is checked
//! to read as zeros on the reference first (its holes cost nothing), and one
//! that does not is a finding.
//!
//! One reply covers at most [`MAX_EXTENTS`] extents and [`CHECK_BUDGET`]
//! bytes read from the reference; the client asks again for the rest, as the
//! protocol allows. Interior extent boundaries are kept on 512-byte sectors
//! (an unaligned one is reported as data for its sector, which is always
//! safe).

use crate::blkverify::Blkverify;
use crate::compare::first_nonzero;
use crate::driver::{BlockDriver, Mapping, SECTOR_SIZE};
use crate::error::{ContentsMismatch, Error, Result};
use crate::nbd::wire::{STATE_HOLE, STATE_ZERO};

/// The most extents one reply carries.
pub(super) const MAX_EXTENTS: usize = 4096;

/// The most reference bytes one reply reads to check zero ranges.
pub(super) const CHECK_BUDGET: u64 = 64 << 20;

/// The piece of a zero range read at a time.
const PIECE: u64 = 1 << 20;

/// The extents `(length, flags)` for `[offset, offset + length)` (or a
/// prefix of it), each zero range checked against the reference. A zero
/// range that does not read as zeros there is an `Error::Mismatch` with op
/// `block_status`, naming the first non-zero byte. `one`: a single extent.
pub(super) fn block_status(
    device: &Blkverify,
    offset: u64,
    length: u64,
    one: bool,
    scratch: &mut Vec<u8>,
) -> Result<Vec<(u32, u32)>> {
    let end = offset + length;
    let mut extents: Vec<(u64, u32)> = Vec::new();
    let mut budget = CHECK_BUDGET;
    let mut at = offset;
    while at < end && extents.len() < MAX_EXTENTS {
        let (run, flags) = allocation(device.test(), at, end - at)?;
        let mut run = run.clamp(1, end - at);
        let mut flags = flags;
        // Keep interior boundaries on sectors: an unaligned end becomes a
        // sector of data.
        let stop = at + run;
        if stop < end && stop % SECTOR_SIZE != 0 {
            let down = stop / SECTOR_SIZE * SECTOR_SIZE;
            if down > at {
                run = down - at;
            } else {
                run = (stop.div_ceil(SECTOR_SIZE) * SECTOR_SIZE).min(end) - at;
                flags = 0;
            }
        }
        if flags & STATE_ZERO != 0 {
            let checked = check_zero(device, at, run, &mut budget, scratch, (offset, length))?;
            if checked == 0 {
                break;
            }
            run = checked;
        }
        match extents.last_mut() {
            Some((len, f)) if *f == flags && *len + run <= u64::from(u32::MAX) => *len += run,
            _ => extents.push((run, flags)),
        }
        at += run;
        if one {
            break;
        }
    }
    if extents.is_empty() {
        // Out of budget before the first byte: report it as data, which is
        // always true enough.
        extents.push((length.min(SECTOR_SIZE.max(1)), 0));
    }
    Ok(extents
        .into_iter()
        .map(|(len, flags)| (u32::try_from(len).unwrap_or(u32::MAX), flags))
        .collect())
}

/// The `base:allocation` flags of the range at `offset` on `driver` (at most
/// `max_len` long), following backing files: `(length, flags)`.
fn allocation(driver: &dyn BlockDriver, offset: u64, max_len: u64) -> Result<(u64, u32)> {
    let extent = driver.map(offset, max_len)?;
    Ok(match extent.mapping {
        Mapping::Data { .. } | Mapping::Compressed { .. } => (extent.length, 0),
        Mapping::Zero { allocated: true } => (extent.length, STATE_ZERO),
        Mapping::Zero { allocated: false } => (extent.length, STATE_HOLE | STATE_ZERO),
        Mapping::Unallocated => match driver.backing() {
            Some(backing) if offset < backing.size() => {
                allocation(backing, offset, extent.length.min(backing.size() - offset))?
            }
            _ => (extent.length, STATE_HOLE | STATE_ZERO),
        },
    })
}

/// Check that `[offset, offset + len)` reads as zeros on the reference, as
/// far as the budget allows; returns how much was checked (0 when the
/// budget is spent). `request` is the block status request, for the finding.
fn check_zero(
    device: &Blkverify,
    offset: u64,
    len: u64,
    budget: &mut u64,
    scratch: &mut Vec<u8>,
    request: (u64, u64),
) -> Result<u64> {
    let reference = device.raw();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        // Past the reference's end nothing can be checked: the read there
        // would fail, and the range is reported as the test side says.
        if at >= reference.size() {
            return Ok(end - offset);
        }
        let extent = reference.map(at, (end - at).min(reference.size() - at))?;
        let run = extent.length.clamp(1, end - at);
        if matches!(extent.mapping, Mapping::Zero { .. }) {
            at += run;
            continue;
        }
        if *budget == 0 {
            // Report what was checked; a piece is at least a sector.
            let checked = (at - offset) / SECTOR_SIZE * SECTOR_SIZE;
            return Ok(checked);
        }
        let n = run.min(PIECE).min(*budget).max(SECTOR_SIZE.min(run));
        let n = usize::try_from(n).unwrap_or(PIECE as usize);
        if scratch.len() < n {
            scratch.resize(n, 0);
        }
        let piece = scratch.get_mut(..n).unwrap_or(&mut []);
        device.read_reference(piece, at)?;
        *budget = budget.saturating_sub(n as u64);
        if let Some(i) = first_nonzero(piece) {
            let first_byte = at + i as u64;
            return Err(Error::Mismatch(ContentsMismatch {
                op: "block_status",
                offset: request.0,
                length: request.1,
                sector: first_byte / SECTOR_SIZE,
                first_byte,
            }));
        }
        at += n as u64;
    }
    Ok(end - offset)
}
