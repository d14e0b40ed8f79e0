//! The block digests file: an image's digest together with the digest of each of
//! its blocks, so a copy can later be checked block by block where the image
//! itself is not at hand. This module is the format's one owner; the README
//! carries the same specification.
//!
//! # Format, version 1
//!
//! All integers are little-endian. The file is a header, runs of blocks, and a
//! checksum:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BVDIGEST` (ASCII) |
//! | 8 | 4 | version: 1 |
//! | 12 | 4 | header length: 160 |
//! | 16 | 16 | algorithm: `sha256` or `blake3`, ASCII, padded with NUL bytes |
//! | 32 | 4 | block size in bytes (65536 as written by blkverify; a power of two from 512 to 64 MiB) |
//! | 36 | 4 | digest length in bytes: 32 |
//! | 40 | 8 | virtual size of the image in bytes |
//! | 48 | 8 | block count: `ceil(virtual size / block size)` |
//! | 56 | 8 | run count |
//! | 64 | 8 | stored digest count (blocks in data runs) |
//! | 72 | 32 | image digest: `H(H(b1) ‖ … ‖ H(bN) ‖ le64(virtual size))` (blkhash 0.11, what `blksum` prints) |
//! | 104 | 32 | zero block digest: H of one block of zeros |
//! | 136 | 24 | reserved, zero |
//!
//! Then `run count` runs, in block order, together covering every block once.
//! A run starts with a 64-bit word: its low 63 bits are the number of blocks
//! (at least 1); bit 63 set means a *zero run*, blocks that are all zeros, whose
//! digest is the zero block digest and is not stored; bit 63 clear means a *data
//! run*, followed by one digest per block. The last block of an image whose size
//! is not a multiple of the block size is short; its digest is H of its bytes, so
//! it is always in a data run. Adjacent runs of the same kind are allowed (the
//! writer splits long data runs so it never holds more than 2 MiB of digests).
//!
//! Last, 32 bytes: the SHA-256 of every byte of the file before them.
//!
//! The file's length is therefore exactly `160 + 8 × runs + 32 × stored digests +
//! 32`: a fully allocated image costs at most 32 bytes per block plus the
//! header, a sparse one costs its data.

use super::hash::{Algorithm, BlockDigest, DIGEST_LEN};
use super::scan::Run;
use crate::error::{usize_of, Error, Result};
use sha2::Digest as _;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file's first eight bytes. The constant is defined in the driver layer,
/// below this one, because the image probe refuses a block digests file by
/// its magic and must not reach up into the digest engine to know it.
pub use crate::driver::BLOCK_DIGESTS_MAGIC as MAGIC;
/// The format version this module reads and writes.
pub const VERSION: u32 = 1;
/// Bytes in the header.
pub const HEADER_LEN: usize = 160;
/// Bytes in the checksum that ends the file.
pub const CHECKSUM_LEN: usize = 32;
/// Bit 63 of a run word: a run of zero blocks.
const ZERO_RUN: u64 = 1 << 63;
/// The smallest and largest block sizes accepted.
const MIN_BLOCK_SIZE: u64 = crate::size::SECTOR_SIZE;
const MAX_BLOCK_SIZE: u64 = 64 << 20;
/// The most digests the writer holds before it ends a data run.
const MAX_DATA_RUN: usize = 65536;

/// Whether `head` (a file's first bytes) is a block digests file's.
pub fn has_magic(head: &[u8]) -> bool {
    head.starts_with(&MAGIC)
}

/// Whether the file at `path` starts with the magic of a block digests file
/// (false for anything that cannot be read, such as an NBD URI: opening it as
/// an image then names the problem).
pub fn is_block_digests_file(path: &Path) -> bool {
    let mut head = [0u8; MAGIC.len()];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && has_magic(&head)
}

/// One run of the file, with where its digests sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunIndex {
    first_block: u64,
    count: u64,
    /// Index of the run's first digest in `digests`; `None` for a zero run.
    data: Option<usize>,
}

/// A block digests file, loaded and checked.
#[derive(Debug, Clone)]
pub struct BlockDigests {
    path: PathBuf,
    algorithm: Algorithm,
    block_size: u64,
    size: u64,
    image_digest: BlockDigest,
    zero_digest: BlockDigest,
    runs: Vec<RunIndex>,
    digests: Vec<BlockDigest>,
}

