//! An NBD client driver: the fixed-newstyle handshake with `NBD_OPT_GO`, simple
//! and structured replies, read, write, flush, trim and write-zeroes (each only
//! when the server advertises it), and block status (`base:allocation`), which
//! `map` reports so that ranges the server flags `NBD_STATE_ZERO` are not read.
//! It lets blkverify test block drivers that
//! are not ours: `qemu-nbd` serving an image with QEMU's drivers, nbdkit
//! plugins, storage appliances.
//!
//! Many requests are in flight on one connection, matched by cookie (see
//! `conn`): every thread that uses the driver (the workers of `exercise
//! --queue-depth N`, verify's threads) has its own request outstanding, and
//! replies are taken in whatever order the server sends them. Every socket
//! operation has a timeout, and a protocol error breaks the connection, so a
//! misbehaving server gives a clear error naming the request, never a hang or
//! a later misparse.
//!
//! The parts: `handshake` negotiates, `conn` carries the requests; the
//! protocol's numbers, the socket and the URI syntax are [`crate::nbd`]'s,
//! which the server shares.

mod conn;
mod handshake;

pub use crate::nbd::{is_uri, parse_uri, Address};

use super::{check_range, BlockDriver, Extent, Format, Mapping, SECTOR_SIZE};
use crate::error::{usize_of, Error, Result};
use crate::nbd::wire::{
    nbd_errno, Wire, CMD_BLOCK_STATUS, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, MAX_REQUEST, STATE_HOLE, STATE_ZERO, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH,
    TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};
use crate::nbd::Stream;
use conn::{Connection, Failure, Payload, Request};
use handshake::{negotiate, Negotiated};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// The longest range one block status request asks about.
const MAX_STATUS_REQUEST: u64 = 1 << 30;
/// The largest block status reply we accept (8 bytes per extent).
const MAX_STATUS_REPLY: u32 = 1 << 20;
/// The largest option reply or structured chunk we accept beyond data.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// A socket timeout surfaces as EAGAIN ("resource temporarily unavailable");
/// say what it means.
fn explain_timeout(e: io::Error, timeout: Duration) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the server did not answer within {} s (is it busy with another client?)",
                timeout.as_secs_f64()
            ),
        ),
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ),
        _ => e,
    }
}

/// An NBD export opened as a block device.
pub struct Nbd {
    uri: PathBuf,
    size: u64,
    transmission_flags: u16,
    structured: bool,
    min_block: u64,
    writable: bool,
    /// The id the server gave `base:allocation`, if it offers block status.
    allocation_context: Option<u32>,
    /// The extents of the last block status reply: `(start, end, flags)`.
    status_cache: Mutex<Vec<(u64, u64, u32)>>,
    conn: Connection,
}

