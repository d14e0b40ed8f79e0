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
