//! A batch as a stream: the caller feeds pairs in order and takes their
//! results back in the same order, one by one, while a few worker threads
//! (the slots) verify the pairs between.
//!
//! Memory and descriptors stay flat however long the batch: a pair is opened
//! when a slot takes it and closed as soon as it is checked (its findings
//! located), and at most [`WINDOW`] pairs are fed and not yet taken back. The
//! results of pairs that finish before an earlier one wait in that window, so
//! a slow pair holds back the results after it; once the window is full, the
//! slots idle until it is done (head-of-line blocking, the price of the
//! manifest's order). The pairs open at once are as many as the slots, and
//! never more than the open-file limit leaves room for ([`Budget`]).

use super::descriptors::{held_by_pair, is_exhaustion, Budget};
use super::{check_opened, open_pair, size_hint, BatchProgress, Checked, Reference, VerifyJob};
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::pool::Progress;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most pairs fed and not yet taken back: being verified, waiting for a
/// slot, or done and waiting for an earlier pair (a result is a report: about
/// a kilobyte, more with many findings).
pub const WINDOW: usize = 1024;

/// How often the caller's tick is called while it waits.
const TICK: Duration = Duration::from_millis(100);

/// How a stream runs.
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// Worker threads in all (0: one per core), shared by the pairs verified
    /// side by side.
    pub threads: usize,
    /// How many pairs will be fed, if known: fewer slots for fewer pairs, and
    /// the progress's `pairs_total` (else: the pairs fed so far).
    pub pairs_total: Option<usize>,
    /// The progress total to start from: the sum of the pairs' size hints
    /// ([`super::size_hint`]), taken by a first pass over the pairs (else:
    /// the hints of the pairs fed so far). Each pair's hint is replaced by
    /// its size when it opens.
    pub total: Option<u64>,
}

/// A batch in progress: see the module's documentation.
pub struct BatchStream {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Pairs fed, and results taken back.
    fed: usize,
    delivered: usize,
    per_pair_threads: usize,
    /// Whether the caller gave the progress total (else it grows as pairs are fed).
    total_given: bool,
    pairs_total: Option<usize>,
    last_tick: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    /// A pair was fed, or the stream is closing (the workers wait on it).
    job_ready: Condvar,
    /// A pair is done (the caller waits on it).
    result_ready: Condvar,
    budget: Mutex<Budget>,
    /// A pair closed (workers waiting for descriptors wait on it).
    budget_freed: Condvar,
    cancelled: AtomicBool,
    slots: usize,
    /// The bytes done of the pair each slot is verifying.
    running: Vec<AtomicU64>,
    /// The sizes of the pairs finished.
    finished_bytes: AtomicU64,
    /// The progress total: hints, corrected to sizes as pairs open.
    total: AtomicI64,
    pairs_done: AtomicUsize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    done: HashMap<usize, (VerifyJob, Result<Checked>)>,
    /// The stream is being dropped: workers stop.
    closed: bool,
    /// What the caller should be told, once (fewer pairs at once than slots).
    notice: Option<String>,
    noticed: bool,
}

