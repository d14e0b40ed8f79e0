//! An in-memory store, for tests and fuzzing: the same contract as a file,
//! with no disk and no nondeterminism.

use super::Storage;
use crate::error::{Error, Result};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

/// Bytes in memory, behind a lock so it can be shared like a file.
#[derive(Debug)]
pub struct MemStorage {
    path: PathBuf,
    bytes: RwLock<Vec<u8>>,
    writable: bool,
}

impl MemStorage {
    /// A store holding `bytes`, named `path` in messages.
    pub fn new(path: impl Into<PathBuf>, bytes: Vec<u8>, writable: bool) -> Self {
        MemStorage {
            path: path.into(),
            bytes: RwLock::new(bytes),
            writable,
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly(self.path.clone()))
        }
    }
}

impl Storage for MemStorage {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> Result<u64> {
        Ok(self
            .bytes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(PoisonError::into_inner);
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| bytes.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| {
                Error::io(
                    &self.path,
                    format!("read {} bytes at offset {offset:#x}", buf.len()),
                    io::Error::new(io::ErrorKind::UnexpectedEof, "unexpected end of file"),
                )
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let mut bytes = self.bytes.write().unwrap_or_else(PoisonError::into_inner);
        let start = usize::try_from(offset)
            .map_err(|_| Error::InvalidArgument(format!("offset {offset} too large")))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| Error::InvalidArgument(format!("offset {offset} too large")))?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        if let Some(dst) = bytes.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    fn punch_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let mut bytes = self.bytes.write().unwrap_or_else(PoisonError::into_inner);
        let size = bytes.len() as u64;
        let start = offset.min(size) as usize;
        let end = offset.saturating_add(len).min(size) as usize;
        if let Some(dst) = bytes.get_mut(start..end) {
            dst.fill(0);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        let len = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("length {len} too large")))?;
        self.bytes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .resize(len, 0);
        Ok(())
    }
}

/// A store that fills up: a write that would take `inner` past `limit` bytes
/// fails with `ENOSPC`, as on a full filesystem, after writing nothing. Used
/// to check that a writer leaves a consistent image when the disk is full,
/// and to keep fuzzed images from growing without bound.
pub struct LimitedStorage<S> {
    inner: S,
    limit: u64,
}

impl<S: Storage> LimitedStorage<S> {
    /// Wrap `inner`, refusing to let it grow past `limit` bytes.
    pub fn new(inner: S, limit: u64) -> Self {
        LimitedStorage { inner, limit }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn check_room(&self, end: Option<u64>) -> Result<()> {
        match end {
            Some(end) if end <= self.limit.max(self.inner.len()?) => Ok(()),
            _ => Err(Error::io(
                self.inner.path(),
                format!("write (the store is full at {} bytes)", self.limit),
                io::Error::from_raw_os_error(libc::ENOSPC),
            )),
        }
    }
}

impl<S: Storage> Storage for LimitedStorage<S> {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_room(offset.checked_add(buf.len() as u64))?;
        self.inner.write_all_at(buf, offset)
    }
    fn punch_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.punch_zeroes(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.check_room(Some(len))?;
        self.inner.set_len(len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_fail_and_writes_grow() {
        let m = MemStorage::new("m", vec![1, 2, 3], true);
        let mut b = [0u8; 2];
        m.read_exact_at(&mut b, 1).unwrap();
        assert_eq!(b, [2, 3]);
        assert!(m.read_exact_at(&mut b, 2).is_err());
        assert!(m.read_exact_at(&mut b, u64::MAX).is_err());
        m.write_all_at(&[9], 5).unwrap();
        assert_eq!(m.snapshot(), vec![1, 2, 3, 0, 0, 9]);
        let ro = MemStorage::new("r", vec![0], false);
        assert!(ro.write_all_at(&[1], 0).is_err());
    }

    #[test]
    fn a_limited_store_fails_with_enospc_and_writes_nothing() {
        let m = LimitedStorage::new(MemStorage::new("m", vec![0; 4], true), 8);
        m.write_all_at(&[1; 4], 4).unwrap();
        let err = m.write_all_at(&[2; 2], 7).unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC);
        assert_eq!(m.inner().snapshot(), vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert!(m.write_all_at(&[3], u64::MAX).is_err());
    }
}
