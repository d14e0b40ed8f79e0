//! The VHDX log (MS-VHDX 2.3): finding the active sequence of a log that must
//! be replayed, and replaying it **in memory**. The file is never written: the
//! replayed writes become an overlay ([`Replayed`]) through which the region
//! table, metadata, BAT and data are then read, as the specification asks of a
//! reader that opens a file read-only (its note <5>).
//!
//! A hostile log cannot make the scan slow or large: each log position is
//! validated at most once, the bytes checksummed and the entries walked are
//! budgeted, and replayed data is never copied: the overlay keeps, per 4 KiB
//! page, where its bytes are in the log.

use super::header::{guid_string, Header, Le, PastEnd};
use crate::error::{Error, Result};
use crate::storage::{Storage, View};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// Log sectors are 4 KiB.
pub const SECTOR: u64 = 4096;
/// Checksummed bytes allowed per byte of log while scanning.
const CRC_BUDGET_PER_BYTE: u64 = 8;
/// Entry-to-entry steps allowed per log sector while scanning.
const STEP_BUDGET_PER_SECTOR: u64 = 16;

/// What one valid log entry says.
#[derive(Debug, Clone, Copy)]
struct Entry {
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    descriptors: u32,
}

/// Where a replayed range's bytes come from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Zero,
    /// A 4 KiB page starting at `page`: bytes 0..8 and 4092..4096 are kept in
    /// its descriptor, the rest are bytes 8..4092 of the data sector at
    /// `sector_at` in the file.
    Page {
        page: u64,
        sector_at: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
}

/// A store with a replayed log laid over it.
pub struct Replayed {
    inner: Arc<dyn Storage>,
    inner_len: u64,
    len: u64,
    /// Non-overlapping replayed ranges: start -> (end, source).
    writes: BTreeMap<u64, (u64, Source)>,
    /// Entries replayed, and the head entry's sequence number.
    pub entries: usize,
    /// The head entry's sequence number.
    pub head_sequence: u64,
}

struct Scanner<'a> {
    path: &'a Path,
    file: &'a dyn Storage,
    header: &'a Header,
    log_offset: u64,
    log_len: u64,
    memo: HashMap<u64, Option<Entry>>,
    crc_budget: u64,
}

