//! A file or block device: `pread`/`pwrite`, `fallocate` to zero ranges,
//! `fdatasync` to flush, and read-only mapped windows. A store also keeps
//! QEMU's image locks (see `lock.rs`) for as long as it is open.

use super::lock::{ImageLock, Perms};
use super::{Storage, View};
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A file opened for positional I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    /// QEMU's image locks on this file, and on files the image names (a data
    /// file), held until the store is dropped.
    locks: Vec<ImageLock>,
    /// Write-behind of sequential writes.
    behind: WriteBehind,
}

/// A run of back-to-back writes starts its writeback at once each time it
/// grows by this many bytes (see [`FileStorage::start_writeback`]).
pub const WRITE_BEHIND_MIN: u64 = 1 << 20;

/// The run of back-to-back writes whose writeback has not been started yet.
#[derive(Debug, Default)]
struct WriteBehind {
    run: std::sync::Mutex<(u64, u64)>,
}

impl WriteBehind {
    /// Note a write of `len` bytes at `offset`; returns the range to start
    /// writing back, once the run it extends (or starts) is long enough.
    /// Writes elsewhere start a new run: random writes never start one.
    fn wrote(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let mut run = self
            .run
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, end) = *run;
        let new_end = offset.saturating_add(len);
        let start = if offset == end { start } else { offset };
        if new_end - start >= WRITE_BEHIND_MIN {
            *run = (new_end, new_end);
            Some((start, new_end - start))
        } else {
            *run = (start, new_end);
            None
        }
    }
}

impl FileStorage {
    /// Start writing `[offset, offset + len)` back to the disk now, without
    /// waiting for it: write-behind for sequential writes (see
    /// [`WRITE_BEHIND_MIN`]). A stream of them (a `qemu-img convert` into a
    /// served image) otherwise leaves the kernel to start writeback only once
    /// gigabytes are dirty, and the client's final flush then waits for all
    /// of them, the disk having idled until then.
    /// Durability is unchanged: only a flush promises it. Failures are
    /// ignored here (a descriptor that cannot do this, such as a pipe); a
    /// write error the disk reports surfaces at the next flush.
    fn start_writeback(&self, offset: u64, len: u64) {
        let (Ok(start), Ok(length)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return;
        };
        // SAFETY: sync_file_range on a descriptor we own, with a checked
        // range; it starts I/O of the file's pages and touches no memory of
        // ours.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start,
                length,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Open `path` read-only.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        Self::open_existing(path, false)
    }

    /// Open `path` for reading and writing. The file must exist.
    pub fn open_read_write(path: &Path) -> Result<Self> {
        Self::open_existing(path, true)
    }

    fn open_existing(path: &Path, writable: bool) -> Result<Self> {
        let context = if writable { "open for writing" } else { "open" };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, context, e))?;
        if file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .is_dir()
        {
            return Err(Error::io(
                path,
                context,
                io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
            locks: Vec::new(),
            behind: WriteBehind::default(),
        })
    }

    /// Create (or truncate) `path` and open it for reading and writing.
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable: true,
            locks: Vec::new(),
            behind: WriteBehind::default(),
        })
    }

    /// Take QEMU's image locks `perms` on this file (on its open file
    /// description, so they go away with the store); an error if another
    /// process's locks forbid them.
    pub fn lock(&mut self, perms: Perms) -> Result<()> {
        let descriptor = self
            .file
            .try_clone()
            .map_err(|e| Error::io(&self.path, "duplicate the descriptor to lock", e))?;
        let lock = ImageLock::acquire(descriptor, &self.path, perms)?;
        self.locks.push(lock);
        Ok(())
    }

    /// Keep `lock` (on a file this image names) for as long as this store.
    pub fn hold(&mut self, lock: ImageLock) {
        self.locks.push(lock);
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly(self.path.clone()))
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let offset = libc::off_t::try_from(offset).ok()?;
        // SAFETY: lseek on a descriptor we own; it only moves the file position,
        // which no other code here relies on (all reads are positional).
        let result = unsafe { libc::lseek(self.file.as_raw_fd(), offset, whence) };
        u64::try_from(result).ok()
    }
}

