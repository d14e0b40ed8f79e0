//! The digest engine against a plain, one-thread reading of the construction.

use super::*;
use crate::driver::raw::Raw;
use crate::driver::{Extent, Format, Mapping};
use crate::report::{Report, VerifyOptions};
use crate::storage::{FileStorage, MemStorage};
use std::path::PathBuf;
use std::sync::Arc;

/// The construction, written as plainly as possible.
fn plain_digest(bytes: &[u8], algorithm: Algorithm) -> (BlockDigest, Vec<BlockDigest>) {
    let blocks: Vec<BlockDigest> = bytes
        .chunks(BLOCK_SIZE as usize)
        .map(|b| algorithm.hash(b))
        .collect();
    let mut outer = algorithm.hasher();
    for d in &blocks {
        outer.update(d);
    }
    outer.update(&(bytes.len() as u64).to_le_bytes());
    (outer.finish(), blocks)
}

fn raw(bytes: Vec<u8>) -> Raw {
    Raw::new(Arc::new(MemStorage::new("t.img", bytes, false))).unwrap()
}

/// Data with zero blocks, zero bytes inside data blocks, and a pattern that
/// differs per block.
fn mixed(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        let block = i / BLOCK_SIZE as usize;
        if block % 3 != 1 && i % 4096 < 3000 {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] | 1;
        }
    }
    v
}

fn small_chunks(threads: usize, algorithm: Algorithm) -> DigestOptions {
    DigestOptions {
        algorithm,
        threads,
        chunk_size: 3 * BLOCK_SIZE,
    }
}

#[test]
fn equals_the_plain_construction_for_any_size_and_thread_count() {
    let sizes = [
        0usize,
        1,
        65535,
        65536,
        65537,
        3 * 65536 + 5,
        20 * 65536,
        41 * 65536 - 512,
    ];
    for algorithm in Algorithm::ALL {
        for size in sizes {
            let bytes = mixed(size);
            let (expected, _) = plain_digest(&bytes, algorithm);
            let image = raw(bytes);
            for threads in [1, 2, 5] {
                let got = digest(&image, &small_chunks(threads, algorithm), None, &mut |_| {
                    true
                })
                .unwrap();
                assert_eq!(
                    got.hexdigest(),
                    to_hex(&expected),
                    "{} size {size} threads {threads}",
                    algorithm.name()
                );
                assert_eq!(got.size, size as u64);
            }
        }
    }
}