impl Nbd {
    /// Connect to `uri` and negotiate. `timeout` bounds the connect, the
    /// handshake's every read and write, and later how long the server may stay
    /// silent while requests wait for replies.
    pub fn connect(uri: &str, writable: bool, timeout: Duration) -> Result<Nbd> {
        let uri_path = PathBuf::from(uri);
        let fail = |m: String| Error::format(&uri_path, format!("nbd: {m}"));
        let (address, export) = parse_uri(uri).map_err(&fail)?;
        let io_err =
            |context: &str, e: io::Error| Error::io(&uri_path, format!("nbd: {context}"), e);
        let stream = match &address {
            Address::Tcp { host, port } => {
                let addrs = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| io_err("resolve host", e))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
                let mut connected = None;
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = connected.ok_or_else(|| io_err("connect", last))?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| io_err("set timeout", e))?;
                s.set_write_timeout(Some(timeout))
                    .map_err(|e| io_err("set timeout", e))?;
                Stream::Tcp(s)
            }
            Address::Unix { socket } => {
                let s = UnixStream::connect(socket).map_err(|e| {
                    Error::io(socket, format!("nbd: connect to the socket of {uri}"), e)
                })?;
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| io_err("set timeout", e))?;
                s.set_write_timeout(Some(timeout))
                    .map_err(|e| io_err("set timeout", e))?;
                Stream::Unix(s)
            }
        };
        Nbd::over_stream(stream, uri, &export, writable, timeout)
    }

    /// Negotiate `export` over `stream`, already connected to a server, and
    /// open it; `name` names the export in messages (its URI). The fuzz
    /// targets speak for the server this way, over a socket pair.
    pub fn over_stream(
        mut stream: Stream,
        name: &str,
        export: &str,
        writable: bool,
        timeout: Duration,
    ) -> Result<Nbd> {
        let uri_path = PathBuf::from(name);
        let fail = |m: String| Error::format(&uri_path, format!("nbd: {m}"));
        let io_err =
            |context: &str, e: io::Error| Error::io(&uri_path, format!("nbd: {context}"), e);
        let negotiated = negotiate(&mut stream, export);
        let Negotiated {
            size,
            transmission_flags,
            structured,
            min_block,
            allocation_context,
        } = match negotiated {
            Ok(v) => v,
            Err(Wire::Io(e)) => return Err(io_err("handshake", explain_timeout(e, timeout))),
            Err(Wire::Protocol(m)) => return Err(fail(m)),
        };
        if writable && transmission_flags & TFLAG_READ_ONLY != 0 {
            return Err(Error::io(
                &uri_path,
                "nbd: open for writing",
                io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        let conn = Connection::new(stream, structured, allocation_context, timeout)
            .map_err(|e| io_err("set up the connection", e))?;
        Ok(Nbd {
            uri: uri_path,
            size,
            transmission_flags,
            structured,
            min_block,
            writable,
            allocation_context,
            status_cache: Mutex::new(Vec::new()),
            conn,
        })
    }

    /// Send one request and wait for its reply, with other threads' requests
    /// in flight. Reads and block status fill `payload`. The server's error
    /// becomes an `Io` error with its errno; a failed connection, one naming
    /// this request and why.
    fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        write_data: Option<&[u8]>,
        payload: Payload<'_>,
    ) -> Result<()> {
        let request = Request {
            command,
            flags,
            offset,
            length,
        };
        self.conn
            .call(request, write_data, payload)
            .map_err(|failure| match failure {
                Failure::Server { code, message } => {
                    let context = if message.is_empty() {
                        format!("nbd: server failed {}", request.describe())
                    } else {
                        format!("nbd: server failed {} ({message})", request.describe())
                    };
                    Error::io(
                        &self.uri,
                        context,
                        io::Error::from_raw_os_error(nbd_errno(code)),
                    )
                }
                Failure::Connection { kind, reason } => Error::io(
                    &self.uri,
                    format!("nbd: {}", request.describe()),
                    io::Error::new(kind, reason),
                ),
            })
    }

    /// The extent at `offset` (at most `len` long) from the last block status
    /// reply, if it covers `offset`. Only `NBD_STATE_ZERO` makes a range zero: a
    /// hole without it need not read as zeros.
    fn cached_status(&self, offset: u64, len: u64) -> Option<Extent> {
        let cache = self
            .status_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let at = cache.partition_point(|&(_, end, _)| end <= offset);
        let &(start, end, flags) = cache.get(at)?;
        if start > offset {
            return None;
        }
        let mapping = if flags & STATE_ZERO != 0 {
            Mapping::Zero {
                allocated: flags & STATE_HOLE == 0,
            }
        } else {
            Mapping::Data {
                host_offset: offset,
            }
        };
        Some(Extent {
            offset,
            length: (end - offset).min(len),
            mapping,
        })
    }

    /// Ask the server for the block status of the range at `offset` and keep
    /// the answer.
    fn fetch_status(&self, offset: u64, len: u64) -> Result<()> {
        let ask = len.clamp(self.min_block, MAX_STATUS_REQUEST);
        let (start, wide) = self.widen(offset, ask);
        let wide = wide.min(MAX_STATUS_REQUEST - MAX_STATUS_REQUEST % self.min_block);
        let mut extents = Vec::new();
        self.request(
            CMD_BLOCK_STATUS,
            0,
            start,
            wide as u32,
            None,
            Payload::Status(&mut extents),
        )?;
        let limit = (start + wide).min(self.size);
        let mut cache = Vec::with_capacity(extents.len());
        let mut pos = start;
        for (length, flags) in extents {
            if pos >= limit {
                break;
            }
            if length == 0 {
                return Err(Error::io(
                    &self.uri,
                    format!("nbd: block status at offset {start:#x}"),
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the server sent an empty extent",
                    ),
                ));
            }
            let end = (pos + u64::from(length)).min(limit);
            cache.push((pos, end, flags));
            pos = end;
        }
        if pos <= offset {
            return Err(Error::io(
                &self.uri,
                format!("nbd: block status at offset {start:#x}"),
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the server's extents end at {pos:#x}, before the offset asked about"),
                ),
            ));
        }
        *self
            .status_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = cache;
        Ok(())
    }

    /// Forget block status: a write may have changed it.
    fn forget_status(&self) {
        self.status_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset % self.min_block == 0 && len % self.min_block == 0
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly(self.uri.clone()))
        }
    }

    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST as usize);
            let piece = buf.get_mut(done..done + n).unwrap_or(&mut []);
            self.request(
                CMD_READ,
                0,
                offset + done as u64,
                n as u32,
                None,
                Payload::Data(piece),
            )?;
            done += n;
        }
        Ok(())
    }

    /// The aligned range covering `[offset, offset+len)`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.min_block;
        let end = (offset + len).div_ceil(self.min_block) * self.min_block;
        (
            start,
            end.min(self.size.div_ceil(self.min_block) * self.min_block) - start,
        )
    }

    /// Read-modify-write for servers with a minimum block size.
    fn rmw(&self, offset: u64, len: u64, fill: impl FnOnce(&mut [u8])) -> Result<()> {
        let (start, wide) = self.widen(offset, len);
        let mut block = vec![0u8; usize_of(wide)?];
        self.read_aligned(&mut block, start)?;
        let at = (offset - start) as usize;
        if let Some(dst) = block.get_mut(at..at + len as usize) {
            fill(dst);
        }
        self.write_aligned(&block, start)
    }

    fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.forget_status();
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST as usize);
            let piece = buf.get(done..done + n).unwrap_or(&[]);
            self.request(
                CMD_WRITE,
                0,
                offset + done as u64,
                n as u32,
                Some(piece),
                Payload::None,
            )?;
            done += n;
        }
        Ok(())
    }

    fn zero_or_trim(&self, command: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        self.forget_status();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_REQUEST);
            self.request(command, flags, offset + done, n as u32, None, Payload::None)?;
            done += n;
        }
        Ok(())
    }
}

