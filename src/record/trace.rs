//! The trace: what `serve --trace` records, every request a client made in
//! the order serve applied it to both sides, with every write's data. This
//! module is the format's one owner: [`TraceWriter`] writes it (serve's
//! recorder drives one on a thread of its own, shrink writes one directly)
//! and [`read_trace`] / [`parse_trace`] read it back. docs/file-formats.md
//! carries the same specification.
//!
//! # Format, version 1
//!
//! All integers are little-endian. A trace is a 12-byte preamble, the magic
//! `BVTRACE\0` and the version (u32, 1), then *records*, each framed:
//!
//! | size | field |
//! |---|---|
//! | 4 | payload length L (1 to [`MAX_PAYLOAD`]) |
//! | 4 | CRC-32C of the four length bytes and the payload |
//! | L | payload: a type byte, then the type's fields |
//!
//! Records are numbered from 1 in file order. Record 1 is the **header**
//! (type 1): the export size (u64), the time serve started (u64, ns since
//! the Unix epoch), the block size data is split into (u32, 4096), the
//! writer's index capacity in blocks (u32, informative), then four strings
//! (u16 length, then the bytes): the raw side, the test side (a path or an
//! NBD URI), the test side's format, and the program that wrote the trace.
//!
//! Each **request** (type 2) is one request admitted to the device, in
//! admission order (the global request number order, the order a queue
//! depth 1 replay repeats): its number (u64; they only grow), the connection
//! (u64, numbered from 1), the NBD command (u16: 0 read, 1 write, 3 flush, 4
//! trim, 5 cache, 6 write-zeroes, 7 block status) and flags (u16, NBD's:
//! 1 FUA on write, write-zeroes and trim; 2 NO_HOLE and 16 FAST_ZERO on
//! write-zeroes; 8 REQ_ONE on block status), the offset (u64) and the length
//! (u32; a flush has both 0). The range lies inside the export; a write is
//! at most 32 MiB (and may be empty, as NBD allows). A write then carries its data: an encoding byte (0 stored
//! as it is, 1 zstd-compressed), then the *body*, so encoded. The body is
//! one tag per 4 KiB block of the data (the last block may be short): 0 a
//! new block, whose bytes follow all the tags; 1 a block of zeros; 2 a
//! repeated block, followed by its id (u64). Every new block of a full 4 KiB
//! gets the next id, counting from 0 over the whole trace; a repeated block
//! names the id of an earlier one with the same bytes. The writer finds them
//! through an index of the last [`WINDOW`] blocks (by BLAKE3 digest), so its
//! memory stays bounded however long the trace. It compresses a body when that
//! saves bytes, and stops trying for a while after bodies that did not shrink.
//!
//! The **end** record (type 3), last, is written when the trace is closed:
//! the number of request records, then blocks stored new, repeated and zero,
//! the bytes written, and the time (ns since the epoch), all u64.
//!
//! # Damage and truncation
//!
//! A trace cut short (serve killed, the disk full) ends in a torn record: its
//! frame runs past the end of the file, or runs into zeros that last to the
//! end of the file (a file system that extended the file before the data
//! reached the disk, after a crash of the machine). It
//! is read up to its last whole record, and the cut is reported ("truncated
//! after record N"), as is a missing end record. Anything else that is wrong
//! (a bad magic or version, a checksum that does not match, an absurd length,
//! a field out of range) is damage: an error naming the record and the fact.

use super::op::{Op, OpKind};
use super::window::{Key, Window};
use crate::error::{usize_of, Error, Result};
use crate::nbd::wire::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// A trace's first eight bytes.
pub const MAGIC: [u8; 8] = *b"BVTRACE\0";
/// The format version this module reads and writes.
pub const VERSION: u32 = 1;
/// The magic and the version.
pub const PREAMBLE_LEN: usize = 12;
/// The block size writes' data is split into, and repeats are found at.
pub const BLOCK: usize = 4096;
/// The largest write a trace holds (serve's limit).
pub const MAX_WRITE: u64 = crate::nbd::wire::MAX_REQUEST;
/// The largest payload: a write of [`MAX_WRITE`] bytes stored as it is,
/// with its tags and the request's fields.
pub const MAX_PAYLOAD: u32 = (MAX_WRITE + MAX_WRITE / BLOCK as u64 * 9 + 64) as u32;
/// Blocks the writer's index of repeats holds (1 GiB of distinct data; about
/// 20 MiB of memory).
pub const WINDOW: usize = 1 << 18;

const FRAME_LEN: usize = 8;
const TYPE_HEADER: u8 = 1;
const TYPE_REQUEST: u8 = 2;
const TYPE_END: u8 = 3;
const TAG_NEW: u8 = 0;
const TAG_ZERO: u8 = 1;
const TAG_REPEAT: u8 = 2;
const STORED: u8 = 0;
const ZSTD: u8 = 1;
/// Bodies shorter than this are not worth compressing.
const COMPRESS_MIN: usize = 64;
/// After a body that compression did not shrink, the writer skips trying for
/// up to this many writes (doubling from 1 while it keeps failing): random
/// data, which a client such as fio writes, costs zstd 5 µs a block for
/// nothing. A body that shrinks resets it.
const SKIP_COMPRESS_MAX: u32 = 64;
/// The fixed fields of a request record, the type byte included.
const REQUEST_LEN: usize = 1 + 8 + 8 + 2 + 2 + 8 + 4;

/// Whether `head` (a file's first bytes) is a trace's.
pub fn has_magic(head: &[u8]) -> bool {
    head.starts_with(&MAGIC)
}

