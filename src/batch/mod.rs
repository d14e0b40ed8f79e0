//! Many verifications at once, within one core budget: pairs run side by side
//! in a few slots, and the worker threads are split between the slots, so a
//! batch never runs more threads than a single verify would.
//!
//! A batch streams: pairs are fed in order, a few at a time, and their results
//! come back in the same order ([`stream`]); only the pairs being verified are
//! open, and no more of them than the open-file limit leaves room for
//! ([`descriptors`]). A pair is closed as soon as its report is made and its
//! findings are located in both images' metadata ([`check_pair`]), so a result
//! waiting its turn holds memory, never a descriptor.
//!
//! A pair's reference is a raw image (checked by the verify engine) or a block
//! digests file (checked by the digest engine), so the batch sits above both
//! engines, in a module of its own.

pub mod descriptors;
pub mod stream;

pub use stream::{BatchStream, StreamOptions, WINDOW};

use crate::digest::{self, BlockDigests};
use crate::driver::{self, BlockDriver, Location, OpenOptions};
use crate::error::{Error, Result};
use crate::pool::Progress;
use crate::report::{unopened_backing, Report, VerifyOptions, MAX_LOCATED};
use crate::verify::verify;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A verified pair, its images closed again: what the engine found, and where
/// the first findings live in each side's metadata, looked up while the
/// images were still open.
#[derive(Debug, Clone)]
pub struct Checked {
    /// What the engine found, with the warnings about the pair's opening
    /// (a backing file left unopened) added.
    pub report: Report,
    /// The reference's format, as reports name it.
    pub raw_format: &'static str,
    /// The test image's format.
    pub test_format: &'static str,
    /// Where the first differing byte of each of the first
    /// [`MAX_LOCATED`] runs lives in the test image (`None`: nothing to name).
    pub locations: Vec<Option<Location>>,
    /// The same in the reference, when it is an image with metadata.
    pub ref_locations: Vec<Option<Location>>,
}

/// Progress of a whole batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchProgress {
    /// Guest bytes done, over all pairs.
    pub done: u64,
    /// Guest bytes in all pairs: an estimate until every pair has opened (see
    /// [`StreamOptions::total`]).
    pub total: u64,
    /// Pairs finished (with any result).
    pub pairs_done: usize,
    /// Pairs in all (those fed so far, when the caller did not say).
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

/// Open, verify and close one pair. `tick` as for [`verify`].
pub fn check_pair(job: &VerifyJob, tick: &mut dyn FnMut(Progress) -> bool) -> Result<Checked> {
    let (raw, test) = open_pair(job)?;
    check_opened(job, &raw, &test, tick)
}

/// [`check_pair`], but of no more than the disk's first `split` bytes: a
/// pair whose disk is larger gives the report of the range `0..split` (a
/// multiple of 512), and the caller verifies the rest elsewhere, range by
/// range (a cluster's tasks), and merges the reports. The pair is opened
/// once either way.
pub fn check_pair_within(
    job: &VerifyJob,
    split: u64,
    tick: &mut dyn FnMut(Progress) -> bool,
) -> Result<Checked> {
    let (raw, test) = open_pair(job)?;
    let size = raw.size().max(test.size());
    let whole = job.options.start == 0 && job.options.length.is_none();
    if whole && size > split {
        let mut first = job.clone();
        first.options.length = Some(split);
        return check_opened(&first, &raw, &test, tick);
    }
    check_opened(job, &raw, &test, tick)
}

/// Verify an opened pair, and name where its first findings live while the
/// images are open; the caller closes them.
pub fn check_opened(
    job: &VerifyJob,
    raw: &Reference,
    test: &Arc<dyn BlockDriver>,
    tick: &mut dyn FnMut(Progress) -> bool,
) -> Result<Checked> {
    let mut report = match raw {
        Reference::Image(image) => verify(image.as_ref(), test.as_ref(), &job.options, tick)?,
        Reference::Digests(digests) => digest::check(digests, test.as_ref(), &job.options, tick)?,
    };
    let offsets: Vec<u64> = report
        .mismatches
        .iter()
        .take(MAX_LOCATED)
        .map(|m| m.first_byte)
        .collect();
    // Both sides: a reference with metadata (not raw) is named too.
    let locations = locate_all(test.as_ref(), &offsets);
    let ref_locations = match raw {
        Reference::Image(image) => locate_all(image.as_ref(), &offsets),
        Reference::Digests(_) => Vec::new(),
    };
    if let Reference::Image(image) = raw {
        report.warnings.extend(unopened_backing(
            &job.raw,
            image.as_ref(),
            &job.test_options,
            "compared",
        ));
    }
    report.warnings.extend(unopened_backing(
        &job.test,
        test.as_ref(),
        &job.test_options,
        "compared",
    ));
    Ok(Checked {
        report,
        raw_format: raw.format_name(),
        test_format: test.format_name(),
        locations,
        ref_locations,
    })
}

/// Where each of `offsets` lives in `image`'s metadata (`None` where it has
/// none to name: a raw image, or past its end). Best effort, as a report's
/// mappings are: an error, or a panic in a driver's lookup, leaves no mapping.
fn locate_all(image: &dyn BlockDriver, offsets: &[u64]) -> Vec<Option<Location>> {
    catch_unwind(AssertUnwindSafe(|| {
        offsets
            .iter()
            .map(|&o| {
                if o < image.size() {
                    image.locate(o).ok().flatten()
                } else {
                    None
                }
            })
            .collect::<Vec<_>>()
    }))
    .unwrap_or_default()
}

/// What a pair's size can be told to be without opening it: the larger of
/// its two files' sizes (a raw file's is its disk's; an image file's is what
/// it holds, often less than its disk), 0 for an NBD export or a file that
/// cannot be looked at. A batch's progress total starts as the sum of these
/// and is corrected as each pair opens.
pub fn size_hint(job: &VerifyJob) -> u64 {
    file_size(&job.raw).max(file_size(&job.test))
}

fn file_size(path: &Path) -> u64 {
    if path.to_str().is_some_and(driver::nbd::is_uri) {
        return 0;
    }
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Verify every job, `threads` worker threads in all (0: one per core).
/// Results come back in job order, each pair closed once it is checked.
/// `tick` is called from the calling thread about ten times a second;
/// returning `false` cancels the batch: pairs not finished yet then end with
/// `Error::Cancelled`. A stream ([`BatchStream`]) gives the same results one
/// by one, in bounded memory.
pub fn verify_many(
    jobs: Vec<VerifyJob>,
    threads: usize,
    tick: &mut dyn FnMut(BatchProgress) -> bool,
) -> Vec<Result<Checked>> {
    let count = jobs.len();
    let mut stream = BatchStream::new(StreamOptions {
        threads,
        pairs_total: Some(count),
        total: Some(jobs.iter().map(size_hint).sum()),
    });
    let mut jobs = jobs.into_iter();
    let mut results = Vec::with_capacity(count);
    let mut started = stream.start(tick).is_ok();
    while started {
        while stream.room() > 0 {
            match jobs.next() {
                Some(job) => stream.feed(job),
                None => break,
            }
        }
        match stream.next_result(tick) {
            Ok(Some((_, result))) => results.push(result),
            Ok(None) | Err(_) => started = false,
        }
    }
    results.resize_with(count, || Err(Error::Cancelled));
    results
}
