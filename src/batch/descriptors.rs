//! The file descriptors a batch holds: how many an open pair holds, how many
//! the process's open-file limit (`RLIMIT_NOFILE`'s soft limit, `ulimit -n`)
//! leaves the batch, and the budget that keeps the pairs open at once within
//! it. A pair that does not fit waits for one to close; it is never failed
//! for want of a descriptor while another pair holds some.

use super::Reference;
use crate::driver::{nbd, BlockDriver};
use crate::error::Error;
use std::path::Path;

/// Descriptors an image file holds while it is open: the file, and the
/// duplicate of it that its QEMU image lock is taken on (`storage::file`).
pub const PER_FILE: usize = 2;

/// Descriptors an NBD export holds: its socket, and the two duplicates of it
/// that its reader and its writer own (`driver::nbd::conn`).
pub const PER_EXPORT: usize = 3;

/// The fewest a pair of two image files holds, and a batch's guess for a
/// pair it has not opened yet until a pair has shown it needs more.
pub const LEAST_PER_PAIR: usize = 2 * PER_FILE;

/// Descriptors left to the rest of the process: the caller's output, the
/// HTML pages it writes, its interpreter's files.
pub const RESERVE: usize = 32;

/// The descriptors `image` holds: each file it has open (the image, a vmdk's
/// extent files, a qcow2's data file) and those of its backing chain.
pub fn held_by_image(image: &dyn BlockDriver) -> usize {
    let path = image.path();
    let own = if path.to_str().is_some_and(nbd::is_uri) {
        PER_EXPORT
    } else {
        let others = image
            .info()
            .into_iter()
            .filter(|(key, value)| {
                key == "data_file"
                    || (key.starts_with("extent.")
                        && key.ends_with(".filename")
                        && !same_file(Path::new(value), path))
            })
            .count();
        (1 + others) * PER_FILE
    };
    own + image.backing().map_or(0, held_by_image)
}

/// The descriptors an open pair holds (a block digests file is read whole
/// when it opens, and holds none).
pub fn held_by_pair(raw: &Reference, test: &dyn BlockDriver) -> usize {
    let reference = match raw {
        Reference::Image(image) => held_by_image(image.as_ref()),
        Reference::Digests(_) => 0,
    };
    reference + held_by_image(test)
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// The soft limit on open files (`ulimit -n`), or `None` when there is none.
pub fn open_file_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer to ours.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if !ok || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    usize::try_from(limit.rlim_cur).ok()
}

/// The descriptors this process has open now (0 where that cannot be told).
pub fn open_now() -> usize {
    // Listing /proc/self/fd opens one more: the listing's own.
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count().saturating_sub(1))
}

/// Whether `error` is the process (or the system) running out of descriptors.
pub fn is_exhaustion(error: &Error) -> bool {
    match error {
        Error::Io { source, .. } => matches!(
            source.raw_os_error(),
            Some(libc::EMFILE) | Some(libc::ENFILE)
        ),
        _ => false,
    }
}

/// The descriptors a batch may hold, and those its open pairs hold.
#[derive(Debug)]
pub struct Budget {
    /// The most the batch may hold (`None`: no limit).
    room: Option<usize>,
    /// The open-file limit it was taken from.
    limit: Option<usize>,
    /// Held by the pairs open now (or being opened: a guess until they are).
    held: usize,
    /// Pairs open now, or being opened.
    open: usize,
    /// The guess for a pair about to open: the most any pair has held so far,
    /// or more after an open that ran out of descriptors.
    per_pair: usize,
}

impl Budget {
    /// The budget of a process with open-file limit `limit` that has
    /// `in_use` descriptors open: the limit, less those and [`RESERVE`].
    pub fn new(limit: Option<usize>, in_use: usize) -> Budget {
        Budget {
            room: limit.map(|l| l.saturating_sub(in_use).saturating_sub(RESERVE)),
            limit,
            held: 0,
            open: 0,
            per_pair: LEAST_PER_PAIR,
        }
    }

    /// The budget of this process, now.
    pub fn of_this_process() -> Budget {
        Budget::new(open_file_limit(), open_now())
    }