/// What a trace says about the run it recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeader {
    /// The export's size in bytes.
    pub size: u64,
    /// When serve started, in ns since the Unix epoch.
    pub started_ns: u64,
    /// The raw side, as serve named it.
    pub raw: String,
    /// The test side: a path or an NBD URI.
    pub test: String,
    /// The test side's format (`qcow2`, `raw`, `nbd`).
    pub test_format: String,
    /// The program that wrote the trace.
    pub creator: String,
}

impl TraceHeader {
    /// The header of a trace of `device`'s requests, starting now.
    pub fn of_device(device: &crate::blkverify::Blkverify, creator: &str) -> TraceHeader {
        use crate::driver::BlockDriver;
        TraceHeader {
            size: device.size(),
            started_ns: now_ns(),
            raw: device.raw().path().display().to_string(),
            test: device.test().path().display().to_string(),
            test_format: device.test().format_name().to_string(),
            creator: creator.to_string(),
        }
    }
}

/// What a writer stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceStats {
    /// Request records.
    pub requests: u64,
    /// Write requests among them.
    pub writes: u64,
    /// Bytes those writes carried.
    pub write_bytes: u64,
    /// Blocks stored (new).
    pub new_blocks: u64,
    /// Blocks stored as a reference to an earlier one.
    pub repeated_blocks: u64,
    /// Blocks of zeros (not stored).
    pub zero_blocks: u64,
    /// The trace's length in bytes so far.
    pub file_bytes: u64,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The NBD command and flags of `kind`.
pub(super) fn command_of(kind: OpKind) -> (u16, u16) {
    let fua = |on: bool| if on { CMD_FLAG_FUA } else { 0 };
    match kind {
        OpKind::Read => (CMD_READ, 0),
        OpKind::Write { fua: f } => (CMD_WRITE, fua(f)),
        OpKind::Zero {
            unmap,
            fua: f,
            fast,
        } => (
            CMD_WRITE_ZEROES,
            fua(f)
                | if unmap { 0 } else { CMD_FLAG_NO_HOLE }
                | if fast { CMD_FLAG_FAST_ZERO } else { 0 },
        ),
        OpKind::Discard { fua: f } => (CMD_TRIM, fua(f)),
        OpKind::Flush => (CMD_FLUSH, 0),
        OpKind::BlockStatus { one } => (CMD_BLOCK_STATUS, if one { CMD_FLAG_REQ_ONE } else { 0 }),
        OpKind::Cache => (CMD_CACHE, 0),
    }
}

