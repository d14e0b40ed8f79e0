//! Records: what a run leaves behind for a later run to replay and shrink.
//! This module owns both files, each with its one reader and writer:
//!
//! - the **op log** ([`log`]) that `exercise --log` writes: text, one op per
//!   line, whose writes carry no data (their bytes derive from the seed, the
//!   op number and the offset);
//! - the **trace** ([`trace`]) that `serve --trace` records through the
//!   device's observer ([`recorder`]): binary, every request a client made
//!   with every write's data.
//!
//! # Why two formats
//!
//! We weighed extending the text log to carry traces. A client's writes are
//! data, not a seed: as hex in a text file they would double the bytes and
//! still need compressing and de-duplicating to be affordable (a guest
//! install writes gigabytes, much of it zeros and repeated blocks), and a
//! text line has no framing, so a log cut by a kill ends in a half line that
//! parses as a shorter, wrong request. The op log stays text (readable,
//! hand-editable, and exercise writes a line per op); the trace is a framed
//! binary file whose every record carries a length and a CRC-32C, so a torn
//! record is never taken for a real one, and whose data are split into 4 KiB
//! blocks, zeros and repeats stored once, the rest zstd-compressed.
//!
//! What they share is here too: the [`Op`] both hold (a trace's ops are the
//! device's requests, with their flags; a log's are exercise's), and
//! [`Record`], either file read for a replay, told apart by its first bytes.

pub mod log;
pub mod op;
pub mod recorder;
pub mod trace;
mod window;

pub use log::{parse_log, Log, OpLog, LOG_MAGIC};
pub use op::{check_queue_depth, Op, OpKind, MAX_QUEUE_DEPTH, MAX_REQUEST};
pub use recorder::Recorder;
pub use trace::{read_trace, Trace, TraceHeader, TraceStats, TraceWriter};

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// An op log or a trace, read whole.
#[derive(Debug)]
pub enum Record {
    /// An exercise op log.
    Log(Log),
    /// A serve trace.
    Trace(Box<Trace>),
}

impl Record {
    /// Read the record at `path`: a trace by its magic, an op log by its
    /// first line, anything else is refused naming both.
    pub fn read(path: &Path) -> Result<Record> {
        let mut head = [0u8; 32];
        let got = std::fs::File::open(path)
            .and_then(|mut f| {
                let mut n = 0;
                while n < head.len() {
                    match f.read(&mut head[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                Ok(n)
            })
            .map_err(|e| Error::io(path, "open the record", e))?;
        let head = head.get(..got).unwrap_or(&[]);
        if head.starts_with(b"BVTR") {
            return Ok(Record::Trace(Box::new(read_trace(path)?)));
        }
        if head.starts_with(b"# blkverify") {
            return Ok(Record::Log(Log::read(path)?));
        }
        Err(Error::format(
            path,
            format!(
                "neither a blkverify exercise log (first line '{LOG_MAGIC}') nor a serve trace \
                 (magic 'BVTRACE')"
            ),
        ))
    }

    /// The ops, in order.
    pub fn ops(&self) -> &[Op] {
        match self {
            Record::Log(log) => &log.ops,
            Record::Trace(trace) => &trace.ops,
        }
    }

    /// "op log" or "trace", for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Log(_) => "op log",
            Record::Trace(_) => "trace",
        }
    }

    /// The mirrored device it was recorded on, `blkverify:RAW:TEST`, if it
    /// says.
    pub fn spec(&self) -> Option<String> {
        match self {
            Record::Log(log) => log.spec.clone(),
            Record::Trace(trace) => Some(format!(
                "{}{}:{}",
                crate::blkverify::SPEC_PREFIX,
                trace.header.raw,
                trace.header.test
            )),
        }
    }

    /// The device size it was recorded on, if it says.
    pub fn size(&self) -> Option<u64> {
        match self {
            Record::Log(log) => log.size,
            Record::Trace(trace) => Some(trace.header.size),
        }
    }

    /// The connection that sent the op at `position` (traces only).
    pub fn connection(&self, position: usize) -> Option<u64> {
        match self {
            Record::Log(_) => None,
            Record::Trace(trace) => trace.connections.get(position).copied(),
        }
    }

    /// How a trace ended, when it was not closed cleanly (see
    /// [`Trace::ending`]).
    pub fn ending(&self) -> Option<String> {
        match self {
            Record::Log(_) => None,
            Record::Trace(trace) => trace.ending(),
        }
    }
}
