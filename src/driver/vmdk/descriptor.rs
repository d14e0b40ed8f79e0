//! The VMDK descriptor: the text that says what kind of disk this is, which
//! extents hold its data, and which parent it was forked from. It is either a
//! file of its own (monolithicFlat, twoGbMaxExtent*) or embedded in a sparse
//! extent (monolithicSparse, streamOptimized).
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=fffffffe
//! parentCID=ffffffff
//! createType="twoGbMaxExtentSparse"
//! parentFileNameHint="base.vmdk"          (differencing disks only)
//! RW 4194304 SPARSE "disk-s001.vmdk"      (ACCESS SECTORS TYPE "FILE" [OFFSET])
//! RW 2097152 FLAT "disk-f002.vmdk" 0
//! ddb.adapterType = "ide"                 (the disk database: not ours to check)
//! ```
//!
//! Parsing is line by line and strict where QEMU is lax: QEMU finds each key
//! with `strstr` anywhere in the text and skips extent lines it does not
//! understand, so a damaged descriptor can silently give a smaller disk. Here a
//! line is a comment, a `KEY=VALUE` setting, or an extent line, and anything
//! else is an error naming the line.

use crate::driver::SECTOR_SIZE;
use std::fmt;

/// The most extents a descriptor may list. A 2 TiB twoGbMaxExtent disk has
/// 1024; every extent holds a file open.
pub const MAX_EXTENTS: usize = 1024;
/// The longest file name an extent line or `parentFileNameHint` may hold
/// (QEMU's own limit is 511 bytes for extents and PATH_MAX for the parent).
pub const MAX_NAME_BYTES: usize = 4095;

/// The disk kinds blkverify reads, by their `createType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateType {
    /// One sparse extent with the descriptor embedded.
    MonolithicSparse,
    /// A descriptor file and one flat extent.
    MonolithicFlat,
    /// A descriptor file and sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor file and flat extents of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One sparse extent of compressed grains, made to be streamed (OVA).
    StreamOptimized,
}

impl CreateType {
    const ALL: [CreateType; 5] = [
        CreateType::MonolithicSparse,
        CreateType::MonolithicFlat,
        CreateType::TwoGbMaxExtentSparse,
        CreateType::TwoGbMaxExtentFlat,
        CreateType::StreamOptimized,
    ];

    /// The name, as descriptors spell it.
    pub fn name(&self) -> &'static str {
        match self {
            CreateType::MonolithicSparse => "monolithicSparse",
            CreateType::MonolithicFlat => "monolithicFlat",
            CreateType::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            CreateType::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            CreateType::StreamOptimized => "streamOptimized",
        }
    }

    /// Whether the descriptor of this kind lives inside its sparse extent.
    pub fn is_embedded(&self) -> bool {
        matches!(
            self,
            CreateType::MonolithicSparse | CreateType::StreamOptimized
        )
    }

    fn parse(name: &str) -> Option<CreateType> {
        CreateType::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// How an extent stores its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Raw bytes, starting at this byte offset of the file.
    Flat {
        /// Byte offset of the extent's first sector in its file.
        offset: u64,
    },
    /// A hosted sparse extent ("KDMV" header, grain directory and tables).
    Sparse,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// The line number in the descriptor (1-based), for messages.
    pub line: usize,
    /// The extent's size in sectors.
    pub sectors: u64,
    /// Flat or sparse.
    pub kind: ExtentKind,
    /// The file name, as written (relative to the descriptor's directory).
    pub file_name: String,
    /// The access is `RDONLY` rather than `RW` (both read the same).
    pub read_only: bool,
}

/// A parsed, checked descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `version`, 1 to 3 (1 when absent).
    pub version: u32,
    /// `CID`: the content ID, which changes whenever the disk is written.
    pub cid: u32,
    /// `parentCID`: the parent's CID when this disk was forked from it;
    /// `ffffffff` when there is no parent.
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: CreateType,
    /// `parentFileNameHint`: the parent of a differencing disk.
    pub parent_hint: Option<String>,
    /// The extents, in disk order.
    pub extents: Vec<ExtentLine>,
}

