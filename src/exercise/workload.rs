//! The seeded workload: the mixes that weight them, the generator
//! that turns (seed, op number) into an operation, and the write patterns.
//!
//! Op `n` depends only on the seed, `n`, the device size and the mixes, never on
//! earlier ops having run, so the generator has random access: `--ops N` runs a
//! prefix of the same sequence whatever N is, a `--duration` run is a prefix too,
//! and a reproduction needs only the seed and a count.

use crate::driver::SECTOR_SIZE as SECTOR;
use crate::error::{Error, Result};
use crate::size::parse_size;
use std::fmt;

pub use crate::record::op::{Op, OpKind, MAX_REQUEST};

/// How often each kind of op is drawn (relative weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Reads.
    pub read: u32,
    /// Writes.
    pub write: u32,
    /// Write-zeroes.
    pub zero: u32,
    /// Discards.
    pub discard: u32,
    /// Flushes.
    pub flush: u32,
}

impl Default for Mix {
    /// Read-heavy, like an OS install: mostly reads, a steady stream of writes,
    /// and a few zeroing, discard and flush requests.
    fn default() -> Self {
        Mix {
            read: 60,
            write: 25,
            zero: 5,
            discard: 5,
            flush: 5,
        }
    }
}

impl Mix {
    /// Parse `read=60,write=25,zero=5,discard=5,flush=5`. Kinds left out get
    /// weight 0; at least one weight must be positive.
    pub fn parse(text: &str) -> Result<Mix> {
        let bad = |m: String| Error::InvalidArgument(format!("--mix '{text}': {m}"));
        let mut mix = Mix {
            read: 0,
            write: 0,
            zero: 0,
            discard: 0,
            flush: 0,
        };
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("'{item}' is not KIND=WEIGHT")))?;
            let weight: u32 = value
                .trim()
                .parse()
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| {
                    bad(format!(
                        "weight '{value}' is not an integer from 0 to 1000000"
                    ))
                })?;
            let slot = match key.trim() {
                "read" => &mut mix.read,
                "write" => &mut mix.write,
                "zero" => &mut mix.zero,
                "discard" => &mut mix.discard,
                "flush" => &mut mix.flush,
                other => {
                    return Err(bad(format!(
                        "unknown kind '{other}' (known: read, write, zero, discard, flush)"
                    )))
                }
            };
            *slot = weight;
        }
        if mix.total() == 0 {
            return Err(bad("every weight is 0".to_string()));
        }
        Ok(mix)
    }

    fn total(&self) -> u64 {
        [self.read, self.write, self.zero, self.discard, self.flush]
            .iter()
            .map(|&w| u64::from(w))
            .sum()
    }

    /// Whether any op the mix draws changes the device.
    pub fn writes(&self) -> bool {
        self.write + self.zero + self.discard > 0
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "read={},write={},zero={},discard={},flush={}",
            self.read, self.write, self.zero, self.discard, self.flush
        )
    }
}

/// The request sizes drawn: buckets of (largest size, weight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeMix {
    buckets: Vec<(u64, u32)>,
}

impl Default for SizeMix {
    /// Mostly 4 KiB to 64 KiB, as a guest's page cache issues them, with some
    /// single sectors and some large sequential requests up to 4 MiB.
    fn default() -> Self {
        SizeMix {
            buckets: vec![
                (SECTOR, 10),
                (4 << 10, 35),
                (16 << 10, 15),
                (64 << 10, 20),
                (256 << 10, 10),
                (1 << 20, 7),
                (4 << 20, 3),
            ],
        }
    }
}

impl SizeMix {
    /// Parse `512=10,4k=40,64k=30,1M=15,4M=5`: each SIZE=WEIGHT is a bucket of
    /// requests up to SIZE bytes (QEMU's size grammar, see [`crate::size`];
    /// 1 B to 64 MiB).
    pub fn parse(text: &str) -> Result<SizeMix> {
        let bad = |m: String| Error::InvalidArgument(format!("--size-mix '{text}': {m}"));
        let mut buckets = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (size, weight) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("'{item}' is not SIZE=WEIGHT")))?;
            let size = parse_size(size.trim())
                .ok()
                .filter(|s| (1..=MAX_REQUEST).contains(s))
                .ok_or_else(|| bad(format!("size '{size}' is not 1 to 64M bytes")))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| {
                    bad(format!(
                        "weight '{weight}' is not an integer from 0 to 1000000"
                    ))
                })?;
            buckets.push((size, weight));
        }
        if buckets.iter().all(|(_, w)| *w == 0) {
            return Err(bad("no bucket has a positive weight".to_string()));
        }
        Ok(SizeMix { buckets })
    }

    /// The largest size any bucket draws.
    pub fn max_size(&self) -> u64 {
        self.buckets.iter().map(|(s, _)| *s).max().unwrap_or(SECTOR)
    }
}

