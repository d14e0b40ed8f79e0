//! Refcount blocks and the refcount table: reading and writing entries of every
//! width the format allows (1 to 64 bits), and laying out a fresh set of
//! refcount structures for a known array of counts (image creation and the
//! rebuild after a crash with lazy refcounts).
//!
//! Entries narrower than a byte are packed from the least significant bit up
//! (entry 0 of a 1-bit block is bit 0 of byte 0); wider ones are big-endian.

use crate::error::{usize_of, Error, Result};
use crate::storage::Storage;
use std::collections::HashMap;
use std::ops::Range;

/// Read entry `index` of a refcount block. `None` if the block is too short.
pub fn get_entry(block: &[u8], index: u64, order: u32) -> Option<u64> {
    let index = usize::try_from(index).ok()?;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 >> order;
            let byte = *block.get(index / per_byte)?;
            Some(u64::from(byte >> ((index % per_byte) * bits)) & ((1u64 << bits) - 1))
        }
        _ => {
            let width = 1usize << (order - 3);
            let at = index.checked_mul(width)?;
            let bytes = block.get(at..at + width)?;
            Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        }
    }
}

/// Set entry `index` of a refcount block; returns the byte range that changed.
pub fn set_entry(block: &mut [u8], index: u64, order: u32, value: u64) -> Option<(usize, usize)> {
    let index = usize::try_from(index).ok()?;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 >> order;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = block.get_mut(index / per_byte)?;
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
            Some((index / per_byte, index / per_byte + 1))
        }
        _ => {
            let width = 1usize << (order - 3);
            let at = index.checked_mul(width)?;
            let bytes = block.get_mut(at..at + width)?;
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (value >> (8 * (width - 1 - i))) as u8;
            }
            Some((at, at + width))
        }
    }
}

/// The largest refcount a `1 << order`-bit entry holds.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// One cached refcount block.
struct Block {
    bytes: Vec<u8>,
    last_use: u64,
    /// The bytes changed since the block was last written to the file.
    dirty: Option<Range<usize>>,
}

/// The refcount table and a bounded write-back cache of refcount blocks.
/// `set` changes only the cached block; the writer writes dirty blocks back
/// (`write_back`) when its ordering rules allow, and keeps their number
/// bounded. Clean blocks are dropped, least recently used first, to make room.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Host offsets of the refcount blocks (0: none yet).
    pub table: Vec<u64>,
    /// Where the table lives, and how many clusters it spans.
    pub table_offset: u64,
    /// Clusters of the table.
    pub table_clusters: u32,
    blocks: HashMap<u64, Block>,
    capacity: usize,
    clock: u64,
    dirty: usize,
}

/// Bytes of refcount blocks cached per image (at least 16 blocks).
const CACHE_BYTES: u64 = 4 << 20;

impl Refcounts {
    /// Read the refcount table described by the header.
    pub fn load(
        file: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Self> {
        let bytes = u64::from(table_clusters) << cluster_bits;
        let mut raw = vec![0u8; usize_of(bytes)?];
        file.read_exact_at(&mut raw, table_offset)?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
            .collect();
        let cluster_size = 1u64 << cluster_bits;
        let file_len = file.len()?;
        for (index, entry) in table.iter().enumerate() {
            let block = entry & super::l2::OFFSET_MASK;
            let fact = if entry & !super::l2::OFFSET_MASK != 0 {
                "has reserved bits set"
            } else if block % cluster_size != 0 {
                "is not aligned to a cluster"
            } else if *entry != 0 && block.saturating_add(cluster_size) > file_len {
                "lies past the end of the file"
            } else if *entry != 0 && block < cluster_size {
                "overlaps the header"
            } else {
                continue;
            };
            return Err(Error::corrupt(
                file.path(),
                format!(
                    "qcow2: refcount table entry {index} ({entry:#018x}): the refcount block {fact} (file size {file_len:#x})"
                ),
            ));
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::new(),
            capacity: usize::try_from(CACHE_BYTES >> cluster_bits)
                .unwrap_or(16)
                .max(16),
            clock: 0,
            dirty: 0,
        })
    }

    /// Cache at most `blocks` refcount blocks (at least 2), dirty ones aside.
    pub fn set_capacity(&mut self, blocks: usize) {
        self.capacity = blocks.max(2);
    }

    /// How many blocks the cache holds when full.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Refcount entries per block.
    pub fn entries_per_block(&self) -> u64 {
        (1u64 << (self.cluster_bits + 3)) >> self.order
    }

    /// The refcount width order.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// The block offset covering `cluster`, if the table has one.
    pub fn block_of(&self, cluster: u64) -> Option<u64> {
        let ti = usize::try_from(cluster / self.entries_per_block()).ok()?;
        self.table
            .get(ti)
            .map(|e| e & super::l2::OFFSET_MASK)
            .filter(|o| *o != 0)
    }

