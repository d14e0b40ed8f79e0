//! The fixed-newstyle handshake, server side: the greeting, then options until
//! the client goes into transmission (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) or
//! leaves. Options: `GO`, `INFO`, `EXPORT_NAME`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` (only
//! `base:allocation`), and `STARTTLS`, which is refused by policy; anything
//! else is `NBD_REP_ERR_UNSUP`.
//!
//! Every option is answered or the connection is dropped: a client breaking a
//! MUST (bad magic, unknown client flags, an option too large to read) is
//! hard-disconnected; one that haggles for ever is cut off after
//! [`MAX_OPTIONS`] options (and by the caller's time limit).

use super::Export;
use crate::nbd::wire::{
    be16, be32, OptionHeader, OptionReply, Wire, BASE_ALLOCATION, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_REQUEST, MAX_STRING, NBDMAGIC, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER, TFLAG_CAN_MULTI_CONN,
    TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_CACHE, TFLAG_SEND_DF, TFLAG_SEND_FAST_ZERO,
    TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};
use std::io::{Read, Write};

/// The block sizes advertised: 512-byte sectors (without `NBD_INFO_BLOCK_SIZE`
/// QEMU's client assumes 1-byte alignment once `base:allocation` is
/// negotiated), 4 KiB preferred, 32 MiB at most per read or write.
pub(super) const MIN_BLOCK: u32 = 512;
const PREFERRED_BLOCK: u32 = 4096;
pub(super) const MAX_BLOCK: u32 = MAX_REQUEST as u32;

/// The id `base:allocation` gets (any nonzero number would do).
pub(super) const ALLOCATION_CONTEXT: u32 = 1;

/// Options one client may send before it must go into transmission.
pub(super) const MAX_OPTIONS: usize = 256;

/// The largest option data read: room for a name, 65535 info requests, or
/// many meta context queries. More is a denial of service.
const MAX_OPTION_DATA: u32 = 256 << 10;

/// The most meta context queries one option may carry.
const MAX_QUERIES: u32 = 128;

