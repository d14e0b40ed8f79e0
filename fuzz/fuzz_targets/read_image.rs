//! A whole-image open and read from memory: open, map and read the first
//! guest bytes and a few scattered ranges. Any input gives data or an error,
//! never a panic, a hang or an unbounded allocation.
#![no_main]
use blkverify_rs::driver::qcow2::Qcow2;
use blkverify_rs::driver::{BlockDriver, OpenOptions};
use blkverify_rs::storage::MemStorage;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::new("/nonexistent/fuzz.qcow2", data.to_vec(), false));
    let mut options = OpenOptions::default();
    options.backing.follow = false;
    let Ok(image) = Qcow2::open(storage, None, &options, &[]) else {
        return;
    };
    let size = image.size();
    let mut buf = vec![0u8; 1 << 16];
    let mut offset = 0u64;
    let mut extents = 0;
    while offset < size.min(8 << 20) && extents < 512 {
        match image.map(offset, size - offset) {
            Ok(e) => offset += e.length.max(1),
            Err(_) => offset += 512,
        }
        extents += 1;
    }
    for probe in [0u64, 512, 65536, size / 2, size.saturating_sub(4096)] {
        if probe < size {
            let n = (size - probe).min(buf.len() as u64) as usize;
            let _ = image.read_at(&mut buf[..n], probe);
            let _ = image.locate(probe);
        }
    }
});
