//! Making new images: qcow2 (v2 or v3, any cluster size and refcount width,
//! extended L2, lazy refcounts, a backing file) and raw, the basics of
//! `qemu-img create`.
//!
//! A new qcow2 image is the header cluster, then an empty L1 table, then the
//! refcount table and blocks laid out to count all of it (and themselves).

use super::header::{self, field, INCOMPAT_EXTL2, MAGIC};
use super::refcount;
use crate::driver::{self, Format, OpenOptions, MAX_TABLE_BYTES, SECTOR_SIZE};
use crate::error::{usize_of, Error, Result};
use crate::storage::{FileStorage, Storage};
use std::path::Path;

/// What `create` makes.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The format of the new image.
    pub format: Format,
    /// Virtual size in bytes; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// qcow2: bytes per cluster (a power of two, 512 B to 2 MiB).
    pub cluster_size: u64,
    /// qcow2: 2 or 3 (`compat=0.10` or `1.1` in qemu-img's words).
    pub version: u32,
    /// qcow2: refcount width in bits (1, 2, 4, ... 64).
    pub refcount_bits: u32,
    /// qcow2: 128-bit L2 entries with subclusters.
    pub extended_l2: bool,
    /// qcow2: the lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// qcow2: the backing file name, stored as given.
    pub backing: Option<String>,
    /// qcow2: the backing file's format (probed when `None`).
    pub backing_format: Option<Format>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            format: Format::Qcow2,
            size: None,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            extended_l2: false,
            lazy_refcounts: false,
            backing: None,
            backing_format: None,
        }
    }
}

fn bad(path: &Path, message: String) -> Error {
    Error::InvalidArgument(format!("{}: {message}", path.display()))
}

/// Create the image at `path` (an existing file is replaced).
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    let size = match (options.size, &options.backing) {
        (Some(size), _) => size,
        (None, Some(name)) => backing_size(path, name, options.backing_format)?,
        (None, None) => return Err(bad(path, "an image size is required".into())),
    };
    if size % SECTOR_SIZE != 0 {
        return Err(bad(
            path,
            format!("image size {size} is not a multiple of {SECTOR_SIZE} bytes"),
        ));
    }
    match options.format {
        Format::Raw => {
            if options.backing.is_some() {
                return Err(bad(path, "raw images cannot have a backing file".into()));
            }
            let storage = FileStorage::create(path)?;
            storage.set_len(size)?;
            storage.flush()
        }
        Format::Qcow2 => create_qcow2(path, size, options),
        other => Err(bad(
            path,
            format!(
                "blkverify cannot create {} images (it creates {})",
                other.name(),
                Format::names(Format::can_write)
            ),
        )),
    }
}

fn backing_size(path: &Path, name: &str, format: Option<Format>) -> Result<u64> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let backing_path = crate::driver::gate::resolve_relative(dir, name);
    let opts = OpenOptions {
        format,
        ..OpenOptions::default()
    };
    Ok(driver::open(&backing_path, &opts)?.size())
}

fn create_qcow2(path: &Path, size: u64, o: &CreateOptions) -> Result<()> {
    check_qcow2_options(path, o)?;
    let cluster_size = o.cluster_size;
    let cluster_bits = cluster_size.trailing_zeros();
    let refcount_order = o.refcount_bits.trailing_zeros();
    let backing_format = match (&o.backing, o.backing_format) {
        (Some(name), None) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            let storage =
                FileStorage::open_read_only(&crate::driver::gate::resolve_relative(dir, name))?;
            Some(driver::probe(&storage)?)
        }
        (_, f) => f,
    };

    let entry_size: u64 = if o.extended_l2 { 16 } else { 8 };
    let bytes_per_l2 = (cluster_size / entry_size) * cluster_size;
    let l1_size = size.div_ceil(bytes_per_l2);
    if l1_size * 8 > MAX_TABLE_BYTES {
        return Err(bad(
            path,
            format!("size {size} needs an L1 table larger than QEMU allows"),
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cluster_size).max(1);
    let mut head = header_cluster(path, size, l1_size, o, backing_format)?;

    let mut counts = vec![1u64; usize_of(1 + l1_clusters)?];
    let layout = refcount::fresh_layout(&mut counts, cluster_bits, refcount_order)
        .map_err(|e| bad(path, e.to_string()))?;
    field::REFCOUNT_TABLE_OFFSET.put(&mut head, layout.table_offset);
    field::REFCOUNT_TABLE_CLUSTERS.put(&mut head, layout.table_clusters);

    let storage = FileStorage::create(path)?;
    storage.write_all_at(&head, 0)?;
    storage.set_len(counts.len() as u64 * cluster_size)?;
    for (offset, block) in &layout.blocks {
        storage.write_all_at(block, *offset)?;
    }
    storage.write_all_at(&layout.table, layout.table_offset)?;
    storage.flush()
}

/// The options a qcow2 image can be created with, as qemu-img accepts them:
/// the cluster size, the refcount width, the version and what needs version 3.
fn check_qcow2_options(path: &Path, o: &CreateOptions) -> Result<()> {
    let cluster_size = o.cluster_size;
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(bad(
            path,
            format!("cluster_size {cluster_size} must be a power of two from 512 to 2097152"),
        ));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(bad(
            path,
            format!(
                "refcount_bits {} must be a power of two from 1 to 64",
                o.refcount_bits
            ),
        ));
    }
    match o.version {
        2 => {
            if o.refcount_bits != 16 {
                return Err(bad(
                    path,
                    "version 2 (compat=0.10) images need refcount_bits=16".into(),
                ));
            }
            if o.extended_l2 || o.lazy_refcounts {
                return Err(bad(
                    path,
                    "extended_l2 and lazy_refcounts need version 3 (compat=1.1)".into(),
                ));
            }
        }
        3 => {}
        v => return Err(bad(path, format!("version {v} is not 2 or 3"))),
    }
    if o.extended_l2 && cluster_size < 16384 {
        return Err(bad(
            path,
            "extended_l2 needs a cluster_size of at least 16384".into(),
        ));
    }
    Ok(())
}

