//! The fuzz targets' harnesses. They live in the library so that the targets
//! (fuzz/fuzz_targets/) and the regression replay (tests/fuzz_regressions.rs)
//! run exactly the same code on an input: a crash the fuzzer found is replayed
//! as it was found, not by a copy that may have drifted.

use crate::digest::BlockDigests;
use crate::driver::qcow2::{header, l2, Qcow2};
use crate::driver::vdi::Vdi;
use crate::driver::vhdx::{self, Vhdx};
use crate::driver::vmdk::Vmdk;
use crate::driver::vpc::Vpc;
use crate::driver::{BlockDriver, OpenOptions, SECTOR_SIZE};
use crate::error::Error;
use crate::record::trace::parse_trace;
use crate::storage::{LimitedStorage, MemStorage};
use std::sync::Arc;

/// What one harness run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Why the image did not open, if it did not.
    pub open_error: Option<Error>,
    /// The errors of the operations run on the opened image.
    pub op_errors: Vec<Error>,
}

/// Bytes per operation in a [`write_image`] input.
pub const OP_BYTES: usize = 8;

/// The most a [`write_image`] store may grow to (ENOSPC past it), so a hostile
/// offset cannot make the image itself grow without bound.
const STORE_LIMIT: u64 = 64 << 20;

fn options(writable: bool) -> OpenOptions {
    let mut options = OpenOptions::default();
    options.backing.follow = false;
    options.writable = writable;
    options
}

/// Parse `data` as the first cluster of a qcow2 image named `name` (the file
/// being exactly `data`): a header, or an error in `open_error`.
pub fn header(data: &[u8], name: &str) -> Outcome {
    Outcome {
        open_error: header::parse(std::path::Path::new(name), data, data.len() as u64).err(),
        ..Outcome::default()
    }
}

/// Bytes of an [`l2_entry`] input: the entry and the subcluster bitmap (both
/// big-endian), the cluster size (`cluster_bits - 9`, taken modulo 13), the
/// subcluster index (modulo 32) and a flags byte (bit 0: the image has an
/// external data file). Shorter inputs are padded with zeros.
pub const L2_ENTRY_INPUT_BYTES: usize = 19;

/// Decode the input's entry as an L1 entry, a standard L2 entry and (for
/// clusters of 16 KiB or more) an extended L2 entry; returns the errors.
pub fn l2_entry(data: &[u8]) -> Vec<String> {
    let mut input = [0u8; L2_ENTRY_INPUT_BYTES];
    for (dst, src) in input.iter_mut().zip(data) {
        *dst = *src;
    }
    let [e0, e1, e2, e3, e4, e5, e6, e7, b0, b1, b2, b3, b4, b5, b6, b7, bits, sub, flags] = input;
    let entry = u64::from_be_bytes([e0, e1, e2, e3, e4, e5, e6, e7]);
    let bitmap = u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    let cluster_bits = 9 + u32::from(bits) % 13;
    let data_file = flags & 1 != 0;
    let mut errors = Vec::new();
    errors.extend(l2::l1_offset(entry).err());
    errors.extend(l2::decode(entry, cluster_bits, data_file).err());
    if cluster_bits >= 14 {
        let index = u32::from(sub) % 32;
        errors.extend(l2::decode_subcluster(entry, bitmap, index, cluster_bits, data_file).err());
    }
    errors
}

/// Parse `data` as a block digests file named `name`; if it parses, look up
/// the first, the last and a past-the-end block and walk all its runs.
pub fn digests_file(data: &[u8], name: &str) -> Outcome {
    match BlockDigests::parse(std::path::Path::new(name), data) {
        Err(e) => Outcome {
            open_error: Some(e),
            ..Outcome::default()
        },
        Ok(file) => {
            let count = file.block_count();
            for index in [0, count.saturating_sub(1), count, u64::MAX] {
                let _ = file.block(index);
            }
            let covered: u64 = file.runs_in(0, count).map(|r| r.count).sum();
            assert_eq!(
                covered, count,
                "the runs of a parsed file cover every block"
            );
            Outcome::default()
        }
    }
}

