//! What serve reports when the two sides differ: the device's
//! [`Difference`] (the blkverify message, the first differing sector with
//! both sides' bytes, the return values, the connection, and where the test
//! side keeps the byte) plus the global request number and the request.

use crate::blkverify::difference::Seen;
use crate::blkverify::{Blkverify, Difference};
use crate::error::Error;

/// A difference between the two sides, and the request that found it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The global request number (the order serve applied requests in);
    /// `None` for the final flush.
    pub request: Option<u64>,
    /// The request: `read 1048576 4096`, `flush`; `None` for the final flush.
    pub op: Option<String>,
    /// The difference: phase "request" or "final flush".
    pub difference: Difference,
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
    let difference = Difference::of_error(device, phase, e, seen)?;
    Some(Finding {
        request: request.map(|r| r.0),
        op,
        difference: Difference {
            connection: request.map(|r| r.1),
            ..difference
        },
    })
}