/// The kind an NBD command and its flags stand for; `None` for a command a
/// trace does not hold, or a flag the command does not take.
pub(super) fn kind_of(command: u16, flags: u16) -> Option<OpKind> {
    let only = |allowed: u16| flags & !allowed == 0;
    let fua = flags & CMD_FLAG_FUA != 0;
    match command {
        CMD_READ if only(0) => Some(OpKind::Read),
        CMD_WRITE if only(CMD_FLAG_FUA) => Some(OpKind::Write { fua }),
        CMD_WRITE_ZEROES if only(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) => {
            Some(OpKind::Zero {
                unmap: flags & CMD_FLAG_NO_HOLE == 0,
                fua,
                fast: flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
        CMD_TRIM if only(CMD_FLAG_FUA) => Some(OpKind::Discard { fua }),
        CMD_FLUSH if only(0) => Some(OpKind::Flush),
        CMD_BLOCK_STATUS if only(CMD_FLAG_REQ_ONE) => Some(OpKind::BlockStatus {
            one: flags & CMD_FLAG_REQ_ONE != 0,
        }),
        CMD_CACHE if only(0) => Some(OpKind::Cache),
        _ => None,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let n = bytes.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(bytes.get(..n).unwrap_or(&[]));
}

/// Writes a trace: the preamble and header at creation, then a record per
/// request, the end record at [`TraceWriter::finish`]. Writes' data are split
/// into blocks, zeros and repeats stored as tags, the rest compressed when
/// that saves bytes. Not thread-safe: serve's recorder feeds one from a
/// thread of its own.
pub struct TraceWriter {
    path: PathBuf,
    out: BufWriter<File>,
    index: Window,
    next_id: u64,
    last_number: Option<u64>,
    compressor: zstd::bulk::Compressor<'static>,
    payload: Vec<u8>,
    tags: Vec<u8>,
    fresh: Vec<u8>,
    packed: Vec<u8>,
    size: u64,
    /// Writes whose bodies are stored without trying zstd, and the next
    /// such run's length (see [`SKIP_COMPRESS_MAX`]).
    skip_compress: u32,
    skip_next: u32,
    stats: TraceStats,
}

impl TraceWriter {
    /// Create (or truncate) `path` and write the preamble and `header`.
    pub fn create(path: &Path, header: &TraceHeader) -> Result<TraceWriter> {
        let file = File::create(path).map_err(|e| Error::io(path, "create the trace", e))?;
        let compressor =
            zstd::bulk::Compressor::new(1).map_err(|e| Error::io(path, "start zstd", e))?;
        let mut writer = TraceWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            index: Window::new(WINDOW),
            next_id: 0,
            last_number: None,
            compressor,
            payload: Vec::new(),
            tags: Vec::new(),
            fresh: Vec::new(),
            packed: Vec::new(),
            size: header.size,
            skip_compress: 0,
            skip_next: 1,
            stats: TraceStats::default(),
        };
        writer.put(&MAGIC)?;
        writer.put(&VERSION.to_le_bytes())?;
        let mut p = vec![TYPE_HEADER];
        p.extend_from_slice(&header.size.to_le_bytes());
        p.extend_from_slice(&header.started_ns.to_le_bytes());
        p.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        p.extend_from_slice(&(WINDOW as u32).to_le_bytes());
        for s in [
            &header.raw,
            &header.test,
            &header.test_format,
            &header.creator,
        ] {
            put_str(&mut p, s);
        }
        writer.payload = p;
        writer.frame()?;
        writer.flush()?;
        Ok(writer)
    }

    /// The trace's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was written so far.
    pub fn stats(&self) -> TraceStats {
        self.stats
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.stats.file_bytes += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, "write the trace", e))
    }

    /// Frame and write `self.payload`.
    fn frame(&mut self) -> Result<()> {
        let payload = std::mem::take(&mut self.payload);
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|n| (1..=MAX_PAYLOAD).contains(n))
            .ok_or_else(|| Error::Internal(format!("a trace record of {} bytes", payload.len())))?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), &payload);
        let mut head = [0u8; FRAME_LEN];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&crc.to_le_bytes());
        let written = self.put(&head).and_then(|()| self.put(&payload));
        self.payload = payload;
        self.payload.clear();
        written
    }

    /// Record request `number` from `connection`: `op` (its number is
    /// ignored), with `data`, a write's bytes (`op.length` of them).
    pub fn request(
        &mut self,
        number: u64,
        connection: u64,
        op: &Op,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let bad = |m: String| Err(Error::Internal(format!("trace request {number}: {m}")));
        if self.last_number.is_some_and(|last| number <= last) {
            return bad("request numbers must grow".to_string());
        }
        let (offset, length) = match op.kind {
            OpKind::Flush => (0, 0),
            _ => (op.offset, op.length),
        };
        let Ok(length32) = u32::try_from(length) else {
            return bad(format!("length {length} is over 4 GiB"));
        };
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return bad(format!("{offset}+{length} ends past the export"));
        }
        let data = match (op.carries_data(), data) {
            (true, Some(d)) if d.len() as u64 == length && length <= MAX_WRITE => Some(d),
            (false, None) => None,
            _ => return bad("a write needs exactly its data, nothing else any".to_string()),
        };
        let (command, flags) = command_of(op.kind);
        let mut p = std::mem::take(&mut self.payload);
        p.push(TYPE_REQUEST);
        p.extend_from_slice(&number.to_le_bytes());
        p.extend_from_slice(&connection.to_le_bytes());
        p.extend_from_slice(&command.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&length32.to_le_bytes());
        if let Some(data) = data {
            self.encode_data(data, &mut p);
            self.stats.writes += 1;
            self.stats.write_bytes += length;
        }
        self.payload = p;
        self.frame()?;
        self.last_number = Some(number);
        self.stats.requests += 1;
        Ok(())
    }

    /// Append a write's encoding byte and body to `p`.
    fn encode_data(&mut self, data: &[u8], p: &mut Vec<u8>) {
        self.tags.clear();
        self.fresh.clear();
        for block in data.chunks(BLOCK) {
            if block.iter().all(|&b| b == 0) {
                self.tags.push(TAG_ZERO);
                self.stats.zero_blocks += 1;
                continue;
            }
            if block.len() == BLOCK {
                let digest = blake3::hash(block);
                let mut key: Key = [0u8; 16];
                key.copy_from_slice(&digest.as_bytes()[..16]);
                if let Some(id) = self.index.get(&key) {
                    self.tags.push(TAG_REPEAT);
                    self.tags.extend_from_slice(&id.to_le_bytes());
                    self.stats.repeated_blocks += 1;
                    continue;
                }
                self.index.insert(key, self.next_id);
                self.next_id += 1;
            }
            self.tags.push(TAG_NEW);
            self.fresh.extend_from_slice(block);
            self.stats.new_blocks += 1;
        }
        let body_len = self.tags.len() + self.fresh.len();
        let try_zstd = self.fresh.len() >= COMPRESS_MIN && self.skip_compress == 0;
        if self.fresh.len() >= COMPRESS_MIN && !try_zstd {
            self.skip_compress -= 1;
        }
        if try_zstd {
            let mut body = std::mem::take(&mut self.tags);
            body.extend_from_slice(&self.fresh);
            let mut packed = std::mem::take(&mut self.packed);
            packed.clear();
            // Room for one byte less than the body: compression that saves
            // nothing fails to fit, and the body is stored as it is.
            packed.reserve(body_len.saturating_sub(1));
            let fits = self.compressor.compress_to_buffer(&body, &mut packed);
            if matches!(fits, Ok(n) if n < body_len) {
                p.push(ZSTD);
                p.extend_from_slice(&packed);
                self.skip_next = 1;
            } else {
                p.push(STORED);
                p.extend_from_slice(&body);
                self.skip_compress = self.skip_next;
                self.skip_next = (self.skip_next * 2).min(SKIP_COMPRESS_MAX);
            }
            self.packed = packed;
            body.clear();
            self.tags = body;
        } else {
            p.push(STORED);
            p.extend_from_slice(&self.tags);
            p.extend_from_slice(&self.fresh);
        }
    }

    /// Push what was written to the file (not to the disk: see
    /// [`TraceWriter::finish`]).
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io(&self.path, "write the trace", e))
    }

    /// Write the end record, flush and make the trace durable.
    pub fn finish(mut self) -> Result<TraceStats> {
        let s = self.stats;
        let mut p = vec![TYPE_END];
        for n in [
            s.requests,
            s.new_blocks,
            s.repeated_blocks,
            s.zero_blocks,
            s.write_bytes,
            now_ns(),
        ] {
            p.extend_from_slice(&n.to_le_bytes());
        }
        self.payload = p;
        self.frame()?;
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(&self.path, "sync the trace", e))?;
        Ok(self.stats)
    }
}

