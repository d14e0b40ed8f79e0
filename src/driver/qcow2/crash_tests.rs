//! Crash test for the writer: a store that logs every write and flush, and a
//! replay that cuts the log at a chosen point the way a power failure would.
//!
//! Model of a crash at event N: everything before the last storage flush
//! (fdatasync) that precedes N is on disk; of the writes between that flush
//! and N, each 512-byte sector holds a seeded random version from its own
//! history (the OS may write unflushed pages back in any order, and a write
//! may land in part; see `crash_tail`). Every crash point is checked for the
//! guest's contents; a sample also gets `qemu-img check`. The contract
//! checked is QEMU's:
//! - the replayed image opens, and every write completed before the last
//!   guest flush (or the close) that completed before the crash reads back;
//!   every later write reads, per sector, as its old data or its new (any
//!   guest state the ops after that flush passed through);
//! - `qemu-img check` finds no corruption (exit status 0, or 3 for leaks
//!   only); an image left dirty (lazy refcounts) may have refcount errors,
//!   and must be clean after `qemu-img check -r all`;
//! - our writable open (which rebuilds refcounts of a dirty image) and one
//!   more write leave an image `qemu-img check` passes apart from leaks.

use super::Qcow2;
use crate::driver::{self, BlockDriver, OpenOptions};
use crate::error::Result;
use crate::storage::{MemStorage, Storage};
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