impl Scanner<'_> {
    fn corrupt(&self, message: String) -> Error {
        Error::corrupt(
            self.path,
            format!(
                "vhdx: log at {:#x} (header {}, LogGuid {}): {message}",
                self.log_offset,
                self.header.which,
                guid_string(&self.header.log_guid)
            ),
        )
    }

    /// Read the 4 KiB log sector at log position `pos` (wrapping).
    fn sector(&self, pos: u64, buf: &mut [u8; SECTOR as usize]) -> Result<()> {
        let at = self.log_offset + pos % self.log_len;
        self.file.read_exact_at(buf, at)
    }

    fn file_offset_of(&self, pos: u64) -> u64 {
        self.log_offset + pos % self.log_len
    }

    /// The valid entry at `pos`, if there is one (memoised).
    fn entry(&mut self, pos: u64) -> Result<Option<Entry>> {
        if let Some(known) = self.memo.get(&pos) {
            return Ok(*known);
        }
        let found = self.validate(pos)?;
        self.memo.insert(pos, found);
        Ok(found)
    }

    fn validate(&mut self, pos: u64) -> Result<Option<Entry>> {
        let mut first = [0u8; SECTOR as usize];
        self.sector(pos, &mut first)?;
        let h = Le(&first);
        if first.get(..4) != Some(b"loge".as_slice()) {
            return Ok(None);
        }
        // A whole sector: every header field is there.
        let path = self.path;
        let internal = |e: PastEnd| e.internal(path);
        let entry = Entry {
            length: u64::from(h.field_u32(8).map_err(internal)?),
            tail: u64::from(h.field_u32(12).map_err(internal)?),
            sequence: h.field_u64(16).map_err(internal)?,
            descriptors: h.field_u32(24).map_err(internal)?,
            flushed_file_offset: h.field_u64(48).map_err(internal)?,
            last_file_offset: h.field_u64(56).map_err(internal)?,
        };
        let guid: [u8; 16] = h.field(32).map_err(internal)?;
        let descriptor_sectors = (u64::from(entry.descriptors) + 2).div_ceil(128);
        if entry.length == 0
            || entry.length % SECTOR != 0
            || entry.length > self.log_len
            || entry.sequence == 0
            || guid != self.header.log_guid
            || entry.tail % SECTOR != 0
            || entry.tail >= self.log_len
            || descriptor_sectors * SECTOR > entry.length
        {
            return Ok(None);
        }
        if entry.length > self.crc_budget {
            return Err(self.corrupt(format!(
                "scanning it needs more than {} checksummed bytes; a log that large is not plausible",
                CRC_BUDGET_PER_BYTE * self.log_len
            )));
        }
        self.crc_budget -= entry.length;
        // Checksum the whole entry, sector by sector, checking descriptors and
        // data sectors on the way.
        let sectors = entry.length / SECTOR;
        let mut crc = 0u32;
        let mut data_sectors = 0u64;
        let mut buf = [0u8; SECTOR as usize];
        for k in 0..sectors {
            let sector: &[u8] = if k == 0 {
                &first
            } else {
                self.sector(pos + k * SECTOR, &mut buf)?;
                &buf
            };
            if k == 0 {
                crc = crc32c::crc32c(&first[..4]);
                crc = crc32c::crc32c_append(crc, &[0; 4]);
                crc = crc32c::crc32c_append(crc, &first[8..]);
            } else {
                crc = crc32c::crc32c_append(crc, sector);
            }
            if k < descriptor_sectors {
                let first_slot = if k == 0 { 2 } else { 0 };
                for slot in first_slot..128u64 {
                    let index = k * 128 + slot - 2;
                    if index >= u64::from(entry.descriptors) {
                        break;
                    }
                    let d = Le(sector.get(slot as usize * 32..).unwrap_or(&[]));
                    match describe(&d, entry.sequence) {
                        Some(Descriptor::Data { .. }) => data_sectors += 1,
                        Some(Descriptor::Zero { .. }) => {}
                        None => return Ok(None),
                    }
                }
            } else if k < descriptor_sectors + data_sectors {
                let d = Le(sector);
                let high = u64::from(d.field_u32(4).map_err(internal)?);
                let low = u64::from(d.field_u32(4092).map_err(internal)?);
                if sector.get(..4) != Some(b"data".as_slice())
                    || (high << 32 | low) != entry.sequence
                {
                    return Ok(None);
                }
            }
        }
        if descriptor_sectors + data_sectors > sectors {
            return Ok(None);
        }
        if h.u32(4) != Some(crc) {
            return Ok(None);
        }
        Ok(Some(entry))
    }
}

