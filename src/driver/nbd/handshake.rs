//! The fixed-newstyle handshake: structured replies if the server has them,
//! the `base:allocation` metadata context (block status) if it offers it, then
//! `NBD_OPT_GO` with the export name, asking for block sizes.

use super::MAX_OPTION_REPLY;
use crate::bytes::BeBytes;
use crate::nbd::wire::{
    option_error_name, read_u16, read_u64, OptionHeader, OptionReply, Wire, BASE_ALLOCATION,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC,
    OLDSTYLE_MAGIC, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_BIT,
    REP_INFO, REP_META_CONTEXT,
};
use crate::nbd::Stream;
use std::io::{Read, Write};

/// What the handshake settled.
pub(super) struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    pub structured: bool,
    pub min_block: u64,
    /// The id the server gave `base:allocation`, if it offers block status.
    pub allocation_context: Option<u32>,
}

/// The fixed-newstyle handshake.
pub(super) fn negotiate(s: &mut Stream, export: &str) -> Result<Negotiated, Wire> {
    greet(s)?;
    let structured = ask_structured_replies(s)?;
    // Block status needs structured replies; a server that refuses the
    // context is read in full.
    let allocation_context = if structured {
        set_meta_context(s, export)?
    } else {
        None
    };
    let export_info = go(s, export)?;
    Ok(Negotiated {
        size: export_info.size,
        transmission_flags: export_info.flags,
        structured,
        min_block: export_info.min_block,
        allocation_context,
    })
}

/// Read the server's greeting (newstyle magics, the fixed-newstyle flag) and
/// answer with our flags.
fn greet(s: &mut Stream) -> Result<(), Wire> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(Wire::Protocol(format!(
            "server greeting has bad magic {magic:#018x} (is this an NBD server?)"
        )));
    }
    let second = read_u64(s)?;
    if second == OLDSTYLE_MAGIC {
        return Err(Wire::Protocol(
            "server speaks the oldstyle handshake, which is not supported".to_string(),
        ));
    }
    if second != IHAVEOPT {
        return Err(Wire::Protocol(format!(
            "server greeting has bad option magic {second:#018x}"
        )));
    }
    let handshake_flags = read_u16(s)?;
    if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Wire::Protocol(
            "server does not support the fixed newstyle handshake".to_string(),
        ));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (handshake_flags & FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes())?;
    Ok(())
}

/// Ask for structured replies: whether the server has them.
fn ask_structured_replies(s: &mut Stream) -> Result<bool, Wire> {
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (reply, data) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    if reply != REP_ACK && reply & REP_ERR_BIT == 0 {
        return Err(Wire::Protocol(format!(
            "unexpected reply {reply} ({} bytes) to NBD_OPT_STRUCTURED_REPLY",
            data.len()
        )));
    }
    Ok(reply == REP_ACK)
}

/// What NBD_OPT_GO's replies say of the export.
struct ExportInfo {
    size: u64,
    flags: u16,
    min_block: u64,
}

/// NBD_OPT_GO with the export name, asking for block sizes: the export's
/// size (required), transmission flags and minimum block size.
fn go(s: &mut Stream, export: &str) -> Result<ExportInfo, Wire> {
    let mut go = Vec::with_capacity(export.len() + 8);
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut size = None;
    let mut flags = 0u16;
    let mut min_block = 1u64;
    loop {
        let (reply, data) = read_option_reply(s, OPT_GO)?;
        if reply == REP_ACK {
            break;
        }
        if reply & REP_ERR_BIT != 0 {
            return Err(refusal(export, reply, &data));
        }
        if reply != REP_INFO {
            return Err(Wire::Protocol(format!(
                "unexpected reply type {reply} to NBD_OPT_GO"
            )));
        }
        let info = BeBytes(&data);
        match info.u16(0) {
            Some(INFO_EXPORT) => {
                size = info.u64(2);
                flags = info
                    .u16(10)
                    .ok_or_else(|| Wire::Protocol("short NBD_INFO_EXPORT reply".to_string()))?;
            }
            Some(INFO_BLOCK_SIZE) => {
                let min = info
                    .u32(2)
                    .ok_or_else(|| Wire::Protocol("short NBD_INFO_BLOCK_SIZE reply".to_string()))?;
                if !min.is_power_of_two() || min > 65536 {
                    return Err(Wire::Protocol(format!(
                        "server's minimum block size {min} is not a power of two up to 64 KiB"
                    )));
                }
                min_block = u64::from(min);
            }
            _ => {}
        }
    }
    let size = size.ok_or_else(|| Wire::Protocol("server sent no export size".to_string()))?;
    if size > i64::MAX as u64 {
        return Err(Wire::Protocol(format!(
            "server's export size {size} is too large"
        )));
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block,
    })
}

/// The server's refusal of `export` (an error reply to NBD_OPT_GO), with its
/// message.
fn refusal(export: &str, reply: u32, data: &[u8]) -> Wire {
    let message = String::from_utf8_lossy(data).into_owned();
    let what = option_error_name(reply);
    Wire::Protocol(format!(
        "server refused export '{export}': {what}{}",
        if message.is_empty() {
            String::new()
        } else {
            format!(" ({message})")
        }
    ))
}

/// Ask for the `base:allocation` context; its id if the server gives it.
fn set_meta_context(s: &mut Stream, export: &str) -> Result<Option<u32>, Wire> {
    let mut data = Vec::with_capacity(export.len() + BASE_ALLOCATION.len() + 12);
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    data.extend_from_slice(BASE_ALLOCATION.as_bytes());
    send_option(s, OPT_SET_META_CONTEXT, &data)?;
    let mut context = None;
    loop {
        let (reply, data) = read_option_reply(s, OPT_SET_META_CONTEXT)?;
        match reply {
            REP_ACK => return Ok(context),
            REP_META_CONTEXT => {
                let info = BeBytes(&data);
                let id = info.u32(0).ok_or_else(|| {
                    Wire::Protocol("short NBD_REP_META_CONTEXT reply".to_string())
                })?;
                if data.get(4..) == Some(BASE_ALLOCATION.as_bytes()) {
                    context = Some(id);
                }
            }
            r if r & REP_ERR_BIT != 0 => return Ok(None),
            other => {
                return Err(Wire::Protocol(format!(
                    "unexpected reply type {other} to NBD_OPT_SET_META_CONTEXT"
                )));
            }
        }
    }
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> Result<(), Wire> {
    s.write_all(&OptionHeader::message(option, data))?;
    Ok(())
}

fn read_option_reply(s: &mut Stream, option: u32) -> Result<(u32, Vec<u8>), Wire> {
    let mut head = [0u8; OptionReply::SIZE];
    s.read_exact(&mut head)?;
    let OptionReply {
        option: replied,
        reply,
        length: len,
    } = OptionReply::decode(&head).map_err(Wire::Protocol)?;
    if replied != option {
        return Err(Wire::Protocol(format!(
            "option reply is for option {replied}, not {option}"
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(Wire::Protocol(format!(
            "option reply of {len} bytes is too large"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((reply, data))
}
