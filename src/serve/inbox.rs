//! The reading side of one connection: a buffer that many requests arrive
//! in at once (one `recv` takes as many as the client has sent), and the
//! time limit on a request the client has begun to send.
//!
//! A client may stay idle between requests for as long as it likes. Once
//! the first byte of a request has arrived, the rest of it (the header, and
//! a write's data) must arrive within the request timeout, or the
//! connection is dropped. Nothing of a request is admitted to the device
//! before all of it is here, so a client that sends half a request and
//! stalls holds no part of the device and no other client; the timeout only
//! frees its own connection (and its place among `--shared` clients).

use crate::nbd::Stream;
use std::io::{self, Read};
use std::time::{Duration, Instant};

/// Why no more requests can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// The client closed its side (or a stop shut the socket down).
    Closed,
    /// A request the client began did not arrive whole within the limit.
    Stalled,
    /// The socket failed.
    Failed,
}

/// The buffered reading side of a connection.
pub(super) struct Inbox {
    stream: Stream,
    buf: Vec<u8>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    limit: Duration,
}

/// How often a blocked read looks at the clock: often enough to end a
/// stalled request soon after its limit, rarely enough to cost nothing.
fn tick(limit: Duration) -> Duration {
    (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

impl Inbox {
    /// Read `stream` through a buffer of `capacity` bytes; a begun request
    /// must arrive whole within `limit`.
    pub fn new(stream: Stream, capacity: usize, limit: Duration) -> io::Result<Inbox> {
        stream.set_read_timeout(Some(tick(limit)))?;
        Ok(Inbox {
            stream,
            buf: vec![0u8; capacity.max(64)],
            start: 0,
            end: 0,
            limit,
        })
    }

    /// The bytes received and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }

    /// The most bytes [`Inbox::fill`] can hold.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Drop the first `n` buffered bytes.
    pub fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Wait until at least `n` bytes (at most the capacity) are buffered.
    /// `begun`: the request these bytes belong to has begun (its header
    /// came), so the wait is timed from now; otherwise it is timed from the
    /// first byte that arrives, and waiting for that one is idle.
    pub fn fill(&mut self, n: usize, begun: bool) -> Result<(), Ended> {
        let n = n.min(self.buf.len());
        let mut deadline = None;
        while self.end - self.start < n {
            if self.buf.len() - self.start < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if deadline.is_none() && (begun || self.end > self.start) {
                deadline = Some(Instant::now() + self.limit);
            }
            let free = self.buf.get_mut(self.end..).unwrap_or(&mut []);
            let got = read_some(&mut self.stream, free)?;
            self.end += got;
            if self.end - self.start < n && deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Ended::Stalled);
            }
        }
        Ok(())
    }

    /// Fill `dst` with the next bytes: the buffered ones, then straight from
    /// the socket (a write's data larger than the buffer). The request has
    /// begun: the wait is timed.
    pub fn read_exact_into(&mut self, dst: &mut [u8]) -> Result<(), Ended> {
        let have = self.buffered().len().min(dst.len());
        let (head, mut rest) = dst.split_at_mut(have);
        head.copy_from_slice(self.buffered().get(..have).unwrap_or(&[]));
        self.consume(have);
        let deadline = Instant::now() + self.limit;
        while !rest.is_empty() {
            let got = read_some(&mut self.stream, rest)?;
            rest = rest.get_mut(got..).unwrap_or(&mut []);
            if !rest.is_empty() && Instant::now() >= deadline {
                return Err(Ended::Stalled);
            }
        }
        Ok(())
    }

    /// Read and drop the next `n` bytes (a refused write's data), within the
    /// request's time limit.
    pub fn skip(&mut self, mut n: u64) -> Result<(), Ended> {
        let deadline = Instant::now() + self.limit;
        loop {
            let have = self
                .buffered()
                .len()
                .min(usize::try_from(n).unwrap_or(usize::MAX));
            self.consume(have);
            n -= have as u64;
            if n == 0 {
                return Ok(());
            }
            let got = read_some(&mut self.stream, &mut self.buf)?;
            self.start = 0;
            self.end = got;
            if Instant::now() >= deadline && (self.end as u64) < n {
                return Err(Ended::Stalled);
            }
        }
    }
}

/// One read: how many bytes came (0 when the read timed out, so that the
/// caller looks at its clock). End of stream and failures end the reading.
fn read_some(stream: &mut Stream, buf: &mut [u8]) -> Result<usize, Ended> {
    match stream.read(buf) {
        Ok(0) if !buf.is_empty() => Err(Ended::Closed),
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(0)
        }
        Err(_) => Err(Ended::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn pair(limit: Duration) -> (Inbox, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (Inbox::new(Stream::Unix(ours), 64, limit).unwrap(), theirs)
    }

    #[test]
    fn several_messages_arrive_in_one_read_and_the_buffer_compacts() {
        let (mut inbox, mut client) = pair(Duration::from_secs(5));
        client.write_all(&[1u8; 50]).unwrap();
        inbox.fill(10, false).unwrap();
        assert_eq!(inbox.buffered().len(), 50, "one read took all 50 bytes");
        inbox.consume(40);
        client.write_all(&[2u8; 60]).unwrap();
        // 10 left at offset 40: 60 more do not fit behind them, so the
        // buffer moves them to the front first.
        inbox.fill(64, false).unwrap();
        assert_eq!(&inbox.buffered()[..10], &[1u8; 10]);
        assert_eq!(&inbox.buffered()[10..64], &[2u8; 54]);
        let mut big = [0u8; 70];
        client.write_all(&[3u8; 10]).unwrap();
        inbox.consume(10);
        inbox.read_exact_into(&mut big[..64]).unwrap();
        // 54 buffered, then 6 more 2s and 4 of the 3s straight from the socket.
        assert_eq!(&big[..60], &[2u8; 60][..]);
        assert_eq!(&big[60..64], &[3u8; 4]);
    }

    #[test]
    fn idle_waits_but_a_begun_request_must_arrive_in_time() {
        let limit = Duration::from_millis(200);
        let (mut inbox, mut client) = pair(limit);
        // Half a header, then nothing: stalled once the limit has passed.
        client.write_all(&[0u8; 10]).unwrap();
        let started = Instant::now();
        assert_eq!(inbox.fill(28, false), Err(Ended::Stalled));
        assert!(started.elapsed() >= limit && started.elapsed() < limit * 10);
        // A payload that never comes: stalled, timed from the header.
        let (mut inbox, _client) = pair(limit);
        assert_eq!(inbox.fill(28, true), Err(Ended::Stalled));
        assert_eq!(inbox.skip(100), Err(Ended::Stalled));
        // A trickle does not extend the limit.
        let (mut inbox, mut client) = pair(limit);
        let trickle = std::thread::spawn(move || {
            for _ in 0..40 {
                if client.write_all(&[0u8]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let started = Instant::now();
        assert_eq!(inbox.fill(64, false), Err(Ended::Stalled));
        assert!(started.elapsed() < limit * 3, "{:?}", started.elapsed());
        drop(inbox);
        trickle.join().unwrap();
        // The client leaving ends the reading.
        let (mut inbox, client) = pair(limit);
        drop(client);
        assert_eq!(inbox.fill(1, false), Err(Ended::Closed));
    }
}
