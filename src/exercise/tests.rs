//! The runner against in-memory raw sides and our qcow2 driver, with a test
//! driver that injects one fault: the exercise must name the op and sector, and
//! replaying its log on fresh sides must find the same thing.

use super::*;
use crate::driver::raw::Raw;
use crate::driver::{Extent, Format, OpenOptions};
use crate::storage::MemStorage;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

const SIZE: u64 = 8 << 20;

/// The fault a [`Faulty`] driver injects.
#[derive(Clone, Copy)]
enum Fault {
    /// The n-th write (1-based) reports success and writes nothing.
    DropWrite(u64),
    /// The n-th write lands one sector further on.
    MisplaceWrite(u64),
    /// Every read covering this byte returns it flipped.
    CorruptReadAt(u64),
    /// The n-th write fails with EIO.
    FailWrite(u64),
    /// Every write takes a millisecond (nothing is wrong, only slow).
    SlowWrites,
}

struct Faulty {
    inner: Arc<dyn BlockDriver>,
    fault: Fault,
    writes: AtomicU64,
}

impl BlockDriver for Faulty {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn granularity(&self) -> u64 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)?;
        if let Fault::CorruptReadAt(at) = self.fault {
            if (offset..offset + buf.len() as u64).contains(&at) {
                buf[(at - offset) as usize] ^= 0x40;
            }
        }
        Ok(())
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.inner.map(offset, max_len)
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        match self.fault {
            Fault::DropWrite(k) if k == n => Ok(()),
            Fault::MisplaceWrite(k) if k == n => {
                let moved = (offset + 512).min(self.size() - buf.len() as u64);
                self.inner.write_at(buf, moved)
            }
            Fault::SlowWrites => {
                std::thread::sleep(Duration::from_millis(1));
                self.inner.write_at(buf, offset)
            }
            Fault::FailWrite(k) if k == n => Err(Error::io(
                self.path(),
                "write",
                std::io::Error::from_raw_os_error(libc::EIO),
            )),
            _ => self.inner.write_at(buf, offset),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

fn mem_raw(name: &str) -> Arc<dyn BlockDriver> {
    let storage = Arc::new(MemStorage::new(name, vec![0u8; SIZE as usize], true));
    Arc::new(Raw::new(storage).unwrap())
}

fn device(fault: Option<Fault>) -> Blkverify {
    let test = mem_raw("test.img");
    let test: Arc<dyn BlockDriver> = match fault {
        Some(fault) => Arc::new(Faulty {
            inner: test,
            fault,
            writes: AtomicU64::new(0),
        }),
        None => test,
    };
    Blkverify::new(mem_raw("raw.img"), test)
}

fn generated(seed: u64, ops: u64) -> Plan {
    Plan::Generated {
        workload: Workload {
            seed,
            size: SIZE,
            mix: Mix::default(),
            size_mix: SizeMix::default(),
        },
        limit: Limit::Ops(ops),
    }
}

fn qd(queue_depth: usize) -> ExerciseOptions {
    ExerciseOptions {
        queue_depth,
        verify_threads: 2,
        ..ExerciseOptions::default()
    }
}

/// Run with a log; return the outcome and the log's text.
fn run_logged(dev: &Blkverify, plan: &Plan, options: &ExerciseOptions) -> (Outcome, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ops.log");
    let mut log = OpLog::create(&path).unwrap();
    let outcome = run(dev, plan, options, Some(&mut log), &mut |_| true).unwrap();
    drop(log);
    (outcome, std::fs::read_to_string(&path).unwrap())
}

/// A plan that replays `ops` as an op log of seed `seed` would.
fn log_plan(seed: u64, ops: Vec<Op>) -> Plan {
    Plan::replay(Record::Log(Log {
        seed,
        spec: None,
        queue_depth: None,
        size: None,
        ops,
    }))
}

fn replay(text: &str, fault: Option<Fault>, queue_depth: usize) -> Outcome {
    let log = parse_log("ops.log", text).unwrap();
    let plan = Plan::replay(Record::Log(log));
    run(&device(fault), &plan, &qd(queue_depth), None, &mut |_| true).unwrap()
}

fn key(f: &Finding) -> (Option<u64>, &'static str, Option<u64>, String) {
    (
        f.op.map(|o| o.number),
        f.difference.kind,
        f.difference.sector,
        f.difference.message.clone(),
    )
}

#[test]
fn a_clean_device_runs_clean_at_every_queue_depth() {
    for queue_depth in [1, 4] {
        let dev = device(None);
        let (outcome, _) = run_logged(&dev, &generated(11, 3000), &qd(queue_depth));
        assert!(outcome.findings.is_empty(), "{:?}", outcome.findings);
        assert_eq!(outcome.ops, 3000);
        assert!(outcome.verified);
        assert!(outcome.bytes_written > 0 && outcome.bytes_read > 0);
    }
}

#[test]
fn the_same_seed_gives_the_same_log_and_the_same_disk() {
    let plan = generated(5, 1500);
    let a = device(None);
    let (_, log1) = run_logged(&a, &plan, &qd(1));
    let b = device(None);
    let (_, log4) = run_logged(&b, &plan, &qd(4));
    assert_eq!(log1.replace("queue-depth 1", "queue-depth 4"), log4);
    let mut da = vec![0u8; SIZE as usize];
    let mut db = vec![0u8; SIZE as usize];
    a.test().read_at(&mut da, 0).unwrap();
    b.test().read_at(&mut db, 0).unwrap();
    assert!(da == db, "queue depth changed the final contents");
    let (_, other) = run_logged(&device(None), &generated(6, 1500), &qd(1));
    assert_ne!(log1, other);
}

/// The first op of `kind` that covers byte `at`, in log order.
fn first_covering(log: &str, kinds: &[&str], at: u64) -> Op {
    parse_log("ops.log", log)
        .unwrap()
        .ops
        .into_iter()
        .find(|op| kinds.contains(&op.kind.name()) && op.offset <= at && at < op.offset + op.length)
        .unwrap()
}

#[test]
fn a_corrupt_read_is_named_by_op_and_sector_and_replays() {
    let at = 3 * (1 << 20) + 4097;
    for queue_depth in [1, 4] {
        let fault = Some(Fault::CorruptReadAt(at));
        let (outcome, log) = run_logged(&device(fault), &generated(21, 5000), &qd(queue_depth));
        let f = &outcome.findings[0];
        let expected = first_covering(&log, &["read", "discard"], at);
        assert_eq!(f.op, Some(expected));
        assert_eq!(
            (f.difference.sector, f.difference.first_byte),
            (Some(at / 512), Some(at))
        );
        assert_eq!(f.difference.kind, "contents");
        let i = (at % 512) as usize;
        assert_eq!(f.difference.test_bytes[i] ^ f.difference.raw_bytes[i], 0x40);
        let lines = hexdump_diff(
            at / 512 * 512,
            at,
            &f.difference.test_bytes,
            &f.difference.raw_bytes,
            4,
        );
        assert!(
            lines[0].starts_with(&format!("{:#010x}", at / 16 * 16)),
            "{lines:?}"
        );
        assert_eq!(lines.len(), 3);
        assert!(lines[2].contains("^^"));
        assert!(log.contains(&format!("# finding: {}", f.difference.message)));
        let again = replay(&log, fault, queue_depth);
        assert_eq!(key(&again.findings[0]), key(f));
    }
}

#[test]
fn a_dropped_write_is_caught_and_blamed_on_the_lost_write() {
    let fault = Some(Fault::DropWrite(40));
    let (outcome, log) = run_logged(&device(fault), &generated(3, 4000), &qd(1));
    let f = &outcome.findings[0];
    let lost = parse_log("ops.log", &log)
        .unwrap()
        .ops
        .into_iter()
        .filter(|op| matches!(op.kind, OpKind::Write { .. }))
        .nth(39)
        .unwrap();
    let first_byte = f.difference.first_byte.unwrap();
    assert!(lost.offset <= first_byte && first_byte < lost.offset + lost.length);
    assert_eq!(f.last_change, Some(lost), "{f:?}");
    assert!(f.difference.diagnosis.is_some(), "{f:?}");
    assert_eq!(key(&replay(&log, fault, 1).findings[0]), key(f));
    // without the fault, the same log runs clean
    assert!(replay(&log, None, 1).findings.is_empty());
}

#[test]
fn a_misplaced_write_is_caught() {
    let fault = Some(Fault::MisplaceWrite(25));
    let (outcome, log) = run_logged(&device(fault), &generated(8, 4000), &qd(1));
    let f = &outcome.findings[0];
    assert_eq!(f.difference.kind, "contents");
    assert_eq!(key(&replay(&log, fault, 1).findings[0]), key(f));
    let moved = parse_log("ops.log", &log)
        .unwrap()
        .ops
        .into_iter()
        .filter(|op| matches!(op.kind, OpKind::Write { .. }))
        .nth(24)
        .unwrap();
    let said = f.difference.diagnosis.clone().unwrap_or_default();
    assert!(
        said.contains(&format!("op {}", moved.number)) && said.contains("misplaced by +0x200"),
        "{said}"
    );
}

#[test]
fn a_failed_write_is_a_return_value_finding_on_that_op() {
    let fault = Some(Fault::FailWrite(10));
    let (outcome, log) = run_logged(&device(fault), &generated(4, 1000), &qd(1));
    let f = &outcome.findings[0];
    let tenth = parse_log("ops.log", &log)
        .unwrap()
        .ops
        .into_iter()
        .filter(|op| matches!(op.kind, OpKind::Write { .. }))
        .nth(9)
        .unwrap();
    assert_eq!(f.op, Some(tenth));
    assert_eq!(
        (f.difference.test_ret, f.difference.raw_ret),
        (Some(-libc::EIO), Some(0))
    );
    assert_eq!(outcome.issued, outcome.ops);
    assert_eq!(outcome.issued, tenth.number + 1);
}

#[test]
fn our_qcow2_driver_runs_clean_and_cancel_stops() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    let test = dir.path().join("test.qcow2");
    for (cluster_size, extended_l2) in [(65536, false), (4096, false), (65536, true)] {
        std::fs::write(&raw, vec![0u8; SIZE as usize]).unwrap();
        crate::driver::qcow2::create::create(
            &test,
            &crate::driver::qcow2::create::CreateOptions {
                size: Some(SIZE),
                cluster_size,
                extended_l2,
                ..Default::default()
            },
        )
        .unwrap();
        let options = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let dev = Blkverify::open(&raw, &test, &options).unwrap();
        let outcome = run(&dev, &generated(9, 2000), &qd(4), None, &mut |_| true).unwrap();
        assert!(outcome.findings.is_empty(), "{:?}", outcome.findings);
        assert!(outcome.verified);
    }
    let options = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let dev = Blkverify::open(&raw, &test, &options).unwrap();
    let forever = Plan::Generated {
        workload: Workload {
            seed: 1,
            size: SIZE,
            mix: Mix::default(),
            size_mix: SizeMix::default(),
        },
        limit: Limit::Duration(Duration::from_secs(3600)),
    };
    let started = Instant::now();
    let err = run(&dev, &forever, &qd(2), None, &mut |_| false).unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn replay_refuses_ops_past_the_end() {
    let plan = log_plan(
        1,
        vec![Op {
            number: 0,
            kind: OpKind::Read,
            offset: SIZE - 10,
            length: 20,
        }],
    );
    let err = run(&device(None), &plan, &qd(1), None, &mut |_| true).unwrap_err();
    assert!(
        err.to_string().contains("past the end of the device"),
        "{err}"
    );
}

#[test]
fn a_queue_whose_ops_all_overlap_still_ends() {
    // Every op touches sector 0 and writes are slow: at queue depth 8, seven
    // workers wait for the one running, and when the plan ends each of them
    // must hear it.
    let ops: Vec<Op> = (0..300)
        .map(|number| Op {
            number,
            kind: if number % 3 == 0 {
                OpKind::Read
            } else {
                OpKind::Write { fua: false }
            },
            offset: 0,
            length: 512,
        })
        .collect();
    let plan = log_plan(1, ops);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let dev = device(Some(Fault::SlowWrites));
        let outcome = run(&dev, &plan, &qd(8), None, &mut |_| true).unwrap();
        let _ = done.send(outcome.ops);
    });
    assert_eq!(finished.recv_timeout(Duration::from_secs(60)).unwrap(), 300);
}

