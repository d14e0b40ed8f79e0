//! The op log: the file `--log` writes as ops are issued and `--replay` (and
//! shrinking) reads back. This module is the one place its format is spelled:
//!
//! ```text
//! # blkverify exercise log v1
//! seed 1234
//! size 8388608
//! queue-depth 4
//! spec blkverify:raw.img:test.qcow2
//! # mix read=60,write=25,zero=5,discard=5,flush=5
//! 0 write 1048576 4096
//! 1 read 1048576 4096
//! 2 zero 0 65536 unmap
//! 3 flush
//! # finding: blkverify: read sector_num=2048 nb_sectors=8 contents mismatch in sector 2049
//! ```
//!
//! The magic line comes first; then `seed` (required: the write patterns derive
//! from it), optional `size`, `queue-depth` and `spec` lines, and one op per
//! line, `NUMBER KIND [OFFSET LENGTH [FLAG...]]`. Blank lines and lines
//! starting with `#` are comments.
//!
//! Exercise draws five kinds: `read`, `write`, `zero` (flag `unmap`),
//! `discard` and `flush`. The words of the other requests a client can make
//! through serve are read and written too, so that every [`Op`] has a line:
//! the flag `fua` on `write`, `zero` and `discard`, `fast` on `zero`,
//! `block_status OFFSET LENGTH [one]` and `cache OFFSET LENGTH`. A log's
//! writes carry no data (their bytes derive from the seed), so a trace is
//! never turned into a log.

use super::op::{check_queue_depth, Op, OpKind, MAX_REQUEST};
use crate::error::{Error, Result};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The first line of an op log.
pub const LOG_MAGIC: &str = "# blkverify exercise log v1";

/// A parsed op log.
#[derive(Debug, Clone)]
pub struct Log {
    /// The seed the write patterns derive from.
    pub seed: u64,
    /// The spec the log was recorded on, if it says.
    pub spec: Option<String>,
    /// The queue depth it was recorded with, if it says.
    pub queue_depth: Option<usize>,
    /// The device size it was recorded on, if it says.
    pub size: Option<u64>,
    /// The ops, in the order they were issued.
    pub ops: Vec<Op>,
}

impl Log {
    /// Read and parse the log at `path`.
    pub fn read(path: &Path) -> Result<Log> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(path, "read the op log", e))?;
        parse_log(&path.display().to_string(), &text)
    }

    /// Write the log to `path` (replacing it), with `comments` after the ops.
    pub fn write(&self, path: &Path, comments: &[String]) -> Result<()> {
        let mut out = OpLog::create(path)?;
        out.header(self.seed, self.size, self.queue_depth, self.spec.as_deref())?;
        for op in &self.ops {
            out.op(op)?;
        }
        for comment in comments {
            out.comment(comment)?;
        }
        out.flush()
    }
}

impl Op {
    /// The op as one log line: `N read OFFSET LENGTH`, `N write OFFSET LENGTH`,
    /// `N zero OFFSET LENGTH [unmap]`, `N discard OFFSET LENGTH`, `N flush`
    /// (and the flags and kinds of a client's requests: see the module doc).
    pub fn log_line(&self) -> String {
        self.to_string()
    }

    /// The op's line without its number (`write 1049088 4096`), as reports
    /// name it.
    pub fn command(&self) -> String {
        let (word, flags): (&str, &[(bool, &str)]) = match self.kind {
            OpKind::Flush => return "flush".to_string(),
            OpKind::Read => ("read", &[]),
            OpKind::Write { fua } => ("write", &[(fua, "fua")]),
            OpKind::Zero { unmap, fua, fast } => {
                ("zero", &[(unmap, "unmap"), (fua, "fua"), (fast, "fast")])
            }
            OpKind::Discard { fua } => ("discard", &[(fua, "fua")]),
            OpKind::BlockStatus { one } => ("block_status", &[(one, "one")]),
            OpKind::Cache => ("cache", &[]),
        };
        let mut line = format!("{word} {} {}", self.offset, self.length);
        for (_, name) in flags.iter().filter(|(set, _)| *set) {
            line.push(' ');
            line.push_str(name);
        }
        line
    }

