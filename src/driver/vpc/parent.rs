//! Finding the parent of a differencing VHD from its parent locators.
//!
//! A differencing disk names its parent several ways: up to eight locator
//! entries, each a platform code and a stretch of the file holding a path, and
//! the parent's file name in the dynamic header. The platform codes (VHD
//! specification, "Parent Locator Entries"):
//!
//! - `W2ru`: a path relative to the child, UTF-16 (little-endian, as Windows
//!   writes it);
//! - `W2ku`: an absolute path, UTF-16 little-endian;
//! - `MacX`: a file URL, UTF-8 (`file://localhost/path`);
//! - `Mac `: a Mac OS alias record, and `Wi2r`/`Wi2k`, deprecated: none can be
//!   resolved here, so they are listed but never followed.
//!
//! Candidates are tried in that order (relative first, as Hyper-V does), then
//! the header's parent name. The first that exists is opened through the gate
//! (`driver::gate::open_backing`), and its unique id must be the one the child
//! records, so a wrong guess is an error, never a silent wrong parent.

use super::dynamic::{DynamicHeader, Locator};
use super::footer::tag;
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::path::Path;

/// The longest locator read: a Windows path of 32767 UTF-16 units.
pub const MAX_LOCATOR_BYTES: u32 = 65536;

/// One way the image names its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Where the name came from ("W2ru locator", "parent name").
    pub source: String,
    /// The name as stored (decoded).
    pub stored: String,
    /// A file name usable here, or why there is none.
    pub name: std::result::Result<String, String>,
}

/// Every candidate name for the parent, best first.
pub fn candidates(
    path: &Path,
    file: &dyn Storage,
    header: &DynamicHeader,
    file_len: u64,
) -> Result<Vec<Candidate>> {
    let order: [&[u8; 4]; 6] = [b"W2ru", b"W2ku", b"MacX", b"Mac ", b"Wi2r", b"Wi2k"];
    let mut out = Vec::new();
    let mut locators: Vec<&Locator> = header.locators.iter().collect();
    locators.sort_by_key(|l| order.iter().position(|o| **o == l.platform).unwrap_or(6));
    for locator in locators {
        let source = format!("{} locator", tag(&locator.platform));
        let candidate = match &locator.platform {
            b"W2ru" | b"W2ku" => {
                let bytes = read_locator(path, file, locator, file_len)?;
                let stored = utf16le(&bytes).ok_or_else(|| {
                    Error::corrupt(
                        path,
                        format!(
                            "vpc: {source} at {:#x} is not valid UTF-16",
                            locator.data_offset
                        ),
                    )
                })?;
                Candidate {
                    source,
                    name: windows_path(&stored),
                    stored,
                }
            }
            b"MacX" => {
                let bytes = read_locator(path, file, locator, file_len)?;
                let stored = String::from_utf8(bytes)
                    .map_err(|_| {
                        Error::corrupt(
                            path,
                            format!(
                                "vpc: {source} at {:#x} is not valid UTF-8",
                                locator.data_offset
                            ),
                        )
                    })?
                    .trim_end_matches('\0')
                    .to_string();
                Candidate {
                    source,
                    name: file_url(&stored),
                    stored,
                }
            }
            other => Candidate {
                source,
                stored: String::new(),
                name: Err(match other {
                    b"Mac " => "a Mac OS alias record, which cannot be resolved here".to_string(),
                    b"Wi2r" | b"Wi2k" => "a deprecated platform code".to_string(),
                    _ => "an unknown platform code".to_string(),
                }),
            },
        };
        out.push(candidate);
    }
    if !header.parent_name.is_empty() {
        out.push(Candidate {
            source: "parent name".to_string(),
            name: windows_path(&header.parent_name),
            stored: header.parent_name.clone(),
        });
    }
    Ok(out)
}