    /// Drop the least recently used clean block if the cache is full.
    fn make_room(&mut self) {
        if self.blocks.len() < self.capacity {
            return;
        }
        let oldest = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty.is_none())
            .min_by_key(|(_, b)| b.last_use)
            .map(|(offset, _)| *offset);
        if let Some(offset) = oldest {
            self.blocks.remove(&offset);
        }
    }

    fn block<'a>(&'a mut self, file: &dyn Storage, offset: u64) -> Result<&'a mut Block> {
        let cluster_size = 1u64 << self.cluster_bits;
        self.clock += 1;
        let now = self.clock;
        if !self.blocks.contains_key(&offset) {
            if offset % cluster_size != 0 {
                return Err(Error::corrupt(
                    file.path(),
                    format!("qcow2: refcount block offset {offset:#x} is not aligned to a cluster"),
                ));
            }
            let mut raw = vec![0u8; usize_of(cluster_size)?];
            file.read_exact_at(&mut raw, offset)?;
            self.make_room();
            self.blocks.insert(
                offset,
                Block {
                    bytes: raw,
                    last_use: now,
                    dirty: None,
                },
            );
        }
        let block = self.blocks.get_mut(&offset).ok_or_else(|| {
            Error::InvalidArgument(format!("refcount block at {offset:#x} vanished"))
        })?;
        block.last_use = now;
        Ok(block)
    }

    /// The refcount of host cluster `cluster` (0 where no block covers it).
    pub fn get(&mut self, file: &dyn Storage, cluster: u64) -> Result<u64> {
        let Some(block_offset) = self.block_of(cluster) else {
            return Ok(0);
        };
        let index = cluster % self.entries_per_block();
        let order = self.order;
        let block = self.block(file, block_offset)?;
        get_entry(&block.bytes, index, order).ok_or_else(|| {
            Error::corrupt(
                file.path(),
                format!("qcow2: refcount block at {block_offset:#x} is short"),
            )
        })
    }

    /// Set the refcount of `cluster` in the cached block, which becomes dirty.
    /// The block covering it must exist.
    pub fn set(&mut self, file: &dyn Storage, cluster: u64, value: u64) -> Result<()> {
        let order = self.order;
        if value > max_refcount(order) {
            return Err(Error::InvalidArgument(format!(
                "{}: refcount of cluster {cluster} would be {value}, more than {}-bit refcounts hold",
                file.path().display(),
                1u32 << order
            )));
        }
        let block_offset = self.block_of(cluster).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: no refcount block covers cluster {cluster}",
                file.path().display()
            ))
        })?;
        let index = cluster % self.entries_per_block();
        let block = self.block(file, block_offset)?;
        let (start, end) = set_entry(&mut block.bytes, index, order, value).ok_or_else(|| {
            Error::corrupt(
                file.path(),
                format!("qcow2: refcount block at {block_offset:#x} is short"),
            )
        })?;
        let was_clean = block.dirty.is_none();
        block.dirty = Some(match block.dirty.take() {
            Some(d) => d.start.min(start)..d.end.max(end),
            None => start..end,
        });
        if was_clean {
            self.dirty += 1;
        }
        Ok(())
    }

    /// Record a block that was just written at `offset` with `contents` (clean).
    pub fn insert_block(&mut self, offset: u64, contents: Vec<u8>) {
        self.clock += 1;
        self.make_room();
        let old = self.blocks.insert(
            offset,
            Block {
                bytes: contents,
                last_use: self.clock,
                dirty: None,
            },
        );
        if old.is_some_and(|b| b.dirty.is_some()) {
            self.dirty -= 1;
        }
    }

    /// How many cached blocks hold changes the file does not have yet.
    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// The offsets of the dirty blocks, least recently used first.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut dirty: Vec<(u64, u64)> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty.is_some())
            .map(|(offset, b)| (b.last_use, *offset))
            .collect();
        dirty.sort_unstable();
        dirty.into_iter().map(|(_, offset)| offset).collect()
    }

    /// Write the changed bytes of the block at `offset` to `file`; it is
    /// clean afterwards (and stays dirty if the write fails).
    pub fn write_back(&mut self, file: &dyn Storage, offset: u64) -> Result<()> {
        let Some(block) = self.blocks.get_mut(&offset) else {
            return Ok(());
        };
        let Some(range) = block.dirty.clone() else {
            return Ok(());
        };
        let bytes = block.bytes.get(range.clone()).unwrap_or(&[]);
        file.write_all_at(bytes, offset + range.start as u64)?;
        block.dirty = None;
        self.dirty -= 1;
        Ok(())
    }
}

