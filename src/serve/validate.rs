//! Every check of a client's request, in one place, before the device sees
//! it (nbdkit's `validate_request`): the command, its flags, its range and
//! size, its alignment, and what the export allows. A request that fails gets
//! the protocol's error (`EINVAL`, `EPERM` for a write to a read-only export,
//! `ENOSPC` for a write past the end, `ENOTSUP` for a `FAST_ZERO` that would
//! not be fast); the connection goes on.

use super::handshake::{Negotiated, MAX_BLOCK, MIN_BLOCK};
use super::Export;
use crate::nbd::wire::{
    RequestHeader, CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FUA,
};

/// Why a request is refused: the errno to answer with, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub errno: i32,
    pub message: String,
}

fn refuse(errno: i32, message: String) -> Result<(), Refusal> {
    Err(Refusal { errno, message })
}

/// Check `request` (any command but `NBD_CMD_DISC`, which ends the
/// connection) against the export and what the client negotiated.
pub(super) fn validate_request(
    export: &Export,
    negotiated: &Negotiated,
    request: &RequestHeader,
) -> Result<(), Refusal> {
    let RequestHeader {
        flags,
        command,
        offset,
        length,
        ..
    } = *request;
    let name = crate::nbd::wire::command_name(command);
    let einval = |what: String| refuse(libc::EINVAL, format!("{name}: {what}"));
    let writes = matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if !matches!(
        command,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    ) {
        return refuse(libc::EINVAL, format!("unknown command {command}"));
    }
    if writes && export.read_only {
        return refuse(libc::EPERM, format!("{name}: the export is read-only"));
    }

    // Flags: known, and each on a command it applies to.
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if flags & !known != 0 {
        return einval(format!("unknown flags {:#x}", flags & !known));
    }
    if flags & CMD_FLAG_FUA != 0 && negotiated.flags & TFLAG_SEND_FUA == 0 {
        return einval("FUA was not offered".to_string());
    }
    if flags & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) != 0 && command != CMD_WRITE_ZEROES {
        return einval("NO_HOLE and FAST_ZERO apply to write zeroes only".to_string());
    }
    if flags & CMD_FLAG_FAST_ZERO != 0 && negotiated.flags & TFLAG_SEND_FAST_ZERO == 0 {
        return einval("FAST_ZERO was not offered".to_string());
    }
    if flags & CMD_FLAG_DF != 0 && (command != CMD_READ || !negotiated.structured) {
        return einval("DF applies to reads with structured replies only".to_string());
    }
    if flags & CMD_FLAG_REQ_ONE != 0 && command != CMD_BLOCK_STATUS {
        return einval("REQ_ONE applies to block status only".to_string());
    }

    if command == CMD_FLUSH {
        if offset != 0 || length != 0 {
            return einval(format!(
                "offset and length must be 0 (got {offset} and {length})"
            ));
        }
        return Ok(());
    }
    if command == CMD_BLOCK_STATUS && !negotiated.allocation {
        return einval("base:allocation was not negotiated".to_string());
    }

    // The range: inside the export.
    let length64 = u64::from(length);
    if offset
        .checked_add(length64)
        .is_none_or(|end| end > export.size)
    {
        let errno = if writes && command != CMD_TRIM {
            libc::ENOSPC
        } else {
            libc::EINVAL
        };
        return refuse(
            errno,
            format!(
                "{name}: offset {offset} + length {length} lies past the end of the export ({} bytes)",
                export.size
            ),
        );
    }
    if length == 0 && command == CMD_BLOCK_STATUS {
        return einval("length 0".to_string());
    }

    // Size: reads and writes carry their data, and write zeroes is bounded
    // unless it may fail fast.
    let bounded = matches!(command, CMD_READ | CMD_WRITE | CMD_CACHE)
        || (command == CMD_WRITE_ZEROES && flags & CMD_FLAG_FAST_ZERO == 0);
    if bounded && length > MAX_BLOCK {
        return einval(format!("length {length} is over the maximum {MAX_BLOCK}"));
    }

    // Alignment, for a client that agreed to the advertised block size; the
    // end of the export ends an aligned request too.
    let min = u64::from(MIN_BLOCK);
    if negotiated.block_size_agreed
        && (offset % min != 0 || (length64 % min != 0 && offset + length64 != export.size))
    {
        return einval(format!(
            "offset {offset} and length {length} are not multiples of {MIN_BLOCK}"
        ));
    }

    // A fast zero only where both sides zero without writing.
    if flags & CMD_FLAG_FAST_ZERO != 0 && !(export.fast_zero && flags & CMD_FLAG_NO_HOLE == 0) {
        return refuse(
            libc::ENOTSUP,
            format!("{name}: zeroing here would be no faster than writing zeros"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::TFLAG_SEND_DF;

    fn export(read_only: bool) -> Export {
        Export {
            name: String::new(),
            size: 1 << 20,
            read_only,
            fast_zero: false,
            inline: true,
            multi_conn: false,
        }
    }

    fn negotiated(export: &Export) -> Negotiated {
        Negotiated {
            structured: true,
            allocation: true,
            block_size_agreed: true,
            flags: super::super::handshake::transmission_flags(export, true),
        }
    }

    fn check(export: &Export, command: u16, flags: u16, offset: u64, length: u32) -> Option<i32> {
        let request = RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        };
        validate_request(export, &negotiated(export), &request)
            .err()
            .map(|r| r.errno)
    }

    #[test]
    fn every_rule_answers_with_the_protocols_error() {
        let rw = export(false);
        let ro = export(true);
        assert_eq!(check(&rw, CMD_READ, 0, 0, 4096), None);
        assert_eq!(check(&rw, CMD_READ, 0, (1 << 20) - 512, 512), None);
        assert_eq!(check(&rw, CMD_READ, 0, 1 << 20, 512), Some(libc::EINVAL));
        assert_eq!(check(&rw, CMD_WRITE, 0, 1 << 20, 512), Some(libc::ENOSPC));
        assert_eq!(check(&rw, CMD_WRITE, 0, u64::MAX, 512), Some(libc::ENOSPC));
        assert_eq!(check(&rw, CMD_READ, 0, 100, 512), Some(libc::EINVAL));
        assert_eq!(check(&ro, CMD_WRITE, 0, 0, 512), Some(libc::EPERM));
        assert_eq!(check(&ro, CMD_TRIM, 0, 0, 512), Some(libc::EPERM));
        assert_eq!(check(&rw, 99, 0, 0, 512), Some(libc::EINVAL));
        assert_eq!(check(&rw, CMD_READ, 1 << 9, 0, 512), Some(libc::EINVAL));
        assert_eq!(
            check(&rw, CMD_READ, CMD_FLAG_NO_HOLE, 0, 512),
            Some(libc::EINVAL)
        );
        assert_eq!(check(&rw, CMD_READ, CMD_FLAG_DF, 0, 512), None);
        assert_eq!(
            check(&rw, CMD_WRITE, CMD_FLAG_DF, 0, 512),
            Some(libc::EINVAL)
        );
        assert_eq!(
            check(&rw, CMD_READ, CMD_FLAG_REQ_ONE, 0, 512),
            Some(libc::EINVAL)
        );
        assert_eq!(
            check(&ro, CMD_READ, CMD_FLAG_FUA, 0, 512),
            Some(libc::EINVAL)
        );
        assert_eq!(check(&rw, CMD_WRITE, CMD_FLAG_FUA, 0, 512), None);
        assert_eq!(check(&rw, CMD_FLUSH, 0, 0, 0), None);
        assert_eq!(check(&rw, CMD_FLUSH, 0, 512, 0), Some(libc::EINVAL));
        assert_eq!(
            check(&rw, CMD_READ, 0, 0, (32 << 20) + 512),
            Some(libc::EINVAL)
        );
        assert_eq!(check(&rw, CMD_TRIM, 0, 0, 1 << 20), None);
        assert_eq!(
            check(&rw, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512),
            Some(libc::ENOTSUP)
        );
        assert_eq!(check(&rw, CMD_BLOCK_STATUS, 0, 0, 0), Some(libc::EINVAL));
        assert_eq!(check(&rw, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), None);
        assert_ne!(negotiated(&rw).flags & TFLAG_SEND_DF, 0);
    }
}
