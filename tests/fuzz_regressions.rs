//! Replays every input in fuzz/regressions/: inputs that once crashed, hung or
//! over-allocated in a fuzz target. Each must now give data or an error that
//! names the image, never a panic.

use blkverify_rs::fuzzing::{self, Outcome};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every input of `target`, sorted. A missing or empty directory fails: a
/// replay that reads nothing would pass having checked nothing.
fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz/regressions/{target} cannot be read: {e}"));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    assert!(!files.is_empty(), "fuzz/regressions/{target} has no inputs");
    files.sort();
    files
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// Header inputs named `valid-*` (qemu-img's images) must parse; `bad-*`
/// (one area damaged) must be refused naming the image; any other input (a
/// fuzzer's find) may do either, but never panic.
#[test]
fn header_regressions_give_errors_not_panics() {
    let (mut valid, mut bad) = (0, 0);
    for path in inputs("header") {
        let data = std::fs::read(&path).unwrap();
        let name = file_name(&path);
        let outcome = fuzzing::header(&data, "regression.qcow2");
        match outcome.open_error {
            Some(e) => {
                assert!(
                    !name.starts_with("valid-"),
                    "{}: a valid header is refused: {e}",
                    path.display()
                );
                assert!(
                    e.to_string().contains("regression.qcow2"),
                    "{}: {e}",
                    path.display()
                );
                bad += 1;
            }
            None => {
                assert!(
                    !name.starts_with("bad-"),
                    "{}: a damaged header is accepted",
                    path.display()
                );
                valid += 1;
            }
        }
    }
    assert!(
        valid > 0 && bad > 0,
        "{valid} headers parsed, {bad} refused"
    );
}

/// Block digests files named `valid-*` (written by `blkverify digest`) must
/// parse; `bad-*` (one field damaged, most with the checksum redone so the
/// damage is what is found) must be refused naming the file.
#[test]
fn digests_file_regressions_give_errors_not_panics() {
    let (mut valid, mut bad) = (0, 0);
    for path in inputs("digests_file") {
        let data = std::fs::read(&path).unwrap();
        let name = file_name(&path);
        match fuzzing::digests_file(&data, "regression.digests").open_error {
            Some(e) => {
                assert!(
                    !name.starts_with("valid-"),
                    "{}: a valid file is refused: {e}",
                    path.display()
                );
                assert!(
                    e.to_string().contains("regression.digests"),
                    "{}: {e}",
                    path.display()
                );
                bad += 1;
            }
            None => {
                assert!(
                    !name.starts_with("bad-"),
                    "{}: a damaged file is accepted",
                    path.display()
                );
                valid += 1;
            }
        }
    }
    assert!(valid > 0 && bad > 0, "{valid} files parsed, {bad} refused");
}