/// Where one block of a write's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Zero,
    /// A full block, by id.
    Block(u64),
    /// A short last block, at this offset of the tails.
    Tail(u64),
}

/// Unique blocks, kept once each: full blocks by id in segments (no
/// reallocation of one huge buffer), short last blocks in one buffer.
#[derive(Debug, Default)]
struct Store {
    segments: Vec<Vec<u8>>,
    blocks: u64,
    tails: Vec<u8>,
    pieces: Vec<Piece>,
}

/// Blocks per segment of the store (64 MiB).
const SEGMENT_BLOCKS: u64 = 16384;

impl Store {
    fn push_block(&mut self, block: &[u8]) -> u64 {
        if self.blocks % SEGMENT_BLOCKS == 0 {
            // Grown as blocks come (a trace of one write holds one block).
            self.segments.push(Vec::new());
        }
        if let Some(segment) = self.segments.last_mut() {
            segment.extend_from_slice(block);
        }
        self.blocks += 1;
        self.blocks - 1
    }

    fn block(&self, id: u64) -> Option<&[u8]> {
        let segment = self
            .segments
            .get(usize::try_from(id / SEGMENT_BLOCKS).ok()?)?;
        let at = usize::try_from(id % SEGMENT_BLOCKS).ok()? * BLOCK;
        segment.get(at..at + BLOCK)
    }

    /// Bytes held.
    fn bytes(&self) -> u64 {
        self.blocks * BLOCK as u64 + self.tails.len() as u64
    }
}

/// Where a trace was cut short: it is read up to its last whole record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Whole records read (the header included).
    pub records: u64,
    /// Where the torn part starts.
    pub offset: u64,
    /// Its length.
    pub torn_bytes: u64,
}

/// The end record of a trace closed cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// Request records.
    pub requests: u64,
    /// When it was closed (ns since the epoch).
    pub ended_ns: u64,
}

/// A trace, read whole: its header, its requests as ops (the op number is
/// the request number), and their data.
#[derive(Debug)]
pub struct Trace {
    /// The trace's path.
    pub path: PathBuf,
    /// What it says about the run.
    pub header: TraceHeader,
    /// Its requests, in order.
    pub ops: Vec<Op>,
    /// Each request's connection.
    pub connections: Vec<u64>,
    /// Each request's first piece in the store (writes only).
    data: Vec<Option<u64>>,
    store: Store,
    /// The end record, if the trace was closed cleanly.
    pub end: Option<End>,
    /// Where it was cut short, if it was.
    pub cut: Option<Cut>,
}

impl Trace {
    /// Fill `buf` with the data of the write at `position` (as long as it);
    /// false if that request is not a write of that length.
    pub fn fill(&self, position: usize, buf: &mut [u8]) -> bool {
        let (Some(op), Some(Some(first))) = (self.ops.get(position), self.data.get(position))
        else {
            return false;
        };
        if buf.len() as u64 != op.length {
            return false;
        }
        let Ok(first) = usize::try_from(*first) else {
            return false;
        };
        for (i, block) in buf.chunks_mut(BLOCK).enumerate() {
            let source = match self.store.pieces.get(first + i) {
                Some(Piece::Zero) => None,
                Some(Piece::Block(id)) => self.store.block(*id),
                Some(Piece::Tail(at)) => usize::try_from(*at)
                    .ok()
                    .and_then(|at| self.store.tails.get(at..at + block.len())),
                None => return false,
            };
            match source {
                Some(bytes) if bytes.len() == block.len() => block.copy_from_slice(bytes),
                Some(_) => return false,
                None => block.fill(0),
            }
        }
        true
    }

    /// The bytes of unique write data held in memory.
    pub fn data_bytes(&self) -> u64 {
        self.store.bytes()
    }

    /// A one-line note of how the trace ended: `None` when it was closed
    /// cleanly, else where it was cut.
    pub fn ending(&self) -> Option<String> {
        let path = self.path.display();
        match (&self.cut, &self.end) {
            (Some(cut), _) => Some(format!(
                "{path}: truncated after record {} (the {} bytes from offset {} are a torn \
                 record): replaying its {} whole requests",
                cut.records,
                cut.torn_bytes,
                cut.offset,
                self.ops.len()
            )),
            (None, None) => Some(format!(
                "{path}: no end record: the writer stopped after record {} (serve killed?): \
                 replaying its {} requests",
                self.ops.len() + 1,
                self.ops.len()
            )),
            (None, Some(_)) => None,
        }
    }

    /// Write the requests at `positions` (in the order given) to a new trace
    /// at `path`, with this trace's header (and `creator`).
    pub fn write_subset(&self, path: &Path, positions: &[usize], creator: &str) -> Result<()> {
        let header = TraceHeader {
            creator: creator.to_string(),
            started_ns: now_ns(),
            ..self.header.clone()
        };
        let mut writer = TraceWriter::create(path, &header)?;
        let mut buf = Vec::new();
        for &p in positions {
            let (Some(op), Some(connection)) = (self.ops.get(p), self.connections.get(p)) else {
                return Err(Error::InvalidArgument(format!(
                    "{}: no request at position {p}",
                    self.path.display()
                )));
            };
            let data = if op.carries_data() {
                buf.resize(usize_of(op.length)?, 0);
                if !self.fill(p, &mut buf) {
                    return Err(Error::Internal(format!("trace request {p} has no data")));
                }
                Some(&buf[..])
            } else {
                None
            };
            writer.request(op.number, *connection, op, data)?;
        }
        writer.finish().map(|_| ())
    }
}

