//! L1 and L2 entry decoding: the bit layouts of the qcow2 specification, with
//! every reserved bit and alignment checked.

use crate::driver::SECTOR_SIZE;

/// Bits 9-55 of an L1 entry or a standard L2 entry: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (bits 1-8 and 56-61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What one L2 entry says of its cluster (or, with subclusters, of one subcluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Nothing allocated: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host_offset` is the reserved cluster, if any.
    Zero {
        /// The preallocated host cluster, for "allocated zero" clusters.
        host_offset: Option<u64>,
    },
    /// Data at `host_offset` (cluster-aligned, or subcluster-aligned).
    Normal {
        /// Host offset of the (sub)cluster.
        host_offset: u64,
    },
    /// A compressed cluster.
    Compressed {
        /// Byte offset of the stream in the image file.
        host_offset: u64,
        /// Bytes that may hold the stream.
        compressed_size: u64,
    },
}

/// Decode the host offset of an L1 entry: the L2 table's offset, or 0.
pub fn l1_offset(entry: u64) -> Result<u64, String> {
    if entry & L1_RESERVED != 0 {
        return Err(format!(
            "L1 entry {entry:#018x} has reserved bits set ({:#x})",
            entry & L1_RESERVED
        ));
    }
    Ok(entry & OFFSET_MASK)
}

/// The compressed cluster descriptor of an L2 entry: where the stream starts and
/// how many bytes it may occupy. The split point between the two fields depends
/// on the cluster size: x = 62 - (cluster_bits - 8).
pub fn compressed_descriptor(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let offset_bits = 62 - (cluster_bits - 8);
    let host_offset = entry & ((1u64 << offset_bits) - 1);
    let sector_mask = (1u64 << (cluster_bits - 8)) - 1;
    let extra_sectors = (entry >> offset_bits) & sector_mask;
    // The stream fills the rest of the sector holding host_offset, plus
    // extra_sectors whole sectors.
    let compressed_size = (extra_sectors + 1) * SECTOR_SIZE - host_offset % SECTOR_SIZE;
    (host_offset, compressed_size)
}

/// Decode a standard (64-bit) L2 entry.
pub fn decode(entry: u64, cluster_bits: u32, has_data_file: bool) -> Result<Cluster, String> {
    let cluster_size = 1u64 << cluster_bits;
    if entry & COMPRESSED != 0 {
        if has_data_file {
            return Err(format!(
                "L2 entry {entry:#018x} is compressed, which images with an external data file cannot be"
            ));
        }
        let (host_offset, compressed_size) = compressed_descriptor(entry, cluster_bits);
        if host_offset & !OFFSET_MASK & !0x1ff != 0 {
            return Err(format!(
                "compressed L2 entry {entry:#018x} has an offset beyond 2^56"
            ));
        }
        return Ok(Cluster::Compressed {
            host_offset,
            compressed_size,
        });
    }
    if entry & L2_RESERVED != 0 {
        return Err(format!(
            "L2 entry {entry:#018x} has reserved bits set ({:#x})",
            entry & L2_RESERVED
        ));
    }
    let host_offset = entry & OFFSET_MASK;
    if host_offset % cluster_size != 0 {
        return Err(format!(
            "L2 entry {entry:#018x} has host offset {host_offset:#x}, not aligned to a cluster ({cluster_size} bytes)"
        ));
    }
    if entry & ZERO != 0 {
        return Ok(Cluster::Zero {
            host_offset: (host_offset != 0).then_some(host_offset),
        });
    }
    if host_offset == 0 {
        // Offset 0 is a valid data-file offset, told apart by the COPIED flag.
        if has_data_file && entry & COPIED != 0 {
            return Ok(Cluster::Normal { host_offset: 0 });
        }
        return Ok(Cluster::Unallocated);
    }
    Ok(Cluster::Normal { host_offset })
}