/// `parentCID` of a disk without a parent.
pub const NO_PARENT: u32 = 0xffff_ffff;

/// Why a descriptor was refused: the caller makes it a `Format` or a `Corrupt`
/// error on the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Valid VMDK that blkverify does not read (a `createType` or extent type).
    Unsupported(String),
    /// Text that is not a valid descriptor.
    Invalid(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unsupported(m) | Problem::Invalid(m) => f.write_str(m),
        }
    }
}

/// The text of a descriptor: up to the first NUL byte (an embedded descriptor
/// is padded with NULs to its sectors).
pub fn text_of(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes.get(..end).unwrap_or(&[])
}

/// Parse a descriptor's text (see [`text_of`]).
pub fn parse(text: &[u8]) -> Result<Descriptor, Problem> {
    let mut found = Found::default();
    for (index, raw_line) in text.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        let invalid = |m: String| Problem::Invalid(format!("descriptor line {number}: {m}"));
        let line = std::str::from_utf8(raw_line)
            .map_err(|_| invalid("not valid UTF-8".to_string()))?
            .trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            found.extent(number, line)?;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(invalid(format!(
                "'{}' is neither a KEY=VALUE setting nor an extent line",
                clip(line)
            )));
        };
        let key = key.trim();
        let value = unquote(value.trim())
            .ok_or_else(|| invalid(format!("the value of {key} has an unmatched quote")))?;
        found.setting(number, key, value)?;
    }
    found.finish()
}

/// What a descriptor's lines say, as they are read.
#[derive(Default)]
struct Found {
    version: Option<u32>,
    cid: Option<u32>,
    parent_cid: Option<u32>,
    create_type: Option<CreateType>,
    parent_hint: Option<String>,
    extents: Vec<ExtentLine>,
    total_sectors: u64,
}

impl Found {
    /// Extent line `number`; the extents may not add up to more than 64 bits
    /// of bytes.
    fn extent(&mut self, number: usize, line: &str) -> Result<(), Problem> {
        let invalid = |m: String| Problem::Invalid(format!("descriptor line {number}: {m}"));
        if self.extents.len() == MAX_EXTENTS {
            return Err(invalid(format!(
                "more than {MAX_EXTENTS} extents are listed"
            )));
        }
        let extent = parse_extent(line).map_err(|p| match p {
            Problem::Unsupported(m) => {
                Problem::Unsupported(format!("descriptor line {number}: {m}"))
            }
            Problem::Invalid(m) => invalid(m),
        })?;
        self.total_sectors = self
            .total_sectors
            .checked_add(extent.sectors)
            .filter(|&s| s <= u64::MAX / SECTOR_SIZE)
            .ok_or_else(|| {
                invalid("the extents add up to more bytes than 64 bits can count".to_string())
            })?;
        self.extents.push(ExtentLine {
            line: number,
            ..extent
        });
        Ok(())
    }

    /// The setting `key = value` of line `number`: each key we read may be
    /// given once; keys about the virtual machine rather than the data are
    /// skipped.
    fn setting(&mut self, number: usize, key: &str, value: &str) -> Result<(), Problem> {
        let invalid = |m: String| Problem::Invalid(format!("descriptor line {number}: {m}"));
        let once = |slot_taken: bool| {
            if slot_taken {
                Err(invalid(format!("{key} is given twice")))
            } else {
                Ok(())
            }
        };
        match key {
            "version" => {
                once(self.version.is_some())?;
                let v = value.parse::<u32>().ok().filter(|v| (1..=3).contains(v));
                self.version = Some(v.ok_or_else(|| {
                    Problem::Unsupported(format!(
                        "descriptor line {number}: version is '{}' (supported: 1 to 3)",
                        clip(value)
                    ))
                })?);
            }
            "CID" => {
                once(self.cid.is_some())?;
                self.cid = Some(parse_cid(value).ok_or_else(|| {
                    invalid(format!(
                        "CID '{}' is not a 32-bit hexadecimal number",
                        clip(value)
                    ))
                })?);
            }
            "parentCID" => {
                once(self.parent_cid.is_some())?;
                self.parent_cid = Some(parse_cid(value).ok_or_else(|| {
                    invalid(format!(
                        "parentCID '{}' is not a 32-bit hexadecimal number",
                        clip(value)
                    ))
                })?);
            }
            "createType" => {
                once(self.create_type.is_some())?;
                self.create_type = Some(CreateType::parse(value).ok_or_else(|| {
                    Problem::Unsupported(format!(
                        "descriptor line {number}: createType '{}' is not supported (supported: {})",
                        clip(value),
                        CreateType::ALL.map(|t| t.name()).join(", ")
                    ))
                })?);
            }
            "parentFileNameHint" => {
                once(self.parent_hint.is_some())?;
                if value.len() > MAX_NAME_BYTES {
                    return Err(invalid(format!(
                        "parentFileNameHint is {} bytes long (the limit is {MAX_NAME_BYTES})",
                        value.len()
                    )));
                }
                if value.is_empty() {
                    return Err(invalid("parentFileNameHint is empty".to_string()));
                }
                self.parent_hint = Some(value.to_string());
            }
            // The disk database (ddb.*), encoding, isNativeSnapshot, uuids,
            // change tracking: facts about the virtual machine, not the data.
            _ => {}
        }
        Ok(())
    }

