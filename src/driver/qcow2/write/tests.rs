//! What the writer asks of its store: how often it syncs, and how it fills
//! the rest of a newly allocated cluster (never with a buffer of zeros). A
//! counting store records every request; images come from `qemu-img create`,
//! and `qemu-img check` judges the result.

use crate::driver::qcow2::Qcow2;
use crate::driver::{BlockDriver, Mapping, OpenOptions};
use crate::error::Result;
use crate::storage::{MemStorage, Storage};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// An in-memory store that records each write, zero_range and flush.
struct CountingStorage {
    inner: MemStorage,
    writes: Mutex<Vec<(u64, u64)>>,
    zero_ranges: Mutex<Vec<(u64, u64)>>,
    flushes: Mutex<usize>,
}

impl CountingStorage {
    fn reset(&self) {
        self.writes.lock().unwrap().clear();
        self.zero_ranges.lock().unwrap().clear();
        *self.flushes.lock().unwrap() = 0;
    }

    /// The writes that overlap `[start, start + len)`.
    fn writes_into(&self, start: u64, len: u64) -> Vec<(u64, u64)> {
        let writes = self.writes.lock().unwrap();
        writes
            .iter()
            .filter(|(o, l)| *o < start + len && o + l > start)
            .copied()
            .collect()
    }
}