/// Decode subcluster `index` (0-31) of an extended L2 entry with its bitmap.
pub fn decode_subcluster(
    entry: u64,
    bitmap: u64,
    index: u32,
    cluster_bits: u32,
    has_data_file: bool,
) -> Result<Cluster, String> {
    let subcluster_size = 1u64 << (cluster_bits - 5);
    let alloc = bitmap & (1u64 << index) != 0;
    let zero = bitmap & (1u64 << (index + 32)) != 0;
    if entry & COMPRESSED != 0 {
        if bitmap != 0 {
            return Err(format!(
                "compressed L2 entry {entry:#018x} has a non-zero subcluster bitmap {bitmap:#018x}"
            ));
        }
        return decode(entry, cluster_bits, has_data_file);
    }
    if entry & ZERO != 0 {
        return Err(format!(
            "L2 entry {entry:#018x} has the zero flag set, which extended L2 entries reserve"
        ));
    }
    if alloc && zero {
        return Err(format!(
            "L2 bitmap {bitmap:#018x} marks subcluster {index} both allocated and zero"
        ));
    }
    match decode(entry, cluster_bits, has_data_file)? {
        Cluster::Normal { host_offset } => Ok(if alloc {
            Cluster::Normal {
                host_offset: host_offset + u64::from(index) * subcluster_size,
            }
        } else if zero {
            Cluster::Zero {
                host_offset: Some(host_offset),
            }
        } else {
            Cluster::Unallocated
        }),
        Cluster::Unallocated => {
            if bitmap & 0xffff_ffff != 0 {
                return Err(format!(
                    "L2 entry {entry:#018x} is unallocated but its bitmap {bitmap:#018x} marks subclusters allocated"
                ));
            }
            Ok(if zero {
                Cluster::Zero { host_offset: None }
            } else {
                Cluster::Unallocated
            })
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_layout_for_every_cluster_size() {
        for cluster_bits in 9..=21u32 {
            let offset_bits = 62 - (cluster_bits - 8);
            let max_sectors = (1u64 << (cluster_bits - 8)) - 1;
            for (host, extra) in [
                (0x1234_5600u64 + 17, 3u64.min(max_sectors)),
                (512, 0),
                (0x7_0000_0001, max_sectors),
            ] {
                let entry = COMPRESSED | (extra << offset_bits) | host;
                let (o, s) = compressed_descriptor(entry, cluster_bits);
                assert_eq!(o, host, "cluster_bits {cluster_bits}");
                assert_eq!(s, (extra + 1) * 512 - (host & 511));
                assert!(matches!(
                    decode(entry, cluster_bits, false),
                    Ok(Cluster::Compressed { .. })
                ));
            }
        }
    }

    #[test]
    fn standard_entries() {
        assert_eq!(decode(0, 16, false), Ok(Cluster::Unallocated));
        assert_eq!(
            decode(1, 16, false),
            Ok(Cluster::Zero { host_offset: None })
        );
        assert_eq!(
            decode(COPIED | 0x5_0000 | 1, 16, false),
            Ok(Cluster::Zero {
                host_offset: Some(0x5_0000)
            })
        );
        assert_eq!(
            decode(COPIED | 0x5_0000, 16, false),
            Ok(Cluster::Normal {
                host_offset: 0x5_0000
            })
        );
        assert_eq!(
            decode(COPIED, 16, true),
            Ok(Cluster::Normal { host_offset: 0 })
        );
        assert_eq!(decode(COPIED, 16, false), Ok(Cluster::Unallocated));
        assert!(decode(0x5_0200, 16, false)
            .unwrap_err()
            .contains("not aligned"));
        assert!(decode(0x5_0000 | 2, 16, false)
            .unwrap_err()
            .contains("reserved"));
        assert!(decode(COMPRESSED | 512, 16, true).is_err());
    }

    #[test]
    fn l1_entries() {
        assert_eq!(l1_offset(COPIED | 0x3_0000), Ok(0x3_0000));
        assert!(l1_offset(0x3_0001).is_err());
    }

    #[test]
    fn subcluster_bitmaps() {
        let bits = 16;
        let sc = 1u64 << (bits - 5);
        let host = COPIED | 0x10_0000;
        // subcluster 0 allocated, 1 zero, 2 unallocated
        let bitmap = 1u64 | (1 << (32 + 1));
        assert_eq!(
            decode_subcluster(host, bitmap, 0, bits, false),
            Ok(Cluster::Normal {
                host_offset: 0x10_0000
            })
        );
        assert_eq!(
            decode_subcluster(host, bitmap, 1, bits, false),
            Ok(Cluster::Zero {
                host_offset: Some(0x10_0000)
            })
        );
        assert_eq!(
            decode_subcluster(host, bitmap, 2, bits, false),
            Ok(Cluster::Unallocated)
        );
        assert_eq!(
            decode_subcluster(host, 1 << 31, 31, bits, false),
            Ok(Cluster::Normal {
                host_offset: 0x10_0000 + 31 * sc
            })
        );
        assert!(decode_subcluster(host, 1 | (1 << 32), 0, bits, false).is_err());
        assert!(decode_subcluster(0, 1, 0, bits, false).is_err());
        assert_eq!(
            decode_subcluster(0, 1 << 40, 8, bits, false),
            Ok(Cluster::Zero { host_offset: None })
        );
        assert!(decode_subcluster(COMPRESSED | 512, 1, 0, bits, false).is_err());
    }
}