fn read_locator(
    path: &Path,
    file: &dyn Storage,
    locator: &Locator,
    file_len: u64,
) -> Result<Vec<u8>> {
    let what = format!("{} locator", tag(&locator.platform));
    if locator.data_length > MAX_LOCATOR_BYTES {
        return Err(Error::corrupt(
            path,
            format!(
                "vpc: {what} is {} bytes long, more than the {MAX_LOCATOR_BYTES} a path can need",
                locator.data_length
            ),
        ));
    }
    let end = locator
        .data_offset
        .checked_add(u64::from(locator.data_length));
    if end.is_none_or(|end| end > file_len) {
        return Err(Error::corrupt(
            path,
            format!(
                "vpc: {what} at {:#x} ({} bytes) lies past the end of the file (size {file_len:#x})",
                locator.data_offset, locator.data_length
            ),
        ));
    }
    let mut bytes = vec![0u8; locator.data_length as usize];
    file.read_exact_at(&mut bytes, locator.data_offset)?;
    Ok(bytes)
}

/// Decode UTF-16 little-endian, dropping trailing NULs.
fn utf16le(bytes: &[u8]) -> Option<String> {
    if bytes.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let text = String::from_utf16(&units).ok()?;
    Some(text.trim_end_matches('\0').to_string())
}

/// A Windows path as a name to resolve here: backslashes become slashes;
/// drive-letter and network paths cannot be resolved on this host.
pub fn windows_path(stored: &str) -> std::result::Result<String, String> {
    if stored.is_empty() {
        return Err("empty".to_string());
    }
    if stored.contains('\0') {
        return Err("contains a NUL character".to_string());
    }
    let mut chars = stored.chars();
    if let (Some(letter), Some(':')) = (chars.next(), chars.next()) {
        if letter.is_ascii_alphabetic() {
            return Err("a Windows drive path".to_string());
        }
    }
    if stored.starts_with("\\\\") {
        return Err("a Windows network path".to_string());
    }
    Ok(stored.replace('\\', "/"))
}

/// A `file://` URL (`MacX`) as a path: `file://localhost/x` and `file:///x`
/// are `/x`; `%xx` escapes are decoded.
pub fn file_url(stored: &str) -> std::result::Result<String, String> {
    let rest = stored
        .strip_prefix("file://")
        .ok_or_else(|| "not a file:// URL".to_string())?;
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    if !rest.starts_with('/') {
        return Err("a file URL naming another host".to_string());
    }
    let mut out = Vec::with_capacity(rest.len());
    let mut bytes = rest.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next(), bytes.next()];
            let value = match hex {
                [Some(h), Some(l)] => std::str::from_utf8(&[h, l])
                    .ok()
                    .and_then(|s| u8::from_str_radix(s, 16).ok()),
                _ => None,
            };
            out.push(value.ok_or_else(|| "a bad %-escape".to_string())?);
        } else {
            out.push(b);
        }
    }
    let path = String::from_utf8(out).map_err(|_| "not UTF-8 once decoded".to_string())?;
    if path.contains('\0') {
        return Err("contains a NUL character".to_string());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths() {
        assert_eq!(windows_path(".\\base.vhd"), Ok("./base.vhd".to_string()));
        assert_eq!(windows_path("..\\d\\b.vhd"), Ok("../d/b.vhd".to_string()));
        assert!(windows_path("C:\\vms\\base.vhd").is_err());
        assert!(windows_path("\\\\server\\share\\b.vhd").is_err());
        assert_eq!(windows_path("/srv/b.vhd"), Ok("/srv/b.vhd".to_string()));
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            file_url("file://localhost/a/b%20c.vhd"),
            Ok("/a/b c.vhd".to_string())
        );
        assert_eq!(file_url("file:///a/b.vhd"), Ok("/a/b.vhd".to_string()));
        assert!(file_url("file://host/a").is_err());
        assert!(file_url("http://x/a").is_err());
        assert!(file_url("file:///a%2").is_err());
    }

    #[test]
    fn utf16() {
        let bytes: Vec<u8> = "a\\b\0\0"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(utf16le(&bytes), Some("a\\b".to_string()));
        assert_eq!(utf16le(&[0x61]), None);
    }
}