struct Queued {
    index: usize,
    job: VerifyJob,
    hint: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn as_signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl BatchStream {
    /// Start the slots: as many as the thread budget (fewer for fewer
    /// pairs), or as the open-file limit leaves room for (then the stream's
    /// notice says so).
    pub fn new(options: StreamOptions) -> BatchStream {
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            options.threads
        }
        .clamp(1, 64);
        let wanted = options
            .pairs_total
            .map_or(threads, |n| threads.min(n))
            .max(1);
        let budget = Budget::of_this_process();
        let fit = budget.pairs_that_fit();
        let mut state = State::default();
        let slots = if fit < wanted {
            state.notice = Some(too_few(&budget, wanted));
            state.noticed = true;
            fit
        } else {
            wanted
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            job_ready: Condvar::new(),
            result_ready: Condvar::new(),
            budget: Mutex::new(budget),
            budget_freed: Condvar::new(),
            cancelled: AtomicBool::new(false),
            slots,
            running: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            finished_bytes: AtomicU64::new(0),
            total: AtomicI64::new(options.total.map_or(0, as_signed)),
            pairs_done: AtomicUsize::new(0),
        });
        let workers = (0..slots)
            .map(|slot| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || shared.work(slot))
            })
            .collect();
        BatchStream {
            shared,
            workers,
            fed: 0,
            delivered: 0,
            per_pair_threads: (threads / slots).max(1),
            total_given: options.total.is_some(),
            pairs_total: options.pairs_total,
            last_tick: None,
        }
    }

    /// The pairs verified side by side.
    pub fn slots(&self) -> usize {
        self.shared.slots
    }

    /// How many more pairs may be fed now (the window's free places).
    pub fn room(&self) -> usize {
        if self.shared.cancelled.load(Ordering::Relaxed) {
            return 0;
        }
        WINDOW.saturating_sub(self.fed - self.delivered)
    }

    /// Whether every pair fed has been taken back.
    pub fn is_idle(&self) -> bool {
        self.fed == self.delivered
    }

    /// Feed the next pair (its `threads` is set to the slot's share). Call
    /// only when [`room`](Self::room) is not 0: the window is the bound.
    pub fn feed(&mut self, mut job: VerifyJob) {
        job.options.threads = self.per_pair_threads;
        let hint = size_hint(&job);
        if !self.total_given {
            self.shared
                .total
                .fetch_add(as_signed(hint), Ordering::Relaxed);
        }
        let index = self.fed;
        self.fed += 1;
        lock(&self.shared.state)
            .queue
            .push_back(Queued { index, job, hint });
        self.shared.job_ready.notify_one();
    }

    /// Call `tick` once before any pair is fed, so that a display starts at
    /// zero, from the total the caller gave (see [`next_result`](Self::next_result)).
    pub fn start(&mut self, tick: &mut dyn FnMut(BatchProgress) -> bool) -> Result<()> {
        if self.last_tick.is_none() {
            self.tick(tick)?;
        }
        Ok(())
    }

    /// The next pair's result, in feeding order, once it is done: `None` when
    /// every pair fed has been taken back. `tick` is called from this thread
    /// about ten times a second (and once at the start and at the end);
    /// returning `false` cancels the batch (`Err(Error::Cancelled)`).
    pub fn next_result(
        &mut self,
        tick: &mut dyn FnMut(BatchProgress) -> bool,
    ) -> Result<Option<(VerifyJob, Result<Checked>)>> {
        if self.last_tick.is_none() || self.is_idle() {
            self.tick(tick)?;
            if self.is_idle() {
                return Ok(None);
            }
        }
        let mut state = lock(&self.shared.state);
        loop {
            if let Some(result) = state.done.remove(&self.delivered) {
                drop(state);
                self.delivered += 1;
                if self.tick_due().is_zero() {
                    self.tick(tick)?;
                }
                return Ok(Some(result));
            }
            let wait = self.tick_due();
            if wait.is_zero() {
                drop(state);
                self.tick(tick)?;
                state = lock(&self.shared.state);
                continue;
            }
            state = self
                .shared
                .result_ready
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// What the caller should be told, once: the open-file limit lets fewer
    /// pairs be open at once than there are slots.
    pub fn take_notice(&mut self) -> Option<String> {
        lock(&self.shared.state).notice.take()
    }

    /// The batch's progress now.
    pub fn progress(&self) -> BatchProgress {
        let shared = &self.shared;
        let total = u64::try_from(shared.total.load(Ordering::Relaxed)).unwrap_or(0);
        let running: u64 = shared
            .running
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        BatchProgress {
            done: (shared.finished_bytes.load(Ordering::Relaxed) + running).min(total),
            total,
            pairs_done: shared.pairs_done.load(Ordering::Relaxed),
            pairs_total: self.pairs_total.unwrap_or(self.fed).max(self.fed),
        }
    }

    /// Cancel the batch: pairs being verified stop, none starts.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Relaxed);
        self.shared.job_ready.notify_all();
        self.shared.budget_freed.notify_all();
    }

    fn tick_due(&self) -> Duration {
        self.last_tick
            .map_or(Duration::ZERO, |t| TICK.saturating_sub(t.elapsed()))
    }

    fn tick(&mut self, tick: &mut dyn FnMut(BatchProgress) -> bool) -> Result<()> {
        self.last_tick = Some(Instant::now());
        if tick(self.progress()) {
            Ok(())
        } else {
            self.cancel();
            Err(Error::Cancelled)
        }
    }
}