impl Storage for CountingStorage {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writes.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.write_all_at(buf, offset)
    }
    fn punch_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_ranges.lock().unwrap().push((offset, len));
        self.inner.punch_zeroes(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_ranges.lock().unwrap().push((offset, len));
        // Zeros through the inner store, not through our write counter: this
        // stands for fallocate.
        let end = offset + len;
        if self.inner.len()? < end {
            self.inner.set_len(end)?;
        }
        self.inner.punch_zeroes(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> Result<()> {
        *self.flushes.lock().unwrap() += 1;
        self.inner.flush()
    }
}

/// A fresh qcow2 image from `qemu-img create -o opts`, opened for writing
/// through a counting store.
fn fresh_image(dir: &Path, opts: &str, size: u64) -> (Arc<CountingStorage>, Qcow2, PathBuf) {
    let path = dir.join("img.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(&path)
        .arg(size.to_string())
        .status()
        .expect("qemu-img is installed (QEMU's tools are the test oracle)");
    assert!(status.success());
    let bytes = std::fs::read(&path).unwrap();
    let store = Arc::new(CountingStorage {
        inner: MemStorage::new(&path, bytes, true),
        writes: Mutex::new(Vec::new()),
        zero_ranges: Mutex::new(Vec::new()),
        flushes: Mutex::new(0),
    });
    let image = Qcow2::open(store.clone(), None, &OpenOptions::default(), &[]).unwrap();
    assert!(!image.is_read_only());
    (store, image, path)
}

/// Close `image`, save the store to `path` and require `qemu-img check` to
/// pass (exit 0: no corruption, no leaks).
fn close_and_check(store: &CountingStorage, image: Qcow2, path: &Path) {
    drop(image);
    std::fs::write(path, store.inner.snapshot()).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn host_offset(image: &Qcow2, offset: u64) -> u64 {
    match image.map(offset, 1).unwrap().mapping {
        Mapping::Data { host_offset } => host_offset,
        other => panic!("guest offset {offset:#x} is not data: {other:?}"),
    }
}

#[test]
fn allocating_writes_sync_at_write_back_not_once_per_write() {
    // The pattern, scaled down: one small write into each of 2,000
    // fresh clusters, then one flush. Before the write-back caches this cost
    // an fdatasync per allocating write.
    let dir = tempfile::tempdir().unwrap();
    let (store, image, path) = fresh_image(dir.path(), "cluster_size=4096", 16 << 20);
    let writes = 2000u64;
    for i in 0..writes {
        image
            .write_at(&[(i % 251) as u8 | 1; 512], i * 4096)
            .unwrap();
    }
    let before_flush = *store.flushes.lock().unwrap();
    image.flush().unwrap();
    let syncs = *store.flushes.lock().unwrap();
    // Where they come from: the flush itself, which makes the new L2 tables
    // (2 MiB of guest each) durable before it writes the L1 entries that
    // name them. Nothing scales with the number of writes.
    assert!(
        syncs * 50 < writes as usize,
        "{syncs} fdatasyncs for {writes} allocating writes ({before_flush} before the flush)"
    );
    let mut back = [0u8; 512];
    for i in [0, 1, 999, 1999] {
        image.read_at(&mut back, i * 4096).unwrap();
        assert_eq!(back, [(i % 251) as u8 | 1; 512], "write {i}");
    }
    close_and_check(&store, image, &path);
}

#[test]
fn new_l2_tables_are_named_at_the_flush_after_one_sync() {
    // A sequential writer across 8 new L2 tables (4 KiB clusters: 2 MiB of
    // guest each). QEMU's l2_allocate syncs before each new table's L1
    // entry; here no sync comes before the flush, the entries stay 0 on
    // disk until then (a crash reads the range as before), and the flush
    // writes them in one request, after the sync that makes the (empty)
    // tables, their refcounts and the data durable, and before the tables'
    // entries. (One-bit refcounts: the first refcount block
    // covers 128 MiB, so no new block, which is synced for, comes between.)
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    let (store, image, path) = fresh_image(dir.path(), "cluster_size=4096,refcount_bits=1", size);
    let l1_offset = image.l1_offset;
    let on_disk_l1 = |store: &CountingStorage| {
        let mut bytes = [0u8; 64];
        store.inner.read_exact_at(&mut bytes, l1_offset).unwrap();
        bytes
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect::<Vec<u64>>()
    };
    store.reset();
    let chunk = 64u64 << 10;
    for i in 0..size / chunk {
        image
            .write_at(&vec![(i % 251) as u8 | 1; chunk as usize], i * chunk)
            .unwrap();
    }
    assert_eq!(*store.flushes.lock().unwrap(), 0, "syncs before the flush");
    assert_eq!(
        on_disk_l1(&store),
        vec![0; 8],
        "L1 entries before the flush"
    );
    // Reads go through the tables in memory meanwhile.
    let mut back = vec![0u8; chunk as usize];
    image.read_at(&mut back, size - chunk).unwrap();
    assert_eq!(
        back,
        vec![((size / chunk - 1) % 251) as u8 | 1; chunk as usize]
    );
    store.reset();
    image.flush().unwrap();
    assert_eq!(
        *store.flushes.lock().unwrap(),
        2,
        "one sync before the L1 entries, one after"
    );
    assert_eq!(store.writes_into(l1_offset, 64), vec![(l1_offset, 64)]);
    let l1 = on_disk_l1(&store);
    assert!(l1.iter().all(|e| *e != 0), "L1 after the flush: {l1:x?}");
    close_and_check(&store, image, &path);
}

#[test]
fn overwrites_never_sync_before_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (store, image, path) = fresh_image(dir.path(), "cluster_size=65536", 64 << 20);
    for i in 0..200u64 {
        image.write_at(&[1; 4096], i * 65536).unwrap();
    }
    image.flush().unwrap();
    store.reset();
    for i in 0..200u64 {
        image.write_at(&[2; 4096], i * 65536 + 4096).unwrap();
    }
    assert_eq!(*store.flushes.lock().unwrap(), 0);
    image.flush().unwrap();
    assert_eq!(*store.flushes.lock().unwrap(), 1);
    close_and_check(&store, image, &path);
}

#[test]
fn a_write_into_a_fresh_cluster_writes_only_the_guest_bytes() {
    // The cluster lies past the file's old end, so it reads as zeros: no
    // zero-filled copy-on-write buffer, no zeroing.
    let dir = tempfile::tempdir().unwrap();
    let (store, image, path) = fresh_image(dir.path(), "cluster_size=65536", 1 << 20);
    image.write_at(&[0x33; 4096], 65536 + 8192).unwrap();
    let host = host_offset(&image, 65536);
    assert_eq!(store.writes_into(host, 65536), vec![(host + 8192, 4096)]);
    assert!(store.zero_ranges.lock().unwrap().is_empty());
    let mut cluster = vec![0u8; 65536];
    image.read_at(&mut cluster, 65536).unwrap();
    assert!(cluster[..8192].iter().all(|b| *b == 0));
    assert!(cluster[8192..12288].iter().all(|b| *b == 0x33));
    assert!(cluster[12288..].iter().all(|b| *b == 0));
    close_and_check(&store, image, &path);
}

/// `[from, to)` of the host cluster at `host` was zeroed by zero_range calls
/// and the guest bytes `[a, b)` were written once, with no other write.
fn assert_zeroed_around(store: &CountingStorage, host: u64, a: u64, b: u64, cluster: u64) {
    assert_eq!(store.writes_into(host, cluster), vec![(host + a, b - a)]);
    let mut zeroed: Vec<(u64, u64)> = store
        .zero_ranges
        .lock()
        .unwrap()
        .iter()
        .filter(|(o, l)| *o < host + cluster && o + l > host)
        .copied()
        .collect();
    zeroed.sort_unstable();
    assert_eq!(zeroed, vec![(host, a), (host + b, cluster - b)]);
}

#[test]
fn a_write_into_a_zero_allocated_cluster_zeroes_the_rest_with_fallocate() {
    let dir = tempfile::tempdir().unwrap();
    let (store, image, path) = fresh_image(dir.path(), "cluster_size=65536", 1 << 20);
    image.write_at(&[0x11; 65536], 0).unwrap();
    let host = host_offset(&image, 0);
    // Without unmap the cluster stays allocated, with the zero flag: its
    // host bytes are stale.
    image.write_zeroes(0, 65536, false).unwrap();
    image.flush().unwrap();
    store.reset();
    image.write_at(&[0x22; 4096], 8192).unwrap();
    assert_eq!(
        host_offset(&image, 0),
        host,
        "the zero cluster's host cluster is reused"
    );
    assert_zeroed_around(&store, host, 8192, 12288, 65536);
    let mut cluster = vec![0u8; 65536];
    image.read_at(&mut cluster, 0).unwrap();
    assert!(cluster[..8192].iter().all(|b| *b == 0));
    assert!(cluster[8192..12288].iter().all(|b| *b == 0x22));
    assert!(cluster[12288..].iter().all(|b| *b == 0));
    close_and_check(&store, image, &path);
}

#[test]
fn a_write_into_a_reused_freed_cluster_zeroes_the_rest_with_fallocate() {
    let dir = tempfile::tempdir().unwrap();
    let (store, image, path) = fresh_image(dir.path(), "cluster_size=65536", 1 << 20);
    image.write_at(&[0x11; 65536], 0).unwrap();
    let host = host_offset(&image, 0);
    image.discard(0, 65536).unwrap();
    // Once the discard is on disk, its cluster may be reused.
    image.flush().unwrap();
    store.reset();
    image.write_at(&[0x22; 4096], 3 * 65536 + 4096).unwrap();
    assert_eq!(
        host_offset(&image, 3 * 65536),
        host,
        "the freed host cluster is reused"
    );
    assert_zeroed_around(&store, host, 4096, 8192, 65536);
    let mut cluster = vec![0u8; 65536];
    image.read_at(&mut cluster, 3 * 65536).unwrap();
    assert!(cluster[..4096].iter().all(|b| *b == 0));
    assert!(cluster[4096..8192].iter().all(|b| *b == 0x22));
    assert!(cluster[8192..].iter().all(|b| *b == 0));
    close_and_check(&store, image, &path);
}
