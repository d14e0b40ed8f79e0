//! Zero-copy read views: a window of a file mapped read-only, so the verifier
//! compares page-cache pages in place instead of copying them with `pread`.
//!
//! Why: on a warm cache, copying is most of the cost of comparing allocated
//! images (measured: 2 GiB qcow2 vs raw, two threads, 2 MiB pieces: `pread` +
//! memcmp 0.29 s, mapped windows + memcmp 0.14 s; see BENCHMARKS.md).
//!
//! The catch with a memory map is `SIGBUS`: a page that cannot be read (the file
//! shrank under us, or the disk failed) kills the process instead of returning
//! an error. A guard makes that an error value again: every live window is
//! registered in a fixed table, and a `SIGBUS` handler that finds the faulting
//! address in a window maps a zero page over it, marks the window as faulted
//! and returns. The caller checks [`View::faulted`] after using a view and
//! re-reads the range with `pread`, which reports the real error. Faults
//! outside our windows go to the handler that was installed before ours.
//!
//! Rejected: `MADV_POPULATE_READ` (reports errors as values, but measured 60%
//! slower than faulting with fault-around, and still races with truncation);
//! whole-file mappings (every page read stays in the process's RSS until exit).

use std::ops::Deref;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Live windows at once; more fall back to `pread` (two per worker thread).
const SLOTS: usize = 256;

struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// The `SIGBUS` action that was in place before ours (set once, read by the handler).
static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let addr = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
        unsafe { (*info).si_addr() as usize }
    };
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &TABLE {
        if !slot.claimed.load(Ordering::Acquire) {
            continue;
        }
        let (start, end) = (
            slot.start.load(Ordering::Acquire),
            slot.end.load(Ordering::Acquire),
        );
        if addr >= start && addr < end {
            let page_start = addr - addr % page;
            // SAFETY: the page lies inside a window this process mapped and still
            // owns (the slot is claimed until the window is unmapped); replacing
            // it with an anonymous zero page keeps the address readable. mmap is
            // a plain system call, safe to make from a signal handler on Linux.
            unsafe {
                libc::mmap(
                    page_start as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
            }
            slot.faulted.store(true, Ordering::Release);
            return;
        }
    }
    // Not ours: behave as if we were not here.
    match PREVIOUS.get().copied().flatten() {
        Some(previous)
            if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN =>
        {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed as an SA_SIGINFO handler.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal, info, context);
            } else {
                // SAFETY: the previous handler was installed as a plain handler.
                let handler: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal);
            }
        }
        previous => {
            // Restore the default (or the previous disposition) and return: the
            // faulting access runs again and the signal takes its normal course.
            // SAFETY: sigaction with a fully initialised struct.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
                libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
            }
        }
    }
}

/// Install the guard once per process. False if it could not be installed
/// (then no views are handed out).
fn guard_installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = usize::try_from(page) {
            if page > 0 {
                PAGE_SIZE.store(page, Ordering::Relaxed);
            }
        }
        // SAFETY: sigaction with a zeroed, then filled-in struct; the handler
        // only touches atomics and makes system calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(Some(previous));
        }
        true
    })
}

/// A read-only window of a file, unmapped on drop. Reads as the file's bytes,
/// except where a page could not be read: there it reads zeros and
/// [`View::faulted`] turns true.
pub struct View {
    base: *mut libc::c_void,
    map_len: usize,
    skip: usize,
    len: usize,
    slot: &'static Slot,
}

// SAFETY: the window is a private read-only mapping owned by this value; any
// thread may read it, and only drop (which takes ownership) unmaps it.
unsafe impl Send for View {}
// SAFETY: as above; shared access only ever reads.
unsafe impl Sync for View {}

impl View {
    /// Map `len` bytes of `fd` at `offset`. The caller has checked that the range
    /// lies inside the file. `None` when mapping is not possible (no free slot,
    /// the guard could not be installed, or mmap failed): read with `pread`.
    pub(crate) fn map(fd: RawFd, offset: u64, len: usize) -> Option<View> {
        if len == 0 || !guard_installed() {
            return None;
        }
        let page = PAGE_SIZE.load(Ordering::Relaxed) as u64;
        let aligned = offset - offset % page;
        let skip = usize::try_from(offset - aligned).ok()?;
        let map_len = len.checked_add(skip)?;
        let file_offset = libc::off_t::try_from(aligned).ok()?;
        let slot = TABLE.iter().find(|slot| {
            slot.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        // SAFETY: a fresh shared read-only mapping of a descriptor the caller
        // keeps open for the duration of this call; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                file_offset,
            )
        };
        if base == libc::MAP_FAILED {
            slot.claimed.store(false, Ordering::Release);
            return None;
        }
        slot.faulted.store(false, Ordering::Release);
        slot.start.store(base as usize, Ordering::Release);
        slot.end.store(base as usize + map_len, Ordering::Release);
        Some(View {
            base,
            map_len,
            skip,
            len,
            slot,
        })
    }

    /// Whether a page of the window could not be read (it read as zeros). Check
    /// this after using the bytes; re-read the range with `pread` for the error.
    pub fn faulted(&self) -> bool {
        self.slot.faulted.load(Ordering::Acquire)
    }
}

impl Deref for View {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `base + skip .. + len` lies inside the live mapping, and the
        // mapping stays readable until drop (a page that cannot be read is
        // replaced by a zero page, never unmapped): every byte of the slice
        // is memory we may read, for as long as the slice lives.
        //
        // The slice's other promise, that its bytes do not change while it is
        // borrowed, is one a shared file mapping cannot keep against writes
        // the Rust code cannot see: another process writing the file (QEMU's
        // locks keep writers out of images with metadata, not out of raw
        // files, which QEMU shares for writing), or this process writing it
        // through a second, writable open (the store that maps is read-only,
        // see FileStorage::view). The page cache then changes under the
        // mapping, as a DMA transfer changes memory. That gap is inherent to
        // zero-copy reads of a shared file (memmap2's `Mmap::map` is unsafe
        // for this reason), and closing it means copying every byte, which
        // the mapping exists to avoid. It cannot reach memory safety here:
        // views are only compared and hashed, and no length, index, offset
        // or pointer is ever derived from their bytes, so a change yields
        // different bytes compared (the answer a `pread` racing the same
        // write gives), never an access outside the mapping.
        unsafe { std::slice::from_raw_parts((self.base as *const u8).add(self.skip), self.len) }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // Unregister first, so a later fault at this address is not taken for ours.
        self.slot.start.store(0, Ordering::Release);
        self.slot.end.store(0, Ordering::Release);
        // SAFETY: unmapping exactly the mapping this value created.
        unsafe {
            libc::munmap(self.base, self.map_len);
        }
        self.slot.claimed.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::{FileStorage, Storage};

    #[test]
    fn a_page_that_vanishes_reads_as_zeros_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let storage = FileStorage::open_read_only(&path).unwrap();
        let view = storage.view(4096, 512 << 10).unwrap();
        assert_eq!(view[0], 7);
        assert!(!view.faulted());
        // Shrink the file under the mapping: the tail pages now raise SIGBUS.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8192)
            .unwrap();
        let tail_sum: u64 = view[64 << 10..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail_sum, 0);
        assert!(view.faulted());
        drop(view);
        // The storage refuses a view past the (new) end, and pread reports it.
        assert!(storage.view(4096, 512 << 10).is_none());
        let mut buf = vec![0u8; 512 << 10];
        assert!(storage.read_exact_at(&mut buf, 4096).is_err());
    }
}
