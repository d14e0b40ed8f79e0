//! The mirrored device: a driver made of two drivers, a raw reference and a test
//! image, in the manner of QEMU's blkverify. Every read goes to both sides and the
//! bytes are compared; every write, write-zeroes, discard and flush goes to both
//! sides. The first difference is an error that names the corrupt sector.
//!
//! Unlike QEMU's blkverify, discard and flush reach both sides too (QEMU drops
//! discard and flushes only the test side), so a discard bug in the test driver is
//! caught by the next read, and a flush error on either side is a finding.
//!
//! Small requests run the two sides one after the other on the caller's thread:
//! a 4 KiB read costs two `pread`s and a `memcmp`, and a thread hand-off would
//! cost more than the I/O. Requests of at least [`PARALLEL_MIN`] bytes run the raw
//! side on a scoped thread while the caller's thread serves the test side.
//!
//! Callers that run requests concurrently admit each one first
//! ([`Blkverify::admit`]): the device numbers them and orders the overlapping
//! ones (see [`order`]), so both sides see them in the same order. The device
//! also counts the bytes each side read and wrote for it ([`Blkverify::io_counts`]).

pub mod difference;
pub mod order;

use crate::compare::first_difference;
use crate::driver::{self, check_range, BlockDriver, Extent, Format, Location, OpenOptions};
use crate::error::{ContentsMismatch, Error, Result, ReturnMismatch};
use crate::size::request_sectors;
pub use difference::Difference;
use order::{Observer, Order, Ticket};
use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The prefix of a mirrored-device spec: `blkverify:RAW:TEST`.
pub const SPEC_PREFIX: &str = "blkverify:";

/// Requests at least this long read (or write) both sides in parallel.
pub const PARALLEL_MIN: usize = 1 << 20;

/// Reads up to this size reuse a per-thread scratch buffer for the raw side.
const SCRATCH_MAX: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A `blkverify:RAW:TEST` spec split into its two paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The raw reference.
    pub raw: PathBuf,
    /// The image under test.
    pub test: PathBuf,
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPEC_PREFIX}{}:{}",
            self.raw.display(),
            self.test.display()
        )
    }
}

/// Split a `blkverify:RAW:TEST` spec: the one parser of the prefix and its parts. `None` if `spec` does not start with the
/// prefix (it is a plain image); an error if the prefix is there but a part is
/// missing. The raw path ends at the first colon after the prefix, as in QEMU, so
/// a raw path containing a colon needs [`Blkverify::open`] with explicit paths.
pub fn parse_spec(spec: &str) -> Result<Option<Spec>> {
    let Some(rest) = spec.strip_prefix(SPEC_PREFIX) else {
        return Ok(None);
    };
    match rest.split_once(':') {
        Some((raw, test)) if !raw.is_empty() && !test.is_empty() => Ok(Some(Spec {
            raw: PathBuf::from(raw),
            test: PathBuf::from(test),
        })),
        _ => Err(Error::InvalidArgument(format!(
            "{spec}: a blkverify spec is blkverify:RAW:TEST (raw image, a colon, test image)"
        ))),
    }
}

/// The bytes one side of the device moved on its behalf.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    /// Bytes read (reads, and the checks of discards and block status).
    pub read: u64,
    /// Bytes written.
    pub written: u64,
    /// Bytes made to read as zeros (write-zeroes).
    pub zeroed: u64,
    /// Bytes discarded.
    pub discarded: u64,
}

/// Both sides' [`IoCounts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideCounts {
    /// The image under test.
    pub test: IoCounts,
    /// The raw reference.
    pub raw: IoCounts,
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    discarded: AtomicU64,
}

/// One side of the device: its driver, and what it moved for the device.
struct Side {
    driver: Arc<dyn BlockDriver>,
    counters: Counters,
}

impl Side {
    fn new(driver: Arc<dyn BlockDriver>) -> Side {
        Side {
            driver,
            counters: Counters::default(),
        }
    }

    /// `result`, counting `bytes` in `counter` when it is a success.
    fn counted(counter: &AtomicU64, bytes: u64, result: Result<()>) -> Result<()> {
        if result.is_ok() {
            counter.fetch_add(bytes, Ordering::Relaxed);
        }
        result
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let result = self.driver.read_at(buf, offset);
        Side::counted(&self.counters.read, buf.len() as u64, result)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let result = self.driver.write_at(buf, offset);
        Side::counted(&self.counters.written, buf.len() as u64, result)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let result = self.driver.write_zeroes(offset, len, unmap);
        Side::counted(&self.counters.zeroed, len, result)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let result = self.driver.discard(offset, len);
        Side::counted(&self.counters.discarded, len, result)
    }

