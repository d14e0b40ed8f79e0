//! Replays every input in fuzz/regressions/: inputs that once crashed, hung or
//! over-allocated in a fuzz target. Each must now give data or an error that
//! names the image, never a panic.

use blkverify_rs::driver::qcow2::{header, Qcow2};
use blkverify_rs::driver::{BlockDriver, OpenOptions};
use blkverify_rs::storage::MemStorage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

#[test]
fn read_image_regressions_give_errors_not_panics() {
    let files = inputs("read_image");
    assert!(
        !files.is_empty(),
        "fuzz/regressions/read_image has no inputs"
    );
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let storage = Arc::new(MemStorage::new(
            "/nonexistent/regression.qcow2",
            data,
            false,
        ));
        let mut options = OpenOptions::default();
        options.backing.follow = false;
        let image = match Qcow2::open(storage, None, &options, &[]) {
            Ok(image) => image,
            Err(e) => {
                assert!(
                    e.to_string().contains("regression.qcow2"),
                    "{}: {e}",
                    path.display()
                );
                continue;
            }
        };
        let size = image.size();
        let mut buf = vec![0u8; 1 << 16];
        for probe in [0u64, 512, 65536, size / 2, size.saturating_sub(4096)] {
            if probe < size {
                let n = (size - probe).min(buf.len() as u64) as usize;
                if let Err(e) = image.read_at(&mut buf[..n], probe) {
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