    /// Parse a log line written by [`Op::log_line`].
    pub fn parse(line: &str) -> std::result::Result<Op, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |s: &str, what: &str| -> std::result::Result<u64, String> {
            s.parse::<u64>()
                .map_err(|_| format!("{what} '{s}' is not a non-negative integer"))
        };
        let (first, name) = match words.as_slice() {
            [first, name, ..] => (*first, *name),
            _ => return Err("expected 'NUMBER OP [OFFSET LENGTH]'".to_string()),
        };
        let op_number = number(first, "op number")?;
        if name == "flush" {
            return match words.len() {
                2 => Ok(Op {
                    number: op_number,
                    kind: OpKind::Flush,
                    offset: 0,
                    length: 0,
                }),
                _ => Err("'flush' takes no arguments".to_string()),
            };
        }
        let known: &[&str] = match name {
            "read" | "cache" => &[],
            "write" | "discard" => &["fua"],
            "zero" => &["unmap", "fua", "fast"],
            "block_status" => &["one"],
            other => {
                return Err(format!(
                    "unknown op '{other}' (known: read, write, zero, discard, flush, \
                     block_status, cache)"
                ))
            }
        };
        let usage = || {
            let flags: String = known.iter().map(|f| format!(" [{f}]")).collect();
            format!("'{name}' takes OFFSET LENGTH{flags}")
        };
        let (offset, length, flags) = match words.get(2..) {
            Some([offset, length, flags @ ..]) => (*offset, *length, flags),
            _ => return Err(usage()),
        };
        let mut set = [false; 3];
        for flag in flags {
            match known.iter().position(|k| k == flag) {
                Some(i) if !set[i] => set[i] = true,
                _ => return Err(usage()),
            }
        }
        let length = number(length, "length")?;
        if length == 0 {
            return Err("length must be at least 1".to_string());
        }
        let kind = match name {
            "read" => OpKind::Read,
            "cache" => OpKind::Cache,
            "write" => OpKind::Write { fua: set[0] },
            "discard" => OpKind::Discard { fua: set[0] },
            "zero" => OpKind::Zero {
                unmap: set[0],
                fua: set[1],
                fast: set[2],
            },
            _ => OpKind::BlockStatus { one: set[0] },
        };
        Ok(Op {
            number: op_number,
            kind,
            offset: number(offset, "offset")?,
            length,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.number, self.command())
    }
}

/// Parse an op log: the magic line, then `seed S`, optional `size N`,
/// `queue-depth Q` and `spec SPEC` lines, then one op per line. Blank lines and
/// lines starting with `#` are ignored. `name` is the file, for messages.
pub fn parse_log(name: &str, text: &str) -> Result<Log> {
    let mut lines = text.lines().enumerate();
    let bad = |line: usize, m: String| Error::InvalidArgument(format!("{name}:{}: {m}", line + 1));
    match lines.next() {
        Some((_, first)) if first.trim_end() == LOG_MAGIC => {}
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{name}: not a blkverify exercise log (the first line must be '{LOG_MAGIC}')"
            )))
        }
    }
    let mut log = Log {
        seed: 0,
        spec: None,
        queue_depth: None,
        size: None,
        ops: Vec::new(),
    };
    let mut seed = None;
    for (i, line) in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.trim();
        let int = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| bad(i, format!("{what} '{value}' is not a non-negative integer")))
        };
        match key {
            "seed" => seed = Some(int("seed")?),
            "size" => log.size = Some(int("size")?),
            "queue-depth" => {
                log.queue_depth =
                    Some(check_queue_depth(int("queue depth")?).map_err(|m| bad(i, m))?)
            }
            "spec" => log.spec = Some(value.to_string()),
            _ => {
                let op = Op::parse(line).map_err(|m| bad(i, m))?;
                let asks = matches!(op.kind, OpKind::BlockStatus { .. });
                if op.length > MAX_REQUEST && !asks {
                    return Err(bad(i, format!("length {} is over 64 MiB", op.length)));
                }
                if op.offset.checked_add(op.length).is_none() {
                    return Err(bad(i, "offset + length overflows".to_string()));
                }
                log.ops.push(op);
            }
        }
    }
    log.seed = seed.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{name}: no 'seed' line (the write patterns need it)"
        ))
    })?;
    Ok(log)
}

