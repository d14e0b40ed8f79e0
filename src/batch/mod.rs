//! Many verifications at once, within one core budget: pairs run side by side
//! in a few slots, and the worker threads are split between the slots, so a
//! batch never runs more threads than a single verify would.
//!
//! A pair's reference is a raw image (checked by the verify engine) or a block
//! digests file (checked by the digest engine), so the batch sits above both
//! engines, in a module of its own.

use crate::digest::{self, BlockDigests};
use crate::driver::{self, BlockDriver, OpenOptions};
use crate::error::{Error, Result};
use crate::pool::Progress;
use crate::report::{Report, VerifyOptions};
use crate::verify::verify;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

/// The name a block digests file goes by where a format name is expected
/// (`-f digests` for verify's reference, a report's `raw_format`).
pub const DIGESTS_FORMAT: &str = "digests";

/// What the reference of a pair is taken to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReferenceKind {
    /// A block digests file if it starts with its magic, else a raw image.
    #[default]
    Detect,
    /// A raw image (its format was given).
    Image,
    /// A block digests file (`-f digests`).
    Digests,
}

/// A pair's reference, opened.
#[derive(Clone)]
pub enum Reference {
    /// A raw image.
    Image(Arc<dyn BlockDriver>),
    /// A block digests file: the test image is checked block by block.
    Digests(Arc<BlockDigests>),
}

impl Reference {
    /// The reference image's virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Reference::Image(driver) => driver.size(),
            Reference::Digests(digests) => digests.size(),
        }
    }

    /// The format, as reports name it (`digests` for a block digests file).
    pub fn format_name(&self) -> &'static str {
        match self {
            Reference::Image(driver) => driver.format_name(),
            Reference::Digests(_) => DIGESTS_FORMAT,
        }
    }
}

/// One pair to verify.
#[derive(Debug, Clone)]
pub struct VerifyJob {
    /// The reference ("raw" for history): an image in any format we read, or a
    /// block digests file.
    pub raw: PathBuf,
    /// Whether `raw` is an image or a block digests file.
    pub reference: ReferenceKind,
    /// The image under test.
    pub test: PathBuf,
    /// How to open the reference.
    pub raw_options: OpenOptions,
    /// How to open the test image.
    pub test_options: OpenOptions,
    /// How to verify (`threads` is set by the batch).
    pub options: VerifyOptions,
}

/// A finished verification, with the drivers (for naming where mismatches live).
pub struct Verified {
    /// What the engine found.
    pub report: Report,
    /// The reference, still open.
    pub raw: Reference,
    /// The test image, still open.
    pub test: Arc<dyn BlockDriver>,
}

/// Progress of a whole batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchProgress {
    /// Guest bytes done, over all pairs.
    pub done: u64,
    /// Guest bytes in all pairs (those that could be opened).
    pub total: u64,
    /// Pairs finished (with any result).
    pub pairs_done: usize,
    /// Pairs in all.
    pub pairs_total: usize,
}

/// Open a pair: the reference (an image in any format blkverify reads, or a
/// block digests file) and the test image (a qcow2 against its `qemu-img
/// convert -c` copy, a vmdk against the qcow2 it was converted from, a copy
/// against the block digests of its source).
pub fn open_pair(job: &VerifyJob) -> Result<(Reference, Arc<dyn BlockDriver>)> {
    let digests = match job.reference {
        ReferenceKind::Digests => true,
        ReferenceKind::Image => false,
        ReferenceKind::Detect => digest::is_block_digests_file(&job.raw),
    };
    let raw = if digests {
        Reference::Digests(Arc::new(BlockDigests::load(&job.raw)?))
    } else {
        Reference::Image(driver::open(&job.raw, &job.raw_options)?)
    };
    let test = driver::open(&job.test, &job.test_options)?;
    Ok((raw, test))
}

/// Open and verify one pair. `tick` as for [`verify`].
pub fn verify_pair(job: &VerifyJob, tick: &mut dyn FnMut(Progress) -> bool) -> Result<Verified> {
    let (raw, test) = open_pair(job)?;
    let report = match &raw {
        Reference::Image(image) => verify(image.as_ref(), test.as_ref(), &job.options, tick)?,
        Reference::Digests(digests) => digest::check(digests, test.as_ref(), &job.options, tick)?,
    };
    Ok(Verified { report, raw, test })
}

/// Verify every job, `threads` worker threads in all (0: one per core).
/// Results come back in job order. `tick` is called from the calling thread
/// about ten times a second; returning `false` cancels the batch: pairs not
/// finished yet then end with `Error::Cancelled`.
pub fn verify_many(
    jobs: &[VerifyJob],
    threads: usize,
    tick: &mut dyn FnMut(BatchProgress) -> bool,
) -> Vec<Result<Verified>> {
    let budget = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    }
    .clamp(1, 64);
    let slots = budget.min(jobs.len()).max(1);
    let per_pair = (budget / slots).max(1);

    // Sizes first, for one progress total (drivers are closed again: a long
    // manifest must not hold two descriptors per pair).
    let sizes: Vec<u64> = jobs
        .iter()
        .map(|job| {
            open_pair(job)
                .map(|(raw, test)| raw.size().max(test.size()))
                .unwrap_or(0)
        })
        .collect();
    let total: u64 = sizes.iter().sum();

    let next_job = AtomicUsize::new(0);
    let pairs_done = AtomicUsize::new(0);
    let finished_bytes = AtomicU64::new(0);
    let running: Vec<AtomicU64> = (0..slots).map(|_| AtomicU64::new(0)).collect();
    let cancelled = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<Verified>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());

    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        for slot in 0..slots {
            let tx = done_tx.clone();
            let (next_job, pairs_done, finished_bytes, running, cancelled, results, sizes) = (
                &next_job,
                &pairs_done,
                &finished_bytes,
                &running,
                &cancelled,
                &results,
                &sizes,
            );
            scope.spawn(move || {
                loop {
                    let index = next_job.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(index) else { break };
                    let outcome = if cancelled.load(Ordering::Relaxed) {
                        Err(Error::Cancelled)
                    } else {
                        let mut job = job.clone();
                        job.options.threads = per_pair;
                        let mut pair_tick = |p: Progress| {
                            if let Some(counter) = running.get(slot) {
                                counter.store(p.done, Ordering::Relaxed);
                            }
                            !cancelled.load(Ordering::Relaxed)
                        };
                        verify_pair(&job, &mut pair_tick)
                    };
                    if let Some(counter) = running.get(slot) {
                        counter.store(0, Ordering::Relaxed);
                    }
                    finished_bytes
                        .fetch_add(sizes.get(index).copied().unwrap_or(0), Ordering::Relaxed);
                    pairs_done.fetch_add(1, Ordering::Relaxed);
                    if let Some(cell) = results
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_mut(index)
                    {
                        *cell = Some(outcome);
                    }
                }
                let _ = tx.send(());
            });
        }
        drop(done_tx);
        let mut finished = 0;
        let mut user_cancelled = false;
        while finished < slots {
            match done_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let in_flight: u64 = running.iter().map(|c| c.load(Ordering::Relaxed)).sum();
            let progress = BatchProgress {
                done: (finished_bytes.load(Ordering::Relaxed) + in_flight).min(total),
                total,
                pairs_done: pairs_done.load(Ordering::Relaxed),
                pairs_total: jobs.len(),
            };
            if !user_cancelled && !tick(progress) {
                user_cancelled = true;
                cancelled.store(true, Ordering::Relaxed);
            }
        }
    });
    results
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .map(|r| r.unwrap_or(Err(Error::Cancelled)))
        .collect()
}
