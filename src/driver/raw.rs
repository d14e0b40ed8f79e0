//! The raw driver: guest offset N is file offset N. Holes (`SEEK_HOLE`) map as
//! zeros, so sparse references cost nothing to verify.

use super::read::map_flat;
use super::{check_range, BlockDriver, Extent, Format, SECTOR_SIZE};
use crate::error::Result;
use crate::storage::{Storage, View};
use std::path::Path;
use std::sync::Arc;

/// A raw image.
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl Raw {
    /// Wrap a store; its current length is the disk size.
    pub fn new(storage: Arc<dyn Storage>) -> Result<Self> {
        let size = storage.len()?;
        Ok(Raw { storage, size })
    }
}

impl BlockDriver for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn path(&self) -> &Path {
        self.storage.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        SECTOR_SIZE
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size, offset, buf.len() as u64)?;
        self.storage.read_exact_at(buf, offset)
    }

    fn read_view(&self, offset: u64, len: usize) -> Result<Option<View>> {
        check_range(self.path(), self.size, offset, len as u64)?;
        Ok(self.storage.view(offset, len))
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_range(self.path(), self.size, offset, max_len.min(1))?;
        map_flat(self.storage.as_ref(), self.size, offset, max_len)
    }

    fn is_read_only(&self) -> bool {
        self.storage.is_read_only()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size, offset, buf.len() as u64)?;
        self.storage.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(self.path(), self.size, offset, len)?;
        if unmap {
            return self.storage.punch_zeroes(offset, len);
        }
        // Keep the range allocated: write real zeros.
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            self.storage
                .write_all_at(zeros.get(..n).unwrap_or(&[]), at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.path(), self.size, offset, len)?;
        // A raw reference must stay well defined: discarded ranges read as zeros.
        self.storage.punch_zeroes(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }
}
