//! The one size grammar: how every option that takes a size reads it (`create`'s
//! SIZE and `cluster_size`, `--size-mix`, `io`'s offsets and lengths). It is
//! QEMU's (`qemu_strtosz`, as `qemu-img` and `qemu-io` read numbers), so a
//! size that works with QEMU's tools works here:
//!
//! - decimal digits, optionally with a fraction (`1.5`), then optionally one
//!   binary suffix `b`, `k`, `M`, `G`, `T`, `P` or `E` (any case);
//!   a fraction needs a suffix other than `b` (`1.5k` is 1536, `1.5` is invalid);
//! - or hexadecimal `0x...`, with neither fraction nor suffix;
//! - leading whitespace is skipped; a leading `+` is allowed; nothing may follow;
//! - no exponents (`1e3` reads as 1 then the suffix `e`, then junk);
//! - a fraction of a unit rounds to the nearest byte;
//! - negative values and values above `i64::MAX` are out of range (qemu-io
//!   refuses both with "argument too large").
//!
//! Written from QEMU's documented behaviour and its unit tests' cases, not from
//! its code.
//!
//! The sector, the unit blkverify and qemu-io count requests in, is defined here
//! too, at the bottom, so that every layer (the errors, the drivers, the
//! engines, the device) takes it from one place.

use std::fmt;

/// Bytes per sector, as blkverify and qemu-io count them (QEMU's
/// `BDRV_SECTOR_SIZE`; the disk formats' specifications count in it too).
pub const SECTOR_SIZE: u64 = 512;

/// A byte range as blkverify reports it: the first 512-byte sector and the number of
/// sectors the range touches.
pub fn request_sectors(offset: u64, length: u64) -> (u64, u64) {
    let first = offset / SECTOR_SIZE;
    let end = offset.saturating_add(length).div_ceil(SECTOR_SIZE);
    (first, end.saturating_sub(first))
}

/// Why a size was refused. The two cases get different messages from qemu-io.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size in the grammar at all.
    Invalid(String),
    /// A size, but negative or above `i64::MAX`.
    OutOfRange(String),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Invalid(text) => write!(
                f,
                "invalid size '{text}' (use bytes, a k, M, G, T, P or E suffix, or 0x hex)"
            ),
            SizeError::OutOfRange(text) => {
                write!(f, "size '{text}' is out of range (0 to {} bytes)", i64::MAX)
            }
        }
    }
}

impl std::error::Error for SizeError {}

/// The shift a suffix letter stands for (`k` is 2^10, ..., `E` is 2^60).
fn suffix_shift(c: u8) -> Option<u32> {
    match c.to_ascii_lowercase() {
        b'b' => Some(0),
        b'k' => Some(10),
        b'm' => Some(20),
        b'g' => Some(30),
        b't' => Some(40),
        b'p' => Some(50),
        b'e' => Some(60),
        _ => None,
    }
}

/// The digits of `radix` at the start of `s`: their value (saturated, with an
/// overflow flag past `u64::MAX`) and how many bytes they take.
fn digits(s: &[u8], radix: u32) -> (u128, bool, usize) {
    let mut value: u128 = 0;
    let mut overflow = false;
    let mut n = 0;
    for &c in s {
        let Some(d) = char::from(c).to_digit(radix) else {
            break;
        };
        n += 1;
        if !overflow {
            value = value * u128::from(radix) + u128::from(d);
            overflow = value > u128::from(u64::MAX);
        }
    }
    (value, overflow, n)
}

/// Whether `s` starts with an exponent (`e`, an optional sign, a digit), which
/// the grammar refuses after a fraction.
fn starts_with_exponent(s: &[u8]) -> bool {
    let rest = match s.first() {
        Some(b'e' | b'E') => s.get(1..).unwrap_or(&[]),
        _ => return false,
    };
    let rest = match rest.first() {
        Some(b'+' | b'-') => rest.get(1..).unwrap_or(&[]),
        _ => rest,
    };
    rest.first().is_some_and(u8::is_ascii_digit)
}

/// A fraction `.DIGITS` at the start of `s`: its value and length. `None` when
/// an exponent follows.
fn fraction(s: &[u8]) -> Option<(f64, usize)> {
    let (_, _, n) = digits(s.get(1..)?, 10);
    let len = n + 1;
    if starts_with_exponent(s.get(len..)?) {
        return None;
    }
    let text = std::str::from_utf8(s.get(..len)?).ok()?;
    Some((format!("0{text}").parse::<f64>().ok()?, len))
}

