//! QEMU's image locks, so that QEMU's tools (a VM, `qemu-nbd`, `qemu-io`,
//! `qemu-img`) and ours see each other: an image that one of them has open for
//! writing is not written, or read as if it were still, by another.
//!
//! The protocol is QEMU's (`block/file-posix.c`, `raw_apply_lock_bytes` and
//! `raw_check_lock_bytes`). A process that has a file open declares, with
//! shared (`F_RDLCK`) open-file-description locks of one byte each:
//!
//! - byte `100 + i` locked: it holds permission *i*;
//! - byte `200 + i` locked: it does not let others hold permission *i*.
//!
//! Permission *i* is bit *i* of QEMU's `BLK_PERM_*`: 0 consistent read, 1 write,
//! 2 write unchanged, 3 resize. After locking its bytes, an opener tests (with
//! `F_OFD_GETLK` for an exclusive lock, which finds any other open file
//! description's lock and never our own) that nobody locks `200 + i` for a
//! permission it takes, and nobody locks `100 + i` for one it will not share.
//! A conflict is QEMU's error, `Failed to get "write" lock` or
//! `Failed to get shared "write" lock`.
//!
//! The locks belong to the open file description: they go away when its last
//! descriptor closes, and when the process dies, however it dies. They are
//! advisory, like QEMU's, and only as good as the filesystem: where it has no
//! OFD locks (some network filesystems), the file is opened without them.
//!
//! Which permissions a file takes depends on its format and on the part it
//! plays ([`Role`]); [`Perms::for_role`] is QEMU's rule, as `qemu-io` applies
//! it (checked against `/proc/locks` while QEMU's tools held each kind of file).

use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::ops::{BitOr, Sub};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The first byte of the "holds permission" locks.
const PERM_BASE: i64 = 100;
/// The first byte of the "does not share permission" locks.
const SHARED_BASE: i64 = 200;

/// A set of QEMU's block permissions (`BLK_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm(u8);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reads return consistent data (`BLK_PERM_CONSISTENT_READ`).
    pub const CONSISTENT_READ: Perm = Perm(1 << 0);
    /// Writes that change the data (`BLK_PERM_WRITE`).
    pub const WRITE: Perm = Perm(1 << 1);
    /// Writes that leave the data as it was (`BLK_PERM_WRITE_UNCHANGED`).
    pub const WRITE_UNCHANGED: Perm = Perm(1 << 2);
    /// Changing the file's length (`BLK_PERM_RESIZE`).
    pub const RESIZE: Perm = Perm(1 << 3);
    /// Every permission (`BLK_PERM_ALL`).
    pub const ALL: Perm = Perm(0x0f);

    /// QEMU's names for the permissions, by bit (`bdrv_perm_names`).
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Whether every permission of `other` is in this set.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits of the set, with their lock-byte index and name.
    fn each(self) -> impl Iterator<Item = (i64, &'static str)> {
        Perm::NAMES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(i, name)| (i as i64, *name))
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
}

impl Sub for Perm {
    type Output = Perm;
    fn sub(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }
}

/// The part a file plays in an open image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The image that was opened. `metadata`: its format keeps metadata in
    /// the file (qcow2 and every format but raw).
    Image {
        /// The format keeps metadata in the file.
        metadata: bool,
    },
    /// A backing file below it (always read-only).
    Backing {
        /// The backing file's format keeps metadata in the file.
        metadata: bool,
    },
    /// An external data file (qcow2's `data_file`): guest data, no metadata.
    DataFile,
}

/// What a file holds (`perm`) and what it lets others hold (`shared`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// The permissions taken.
    pub perm: Perm,
    /// The permissions others may still take.
    pub shared: Perm,
}

impl Perms {
    /// QEMU's permissions for a file in `role`, opened as `qemu-io` opens it
    /// (the user of the image shares everything; the format's rules take
    /// away what they must):
    ///
    /// - every file is read consistently;
    /// - a writable image takes write, and a format with metadata also resize
    ///   (it grows the file); its data file likewise;
    /// - a file with metadata, written or not, lets nobody else write or resize
    ///   it, as the format's cached metadata would go stale; a data file lets
    ///   nobody resize it; a raw image shares everything, so `qemu-io` may write
    ///   to a raw image that `qemu-nbd -f raw` serves, and we may too;
    /// - `force_share` (`-U`, read-only opens only) shares everything.
    pub fn for_role(role: Role, writable: bool, force_share: bool) -> Perms {
        let write = |extra: Perm| {
            if writable {
                Perm::WRITE | extra
            } else {
                Perm::NONE
            }
        };
        let (perm, shared) = match role {
            Role::Image { metadata: true } => (
                Perm::CONSISTENT_READ | write(Perm::RESIZE),
                Perm::ALL - Perm::WRITE - Perm::RESIZE,
            ),
            Role::Image { metadata: false } => {
                (Perm::CONSISTENT_READ | write(Perm::NONE), Perm::ALL)
            }
            Role::Backing { metadata: true } => (
                Perm::CONSISTENT_READ,
                Perm::ALL - Perm::WRITE - Perm::RESIZE,
            ),
            Role::Backing { metadata: false } => (Perm::CONSISTENT_READ, Perm::ALL),
            Role::DataFile => (
                Perm::CONSISTENT_READ | write(Perm::RESIZE),
                Perm::ALL - Perm::RESIZE,
            ),
        };
        Perms {
            perm,
            shared: if force_share { Perm::ALL } else { shared },
        }
    }