/// A log descriptor (MS-VHDX 2.3.1.2 and 2.3.1.3).
enum Descriptor {
    Zero {
        file_offset: u64,
        length: u64,
    },
    Data {
        file_offset: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
}

fn describe(d: &Le<'_>, sequence: u64) -> Option<Descriptor> {
    let file_offset = d.u64(16)?;
    if d.u64(24)? != sequence || file_offset % SECTOR != 0 {
        return None;
    }
    match &d.bytes::<4>(0)? {
        b"zero" => {
            let length = d.u64(8)?;
            (length % SECTOR == 0).then_some(Descriptor::Zero {
                file_offset,
                length,
            })
        }
        b"desc" => Some(Descriptor::Data {
            file_offset,
            leading: d.bytes(8)?,
            trailing: d.bytes(4)?,
        }),
        _ => None,
    }
}

/// Find the log's active sequence (MS-VHDX 2.3.3) and replay it over `file`
/// in memory. Called only when the current header has a LogGuid.
pub fn replay(
    path: &Path,
    file: Arc<dyn Storage>,
    header: &Header,
    file_len: u64,
) -> Result<Replayed> {
    let log_len = u64::from(header.log_length);
    let mut scanner = Scanner {
        path,
        file: file.as_ref(),
        header,
        log_offset: header.log_offset,
        log_len,
        memo: HashMap::new(),
        crc_budget: log_len.saturating_mul(CRC_BUDGET_PER_BYTE),
    };
    if header.log_offset.saturating_add(log_len) > file_len {
        return Err(scanner.corrupt(format!(
            "the log ({log_len:#x} bytes) lies past the end of the file (size {file_len:#x})"
        )));
    }
    let (positions, head) = scanner.active_sequence()?;
    if file_len < head.flushed_file_offset {
        return Err(scanner.corrupt(format!(
            "the file is {file_len:#x} bytes, shorter than the FlushedFileOffset {:#x} of the log's head entry (sequence {}): it was truncated",
            head.flushed_file_offset, head.sequence
        )));
    }
    let mut replayed = Replayed {
        inner: file.clone(),
        inner_len: file_len,
        len: file_len.max(head.last_file_offset),
        writes: BTreeMap::new(),
        entries: positions.len(),
        head_sequence: head.sequence,
    };
    for pos in positions {
        replayed.lay_entry(&mut scanner, pos)?;
    }
    Ok(replayed)
}

/// A run of entries in sequence found from one log position.
struct Run {
    /// The entries' log positions, in order.
    positions: Vec<u64>,
    /// The last entry of the run, if any.
    last: Option<Entry>,
    /// The log position just past the run.
    end: u64,
}

impl Scanner<'_> {
    /// The active sequence: the log positions of its entries, from the one
    /// its head names as the tail, and its head entry. Every log position is
    /// tried as the start of a run, within a budget of steps.
    fn active_sequence(&mut self) -> Result<(Vec<u64>, Entry)> {
        let mut steps_left = (self.log_len / SECTOR).saturating_mul(STEP_BUDGET_PER_SECTOR);
        let mut candidate: Option<(Vec<u64>, Entry)> = None;
        let mut tail = 0u64;
        let mut old_tail = 0u64;
        loop {
            let mut run = self.run_from(tail, &mut steps_left)?;
            // Valid when the head names, as its tail, an entry of this run.
            let valid = run
                .last
                .and_then(|l| Some((l, run.positions.iter().position(|p| *p == l.tail)?)));
            if let Some((head_entry, from)) = valid {
                if candidate
                    .as_ref()
                    .is_none_or(|(_, c)| head_entry.sequence > c.sequence)
                {
                    // Replay from the entry the head names as the tail.
                    candidate = Some((run.positions.split_off(from), head_entry));
                }
                tail = run.end;
            } else {
                tail = (tail + SECTOR) % self.log_len;
            }
            // Back at or before where the scan was: every position has been seen.
            if tail <= old_tail {
                break;
            }
            old_tail = tail;
        }
        candidate.ok_or_else(|| {
            self.corrupt(
                "the header's LogGuid says the log must be replayed, but the log holds no valid, complete entry sequence"
                    .into(),
            )
        })
    }

    /// The entries in sequence from log position `start`, up to one log's
    /// length of them.
    fn run_from(&mut self, start: u64, steps_left: &mut u64) -> Result<Run> {
        let mut run = Run {
            positions: Vec::new(),
            last: None,
            end: start,
        };
        let mut covered = 0u64;
        loop {
            if *steps_left == 0 {
                return Err(self.corrupt(
                    "finding its active sequence takes too many steps; a log like that is not plausible"
                        .into(),
                ));
            }
            *steps_left -= 1;
            let Some(entry) = self.entry(run.end)? else {
                break;
            };
            if run
                .last
                .is_some_and(|l| l.sequence.checked_add(1) != Some(entry.sequence))
            {
                break;
            }
            if covered + entry.length > self.log_len {
                break;
            }
            covered += entry.length;
            run.positions.push(run.end);
            run.last = Some(entry);
            run.end = (run.end + entry.length) % self.log_len;
        }
        Ok(run)
    }
}

