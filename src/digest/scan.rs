//! Hashing the blocks of one chunk of an image: ask the driver's map which
//! blocks read as zeros (never read, never hashed), read the others (from a
//! mapped window where the driver offers one), and hash each block, skipping
//! the hash of blocks whose bytes turn out to be all zeros.
//!
//! The result is run-encoded ([`ChunkOut`]): runs of full zero blocks are a
//! count, so a sparse terabyte costs a few words, not 32 bytes per block.

use super::hash::{Algorithm, BlockDigest};
use crate::compare::first_nonzero;
use crate::driver::{zero_status, BlockDriver};
use crate::error::{usize_of, Error, Result};

/// Blocks read at a time where the driver has no mapped view to offer.
const READ_PIECE_BLOCKS: u64 = 4;

/// One run of consecutive blocks in a chunk's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// Full blocks of zeros (their digest is the zero block's).
    Zero(u64),
    /// Blocks with a digest each, taken in order from [`ChunkOut::digests`].
    Data(u64),
    /// Blocks that could not be read: the error.
    Failed(u64, String),
}

/// The blocks of a range of the image, in order.
#[derive(Debug, Default, Clone)]
pub struct ChunkOut {
    /// The runs, covering every block of the range once.
    pub runs: Vec<Run>,
    /// The digests of the `Data` runs, in order.
    pub digests: Vec<BlockDigest>,
    /// Guest bytes read to produce it.
    pub bytes_read: u64,
}

impl ChunkOut {
    fn push_zero(&mut self, count: u64) {
        if count == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some(Run::Zero(n)) => *n += count,
            _ => self.runs.push(Run::Zero(count)),
        }
    }

    fn push_digest(&mut self, digest: BlockDigest) {
        self.digests.push(digest);
        match self.runs.last_mut() {
            Some(Run::Data(n)) => *n += 1,
            _ => self.runs.push(Run::Data(1)),
        }
    }

    fn push_failed(&mut self, error: String) {
        match self.runs.last_mut() {
            Some(Run::Failed(n, e)) if *e == error => *n += 1,
            _ => self.runs.push(Run::Failed(1, error)),
        }
    }

    /// Add `other`'s blocks after these.
    pub fn append(&mut self, other: ChunkOut) {
        let mut digests = other.digests.into_iter();
        for run in other.runs {
            match run {
                Run::Zero(n) => self.push_zero(n),
                Run::Data(n) => {
                    // A count of digests held in memory: it fits a usize.
                    for digest in digests.by_ref().take(n as usize) {
                        self.push_digest(digest);
                    }
                }
                Run::Failed(n, e) => {
                    for _ in 0..n {
                        self.push_failed(e.clone());
                    }
                }
            }
        }
        self.bytes_read += other.bytes_read;
    }

    /// Blocks covered.
    pub fn blocks(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| match r {
                Run::Zero(n) | Run::Data(n) | Run::Failed(n, _) => *n,
            })
            .sum()
    }
}

/// The geometry of the blocks being hashed: `block_size`-byte blocks over
/// `[0, grid_end)`, the last one short if `grid_end` is not a multiple.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    /// Bytes per block.
    pub block_size: u64,
    /// Where the last block ends.
    pub grid_end: u64,
}

impl Grid {
    /// Blocks in all.
    pub fn blocks(&self) -> u64 {
        self.grid_end.div_ceil(self.block_size)
    }

    /// The guest range of block `index`.
    pub fn range(&self, index: u64) -> (u64, u64) {
        let start = index.saturating_mul(self.block_size).min(self.grid_end);
        let end = start.saturating_add(self.block_size).min(self.grid_end);
        (start, end)
    }

    /// Whether block `index` is a full block.
    pub fn is_full(&self, index: u64) -> bool {
        let (start, end) = self.range(index);
        end - start == self.block_size
    }
}

/// An image read with zeros past its end (a reference may be longer than the
/// image checked against it).
#[derive(Clone, Copy)]
pub struct Padded<'a> {
    /// The image.
    pub driver: &'a dyn BlockDriver,
}

impl Padded<'_> {
    /// As [`zero_status`], with everything past the end reading as zeros. The
    /// length is at least 1 and at most `max_len`.
    pub fn zero_status(&self, offset: u64, max_len: u64) -> Result<(u64, bool)> {
        let size = self.driver.size();
        if offset >= size {
            return Ok((max_len.max(1), true));
        }
        let (len, zero) = zero_status(self.driver, offset, max_len.min(size - offset))?;
        Ok((len.clamp(1, max_len.max(1)), zero))
    }

    /// How far from `start` (up to `limit`) the image reads as zeros without
    /// reading it. An error ends the run: the range is then scanned, and the
    /// scan reports it.
    pub fn zero_until(&self, start: u64, limit: u64) -> u64 {
        let mut pos = start;
        while pos < limit {
            match self.zero_status(pos, limit - pos) {
                Ok((len, true)) => pos += len,
                _ => break,
            }
        }
        pos
    }

    /// Fill `buf` with the bytes at `offset`, zeros past the end.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let stored = self.driver.size().saturating_sub(offset);
        let stored = usize::try_from(stored).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(stored);
        if !head.is_empty() {
            self.driver.read_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// What to do with a read error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Fail the chunk with it (computing a digest: the image has no digest).
    Fail,
    /// Record the blocks as `Failed` and go on (checking: it is a finding).
    Record,
}