    /// The descriptor, once every line is read: createType, CID and
    /// parentCID are required, and at least one extent.
    fn finish(self) -> Result<Descriptor, Problem> {
        let create_type = self
            .create_type
            .ok_or_else(|| Problem::Invalid("descriptor has no createType".to_string()))?;
        let cid = self
            .cid
            .ok_or_else(|| Problem::Invalid("descriptor has no CID".to_string()))?;
        let parent_cid = self
            .parent_cid
            .ok_or_else(|| Problem::Invalid("descriptor has no parentCID".to_string()))?;
        if self.extents.is_empty() {
            return Err(Problem::Invalid(format!(
                "descriptor (createType {}) lists no extents",
                create_type.name()
            )));
        }
        Ok(Descriptor {
            version: self.version.unwrap_or(1),
            cid,
            parent_cid,
            create_type,
            parent_hint: self.parent_hint,
            extents: self.extents,
        })
    }
}

/// `ACCESS SECTORS TYPE "FILE" [OFFSET]`.
fn parse_extent(line: &str) -> Result<ExtentLine, Problem> {
    let invalid = |m: &str| Problem::Invalid(format!("invalid extent line '{}': {m}", clip(line)));
    let (access, rest) = word(line);
    let (sectors, rest) = word(rest);
    let (kind, rest) = word(rest);
    if kind.is_empty() {
        return Err(invalid("expected ACCESS SECTORS TYPE \"FILE\" [OFFSET]"));
    }
    let rest = rest.trim_start();
    let read_only = match access {
        "RW" => false,
        "RDONLY" => true,
        _ => {
            return Err(Problem::Unsupported(format!(
                "extent access {access} is not supported (the extent's data cannot be read)"
            )))
        }
    };
    let sectors = sectors
        .parse::<u64>()
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| invalid("the size is not a positive number of sectors"))?;
    let sparse = match kind {
        "FLAT" => false,
        "SPARSE" => true,
        other => {
            return Err(Problem::Unsupported(format!(
                "unsupported vmdk extent type {other}"
            )))
        }
    };
    let name_and_offset = rest
        .strip_prefix('"')
        .ok_or_else(|| invalid("the file name is not in double quotes"))?;
    let (file_name, after) = name_and_offset
        .split_once('"')
        .ok_or_else(|| invalid("the file name has no closing quote"))?;
    if file_name.is_empty() {
        return Err(invalid("the file name is empty"));
    }
    if file_name.len() > MAX_NAME_BYTES {
        return Err(invalid("the file name is too long"));
    }
    let after = after.trim();
    let kind = match (sparse, after) {
        (true, "") => ExtentKind::Sparse,
        (true, _) => return Err(invalid("a SPARSE extent takes no offset")),
        (false, "") => return Err(invalid("a FLAT extent needs the offset of its data")),
        (false, offset) => {
            let offset = offset
                .parse::<u64>()
                .ok()
                .and_then(|s| s.checked_mul(SECTOR_SIZE))
                .ok_or_else(|| invalid("the offset is not a number of sectors"))?;
            ExtentKind::Flat { offset }
        }
    };
    Ok(ExtentLine {
        line: 0,
        sectors,
        kind,
        file_name: file_name.to_string(),
        read_only,
    })
}

