//! Stream-optimized extents: the markers, the footer, and compressed grains.
//!
//! A stream-optimized file is written front to back (an OVA is one), so what
//! a normal sparse extent keeps at the start comes last. Every compressed
//! grain is preceded by a grain marker (its sector in the extent and the
//! stream's length); metadata blocks are preceded by a marker sector of their
//! own (size 0, then a type). A writer that does not know the grain directory's
//! place when it writes the header sets `gdOffset` to all ones and repeats the
//! header, with the real place, as a footer:
//!
//! ```text
//!   ... grains ... [GT marker][GT] ... [GD marker][GD]
//!   [footer marker: size 0, type 3][footer: a header with the real gdOffset]
//!   [end-of-stream marker: all zeros]                         <- end of file
//! ```
//!
//! QEMU writes stream-optimized files with the grain directory in place (no
//! footer); VMware's tools write the footer. Both are read here.

use super::header::{self, RawHeader};
use crate::driver::SECTOR_SIZE;
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::cell::RefCell;

/// A metadata marker's type: the end of the stream.
pub const MARKER_END_OF_STREAM: u32 = 0;
/// A metadata marker's type: the footer follows.
pub const MARKER_FOOTER: u32 = 3;
/// Bytes of a grain marker before the compressed stream: `lba` (u64), `size` (u32).
pub const GRAIN_MARKER_BYTES: u64 = 12;

thread_local! {
    static INFLATE: RefCell<libdeflater::Decompressor> = RefCell::new(libdeflater::Decompressor::new());
}

/// The header a stream-optimized file keeps in its footer, read from the last
/// three sectors of the file (footer marker, footer, end-of-stream marker).
/// Called when the header's `gdOffset` is [`header::GD_AT_END`].
pub fn read_footer(file: &dyn Storage, file_len: u64) -> Result<RawHeader> {
    let corrupt = |m: String| {
        Error::corrupt(
            file.path(),
            format!("vmdk: gdOffset is 0xffffffffffffffff (the grain directory follows the grains), but {m}"),
        )
    };
    if file_len < 4 * SECTOR_SIZE {
        return Err(corrupt(format!(
            "the file is only {file_len} bytes, too short to end with a footer"
        )));
    }
    if file_len % SECTOR_SIZE != 0 {
        return Err(corrupt(format!(
            "the file's length {file_len} is not a whole number of sectors, so it cannot end with a footer"
        )));
    }
    let mut tail = [0u8; 3 * SECTOR_SIZE as usize];
    file.read_exact_at(&mut tail, file_len - 3 * SECTOR_SIZE)?;
    let (footer_marker, rest) = tail.split_at(SECTOR_SIZE as usize);
    let (footer, end_marker) = rest.split_at(SECTOR_SIZE as usize);
    let (_, size, kind) = metadata_marker(footer_marker);
    if size != 0 || kind != MARKER_FOOTER {
        return Err(corrupt(format!(
            "the third sector from the end is not a footer marker (size {size}, type {kind}; \
             a footer marker has size 0 and type {MARKER_FOOTER})"
        )));
    }
    let (sectors, size, kind) = metadata_marker(end_marker);
    if sectors != 0 || size != 0 || kind != MARKER_END_OF_STREAM {
        return Err(corrupt(format!(
            "the last sector is not an end-of-stream marker (value {sectors}, size {size}, type {kind}; \
             it must be all zeros)"
        )));
    }
    header::decode(footer)
        .ok_or_else(|| corrupt("the footer does not start with the magic KDMV".to_string()))
}

/// A metadata marker's `numSectors`, `size` and `type`.
fn metadata_marker(sector: &[u8]) -> (u64, u32, u32) {
    let u64_at = |at: usize| {
        sector
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let u32_at = |at: usize| {
        sector
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    (u64_at(0), u32_at(8), u32_at(12))
}

/// A grain marker: the grain's first sector in the extent, and the length of
/// the compressed stream that follows it.
pub fn grain_marker(bytes: &[u8; GRAIN_MARKER_BYTES as usize]) -> (u64, u32) {
    let (lba, size) = bytes.split_at(8);
    (
        lba.try_into().map_or(0, u64::from_le_bytes),
        size.try_into().map_or(0, u32::from_le_bytes),
    )
}

/// Inflate one grain's zlib stream (RFC 1950, as QEMU's `compress()` and
/// VMware write it) into `out`, which has room for a whole grain. Returns the
/// bytes it holds; a stream that holds more than `out` is an error, and so is
/// one whose Adler-32 checksum does not match.
pub fn inflate(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    INFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.zlib_decompress(input, out).map_err(|e| match e {
            libdeflater::DecompressionError::InsufficientSpace => {
                format!("zlib stream holds more than a grain ({} bytes)", out.len())
            }
            libdeflater::DecompressionError::BadData => {
                "zlib stream is invalid (bad data or checksum)".to_string()
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut packed = vec![0u8; c.zlib_compress_bound(data.len())];
        let n = c.zlib_compress(data, &mut packed).unwrap();
        packed.truncate(n);
        packed
    }

    #[test]
    fn inflates_and_bounds_a_grain() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        let packed = zlib(&data);
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(&packed, &mut out).unwrap(), 65536);
        assert_eq!(out, data);
        let mut small = vec![0u8; 4096];
        assert!(inflate(&packed, &mut small)
            .unwrap_err()
            .contains("more than a grain"));
        let mut flipped = packed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1; // the Adler-32 checksum
        assert!(inflate(&flipped, &mut out).unwrap_err().contains("invalid"));
        assert!(inflate(&packed[..packed.len() / 2], &mut out).is_err());
    }

    #[test]
    fn decodes_markers() {
        let mut m = [0u8; 12];
        m[..8].copy_from_slice(&384u64.to_le_bytes());
        m[8..].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(grain_marker(&m), (384, 1000));
        let mut sector = [0u8; 512];
        sector[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        assert_eq!(metadata_marker(&sector), (0, 0, MARKER_FOOTER));
    }
}