impl Replayed {
    /// Lay the writes of the log entry at `pos` over what is there.
    fn lay_entry(&mut self, scanner: &mut Scanner<'_>, pos: u64) -> Result<()> {
        let entry = scanner
            .entry(pos)?
            .ok_or_else(|| scanner.corrupt(format!("entry at {pos:#x} vanished")))?;
        let descriptor_sectors = (u64::from(entry.descriptors) + 2).div_ceil(128);
        let mut data_index = 0u64;
        let mut buf = [0u8; SECTOR as usize];
        for index in 0..u64::from(entry.descriptors) {
            let slot = index + 2;
            if slot % 128 == 0 || index == 0 {
                scanner.sector(pos + (slot / 128) * SECTOR, &mut buf)?;
            }
            let d = Le(buf.get((slot % 128) as usize * 32..).unwrap_or(&[]));
            let end_of = |offset: u64, length: u64| {
                offset.checked_add(length).ok_or_else(|| {
                    scanner.corrupt(format!(
                        "entry at {pos:#x}: descriptor {index} writes past 2^64"
                    ))
                })
            };
            match describe(&d, entry.sequence) {
                Some(Descriptor::Zero {
                    file_offset,
                    length,
                }) => {
                    let end = end_of(file_offset, length)?;
                    self.lay(file_offset, end, Source::Zero);
                }
                Some(Descriptor::Data {
                    file_offset,
                    leading,
                    trailing,
                }) => {
                    let end = end_of(file_offset, SECTOR)?;
                    let sector_at =
                        scanner.file_offset_of(pos + (descriptor_sectors + data_index) * SECTOR);
                    data_index += 1;
                    self.lay(
                        file_offset,
                        end,
                        Source::Page {
                            page: file_offset,
                            sector_at,
                            leading,
                            trailing,
                        },
                    );
                }
                None => {
                    return Err(scanner.corrupt(format!(
                        "entry at {pos:#x}: descriptor {index} changed while being read"
                    )))
                }
            }
        }
        Ok(())
    }
}

impl Replayed {
    /// Lay `[start, end)` over what is there.
    fn lay(&mut self, start: u64, end: u64, source: Source) {
        if start >= end {
            return;
        }
        let overlapping: Vec<u64> = self
            .writes
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            if let Some((e, src)) = self.writes.remove(&s) {
                if s < start {
                    self.writes.insert(s, (start, src));
                }
                if e > end {
                    self.writes.insert(end, (e, src));
                }
            }
        }
        self.writes.insert(start, (end, source));
        self.len = self.len.max(end);
    }

    /// Whether any replayed range touches `[start, end)`.
    fn touches(&self, start: u64, end: u64) -> bool {
        self.writes
            .range(..end)
            .next_back()
            .is_some_and(|(_, (e, _))| *e > start)
    }

    /// Fill `buf` from the file below the overlay; past its end, zeros (the
    /// replay extends the file).
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let stored = self.inner_len.saturating_sub(offset).min(buf.len() as u64);
        let (head, tail) = buf.split_at_mut(stored as usize);
        if !head.is_empty() {
            self.inner.read_exact_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn read_source(&self, buf: &mut [u8], offset: u64, source: Source) -> Result<()> {
        match source {
            Source::Zero => buf.fill(0),
            Source::Page {
                page,
                sector_at,
                leading,
                trailing,
            } => {
                let mut whole = [0u8; SECTOR as usize];
                self.inner.read_exact_at(&mut whole, sector_at)?;
                whole[..8].copy_from_slice(&leading);
                whole[4092..].copy_from_slice(&trailing);
                let from = (offset - page) as usize;
                let src = whole.get(from..from + buf.len()).ok_or_else(|| {
                    Error::Internal(format!(
                        "{}: a read of the replayed page at {page:#x} lies outside it",
                        self.inner.path().display()
                    ))
                })?;
                buf.copy_from_slice(src);
            }
        }
        Ok(())
    }
}