/// A fresh set of refcount structures for `counts` (one entry per host
/// cluster), placed right after the last counted cluster: the table, then one
/// block per `entries_per_block` clusters. The structures count themselves.
pub struct FreshLayout {
    /// Host offset of the refcount table.
    pub table_offset: u64,
    /// Its length in clusters.
    pub table_clusters: u32,
    /// The table's bytes.
    pub table: Vec<u8>,
    /// Each block's host offset and bytes.
    pub blocks: Vec<(u64, Vec<u8>)>,
}

/// Lay out refcount structures for `counts`; `counts` grows to cover them.
pub fn fresh_layout(counts: &mut Vec<u64>, cluster_bits: u32, order: u32) -> Result<FreshLayout> {
    let cluster_size = 1u64 << cluster_bits;
    let per_block = (cluster_size * 8) >> order;
    let start = counts.len() as u64;
    let (mut table_clusters, mut nblocks) = (0u64, 0u64);
    loop {
        let total = start + table_clusters + nblocks;
        let want_blocks = total.div_ceil(per_block);
        let want_table = (want_blocks * 8).div_ceil(cluster_size).max(1);
        if want_blocks == nblocks && want_table == table_clusters {
            break;
        }
        nblocks = want_blocks;
        table_clusters = want_table;
    }
    if table_clusters * cluster_size > super::header::MAX_REFTABLE_BYTES {
        return Err(Error::InvalidArgument(
            "qcow2: the image needs a refcount table larger than QEMU allows".into(),
        ));
    }
    let total = start + table_clusters + nblocks;
    counts.resize(usize_of(total)?, 0);
    for c in counts.iter_mut().skip(usize_of(start)?) {
        *c = 1;
    }
    let max = max_refcount(order);
    if let Some((cluster, count)) = counts.iter().enumerate().find(|(_, c)| **c > max) {
        return Err(Error::InvalidArgument(format!(
            "qcow2: cluster {cluster} has {count} references, more than {}-bit refcounts hold",
            1u32 << order
        )));
    }
    let blocks_start = start + table_clusters;
    let mut table = vec![0u8; usize_of(table_clusters * cluster_size)?];
    let mut blocks = Vec::new();
    for b in 0..nblocks {
        let offset = (blocks_start + b) * cluster_size;
        if let Some(slot) = table
            .get_mut(usize::try_from(b * 8).unwrap_or(usize::MAX)..)
            .and_then(|s| s.get_mut(..8))
        {
            slot.copy_from_slice(&offset.to_be_bytes());
        }
        let mut block = vec![0u8; usize_of(cluster_size)?];
        for i in 0..per_block {
            let cluster = b * per_block + i;
            match counts.get(usize::try_from(cluster).unwrap_or(usize::MAX)) {
                Some(&c) if c > 0 => {
                    set_entry(&mut block, i, order, c);
                }
                Some(_) => {}
                None => break,
            }
        }
        blocks.push((offset, block));
    }
    Ok(FreshLayout {
        table_offset: start * cluster_size,
        table_clusters: table_clusters as u32,
        table,
        blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let max = max_refcount(order);
            let n = (512 * 8) >> order;
            for i in 0..n {
                set_entry(&mut block, i, order, (i * 7 + 3) & max).unwrap();
            }
            for i in 0..n {
                assert_eq!(get_entry(&block, i, order), Some((i * 7 + 3) & max));
            }
            assert_eq!(get_entry(&block, n, order), None);
        }
        // 1-bit entries pack from the least significant bit.
        let mut block = vec![0u8; 1];
        set_entry(&mut block, 1, 0, 1).unwrap();
        assert_eq!(block[0], 0b10);
        let mut block = vec![0u8; 2];
        set_entry(&mut block, 0, 4, 0x1234).unwrap();
        assert_eq!(block, [0x12, 0x34]);
    }

    #[test]
    fn fresh_layout_counts_itself() {
        for (bits, order) in [(9u32, 6u32), (16, 4), (9, 0)] {
            let mut counts = vec![1u64; 300];
            let layout = fresh_layout(&mut counts, bits, order).unwrap();
            let per_block = ((1u64 << bits) * 8) >> order;
            assert_eq!(
                counts.len() as u64,
                (layout.table_offset >> bits)
                    + u64::from(layout.table_clusters)
                    + layout.blocks.len() as u64
            );
            assert!(layout.blocks.len() as u64 * per_block >= counts.len() as u64);
            for (i, c) in counts.iter().enumerate() {
                let b = i as u64 / per_block;
                let got = get_entry(&layout.blocks[b as usize].1, i as u64 % per_block, order);
                assert_eq!(got, Some(*c));
            }
        }
    }
}