/// Trace inputs named `valid-*` (recorded by serve, some cut short) must parse,
/// the cut ones saying where they end; `bad-*` (one record damaged) must be
/// refused naming the file and, for the seeds, the fact; any other input may
/// do either, but never panic.
#[test]
fn trace_file_regressions_give_errors_not_panics() {
    let facts = [
        ("bad-magic", "bad magic"),
        ("bad-version", "trace version 9 is not supported"),
        ("bad-truncated-header", "truncated header: 6 bytes"),
        ("bad-torn-header-record", "truncated in its header record"),
        ("bad-checksum", "checksum mismatch"),
        ("bad-absurd-length", "is absurd"),
        ("bad-zero-length", "length 0 is absurd"),
        ("bad-record-type", "unknown record type 9"),
        ("bad-second-header", "a second header record"),
        ("bad-block-size", "block size 512 is not 4096"),
        ("bad-command", "command 2 with flags"),
        ("bad-flags", "with flags 0x80"),
        ("bad-past-the-export", "ends past the export"),
        (
            "bad-numbers-do-not-grow",
            "does not follow the one before it",
        ),
        ("bad-flush-with-range", "a flush with a range"),
        ("bad-record-after-end", "a record after the end record"),
        ("bad-end-miscounts", "the end record counts"),
        (
            "bad-data-after-a-read",
            "data after a request that carries none",
        ),
        ("bad-write-without-data", "a write without its data"),
        ("bad-data-encoding", "data encoding 7"),
        (
            "bad-repeat-of-an-unknown-block",
            "which no earlier record stored",
        ),
        ("bad-short-data", "short"),
        ("bad-long-data", "the write's data are long"),
    ];
    let (mut valid, mut bad) = (0, 0);
    for path in inputs("trace_file") {
        let data = std::fs::read(&path).unwrap();
        let name = file_name(&path);
        match fuzzing::trace_file(&data, "regression.bvt").open_error {
            Some(e) => {
                let text = e.to_string();
                assert!(
                    !name.starts_with("valid-"),
                    "{}: a valid trace is refused: {text}",
                    path.display()
                );
                assert!(
                    text.starts_with("regression.bvt: "),
                    "{}: {text}",
                    path.display()
                );
                if let Some((_, fact)) = facts.iter().find(|(seed, _)| *seed == name) {
                    assert!(text.contains(fact), "{}: {text}", path.display());
                }
                bad += 1;
            }
            None => {
                assert!(
                    !name.starts_with("bad-"),
                    "{}: a damaged trace is accepted",
                    path.display()
                );
                valid += 1;
            }
        }
    }
    for cut in ["valid-cut", "valid-no-end", "valid-zero-tail"] {
        let data = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/regressions/trace_file")
                .join(cut),
        )
        .unwrap();
        let trace = blkverify_rs::record::trace::parse_trace("cut.bvt", &data).unwrap();
        assert!(trace.ending().is_some(), "{cut} reads as whole");
    }
    assert!(
        valid >= 5 && bad >= facts.len(),
        "{valid} traces parsed, {bad} refused"
    );
}

/// Every entry decodes or is refused with a message that shows the entry (or
/// its bitmap) it refuses.
#[test]
fn l2_entry_regressions_give_errors_not_panics() {
    let mut refused = 0;
    for path in inputs("l2_entry") {
        let data = std::fs::read(&path).unwrap();
        let mut input = [0u8; fuzzing::L2_ENTRY_INPUT_BYTES];
        for (dst, src) in input.iter_mut().zip(&data) {
            *dst = *src;
        }
        let entry = format!(
            "{:#018x}",
            u64::from_be_bytes(input[..8].try_into().unwrap())
        );
        let bitmap = format!(
            "{:#018x}",
            u64::from_be_bytes(input[8..16].try_into().unwrap())
        );
        for e in fuzzing::l2_entry(&data) {
            assert!(
                e.contains(&entry) || e.contains(&bitmap),
                "{}: the message does not show the entry {entry}: {e}",
                path.display()
            );
            refused += 1;
        }
    }
    assert!(refused > 0, "no l2_entry input was refused");
}

/// Run a harness on every input of `target` and check what it produced: an
/// open error names the image (`name`, or for a vmdk descriptor a file it
/// names beside it), every other error says something, and no input takes long.
fn replay(target: &str, harness: fn(&[u8], &str) -> Outcome, name: &str) {
    for path in inputs(target) {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = harness(&data, &format!("/nonexistent/{name}"));
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(10),
            "{}: took {elapsed:?}",
            path.display()
        );
        if let Some(e) = outcome.open_error {
            assert!(
                e.to_string().contains(if name.ends_with(".vmdk") {
                    "/nonexistent/"
                } else {
                    name
                }),
                "{}: {e}",
                path.display()
            );
        }
        for e in outcome.op_errors {
            assert!(!e.to_string().is_empty(), "{}", path.display());
        }
    }
}

#[test]
fn read_image_regressions_give_errors_not_panics() {
    replay("read_image", fuzzing::read_image, "regression.qcow2");
}

/// The write_image target's input: a count byte, that many 8-byte operations,
/// then the image (see blkverify_rs::fuzzing::write_image).
#[test]
fn write_image_regressions_give_errors_not_panics() {
    replay("write_image", fuzzing::write_image, "regression.qcow2");
}

#[test]
fn read_vmdk_regressions_give_errors_not_panics() {
    replay("read_vmdk", fuzzing::read_vmdk, "regression.vmdk");
}

#[test]
fn vpc_image_regressions_give_errors_not_panics() {
    replay("vpc_image", fuzzing::read_vpc, "regression.vhd");
}

#[test]
fn vdi_image_regressions_give_errors_not_panics() {
    replay("vdi_image", fuzzing::read_vdi, "regression.vdi");
}