impl Storage for Replayed {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len {
            return Err(Error::io(
                self.path(),
                format!("read {} bytes at offset {offset:#x}", buf.len()),
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "past the end of the file with its log replayed ({:#x} bytes)",
                        self.len
                    ),
                ),
            ));
        }
        let first = self
            .writes
            .range(..=offset)
            .next_back()
            .filter(|(_, (e, _))| *e > offset)
            .map(|(s, v)| (*s, *v));
        let rest = self
            .writes
            .range(offset.saturating_add(1)..end)
            .map(|(s, v)| (*s, *v));
        let mut at = offset;
        for (start, (stop, source)) in first.into_iter().chain(rest) {
            if start > at {
                let gap = buf
                    .get_mut((at - offset) as usize..(start - offset) as usize)
                    .unwrap_or(&mut []);
                self.read_below(gap, at)?;
                at = start;
            }
            let piece_end = stop.min(end);
            let piece = buf
                .get_mut((at - offset) as usize..(piece_end - offset) as usize)
                .unwrap_or(&mut []);
            self.read_source(piece, at, source)?;
            at = piece_end;
        }
        if at < end {
            let gap = buf.get_mut((at - offset) as usize..).unwrap_or(&mut []);
            self.read_below(gap, at)?;
        }
        Ok(())
    }

    fn view(&self, offset: u64, len: usize) -> Option<View> {
        let end = offset.checked_add(len as u64)?;
        if end > self.inner_len || self.touches(offset, end) {
            return None;
        }
        self.inner.view(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn overlay(data: Vec<u8>) -> Replayed {
        let len = data.len() as u64;
        Replayed {
            inner: Arc::new(MemStorage::new("t", data, false)),
            inner_len: len,
            len,
            writes: BTreeMap::new(),
            entries: 0,
            head_sequence: 0,
        }
    }

    #[test]
    fn later_writes_win_and_split_earlier_ones() {
        let mut data = vec![7u8; 3 * 4096];
        // A data sector in the "log" at 8192: bytes 8..4092 are the payload.
        data[8192..8192 + 4096].fill(0xaa);
        let mut r = overlay(data);
        r.lay(0, 8192, Source::Zero);
        r.lay(
            4096,
            8192,
            Source::Page {
                page: 4096,
                sector_at: 8192,
                leading: [1; 8],
                trailing: [2; 4],
            },
        );
        r.lay(100, 200, Source::Zero);
        r.lay(16384, 20480, Source::Zero);
        assert_eq!(r.len().unwrap(), 20480);
        let mut buf = vec![0u8; 20480];
        r.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 0));
        assert_eq!(&buf[4096..4104], &[1; 8]);
        assert!(buf[4104..8188].iter().all(|b| *b == 0xaa));
        assert_eq!(&buf[8188..8192], &[2; 4]);
        assert!(buf[8192..12288].iter().all(|b| *b == 0xaa));
        assert!(
            buf[12288..].iter().all(|b| *b == 0),
            "extension reads zeros"
        );
        let mut small = [0u8; 10];
        r.read_exact_at(&mut small, 4090).unwrap();
        assert_eq!(small, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
        assert!(r.view(0, 10).is_none());
        let mut fresh = overlay(vec![0; 8192]);
        fresh.lay(0, 4096, Source::Zero);
        assert!(!fresh.touches(4096, 8192));
        assert!(fresh.touches(4095, 4097));
    }
}
