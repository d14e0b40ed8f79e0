//! serve's trace recorder: an [`Observer`] of the device that records every
//! admitted request, in number order, to a trace ([`super::trace`]).
//!
//! The device calls the observer under its admission lock, so the recorder
//! only copies the request (and a write's data) into a batch there; a thread
//! of its own encodes the batches (blocks, repeats, zstd) and writes them.
//! Full batches wait in a queue bounded in bytes ([`QUEUE_LIMIT`]): when the
//! writer falls behind, admission waits for it (backpressure), so memory stays
//! bounded whatever the client does. The writer takes a batch that is not full
//! after [`IDLE_WAKE`] and flushes the file at least every
//! [`FLUSH_INTERVAL`], so a trace cut short by a kill holds the requests
//! admitted up to about a second before it.
//!
//! A trace that cannot be written (disk full) stops recording: the error is
//! kept for [`Recorder::error`] (serve then stops), and requests are admitted
//! as if nothing observed them.

use super::op::Op;
use super::trace::{kind_of, TraceHeader, TraceStats, TraceWriter};
use crate::blkverify::order::{Admitted, Observer};
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A batch is handed to the writer once it holds this much.
pub const BATCH: usize = 1 << 20;
/// The most bytes of full batches waiting for the writer before admission
/// waits (one request of any size always passes).
pub const QUEUE_LIMIT: usize = 64 << 20;
/// How long the writer sleeps before it takes a batch that is not full.
pub const IDLE_WAKE: Duration = Duration::from_millis(200);
/// The longest a written record waits in the writer's buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// The fixed part of a request in a batch: number, connection, command,
/// flags, offset, length; a write's data follow.
const RAW_LEN: usize = 8 + 8 + 2 + 2 + 8 + 8;

#[derive(Default)]
struct State {
    /// The batch being filled.
    pending: Vec<u8>,
    /// Full batches, oldest first.
    queue: VecDeque<Vec<u8>>,
    /// Their bytes.
    queued: usize,
    /// Emptied batches, to fill again.
    spare: Vec<Vec<u8>>,
    /// The writer waits for work.
    writer_idle: bool,
    /// Observers waiting for room.
    waiting: usize,
    /// No more requests are recorded.
    closed: bool,
    /// Why the trace stopped, if it failed.
    failed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Records a device's requests to a trace (see the module doc).
pub struct Recorder {
    path: PathBuf,
    shared: std::sync::Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Result<TraceStats>>>>,
    outcome: Mutex<Option<std::result::Result<TraceStats, String>>>,
}

impl Recorder {
    /// Create the trace at `path` with `header` (an error now if it cannot
    /// be created) and start its writer.
    pub fn start(path: &Path, header: &TraceHeader) -> Result<Recorder> {
        let writer = TraceWriter::create(path, header)?;
        let shared = std::sync::Arc::new(Shared {
            state: Mutex::default(),
            work: Condvar::new(),
            room: Condvar::new(),
        });
        let thread_shared = std::sync::Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("blkverify-trace".to_string())
            .spawn(move || write_batches(&thread_shared, writer))
            .map_err(|e| Error::io(path, "start the trace writer", e))?;
        Ok(Recorder {
            path: path.to_path_buf(),
            shared,
            thread: Mutex::new(Some(thread)),
            outcome: Mutex::default(),
        })
    }

