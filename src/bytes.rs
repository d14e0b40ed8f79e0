//! Big-endian fields read from a byte buffer without a chance of panicking:
//! the one reader that the on-disk formats (qcow2's header and snapshot
//! table) and the NBD wire protocol share. It sits at the bottom layer, below
//! storage and the drivers, so the NBD wire module, which lies below the
//! drivers, can use it too.

/// Big-endian field access that cannot panic: a field past the end of the
/// buffer reads as `None`.
pub struct BeBytes<'a>(pub &'a [u8]);

impl BeBytes<'_> {
    /// The byte at `at`.
    pub fn u8(&self, at: usize) -> Option<u8> {
        self.0.get(at).copied()
    }
    /// The big-endian `u16` at `at`.
    pub fn u16(&self, at: usize) -> Option<u16> {
        Some(u16::from_be_bytes(
            self.0.get(at..at.checked_add(2)?)?.try_into().ok()?,
        ))
    }
    /// The big-endian `u32` at `at`.
    pub fn u32(&self, at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(
            self.0.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    }
    /// The big-endian `u64` at `at`.
    pub fn u64(&self, at: usize) -> Option<u64> {
        Some(u64::from_be_bytes(
            self.0.get(at..at.checked_add(8)?)?.try_into().ok()?,
        ))
    }
}