impl BlockDriver for Nbd {
    /// An export is served as raw bytes.
    fn format(&self) -> Format {
        Format::Raw
    }

    /// The NBD client is a protocol, not a format of a file: it names itself.
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn path(&self) -> &Path {
        &self.uri
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn granularity(&self) -> u64 {
        self.min_block.max(SECTOR_SIZE)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.aligned(offset, buf.len() as u64) {
            return self.read_aligned(buf, offset);
        }
        let (start, wide) = self.widen(offset, buf.len() as u64);
        let mut block = vec![0u8; usize_of(wide)?];
        self.read_aligned(&mut block, start)?;
        let at = (offset - start) as usize;
        let src = block.get(at..at + buf.len()).ok_or_else(|| {
            Error::Internal(format!(
                "{}: the widened read at {start:#x} does not cover the request at {offset:#x}",
                self.path().display()
            ))
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_range(self.path(), self.size, offset, max_len.min(1))?;
        let len = max_len.min(self.size - offset).max(1);
        let data = Extent {
            offset,
            length: len,
            mapping: Mapping::Data {
                host_offset: offset,
            },
        };
        if self.allocation_context.is_none() {
            return Ok(data);
        }
        if let Some(extent) = self.cached_status(offset, len) {
            return Ok(extent);
        }
        self.fetch_status(offset, len)?;
        Ok(self.cached_status(offset, len).unwrap_or(data))
    }

    fn info(&self) -> Vec<(String, String)> {
        vec![
            (
                "transmission_flags".to_string(),
                format!("{:#x}", self.transmission_flags),
            ),
            (
                "structured_replies".to_string(),
                self.structured.to_string(),
            ),
            ("min_block_size".to_string(), self.min_block.to_string()),
            (
                "block_status".to_string(),
                self.allocation_context.is_some().to_string(),
            ),
        ]
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.aligned(offset, buf.len() as u64) {
            return self.write_aligned(buf, offset);
        }
        self.rmw(offset, buf.len() as u64, |dst| dst.copy_from_slice(buf))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.transmission_flags & TFLAG_SEND_WRITE_ZEROES != 0 && self.aligned(offset, len) {
            let flags = if unmap { 0 } else { CMD_FLAG_NO_HOLE };
            return self.zero_or_trim(CMD_WRITE_ZEROES, flags, offset, len);
        }
        if self.aligned(offset, len) {
            let zeros = vec![0u8; len.min(MAX_REQUEST) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.write_aligned(zeros.get(..n).unwrap_or(&[]), offset + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        self.rmw(offset, len, |dst| dst.fill(0))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), self.size, offset, len)?;
        if len == 0 || self.transmission_flags & TFLAG_SEND_TRIM == 0 {
            // Discard is advisory: a server without trim keeps the data.
            return Ok(());
        }
        self.zero_or_trim(CMD_TRIM, 0, offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.transmission_flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, None, Payload::None)
    }
}
