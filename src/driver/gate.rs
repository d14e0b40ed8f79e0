//! The gate every file an image names passes through: qcow2 backing and data
//! files, vmdk extents and parents, vhd/vhdx parent locators. An untrusted
//! image must not make us read (and report on) arbitrary files, so a name is
//! resolved against the naming image's directory and, unless the policy allows
//! it, must stay inside that directory tree. Backing chains are bounded in depth
//! and refused when they loop.

use super::{open_in_chain, BlockDriver, Format, OpenOptions};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Protocols QEMU accepts in a backing name (`nbd://…`, `json:{…}`): never
/// followed, since only plain files can be backing images here.
const PROTOCOLS: &[&str] = &[
    "nbd",
    "nbd+unix",
    "nbd+tcp",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "rbd",
    "gluster",
    "nfs",
    "vvfat",
    "blkdebug",
    "blkverify",
    "null-co",
    "null-aio",
];

/// Whether a name an image stores is a protocol (`nbd://…`, `json:{…}`)
/// rather than a file name.
pub fn is_protocol(name: &str) -> bool {
    name.starts_with("json:")
        || name.split_once(':').is_some_and(|(proto, _)| {
            !proto.is_empty()
                && !proto.contains('/')
                && proto != "file"
                && proto
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && PROTOCOLS.contains(&proto)
        })
}

/// Resolve a file name stored in an image against the image's directory
/// (`dir`). A `file:` prefix is dropped; absolute names stay as they are.
pub fn resolve_relative(dir: &Path, name: &str) -> PathBuf {
    let name = name.strip_prefix("file:").unwrap_or(name);
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// The directory names in `image` resolve against.
pub fn image_dir(image: &Path) -> &Path {
    image.parent().unwrap_or(Path::new("."))
}

/// Refuse a file that `image` names (`what`: "backing file", "extent", …) when
/// it lies outside the image's directory tree, unless the policy allows it.
/// `target` is canonical; `format` prefixes the message ("qcow2").
pub fn check_inside(
    image: &Path,
    format: &str,
    target: &Path,
    what: &str,
    name: &str,
    options: &OpenOptions,
) -> Result<()> {
    if options.backing.allow_anywhere {
        return Ok(());
    }
    let me = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let tree = me.parent().unwrap_or(Path::new("/"));
    if target.starts_with(tree) {
        return Ok(());
    }
    let backing_hint = if what == "backing file" {
        ", or read unallocated clusters as zeros with --no-backing"
    } else {
        ""
    };
    Err(Error::format(
        image,
        format!(
            "{format}: {what} '{name}' resolves to {}, outside the image's directory {}; \
             an untrusted image must not read files elsewhere (allow it with --allow-backing-anywhere{backing_hint})",
            target.display(),
            tree.display(),
        ),
    ))
}

/// Resolve a file `image` names that is part of the image itself (a qcow2
/// external data file, a vmdk extent): relative to the image's directory, and
/// inside its tree unless the policy allows otherwise. A file that does not
/// exist is returned as resolved, so that opening it gives the OS error.
pub fn resolve_part(
    image: &Path,
    format: &str,
    what: &str,
    name: &str,
    options: &OpenOptions,
) -> Result<PathBuf> {
    let resolved = resolve_relative(image_dir(image), name);
    if let Ok(target) = std::fs::canonicalize(&resolved) {
        check_inside(image, format, &target, what, name, options)?;
    }
    Ok(resolved)
}

/// Open the backing (parent) image that `image` names, as one more link of
/// `chain` (the canonical paths of the images above `image`, top first):
/// refuses protocols, chains deeper than the policy allows, files outside the
/// image's tree, and loops. `backing_format` is the format the image records
/// for its backing file, if any (else it is probed). `format` prefixes the
/// messages ("qcow2", "vmdk").
pub fn open_backing(
    image: &Path,
    format: &str,
    name: &str,
    backing_format: Option<&str>,
    options: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Arc<dyn BlockDriver>> {
    if is_protocol(name) {
        return Err(Error::format(
            image,
            format!(
                "{format}: backing file '{name}' is not a plain file name; only files can be backing images"
            ),
        ));
    }
    let backing_path = resolve_relative(image_dir(image), name);
    let depth = chain.len() as u32 + 1;
    if depth > options.backing.max_depth {
        return Err(Error::format(
            image,
            format!(
                "{format}: backing chain is deeper than {} images (set a larger limit to follow it)",
                options.backing.max_depth
            ),
        ));
    }
    let me = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let target = std::fs::canonicalize(&backing_path).map_err(|e| {
        Error::io(
            &backing_path,
            format!("open backing file of {}", image.display()),
            e,
        )
    })?;
    check_inside(image, format, &target, "backing file", name, options)?;
    let mut above: Vec<PathBuf> = chain.to_vec();
    above.push(me);
    if above.contains(&target) {
        return Err(Error::corrupt(
            image,
            format!(
                "{format}: backing chain loops: backing file '{name}' is {}, already in the chain",
                target.display()
            ),
        ));
    }
    let backing_format = match backing_format {
        None => None,
        Some(f) => Some(Format::parse(f).filter(Format::can_read).ok_or_else(|| {
            Error::format(
                image,
                format!(
                    "{format}: backing format '{f}' (of backing file '{name}') is not supported"
                ),
            )
        })?),
    };
    open_in_chain(&backing_path, backing_format, None, options, &above)
}
