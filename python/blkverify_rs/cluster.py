"""Verifying on a Dask cluster. The only module that imports ``distributed``,
and only once a cluster is asked for: ``import blkverify_rs`` never does.

The work is done by the task functions of :mod:`blkverify_rs.tasks`, the same
ones a caller can run locally, sent to the cluster's workers (which must see
the pairs' paths). Each pair is first probed by one small task (opened, as
verifying it would, for its size and any error); then verified by one task, or,
when it is larger than ``split`` bytes, by one task per range of ``split``
bytes, whose reports are merged here into the report one verify of the whole
pair gives. A pair's ``workers`` pin its tasks to the workers named (by name,
address or host). Running tasks send their progress as Dask events.

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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from blkverify_rs import _native, tasks

if TYPE_CHECKING:
    from distributed import Client, Future

DEFAULT_SPLIT = 64 << 30
DEFAULT_TIMEOUT = 30.0
# Ranges start on 64 KiB: a sector for verify, a block for digests.
SPLIT_UNIT = 64 << 10
INSTALL_HINT = 'pip install "blkverify-rs[dask]"'

# How often the workers are looked at (pins, an empty cluster), in seconds.
CHECK_INTERVAL = 1.0
# The most pairs one probe task opens.
PROBE_GROUP = 64


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
        raise ValueError(f"the split size ({size} bytes) must be a positive multiple of 64 KiB")
    return size


def _run_task(fn: Callable[..., Any], what: Any, options: dict[str, Any], *args: Any) -> Any:
    """Run a task function on a worker. Unless the caller chose ``threads``,
    each task takes its share of the host's cores: they are split between the
    worker's task slots, as a local batch splits them between pairs."""
    if not options.get("threads"):
        options = {**options, "threads": _threads_per_task()}
    return fn(what, options, *args)


