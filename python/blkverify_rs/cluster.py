"""Verifying on a Dask cluster. The only module that imports ``distributed``,
and only once a cluster is asked for: ``import blkverify_rs`` never does.

The work is done by the task functions of :mod:`blkverify_rs.tasks`, the same
ones a caller can run locally, sent to the cluster's workers (which must see
the pairs' paths). Pairs are taken a window at a time and verified in
groups, one task per group (small pairs share a task: a task costs more than
opening and verifying a small pair); a pair larger than ``split`` bytes comes
back from its group with its first ``split`` bytes verified, and the rest is
verified by one task per range of ``split`` bytes, whose reports are merged
here into the report one verify of the whole pair gives. Results are yielded
in order as they come, and the window's state, futures and results are
dropped once yielded. A pair's ``workers`` pin its tasks to the workers named
(by name, address or host). Running tasks send their progress as Dask events.

A pair whose sides live on different hosts (``raw_workers`` and
``test_workers``) is never read across the network: each side is hashed where
it lives, as 64 KiB block digests in ranges of ``split`` bytes, and the
digests are compared here, as ``verify`` compares an image with a block
digests file (the findings are blocks). :func:`digest` cuts one image's
hashing into such ranges too, and joins their digests here, in order.

Faults: a task whose worker dies runs again on another (Dask does that); a
task pinned to workers that are all gone ends its pair with an error; a pair
whose files a worker cannot open ends with that error; the others go on.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from blkverify_rs import _native, tasks

if TYPE_CHECKING:
    from distributed import Client, Future

DEFAULT_SPLIT = 64 << 30
DEFAULT_TIMEOUT = 30.0
# The block digests' block (64 KiB). Ranges start on a block: a whole
# number of sectors for verify, of blocks for digests.
BLOCK_SIZE = _native.DIGEST_BLOCK_SIZE
SPLIT_UNIT = BLOCK_SIZE
# The smallest range `digest` cuts an image into by itself: a task costs
# milliseconds, hashing 64 MiB a few tenths of a second.
MIN_DIGEST_SPLIT = 64 << 20
INSTALL_HINT = 'pip install "blkverify-rs[dask]"'

# The findings of a report whose mappings are looked up (as the engine does).
MAX_LOCATED = _native.MAX_LOCATED
# How often the workers are looked at (pins, an empty cluster), in seconds.
CHECK_INTERVAL = 1.0
# The most pairs one task verifies (or probes, for pairs on two hosts), one
# after the other: opening and verifying a small pair costs far less than a
# task; and the most bytes of files (the pairs' size hints) in one task.
GROUP_PAIRS = 64
GROUP_BYTES = 64 << 20
# The pairs in a batch's window (taken in, not yet yielded): at least WINDOW,
# 16 per task slot of the cluster, at most MAX_WINDOW.
WINDOW = 1024
MAX_WINDOW = 16384


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            f"running on a Dask cluster needs Dask's distributed package: {INSTALL_HINT}"
        ) from exc
    return distributed


def quiet_logs() -> None:
    """Silence Dask's own logging in this process (a command prints its one
    line of error, not Dask's warnings about a worker that died, which are
    handled). Dask sets some of its loggers' levels itself: all are set."""
    import logging

    _distributed()
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "distributed"]
    for name in ["distributed", *names]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def connect(address: str, timeout: float = DEFAULT_TIMEOUT) -> Client:
    """A client of the Dask scheduler at ``address`` that has a worker, within
    ``timeout`` seconds, or a ``TimeoutError`` naming the address."""
    distributed = _distributed()
    deadline = time.monotonic() + timeout
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise TimeoutError(
            errno.ETIMEDOUT,
            f"cannot reach the Dask scheduler (waited {timeout:g} s: {exc})",
            address,
        ) from None
    try:
        client.wait_for_workers(1, timeout=max(deadline - time.monotonic(), 0.5))
    except (OSError, TimeoutError):
        client.close()
        raise TimeoutError(
            errno.ETIMEDOUT, f"the Dask scheduler has no workers (waited {timeout:g} s)", address
        ) from None
    return client


