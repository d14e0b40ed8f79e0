//! The hash functions a digest is built from: one per algorithm, with the
//! per-block hash (run on every worker) and the outer hash (run serially over
//! the block digests).
//!
//! SHA-256 is the `sha2` crate, which picks the CPU's SHA extensions at run
//! time. Chosen by measurement on this project's machines (SHA-NI, 64 KiB
//! blocks, CPU time per core): `sha2` 1.62–1.67 GB/s, `ring` 1.65–1.68,
//! `aws-lc-rs` 1.65–1.68, the `openssl` crate 1.58, `openssl speed` 1.60–1.68.
//! They are equal within noise, and `sha2` is pure Rust (no C toolchain at
//! build time, no system library at run time), so it is the one.

use sha2::Digest as _;

/// Bytes fed to SHA-256 at a time by [`Algorithm::hash_block`] (a page).
const PIECE: usize = 4096;

/// Ask the CPU to bring `bytes` into its cache.
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: prefetching is a hint; the address is inside a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch(line.as_ptr().cast(), std::arch::x86_64::_MM_HINT_T0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Bytes of one block digest (both algorithms give 32).
pub const DIGEST_LEN: usize = 32;

/// One block's digest.
pub type BlockDigest = [u8; DIGEST_LEN];

/// The hash function H of the construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// SHA-256: blksum's default, and ours.
    Sha256,
    /// BLAKE3 (32-byte output): several times faster per core.
    Blake3,
}

impl Algorithm {
    /// Every algorithm, in the order help texts list them.
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Blake3];

    /// The name, as blksum and the command line spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
        }
    }

    /// Parse a name as the command line gives it.
    pub fn parse(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// H(bytes).
    pub fn hash(&self, bytes: &[u8]) -> BlockDigest {
        match self {
            Algorithm::Sha256 => sha2::Sha256::digest(bytes).into(),
            Algorithm::Blake3 => *blake3::hash(bytes).as_bytes(),
        }
    }

    /// H(bytes) of a block read from memory that is likely cold (the page
    /// cache), with `following` the bytes that will be hashed next. SHA-256 is
    /// fed 4 KiB at a time, each piece prefetched while the one before it is
    /// hashed: the hardware prefetcher stops at page boundaries, and without
    /// the hint the hash stalls on memory (measured on a 2 GiB raw image, one
    /// thread: 2.0–2.6 s of CPU without, 1.2–1.4 s with, which is the rate of
    /// hashing a buffer already in cache).
    pub fn hash_block(&self, bytes: &[u8], following: &[u8]) -> BlockDigest {
        match self {
            Algorithm::Sha256 => {
                let mut hasher = sha2::Sha256::new();
                let mut pieces = bytes.chunks(PIECE).peekable();
                while let Some(piece) = pieces.next() {
                    let next = pieces.peek().copied().unwrap_or(following);
                    prefetch(next.get(..PIECE).unwrap_or(next));
                    hasher.update(piece);
                }
                hasher.finalize().into()
            }
            Algorithm::Blake3 => self.hash(bytes),
        }
    }

    /// An incremental hasher, for the outer hash and for long inputs.
    pub fn hasher(&self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

/// An incremental hash of one algorithm.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// BLAKE3 state (boxed: it is about 2 KiB).
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// Add `bytes` to the message.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// The digest of everything added.
    pub fn finish(self) -> BlockDigest {
        match self {
            Hasher::Sha256(h) => h.finalize().into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

/// Block digests repeated to fill one update of the outer hash: runs of zero
/// blocks are fed in pieces this long, not 32 bytes at a time.
const ZERO_RUN_PIECE: usize = 2048;

/// The outer hash of the construction: `H(d1 || d2 || … || dN || le64(size))`,
/// fed in block order. Runs of zero blocks are fed as a count.
pub struct Outer {
    hasher: Hasher,
    /// `ZERO_RUN_PIECE` copies of the zero block's digest.
    zero_piece: Vec<u8>,
    blocks: u64,
}

impl Outer {
    /// A fresh outer hash; `zero_digest` is H of one full zero block.
    pub fn new(algorithm: Algorithm, zero_digest: &BlockDigest) -> Self {
        Outer {
            hasher: algorithm.hasher(),
            zero_piece: zero_digest.repeat(ZERO_RUN_PIECE),
            blocks: 0,
        }
    }

    /// The next block digests, in order.
    pub fn digests(&mut self, digests: &[BlockDigest]) {
        self.hasher.update(digests.as_flattened());
        self.blocks += digests.len() as u64;
    }

    /// The next `count` blocks are full zero blocks.
    pub fn zeros(&mut self, count: u64) {
        let mut left = count;
        while left > 0 {
            let n = left.min(ZERO_RUN_PIECE as u64) as usize;
            self.hasher
                .update(self.zero_piece.get(..n * DIGEST_LEN).unwrap_or(&[]));
            left -= n as u64;
        }
        self.blocks += count;
    }

    /// Blocks fed so far.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The image digest, for an image of `size` bytes.
    pub fn finish(mut self, size: u64) -> BlockDigest {
        self.hasher.update(&size.to_le_bytes());
        self.hasher.finish()
    }
}

/// Lower-case hex, as digests are printed.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        assert_eq!(
            to_hex(&Algorithm::Sha256.hash(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            to_hex(&Algorithm::Blake3.hash(b"")),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn zero_runs_hash_like_repeated_digests() {
        for algorithm in Algorithm::ALL {
            let zero = algorithm.hash(&[0u8; 65536]);
            let data = algorithm.hash(b"x");
            let mut fast = Outer::new(algorithm, &zero);
            let mut slow = algorithm.hasher();
            fast.digests(&[data]);
            slow.update(&data);
            fast.zeros(5000);
            for _ in 0..5000 {
                slow.update(&zero);
            }
            assert_eq!(fast.blocks(), 5001);
            slow.update(&12345u64.to_le_bytes());
            assert_eq!(fast.finish(12345), slow.finish());
        }
    }
}
