//! Every check of a client's request, in one place, before the device sees
//! it (nbdkit's `validate_request`): the command, its flags, its range and
//! size, its alignment, and what the export allows. A request that fails gets
//! the protocol's error and the connection goes on:
//! - `EINVAL`: an unknown command or flag, a flag on a command it does not
//!   apply to, a range past the end (reads, trims, cache, block status), a
//!   read or write over 32 MiB, an unaligned request from a client that
//!   agreed to the block size, block status that was not negotiated;
//! - `EOVERFLOW`: cache or write zeroes over 32 MiB (commands that carry no
//!   data either way; the spec's error for a length over the maximum);
//! - `EPERM`: a write, trim or write zeroes to a read-only export;
//! - `ENOSPC`: a write or write zeroes past the end;
//! - `ENOTSUP`: a `FAST_ZERO` that would not be fast.
//!
//! One request ends the connection instead: a write whose data is over
//! twice the maximum (64 MiB), which the server will not read through.
//! (A bad magic ends it too, before any request can be parsed.)

use super::handshake::{Negotiated, MAX_BLOCK, MIN_BLOCK};
use super::Export;
use crate::nbd::wire::{
    RequestHeader, CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    MAX_REQUEST, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FUA,
};

/// Why a request is refused: the errno to answer with, and what was wrong;
/// or, with `disconnect`, that the connection ends without an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub errno: i32,
    pub message: String,
    pub disconnect: bool,
}

fn refuse(errno: i32, message: String) -> Result<(), Refusal> {
    Err(Refusal {
        errno,
        message,
        disconnect: false,
    })
}

/// The largest write whose data a refusal still reads through (to answer
/// it and go on); past it the connection ends (a denial of service).
pub(super) const MAX_SKIPPED_WRITE: u64 = 2 * MAX_REQUEST;

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
    if command == CMD_WRITE && u64::from(length) > MAX_SKIPPED_WRITE {
        return Err(Refusal {
            errno: libc::EINVAL,
            message: format!("{name}: {length} bytes of data (more than {MAX_SKIPPED_WRITE})"),
            disconnect: true,
        });
    }
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

    // Size: reads and writes carry their data (EINVAL past the maximum);
    // cache and write zeroes carry none, but cost as much as a read or a
    // write of their length, unless write zeroes may fail fast (EOVERFLOW,
    // the spec's error for such a command over the maximum). Trim and block
    // status may be any length.
    let over = length > MAX_BLOCK;
    if over && matches!(command, CMD_READ | CMD_WRITE) {
        return einval(format!("length {length} is over the maximum {MAX_BLOCK}"));
    }
    if over
        && (command == CMD_CACHE
            || (command == CMD_WRITE_ZEROES && flags & CMD_FLAG_FAST_ZERO == 0))
    {
        return refuse(
            libc::EOVERFLOW,
            format!("{name}: length {length} is over the maximum {MAX_BLOCK}"),
        );
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
            read_only,
            ..export_of(1 << 20)
        }
    }

    fn export_of(size: u64) -> Export {
        Export {
            name: String::new(),
            size,
            read_only: false,
            fast_zero: false,
            inline: true,
            one_worker: false,
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
        let big = export_of(1 << 30);
        assert_eq!(
            check(&big, CMD_WRITE, 0, 0, (32 << 20) + 512),
            Some(libc::EINVAL)
        );
        assert_eq!(
            check(&big, CMD_CACHE, 0, 0, (32 << 20) + 512),
            Some(libc::EOVERFLOW)
        );
        assert_eq!(
            check(&big, CMD_WRITE_ZEROES, 0, 0, (32 << 20) + 512),
            Some(libc::EOVERFLOW)
        );
        assert_eq!(check(&big, CMD_TRIM, 0, 0, (64 << 20) + 512), None);
        assert_eq!(check(&big, CMD_BLOCK_STATUS, 0, 0, (64 << 20) + 512), None);
        let request = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: (64 << 20) + 512,
        };
        let refusal = validate_request(&big, &negotiated(&big), &request).unwrap_err();
        assert!(refusal.disconnect, "{refusal:?}");
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