#[test]
fn a_short_last_block_of_zeros_is_hashed_as_its_bytes() {
    for size in [100usize, 65536 + 100, 5 * 65536 + 65535] {
        let bytes = vec![0u8; size];
        let (expected, _) = plain_digest(&bytes, Algorithm::Sha256);
        let got = digest(
            &raw(bytes),
            &small_chunks(2, Algorithm::Sha256),
            None,
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(got.digest, expected, "size {size}");
    }
}

/// A driver whose map says "zero" for chosen blocks and that fails any read of
/// them: proves that mapped zeros are never read.
struct MappedZeros {
    inner: Raw,
    zero_blocks: Vec<u64>,
}

impl BlockDriver for MappedZeros {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn path(&self) -> &std::path::Path {
        std::path::Path::new("mapped.img")
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn granularity(&self) -> u64 {
        4096
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        for b in &self.zero_blocks {
            let (s, e) = (b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE);
            if offset < e && end > s {
                return Err(Error::InvalidArgument(format!("read of zero block {b}")));
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let block = offset / BLOCK_SIZE;
        let block_end = ((block + 1) * BLOCK_SIZE).min(self.size());
        let zero = self.zero_blocks.contains(&block);
        // Split zero blocks into two extents of different kinds, so the
        // engine must join them to see a whole zero block.
        let mid = block * BLOCK_SIZE + 4096;
        let end = if zero && offset < mid { mid } else { block_end };
        let mapping = if !zero {
            Mapping::Data {
                host_offset: offset,
            }
        } else if offset < mid {
            Mapping::Zero { allocated: false }
        } else {
            Mapping::Unallocated
        };
        Ok(Extent {
            offset,
            length: (end - offset).min(max_len),
            mapping,
        })
    }
}

#[test]
fn blocks_mapped_as_zeros_are_never_read() {
    let mut bytes = mixed(10 * 65536);
    let zero_blocks = vec![0, 2, 3, 9];
    for b in &zero_blocks {
        let s = (*b * BLOCK_SIZE) as usize;
        bytes[s..s + BLOCK_SIZE as usize].fill(0);
    }
    let (expected, _) = plain_digest(&bytes, Algorithm::Sha256);
    let image = MappedZeros {
        inner: raw(bytes),
        zero_blocks,
    };
    let got = digest(
        &image,
        &small_chunks(2, Algorithm::Sha256),
        None,
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(got.digest, expected);
    assert_eq!(got.bytes_read, 6 * BLOCK_SIZE);
}

fn sparse_file(dir: &std::path::Path, size: u64, data_at: &[u64]) -> (PathBuf, Vec<u8>) {
    let path = dir.join("sparse.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    let mut bytes = vec![0u8; size as usize];
    for &at in data_at {
        let chunk: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8 + 1).collect();
        let end = (at as usize + chunk.len()).min(size as usize);
        bytes[at as usize..end].copy_from_slice(&chunk[..end - at as usize]);
        use std::os::unix::fs::FileExt;
        file.write_all_at(&chunk[..end - at as usize], at).unwrap();
    }
    (path, bytes)
}

#[test]
fn holes_in_a_sparse_raw_file_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let size = (96u64 << 20) + 12345;
    let (path, bytes) = sparse_file(dir.path(), size, &[5 << 20, 70 << 20, size - 1000]);
    let (expected, blocks) = plain_digest(&bytes, Algorithm::Sha256);
    let image = Raw::new(Arc::new(FileStorage::open_read_only(&path).unwrap())).unwrap();
    let out = dir.path().join("sparse.digests");
    let got = digest(&image, &DigestOptions::default(), Some(&out), &mut |_| true).unwrap();
    assert_eq!(got.digest, expected);
    assert!(got.bytes_read < 16 << 20, "read {} bytes", got.bytes_read);
    let file = BlockDigests::load(&out).unwrap();
    assert_eq!(file.image_digest(), &expected);
    assert_eq!(file.size(), size);
    for (i, d) in blocks.iter().enumerate() {
        assert_eq!(file.block(i as u64).as_ref(), Some(d), "block {i}");
    }
    // Its size follows the data: a few blocks of digests, not 1537 of them.
    assert!(std::fs::metadata(&out).unwrap().len() < 1024);
}

#[test]
fn cancelling_stops_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.digests");
    let image = raw(mixed(4 << 20));
    let err = digest(
        &image,
        &small_chunks(2, Algorithm::Sha256),
        Some(&out),
        &mut |_| false,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn read_errors_fail_the_digest() {
    let bytes = mixed(10 * 65536);
    let image = MappedZeros {
        inner: raw(bytes),
        zero_blocks: vec![],
    };
    struct Failing(MappedZeros);
    impl BlockDriver for Failing {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn path(&self) -> &std::path::Path {
            self.0.path()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn granularity(&self) -> u64 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if offset <= 300_000 && offset + buf.len() as u64 > 300_000 {
                return Err(Error::corrupt(self.path(), "bad cluster"));
            }
            self.0.read_at(buf, offset)
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
            self.0.map(offset, max_len)
        }
    }
    let err = digest(
        &Failing(image),
        &small_chunks(2, Algorithm::Sha256),
        None,
        &mut |_| true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bad cluster"), "{err}");
}

fn write_reference(dir: &std::path::Path, bytes: &[u8]) -> BlockDigests {
    let path = dir.join("ref.digests");
    digest(
        &raw(bytes.to_vec()),
        &small_chunks(2, Algorithm::Sha256),
        Some(&path),
        &mut |_| true,
    )
    .unwrap();
    BlockDigests::load(&path).unwrap()
}

fn check_all(reference: &BlockDigests, bytes: Vec<u8>, all: bool) -> Report {
    let options = VerifyOptions {
        all,
        threads: 2,
        chunk_size: 3 * BLOCK_SIZE,
        ..VerifyOptions::default()
    };
    check(reference, &raw(bytes), &options, &mut |_| true).unwrap()
}

/// The findings as (first block, blocks).
fn blocks(report: &Report) -> Vec<(u64, u64)> {
    let bs = report.block_size.unwrap();
    report
        .mismatches
        .iter()
        .map(|m| (m.offset / bs, m.length.div_ceil(bs)))
        .collect()
}

#[test]
fn check_finds_exactly_the_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = mixed(20 * 65536 + 777);
    let reference = write_reference(dir.path(), &bytes);
    assert!(check_all(&reference, bytes.clone(), true).identical);

    let mut changed = bytes.clone();
    for at in [
        70_000usize,
        65536 * 4 + 1,
        65536 * 5 + 9,
        65536 * 13,
        20 * 65536 + 700,
    ] {
        changed[at] ^= 0x40;
    }
    // A data block made zero, and a zero block (block 1 is zeros) given data.
    changed[65536 * 8..65536 * 9].fill(0);
    changed[65536 * 10 + 5] = 1;
    let report = check_all(&reference, changed.clone(), true);
    assert!(!report.identical);
    assert_eq!(
        blocks(&report),
        vec![(1, 1), (4, 2), (8, 1), (10, 1), (13, 1), (20, 1)]
    );
    let last = report.mismatches.last().unwrap();
    assert_eq!((last.offset, last.length), (20 * 65536, 777));
    let first = check_all(&reference, changed, false);
    assert_eq!(first.mismatches.len(), 1);
    assert_eq!(blocks(&first), vec![(1, 1)]);
    assert_eq!(first.bytes_compared, 65536);
}

#[test]
fn check_compares_the_common_part_when_sizes_differ() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = mixed(6 * 65536 + 300);
    let reference = write_reference(dir.path(), &bytes);
    // Longer, with zeros past the reference's end: identical, with a warning.
    let mut longer = bytes.clone();
    longer.resize(9 * 65536, 0);
    let report = check_all(&reference, longer.clone(), true);
    assert!(report.identical, "{:?}", report.mismatches);
    assert_eq!(report.warnings.len(), 1);
    assert_eq!(report.virtual_size, 9 * 65536);
    // Non-zero bytes past the end are findings, in the block that holds them.
    longer[6 * 65536 + 400] = 1;
    longer[8 * 65536] = 1;
    let report = check_all(&reference, longer, true);
    assert_eq!(blocks(&report), vec![(6, 1), (8, 1)]);
    // Shorter: the reference's tail must be zeros; block 5 and the short
    // block 6 hold data, so both differ.
    let shorter = bytes[..5 * 65536].to_vec();
    let report = check_all(&reference, shorter, true);
    assert_eq!(blocks(&report), vec![(5, 2)]);
    let strict = check(
        &reference,
        &raw(bytes[..6 * 65536 + 300].to_vec()),
        &VerifyOptions {
            strict: true,
            ..VerifyOptions::default()
        },
        &mut |_| true,
    )
    .unwrap();
    assert!(strict.identical);
}

#[test]
fn check_reports_unreadable_blocks_as_findings() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = mixed(10 * 65536);
    let reference = write_reference(dir.path(), &bytes);
    let image = MappedZeros {
        inner: raw(bytes),
        zero_blocks: vec![],
    };
    struct Broken(MappedZeros);
    impl BlockDriver for Broken {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn path(&self) -> &std::path::Path {
            self.0.path()
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn granularity(&self) -> u64 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let end = offset + buf.len() as u64;
            if offset < 4 * 65536 && end > 2 * 65536 + 10 {
                return Err(Error::corrupt(self.path(), "cluster does not decompress"));
            }
            self.0.read_at(buf, offset)
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
            self.0.map(offset, max_len)
        }
    }
    let options = VerifyOptions {
        all: true,
        threads: 2,
        chunk_size: 8 * BLOCK_SIZE,
        ..VerifyOptions::default()
    };
    let report = check(&reference, &Broken(image), &options, &mut |_| true).unwrap();
    assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
    let m = &report.mismatches[0];
    assert_eq!(blocks(&report), vec![(2, 2)]);
    assert!(m.error.as_deref().unwrap().contains("does not decompress"));
}

/// `image`'s blocks `[0, blocks)` (on a grid ending at `grid_end`) as spans
/// of `step` blocks, each hashed apart.
fn spans_of(image: &dyn BlockDriver, grid_end: u64, blocks: u64, step: u64) -> Vec<BlockSpan> {
    (0..blocks.div_ceil(step))
        .map(|i| {
            let range = (i * step, ((i + 1) * step).min(blocks));
            digest_span(
                image,
                Algorithm::Sha256,
                grid_end,
                range,
                2,
                true,
                &mut |_| true,
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn spans_hashed_apart_join_into_the_whole_digest_and_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let size = (24u64 << 20) + 12345;
    let (path, bytes) = sparse_file(dir.path(), size, &[5 << 20, (12 << 20) - 100, size - 1000]);
    let (expected, block_digests) = plain_digest(&bytes, Algorithm::Sha256);
    let image = Raw::new(Arc::new(FileStorage::open_read_only(&path).unwrap())).unwrap();
    let blocks = size.div_ceil(BLOCK_SIZE);
    for step in [1, 7, 64, blocks, blocks + 3] {
        let spans = spans_of(&image, size, blocks, step);
        let out = dir.path().join(format!("joined-{step}.digests"));
        let joined = join(Algorithm::Sha256, size, &spans, Some(&out)).unwrap();
        assert_eq!(joined.digest, expected, "step {step}");
        let file = BlockDigests::load(&out).unwrap();
        for (i, d) in block_digests.iter().enumerate() {
            assert_eq!(
                file.block(i as u64).as_ref(),
                Some(d),
                "step {step} block {i}"
            );
        }
    }
    // Spans out of order, or missing one, are refused.
    let mut spans = spans_of(&image, size, blocks, 64);
    spans.swap(0, 1);
    assert!(join(Algorithm::Sha256, size, &spans, None).is_err());
    spans.remove(0);
    assert!(join(Algorithm::Sha256, size, &spans, None).is_err());
}

#[test]
fn spans_checked_against_spans_report_as_a_check_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = mixed(20 * 65536 + 777);
    let reference = write_reference(dir.path(), &bytes);
    let reference_image = raw(bytes.clone());
    let mut changed = bytes.clone();
    for at in [70_000usize, 65536 * 4 + 1, 65536 * 5 + 9, 20 * 65536 + 700] {
        changed[at] ^= 0x40;
    }
    changed[65536 * 10 + 5] = 1;
    // Longer than the reference too, with data past its end.
    changed.resize(23 * 65536, 0);
    changed[22 * 65536 + 3] = 7;
    let size = bytes.len() as u64;
    let test_size = changed.len() as u64;
    let test = raw(changed.clone());
    let ref_spans = spans_of(&reference_image, size, size.div_ceil(BLOCK_SIZE), 5);
    for all in [true, false] {
        let options = VerifyOptions {
            all,
            threads: 2,
            chunk_size: 3 * BLOCK_SIZE,
            ..VerifyOptions::default()
        };
        let expected = check(&reference, &test, &options, &mut |_| true).unwrap();
        let test_spans = spans_of(&test, size, test_size.div_ceil(BLOCK_SIZE), 4);
        let got = check_spans(
            Spans {
                path: reference.path(),
                size,
                spans: &ref_spans,
            },
            Algorithm::Sha256,
            Spans {
                path: test.path(),
                size: test_size,
                spans: &test_spans,
            },
            &options,
        )
        .unwrap();
        assert_eq!(blocks(&got), blocks(&expected), "all {all}");
        assert_eq!(got.identical, expected.identical);
        assert_eq!(got.virtual_size, expected.virtual_size);
        assert_eq!(got.warnings, expected.warnings);
        assert_eq!(got.bytes_compared, expected.bytes_compared);
    }
    let all = check_all(&reference, changed, true);
    assert_eq!(
        blocks(&all),
        vec![(1, 1), (4, 2), (10, 1), (20, 1), (22, 1)]
    );
}

#[test]
fn a_check_of_a_range_is_that_range_of_the_whole_check() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = mixed(20 * 65536 + 777);
    let reference = write_reference(dir.path(), &bytes);
    let mut changed = bytes.clone();
    for at in [70_000usize, 65536 * 9 + 1, 65536 * 10 + 9] {
        changed[at] ^= 0x40;
    }
    let test = raw(changed);
    let ranged = |start: u64, length: Option<u64>| {
        let options = VerifyOptions {
            all: true,
            threads: 2,
            chunk_size: 3 * BLOCK_SIZE,
            start,
            length,
            ..VerifyOptions::default()
        };
        check(&reference, &test, &options, &mut |_| true)
    };
    let got = ranged(8 * BLOCK_SIZE, Some(4 * BLOCK_SIZE)).unwrap();
    assert_eq!(blocks(&got), vec![(9, 2)]);
    assert_eq!(got.range, 8 * BLOCK_SIZE..12 * BLOCK_SIZE);
    let tail = ranged(16 * BLOCK_SIZE, None).unwrap();
    assert!(tail.identical);
    // Ranges are whole blocks, but may end where the disk does.
    let err = ranged(512, None).unwrap_err();
    assert!(err.to_string().contains("multiple of 65536"), "{err}");
    assert!(ranged(0, Some(BLOCK_SIZE + 512)).is_err());
}