/// Read the trace at `path` whole.
pub fn read_trace(path: &Path) -> Result<Trace> {
    let file = File::open(path).map_err(|e| Error::io(path, "open the trace", e))?;
    Reader::new(path, BufReader::with_capacity(1 << 20, file)).read()
}

/// Parse `bytes` as a trace named `name` (for the fuzz target and tests).
pub fn parse_trace(name: &str, bytes: &[u8]) -> Result<Trace> {
    Reader::new(Path::new(name), bytes).read()
}

/// What reading one frame came to.
enum Frame {
    /// A whole, checked record (in the reader's payload buffer).
    Record,
    /// The end of the file, at a record boundary.
    Eof,
    /// A torn record: `n` bytes from the frame's start to the end of the file.
    Torn(u64),
}

/// Bytes in a payload, checked field by field: every read is bounded, and
/// running short is damage.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::from(self.u16()?);
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn rest(&mut self) -> &'a [u8] {
        let out = self.bytes.get(self.at..).unwrap_or(&[]);
        self.at = self.bytes.len();
        out
    }
    fn done(&self) -> bool {
        self.at == self.bytes.len()
    }
}

struct Reader<'p, R: Read> {
    path: &'p Path,
    input: R,
    offset: u64,
    records: u64,
    payload: Vec<u8>,
    body: Vec<u8>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl<'p, R: Read> Reader<'p, R> {
    fn new(path: &'p Path, input: R) -> Self {
        Reader {
            path,
            input,
            offset: 0,
            records: 0,
            payload: Vec::new(),
            body: Vec::new(),
            decompressor: None,
        }
    }

    fn damaged(&self, record: u64, at: u64, fact: impl std::fmt::Display) -> Error {
        Error::corrupt(
            self.path,
            format!("trace record {record} (at offset {at}): {fact}: the trace is damaged"),
        )
    }

    /// Read up to `buf.len()` bytes; fewer only at the end of the file.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.input.read(buf.get_mut(done..).unwrap_or(&mut [])) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(self.path, "read the trace", e)),
            }
        }
        Ok(done)
    }

    /// Whether the rest of the file is zeros; consumes it, and counts it.
    fn rest_is_zeros(&mut self, counted: &mut u64) -> Result<bool> {
        let mut buf = [0u8; 1 << 16];
        let mut zeros = true;
        loop {
            let n = self.fill(&mut buf)?;
            if n == 0 {
                return Ok(zeros);
            }
            *counted += n as u64;
            zeros &= buf.get(..n).unwrap_or(&[]).iter().all(|&b| b == 0);
        }
    }

    /// The next frame: its payload into `self.payload`, checked.
    fn frame(&mut self) -> Result<Frame> {
        let start = self.offset;
        let record = self.records + 1;
        let mut head = [0u8; FRAME_LEN];
        let got = self.fill(&mut head)?;
        if got == 0 {
            return Ok(Frame::Eof);
        }
        let mut torn = got as u64;
        if got < FRAME_LEN {
            self.rest_is_zeros(&mut torn)?;
            return Ok(Frame::Torn(torn));
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > MAX_PAYLOAD {
            if head[FRAME_LEN - 1] == 0 && self.rest_is_zeros(&mut torn)? {
                return Ok(Frame::Torn(torn));
            }
            return Err(self.damaged(
                record,
                start,
                format!("length {len} is absurd (1 to {MAX_PAYLOAD})"),
            ));
        }
        // Read what is there, growing the buffer with it: a torn record that
        // claims megabytes at the end of a short file costs what the file has.
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        let got = loop {
            match (&mut self.input)
                .take(u64::from(len) - payload.len() as u64)
                .read_to_end(&mut payload)
            {
                Ok(_) => break payload.len(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(self.path, "read the trace", e)),
            }
        };
        torn += got as u64;
        let whole = got == len as usize;
        let checked = whole && crc32c::crc32c_append(crc32c::crc32c(&head[..4]), &payload) == crc;
        // A record that runs into a zero-filled end of the file: the file
        // system extended it before the data reached the disk.
        let ends_in_zero = payload.last() == Some(&0);
        self.payload = payload;
        if !whole {
            return Ok(Frame::Torn(torn));
        }
        if !checked {
            if ends_in_zero && self.rest_is_zeros(&mut torn)? {
                return Ok(Frame::Torn(torn));
            }
            return Err(self.damaged(record, start, "checksum mismatch"));
        }
        self.offset += torn;
        self.records = record;
        Ok(Frame::Record)
    }

    fn read(mut self) -> Result<Trace> {
        let mut preamble = [0u8; PREAMBLE_LEN];
        let got = self.fill(&mut preamble)?;
        let head = preamble.get(..got).unwrap_or(&[]);
        if got < MAGIC.len() && MAGIC.starts_with(head) {
            return Err(self.truncated_head(got));
        }
        if !has_magic(head) {
            return Err(Error::format(
                self.path,
                "not a blkverify trace (bad magic: a trace starts with 'BVTRACE')",
            ));
        }
        if got < PREAMBLE_LEN {
            return Err(self.truncated_head(got));
        }
        let version = u32::from_le_bytes([preamble[8], preamble[9], preamble[10], preamble[11]]);
        if version != VERSION {
            return Err(Error::format(
                self.path,
                format!("trace version {version} is not supported (this blkverify reads version {VERSION})"),
            ));
        }
        self.offset = PREAMBLE_LEN as u64;
        let header = match self.frame()? {
            Frame::Record => self.header()?,
            Frame::Eof | Frame::Torn(_) => {
                return Err(Error::corrupt(
                    self.path,
                    "truncated in its header record: the trace holds no request",
                ))
            }
        };
        let mut trace = Trace {
            path: self.path.to_path_buf(),
            header,
            ops: Vec::new(),
            connections: Vec::new(),
            data: Vec::new(),
            store: Store::default(),
            end: None,
            cut: None,
        };
        loop {
            let start = self.offset;
            match self.frame()? {
                Frame::Eof => break,
                Frame::Torn(n) => {
                    trace.cut = Some(Cut {
                        records: self.records,
                        offset: start,
                        torn_bytes: n,
                    });
                    break;
                }
                Frame::Record => {}
            }
            if trace.end.is_some() {
                return Err(self.damaged(self.records, start, "a record after the end record"));
            }
            match self.payload.first().copied() {
                Some(TYPE_REQUEST) => self.request(&mut trace, start)?,
                Some(TYPE_END) => {
                    let end = self.end(start)?;
                    if end.requests != trace.ops.len() as u64 {
                        return Err(self.damaged(
                            self.records,
                            start,
                            format!(
                                "the end record counts {} requests, the trace holds {}",
                                end.requests,
                                trace.ops.len()
                            ),
                        ));
                    }
                    trace.end = Some(end);
                }
                Some(TYPE_HEADER) => {
                    return Err(self.damaged(self.records, start, "a second header record"))
                }
                Some(other) => {
                    return Err(self.damaged(
                        self.records,
                        start,
                        format!("unknown record type {other}"),
                    ))
                }
                None => return Err(self.damaged(self.records, start, "an empty record")),
            }
        }
        Ok(trace)
    }

    fn truncated_head(&self, got: usize) -> Error {
        Error::corrupt(
            self.path,
            format!("truncated header: {got} bytes, and a trace starts with {PREAMBLE_LEN} (magic and version)"),
        )
    }

    fn header(&mut self) -> Result<TraceHeader> {
        let at = PREAMBLE_LEN as u64;
        let payload = std::mem::take(&mut self.payload);
        let mut f = Fields {
            bytes: &payload,
            at: 0,
        };
        let parsed = (|| {
            if f.u8()? != TYPE_HEADER {
                return None;
            }
            let size = f.u64()?;
            let started_ns = f.u64()?;
            let block = f.u32()?;
            let _window = f.u32()?;
            let header = TraceHeader {
                size,
                started_ns,
                raw: f.string()?,
                test: f.string()?,
                test_format: f.string()?,
                creator: f.string()?,
            };
            Some((header, block))
        })();
        let done = f.done();
        self.payload = payload;
        match parsed {
            Some((header, block)) if done && block as usize == BLOCK => Ok(header),
            Some((_, block)) if block as usize != BLOCK => {
                Err(self.damaged(1, at, format!("block size {block} is not {BLOCK}")))
            }
            _ => Err(self.damaged(1, at, "not a well-formed header record")),
        }
    }

    fn end(&mut self, at: u64) -> Result<End> {
        let mut f = Fields {
            bytes: &self.payload,
            at: 1,
        };
        let mut n = [0u64; 6];
        for v in &mut n {
            match f.u64() {
                Some(x) => *v = x,
                None => return Err(self.damaged(self.records, at, "a short end record")),
            }
        }
        if !f.done() {
            return Err(self.damaged(self.records, at, "a long end record"));
        }
        Ok(End {
            requests: n[0],
            ended_ns: n[5],
        })
    }

    fn request(&mut self, trace: &mut Trace, at: u64) -> Result<()> {
        let record = self.records;
        let payload = std::mem::take(&mut self.payload);
        let result = self.parse_request(trace, &payload, record, at);
        self.payload = payload;
        result
    }

    fn parse_request(
        &mut self,
        trace: &mut Trace,
        payload: &[u8],
        record: u64,
        at: u64,
    ) -> Result<()> {
        if payload.len() < REQUEST_LEN {
            return Err(self.damaged(record, at, "a short request record"));
        }
        let mut f = Fields {
            bytes: payload,
            at: 1,
        };
        let (
            Some(number),
            Some(connection),
            Some(command),
            Some(flags),
            Some(offset),
            Some(length),
        ) = (f.u64(), f.u64(), f.u16(), f.u16(), f.u64(), f.u32())
        else {
            return Err(self.damaged(record, at, "a short request record"));
        };
        let length = u64::from(length);
        let Some(kind) = kind_of(command, flags) else {
            return Err(self.damaged(
                record,
                at,
                format!("command {command} with flags {flags:#x} is not a request a trace holds"),
            ));
        };
        if trace.ops.last().is_some_and(|last| number <= last.number) {
            return Err(self.damaged(
                record,
                at,
                format!("request number {number} does not follow the one before it"),
            ));
        }
        let size = trace.header.size;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(self.damaged(
                record,
                at,
                format!("request {number}: {offset}+{length} ends past the export ({size} bytes)"),
            ));
        }
        if kind == OpKind::Flush && (offset, length) != (0, 0) {
            return Err(self.damaged(record, at, "a flush with a range"));
        }
        let op = Op {
            number,
            kind,
            offset,
            length,
        };
        let data = if op.carries_data() {
            if length > MAX_WRITE {
                return Err(self.damaged(
                    record,
                    at,
                    format!("a write of {length} bytes (at most {MAX_WRITE})"),
                ));
            }
            let encoded = f.rest();
            Some(self.data(trace, encoded, length, record, at)?)
        } else {
            if !f.done() {
                return Err(self.damaged(record, at, "data after a request that carries none"));
            }
            None
        };
        trace.ops.push(op);
        trace.connections.push(connection);
        trace.data.push(data);
        Ok(())
    }

    /// Decode a write's data into the store; returns its first piece.
    fn data(
        &mut self,
        trace: &mut Trace,
        encoded: &[u8],
        length: u64,
        record: u64,
        at: u64,
    ) -> Result<u64> {
        let blocks = length.div_ceil(BLOCK as u64);
        // Tags (at most 9 bytes a block) and the data.
        let bound = usize_of(blocks * 9 + length)?;
        let (encoding, rest) = match encoded.split_first() {
            Some((e, rest)) => (*e, rest),
            None => return Err(self.damaged(record, at, "a write without its data")),
        };
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        match encoding {
            STORED => body.extend_from_slice(rest),
            ZSTD => {
                let decompressor = match &mut self.decompressor {
                    Some(d) => d,
                    slot => slot.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| Error::io(self.path, "start zstd", e))?,
                    ),
                };
                body.reserve(bound);
                if decompressor.decompress_to_buffer(rest, &mut body).is_err() {
                    self.body = body;
                    return Err(self.damaged(
                        record,
                        at,
                        format!("the write's data do not decompress into {bound} bytes"),
                    ));
                }
            }
            other => {
                self.body = body;
                return Err(self.damaged(record, at, format!("data encoding {other}")));
            }
        }
        let result = self.pieces(trace, &body, length, blocks, record, at);
        self.body = body;
        result
    }

    fn pieces(
        &self,
        trace: &mut Trace,
        body: &[u8],
        length: u64,
        blocks: u64,
        record: u64,
        at: u64,
    ) -> Result<u64> {
        let store = &mut trace.store;
        let first = store.pieces.len() as u64;
        let mark = (store.pieces.len(), store.tails.len());
        let mut tags = Fields { bytes: body, at: 0 };
        let mut plan = Vec::with_capacity(usize_of(blocks)?);
        // Ids known so far: earlier records' blocks, and this one's before
        // the tag (a write may repeat its own block).
        let mut known = store.blocks;
        for i in 0..blocks {
            let len = (length - i * BLOCK as u64).min(BLOCK as u64);
            let piece = match tags.u8() {
                Some(TAG_NEW) => {
                    if len == BLOCK as u64 {
                        known += 1;
                    }
                    None
                }
                Some(TAG_ZERO) => Some(Piece::Zero),
                Some(TAG_REPEAT) => match tags.u64() {
                    Some(id) if len == BLOCK as u64 && id < known => Some(Piece::Block(id)),
                    Some(id) => {
                        return Err(self.damaged(
                            record,
                            at,
                            format!("block {i} repeats block {id}, which no earlier record stored"),
                        ))
                    }
                    None => return Err(self.damaged(record, at, "a short block list")),
                },
                Some(tag) => {
                    return Err(self.damaged(record, at, format!("block {i} has tag {tag}")))
                }
                None => return Err(self.damaged(record, at, "a short block list")),
            };
            plan.push((piece, len as usize));
        }
        let mut fresh = Fields {
            bytes: body,
            at: tags.at,
        };
        for (piece, len) in plan {
            let piece = match piece {
                Some(p) => p,
                None => {
                    let Some(bytes) = fresh.take(len) else {
                        store.pieces.truncate(mark.0);
                        store.tails.truncate(mark.1);
                        return Err(self.damaged(record, at, "the write's data are short"));
                    };
                    if len == BLOCK {
                        Piece::Block(store.push_block(bytes))
                    } else {
                        store.tails.extend_from_slice(bytes);
                        Piece::Tail((store.tails.len() - len) as u64)
                    }
                }
            };
            store.pieces.push(piece);
        }
        if !fresh.done() {
            return Err(self.damaged(record, at, "the write's data are long"));
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64) -> TraceHeader {
        TraceHeader {
            size,
            started_ns: 1,
            raw: "raw.img".to_string(),
            test: "nbd+unix:///?socket=/tmp/s".to_string(),
            test_format: "nbd".to_string(),
            creator: "test".to_string(),
        }
    }

    fn op(number: u64, kind: OpKind, offset: u64, length: u64) -> Op {
        Op {
            number,
            kind,
            offset,
            length,
        }
    }

    /// Random-looking bytes that do not compress.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A trace of every kind, with data that repeats, zeros, a short tail,
    /// and text that compresses.
    fn sample(path: &Path) -> (Vec<Op>, Vec<Vec<u8>>, TraceStats) {
        let mut w = TraceWriter::create(path, &header(64 << 20)).unwrap();
        let a = noise(1, 3 * BLOCK);
        let mut b = vec![0u8; 2 * BLOCK];
        b.extend_from_slice(&a[..BLOCK]); // a repeat of a's first block
        b.extend_from_slice(&noise(2, 100)); // a short tail
        let text: Vec<u8> = (0..2000)
            .flat_map(|i| format!("blkverify trace line {i}\n").into_bytes())
            .collect();
        let ops = vec![
            op(0, OpKind::Write { fua: false }, 0, a.len() as u64),
            op(1, OpKind::Read, 0, 4096),
            op(3, OpKind::Write { fua: true }, 1 << 20, b.len() as u64),
            op(
                4,
                OpKind::Zero {
                    unmap: false,
                    fua: true,
                    fast: true,
                },
                4096,
                8192,
            ),
            op(5, OpKind::Discard { fua: false }, 0, 512),
            op(6, OpKind::Flush, 0, 0),
            op(7, OpKind::BlockStatus { one: true }, 0, 64 << 20),
            op(8, OpKind::Cache, 512, 512),
            op(9, OpKind::Write { fua: false }, 2 << 20, text.len() as u64),
            op(10, OpKind::Write { fua: false }, 4096, 0),
        ];
        let datas = vec![a, b, text, Vec::new()];
        let mut next = datas.iter();
        for (i, o) in ops.iter().enumerate() {
            let data = o.carries_data().then(|| next.next().unwrap().as_slice());
            w.request(o.number, 1 + i as u64 % 2, o, data).unwrap();
        }
        let stats = w.finish().unwrap();
        (ops, datas, stats)
    }

    #[test]
    fn a_trace_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bvt");
        let (ops, datas, stats) = sample(&path);
        assert_eq!(stats.requests, ops.len() as u64);
        assert_eq!(stats.repeated_blocks, 1);
        assert_eq!(stats.zero_blocks, 2);
        assert_eq!(stats.file_bytes, std::fs::metadata(&path).unwrap().len());
        let trace = read_trace(&path).unwrap();
        assert_eq!(trace.header, header(64 << 20));
        assert_eq!(trace.ops, ops);
        assert_eq!(trace.connections[..3], [1, 2, 1]);
        assert!(trace.end.is_some() && trace.cut.is_none() && trace.ending().is_none());
        let writes: Vec<usize> = (0..ops.len()).filter(|&p| ops[p].carries_data()).collect();
        for (p, data) in writes.iter().zip(&datas) {
            let mut buf = vec![0xeeu8; data.len()];
            assert!(trace.fill(*p, &mut buf));
            assert_eq!(&buf, data);
        }
        assert!(!trace.fill(1, &mut [0u8; 4096]), "a read has no data");
        // The text compressed: the file is far smaller than the data.
        assert!(stats.file_bytes < (3 * BLOCK + 3 * BLOCK + 100 + 4096) as u64);
        // A subset, rewritten, reads back the same.
        let sub = dir.path().join("sub.bvt");
        trace.write_subset(&sub, &[2, 8], "shrink").unwrap();
        let again = read_trace(&sub).unwrap();
        assert_eq!(again.ops, vec![ops[2], ops[8]]);
        let mut buf = vec![0u8; datas[1].len()];
        assert!(again.fill(0, &mut buf));
        assert_eq!(buf, datas[1]);
    }

    #[test]
    fn a_cut_trace_reads_to_its_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bvt");
        let (ops, _, _) = sample(&path);
        let bytes = std::fs::read(&path).unwrap();
        // Every cut inside the requests: the whole records before it are read.
        let mut seen = 0;
        let header_end =
            PREAMBLE_LEN + 8 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        for cut in (header_end..bytes.len()).step_by(7) {
            let trace = parse_trace("t.bvt", &bytes[..cut]).unwrap();
            assert!(trace.ops.len() <= ops.len());
            assert_eq!(trace.ops[..], ops[..trace.ops.len()]);
            assert!(trace.ops.len() >= seen);
            seen = trace.ops.len();
            let note = trace.ending().unwrap_or_default();
            assert!(
                note.contains("truncated after record") || note.contains("no end record"),
                "{note}"
            );
        }
        assert_eq!(seen, ops.len());
        // A tail of zeros (the disk never got the data) is a cut too.
        let mut zeroed = bytes[..bytes.len() - 50].to_vec();
        zeroed.extend_from_slice(&[0u8; 4096]);
        let trace = parse_trace("t.bvt", &zeroed).unwrap();
        assert!(trace.cut.is_some());
    }

    #[test]
    fn damage_is_an_error_naming_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bvt");
        sample(&path);
        let bytes = std::fs::read(&path).unwrap();
        let err = |b: &[u8]| parse_trace("t.bvt", b).unwrap_err().to_string();
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(err(&magic).contains("not a blkverify trace (bad magic"));
        let mut version = bytes.clone();
        version[8] = 2;
        assert!(err(&version).contains("trace version 2 is not supported"));
        assert!(err(&bytes[..7]).contains("truncated header: 7 bytes"));
        assert!(err(&bytes[..20]).contains("truncated in its header record"));
        // A flipped byte in the middle: the checksum names the record.
        let mut flipped = bytes.clone();
        let middle = bytes.len() / 2;
        flipped[middle] ^= 1;
        let e = err(&flipped);
        assert!(
            e.contains("checksum mismatch") && e.starts_with("t.bvt: trace record "),
            "{e}"
        );
        // An absurd length.
        let mut absurd = bytes.clone();
        let second =
            PREAMBLE_LEN + 8 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        absurd[second..second + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = err(&absurd);
        assert!(
            e.contains("trace record 2") && e.contains("is absurd"),
            "{e}"
        );
    }

    #[test]
    fn a_writer_refuses_what_a_reader_would() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TraceWriter::create(&dir.path().join("t.bvt"), &header(1 << 20)).unwrap();
        let past = op(0, OpKind::Read, 1 << 20, 512);
        assert!(w.request(0, 1, &past, None).is_err());
        let write = op(1, OpKind::Write { fua: false }, 0, 512);
        assert!(w.request(1, 1, &write, None).is_err());
        w.request(1, 1, &write, Some(&[1u8; 512])).unwrap();
        assert!(w.request(1, 1, &op(1, OpKind::Flush, 0, 0), None).is_err());
    }
}
