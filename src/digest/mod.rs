//! Image digests compatible with blksum (blkhash 0.11), and block digests files.
//!
//! The construction is blkhash's: cut the guest data into 64 KiB blocks (the
//! last one may be short), hash each, and hash the block digests in order
//! followed by the size: `H(H(b1) ‖ H(b2) ‖ … ‖ H(bN) ‖ le64(size))`. A raw
//! image and its qcow2 copy give the same digest, because only guest-visible
//! bytes go in.
//!
//! How it runs: the disk is cut into chunks that worker threads take in order
//! from a shared counter, as the verify engine does. Each worker asks the
//! driver's map which blocks read as zeros (never read: their digest is the
//! zero block's, computed once) and hashes the rest ([`scan`]). The outer hash
//! must see the digests in block order, so finished chunks go to an ordered
//! stage: the worker that delivers the chunk the outer hash waits for feeds it,
//! and every chunk after it that is already waiting, while the other workers
//! go on hashing. A long run of zeros is claimed by one worker as a single
//! count, so a sparse terabyte costs the outer hash over its 16 Mi zero-block
//! digests (512 MiB of input) and nothing else.

mod check;
mod file;
mod hash;
mod scan;
mod span;

pub use check::check;
pub use file::{has_magic, is_block_digests_file, BlockDigests, BlockDigestsWriter, Blocks, MAGIC};
pub use hash::{to_hex, Algorithm, BlockDigest, Hasher, Outer, DIGEST_LEN};
pub use scan::{ChunkOut, Run};
pub use span::{check_spans, digest_span, join, BlockSpan, Joiner, Spans};

use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::pool::{run_workers, worker_count, Progress};
use scan::{Grid, OnError, Padded, Scanner};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Bytes per block: blkhash's default, and what blksum uses.
pub const BLOCK_SIZE: u64 = 64 << 10;

/// How far one look for a run of zeros goes (bounds a worker's time between
/// checks for cancellation).
const ZERO_LOOKAHEAD: u64 = 64 << 30;

/// Finished chunks that may wait for the outer hash before a worker with a
/// later one waits too: bounds the digests held (4 KiB per 8 MiB chunk). It
/// counts chunks held, not their distance from the one the outer hash waits
/// for, so a long run of zeros delivered as one count never stalls the others.
const ORDER_WINDOW: usize = 1024;

/// How to compute a digest.
#[derive(Debug, Clone)]
pub struct DigestOptions {
    /// The hash function H.
    pub algorithm: Algorithm,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Bytes per unit of work (rounded to whole blocks).
    pub chunk_size: u64,
}

impl Default for DigestOptions {
    fn default() -> Self {
        DigestOptions {
            algorithm: Algorithm::Sha256,
            threads: 0,
            chunk_size: 8 << 20,
        }
    }
}

/// An image's digest.
#[derive(Debug, Clone)]
pub struct ImageDigest {
    /// `H(H(b1) ‖ … ‖ H(bN) ‖ le64(size))`.
    pub digest: BlockDigest,
    /// The hash function.
    pub algorithm: Algorithm,
    /// Bytes per block.
    pub block_size: u64,
    /// The image's virtual size.
    pub size: u64,
    /// Guest bytes read (the rest was known to be zeros).
    pub bytes_read: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
}