/// Parse `data` as a serve trace named `name`; if it parses, rebuild every
/// write's data (up to 64 MiB in all) and say how it ended.
pub fn trace_file(data: &[u8], name: &str) -> Outcome {
    match parse_trace(name, data) {
        Err(e) => Outcome {
            open_error: Some(e),
            ..Outcome::default()
        },
        Ok(trace) => {
            assert_eq!(trace.ops.len(), trace.connections.len());
            let mut budget: u64 = 64 << 20;
            for (position, op) in trace.ops.iter().enumerate() {
                if op.carries_data() && op.length <= budget {
                    budget -= op.length;
                    let mut buf = vec![0u8; op.length as usize];
                    assert!(
                        trace.fill(position, &mut buf),
                        "a parsed write has its data"
                    );
                }
            }
            let _ = trace.ending();
            Outcome::default()
        }
    }
}

/// Open `data` as a read-only qcow2 image named `name`, map its first 8 MiB and
/// read and locate a few scattered ranges.
pub fn read_image(data: &[u8], name: &str) -> Outcome {
    let storage = Arc::new(MemStorage::new(name, data.to_vec(), false));
    match Qcow2::open(storage, None, &options(false), &[]) {
        Ok(image) => exercise_reads(&image),
        Err(e) => Outcome {
            open_error: Some(e),
            ..Outcome::default()
        },
    }
}

/// Open `data` as a VMDK disk named `name` (a sparse extent, stream-optimized
/// or not, or a text descriptor; files it names resolve next to `name`, which
/// should not exist; parents are never followed), then map and read it as
/// [`read_image`] does.
pub fn read_vmdk(data: &[u8], name: &str) -> Outcome {
    let storage = Arc::new(MemStorage::new(name, data.to_vec(), false));
    match Vmdk::open(storage, &options(false), &[]) {
        Ok(image) => exercise_reads(&image),
        Err(e) => Outcome {
            open_error: Some(e),
            ..Outcome::default()
        },
    }
}

/// Open `data` as a read-only VHD (`vpc`) named `name` and read it as
/// [`read_image`] does (parents are never followed).
pub fn read_vpc(data: &[u8], name: &str) -> Outcome {
    let storage = Arc::new(MemStorage::new(name, data.to_vec(), false));
    match Vpc::open(storage, &options(false), &[]) {
        Ok(image) => exercise_reads(&image),
        Err(e) => Outcome {
            open_error: Some(e),
            ..Outcome::default()
        },
    }
}

/// Open `data` as a read-only VDI image named `name` and read it as
/// [`read_image`] does.
pub fn read_vdi(data: &[u8], name: &str) -> Outcome {
    let storage = Arc::new(MemStorage::new(name, data.to_vec(), false));
    match Vdi::open(storage) {
        Ok(image) => exercise_reads(&image),
        Err(e) => Outcome {
            open_error: Some(e),
            ..Outcome::default()
        },
    }
}

/// Open `data` as a read-only VHDX image named `name` (a dirty log is
/// replayed in memory; a parent is never followed), then map and read it as
/// [`read_image`] does.
///
/// When byte 8 (in the creator field, which nothing reads) is odd, the headers'
/// and region tables' checksums are recomputed first, so that mutations reach
/// the metadata, the BAT and the log instead of stopping at a checksum.
pub fn read_vhdx(data: &[u8], name: &str) -> Outcome {
    let mut image = data.to_vec();
    if data.get(8).is_some_and(|b| b & 1 == 1) {
        let structures = [
            (64 << 10, 4 << 10),
            (128 << 10, 4 << 10),
            (192 << 10, 64 << 10),
            (256 << 10, 64 << 10),
        ];
        for (offset, len) in structures {
            if let Some(bytes) = image.get_mut(offset..offset + len) {
                let crc = vhdx::header::checksum(bytes, 4);
                if let Some(field) = bytes.get_mut(4..8) {
                    field.copy_from_slice(&crc.to_le_bytes());
                }
            }
        }
    }
    let storage = Arc::new(MemStorage::new(name, image, false));
    match Vhdx::open(storage, &options(false), &[]) {
        Ok(image) => exercise_reads(&image),
        Err(e) => Outcome {
            open_error: Some(e),
            ..Outcome::default()
        },
    }
}

