//! The qcow2 driver, read side: header, L1/L2 lookup with subclusters,
//! compressed clusters, zero clusters, backing chains, external data files and
//! internal snapshots.

mod compressed;
pub mod create;
pub mod header;
pub mod l2;
pub mod refcount;
pub mod snapshot;
mod write;

use super::cache::{L2Cache, L2Table};
use super::read::{read_backing, read_mapped, view_through_map};
use super::{
    check_range, gate, locate_in_backing, BlockDriver, Extent, Format, Location, Mapping,
    OpenOptions, TableIndex, MAX_TABLE_BYTES, SECTOR_SIZE,
};
use crate::error::{usize_of, Error, Result};
use crate::storage::{FileStorage, Overlay, Storage, View};
use header::{CompressionType, Header};
use l2::Cluster;
use snapshot::Snapshot;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// Bytes of L2 tables cached per image.
const L2_CACHE_BYTES: u64 = 16 << 20;

static NEXT_DRIVER_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last cluster this thread decompressed, keyed by (driver id, metadata
    /// generation, host offset), so small reads inside one compressed cluster
    /// decompress it once, and a write can never leave a stale copy behind.
    static LAST_CLUSTER: RefCell<(u64, u64, u64, Vec<u8>)> = const { RefCell::new((0, 0, u64::MAX, Vec::new())) };
    /// The compressed stream being decoded (grows to the largest one seen, at
    /// most two clusters and a sector).
    static COMPRESSED_INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// An open qcow2 image.
pub struct Qcow2 {
    id: u64,
    file: Arc<dyn Storage>,
    data: Arc<dyn Storage>,
    header: Header,
    size: u64,
    /// The active (or snapshot) L1 table; writers replace entries under the lock.
    l1: RwLock<Vec<u64>>,
    /// Where that L1 table lives in the file, and its length in bytes.
    l1_offset: u64,
    l1_bytes: u64,
    cache: L2Cache,
    /// Bumped on every metadata change, so per-thread caches notice.
    generation: AtomicU64,
    /// Present when the image is open for writing: the one writer's state.
    writer: Option<Mutex<write::WriteState>>,
    backing: Option<Arc<dyn BlockDriver>>,
    snapshots: Vec<Snapshot>,
    snapshot: Option<Snapshot>,
    /// The image and data file lengths: at open, for a file opened
    /// read-only (a file that shrinks later still fails its reads with an
    /// error); for a writable one, the largest length seen so far, which is
    /// asked of the file again only when a read needs more (see
    /// [`Qcow2::file_len`]). Either way most reads spare an lseek.
    file_len: AtomicU64,
    data_len: AtomicU64,
}

impl Qcow2 {
    /// Open a qcow2 image on `file`, following its backing chain as `options`
    /// allow. `chain` holds the canonical paths of the images above this one.
    pub fn open(
        file: Arc<dyn Storage>,
        snapshot: Option<&str>,
        options: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<Self> {
        let path = file.path().to_path_buf();
        let file_len = file.len()?;
        let header = read_header(file.as_ref(), file_len)?;
        let snapshots = if header.nb_snapshots > 0 {
            read_snapshots(file.as_ref(), &header, file_len)?
        } else {
            Vec::new()
        };
        let chosen = match snapshot {
            None => None,
            Some(wanted) => Some(choose_snapshot(&path, &snapshots, wanted)?),
        };
        let (l1_offset, l1_size, size) = active_table(&path, &header, chosen.as_ref())?;
        let l1 = read_l1(file.as_ref(), l1_offset, l1_size)?;
        let data = open_data_file(&path, &file, &header, options)?;
        let backing = match &header.backing_file {
            Some(name) if options.backing.follow => Some(gate::open_backing(
                &path,
                "qcow2",
                name,
                header.backing_format.as_deref(),
                options,
                chain,
            )?),
            _ => None,
        };

        let data_len = if Arc::ptr_eq(&data, &file) {
            file_len
        } else {
            data.len()?
        };
        let l2_bytes = header.cluster_size();
        let capacity = usize::try_from(L2_CACHE_BYTES / l2_bytes).unwrap_or(4);
        let writable = !file.is_read_only() && chosen.is_none();
        let mut image = Qcow2 {
            id: NEXT_DRIVER_ID.fetch_add(1, Ordering::Relaxed),
            file,
            header,
            size,
            l1: RwLock::new(l1),
            l1_offset,
            l1_bytes: u64::from(l1_size) * 8,
            cache: L2Cache::new(capacity),
            generation: AtomicU64::new(0),
            writer: None,
            backing,
            snapshots,
            snapshot: chosen,
            file_len: AtomicU64::new(file_len),
            data_len: AtomicU64::new(data_len),
            data,
        };
        if writable {
            image.enable_writes()?;
        }
        Ok(image)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file's length, as far as a read of the bytes up to `end`
    /// needs it: the length at open while nothing can write the file.
    /// A writable image's file is ours (we hold its write lock): it only
    /// grows, and only by our own writes, so the largest length seen so far
    /// is still true when it covers `end`; when it does not, the file is
    /// asked (one lseek), and a shorter answer is the true length. Either
    /// way, the caller sees all of `end` that the file holds.
    fn file_len(&self, end: u64) -> Result<u64> {
        len_covering(self.file.as_ref(), &self.file_len, end)
    }

    /// The data file's length, as [`Qcow2::file_len`] tells the image's.
    fn data_len(&self, end: u64) -> Result<u64> {
        len_covering(self.data.as_ref(), &self.data_len, end)
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    fn corrupt(&self, message: String) -> Error {
        Error::corrupt(self.file.path(), format!("qcow2: {message}"))
    }

    /// The unit `map` resolves: a subcluster with extended L2, else a cluster.
    fn unit_bits(&self) -> u32 {
        if self.header.extended_l2() {
            self.header.cluster_bits - 5
        } else {
            self.header.cluster_bits
        }
    }

    fn load_l2(&self, l2_offset: u64) -> Result<L2Table> {
        self.cache.get_or_load(l2_offset, || {
            let cluster_size = self.header.cluster_size();
            let file_len = self.file_len(l2_offset.saturating_add(cluster_size))?;
            if l2_offset % cluster_size != 0 {
                return Err(self.corrupt(format!(
                    "L2 table offset {l2_offset:#x} is not aligned to a cluster ({cluster_size} bytes)"
                )));
            }
            if l2_offset.checked_add(cluster_size).is_none_or(|end| end > file_len) {
                return Err(self.corrupt(format!(
                    "L2 table at {l2_offset:#x} lies past the end of the file (size {file_len:#x})"
                )));
            }
            let h = &self.header;
            // A writer moves the refcount table when it grows it, so the
            // header's copy of its place holds only until writes begin.
            let reftable_bytes = if self.writer.is_none() {
                u64::from(h.refcount_table_clusters) * cluster_size
            } else {
                0
            };
            let tables = [
                ("the header", 0, cluster_size),
                ("the L1 table", self.l1_offset, self.l1_bytes),
                ("the refcount table", h.refcount_table_offset, reftable_bytes),
            ];
            for (what, offset, bytes) in tables {
                if header::overlaps(l2_offset, cluster_size, offset, bytes, cluster_size) {
                    return Err(self.corrupt(format!(
                        "L2 table at {l2_offset:#x} overlaps {what} (at {offset:#x})"
                    )));
                }
            }
            let mut raw = vec![0u8; usize_of(cluster_size)?];
            self.file.read_exact_at(&mut raw, l2_offset)?;
            let entries: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            Ok(Arc::from(entries))
        })
    }

    /// The L2 entry at `l2_index` of `table`, with its subcluster bitmap for
    /// extended L2 entries (0 otherwise). A table holds every index of its
    /// cluster, so an index past it is a bug, never an unallocated entry.
    pub(crate) fn l2_entry(&self, table: &[u64], l2_index: u64) -> Result<(u64, u64)> {
        let width = if self.header.extended_l2() { 2 } else { 1 };
        let words = usize::try_from(l2_index)
            .ok()
            .and_then(|i| i.checked_mul(width))
            .and_then(|at| table.get(at..at.checked_add(width)?));
        match words {
            Some(&[entry, bitmap]) => Ok((entry, bitmap)),
            Some(&[entry]) => Ok((entry, 0)),
            _ => Err(Error::Internal(format!(
                "{}: L2 index {l2_index} lies past its table of {} entries",
                self.path().display(),
                table.len() / width
            ))),
        }
    }

    /// Decode the unit (cluster or subcluster) `unit_in_cluster` of an L2
    /// entry (and its bitmap, for extended L2).
    fn decode_unit(
        &self,
        (entry, bitmap): (u64, u64),
        unit_in_cluster: u32,
    ) -> Result<Cluster, String> {
        let bits = self.header.cluster_bits;
        let has_data_file = self.header.has_data_file();
        if self.header.extended_l2() {
            l2::decode_subcluster(entry, bitmap, unit_in_cluster, bits, has_data_file)
        } else {
            let cluster = l2::decode(entry, bits, has_data_file)?;
            if self.header.version < 3 && matches!(cluster, Cluster::Zero { .. }) {
                // QEMU fails such reads too ("Zero cluster entry found in pre-v3 image").
                return Err(format!(
                    "L2 entry {entry:#018x} has the zero flag set, which version 2 images do not have"
                ));
            }
            Ok(cluster)
        }
    }

    /// The L1 index, L2 index and subcluster of a guest offset.
    fn indices(&self, offset: u64) -> (u64, u64, u32) {
        let cluster = offset >> self.header.cluster_bits;
        let l2_entries = self.header.l2_entries();
        let sub = if self.header.extended_l2() {
            ((offset >> self.unit_bits()) & 31) as u32
        } else {
            0
        };
        (cluster / l2_entries, cluster % l2_entries, sub)
    }

    /// The L2 table covering `l1_index`, or `None` if it is unallocated.
    fn l2_for(&self, l1_index: u64) -> Result<Option<(u64, L2Table)>> {
        let l1_entry = {
            let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
            // The L1 table covers the disk (checked at open), so an index
            // past it is a bug, never an unallocated range.
            match usize::try_from(l1_index).ok().and_then(|i| l1.get(i)) {
                Some(&entry) => entry,
                None => {
                    return Err(Error::Internal(format!(
                        "{}: L1 index {l1_index} lies past the L1 table's {} entries",
                        self.path().display(),
                        l1.len()
                    )))
                }
            }
        };
        let l2_offset = l2::l1_offset(l1_entry)
            .map_err(|e| self.corrupt(format!("L1 index {l1_index}: {e}")))?;
        if l2_offset == 0 {
            return Ok(None);
        }
        Ok(Some((l2_offset, self.load_l2(l2_offset)?)))
    }

    fn read_compressed(
        &self,
        buf: &mut [u8],
        guest_offset: u64,
        host_offset: u64,
        compressed_size: u64,
    ) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let in_cluster = usize_of(guest_offset & (cluster_size - 1))?;
        let cluster_len = usize_of(cluster_size)?;
        let id = self.id;
        if in_cluster == 0 && buf.len() == cluster_len {
            // The whole cluster is wanted (the verifier's case): decompress it in
            // place, and leave the one-cluster cache to small reads.
            return self.decompress_cluster(host_offset, compressed_size, buf);
        }
        let generation = self.generation.load(Ordering::Acquire);
        LAST_CLUSTER.with(|cell| {
            let mut last = cell.borrow_mut();
            if last.0 != id
                || last.1 != generation
                || last.2 != host_offset
                || last.3.len() != cluster_len
            {
                last.2 = u64::MAX;
                last.3.resize(cluster_len, 0);
                self.decompress_cluster(host_offset, compressed_size, &mut last.3)?;
                last.0 = id;
                last.1 = generation;
                last.2 = host_offset;
            }
            let src = last
                .3
                .get(in_cluster..in_cluster + buf.len())
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "{}: a compressed read at guest offset {guest_offset:#x} crosses its cluster",
                        self.path().display()
                    ))
                })?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn decompress_cluster(
        &self,
        host_offset: u64,
        compressed_size: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let file_len = self.file_len(host_offset.saturating_add(compressed_size))?;
        if host_offset >= file_len {
            return Err(self.corrupt(format!(
                "compressed cluster at host offset {host_offset:#x} lies past the end of the file (size {file_len:#x})"
            )));
        }
        // The stored size is rounded up to sectors and may run past the end of
        // the file for the last cluster; the stream itself must not.
        let available = (file_len - host_offset).min(compressed_size);
        let max_input = 2 * self.header.cluster_size() + SECTOR_SIZE;
        if available > max_input {
            return Err(self.corrupt(format!(
                "compressed cluster at host offset {host_offset:#x} claims {compressed_size} bytes, more than a cluster can need"
            )));
        }
        COMPRESSED_INPUT.with(|cell| {
            let mut input = cell.borrow_mut();
            let n = usize_of(available)?;
            if input.len() < n {
                input.resize(n, 0);
            }
            let input = input.get_mut(..n).unwrap_or(&mut []);
            self.file.read_exact_at(input, host_offset)?;
            compressed::decompress(self.header.compression_type, input, out).map_err(|e| {
                self.corrupt(format!(
                    "compressed cluster at host offset {host_offset:#x} ({compressed_size} bytes): {e}"
                ))
            })
        })
    }

    fn read_data(&self, buf: &mut [u8], host_offset: u64) -> Result<()> {
        // A data cluster may end past the end of the data file (QEMU does not
        // always extend it): those bytes read as zeros, as they do in QEMU.
        let len = buf.len() as u64;
        let file_len = self.data_len(host_offset.saturating_add(len))?;
        // At most the buffer's length: it fits a usize.
        let stored = file_len.saturating_sub(host_offset).min(len) as usize;
        let (head, tail) = buf.split_at_mut(stored);
        if !head.is_empty() {
            self.data.read_exact_at(head, host_offset)?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// The length of `store`, known to be at least `known` (its length at open,
/// or the largest seen since), as far as a read up to `end` needs it: see
/// [`Qcow2::file_len`].
fn len_covering(store: &dyn Storage, known: &AtomicU64, end: u64) -> Result<u64> {
    let cached = known.load(Ordering::Relaxed);
    if store.is_read_only() || cached >= end {
        return Ok(cached);
    }
    let now = store.len()?;
    known.fetch_max(now, Ordering::Relaxed);
    Ok(now)
}

/// The header, parsed from the first cluster (whose size the fixed header
/// gives; the extensions and the backing name lie within it).
fn read_header(file: &dyn Storage, file_len: u64) -> Result<Header> {
    let probe_len = file_len.min(u64::from(header::V3_HEADER_LENGTH));
    let mut probe = vec![0u8; usize_of(probe_len)?];
    file.read_exact_at(&mut probe, 0)?;
    // A header too short to say is refused by parse, which names it.
    let cluster_bits = header::field::CLUSTER_BITS
        .get(&probe)
        .unwrap_or(16)
        .clamp(9, 21);
    let first_len = file_len.min(1u64 << cluster_bits);
    let mut first = vec![0u8; usize_of(first_len)?];
    file.read_exact_at(&mut first, 0)?;
    header::parse(file.path(), &first, file_len)
}

/// The internal snapshot `wanted` names (by ID or name), or the error that
/// lists those the image has.
fn choose_snapshot(path: &Path, snapshots: &[Snapshot], wanted: &str) -> Result<Snapshot> {
    snapshot::find(snapshots, wanted).cloned().ok_or_else(|| {
        let names: Vec<String> = snapshots
            .iter()
            .map(|s| format!("{} (id {})", s.name, s.id))
            .collect();
        Error::InvalidArgument(format!(
            "{}: no snapshot with ID or name '{wanted}' (the image has {})",
            path.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ))
    })
}

/// The L1 table to read through (its offset and entries) and the disk size:
/// the active image's, or the chosen snapshot's, whose table must cover its
/// disk.
fn active_table(
    path: &Path,
    header: &Header,
    chosen: Option<&Snapshot>,
) -> Result<(u64, u32, u64)> {
    match chosen {
        None => Ok((header.l1_table_offset, header.l1_size, header.size)),
        Some(s) => {
            // Its L1 table's place and limit were checked with the table.
            let size = s.disk_size.unwrap_or(header.size);
            if u64::from(s.l1_size) < header.l1_entries_needed(size) {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "qcow2: snapshot '{}' has l1_size {} for a disk of {size} bytes",
                        s.name, s.l1_size
                    ),
                ));
            }
            Ok((s.l1_table_offset, s.l1_size, size))
        }
    }
}

/// Where the guest data lives: the external data file the header names
/// (written exactly when the image is), or the image file itself.
fn open_data_file(
    path: &Path,
    file: &Arc<dyn Storage>,
    header: &Header,
    options: &OpenOptions,
) -> Result<Arc<dyn Storage>> {
    match (&header.data_file, header.has_data_file()) {
        (Some(name), true) => {
            let data_path = gate::resolve_part(path, "qcow2", "external data file", name, options)?;
            if file.is_read_only() {
                Ok(Arc::new(FileStorage::open_read_only(&data_path)?))
            } else if options.overlay {
                Ok(Arc::new(Overlay::new(FileStorage::open_read_only(
                    &data_path,
                )?)?))
            } else {
                Ok(Arc::new(FileStorage::open_read_write(&data_path)?))
            }
        }
        _ => Ok(file.clone()),
    }
}

fn read_l1(file: &dyn Storage, offset: u64, entries: u32) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; entries as usize * 8];
    if !raw.is_empty() {
        file.read_exact_at(&mut raw, offset)?;
    }
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

fn read_snapshots(file: &dyn Storage, header: &Header, file_len: u64) -> Result<Vec<Snapshot>> {
    // Entries are variable-length; read what the table can occupy, capped.
    let len = file_len
        .saturating_sub(header.snapshots_offset)
        .min(snapshot::MAX_SNAPSHOT_TABLE_BYTES)
        .min(u64::from(header.nb_snapshots) * (40 + 1024 + 2 * 65535 + 8));
    let mut table = vec![0u8; usize_of(len)?];
    file.read_exact_at(&mut table, header.snapshots_offset)?;
    let snapshots =
        snapshot::parse_table(file.path(), &table, header.nb_snapshots, header.version)?;
    // Every snapshot's L1 table, as `qemu-img check` does: a writer reads them
    // all, and a bad one means the table itself is garbage.
    for s in &snapshots {
        let bytes = u64::from(s.l1_size) * 8;
        if bytes > MAX_TABLE_BYTES {
            return Err(Error::corrupt(
                file.path(),
                format!(
                    "qcow2: snapshot '{}' has l1_size {}, an L1 table of {bytes} bytes (the limit is {})",
                    s.name,
                    s.l1_size,
                    MAX_TABLE_BYTES
                ),
            ));
        }
        header::check_table(
            file.path(),
            &format!("snapshot '{}' L1 table", s.name),
            s.l1_table_offset,
            bytes,
            header.cluster_size(),
            file_len,
        )?;
    }
    Ok(snapshots)
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // A clean close: flush, and clear the dirty bit of lazy refcounts.
        // Errors cannot be reported from here; the next writable open of a
        // dirty image rebuilds its refcounts.
        if self.writer.is_some() {
            let _ = self.close_writes();
        }
    }
}