/// The file after a crash that cut `tail` (the events since the last
/// storage flush) short, starting from the flushed file `flushed`. Each
/// 512-byte sector lands as some version from its own history: the writes to
/// it up to a point chosen at random for that sector, so writes to different
/// sectors land in any order and a write may land in part. A later write to a
/// sector never lands without the earlier ones: the page cache merges writes
/// to one page, and writes the merged page back. Length changes land up to a
/// random point too; a sector that lands past the end extends the file.
fn crash_tail(flushed: &[u8], tail: &[Event], rng: &mut Rng) -> Vec<u8> {
    use std::collections::{BTreeMap, HashMap};
    let sectors = |offset: u64, len: usize| offset / 512..(offset + len as u64).div_ceil(512);
    // How many of each sector's writes land: any number from none to all,
    // each as likely.
    let mut history: BTreeMap<u64, u64> = BTreeMap::new();
    for e in tail {
        if let Event::Write(offset, buf) = e {
            for sector in sectors(*offset, buf.len()) {
                *history.entry(sector).or_default() += 1;
            }
        }
    }
    let mut landing: HashMap<u64, u64> = history
        .into_iter()
        .map(|(sector, writes)| (sector, rng.below(writes + 1)))
        .collect();
    let set_lens = tail
        .iter()
        .filter(|e| matches!(e, Event::SetLen(_)))
        .count();
    let mut set_lens_landing = rng.below(set_lens as u64 + 1);
    let mut bytes = flushed.to_vec();
    for e in tail {
        match e {
            Event::Write(offset, buf) => {
                for sector in sectors(*offset, buf.len()) {
                    let Some(left) = landing.get_mut(&sector).filter(|n| **n > 0) else {
                        continue;
                    };
                    *left -= 1;
                    let from = (sector * 512).max(*offset);
                    let to = ((sector + 1) * 512).min(offset + buf.len() as u64);
                    let piece = &buf[(from - offset) as usize..(to - offset) as usize];
                    apply_write(&mut bytes, from, piece);
                }
            }
            Event::SetLen(len) if set_lens_landing > 0 => {
                set_lens_landing -= 1;
                bytes.resize(*len as usize, 0);
            }
            _ => {}
        }
    }
    bytes
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

/// One guest request of a crash test.
#[derive(Clone, Copy)]
enum Step {
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

/// The requests a crash test makes.
enum Steps {
    /// This many, drawn from the seed: writes, zero writes (with and without
    /// unmap), discards and flushes at random offsets.
    Random(usize),
    /// These, for a case that must happen.
    Script(&'static [Step]),
}

/// One crash test: an image made by qemu-img (over a raw backing file full of
/// 0x5a bytes, with `backing`), the requests of `steps` through our writer,
/// with its caches limited to `cache` (L2 tables, refcount blocks) when
/// given, so that write-backs also happen between flushes.
struct CrashCase {
    name: &'static str,
    create_opts: &'static str,
    size: u64,
    steps: Steps,
    seed: u64,
    cache: Option<(usize, usize)>,
    backing: bool,
}

/// Whether `path` has the dirty bit (lazy refcounts not yet written back).
fn is_dirty(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let features = super::header::field::INCOMPATIBLE_FEATURES.get(&bytes);
    bytes.get(4..8) == Some(&[0, 0, 0, 3]) && features.is_some_and(|f| f & 1 != 0)
}

fn run_crash_test(case: &CrashCase) {
    let CrashCase {
        name,
        create_opts,
        size,
        seed,
        cache,
        backing,
        ..
    } = *case;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mut create = Command::new("qemu-img");
    create.args(["create", "-q", "-f", "qcow2", "-o", create_opts]);
    if backing {
        let backing_file = dir.path().join("backing.raw");
        std::fs::write(&backing_file, vec![0x5au8; size as usize]).unwrap();
        create.args(["-b", "backing.raw", "-F", "raw"]);
    }
    let status = create
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
    let ops = match case.steps {
        Steps::Random(n) => n,
        Steps::Script(steps) => steps.len(),
    };
    // states[k] is the guest before op k; flushes[k] says op k is a flush.
    let mut states: Vec<Vec<u8>> = vec![vec![if backing { 0x5a } else { 0 }; size as usize]];
    let mut flushes = vec![false; ops];
    {
        let mut image = Qcow2::open(store.clone(), None, &OpenOptions::default(), &[]).unwrap();
        assert!(!image.is_read_only());
        if let Some((l2_tables, refblocks)) = cache {
            image.set_cache_limits(l2_tables, refblocks);
        }
        let cluster = image.header.cluster_size();
        for (op, flush) in flushes.iter_mut().enumerate() {
            store.push(Event::Op(op));
            let mut model = states.last().unwrap().clone();
            let step = match case.steps {
                Steps::Script(steps) => steps[op],
                Steps::Random(_) => {
                    let len = (1 + rng.below(3 * cluster.max(8192))).min(size);
                    let offset = rng.below(size - len + 1);
                    match rng.below(12) {
                        0..=5 => Step::Write(offset, len),
                        6..=7 => Step::Zero(offset, len, rng.below(2) == 0),
                        8..=9 => Step::Discard(offset, len),
                        _ => Step::Flush,
                    }
                }
            };
            match step {
                Step::Write(offset, len) => {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                    image.write_at(&data, offset).unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                Step::Zero(offset, len, unmap) => {
                    image.write_zeroes(offset, len, unmap).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Step::Discard(offset, len) => {
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
                Step::Flush => {
                    image.flush().unwrap();
                    *flush = true;
                }
            }
            states.push(model);
        }
        if cache.is_some() {
            assert!(
                image.evictions() > 0,
                "{name}: the caches never had to make room"
            );
        }
        store.push(Event::Op(ops));
    }
    // The close finished: like a flush, it makes every op durable.
    store.push(Event::Op(ops + 1));
    let log = store.log.lock().unwrap().clone();
    // Every crash point gets the guest-content check (cheap, in memory); a
    // seeded sample, plus the events right around some flushes, also gets
    // the qemu-img checks and a writable reopen.
    let mut sampled: Vec<usize> = (0..80)
        .map(|_| rng.below(log.len() as u64 + 1) as usize)
        .collect();
    for (i, e) in log.iter().enumerate() {
        if matches!(e, Event::Flush) && rng.below(4) == 0 {
            sampled.extend([i, i + 1, (i + 2).min(log.len())]);
        }
    }
    sampled.sort_unstable();
    sampled.dedup();
    let crashed = dir.path().join("crashed.qcow2");
    let repaired = dir.path().join("repaired.qcow2");
    // The file as the last storage flush before the crash left it, kept up
    // to date as the crash point moves on.
    let mut flushed = initial.clone();
    let mut flushed_upto = 0usize;
    // The guest state every later one builds on: the one after the last
    // guest flush (or the close) that completed before the crash.
    let mut durable = 0usize;
    let mut op_at_crash = 0usize;
    for n in 0..=log.len() {
        let context = format!("{name}: seed {seed}, crash at event {n} of {}", log.len());
        if let Some(Event::Op(k)) = n.checked_sub(1).and_then(|i| log.get(i)) {
            op_at_crash = *k;
            let completed_flush = k
                .checked_sub(1)
                .is_some_and(|f| f >= ops || flushes.get(f).copied().unwrap_or(false));
            if completed_flush {
                durable = (*k).min(states.len() - 1);
            }
        }
        let last_flush = log[..n].iter().rposition(|e| matches!(e, Event::Flush));
        let tail_start = last_flush.map_or(0, |f| f + 1);
        if let Some(f) = last_flush {
            for e in &log[flushed_upto..f] {
                match e {
                    Event::Write(offset, buf) => apply_write(&mut flushed, *offset, buf),
                    Event::SetLen(len) => flushed.resize(*len as usize, 0),
                    _ => {}
                }
            }
            flushed_upto = flushed_upto.max(f);
        }
        // Per sector: the state after the last completed flush, or any state
        // the ops after it passed through.
        let acceptable = &states[durable..=(op_at_crash + 1).min(states.len() - 1)];
        // Right before a storage flush the unflushed tail is longest: draw
        // the crash there many times.
        let draws = if matches!(log.get(n), Some(Event::Flush)) {
            16
        } else {
            1
        };
        let mut bytes = Vec::new();
        for draw in 0..draws {
            bytes = crash_tail(&flushed, &log[tail_start..n], &mut rng);
            let store = Arc::new(MemStorage::new(&crashed, bytes.clone(), false));
            let image =
                Qcow2::open(store, None, &OpenOptions::default(), &[]).unwrap_or_else(|e| {
                    panic!("{context} (draw {draw}): the image does not open: {e}")
                });
            let mut guest = vec![0u8; size as usize];
            image
                .read_at(&mut guest, 0)
                .unwrap_or_else(|e| panic!("{context} (draw {draw}): read failed: {e}"));
            drop(image);
            for (s, sector) in guest.chunks(512).enumerate() {
                let at = s * 512..s * 512 + sector.len();
                assert!(
                    acceptable.iter().any(|st| &st[at.clone()] == sector),
                    "{context} (draw {draw}): sector {s} reads neither the flushed data nor a later one (ops {durable}..={op_at_crash})"
                );
            }
        }
        if sampled.binary_search(&n).is_err() {
            continue;
        }
        std::fs::write(&crashed, &bytes).unwrap();
        if is_dirty(&crashed) {
            // Lazy refcounts: QEMU's contract is a clean image after repair.
            std::fs::copy(&crashed, &repaired).unwrap();
            let out = Command::new("qemu-img")
                .args(["check", "-q", "-r", "all", "-f", "qcow2"])
                .arg(&repaired)
                .output()
                .unwrap();
            assert!(
                matches!(out.status.code(), Some(0 | 3)),
                "{context}: qemu-img check -r all failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (code, out) = qemu_img_check(&repaired);
            assert_eq!(
                code, 0,
                "{context}: after qemu-img check -r all, qemu-img check still finds errors:\n{out}"
            );
        } else {
            let (code, out) = qemu_img_check(&crashed);
            assert!(
                code == 0 || code == 3,
                "{context}: qemu-img check found corruption (exit {code}):\n{out}"
            );
        }
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
    run_crash_test(&CrashCase {
        name: "c512-rc64",
        create_opts: "cluster_size=512,refcount_bits=64",
        size: 2 << 20,
        steps: Steps::Random(40),
        seed: 1,
        cache: None,
        backing: false,
    });
}

#[test]
fn crash_at_any_point_extended_l2_lazy_refcounts() {
    run_crash_test(&CrashCase {
        name: "extl2-lazy",
        create_opts: "cluster_size=16384,extended_l2=on,lazy_refcounts=on",
        size: 2 << 20,
        steps: Steps::Random(40),
        seed: 2,
        cache: None,
        backing: false,
    });
}

#[test]
fn crash_at_any_point_v2() {
    run_crash_test(&CrashCase {
        name: "v2-4k",
        create_opts: "cluster_size=4096,compat=0.10",
        size: 2 << 20,
        steps: Steps::Random(40),
        seed: 3,
        cache: None,
        backing: false,
    });
}

// Tiny caches: L2 tables and refcount blocks are written back between guest
// flushes (to make room), so crashes fall between two cache write-backs.

#[test]
fn crash_between_write_backs_small_clusters() {
    // 32 KiB of guest per L2 table and 64 clusters per refcount block: with
    // room for 4 tables and 2 blocks, most ops evict something.
    run_crash_test(&CrashCase {
        name: "evict-c512-rc64",
        create_opts: "cluster_size=512,refcount_bits=64",
        size: 1 << 20,
        steps: Steps::Random(40),
        seed: 4,
        cache: Some((4, 2)),
        backing: false,
    });
}

#[test]
fn crash_between_write_backs_4k_clusters() {
    // Two L2 tables (2 MiB of guest each), one dirty at a time.
    run_crash_test(&CrashCase {
        name: "evict-c4k",
        create_opts: "cluster_size=4096",
        size: 4 << 20,
        steps: Steps::Random(40),
        seed: 5,
        cache: Some((2, 2)),
        backing: false,
    });
}

#[test]
fn crash_between_write_backs_lazy_refcounts() {
    run_crash_test(&CrashCase {
        name: "evict-c512-lazy",
        create_opts: "cluster_size=512,refcount_bits=16,lazy_refcounts=on",
        size: 1 << 20,
        steps: Steps::Random(40),
        seed: 6,
        cache: Some((4, 2)),
        backing: false,
    });
}

#[test]
fn crash_between_write_backs_of_a_discard() {
    // The discard frees 128 clusters counted in three refcount blocks, but
    // only one block may stay dirty: the others are written back at once,
    // and must wait for the L2 tables that stopped naming the clusters (or a
    // crash leaves entries naming clusters with refcount 0).
    run_crash_test(&CrashCase {
        name: "evict-discard-c512",
        create_opts: "cluster_size=512,refcount_bits=64",
        size: 1 << 20,
        steps: Steps::Script(&[
            Step::Write(0, 64 << 10),
            Step::Flush,
            Step::Discard(0, 64 << 10),
            Step::Write(512 << 10, 512),
            Step::Flush,
        ]),
        seed: 11,
        cache: Some((8, 2)),
        backing: false,
    });
}

// Cases where only the data-before-L2-entry ordering keeps the old bytes:
// no cluster is allocated, or the refcounts are lazy.

#[test]
fn crash_writing_into_a_zero_allocated_cluster() {
    // The third write reuses the cluster the zero write kept: its L2 entry
    // must not reach the disk before the zeroing and the data.
    run_crash_test(&CrashCase {
        name: "zero-alloc-reuse",
        create_opts: "cluster_size=4096",
        size: 64 << 10,
        steps: Steps::Script(&[
            Step::Write(0, 4096),
            Step::Flush,
            Step::Zero(0, 4096, false),
            Step::Flush,
            Step::Write(512, 1024),
            Step::Flush,
        ]),
        seed: 7,
        cache: None,
        backing: false,
    });
}

#[test]
fn crash_copying_from_a_backing_file_with_lazy_refcounts() {
    // The copied backing data must be on disk before the L2 entry. The
    // second write is a copy on write alone between two flushes (no other
    // request asks for a sync first), the third a whole fresh cluster.
    run_crash_test(&CrashCase {
        name: "backing-cow-lazy",
        create_opts: "cluster_size=4096,lazy_refcounts=on",
        size: 64 << 10,
        steps: Steps::Script(&[
            Step::Write(1000, 100),
            Step::Flush,
            Step::Write(5000, 3000),
            Step::Flush,
            Step::Write(12288, 4096),
            Step::Flush,
        ]),
        seed: 8,
        cache: None,
        backing: true,
    });
}

#[test]
fn crash_reusing_a_discarded_cluster_with_lazy_refcounts() {
    // The write after the discard reuses a freed cluster that still holds the
    // first write's bytes.
    run_crash_test(&CrashCase {
        name: "discard-reuse-lazy",
        create_opts: "cluster_size=4096,lazy_refcounts=on",
        size: 64 << 10,
        steps: Steps::Script(&[
            Step::Write(0, 8192),
            Step::Flush,
            Step::Discard(0, 8192),
            Step::Flush,
            Step::Write(16384 + 100, 1000),
            Step::Flush,
        ]),
        seed: 9,
        cache: None,
        backing: false,
    });
}

#[test]
fn crash_reusing_a_cluster_freed_since_the_last_flush_with_lazy_refcounts() {
    // The discard's L2 change is only cached when the write allocates: the
    // freed clusters must not be reused yet, or the old entries on disk would
    // show the new data after a crash.
    run_crash_test(&CrashCase {
        name: "discard-reuse-unflushed-lazy",
        create_opts: "cluster_size=4096,lazy_refcounts=on",
        size: 64 << 10,
        steps: Steps::Script(&[
            Step::Write(0, 8192),
            Step::Flush,
            Step::Discard(0, 8192),
            Step::Write(16384 + 100, 1000),
            Step::Zero(4096, 4096, true),
            Step::Write(32768, 4096),
            Step::Flush,
        ]),
        seed: 10,
        cache: None,
        backing: false,
    });
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
