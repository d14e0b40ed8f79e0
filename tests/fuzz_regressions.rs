//! Replays every input in fuzz/regressions/: inputs that once crashed, hung or
//! over-allocated in a fuzz target. Each must now give data or an error that
//! names the image, never a panic.

use blkverify_rs::driver::qcow2::{header, Qcow2};
use blkverify_rs::driver::{BlockDriver, OpenOptions};
use blkverify_rs::storage::{LimitedStorage, MemStorage};
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

/// The write_image target's input: a count byte, that many 8-byte operations,
/// then the image. The same decoding as fuzz/fuzz_targets/write_image.rs.
#[test]
fn write_image_regressions_give_errors_not_panics() {
    let files = inputs("write_image");
    assert!(
        !files.is_empty(),
        "fuzz/regressions/write_image has no inputs"
    );
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let Some((&count, rest)) = data.split_first() else {
            continue;
        };
        let ops_len = usize::from(count % 8) * 8;
        let Some((ops, image)) = (rest.len() >= ops_len).then(|| rest.split_at(ops_len)) else {
            continue;
        };
        let storage = Arc::new(LimitedStorage::new(
            MemStorage::new("/nonexistent/regression.qcow2", image.to_vec(), true),
            64 << 20,
        ));
        let mut options = OpenOptions::default();
        options.backing.follow = false;
        options.writable = true;
        let started = std::time::Instant::now();
        let qcow2 = match Qcow2::open(storage.clone(), None, &options, &[]) {
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
        let size = qcow2.size();
        let payload = vec![0x5au8; 1 << 19];
        for op in ops.chunks_exact(8) {
            if size == 0 {
                break;
            }
            let offset = u64::from(u32::from_be_bytes([op[1], op[2], op[3], op[4]])) * 512 % size;
            let len = (u64::from(u16::from_be_bytes([op[5], op[6]])) * 8 + 1).min(size - offset);
            let result = match op[0] % 6 {
                0 => qcow2.write_at(&payload[..len as usize], offset),
                1 => qcow2.write_zeroes(offset, len, false),
                2 => qcow2.write_zeroes(offset, len, true),
                3 => qcow2.discard(offset, len),
                4 => qcow2.flush(),
                _ => {
                    let mut buf = vec![0u8; len as usize];
                    qcow2.read_at(&mut buf, offset)
                }
            };
            if let Err(e) = result {
                assert!(!e.to_string().is_empty());
            }
        }
        drop(qcow2);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{}: took {:?}",
            path.display(),
            started.elapsed()
        );
    }
}