/// An op log being written, line by line, so that it survives a crash or a
/// hang of the driver under test.
pub struct OpLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl OpLog {
    /// Create (or truncate) the log file.
    pub fn create(path: &Path) -> Result<OpLog> {
        let file = File::create(path).map_err(|e| Error::io(path, "create the op log", e))?;
        Ok(OpLog {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 16, file),
        })
    }

    /// The magic line and what is known of the run.
    pub fn header(
        &mut self,
        seed: u64,
        size: Option<u64>,
        queue_depth: Option<usize>,
        spec: Option<&str>,
    ) -> Result<()> {
        self.line(LOG_MAGIC)?;
        self.line(format_args!("seed {seed}"))?;
        if let Some(size) = size {
            self.line(format_args!("size {size}"))?;
        }
        if let Some(queue_depth) = queue_depth {
            self.line(format_args!("queue-depth {queue_depth}"))?;
        }
        if let Some(spec) = spec {
            self.line(format_args!("spec {spec}"))?;
        }
        Ok(())
    }

    /// One op.
    pub fn op(&mut self, op: &Op) -> Result<()> {
        self.line(op)
    }

    /// A comment line (`# ` is prepended).
    pub fn comment(&mut self, text: &str) -> Result<()> {
        self.line(format_args!("# {text}"))
    }

    /// Push what was written to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io(&self.path, "write the op log", e))
    }

    fn line(&mut self, text: impl fmt::Display) -> Result<()> {
        writeln!(self.out, "{text}").map_err(|e| Error::io(&self.path, "write the op log", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_round_trip_and_bad_lines_are_named() {
        // Every kind and every flag a client's request can carry.
        let mut kinds = vec![OpKind::Read, OpKind::Cache, OpKind::Flush];
        for a in [false, true] {
            kinds.push(OpKind::Write { fua: a });
            kinds.push(OpKind::Discard { fua: a });
            kinds.push(OpKind::BlockStatus { one: a });
            for b in [false, true] {
                for c in [false, true] {
                    kinds.push(OpKind::Zero {
                        unmap: a,
                        fua: b,
                        fast: c,
                    });
                }
            }
        }
        for (n, kind) in kinds.into_iter().enumerate() {
            let (offset, length) = match kind {
                OpKind::Flush => (0, 0),
                _ => (512 * n as u64, 4096),
            };
            let op = Op {
                number: n as u64,
                kind,
                offset,
                length,
            };
            assert_eq!(Op::parse(&op.log_line()).unwrap(), op, "{op}");
        }
        assert_eq!(
            Op::parse("4 zero 0 512 fast unmap").unwrap().command(),
            "zero 0 512 unmap fast"
        );
        for bad in [
            "4 zero 0 512 unmap unmap",
            "4 read 0 512 fua",
            "4 flush 0 1",
        ] {
            assert!(Op::parse(bad).is_err(), "{bad}");
        }
        let text = format!("{LOG_MAGIC}\nseed 9\nsize 100\n# c\n0 write 0 10\n1 wirte 0 1\n");
        let err = parse_log("x.log", &text).unwrap_err().to_string();
        assert_eq!(
            err,
            "x.log:6: unknown op 'wirte' (known: read, write, zero, discard, flush, \
             block_status, cache)"
        );
        let err = parse_log("x.log", "0 read 0 1\n").unwrap_err().to_string();
        assert!(
            err.starts_with("x.log: not a blkverify exercise log"),
            "{err}"
        );
        let err = parse_log("x.log", &format!("{LOG_MAGIC}\nseed 1\nqueue-depth 300\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "x.log:3: queue depth 300 is not 1 to 256");
        let log = parse_log(
            "x.log",
            &format!("{LOG_MAGIC}\nseed 9\n3 zero 5 6 unmap\n4 flush\n"),
        )
        .unwrap();
        assert_eq!(log.seed, 9);
        assert_eq!(log.ops.len(), 2);
    }

    #[test]
    fn a_written_log_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.log");
        let log = Log {
            seed: 5,
            spec: Some("blkverify:a.raw:b.qcow2".to_string()),
            queue_depth: Some(1),
            size: Some(4096),
            ops: vec![
                Op::parse("7 write 0 512").unwrap(),
                Op::parse("9 zero 512 512 unmap").unwrap(),
                Op::parse("12 flush").unwrap(),
            ],
        };
        log.write(&path, &["finding: x".to_string()]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!(
                "{LOG_MAGIC}\nseed 5\nsize 4096\nqueue-depth 1\nspec blkverify:a.raw:b.qcow2\n\
                 7 write 0 512\n9 zero 512 512 unmap\n12 flush\n# finding: x\n"
            )
        );
        let back = Log::read(&path).unwrap();
        assert_eq!(
            (back.seed, back.size, back.queue_depth),
            (5, Some(4096), Some(1))
        );
        assert_eq!(back.spec, log.spec);
        assert_eq!(back.ops, log.ops);
    }
}