/// Parse a size in QEMU's grammar (see the module doc).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_string());
    let out_of_range = || SizeError::OutOfRange(text.to_string());
    let s = text
        .trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r'])
        .as_bytes();
    if let Some(rest) = s.strip_prefix(b"-") {
        // A negative number is a size out of range; anything else is junk.
        return Err(if rest.first().is_some_and(u8::is_ascii_digit) {
            out_of_range()
        } else {
            invalid()
        });
    }
    let s = s.strip_prefix(b"+").unwrap_or(s);
    let (integral, overflow, n) = digits(s, 10);
    let rest = s.get(n..).unwrap_or(&[]);
    if integral == 0 && n == 1 && matches!(rest.first(), Some(b'x' | b'X')) {
        let hex = rest.get(1..).unwrap_or(&[]);
        let (value, overflow, n) = digits(hex, 16);
        if n == 0 || n < hex.len() {
            return Err(invalid());
        }
        return checked(value, overflow).ok_or_else(out_of_range);
    }
    if overflow {
        // Too many digits: out of range, unless junk follows.
        let after = match rest.split_first() {
            Some((b'.', _)) => &[][..],
            Some((&c, tail)) if suffix_shift(c).is_some() => tail,
            _ => rest,
        };
        return Err(if after.is_empty() {
            out_of_range()
        } else {
            invalid()
        });
    }
    // A fraction needs a digit on one side of the point at least: `.5k`, `1.k`.
    let (mut fraction, rest) = match rest.first() {
        Some(b'.') => fraction(rest)
            .filter(|(_, len)| n > 0 || *len > 1)
            .map(|(value, len)| (value, rest.get(len..).unwrap_or(&[])))
            .ok_or_else(invalid)?,
        _ if n == 0 => return Err(invalid()),
        _ => (0.0, rest),
    };
    let (shift, rest) = rest
        .split_first()
        .and_then(|(&c, tail)| Some((suffix_shift(c)?, tail)))
        .unwrap_or((0, rest));
    if !rest.is_empty() {
        return Err(invalid());
    }
    let mut integral = integral;
    if fraction >= 1.0 {
        // `0.99999999999999999999` rounds to one while being read.
        integral += 1;
        fraction = 0.0;
    }
    // The fraction in 64-bit fixed point, scaled by the unit, rounded to the
    // nearest byte.
    let fixed = (fraction * 18_446_744_073_709_551_616.0) as u128;
    let value = if shift == 0 {
        if fixed != 0 {
            return Err(invalid()); // a fraction of a byte
        }
        integral
    } else {
        let scaled = fixed << shift;
        (integral << shift) + (scaled >> 64) + ((scaled >> 63) & 1)
    };
    checked(value, false).ok_or_else(out_of_range)
}

/// `value` if it is a size in range.
fn checked(value: u128, overflow: bool) -> Option<u64> {
    if overflow {
        return None;
    }
    u64::try_from(value).ok().filter(|v| *v <= i64::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> u64 {
        parse_size(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn numbers_suffixes_fractions_and_hex() {
        for (text, value) in [
            ("0", 0),
            ("512", 512),
            ("010", 10),
            ("+7", 7),
            ("  4k", 4096),
            ("1b", 1),
            ("64K", 65536),
            ("1.5M", 3 << 19),
            ("1.5m", 3 << 19),
            (".5k", 512),
            ("+.5k", 512),
            ("1.k", 1024),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("7E", 7 << 60),
            ("0x1000", 4096),
            ("0X1f", 31),
            ("12.345k", 12641),
        ] {
            assert_eq!(ok(text), value, "{text}");
        }
    }

    #[test]
    fn junk_is_invalid_and_big_or_negative_is_out_of_range() {
        for text in [
            "", " ", "k", "12Q", "1k ", "1kiB", "0x", "00x1", "0x1.8k", "0x18M", "0b1000", "0.NaN",
            "0.5b", "123-45", "1.5", "1.1.k", "1e3", "1.5e1k", "1.5E+0k", ".", ".k", "-x", "abc",
            "1 k",
        ] {
            assert_eq!(
                parse_size(text),
                Err(SizeError::Invalid(text.to_string())),
                "{text:?}"
            );
        }
        for text in [
            "-1",
            " -0",
            "-2M",
            "8E",
            "9223372036854775808",
            "18446744073709551616",
            "99999999999999999999999k",
            "0x8000000000000000",
            "0x10000000000000000",
        ] {
            assert_eq!(
                parse_size(text),
                Err(SizeError::OutOfRange(text.to_string())),
                "{text:?}"
            );
        }
        assert_eq!(ok("9223372036854775807"), i64::MAX as u64);
        assert!(matches!(
            parse_size("99999999999999999999999x"),
            Err(SizeError::Invalid(_))
        ));
    }
}