    fn counts(&self) -> IoCounts {
        let c = &self.counters;
        IoCounts {
            read: c.read.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            zeroed: c.zeroed.load(Ordering::Relaxed),
            discarded: c.discarded.load(Ordering::Relaxed),
        }
    }
}

/// The mirrored device.
pub struct Blkverify {
    raw: Side,
    test: Side,
    name: PathBuf,
    order: Order,
}

impl Blkverify {
    /// Open the raw reference (always as a raw image) and the test image (with
    /// `options`: format, snapshot, backing policy, writability).
    pub fn open(raw: &Path, test: &Path, options: &OpenOptions) -> Result<Blkverify> {
        let raw_options = OpenOptions {
            writable: options.writable,
            format: Some(Format::Raw),
            snapshot: None,
            ..options.clone()
        };
        let raw_driver = driver::open(raw, &raw_options)?;
        let test_driver = driver::open(test, options)?;
        Ok(Blkverify::new(raw_driver, test_driver))
    }

    /// Mirror two open drivers. The device's size is the test side's, as in QEMU;
    /// if the reference is shorter, requests past its end fail there only, which
    /// is reported as a return-value mismatch.
    pub fn new(raw: Arc<dyn BlockDriver>, test: Arc<dyn BlockDriver>) -> Blkverify {
        let spec = Spec {
            raw: raw.path().to_path_buf(),
            test: test.path().to_path_buf(),
        };
        // Our NBD client read-modify-writes partial blocks: requests that
        // share a block overlap.
        let unit = [&raw, &test]
            .iter()
            .map(|side| match side.format_name() {
                "nbd" => side.granularity().max(driver::SECTOR_SIZE),
                _ => driver::SECTOR_SIZE,
            })
            .max()
            .unwrap_or(driver::SECTOR_SIZE);
        Blkverify {
            raw: Side::new(raw),
            test: Side::new(test),
            name: PathBuf::from(spec.to_string()),
            order: Order::new(unit),
        }
    }

    /// The raw reference.
    pub fn raw(&self) -> &dyn BlockDriver {
        self.raw.driver.as_ref()
    }

    /// The image under test.
    pub fn test(&self) -> &dyn BlockDriver {
        self.test.driver.as_ref()
    }

    /// Number `request` and order it among the requests in flight (see
    /// [`order`]); it counts as in flight until the ticket is dropped.
    pub fn admit(&self, request: &order::Request<'_>) -> Ticket<'_> {
        self.order.admit(request)
    }

    /// How admitted requests are ordered.
    pub fn order(&self) -> &Order {
        &self.order
    }

    /// Let `observer` see every request admitted from now on, in number order.
    pub fn set_observer(&mut self, observer: Arc<dyn Observer>) {
        self.order.set_observer(observer);
    }

    /// The bytes each side has read and written for the device so far.
    pub fn io_counts(&self) -> SideCounts {
        SideCounts {
            test: self.test.counts(),
            raw: self.raw.counts(),
        }
    }

    /// Run `test` and `raw`, one side's work each, in parallel when
    /// `parallel` (the raw side's on a scoped thread, the test side's on the
    /// calling thread), else one after the other. Returns both results.
    fn both<T: Send>(
        parallel: bool,
        test: impl FnOnce() -> Result<T>,
        raw: impl FnOnce() -> Result<T> + Send,
    ) -> (Result<T>, Result<T>) {
        if !parallel {
            return (test(), raw());
        }
        std::thread::scope(|scope| {
            let raw = scope.spawn(raw);
            let test = test();
            let raw = raw.join().unwrap_or_else(|_| {
                Err(Error::Internal(
                    "blkverify: the raw side's worker thread panicked".to_string(),
                ))
            });
            (test, raw)
        })
    }

    /// Read both sides, the test side into `buf` and the reference into
    /// `reference` (as long as `buf`), and compare. On a difference the
    /// caller keeps both sides' bytes (a server can answer with the
    /// reference's).
    pub fn read_pair(&self, buf: &mut [u8], reference: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, self.size(), offset, buf.len() as u64)?;
        if reference.len() != buf.len() {
            return Err(Error::InvalidArgument(format!(
                "blkverify: read_pair's reference buffer holds {} bytes, not {}",
                reference.len(),
                buf.len()
            )));
        }
        self.read_compare(buf, reference, offset)
    }

    /// Read the reference alone (counted among its reads): for checks the
    /// device's users make against it, such as a server checking that a
    /// range the test side calls zero is zero there.
    pub fn read_reference(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.raw.read_at(buf, offset)
    }