/// The header cluster of a new image of `size` bytes with an L1 table of
/// `l1_size` entries right after it: the header, its extensions and the
/// backing file name (the refcount table's fields are filled in later).
fn header_cluster(
    path: &Path,
    size: u64,
    l1_size: u64,
    o: &CreateOptions,
    backing_format: Option<Format>,
) -> Result<Vec<u8>> {
    let cluster_size = o.cluster_size;
    let mut head = vec![0u8; usize_of(cluster_size)?];
    let header_length = if o.version == 3 {
        header::V3_HEADER_LENGTH
    } else {
        header::V2_HEADER_LENGTH
    };
    field::MAGIC.put(&mut head, MAGIC);
    field::VERSION.put(&mut head, o.version);
    field::CLUSTER_BITS.put(&mut head, cluster_size.trailing_zeros());
    field::SIZE.put(&mut head, size);
    field::L1_SIZE.put(&mut head, l1_size as u32);
    // The L1 table fills the clusters right after the header.
    field::L1_TABLE_OFFSET.put(&mut head, cluster_size);
    if o.version == 3 {
        let incompatible = if o.extended_l2 { INCOMPAT_EXTL2 } else { 0 };
        let compatible = if o.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        };
        field::INCOMPATIBLE_FEATURES.put(&mut head, incompatible);
        field::COMPATIBLE_FEATURES.put(&mut head, compatible);
        field::REFCOUNT_ORDER.put(&mut head, o.refcount_bits.trailing_zeros());
        field::HEADER_LENGTH.put(&mut head, header_length);
    }
    let mut at = header_length as usize;
    if let (Some(_), Some(fmt)) = (&o.backing, backing_format) {
        at = header::put_extension(
            &mut head,
            at,
            header::EXT_BACKING_FORMAT,
            fmt.name().as_bytes(),
        );
    }
    at += header::EXT_HEADER_BYTES; // the end-of-extensions marker, all zeros
    if let Some(name) = &o.backing {
        let bytes = name.as_bytes();
        if bytes.len() > header::MAX_BACKING_NAME as usize
            || at + bytes.len() > cluster_size as usize
        {
            return Err(bad(
                path,
                format!("backing file name '{name}' does not fit in the header cluster"),
            ));
        }
        field::BACKING_FILE_OFFSET.put(&mut head, at as u64);
        field::BACKING_FILE_SIZE.put(&mut head, bytes.len() as u32);
        if let Some(dst) = head.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_images_open_and_read_zeros() {
        let dir = tempfile::tempdir().unwrap();
        for (cluster_size, version, bits, ext) in [
            (65536u64, 3u32, 16u32, false),
            (512, 3, 64, false),
            (512, 3, 1, false),
            (65536, 2, 16, false),
            (65536, 3, 16, true),
        ] {
            let path = dir
                .path()
                .join(format!("t{cluster_size}-{version}-{bits}-{ext}.qcow2"));
            let opts = CreateOptions {
                size: Some(4 << 20),
                cluster_size,
                version,
                refcount_bits: bits,
                extended_l2: ext,
                ..CreateOptions::default()
            };
            create(&path, &opts).unwrap();
            let img = driver::open(&path, &OpenOptions::default()).unwrap();
            assert_eq!(img.size(), 4 << 20);
            let mut buf = vec![1u8; 4096];
            img.read_at(&mut buf, 8192).unwrap();
            assert!(buf.iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        for opts in [
            CreateOptions {
                size: Some(1000),
                ..CreateOptions::default()
            },
            CreateOptions {
                size: Some(1 << 20),
                cluster_size: 1000,
                ..CreateOptions::default()
            },
            CreateOptions {
                size: Some(1 << 20),
                refcount_bits: 3,
                ..CreateOptions::default()
            },
            CreateOptions {
                size: Some(1 << 20),
                version: 2,
                extended_l2: true,
                ..CreateOptions::default()
            },
            CreateOptions {
                size: None,
                ..CreateOptions::default()
            },
        ] {
            assert!(create(&path, &opts).is_err());
        }
    }
}