/// What the client and the server agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Negotiated {
    /// Replies are structured.
    pub structured: bool,
    /// `base:allocation` was selected for this export: block status works.
    pub allocation: bool,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` with `NBD_OPT_GO`, so it
    /// keeps to the advertised alignment (unaligned requests are refused).
    pub block_size_agreed: bool,
    /// The transmission flags sent.
    pub flags: u16,
}

/// The transmission flags of `export` for a client that did (or did not)
/// negotiate structured replies.
pub(super) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE;
    if export.read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    if export.multi_conn {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    flags
}

/// The handshake of one connection. `claim` takes a place among the clients
/// in transmission (or says why there is none). `Ok(None)`: the client left
/// or aborted, or was refused where no error can be sent.
pub(super) fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &Export,
    claim: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Option<Negotiated>, Wire> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags)?;
    let client_flags = u32::from_be_bytes(client_flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Wire::Protocol(format!(
            "client sent unknown flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut state = State {
        export,
        structured: false,
        contexts_for: None,
    };
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; OptionHeader::SIZE];
        s.read_exact(&mut head)?;
        let OptionHeader { option, length } =
            OptionHeader::decode(&head).map_err(Wire::Protocol)?;
        if length > MAX_OPTION_DATA {
            return Err(Wire::Protocol(format!(
                "option {option} carries {length} bytes (more than {MAX_OPTION_DATA})"
            )));
        }
        let mut data = vec![0u8; length as usize];
        s.read_exact(&mut data)?;
        let mut out = Replies { s, option };
        match option {
            OPT_EXPORT_NAME => {
                if !export.accepts(&data) || claim().is_err() {
                    // No error reply exists for this option: hang up.
                    return Ok(None);
                }
                let flags = transmission_flags(export, state.structured);
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.size.to_be_bytes());
                reply.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                out.s.write_all(&reply)?;
                return Ok(Some(Negotiated {
                    structured: state.structured,
                    allocation: state.allocation_for(&data),
                    block_size_agreed: false,
                    flags,
                }));
            }
            OPT_ABORT => {
                // The client may already have closed: a failed ACK is fine.
                let _ = out.send(REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => {
                out.error(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?
            }
            OPT_LIST => {
                let mut server = Vec::with_capacity(4 + export.name.len());
                server.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                server.extend_from_slice(export.name.as_bytes());
                out.send(REP_SERVER, &server)?;
                out.send(REP_ACK, &[])?;
            }
            OPT_STARTTLS if !data.is_empty() => {
                out.error(REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?
            }
            OPT_STARTTLS => out.error(
                REP_ERR_POLICY,
                "blkverify serve does not offer TLS (it listens on a private socket or loopback)",
            )?,
            OPT_INFO | OPT_GO => {
                let go = option == OPT_GO;
                let Some((name, requests)) = parse_info(&data) else {
                    out.error(REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data")?;
                    continue;
                };
                if !export.accepts(name) {
                    out.error(REP_ERR_UNKNOWN, &export.unknown(name))?;
                    continue;
                }
                if go {
                    if let Err(why) = claim() {
                        out.error(REP_ERR_POLICY, &why)?;
                        continue;
                    }
                }
                let flags = transmission_flags(export, state.structured);
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                out.send(REP_INFO, &info)?;
                let mut sizes = Vec::with_capacity(14);
                sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                for size in [MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK] {
                    sizes.extend_from_slice(&size.to_be_bytes());
                }
                out.send(REP_INFO, &sizes)?;
                if requests.contains(&INFO_NAME) {
                    let mut named = INFO_NAME.to_be_bytes().to_vec();
                    named.extend_from_slice(export.name.as_bytes());
                    out.send(REP_INFO, &named)?;
                }
                if requests.contains(&INFO_DESCRIPTION) {
                    let mut described = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    described.extend_from_slice(
                        b"blkverify: a mirrored device (raw reference + test image)",
                    );
                    out.send(REP_INFO, &described)?;
                }
                out.send(REP_ACK, &[])?;
                if go {
                    return Ok(Some(Negotiated {
                        structured: state.structured,
                        allocation: state.allocation_for(name),
                        block_size_agreed: requests.contains(&INFO_BLOCK_SIZE),
                        flags,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                out.error(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?
            }
            OPT_STRUCTURED_REPLY => {
                state.structured = true;
                out.send(REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even when this option fails.
                    state.contexts_for = None;
                }
                if !state.structured {
                    out.error(
                        REP_ERR_INVALID,
                        "metadata contexts need structured replies first",
                    )?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    out.error(REP_ERR_INVALID, "malformed metadata context query")?;
                    continue;
                };
                if queries.len() > MAX_QUERIES as usize {
                    out.error(REP_ERR_TOO_BIG, "too many metadata context queries")?;
                    continue;
                }
                if !export.accepts(name) {
                    out.error(REP_ERR_UNKNOWN, &export.unknown(name))?;
                    continue;
                }
                let wanted = if set {
                    queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
                };
                if wanted {
                    let id = if set { ALLOCATION_CONTEXT } else { 0 };
                    let mut context = id.to_be_bytes().to_vec();
                    context.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    out.send(REP_META_CONTEXT, &context)?;
                    if set {
                        state.contexts_for = Some(name.to_vec());
                    }
                }
                out.send(REP_ACK, &[])?;
            }
            _ => out.error(REP_ERR_UNSUP, "blkverify serve does not know this option")?,
        }
    }
    Err(Wire::Protocol(format!(
        "client sent {MAX_OPTIONS} options without choosing an export"
    )))
}

/// The haggling so far.
struct State<'a> {
    export: &'a Export,
    structured: bool,
    /// The export name `base:allocation` was last selected for.
    contexts_for: Option<Vec<u8>>,
}

impl State<'_> {
    /// Whether block status works on the export `name` goes into: the last
    /// `SET_META_CONTEXT` selected `base:allocation` for the same name.
    fn allocation_for(&self, name: &[u8]) -> bool {
        self.structured
            && self
                .contexts_for
                .as_deref()
                .is_some_and(|n| n == name || (self.export.accepts(n) && self.export.accepts(name)))
    }
}

impl Export {
    /// Whether a client naming `name` gets this export: its name, or the
    /// empty default name.
    fn accepts(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    fn unknown(&self, name: &[u8]) -> String {
        format!(
            "no export named '{}' here; this server's export is '{}'",
            String::from_utf8_lossy(name),
            self.name
        )
    }
}

/// Option replies to one option.
struct Replies<'s, S> {
    s: &'s mut S,
    option: u32,
}

impl<S: Write> Replies<'_, S> {
    fn send(&mut self, reply: u32, data: &[u8]) -> Result<(), Wire> {
        let head = OptionReply {
            option: self.option,
            reply,
            length: data.len() as u32,
        }
        .encode();
        let mut msg = Vec::with_capacity(head.len() + data.len());
        msg.extend_from_slice(&head);
        msg.extend_from_slice(data);
        self.s.write_all(&msg)?;
        Ok(())
    }

    /// An error reply with a message for people.
    fn error(&mut self, reply: u32, message: &str) -> Result<(), Wire> {
        let message = message.as_bytes();
        self.send(reply, message.get(..MAX_STRING).unwrap_or(message))
    }
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: the export name and the information
/// requests; `None` unless the lengths add up exactly.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = usize::try_from(be32(data, 0)?).ok()?;
    if name_len > MAX_STRING {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let count = usize::from(be16(data, 4 + name_len)?);
    let first = 6 + name_len;
    if data.len() != first + 2 * count {
        return None;
    }
    let requests = (0..count)
        .map(|i| be16(data, first + 2 * i))
        .collect::<Option<Vec<u16>>>()?;
    Some((name, requests))
}

/// `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` data: the export
/// name and the queries; `None` unless the lengths add up exactly.
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let name_len = usize::try_from(be32(data, 0)?).ok()?;
    if name_len > MAX_STRING {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let count = be32(data, 4 + name_len)?;
    let mut at = 8 + name_len;
    let mut queries = Vec::new();
    for _ in 0..count.min(MAX_QUERIES + 1) {
        let len = usize::try_from(be32(data, at)?).ok()?;
        if len > MAX_STRING {
            return None;
        }
        queries.push(data.get(at + 4..at + 4 + len)?);
        at += 4 + len;
    }
    (count > MAX_QUERIES || at == data.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_and_meta_data_must_add_up() {
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"abc");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info(&go),
            Some((&b"abc"[..], vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        assert_eq!(parse_info(&go[..go.len() - 1]), None);
        let mut long = go.clone();
        long.push(0);
        assert_eq!(parse_info(&long), None);
        assert_eq!(parse_info(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);

        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta(&meta),
            Some((&b""[..], vec![BASE_ALLOCATION.as_bytes()]))
        );
        assert_eq!(parse_meta(&meta[..meta.len() - 1]), None);
        let mut huge = meta.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta(&huge), None);
    }
}
