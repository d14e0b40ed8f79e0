//! Replays every input in fuzz/regressions/: inputs that once crashed, hung or
//! over-allocated in a fuzz target. Each must now give data or an error that
//! names the image, never a panic.

use blkverify_rs::driver::qcow2::header;
use blkverify_rs::fuzzing::{self, Outcome};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn header_regressions_give_errors_not_panics() {
    for path in inputs("header") {
        let data = std::fs::read(&path).unwrap();
        if let Err(e) = header::parse(Path::new("regression.qcow2"), &data, data.len() as u64) {
            assert!(
                e.to_string().contains("regression.qcow2"),
                "{}: {e}",
                path.display()
            );
        }
    }
}

/// Run a harness on every input of `target` and check what it produced: an
/// open error names the image, every other error says something, and no input
/// takes long.
fn replay(target: &str, harness: fn(&[u8], &str) -> Outcome) {
    let files = inputs(target);
    assert!(!files.is_empty(), "fuzz/regressions/{target} has no inputs");
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let outcome = harness(&data, "/nonexistent/regression.qcow2");
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(10),
            "{}: took {elapsed:?}",
            path.display()
        );
        if let Some(e) = outcome.open_error {
            assert!(
                e.to_string().contains("regression.qcow2"),
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
    replay("read_image", fuzzing::read_image);
}

/// The write_image target's input: a count byte, that many 8-byte operations,
/// then the image (see blkverify_rs::fuzzing::write_image).
#[test]
fn write_image_regressions_give_errors_not_panics() {
    replay("write_image", fuzzing::write_image);
}

#[test]
fn read_vhdx_regressions_give_errors_not_panics() {
    replay("read_vhdx", fuzzing::read_vhdx);
}
