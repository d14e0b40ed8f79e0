//! What the formats share to serve reads: the one loop that reads a guest
//! range piece by piece through a format's map, the read of an unallocated
//! piece from the backing file, the zero-copy view through the map, and the
//! map of a flat layout (guest offset N at file offset N).

use super::{check_range, BlockDriver, Extent, Mapping};
use crate::error::{Error, Result};
use crate::storage::{Storage, View};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// Fill `buf` with the guest bytes at `offset` of the image at `path`, one
/// mapped piece at a time: the read loop of every format that maps its guest
/// range. `lookup(guest, max_len)` says how long the piece at `guest` is (at
/// most `max_len`) and what backs it; `read(piece, guest, what)` fills it.
/// The caller has checked the range.
///
/// A lookup that answers an empty piece breaks the map's contract (an extent
/// is at least one byte long): it is an internal error, never a byte skipped
/// or read twice. A piece longer than asked is cut to the request.
pub(crate) fn read_through_map<T>(
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    mut lookup: impl FnMut(u64, u64) -> Result<(u64, T)>,
    mut read: impl FnMut(&mut [u8], u64, T) -> Result<()>,
) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let guest = offset + done as u64;
        let left = buf.len() - done;
        let (length, what) = lookup(guest, left as u64)?;
        if length == 0 {
            return Err(Error::Internal(format!(
                "{}: the map gave an empty extent at guest offset {guest:#x}",
                path.display()
            )));
        }
        // At most `left`, so it fits a usize.
        let len = length.min(left as u64) as usize;
        let piece = buf.get_mut(done..done + len).ok_or_else(|| {
            Error::Internal(format!(
                "{}: extent at guest offset {guest:#x} lies outside the request",
                path.display()
            ))
        })?;
        read(piece, guest, what)?;
        done += len;
    }
    Ok(())
}

/// [`read_through_map`] through `image`'s own [`BlockDriver::map`]: each
/// piece is an extent, which must start where the piece does.
pub(crate) fn read_mapped<D: BlockDriver + ?Sized>(
    image: &D,
    buf: &mut [u8],
    offset: u64,
    read: impl FnMut(&mut [u8], u64, Mapping) -> Result<()>,
) -> Result<()> {
    let lookup = |guest: u64, max_len: u64| {
        let extent = image.map(guest, max_len)?;
        if extent.offset != guest {
            return Err(Error::Internal(format!(
                "{}: the map of guest offset {guest:#x} gave an extent at {:#x}",
                image.path().display(),
                extent.offset
            )));
        }
        Ok((extent.length, extent.mapping))
    };
    read_through_map(image.path(), buf, offset, lookup, read)
}

/// Fill `buf` with what an unallocated range at guest `offset` reads: the
/// backing file's bytes, zeros past its end, or zeros when there is none.
pub(crate) fn read_backing(
    backing: Option<&dyn BlockDriver>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    match backing {
        Some(backing) if offset < backing.size() => {
            // At most `buf.len()`, so it fits a usize.
            let stored = (backing.size() - offset).min(buf.len() as u64) as usize;
            let (head, tail) = buf.split_at_mut(stored);
            backing.read_at(head, offset)?;
            tail.fill(0);
            Ok(())
        }
        _ => {
            buf.fill(0);
            Ok(())
        }
    }
}

/// A zero-copy view of the `len` guest bytes of `image` at `offset`, for a
/// driver whose data extents live in `data`: when one extent covers the whole
/// range and it is mapped data (a window of `data`), or unallocated with a
/// backing file long enough to give its own view. `None` otherwise: the caller
/// reads the range with `read_at`.
pub(crate) fn view_through_map(
    image: &dyn BlockDriver,
    data: &dyn Storage,
    backing: Option<&Arc<dyn BlockDriver>>,
    offset: u64,
    len: usize,
) -> Result<Option<View>> {
    check_range(image.path(), image.size(), offset, len as u64)?;
    let extent = image.map(offset, len as u64)?;
    if extent.length < len as u64 {
        return Ok(None);
    }
    match extent.mapping {
        // Past the end of `data` the store refuses to map; read_at handles it.
        Mapping::Data { host_offset } => Ok(data.view(host_offset, len)),
        Mapping::Unallocated => match backing {
            Some(backing) if offset + len as u64 <= backing.size() => {
                backing.read_view(offset, len)
            }
            _ => Ok(None),
        },
        Mapping::Zero { .. } | Mapping::Compressed { .. } => Ok(None),
    }
}

/// The mapping at `offset` of a disk of `size` bytes stored flat at the start
/// of `storage` (guest offset N is file offset N: raw images, fixed VHDs), at
/// most `max_len` long. Holes map as zeros. `offset` must lie inside the disk.
pub(crate) fn map_flat(
    storage: &dyn Storage,
    size: u64,
    offset: u64,
    max_len: u64,
) -> Result<Extent> {
    let len = max_len.min(size.saturating_sub(offset)).max(1);
    let (length, mapping) = match storage.next_data(offset) {
        Some((start, _)) if start == u64::MAX => {
            // No data from here to the end of the file. If the file is now
            // shorter than the disk, it shrank under us: reading zeros
            // would be a silent wrong answer.
            let now = storage.len()?;
            if now < size {
                return Err(Error::io(
                    storage.path(),
                    format!("map offset {offset:#x}"),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file shrank to {now} bytes, under the disk's {size}"),
                    ),
                ));
            }
            (len, Mapping::Zero { allocated: false })
        }
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