impl BlockDriver for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        1 << self.unit_bits()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size, offset, buf.len() as u64)?;
        read_mapped(self, buf, offset, |piece, guest, mapping| match mapping {
            Mapping::Data { host_offset } => self.read_data(piece, host_offset),
            Mapping::Zero { .. } => {
                piece.fill(0);
                Ok(())
            }
            Mapping::Unallocated => read_backing(self.backing(), piece, guest),
            Mapping::Compressed {
                host_offset,
                compressed_size,
            } => self.read_compressed(piece, guest, host_offset, compressed_size),
        })
    }

    fn read_view(&self, offset: u64, len: usize) -> Result<Option<View>> {
        view_through_map(self, self.data.as_ref(), self.backing.as_ref(), offset, len)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_range(self.path(), self.size, offset, max_len.min(1))?;
        let max_len = max_len.min(self.size - offset).max(1);
        let unit_bits = self.unit_bits();
        let unit = 1u64 << unit_bits;
        let cluster_bits = self.header.cluster_bits;
        let (l1_index, l2_index, sub) = self.indices(offset);
        // The extent never crosses the L2 table that covers `offset`.
        let table_span = self.header.l2_entries() << cluster_bits;
        let table_end = (offset / table_span + 1) * table_span;
        let limit = offset.saturating_add(max_len).min(table_end).min(self.size);

        let Some((l2_offset, table)) = self.l2_for(l1_index)? else {
            return Ok(Extent {
                offset,
                length: limit - offset,
                mapping: Mapping::Unallocated,
            });
        };
        let describe = |e: String, at_index: u64| {
            self.corrupt(format!(
                "L2 table at {l2_offset:#x}, index {at_index} (guest offset {:#x}): {e}",
                (l1_index * self.header.l2_entries() + at_index) << cluster_bits
            ))
        };
        let first = self
            .decode_unit(self.l2_entry(&table, l2_index)?, sub)
            .map_err(|e| describe(e, l2_index))?;
        let within = offset & (unit - 1);
        let mapping_of = |c: Cluster, within: u64| match c {
            Cluster::Unallocated => Mapping::Unallocated,
            Cluster::Zero { host_offset } => Mapping::Zero {
                allocated: host_offset.is_some(),
            },
            Cluster::Normal { host_offset } => Mapping::Data {
                host_offset: host_offset + within,
            },
            Cluster::Compressed {
                host_offset,
                compressed_size,
            } => Mapping::Compressed {
                host_offset,
                compressed_size,
            },
        };
        let mapping = mapping_of(first, within);
        // The image file's length, for data stored in it: for an image opened
        // read-only (another process may write it), asked of the file once per
        // extent (one lseek), because a file that shrank under us must be named
        // as such, never read as zeros. A writable image's file is ours and only
        // grows: the largest length seen does ([`Qcow2::file_len`]), sparing
        // serve an lseek per request. External data files may be shorter than
        // their data.
        let data_len = match mapping {
            Mapping::Data { host_offset } if !self.header.has_data_file() => {
                Some(if self.data.is_read_only() {
                    self.data.len()?
                } else {
                    self.data_len(host_offset - within + 1)?
                })
            }
            _ => None,
        };
        if let (Mapping::Data { host_offset }, Some(data_len)) = (mapping, data_len) {
            if host_offset - within >= data_len {
                return Err(describe(
                    format!(
                        "data cluster at host offset {:#x} lies past the end of the file (size {data_len:#x})",
                        host_offset - within
                    ),
                    l2_index,
                ));
            }
        }
        if let Mapping::Compressed { .. } = mapping {
            // One compressed cluster per extent.
            let cluster_end = ((offset >> cluster_bits) + 1) << cluster_bits;
            return Ok(Extent {
                offset,
                length: cluster_end.min(limit) - offset,
                mapping,
            });
        }
        // Extend over following units with the same kind of mapping (and, for
        // data, contiguous host offsets).
        let mut end = ((offset >> unit_bits) + 1) << unit_bits;
        while end < limit {
            let (_, idx, sub) = self.indices(end);
            let next = self
                .decode_unit(self.l2_entry(&table, idx)?, sub)
                .map_err(|e| describe(e, idx))?;
            let continues = match (mapping, next) {
                (Mapping::Data { host_offset }, Cluster::Normal { host_offset: h }) => {
                    h == host_offset + (end - offset)
                }
                (Mapping::Zero { allocated }, Cluster::Zero { host_offset }) => {
                    allocated == host_offset.is_some()
                }
                (Mapping::Unallocated, Cluster::Unallocated) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            end += unit;
        }
        let mut length = end.min(limit) - offset;
        if let (Mapping::Data { host_offset }, Some(data_len)) = (mapping, data_len) {
            // Clusters wholly past the end of the file are an error at the next
            // lookup; only the last, partial one reads zeros past EOF (as QEMU
            // does), so a truncated image is never read as zeros.
            let host_end = data_len.div_ceil(unit) * unit;
            length = length.min(host_end.saturating_sub(host_offset)).max(1);
        }
        Ok(Extent {
            offset,
            length,
            mapping,
        })
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref()
    }

    fn locate(&self, offset: u64) -> Result<Option<Location>> {
        let (l1_index, l2_index, sub) = self.indices(offset);
        let extent = self.map(offset, 1)?;
        let subcluster = self.header.extended_l2().then_some(sub);
        let mut location = Location {
            kind: extent.mapping.kind(),
            format: Format::Qcow2,
            unit: "cluster",
            tables: vec![
                TableIndex {
                    table: "L1",
                    index: l1_index,
                },
                TableIndex {
                    table: "L2",
                    index: l2_index,
                },
            ],
            subcluster,
            host_offset: None,
            file: self.path().to_path_buf(),
            backing_depth: 0,
        };
        match extent.mapping {
            Mapping::Data { host_offset } => {
                location.host_offset = Some(host_offset);
                location.file = self.data.path().to_path_buf();
            }
            Mapping::Compressed { host_offset, .. } => location.host_offset = Some(host_offset),
            Mapping::Zero { .. } => {}
            Mapping::Unallocated => locate_in_backing(&mut location, self.backing(), offset)?,
        }
        Ok(Some(location))
    }

    fn is_read_only(&self) -> bool {
        self.writer.is_none()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.do_write(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.do_write_zeroes(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.do_discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.writer.is_some() {
            self.do_flush()
        } else {
            Ok(())
        }
    }

    fn info(&self) -> Vec<(String, String)> {
        let h = &self.header;
        let mut facts = vec![
            ("version".to_string(), h.version.to_string()),
            ("cluster_size".to_string(), h.cluster_size().to_string()),
            (
                "refcount_bits".to_string(),
                (1u32 << h.refcount_order).to_string(),
            ),
            (
                "compression_type".to_string(),
                match h.compression_type {
                    CompressionType::Deflate => "zlib",
                    CompressionType::Zstd => "zstd",
                }
                .to_string(),
            ),
            ("extended_l2".to_string(), h.extended_l2().to_string()),
            (
                "lazy_refcounts".to_string(),
                (h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0).to_string(),
            ),
            (
                "dirty".to_string(),
                (h.incompatible_features & header::INCOMPAT_DIRTY != 0).to_string(),
            ),
            (
                "corrupt".to_string(),
                (h.incompatible_features & header::INCOMPAT_CORRUPT != 0).to_string(),
            ),
        ];
        if let Some(b) = &h.backing_file {
            facts.push(("backing_file".to_string(), b.clone()));
        }
        if let Some(f) = &h.backing_format {
            facts.push(("backing_format".to_string(), f.clone()));
        }
        if let Some(d) = &h.data_file {
            facts.push(("data_file".to_string(), d.clone()));
            facts.push(("data_file_raw".to_string(), h.data_file_raw().to_string()));
        }
        if let Some(s) = &self.snapshot {
            facts.push(("snapshot".to_string(), format!("{} (id {})", s.name, s.id)));
        }
        facts
    }
}

#[cfg(test)]
mod crash_tests;
