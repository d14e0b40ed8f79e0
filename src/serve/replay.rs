//! What a replay of serve's trace needs from serve: a client's block status
//! request means serve's checked block status (see `status`), and a replay
//! that ran anything else would not meet the same finding.

use crate::blkverify::Blkverify;
use crate::error::Result;

/// The extents `(length, flags)` serve answers a block status request for
/// `[offset, offset + length)` with (`one`: NBD's `REQ_ONE`), every range it
/// calls zero checked against the reference: a range that does not read as
/// zeros there is an `Error::Mismatch`. `scratch` is reused between calls.
pub fn block_status(
    device: &Blkverify,
    offset: u64,
    length: u64,
    one: bool,
    scratch: &mut Vec<u8>,
) -> Result<Vec<(u32, u32)>> {
    super::status::block_status(device, offset, length, one, scratch)
}
