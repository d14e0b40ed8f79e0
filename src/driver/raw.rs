//! The raw driver: guest offset N is file offset N. Holes (`SEEK_HOLE`) map as
//! zeros, so sparse references cost nothing to verify.

use super::{check_range, BlockDriver, Extent, Mapping};
use crate::error::Result;
use crate::storage::Storage;
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
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn path(&self) -> &Path {
        self.storage.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        512
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size, offset, buf.len() as u64)?;
        self.storage.read_exact_at(buf, offset)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_range(self.path(), self.size, offset, max_len.min(1))?;
        let len = max_len.min(self.size - offset).max(1);
        let (length, mapping) = match self.storage.next_data(offset) {
            Some((start, _)) if start > offset => {
                (len.min(start - offset), Mapping::Zero { allocated: false })
            }
            Some((start, end)) if start == offset && end > offset => (
                len.min(end - offset),
                Mapping::Data {
                    host_offset: offset,
                },
            ),
            _ => (
                len,
                Mapping::Data {
                    host_offset: offset,
                },
            ),
        };
        Ok(Extent {
            offset,
            length,
            mapping,
        })
    }

    fn info(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}
