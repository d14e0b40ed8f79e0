//! A copy-on-write overlay over a file opened read-only, as QEMU's
//! `-snapshot` puts one over an image: reads come from the file until a page
//! is written; written pages live in a scratch file (created in the
//! temporary directory and unlinked at once), and a bitmap says which 4 KiB
//! pages it holds. The image is never written, and a fresh overlay is the
//! image as it was: what replays and shrinking need, without copying.
//!
//! Holes are kept: a page punched or zeroed is a hole of the scratch file, a
//! page never written is whatever the file has there, so the overlay's
//! [`Storage::next_data`] says what the file's would after the same writes
//! (a raw image's allocation map, and the zero ranges of block status,
//! depend on it).

use super::{FileStorage, Storage};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The overlay's page: written pages are copied whole into the scratch.
pub const PAGE: u64 = 4096;

#[derive(Default)]
struct State {
    /// One bit per page: the scratch holds it.
    dirty: Vec<u64>,
    /// The overlay's length.
    len: u64,
}

impl State {
    fn is_dirty(&self, page: u64) -> bool {
        usize::try_from(page / 64)
            .ok()
            .and_then(|w| self.dirty.get(w))
            .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    fn mark(&mut self, first: u64, end: u64) {
        for page in first..end {
            let Ok(w) = usize::try_from(page / 64) else {
                return;
            };
            if self.dirty.len() <= w {
                self.dirty.resize(w + 1, 0);
            }
            if let Some(word) = self.dirty.get_mut(w) {
                *word |= 1 << (page % 64);
            }
        }
    }

    /// The end of the run of pages from `page` that are all dirty, or all
    /// clean, as `dirty` says (bounded by `limit`).
    fn run_end(&self, page: u64, dirty: bool, limit: u64) -> u64 {
        let mut p = page;
        while p < limit && self.is_dirty(p) == dirty {
            // A whole word alike: skip it.
            let word = usize::try_from(p / 64)
                .ok()
                .and_then(|w| self.dirty.get(w))
                .copied()
                .unwrap_or(0);
            if p % 64 == 0 && word == if dirty { u64::MAX } else { 0 } {
                p += 64;
            } else {
                p += 1;
            }
        }
        p.min(limit)
    }
}

/// A writable overlay over a read-only file (see the module doc).
pub struct Overlay {
    base: FileStorage,
    base_len: u64,
    scratch: FileStorage,
    state: RwLock<State>,
}

static NEXT_SCRATCH: AtomicU64 = AtomicU64::new(0);

impl Overlay {
    /// An overlay over `base` (opened read-only, its locks taken).
    pub fn new(base: FileStorage) -> Result<Overlay> {
        let base_len = base.len()?;
        let name = format!(
            ".blkverify-overlay-{}-{}",
            std::process::id(),
            NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed)
        );
        let scratch_path: PathBuf = std::env::temp_dir().join(name);
        let scratch = FileStorage::create(&scratch_path)?;
        // Unlinked at once: it goes away with the overlay, even on a crash.
        std::fs::remove_file(&scratch_path)
            .map_err(|e| Error::io(&scratch_path, "remove the overlay's scratch file", e))?;
        scratch.set_len(base_len)?;
        Ok(Overlay {
            base,
            base_len,
            scratch,
            state: RwLock::new(State {
                dirty: Vec::new(),
                len: base_len,
            }),
        })
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Read `buf` at `offset` from the file (zeros past its end).
    fn read_base(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let stored = self.base_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(stored);
        if !head.is_empty() {
            self.base.read_exact_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Copy the pages `first..end` that are not dirty into the scratch and
    /// mark them (before a write that covers them only in part).
    fn take_pages(&self, state: &mut State, first: u64, end: u64) -> Result<()> {
        let mut page = [0u8; PAGE as usize];
        for p in first..end {
            if state.is_dirty(p) {
                continue;
            }
            let at = p * PAGE;
            let n = state.len.saturating_sub(at).min(PAGE) as usize;
            let bytes = page.get_mut(..n).unwrap_or(&mut []);
            self.read_base(bytes, at)?;
            if bytes.iter().any(|&b| b != 0) {
                self.scratch.write_all_at(bytes, at)?;
            }
            state.mark(p, p + 1);
        }
        Ok(())
    }

    /// Make the pages that `[offset, end)` covers in part the scratch's, and
    /// mark the whole range's pages dirty.
    fn claim(&self, state: &mut State, offset: u64, end: u64) -> Result<()> {
        if offset >= end {
            return Ok(());
        }
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        if offset % PAGE != 0 {
            self.take_pages(state, first, first + 1)?;
        }
        if end % PAGE != 0 {
            self.take_pages(state, last, last + 1)?;
        }
        state.mark(first, last + 1);
        Ok(())
    }

    fn grow(&self, state: &mut State, end: u64) -> Result<()> {
        if end > state.len {
            self.scratch.set_len(end)?;
            state.len = end;
        }
        Ok(())
    }
}

impl Storage for Overlay {
    fn path(&self) -> &Path {
        self.base.path()
    }

    fn len(&self) -> Result<u64> {
        Ok(self.read_state().len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let state = self.read_state();
        let end = offset.saturating_add(buf.len() as u64);
        if end > state.len {
            return Err(Error::io(
                self.path(),
                format!("read {} bytes at offset {offset:#x}", buf.len()),
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "unexpected end of file (was it truncated?)",
                ),
            ));
        }
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let dirty = state.is_dirty(page);
            let run_end = (state.run_end(page, dirty, end.div_ceil(PAGE)) * PAGE).min(end);
            let into = (at - offset) as usize;
            let piece = buf
                .get_mut(into..into + (run_end - at) as usize)
                .unwrap_or(&mut []);
            if dirty {
                self.scratch.read_exact_at(piece, at)?;
            } else {
                self.read_base(piece, at)?;
            }
            at = run_end;
        }
        Ok(())
    }

    fn next_data(&self, offset: u64) -> Option<(u64, u64)> {
        let state = self.read_state();
        let len = state.len;
        let mut at = offset;
        while at < len {
            let page = at / PAGE;
            let dirty = state.is_dirty(page);
            let run_end = (state.run_end(page, dirty, len.div_ceil(PAGE)) * PAGE).min(len);
            let found = if dirty {
                self.scratch.next_data(at)
            } else if at >= self.base_len {
                Some((u64::MAX, u64::MAX))
            } else {
                self.base.next_data(at)
            };
            match found {
                // Unknown: all data.
                None => return Some((at, run_end)),
                Some((start, _)) if start >= run_end => at = run_end,
                Some((start, end)) => {
                    let start = start.max(at);
                    return Some((start, end.min(run_end).max(start + 1)));
                }
            }
        }
        Some((len.max(offset), len.max(offset)))
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let mut state = self.write_state();
        self.claim(&mut state, offset, end)?;
        self.grow(&mut state, end)?;
        self.scratch.write_all_at(buf, offset)
    }

    fn punch_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut state = self.write_state();
        let end = offset.saturating_add(len).min(state.len);
        if offset >= end {
            return Ok(());
        }
        self.claim(&mut state, offset, end)?;
        self.scratch.punch_zeroes(offset, end - offset)
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len);
        let mut state = self.write_state();
        if offset >= end {
            return Ok(());
        }
        self.claim(&mut state, offset, end)?;
        self.grow(&mut state, end)?;
        self.scratch.zero_range(offset, end - offset)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut state = self.write_state();
        if len < state.len {
            // What lies past the new end reads as zeros if the store grows
            // again: those pages become the scratch's (holes).
            if len % PAGE != 0 {
                self.take_pages(&mut state, len / PAGE, len / PAGE + 1)?;
            }
            let old_end = state.len.max(self.base_len);
            state.mark(len.div_ceil(PAGE), old_end.div_ceil(PAGE));
        }
        self.scratch.set_len(len)?;
        state.len = len;
        Ok(())
    }