#[test]
fn read_vhdx_regressions_give_errors_not_panics() {
    replay("read_vhdx", fuzzing::read_vhdx, "regression.vhdx");
}

/// Every error of an NBD client harness run names the export, and says
/// something after it.
fn nbd_errors_name_the_export(path: &Path, outcome: &Outcome) {
    for e in outcome.open_error.iter().chain(&outcome.op_errors) {
        let text = e.to_string();
        assert!(
            text.contains(fuzzing::NBD_FUZZ_NAME) && text.contains("nbd: "),
            "{}: {text}",
            path.display()
        );
    }
}

/// The server's whole connections: the `seed-*` inputs are what real
/// clients (qemu-io, qemu-img, nbdinfo, nbdcopy) sent to serve, recorded by
/// examples/record_nbd_seeds.rs; they must be served without a refusal. Every
/// input ends in time, without a server error, with the two sides alike
/// (the harness checks that).
#[test]
fn serve_connection_regressions_are_served_or_refused_never_a_panic() {
    let mut seeds = 0;
    for path in inputs("serve_connection") {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = fuzzing::serve_connection(&data);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}: took {:?}",
            path.display(),
            started.elapsed()
        );
        assert!(
            outcome.error.is_none(),
            "{}: {:?}",
            path.display(),
            outcome.error
        );
        let summary = outcome.summary.expect("a summary");
        if file_name(&path).starts_with("seed-") {
            assert!(summary.requests > 0, "{}: {summary:?}", path.display());
            assert_eq!(summary.refused, 0, "{}: {summary:?}", path.display());
            assert!(outcome.replied > 0);
            seeds += 1;
        }
    }
    assert!(seeds >= 3, "{seeds} recorded client sessions");
}

/// Our NBD client against whole server transcripts: the `seed-*` inputs are
/// what real servers (qemu-nbd, nbdkit, serve) answered to this very
/// session, recorded by examples/record_nbd_seeds.rs; replayed, every request of the
/// session succeeds. Any other input gives errors that name the export.
#[test]
fn nbd_handshake_regressions_give_errors_not_panics() {
    let mut seeds = 0;
    for path in inputs("nbd_handshake") {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = fuzzing::nbd_client(&data);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            path.display()
        );
        nbd_errors_name_the_export(&path, &outcome);
        if file_name(&path).starts_with("seed-") {
            assert!(
                outcome.open_error.is_none(),
                "{}: {:?}",
                path.display(),
                outcome.open_error
            );
            assert!(
                outcome.op_errors.is_empty(),
                "{}: {:?}",
                path.display(),
                outcome.op_errors
            );
            seeds += 1;
        }
    }
    assert!(seeds >= 2, "{seeds} recorded server sessions");
}

/// The reply stream alone, after a handshake the harness makes: the
/// `seed-*` inputs are real servers' replies to the session (the handshake
/// cut off, its terms in the prefix), and succeed; the `bad-*` ones (a read
/// answered without all its data, chunks that overlap or lie outside the
/// request, a reply to a cookie never sent, a status chunk for a read) fail
/// the first request; any other gives errors that name the export.
#[test]
fn nbd_replies_regressions_give_errors_not_panics() {
    let mut seeds = 0;
    let mut bad = 0;
    for path in inputs("nbd_replies") {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = fuzzing::nbd_replies(&data);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            path.display()
        );
        nbd_errors_name_the_export(&path, &outcome);
        if file_name(&path).starts_with("seed-") {
            assert!(
                outcome.open_error.is_none(),
                "{}: {:?}",
                path.display(),
                outcome.open_error
            );
            assert!(
                outcome.op_errors.is_empty(),
                "{}: {:?}",
                path.display(),
                outcome.op_errors
            );
            seeds += 1;
        }
        if file_name(&path).starts_with("bad-") {
            // The first request (a 4 KiB read at 0) is the one refused.
            let first = outcome.op_errors.first().map(ToString::to_string);
            assert!(
                first
                    .as_deref()
                    .is_some_and(|e| e.contains("read at offset 0x0")),
                "{}: {first:?}",
                path.display()
            );
            bad += 1;
        }
    }
    assert!(
        seeds >= 1 && bad >= 6,
        "{seeds} recorded reply streams, {bad} bad ones"
    );
}
