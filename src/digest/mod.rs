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
    let chunk_blocks = (options.chunk_size / BLOCK_SIZE).clamp(1, 4096);
    let chunks = grid.blocks().div_ceil(chunk_blocks);
    let threads = worker_count(options.threads, chunks);
    let zero_digest = algorithm.hash(&vec![0u8; BLOCK_SIZE as usize]);
    let writer = match blocks {
        Some(path) => Some(BlockDigestsWriter::create(
            path, algorithm, BLOCK_SIZE, size,
        )?),
        None => None,
    };
    let run = Digesting {
        padded: Padded { driver: image },
        grid,
        algorithm,
        chunk_blocks,
        chunks,
        ordered: Ordered {
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
        },
        next_chunk: AtomicU64::new(0),
        cancelled: AtomicBool::new(false),
        done: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
    };
    let work = || run.worker();
    if !run_workers(threads, size, &run.done, &run.cancelled, tick, &work) {
        return Err(Error::Cancelled);
    }
    let bytes_read = run.bytes_read.load(Ordering::Relaxed);
    let digest = run.finish(image.path())?;
    Ok(ImageDigest {
        digest,
        algorithm,
        block_size: BLOCK_SIZE,
        size,
        bytes_read,
        elapsed: started.elapsed(),
    })
}

/// One digest run, shared by its workers: the image on its grid of blocks,
/// the chunks they take, the ordered stage that feeds the outer hash, and
/// the counters.
struct Digesting<'a> {
    padded: Padded<'a>,
    grid: Grid,
    algorithm: Algorithm,
    /// Blocks per chunk.
    chunk_blocks: u64,
    chunks: u64,
    ordered: Ordered,
    next_chunk: AtomicU64,
    cancelled: AtomicBool,
    /// Guest bytes done, for progress.
    done: AtomicU64,
    bytes_read: AtomicU64,
}

impl Digesting<'_> {
    /// Take chunks until there are none left, hash each (or count it as
    /// zeros) and deliver it to the ordered stage. A read error stops the run.
    fn worker(&self) {
        let mut scanner = Scanner::new(self.padded, self.grid, self.algorithm, OnError::Fail);
        let size = self.grid.grid_end;
        loop {
            if self.cancelled.load(Ordering::Relaxed) {
                return;
            }
            let index = self.next_chunk.fetch_add(1, Ordering::Relaxed);
            if index >= self.chunks {
                return;
            }
            let first = index * self.chunk_blocks;
            let end = (first + self.chunk_blocks).min(self.grid.blocks());
            let start = first * BLOCK_SIZE;
            let stop = (end * BLOCK_SIZE).min(size);
            let zero_end = self
                .padded
                .zero_until(start, start.saturating_add(ZERO_LOOKAHEAD).min(size));
            if zero_end >= stop {
                self.deliver_zeros(&mut scanner, index, zero_end);
                continue;
            }
            match scanner.scan(first, end) {
                Ok(out) => {
                    self.bytes_read.fetch_add(out.bytes_read, Ordering::Relaxed);
                    self.ordered.deliver(index, 1, out, &self.cancelled);
                    self.done.fetch_add(stop - start, Ordering::Relaxed);
                }
                Err(e) => {
                    lock(&self.ordered.failed).get_or_insert(e);
                    self.cancelled.store(true, Ordering::Relaxed);
                    self.ordered.moved.notify_all();
                    return;
                }
            }
        }
    }

    /// Chunk `index` reads as zeros up to `zero_end`: deliver it, then claim
    /// the chunks wholly inside the zero run that no worker has taken yet,
    /// as one delivery.
    fn deliver_zeros(&self, scanner: &mut Scanner<'_>, index: u64, zero_end: u64) {
        let size = self.grid.grid_end;
        let first = index * self.chunk_blocks;
        let end = (first + self.chunk_blocks).min(self.grid.blocks());
        let mut out = ChunkOut::default();
        scanner.zero_blocks(first, end, &mut out);
        self.ordered.deliver(index, 1, out, &self.cancelled);
        let (start, stop) = (first * BLOCK_SIZE, (end * BLOCK_SIZE).min(size));
        self.done.fetch_add(stop - start, Ordering::Relaxed);
        let first_after = if zero_end >= size {
            self.chunks
        } else {
            zero_end / (self.chunk_blocks * BLOCK_SIZE)
        };
        let previous = self.next_chunk.fetch_max(first_after, Ordering::Relaxed);
        if previous < first_after {
            let mut out = ChunkOut::default();
            let (from, to) = (
                previous * self.chunk_blocks,
                first_after * self.chunk_blocks,
            );
            scanner.zero_blocks(from, to, &mut out);
            self.ordered
                .deliver(previous, first_after - previous, out, &self.cancelled);
            let bytes = (to * BLOCK_SIZE).min(size) - (from * BLOCK_SIZE).min(size);
            self.done.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// After the workers: the first error, or the digest (every block must
    /// have reached the outer hash), with the block digests file finished.
    fn finish(self, path: &Path) -> Result<BlockDigest> {
        if let Some(e) = self
            .ordered
            .failed
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(e);
        }
        let state = self
            .ordered
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let sink = self
            .ordered
            .sink
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let block_count = self.grid.blocks();
        if state.next != self.chunks || sink.outer.blocks() != block_count {
            return Err(Error::Internal(format!(
                "{}: {} of {block_count} blocks hashed",
                path.display(),
                sink.outer.blocks()
            )));
        }
        let digest = sink.outer.finish(self.grid.grid_end);
        if let Some(writer) = sink.writer {
            writer.finish(&digest)?;
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests;