impl Drop for BatchStream {
    /// Stop the workers. Pairs still being verified (the caller stopped
    /// early) are cancelled and their threads left to end on their own, not
    /// waited for: an NBD export can take its timeout to answer.
    fn drop(&mut self) {
        let idle = self.is_idle();
        if !idle {
            self.cancel();
        }
        lock(&self.shared.state).closed = true;
        self.shared.job_ready.notify_all();
        if idle {
            for worker in self.workers.drain(..) {
                let _ = worker.join();
            }
        }
    }
}

/// The notice that the open-file limit leaves room for fewer pairs at once
/// than the slots.
fn too_few(budget: &Budget, slots: usize) -> String {
    let limit = budget
        .limit()
        .map_or_else(|| "none".to_string(), |l| l.to_string());
    let fit = budget.pairs_that_fit();
    format!(
        "the open-file limit (ulimit -n: {limit}) leaves room for {fit} pair(s) open at once \
         at {} descriptors a pair, not {slots}: verifying {fit} at a time",
        budget.per_pair()
    )
}

impl Shared {
    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// A slot: take the next pair fed, verify it, hand its result back.
    fn work(&self, slot: usize) {
        loop {
            let queued = {
                let mut state = lock(&self.state);
                loop {
                    if state.closed || self.cancelled() {
                        return;
                    }
                    if let Some(queued) = state.queue.pop_front() {
                        break queued;
                    }
                    state = self
                        .job_ready
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                self.run(slot, &queued.job, queued.hint)
            }))
            .unwrap_or_else(|_| {
                Err(Error::Internal(format!(
                    "{}: verifying the pair panicked",
                    queued.job.test.display()
                )))
            });
            if let Some(counter) = self.running.get(slot) {
                counter.store(0, Ordering::Relaxed);
            }
            self.pairs_done.fetch_add(1, Ordering::Relaxed);
            lock(&self.state)
                .done
                .insert(queued.index, (queued.job, outcome));
            self.result_ready.notify_all();
        }
    }

    /// Open, verify and close one pair.
    fn run(&self, slot: usize, job: &VerifyJob, hint: u64) -> Result<Checked> {
        let opened = self.open(job);
        let (raw, test, held) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.total.fetch_sub(as_signed(hint), Ordering::Relaxed);
                return Err(e);
            }
        };
        let size = raw.size().max(test.size());
        self.total
            .fetch_add(as_signed(size) - as_signed(hint), Ordering::Relaxed);
        let mut tick = |p: Progress| {
            if let Some(counter) = self.running.get(slot) {
                counter.store(p.done, Ordering::Relaxed);
            }
            !self.cancelled()
        };
        let outcome = check_opened(job, &raw, &test, &mut tick);
        drop((raw, test));
        lock(&self.budget).release(held);
        self.budget_freed.notify_all();
        if let Some(counter) = self.running.get(slot) {
            counter.store(0, Ordering::Relaxed);
        }
        self.finished_bytes.fetch_add(size, Ordering::Relaxed);
        outcome
    }

    /// Open a pair once the descriptors it needs are free: the pair and the
    /// descriptors it holds. A pair that runs out of descriptors while
    /// others are open waits for one of them to close, and tries again (the
    /// batch then holds no more than they did); alone, it tries once more,
    /// and then its error is its result.
    fn open(&self, job: &VerifyJob) -> Result<(Reference, Arc<dyn BlockDriver>, usize)> {
        let mut budget = lock(&self.budget);
        let mut tried_alone = false;
        loop {
            while !budget.may_open() {
                if self.cancelled() {
                    return Err(Error::Cancelled);
                }
                self.notice_once(&budget);
                budget = self
                    .budget_freed
                    .wait_timeout(budget, TICK)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if self.cancelled() {
                return Err(Error::Cancelled);
            }
            let reserved = budget.reserve();
            drop(budget);
            let opened = open_pair(job);
            budget = lock(&self.budget);
            match opened {
                Ok((raw, test)) => {
                    let held = held_by_pair(&raw, test.as_ref());
                    budget.settle(reserved, held);
                    return Ok((raw, test, held));
                }
                Err(e) if is_exhaustion(&e) => {
                    budget.release(reserved);
                    self.budget_freed.notify_all();
                    if budget.open_pairs() > 0 {
                        budget.ran_out();
                        self.notice_once(&budget);
                    } else if tried_alone {
                        return Err(e);
                    } else {
                        // The others closed meanwhile: alone, it may fit.
                        tried_alone = true;
                    }
                }
                Err(e) => {
                    budget.release(reserved);
                    self.budget_freed.notify_all();
                    return Err(e);
                }
            }
        }
    }

    fn notice_once(&self, budget: &Budget) {
        let mut state = lock(&self.state);
        if !state.noticed {
            state.noticed = true;
            state.notice = Some(too_few(budget, self.slots));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::OpenOptions;
    use crate::report::VerifyOptions;
    use std::path::Path;

    fn raw_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn job(raw: &Path, test: &Path) -> VerifyJob {
        VerifyJob {
            raw: raw.to_path_buf(),
            reference: super::super::ReferenceKind::Image,
            test: test.to_path_buf(),
            raw_options: OpenOptions::default(),
            test_options: OpenOptions::default(),
            options: VerifyOptions::default(),
        }
    }

    #[test]
    fn results_come_back_in_feeding_order_through_a_full_window() {
        let dir = tempfile::tempdir().unwrap();
        let a = raw_file(dir.path(), "a", &[1u8; 4096]);
        let b = raw_file(dir.path(), "b", &[2u8; 8192]);
        let pairs = 3 * WINDOW + 5;
        let mut stream = BatchStream::new(StreamOptions {
            threads: 4,
            pairs_total: Some(pairs),
            total: None,
        });
        let mut fed = 0;
        let mut seen = Vec::new();
        let mut last = None;
        loop {
            while stream.room() > 0 && fed < pairs {
                let j = if fed % 3 == 0 {
                    job(&a, &b)
                } else {
                    job(&a, &a)
                };
                stream.feed(j);
                fed += 1;
            }
            assert!(stream.fed - stream.delivered <= WINDOW);
            match stream
                .next_result(&mut |p| {
                    last = Some(p);
                    true
                })
                .unwrap()
            {
                Some((j, r)) => seen.push((j.test == b, r.unwrap().report.identical)),
                None => break,
            }
        }
        assert_eq!(seen.len(), pairs);
        for (i, (is_b, identical)) in seen.iter().enumerate() {
            assert_eq!(*is_b, i % 3 == 0);
            assert_eq!(*identical, i % 3 != 0);
        }
        let last = last.unwrap();
        assert_eq!(last.pairs_done, pairs);
        assert_eq!(last.done, last.total);
        let sizes =
            (pairs as u64).div_ceil(3) * 8192 + (pairs as u64 - (pairs as u64).div_ceil(3)) * 4096;
        assert_eq!(
            last.total, sizes,
            "the total is the pairs' sizes once all opened"
        );
    }

    #[test]
    fn a_pair_that_cannot_open_is_its_own_error_and_the_total_drops_its_hint() {
        let dir = tempfile::tempdir().unwrap();
        let a = raw_file(dir.path(), "a", &[1u8; 4096]);
        let missing = dir.path().join("missing");
        let results = super::super::verify_many(
            vec![job(&a, &a), job(&a, &missing), job(&a, &a)],
            2,
            &mut |_| true,
        );
        assert!(results[0].is_ok() && results[2].is_ok());
        assert!(matches!(&results[1], Err(Error::Io { path, .. }) if path == &missing));
    }

    #[test]
    fn a_tick_that_says_stop_cancels() {
        let dir = tempfile::tempdir().unwrap();
        let a = raw_file(dir.path(), "a", &[1u8; 4096]);
        let results = super::super::verify_many(vec![job(&a, &a); 50], 2, &mut |_| false);
        assert_eq!(results.len(), 50);
        assert!(results.iter().all(|r| matches!(r, Err(Error::Cancelled))));
    }
}