    /// The trace's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the trace stopped being written, if it failed.
    pub fn error(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Stop recording, write what is queued and the end record, and make the
    /// trace durable. Returns what was written, or why it could not be
    /// (the same answer to every call).
    pub fn finish(&self) -> std::result::Result<TraceStats, String> {
        let mut outcome = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(done) = outcome.as_ref() {
            return done.clone();
        }
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        self.shared.room.notify_all();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let result = match thread.map(JoinHandle::join) {
            Some(Ok(Ok(stats))) => Ok(stats),
            Some(Ok(Err(e))) => Err(e.to_string()),
            Some(Err(_)) => Err(format!(
                "{}: the trace writer panicked (please report it)",
                self.path.display()
            )),
            None => Err(format!(
                "{}: the trace was not finished",
                self.path.display()
            )),
        };
        let result = match (result, self.error()) {
            (_, Some(failed)) => Err(failed),
            (result, None) => result,
        };
        *outcome = Some(result.clone());
        result
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Observer for Recorder {
    fn admitted(&self, admitted: &Admitted<'_>) {
        let request = admitted.request;
        let (command, flags) = super::trace::command_of(request.kind);
        let data = request
            .data
            .filter(|_| matches!(request.kind, crate::blkverify::order::Kind::Write { .. }));
        let mut state = self.shared.lock();
        if state.closed {
            return;
        }
        let p = &mut state.pending;
        p.reserve(RAW_LEN + data.map_or(0, <[u8]>::len));
        p.extend_from_slice(&admitted.number.to_le_bytes());
        p.extend_from_slice(&request.source.to_le_bytes());
        p.extend_from_slice(&command.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&request.offset.to_le_bytes());
        p.extend_from_slice(&request.length.to_le_bytes());
        if let Some(data) = data {
            p.extend_from_slice(data);
        }
        if state.pending.len() < BATCH {
            return;
        }
        let fresh = state.spare.pop().unwrap_or_default();
        let full = std::mem::replace(&mut state.pending, fresh);
        state.queued += full.len();
        state.queue.push_back(full);
        if state.writer_idle {
            self.shared.work.notify_one();
        }
        // Backpressure: the device waits while the writer catches up.
        while state.queued > QUEUE_LIMIT && !state.closed {
            state.waiting += 1;
            state = self
                .shared
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting -= 1;
        }
    }
}

/// The writer thread: encode and write batches until the recorder closes,
/// then the rest and the end record.
fn write_batches(shared: &Shared, mut writer: TraceWriter) -> Result<TraceStats> {
    let mut dirty = false;
    let mut last_flush = Instant::now();
    loop {
        let (batch, closing) = {
            let mut state = shared.lock();
            loop {
                if let Some(batch) = state.queue.pop_front() {
                    state.queued -= batch.len();
                    if state.waiting > 0 {
                        shared.room.notify_all();
                    }
                    break (Some(batch), false);
                }
                if state.closed {
                    let rest = std::mem::take(&mut state.pending);
                    break (Some(rest), true);
                }
                if !state.pending.is_empty() && last_flush.elapsed() >= IDLE_WAKE {
                    let fresh = state.spare.pop().unwrap_or_default();
                    break (Some(std::mem::replace(&mut state.pending, fresh)), false);
                }
                if dirty && last_flush.elapsed() >= FLUSH_INTERVAL {
                    break (None, false);
                }
                state.writer_idle = true;
                state = shared
                    .work
                    .wait_timeout(state, IDLE_WAKE)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                state.writer_idle = false;
            }
        };
        let written = match &batch {
            Some(batch) => write_batch(&mut writer, batch),
            None => Ok(()),
        };
        if let Err(e) = written.and_then(|()| {
            dirty |= batch.as_ref().is_some_and(|b| !b.is_empty());
            if closing || (dirty && last_flush.elapsed() >= FLUSH_INTERVAL) {
                writer.flush()?;
                dirty = false;
                last_flush = Instant::now();
            }
            Ok(())
        }) {
            let mut state = shared.lock();
            state.failed = Some(e.to_string());
            state.closed = true;
            state.queue.clear();
            state.queued = 0;
            state.pending = Vec::new();
            drop(state);
            shared.room.notify_all();
            return Err(e);
        }
        if closing {
            return writer.finish();
        }
        if let Some(mut batch) = batch {
            batch.clear();
            let mut state = shared.lock();
            if state.spare.len() < 2 && batch.capacity() <= 2 * BATCH {
                state.spare.push(batch);
            }
        }
    }
}

/// Encode one batch's requests.
fn write_batch(writer: &mut TraceWriter, mut batch: &[u8]) -> Result<()> {
    let bad = || Error::Internal("a trace batch is malformed".to_string());
    while !batch.is_empty() {
        let (head, rest) = batch.split_at_checked(RAW_LEN).ok_or_else(bad)?;
        let word = |at: usize| -> u64 {
            head.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let half = |at: usize| -> u16 {
            head.get(at..at + 2)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u16::from_le_bytes)
        };
        let (number, connection) = (word(0), word(8));
        let (command, flags) = (half(16), half(18));
        let (offset, length) = (word(20), word(28));
        let kind = kind_of(command, flags).ok_or_else(bad)?;
        let op = Op {
            number,
            kind,
            offset,
            length,
        };
        let (data, rest) = if op.carries_data() {
            let n = usize::try_from(length).map_err(|_| bad())?;
            let (data, rest) = rest.split_at_checked(n).ok_or_else(bad)?;
            (Some(data), rest)
        } else {
            (None, rest)
        };
        writer.request(number, connection, &op, data)?;
        batch = rest;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkverify::order::{Kind, Order, Request};
    use crate::record::trace::read_trace;
    use std::sync::Arc;

    fn header() -> TraceHeader {
        TraceHeader {
            size: 1 << 30,
            started_ns: 0,
            raw: "raw".to_string(),
            test: "test".to_string(),
            test_format: "raw".to_string(),
            creator: "test".to_string(),
        }
    }

    #[test]
    fn every_admitted_request_is_recorded_in_number_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bvt");
        let recorder = Arc::new(Recorder::start(&path, &header()).unwrap());
        let mut order = Order::new(512);
        order.set_observer(recorder.clone());
        // Four threads, 3000 requests each, many of them writes of 64 KiB:
        // more than the queue holds, so admission waits for the writer.
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let order = &order;
                scope.spawn(move || {
                    let data = vec![t as u8 + 1; 65536];
                    for i in 0..3000u64 {
                        let write = i % 3 == 0;
                        let _ticket = order.admit(&Request {
                            kind: if write {
                                Kind::Write { fua: false }
                            } else {
                                Kind::Read
                            },
                            offset: (t * 3000 + i) * 65536 % (1 << 30),
                            length: 65536,
                            source: t + 1,
                            data: write.then_some(&data[..]),
                        });
                    }
                });
            }
        });
        let stats = recorder.finish().unwrap();
        assert_eq!(stats.requests, 12000);
        assert_eq!(recorder.finish().unwrap(), stats, "the same answer again");
        let trace = read_trace(&path).unwrap();
        assert_eq!(trace.ops.len(), 12000);
        assert!(trace
            .ops
            .iter()
            .enumerate()
            .all(|(i, op)| op.number == i as u64));
        // Each connection's writes hold that connection's bytes.
        for (p, _) in trace
            .ops
            .iter()
            .enumerate()
            .filter(|(_, op)| op.carries_data())
        {
            let mut buf = vec![0u8; 65536];
            assert!(trace.fill(p, &mut buf));
            assert!(buf.iter().all(|&b| u64::from(b) == trace.connections[p]));
        }
        // 4000 writes of the same four blocks: stored once each.
        assert_eq!(stats.new_blocks, 4);
        assert!(stats.file_bytes < 2 << 20, "{stats:?}");
    }

    #[test]
    fn a_recorder_that_cannot_write_says_so() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Recorder::start(&dir.path().join("no/such/dir/t.bvt"), &header()).is_err());
        // /dev/full accepts the open and fails every write.
        let recorder = Recorder::start(Path::new("/dev/full"), &header());
        assert!(
            recorder.is_err(),
            "the header is written and flushed at once"
        );
    }
}