/// Map the first 8 MiB of an opened image, and read and locate a few
/// scattered ranges, collecting the errors.
fn exercise_reads(image: &dyn BlockDriver) -> Outcome {
    let mut outcome = Outcome::default();
    let size = image.size();
    let mut offset = 0u64;
    let mut extents = 0;
    while offset < size.min(8 << 20) && extents < 512 {
        match image.map(offset, size - offset) {
            Ok(e) => offset += e.length.max(1),
            Err(e) => {
                outcome.op_errors.push(e);
                offset += SECTOR_SIZE;
            }
        }
        extents += 1;
    }
    let mut buf = vec![0u8; 1 << 16];
    for probe in [
        0u64,
        SECTOR_SIZE,
        65536,
        size / 2,
        size.saturating_sub(4096),
    ] {
        if probe < size {
            let n = (size - probe).min(buf.len() as u64) as usize;
            if let Err(e) = image.read_at(buf.get_mut(..n).unwrap_or(&mut []), probe) {
                outcome.op_errors.push(e);
            }
            if let Err(e) = image.locate(probe) {
                outcome.op_errors.push(e);
            }
        }
    }
    outcome
}

/// `data` is a count byte, `count % 8` operations of [`OP_BYTES`] bytes, then
/// a qcow2 image. Open the image writable (named `name`, in a store capped at
/// 64 MiB), apply the writes, zero writes, discards, flushes and reads the
/// operations choose, close it, and open and read what is left.
pub fn write_image(data: &[u8], name: &str) -> Outcome {
    let mut outcome = Outcome::default();
    let Some((&count, rest)) = data.split_first() else {
        return outcome;
    };
    let ops_len = usize::from(count % 8) * OP_BYTES;
    if rest.len() < ops_len {
        return outcome;
    }
    let (ops, image) = rest.split_at(ops_len);
    let storage = Arc::new(LimitedStorage::new(
        MemStorage::new(name, image.to_vec(), true),
        STORE_LIMIT,
    ));
    let qcow2 = match Qcow2::open(storage.clone(), None, &options(true), &[]) {
        Ok(image) => image,
        Err(e) => {
            outcome.open_error = Some(e);
            return outcome;
        }
    };
    let size = qcow2.size();
    if size == 0 {
        return outcome;
    }
    let payload = vec![0x5au8; 1 << 19];
    for op in ops.chunks_exact(OP_BYTES) {
        let Ok([kind, o1, o2, o3, o4, l1, l2, _]) = <[u8; OP_BYTES]>::try_from(op) else {
            continue;
        };
        let offset = u64::from(u32::from_be_bytes([o1, o2, o3, o4])) * SECTOR_SIZE % size;
        let len = (u64::from(u16::from_be_bytes([l1, l2])) * 8 + 1).min(size - offset);
        let result = match kind % 6 {
            0 => qcow2.write_at(payload.get(..len as usize).unwrap_or(&[]), offset),
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
            outcome.op_errors.push(e);
        }
    }
    drop(qcow2);
    let after = storage.inner().snapshot();
    let reread = Arc::new(MemStorage::new(name, after, false));
    if let Ok(image) = Qcow2::open(reread, None, &options(false), &[]) {
        let mut buf = vec![0u8; 4096];
        let n = image.size().min(4096) as usize;
        if let Err(e) = image.read_at(buf.get_mut(..n).unwrap_or(&mut []), 0) {
            outcome.op_errors.push(e);
        }
    }
    outcome
}

/// The export a [`serve_connection`] input talks to: 1 MiB.
pub const SERVE_EXPORT_SIZE: u64 = 1 << 20;

/// The byte at which the two sides of [`serve_connection`]'s device differ
/// (the reference holds 0x01 there, the test side reads zero), so that
/// findings and every `--on-mismatch` policy are reached too.
pub const SERVE_PLANTED: u64 = (512 << 10) + 100;