impl ImageDigest {
    /// The digest in lower-case hex, as blksum prints it.
    pub fn hexdigest(&self) -> String {
        to_hex(&self.digest)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where block digests go, in block order: the outer hash, and the block
/// digests file if one is being written.
struct Sink {
    outer: Outer,
    writer: Option<BlockDigestsWriter>,
}

impl Sink {
    fn feed(&mut self, out: &ChunkOut) -> Result<()> {
        let mut digests = out.digests.as_slice();
        for run in &out.runs {
            match run {
                Run::Zero(n) => {
                    self.outer.zeros(*n);
                    if let Some(w) = self.writer.as_mut() {
                        w.zeros(*n)?;
                    }
                }
                Run::Data(n) => {
                    let n = usize::try_from(*n).unwrap_or(usize::MAX).min(digests.len());
                    let (these, rest) = digests.split_at(n);
                    digests = rest;
                    self.outer.digests(these);
                    if let Some(w) = self.writer.as_mut() {
                        w.digests(these)?;
                    }
                }
                Run::Failed(_, e) => return Err(Error::InvalidArgument(e.clone())),
            }
        }
        Ok(())
    }
}

/// The chunks delivered but not yet fed, and the one the sink waits for.
struct OrderState {
    pending: BTreeMap<u64, (u64, ChunkOut)>,
    next: u64,
    draining: bool,
}

/// The ordered stage between the workers and the sink.
struct Ordered {
    state: Mutex<OrderState>,
    moved: Condvar,
    sink: Mutex<Sink>,
    failed: Mutex<Option<Error>>,
}

impl Ordered {
    /// Hand over chunks `[first, first + count)`'s blocks. The caller that hands
    /// over the chunk the sink waits for feeds it, and whatever follows it.
    fn deliver(&self, first: u64, count: u64, out: ChunkOut, cancelled: &AtomicBool) {
        let mut state = lock(&self.state);
        while state.pending.len() >= ORDER_WINDOW && first != state.next {
            if cancelled.load(Ordering::Relaxed) {
                return;
            }
            state = self
                .moved
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.pending.insert(first, (count, out));
        if state.draining {
            return;
        }
        state.draining = true;
        loop {
            let mut batch = Vec::new();
            loop {
                let next = state.next;
                let Some((count, out)) = state.pending.remove(&next) else {
                    break;
                };
                state.next = next + count;
                batch.push(out);
            }
            if batch.is_empty() || cancelled.load(Ordering::Relaxed) {
                state.draining = false;
                break;
            }
            drop(state);
            self.moved.notify_all();
            let mut sink = lock(&self.sink);
            for out in &batch {
                if let Err(e) = sink.feed(out) {
                    lock(&self.failed).get_or_insert(e);
                    cancelled.store(true, Ordering::Relaxed);
                    break;
                }
            }
            drop(sink);
            state = lock(&self.state);
        }
        drop(state);
        self.moved.notify_all();
    }
}

/// Compute the digest of `image`. With `blocks`, also write its block digests
/// file there. `tick` is called from the calling thread about ten times a
/// second; returning false cancels the run (`Error::Cancelled`).
pub fn digest(
    image: &dyn BlockDriver,
    options: &DigestOptions,
    blocks: Option<&Path>,
    tick: &mut dyn FnMut(Progress) -> bool,
) -> Result<ImageDigest> {
    let started = Instant::now();
    let algorithm = options.algorithm;
    let size = image.size();
    let grid = Grid {
        block_size: BLOCK_SIZE,
        grid_end: size,
    };
    let block_count = grid.blocks();
    let chunk_blocks = (options.chunk_size / BLOCK_SIZE).clamp(1, 4096);
    let chunk_bytes = chunk_blocks * BLOCK_SIZE;
    let chunks = block_count.div_ceil(chunk_blocks);
    let threads = worker_count(options.threads, chunks);
    let zero_digest = algorithm.hash(&vec![0u8; BLOCK_SIZE as usize]);
    let writer = match blocks {
        Some(path) => Some(BlockDigestsWriter::create(
            path, algorithm, BLOCK_SIZE, size,
        )?),
        None => None,
    };
    let ordered = Ordered {
        state: Mutex::new(OrderState {
            pending: BTreeMap::new(),
            next: 0,
            draining: false,
        }),
        moved: Condvar::new(),
        sink: Mutex::new(Sink {
            outer: Outer::new(algorithm, &zero_digest),
            writer,
        }),
        failed: Mutex::new(None),
    };
    let next_chunk = AtomicU64::new(0);
    let cancelled = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    let padded = Padded { driver: image };

    let work = || {
        let mut scanner = Scanner::new(padded, grid, algorithm, OnError::Fail);
        loop {
            if cancelled.load(Ordering::Relaxed) {
                return;
            }
            let index = next_chunk.fetch_add(1, Ordering::Relaxed);
            if index >= chunks {
                return;
            }
            let first = index * chunk_blocks;
            let end = (first + chunk_blocks).min(block_count);
            let start = first * BLOCK_SIZE;
            let stop = (end * BLOCK_SIZE).min(size);
            let zero_end = padded.zero_until(start, start.saturating_add(ZERO_LOOKAHEAD).min(size));
            if zero_end >= stop {
                let mut out = ChunkOut::default();
                scanner.zero_blocks(first, end, &mut out);
                ordered.deliver(index, 1, out, &cancelled);
                done.fetch_add(stop - start, Ordering::Relaxed);
                // Claim the chunks wholly inside the zero run that no worker
                // has taken yet, as one delivery.
                let first_after = if zero_end >= size {
                    chunks
                } else {
                    zero_end / chunk_bytes
                };
                let previous = next_chunk.fetch_max(first_after, Ordering::Relaxed);
                if previous < first_after {
                    let mut out = ChunkOut::default();
                    let (from, to) = (previous * chunk_blocks, first_after * chunk_blocks);
                    scanner.zero_blocks(from, to, &mut out);
                    ordered.deliver(previous, first_after - previous, out, &cancelled);
                    let bytes = (to * BLOCK_SIZE).min(size) - (from * BLOCK_SIZE).min(size);
                    done.fetch_add(bytes, Ordering::Relaxed);
                }
                continue;
            }
            match scanner.scan(first, end) {
                Ok(out) => {
                    bytes_read.fetch_add(out.bytes_read, Ordering::Relaxed);
                    ordered.deliver(index, 1, out, &cancelled);
                    done.fetch_add(stop - start, Ordering::Relaxed);
                }
                Err(e) => {
                    lock(&ordered.failed).get_or_insert(e);
                    cancelled.store(true, Ordering::Relaxed);
                    ordered.moved.notify_all();
                    return;
                }
            }
        }
    };
    if !run_workers(threads, size, &done, &cancelled, tick, &work) {
        return Err(Error::Cancelled);
    }
    if let Some(e) = ordered
        .failed
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        return Err(e);
    }
    let state = ordered
        .state
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let sink = ordered
        .sink
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    if state.next != chunks || sink.outer.blocks() != block_count {
        return Err(Error::Internal(format!(
            "{}: {} of {block_count} blocks hashed",
            image.path().display(),
            sink.outer.blocks()
        )));
    }
    let digest = sink.outer.finish(size);
    if let Some(writer) = sink.writer {
        writer.finish(&digest)?;
    }
    Ok(ImageDigest {
        digest,
        algorithm,
        block_size: BLOCK_SIZE,
        size,
        bytes_read: bytes_read.into_inner(),
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests;