/// Per-worker state: a read buffer and the constants of the run.
pub struct Scanner<'a> {
    image: Padded<'a>,
    grid: Grid,
    algorithm: Algorithm,
    on_error: OnError,
    buf: Vec<u8>,
    known_zero: Vec<bool>,
}

impl<'a> Scanner<'a> {
    /// A scanner of `image` over `grid`.
    pub fn new(image: Padded<'a>, grid: Grid, algorithm: Algorithm, on_error: OnError) -> Self {
        // A few blocks of at most 64 MiB (the digests file's limit): it fits a usize.
        let buf_len = (grid.block_size * READ_PIECE_BLOCKS) as usize;
        Scanner {
            image,
            grid,
            algorithm,
            on_error,
            buf: vec![0u8; buf_len],
            known_zero: Vec::new(),
        }
    }

    /// Digests of blocks `[first, end)` known to read as zeros: runs of full
    /// blocks, and the digest of a short last block of zeros.
    pub fn zero_blocks(&self, first: u64, end: u64, out: &mut ChunkOut) {
        let end = end.min(self.grid.blocks());
        if first >= end {
            return;
        }
        if self.grid.is_full(end - 1) {
            out.push_zero(end - first);
        } else {
            out.push_zero(end - 1 - first);
            let (start, stop) = self.grid.range(end - 1);
            // One block (64 MiB at most): it fits a usize.
            let len = (stop - start) as usize;
            out.push_digest(self.algorithm.hash(&vec![0u8; len]));
        }
    }

    /// Hash blocks `[first, end)`.
    pub fn scan(&mut self, first: u64, end: u64) -> Result<ChunkOut> {
        let mut out = ChunkOut::default();
        let end = end.min(self.grid.blocks());
        if first >= end {
            return Ok(out);
        }
        self.map_zeros(first, end);
        let mut block = first;
        while block < end {
            let zero = self.is_known_zero(first, block);
            let mut run_end = block + 1;
            while run_end < end && self.is_known_zero(first, run_end) == zero {
                run_end += 1;
            }
            if zero {
                self.zero_blocks(block, run_end, &mut out);
            } else {
                self.hash_span(block, run_end, &mut out)?;
            }
            block = run_end;
        }
        Ok(out)
    }

    fn is_known_zero(&self, first: u64, block: u64) -> bool {
        usize::try_from(block - first)
            .ok()
            .and_then(|i| self.known_zero.get(i).copied())
            .unwrap_or(false)
    }

    /// Mark the blocks of `[first, end)` that lie wholly inside ranges the map
    /// says read as zeros. A map error marks nothing: the blocks are read, and
    /// the read reports it.
    fn map_zeros(&mut self, first: u64, end: u64) {
        // The blocks of one chunk (at most 4096): it fits a usize.
        let count = (end - first) as usize;
        self.known_zero.clear();
        self.known_zero.resize(count, false);
        let (start, _) = self.grid.range(first);
        let (_, stop) = self.grid.range(end - 1);
        let mut pos = start;
        let mut stretch: Option<u64> = None;
        while pos < stop {
            match self.image.zero_status(pos, stop - pos) {
                Ok((len, true)) => {
                    stretch.get_or_insert(pos);
                    pos += len.min(stop - pos);
                }
                Ok((len, false)) => {
                    if let Some(from) = stretch.take() {
                        self.mark_zero(first, end, from, pos, stop);
                    }
                    pos += len.min(stop - pos);
                }
                Err(_) => {
                    if let Some(from) = stretch.take() {
                        self.mark_zero(first, end, from, pos, stop);
                    }
                    // Leave the rest to the reads, which name the error.
                    return;
                }
            }
        }
        if let Some(from) = stretch {
            self.mark_zero(first, end, from, stop, stop);
        }
    }

    /// Mark the blocks wholly inside the zero stretch `[from, to)`.
    fn mark_zero(&mut self, first: u64, end: u64, from: u64, to: u64, stop: u64) {
        let bs = self.grid.block_size;
        let lo = from.div_ceil(bs).max(first);
        // A stretch that reaches the end of the range covers the short last block.
        let hi = if to >= stop { end } else { (to / bs).min(end) };
        for block in lo..hi {
            if let Some(slot) = usize::try_from(block - first)
                .ok()
                .and_then(|i| self.known_zero.get_mut(i))
            {
                *slot = true;
            }
        }
    }

