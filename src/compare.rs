//! Finding the first difference fast: compare large blocks with `==` (memcmp,
//! vectorised by libc), and look inside a block only when it differs.
//!
//! A leaf below both of its users, the mirrored device (a driver) and the
//! verify engine, so that no driver reaches up into the engine.

const BLOCK: usize = 4096;

/// The index of the first byte where `a` and `b` differ (over the shorter length).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let len = a.len().min(b.len());
    let (a, b) = (a.get(..len)?, b.get(..len)?);
    let mut base = 0;
    for (x, y) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        if x != y {
            return x.iter().zip(y).position(|(p, q)| p != q).map(|i| base + i);
        }
        base += x.len();
    }
    None
}

/// The index of the first non-zero byte.
pub fn first_nonzero(a: &[u8]) -> Option<usize> {
    let mut base = 0;
    for block in a.chunks(BLOCK) {
        // An OR-fold has no early exit, so it vectorises well.
        if block.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return block.iter().position(|&x| x != 0).map(|i| base + i);
        }
        base += block.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_differences_anywhere() {
        let a = vec![7u8; 10000];
        for at in [0usize, 1, 4095, 4096, 9999] {
            let mut b = a.clone();
            b[at] ^= 1;
            assert_eq!(first_difference(&a, &b), Some(at));
            let mut z = vec![0u8; 10000];
            z[at] = 1;
            assert_eq!(first_nonzero(&z), Some(at));
        }
        assert_eq!(first_difference(&a, &a), None);
        assert_eq!(first_nonzero(&[0u8; 5000]), None);
    }
}
