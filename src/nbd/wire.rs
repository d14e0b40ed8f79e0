//! The NBD protocol's numbers and messages (the NBD project's `doc/proto.md`):
//! magics, flags, option, reply, command and error numbers, and the fixed-size
//! headers both ends build and parse. The client (`driver::nbd`) and the
//! server (`serve`) take them from here and nowhere else.
//!
//! Every header is encoded into and decoded from a fixed-size array, so no
//! length read off the wire reaches an allocation here: the callers check
//! lengths against their own limits.

use std::io::{self, Read};

// Magics.
/// The first 8 bytes of every greeting ("NBDMAGIC").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// The newstyle greeting's second magic, and every option's ("IHAVEOPT").
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting's second magic.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Every option reply's magic.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Every request's magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// A simple reply's magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// A structured reply chunk's magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
/// The server speaks the fixed newstyle handshake.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// The server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 2;
/// The client speaks the fixed newstyle handshake.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
/// The client wants no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 2;

// Options.
/// Choose an export and enter transmission; no error reply is possible.
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the handshake (soft disconnect).
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts (block status).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use 32-byte extended request and reply headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// The option succeeded (or a list ended).
pub const REP_ACK: u32 = 1;
/// One export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One item of information about an export.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Set on every error reply type.
pub const REP_ERR_BIT: u32 = 1 << 31;
/// The option is unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
/// The server's policy refuses the option.
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
/// The option is malformed or out of place.
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
/// The platform cannot do it.
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
/// TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
/// The client must ask for block sizes first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
/// The request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

/// What an option error reply means, for messages.
pub fn option_error_name(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "unsupported option",
        REP_ERR_POLICY => "policy refused",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not supported on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "export shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size constraints not met",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    }
}

// Information types (`NBD_OPT_INFO`/`NBD_OPT_GO`).
/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// The export's canonical name.
pub const INFO_NAME: u16 = 1;
/// A description for people.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
/// Always set.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// The export refuses writes.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is understood.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is understood.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a spinning disk.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is understood.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is understood.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is understood (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// A flush on one connection covers writes made on every other.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_CACHE` is understood.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is understood.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
/// Read.
pub const CMD_READ: u16 = 0;
/// Write (the data follows the header).
pub const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// Force unit access: durable before the reply.
pub const CMD_FLAG_FUA: u16 = 1;
/// Write zeroes without leaving a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read in one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes only if faster than writing them.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured replies.
/// The last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// No payload (ends a reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Zeros at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Set on every error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// An error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;

// Error numbers (Linux's, for the ones the protocol defines).
/// Operation not permitted (a write to a read-only export).
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left (a write past the end).
pub const NBD_ENOSPC: u32 = 28;
/// Value too large (a `DF` read too large for one chunk).
pub const NBD_EOVERFLOW: u32 = 75;
/// Not supported (a `FAST_ZERO` that would not be fast).
pub const NBD_ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// The largest read or write either end sends or accepts: the protocol's
/// portable maximum (and QEMU's).
pub const MAX_REQUEST: u64 = 32 << 20;

/// The metadata context that says which ranges are holes and which read as zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: no storage is allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// The longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The command's name in messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block status",
        _ => "command",
    }
}

/// The errno an NBD error code stands for (the protocol uses Linux's numbers
/// for the ones it defines; anything else is EINVAL, as the spec says).
pub fn nbd_errno(code: u32) -> i32 {
    match code {
        NBD_EPERM | NBD_EIO | NBD_ENOMEM | NBD_EINVAL | NBD_ENOSPC | NBD_EOVERFLOW
        | NBD_ENOTSUP | NBD_ESHUTDOWN => code as i32,
        _ => libc::EINVAL,
    }
}

/// The NBD error code for an errno, as a server sends it in reply to a
/// request of `command` with `command_flags`: the protocol's own numbers
/// where one fits, else EIO (an error the protocol has no word for is still
/// a failed I/O). The spec limits two: `ENOTSUP` is only sent for a
/// `FAST_ZERO` request, and `EOVERFLOW` for a `DF` read or a command that
/// carries no data (cache, write zeroes, trim, block status) whose length
/// is over the maximum; otherwise they are EINVAL.
pub fn errno_to_nbd(errno: i32, command: u16, command_flags: u16) -> u32 {
    let no_payload = matches!(
        command,
        CMD_CACHE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_BLOCK_STATUS
    );
    match errno {
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        libc::ENOTSUP if command_flags & CMD_FLAG_FAST_ZERO != 0 => NBD_ENOTSUP,
        libc::EOVERFLOW if command_flags & CMD_FLAG_DF != 0 || no_payload => NBD_EOVERFLOW,
        libc::ENOTSUP | libc::EOVERFLOW => NBD_EINVAL,
        _ => NBD_EIO,
    }
}