/// A run of blocks, as [`BlockDigests::runs_in`] gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks<'a> {
    /// The first block.
    pub first: u64,
    /// How many.
    pub count: u64,
    /// Their digests; `None` for zero blocks.
    pub digests: Option<&'a [BlockDigest]>,
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn digest_at(bytes: &[u8], at: usize) -> BlockDigest {
    bytes
        .get(at..at + DIGEST_LEN)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; DIGEST_LEN])
}

/// The header's fields, checked against each other and the file's length.
struct Header {
    algorithm: Algorithm,
    block_size: u64,
    size: u64,
    block_count: u64,
    run_count: u64,
    data_count: u64,
}

fn too_large(path: &Path, len: u64) -> Error {
    Error::format(
        path,
        format!("block digests file: {len} bytes is too large to load"),
    )
}

impl Header {
    /// Check the header at the start of `head` of a file `len` bytes long.
    fn parse(path: &Path, head: &[u8], len: u64) -> Result<Header> {
        let refuse = |m: String| Error::format(path, format!("block digests file: {m}"));
        if !has_magic(head) {
            return Err(Error::format(
                path,
                "not a block digests file (no BVDIGEST magic)",
            ));
        }
        let min_len = (HEADER_LEN + CHECKSUM_LEN) as u64;
        if len < min_len || head.len() < HEADER_LEN {
            return Err(refuse(format!(
                "truncated: {len} bytes, less than a header and a checksum ({min_len} bytes)"
            )));
        }
        let version = le32(head, 8);
        if version != VERSION {
            return Err(refuse(format!(
                "version {version} is not supported (this blkverify reads version {VERSION})"
            )));
        }
        let header_len = le32(head, 12);
        if header_len as usize != HEADER_LEN {
            return Err(refuse(format!(
                "header length {header_len} is not {HEADER_LEN}"
            )));
        }
        let name_field = head.get(16..32).unwrap_or(&[]);
        let name_len = name_field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_field.len());
        let name = String::from_utf8_lossy(name_field.get(..name_len).unwrap_or(&[]));
        let algorithm = Algorithm::parse(&name)
            .ok_or_else(|| refuse(format!("unknown algorithm '{}'", name.escape_debug())))?;
        let block_size = u64::from(le32(head, 32));
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(refuse(format!(
                "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )));
        }
        let digest_len = le32(head, 36);
        if digest_len as usize != DIGEST_LEN {
            return Err(refuse(format!(
                "digest length {digest_len} is not {DIGEST_LEN}"
            )));
        }
        let size = le64(head, 40);
        let block_count = le64(head, 48);
        if block_count != size.div_ceil(block_size) {
            return Err(refuse(format!(
                "block count {block_count} does not match the size {size} in blocks of {block_size}"
            )));
        }
        let run_count = le64(head, 56);
        let data_count = le64(head, 64);
        let expected_len = run_count
            .checked_mul(8)
            .and_then(|r| data_count.checked_mul(DIGEST_LEN as u64)?.checked_add(r))
            .and_then(|body| body.checked_add(min_len));
        match expected_len {
            Some(expected) if expected == len => Ok(Header {
                algorithm,
                block_size,
                size,
                block_count,
                run_count,
                data_count,
            }),
            Some(expected) if expected > len => Err(refuse(format!(
                "truncated: {len} bytes, but its header describes {expected}"
            ))),
            Some(expected) => Err(refuse(format!(
                "{len} bytes, but its header describes {expected}: data after the end"
            ))),
            None => Err(refuse(format!(
                "run count {run_count} and digest count {data_count} are impossibly large"
            ))),
        }
    }
}

impl BlockDigests {
    /// Load and check the file at `path`. A file that is not one, is truncated,
    /// damaged, or of a version or algorithm this build does not know is a
    /// `Format` error naming the file and the fact. The header is checked
    /// before the rest is read, so a foreign file costs one small read.
    pub fn load(path: &Path) -> Result<BlockDigests> {
        let mut file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let mut head = vec![0u8; HEADER_LEN];
        let head_len = usize_of(len.min(HEADER_LEN as u64))?;
        head.truncate(head_len);
        file.read_exact(&mut head)
            .map_err(|e| Error::io(path, "read the header", e))?;
        Header::parse(path, &head, len)?;
        // The header now vouches for the length, so reading it all is bounded
        // by the file's own size.
        let mut bytes = Vec::new();
        let total = usize::try_from(len).map_err(|_| too_large(path, len))?;
        bytes
            .try_reserve_exact(total)
            .map_err(|_| too_large(path, len))?;
        bytes.extend_from_slice(&head);
        Read::by_ref(&mut file)
            .take(len - head_len as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, "read", e))?;
        BlockDigests::parse(path, &bytes)
    }

