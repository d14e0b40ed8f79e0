//! Crash test for the writer: a store that logs every write and flush, and a
//! replay that cuts the log at a chosen point the way a power failure would.
//!
//! Model of a crash at event N: everything before the last flush that precedes
//! N is on disk; of the writes between that flush and N, a seeded random subset
//! reached the disk (the OS may reorder unflushed writes), each whole. The
//! replayed image must open, every guest sector must read as it was in one of
//! the guest states the interrupted operations passed through (old or new),
//! and `qemu-img check` must find no corruption (exit status 0, or 3 for leaks
//! only). Then our writable open (which rebuilds refcounts of a dirty image)
//! must leave an image `qemu-img check` passes outright apart from leaks.

use super::Qcow2;
use crate::driver::{self, BlockDriver, OpenOptions};
use crate::error::Result;
use crate::storage::Storage;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
enum Event {
    Op(usize),
    Write(u64, Vec<u8>),
    SetLen(u64),
    Flush,
}

struct LogStorage {
    path: PathBuf,
    bytes: Mutex<Vec<u8>>,
    log: Mutex<Vec<Event>>,
}

impl LogStorage {
    fn push(&self, e: Event) {
        self.log.lock().unwrap().push(e);
    }
}

impl Storage for LogStorage {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> Result<u64> {
        Ok(self.bytes.lock().unwrap().len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bytes = self.bytes.lock().unwrap();
        let start = offset as usize;
        match bytes.get(start..start + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(crate::error::Error::io(
                &self.path,
                "read",
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            )),
        }
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        apply_write(&mut self.bytes.lock().unwrap(), offset, buf);
        self.push(Event::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn punch_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        self.write_all_at(&zeros, offset)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.bytes.lock().unwrap().resize(len as usize, 0);
        self.push(Event::SetLen(len));
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.push(Event::Flush);
        Ok(())
    }
}

fn apply_write(bytes: &mut Vec<u8>, offset: u64, buf: &[u8]) {
    let end = offset as usize + buf.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset as usize..end].copy_from_slice(buf);
}

/// xorshift64*: a seeded generator, so a failing seed reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn qemu_img_check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img is installed (QEMU's tools are the test oracle)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn run_crash_test(name: &str, create_opts: &str, size: u64, ops: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", create_opts])
        .arg(&base)
        .arg(size.to_string())
        .status()
        .expect("qemu-img is installed");
    assert!(status.success());
    let initial = std::fs::read(&base).unwrap();
    let store = Arc::new(LogStorage {
        path: base.clone(),
        bytes: Mutex::new(initial.clone()),
        log: Mutex::new(Vec::new()),
    });
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut states: Vec<Vec<u8>> = vec![vec![0u8; size as usize]];
    {
        let image = Qcow2::open(store.clone(), None, &OpenOptions::default(), &[]).unwrap();
        assert!(!image.is_read_only());
        let cluster = image.header.cluster_size();
        for op in 0..ops {
            store.push(Event::Op(op));
            let mut model = states.last().unwrap().clone();
            let len = 1 + rng.below(3 * cluster.max(8192));
            let len = len.min(size);
            let offset = rng.below(size - len + 1);
            match rng.below(10) {
                0..=5 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                    image.write_at(&data, offset).unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                6..=7 => {
                    image.write_zeroes(offset, len, rng.below(2) == 0).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                _ => {
                    image.discard(offset, len).unwrap();
                    let start = offset.div_ceil(cluster) * cluster;
                    let end = if offset + len == size {
                        size
                    } else {
                        (offset + len) / cluster * cluster
                    };
                    if start < end {
                        model[start as usize..end as usize].fill(0);
                    }
                }
            }
            states.push(model);
        }
        store.push(Event::Op(ops));
    }
    let log = store.log.lock().unwrap().clone();
    // Crash points: a seeded sample, plus the events right around every flush.
    let mut points: Vec<usize> = (0..80)
        .map(|_| rng.below(log.len() as u64 + 1) as usize)
        .collect();
    for (i, e) in log.iter().enumerate() {
        if matches!(e, Event::Flush) && rng.below(4) == 0 {
            points.extend([i, i + 1, (i + 2).min(log.len())]);
        }
    }
    points.sort_unstable();
    points.dedup();
    let crashed = dir.path().join("crashed.qcow2");
    for &n in &points {
        let context = format!("{name}: seed {seed}, crash at event {n} of {}", log.len());
        let last_flush = log[..n].iter().rposition(|e| matches!(e, Event::Flush));
        let mut bytes = initial.clone();
        let mut op_at_flush = 0usize;
        let mut op_at_crash = 0usize;
        for (i, e) in log[..n].iter().enumerate() {
            let durable = last_flush.is_some_and(|f| i < f);
            match e {
                Event::Op(k) => {
                    op_at_crash = *k;
                    if durable {
                        op_at_flush = *k;
                    }
                }
                Event::Write(offset, buf) if durable || rng.below(2) == 0 => {
                    apply_write(&mut bytes, *offset, buf)
                }
                Event::SetLen(len) if durable || rng.below(2) == 0 => {
                    bytes.resize(*len as usize, 0)
                }
                _ => {}
            }
        }
        std::fs::write(&crashed, &bytes).unwrap();
        // Acceptable per sector: any state from before the op in progress at the
        // last flush to after the op in progress at the crash.
        let acceptable = &states[op_at_flush..=(op_at_crash + 1).min(states.len() - 1)];
        let image = driver::open(&crashed, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{context}: the image does not open: {e}"));
        let mut guest = vec![0u8; size as usize];
        image
            .read_at(&mut guest, 0)
            .unwrap_or_else(|e| panic!("{context}: read failed: {e}"));
        drop(image);
        for (s, sector) in guest.chunks(512).enumerate() {
            let at = s * 512..s * 512 + sector.len();
            assert!(
                acceptable.iter().any(|st| &st[at.clone()] == sector),
                "{context}: sector {s} reads neither old nor new data (ops {op_at_flush}..={op_at_crash})"
            );
        }
        let (code, out) = qemu_img_check(&crashed);
        assert!(
            code == 0 || code == 3,
            "{context}: qemu-img check found corruption (exit {code}):\n{out}"
        );
        // Our writable open (with a refcount rebuild if the image is dirty) and
        // one more write must keep it sound.
        let writable = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let image = driver::open(&crashed, &writable)
            .unwrap_or_else(|e| panic!("{context}: writable open failed: {e}"));
        image.write_at(&[0xee; 1000], size / 2).unwrap();
        drop(image);
        let (code, out) = qemu_img_check(&crashed);
        assert!(
            code == 0 || code == 3,
            "{context}: after reopening for writing, qemu-img check found corruption (exit {code}):\n{out}"
        );
    }
}

#[test]
fn crash_at_any_point_small_clusters_wide_refcounts() {
    // 512 B clusters with 64-bit refcounts: a refcount block covers 64
    // clusters, so writes keep adding blocks and growing the refcount table.
    run_crash_test(
        "c512-rc64",
        "cluster_size=512,refcount_bits=64",
        2 << 20,
        40,
        1,
    );
}

#[test]
fn crash_at_any_point_extended_l2_lazy_refcounts() {
    run_crash_test(
        "extl2-lazy",
        "cluster_size=16384,extended_l2=on,lazy_refcounts=on",
        2 << 20,
        40,
        2,
    );
}

#[test]
fn crash_at_any_point_v2() {
    run_crash_test("v2-4k", "cluster_size=4096,compat=0.10", 2 << 20, 40, 3);
}

/// A full disk: the store refuses to grow past `limit` bytes (ENOSPC) while
/// random writes run. The failing request must report ENOSPC; every earlier
/// request must read back; the failed one reads old or new per sector; and
/// `qemu-img check` finds no corruption (leaks allowed), before and after our
/// next writable open.
fn run_enospc_test(name: &str, create_opts: &str, size: u64, seed: u64) {
    use crate::storage::{LimitedStorage, MemStorage};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", create_opts])
        .arg(&base)
        .arg(size.to_string())
        .status()
        .expect("qemu-img is installed");
    assert!(status.success());
    let initial = std::fs::read(&base).unwrap();
    let full = dir.path().join("full.qcow2");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut failures = 0;
    for step in 0..24u64 {
        let limit = initial.len() as u64 + step * 3001 + rng.below(4096);
        let context = format!("{name}: seed {seed}, store full at {limit} bytes");
        let store = Arc::new(LimitedStorage::new(
            MemStorage::new(&full, initial.clone(), true),
            limit,
        ));
        let mut old = vec![0u8; size as usize];
        let mut new = old.clone();
        {
            let image = Qcow2::open(store.clone(), None, &OpenOptions::default(), &[]).unwrap();
            let cluster = image.header.cluster_size();
            for _ in 0..200 {
                let len = (1 + rng.below(3 * cluster)).min(size);
                let offset = rng.below(size - len + 1);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                new[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                match image.write_at(&data, offset) {
                    Ok(()) => old.clone_from(&new),
                    Err(e) => {
                        assert_eq!(e.errno(), libc::ENOSPC, "{context}: {e}");
                        assert!(e.to_string().contains("full.qcow2"), "{context}: {e}");
                        failures += 1;
                        break;
                    }
                }
            }
        }
        std::fs::write(&full, store.inner().snapshot()).unwrap();
        let image = driver::open(&full, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{context}: the image does not open: {e}"));
        let mut guest = vec![0u8; size as usize];
        image
            .read_at(&mut guest, 0)
            .unwrap_or_else(|e| panic!("{context}: read failed: {e}"));
        drop(image);
        for (s, sector) in guest.chunks(512).enumerate() {
            let at = s * 512..s * 512 + sector.len();
            assert!(
                sector == &old[at.clone()] || sector == &new[at],
                "{context}: sector {s} reads neither old nor new data"
            );
        }
        let (code, out) = qemu_img_check(&full);
        assert!(
            code == 0 || code == 3,
            "{context}: qemu-img check found corruption (exit {code}):\n{out}"
        );
        let writable = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let image = driver::open(&full, &writable)
            .unwrap_or_else(|e| panic!("{context}: writable open failed: {e}"));
        image.write_at(&[0xee; 1000], size / 2).unwrap();
        drop(image);
        let (code, out) = qemu_img_check(&full);
        assert!(
            code == 0 || code == 3,
            "{context}: after reopening for writing, qemu-img check found corruption (exit {code}):\n{out}"
        );
    }
    assert!(
        failures >= 20,
        "{name}: only {failures} runs filled the store"
    );
}

#[test]
fn enospc_leaves_a_consistent_image() {
    run_enospc_test("enospc-4k", "cluster_size=4096", 2 << 20, 4);
}

#[test]
fn enospc_leaves_a_consistent_image_with_lazy_refcounts_and_small_clusters() {
    run_enospc_test(
        "enospc-c512-lazy",
        "cluster_size=512,refcount_bits=64,lazy_refcounts=on",
        1 << 20,
        5,
    );
}