    /// The permissions not shared.
    fn unshared(&self) -> Perm {
        Perm::ALL - self.shared
    }
}

/// QEMU's locks, held on one file until this is dropped.
#[derive(Debug)]
pub struct ImageLock {
    /// A descriptor of the locked open file description; the locks live as long
    /// as it (or another descriptor of the same description) is open.
    file: File,
    perms: Perms,
}

impl ImageLock {
    /// Take `perms` on the file `file` has open (`path` names it in messages).
    /// `file` may be a duplicate of the descriptor the image is read through:
    /// the locks belong to the description they share. On a conflict the
    /// bytes just locked are unlocked again and the error is QEMU's, naming
    /// the permission. Where the filesystem has no OFD locks, nothing is locked.
    pub fn acquire(file: File, path: &Path, perms: Perms) -> Result<ImageLock> {
        let lock = ImageLock { file, perms };
        match lock.take(path) {
            Ok(()) => Ok(lock),
            Err(e) => {
                lock.release();
                Err(e)
            }
        }
    }

    /// Open `path` read-only and take `perms` on it (for files the driver opens
    /// on its own, such as a qcow2 image's data file).
    pub fn open(path: &Path, perms: Perms) -> Result<ImageLock> {
        let file = File::open(path).map_err(|e| Error::io(path, "open to lock", e))?;
        ImageLock::acquire(file, path, perms)
    }

    /// What this lock holds.
    pub fn perms(&self) -> Perms {
        self.perms
    }

    fn take(&self, path: &Path) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let bytes = self
            .perms
            .perm
            .each()
            .map(|(i, _)| PERM_BASE + i)
            .chain(self.perms.unshared().each().map(|(i, _)| SHARED_BASE + i));
        for byte in bytes {
            match set_lock(fd, libc::F_RDLCK, byte) {
                Ok(()) => {}
                // No OFD locks here (an old kernel, some network filesystems):
                // QEMU's `locking=auto` opens such files unlocked too.
                Err(e) if unsupported(&e) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Err(conflict(
                        path,
                        format!("Failed to lock byte {byte}"),
                        IN_USE,
                    ))
                }
                Err(e) => return Err(Error::io(path, format!("lock byte {byte}"), e)),
            }
        }
        for (i, name) in self.perms.perm.each() {
            if locked_by_another(fd, SHARED_BASE + i).map_err(|e| lock_test_error(path, e))? {
                return Err(conflict(
                    path,
                    format!("Failed to get \"{name}\" lock"),
                    IN_USE,
                ));
            }
        }
        for (i, name) in self.perms.unshared().each() {
            if locked_by_another(fd, PERM_BASE + i).map_err(|e| lock_test_error(path, e))? {
                // Another process holds the permission: for a reader, a writer.
                let hint = if self.perms.perm.contains(Perm::WRITE) || i != 1 {
                    IN_USE
                } else {
                    BEING_WRITTEN
                };
                return Err(conflict(
                    path,
                    format!("Failed to get shared \"{name}\" lock"),
                    hint,
                ));
            }
        }
        Ok(())
    }

    /// Unlock every byte (the description may outlive this lock: `file` can
    /// be a duplicate of a descriptor the caller keeps).
    fn release(&self) {
        let fd = self.file.as_raw_fd();
        for (i, _) in Perm::ALL.each() {
            // Unlocking a byte that is not locked succeeds; a failure leaves
            // the lock until the description closes, which is no worse.
            let _ = set_lock(fd, libc::F_UNLCK, PERM_BASE + i);
            let _ = set_lock(fd, libc::F_UNLCK, SHARED_BASE + i);
        }
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        self.release();
    }
}

/// QEMU's hint after a lock conflict, in our words.
const IN_USE: &str = "another process is using the image (a VM, qemu-nbd?)";
/// The hint when a reader meets a writer.
const BEING_WRITTEN: &str =
    "another process has the image open for writing (a VM, qemu-nbd?); -U/--force-share reads it anyway";

/// A lock conflict: QEMU's message, then the hint, on one line. The error is
/// `EAGAIN`, as QEMU's is.
fn conflict(path: &Path, what: String, hint: &str) -> Error {
    Error::io(path, what, io::Error::new(io::ErrorKind::WouldBlock, hint))
}