def split_size(split: int | str) -> int:
    """``split`` in bytes (an int, or a size string such as ``"64G"``),
    checked: a positive multiple of 64 KiB."""
    size = _native.parse_size(split) if isinstance(split, str) else int(split)
    if size <= 0 or size % SPLIT_UNIT:
        raise ValueError(
            f"the split size ({size} bytes) must be a positive multiple of {SPLIT_UNIT >> 10} KiB"
        )
    return size


def _run_task(
    fn: Callable[..., Any],
    what: Any,
    options: dict[str, Any],
    *args: Any,
    host_slots: Mapping[str, int] | None = None,
) -> Any:
    """Run a task function on a worker. Unless the caller chose ``threads``,
    each task takes its share of the host's cores: they are split between the
    task slots of all the workers on the host (``host_slots``: host -> slots,
    as the client last saw the cluster), as a local batch splits them between
    pairs; more threads than cores only makes the tasks fight over them."""
    if not options.get("threads"):
        options = {**options, "threads": _threads_per_task(host_slots or {})}
    return fn(what, options, *args)


def _threads_per_task(host_slots: Mapping[str, int]) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        worker = _distributed().get_worker()
        host = worker.address.split("://", 1)[-1].rsplit(":", 1)[0]
        slots = max(host_slots.get(host, 0), worker.state.nthreads)
    except (ValueError, AttributeError):  # not on a worker
        slots = 1
    return max(1, cores // max(1, slots))


def host_slots(workers: Mapping[str, Any]) -> dict[str, int]:
    """The task slots of ``workers`` (as ``scheduler_info()`` lists them),
    summed per host."""
    slots: dict[str, int] = {}
    for info in workers.values():
        host = str(info.get("host"))
        slots[host] = slots.get(host, 0) + int(info.get("nthreads", 1))
    return slots


class _ProgressEvents:
    """A running task's progress, sent to the client as a Dask event at most
    twice a second (the engine calls it ten times a second). Not a display:
    the client adds the counts up and draws them with the one progress bar
    (``report.ProgressBar``), as a local run does."""

    def __init__(self, topic: str, key: str) -> None:
        self.topic = topic
        self.key = key
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.last:
            self.last = now  # a task that ends within half a second sends nothing
        if now - self.last < 0.5:
            return
        self.last = now
        try:
            _distributed().get_worker().log_event(self.topic, [self.key, done])
        except ValueError:  # not on a worker: nobody to tell
            pass


class _Task:
    """One submitted task: a group of pairs pinned alike (``part`` None),
    verified one after the other, or the probe of their sides where they
    live (``side`` set); or one range of one pair (``part`` set)."""

    __slots__ = (
        "attempt",
        "fetching",
        "future",
        "length",
        "nbytes",
        "offsets",
        "orphaned_since",
        "pairs",
        "part",
        "restriction",
        "side",
        "start",
    )

    def __init__(
        self,
        pairs: list[int],
        part: int | None = None,
        start: int = 0,
        length: int | None = None,
        side: str | None = None,
    ):
        self.pairs = pairs
        self.part = part
        # A range task: bytes [start, start + length) for verify; for a side
        # (`side` is "raw" or "test") blocks [start, length) to hash.
        self.start = start
        self.length = length
        self.side = side
        self.nbytes = 0
        # A locate task: the offsets of a finished report's findings, to be
        # located in the test image where it lives.
        self.offsets: list[int] | None = None
        self.attempt = 0
        self.fetching = False
        self.orphaned_since: float | None = None
        self.restriction: list[str] | None = None
        self.future: Future | None = None

    @property
    def pair(self) -> int:
        return self.pairs[0]


class _PairState:
    __slots__ = ("hint", "keys", "parts", "raw_parts", "report", "sides", "size", "started")

    def __init__(self, hint: int) -> None:
        # What the first pass knew of its size (its files' sizes), until it opens.
        self.hint = hint
        self.size = 0
        self.parts: list[dict[str, Any] | BaseException | None] = []
        self.started = time.monotonic()
        # A pair hashed where its sides live: each side's probe, and how many
        # of `parts` are the raw side's spans (the test side's follow).
        self.sides: dict[str, dict[str, Any]] = {}
        self.raw_parts = 0
        self.report: dict[str, Any] | None = None  # waiting for its mappings
        # The keys of the pair's own tasks (its ranges, spans, locate).
        self.keys: set[str] = set()


# The value of an event that says a task is done (its value is still to fetch).
_DONE = object()


def is_cross(pair: Mapping[str, Any]) -> bool:
    """Whether ``pair``'s sides live on different hosts: each is hashed where
    it lives."""
    return bool(pair.get("raw_workers") or pair.get("test_workers"))


def _pins(pair: Mapping[str, Any], side: str | None) -> list[str] | None:
    """The workers ``pair`` (or its ``side``) is pinned to, if any."""
    return pair.get("workers" if side is None else f"{side}_workers") or None


def _pinned_error(pair: Mapping[str, Any], side: str | None = None) -> Exception:
    """That a pair's pinned workers are all gone (for each pair of a group,
    the pair's own words come from its path: the test's, or the side's)."""
    names = ", ".join(_pins(pair, side) or ())
    what = "this pair is" if side is None else f"its {side} side is"
    path = pair["test" if side is None else side]
    return _native.Error(
        f"{path}: none of the workers {what} pinned to ({names}) is in the cluster"
    )


def _task_error(pair: Mapping[str, Any], exc: BaseException | None) -> Exception:
    """A task that failed for the cluster's sake (its workers died, it was
    cancelled), not the pair's: an error for the pair."""
    what = "the task was cancelled" if exc is None else str(exc) or type(exc).__name__
    return _native.Error(f"{pair['test']}: the cluster could not run the task: {what}")


def _hint(pair: Mapping[str, Any]) -> int:
    """What a pair's size is taken to be until it opens: its files' sizes,
    as a local batch takes it (the native rule)."""
    return _native.scan_pairs((pair,))[1]


class _Batch:
    """One batch on a cluster, as a stream: takes pairs from ``pairs`` a
    window at a time, submits their tasks, follows them, and yields one
    result per pair, in order. The client holds the pairs of the window
    only: their state, futures and results are dropped once yielded."""

    def __init__(
        self,
        client: Client,
        pairs: Iterator[dict[str, Any]],
        options: dict[str, Any],
        split: int,
        progress: Callable[[int, int, int, int], None] | None,
        timeout: float,
        pairs_total: int | None = None,
        total: int | None = None,
    ) -> None:
        self.client = client
        self.source = pairs
        self.options = options
        self.split = split
        self.progress = progress
        self.timeout = timeout
        token = uuid.uuid4().hex[:12]
        self.prefix = f"blkverify-{token}"
        self.topic = f"blkverify-progress-{token}"
        # What the main loop hears of: a task done (from Dask's callback
        # thread), or a finished task's value fetched (from the fetch thread).
        self.events: queue.SimpleQueue[tuple[Future, Any]] = queue.SimpleQueue()
        self.fetcher = ThreadPoolExecutor(1, thread_name_prefix="blkverify-fetch")
        self.tasks: dict[str, _Task] = {}
        self.running_bytes: dict[str, int] = {}
        self.lock = threading.Lock()
        # The window: pairs taken from the source and not yet yielded, by index.
        self.pairs: dict[int, dict[str, Any]] = {}
        self.state: dict[int, _PairState] = {}
        self.results: dict[int, dict[str, Any] | BaseException] = {}
        self.admitted = 0  # pairs taken from the source
        self.delivered = 0  # results yielded
        self.exhausted = False
        self.input_error: BaseException | None = None
        self.gave_up: Exception | None = None  # no workers for too long: every pair left
        self.pairs_done = 0
        self.pairs_total = pairs_total
        self.total_given = total is not None
        self.total = total or 0
        self.finished_bytes = 0
        self.workers: dict[str, Any] = {}
        self.host_slots: dict[str, int] = {}
        self.no_workers_since: float | None = None

    # -- taking pairs in ------------------------------------------------------

    def _slots(self) -> int:
        return max(1, sum(self.host_slots.values()))

    def _window(self) -> int:
        """The most pairs in the window: enough to keep every task slot of
        the cluster busy, within bounds."""
        return min(max(WINDOW, 16 * self._slots()), MAX_WINDOW)

    def _group_cap(self, window: int) -> int:
        """The most pairs in one task: up to GROUP_PAIRS, but fewer when the
        pairs are few, so that every task slot gets some."""
        pairs = window if self.pairs_total is None else min(window, self.pairs_total)
        return max(1, min(GROUP_PAIRS, pairs // (4 * self._slots())))

    def _admit(self) -> None:
        """Take pairs from the source while the window has room (in batches
        of at least a group, so groups fill), and submit their tasks."""
        if self.exhausted:
            return
        window = self._window()
        cap = self._group_cap(window)
        room = window - (self.admitted - self.delivered)
        if room < cap and self.admitted > self.delivered:
            return
        new: list[int] = []
        while room > 0:
            try:
                pair = next(self.source)
            except StopIteration:
                self.exhausted = True
                break
            except Exception as exc:  # a bad pair of a one-shot iterator: raised in its turn
                self.input_error = exc
                self.exhausted = True
                break
            index = self.admitted
            self.admitted += 1
            room -= 1
            state = _PairState(_hint(pair))
            self.pairs[index] = pair
            self.state[index] = state
            if not self.total_given:
                self.total += state.hint
            if self.gave_up is not None:
                self._opened(index, 0)
                self._pair_done(index, self.gave_up)
            else:
                new.append(index)
        self._submit_groups(new, cap)

    def _submit_groups(self, indices: list[int], cap: int) -> None:
        """Pairs pinned alike go in groups: up to ``cap`` pairs and
        GROUP_BYTES of files (a pair whose size is not known goes alone),
        since opening and verifying a small pair costs far less than a task.
        A pair on two hosts is probed side by side, each where it lives."""
        groups: dict[tuple[str | None, tuple[str, ...]], list[int]] = {}
        for index in indices:
            pair = self.pairs[index]
            for side in ("raw", "test") if is_cross(pair) else (None,):
                pins = tuple(_pins(pair, side) or ())
                groups.setdefault((side, pins), []).append(index)
        for (side, _), members in groups.items():
            group: list[int] = []
            nbytes = 0
            for index in members:
                hint = self.state[index].hint or GROUP_BYTES
                if group and (len(group) >= cap or nbytes + hint > GROUP_BYTES):
                    self._submit(_Task(group, side=side))
                    group, nbytes = [], 0
                group.append(index)
                nbytes += hint
            if group:
                self._submit(_Task(group, side=side))

    # -- submitting -----------------------------------------------------------

    def _look_at_workers(self) -> None:
        self.workers = self.client.scheduler_info()["workers"]
        self.host_slots = host_slots(self.workers)

    def _resolve(self, names: Iterable[str]) -> list[str]:
        """The addresses of the live workers ``names`` name: by name, address
        (with or without ``tcp://``), or host."""
        found = set()
        for name in names:
            for address, info in self.workers.items():
                bare = address.split("://", 1)[-1]
                if name in (address, bare, str(info.get("name")), info.get("host")):
                    found.add(address)
        return sorted(found)

    def _submit(self, task: _Task) -> None:
        pair = self.pairs[task.pair]
        pins = _pins(pair, task.side)
        if pins:
            task.restriction = self._resolve(pins)
            if not task.restriction:
                errors = [_pinned_error(self.pairs[index], task.side) for index in task.pairs]
                self._task_done(task, errors if task.part is None else errors[0])
                return
        kind = "group" if task.part is None else f"range{task.part}"
        key = f"{self.prefix}-{task.pair}-{task.side or 'pair'}-{kind}-{task.attempt}"
        if task.part is None and task.side is not None:
            side = task.side
            items = [
                (self.pairs[i][side], tasks.side_options(self.pairs[i], side, self.options))
                for i in task.pairs
            ]
            args: tuple[Any, ...] = (tasks.probe_sides, items, self.options)
        elif task.part is None:
            group = [self.pairs[index] for index in task.pairs]
            progress = _ProgressEvents(self.topic, key)
            args = (tasks.verify_pairs, group, self.options, self.split, progress)
        elif task.offsets is not None:
            options = tasks.side_options(pair, "test", self.options)
            args = (tasks.locate, pair["test"], options, task.offsets)
        elif task.side is not None:
            options = tasks.side_options(pair, task.side, self.options)
            if task.side == "test":
                # Hashed on the reference's grid; past its end, zeros expected.
                options["grid_end"] = self.state[task.pair].sides["raw"]["size"]
                options["record_errors"] = True
            progress = _ProgressEvents(self.topic, key)
            args = (
                tasks.digest_span,
                pair[task.side],
                options,
                task.start,
                task.length,
                progress,
            )
        else:
            progress = _ProgressEvents(self.topic, key)
            args = (tasks.verify_range, pair, self.options, task.start, task.length, progress)
        task.future = self.client.submit(
            _run_task,
            *args,
            host_slots=self.host_slots,
            key=key,
            workers=task.restriction,
            allow_other_workers=False,
            # The window's first pairs first: results leave in order.
            priority=-task.pair,
            pure=False,
        )
        self.tasks[key] = task
        if task.part is not None:
            self.state[task.pair].keys.add(key)
        self._when_done(task.future)

    def _submit_spans(self, index: int) -> None:
        """Both sides of a pair that lives on two hosts are probed: hash each
        where it lives, in ranges of ``split`` bytes. The raw side's blocks are
        its own; the test side's are on the raw side's grid, up to the end of
        the longer image."""
        state = self.state[index]
        raw_size = int(state.sides["raw"]["size"])
        total = max(raw_size, int(state.sides["test"]["size"]))
        state.size = total
        state.started = time.monotonic()
        self._opened(index, raw_size + total)
        step = self.split // BLOCK_SIZE
        spans: list[tuple[str, int, int, int]] = []
        for side, limit in (("raw", raw_size), ("test", total)):
            blocks = -(-limit // BLOCK_SIZE)
            for first in range(0, max(blocks, 1), step):
                end = min(first + step, blocks)
                nbytes = min(end * BLOCK_SIZE, limit) - min(first * BLOCK_SIZE, limit)
                spans.append((side, first, end, nbytes))
        state.raw_parts = sum(1 for span in spans if span[0] == "raw")
        state.parts = [None] * len(spans)
        for part, (side, first, end, nbytes) in enumerate(spans):
            task = _Task([index], part, first, end, side=side)
            task.nbytes = nbytes
            self._submit(task)

    def _submit_ranges(self, index: int, size: int, first: dict[str, Any]) -> None:
        """A pair larger than ``split`` came back with its first range
        verified: verify the others, a task each."""
        state = self.state[index]
        state.size = size
        starts = range(self.split, size, self.split)
        state.parts = [first, *(None for _ in starts)]
        for part, start in enumerate(starts, start=1):
            self._submit(_Task([index], part, start, min(self.split, size - start)))

    # -- following ------------------------------------------------------------

    def _on_event(self, event: tuple[float, Any]) -> None:
        key, done = event[1]
        with self.lock:
            if key in self.tasks:
                self.running_bytes[key] = done

    def _when_done(self, future: Future) -> None:
        future.add_done_callback(lambda f: self.events.put((f, _DONE)))

    def _fetch(self, finished: list[tuple[Future, _Task]]) -> None:
        """Fetch finished tasks' values, in one gather, off the main loop: a
        value whose worker died before it was fetched is computed again, and
        the gather waits for that (a task pinned to workers that are all gone
        is cancelled by the pin check meanwhile, which ends the wait)."""
        futures = [f for f, _ in finished]
        try:
            values = self.client.gather(futures)
        except Exception:
            values = []
            for future, task in finished:
                try:
                    values.append(future.result())
                except Exception as exc:
                    values.append(_task_error(self.pairs[task.pair], exc))
        for future, value in zip(futures, values, strict=True):
            self.events.put((future, value))

    def _handle(self, events: list[tuple[Future, Any]]) -> None:
        finished = []
        for future, value in events:
            task = self.tasks.get(future.key)
            if task is None or task.future is not future:
                continue  # cancelled by us: its pair ended, or it was re-pinned
            if value is not _DONE:
                self._task_done(self._forget(future.key), value)
            elif future.status == "finished":
                if not task.fetching:
                    task.fetching = True
                    finished.append((future, task))
            elif future.status in ("error", "cancelled"):
                exc = future.exception() if future.status == "error" else None
                self._task_done(self._forget(future.key), _task_error(self.pairs[task.pair], exc))
            else:
                # Done when it reported, lost with its worker since: Dask runs
                # it again, and it reports again when done.
                self._when_done(future)
        if finished:
            self.fetcher.submit(self._fetch, finished)

    def _forget(self, key: str) -> _Task:
        with self.lock:
            self.running_bytes.pop(key, None)
            task = self.tasks.pop(key)
        state = self.state.get(task.pair)
        if state is not None:
            state.keys.discard(key)
        return task

    def _opened(self, index: int, size: int) -> None:
        """The pair has opened (``size``: the bytes its progress counts; 0 if
        it could not): the total takes that instead of its hint."""
        state = self.state[index]
        self.total += size - state.hint
        state.hint = size

    def _task_done(self, task: _Task, value: Any) -> None:
        if task.part is None:
            # A group's value: one outcome per pair, or the error that ended
            # the task (for every pair of the group).
            outcomes = value if isinstance(value, list) else [value] * len(task.pairs)
            for index, outcome in zip(task.pairs, outcomes, strict=True):
                if index in self.results:
                    continue
                if isinstance(outcome, BaseException):
                    self._opened(index, 0)
                    self._pair_done(index, outcome)
                elif task.side is not None:
                    sides = self.state[index].sides
                    sides[task.side] = outcome
                    if len(sides) == 2:
                        self._submit_spans(index)
                else:
                    size = int(outcome["virtual_size"])
                    self._opened(index, size)
                    if outcome.get("range") is None:
                        self.finished_bytes += size
                        self._pair_done(index, outcome)
                    else:
                        self.finished_bytes += int(outcome["range"][1])
                        self._submit_ranges(index, size, outcome)
            return
        index = task.pair
        if index in self.results:
            return  # the pair already ended (a part failed, say)
        state = self.state[index]
        if task.offsets is not None:
            self._located(index, value)
            return
        state.parts[task.part] = value
        if task.side is not None:
            self.finished_bytes += task.nbytes
        else:
            self.finished_bytes += state.size if task.length is None else task.length
        if any(part is None for part in state.parts):
            return
        if task.side is not None:
            n = state.raw_parts
            result = tasks.check_spans(
                self.pairs[index],
                state.sides["raw"],
                state.sides["test"],
                state.parts[:n],
                state.parts[n:],
                self.options,
            )
            if isinstance(result, dict) and result["mismatches"]:
                # Name where the findings live in the test image, as a
                # report does: one small task where it lives.
                state.report = result
                locate = _Task([index], len(state.parts), side="test")
                locate.offsets = [m["offset"] for m in result["mismatches"][:MAX_LOCATED]]
                self._submit(locate)
                return
            if isinstance(result, dict):
                result["elapsed_s"] = time.monotonic() - state.started
        else:
            result = tasks.merge(self.pairs[index], state.parts, self.options)
            if isinstance(result, dict):
                result["elapsed_s"] = time.monotonic() - state.started
        assert result is not None
        self._pair_done(index, result)

    def _located(self, index: int, mappings: Any) -> None:
        """A cross-host pair's findings are located (``mappings``: one per
        finding, or an error: then none): its report is done."""
        report = self.state[index].report
        assert report is not None
        if isinstance(mappings, list):
            for finding, mapping in zip(report["mismatches"], mappings, strict=False):
                if mapping is not None:
                    finding["mapping"] = mapping
        report["elapsed_s"] = time.monotonic() - self.state[index].started
        self._pair_done(index, report)

    def _pair_done(self, index: int, result: dict[str, Any] | BaseException) -> None:
        self.results[index] = result
        self.pairs_done += 1
        state = self.state[index]
        state.parts = []  # the ranges' reports are merged: not kept till its turn
        for key in list(state.keys):
            task = self._forget(key)
            if task.future is not None:
                task.future.cancel()

    def _check_workers(self) -> None:
        """Re-pin tasks whose workers are gone to the workers their names now
        resolve to (a restarted worker keeps its name, not its address), or,
        when none has come back within the timeout, end their pairs with an
        error; and give up on an empty cluster after the timeout."""
        self._look_at_workers()
        now = time.monotonic()
        if not self.workers:
            self.no_workers_since = self.no_workers_since or now
            if now - self.no_workers_since > self.timeout:
                self.gave_up = _native.Error(
                    f"the Dask cluster has had no workers for {self.timeout:g} s; giving up"
                )
                self._cancel_all()
                for index in self.pairs:
                    if index not in self.results:
                        self._opened(index, 0)
                        self._pair_done(index, self.gave_up)
            return
        self.no_workers_since = None
        for key, task in list(self.tasks.items()):
            if key not in self.tasks:
                continue  # its pair ended meanwhile
            if task.restriction is None or any(a in self.workers for a in task.restriction):
                task.orphaned_since = None
                continue
            back = self._resolve(_pins(self.pairs[task.pair], task.side) or ())
            if not back:
                task.orphaned_since = task.orphaned_since or now
                if now - task.orphaned_since <= self.timeout:
                    continue
            self._forget(key)
            if task.future is not None:
                task.future.cancel()
            task.attempt += 1
            task.orphaned_since = None
            self._submit(task)  # re-pinned, or (none back) the pinned error

    def _cancel_all(self) -> None:
        futures = [t.future for t in self.tasks.values() if t.future is not None]
        if futures:
            self.client.cancel(futures)
        for key in list(self.tasks):
            self._forget(key)

    def _tick(self) -> None:
        if self.progress is None:
            return
        with self.lock:
            running = sum(self.running_bytes.values())
        total = max(self.total, 0)
        done = min(self.finished_bytes + running, total)
        pairs_total = max(self.pairs_total or 0, self.admitted)
        self.progress(done, total, self.pairs_done, pairs_total)

    def run(self) -> Iterator[dict[str, Any] | BaseException]:
        """The results, in order, as they come."""
        self.client.subscribe_topic(self.topic, self._on_event)
        try:
            self._look_at_workers()
            self._tick()
            last_check = last_tick = time.monotonic()
            while True:
                self._admit()
                while self.delivered in self.results:
                    index = self.delivered
                    result = self.results.pop(index)
                    del self.pairs[index], self.state[index]
                    self.delivered += 1
                    if time.monotonic() - last_tick >= 0.1:
                        self._tick()
                        last_tick = time.monotonic()
                    yield result
                    self._admit()
                if self.exhausted and self.delivered == self.admitted:
                    break
                events: list[tuple[Future, Any]] = []
                try:
                    events.append(self.events.get(timeout=0.1))
                    while True:
                        events.append(self.events.get_nowait())
                except queue.Empty:
                    pass
                if events:
                    self._handle(events)
                if time.monotonic() - last_check >= CHECK_INTERVAL:
                    self._check_workers()
                    last_check = time.monotonic()
                if time.monotonic() - last_tick >= 0.1:
                    self._tick()
                    last_tick = time.monotonic()
            self._tick()
        finally:
            # Ended, failed, or closed early (the consumer stopped): nothing of
            # this batch is left running on the cluster.
            self._cancel_all()
            self.fetcher.shutdown(wait=False, cancel_futures=True)
            self.client.unsubscribe_topic(self.topic)
            # The events not handled hold their futures (whose callbacks hold
            # this batch): let them go now, not at the next garbage collection.
            try:
                while True:
                    self.events.get_nowait()
            except queue.Empty:
                pass
        if self.input_error is not None:
            raise self.input_error


def iter_verify_many(
    client: Client,
    pairs: Iterable[dict[str, Any]],
    options: dict[str, Any],
    *,
    split: int | str = DEFAULT_SPLIT,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int, int, int, int], None] | None = None,
    pairs_total: int | None = None,
    total: int | None = None,
) -> Iterator[dict[str, Any] | BaseException]:
    """Verify checked ``pairs`` (dicts) on the cluster ``client`` is connected
    to, with ``verify``'s keyword ``options``: one report dict, or the
    exception the pair ended with, per pair, in order, as they come; the
    client holds a window of pairs at a time, never all. A pair larger than
    ``split`` bytes is verified as ranges of that size, on as many workers.
    ``timeout``: how long the cluster may be without workers before the
    pairs left end with an error. ``pairs_total`` and ``total`` (the sum of
    the pairs' size hints), from a first pass, give the progress its totals
    from the start."""
    _distributed()
    batch = _Batch(
        client, iter(pairs), options, split_size(split), progress, timeout, pairs_total, total
    )
    return batch.run()


def digest_split(size: int, client: Client) -> int:
    """The range ``digest`` cuts an image of ``size`` bytes into when not
    told: one per worker thread in the cluster, of at least 64 MiB and at
    most 64 GiB, in whole blocks."""
    slots = sum(int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values())
    share = -(-size // max(slots, 1))
    share = min(max(share, MIN_DIGEST_SPLIT), DEFAULT_SPLIT)
    return -(-share // BLOCK_SIZE) * BLOCK_SIZE


def digest(
    client: Client,
    path: str,
    options: dict[str, Any],
    *,
    split: int | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    blocks: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The digest of the image at ``path`` (which every worker must see),
    hashed on the cluster ``client`` is connected to in ranges of ``split``
    bytes (default: see :func:`digest_split`), one task each; their block
    digests are joined here, in order, into the digest (and with ``blocks``,
    the block digests file) the whole image's digest gives. ``options``: the
    native ``digest_span``'s. Raises what hashing the image raises here; a
    cluster without workers for ``timeout`` seconds is a ``TimeoutError``."""
    _distributed()
    started = time.monotonic()
    token = uuid.uuid4().hex[:12]
    topic = f"blkverify-progress-{token}"
    running: dict[str, int] = {}
    lock = threading.Lock()

    def on_event(event: tuple[float, Any]) -> None:
        key, done = event[1]
        with lock:
            running[key] = done

    def outcome(value: Any) -> Any:
        if isinstance(value, BaseException):
            raise value
        return value

    probe = client.submit(
        _run_task,
        tasks.digest_span,
        path,
        options,
        0,
        0,
        host_slots=host_slots(client.scheduler_info()["workers"]),
        key=f"blkverify-{token}-probe",
        pure=False,
    )
    futures: list[Future] = [probe]
    client.subscribe_topic(topic, on_event)
    try:
        opened = outcome(_wait([probe], client, timeout)[0])
        size = int(opened["size"])
        step = split_size(split) if split is not None else digest_split(size, client)
        slots = host_slots(client.scheduler_info()["workers"])
        step //= BLOCK_SIZE
        blocks_n = -(-size // BLOCK_SIZE)
        ranges = [(f, min(f + step, blocks_n)) for f in range(0, max(blocks_n, 1), step)]
        futures = []
        for i, (first, end) in enumerate(ranges):
            key = f"blkverify-{token}-span{i}"
            futures.append(
                client.submit(
                    _run_task,
                    tasks.digest_span,
                    path,
                    options,
                    first,
                    end,
                    _ProgressEvents(topic, key),
                    host_slots=slots,
                    key=key,
                    pure=False,
                )
            )

        fed = [0]  # ranges fed to the outer hash (and released)

        def tick() -> None:
            if progress is None:
                return
            done = 0
            for i, ((first, end), future) in enumerate(zip(ranges, futures, strict=True)):
                nbytes = min(end * BLOCK_SIZE, size) - min(first * BLOCK_SIZE, size)
                if i < fed[0] or future.done():
                    done += nbytes
                else:
                    with lock:
                        done += min(running.get(future.key, 0), nbytes)
            progress(done, size)

        # The outer hash takes the ranges in order, each as soon as it and
        # those before it are in; a range fed is dropped, so the client holds
        # only ranges that finished early, never the whole image's digests.
        joiner = _native.SpanJoiner(size=size, algorithm=opened["algorithm"], blocks=blocks)
        for future in futures:
            (span,) = _wait([future], client, timeout, tick)
            joiner.feed(outcome(span))
            del span
            fed[0] += 1
            future.release()  # the worker may drop it too
        tick()
        joined = joiner.finish()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        client.unsubscribe_topic(topic)
    joined["image"] = path
    joined["warnings"] = opened["warnings"]
    joined["elapsed_s"] = time.monotonic() - started
    return joined


def _wait(
    futures: list[Future],
    client: Client,
    timeout: float,
    tick: Callable[[], None] | None = None,
) -> list[Any]:
    """The values of ``futures``, waiting while the cluster has workers, or
    until it has had none for ``timeout`` seconds (a ``TimeoutError``).
    ``tick`` is called about twice a second meanwhile."""
    empty_since: float | None = None
    last_check = last_tick = time.monotonic()
    while True:
        if all(f.done() for f in futures):
            return client.gather(futures)
        time.sleep(0.05)
        if tick is not None and time.monotonic() - last_tick >= 0.5:
            tick()
            last_tick = time.monotonic()
        if time.monotonic() - last_check < CHECK_INTERVAL:
            continue
        last_check = time.monotonic()
        if client.scheduler_info()["workers"]:
            empty_since = None
            continue
        empty_since = empty_since or time.monotonic()
        if time.monotonic() - empty_since > timeout:
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"the Dask cluster has had no workers for {timeout:g} s; giving up",
            )