    /// Read both sides into `buf` (test) and `reference` (raw) and compare.
    fn read_compare(&self, buf: &mut [u8], reference: &mut [u8], offset: u64) -> Result<()> {
        let length = buf.len() as u64;
        let (test, raw) = Blkverify::both(
            buf.len() >= PARALLEL_MIN,
            || self.test.read_at(buf, offset),
            || self.raw.read_at(reference, offset),
        );
        settle("read", offset, length, test, raw)?;
        if buf[..] != reference[..] {
            let at = first_difference(buf, reference).unwrap_or(0) as u64;
            let first_byte = offset + at;
            return Err(Error::Mismatch(ContentsMismatch {
                op: "read",
                offset,
                length,
                sector: first_byte / driver::SECTOR_SIZE,
                first_byte,
            }));
        }
        Ok(())
    }
}

impl Blkverify {
    /// Check what the test side reads after discarding `[offset, offset+len)`
    /// and bring the reference to it. Every read and write here is made on the
    /// device's own account, for the discard: a side that fails one is that
    /// discard's return-value mismatch (a finding, as the same failure in a
    /// read or write would be), never a bare error.
    fn reconcile_discarded(&self, offset: u64, len: u64) -> Result<()> {
        const PIECE: u64 = 1 << 20;
        let failed = |test: Result<()>, raw: Result<()>| settle("discard", offset, len, test, raw);
        let test_side = |r: Result<()>| failed(r, Ok(()));
        let raw_side = |r: Result<()>| failed(Ok(()), r);
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let (zero_len, zero) = match driver::zero_status(self.test(), at, end - at) {
                Ok(status) => status,
                Err(e) => return test_side(Err(e)),
            };
            let run = zero_len.clamp(1, end - at);
            if zero {
                // The test side reads zeros here without reading: so must the reference.
                raw_side(self.raw.write_zeroes(at, run, true))?;
                at += run;
                continue;
            }
            let n = run.min(PIECE) as usize;
            let mut now = vec![0u8; n];
            let mut before = vec![0u8; n];
            test_side(self.test.read_at(&mut now, at))?;
            raw_side(self.raw.read_at(&mut before, at))?;
            let backing = match self.test().backing() {
                Some(b) => {
                    let mut data = vec![0u8; n];
                    let stored = b.size().saturating_sub(at).min(n as u64) as usize;
                    if let Some(head) = data.get_mut(..stored) {
                        let read = b.read_at(head, at);
                        test_side(Side::counted(&self.test.counters.read, stored as u64, read))?;
                    }
                    Some(data)
                }
                None => None,
            };
            let mut sector_start = 0usize;
            while sector_start < n {
                let abs = at + sector_start as u64;
                let sector_end = ((abs / driver::SECTOR_SIZE + 1) * driver::SECTOR_SIZE - at)
                    .min(n as u64) as usize;
                let t = now.get(sector_start..sector_end).unwrap_or(&[]);
                let old = before.get(sector_start..sector_end).unwrap_or(&[]);
                let allowed = t == old
                    || t.iter().all(|&b| b == 0)
                    || backing
                        .as_ref()
                        .and_then(|b| b.get(sector_start..sector_end))
                        .is_some_and(|b| b == t);
                if !allowed {
                    let first_byte = abs + first_difference(t, old).unwrap_or(0) as u64;
                    return Err(Error::Mismatch(ContentsMismatch {
                        op: "discard",
                        offset,
                        length: len,
                        sector: first_byte / driver::SECTOR_SIZE,
                        first_byte,
                    }));
                }
                sector_start = sector_end;
            }
            if now != before {
                raw_side(self.raw.write_at(&now, at))?;
            }
            at += n as u64;
        }
        Ok(())
    }
}

/// Combine the two sides' results: both succeeded, or both failed with the same
/// errno (the test side's error is returned); anything else is a finding.
fn settle(
    op: &'static str,
    offset: u64,
    length: u64,
    test: Result<()>,
    raw: Result<()>,
) -> Result<()> {
    match (test, raw) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(t), Err(r)) if t.errno() == r.errno() => Err(t),
        (test, raw) => Err(Error::ReturnMismatch(ReturnMismatch {
            op,
            offset,
            length,
            test_ret: test.as_ref().map_or_else(|e| -e.errno(), |_| 0),
            raw_ret: raw.as_ref().map_or_else(|e| -e.errno(), |_| 0),
            test_error: test.err().map(|e| e.to_string()),
            raw_error: raw.err().map(|e| e.to_string()),
        })),
    }
}

impl BlockDriver for Blkverify {
    /// The device serves the test image's guest bytes, read through the test
    /// side's driver: its format is the test image's.
    fn format(&self) -> Format {
        self.test().format()
    }