/// The first whitespace-separated word of `s`, and what follows it.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    s.split_once(char::is_whitespace).unwrap_or((s, ""))
}

/// A value without its double quotes (values may be bare too).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(inner) => inner.strip_suffix('"').filter(|v| !v.contains('"')),
        None => (!value.contains('"')).then_some(value),
    }
}

fn parse_cid(value: &str) -> Option<u32> {
    if value.is_empty() || value.len() > 8 {
        return None;
    }
    u32::from_str_radix(value, 16).ok()
}

/// At most 60 characters of a value, for messages.
fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(60).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPLIT: &str = "# Disk DescriptorFile\nversion=1\nCID=351f7249\nparentCID=ffffffff\n\
        createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
        RW 4194304 SPARSE \"d-s001.vmdk\"\nRDONLY 2097152 FLAT \"with space.vmdk\" 8\n\n\
        # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_a_descriptor_file() {
        let d = parse(SPLIT.as_bytes()).unwrap();
        assert_eq!(d.cid, 0x351f_7249);
        assert_eq!(d.parent_cid, NO_PARENT);
        assert_eq!(d.create_type, CreateType::TwoGbMaxExtentSparse);
        assert_eq!(d.extents.len(), 2);
        assert_eq!(d.extents[0].kind, ExtentKind::Sparse);
        assert_eq!(d.extents[0].line, 8);
        assert_eq!(d.extents[1].kind, ExtentKind::Flat { offset: 4096 });
        assert_eq!(d.extents[1].file_name, "with space.vmdk");
        assert!(d.extents[1].read_only);
    }

    #[test]
    fn stops_at_nul_and_takes_crlf() {
        let text = SPLIT.replace('\n', "\r\n") + "\0\0garbage";
        let d = parse(text_of(text.as_bytes())).unwrap();
        assert_eq!(d.extents.len(), 2);
    }

    #[test]
    fn refusals_name_the_fact() {
        let cases = [
            (
                "createType=\"twoGbMaxExtentSparse\"",
                "createType=\"vmfsSparse\"",
                "createType 'vmfsSparse' is not supported",
            ),
            (
                "RW 4194304 SPARSE",
                "RW 4194304 VMFSSPARSE",
                "unsupported vmdk extent type VMFSSPARSE",
            ),
            (
                "RW 4194304 SPARSE",
                "NOACCESS 4194304 SPARSE",
                "extent access NOACCESS",
            ),
            ("RW 4194304 SPARSE", "RW 0 SPARSE", "not a positive number"),
            ("\"d-s001.vmdk\"", "\"d-s001.vmdk\" 5", "takes no offset"),
            (
                "\"with space.vmdk\" 8",
                "\"with space.vmdk\"",
                "needs the offset",
            ),
            ("CID=351f7249", "CID=xyz", "CID 'xyz'"),
            ("CID=351f7249", "CID=1\nCID=2", "CID is given twice"),
            ("CID=351f7249\n", "", "has no CID"),
            ("version=1", "version=7", "version is '7'"),
            ("version=1", "hello", "neither a KEY=VALUE"),
        ];
        for (from, to, want) in cases {
            let text = SPLIT.replacen(from, to, 1);
            let err = parse(text.as_bytes()).expect_err(want).to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let no_extents: String = SPLIT
            .lines()
            .filter(|l| !l.starts_with("R"))
            .collect::<Vec<_>>()
            .join("\n");
        let err = parse(no_extents.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("lists no extents"), "{err}");
        assert!(matches!(
            parse(b"createType=\"custom\"\nCID=1\nparentCID=2\n"),
            Err(Problem::Unsupported(_))
        ));
    }

    #[test]
    fn caps_the_extent_count() {
        let mut text =
            String::from("CID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n");
        for _ in 0..=MAX_EXTENTS {
            text.push_str("RW 1 FLAT \"f\" 0\n");
        }
        let err = parse(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("more than 1024 extents"), "{err}");
    }
}