fn lock_test_error(path: &Path, e: io::Error) -> Error {
    Error::io(path, "test the image locks", e)
}

/// Errors that mean "this filesystem has no OFD locks".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// A one-byte `flock` of `kind` at `byte`.
fn one_byte(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero
    // bytes are a valid value; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Lock (`F_RDLCK`) or unlock (`F_UNLCK`) one byte, without waiting.
fn set_lock(fd: libc::c_int, kind: libc::c_int, byte: i64) -> io::Result<()> {
    let mut fl = one_byte(kind, byte);
    // SAFETY: fcntl with F_OFD_SETLK reads the flock we pass and changes only
    // the kernel's lock table; `fd` is a descriptor we own.
    let result = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) };
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether another open file description holds a lock on `byte` (QEMU's
/// `qemu_lock_fd_test` with `exclusive`: would an exclusive lock conflict?).
fn locked_by_another(fd: libc::c_int, byte: i64) -> io::Result<bool> {
    let mut fl = one_byte(libc::F_WRLCK, byte);
    // SAFETY: fcntl with F_OFD_GETLK fills in the flock we pass; `fd` is a
    // descriptor we own.
    let result = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if result == -1 {
        let e = io::Error::last_os_error();
        return if unsupported(&e) { Ok(false) } else { Err(e) };
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of `path`'s file that anyone holds a lock on, found as QEMU
    /// tests them (`/proc/locks` would do, but a read of it races with other
    /// processes' locking and may skip lines).
    fn locked_bytes(path: &Path) -> Vec<i64> {
        let file = File::open(path).unwrap();
        (PERM_BASE..PERM_BASE + 10)
            .chain(SHARED_BASE..SHARED_BASE + 10)
            .filter(|&byte| locked_by_another(file.as_raw_fd(), byte).unwrap())
            .collect()
    }

    #[test]
    fn qemus_bytes_for_each_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        // The bytes qemu-io 10.0 locks, as /proc/locks shows them.
        let cases = [
            (
                Role::Image { metadata: true },
                true,
                vec![100, 101, 103, 201, 203],
            ),
            (Role::Image { metadata: true }, false, vec![100, 201, 203]),
            (Role::Image { metadata: false }, true, vec![100, 101]),
            (Role::Image { metadata: false }, false, vec![100]),
            (Role::Backing { metadata: true }, false, vec![100, 201, 203]),
            (Role::Backing { metadata: false }, false, vec![100]),
            (Role::DataFile, true, vec![100, 101, 103, 203]),
            (Role::DataFile, false, vec![100, 203]),
        ];
        for (role, writable, bytes) in cases {
            let lock = ImageLock::open(&path, Perms::for_role(role, writable, false)).unwrap();
            assert_eq!(locked_bytes(&path), bytes, "{role:?} writable={writable}");
            drop(lock);
            assert_eq!(locked_bytes(&path), Vec::<i64>::new());
        }
        let shared = ImageLock::open(
            &path,
            Perms::for_role(Role::Image { metadata: true }, false, true),
        )
        .unwrap();
        assert_eq!(locked_bytes(&path), vec![100]);
        drop(shared);
    }

    #[test]
    fn a_writer_of_metadata_excludes_writers_and_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.qcow2");
        std::fs::write(&path, b"x").unwrap();
        let image = Role::Image { metadata: true };
        let writer = ImageLock::open(&path, Perms::for_role(image, true, false)).unwrap();
        let err = ImageLock::open(&path, Perms::for_role(image, true, false)).unwrap_err();
        assert!(
            err.to_string().contains("Failed to get \"write\" lock"),
            "{err}"
        );
        assert_eq!(err.errno(), libc::EAGAIN);
        let err = ImageLock::open(&path, Perms::for_role(image, false, false)).unwrap_err();
        assert!(
            err.to_string()
                .contains("Failed to get shared \"write\" lock"),
            "{err}"
        );
        // The failed openers left nothing behind; -U reads anyway.
        assert_eq!(locked_bytes(&path), vec![100, 101, 103, 201, 203]);
        let reader = ImageLock::open(&path, Perms::for_role(image, false, true)).unwrap();
        drop(writer);
        drop(reader);
        ImageLock::open(&path, Perms::for_role(image, true, false)).unwrap();
    }

    #[test]
    fn raw_writers_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.raw");
        std::fs::write(&path, b"x").unwrap();
        let raw = Role::Image { metadata: false };
        let _a = ImageLock::open(&path, Perms::for_role(raw, true, false)).unwrap();
        let _b = ImageLock::open(&path, Perms::for_role(raw, true, false)).unwrap();
        let _c = ImageLock::open(&path, Perms::for_role(raw, false, false)).unwrap();
        // ...but a qcow2 opener of the same file would not share their writes.
        let qcow2 = Role::Image { metadata: true };
        assert!(ImageLock::open(&path, Perms::for_role(qcow2, false, false)).is_err());
    }
}
