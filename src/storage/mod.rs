//! How bytes reach an image file: positional reads and writes that take
//! `&self`, so many threads can read one image at once without a shared cursor.
//!
//! Every store reads with `pread` ([`Storage::read_exact_at`]): a read error
//! is a value, which matters for a tool whose job is to survive a file that is
//! truncated or failing underneath it. Read-only files also offer zero-copy
//! memory-mapped windows ([`Storage::view`]) for the verifier's bulk compares,
//! with a `SIGBUS` guard that turns a failed page back into an error (see
//! `view.rs` for why, and what was measured). Writable stores write with
//! `pwrite`, zero ranges, change length and flush with `fdatasync`; they are
//! never mapped, so a view cannot race with our own writes.
//!
//! Backends: [`FileStorage`] (files and block devices) and [`MemStorage`]
//! (tests and fuzzing), with [`LimitedStorage`] to simulate a full disk, and
//! [`Overlay`], a copy-on-write overlay over a file (replays write there).
//! [`lock`] speaks QEMU's image-lock protocol on files.

mod file;
pub mod lock;
mod mem;
mod overlay;
mod view;

pub use file::FileStorage;
pub use lock::{ImageLock, Perm, Perms, Role};
pub use mem::{LimitedStorage, MemStorage};
pub use overlay::Overlay;
pub use view::View;

use crate::error::{usize_of, Error, Result};
use std::path::Path;

/// A byte store under an image: a file or a block device (or memory, in tests).
pub trait Storage: Send + Sync {
    /// The path it was opened from, for messages.
    fn path(&self) -> &Path;

    /// The current length in bytes.
    fn len(&self) -> Result<u64>;

    /// Whether the store is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fill `buf` from `offset`. A read that reaches past the end of the store is
    /// an error (`UnexpectedEof`): the caller decides whether that means a corrupt
    /// image or a file that shrank.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Where the next data at or after `offset` starts, and where it ends, if the
    /// store can tell holes apart (`SEEK_DATA`/`SEEK_HOLE`). `None` means "unknown:
    /// treat everything as data". `Some((start, end))` with `start >= len` means no
    /// more data.
    fn next_data(&self, offset: u64) -> Option<(u64, u64)> {
        let _ = offset;
        None
    }

    /// A zero-copy view of `len` bytes at `offset`, if the store can map them
    /// (see [`View`]). `None` means "read with `read_exact_at`" (not mappable,
    /// or the range is not inside the store). Check [`View::faulted`] after use.
    fn view(&self, offset: u64, len: usize) -> Option<View> {
        let _ = (offset, len);
        None
    }

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool {
        true
    }

    /// Write all of `buf` at `offset`, growing the store if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(Error::ReadOnly(self.path().to_path_buf()))
    }

    /// Make `[offset, offset + len)` read as zeros, deallocating it where the
    /// store can (a hole). Never changes the length.
    fn punch_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::ReadOnly(self.path().to_path_buf()))
    }

    /// Make `[offset, offset + len)` read as zeros, extending the store if the
    /// range ends past it. Stores that can do it without writing zeros
    /// (`fallocate`) do; this default writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; usize_of(len.min(1 << 20))?];
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let n = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(zeros.len());
            self.write_all_at(zeros.get(..n).unwrap_or(&[]), at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Set the length (truncate or extend with zeros).
    fn set_len(&self, len: u64) -> Result<()> {
        let _ = len;
        Err(Error::ReadOnly(self.path().to_path_buf()))
    }

    /// Make every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