    /// Read and hash blocks `[first, end)`.
    fn hash_span(&mut self, first: u64, end: u64, out: &mut ChunkOut) -> Result<()> {
        let (start, _) = self.grid.range(first);
        let (_, stop) = self.grid.range(end - 1);
        let len = usize::try_from(stop - start).map_err(|_| {
            Error::Internal(format!("a span of {} bytes is too large", stop - start))
        })?;
        if stop <= self.image.driver.size() {
            if let Ok(Some(view)) = self.image.driver.read_view(start, len) {
                let mut hashed = ChunkOut::default();
                self.hash_blocks(first, end, &view, &mut hashed);
                // A page that could not be read reads as zeros: drop the
                // result, and let pread name the error.
                if !view.faulted() {
                    out.append(hashed);
                    out.bytes_read += stop - start;
                    return Ok(());
                }
            }
        }
        // Read in pieces small enough to stay in the cache until they are
        // hashed: a compressed image decompresses into the buffer, and hashing
        // 8 MiB after writing it costs a trip to memory (measured on a 1 GiB
        // zstd qcow2, one thread: 1.84-2.24 s of CPU reading whole spans,
        // 1.52-1.65 s in 256 KiB pieces).
        let mut buf = std::mem::take(&mut self.buf);
        let mut result = Ok(());
        let mut piece = first;
        while piece < end && result.is_ok() {
            let piece_end = (piece + READ_PIECE_BLOCKS).min(end);
            let (from, _) = self.grid.range(piece);
            let (_, to) = self.grid.range(piece_end - 1);
            let n = usize_of(to - from)?;
            result = self.read_and_hash(piece, piece_end, from, n, &mut buf, out);
            piece = piece_end;
        }
        self.buf = buf;
        result
    }

    fn read_and_hash(
        &self,
        first: u64,
        end: u64,
        start: u64,
        len: usize,
        buf: &mut Vec<u8>,
        out: &mut ChunkOut,
    ) -> Result<()> {
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let bytes = buf.get_mut(..len).unwrap_or(&mut []);
        match self.image.read(bytes, start) {
            Ok(()) => {
                self.hash_blocks(first, end, bytes, out);
                out.bytes_read += len as u64;
                Ok(())
            }
            Err(e) if self.on_error == OnError::Fail => Err(e),
            Err(e) if end - first == 1 => {
                out.push_failed(e.to_string());
                Ok(())
            }
            Err(_) => {
                // Narrow the failure to the blocks that fail on their own.
                for block in first..end {
                    let (s, t) = self.grid.range(block);
                    let n = usize_of(t - s)?;
                    self.read_and_hash(block, block + 1, s, n, buf, out)?;
                }
                Ok(())
            }
        }
    }

    /// Hash each block of `bytes`, which hold blocks `[first, end)`.
    fn hash_blocks(&self, first: u64, end: u64, bytes: &[u8], out: &mut ChunkOut) {
        let (base, _) = self.grid.range(first);
        for block in first..end {
            let (s, t) = self.grid.range(block);
            let from = usize::try_from(s - base).unwrap_or(usize::MAX);
            let to = usize::try_from(t - base).unwrap_or(usize::MAX);
            let data = bytes.get(from..to).unwrap_or(&[]);
            if t - s == self.grid.block_size && first_nonzero(data).is_none() {
                out.push_zero(1);
            } else {
                let following = bytes.get(to..).unwrap_or(&[]);
                out.push_digest(self.algorithm.hash_block(data, following));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::raw::Raw;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    fn raw(bytes: Vec<u8>) -> Raw {
        Raw::new(Arc::new(MemStorage::new("t.img", bytes, false))).unwrap()
    }

    #[test]
    fn runs_cover_every_block_and_hash_the_short_tail() {
        let bs = 4096u64;
        let mut data = vec![0u8; 5 * 4096 + 100];
        data[4096 + 7] = 1; // block 1 has data
        let image = raw(data.clone());
        let grid = Grid {
            block_size: bs,
            grid_end: data.len() as u64,
        };
        let alg = Algorithm::Sha256;
        let mut scanner = Scanner::new(Padded { driver: &image }, grid, alg, OnError::Fail);
        let out = scanner.scan(0, 6).unwrap();
        assert_eq!(out.blocks(), 6);
        assert_eq!(
            out.runs,
            vec![Run::Zero(1), Run::Data(1), Run::Zero(3), Run::Data(1)]
        );
        assert_eq!(out.digests[0], alg.hash(&data[4096..8192]));
        assert_eq!(out.digests[1], alg.hash(&[0u8; 100]));
    }
}