    /// Check and decode `bytes`, the whole of the file at `path` (named in
    /// errors). Every field is checked before it is used.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<BlockDigests> {
        let refuse = |m: String| Error::format(path, format!("block digests file: {m}"));
        let header = Header::parse(path, bytes, bytes.len() as u64)?;
        let content_end = bytes.len() - CHECKSUM_LEN;
        let (content, stored_sum) = bytes.split_at(content_end);
        if sha2::Sha256::digest(content).as_slice() != stored_sum {
            return Err(refuse("checksum mismatch: the file is damaged".to_string()));
        }
        if content
            .get(136..HEADER_LEN)
            .is_some_and(|r| r.iter().any(|&b| b != 0))
        {
            return Err(refuse("reserved header bytes are not zero".to_string()));
        }
        let Header {
            algorithm,
            block_size,
            size,
            block_count,
            run_count,
            data_count,
        } = header;
        let zero_digest = digest_at(content, 104);
        let zero_block = vec![0u8; usize_of(block_size)?];
        if algorithm.hash(&zero_block) != zero_digest {
            return Err(refuse(format!(
                "its zero block digest is not {} of {block_size} zero bytes",
                algorithm.name()
            )));
        }

        // Runs. Their counts were checked against the length, so these
        // allocations are bounded by the file's size.
        let body = content.get(HEADER_LEN..).unwrap_or(&[]);
        let mut runs = Vec::new();
        runs.try_reserve_exact(usize::try_from(run_count).unwrap_or(usize::MAX))
            .map_err(|_| refuse(format!("run count {run_count} is too large")))?;
        let mut digests: Vec<BlockDigest> = Vec::new();
        digests
            .try_reserve_exact(usize::try_from(data_count).unwrap_or(usize::MAX))
            .map_err(|_| refuse(format!("digest count {data_count} is too large")))?;
        let mut at = 0usize;
        let mut next_block = 0u64;
        for run in 0..run_count {
            let word = le64(body, at);
            at += 8;
            let count = word & !ZERO_RUN;
            let zero = word & ZERO_RUN != 0;
            let end = next_block
                .checked_add(count)
                .filter(|&end| count > 0 && end <= block_count)
                .ok_or_else(|| {
                    refuse(format!(
                        "run {run} (at byte {}) of {count} blocks from block {next_block} does not fit in {block_count} blocks",
                        HEADER_LEN + at - 8
                    ))
                })?;
            if zero && end == block_count && size % block_size != 0 {
                return Err(refuse(format!(
                    "run {run} is a zero run over the short last block, whose digest must be stored"
                )));
            }
            let data = if zero {
                None
            } else {
                if (digests.len() as u64).saturating_add(count) > data_count {
                    return Err(refuse(format!(
                        "run {run} holds more digests than the header's {data_count}"
                    )));
                }
                let first = digests.len();
                for _ in 0..count {
                    digests.push(digest_at(body, at));
                    at += DIGEST_LEN;
                }
                Some(first)
            };
            runs.push(RunIndex {
                first_block: next_block,
                count,
                data,
            });
            next_block = end;
        }
        if next_block != block_count || digests.len() as u64 != data_count {
            return Err(refuse(format!(
                "its runs cover {next_block} blocks with {} digests, but the header says {block_count} blocks and {data_count} digests",
                digests.len()
            )));
        }
        Ok(BlockDigests {
            path: path.to_path_buf(),
            algorithm,
            block_size,
            size,
            image_digest: digest_at(content, 72),
            zero_digest,
            runs,
            digests,
        })
    }

    /// The block digests of an image of `size` bytes from the spans of all
    /// its blocks, in order (see [`super::digest_span`]), as if loaded from a
    /// file at `path` (named in reports): what a check compares against when
    /// the reference was hashed elsewhere. A reference block that could not be
    /// read is that error.
    pub fn from_spans(
        path: &Path,
        algorithm: Algorithm,
        size: u64,
        spans: &[super::BlockSpan],
    ) -> Result<BlockDigests> {
        let block_size = super::BLOCK_SIZE;
        let zero_block = vec![0u8; usize_of(block_size)?];
        let zero_digest = algorithm.hash(&zero_block);
        let mut outer = super::Outer::new(algorithm, &zero_digest);
        let mut runs: Vec<RunIndex> = Vec::new();
        let mut digests: Vec<BlockDigest> = Vec::new();
        let mut next = 0u64;
        for span in spans {
            if span.first != next {
                return Err(Error::InvalidArgument(format!(
                    "{}: block spans do not follow each other: one starts at block {}, where block {next} was expected",
                    path.display(),
                    span.first
                )));
            }
            let mut at = 0usize;
            for run in &span.out.runs {
                let (count, data) = match run {
                    Run::Zero(n) => (*n, None),
                    Run::Data(n) => (*n, Some(digests.len())),
                    Run::Failed(_, e) => return Err(Error::InvalidArgument(e.clone())),
                };
                if let Some(_first) = data {
                    let n = usize::try_from(count).unwrap_or(usize::MAX);
                    let these =
                        span.out
                            .digests
                            .get(at..at.saturating_add(n))
                            .ok_or_else(|| {
                                Error::InvalidArgument(format!(
                                    "{}: a block span has too few digests",
                                    path.display()
                                ))
                            })?;
                    at += n;
                    outer.digests(these);
                    digests.extend_from_slice(these);
                } else {
                    outer.zeros(count);
                }
                match runs.last_mut() {
                    Some(last) if last.data.is_none() && data.is_none() => last.count += count,
                    Some(last) if last.data.is_some() && data.is_some() => last.count += count,
                    _ => runs.push(RunIndex {
                        first_block: next,
                        count,
                        data,
                    }),
                }
                next += count;
            }
        }
        let blocks = size.div_ceil(block_size);
        if next != blocks {
            return Err(Error::InvalidArgument(format!(
                "{}: block spans cover {next} blocks of {blocks}",
                path.display()
            )));
        }
        runs.retain(|r| r.count > 0);
        Ok(BlockDigests {
            path: path.to_path_buf(),
            algorithm,
            block_size,
            size,
            image_digest: outer.finish(size),
            zero_digest,
            runs,
            digests,
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hash function.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The image's virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks in all.
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    /// The whole image's digest.
    pub fn image_digest(&self) -> &BlockDigest {
        &self.image_digest
    }

    /// The digest of a full block of zeros.
    pub fn zero_digest(&self) -> &BlockDigest {
        &self.zero_digest
    }

    /// The digest of block `index` (the zero block's for a zero block), or
    /// `None` past the last block.
    pub fn block(&self, index: u64) -> Option<BlockDigest> {
        let at = self
            .runs
            .partition_point(|r| r.first_block + r.count <= index);
        let run = self.runs.get(at)?;
        match run.data {
            None => Some(self.zero_digest),
            Some(first) => {
                let i = first.checked_add(usize::try_from(index - run.first_block).ok()?)?;
                self.digests.get(i).copied()
            }
        }
    }

    /// The runs of blocks `[first, end)`, cut to that range, in order.
    pub fn runs_in(&self, first: u64, end: u64) -> impl Iterator<Item = Blocks<'_>> + '_ {
        let at = self
            .runs
            .partition_point(|r| r.first_block + r.count <= first);
        self.runs
            .get(at..)
            .unwrap_or(&[])
            .iter()
            .take_while(move |r| r.first_block < end)
            .map(move |r| {
                let from = r.first_block.max(first);
                let to = (r.first_block + r.count).min(end);
                let digests = r.data.map(|d| {
                    // Both count digests of a run held in memory: they fit a usize.
                    let skip = (from - r.first_block) as usize;
                    let n = (to - from) as usize;
                    self.digests.get(d + skip..d + skip + n).unwrap_or(&[])
                });
                Blocks {
                    first: from,
                    count: to - from,
                    digests,
                }
            })
    }

    /// Blocks stored with their digest (not in zero runs).
    pub fn stored_blocks(&self) -> u64 {
        self.digests.len() as u64
    }
}

/// Writes a block digests file as the digests arrive, in block order. The file
/// appears under its name only when [`BlockDigestsWriter::finish`] succeeds; until
/// then it is a hidden temporary beside it, removed if the writer is dropped.
pub struct BlockDigestsWriter {
    path: PathBuf,
    temp: PathBuf,
    out: Option<BufWriter<File>>,
    algorithm: Algorithm,
    block_size: u64,
    size: u64,
    zero_digest: BlockDigest,
    pending_zeros: u64,
    pending_data: Vec<BlockDigest>,
    blocks: u64,
    runs: u64,
    stored: u64,
}

impl BlockDigestsWriter {
    /// Start writing the file for an image of `size` bytes.
    pub fn create(
        path: &Path,
        algorithm: Algorithm,
        block_size: u64,
        size: u64,
    ) -> Result<BlockDigestsWriter> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::InvalidArgument(format!(
                "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )));
        }
        let name = path.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("{}: not a file name", path.display()))
        })?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".tmp{}", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(|e| Error::io(path, "create", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| Error::io(path, "write", e))?;
        let zero_digest = algorithm.hash(&vec![0u8; usize_of(block_size)?]);
        Ok(BlockDigestsWriter {
            path: path.to_path_buf(),
            temp,
            out: Some(out),
            algorithm,
            block_size,
            size,
            zero_digest,
            pending_zeros: 0,
            pending_data: Vec::new(),
            blocks: 0,
            runs: 0,
            stored: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().ok_or_else(|| {
            Error::Internal(format!(
                "{}: block digests writer already finished",
                self.path.display()
            ))
        })?;
        out.write_all(bytes)
            .map_err(|e| Error::io(&self.path, "write", e))
    }

    fn end_zero_run(&mut self) -> Result<()> {
        if self.pending_zeros > 0 {
            let word = self.pending_zeros | ZERO_RUN;
            self.pending_zeros = 0;
            self.runs += 1;
            self.write(&word.to_le_bytes())?;
        }
        Ok(())
    }

    fn end_data_run(&mut self) -> Result<()> {
        if !self.pending_data.is_empty() {
            let data = std::mem::take(&mut self.pending_data);
            self.runs += 1;
            self.stored += data.len() as u64;
            self.write(&(data.len() as u64).to_le_bytes())?;
            self.write(data.as_flattened())?;
            self.pending_data = data;
            self.pending_data.clear();
        }
        Ok(())
    }

    /// The next `count` blocks are full blocks of zeros.
    pub fn zeros(&mut self, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.end_data_run()?;
        self.pending_zeros += count;
        self.blocks += count;
        Ok(())
    }

    /// The next blocks' digests. Digests equal to the zero block's, of full
    /// blocks, are stored as zero runs.
    pub fn digests(&mut self, digests: &[BlockDigest]) -> Result<()> {
        let last_block = self.size.div_ceil(self.block_size).saturating_sub(1);
        let short_tail = self.size % self.block_size != 0;
        for digest in digests {
            let is_short = short_tail && self.blocks == last_block;
            if *digest == self.zero_digest && !is_short {
                self.zeros(1)?;
                continue;
            }
            self.end_zero_run()?;
            self.pending_data.push(*digest);
            self.blocks += 1;
            if self.pending_data.len() >= MAX_DATA_RUN {
                self.end_data_run()?;
            }
        }
        Ok(())
    }

    /// Write the header and the checksum, and give the file its name.
    pub fn finish(mut self, image_digest: &BlockDigest) -> Result<()> {
        let expected = self.size.div_ceil(self.block_size);
        if self.blocks != expected {
            return Err(Error::InvalidArgument(format!(
                "{}: {} block digests written for an image of {expected} blocks",
                self.path.display(),
                self.blocks
            )));
        }
        self.end_zero_run()?;
        self.end_data_run()?;
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        let name = self.algorithm.name().as_bytes();
        header[16..16 + name.len()].copy_from_slice(name);
        header[32..36].copy_from_slice(&(self.block_size as u32).to_le_bytes());
        header[36..40].copy_from_slice(&(DIGEST_LEN as u32).to_le_bytes());
        header[40..48].copy_from_slice(&self.size.to_le_bytes());
        header[48..56].copy_from_slice(&expected.to_le_bytes());
        header[56..64].copy_from_slice(&self.runs.to_le_bytes());
        header[64..72].copy_from_slice(&self.stored.to_le_bytes());
        header[72..104].copy_from_slice(image_digest);
        header[104..136].copy_from_slice(&self.zero_digest);
        let path = self.path.clone();
        let io = |what: &'static str| {
            let path = path.clone();
            move |e: std::io::Error| Error::io(&path, what, e)
        };
        let out = self.out.take().ok_or_else(|| {
            Error::Internal(format!(
                "{}: block digests writer already finished",
                self.path.display()
            ))
        })?;
        let mut file = out.into_inner().map_err(|e| io("write")(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        file.write_all(&header).map_err(io("write"))?;
        // The checksum covers the header, written last: read the body back
        // (1/2048 of the image's size at most, so cheap next to hashing it).
        let mut checksum = sha2::Sha256::new();
        checksum.update(header);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io("read back"))?;
            if n == 0 {
                break;
            }
            checksum.update(buf.get(..n).unwrap_or(&[]));
        }
        file.write_all(&checksum.finalize()).map_err(io("write"))?;
        file.sync_all().map_err(io("sync"))?;
        std::fs::rename(&self.temp, &self.path).map_err(io("rename into place"))?;
        Ok(())
    }
}

impl Drop for BlockDigestsWriter {
    fn drop(&mut self) {
        // Not finished (an error, or a cancelled run): leave nothing behind.
        if self.out.is_some() {
            self.out = None;
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, size: u64, blocks: &[Option<u8>]) -> (PathBuf, Vec<BlockDigest>) {
        let path = dir.join("t.digests");
        let alg = Algorithm::Sha256;
        let mut w = BlockDigestsWriter::create(&path, alg, 4096, size).unwrap();
        let mut all = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            let len = (size - i as u64 * 4096).min(4096) as usize;
            match b {
                None if len == 4096 => {
                    w.zeros(1).unwrap();
                    all.push(alg.hash(&[0u8; 4096]));
                }
                other => {
                    let d = alg.hash(&vec![other.unwrap_or(0); len]);
                    w.digests(&[d]).unwrap();
                    all.push(d);
                }
            }
        }
        w.finish(&[9u8; 32]).unwrap();
        (path, all)
    }

    #[test]
    fn round_trip_with_zero_runs_and_a_short_tail() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = [Some(1), None, None, Some(0), Some(3), None, Some(0)];
        let size = 6 * 4096 + 100;
        let (path, all) = write(dir.path(), size, &blocks);
        let loaded = BlockDigests::load(&path).unwrap();
        assert_eq!(loaded.size(), size);
        assert_eq!(loaded.block_count(), 7);
        assert_eq!(loaded.image_digest(), &[9u8; 32]);
        for (i, d) in all.iter().enumerate() {
            assert_eq!(loaded.block(i as u64).as_ref(), Some(d), "block {i}");
        }
        assert_eq!(loaded.block(7), None);
        // Blocks 1, 2 and 3 (a zero digest given as data) collapse into one zero run.
        assert_eq!(loaded.stored_blocks(), 3);
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, 160 + 8 * 5 + 32 * 3 + 32);
        let runs: Vec<_> = loaded
            .runs_in(2, 5)
            .map(|b| (b.first, b.count, b.digests.is_some()))
            .collect();
        assert_eq!(runs, vec![(2, 2, false), (4, 1, true)]);
        // No temporary is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn damage_is_refused_with_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(dir.path(), 3 * 4096, &[Some(1), None, Some(2)]);
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], expect: &str| {
            std::fs::write(&path, bytes).unwrap();
            let err = BlockDigests::load(&path).unwrap_err();
            assert!(matches!(err, Error::Format { .. }), "{err}");
            assert!(err.to_string().contains(expect), "{err} lacks {expect}");
        };
        check(b"hello world", "not a block digests file");
        check(&good[..100], "truncated");
        check(&good[..good.len() - 1], "truncated");
        let mut flipped = good.clone();
        flipped[170] ^= 1;
        check(&flipped, "checksum mismatch");
        let mut longer = good.clone();
        longer.push(0);
        check(&longer, "data after the end");
        let mut version = good.clone();
        version[8] = 2;
        check(&version, "version 2");
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.digests");
        let mut w = BlockDigestsWriter::create(&path, Algorithm::Blake3, 65536, 1 << 20).unwrap();
        w.zeros(3).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
