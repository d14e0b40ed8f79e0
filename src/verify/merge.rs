//! One report from the reports of a pair's ranges, verified apart (on other
//! threads, processes or hosts): the report one verify of the whole pair gives.
//!
//! The rules are the engine's own: runs that meet at a range edge are one run;
//! `all`'s run cap applies after merging; without `all` the report keeps the
//! first run in guest order; a reference-side error counts if it comes before
//! the first finding (any error counts with `all`).

use super::{add_run, Mismatch, Report, VerifyOptions};
use crate::error::Error;

/// Merge the outcomes of consecutive ranges of one pair, in guest order: each
/// is a range's report, or the error its verify gave. `options` are the
/// pair's (`all`, `strict`, `max_runs`). The reports must cover consecutive
/// ranges of the same two images; otherwise `Error::InvalidArgument`.
pub fn merge_ranges<E: From<Error>>(
    parts: Vec<Result<Report, E>>,
    options: &VerifyOptions,
) -> Result<Report, E> {
    let mut merged: Option<Report> = None;
    for part in parts {
        let report = match part {
            Ok(report) => report,
            Err(e) => {
                // Without --all, an error after the first finding cannot change
                // the report, as in the engine.
                let found = merged.as_ref().is_some_and(|m| !m.mismatches.is_empty());
                if options.all || !found {
                    return Err(e);
                }
                continue;
            }
        };
        let Some(sum) = merged.as_mut() else {
            merged = Some(report);
            continue;
        };
        if report.range.start != sum.range.end
            || (report.raw_size, report.test_size) != (sum.raw_size, sum.test_size)
        {
            return Err(Error::InvalidArgument(format!(
                "cannot merge the report of {:#x}..{:#x} (sizes {} and {}) after that of {:#x}..{:#x} (sizes {} and {})",
                report.range.start,
                report.range.end,
                report.raw_size,
                report.test_size,
                sum.range.start,
                sum.range.end,
                sum.raw_size,
                sum.test_size
            ))
            .into());
        }
        if !options.all && !sum.mismatches.is_empty() {
            let first_end = sum.mismatches.first().map(Mismatch::end);
            let next_start = report.mismatches.first().map(|m| m.offset);
            if first_end != Some(sum.range.end) || next_start != Some(report.range.start) {
                // The first run ended inside the ranges so far: nothing later matters.
                sum.range.end = report.range.end;
                sum.bytes_read += report.bytes_read;
                sum.elapsed = sum.elapsed.max(report.elapsed);
                continue;
            }
        }
        for run in report.mismatches {
            let end = run.end();
            add_run(
                &mut sum.mismatches,
                run.offset,
                end,
                run.first_byte,
                run.error.zip(run.errno),
            );
        }
        sum.range.end = report.range.end;
        sum.bytes_read += report.bytes_read;
        sum.truncated |= report.truncated;
        sum.elapsed = sum.elapsed.max(report.elapsed);
    }
    let mut report = merged.ok_or_else(|| {
        E::from(Error::InvalidArgument(
            "no range reports to merge".to_string(),
        ))
    })?;
    if !options.all {
        report.mismatches.truncate(1);
        report.truncated = false;
    } else if report.mismatches.len() > options.max_runs {
        report.mismatches.truncate(options.max_runs);
        report.truncated = true;
    }
    let range_len = report.range.end - report.range.start;
    report.bytes_compared = match report.mismatches.first() {
        Some(first) if !options.all => first.first_byte - report.range.start,
        _ => range_len,
    };
    report.identical =
        report.mismatches.is_empty() && !(options.strict && report.raw_size != report.test_size);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::super::verify;
    use super::*;
    use crate::driver::raw::Raw;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    fn raw(name: &str, bytes: Vec<u8>) -> Raw {
        Raw::new(Arc::new(MemStorage::new(name, bytes, false))).unwrap()
    }

    fn options(all: bool, start: u64, length: Option<u64>) -> VerifyOptions {
        VerifyOptions {
            all,
            chunk_size: 64 << 10,
            threads: 2,
            start,
            length,
            ..VerifyOptions::default()
        }
    }

    /// Verify `[0, size)` whole and as ranges of `step` bytes, merged.
    fn whole_and_split(reference: &Raw, test: &Raw, all: bool, step: u64) -> (Report, Report) {
        let whole = verify(reference, test, &options(all, 0, None), &mut |_| true).unwrap();
        let size = whole.virtual_size;
        let parts: Vec<Result<Report, Error>> = (0..size.div_ceil(step))
            .map(|i| {
                let start = i * step;
                let length = step.min(size - start);
                verify(
                    reference,
                    test,
                    &options(all, start, Some(length)),
                    &mut |_| true,
                )
            })
            .collect();
        let merged = merge_ranges(parts, &options(all, 0, None)).unwrap();
        (whole, merged)
    }

    #[test]
    fn runs_across_range_edges_merge_into_the_whole_disk_report() {
        let size = 1 << 20;
        let data: Vec<u8> = (0..size as u32).map(|i| (i % 253) as u8).collect();
        let reference = raw("raw.img", data.clone());
        let mut changed = data;
        // A run over the edge at 256 KiB, one inside a range, one at the last
        // sector of a range, and one at the first sector of the next.
        for byte in &mut changed[(256 << 10) - 1024..(256 << 10) + 1536] {
            *byte ^= 0x5a;
        }
        changed[300_000] ^= 1;
        changed[(512 << 10) - 1] ^= 1;
        changed[512 << 10] ^= 1;
        let test = raw("test.img", changed);
        for all in [true, false] {
            let (whole, merged) = whole_and_split(&reference, &test, all, 256 << 10);
            assert_eq!(merged.mismatches, whole.mismatches, "all={all}");
            assert_eq!(merged.identical, whole.identical);
            assert_eq!(merged.virtual_size, whole.virtual_size);
            assert_eq!(merged.range, 0..size as u64);
            assert_eq!(merged.bytes_compared, whole.bytes_compared);
        }
        let (whole, _) = whole_and_split(&reference, &test, true, 256 << 10);
        assert_eq!(whole.mismatches.len(), 3, "{:?}", whole.mismatches);
        assert_eq!(whole.mismatches[0].offset, (256 << 10) - 1024);
        assert_eq!(whole.mismatches[0].length, 2560);
        // Without --all the first run is whole, though it crosses a chunk edge.
        let (first, _) = whole_and_split(&reference, &test, false, 256 << 10);
        assert_eq!(first.mismatches, whole.mismatches[..1]);
    }

    #[test]
    fn the_run_cap_applies_after_the_merge() {
        let data = vec![0u8; 1 << 20];
        let reference = raw("raw.img", data.clone());
        let mut changed = data;
        for sector in (0..2048).step_by(2) {
            changed[sector * 512] = 1;
        }
        let test = raw("test.img", changed);
        let mut capped = options(true, 0, None);
        capped.max_runs = 10;
        let whole = verify(&reference, &test, &capped, &mut |_| true).unwrap();
        let parts: Vec<Result<Report, Error>> = (0..4u64)
            .map(|i| {
                let mut o = capped.clone();
                o.start = i << 18;
                o.length = Some(1 << 18);
                verify(&reference, &test, &o, &mut |_| true)
            })
            .collect();
        let merged = merge_ranges(parts, &capped).unwrap();
        assert_eq!(merged.mismatches, whole.mismatches);
        assert_eq!(merged.mismatches.len(), 10);
        assert!(merged.truncated && whole.truncated);
    }

    #[test]
    fn an_error_counts_unless_a_finding_comes_first() {
        let data = vec![3u8; 1 << 20];
        let reference = raw("raw.img", data.clone());
        let mut changed = data;
        changed[1000] = 0;
        let test = raw("test.img", changed);
        let first = verify(
            &reference,
            &test,
            &options(false, 0, Some(1 << 19)),
            &mut |_| true,
        );
        let failed = || Err(Error::InvalidArgument("reference read failed".into()));
        let merged = merge_ranges(vec![first, failed()], &options(false, 0, None)).unwrap();
        assert_eq!(merged.mismatches.len(), 1);
        let first = verify(
            &reference,
            &test,
            &options(true, 0, Some(1 << 19)),
            &mut |_| true,
        );
        assert!(merge_ranges(vec![first, failed()], &options(true, 0, None)).is_err());
        let clean = verify(
            &reference,
            &reference,
            &options(false, 0, Some(1 << 19)),
            &mut |_| true,
        );
        assert!(merge_ranges(vec![clean, failed()], &options(false, 0, None)).is_err());
    }

    #[test]
    fn ranges_that_do_not_meet_are_refused() {
        let reference = raw("raw.img", vec![0u8; 1 << 20]);
        let a = verify(
            &reference,
            &reference,
            &options(true, 0, Some(4096)),
            &mut |_| true,
        );
        let b = verify(
            &reference,
            &reference,
            &options(true, 8192, Some(4096)),
            &mut |_| true,
        );
        let err = merge_ranges(vec![a, b], &options(true, 0, None)).unwrap_err();
        assert!(err.to_string().contains("cannot merge"), "{err}");
    }

    #[test]
    fn ranges_are_checked() {
        let reference = raw("raw.img", vec![0u8; 4096 + 100]);
        let run = |start, length| {
            verify(
                &reference,
                &reference,
                &options(true, start, length),
                &mut |_| true,
            )
        };
        for (start, length, fact) in [
            (100, None, "start (0x64) is not a multiple of 512"),
            (0, Some(1000), "length (1000) is not a multiple of 512"),
            (
                4096,
                Some(4096),
                "ends past the end of the disk (4196 bytes)",
            ),
            (8192, None, "ends past the end of the disk"),
        ] {
            let err = run(start, length).unwrap_err();
            assert!(err.to_string().contains(fact), "{err}");
        }
        // A range may end where the disk does, on a partial sector.
        let tail = run(4096, Some(100)).unwrap();
        assert_eq!((tail.range, tail.bytes_compared), (4096..4196, 100));
        assert_eq!(run(512, Some(0)).unwrap().range, 512..512);
    }
}