def _threads_per_task() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        slots = _distributed().get_worker().state.nthreads
    except (ValueError, AttributeError):  # not on a worker
        slots = 1
    return max(1, cores // max(1, slots))


class _Progress:
    """A running task's progress, sent to the client as a Dask event at most
    twice a second (the engine calls it ten times a second)."""

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
    """One submitted task: the probe of a group of pairs pinned alike (``part``
    None), or one range of one pair."""

    __slots__ = (
        "attempt",
        "fetching",
        "future",
        "length",
        "orphaned_since",
        "pairs",
        "part",
        "restriction",
        "start",
    )

    def __init__(
        self, pairs: list[int], part: int | None = None, start: int = 0, length: int | None = None
    ):
        self.pairs = pairs
        self.part = part
        self.start = start
        self.length = length
        self.attempt = 0
        self.fetching = False
        self.orphaned_since: float | None = None
        self.restriction: list[str] | None = None
        self.future: Future | None = None

    @property
    def pair(self) -> int:
        return self.pairs[0]


class _PairState:
    __slots__ = ("parts", "size", "started")

    def __init__(self) -> None:
        self.size = 0
        self.parts: list[dict[str, Any] | BaseException | None] = []
        self.started = 0.0


# The value of an event that says a task is done (its value is still to fetch).
_DONE = object()


def _pinned_error(pair: Mapping[str, Any]) -> Exception:
    """That a pair's pinned workers are all gone (for each pair of a group,
    the pair's own words come from its test path)."""
    names = ", ".join(pair["workers"])
    return _native.Error(
        f"{pair['test']}: none of the workers this pair is pinned to ({names}) is in the cluster"
    )


def _task_error(pair: Mapping[str, Any], exc: BaseException | None) -> Exception:
    """A task that failed for the cluster's sake (its workers died, it was
    cancelled), not the pair's: an error for the pair."""
    what = "the task was cancelled" if exc is None else str(exc) or type(exc).__name__
    return _native.Error(f"{pair['test']}: the cluster could not run the task: {what}")


class _Batch:
    """One ``verify_many`` on a cluster: submits the tasks, follows them, and
    turns their outcomes into one result per pair, in order."""

    def __init__(
        self,
        client: Client,
        pairs: list[dict[str, Any]],
        options: dict[str, Any],
        split: int,
        progress: Callable[[int, int, int, int], None] | None,
        timeout: float,
    ) -> None:
        self.client = client
        self.pairs = pairs
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
        self.state = [_PairState() for _ in pairs]
        self.results: list[dict[str, Any] | BaseException | None] = [None] * len(pairs)
        self.pairs_done = 0
        self.total = 0
        self.finished_bytes = 0
        self.workers: dict[str, Any] = {}
        self.no_workers_since: float | None = None

    # -- submitting -----------------------------------------------------------

    def _look_at_workers(self) -> None:
        self.workers = self.client.scheduler_info()["workers"]

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
        if pair.get("workers"):
            task.restriction = self._resolve(pair["workers"])
            if not task.restriction:
                errors = [_pinned_error(self.pairs[index]) for index in task.pairs]
                self._task_done(task, errors if task.part is None else errors[0])
                return
        kind = "probe" if task.part is None else f"range{task.part}"
        key = f"{self.prefix}-{task.pair}-{kind}-{task.attempt}"
        if task.part is None:
            group = [self.pairs[index] for index in task.pairs]
            args: tuple[Any, ...] = (tasks.probe_pairs, group, self.options)
            priority = 1  # sizes first, so the progress total is known early
        else:
            progress = _Progress(self.topic, key)
            args = (tasks.verify_range, pair, self.options, task.start, task.length, progress)
            priority = 0
        task.future = self.client.submit(
            _run_task,
            *args,
            key=key,
            workers=task.restriction,
            allow_other_workers=False,
            priority=priority,
            pure=False,
        )
        self.tasks[key] = task
        self._when_done(task.future)

    def _submit_ranges(self, index: int, size: int) -> None:
        state = self.state[index]
        state.size = size
        state.started = time.monotonic()
        if size <= self.split:
            ranges = [(0, None)]
        else:
            ranges = [
                (start, min(self.split, size - start)) for start in range(0, size, self.split)
            ]
        state.parts = [None] * len(ranges)
        for part, (start, length) in enumerate(ranges):
            self._submit(_Task([index], part, start, length))

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
            return self.tasks.pop(key)

    def _task_done(self, task: _Task, value: Any) -> None:
        if task.part is None:
            # A probe's value: one outcome per pair, or the error that ended
            # the task (for every pair of the group).
            outcomes = value if isinstance(value, list) else [value] * len(task.pairs)
            for index, outcome in zip(task.pairs, outcomes, strict=True):
                if self.results[index] is not None:
                    continue
                if isinstance(outcome, BaseException):
                    self._pair_done(index, outcome)
                else:
                    size = int(outcome["virtual_size"])
                    self.total += size
                    self._submit_ranges(index, size)
            return
        index = task.pair
        if self.results[index] is not None:
            return  # the pair already ended (a part failed, say)
        state = self.state[index]
        state.parts[task.part] = value
        self.finished_bytes += state.size if task.length is None else task.length
        if any(part is None for part in state.parts):
            return
        if len(state.parts) == 1:
            result = state.parts[0]
        else:
            result = tasks.merge(self.pairs[index], state.parts, self.options)
            if isinstance(result, dict):
                result["elapsed_s"] = time.monotonic() - state.started
        assert result is not None
        self._pair_done(index, result)

    def _pair_done(self, index: int, result: dict[str, Any] | BaseException) -> None:
        self.results[index] = result
        self.pairs_done += 1
        for key, task in list(self.tasks.items()):
            if task.part is not None and task.pair == index:
                self._forget(key)
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
                error = _native.Error(
                    f"the Dask cluster has had no workers for {self.timeout:g} s; giving up"
                )
                for index, result in enumerate(self.results):
                    if result is None:
                        self._pair_done(index, error)
            return
        self.no_workers_since = None
        for key, task in list(self.tasks.items()):
            if key not in self.tasks:
                continue  # its pair ended meanwhile
            if task.restriction is None or any(a in self.workers for a in task.restriction):
                task.orphaned_since = None
                continue
            back = self._resolve(self.pairs[task.pair]["workers"])
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

    def _tick(self) -> None:
        if self.progress is None:
            return
        with self.lock:
            running = sum(self.running_bytes.values())
        done = min(self.finished_bytes + running, self.total)
        self.progress(done, self.total, self.pairs_done, len(self.pairs))

    def run(self) -> list[dict[str, Any] | BaseException]:
        self.client.subscribe_topic(self.topic, self._on_event)
        try:
            self._look_at_workers()
            # Probes go in groups of pairs pinned alike: opening a pair costs
            # far less than a task does.
            groups: dict[tuple[str, ...], list[int]] = {}
            for index, pair in enumerate(self.pairs):
                groups.setdefault(tuple(pair.get("workers") or ()), []).append(index)
            for members in groups.values():
                for first in range(0, len(members), PROBE_GROUP):
                    self._submit(_Task(members[first : first + PROBE_GROUP]))
            last_check = time.monotonic()
            while self.pairs_done < len(self.pairs):
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
                self._tick()
        except BaseException:
            futures = [t.future for t in self.tasks.values() if t.future is not None]
            if futures:
                self.client.cancel(futures)
            raise
        finally:
            self.fetcher.shutdown(wait=False, cancel_futures=True)
            self.client.unsubscribe_topic(self.topic)
        self._tick()
        return [r for r in self.results if r is not None]


def verify_many(
    client: Client,
    pairs: list[dict[str, Any]],
    options: dict[str, Any],
    *,
    split: int | str = DEFAULT_SPLIT,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int, int, int, int], None] | None = None,
) -> list[dict[str, Any] | BaseException]:
    """Verify checked ``pairs`` (dicts) on the cluster ``client`` is connected
    to, with ``verify``'s keyword ``options``: one report dict, or the
    exception the pair ended with, per pair, in order. A pair larger than
    ``split`` bytes is verified as ranges of that size, on as many workers.
    ``timeout``: how long the cluster may be without workers before the
    pairs left end with an error."""
    return _Batch(client, pairs, options, split_size(split), progress, timeout).run()