    /// How many pairs of the size of the largest seen so far fit at once (at
    /// least one: a pair alone always tries, and fails on its own if it
    /// cannot open).
    pub fn pairs_that_fit(&self) -> usize {
        self.room
            .map_or(usize::MAX, |room| (room / self.per_pair).max(1))
    }

    /// The guess for a pair about to open.
    pub fn per_pair(&self) -> usize {
        self.per_pair
    }

    /// The open-file limit the budget comes from.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// Pairs open now.
    pub fn open_pairs(&self) -> usize {
        self.open
    }

    /// Whether a pair may open now: it fits beside those open, or none is.
    pub fn may_open(&self) -> bool {
        self.open == 0
            || self
                .room
                .is_none_or(|room| self.held + self.per_pair <= room)
    }

    /// A pair is about to open: the descriptors it is guessed to take.
    pub fn reserve(&mut self) -> usize {
        self.open += 1;
        self.held += self.per_pair;
        self.per_pair
    }

    /// The pair that `reserved` was taken for opened, holding `actual`.
    pub fn settle(&mut self, reserved: usize, actual: usize) {
        self.held = self.held.saturating_sub(reserved) + actual;
        self.per_pair = self.per_pair.max(actual);
    }

    /// A pair closed (or failed to open), giving back `held`.
    pub fn release(&mut self, held: usize) {
        self.held = self.held.saturating_sub(held);
        self.open = self.open.saturating_sub(1);
    }

    /// An open ran out of descriptors while other pairs hold those they
    /// hold now (the process has fewer to spare than the budget was told:
    /// files opened since by someone else, say): from now on, the batch
    /// holds no more than that.
    pub fn ran_out(&mut self) {
        self.room = Some(self.room.map_or(self.held, |room| room.min(self.held)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_the_limit_less_what_is_open_and_the_reserve() {
        let budget = Budget::new(Some(1024), 10);
        assert_eq!(
            budget.pairs_that_fit(),
            (1024 - 10 - RESERVE) / LEAST_PER_PAIR
        );
        assert_eq!(Budget::new(None, 10).pairs_that_fit(), usize::MAX);
        // A limit below what is open still lets one pair try.
        assert_eq!(Budget::new(Some(8), 30).pairs_that_fit(), 1);
    }

    #[test]
    fn pairs_open_within_the_room_and_a_lone_pair_always_may() {
        let mut budget = Budget::new(Some(RESERVE + 10), 0);
        assert!(budget.may_open());
        let a = budget.reserve();
        assert!(budget.may_open());
        let b = budget.reserve();
        assert!(!budget.may_open(), "8 held, 4 more would pass 10");
        budget.settle(a, 6); // a backing chain: the guess grows
        assert_eq!(budget.per_pair(), 6);
        budget.release(6);
        budget.release(b);
        assert_eq!(budget.open_pairs(), 0);
        assert!(budget.may_open());
        let mut tight = Budget::new(Some(RESERVE + 1), 0);
        assert!(
            tight.may_open(),
            "a pair alone tries, even if it cannot fit"
        );
        tight.reserve();
        assert!(!tight.may_open());
    }

    #[test]
    fn running_out_shrinks_the_room_to_what_the_others_hold() {
        let mut budget = Budget::new(Some(1000), 0);
        let a = budget.reserve();
        budget.settle(a, 4);
        let b = budget.reserve();
        budget.settle(b, 4);
        let c = budget.reserve();
        // c ran out: it gives its guess back, and the room is what a and b hold.
        budget.release(c);
        budget.ran_out();
        assert_eq!(budget.pairs_that_fit(), 2);
        assert!(!budget.may_open());
        budget.release(4);
        assert!(budget.may_open(), "one closed: one may open in its place");
    }

    #[test]
    fn running_out_is_emfile_or_enfile_only() {
        let io = |errno| {
            Error::io(
                Path::new("x"),
                "open",
                std::io::Error::from_raw_os_error(errno),
            )
        };
        assert!(is_exhaustion(&io(libc::EMFILE)));
        assert!(is_exhaustion(&io(libc::ENFILE)));
        assert!(!is_exhaustion(&io(libc::ENOENT)));
        assert!(!is_exhaustion(&Error::Cancelled));
    }
}