impl fmt::Display for SizeMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (size, weight)) in self.buckets.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let size = match *size {
                s if s % (1 << 20) == 0 => format!("{}M", s >> 20),
                s if s % (1 << 10) == 0 => format!("{}k", s >> 10),
                s => s.to_string(),
            };
            write!(f, "{sep}{size}={weight}")?;
        }
        Ok(())
    }
}

/// SplitMix64's finaliser: a fast, well-mixed 64-bit hash.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A small deterministic generator (SplitMix64) for one op's choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, number: u64, stream: u64) -> Rng {
        Rng(mix64(seed ^ mix64(number ^ mix64(stream))))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`); the bias of the modulo is below 2^-40 for
    /// every n this module uses.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn pick(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut r = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return i;
            }
            r -= w;
        }
        0
    }
}

/// Ops that aim at a recent op's spot look back at most this far, so reads
/// often hit fresh writes and writes partly overwrite recent ones.
const LOOK_BACK: u64 = 32;

/// A seeded workload for a device of a given size.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The seed.
    pub seed: u64,
    /// The device size the ops are drawn for.
    pub size: u64,
    /// Op kinds.
    pub mix: Mix,
    /// Request sizes.
    pub size_mix: SizeMix,
}

impl Workload {
    /// Where op `number` aims when it picks its own spot.
    fn home(&self, number: u64) -> u64 {
        Rng::new(self.seed, number, 1).below(self.size)
    }

    /// Op `number` of the sequence.
    ///
    /// Shapes: 60% aligned (a bucket's full size at an offset aligned to it, up to
    /// 64 KiB), 20% sector-granular (random whole sectors), 20% byte-granular
    /// (any offset, any length). Half the ops aim near one of the last 32 ops'
    /// spots, half at a fresh one.
    pub fn op(&self, number: u64) -> Op {
        let mut rng = Rng::new(self.seed, number, 0);
        let m = &self.mix;
        let kind = match rng.pick(&[
            u64::from(m.read),
            u64::from(m.write),
            u64::from(m.zero),
            u64::from(m.discard),
            u64::from(m.flush),
        ]) {
            0 => OpKind::Read,
            1 => OpKind::Write { fua: false },
            2 => OpKind::Zero {
                unmap: rng.below(2) == 1,
                fua: false,
                fast: false,
            },
            3 => OpKind::Discard { fua: false },
            _ => OpKind::Flush,
        };
        if kind == OpKind::Flush || self.size == 0 {
            return Op {
                number,
                kind: OpKind::Flush,
                offset: 0,
                length: 0,
            };
        }
        let weights: Vec<u64> = self
            .size_mix
            .buckets
            .iter()
            .map(|(_, w)| u64::from(*w))
            .collect();
        let bucket = self
            .size_mix
            .buckets
            .get(rng.pick(&weights))
            .map_or(SECTOR, |(s, _)| *s)
            .min(self.size);
        let center = if number > 0 && rng.below(2) == 0 {
            self.home(number - 1 - rng.below(LOOK_BACK.min(number)))
        } else {
            self.home(number)
        };
        let shape = rng.below(10);
        let (length, align) = if shape < 6 && bucket >= SECTOR {
            let length = bucket / SECTOR * SECTOR;
            let align = if length.is_power_of_two() {
                length.min(64 << 10)
            } else {
                SECTOR
            };
            (length, align)
        } else if shape < 8 && bucket >= SECTOR {
            ((rng.below(bucket / SECTOR) + 1) * SECTOR, SECTOR)
        } else {
            (rng.below(bucket) + 1, 1)
        };
        let length = length.min(self.size);
        // The latest aligned start at or before `center` that keeps the op inside.
        let last_start = (self.size - length) / align * align;
        let offset = (center / align * align).min(last_start);
        Op {
            number,
            kind,
            offset,
            length,
        }
    }
}

/// Fill `buf` with op `number`'s bytes for the guest range starting at
/// `offset`. Each aligned 8-byte word of the disk gets a hash of (seed, op
/// number, word index), so no two writes (nor two places of one write) share
/// bytes: a stale, lost or misplaced write reads back as the wrong bytes.
pub fn fill_pattern(buf: &mut [u8], seed: u64, number: u64, offset: u64) {
    let key = pattern_key(seed, number);
    let word_of = |guest: u64| pattern_word(key, guest / 8);
    // Under 8: it fits a usize.
    let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
    let (first, rest) = buf.split_at_mut(head);
    if !first.is_empty() {
        let word = word_of(offset);
        let start = (offset % 8) as usize;
        for (i, b) in first.iter_mut().enumerate() {
            *b = word.get(start + i).copied().unwrap_or(0);
        }
    }
    let base = offset + head as u64;
    let whole = rest.len() / 8 * 8;
    let mut chunks = rest.chunks_exact_mut(8);
    for (i, chunk) in chunks.by_ref().enumerate() {
        chunk.copy_from_slice(&word_of(base + 8 * i as u64));
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let guest = base + whole as u64;
        let word = word_of(guest);
        for (b, w) in tail.iter_mut().zip(word) {
            *b = w;
        }
    }
}

/// The per-op key of [`fill_pattern`].
pub fn pattern_key(seed: u64, number: u64) -> u64 {
    mix64(seed ^ mix64(number.wrapping_add(0x5eed)))
}

/// The 8 bytes [`fill_pattern`] puts in aligned word `word` (guest offset / 8).
pub fn pattern_word(key: u64, word: u64) -> [u8; 8] {
    mix64(key ^ word).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(seed: u64) -> Workload {
        Workload {
            seed,
            size: 64 << 20,
            mix: Mix::default(),
            size_mix: SizeMix::default(),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_ops_and_another_seed_others() {
        let a: Vec<Op> = (0..1000).map(|n| workload(7).op(n)).collect();
        let b: Vec<Op> = (0..1000).map(|n| workload(7).op(n)).collect();
        let c: Vec<Op> = (0..1000).map(|n| workload(8).op(n)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn ops_stay_inside_the_device_and_cover_every_kind_and_shape() {
        let w = Workload {
            size: 3 << 20 | 777,
            ..workload(1)
        };
        let mut kinds = std::collections::HashSet::new();
        let (mut unaligned, mut sector, mut big) = (0, 0, 0);
        for n in 0..20_000 {
            let op = w.op(n);
            kinds.insert(op.kind.name());
            if op.kind == OpKind::Flush {
                continue;
            }
            assert!(op.length >= 1 && op.offset + op.length <= w.size, "{op}");
            if op.offset % SECTOR != 0 || op.length % SECTOR != 0 {
                unaligned += 1;
            } else {
                sector += 1;
            }
            if op.length >= 1 << 20 {
                big += 1;
            }
        }
        assert_eq!(kinds.len(), 5);
        assert!(unaligned > 2000 && sector > 8000 && big > 500);
    }

    #[test]
    fn every_op_drawn_has_a_log_line_that_reads_back() {
        let w = Workload {
            size: 64 << 20,
            ..workload(3)
        };
        for n in 0..2000 {
            let op = w.op(n);
            assert_eq!(Op::parse(&op.log_line()).unwrap(), op);
        }
    }

    #[test]
    fn patterns_depend_on_seed_op_and_place_and_not_on_how_they_are_cut() {
        let mut whole = vec![0u8; 4096];
        fill_pattern(&mut whole, 1, 5, 1000);
        for (start, len) in [(0usize, 3usize), (3, 13), (16, 4000), (4090, 6)] {
            let mut piece = vec![0u8; len];
            fill_pattern(&mut piece, 1, 5, 1000 + start as u64);
            assert_eq!(piece, whole[start..start + len]);
        }
        let mut other_op = vec![0u8; 4096];
        fill_pattern(&mut other_op, 1, 6, 1000);
        let mut other_seed = vec![0u8; 4096];
        fill_pattern(&mut other_seed, 2, 5, 1000);
        let mut moved = vec![0u8; 4096];
        fill_pattern(&mut moved, 1, 5, 1512);
        for other in [&other_op, &other_seed, &moved] {
            let same = whole
                .iter()
                .zip(other.iter())
                .filter(|(a, b)| a == b)
                .count();
            assert!(same < 64, "{same} equal bytes");
        }
    }

    #[test]
    fn mixes_parse_and_print() {
        let m = Mix::parse("read=1,flush=2").unwrap();
        assert_eq!(m.to_string(), "read=1,write=0,zero=0,discard=0,flush=2");
        assert!(!m.writes());
        assert!(Mix::parse("read=0").is_err());
        assert!(Mix::parse("reed=1")
            .unwrap_err()
            .to_string()
            .contains("unknown kind 'reed'"));
        let s = SizeMix::parse("512=1,4k=2,1M=3").unwrap();
        assert_eq!(s.to_string(), "512=1,4k=2,1M=3");
        // QEMU's size grammar, as every size option takes it.
        let q = SizeMix::parse("0x200=1, 1.5k =2,.5M=3").unwrap();
        assert_eq!(q.to_string(), "512=1,1536=2,512k=3");
        assert_eq!(s.max_size(), 1 << 20);
        assert!(SizeMix::parse("128M=1").is_err());
        let default = SizeMix::default();
        assert_eq!(SizeMix::parse(&default.to_string()).unwrap(), default);
    }
}
