//! Finding the first difference fast: compare large blocks with `==` (memcmp,
//! vectorised by libc), and look inside a block only when it differs.
//!
//! A leaf below both of its users, the mirrored device (a driver) and the
//! verify engine, so that no driver reaches up into the engine. It also
//! draws a difference for people ([`hexdump_diff`]), for exercise's and
//! serve's findings alike.

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

/// A short hexdump diff of one sector from the row holding `first_byte` on:
/// the 16-byte rows that differ (at most `max_rows`), each as a `test` line and
/// a `raw` line with `^^` under the differing bytes.
pub fn hexdump_diff(
    sector_offset: u64,
    first_byte: u64,
    test: &[u8],
    raw: &[u8],
    max_rows: usize,
) -> Vec<String> {
    let mut lines = Vec::new();
    let rows = test.len().max(raw.len()).div_ceil(16);
    // Rows of one sector: it fits a usize.
    let first_row = (first_byte.saturating_sub(sector_offset) / 16) as usize;
    let mut shown = 0;
    let mut differing = 0;
    for row in first_row..rows {
        let at = row * 16;
        let t = test.get(at..(at + 16).min(test.len())).unwrap_or(&[]);
        let r = raw.get(at..(at + 16).min(raw.len())).unwrap_or(&[]);
        if t == r {
            continue;
        }
        differing += 1;
        if shown == max_rows {
            continue;
        }
        shown += 1;
        let hex = |b: &[u8]| {
            (0..16)
                .map(|i| b.get(i).map_or("  ".to_string(), |x| format!("{x:02x}")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let marks = (0..16)
            .map(|i| if t.get(i) == r.get(i) { "  " } else { "^^" })
            .collect::<Vec<_>>()
            .join(" ");
        let offset = sector_offset + at as u64;
        lines.push(format!("{offset:#010x}  test  {}", hex(t)));
        lines.push(format!("{offset:#010x}  raw   {}", hex(r)));
        lines.push(format!("{:10}        {}", "", marks.trim_end()));
    }
    if differing > shown {
        lines.push(format!(
            "({} more differing rows in this sector)",
            differing - shown
        ));
    }
    lines
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
