//! Which of QEMU's image locks an opened image takes, on its own file and on
//! the files it names: the format and the part each file plays decide (see
//! [`crate::storage::lock`] for the protocol and QEMU's rule).
//!
//! Locks are taken before a driver reads past the header or writes anything,
//! so an image another process forbids us is left exactly as it was.

use super::{gate, qcow2, Format, OpenOptions};
use crate::error::Result;
use crate::storage::{FileStorage, ImageLock, Perms, Role, Storage};
use std::path::Path;

/// Lock `storage` (an image of `format`; `top` is false for a backing file;
/// `writable` when it is open for writing) as QEMU would, and for a qcow2 image its external data file too. The
/// locks are kept by `storage`, so they last as long as the image is open.
pub(super) fn lock_image(
    storage: &mut FileStorage,
    format: Format,
    options: &OpenOptions,
    top: bool,
    writable: bool,
) -> Result<()> {
    let metadata = format != Format::Raw;
    let role = if top {
        Role::Image { metadata }
    } else {
        Role::Backing { metadata }
    };
    storage.lock(Perms::for_role(role, writable, options.force_share))?;
    if format == Format::Qcow2 {
        if let Some(data_file) = qcow2_data_file(storage, options) {
            let perms = Perms::for_role(Role::DataFile, writable, options.force_share);
            // A data file that cannot be opened is the driver's error to report.
            if let Ok(file) = std::fs::File::open(&data_file) {
                storage.hold(ImageLock::acquire(file, &data_file, perms)?);
            }
        }
    }
    Ok(())
}

/// The external data file a qcow2 image names, read from its header before
/// the driver opens the image (which, writable, may write to it). `None` when
/// there is none, or when the header or the name is bad: the driver's open
/// then reports that.
fn qcow2_data_file(storage: &FileStorage, options: &OpenOptions) -> Option<std::path::PathBuf> {
    let path = storage.path();
    let file_len = storage.len().ok()?;
    let mut fixed =
        vec![0u8; usize::try_from(file_len.min(u64::from(qcow2::header::V3_HEADER_LENGTH))).ok()?];
    storage.read_exact_at(&mut fixed, 0).ok()?;
    let cluster_bits = qcow2::header::field::CLUSTER_BITS.get(&fixed)?.clamp(9, 21);
    let mut first = vec![0u8; usize::try_from(file_len.min(1u64 << cluster_bits)).ok()?];
    storage.read_exact_at(&mut first, 0).ok()?;
    let header = qcow2::header::parse(path, &first, file_len).ok()?;
    let name = header
        .data_file
        .as_deref()
        .filter(|_| header.has_data_file())?;
    gate::resolve_part(path, "qcow2", "external data file", name, options).ok()
}

/// Open `path`, an extent a VMDK descriptor names, read-only and locked as
/// QEMU locks it (checked against `/proc/locks` under `qemu-io -r`): a sparse
/// extent, with metadata of its own, as a read-only image (no writer, no
/// resize shared); a flat extent as a data file (no resize shared).
pub(super) fn open_extent(
    path: &Path,
    metadata: bool,
    options: &OpenOptions,
) -> Result<FileStorage> {
    let mut storage = FileStorage::open_read_only(path)?;
    let role = if metadata {
        Role::Image { metadata: true }
    } else {
        Role::DataFile
    };
    storage.lock(Perms::for_role(role, false, options.force_share))?;
    Ok(storage)
}

/// Whether `path`'s image is refused for writing under `options`: `-U` is for
/// read-only opens only, as QEMU says.
pub(super) fn check_force_share(path: &Path, options: &OpenOptions) -> Result<()> {
    if options.force_share && options.writable {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{}: force-share=on can only be used with read-only images",
            path.display()
        )));
    }
    Ok(())
}