/// What can go wrong on the wire, before it becomes an `Error`.
pub enum Wire {
    /// The socket failed (or timed out, or closed).
    Io(io::Error),
    /// The peer broke the protocol: what it did.
    Protocol(String),
}

impl From<io::Error> for Wire {
    fn from(e: io::Error) -> Self {
        Wire::Io(e)
    }
}

/// Read a big-endian u16.
pub fn read_u16(s: &mut impl Read) -> Result<u16, Wire> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Read a big-endian u32.
pub fn read_u32(s: &mut impl Read) -> Result<u32, Wire> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Read a big-endian u64.
pub fn read_u64(s: &mut impl Read) -> Result<u64, Wire> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// The big-endian u16 at `at` in `b`, if `b` holds it.
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// The big-endian u32 at `at` in `b`, if `b` holds it.
pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The big-endian u64 at `at` in `b`, if `b` holds it.
pub fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// A request's header (28 bytes on the wire, magic included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub command: u16,
    /// The client's handle for the request, echoed in its reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes (a write's payload follows the header).
    pub length: u32,
}

impl RequestHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 28;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &REQUEST_MAGIC.to_be_bytes());
        put(&mut b, 4, &self.flags.to_be_bytes());
        put(&mut b, 6, &self.command.to_be_bytes());
        put(&mut b, 8, &self.cookie.to_be_bytes());
        put(&mut b, 16, &self.offset.to_be_bytes());
        put(&mut b, 24, &self.length.to_be_bytes());
        b
    }

    /// Parse a header; an error names a bad magic.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<RequestHeader, String> {
        let field = |at, what: &str| {
            be64(b, at).ok_or_else(|| format!("request header too short for its {what}"))
        };
        let magic = be32(b, 0).unwrap_or(0);
        if magic != REQUEST_MAGIC {
            return Err(format!("request has bad magic {magic:#010x}"));
        }
        Ok(RequestHeader {
            flags: be16(b, 4).unwrap_or(0),
            command: be16(b, 6).unwrap_or(0),
            cookie: field(8, "cookie")?,
            offset: field(16, "offset")?,
            length: be32(b, 24).unwrap_or(0),
        })
    }
}

/// A simple reply's header (16 bytes on the wire, magic included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or an NBD error code.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Bytes on the wire.
    pub const SIZE: usize = 16;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &SIMPLE_REPLY_MAGIC.to_be_bytes());
        put(&mut b, 4, &self.error.to_be_bytes());
        put(&mut b, 8, &self.cookie.to_be_bytes());
        b
    }

    /// Parse the 12 bytes that follow the magic.
    pub fn decode_body(b: &[u8; 12]) -> SimpleReply {
        SimpleReply {
            error: be32(b, 0).unwrap_or(0),
            cookie: be64(b, 4).unwrap_or(0),
        }
    }
}

/// A structured reply chunk's header (20 bytes on the wire, magic included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The payload's length.
    pub length: u32,
}

impl ChunkHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 20;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        put(&mut b, 4, &self.flags.to_be_bytes());
        put(&mut b, 6, &self.kind.to_be_bytes());
        put(&mut b, 8, &self.cookie.to_be_bytes());
        put(&mut b, 16, &self.length.to_be_bytes());
        b
    }

    /// Parse the 16 bytes that follow the magic.
    pub fn decode_body(b: &[u8; 16]) -> ChunkHeader {
        ChunkHeader {
            flags: be16(b, 0).unwrap_or(0),
            kind: be16(b, 2).unwrap_or(0),
            cookie: be64(b, 4).unwrap_or(0),
            length: be32(b, 12).unwrap_or(0),
        }
    }
}