    /// Nothing to make durable: an overlay lasts as long as it is open.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path, bytes: &[u8]) -> FileStorage {
        let path = dir.join("base.img");
        std::fs::write(&path, bytes).unwrap();
        FileStorage::open_read_only(&path).unwrap()
    }

    fn read(o: &Overlay, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        o.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn writes_stay_in_the_overlay_and_reads_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let original: Vec<u8> = (0..5 * PAGE as usize + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        let o = Overlay::new(base(dir.path(), &original)).unwrap();
        let mut model = original.clone();
        // Unaligned writes across pages, a write past the end, a punch, a
        // zeroed range past the end, a shrink and a regrowth.
        let write = |o: &Overlay, model: &mut Vec<u8>, at: usize, data: &[u8]| {
            o.write_all_at(data, at as u64).unwrap();
            if model.len() < at + data.len() {
                model.resize(at + data.len(), 0);
            }
            model[at..at + data.len()].copy_from_slice(data);
        };
        write(&o, &mut model, 100, &[7u8; 5000]);
        write(&o, &mut model, 3 * PAGE as usize, &[9u8; PAGE as usize]);
        let past = model.len() + 10;
        write(&o, &mut model, past, &[3u8; 10]);
        assert_eq!(read(&o, 0, model.len()), model);
        o.punch_zeroes(50, 200).unwrap();
        model[50..250].fill(0);
        o.zero_range(model.len() as u64 - 5, 100).unwrap();
        let n = model.len() - 5;
        model.truncate(n);
        model.resize(n + 100, 0);
        assert_eq!(o.len().unwrap(), model.len() as u64);
        assert_eq!(read(&o, 0, model.len()), model);
        o.set_len(2 * PAGE + 7).unwrap();
        model.truncate(2 * PAGE as usize + 7);
        o.set_len(6 * PAGE).unwrap();
        model.resize(6 * PAGE as usize, 0);
        assert_eq!(read(&o, 0, model.len()), model);
        // The file was never written.
        assert_eq!(
            std::fs::read(dir.path().join("base.img")).unwrap(),
            original
        );
        assert!(o.read_exact_at(&mut [0u8; 2], 6 * PAGE - 1).is_err());
    }

    #[test]
    fn holes_are_where_the_file_would_have_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 * PAGE).unwrap();
        drop(file);
        let o = Overlay::new(FileStorage::open_read_only(&path).unwrap()).unwrap();
        // All holes: data only past the end.
        assert!(o.next_data(0).unwrap().0 >= 64 * PAGE);
        o.write_all_at(&[1u8; 10], 10 * PAGE + 5).unwrap();
        let (start, end) = o.next_data(0).unwrap();
        assert_eq!(start, 10 * PAGE);
        assert!(end > start && end <= 11 * PAGE);
        o.punch_zeroes(10 * PAGE, PAGE).unwrap();
        assert!(o.next_data(0).unwrap().0 >= 64 * PAGE);
    }
}
