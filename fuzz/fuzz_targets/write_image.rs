//! The qcow2 write path on a hostile image in memory: open it writable, apply
//! a few writes, zero writes, discards and flushes the input chooses, close it,
//! and read it back. Any input gives data or an error, never a panic, a hang
//! or an unbounded allocation. The store is capped (ENOSPC past 64 MiB), so a
//! hostile offset cannot make the image itself grow without bound.
#![no_main]
use blkverify_rs::driver::qcow2::Qcow2;
use blkverify_rs::driver::{BlockDriver, OpenOptions};
use blkverify_rs::storage::{LimitedStorage, MemStorage};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

const OP_BYTES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let ops_len = usize::from(count % 8) * OP_BYTES;
    if rest.len() < ops_len {
        return;
    }
    let (ops, image) = rest.split_at(ops_len);
    let storage = Arc::new(LimitedStorage::new(
        MemStorage::new("/nonexistent/fuzz.qcow2", image.to_vec(), true),
        64 << 20,
    ));
    let mut options = OpenOptions::default();
    options.backing.follow = false;
    options.writable = true;
    let Ok(qcow2) = Qcow2::open(storage.clone(), None, &options, &[]) else {
        return;
    };
    let size = qcow2.size();
    if size == 0 {
        return;
    }
    let payload = vec![0x5au8; 1 << 19];
    for op in ops.chunks_exact(OP_BYTES) {
        let offset = u64::from(u32::from_be_bytes([op[1], op[2], op[3], op[4]])) * 512 % size;
        let len = (u64::from(u16::from_be_bytes([op[5], op[6]])) * 8 + 1).min(size - offset);
        let _ = match op[0] % 6 {
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
    }
    drop(qcow2);
    let after = storage.inner().snapshot();
    let reread = Arc::new(MemStorage::new("/nonexistent/fuzz.qcow2", after, false));
    options.writable = false;
    if let Ok(image) = Qcow2::open(reread, None, &options, &[]) {
        let mut buf = vec![0u8; 4096];
        let n = image.size().min(4096) as usize;
        let _ = image.read_at(&mut buf[..n], 0);
    }
});