impl Storage for FileStorage {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> Result<u64> {
        // Seeking to the end works for block devices, whose metadata length is 0.
        (&self.file)
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(&self.path, "find the size", e))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let context = format!("read {} bytes at offset {:#x}", buf.len(), offset);
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "unexpected end of file (was it truncated?)",
                )
            } else {
                e
            };
            Error::io(&self.path, context, e)
        })
    }

    fn next_data(&self, offset: u64) -> Option<(u64, u64)> {
        let start = match self.seek(offset, libc::SEEK_DATA) {
            Some(start) => start,
            None => {
                // ENXIO: no data at or after offset. Anything else: unknown.
                let err = io::Error::last_os_error();
                return if err.raw_os_error() == Some(libc::ENXIO) {
                    Some((u64::MAX, u64::MAX))
                } else {
                    None
                };
            }
        };
        let end = self.seek(start, libc::SEEK_HOLE)?;
        Some((start, end))
    }

    fn view(&self, offset: u64, len: usize) -> Option<View> {
        // Only read-only stores are mapped: the view must not race with our own writes.
        if self.writable {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        if end > self.len().ok()? {
            return None;
        }
        View::map(self.file.as_raw_fd(), offset, len)
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::io(
                &self.path,
                format!("write {} bytes at offset {:#x}", buf.len(), offset),
                e,
            )
        })?;
        if let Some((start, len)) = self.behind.wrote(offset, buf.len() as u64) {
            self.start_writeback(start, len);
        }
        Ok(())
    }

    fn punch_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let (Ok(start), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(Error::InvalidArgument(format!(
                "{}: range at {offset:#x} of {len} bytes is too large",
                self.path.display()
            )));
        };
        // SAFETY: fallocate on a descriptor we own, with a checked range; it
        // changes file contents only, never memory.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                length,
            )
        };
        if punched == 0 {
            return Ok(());
        }
        // The filesystem cannot punch holes (or this is a block device): write
        // zeros, but never past the current end.
        let file_len = self.len()?;
        let end = offset.saturating_add(len).min(file_len);
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            self.write_all_at(zeros.get(..n).unwrap_or(&[]), at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let (Ok(start), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(Error::InvalidArgument(format!(
                "{}: range at {offset:#x} of {len} bytes is too large",
                self.path.display()
            )));
        };
        // SAFETY: fallocate on a descriptor we own, with a checked range; it
        // changes file contents only, never memory.
        let zeroed = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE,
                start,
                length,
            )
        };
        if zeroed == 0 {
            return Ok(());
        }
        // No ZERO_RANGE here (tmpfs before 6.x, some filesystems): punch a
        // hole (writing zeros where even that fails), then extend.
        let file_len = self.len()?;
        if offset < file_len {
            self.punch_zeroes(offset, end.min(file_len) - offset)?;
        }
        if end > file_len {
            self.set_len(end)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        self.file
            .set_len(len)
            .map_err(|e| Error::io(&self.path, format!("set length to {len}"), e))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "flush", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_behind_starts_runs_of_sequential_writes_only() {
        let behind = WriteBehind::default();
        let k = 64 * 1024;
        // Sixteen 64 KiB writes back to back make one 1 MiB run.
        for i in 0..15 {
            assert_eq!(behind.wrote(i * k, k), None);
        }
        assert_eq!(behind.wrote(15 * k, k), Some((0, 16 * k)));
        // The next run starts where that one ended.
        assert_eq!(behind.wrote(16 * k, k), None);
        // A write elsewhere starts a new run: random writes never add up.
        for i in 0..64 {
            assert_eq!(behind.wrote((i * 7919 % 1000) * 4 * k, 4096), None);
        }
        // One large write is a run of its own.
        assert_eq!(behind.wrote(1 << 30, 2 << 20), Some((1 << 30, 2 << 20)));
    }

    #[test]
    fn zero_range_zeroes_inside_and_extends_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0x11u8; 8192]).unwrap();
        let store = FileStorage::open_read_write(&path).unwrap();
        store.zero_range(1000, 2000).unwrap();
        store.zero_range(7000, 3000).unwrap();
        assert_eq!(store.len().unwrap(), 10000);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..1000].iter().all(|b| *b == 0x11));
        assert!(bytes[1000..3000].iter().all(|b| *b == 0));
        assert!(bytes[3000..7000].iter().all(|b| *b == 0x11));
        assert!(bytes[7000..].iter().all(|b| *b == 0));
    }
}
