//! A file or block device read with `pread`.

use super::Storage;
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
}

impl FileStorage {
    /// Open `path` read-only.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        if file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .is_dir()
        {
            return Err(Error::io(
                path,
                "open",
                io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
        })
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
}