/// An option request's header (16 bytes: `IHAVEOPT`, the option, the data's
/// length); the data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `OPT_*`.
    pub option: u32,
    /// The length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 16;

    /// The option request's bytes: header and data.
    pub fn message(option: u32, data: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(Self::SIZE + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        msg
    }

    /// Parse a header; an error names a bad magic.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<OptionHeader, String> {
        let magic = be64(b, 0).unwrap_or(0);
        if magic != IHAVEOPT {
            return Err(format!("option has bad magic {magic:#018x}"));
        }
        Ok(OptionHeader {
            option: be32(b, 8).unwrap_or(0),
            length: be32(b, 12).unwrap_or(0),
        })
    }
}

/// An option reply's header (20 bytes: magic, the option, the reply type, the
/// data's length); the data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// `REP_*`.
    pub reply: u32,
    /// The length of the data that follows.
    pub length: u32,
}

impl OptionReply {
    /// Bytes on the wire.
    pub const SIZE: usize = 20;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put(&mut b, 0, &OPT_REPLY_MAGIC.to_be_bytes());
        put(&mut b, 8, &self.option.to_be_bytes());
        put(&mut b, 12, &self.reply.to_be_bytes());
        put(&mut b, 16, &self.length.to_be_bytes());
        b
    }

    /// Parse a header; an error names a bad magic.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<OptionReply, String> {
        let magic = be64(b, 0).unwrap_or(0);
        if magic != OPT_REPLY_MAGIC {
            return Err(format!("option reply has bad magic {magic:#018x}"));
        }
        Ok(OptionReply {
            option: be32(b, 8).unwrap_or(0),
            reply: be32(b, 12).unwrap_or(0),
            length: be32(b, 16).unwrap_or(0),
        })
    }
}

/// Copy `src` into `b` at `at`; the callers' ranges are constants inside
/// their fixed-size arrays.
fn put(b: &mut [u8], at: usize, src: &[u8]) {
    if let Some(dst) = b.get_mut(at..at + src.len()) {
        dst.copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let request = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(RequestHeader::decode(&request.encode()), Ok(request));
        let mut bad = request.encode();
        bad[0] ^= 1;
        assert!(RequestHeader::decode(&bad)
            .unwrap_err()
            .contains("bad magic"));

        let simple = SimpleReply {
            error: NBD_EIO,
            cookie: 9,
        };
        let bytes = simple.encode();
        let body: [u8; 12] = bytes[4..].try_into().unwrap();
        assert_eq!(SimpleReply::decode_body(&body), simple);

        let chunk = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: 7,
            length: 4104,
        };
        let bytes = chunk.encode();
        let body: [u8; 16] = bytes[4..].try_into().unwrap();
        assert_eq!(ChunkHeader::decode_body(&body), chunk);

        let option = OptionHeader::message(OPT_GO, b"abc");
        let head: [u8; 16] = option[..16].try_into().unwrap();
        assert_eq!(
            OptionHeader::decode(&head),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 3
            })
        );
        let reply = OptionReply {
            option: OPT_GO,
            reply: REP_ERR_UNKNOWN,
            length: 0,
        };
        assert_eq!(OptionReply::decode(&reply.encode()), Ok(reply));
    }

    #[test]
    fn errno_mapping_follows_the_spec() {
        assert_eq!(errno_to_nbd(libc::EROFS, CMD_WRITE, 0), NBD_EPERM);
        assert_eq!(errno_to_nbd(libc::EDQUOT, CMD_WRITE, 0), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::ENOTSUP, CMD_WRITE_ZEROES, 0), NBD_EINVAL);
        assert_eq!(
            errno_to_nbd(libc::ENOTSUP, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO),
            NBD_ENOTSUP
        );
        assert_eq!(errno_to_nbd(libc::EOVERFLOW, CMD_READ, 0), NBD_EINVAL);
        assert_eq!(
            errno_to_nbd(libc::EOVERFLOW, CMD_READ, CMD_FLAG_DF),
            NBD_EOVERFLOW
        );
        assert_eq!(errno_to_nbd(libc::EOVERFLOW, CMD_CACHE, 0), NBD_EOVERFLOW);
        assert_eq!(errno_to_nbd(libc::ENOENT, CMD_READ, 0), NBD_EIO);
        assert_eq!(nbd_errno(NBD_ESHUTDOWN), libc::ESHUTDOWN);
        assert_eq!(nbd_errno(12345), libc::EINVAL);
    }
}