    /// The device is a filter over two images, not a format of a file: it
    /// names itself, as QEMU's blkverify driver does.
    fn format_name(&self) -> &'static str {
        "blkverify"
    }

    fn path(&self) -> &Path {
        &self.name
    }

    fn size(&self) -> u64 {
        self.test().size()
    }

    fn granularity(&self) -> u64 {
        self.test().granularity()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, self.size(), offset, buf.len() as u64)?;
        if buf.len() <= SCRATCH_MAX {
            SCRATCH.with(|scratch| {
                // A re-entrant call (none exists today) would find the buffer
                // borrowed; it then uses a buffer of its own.
                match scratch.try_borrow_mut() {
                    Ok(mut scratch) => {
                        if scratch.len() < buf.len() {
                            scratch.resize(buf.len(), 0);
                        }
                        match scratch.get_mut(..buf.len()) {
                            Some(reference) => self.read_compare(buf, reference, offset),
                            None => self.read_compare(buf, &mut vec![0u8; buf.len()], offset),
                        }
                    }
                    Err(_) => self.read_compare(buf, &mut vec![0u8; buf.len()], offset),
                }
            })
        } else {
            let mut reference = vec![0u8; buf.len()];
            self.read_compare(buf, &mut reference, offset)
        }
    }

    /// The test side's mapping: allocation is a property of the image under test.
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.test().map(offset, max_len)
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.test().backing()
    }

    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        self.test().locate(offset)
    }

    fn info(&self) -> Vec<(String, String)> {
        let mut facts = vec![
            ("raw".to_string(), self.raw().path().display().to_string()),
            ("test".to_string(), self.test().path().display().to_string()),
            (
                "test_format".to_string(),
                self.test().format_name().to_string(),
            ),
        ];
        facts.extend(self.test().info());
        facts
    }

    fn is_read_only(&self) -> bool {
        self.test().is_read_only() || self.raw().is_read_only()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let length = buf.len() as u64;
        check_range(&self.name, self.size(), offset, length)?;
        let (test, raw) = Blkverify::both(
            buf.len() >= PARALLEL_MIN,
            || self.test.write_at(buf, offset),
            || self.raw.write_at(buf, offset),
        );
        settle("write", offset, length, test, raw)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(&self.name, self.size(), offset, len)?;
        let (test, raw) = Blkverify::both(
            len >= PARALLEL_MIN as u64,
            || self.test.write_zeroes(offset, len, unmap),
            || self.raw.write_zeroes(offset, len, unmap),
        );
        settle("write_zeroes", offset, len, test, raw)
    }

    /// Discard is advisory: afterwards a correct driver may return the old data,
    /// zeros, or (qcow2 v2 over a backing file) the backing file's data, and raw
    /// cannot imitate every driver's choice. So the test side discards, each
    /// discarded sector is checked to read as one of those states, and the
    /// reference is then brought to what the test side reads. A driver that
    /// returns anything else after a discard is caught here; QEMU's blkverify
    /// drops discards and so never tests them.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.name, self.size(), offset, len)?;
        let test = self.test.discard(offset, len);
        let raw = check_range(self.raw().path(), self.raw().size(), offset, len);
        settle("discard", offset, len, test, raw)?;
        self.reconcile_discarded(offset, len)
    }

    /// Both sides flush at once: each waits for its disk, and the two disks'
    /// (or one disk's two files') writeback overlaps.
    fn flush(&self) -> Result<()> {
        let (test, raw) = Blkverify::both(true, || self.test().flush(), || self.raw().flush());
        settle("flush", 0, 0, test, raw)
    }
}

/// What [`open_spec`] opened.
pub enum Opened {
    /// A plain image (or NBD export).
    Image(Arc<dyn BlockDriver>),
    /// A mirrored device.
    Device(Blkverify),
}

/// Open `spec`: a `blkverify:RAW:TEST` mirrored device, or a plain image.
/// `options` apply to the image, or to the device's test side.
pub fn open_spec(spec: &Path, options: &OpenOptions) -> Result<Opened> {
    match spec.to_str().map(parse_spec).transpose()?.flatten() {
        Some(Spec { raw, test }) => Ok(Opened::Device(Blkverify::open(&raw, &test, options)?)),
        None => Ok(Opened::Image(driver::open(spec, options)?)),
    }
}

// The device's two findings are carried by the bottom layer's `Error`; their
// messages are the device's, and are written here. They are QEMU blkverify's,
// in 512-byte sectors: the request (`sector_num`, `nb_sectors`), then the first
// differing sector or the two return values, test side first.