/// What one [`serve_connection`] run came to.
#[derive(Debug, Default)]
pub struct ServeOutcome {
    /// The server's summary, or the error that ended it.
    pub summary: Option<crate::serve::Summary>,
    /// The error that ended the server, if one did.
    pub error: Option<Error>,
    /// The bytes the server sent back.
    pub replied: usize,
}

/// An empty qcow2 of [`SERVE_EXPORT_SIZE`] with 4 KiB clusters (many
/// clusters in a small export), made once per process by our own create.
fn empty_qcow2() -> &'static [u8] {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        use crate::driver::qcow2::create::{create, CreateOptions};
        let dir = std::env::temp_dir().join(format!("blkverify-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("empty.qcow2");
        let options = CreateOptions {
            size: Some(SERVE_EXPORT_SIZE),
            cluster_size: 4096,
            ..CreateOptions::default()
        };
        let bytes = create(&path, &options)
            .and_then(|()| std::fs::read(&path).map_err(|e| Error::io(&path, "read", e)));
        let _ = std::fs::remove_dir_all(&dir);
        bytes.unwrap_or_default()
    })
}

/// Feed `data` to the NBD server as one client's whole connection (the
/// handshake, options and requests), as nbdkit's `server/fuzzer.c` does:
/// the server runs on one end of a socket pair, a thread writes `data` into
/// the other and then closes its sending side, another takes the replies.
///
/// The export is named `fuzz` (the empty name works too). The device: a
/// raw reference in memory, and a test side in memory that
/// is an empty qcow2 (4 KiB clusters) when `data`'s length is even and raw
/// when odd; the reference differs at [`SERVE_PLANTED`]. The
/// `--on-mismatch` policy is `stop`, `eio` or `reference` by `data`'s length
/// too. Afterwards every sector but the planted one must read the same on
/// both sides (the server never wrote one side without the other, nor
/// outside a request's range), or the harness panics.
pub fn serve_connection(data: &[u8]) -> ServeOutcome {
    use crate::blkverify::Blkverify;
    use crate::driver::qcow2::Qcow2;
    use crate::driver::raw::Raw;
    use crate::nbd::Stream;
    use crate::serve::{Policy, ServeOptions};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    let size = SERVE_EXPORT_SIZE as usize;
    let mut reference = vec![0u8; size];
    if let Some(b) = reference.get_mut(SERVE_PLANTED as usize) {
        *b = 1;
    }
    let raw_store = Arc::new(MemStorage::new("/nonexistent/raw.img", reference, true));
    let Ok(raw) = Raw::new(raw_store.clone()) else {
        return ServeOutcome::default();
    };
    let test: Arc<dyn BlockDriver> = if data.len() % 2 == 0 {
        let store = Arc::new(LimitedStorage::new(
            MemStorage::new("/nonexistent/test.qcow2", empty_qcow2().to_vec(), true),
            STORE_LIMIT,
        ));
        match Qcow2::open(store, None, &options(true), &[]) {
            Ok(image) => Arc::new(image),
            Err(_) => return ServeOutcome::default(),
        }
    } else {
        let store = Arc::new(MemStorage::new(
            "/nonexistent/test.img",
            vec![0u8; size],
            true,
        ));
        match Raw::new(store) {
            Ok(image) => Arc::new(image),
            Err(_) => return ServeOutcome::default(),
        }
    };
    let device = Blkverify::new(Arc::new(raw), test);
    let options = ServeOptions {
        export_name: "fuzz".to_string(),
        on_mismatch: [Policy::Stop, Policy::Eio, Policy::Reference][data.len() / 2 % 3],
        handshake_limit: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        ..ServeOptions::default()
    };
    let Ok((server_end, client_end)) = UnixStream::pair() else {
        return ServeOutcome::default();
    };
    let Ok(mut input) = client_end.try_clone() else {
        return ServeOutcome::default();
    };
    let mut outcome = ServeOutcome::default();
    std::thread::scope(|scope| {
        let feeder = scope.spawn(move || {
            // The server may hang up before reading it all.
            let _ = input.write_all(data);
            let _ = input.shutdown(std::net::Shutdown::Write);
        });
        let replies = scope.spawn(move || {
            let mut client_end = client_end;
            let mut sink = [0u8; 1 << 16];
            let mut total = 0usize;
            while let Ok(n) = client_end.read(&mut sink) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        match crate::serve::serve_connection(&device, &options, Stream::Unix(server_end)) {
            Ok(summary) => outcome.summary = Some(summary),
            Err(e) => outcome.error = Some(e),
        }
        outcome.replied = replies.join().unwrap_or(0);
        // Joined, not left to the scope: the leak checker then finds every
        // thread's memory freed.
        let _ = feeder.join();
    });
    // Both sides alike, sector by sector, but for the planted one.
    let mut test_bytes = vec![0u8; size];
    let mut raw_bytes = vec![0u8; size];
    let read = device
        .test()
        .read_at(&mut test_bytes, 0)
        .and_then(|()| device.raw().read_at(&mut raw_bytes, 0));
    if read.is_ok() {
        let planted = SERVE_PLANTED / SECTOR_SIZE;
        for (i, (t, r)) in test_bytes
            .chunks(SECTOR_SIZE as usize)
            .zip(raw_bytes.chunks(SECTOR_SIZE as usize))
            .enumerate()
        {
            assert!(
                i as u64 == planted || t == r,
                "sector {i} differs between the sides after the connection"
            );
        }
    }
    outcome
}

/// The name the NBD client fuzz targets give their export in messages.
pub const NBD_FUZZ_NAME: &str = "nbd+unix:///fuzz?socket=/nonexistent/fuzz.sock";

/// Run our NBD client against a server whose every byte is `server`: a thread
/// writes `server` into one end of a socket pair and closes its sending side,
/// another takes what the client sends, and [`nbd_client_session`] runs on
/// the other end. No input may make the client panic, hang, or allocate more
/// than its own requests need.
pub fn nbd_client(server: &[u8]) -> Outcome {
    use crate::nbd::Stream;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let Ok((ours, theirs)) = UnixStream::pair() else {
        return Outcome::default();
    };
    let Ok(mut feed) = theirs.try_clone() else {
        return Outcome::default();
    };
    std::thread::scope(|scope| {
        let feeder = scope.spawn(move || {
            let _ = feed.write_all(server);
            let _ = feed.shutdown(std::net::Shutdown::Write);
        });
        let drain = scope.spawn(move || {
            let mut theirs = theirs;
            let mut sink = [0u8; 1 << 16];
            while matches!(theirs.read(&mut sink), Ok(n) if n > 0) {}
        });
        let outcome = nbd_client_session(Stream::Unix(ours));
        // Joined, not left to the scope: the leak checker then finds every
        // thread's memory freed.
        let _ = feeder.join();
        let _ = drain.join();
        outcome
    })
}

/// Our NBD client's session with the server on `stream` (a real one, when
/// the seeds are recorded, or made-up bytes): negotiate the export `fuzz`,
/// then read, read unaligned, map (block status), write, zero, trim, flush
/// and read the end; the outcome collects the errors.
pub fn nbd_client_session(stream: crate::nbd::Stream) -> Outcome {
    use crate::driver::nbd::Nbd;
    use std::time::Duration;

    let mut outcome = Outcome::default();
    let nbd = match Nbd::over_stream(stream, NBD_FUZZ_NAME, "fuzz", true, Duration::from_secs(5)) {
        Ok(nbd) => nbd,
        Err(e) => {
            outcome.open_error = Some(e);
            return outcome;
        }
    };
    let size = nbd.size();
    let mut buf = vec![0x3cu8; 8192];
    let at = |offset: u64, len: u64| -> Option<(u64, usize)> {
        (offset < size).then(|| (offset, (size - offset).min(len) as usize))
    };
    let mut ops: Vec<crate::error::Result<()>> = Vec::new();
    if let Some((offset, n)) = at(0, 4096) {
        ops.push(nbd.read_at(buf.get_mut(..n).unwrap_or(&mut []), offset));
    }
    if let Some((offset, n)) = at(100, 1000) {
        ops.push(nbd.read_at(buf.get_mut(..n).unwrap_or(&mut []), offset));
    }
    if size > 0 {
        ops.push(nbd.map(0, size).map(|_| ()));
    }
    if let Some((offset, n)) = at(4096, 4096) {
        ops.push(nbd.write_at(buf.get(..n).unwrap_or(&[]), offset));
    }
    if let Some((offset, n)) = at(8192, 8192) {
        ops.push(nbd.write_zeroes(offset, n as u64, true));
        ops.push(nbd.discard(offset, n as u64));
    }
    ops.push(nbd.flush());
    if let Some((offset, n)) = at(size.saturating_sub(8192), 8192) {
        ops.push(nbd.read_at(buf.get_mut(..n).unwrap_or(&mut []), offset));
    }
    outcome.op_errors = ops.into_iter().filter_map(|r| r.err()).collect();
    outcome
}

/// The export an [`nbd_replies`] input's handshake offers: 64 KiB.
pub const NBD_REPLIES_EXPORT: u64 = 64 << 10;

/// The bytes of an [`nbd_replies`] input before the replies: a byte that
/// chooses the handshake (bit 0: structured replies; bit 1: block status,
/// `base:allocation`; bits 2-3: the minimum block size, 1, 512, 4096 or
/// 64 KiB; bit 4: the export is read-only), then the context id the server
/// gives `base:allocation` (big-endian).
pub const NBD_REPLIES_PREFIX: usize = 5;

/// Run our NBD client (as [`nbd_client`]) against a server that negotiates
/// well, as `data`'s first bytes choose ([`NBD_REPLIES_PREFIX`]), and then
/// sends the rest of `data` as its replies: the replies' parsing (simple, structured, block status
/// chunks, errors) is reached without the fuzzer having to find a whole
/// handshake. The client's requests use cookies 1, 2, 3… in order.
pub fn nbd_replies(data: &[u8]) -> Outcome {
    use crate::nbd::wire::{
        OptionReply, BASE_ALLOCATION, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
        INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
        REP_ACK, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY,
        TFLAG_SEND_FLUSH, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
    };
    let mut prefix = [0u8; NBD_REPLIES_PREFIX];
    for (dst, src) in prefix.iter_mut().zip(data) {
        *dst = *src;
    }
    let [choice, c0, c1, c2, c3] = prefix;
    let context_id = u32::from_be_bytes([c0, c1, c2, c3]);
    let replies = data.get(NBD_REPLIES_PREFIX..).unwrap_or(&[]);
    let structured = choice & 1 != 0;
    let status = structured && choice & 2 != 0;
    let min_block: u32 = [1, 512, 4096, 65536][usize::from(choice >> 2 & 3)];
    let read_only = choice & 16 != 0;
    let mut server = Vec::new();
    server.extend_from_slice(&NBDMAGIC.to_be_bytes());
    server.extend_from_slice(&IHAVEOPT.to_be_bytes());
    server.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    let mut reply = |option: u32, reply: u32, payload: &[u8]| {
        let head = OptionReply {
            option,
            reply,
            length: payload.len() as u32,
        };
        server.extend_from_slice(&head.encode());
        server.extend_from_slice(payload);
    };
    if structured {
        reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        if status {
            let mut context = context_id.to_be_bytes().to_vec();
            context.extend_from_slice(BASE_ALLOCATION.as_bytes());
            reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &context);
        }
        reply(OPT_SET_META_CONTEXT, REP_ACK, &[]);
    } else {
        reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]);
    }
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    if read_only {
        flags |= TFLAG_READ_ONLY;
    }
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&NBD_REPLIES_EXPORT.to_be_bytes());
    export.extend_from_slice(&flags.to_be_bytes());
    reply(OPT_GO, REP_INFO, &export);
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for size in [min_block, 4096.max(min_block), 32 << 20] {
        sizes.extend_from_slice(&size.to_be_bytes());
    }
    reply(OPT_GO, REP_INFO, &sizes);
    reply(OPT_GO, REP_ACK, &[]);
    server.extend_from_slice(replies);
    nbd_client(&server)
}
