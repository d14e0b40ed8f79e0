//! The worker pool every whole-image engine runs on (verify, digest, checking
//! against block digests): N scoped threads that take chunks from a shared
//! counter, while the calling thread reports progress about ten times a second
//! and passes on a cancellation. It lies below the engines, which all use it
//! and none owns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Progress, as an engine reports it to its caller's hook.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Guest bytes done.
    pub done: u64,
    /// Guest bytes in all.
    pub total: u64,
}

/// Worker threads for `threads` (0: one per core), never more than `chunks`
/// units of work.
pub(crate) fn worker_count(threads: usize, chunks: u64) -> usize {
    let wanted = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    };
    wanted
        .clamp(1, 64)
        .min(usize::try_from(chunks).unwrap_or(usize::MAX).max(1))
}

/// Run `work` on `threads` threads and wait for them, calling `tick` from this
/// thread before any work and then about ten times a second with `done` bytes
/// of `total`. Returns false if `tick` asked to stop: `cancelled` was then set,
/// which the workers are expected to check between chunks.
pub(crate) fn run_workers(
    threads: usize,
    total: u64,
    done: &AtomicU64,
    cancelled: &AtomicBool,
    tick: &mut dyn FnMut(Progress) -> bool,
    work: &(dyn Fn() + Sync),
) -> bool {
    // One tick before any work, so a display starts at zero and a caller can
    // cancel before anything is read.
    if !tick(Progress { done: 0, total }) {
        return false;
    }
    let mut user_cancelled = false;
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        for _ in 0..threads {
            let tx = done_tx.clone();
            scope.spawn(move || {
                work();
                let _ = tx.send(());
            });
        }
        drop(done_tx);
        let mut finished = 0;
        while finished < threads {
            match done_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let progress = Progress {
                done: done.load(Ordering::Relaxed).min(total),
                total,
            };
            if !user_cancelled && !tick(progress) {
                user_cancelled = true;
                cancelled.store(true, Ordering::Relaxed);
            }
        }
    });
    !user_cancelled
}