impl fmt::Display for ContentsMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sector_num, nb_sectors) = request_sectors(self.offset, self.length);
        write!(
            f,
            "blkverify: {} sector_num={sector_num} nb_sectors={nb_sectors} contents mismatch in sector {}",
            self.op, self.sector
        )
    }
}

impl fmt::Display for ReturnMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sector_num, nb_sectors) = request_sectors(self.offset, self.length);
        write!(
            f,
            "blkverify: {} sector_num={sector_num} nb_sectors={nb_sectors} return value mismatch {} != {}",
            self.op, self.test_ret, self.raw_ret
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn images(dir: &Path, size: usize) -> (PathBuf, PathBuf) {
        let raw = dir.join("raw.img");
        let test = dir.join("test.img");
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        fs::write(&raw, &data).unwrap();
        fs::write(&test, &data).unwrap();
        (raw, test)
    }

    fn writable() -> OpenOptions {
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        }
    }

    #[test]
    fn spec_syntax() {
        assert_eq!(parse_spec("plain.img").unwrap(), None);
        let s = parse_spec("blkverify:a.raw:dir/b:c.qcow2")
            .unwrap()
            .unwrap();
        assert_eq!(s.raw, PathBuf::from("a.raw"));
        assert_eq!(s.test, PathBuf::from("dir/b:c.qcow2"));
        assert_eq!(s.to_string(), "blkverify:a.raw:dir/b:c.qcow2");
        for bad in [
            "blkverify:",
            "blkverify:a.raw",
            "blkverify::b",
            "blkverify:a:",
        ] {
            assert!(
                matches!(parse_spec(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn identical_sides_read_and_mirror_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, test) = images(dir.path(), 3 << 20);
        let dev = Blkverify::open(&raw, &test, &writable()).unwrap();
        let mut buf = vec![0u8; 4096];
        dev.read_at(&mut buf, 8192).unwrap();
        // a large write and read take the parallel path
        let big = vec![0x5au8; 2 << 20];
        dev.write_at(&big, 4096).unwrap();
        let mut back = vec![0u8; 2 << 20];
        dev.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, big);
        dev.write_zeroes(0, 1000, false).unwrap();
        dev.discard(1 << 20, 65536).unwrap();
        dev.flush().unwrap();
        assert_eq!(fs::read(&raw).unwrap(), fs::read(&test).unwrap());
        let counts = dev.io_counts();
        for side in [counts.test, counts.raw] {
            assert_eq!(side.written, 2 << 20);
            assert_eq!(side.read, 4096 + (2 << 20));
        }
        assert_eq!((counts.test.discarded, counts.raw.discarded), (65536, 0));
        // the test side punched a hole: the reference is zeroed to match,
        // without reading either side
        assert_eq!(
            (counts.test.zeroed, counts.raw.zeroed),
            (1000, 1000 + 65536)
        );
    }

    #[test]
    fn mismatch_names_the_first_differing_sector() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, test) = images(dir.path(), 1 << 20);
        let mut bytes = fs::read(&test).unwrap();
        bytes[1536 + 7] ^= 0xff;
        fs::write(&test, &bytes).unwrap();
        let dev = Blkverify::open(&raw, &test, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 2048];
        let err = dev.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "blkverify: read sector_num=0 nb_sectors=4 contents mismatch in sector 3"
        );
        match err {
            Error::Mismatch(m) => assert_eq!(m.first_byte, 1536 + 7),
            other => panic!("unexpected {other:?}"),
        }
        // the same difference found by a large (parallel) read
        let mut buf = vec![0u8; 1 << 20];
        let err = dev.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "blkverify: read sector_num=0 nb_sectors=2048 contents mismatch in sector 3"
        );
    }

    #[test]
    fn one_sided_failure_is_a_return_value_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, test) = images(dir.path(), 1 << 20);
        // the reference is one sector shorter than the test image
        let bytes = fs::read(&raw).unwrap();
        fs::write(&raw, &bytes[..(1 << 20) - 512]).unwrap();
        let dev = Blkverify::open(&raw, &test, &writable()).unwrap();
        let err = dev.write_at(&[1u8; 512], (1 << 20) - 512).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "blkverify: write sector_num=2047 nb_sectors=1 return value mismatch 0 != -{}",
                libc::EINVAL
            )
        );
    }

    #[test]
    fn request_sectors_cover_unaligned_ranges() {
        assert_eq!(request_sectors(0, 512), (0, 1));
        assert_eq!(request_sectors(0, 2048), (0, 4));
        assert_eq!(request_sectors(100, 1000), (0, 3));
        assert_eq!(request_sectors(4096, 0), (8, 0));
    }
}