#[test]
fn on_overlays_our_qcow2_driver_runs_clean_and_the_images_are_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    let test = dir.path().join("test.qcow2");
    std::fs::write(&raw, vec![0u8; SIZE as usize]).unwrap();
    crate::driver::qcow2::create::create(
        &test,
        &crate::driver::qcow2::create::CreateOptions {
            size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    let before = (std::fs::read(&raw).unwrap(), std::fs::read(&test).unwrap());
    let options = OpenOptions {
        writable: true,
        overlay: true,
        ..OpenOptions::default()
    };
    for _ in 0..2 {
        // Each overlay starts from the images as they are: the same run twice.
        let dev = Blkverify::open(&raw, &test, &options).unwrap();
        let outcome = run(&dev, &generated(9, 2000), &qd(4), None, &mut |_| true).unwrap();
        assert!(outcome.findings.is_empty(), "{:?}", outcome.findings);
        assert!(outcome.verified && outcome.bytes_written > 0);
    }
    let after = (std::fs::read(&raw).unwrap(), std::fs::read(&test).unwrap());
    assert!(before == after, "an overlay wrote the images");
}

/// A qcow2 and a raw image with the same 8 MiB of data, by our own writers.
fn data_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let raw = dir.join("raw.img");
    let test = dir.join("test.qcow2");
    let data: Vec<u8> = (0..SIZE as usize).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    crate::driver::qcow2::create::create(
        &test,
        &crate::driver::qcow2::create::CreateOptions {
            size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    let writable = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let image = crate::driver::open(&test, &writable).unwrap();
    image.write_at(&data, 0).unwrap();
    image.flush().unwrap();
    (raw, test)
}

/// Serve `raw` and `test` with a trace at `trace`; `client(uri)` drives it.
/// Returns serve's findings.
fn serve_traced(
    raw: &Path,
    test: &Path,
    trace: &Path,
    client: impl FnOnce(&str),
) -> Vec<crate::serve::Finding> {
    use crate::record::{Recorder, TraceHeader};
    use crate::serve::{open_device, Policy, ServeOptions, Server};
    let mut device = open_device(raw, test, &OpenOptions::default(), false).unwrap();
    let recorder =
        Arc::new(Recorder::start(trace, &TraceHeader::of_device(&device, "test")).unwrap());
    device.set_observer(recorder.clone());
    let server = Server::start(
        device,
        ServeOptions {
            persistent: true,
            shared: 4,
            on_mismatch: Policy::Eio,
            ..ServeOptions::default()
        },
    )
    .unwrap();
    client(server.uri());
    server.stop();
    server.take_outcome().unwrap().unwrap();
    recorder.finish().unwrap();
    server.findings(0)
}

/// Replay the trace at `trace` on `raw` and `test` (overlays unless
/// `in_place`), at queue depth 1.
fn replay_trace(raw: &Path, test: &Path, trace: &Path, in_place: bool) -> Outcome {
    let request = Request {
        spec: Some(format!("blkverify:{}:{}", raw.display(), test.display())),
        replay: Some(trace.to_path_buf()),
        ..Request::default()
    };
    let open = OpenOptions {
        overlay: !in_place,
        ..OpenOptions::default()
    };
    let mut exercise = Exercise::prepare(request, &open).unwrap();
    exercise.run(&mut |_| true).unwrap()
}

#[test]
fn a_served_clients_trace_replays_to_the_same_images_and_the_same_finding() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = data_pair(dir.path());
    // The pristine copies a replay starts from.
    let (raw0, test0) = (dir.path().join("raw0.img"), dir.path().join("test0.qcow2"));
    std::fs::copy(&raw, &raw0).unwrap();
    std::fs::copy(&test, &test0).unwrap();
    let trace = dir.path().join("clients.bvt");
    // Four connections of our NBD client at once, overlapping writes of
    // every size, zeroing, discards, reads, flushes and FUA.
    let findings = serve_traced(&raw, &test, &trace, |uri| {
        std::thread::scope(|scope| {
            for c in 0..4u64 {
                scope.spawn(move || {
                    let nbd = crate::driver::open(
                        Path::new(uri),
                        &OpenOptions {
                            writable: true,
                            ..OpenOptions::default()
                        },
                    )
                    .unwrap();
                    let mut buf = vec![0u8; 200_000];
                    for i in 0..300u64 {
                        let at = (i * 7919 + c * 131_071) % (SIZE - 200_000);
                        let len = 512 + (i * 4099 % 190_000);
                        match i % 6 {
                            0 | 1 => {
                                buf.iter_mut().for_each(|b| *b = (i + c) as u8);
                                nbd.write_at(&buf[..len as usize], at).unwrap();
                            }
                            2 => nbd.read_at(&mut buf[..len as usize], at).unwrap(),
                            3 => nbd.write_zeroes(at, len, i % 12 == 3).unwrap(),
                            4 => nbd.discard(at / 512 * 512, 65536).unwrap(),
                            _ => nbd.flush().unwrap(),
                        }
                    }
                });
            }
        });
    });
    assert!(findings.is_empty(), "{findings:?}");
    let record = crate::record::Record::read(&trace).unwrap();
    assert_eq!(
        record.ops().len() as u64,
        record.ops().last().unwrap().number + 1
    );
    // On overlays: clean, and the pristine copies are not written.
    let outcome = replay_trace(&raw0, &test0, &trace, false);
    assert!(
        outcome.findings.is_empty() && outcome.verified,
        "{:?}",
        outcome.findings
    );
    assert_eq!(outcome.issued, record.ops().len() as u64);
    // In place: the replayed images hold what the served ones do.
    let outcome = replay_trace(&raw0, &test0, &trace, true);
    assert!(outcome.findings.is_empty());
    let read = |p: &Path| {
        let image = crate::driver::open(p, &OpenOptions::default()).unwrap();
        let mut all = vec![0u8; SIZE as usize];
        image.read_at(&mut all, 0).unwrap();
        all
    };
    assert!(
        read(&test) == read(&test0),
        "the replay did not repeat the run"
    );
    assert!(read(&raw) == read(&raw0));
}

#[test]
fn a_corrupt_read_caught_by_serve_is_met_again_by_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, test) = data_pair(dir.path());
    // Flip one guest byte of the qcow2 (found through its map).
    let guest = 3 * (1 << 20) + 777;
    let located = crate::driver::open(&test, &OpenOptions::default())
        .unwrap()
        .locate(guest)
        .unwrap()
        .unwrap();
    let host = located.host_offset.unwrap();
    let mut bytes = std::fs::read(&test).unwrap();
    bytes[host as usize] ^= 0x10;
    std::fs::write(&test, &bytes).unwrap();
    let (raw0, test0) = (dir.path().join("raw0.img"), dir.path().join("test0.qcow2"));
    std::fs::copy(&raw, &raw0).unwrap();
    std::fs::copy(&test, &test0).unwrap();
    let trace = dir.path().join("t.bvt");
    let findings = serve_traced(&raw, &test, &trace, |uri| {
        let nbd = crate::driver::open(
            Path::new(uri),
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        nbd.write_at(&[1u8; 4096], 0).unwrap();
        let mut buf = vec![0u8; 65536];
        nbd.read_at(&mut buf, 0).unwrap();
        assert!(nbd.read_at(&mut buf, 3 << 20).is_err(), "EIO");
        nbd.write_at(&[2u8; 4096], 8192).unwrap();
    });
    let [live] = &findings[..] else {
        panic!("{findings:?}")
    };
    let outcome = replay_trace(&raw0, &test0, &trace, false);
    let replayed = &outcome.findings[0];
    assert_eq!(replayed.difference.message, live.difference.message);
    assert_eq!(replayed.op.map(|op| op.number), live.request);
    assert_eq!(replayed.difference.sector, live.difference.sector);
    assert_eq!(replayed.difference.connection, live.difference.connection);
    assert_eq!(replayed.difference.sector, Some(guest / 512));
    // It stopped there: the write after it was not replayed.
    assert_eq!(outcome.issued, live.request.unwrap() + 1);
}
